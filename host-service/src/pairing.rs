//! Pairing a client's json_transport request with its mandelbox's spin-up.
//!
//! The two sides arrive in either order: the client's request (through the HTTPS endpoint) may
//! come before or after the allocation event that starts the spin-up. Each mandelbox has one
//! slot. The client side [`Pairing::submit`]s and waits for the answer; the mandelbox side sets
//! the slot's owner when it claims the allocation, waits for the request, and answers once the
//! mandelbox is ready (or failed).
//!
//! What the original got wrong and this does not:
//! - a second request for the same mandelbox crashed the process (send on a closed channel):
//!   here an identical request gets the same answer and a different one a [`PairingError::Conflict`];
//! - a failed spin-up never answered: here every waiter gets the failure;
//! - the token's user was never compared with the mandelbox's: here a request from another user
//!   is refused ([`PairingError::Forbidden`]) and does not block the owner's own request;
//! - slots of mandelboxes that never started leaked: [`Pairing::sweep`] drops them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dbclient::types::{MandelboxId, UserId};
use tokio::sync::watch;

/// What the client sends, already authenticated and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRequest {
    pub mandelbox_id: MandelboxId,
    /// The client's settings, a JSON document (written to `config.json`).
    pub json_data: String,
    /// The user the client's token names; `None` in local development (no authentication).
    pub user_id: Option<UserId>,
    /// The profile's token and the initial browser data (reference §3.10).
    pub profile: crate::profile::lifecycle::ProfileRequest,
}

/// What the client gets once its mandelbox is ready.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientAnswer {
    /// Host port for each published container port (e.g. 32262 → 40001).
    pub host_ports: BTreeMap<u16, u16>,
    /// The key the protocol encrypts the stream with (hex).
    pub private_key: String,
}

impl std::fmt::Debug for ClientAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAnswer")
            .field("host_ports", &self.host_ports)
            .field("private_key", &logger::REDACTED)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    #[error("another request with different data was already made for mandelbox {0}")]
    Conflict(MandelboxId),
    #[error("mandelbox {0} belongs to another user")]
    Forbidden(MandelboxId),
    #[error("mandelbox {mandelbox_id} was not ready within {waited:?}")]
    Timeout {
        mandelbox_id: MandelboxId,
        waited: Duration,
    },
    #[error("mandelbox {mandelbox_id} failed to start: {reason}")]
    SpinUpFailed {
        mandelbox_id: MandelboxId,
        reason: String,
    },
    #[error("mandelbox {0} is gone")]
    Gone(MandelboxId),
}

type Answer = Result<ClientAnswer, PairingError>;

/// Who may pair with a mandelbox: its row's user, or anyone in local development.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    User(UserId),
    Anyone,
}

impl Owner {
    /// The owner of a row with `user`: that user, or anyone in local development (or when the
    /// row names nobody).
    pub fn of(user: Option<&UserId>, local: bool) -> Self {
        match (user, local) {
            (Some(user), false) => Self::User(user.clone()),
            _ => Self::Anyone,
        }
    }

    fn permits(&self, user: Option<&UserId>) -> bool {
        match self {
            Self::Anyone => true,
            Self::User(owner) => user == Some(owner),
        }
    }
}

#[derive(Debug)]
struct Slot {
    owner: Option<Owner>,
    accepted: Option<ClientRequest>,
    request: watch::Sender<Option<ClientRequest>>,
    answer: watch::Sender<Option<Answer>>,
    touched: Instant,
}

impl Slot {
    fn new() -> Self {
        Self {
            owner: None,
            accepted: None,
            request: watch::channel(None).0,
            answer: watch::channel(None).0,
            touched: Instant::now(),
        }
    }
}

/// The slots of every mandelbox on this host.
#[derive(Debug, Default)]
pub struct Pairing {
    slots: Mutex<HashMap<MandelboxId, Slot>>,
}

impl Pairing {
    pub fn new() -> Self {
        Self::default()
    }

