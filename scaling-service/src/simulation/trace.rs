//! Session traces: CSV `start_seconds,duration_seconds[,region]` (a header line, `#` comments),
//! or a seeded generator (Poisson arrivals on a daily profile, log-normal session lengths,
//! bursts).

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SimulationError;

/// The region of a trace line without one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// One user session: when its client first asks for a mandelbox, and how long it stays once
/// served.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub start_s: f64,
    pub duration_s: f64,
    pub region: String,
}

/// Parses a trace; sessions come back sorted by start.
pub fn parse_trace(text: &str) -> Result<Vec<Session>, SimulationError> {
    let mut sessions = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| SimulationError::Trace {
            line: n + 1,
            reason,
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if sessions.is_empty() && fields.first().is_some_and(|f| f.parse::<f64>().is_err()) {
            continue; // the header
        }
        if !(2..=3).contains(&fields.len()) {
            return Err(bad(format!(
                "expected start_seconds,duration_seconds[,region], got {line:?}"
            )));
        }
        let number = |what: &str, v: &str| -> Result<f64, SimulationError> {
            let x: f64 = v
                .parse()
                .map_err(|_| bad(format!("{what} {v:?} is not a number")))?;
            if !x.is_finite() || x < 0.0 {
                return Err(bad(format!("{what} {v:?} must be finite and >= 0")));
            }
            Ok(x)
        };
        sessions.push(Session {
            start_s: number("start_seconds", fields[0])?,
            duration_s: number("duration_seconds", fields[1])?,
            region: fields
                .get(2)
                .filter(|r| !r.is_empty())
                .map_or(DEFAULT_REGION, |r| r)
                .to_owned(),
        });
    }
    if sessions.is_empty() {
        return Err(SimulationError::EmptyTrace);
    }
    sessions.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    Ok(sessions)
}

/// Writes sessions as a trace, `comment` lines first.
pub fn render_trace(sessions: &[Session], comment: &str) -> String {
    let mut out = String::new();
    for line in comment.lines() {
        let _ = writeln!(out, "# {line}");
    }
    out.push_str("start_seconds,duration_seconds,region\n");
    for s in sessions {
        let _ = writeln!(out, "{:.1},{:.1},{}", s.start_s, s.duration_s, s.region);
    }
    out
}

/// A synthetic workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Sessions on the profile (bursts come on top).
    pub sessions: usize,
    pub days: f64,
    /// Relative arrival rate by hour of day (24 values).
    pub profile: [f64; 24],
    /// Median session length and the log-normal's sigma.
    pub median_session_s: f64,
    pub session_sigma: f64,
    /// `(at_seconds, sessions, within_seconds)`: flash crowds.
    pub bursts: Vec<(f64, usize, f64)>,
}

/// An office-and-evening day: quiet night, morning ramp, lunch dip, evening peak.
pub const WEEKDAY_PROFILE: [f64; 24] = [
    0.1, 0.05, 0.05, 0.05, 0.05, 0.1, 0.3, 0.6, 1.0, 1.2, 1.2, 1.1, 0.8, 1.0, 1.2, 1.2, 1.1, 1.0,
    1.2, 1.6, 1.8, 1.5, 0.8, 0.3,
];
/// Flat: every hour alike.
pub const FLAT_PROFILE: [f64; 24] = [1.0; 24];

impl Workload {
    /// The named workloads of the corpus (`weekday`, `flash-crowd`, `quiet-night`,
    /// `short-sessions`, `one-after-another`) and `week` (7 weekdays of 10,000 sessions).
    pub fn named(name: &str) -> Option<Self> {
        let day = |sessions, median, sigma| Workload {
            sessions,
            days: 1.0,
            profile: WEEKDAY_PROFILE,
            median_session_s: median,
            session_sigma: sigma,
            bursts: vec![],
        };
        Some(match name {
            "weekday" => day(600, 30.0 * 60.0, 0.8),
            "week" => Workload {
                days: 7.0,
                ..day(10_000, 30.0 * 60.0, 0.8)
            },
            "flash-crowd" => Workload {
                bursts: vec![(14.0 * 3600.0, 40, 120.0)],
                ..day(150, 20.0 * 60.0, 0.7)
            },
            "quiet-night" => Workload {
                days: 8.0 / 24.0,
                profile: FLAT_PROFILE,
                ..day(25, 15.0 * 60.0, 0.8)
            },
            "short-sessions" => day(1500, 120.0, 0.6),
            _ => return None,
        })
    }

    /// Sessions drawn from `seed`: `sessions` arrivals of a Poisson process whose rate follows
    /// the profile (given their number, its arrivals are independent draws from the profile),
    /// plus the bursts, with log-normal lengths.
    pub fn generate(&self, seed: u64) -> Vec<Session> {
        let mut rng = StdRng::seed_from_u64(seed);
        let span = self.days * 86_400.0;
        let peak = self
            .profile
            .iter()
            .copied()
            .fold(f64::MIN, f64::max)
            .max(1e-9);
        let mut sessions = Vec::with_capacity(self.sessions);
        let length = |rng: &mut StdRng| {
            (self.median_session_s * (self.session_sigma * normal(rng)).exp()).max(1.0)
        };
        while sessions.len() < self.sessions {
            let t = rng.random::<f64>() * span;
            let hour = ((t % 86_400.0) / 3600.0) as usize;
            if rng.random::<f64>() * peak <= self.profile[hour.min(23)] {
                let duration_s = length(&mut rng);
                sessions.push(Session {
                    start_s: t,
                    duration_s,
                    region: DEFAULT_REGION.to_owned(),
                });
            }
        }
        for &(at, count, within) in &self.bursts {
            for _ in 0..count {
                let duration_s = length(&mut rng);
                sessions.push(Session {
                    start_s: at + rng.random::<f64>() * within,
                    duration_s,
                    region: DEFAULT_REGION.to_owned(),
                });
            }
        }
        sessions.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
        sessions
    }
}

/// `count` sessions of `duration_s`, each starting `gap_s` after the previous one ended: the
/// thrash test of issue #13 (20 one-second sessions one after another).
pub fn one_after_another(count: usize, duration_s: f64, gap_s: f64, first_s: f64) -> Vec<Session> {
    (0..count)
        .map(|n| Session {
            start_s: first_s + n as f64 * (duration_s + gap_s),
            duration_s,
            region: DEFAULT_REGION.to_owned(),
        })
        .collect()
}

/// A standard normal draw (Box–Muller).
pub fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_trace_has_a_header_comments_and_an_optional_region() {
        let text =
            "start_seconds,duration_seconds,region\n# a comment\n10,5\n3.5,60,us-west-1 # late\n";
        let s = parse_trace(text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].start_s, 3.5);
        assert_eq!(s[0].region, "us-west-1");
        assert_eq!(s[1].region, DEFAULT_REGION);
        assert!(parse_trace("start,duration\n1,-2\n").is_err());
        assert!(parse_trace("1,2,3,4\n").is_err());
        assert!(matches!(
            parse_trace("# nothing\n"),
            Err(SimulationError::EmptyTrace)
        ));
    }

    #[test]
    fn the_generator_is_deterministic_and_round_trips_through_csv() {
        let w = Workload::named("flash-crowd").unwrap();
        let a = w.generate(7);
        assert_eq!(a, w.generate(7));
        assert_eq!(a.len(), 190);
        let back = parse_trace(&render_trace(&a, "flash crowd\nseed 7")).unwrap();
        assert_eq!(back.len(), a.len());
        assert!((back[10].start_s - a[10].start_s).abs() < 0.051);
    }
}
