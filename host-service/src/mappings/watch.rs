//! Waking up when an entry appears in a directory, through inotify on the directory the host
//! already holds open (its `/proc/self/fd` name, so no path is resolved again): the readiness
//! wait then ends within microseconds of the mandelbox's write instead of a polling period.

use std::os::fd::{AsFd as _, AsRawFd, OwnedFd, RawFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// An inotify instance watching one directory for new entries.
pub(super) struct DirWatch(AsyncFd<Watched>);

struct Watched(Inotify);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirWatch {
    /// Watches `dir` (an open directory) for entries created or renamed into it.
    pub(super) fn new(dir: &OwnedFd) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let name = format!("/proc/self/fd/{}", dir.as_raw_fd());
        inotify.add_watch(
            name.as_str(),
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
        )?;
        Ok(Self(register(Watched(inotify))?))
    }

    /// Waits until something was created in the directory since the last call (events already
    /// queued count), then drains the queue. The caller looks for its entry itself.
    pub(super) async fn changed(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(_) => {
                    // Drain what is left, so one write does not wake the next wait too.
                    while ready.get_inner().0.read_events().is_ok() {}
                    ready.clear_ready();
                    return Ok(());
                }
                Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Registers the watch with tokio's reactor.
#[allow(unsafe_code)]
fn register(watched: Watched) -> std::io::Result<AsyncFd<Watched>> {
    // SAFETY: `Watched` owns its inotify descriptor and the `AsyncFd` owns the `Watched` until it
    // is dropped; `as_raw_fd` always returns that one open descriptor.
    unsafe { AsyncFd::register(watched) }.map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_new_entry_wakes_the_watch_and_an_old_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("before"), b"").unwrap();
        let fd: OwnedFd = std::fs::File::open(dir.path()).unwrap().into();
        let watch = DirWatch::new(&fd).unwrap();
        // Nothing happened since the watch began: no wake-up.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), watch.changed())
                .await
                .is_err()
        );
        let path = dir.path().join("marker");
        let writer = tokio::task::spawn_blocking(move || std::fs::write(path, b"x").unwrap());
        tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("the new entry wakes the watch")
            .unwrap();
        writer.await.unwrap();
    }
}
