//! `whist-scaling-service simulate`: a discrete-event simulation of one or more regions under
//! a session trace, driving the real [`ScalingAlgorithm`](crate::algorithm::ScalingAlgorithm)
//! implementations through the service's own snapshot → plan → execute path
//! ([`crate::controller`]) against a simulated clock, database and cloud ([`fleet`]).
//!
//! Input: a trace (CSV `start_seconds,duration_seconds[,region]`, see [`trace`]) or a named
//! seeded workload (`--generate weekday`). Output in `--out`: `summary.json`, `timeline.csv`
//! and `plot.svg`. `compare` ([`compare`]) runs every algorithm on every trace of a folder and
//! writes the comparison table into the docs.

pub mod compare;
pub mod fleet;
pub mod plot;
pub mod trace;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dbclient::types::{ImageId, Region};

use crate::algorithm::{AlgorithmConfig, AlgorithmKind};
use fleet::{Fleet, FleetModel, Outcome, Sample, by_region, percentile};
use trace::{Session, Workload, one_after_another, parse_trace};

/// The simulator's settings.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "whist-scaling-service simulate",
    about = "Run a scaling algorithm against a session trace in simulated time"
)]
pub struct SimulateArgs {
    /// CSV trace: `start_seconds,duration_seconds[,region]` lines.
    #[arg(
        long,
        conflicts_with = "generate",
        required_unless_present = "generate"
    )]
    pub trace: Option<PathBuf>,
    /// A seeded workload instead of a trace: weekday, week (10,000 sessions), flash-crowd,
    /// quiet-night, short-sessions or one-after-another.
    #[arg(long)]
    pub generate: Option<String>,
    /// Sessions of the generated workload (its own number by default).
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Folder for summary.json, timeline.csv and plot.svg (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the sessions run as a trace here (how the corpus was made).
    #[arg(long)]
    pub write_trace: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SimSettings,
}

/// How a simulated region is run: the algorithm and its settings, the host and client model.
#[derive(Debug, Clone, clap::Args)]
pub struct SimSettings {
    /// original, default or holdover.
    #[arg(long, default_value = "holdover")]
    pub algorithm: AlgorithmKind,
    /// Free mandelboxes to keep ready.
    #[arg(long, default_value_t = 2)]
    pub desired_free_mandelboxes: u32,
    /// Mandelboxes per host.
    #[arg(long, default_value_t = 2)]
    pub capacity_per_instance: u32,
    /// Most hosts in a region.
    #[arg(long, default_value_t = 100)]
    pub max_instances: u32,
    /// `holdover`'s longest hold-down (and the one before it has a forecast), seconds.
    #[arg(long, default_value_t = AlgorithmConfig::default().hold_down.as_secs())]
    pub hold_down_s: u64,
    /// `holdover`'s shortest hold-down, seconds.
    #[arg(long, default_value_t = AlgorithmConfig::default().min_hold_down.as_secs())]
    pub min_hold_down_s: u64,
    /// `holdover`'s window for the arrival rate, seconds.
    #[arg(long, default_value_t = AlgorithmConfig::default().forecast_window.as_secs())]
    pub forecast_window_s: u64,
    /// `holdover`'s buffer covers the arrivals expected within this many seconds.
    #[arg(long, default_value_t = AlgorithmConfig::default().forecast_horizon.as_secs())]
    pub forecast_horizon_s: u64,
    /// `holdover` drains only beyond the arrivals expected within this many seconds.
    #[arg(long, default_value_t = AlgorithmConfig::default().drain_horizon.as_secs())]
    pub drain_horizon_s: u64,
    /// `holdover`'s chance (percent) that more clients arrive within the horizon than the
    /// buffer holds.
    #[arg(long, default_value_t = AlgorithmConfig::default().buffer_risk_percent)]
    pub buffer_risk_percent: u32,
    /// A host terminated within this many seconds of becoming ACTIVE is an early termination;
    /// `holdover` never drains one that young.
    #[arg(long, default_value_t = AlgorithmConfig::default().min_lifetime.as_secs())]
    pub min_lifetime: u64,
    /// Seconds from RunInstances to the instance running and its row inserted.
    #[arg(long, default_value_t = FleetModel::default().running_s)]
    pub running_s: f64,
    /// Median seconds from running to ACTIVE (log-normal).
    #[arg(long, default_value_t = FleetModel::default().register_median_s)]
    pub register_median_s: f64,
    /// Sigma of the log-normal registration time.
    #[arg(long, default_value_t = FleetModel::default().register_sigma)]
    pub register_sigma: f64,
    /// Seconds a free DRAINING host takes to shut down.
    #[arg(long, default_value_t = FleetModel::default().drain_s)]
    pub drain_s: f64,
    /// Seconds a client retries a refusal before giving up (an unmet request).
    #[arg(long, default_value_t = FleetModel::default().give_up_s)]
    pub give_up_s: f64,
    /// Seed of the generator, the boot times and the clients' jitter.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Default for SimSettings {
    fn default() -> Self {
        let a = AlgorithmConfig::default();
        let m = FleetModel::default();
        Self {
            algorithm: AlgorithmKind::Holdover,
            desired_free_mandelboxes: 2,
            capacity_per_instance: 2,
            max_instances: 100,
            hold_down_s: a.hold_down.as_secs(),
            min_hold_down_s: a.min_hold_down.as_secs(),
            forecast_window_s: a.forecast_window.as_secs(),
            forecast_horizon_s: a.forecast_horizon.as_secs(),
            drain_horizon_s: a.drain_horizon.as_secs(),
            buffer_risk_percent: a.buffer_risk_percent,
            min_lifetime: a.min_lifetime.as_secs(),
            running_s: m.running_s,
            register_median_s: m.register_median_s,
            register_sigma: m.register_sigma,
            drain_s: m.drain_s,
            give_up_s: m.give_up_s,
            seed: 1,
        }
    }
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
    #[error("unknown workload {0:?}")]
    Workload(String),
    #[error("invalid region {0:?} in the trace")]
    Region(String),
    #[error("plot: {0}")]
    Plot(String),
    #[error("{0} has no compare markers")]
    NoMarkers(PathBuf),
}

