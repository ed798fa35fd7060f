//! Demand the fleet did not meet: the clients the assign path refused with
//! `NO_INSTANCE_AVAILABLE`, per region, so the controller can count them as demand
//! ([`crate::algorithm::Snapshot::waiting_clients`]).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A refused client counts as waiting this long after its last refusal. `whist-client`
/// retries a refusal at least every 5 s (its backoff cap), so one not heard from for a minute
/// has given up.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// The clients refused recently, by client key (user and session).
#[derive(Debug, Clone)]
pub struct RefusalLog {
    window: chrono::Duration,
    last_refused: HashMap<String, DateTime<Utc>>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(REFUSAL_WINDOW)
    }
}

impl RefusalLog {
    pub fn new(window: Duration) -> Self {
        Self {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            last_refused: HashMap::new(),
        }
    }

    /// `client` was refused at `at`.
    pub fn refused(&mut self, client: &str, at: DateTime<Utc>) {
        self.last_refused.insert(client.to_owned(), at);
    }

    /// `client` got a mandelbox: it no longer waits.
    pub fn served(&mut self, client: &str) {
        self.last_refused.remove(client);
    }

    /// Clients refused within the window before `now`.
    pub fn waiting(&mut self, now: DateTime<Utc>) -> u32 {
        let window = self.window;
        self.last_refused.retain(|_, t| now - *t <= window);
        u32::try_from(self.last_refused.len()).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_client_waits_until_served_or_silent_for_the_window() {
        let t0 = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut log = RefusalLog::default();
        log.refused("a", t0);
        log.refused("a", t0 + chrono::Duration::seconds(5));
        log.refused("b", t0);
        assert_eq!(log.waiting(t0 + chrono::Duration::seconds(10)), 2);
        log.served("b");
        assert_eq!(log.waiting(t0 + chrono::Duration::seconds(10)), 1);
        assert_eq!(log.waiting(t0 + chrono::Duration::seconds(66)), 0);
    }
}
