//! `whist-scaling-service simulate`: runs the default algorithm against a demand trace, minute
//! by minute, with simulated boot and drain delays, so an operator can tune the buffer before
//! deploying. Writes `plot.svg` (demand, free capacity, hosts per state over time),
//! `timeline.csv` (the same numbers) and `summary.txt` (host-hours, unmet requests).
//!
//! The trace is CSV `minute,demand` (a header line is allowed; `#` starts a comment): the number
//! of users who want a mandelbox at that minute. Between two lines demand holds its value.
//! A user who finds no free mandelbox is an unmet request for that minute and asks again the next.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use dbclient::types::{ImageId, InstanceId, InstanceStatus};

use crate::algorithm::{Action, AlgorithmConfig, InstanceView, Snapshot, decide};

/// The simulator's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "whist-scaling-service simulate",
    about = "Run the default scaling algorithm against a demand trace and plot the result"
)]
pub struct SimulateArgs {
    /// CSV trace: `minute,demand` lines.
    #[arg(long)]
    pub trace: PathBuf,
    /// Folder for plot.svg, timeline.csv and summary.txt (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Free mandelboxes to keep ready.
    #[arg(long, default_value_t = 2)]
    pub desired_free_mandelboxes: u32,
    /// Mandelboxes per host.
    #[arg(long, default_value_t = 2)]
    pub capacity_per_instance: u32,
    /// Most hosts in the region.
    #[arg(long, default_value_t = 100)]
    pub max_instances: u32,
    /// Minutes from launch until a host is ACTIVE.
    #[arg(long, default_value_t = 5)]
    pub boot_minutes: u32,
    /// Minutes from DRAINING until a free host is gone.
    #[arg(long, default_value_t = 2)]
    pub drain_minutes: u32,
    /// Minutes between two decisions.
    #[arg(long, default_value_t = 1)]
    pub interval_minutes: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulationError {
    #[error("cannot read the trace {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace line {line}: {reason}")]
    Trace { line: usize, reason: String },
    #[error("the trace is empty")]
    EmptyTrace,
}

/// One minute of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Minute {
    pub minute: u32,
    pub demand: u32,
    pub served: u32,
    pub unmet: u32,
    /// Free slots on ACTIVE hosts at the end of the minute.
    pub free_capacity: u32,
    pub pre_connection: u32,
    pub active: u32,
    pub draining: u32,
}

impl Minute {
    pub fn hosts(&self) -> u32 {
        self.pre_connection + self.active + self.draining
    }
}

/// What a run adds up to.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub minutes: u32,
    pub host_hours: f64,
    /// User-minutes without a mandelbox.
    pub unmet_requests: u64,
    pub served_minutes: u64,
    pub peak_hosts: u32,
    pub launches: u32,
    pub drains: u32,
}

/// Parses a trace into demand per minute (from 0 to the last minute, held between lines).
pub fn parse_trace(text: &str) -> Result<Vec<u32>, SimulationError> {
    let mut points: Vec<(u32, u32)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() || (n == 0 && line.starts_with(|c: char| c.is_ascii_alphabetic())) {
            continue;
        }
        let bad = |reason: &str| SimulationError::Trace {
            line: n + 1,
            reason: reason.to_owned(),
        };
        let (minute, demand) = line
            .split_once(',')
            .ok_or_else(|| bad("expected `minute,demand`"))?;
        let minute: u32 = minute
            .trim()
            .parse()
            .map_err(|_| bad("the minute is not a whole number"))?;
        let demand: u32 = demand
            .trim()
            .parse()
            .map_err(|_| bad("the demand is not a whole number"))?;
        if minute > 60 * 24 * 366 {
            return Err(bad("the minute is past a year"));
        }
        if points.last().is_some_and(|(m, _)| *m >= minute) {
            return Err(bad("minutes must increase"));
        }
        points.push((minute, demand));
    }
    let Some(&(last, _)) = points.last() else {
        return Err(SimulationError::EmptyTrace);
    };
    let mut demand = vec![0; last as usize + 1];
    for pair in points.windows(2) {
        let ((m0, d0), (m1, _)) = (pair[0], pair[1]);
        for slot in &mut demand[m0 as usize..m1 as usize] {
            *slot = d0;
        }
    }
    if let Some(&(m, d)) = points.last() {
        demand[m as usize] = d;
    }
    Ok(demand)
}

