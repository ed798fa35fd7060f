//! Registration: the scaling service inserts this instance's row as PRE_CONNECTION when it
//! launches the instance; the host verifies it is the instance that row describes and makes it
//! ACTIVE with its address and capacity.

use edge::backoff::Backoff;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use dbclient::types::{Instance, InstanceStatus, Registration};
use dbclient::{DbClient, DbError};

use crate::metadata::InstanceIdentity;

/// The scaling service inserts the row only after EC2 reports the instance running, which can
/// be after this service starts; wait this long for it before giving up.
pub const ROW_WAIT: Duration = Duration::from_secs(300);
/// Polling for the row: 500 ms doubling to 10 s (the row appears once EC2 says running, tens of
/// seconds after boot; 10 s late is nothing beside that). [`ROW_WAIT`] bounds the whole wait.
const ROW_POLL: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "no row for instance {instance_id} after {waited:?}: the scaling service inserts it at launch"
    )]
    NoRow {
        instance_id: String,
        waited: Duration,
    },
    #[error("the row of {instance_id} says {field} is {row:?} but this host is {actual:?}")]
    Mismatch {
        instance_id: String,
        field: &'static str,
        row: String,
        actual: String,
    },
    #[error("this host runs commit {ours:?}, but its row expects one starting with {row:?}")]
    Commit { row: String, ours: String },
    #[error("this host has no IP address in its metadata")]
    NoAddress,
    #[error("database: {0}")]
    Database(#[from] DbError),
}

/// How registration ended.
// One value, made once at start-up: boxing the row would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Registered {
    /// The row is ACTIVE: freshly registered, or already (this is a restart).
    Active { instance: Instance, restarted: bool },
    /// The row is DRAINING: start-up ends gracefully.
    Draining,
}

/// Verifies and registers this host's row; waits up to `row_wait` for it to appear.
pub async fn register(
    db: &DbClient,
    identity: &InstanceIdentity,
    commit: &str,
    capacity: u32,
    row_wait: Duration,
) -> Result<Registered, RegistrationError> {
    let id = &identity.instance_id;
    let started = Instant::now();
    let mut retries = ROW_POLL.start();
    loop {
        let row = match db.instance(id).await {
            Ok(row) => row,
            Err(error) if error.is_transient() && started.elapsed() < row_wait => {
                tracing::warn!(%error, "cannot read the instance row yet");
                None
            }
            Err(error) => return Err(error.into()),
        };
        match row.map(|r| r.instance) {
            None => {
                if started.elapsed() >= row_wait {
                    return Err(RegistrationError::NoRow {
                        instance_id: id.to_string(),
                        waited: row_wait,
                    });
                }
                // ROW_POLL has no deadline (ROW_WAIT is checked above): a delay is handed out.
                let delay = retries.next_delay().unwrap_or(ROW_POLL.cap);
                tracing::info!(
                    retry_in_ms = delay.as_millis() as u64,
                    "waiting for this instance's row"
                );
                tokio::time::sleep(delay).await;
            }
            Some(row) if row.status == InstanceStatus::Draining => return Ok(Registered::Draining),
            Some(row) => {
                verify(&row, identity, commit)?;
                if row.status == InstanceStatus::Active {
                    tracing::info!("row already ACTIVE: this is a restart");
                    return Ok(Registered::Active {
                        instance: row,
                        restarted: true,
                    });
                }
                let registration = Registration {
                    ip_addr: address(identity)?,
                    image_id: identity.ami_id.clone(),
                    region: identity.region.clone(),
                    instance_type: identity.instance_type.clone(),
                    remaining_capacity: capacity,
                };
                match db.register_instance(id, &registration).await? {
                    Some(instance) => {
                        return Ok(Registered::Active {
                            instance,
                            restarted: false,
                        });
                    }
                    // The row changed under us (e.g. turned DRAINING): look again.
                    None => continue,
                }
            }
        }
    }
}

/// The row must describe this host: same image, region and type, and a commit prefix ours has.
pub fn verify(
    row: &Instance,
    identity: &InstanceIdentity,
    commit: &str,
) -> Result<(), RegistrationError> {
    let mismatch = |field, row: &str, actual: &str| RegistrationError::Mismatch {
        instance_id: identity.instance_id.to_string(),
        field,
        row: row.to_owned(),
        actual: actual.to_owned(),
    };
    if row.image_id != identity.ami_id {
        return Err(mismatch(
            "image_id",
            row.image_id.as_str(),
            identity.ami_id.as_str(),
        ));
    }
    if row.region != identity.region {
        return Err(mismatch(
            "region",
            row.region.as_str(),
            identity.region.as_str(),
        ));
    }
    if row.instance_type != identity.instance_type {
        return Err(mismatch(
            "instance_type",
            &row.instance_type,
            &identity.instance_type,
        ));
    }
    // An empty client_sha would be a prefix of everything (the original's bug 4): refuse it.
    if row.client_sha.is_empty() || !commit.starts_with(&row.client_sha) {
        return Err(RegistrationError::Commit {
            row: row.client_sha.clone(),
            ours: commit.to_owned(),
        });
    }
    Ok(())
}

fn address(identity: &InstanceIdentity) -> Result<IpAddr, RegistrationError> {
    identity
        .public_ipv4
        .or(identity.private_ipv4)
        .map(IpAddr::V4)
        .ok_or(RegistrationError::NoAddress)
}
