//! GPU slots: each GPU runs at most [`MAX_MANDELBOXES_PER_GPU`] mandelboxes, and a new one goes
//! to the least-loaded GPU (lowest index on a tie).

use std::collections::BTreeSet;

use dbclient::types::MandelboxId;

/// Shared with the scaling service's capacity formula (min of GPUs × this and vCPUs / 4).
pub const MAX_MANDELBOXES_PER_GPU: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("every GPU runs {MAX_MANDELBOXES_PER_GPU} mandelboxes already ({gpus} GPUs)")]
    Exhausted { gpus: usize },
    #[error("mandelbox {mandelbox_id} holds no slot on GPU {index}")]
    NotAllocated {
        index: usize,
        mandelbox_id: MandelboxId,
    },
    #[error("GPU {index} does not exist ({gpus} GPUs)")]
    NoSuchGpu { index: usize, gpus: usize },
}

#[derive(Debug, Clone)]
pub struct GpuAllocator {
    per_gpu: usize,
    assigned: Vec<BTreeSet<MandelboxId>>,
}

impl GpuAllocator {
    /// `gpus` devices with `per_gpu` slots each.
    pub fn new(gpus: usize, per_gpu: usize) -> Self {
        Self {
            per_gpu,
            assigned: vec![BTreeSet::new(); gpus],
        }
    }

    pub fn gpu_count(&self) -> usize {
        self.assigned.len()
    }

    /// Total slots: the host's mandelbox capacity on GPU hosts.
    pub fn capacity(&self) -> usize {
        self.assigned.len() * self.per_gpu
    }

    pub fn allocate(&mut self, mandelbox_id: MandelboxId) -> Result<usize, GpuError> {
        let gpus = self.assigned.len();
        let per_gpu = self.per_gpu;
        let (index, slot) = self
            .assigned
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.len() < per_gpu)
            .min_by_key(|(i, s)| (s.len(), *i))
            .ok_or(GpuError::Exhausted { gpus })?;
        slot.insert(mandelbox_id);
        Ok(index)
    }

    /// Records a slot held by an existing mandelbox (adopted after a restart).
    pub fn mark_taken(&mut self, index: usize, mandelbox_id: MandelboxId) -> Result<(), GpuError> {
        let gpus = self.assigned.len();
        let slot = self
            .assigned
            .get_mut(index)
            .ok_or(GpuError::NoSuchGpu { index, gpus })?;
        slot.insert(mandelbox_id);
        Ok(())
    }

    pub fn free(&mut self, index: usize, mandelbox_id: MandelboxId) -> Result<(), GpuError> {
        let gpus = self.assigned.len();
        let slot = self
            .assigned
            .get_mut(index)
            .ok_or(GpuError::NoSuchGpu { index, gpus })?;
        if slot.remove(&mandelbox_id) {
            Ok(())
        } else {
            Err(GpuError::NotAllocated {
                index,
                mandelbox_id,
            })
        }
    }

    pub fn usage(&self) -> Vec<usize> {
        self.assigned.iter().map(BTreeSet::len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> MandelboxId {
        MandelboxId::from(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn spreads_over_gpus_then_fills_them() {
        let mut g = GpuAllocator::new(2, 3);
        let picks: Vec<usize> = (0..6).map(|n| g.allocate(id(n)).unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        assert!(matches!(
            g.allocate(id(9)),
            Err(GpuError::Exhausted { gpus: 2 })
        ));
    }

    #[test]
    fn no_gpus_means_no_slots_not_a_panic() {
        let mut g = GpuAllocator::new(0, 3);
        assert!(matches!(
            g.allocate(id(1)),
            Err(GpuError::Exhausted { gpus: 0 })
        ));
        assert!(matches!(g.free(0, id(1)), Err(GpuError::NoSuchGpu { .. })));
    }

    proptest! {
        #[test]
        fn slots_never_exceed_the_limit_and_frees_are_exact(
            gpus in 0usize..5,
            ops in proptest::collection::vec(any::<Option<u8>>(), 1..100),
        ) {
            let mut g = GpuAllocator::new(gpus, MAX_MANDELBOXES_PER_GPU);
            let mut live: Vec<(usize, MandelboxId)> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    None => match g.allocate(id(n as u128)) {
                        Ok(i) => live.push((i, id(n as u128))),
                        Err(_) => prop_assert_eq!(live.len(), g.capacity()),
                    },
                    Some(k) if !live.is_empty() => {
                        let (i, m) = live.remove(usize::from(k) % live.len());
                        g.free(i, m).unwrap();
                        prop_assert!(g.free(i, m).is_err());
                    }
                    Some(_) => {}
                }
                let usage = g.usage();
                prop_assert!(usage.iter().all(|u| *u <= MAX_MANDELBOXES_PER_GPU));
                prop_assert_eq!(usage.iter().sum::<usize>(), live.len());
                // Least-loaded placement keeps GPUs within one of each other while filling.
                if let (Some(max), Some(min)) = (usage.iter().max(), usage.iter().min()) {
                    prop_assert!(max - min <= MAX_MANDELBOXES_PER_GPU);
                }
            }
        }
    }
}

mod discover;
pub use discover::{GpuInfo, GpuInventory, discover_gpus};
