//! Which NVIDIA GPUs this host has, through NVML.
//!
//! NVML (`libnvidia-ml.so.1`) is loaded at run time, so the host service builds and runs on a
//! machine without the NVIDIA driver: there, [`discover_gpus`] reports no GPUs (logged at debug)
//! instead of failing. On a GPU host every device NVML counts is listed, even when one of its
//! properties cannot be read, so the count (the host's capacity) stays right.

/// One GPU, as NVML reports it. `index` is NVML's, the one the allocator and the mandelbox's
/// `gpu_index` file use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    /// e.g. `Tesla T4`; `None` when NVML could not read it.
    pub name: Option<String>,
    /// e.g. `GPU-5b1e...`; `None` when NVML could not read it.
    pub uuid: Option<String>,
    /// PCI bus id, e.g. `00000000:00:1E.0` (what Xorg's `BusID` is built from).
    pub pci_bus_id: Option<String>,
}

/// What [`discover_gpus`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuInventory {
    /// The NVIDIA driver version; `None` without a driver.
    pub driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
}

impl GpuInventory {
    pub fn count(&self) -> usize {
        self.gpus.len()
    }
}

/// Lists the host's NVIDIA GPUs. Never fails: without NVML (no driver) or when NVML cannot
/// count devices, the inventory is empty. Blocking (NVML initialises the driver): call it from
/// `spawn_blocking` on a runtime thread.
pub fn discover_gpus() -> GpuInventory {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        Err(error) => {
            tracing::debug!(%error, "NVML is not available: no NVIDIA GPUs on this host");
            return GpuInventory::default();
        }
    };
    let driver_version = nvml.sys_driver_version().ok();
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(error) => {
            tracing::warn!(%error, "NVML loaded but cannot count GPUs: reporting none");
            return GpuInventory {
                driver_version,
                gpus: Vec::new(),
            };
        }
    };
    let mut unreadable = 0usize;
    let gpus = (0..count)
        .map(|index| {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(error) => {
                    unreadable += 1;
                    tracing::warn!(gpu.index = index, %error, "cannot open GPU through NVML");
                    return GpuInfo {
                        index,
                        name: None,
                        uuid: None,
                        pci_bus_id: None,
                    };
                }
            };
            GpuInfo {
                index,
                name: device.name().ok(),
                uuid: device.uuid().ok(),
                pci_bus_id: device.pci_info().ok().map(|pci| pci.bus_id),
            }
        })
        .collect();
    if unreadable > 0 {
        tracing::warn!(
            gpus = count,
            unreadable,
            "some GPUs could not be opened through NVML"
        );
    }
    tracing::info!(gpus = count, driver_version = ?driver_version, "discovered NVIDIA GPUs");
    GpuInventory {
        driver_version,
        gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_never_fails_and_lists_consistent_indices() {
        // Without a driver (this machine) the inventory is empty; with one, indices are 0..n.
        let inventory = discover_gpus();
        assert_eq!(inventory.count(), inventory.gpus.len());
        for (i, gpu) in inventory.gpus.iter().enumerate() {
            assert_eq!(gpu.index as usize, i);
        }
        if std::path::Path::new("/dev/nvidiactl").exists() {
            eprintln!(
                "NVIDIA device nodes present; found {} GPU(s)",
                inventory.count()
            );
        } else {
            assert_eq!(inventory, GpuInventory::default());
        }
    }
}
