//! Virtual input devices for a mandelbox (reference §3.7): an absolute pointer, a relative mouse
//! and a keyboard, created through `/dev/uinput`, mapped into the container as
//! `/dev/input/eventN`, and handed to the protocol's input driver as open file descriptors over
//! a Unix socket (`<root>/temp/<id>/sockets/uinput.sock`, the container's
//! `/tmp/sockets/uinput.sock`), in the order absolute, relative, keyboard.
//!
//! Hosts without uinput (this machine's kernel has none) are detected, and mandelboxes then run
//! without input devices: [`create`] answers [`UinputError::Unavailable`] and the caller goes on.

// The uinput API is ioctls on a file descriptor; nix generates their wrappers, which are unsafe.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The uinput control device.
pub const UINPUT_PATH: &str = "/dev/uinput";
/// The socket's name inside the mandelbox's sockets directory.
pub const SOCKET_NAME: &str = "uinput.sock";
/// udev creates `/dev/input/eventN` shortly after `UI_DEV_CREATE`; the original slept 200 ms per
/// device, we wait for the node itself, up to this long.
const NODE_TIMEOUT: Duration = Duration::from_secs(2);
const NODE_POLL: Duration = Duration::from_millis(10);

const EV_KEY: u16 = 0x01;
const EV_REL: u16 = 0x02;
const EV_ABS: u16 = 0x03;
const BUS_USB: u16 = 0x03;
const VENDOR: u16 = 0xf4c1;
const ABS_MAX: i32 = 0xfff;
const UINPUT_MAX_NAME_SIZE: usize = 80;
const ABS_CNT: usize = 64;

nix::ioctl_none!(ui_dev_create, b'U', 1);
nix::ioctl_none!(ui_dev_destroy, b'U', 2);
nix::ioctl_write_int!(ui_set_evbit, b'U', 100);
nix::ioctl_write_int!(ui_set_keybit, b'U', 101);
nix::ioctl_write_int!(ui_set_relbit, b'U', 102);
nix::ioctl_write_int!(ui_set_absbit, b'U', 103);
nix::ioctl_write_int!(ui_set_propbit, b'U', 110);
nix::ioctl_read_buf!(ui_get_sysname, b'U', 44, u8);

#[derive(Debug, thiserror::Error)]
pub enum UinputError {
    #[error("uinput is not available on this host ({0})")]
    Unavailable(String),
    #[error("cannot create the virtual device {name}: {source}")]
    Create {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the event node of {name} did not appear")]
    NoNode { name: &'static str },
    #[error("cannot hand the devices over on {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A touchpad-like absolute pointer (`ID_INPUT_MOUSE` through the host's udev rule).
    Absolute,
    Relative,
    Keyboard,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Absolute, Kind::Relative, Kind::Keyboard];

    fn name(self) -> &'static str {
        match self {
            Self::Absolute => "Whist Virtual Absolute Input",
            Self::Relative => "Whist Virtual Relative Input",
            Self::Keyboard => "Whist Virtual Keyboard",
        }
    }

    fn product(self) -> u16 {
        match self {
            Self::Absolute => 0x1124,
            Self::Relative => 0x1123,
            Self::Keyboard => 0x1122,
        }
    }

    /// (event type, codes) pairs the device reports.
    fn capabilities(self) -> Vec<(u16, Vec<u16>)> {
        match self {
            // BTN_TOUCH, BTN_TOOL_PEN, BTN_STYLUS; ABS_X, ABS_Y.
            Self::Absolute => vec![(EV_KEY, vec![0x14a, 0x140, 0x14b]), (EV_ABS, vec![0, 1])],
            // BTN_LEFT..BTN_EXTRA; REL_X, REL_Y, REL_HWHEEL, REL_WHEEL, REL_WHEEL_HI_RES,
            // REL_HWHEEL_HI_RES.
            Self::Relative => vec![
                (EV_KEY, (0x110..=0x114).collect()),
                (EV_REL, vec![0, 1, 6, 8, 11, 12]),
            ],
            Self::Keyboard => vec![(EV_KEY, (0..0x2ff).collect())],
        }
    }
}

