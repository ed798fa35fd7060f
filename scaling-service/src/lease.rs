//! High availability: replicas of the scaling service share one lease row in the database and
//! only its live holder acts. [`LeaseKeeper`] takes the lease when it is free, renews it every
//! `renew_every`, and takes it over once another holder lets it lapse; it publishes whether this
//! replica leads on a `watch` channel that the region controllers check before every step.
//!
//! A replica stops leading as soon as a renewal has not succeeded for `ttl - renew_every` (its
//! lease may be about to lapse), so two replicas never both believe they lead as long as their
//! clocks agree to within `renew_every`. The expiry is written with this replica's clock.

use std::time::Duration;

use chrono::Utc;
use dbclient::DbClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The lease every scaling-service replica of a deployment competes for.
pub const LEASE_NAME: &str = "scaling-service";

/// How leadership is kept.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    /// This replica's name (unique per process).
    pub holder: String,
    /// How long a taken lease lasts without renewal.
    pub ttl: Duration,
    /// How often the holder renews (and a follower tries to take over).
    pub renew_every: Duration,
}

impl LeaseSettings {
    /// 15 s leases renewed every 5 s: a dead leader is replaced within 20 s, and two missed
    /// renewals in a row are survived.
    pub fn new(holder: impl Into<String>) -> Self {
        Self {
            name: LEASE_NAME.to_owned(),
            holder: holder.into(),
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// Keeps (or waits for) the lease.
#[derive(Debug)]
pub struct LeaseKeeper {
    db: DbClient,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
}

impl LeaseKeeper {
    pub fn new(db: DbClient, settings: LeaseSettings) -> (Self, watch::Receiver<bool>) {
        let (leader, rx) = watch::channel(false);
        (
            Self {
                db,
                settings,
                leader,
            },
            rx,
        )
    }

    /// One attempt: takes or renews the lease. Whether this replica leads now.
    pub async fn try_acquire(&self) -> Result<bool, dbclient::DbError> {
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.settings.ttl).unwrap_or_default();
        self.db
            .acquire_lease(&self.settings.name, &self.settings.holder, now, now + ttl)
            .await
    }

    /// Competes for the lease until `shutdown`; then gives it up if held.
    pub async fn run(self, shutdown: CancellationToken) {
        let safe_for = self.settings.ttl.saturating_sub(self.settings.renew_every);
        let mut last_success = tokio::time::Instant::now();
        loop {
            match self.try_acquire().await {
                Ok(held) => {
                    last_success = tokio::time::Instant::now();
                    if self.leader.send_replace(held) != held {
                        tracing::info!(holder = %self.settings.holder, leader = held, "leadership changed");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "lease renewal failed");
                    if last_success.elapsed() >= safe_for && self.leader.send_replace(false) {
                        tracing::warn!(holder = %self.settings.holder, "leadership lost: the lease could not be renewed");
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(self.settings.renew_every) => {}
            }
        }
        if self.leader.send_replace(false) {
            match self
                .db
                .release_lease(&self.settings.name, &self.settings.holder)
                .await
            {
                Ok(_) => tracing::info!("lease released"),
                Err(error) => tracing::warn!(%error, "could not release the lease; it lapses"),
            }
        }
    }
}
