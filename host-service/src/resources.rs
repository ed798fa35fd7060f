//! The host's resources for mandelboxes — host ports, TTYs and GPU slots — as one value, so a
//! mandelbox gets all of them or none and gives back exactly what it got.

use dbclient::types::MandelboxId;

use crate::gpus::{GpuAllocator, GpuError};
use crate::ports::{ContainerPort, PortAllocator, PortError, PortMap};
use crate::ttys::{TtyAllocator, TtyError};

/// What one mandelbox holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ports: PortMap,
    pub tty: u8,
    /// `None` on hosts without GPUs.
    pub gpu: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Ports(#[from] PortError),
    #[error(transparent)]
    Ttys(#[from] TtyError),
    #[error(transparent)]
    Gpus(#[from] GpuError),
}

#[derive(Debug, Clone)]
pub struct Resources {
    ports: PortAllocator,
    ttys: TtyAllocator,
    /// `None`: a host without GPUs (capacity comes from configuration).
    gpus: Option<GpuAllocator>,
}

impl Resources {
    pub fn new(ports: PortAllocator, ttys: TtyAllocator, gpus: Option<GpuAllocator>) -> Self {
        Self { ports, ttys, gpus }
    }

    /// Takes ports for `wanted`, a TTY and (on GPU hosts) a GPU slot, or nothing at all.
    pub fn allocate(
        &mut self,
        id: MandelboxId,
        wanted: &[ContainerPort],
        in_use_on_host: impl FnMut(crate::ports::Protocol, u16) -> bool,
    ) -> Result<Allocation, ResourceError> {
        let ports = self.ports.allocate(wanted, in_use_on_host)?;
        let tty = match self.ttys.allocate() {
            Ok(t) => t,
            Err(e) => {
                let _ = self.ports.free(&ports);
                return Err(e.into());
            }
        };
        let gpu = match self.gpus.as_mut().map(|g| g.allocate(id)).transpose() {
            Ok(g) => g,
            Err(e) => {
                let _ = self.ports.free(&ports);
                let _ = self.ttys.free(tty);
                return Err(e.into());
            }
        };
        Ok(Allocation { ports, tty, gpu })
    }

    /// Replaces the host ports of `allocation` with fresh ones (a port turned out to be taken
    /// when Docker bound it). The new ports are taken before the old are given back, so none of
    /// the old comes back; on failure `allocation` is unchanged.
    pub fn reallocate_ports(
        &mut self,
        allocation: &mut Allocation,
        wanted: &[ContainerPort],
        in_use_on_host: impl FnMut(crate::ports::Protocol, u16) -> bool,
    ) -> Result<(), ResourceError> {
        let fresh = self.ports.allocate(wanted, in_use_on_host)?;
        let old = std::mem::replace(&mut allocation.ports, fresh);
        self.ports.free(&old)?;
        Ok(())
    }

    /// Records what an existing mandelbox holds (adopted after a restart).
    pub fn adopt(&mut self, id: MandelboxId, allocation: &Allocation) -> Result<(), ResourceError> {
        for (c, port) in &allocation.ports {
            self.ports.mark_taken(c.protocol, *port);
        }
        self.ttys.mark_taken(allocation.tty)?;
        if let (Some(gpus), Some(index)) = (self.gpus.as_mut(), allocation.gpu) {
            gpus.mark_taken(index, id)?;
        }
        Ok(())
    }

    /// Gives back exactly `allocation`. Frees what it can and reports the first mismatch.
    pub fn free(&mut self, id: MandelboxId, allocation: &Allocation) -> Result<(), ResourceError> {
        let ports = self
            .ports
            .free(&allocation.ports)
            .map_err(ResourceError::from);
        let tty = self.ttys.free(allocation.tty).map_err(ResourceError::from);
        let gpu = match (self.gpus.as_mut(), allocation.gpu) {
            (Some(gpus), Some(index)) => gpus.free(index, id).map_err(ResourceError::from),
            _ => Ok(()),
        };
        ports.and(tty).and(gpu)
    }

    /// Ports, TTYs and GPU slots currently held, for metrics and leak checks.
    pub fn held(&self) -> (usize, usize, usize) {
        (
            self.ports.taken_count(),
            self.ttys.taken_count(),
            self.gpus
                .as_ref()
                .map_or(0, |g| g.usage().iter().sum::<usize>()),
        )
    }

    pub fn gpu_count(&self) -> usize {
        self.gpus.as_ref().map_or(0, GpuAllocator::gpu_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::MANDELBOX_PORTS;

    #[test]
    fn failure_anywhere_takes_nothing() {
        let mut r = Resources::new(
            PortAllocator::new(40000..40100).unwrap(),
            TtyAllocator::new(10..11),
            Some(GpuAllocator::new(1, 3)),
        );
        let a = r
            .allocate(MandelboxId::random(), &MANDELBOX_PORTS, |_, _| false)
            .unwrap();
        assert_eq!(r.held(), (4, 1, 1));
        // The only TTY is taken: nothing else may stay taken either.
        assert!(
            r.allocate(MandelboxId::random(), &MANDELBOX_PORTS, |_, _| false)
                .is_err()
        );
        assert_eq!(r.held(), (4, 1, 1));
        assert!(a.gpu.is_some());
    }

    #[test]
    fn free_returns_exactly_what_was_taken() {
        let mut r = Resources::new(
            PortAllocator::new(40000..40100).unwrap(),
            TtyAllocator::new(10..64),
            None,
        );
        let id = MandelboxId::random();
        let a = r.allocate(id, &MANDELBOX_PORTS, |_, _| false).unwrap();
        assert_eq!(a.gpu, None);
        r.free(id, &a).unwrap();
        assert_eq!(r.held(), (0, 0, 0));
        assert!(
            r.free(id, &a).is_err(),
            "a second free is a bug, not a no-op"
        );
    }
}
