//! Reconcile at start: a host killed at any instant restarts cleanly. What Docker runs (by our
//! labels), what lies under the root directory and what the database says about this instance
//! are compared, and every mandelbox is either adopted (its container runs, its row is RUNNING,
//! its parameters are readable) or cleaned up completely, so no container, directory, port,
//! TTY, GPU slot or row leaks. The original refused to start when `/whist` existed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dbclient::types::{Mandelbox, MandelboxId, MandelboxStatus};

use crate::docker::{ContainerRuntime, ContainerStatus, LABEL_MANDELBOX_ID, MandelboxContainer};
use crate::host::Host;
use crate::mandelbox::{LABEL_GPU, LABEL_INSTANCE_ID, LABEL_TTY, Start};
use crate::mappings::MandelboxDirs;
use crate::resources::Allocation;

/// What the pass did, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub adopted: Vec<MandelboxId>,
    pub removed_containers: usize,
    pub removed_rows: usize,
    pub removed_dirs: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("docker: {0}")]
    Docker(#[from] crate::docker::RuntimeError),
    #[error("database: {0}")]
    Database(#[from] dbclient::DbError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Removes every mandelbox of this instance — containers, rows and files — adopting none: the
/// end of a drain that a crash interrupted.
pub async fn remove_everything<R: ContainerRuntime + Clone + 'static>(
    host: &Arc<Host<R>>,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    let own = host.instance_id().to_string();
    for container in host.runtime.list_mandelboxes().await? {
        if container.labels.get(LABEL_INSTANCE_ID) == Some(&own) {
            remove_container(host, &container, &mut report).await;
        }
    }
    if let Some(db) = &host.db {
        for row in db.mandelboxes_on_instance(host.instance_id()).await? {
            host.delete_row(row.id).await;
            report.removed_rows += 1;
        }
    }
    for id in mandelbox_dirs(&host.config.root_dir)? {
        match MandelboxDirs::new(&host.config.root_dir, id).remove().await {
            Ok(()) => report.removed_dirs += 1,
            Err(error) => {
                tracing::warn!(%error, mandelbox.id = %id, "cannot remove leftover files")
            }
        }
    }
    Ok(report)
}

/// Runs the pass and starts a task for every adopted mandelbox.
pub async fn reconcile<R: ContainerRuntime + Clone + 'static>(
    host: &Arc<Host<R>>,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    // Several local host services may share one engine: each looks only at its own containers.
    let own = host.instance_id().to_string();
    let containers: Vec<MandelboxContainer> = host
        .runtime
        .list_mandelboxes()
        .await?
        .into_iter()
        .filter(|c| c.labels.get(LABEL_INSTANCE_ID) == Some(&own))
        .collect();
    let rows: BTreeMap<MandelboxId, Mandelbox> = match &host.db {
        Some(db) => db
            .mandelboxes_on_instance(host.instance_id())
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect(),
        None => BTreeMap::new(),
    };
    let mut adopted = BTreeSet::new();

    for container in containers {
        let id = container
            .labels
            .get(LABEL_MANDELBOX_ID)
            .and_then(|v| v.parse::<MandelboxId>().ok());
        let adoption = match id {
            Some(id) => adoptable(host, &container, id, rows.get(&id)).await,
            None => None,
        };
        match (id, adoption) {
            (Some(id), Some(allocation)) => {
                if let Err(error) = host.adopt(id, &allocation) {
                    tracing::warn!(%error, mandelbox.id = %id, "cannot adopt: resources clash; removing");
                    remove_container(host, &container, &mut report).await;
                    continue;
                }
                tracing::info!(mandelbox.id = %id, "adopting a running mandelbox");
                host.spawn_mandelbox(Start::Adopted {
                    row: rows.get(&id).cloned(),
                    id,
                    container: container.id.clone(),
                    allocation,
                });
                adopted.insert(id);
                report.adopted.push(id);
            }
            _ => remove_container(host, &container, &mut report).await,
        }
    }

    for (id, row) in &rows {
        if adopted.contains(id) || row.status == MandelboxStatus::Allocated {
            // ALLOCATED rows are the live query's to deliver (a warm box claimed just before a
            // crash too: it is spun up cold). WAITING rows go with their warm containers.
            continue;
        }
        host.delete_row(*id).await;
        report.removed_rows += 1;
    }

    for id in mandelbox_dirs(&host.config.root_dir)? {
        if !adopted.contains(&id) {
            match MandelboxDirs::new(&host.config.root_dir, id).remove().await {
                Ok(()) => report.removed_dirs += 1,
                Err(error) => {
                    tracing::warn!(%error, mandelbox.id = %id, "cannot remove leftover files")
                }
            }
        }
    }
    tracing::info!(?report, "reconciled");
    Ok(report)
}

async fn remove_container<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    container: &MandelboxContainer,
    report: &mut ReconcileReport,
) {
    tracing::info!(container = %container.name, "removing a leftover mandelbox container");
    match host.runtime.remove(&container.id, true).await {
        Ok(()) => report.removed_containers += 1,
        Err(error) => tracing::warn!(%error, "cannot remove a leftover container"),
    }
}

/// A mandelbox can be adopted when its container runs, its row (if there is a database) is
/// RUNNING, and its TTY and ports are known.
async fn adoptable<R: ContainerRuntime + Clone + 'static>(
    host: &Host<R>,
    container: &MandelboxContainer,
    id: MandelboxId,
    row: Option<&Mandelbox>,
) -> Option<Allocation> {
    if container.status != ContainerStatus::Running || container.ports.is_empty() {
        return None;
    }
    if host.db.is_some() && row.is_none_or(|r| r.status != MandelboxStatus::Running) {
        return None;
    }
    let tty = container.labels.get(LABEL_TTY)?.parse().ok()?;
    let gpu = match container.labels.get(LABEL_GPU) {
        Some(g) => Some(g.parse().ok()?),
        None if host.gpu_count > 0 => return None,
        None => None,
    };
    // Its files must still be there for the mandelbox to be whole.
    let dirs = MandelboxDirs::new(&host.config.root_dir, id);
    crate::mappings::read_params(&dirs).await?;
    Some(Allocation {
        ports: container.ports.clone(),
        tty,
        gpu,
    })
}

/// The mandelbox ids that have files under the root (`<root>/<id>`, `<root>/temp/<id>`,
/// `<root>/temp/logs/<id>`).
fn mandelbox_dirs(root: &std::path::Path) -> Result<BTreeSet<MandelboxId>, ReconcileError> {
    let mut ids = BTreeSet::new();
    for dir in [
        root.to_owned(),
        root.join("temp"),
        root.join("temp").join("logs"),
    ] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ReconcileError::Io {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}
