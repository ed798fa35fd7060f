//! What a call to the engine can fail with.

use std::fmt;
use std::time::Duration;

/// The engine operations, to name what failed and, in [`FakeRuntime::fail_next`], what to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Connect,
    Create,
    Start,
    Stop,
    Remove,
    Inspect,
    List,
    Events,
    FindImage,
    InspectImage,
    /// `docker info`: the engine's health probe and data root.
    Info,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Create => "create",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Remove => "remove",
            Self::Inspect => "inspect",
            Self::List => "list",
            Self::Events => "events",
            Self::FindImage => "find image",
            Self::InspectImage => "inspect image",
            Self::Info => "info",
        })
    }
}

/// Why a container operation failed. `target` names the container (id or name) or the image
/// pattern the operation was about.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec or argument was refused before anything reached the engine.
    #[error("{op} {target}: invalid request: {reason}")]
    Invalid {
        op: Op,
        target: String,
        reason: String,
    },
    /// The container (or, on create, the image) does not exist.
    #[error("{op} {target}: not found: {message}")]
    NotFound {
        op: Op,
        target: String,
        message: String,
    },
    /// The engine refused because of the object's state, e.g. the name is taken or the container
    /// is running and removal was not forced.
    #[error("{op} {target}: conflict: {message}")]
    Conflict {
        op: Op,
        target: String,
        message: String,
    },
    /// Any other error answer from the engine (HTTP status and its message).
    #[error("{op} {target}: the Docker Engine answered {status}: {message}")]
    Engine {
        op: Op,
        target: String,
        status: u16,
        message: String,
    },
    /// No answer within the deadline.
    #[error("{op} {target}: no answer from the Docker Engine within {timeout:?}")]
    Timeout {
        op: Op,
        target: String,
        timeout: Duration,
    },
    /// The engine could not be reached or the connection broke (including a cut event stream).
    #[error("{op} {target}: cannot talk to the Docker Engine at {socket}: {message}")]
    Transport {
        op: Op,
        target: String,
        socket: String,
        message: String,
    },
    /// The engine answered something we could not understand.
    #[error("{op} {target}: unexpected answer from the Docker Engine: {message}")]
    Protocol {
        op: Op,
        target: String,
        message: String,
    },
}

impl RuntimeError {
    /// The operation that failed.
    pub fn op(&self) -> Op {
        match self {
            Self::Invalid { op, .. }
            | Self::NotFound { op, .. }
            | Self::Conflict { op, .. }
            | Self::Engine { op, .. }
            | Self::Timeout { op, .. }
            | Self::Transport { op, .. }
            | Self::Protocol { op, .. } => *op,
        }
    }

    /// Whether trying the same call again later can succeed (the engine was slow or away),
    /// as opposed to a refusal that will repeat.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
            || matches!(self, Self::Engine { status, .. } if *status >= 500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::API_CALL_TIMEOUT;

    #[test]
    fn transient_errors_are_the_ones_worth_retrying() {
        let timeout = RuntimeError::Timeout {
            op: Op::Start,
            target: "x".into(),
            timeout: API_CALL_TIMEOUT,
        };
        let conflict = RuntimeError::Conflict {
            op: Op::Create,
            target: "x".into(),
            message: "name in use".into(),
        };
        let server = RuntimeError::Engine {
            op: Op::Start,
            target: "x".into(),
            status: 500,
            message: "oops".into(),
        };
        assert!(timeout.is_transient() && server.is_transient() && !conflict.is_transient());
        assert_eq!(conflict.op(), Op::Create);
    }
}
