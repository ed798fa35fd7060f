//! A client simulator: what Whist's client app does to start a session, against the local
//! system (`make run`), step by step and timed. The binary `whist-client` drives it; tests and
//! benchmarks can call each step on their own.
//!
//! 1. [`Client::token`]: an access token from devstack's fake Auth0
//!    (`POST {control}/token {"user_id"}` → `201 {"access_token"}`).
//! 2. [`Client::assign`] / [`Client::assign_waiting`]: `POST {scaling}/mandelbox/assign` with the
//!    bearer token → `{ip, mandelbox_id, tls_fingerprint}`; `assign_waiting` retries
//!    `503 NO_INSTANCE_AVAILABLE` with backoff until a deadline (hosts may still be booting).
//! 3. [`Client::json_transport`]: `PUT https://{ip}:4678/json_transport` with the token and the
//!    settings, over TLS pinned to the assignment's fingerprint ([`PinnedVerifier`]) →
//!    the mandelbox's host ports.
//! 4. [`Client::connect`]: TCP to the host port of 32273 (the protocol's base port); the
//!    mandelbox answers with one line; [`Connection::hold`] keeps the session open and
//!    [`Connection::close`] ends it (the mandelbox exits when that client leaves).
//!
//! [`Client::run_session`] does all four and reports each step's duration. Every network step
//! is bounded by a timeout. The access token is never printed: [`AccessToken`]'s `Debug` hides
//! it, and errors carry status codes and the servers' error codes, never request headers.
//!
//! By job: `error.rs` ([`Step`], [`ClientError`]), `options.rs` (what the client and a session
//! are given), `session.rs` ([`Client`]'s steps and [`Connection`]), `report.rs` (timings,
//! reports, durations), `http.rs` (TLS pinning and the HTTP plumbing).

use std::time::Duration;

mod error;
mod http;
mod options;
mod report;
mod session;

pub use error::{ClientError, Step};
pub use http::{normalize_fingerprint, pinned_tls_config};
pub use options::{AccessToken, ClientOptions, SessionOptions, default_json_data, random_user_id};
pub use report::{SessionFailure, SessionReport, Timings, format_duration, parse_duration};
pub use session::{Client, Connection, assign_backoff};

/// The scaling service's address in local development.
pub const DEFAULT_SCALING_URL: &str = "http://127.0.0.1:7730";
/// The commit hash that means "whatever the hosts run" (accepted in local development only).
pub const LOCAL_DEV_COMMIT: &str = "local_dev";
/// The host's json_transport port.
pub const JSON_TRANSPORT_PORT: u16 = 4678;
/// The mandelbox's base TCP port: its client leaving ends the session.
pub const SESSION_PORT: u16 = 32273;

/// Connecting to any of the services: they are local, so a few seconds means down.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole token or assign request (the assign is a few database round trips).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A whole json_transport request: the host answers once the mandelbox is up, which it bounds
/// by 90 s by default (docs/json-transport.md, "What happens"); 30 s of margin.
pub const JSON_TRANSPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// From the TCP connection to the mandelbox's first line.
pub const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// The mandelbox's first line is a short JSON object (plus the settings it echoes).
pub const MAX_FIRST_LINE_BYTES: u64 = 1024 * 1024;
/// Assign retries while no host has room: a booting host registers within seconds to minutes,
/// so start fast and settle at a poll every 5 s; ±20 % jitter keeps simulated clients apart.
pub const ASSIGN_RETRY_BASE: Duration = Duration::from_millis(250);
pub const ASSIGN_RETRY_CAP: Duration = Duration::from_secs(5);
pub const ASSIGN_RETRY_JITTER: f64 = 0.2;
/// The longest error body quoted in an error message.
const MAX_QUOTED_BODY: usize = 300;
/// The longest access token accepted (Auth0's are about 1 KiB; the host refuses over 16 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// `POST /mandelbox/assign`'s body and `200` answer: the scaling service's own types.
pub use edge::assign::{AssignRequest, Assignment, new_session_id};

/// `PUT /json_transport`'s `200` body: the host's own type.
pub use edge::json_transport::JsonTransportAnswer;

pub use edge::pin::{PinnedVerifier, crypto_provider, fingerprint_of};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::IpAddr;

    #[test]
    fn json_transport_answers_parse_into_ports_and_a_hidden_key() {
        let body = br#"{"result": {"port_32261": 40001, "port_32262": 40002, "port_32263": 40003,
            "port_32273": 40004, "private_key": "00112233", "aes_key": "00112233"}}"#;
        let answer = JsonTransportAnswer::parse(body).unwrap();
        assert_eq!(answer.port(SESSION_PORT), Some(40004));
        assert_eq!(answer.ports.len(), 4);
        assert_eq!(answer.private_key.as_deref(), Some("00112233"));
        assert!(!format!("{answer:?}").contains("00112233"));
        // Older hosts: `aes_key` only.
        let old = br#"{"result": {"port_32273": 5, "aes_key": "ff"}}"#;
        let answer = JsonTransportAnswer::parse(old).unwrap();
        assert_eq!(answer.private_key.as_deref(), Some("ff"));
        for bad in [
            &b"not json"[..],
            br#"{"ports": {}}"#,
            br#"{"result": {}}"#,
            br#"{"result": {"port_x": 1}}"#,
            br#"{"result": {"port_32273": 70000}}"#,
            br#"{"result": {"port_32273": "40004"}}"#,
            br#"{"result": {"port_32273": 0}}"#,
        ] {
            assert!(JsonTransportAnswer::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn assignments_parse_with_and_without_a_fingerprint() {
        let fp = "ab".repeat(32);
        let body = format!(
            r#"{{"ip": "127.0.0.2", "mandelbox_id": "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11", "tls_fingerprint": "{fp}"}}"#
        );
        let a: Assignment = serde_json::from_str(&body).unwrap();
        assert_eq!(a.ip, IpAddr::from([127, 0, 0, 2]));
        assert_eq!(a.tls_fingerprint.as_deref(), Some(fp.as_str()));
        let old: Assignment = serde_json::from_str(
            r#"{"ip": "10.0.0.1", "mandelbox_id": "6f1c2b0e-8a43-4c4e-9d2f-1f0a7c1e9b11"}"#,
        )
        .unwrap();
        assert_eq!(old.tls_fingerprint, None);
        assert!(serde_json::from_str::<Assignment>(r#"{"ip": "x", "mandelbox_id": "y"}"#).is_err());
    }

    #[test]
    fn assign_requests_have_the_scaling_services_shape() {
        let r = AssignRequest::new(
            vec!["us-east-1".into()],
            LOCAL_DEV_COMMIT.into(),
            Some("u@example.com".into()),
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["regions"], json!(["us-east-1"]));
        assert_eq!(v["client_commit_hash"], "local_dev");
        assert_eq!(v["user_email"], "u@example.com");
        assert!(v["session_id"].as_str().unwrap().parse::<u64>().unwrap() > 1_600_000_000_000);
        let r = AssignRequest::new(vec!["us-east-1".into()], "abc".into(), None);
        assert!(
            serde_json::to_value(&r)
                .unwrap()
                .get("user_email")
                .is_none()
        );
    }
}
