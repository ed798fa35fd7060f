//! The simulator on the sample trace: its summary agrees with its own timeline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;
use scaling_service::simulation::{SimulateArgs, run_simulation};

#[test]
fn sample_trace_summary_is_consistent_with_the_timeline() {
    let out = tempfile::tempdir().unwrap();
    let trace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("simulation/demand.csv");
    let args = SimulateArgs::parse_from([
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    let summary = run_simulation(&args).unwrap();

    let text = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    let values: HashMap<&str, f64> = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    let timeline = std::fs::read_to_string(out.path().join("timeline.csv")).unwrap();
    let rows: Vec<Vec<u32>> = timeline
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len() as f64, values["minutes"]);
    assert_eq!(rows.len(), 24 * 60 - 10 + 1);
    let (mut host_minutes, mut unmet, mut served) = (0u64, 0u64, 0u64);
    for r in &rows {
        let [_, demand, s, u, _free, pre, active, draining] = r[..] else {
            panic!("{r:?}")
        };
        assert_eq!(s + u, demand, "served + unmet = demand: {r:?}");
        host_minutes += u64::from(pre + active + draining);
        unmet += u64::from(u);
        served += u64::from(s);
    }
    assert!((values["host_hours"] - host_minutes as f64 / 60.0).abs() < 0.001);
    assert_eq!(values["unmet_requests"], unmet as f64);
    assert_eq!(values["served_user_minutes"], served as f64);
    assert_eq!(summary.unmet_requests, unmet);
    // A buffer of 2 absorbs most of a smooth trace: unmet requests are a small fraction.
    assert!(unmet * 20 < served, "unmet {unmet}, served {served}");
    assert!(summary.launches > 0 && summary.drains > 0);

    let svg = std::fs::read_to_string(out.path().join("plot.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for series in [
        "demand",
        "free capacity",
        "active",
        "pre_connection",
        "draining",
    ] {
        assert!(svg.contains(series), "{series}");
    }
}