#[derive(Debug)]
struct SimHost {
    view: InstanceView,
    /// Minute it becomes ACTIVE (booting) or disappears (draining).
    until: u32,
}

/// Runs the default algorithm over `demand` (users per minute).
pub fn simulate(demand: &[u32], args: &SimulateArgs) -> (Vec<Minute>, Summary) {
    let start: DateTime<Utc> = DateTime::UNIX_EPOCH;
    let image = ImageId::new("ami-simulated").ok();
    let config = AlgorithmConfig {
        desired_free_mandelboxes: args.desired_free_mandelboxes,
        max_instances: args.max_instances,
        capacity_per_instance: args.capacity_per_instance.max(1),
        ..AlgorithmConfig::default()
    };
    let capacity = config.capacity_per_instance;
    let mut hosts: Vec<SimHost> = Vec::new();
    let mut next_id = 0u64;
    let mut timeline = Vec::with_capacity(demand.len());
    let (mut launches, mut drains) = (0, 0);
    for (minute, &wanted) in demand.iter().enumerate() {
        let minute = u32::try_from(minute).unwrap_or(u32::MAX);
        let now = start + chrono::Duration::minutes(i64::from(minute));
        // Boots finish, drains end.
        hosts.retain(|h| !(h.view.status == InstanceStatus::Draining && h.until <= minute));
        for h in &mut hosts {
            if h.view.status == InstanceStatus::PreConnection && h.until <= minute {
                h.view.status = InstanceStatus::Active;
                h.view.status_since = now;
            }
        }
        // Users leave (from the emptiest hosts, so hosts come free) or arrive (bin-packed).
        let mut users: u32 = hosts.iter().map(|h| h.view.mandelboxes).sum();
        if users > wanted {
            hosts.sort_by_key(|h| (h.view.mandelboxes, h.view.id.clone()));
            for h in hosts.iter_mut() {
                let leave = h.view.mandelboxes.min(users - wanted);
                h.view.mandelboxes -= leave;
                h.view.remaining_capacity += leave;
                users -= leave;
            }
        }
        let mut unmet = 0;
        if wanted > users {
            let mut arrivals = wanted - users;
            let mut open: Vec<&mut SimHost> = hosts
                .iter_mut()
                .filter(|h| {
                    h.view.status == InstanceStatus::Active && h.view.remaining_capacity > 0
                })
                .collect();
            open.sort_by_key(|h| (h.view.remaining_capacity, h.view.id.clone()));
            for h in open {
                let take = h.view.remaining_capacity.min(arrivals);
                h.view.remaining_capacity -= take;
                h.view.mandelboxes += take;
                arrivals -= take;
            }
            unmet = arrivals;
        }
        // Decide and apply.
        if minute % args.interval_minutes.max(1) == 0 {
            let snapshot = Snapshot {
                instances: hosts.iter().map(|h| h.view.clone()).collect(),
                current_image: image.clone(),
                target_image: image.clone(),
                ..Snapshot::default()
            };
            for action in decide(&snapshot, &config, now) {
                match action {
                    Action::Launch { count, image_id } => {
                        for _ in 0..count {
                            next_id += 1;
                            let Ok(id) = InstanceId::new(format!("i-sim{next_id:08}")) else {
                                continue;
                            };
                            launches += 1;
                            hosts.push(SimHost {
                                view: InstanceView {
                                    id,
                                    image_id: image_id.clone(),
                                    status: InstanceStatus::PreConnection,
                                    remaining_capacity: capacity,
                                    capacity,
                                    mandelboxes: 0,
                                    created_at: now,
                                    status_since: now,
                                },
                                until: minute + args.boot_minutes,
                            });
                        }
                    }
                    Action::Drain { instance } => {
                        if let Some(h) = hosts.iter_mut().find(|h| h.view.id == instance) {
                            drains += 1;
                            h.view.status = InstanceStatus::Draining;
                            h.view.status_since = now;
                            h.until = minute + args.drain_minutes;
                        }
                    }
                    Action::Terminate { instance, .. } | Action::DeleteRow { instance } => {
                        hosts.retain(|h| h.view.id != instance);
                    }
                    Action::SwapImage { .. }
                    | Action::AbandonUpgrade { .. }
                    | Action::RequeueAfter(_) => {}
                }
            }
        }
        let count = |s: InstanceStatus| {
            u32::try_from(hosts.iter().filter(|h| h.view.status == s).count()).unwrap_or(u32::MAX)
        };
        timeline.push(Minute {
            minute,
            demand: wanted,
            served: wanted - unmet,
            unmet,
            free_capacity: hosts
                .iter()
                .filter(|h| h.view.status == InstanceStatus::Active)
                .map(|h| h.view.remaining_capacity)
                .sum(),
            pre_connection: count(InstanceStatus::PreConnection),
            active: count(InstanceStatus::Active),
            draining: count(InstanceStatus::Draining),
        });
    }
    let summary = Summary {
        minutes: u32::try_from(timeline.len()).unwrap_or(u32::MAX),
        host_hours: timeline.iter().map(|m| f64::from(m.hosts())).sum::<f64>() / 60.0,
        unmet_requests: timeline.iter().map(|m| u64::from(m.unmet)).sum(),
        served_minutes: timeline.iter().map(|m| u64::from(m.served)).sum(),
        peak_hosts: timeline.iter().map(Minute::hosts).max().unwrap_or(0),
        launches,
        drains,
    };
    (timeline, summary)
}

