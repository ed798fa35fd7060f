//! What must hold on a settled system ([`crate::system::System`]): the database, Docker, the
//! hosts' files and resources, and moto agree, and nothing leaked. The end-to-end and chaos
//! tests wait for [`check`] to come back clean (the time that takes is their recovery time).
//!
//! Checked:
//! - every `running` instance in moto that the scaling service manages has an instance row,
//!   and every instance row has a `running` (or still `pending`) instance;
//! - on every host that runs: each mandelbox container has a mandelbox row on that instance and
//!   each row past allocation has its container; each mandelbox directory under the host's
//!   root belongs to a row; the host's own count of held ports, TTYs and GPU slots (its
//!   `/metrics`) matches its containers;
//! - a powered-off host left no container;
//! - every mandelbox row is on an instance that has a row.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{Filter, InstanceStateName};

use crate::fleet::{HostInfo, LABEL_INSTANCE_ID, MANAGED_BY, TAG_MANAGED_BY};
use crate::system::System;

/// Container label naming the mandelbox (the host service's `LABEL_MANDELBOX_ID`).
pub const LABEL_MANDELBOX_ID: &str = "whist.mandelbox.id";
/// Ports each mandelbox holds (32261/tcp, 32262/tcp, 32263/udp, 32273/tcp).
const PORTS_PER_MANDELBOX: i64 = 4;

/// One row of `whist.instances`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub id: String,
    pub region: String,
    pub status: String,
    pub ip: Option<String>,
    pub remaining_capacity: i32,
    pub tls_fingerprint: Option<String>,
}

/// One row of `whist.mandelboxes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandelboxRow {
    pub id: uuid::Uuid,
    pub instance_id: String,
    /// `None` for a warm (`WAITING`) box.
    pub user_id: Option<String>,
    pub status: String,
}

pub async fn instance_rows(sql: &tokio_postgres::Client) -> anyhow::Result<Vec<InstanceRow>> {
    Ok(sql
        .query(
            "SELECT id, region, status, host(ip_addr), remaining_capacity, tls_fingerprint \
             FROM whist.instances ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| InstanceRow {
            id: r.get(0),
            region: r.get(1),
            status: r.get(2),
            ip: r.get(3),
            remaining_capacity: r.get(4),
            tls_fingerprint: r.get(5),
        })
        .collect())
}

pub async fn mandelbox_rows(sql: &tokio_postgres::Client) -> anyhow::Result<Vec<MandelboxRow>> {
    Ok(sql
        .query(
            "SELECT id, instance_id, user_id, status FROM whist.mandelboxes ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|r| MandelboxRow {
            id: r.get(0),
            instance_id: r.get(1),
            user_id: r.get(2),
            status: r.get(3),
        })
        .collect())
}

/// The scaling service's instances in moto, by id, with their state.
pub async fn moto_instances(
    ec2: &aws_sdk_ec2::Client,
) -> anyhow::Result<BTreeMap<String, InstanceStateName>> {
    let mut instances = BTreeMap::new();
    let mut pages = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_MANAGED_BY}"))
                .values(MANAGED_BY)
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| anyhow::anyhow!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)))?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            if let (Some(id), Some(state)) = (i.instance_id(), i.state().and_then(|s| s.name())) {
                instances.insert(id.to_owned(), state.clone());
            }
        }
    }
    Ok(instances)
}

/// A container of one host: its id, state and mandelbox label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostContainer {
    pub id: String,
    pub state: String,
    pub mandelbox_id: Option<String>,
}

/// Containers labelled with `instance_id` (`docker ps -a`).
pub fn containers_of(instance_id: &str) -> anyhow::Result<Vec<HostContainer>> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-a", "--no-trunc", "--format"])
        .arg(format!(
            "{{{{.ID}}}} {{{{.State}}}} {{{{.Label \"{LABEL_MANDELBOX_ID}\"}}}}"
        ))
        .arg("--filter")
        .arg(format!("label={LABEL_INSTANCE_ID}={instance_id}"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some(HostContainer {
                id: parts.next()?.to_owned(),
                state: parts.next()?.to_owned(),
                mandelbox_id: parts.next().map(str::to_owned),
            })
        })
        .collect())
}

/// The host's `whist_host_resources_held` gauges (`ports`, `ttys`, `gpu_slots`).
pub async fn resources_held(host: &HostInfo) -> anyhow::Result<BTreeMap<String, i64>> {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", host.ops_url()))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut held = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("whist_host_resources_held{resource=\"")
            && let Some((resource, value)) = rest.split_once("\"} ")
        {
            held.insert(resource.to_owned(), value.trim().parse().unwrap_or(-1));
        }
    }
    Ok(held)
}

/// The system's state at one moment, and what disagrees in it.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub instances: Vec<InstanceRow>,
    pub mandelboxes: Vec<MandelboxRow>,
    pub moto: BTreeMap<String, InstanceStateName>,
    /// Containers per running host.
    pub containers: BTreeMap<String, Vec<HostContainer>>,
    /// Every disagreement, in words; empty when the invariants hold.
    pub violations: Vec<String>,
}

