//! A session's steps, and why one failed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::report::format_duration;

/// A step of a session, as reports and errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Token,
    Assign,
    JsonTransport,
    Connect,
    Hold,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Token => "token",
            Step::Assign => "assign",
            Step::JsonTransport => "json_transport",
            Step::Connect => "connect",
            Step::Hold => "hold",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step failed. Never carries the access token.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error(
        "token: no devstack control URL to get a token from: set WHIST_DEVSTACK_CONTROL_URL \
         (source .devstack/env) or pass --control-url, or pass --token"
    )]
    NoControlUrl,
    /// The request did not get an answer: refused connection, timeout, TLS failure (a
    /// certificate that does not match the pin is one).
    #[error("{step}: {url}: {detail}")]
    Request {
        step: Step,
        url: String,
        detail: String,
    },
    /// The server answered with an error status.
    #[error("{step}: {url} answered {status}{}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        step: Step,
        url: String,
        status: u16,
        /// The server's error code (`NO_INSTANCE_AVAILABLE`, `unauthorized`, ...).
        code: Option<String>,
        message: Option<String>,
    },
    /// A success status with a body that is not what the contract says.
    #[error("{step}: {url}: unexpected answer: {detail}")]
    BadAnswer {
        step: Step,
        url: String,
        detail: String,
    },
    #[error(
        "assign: still NO_INSTANCE_AVAILABLE after waiting {} ({attempts} attempts)",
        format_duration(*waited)
    )]
    NoCapacity { waited: Duration, attempts: u32 },
    #[error(
        "json_transport: the assignment of mandelbox {mandelbox_id} has no tls_fingerprint to \
         pin (a scaling service older than this client?)"
    )]
    NoFingerprint { mandelbox_id: uuid::Uuid },
    #[error("{step}: {addr}: {detail}")]
    Io {
        step: Step,
        addr: SocketAddr,
        detail: String,
    },
    #[error("{step}: {addr}: no answer within {}", format_duration(*after))]
    Timeout {
        step: Step,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("{step}: {addr}: the mandelbox closed the connection after {}", format_duration(*after))]
    ClosedByPeer {
        step: Step,
        addr: SocketAddr,
        after: Duration,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl ClientError {
    /// The step that failed, where the error names one.
    pub fn step(&self) -> Option<Step> {
        match self {
            ClientError::Request { step, .. }
            | ClientError::Refused { step, .. }
            | ClientError::BadAnswer { step, .. }
            | ClientError::Io { step, .. }
            | ClientError::Timeout { step, .. }
            | ClientError::ClosedByPeer { step, .. } => Some(*step),
            ClientError::NoControlUrl => Some(Step::Token),
            ClientError::NoCapacity { .. } => Some(Step::Assign),
            ClientError::NoFingerprint { .. } => Some(Step::JsonTransport),
            ClientError::Invalid { .. } | ClientError::Tls(_) => None,
        }
    }

    /// The server's error code of a refusal (`NO_INSTANCE_AVAILABLE`, `unauthorized`, ...).
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => code.as_deref(),
            ClientError::NoCapacity { .. } => Some("NO_INSTANCE_AVAILABLE"),
            _ => None,
        }
    }
}
