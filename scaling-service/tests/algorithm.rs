//! Property tests of the algorithms' invariants over thousands of random regions: the default
//! algorithm's, and the ones every algorithm (original, default, holdover) must keep.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};
use proptest::prelude::*;
use scaling_service::algorithm::holdover::decide_holdover;
use scaling_service::algorithm::original::decide_original;
use scaling_service::algorithm::{
    Action, AlgorithmConfig, InstanceView, PendingLaunch, Snapshot, decide,
};

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn image(n: u8) -> ImageId {
    ImageId::new(format!("ami-{n}")).unwrap()
}

fn arb_instance(index: usize) -> impl Strategy<Value = InstanceView> {
    (
        0u8..3,
        prop_oneof![
            Just(InstanceStatus::PreConnection),
            Just(InstanceStatus::Active),
            Just(InstanceStatus::Draining)
        ],
        1u32..5,
        0u32..5,
        0u32..3,
        0i64..200,
        0i64..30,
    )
        .prop_map(
            move |(img, status, capacity, used, boxes, age_min, status_min)| {
                let used = used.min(capacity);
                InstanceView {
                    id: InstanceId::new(format!("i-{index:06}")).unwrap(),
                    image_id: image(img),
                    status,
                    remaining_capacity: capacity - used,
                    capacity,
                    mandelboxes: boxes.min(used),
                    created_at: t0() - chrono::Duration::minutes(age_min),
                    status_since: t0() - chrono::Duration::minutes(status_min.min(age_min)),
                }
            },
        )
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        (0usize..30).prop_flat_map(|n| (0..n).map(arb_instance).collect::<Vec<_>>()),
        proptest::option::of(0u8..3),
        proptest::option::of(0u8..3),
        proptest::collection::vec((0u8..3, 1u32..4, 0i64..200), 0..3),
        any::<bool>(),
        proptest::collection::vec(any::<proptest::sample::Index>(), 0..3),
        prop_oneof![Just(0u32), 0u32..6],
    )
        .prop_map(
            |(instances, current, target, pending, abandon, busy, waiting)| {
                let busy = if instances.is_empty() {
                    vec![]
                } else {
                    busy.iter()
                        .map(|i| instances[i.index(instances.len())].id.clone())
                        .collect()
                };
                Snapshot {
                    current_image: current.map(image),
                    target_image: target.map(image),
                    abandoned_images: if abandon {
                        target.map(image).into_iter().collect()
                    } else {
                        vec![]
                    },
                    pending_launches: pending
                        .into_iter()
                        .enumerate()
                        .map(|(n, (img, count, age))| PendingLaunch {
                            launch_id: format!("l-{n}"),
                            image_id: image(img),
                            count,
                            started_at: t0() - chrono::Duration::minutes(age),
                        })
                        .collect(),
                    busy,
                    instances,
                    waiting_clients: waiting,
                    arrivals: 0,
                }
            },
        )
}