impl Report {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Looks at everything once. Errors reaching a component are violations too (a settled system
/// answers).
pub async fn check(system: &System) -> Report {
    let mut report = Report::default();
    match check_into(system, &mut report).await {
        Ok(()) => {}
        Err(error) => report.violations.push(format!("cannot inspect: {error:#}")),
    }
    report
}

async fn check_into(system: &System, report: &mut Report) -> anyhow::Result<()> {
    let stack = system.stack();
    let sql = crate::postgres::connect(stack.database_url()).await?;
    report.instances = instance_rows(&sql).await?;
    report.mandelboxes = mandelbox_rows(&sql).await?;
    let moto = stack
        .moto_endpoint()
        .ok_or_else(|| anyhow::anyhow!("no moto"))?;
    for seed in system.regions() {
        let ec2 = crate::moto::ec2_client(&moto, &seed.region);
        report.moto.extend(moto_instances(&ec2).await?);
    }
    let v = &mut report.violations;

    let rows: BTreeSet<&str> = report.instances.iter().map(|r| r.id.as_str()).collect();
    for (id, state) in &report.moto {
        let alive = matches!(
            state,
            InstanceStateName::Running | InstanceStateName::Pending
        );
        if *state == InstanceStateName::Running && !rows.contains(id.as_str()) {
            v.push(format!("instance {id} runs in EC2 without a row"));
        }
        if !alive && rows.contains(id.as_str()) {
            v.push(format!("row {id} for an instance that is {state}"));
        }
    }
    for row in &report.instances {
        if !report.moto.contains_key(&row.id) {
            v.push(format!("row {} for an instance EC2 never had", row.id));
        }
    }
    // Capacity is exact: on every ACTIVE host, each unit is free or held by one row (a user's
    // or a warm box).
    for row in report.instances.iter().filter(|r| r.status == "ACTIVE") {
        let held = report
            .mandelboxes
            .iter()
            .filter(|m| m.instance_id == row.id)
            .count();
        if usize::try_from(row.remaining_capacity).unwrap_or(usize::MAX) + held
            != crate::system::HOST_CAPACITY as usize
        {
            v.push(format!(
                "host {} has {} units free and {held} rows, not {} units",
                row.id,
                row.remaining_capacity,
                crate::system::HOST_CAPACITY
            ));
        }
    }
    for m in &report.mandelboxes {
        if !rows.contains(m.instance_id.as_str()) {
            v.push(format!(
                "mandelbox {} on {} which has no row",
                m.id, m.instance_id
            ));
        }
    }

    for host in system.fleet().hosts() {
        let containers = containers_of(&host.instance_id)?;
        if host.powered_off {
            if !containers.is_empty() {
                v.push(format!(
                    "powered-off host {} left {} containers",
                    host.instance_id,
                    containers.len()
                ));
            }
            continue;
        }
        let own_rows: BTreeMap<String, &MandelboxRow> = report
            .mandelboxes
            .iter()
            .filter(|m| m.instance_id == host.instance_id)
            .map(|m| (m.id.to_string(), m))
            .collect();
        for c in &containers {
            match c.mandelbox_id.as_ref().and_then(|id| own_rows.get(id)) {
                None => v.push(format!(
                    "container {} on {} has no mandelbox row",
                    &c.id[..12.min(c.id.len())],
                    host.instance_id
                )),
                Some(row) if c.state != "running" => v.push(format!(
                    "mandelbox {} is {} but its container is {}",
                    row.id, row.status, c.state
                )),
                Some(_) => {}
            }
        }
        let with_container: BTreeSet<&str> = containers
            .iter()
            .filter_map(|c| c.mandelbox_id.as_deref())
            .collect();
        for (id, row) in &own_rows {
            if row.status != "ALLOCATED" && !with_container.contains(id.as_str()) {
                v.push(format!(
                    "mandelbox {id} is {} on {} without a container",
                    row.status, host.instance_id
                ));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&host.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if uuid::Uuid::parse_str(&name).is_ok() && !own_rows.contains_key(&name) {
                    v.push(format!(
                        "directory {name} on {} belongs to no mandelbox",
                        host.instance_id
                    ));
                }
            }
        }
        if host.pid.is_some() {
            match resources_held(&host).await {
                Ok(held) => {
                    let n = containers.len() as i64;
                    let ports = held.get("ports").copied().unwrap_or(0);
                    let ttys = held.get("ttys").copied().unwrap_or(0);
                    if ports != n * PORTS_PER_MANDELBOX || ttys != n {
                        v.push(format!(
                            "host {} holds {ports} ports and {ttys} TTYs for {n} containers",
                            host.instance_id
                        ));
                    }
                }
                Err(error) => v.push(format!(
                    "host {} does not answer /metrics: {error}",
                    host.instance_id
                )),
            }
        }
        report
            .containers
            .insert(host.instance_id.clone(), containers);
    }
    Ok(())
}

/// Waits until [`check`] holds, at most `deadline`; returns the last report and how long the
/// system took to settle.
pub async fn settle(
    system: &System,
    deadline: std::time::Duration,
) -> (Report, std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        let report = check(system).await;
        if report.holds() || started.elapsed() > deadline {
            return (report, started.elapsed());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
