//! The region's rows as the algorithm sees them.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dbclient::types::{
    ImageId, InstanceId, InstanceStatus, InstanceWithMandelboxes, MandelboxStatus, Region,
};

use crate::algorithm::{InstanceView, PendingLaunch, Snapshot};
use crate::metrics::Metrics;

/// What the controller knows beside the rows.
#[derive(Debug, Clone, Default)]
pub struct ControllerState {
    pub target_image: Option<ImageId>,
    pub abandoned_images: Vec<ImageId>,
    pub pending_launches: Vec<PendingLaunch>,
    pub busy: Vec<InstanceId>,
    pub waiting_clients: u32,
    pub arrivals: u64,
}

/// Builds snapshots, remembering since when it has seen each instance in its status: a row's
/// `updated_at` is also touched by heartbeats, so for how long a host has been ACTIVE (or
/// DRAINING) is the earlier of the two.
#[derive(Debug, Clone, Default)]
pub struct SnapshotBuilder {
    first_seen: HashMap<InstanceId, (InstanceStatus, DateTime<Utc>)>,
}

impl SnapshotBuilder {
    /// The snapshot of `rows` (the region's instances with their mandelboxes) and the image
    /// row's `image`, at `now`.
    pub fn build(
        &mut self,
        rows: &[InstanceWithMandelboxes],
        image: Option<ImageId>,
        capacity_per_instance: u32,
        state: ControllerState,
        now: DateTime<Utc>,
    ) -> Snapshot {
        self.first_seen.retain(|id, (status, _)| {
            rows.iter()
                .any(|r| &r.instance.id == id && r.instance.status == *status)
        });
        let instances = rows
            .iter()
            .map(|row| {
                let i = &row.instance;
                let (_, seen) = *self
                    .first_seen
                    .entry(i.id.clone())
                    .or_insert((i.status, now));
                let status_since = match i.status {
                    // The host's own writes move `updated_at` only forward after registering.
                    InstanceStatus::Active | InstanceStatus::Draining => i.updated_at.min(seen),
                    InstanceStatus::PreConnection => i.updated_at,
                };
                view(row, capacity_per_instance, status_since)
            })
            .collect();
        Snapshot {
            instances,
            current_image: image,
            target_image: state.target_image,
            abandoned_images: state.abandoned_images,
            pending_launches: state.pending_launches,
            busy: state.busy,
            waiting_clients: state.waiting_clients,
            arrivals: state.arrivals,
        }
    }
}

/// One row as the algorithm sees it.
pub fn view(
    row: &InstanceWithMandelboxes,
    capacity: u32,
    status_since: DateTime<Utc>,
) -> InstanceView {
    let i = &row.instance;
    // A warm box (a WAITING row) holds one unit of the row's capacity from its insert, but it is
    // free to the algorithms: the next user is assigned to it. Counted as taken, a host keeping
    // warm boxes would look busy forever (never scaled down) and its warm slots as missing
    // (launches for capacity that exists).
    let warm = u32::try_from(
        row.mandelboxes
            .iter()
            .filter(|m| m.status == MandelboxStatus::Waiting)
            .count(),
    )
    .unwrap_or(u32::MAX);
    let free = i.remaining_capacity.saturating_add(warm);
    InstanceView {
        id: i.id.clone(),
        image_id: i.image_id.clone(),
        status: i.status,
        remaining_capacity: free,
        capacity: capacity.max(free),
        mandelboxes: u32::try_from(
            row.mandelboxes
                .iter()
                .filter(|m| m.status != MandelboxStatus::Waiting)
                .count(),
        )
        .unwrap_or(u32::MAX),
        created_at: i.created_at,
        status_since,
    }
}

/// The region's gauges from a fresh read of its rows.
pub fn report(
    metrics: &Metrics,
    region: &Region,
    instances: &[InstanceView],
    image: Option<&ImageId>,
) {
    let r = region.as_str();
    for status in InstanceStatus::ALL {
        let count = instances.iter().filter(|i| i.status == *status).count();
        metrics
            .instances
            .with_label_values(&[r, status.as_str()])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    let free: u64 = instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Active && Some(&i.image_id) == image)
        .map(|i| u64::from(i.remaining_capacity))
        .sum();
    metrics
        .free_capacity
        .with_label_values(&[r])
        .set(i64::try_from(free).unwrap_or(i64::MAX));
    let lingering = instances
        .iter()
        .filter(|i| i.status == InstanceStatus::Draining && !i.has_users())
        .count();
    metrics
        .lingering_instances
        .with_label_values(&[r])
        .set(i64::try_from(lingering).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::Utc;
    use dbclient::types::{
        ImageId, Instance, InstanceId, InstanceStatus, InstanceWithMandelboxes, Mandelbox,
        MandelboxId, MandelboxStatus, Region, UserId,
    };

    use super::view;

    fn row(remaining: u32, statuses: &[MandelboxStatus]) -> InstanceWithMandelboxes {
        let now = Utc::now();
        let id = InstanceId::new("i-0123456789abcdef0").unwrap();
        InstanceWithMandelboxes {
            instance: Instance {
                id: id.clone(),
                provider: "AWS".into(),
                region: Region::new("us-east-1").unwrap(),
                image_id: ImageId::new("ami-0123456789abcdef0").unwrap(),
                client_sha: "abc".into(),
                ip_addr: None,
                instance_type: "g4dn.2xlarge".into(),
                remaining_capacity: remaining,
                status: InstanceStatus::Active,
                created_at: now,
                updated_at: now,
                tls_fingerprint: None,
            },
            mandelboxes: statuses
                .iter()
                .map(|status| Mandelbox {
                    id: MandelboxId::random(),
                    app: "browsers/chrome".into(),
                    instance_id: id.clone(),
                    user_id: (*status != MandelboxStatus::Waiting)
                        .then(|| UserId::new("user").unwrap()),
                    session_id: None,
                    status: *status,
                    created_at: now,
                    updated_at: now,
                })
                .collect(),
        }
    }

    #[test]
    fn warm_boxes_are_free_capacity_not_users() {
        // Capacity 3: two warm boxes hold two units, one slot is cold.
        let warm_only = view(&row(1, &[MandelboxStatus::Waiting; 2]), 3, Utc::now());
        assert_eq!(warm_only.remaining_capacity, 3);
        assert_eq!(warm_only.mandelboxes, 0);
        assert!(
            !warm_only.has_users(),
            "a host with only warm boxes may be drained"
        );

        // One user and one warm box: one slot taken, two free.
        let mixed = view(
            &row(1, &[MandelboxStatus::Running, MandelboxStatus::Waiting]),
            3,
            Utc::now(),
        );
        assert_eq!(mixed.remaining_capacity, 2);
        assert_eq!(mixed.mandelboxes, 1);
        assert!(mixed.has_users());
    }
}