/// The summary as `summary.txt` writes it: `key: value` lines.
pub fn render_summary(summary: &Summary, args: &SimulateArgs) -> String {
    format!(
        "minutes: {}\nhost_hours: {:.3}\nunmet_requests: {}\nserved_user_minutes: {}\npeak_hosts: {}\nlaunches: {}\ndrains: {}\ndesired_free_mandelboxes: {}\ncapacity_per_instance: {}\nboot_minutes: {}\ndrain_minutes: {}\n",
        summary.minutes,
        summary.host_hours,
        summary.unmet_requests,
        summary.served_minutes,
        summary.peak_hosts,
        summary.launches,
        summary.drains,
        args.desired_free_mandelboxes,
        args.capacity_per_instance,
        args.boot_minutes,
        args.drain_minutes,
    )
}

/// A plotted line: name, colour, value per minute.
type Series = (&'static str, &'static str, fn(&Minute) -> u32);

fn polyline(points: &[(f64, f64)], colour: &str) -> String {
    let mut s = String::from("<polyline fill=\"none\" stroke-width=\"1.5\" stroke=\"");
    s.push_str(colour);
    s.push_str("\" points=\"");
    for (x, y) in points {
        let _ = write!(s, "{x:.1},{y:.1} ");
    }
    s.push_str("\"/>\n");
    s
}

