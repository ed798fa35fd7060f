//! TTY numbers for mandelboxes. Inside the container `whist-startup.sh` creates `/dev/tty10`
//! with this number as its minor, so two mandelboxes must never share one.

use std::collections::BTreeSet;
use std::ops::Range;

/// The first 10 TTYs are the host's own; AWS kernels allow 63.
pub const DEFAULT_RANGE: Range<u8> = 10..64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtyError {
    #[error("all TTYs in {0:?} are taken")]
    Exhausted(Range<u8>),
    #[error("TTY {0} was not allocated")]
    NotAllocated(u8),
    #[error("TTY {0} is outside {1:?}")]
    OutOfRange(u8, Range<u8>),
}

#[derive(Debug, Clone)]
pub struct TtyAllocator {
    range: Range<u8>,
    taken: BTreeSet<u8>,
}

impl TtyAllocator {
    pub fn new(range: Range<u8>) -> Self {
        Self {
            range,
            taken: BTreeSet::new(),
        }
    }

    /// Takes the lowest free TTY (deterministic; the original probed 100 random numbers and
    /// could fail with TTYs still free).
    pub fn allocate(&mut self) -> Result<u8, TtyError> {
        let tty = self
            .range
            .clone()
            .find(|t| !self.taken.contains(t))
            .ok_or_else(|| TtyError::Exhausted(self.range.clone()))?;
        self.taken.insert(tty);
        Ok(tty)
    }

    /// Marks a TTY taken by an existing mandelbox (adopted after a restart).
    pub fn mark_taken(&mut self, tty: u8) -> Result<(), TtyError> {
        if !self.range.contains(&tty) {
            return Err(TtyError::OutOfRange(tty, self.range.clone()));
        }
        self.taken.insert(tty);
        Ok(())
    }

    pub fn free(&mut self, tty: u8) -> Result<(), TtyError> {
        if self.taken.remove(&tty) {
            Ok(())
        } else {
            Err(TtyError::NotAllocated(tty))
        }
    }

    pub fn taken_count(&self) -> usize {
        self.taken.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exhausts_exactly_at_the_range_size() {
        let mut t = TtyAllocator::new(DEFAULT_RANGE);
        for _ in DEFAULT_RANGE {
            t.allocate().unwrap();
        }
        assert!(matches!(t.allocate(), Err(TtyError::Exhausted(_))));
    }

    proptest! {
        #[test]
        fn no_double_assignment_and_frees_are_exact(ops in proptest::collection::vec(any::<Option<u8>>(), 1..200)) {
            let mut t = TtyAllocator::new(10..20);
            let mut live: Vec<u8> = Vec::new();
            for op in ops {
                match op {
                    None => match t.allocate() {
                        Ok(tty) => {
                            prop_assert!(!live.contains(&tty));
                            prop_assert!((10..20).contains(&tty));
                            live.push(tty);
                        }
                        Err(_) => prop_assert_eq!(live.len(), 10),
                    },
                    Some(i) if !live.is_empty() => {
                        let tty = live.remove(usize::from(i) % live.len());
                        t.free(tty).unwrap();
                        prop_assert!(t.free(tty).is_err());
                    }
                    Some(_) => {}
                }
                prop_assert_eq!(t.taken_count(), live.len());
            }
        }
    }
}
