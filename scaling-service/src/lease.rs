//! High availability: replicas of the scaling service share one lease row in the database and
//! only its live holder acts. [`LeaseKeeper`] takes the lease when it is free, renews it every
//! `renew_every`, and takes it over once another holder lets it lapse; it publishes the lease's
//! [`Fence`] (name and generation) while this replica leads, `None` otherwise, on a `watch`
//! channel that the region controllers read before every step and that their background tasks
//! watch: a task of a lost lease is cancelled.
//!
//! Expiry is measured on the database's clock (migration 0006 computes `expires_at` as now() +
//! ttl and refuses a takeover while the lease is live), so the replicas' clocks do not matter.
//! A replica stops leading once `ttl - renew_every` has passed since it *sent* its last
//! successful renewal (the database's expiry is at least `ttl` after that), and a renewal that
//! hangs past that point counts as failed. A leader that is paused (its keeper cannot run) keeps
//! believing it leads: every write it makes is fenced by its generation
//! ([`dbclient::fenced`]), so none lands once another replica has taken the lease over.

use std::time::Duration;

use dbclient::DbClient;
use dbclient::fenced::Fence;
use tokio::sync::watch;
use tokio::time::Instant;
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
    leader: watch::Sender<Option<Fence>>,
}

impl LeaseKeeper {
    pub fn new(db: DbClient, settings: LeaseSettings) -> (Self, watch::Receiver<Option<Fence>>) {
        let (leader, rx) = watch::channel(None);
        (
            Self {
                db,
                settings,
                leader,
            },
            rx,
        )
    }

    /// One attempt: takes or renews the lease. Its fence if this replica leads now.
    pub async fn try_acquire(&self) -> Result<Option<Fence>, dbclient::DbError> {
        let generation = self
            .db
            .acquire_lease(
                &self.settings.name,
                &self.settings.holder,
                self.settings.ttl,
            )
            .await?;
        Ok(generation.map(|generation| Fence {
            name: self.settings.name.clone(),
            generation,
        }))
    }

    /// Says who leads now; `stepping_down`: this replica is shutting down (no warning then).
    fn publish(&self, fence: Option<Fence>, stepping_down: bool) {
        let holder = &self.settings.holder;
        self.leader.send_if_modified(|current| {
            if *current == fence {
                return false;
            }
            match &fence {
                Some(f) => tracing::info!(%holder, lease.generation = f.generation, "leading"),
                None if stepping_down => tracing::info!(%holder, "stepping down: shutting down"),
                None => tracing::warn!(%holder, "not leading"),
            }
            *current = fence;
            true
        });
    }

    /// Competes for the lease until `shutdown`; then gives it up if held.
    pub async fn run(self, shutdown: CancellationToken) {
        let safe_for = self.settings.ttl.saturating_sub(self.settings.renew_every);
        // While leading: the instant this replica's lease may be about to lapse.
        let mut leads_until: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            // A renewal that hangs past the safe point is a failed one.
            let deadline = leads_until.unwrap_or(sent + self.settings.ttl);
            let attempt = tokio::time::timeout_at(deadline, self.try_acquire()).await;
            match attempt {
                Ok(Ok(fence)) => {
                    leads_until = fence.as_ref().map(|_| sent + safe_for);
                    self.publish(fence, false);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "lease renewal failed");
                }
                Err(_) => tracing::warn!("lease renewal did not answer in time"),
            }
            if leads_until.is_some_and(|t| Instant::now() >= t) {
                leads_until = None;
                self.publish(None, false);
            }
            let next = match leads_until {
                Some(t) => t.min(Instant::now() + self.settings.renew_every),
                None => Instant::now() + self.settings.renew_every,
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        let was_leading = self.leader.borrow().is_some();
        self.publish(None, true);
        if was_leading {
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

/// Resolves once `leader` no longer says `fence` (the lease was lost, or taken again under
/// another generation); never without a `leader` (a controller that runs alone).
pub async fn lost(leader: Option<watch::Receiver<Option<Fence>>>, fence: Option<Fence>) {
    let Some(mut leader) = leader else {
        return std::future::pending().await;
    };
    loop {
        if *leader.borrow_and_update() != fence {
            return;
        }
        if leader.changed().await.is_err() {
            // The keeper is gone: it published `None` before it went, or it was killed with
            // its process.
            return;
        }
    }
}