/// A two-panel SVG: mandelboxes (demand, unmet, free capacity) above, hosts per state below.
pub fn render_svg(timeline: &[Minute]) -> String {
    const W: f64 = 960.0;
    const PANEL: f64 = 260.0;
    const LEFT: f64 = 60.0;
    const TOP: f64 = 30.0;
    let n = timeline.len().max(2) as f64 - 1.0;
    let x = |i: usize| LEFT + (W - LEFT - 20.0) * i as f64 / n;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * PANEL + 3.0 * TOP + 20.0
    );
    let panels: [(&str, Vec<Series>); 2] = [
        (
            "mandelboxes",
            vec![
                ("demand", "#1f77b4", |m| m.demand),
                ("free capacity", "#2ca02c", |m| m.free_capacity),
                ("unmet", "#d62728", |m| m.unmet),
            ],
        ),
        (
            "hosts",
            vec![
                ("active", "#2ca02c", |m| m.active),
                ("pre_connection", "#ff7f0e", |m| m.pre_connection),
                ("draining", "#9467bd", |m| m.draining),
            ],
        ),
    ];
    for (p, (title, series)) in panels.iter().enumerate() {
        let top = TOP + p as f64 * (PANEL + TOP);
        let bottom = top + PANEL;
        let max = series
            .iter()
            .flat_map(|(_, _, f)| timeline.iter().map(f))
            .max()
            .unwrap_or(0)
            .max(1);
        let y = |v: u32| bottom - PANEL * f64::from(v) / f64::from(max);
        let _ = write!(
            svg,
            "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"bold\">{title}</text>\n<line x1=\"{LEFT}\" y1=\"{bottom:.1}\" x2=\"{:.1}\" y2=\"{bottom:.1}\" stroke=\"black\"/>\n<line x1=\"{LEFT}\" y1=\"{top:.1}\" x2=\"{LEFT}\" y2=\"{bottom:.1}\" stroke=\"black\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{max}</text>\n<text x=\"{:.1}\" y=\"{bottom:.1}\" text-anchor=\"end\">0</text>\n",
            top - 8.0,
            W - 20.0,
            LEFT - 4.0,
            top + 4.0,
            LEFT - 4.0,
        );
        for (k, (name, colour, f)) in series.iter().enumerate() {
            let points: Vec<(f64, f64)> = timeline
                .iter()
                .enumerate()
                .map(|(i, m)| (x(i), y(f(m))))
                .collect();
            svg.push_str(&polyline(&points, colour));
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{name}</text>",
                LEFT + 120.0 + 130.0 * k as f64,
                top - 8.0
            );
        }
    }
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{:.1}\">minutes 0 to {}</text>\n</svg>",
        2.0 * PANEL + 3.0 * TOP + 10.0,
        timeline.len().saturating_sub(1)
    );
    svg
}

/// The timeline as CSV.
pub fn render_timeline(timeline: &[Minute]) -> String {
    let mut csv =
        String::from("minute,demand,served,unmet,free_capacity,pre_connection,active,draining\n");
    for m in timeline {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            m.minute,
            m.demand,
            m.served,
            m.unmet,
            m.free_capacity,
            m.pre_connection,
            m.active,
            m.draining
        );
    }
    csv
}

fn write(path: &Path, text: &str) -> Result<(), SimulationError> {
    std::fs::write(path, text).map_err(|source| SimulationError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads the trace, simulates, writes the three files. Returns the summary.
pub fn run_simulation(args: &SimulateArgs) -> Result<Summary, SimulationError> {
    let text = std::fs::read_to_string(&args.trace).map_err(|source| SimulationError::Read {
        path: args.trace.clone(),
        source,
    })?;
    let demand = parse_trace(&text)?;
    let (timeline, summary) = simulate(&demand, args);
    std::fs::create_dir_all(&args.out).map_err(|source| SimulationError::Write {
        path: args.out.clone(),
        source,
    })?;
    write(&args.out.join("plot.svg"), &render_svg(&timeline))?;
    write(&args.out.join("timeline.csv"), &render_timeline(&timeline))?;
    write(
        &args.out.join("summary.txt"),
        &render_summary(&summary, args),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_trace_holds_demand_between_lines_and_rejects_garbage() {
        assert_eq!(
            parse_trace("minute,demand\n0,1\n3,4 # peak\n5,0\n").unwrap(),
            vec![1, 1, 1, 4, 4, 0]
        );
        assert!(parse_trace("0,1\n0,2\n").is_err());
        assert!(parse_trace("0,x\n").is_err());
        assert!(parse_trace("# nothing\n").is_err());
    }
}
