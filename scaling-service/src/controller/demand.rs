//! Demand as the assign path reports it, per region: the clients it refused with
//! `NO_INSTANCE_AVAILABLE`, so the controller can count them as demand
//! ([`crate::algorithm::Snapshot::waiting_clients`]), and how many clients have come at all
//! ([`crate::algorithm::Snapshot::arrivals`]), from which an algorithm learns the region's
//! arrival rate and daily profile.

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
    /// Clients seen: each refused client once while it waits, each served one that was not.
    arrivals: u64,
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
            arrivals: 0,
        }
    }

    /// `client` was refused at `at`.
    pub fn refused(&mut self, client: &str, at: DateTime<Utc>) {
        if self.last_refused.insert(client.to_owned(), at).is_none() {
            self.arrivals += 1;
        }
    }

    /// `client` got a mandelbox: it no longer waits.
    pub fn served(&mut self, client: &str) {
        if self.last_refused.remove(client).is_none() {
            self.arrivals += 1;
        }
    }

    /// Clients that have asked so far: a refused client counts once however often it
    /// retries (until it falls out of the window), a served one once.
    pub fn arrivals(&self) -> u64 {
        self.arrivals
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

    #[test]
    fn each_client_arrives_once_however_often_it_retries() {
        let t0 = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut log = RefusalLog::default();
        for s in 0..5 {
            log.refused("a", t0 + chrono::Duration::seconds(s));
        }
        log.served("a");
        log.served("b");
        log.served("c");
        assert_eq!(log.arrivals(), 3);
    }
}