/// The legacy `struct uinput_user_dev` written before `UI_DEV_CREATE`, built field by field
/// (little-endian, as on every host we run on) rather than transmuted.
pub fn user_dev_bytes(kind: Kind) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(UINPUT_MAX_NAME_SIZE + 8 + 4 + 4 * 4 * ABS_CNT);
    let mut name = [0u8; UINPUT_MAX_NAME_SIZE];
    let text = kind.name().as_bytes();
    name[..text.len()].copy_from_slice(text);
    bytes.extend_from_slice(&name);
    for v in [BUS_USB, VENDOR, kind.product(), 1] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.extend_from_slice(&0u32.to_le_bytes()); // ff_effects_max
    let mut absmax = [0i32; ABS_CNT];
    if kind == Kind::Absolute {
        absmax[0] = ABS_MAX;
        absmax[1] = ABS_MAX;
    }
    for table in [absmax, [0; ABS_CNT], [0; ABS_CNT], [0; ABS_CNT]] {
        for v in table {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// One created device; destroyed when dropped.
#[derive(Debug)]
pub struct VirtualDevice {
    pub kind: Kind,
    /// `/dev/input/eventN`, mapped into the container at the same path.
    pub node: PathBuf,
    file: File,
}

impl Drop for VirtualDevice {
    fn drop(&mut self) {
        // SAFETY: the fd is open (owned by `self.file`) and UI_DEV_DESTROY takes no argument.
        if let Err(error) = unsafe { ui_dev_destroy(self.file.as_raw_fd()) } {
            tracing::warn!(%error, device = self.kind.name(), "cannot destroy a virtual device");
        }
    }
}

/// The three devices of one mandelbox.
#[derive(Debug)]
pub struct InputDevices {
    pub devices: Vec<VirtualDevice>,
}

/// Creates the three devices through `uinput` (normally [`UINPUT_PATH`]). All or nothing.
pub fn create(uinput: &Path) -> Result<InputDevices, UinputError> {
    if !uinput.exists() {
        return Err(UinputError::Unavailable(format!(
            "{} does not exist",
            uinput.display()
        )));
    }
    let mut devices = Vec::new();
    for kind in Kind::ALL {
        // Devices already made are destroyed when `devices` drops on the error path.
        devices.push(create_one(uinput, kind)?);
    }
    Ok(InputDevices { devices })
}

fn create_one(uinput: &Path, kind: Kind) -> Result<VirtualDevice, UinputError> {
    let name = kind.name();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(uinput)
        .map_err(|e| match e.raw_os_error() {
            // No uinput driver behind the node (e.g. a stand-in node on a kernel without it).
            Some(nix::libc::ENODEV) | Some(nix::libc::ENXIO) | Some(nix::libc::ENOENT) => {
                UinputError::Unavailable(format!("{}: {e}", uinput.display()))
            }
            _ => UinputError::Create { name, source: e },
        })?;
    let fd = file.as_raw_fd();
    let io = |e: nix::Error| UinputError::Create {
        name,
        source: std::io::Error::from(e),
    };
    for (event_type, codes) in kind.capabilities() {
        // SAFETY: `fd` is an open uinput fd; UI_SET_*BIT take an integer argument by value.
        unsafe { ui_set_evbit(fd, event_type.into()) }.map_err(io)?;
        for code in codes {
            let code = code.into();
            // SAFETY: as above.
            match event_type {
                EV_KEY => unsafe { ui_set_keybit(fd, code) },
                EV_REL => unsafe { ui_set_relbit(fd, code) },
                _ => unsafe { ui_set_absbit(fd, code) },
            }
            .map_err(io)?;
        }
    }
    if kind == Kind::Absolute {
        // SAFETY: as above; INPUT_PROP_POINTER is 0.
        unsafe { ui_set_propbit(fd, 0) }.map_err(io)?;
    }
    file.write_all(&user_dev_bytes(kind))
        .map_err(|source| UinputError::Create { name, source })?;
    // SAFETY: `fd` is an open, configured uinput fd; UI_DEV_CREATE takes no argument.
    unsafe { ui_dev_create(fd) }.map_err(io)?;
    let mut sysname = [0u8; 64];
    // SAFETY: `sysname` is a valid writable buffer whose length is encoded in the request.
    unsafe { ui_get_sysname(fd, &mut sysname) }.map_err(io)?;
    let sysname = String::from_utf8_lossy(&sysname)
        .trim_end_matches('\0')
        .to_owned();
    let node = event_node(&sysname).ok_or(UinputError::NoNode { name })?;
    Ok(VirtualDevice { kind, node, file })
}

/// `/sys/devices/virtual/input/<sysname>/eventN` → `/dev/input/eventN`, waiting for udev.
fn event_node(sysname: &str) -> Option<PathBuf> {
    let sys = Path::new("/sys/devices/virtual/input").join(sysname);
    let started = Instant::now();
    while started.elapsed() < NODE_TIMEOUT {
        if let Ok(entries) = std::fs::read_dir(&sys) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("event") {
                    let node = Path::new("/dev/input").join(&name);
                    if node.exists() {
                        return Some(node);
                    }
                }
            }
        }
        std::thread::sleep(NODE_POLL);
    }
    None
}