    /// The slots; a panic elsewhere while holding them leaves them usable (every change to a
    /// slot is one assignment).
    fn lock_slots(&self) -> MutexGuard<'_, HashMap<MandelboxId, Slot>> {
        match self.slots.lock() {
            Ok(slots) => slots,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn with_slot<R>(&self, id: MandelboxId, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut slots = self.lock_slots();
        let slot = slots.entry(id).or_insert_with(Slot::new);
        slot.touched = Instant::now();
        f(slot)
    }

    /// The client side: hands the request to the mandelbox and waits up to `wait` for its answer.
    pub async fn submit(&self, request: ClientRequest, wait: Duration) -> Answer {
        let id = request.mandelbox_id;
        let answer = self.with_slot(id, |slot| {
            if let Some(owner) = &slot.owner
                && !owner.permits(request.user_id.as_ref())
            {
                return Err(PairingError::Forbidden(id));
            }
            match &slot.accepted {
                Some(existing) if *existing == request => Ok(slot.answer.subscribe()),
                Some(_) => Err(PairingError::Conflict(id)),
                None => {
                    slot.accepted = Some(request.clone());
                    slot.request.send_replace(Some(request));
                    Ok(slot.answer.subscribe())
                }
            }
        });
        let mut answer = answer?;
        match tokio::time::timeout(wait, answer.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone().unwrap_or(Err(PairingError::Gone(id))),
            Ok(Err(_closed)) => Err(PairingError::Gone(id)),
            Err(_elapsed) => Err(PairingError::Timeout {
                mandelbox_id: id,
                waited: wait,
            }),
        }
    }

    /// The mandelbox side, once it owns the allocation: says whose the mandelbox is. A request
    /// already waiting from someone else is refused and cleared, so the owner's can take its place.
    pub fn set_owner(&self, id: MandelboxId, owner: Owner) {
        self.with_slot(id, |slot| {
            if let Some(accepted) = &slot.accepted
                && !owner.permits(accepted.user_id.as_ref())
            {
                slot.answer
                    .send_replace(Some(Err(PairingError::Forbidden(id))));
                slot.answer = watch::channel(None).0;
                slot.accepted = None;
                slot.request.send_replace(None);
            }
            slot.owner = Some(owner);
        });
    }

    /// The user the mandelbox's own task said the mandelbox is for (from the row it claimed),
    /// if it said so: `None` before that, and for a mandelbox anyone may pair with.
    pub fn owning_user(&self, id: MandelboxId) -> Option<UserId> {
        let slots = self.lock_slots();
        match slots.get(&id)?.owner.as_ref()? {
            Owner::User(user) => Some(user.clone()),
            Owner::Anyone => None,
        }
    }

    /// The mandelbox side: waits up to `wait` for the client's request.
    pub async fn wait_for_request(
        &self,
        id: MandelboxId,
        wait: Duration,
    ) -> Result<ClientRequest, PairingError> {
        let mut request = self.with_slot(id, |slot| slot.request.subscribe());
        match tokio::time::timeout(wait, request.wait_for(Option::is_some)).await {
            Ok(Ok(value)) => value.clone().ok_or(PairingError::Gone(id)),
            Ok(Err(_closed)) => Err(PairingError::Gone(id)),
            Err(_elapsed) => Err(PairingError::Timeout {
                mandelbox_id: id,
                waited: wait,
            }),
        }
    }

    /// The mandelbox side: answers every waiting (and every later identical) request.
    pub fn answer(&self, id: MandelboxId, answer: Answer) {
        self.with_slot(id, |slot| {
            slot.answer.send_replace(Some(answer));
        });
    }

    /// Drops the slot when its mandelbox is torn down; anyone still waiting gets `Gone`.
    pub fn remove(&self, id: MandelboxId) {
        let mut slots = self.lock_slots();
        if let Some(slot) = slots.remove(&id) {
            // Waiters of an unanswered slot learn that it is gone rather than timing out.
            if slot.answer.borrow().is_none() {
                slot.answer.send_replace(Some(Err(PairingError::Gone(id))));
            }
        }
    }

    /// Drops slots whose mandelbox never showed up (no owner) and that nobody touched for
    /// `max_idle`. Returns how many were dropped.
    pub fn sweep(&self, max_idle: Duration) -> usize {
        let mut slots = self.lock_slots();
        let before = slots.len();
        slots.retain(|_, slot| slot.owner.is_some() || slot.touched.elapsed() < max_idle);
        before - slots.len()
    }

    pub fn len(&self) -> usize {
        self.lock_slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn request(id: MandelboxId, user: &str, data: &str) -> ClientRequest {
        ClientRequest {
            mandelbox_id: id,
            json_data: data.to_owned(),
            user_id: Some(UserId::new(user).unwrap()),
            profile: Default::default(),
        }
    }

    fn ready() -> ClientAnswer {
        ClientAnswer {
            host_ports: BTreeMap::from([(32262, 40001)]),
            private_key: "00ff".into(),
        }
    }

    const WAIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn request_before_allocation_is_answered() {
        let pairing = Arc::new(Pairing::new());
        let id = MandelboxId::random();
        let client = tokio::spawn({
            let p = pairing.clone();
            async move { p.submit(request(id, "u1", "{}"), WAIT).await }
        });
        pairing.set_owner(id, Owner::User(UserId::new("u1").unwrap()));
        let got = pairing.wait_for_request(id, WAIT).await.unwrap();
        assert_eq!(got.json_data, "{}");
        pairing.answer(id, Ok(ready()));
        assert_eq!(client.await.unwrap(), Ok(ready()));
    }

    #[test]
    fn the_owning_user_is_known_once_the_mandelbox_says_so() {
        let pairing = Pairing::new();
        let (id, open) = (MandelboxId::random(), MandelboxId::random());
        assert_eq!(pairing.owning_user(id), None);
        // Asking does not make a slot.
        assert!(pairing.is_empty());
        pairing.set_owner(id, Owner::User(UserId::new("alice").unwrap()));
        pairing.set_owner(open, Owner::Anyone);
        assert_eq!(pairing.owning_user(id), Some(UserId::new("alice").unwrap()));
        assert_eq!(pairing.owning_user(open), None);
        pairing.remove(id);
        assert_eq!(pairing.owning_user(id), None);
    }

    #[tokio::test(start_paused = true)]
    async fn request_after_allocation_is_answered_and_repeat_gets_same_answer() {
        let pairing = Arc::new(Pairing::new());
        let id = MandelboxId::random();
        pairing.set_owner(id, Owner::Anyone);
        let mandelbox = tokio::spawn({
            let p = pairing.clone();
            async move {
                let r = p.wait_for_request(id, WAIT).await.unwrap();
                p.answer(id, Ok(ready()));
                r
            }
        });
        assert_eq!(
            pairing.submit(request(id, "u1", "{}"), WAIT).await,
            Ok(ready())
        );
        mandelbox.await.unwrap();
        assert_eq!(
            pairing.submit(request(id, "u1", "{}"), WAIT).await,
            Ok(ready())
        );
        assert_eq!(
            pairing.submit(request(id, "u1", "{\"x\":1}"), WAIT).await,
            Err(PairingError::Conflict(id))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn another_users_request_is_refused_and_does_not_block_the_owner() {
        let pairing = Arc::new(Pairing::new());
        let id = MandelboxId::random();
        let intruder = tokio::spawn({
            let p = pairing.clone();
            async move { p.submit(request(id, "mallory", "{}"), WAIT).await }
        });
        tokio::task::yield_now().await;
        pairing.set_owner(id, Owner::User(UserId::new("alice").unwrap()));
        assert_eq!(intruder.await.unwrap(), Err(PairingError::Forbidden(id)));
        let owner = tokio::spawn({
            let p = pairing.clone();
            async move { p.submit(request(id, "alice", "{\"a\":1}"), WAIT).await }
        });
        let got = pairing.wait_for_request(id, WAIT).await.unwrap();
        assert_eq!(got.user_id, Some(UserId::new("alice").unwrap()));
        pairing.answer(id, Ok(ready()));
        assert_eq!(owner.await.unwrap(), Ok(ready()));
        assert_eq!(
            pairing
                .submit(request(id, "mallory", "{\"a\":1}"), WAIT)
                .await,
            Err(PairingError::Forbidden(id))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failure_reaches_the_waiting_client() {
        let pairing = Arc::new(Pairing::new());
        let id = MandelboxId::random();
        pairing.set_owner(id, Owner::Anyone);
        let client = tokio::spawn({
            let p = pairing.clone();
            async move { p.submit(request(id, "u", "{}"), WAIT).await }
        });
        pairing.wait_for_request(id, WAIT).await.unwrap();
        let failure = PairingError::SpinUpFailed {
            mandelbox_id: id,
            reason: "container exited".into(),
        };
        pairing.answer(id, Err(failure.clone()));
        assert_eq!(client.await.unwrap(), Err(failure));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_time_out_and_removed_slots_answer_gone() {
        let pairing = Arc::new(Pairing::new());
        let id = MandelboxId::random();
        assert!(matches!(
            pairing.wait_for_request(id, Duration::from_secs(5)).await,
            Err(PairingError::Timeout { .. })
        ));
        let client = tokio::spawn({
            let p = pairing.clone();
            async move { p.submit(request(id, "u", "{}"), WAIT).await }
        });
        tokio::task::yield_now().await;
        pairing.remove(id);
        assert_eq!(client.await.unwrap(), Err(PairingError::Gone(id)));
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_drops_only_stale_unowned_slots() {
        let pairing = Pairing::new();
        let (stale, owned) = (MandelboxId::random(), MandelboxId::random());
        let _ = pairing
            .submit(request(stale, "u", "{}"), Duration::from_millis(1))
            .await;
        pairing.set_owner(owned, Owner::Anyone);
        tokio::time::advance(Duration::from_secs(600)).await;
        // Instant::now() is the real clock; a zero idle limit makes every unowned slot stale.
        assert_eq!(pairing.sweep(Duration::ZERO), 1);
        assert_eq!(pairing.len(), 1);
    }
}
