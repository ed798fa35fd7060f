//! devstack: the local whist stack, for development and tests. Never linked into a service.
//!
//! It brings up, on free loopback ports:
//! - a throwaway PostgreSQL cluster with the `whist` migrations applied ([`postgres`]);
//! - a Hasura-compatible GraphQL endpoint over it ([`hasura`]): queries and mutations over HTTP,
//!   live-query subscriptions over WebSocket (`graphql-transport-ws` and legacy `graphql-ws`);
//! - moto's server as the EC2 and S3 API ([`moto`]);
//! - a fake IMDSv2 with a settable identity per host process ([`imds`]);
//! - a fake token issuer (Auth0's JWKS and RS256 tokens with chosen claims) for tests of the
//!   host's json_transport endpoint ([`jwks`]).
//!
//! On top of it, [`system`] runs the whole system on this machine (`make run`): moto prepared
//! as the scaling service's account, the scaling service, and the [`fleet`] emulator that boots
//! a host service for every instance launched into moto. [`invariants`] checks that the
//! database, Docker, the hosts and moto agree (the end-to-end and chaos tests).
//!
//! And [`client`], a client simulator (`whist-client`): token, assign, pinned json_transport
//! and the connection to the mandelbox, as Whist's client app does them, timed.

pub mod aws_identity;
pub mod chaos_report;
pub mod client;
pub mod ec2_faults;
pub mod fleet;
pub mod hasura;
pub mod imds;
pub mod invariants;
pub mod jwks;
pub mod moto;
pub mod postgres;
pub mod stack;
pub mod system;
pub mod testing;