/// Hands the devices' fds to the first client of `socket` (the protocol's input driver), then
/// returns; stops early when `cancel` fires. The fds are sent in one message, with one byte of
/// payload (a stream socket carries ancillary data only with data).
pub async fn hand_over(
    devices: &InputDevices,
    socket: &Path,
    cancel: CancellationToken,
) -> Result<(), UinputError> {
    let err = |source| UinputError::Socket {
        path: socket.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(err)?;
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.map_err(err)?.0,
        () = cancel.cancelled() => return Ok(()),
    };
    let stream: OwnedFd = stream.into_std().map_err(err)?.into();
    let fds: Vec<i32> = devices.devices.iter().map(|d| d.file.as_raw_fd()).collect();
    let fd: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(&stream);
    send_fds(fd, &fds).map_err(err)
}

fn send_fds(socket: BorrowedFd<'_>, fds: &[i32]) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let payload = [0u8; 1];
    let iov = [std::io::IoSlice::new(&payload)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
        .map(|_| ())
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_dev_layout_matches_the_kernels_struct() {
        let bytes = user_dev_bytes(Kind::Absolute);
        // name[80] + input_id (4 × u16) + ff_effects_max (u32) + 4 tables of 64 × i32.
        assert_eq!(bytes.len(), 80 + 8 + 4 + 4 * 64 * 4);
        assert!(bytes.starts_with(b"Whist Virtual Absolute Input\0"));
        assert_eq!(&bytes[80..88], &[0x03, 0, 0xc1, 0xf4, 0x24, 0x11, 1, 0]);
        let absmax_x = i32::from_le_bytes([bytes[92], bytes[93], bytes[94], bytes[95]]);
        assert_eq!(absmax_x, 0xfff);
        let kbd = user_dev_bytes(Kind::Keyboard);
        assert_eq!(i32::from_le_bytes([kbd[92], kbd[93], kbd[94], kbd[95]]), 0);
    }

    #[test]
    fn a_missing_uinput_is_unavailable_not_an_error() {
        let error = create(Path::new("/nonexistent/uinput")).unwrap_err();
        assert!(matches!(error, UinputError::Unavailable(_)), "{error}");
    }

    /// A stand-in node with uinput's numbers (10:223) on a kernel without the driver: opening it
    /// fails with ENODEV, which must read as "no uinput here".
    #[test]
    fn a_node_without_a_driver_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("uinput");
        let made = std::process::Command::new("mknod")
            .arg(&node)
            .args(["c", "10", "223"])
            .status();
        if !made.is_ok_and(|s| s.success()) || Path::new(UINPUT_PATH).exists() {
            // Not root, or this kernel has uinput: the stand-in proves nothing here.
            return;
        }
        let error = create(&node).unwrap_err();
        assert!(matches!(error, UinputError::Unavailable(_)), "{error}");
    }

    #[tokio::test]
    async fn hand_over_sends_the_fds_to_the_first_client() {
        use std::os::fd::FromRawFd as _;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_NAME);
        // Stand-in "devices": three ordinary files, whose fds travel like the real ones.
        let files: Vec<VirtualDeviceStandIn> = (0..3)
            .map(|n| {
                let path = dir.path().join(format!("dev{n}"));
                std::fs::write(&path, format!("device {n}")).unwrap();
                VirtualDeviceStandIn(File::open(path).unwrap())
            })
            .collect();
        let fds: Vec<i32> = files.iter().map(|f| f.0.as_raw_fd()).collect();
        let server = {
            let socket = socket.clone();
            tokio::spawn(async move {
                let _ = std::fs::remove_file(&socket);
                let listener = tokio::net::UnixListener::bind(&socket).unwrap();
                let (stream, _) = listener.accept().await.unwrap();
                let stream: OwnedFd = stream.into_std().unwrap().into();
                send_fds(std::os::fd::AsFd::as_fd(&stream), &fds).unwrap();
            })
        };
        let client = loop {
            if let Ok(c) = std::os::unix::net::UnixStream::connect(&socket) {
                break c;
            }
            tokio::task::yield_now().await;
        };
        server.await.unwrap();
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
        let mut buf = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([i32; 3]);
        let msg = recvmsg::<()>(
            client.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let received: Vec<i32> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(received.len(), 3);
        for (n, fd) in received.into_iter().enumerate() {
            // SAFETY: the kernel just gave us this fd; we own it from here.
            let mut file = unsafe { File::from_raw_fd(fd) };
            let mut text = String::new();
            std::io::Read::read_to_string(&mut file, &mut text).unwrap();
            assert_eq!(text, format!("device {n}"), "fds arrive in order");
        }
    }

    struct VirtualDeviceStandIn(File);
}