fn arb_config() -> impl Strategy<Value = AlgorithmConfig> {
    (0u32..12, 0u32..40, 1u32..4).prop_map(|(desired, cap, per)| AlgorithmConfig {
        desired_free_mandelboxes: desired,
        max_instances: cap,
        capacity_per_instance: per,
        ..AlgorithmConfig::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn never_drains_or_terminates_a_host_with_users(s in arb_snapshot(), c in arb_config()) {
        let plan = decide(&s, &c, t0());
        for action in &plan {
            if let Action::Drain { instance } | Action::Terminate { instance, .. } = action {
                let host = s.instances.iter().find(|i| &i.id == instance).unwrap();
                prop_assert!(!host.has_users(), "{action:?} on {host:?}");
                prop_assert!(!s.busy.contains(instance));
            }
        }
    }

    #[test]
    fn never_acts_twice_on_one_instance(s in arb_snapshot(), c in arb_config()) {
        let plan = decide(&s, &c, t0());
        let mut seen = HashSet::new();
        for id in plan.iter().filter_map(Action::instance) {
            prop_assert!(seen.insert(id.clone()), "two actions on {id}: {plan:?}");
        }
    }

    #[test]
    fn never_launches_past_the_cap(s in arb_snapshot(), c in arb_config()) {
        let plan = decide(&s, &c, t0());
        let launched: u64 = plan.iter().map(|a| match a {
            Action::Launch { count, .. } => u64::from(*count),
            _ => 0,
        }).sum();
        let existing = s.instances.len() as u64
            + s.pending_launches.iter().map(|p| u64::from(p.count)).sum::<u64>();
        if launched > 0 {
            prop_assert!(existing + launched <= u64::from(c.max_instances));
        }
        let zero = plan.iter().any(|a| matches!(a, Action::Launch { count: 0, .. }));
        prop_assert!(!zero, "a launch of zero: {:?}", plan);
    }

    #[test]
    fn plans_end_with_a_positive_requeue(s in arb_snapshot(), c in arb_config()) {
        let plan = decide(&s, &c, t0());
        match plan.last() {
            Some(Action::RequeueAfter(d)) => prop_assert!(*d > Duration::ZERO && *d <= c.requeue_interval),
            other => prop_assert!(false, "{other:?}"),
        }
    }

    /// With launches that succeed (and boot at once), a region with a steady set of users
    /// settles with at least the buffer free on the current image (unless capped) and no host
    /// left to retire.
    #[test]
    fn converges_on_the_buffer(
        users in proptest::collection::vec(0u32..3, 0..8),
        spare in 0usize..6,
        desired in 0u32..10,
    ) {
        let config = AlgorithmConfig {
            desired_free_mandelboxes: desired,
            max_instances: 40,
            capacity_per_instance: 2,
            ..AlgorithmConfig::default()
        };
        let current = image(1);
        let mut next = 0usize;
        let host = |used: u32, next: &mut usize| {
            *next += 1;
            InstanceView {
                id: InstanceId::new(format!("i-{next:06}")).unwrap(),
                image_id: current.clone(),
                status: InstanceStatus::Active,
                remaining_capacity: 2 - used,
                capacity: 2,
                mandelboxes: used,
                created_at: t0(),
                status_since: t0(),
            }
        };
        let mut s = Snapshot {
            current_image: Some(current.clone()),
            target_image: Some(current.clone()),
            ..Snapshot::default()
        };
        for u in users { s.instances.push(host(u, &mut next)); }
        for _ in 0..spare { s.instances.push(host(0, &mut next)); }
        let mut settled = false;
        for _ in 0..6 {
            let plan = decide(&s, &config, t0());
            let mut changed = false;
            for action in plan {
                match action {
                    Action::Launch { count, .. } => {
                        for _ in 0..count { s.instances.push(host(0, &mut next)); }
                        changed = true;
                    }
                    Action::Drain { instance } => {
                        s.instances.retain(|i| i.id != instance);
                        changed = true;
                    }
                    _ => {}
                }
            }
            if !changed { settled = true; break; }
        }
        prop_assert!(settled, "still changing after 6 rounds");
        let free: u32 = s.instances.iter().map(|i| i.remaining_capacity).sum();
        prop_assert!(free >= desired, "free {free} < desired {desired}");
        let free_hosts = s.instances.iter().filter(|i| !i.has_users()).count() as u32;
        // No free host could go without dropping below the buffer.
        prop_assert!(free_hosts == 0 || free - 2 < desired, "free {free}, desired {desired}");
    }
}

/// Each algorithm's plan for `s`: which one, by index (0 original, 1 default, 2 holdover),
/// with the free parameters its state would supply.
fn plan_of(which: u8, s: &Snapshot, c: &AlgorithmConfig, held: u32, due: bool) -> Vec<Action> {
    match which {
        0 => decide_original(s, c, 1 + held % 3, due, t0()),
        1 => decide(s, c, t0()),
        _ => decide_holdover(s, c, c.desired_free_mandelboxes, held, t0()),
    }
}

fn arb_settings() -> impl Strategy<Value = AlgorithmConfig> {
    (arb_config(), 0u64..40).prop_map(|(c, min)| AlgorithmConfig {
        min_lifetime: Duration::from_secs(min * 60),
        ..c
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn no_algorithm_touches_a_host_with_users_acts_twice_or_passes_the_cap(
        which in 0u8..3,
        s in arb_snapshot(),
        c in arb_settings(),
        held in 0u32..20,
        due in any::<bool>(),
    ) {
        let plan = plan_of(which, &s, &c, held, due);
        let mut seen = HashSet::new();
        for action in &plan {
            if let Action::Drain { instance } | Action::Terminate { instance, .. } = action {
                let host = s.instances.iter().find(|i| &i.id == instance).unwrap();
                prop_assert!(!host.has_users(), "{action:?} on {host:?}");
                prop_assert!(!s.busy.contains(instance));
            }
            if let Some(id) = action.instance() {
                prop_assert!(seen.insert(id.clone()), "two actions on {id}: {plan:?}");
            }
        }
        let launched: u64 = plan.iter().map(|a| match a {
            Action::Launch { count, .. } => u64::from(*count),
            _ => 0,
        }).sum();
        let existing = s.instances.len() as u64
            + s.pending_launches.iter().map(|p| u64::from(p.count)).sum::<u64>();
        if launched > 0 {
            prop_assert!(existing + launched <= u64::from(c.max_instances));
        }
        let zero = plan.iter().any(|a| matches!(a, Action::Launch { count: 0, .. }));
        prop_assert!(!zero, "a launch of zero: {:?}", plan);
        let requeue = matches!(plan.last(), Some(Action::RequeueAfter(d)) if *d > Duration::ZERO);
        prop_assert!(requeue, "no positive requeue last: {:?}", plan);
    }

    /// Holdover drains no host within its minimum lifetime, nothing on the current image while
    /// clients wait, and never more current-image capacity than has held as surplus.
    #[test]
    fn holdover_drains_only_old_enough_held_surplus(
        s in arb_snapshot(),
        c in arb_settings(),
        held in 0u32..20,
        buffer in 0u32..8,
    ) {
        let plan = decide_holdover(&s, &c, buffer, held, t0());
        // The image assignment serves once the plan is carried out.
        let current = plan
            .iter()
            .find_map(|a| match a {
                Action::SwapImage { image_id } => Some(image_id.clone()),
                _ => None,
            })
            .or(s.current_image.clone());
        let mut drained_current = 0u32;
        for action in &plan {
            if let Action::Drain { instance } = action {
                let host = s.instances.iter().find(|i| &i.id == instance).unwrap();
                let active_for = (t0() - host.status_since).to_std().unwrap_or_default();
                prop_assert!(active_for >= c.min_lifetime, "{host:?} is too young");
                if Some(&host.image_id) == current.as_ref() {
                    prop_assert_eq!(s.waiting_clients, 0);
                    drained_current += host.remaining_capacity;
                }
            }
        }
        prop_assert!(drained_current <= held, "drained {drained_current} > held {held}");
    }
}
