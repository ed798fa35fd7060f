//! The Hasura-compatible endpoint against a real PostgreSQL (`TestStack`): the generated schema,
//! queries, mutations and their transaction, Hasura's error envelope, and live queries over both
//! WebSocket subprotocols. Everything waits on actual messages with bounded timeouts.

// Test code: a failed expectation is a panic (helpers outside `#[test]` functions included).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "hasura/errors.rs"]
mod errors;
#[path = "hasura/functions.rs"]
mod functions;
#[path = "hasura/live.rs"]
mod live;
#[path = "hasura/mutations.rs"]
mod mutations;
#[path = "hasura/queries.rs"]
mod queries;
#[path = "hasura/roles.rs"]
mod roles;
#[path = "hasura/schema.rs"]
mod schema;
#[path = "hasura/support.rs"]
mod support;
