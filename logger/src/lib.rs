//! Logging for the whist services (in progress): see `secret` for values that never print.

mod secret;

pub use secret::{REDACTED, Secret};