/// What `summary.json` holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub algorithm: String,
    pub sessions: u64,
    pub served: u64,
    /// Clients that gave up waiting.
    pub unmet_requests: u64,
    /// Waits of the served clients, from first request to assignment.
    pub wait_p50_s: f64,
    pub wait_p99_s: f64,
    /// Billed: per second, at least a minute per host.
    pub host_hours: f64,
    pub launches: u64,
    pub drains: u64,
    pub terminations: u64,
    /// Hosts terminated within `min_lifetime_s` of becoming ACTIVE (or before).
    pub early_terminations: u64,
    pub min_lifetime_s: u64,
    /// Summed over regions.
    pub peak_hosts: u32,
    /// `NO_INSTANCE_AVAILABLE` answers.
    pub refusals: u64,
    pub controller_steps: u64,
    pub simulated_hours: f64,
}

impl SimSettings {
    fn algorithm_config(&self) -> AlgorithmConfig {
        AlgorithmConfig {
            desired_free_mandelboxes: self.desired_free_mandelboxes,
            max_instances: self.max_instances,
            capacity_per_instance: self.capacity_per_instance,
            hold_down: Duration::from_secs(self.hold_down_s),
            min_hold_down: Duration::from_secs(self.min_hold_down_s),
            forecast_window: Duration::from_secs(self.forecast_window_s),
            forecast_horizon: Duration::from_secs(self.forecast_horizon_s),
            drain_horizon: Duration::from_secs(self.drain_horizon_s),
            buffer_risk_percent: self.buffer_risk_percent,
            min_lifetime: Duration::from_secs(self.min_lifetime),
            ..AlgorithmConfig::default()
        }
    }

    fn model(&self) -> FleetModel {
        FleetModel {
            capacity_per_instance: self.capacity_per_instance,
            running_s: self.running_s,
            register_median_s: self.register_median_s,
            register_sigma: self.register_sigma,
            drain_s: self.drain_s,
            give_up_s: self.give_up_s,
            min_lifetime_s: self.min_lifetime as f64,
            seed: self.seed,
            ..FleetModel::default()
        }
    }
}

/// Simulates every region of `sessions` (each with its own algorithm and fleet) and sums them.
pub fn simulate(
    sessions: &[Session],
    settings: &SimSettings,
) -> Result<(Summary, Vec<Sample>), SimulationError> {
    let image = ImageId::new("ami-simulated").map_err(|e| SimulationError::Plot(e.to_string()))?;
    let mut regions: Vec<(String, Vec<Session>)> = by_region(sessions).into_iter().collect();
    regions.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total = Outcome::default();
    let mut timeline: Vec<Sample> = Vec::new();
    for (name, sessions) in &regions {
        let region = Region::new(name).map_err(|_| SimulationError::Region(name.clone()))?;
        let mut algorithm = settings.algorithm.build(settings.algorithm_config());
        let fleet = Fleet::new(settings.model(), region, image.clone(), sessions);
        let out = futures::executor::block_on(fleet.run(algorithm.as_mut(), 0.0));
        merge(&mut total, &mut timeline, out);
    }
    let summary = Summary {
        algorithm: settings.algorithm.as_str().to_owned(),
        sessions: total.sessions,
        served: total.served,
        unmet_requests: total.unmet_requests,
        wait_p50_s: percentile(&total.waits_s, 50.0),
        wait_p99_s: percentile(&total.waits_s, 99.0),
        host_hours: total.host_seconds_billed / 3600.0,
        launches: total.launches,
        drains: total.drains,
        terminations: total.terminations,
        early_terminations: total.early_terminations,
        min_lifetime_s: settings.min_lifetime,
        peak_hosts: total.peak_hosts,
        refusals: total.refusals,
        controller_steps: total.controller_steps,
        simulated_hours: total.simulated_s / 3600.0,
    };
    Ok((summary, timeline))
}

