//! What the whist services and devstack share at their edges, so each is written once:
//!
//! - [`pin`]: the pinned-certificate TLS verifier and the SHA-256 fingerprint the hosts publish
//!   (the scaling service's forwarder, whist-client and the host's tests all reach a host by
//!   its fingerprint, never by a CA);
//! - [`auth`]: the one JWKS verifier for Auth0 access tokens (scheduled refresh, size limits,
//!   `use`/`alg` checks, rate-limited refetch on an unknown `kid`) and the bearer-token parser;
//! - [`limit`]: per-client rate limits and connection caps in bounded memory;
//! - [`body`] and [`cors`]: request-body limits and the CORS answers of the two JSON edges
//!   (`PUT /json_transport` on the host and through the scaling service);
//! - [`assign`] and [`json_transport`]: the wire types of `POST /mandelbox/assign` and of
//!   `PUT /json_transport`'s answer, for the servers and their clients;
//! - [`error_chain`]: an error and its causes on one line, for logs and JSON error bodies.
//!
//! It links no AWS SDK, Docker client or database client: both services and devstack depend on
//! it, so it must stay cheap to build.

pub mod assign;
pub mod auth;
pub mod backoff;
pub mod body;
pub mod cors;
pub mod json_transport;
pub mod limit;
pub mod pin;

/// `error: cause: cause's cause`, each cause once: many errors already repeat their source in
/// their own message (reqwest, hyper), and a log line that says everything twice hides the one
/// part that differs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn error_chain_names_each_cause_once() {
        assert_eq!(error_chain(&Outer(Middle(Inner))), "outer: middle: inner");
        assert_eq!(error_chain(&Inner), "inner");
    }
}
