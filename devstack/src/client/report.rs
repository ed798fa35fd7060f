//! Timings and reports of a session, and durations as people write and read them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Assignment, ClientError, Step};

/// Durations of a session's steps (`None`: not reached, or skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timings {
    pub token: Option<Duration>,
    /// All attempts, backoff included.
    pub assign: Option<Duration>,
    pub json_transport: Option<Duration>,
    /// The TCP handshake with the mandelbox.
    pub connect: Option<Duration>,
    /// From the start of the connection to the mandelbox's first byte.
    pub first_byte: Option<Duration>,
    pub hold: Option<Duration>,
    pub total: Duration,
}

impl Timings {
    fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| json!(millis(d)));
        json!({
            "token": ms(self.token),
            "assign": ms(self.assign),
            "json_transport": ms(self.json_transport),
            "connect": ms(self.connect),
            "first_byte": ms(self.first_byte),
            "hold": ms(self.hold),
            "total": millis(self.total),
        })
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A completed session.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub user_id: String,
    pub session_id: String,
    pub assignment: Assignment,
    pub assign_attempts: u32,
    /// Host port by mandelbox port.
    pub ports: BTreeMap<u16, u16>,
    pub first_line: String,
    pub timings: Timings,
}

impl SessionReport {
    /// One JSON object (durations in milliseconds), for scripts and benchmarks.
    pub fn to_json(&self) -> Value {
        json!({
            "ok": true,
            "user_id": self.user_id,
            "session_id": self.session_id,
            "ip": self.assignment.ip,
            "mandelbox_id": self.assignment.mandelbox_id,
            "tls_fingerprint": self.assignment.tls_fingerprint,
            "assign_attempts": self.assign_attempts,
            "ports": self.ports.iter().map(|(k, v)| (format!("port_{k}"), json!(v))).collect::<serde_json::Map<_, _>>(),
            "first_line": self.first_line_value(),
            "timings_ms": self.timings.to_json(),
        })
    }

    fn first_line_value(&self) -> Value {
        serde_json::from_str(&self.first_line).unwrap_or_else(|_| json!(self.first_line))
    }

    /// Human-readable lines: one per step with its duration.
    pub fn render(&self) -> String {
        let t = &self.timings;
        let mut out = String::new();
        let mut line = |step: &str, d: Option<Duration>, what: String| {
            let d = d.map(format_duration).unwrap_or_else(|| "-".to_owned());
            out.push_str(format!("  {step:<15}{d:>10}  {what}").trim_end());
            out.push('\n');
        };
        line(
            "token",
            t.token,
            if t.token.is_some() {
                "from devstack's fake Auth0".to_owned()
            } else {
                "given".to_owned()
            },
        );
        line(
            "assign",
            t.assign,
            format!(
                "mandelbox {} on {} ({} attempt{})",
                self.assignment.mandelbox_id,
                self.assignment.ip,
                self.assign_attempts,
                if self.assign_attempts == 1 { "" } else { "s" }
            ),
        );
        let ports: Vec<String> = self.ports.iter().map(|(k, v)| format!("{k}→{v}")).collect();
        let pin = self
            .assignment
            .tls_fingerprint
            .as_deref()
            .map(|f| f.get(..16).unwrap_or(f))
            .unwrap_or("?");
        line(
            "json_transport",
            t.json_transport,
            format!("ports {} (TLS pinned to {pin}…)", ports.join(" ")),
        );
        line(
            "connect",
            t.connect,
            format!(
                "first byte after {}: {}",
                t.first_byte.map(format_duration).unwrap_or_default(),
                quote(&self.first_line, 160)
            ),
        );
        if let Some(hold) = t.hold {
            line("hold", Some(hold), "then left".to_owned());
        }
        line("total", Some(t.total), String::new());
        out
    }
}

/// A session that did not complete: the step, the error and what was timed until then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SessionFailure {
    pub step: Step,
    #[source]
    pub error: ClientError,
    pub user_id: String,
    pub session_id: Option<String>,
    pub assignment: Option<Assignment>,
    pub timings: Timings,
}

impl SessionFailure {
    pub fn to_json(&self) -> Value {
        json!({
            "ok": false,
            "step": self.step,
            "error": self.error.to_string(),
            "code": self.error.code(),
            "user_id": self.user_id,
            "session_id": self.session_id,
            "ip": self.assignment.as_ref().map(|a| a.ip),
            "mandelbox_id": self.assignment.as_ref().map(|a| a.mandelbox_id),
            "timings_ms": self.timings.to_json(),
        })
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a duration like 500ms, 30s, 2m or 1h expected"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" | "sec" | "secs" => number,
        "m" | "min" | "mins" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// A duration for people: `0.42 ms`, `12.3 ms`, `2.31 s`, `2 min 05 s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let s = d.as_secs();
        if s < 3600 {
            format!("{} min {:02} s", s / 60, s % 60)
        } else {
            format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
        }
    }
}

pub(super) fn quote(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_print_for_people() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(format_duration(Duration::from_micros(420)), "0.42 ms");
        assert_eq!(format_duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(format_duration(Duration::from_millis(480)), "480 ms");
        assert_eq!(format_duration(Duration::from_millis(2310)), "2.31 s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1 h 02 min");
    }
}