fn merge(total: &mut Outcome, timeline: &mut Vec<Sample>, out: Outcome) {
    total.sessions += out.sessions;
    total.served += out.served;
    total.unmet_requests += out.unmet_requests;
    total.waits_s.extend(out.waits_s);
    total.refusals += out.refusals;
    total.host_seconds_billed += out.host_seconds_billed;
    total.launches += out.launches;
    total.drains += out.drains;
    total.terminations += out.terminations;
    total.early_terminations += out.early_terminations;
    total.peak_hosts += out.peak_hosts;
    total.controller_steps += out.controller_steps;
    total.simulated_s = total.simulated_s.max(out.simulated_s);
    // Same sampling grid in every region; a region that ended early holds its last sample.
    let n = timeline.len().max(out.timeline.len());
    let a_last = timeline.last().copied().unwrap_or_default();
    let b_last = out.timeline.last().copied().unwrap_or_default();
    let merged = (0..n)
        .map(|i| {
            let a = timeline.get(i).copied().unwrap_or(a_last);
            let b = out.timeline.get(i).copied().unwrap_or(b_last);
            Sample {
                t_s: a.t_s.max(b.t_s),
                demand: a.demand + b.demand,
                in_session: a.in_session + b.in_session,
                waiting: a.waiting + b.waiting,
                free_capacity: a.free_capacity + b.free_capacity,
                booting: a.booting + b.booting,
                active: a.active + b.active,
                draining: a.draining + b.draining,
                unmet_total: a.unmet_total + b.unmet_total,
            }
        })
        .collect();
    *timeline = merged;
}

/// The sessions `args` asks for.
pub fn load_sessions(args: &SimulateArgs) -> Result<Vec<Session>, SimulationError> {
    if let Some(path) = &args.trace {
        return read_trace(path);
    }
    let name = args.generate.as_deref().unwrap_or("weekday");
    if name == "one-after-another" {
        return Ok(one_after_another(
            args.sessions.unwrap_or(20),
            1.0,
            300.0,
            600.0,
        ));
    }
    let mut workload =
        Workload::named(name).ok_or_else(|| SimulationError::Workload(name.to_owned()))?;
    if let Some(n) = args.sessions {
        workload.sessions = n;
    }
    Ok(workload.generate(args.settings.seed))
}

pub fn read_trace(path: &Path) -> Result<Vec<Session>, SimulationError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimulationError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_trace(&text)
}

fn write(path: &Path, text: &str) -> Result<(), SimulationError> {
    std::fs::write(path, text).map_err(|source| SimulationError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The timeline as CSV.
pub fn render_timeline_csv(timeline: &[Sample]) -> String {
    let mut out = String::from(
        "t_seconds,demand,in_session,waiting,free_capacity,booting,active,draining,unmet_total\n",
    );
    for s in timeline {
        let _ = writeln!(
            out,
            "{:.0},{},{},{},{},{},{},{},{}",
            s.t_s,
            s.demand,
            s.in_session,
            s.waiting,
            s.free_capacity,
            s.booting,
            s.active,
            s.draining,
            s.unmet_total
        );
    }
    out
}

/// Writes `summary.json`, `timeline.csv` and `plot.svg` into `out`.
pub fn write_outputs(
    out: &Path,
    title: &str,
    summary: &Summary,
    timeline: &[Sample],
) -> Result<(), SimulationError> {
    std::fs::create_dir_all(out).map_err(|source| SimulationError::Write {
        path: out.to_owned(),
        source,
    })?;
    let json = serde_json::to_string_pretty(summary).unwrap_or_default();
    write(&out.join("summary.json"), &(json + "\n"))?;
    write(&out.join("timeline.csv"), &render_timeline_csv(timeline))?;
    let svg = plot::render_timeline(title, timeline).map_err(SimulationError::Plot)?;
    write(&out.join("plot.svg"), &svg)
}

/// `simulate`: loads the sessions, runs them, writes the outputs.
pub fn run_simulation(args: &SimulateArgs) -> Result<Summary, SimulationError> {
    let sessions = load_sessions(args)?;
    if let Some(path) = &args.write_trace {
        let comment = format!(
            "whist-scaling-service simulate --generate {} --seed {}{}\ngenerated once and committed: start_seconds,duration_seconds,region",
            args.generate.as_deref().unwrap_or("-"),
            args.settings.seed,
            args.sessions
                .map(|n| format!(" --sessions {n}"))
                .unwrap_or_default()
        );
        write(path, &trace::render_trace(&sessions, &comment))?;
    }
    let (summary, timeline) = simulate(&sessions, &args.settings)?;
    let source = args
        .trace
        .as_ref()
        .map(|p| p.display().to_string())
        .or_else(|| args.generate.clone())
        .unwrap_or_default();
    let title = format!("{} on {source}", args.settings.algorithm);
    write_outputs(&args.out, &title, &summary, &timeline)?;
    Ok(summary)
}
