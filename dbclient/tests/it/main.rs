//! `dbclient` against a real PostgreSQL behind the Hasura stand-in (`devstack::testing`): every
//! `DbClient` operation, the guarded transitions under concurrency, the typed error mapping, and
//! live-query subscriptions including recovery from an endpoint restart. Nothing sleeps to
//! synchronise: tests wait on actual results with bounded timeouts.

// A test binary: failing loudly is the point (clippy.toml only exempts `#[test]` functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod assign;
mod errors;
mod host_role;
mod images;
mod instances;
mod launches;
mod mandelboxes;
mod release;
mod subscriptions;
mod support;
