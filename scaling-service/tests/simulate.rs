//! The simulator: its summary agrees with its own timeline, its outputs are written, and on
//! issue #13's thrash trace (20 one-second sessions, 5 min apart) `default` relaunches a host
//! per session while `holdover` launches at most two.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use clap::Parser;
use scaling_service::simulation::compare::{BEGIN_MARKER, CompareArgs, END_MARKER, run_compare};
use scaling_service::simulation::{SimulateArgs, run_simulation};

fn traces() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("simulation/traces")
}

fn simulate(trace: &str, algorithm: &str, out: &std::path::Path) -> serde_json::Value {
    let trace = traces().join(trace);
    let args = SimulateArgs::parse_from([
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--algorithm",
        algorithm,
        "--out",
        out.to_str().unwrap(),
    ]);
    run_simulation(&args).unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn summary_is_consistent_with_the_timeline_and_the_plot_is_written() {
    let out = tempfile::tempdir().unwrap();
    let summary = simulate("weekday.csv", "holdover", out.path());
    let timeline = std::fs::read_to_string(out.path().join("timeline.csv")).unwrap();
    let rows: Vec<Vec<f64>> = timeline
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let last = rows.last().unwrap();
    assert_eq!(last[8], summary["unmet_requests"].as_f64().unwrap());
    for r in &rows {
        assert_eq!(r[1], r[2] + r[3], "demand = in session + waiting: {r:?}");
    }
    // Billed host-hours are at least the sampled host-minutes (each sample holds a minute).
    let sampled: f64 = rows.iter().map(|r| r[5] + r[6] + r[7]).sum::<f64>() / 60.0;
    let billed = summary["host_hours"].as_f64().unwrap();
    assert!(
        (billed - sampled).abs() < 0.05 * billed,
        "{billed} vs {sampled}"
    );
    assert_eq!(summary["sessions"], 600);
    for key in [
        "wait_p50_s",
        "wait_p99_s",
        "launches",
        "terminations",
        "early_terminations",
        "peak_hosts",
    ] {
        assert!(summary[key].is_number(), "{key}");
    }
    let svg = std::fs::read_to_string(out.path().join("plot.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "demand",
        "free capacity",
        "unmet requests",
        "ACTIVE",
        "hosts",
        "hours",
    ] {
        assert!(svg.contains(label), "the plot lacks {label:?}");
    }
}

#[test]
fn holdover_does_not_thrash_where_default_relaunches_per_session() {
    let out = tempfile::tempdir().unwrap();
    let default = simulate("one-after-another.csv", "default", out.path());
    let holdover = simulate("one-after-another.csv", "holdover", out.path());
    assert!(default["launches"].as_u64().unwrap() >= 10, "{default}");
    assert!(holdover["launches"].as_u64().unwrap() <= 2, "{holdover}");
    assert_eq!(holdover["early_terminations"], 0);
    assert_eq!(holdover["unmet_requests"], 0);
}

#[test]
fn compare_writes_the_table_between_the_markers_only() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    std::fs::copy(
        self::traces().join("one-after-another.csv"),
        traces.join("one-after-another.csv"),
    )
    .unwrap();
    let doc = dir.path().join("doc.md");
    std::fs::write(
        &doc,
        format!("before\n{BEGIN_MARKER}\nstale\n{END_MARKER}\nafter\n"),
    )
    .unwrap();
    let args = CompareArgs::parse_from([
        "compare",
        "--traces",
        traces.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
        "--write-docs",
        doc.to_str().unwrap(),
    ]);
    let results = run_compare(&args).unwrap();
    assert_eq!(results.len(), 1);
    let text = std::fs::read_to_string(&doc).unwrap();
    assert!(text.starts_with("before\n") && text.ends_with(&format!("{END_MARKER}\nafter\n")));
    assert!(!text.contains("stale"));
    assert!(text.contains("| one-after-another | 20 | holdover |"));
    assert!(
        dir.path()
            .join("simulation/one-after-another-frontier.svg")
            .exists()
    );
}
