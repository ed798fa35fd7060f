//! The user a mandelbox's processes run as, and so who owns what the host makes for them to
//! write: the bound directories and the user's profile. The original forced everything to
//! `ubuntu` and mode 0777 (`chown -R`, `chmod -R 777`, reference §3.10 step 11); here the owner is
//! configured (`--mandelbox-user UID:GID`), set on descriptors the host itself just created
//! (`fchown`, never a path a mandelbox could have swapped for a link), and modes stay 0755/0644.

use std::fmt;
use std::os::fd::AsFd;
use std::str::FromStr;

use nix::unistd::{Gid, Uid, fchown};

/// A numeric `uid:gid`, as the mandelbox image's user has them (names mean nothing on the host:
/// the image's `/etc/passwd` is not the host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// The user Whist's mandelbox images run the browser as (`whist`, first user of Ubuntu).
    pub const IMAGE_DEFAULT: Owner = Owner::new(1000, 1000);

    pub const fn new(uid: u32, gid: u32) -> Self {
        Self { uid, gid }
    }

    pub fn uid(self) -> u32 {
        self.uid
    }

    pub fn gid(self) -> u32 {
        self.gid
    }

    /// Makes this user the owner of an open file or directory.
    pub fn give(self, fd: impl AsFd) -> nix::Result<()> {
        fchown(
            fd,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        )
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Why a `UID:GID` does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not UID:GID (two numbers, e.g. 1000:1000)")]
pub struct BadOwner(String);

impl FromStr for Owner {
    type Err = BadOwner;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadOwner(s.to_owned());
        let (uid, gid) = s.split_once(':').ok_or_else(bad)?;
        // `u32::from_str` takes a leading `+`; an id is plain digits.
        let number = |part: &str| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse::<u32>().map_err(|_| bad())
        };
        let (uid, gid) = (number(uid)?, number(gid)?);
        // (uid_t)-1 means "leave unchanged" to chown(2): not an owner.
        if uid == u32::MAX || gid == u32::MAX {
            return Err(bad());
        }
        Ok(Self::new(uid, gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_numeric_pairs_only() {
        assert_eq!("1000:1000".parse(), Ok(Owner::new(1000, 1000)));
        assert_eq!("0:27".parse(), Ok(Owner::new(0, 27)));
        assert_eq!(Owner::new(1000, 1001).to_string(), "1000:1001");
        for bad in [
            "",
            "1000",
            "1000:",
            ":1000",
            "ubuntu:ubuntu",
            "+1:2",
            "-1:2",
            "1:2:3",
            "1 :2",
            "4294967295:1",
            "1:4294967296",
        ] {
            let error = bad.parse::<Owner>().unwrap_err();
            assert!(error.to_string().contains("UID:GID"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn gives_an_open_file_to_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let owner = Owner::new(1234, 4321);
        match owner.give(&file) {
            Ok(()) => {
                use std::os::unix::fs::MetadataExt;
                let meta = std::fs::metadata(&path).unwrap();
                assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
            }
            // Not root: only the refusal can be checked.
            Err(errno) => assert_eq!(errno, nix::Error::EPERM),
        }
    }
}
