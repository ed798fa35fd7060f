//! [`FakeRuntime`]: an in-memory [`ContainerRuntime`] for the mandelbox lifecycle's tests.
//!
//! Stateful like the engine (containers move through created → running → exited, names are
//! unique, images must exist, events are delivered to every open stream) and it answers the way
//! [`DockerRuntime`](super::DockerRuntime) does on the real engine (`tests/docker.rs` checks the
//! same behaviour there): removing or stopping a missing container succeeds, inspecting one
//! answers `None`, a running container is removed only with `force`. Tests drive what the
//! container itself would do ([`FakeRuntime::exit`], [`FakeRuntime::oom_kill`]) and inject the
//! next error of any operation ([`FakeRuntime::fail_next`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;

use super::{
    ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerState, ContainerStatus, LABEL_MANAGED, LABEL_MANAGED_VALUE, MandelboxContainer, Op,
    RuntimeError, image_matches_app, validate_app_pattern,
};

/// Exit code of a process ended by SIGTERM (128 + 15), what `docker stop` gives a container
/// whose init forwards the signal.
pub const SIGTERM_EXIT_CODE: i64 = 143;
/// Exit code of a process ended by SIGKILL (128 + 9): forced removal and the OOM killer.
pub const SIGKILL_EXIT_CODE: i64 = 137;

type EventSender = mpsc::UnboundedSender<Result<ContainerEvent, RuntimeError>>;

/// One container the fake holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContainer {
    pub id: ContainerId,
    /// The spec it was created from.
    pub spec: ContainerSpec,
    /// Its labels as the engine stores them (the spec's plus [`LABEL_MANAGED`]).
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
}

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<ContainerId, FakeContainer>,
    created_count: u64,
    /// Image tags, oldest first.
    images: Vec<String>,
    /// How many times each tag was given a new image ([`FakeRuntime::replace_image`]).
    image_generations: HashMap<String, u32>,
    failures: HashMap<Op, VecDeque<RuntimeError>>,
    /// What [`ContainerRuntime::data_root`] answers.
    data_root: Option<std::path::PathBuf>,
    calls: HashMap<Op, usize>,
    // Unbounded: a test fake, and a slow test must not make the fake drop events. The real
    // engine's stream is bounded by the socket.
    subscribers: Vec<EventSender>,
}

impl State {
    /// Counts the call and hands out the injected failure, if any.
    fn begin(&mut self, op: Op) -> Result<(), RuntimeError> {
        *self.calls.entry(op).or_default() += 1;
        match self.failures.get_mut(&op).and_then(VecDeque::pop_front) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn emit(&mut self, id: &ContainerId, kind: ContainerEventKind) {
        let Some(container) = self.containers.get(id) else {
            return;
        };
        let event = ContainerEvent {
            id: id.clone(),
            kind,
            name: Some(container.spec.name.clone()),
            labels: container.labels.clone(),
        };
        self.subscribers
            .retain(|subscriber| subscriber.send(Ok(event.clone())).is_ok());
    }

    fn find(&self, id: &ContainerId) -> Option<ContainerId> {
        if self.containers.contains_key(id) {
            return Some(id.clone());
        }
        // Like the engine, accept the name as well as the id.
        self.containers
            .values()
            .find(|c| c.spec.name == id.as_str())
            .map(|c| c.id.clone())
    }

    fn set_exited(&mut self, id: &ContainerId, exit_code: i64, oom_killed: bool) {
        if let Some(container) = self.containers.get_mut(id) {
            container.state = ContainerState {
                status: ContainerStatus::Exited,
                running: false,
                exit_code: Some(exit_code),
                oom_killed,
            };
        }
        self.emit(
            id,
            ContainerEventKind::Die {
                exit_code: Some(exit_code),
            },
        );
    }
}

/// An in-memory [`ContainerRuntime`]. Cloning shares the state.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

impl FakeRuntime {
    /// An engine with no containers and no images.
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine with these local images (oldest first).
    pub fn with_images<I, S>(tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let fake = Self::new();
        for tag in tags {
            fake.add_image(tag);
        }
        fake
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not turn every later call into a second panic.
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Adds a local image tag (the newest so far).
    pub fn add_image(&self, tag: impl Into<String>) {
        self.lock().images.push(tag.into());
    }

    /// Points `tag` at a new image (as `docker build -t` or a pull of a newer image does): its
    /// [`image_id`](ContainerRuntime::image_id) changes.
    pub fn replace_image(&self, tag: &str) {
        *self
            .lock()
            .image_generations
            .entry(tag.to_owned())
            .or_default() += 1;
    }

    /// Makes the next call of `op` fail with `error` (queued: several calls fail in order).
    /// For [`Op::Events`], the next stream yields the error and ends.
    pub fn fail_next(&self, op: Op, error: RuntimeError) {
        self.lock().failures.entry(op).or_default().push_back(error);
    }

    /// How many times `op` was called (failed calls included).
    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// The container with this id or name.
    pub fn container(&self, id: &ContainerId) -> Option<FakeContainer> {
        let state = self.lock();
        let id = state.find(id)?;
        state.containers.get(&id).cloned()
    }

    /// Every container, in id order.
    pub fn containers(&self) -> Vec<FakeContainer> {
        self.lock().containers.values().cloned().collect()
    }

    /// The container's process exits with `exit_code` (a `Die` event), as when the user leaves.
    /// Returns false when it was not running.
    pub fn exit(&self, id: &ContainerId, exit_code: i64) -> bool {
        let mut state = self.lock();
        let Some(id) = state.find(id) else {
            return false;
        };
        if !state.containers.get(&id).is_some_and(|c| c.state.running) {
            return false;
        }
        state.set_exited(&id, exit_code, false);
        true
    }

    /// The kernel OOM killer ends the container: `Oom`, then `Die` with 137, and `oom_killed`.
    /// Returns false when it was not running.
    pub fn oom_kill(&self, id: &ContainerId) -> bool {
        let mut state = self.lock();
        let Some(id) = state.find(id) else {
            return false;
        };
        if !state.containers.get(&id).is_some_and(|c| c.state.running) {
            return false;
        }
        state.emit(&id, ContainerEventKind::Oom);
        state.set_exited(&id, SIGKILL_EXIT_CODE, true);
        true
    }

    /// Breaks every open event stream, as a daemon restart does: each yields a transport error
    /// and ends.
    pub fn disconnect_events(&self) {
        let mut state = self.lock();
        for subscriber in state.subscribers.drain(..) {
            let _ = subscriber.send(Err(RuntimeError::Transport {
                op: Op::Events,
                target: String::new(),
                socket: "fake".to_owned(),
                message: "event stream cut by the test".to_owned(),
            }));
        }
    }

    /// Sets the data root the engine reports (none by default).
    pub fn set_data_root(&self, dir: impl Into<std::path::PathBuf>) {
        self.lock().data_root = Some(dir.into());
    }

    /// Number of event streams currently open (a stream counts until its receiver is dropped and
    /// the next event is sent).
    pub fn event_subscribers(&self) -> usize {
        self.lock().subscribers.len()
    }
}

fn not_found(op: Op, id: &ContainerId) -> RuntimeError {
    RuntimeError::NotFound {
        op,
        target: id.to_string(),
        message: format!("No such container: {id}"),
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Create)?;
        spec.validate()?;
        if state.containers.values().any(|c| c.spec.name == spec.name) {
            return Err(RuntimeError::Conflict {
                op: Op::Create,
                target: spec.name.clone(),
                message: format!("the container name \"/{}\" is already in use", spec.name),
            });
        }
        if !state.images.contains(&spec.image) {
            return Err(RuntimeError::NotFound {
                op: Op::Create,
                target: spec.name.clone(),
                message: format!("No such image: {}", spec.image),
            });
        }
        state.created_count += 1;
        let id = ContainerId(format!("{:064x}", state.created_count));
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_MANAGED.to_owned(), LABEL_MANAGED_VALUE.to_owned());
        state.containers.insert(
            id.clone(),
            FakeContainer {
                id: id.clone(),
                spec: spec.clone(),
                labels,
                state: ContainerState {
                    status: ContainerStatus::Created,
                    running: false,
                    exit_code: None,
                    oom_killed: false,
                },
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Start)?;
        let found = state.find(id).ok_or_else(|| not_found(Op::Start, id))?;
        let Some(container) = state.containers.get_mut(&found) else {
            return Err(not_found(Op::Start, id));
        };
        if container.state.running {
            return Ok(());
        }
        container.state = ContainerState {
            status: ContainerStatus::Running,
            running: true,
            exit_code: None,
            oom_killed: false,
        };
        state.emit(&found, ContainerEventKind::Start);
        Ok(())
    }

    async fn stop(&self, id: &ContainerId, _grace: Duration) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Stop)?;
        let Some(found) = state.find(id) else {
            return Ok(());
        };
        if state
            .containers
            .get(&found)
            .is_some_and(|c| c.state.running)
        {
            state.set_exited(&found, SIGTERM_EXIT_CODE, false);
        }
        Ok(())
    }

    async fn remove(&self, id: &ContainerId, force: bool) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Remove)?;
        let Some(found) = state.find(id) else {
            return Ok(());
        };
        if state
            .containers
            .get(&found)
            .is_some_and(|c| c.state.running)
        {
            if !force {
                return Err(RuntimeError::Conflict {
                    op: Op::Remove,
                    target: id.to_string(),
                    message: "You cannot remove a running container. Stop the container before \
                              attempting removal or force remove"
                        .to_owned(),
                });
            }
            state.set_exited(&found, SIGKILL_EXIT_CODE, false);
        }
        state.emit(&found, ContainerEventKind::Destroy);
        state.containers.remove(&found);
        Ok(())
    }

    async fn inspect_state(
        &self,
        id: &ContainerId,
    ) -> Result<Option<ContainerState>, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Inspect)?;
        Ok(state
            .find(id)
            .and_then(|found| state.containers.get(&found))
            .map(|c| c.state.clone()))
    }

    async fn list_mandelboxes(&self) -> Result<Vec<MandelboxContainer>, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::List)?;
        Ok(state
            .containers
            .values()
            .filter(|c| {
                c.labels.get(LABEL_MANAGED).map(String::as_str) == Some(LABEL_MANAGED_VALUE)
            })
            .map(|c| MandelboxContainer {
                id: c.id.clone(),
                name: c.spec.name.clone(),
                status: c.state.status,
                labels: c.labels.clone(),
                // Like the engine: published ports are reported only while running.
                ports: if c.state.running {
                    c.spec.ports.clone()
                } else {
                    Default::default()
                },
            })
            .collect())
    }

    fn events(&self) -> impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Send + 'static {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        {
            let mut state = self.lock();
            match state.begin(Op::Events) {
                // Dropping the sender right after ends the stream after the error.
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
                Ok(()) => state.subscribers.push(sender),
            }
        }
        futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }

    async fn find_image(&self, app: &str) -> Result<Option<String>, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::FindImage)?;
        validate_app_pattern(app)?;
        // Newest first, as the real engine's answer is ordered by creation time.
        Ok(state
            .images
            .iter()
            .rev()
            .find(|tag| image_matches_app(app, tag))
            .cloned())
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::InspectImage)?;
        if !state.images.iter().any(|tag| tag == reference) {
            return Ok(None);
        }
        let generation = state.image_generations.get(reference).copied().unwrap_or(0);
        Ok(Some(format!("sha256:fake-{reference}-{generation}")))
    }

    async fn data_root(&self) -> Result<Option<std::path::PathBuf>, RuntimeError> {
        let mut state = self.lock();
        state.begin(Op::Info)?;
        Ok(state.data_root.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    const IMAGE: &str = "whist/browsers/chrome:current-build";

    fn spec(name: &str) -> ContainerSpec {
        let mut spec = ContainerSpec::new(name, IMAGE);
        spec.labels
            .insert(super::super::LABEL_MANDELBOX_ID.to_owned(), name.to_owned());
        spec
    }

    async fn next(
        events: &mut (impl Stream<Item = Result<ContainerEvent, RuntimeError>> + Unpin),
    ) -> ContainerEvent {
        tokio::time::timeout(Duration::from_secs(1), events.next())
            .await
            .expect("an event in time")
            .expect("an open stream")
            .expect("an event, not an error")
    }

    #[tokio::test]
    async fn lifecycle_moves_through_states_and_emits_events_in_order() {
        let fake = FakeRuntime::with_images([IMAGE]);
        let mut events = Box::pin(fake.events());
        let id = fake.create(&spec("mb-1")).await.unwrap();
        let state = fake.inspect_state(&id).await.unwrap().unwrap();
        assert_eq!(state.status, ContainerStatus::Created);
        assert_eq!(state.exit_code, None);

        fake.start(&id).await.unwrap();
        let start = next(&mut events).await;
        assert_eq!(
            (start.id.clone(), start.kind),
            (id.clone(), ContainerEventKind::Start)
        );
        assert_eq!(
            start.labels.get(LABEL_MANAGED).map(String::as_str),
            Some("true")
        );

        assert!(fake.exit(&id, 3));
        assert_eq!(
            next(&mut events).await.kind,
            ContainerEventKind::Die { exit_code: Some(3) }
        );
        let state = fake.inspect_state(&id).await.unwrap().unwrap();
        assert_eq!(
            (state.status, state.exit_code),
            (ContainerStatus::Exited, Some(3))
        );

        fake.remove(&id, false).await.unwrap();
        assert_eq!(next(&mut events).await.kind, ContainerEventKind::Destroy);
        assert_eq!(fake.inspect_state(&id).await.unwrap(), None);
        // Idempotent: gone is gone.
        fake.remove(&id, false).await.unwrap();
        fake.stop(&id, Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn names_are_unique_and_images_must_exist() {
        let fake = FakeRuntime::with_images([IMAGE]);
        fake.create(&spec("mb-1")).await.unwrap();
        assert!(matches!(
            fake.create(&spec("mb-1")).await,
            Err(RuntimeError::Conflict { op: Op::Create, .. })
        ));
        let mut missing = spec("mb-2");
        missing.image = "nope:latest".into();
        assert!(matches!(
            fake.create(&missing).await,
            Err(RuntimeError::NotFound { op: Op::Create, .. })
        ));
        assert_eq!(fake.containers().len(), 1);
    }

    #[tokio::test]
    async fn running_container_is_removed_only_with_force() {
        let fake = FakeRuntime::with_images([IMAGE]);
        let mut events = Box::pin(fake.events());
        let id = fake.create(&spec("mb-1")).await.unwrap();
        fake.start(&id).await.unwrap();
        assert!(matches!(
            fake.remove(&id, false).await,
            Err(RuntimeError::Conflict { op: Op::Remove, .. })
        ));
        fake.remove(&id, true).await.unwrap();
        let kinds: Vec<_> = [
            next(&mut events).await,
            next(&mut events).await,
            next(&mut events).await,
        ]
        .into_iter()
        .map(|e| e.kind)
        .collect();
        assert_eq!(
            kinds,
            [
                ContainerEventKind::Start,
                ContainerEventKind::Die {
                    exit_code: Some(SIGKILL_EXIT_CODE)
                },
                ContainerEventKind::Destroy
            ]
        );
    }

    #[tokio::test]
    async fn stop_ends_a_running_container_with_sigterm_and_oom_is_reported() {
        let fake = FakeRuntime::with_images([IMAGE]);
        let a = fake.create(&spec("a")).await.unwrap();
        let b = fake.create(&spec("b")).await.unwrap();
        fake.start(&a).await.unwrap();
        fake.start(&b).await.unwrap();
        fake.stop(&a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            fake.inspect_state(&a).await.unwrap().unwrap().exit_code,
            Some(SIGTERM_EXIT_CODE)
        );
        let mut events = Box::pin(fake.events());
        assert!(fake.oom_kill(&b));
        assert_eq!(next(&mut events).await.kind, ContainerEventKind::Oom);
        assert_eq!(
            next(&mut events).await.kind,
            ContainerEventKind::Die {
                exit_code: Some(SIGKILL_EXIT_CODE)
            }
        );
        assert!(fake.inspect_state(&b).await.unwrap().unwrap().oom_killed);
        assert!(!fake.exit(&b, 0), "an exited container cannot exit again");
    }

    #[tokio::test]
    async fn fail_next_fails_exactly_the_next_call_of_that_op() {
        let fake = FakeRuntime::with_images([IMAGE]);
        fake.fail_next(
            Op::Start,
            RuntimeError::Timeout {
                op: Op::Start,
                target: "x".into(),
                timeout: Duration::from_secs(30),
            },
        );
        let id = fake.create(&spec("mb-1")).await.unwrap();
        assert!(matches!(
            fake.start(&id).await,
            Err(RuntimeError::Timeout { op: Op::Start, .. })
        ));
        assert_eq!(
            fake.inspect_state(&id).await.unwrap().unwrap().status,
            ContainerStatus::Created,
            "a failed call changes nothing"
        );
        fake.start(&id).await.unwrap();
        assert_eq!(fake.calls(Op::Start), 2);
    }

    #[tokio::test]
    async fn event_streams_end_after_an_error() {
        let fake = FakeRuntime::with_images([IMAGE]);
        fake.fail_next(
            Op::Events,
            RuntimeError::Transport {
                op: Op::Events,
                target: String::new(),
                socket: "fake".into(),
                message: "refused".into(),
            },
        );
        let mut failed = Box::pin(fake.events());
        assert!(matches!(failed.next().await, Some(Err(_))));
        assert!(failed.next().await.is_none());

        let mut cut = Box::pin(fake.events());
        assert_eq!(fake.event_subscribers(), 1);
        fake.disconnect_events();
        assert!(matches!(
            cut.next().await,
            Some(Err(RuntimeError::Transport { .. }))
        ));
        assert!(cut.next().await.is_none());
        assert_eq!(fake.event_subscribers(), 0);
    }

    #[tokio::test]
    async fn list_reports_every_state_and_ports_only_while_running() {
        use crate::ports::{ContainerPort, Protocol};
        let fake = FakeRuntime::with_images([IMAGE]);
        let mut with_ports = spec("a");
        with_ports.ports.insert(
            ContainerPort {
                port: 32262,
                protocol: Protocol::Tcp,
            },
            40001,
        );
        let a = fake.create(&with_ports).await.unwrap();
        let b = fake.create(&spec("b")).await.unwrap();
        fake.start(&a).await.unwrap();
        let listed = fake.list_mandelboxes().await.unwrap();
        let by_id: BTreeMap<_, _> = listed.iter().map(|c| (c.id.clone(), c)).collect();
        assert_eq!(by_id[&a].status, ContainerStatus::Running);
        assert_eq!(
            by_id[&a].ports.values().copied().collect::<Vec<_>>(),
            [40001]
        );
        assert_eq!(by_id[&b].status, ContainerStatus::Created);
        assert!(by_id[&b].ports.is_empty());
        assert_eq!(by_id[&a].name, "a");
    }

    #[tokio::test]
    async fn find_image_prefers_the_newest_anchored_match() {
        let fake = FakeRuntime::with_images([
            "whist/browsers/chrome:current-build",
            "x/browsers/chromey:current-build",
            "other/browsers/chrome:current-build",
        ]);
        assert_eq!(
            fake.find_image("browsers/chrome").await.unwrap().as_deref(),
            Some("other/browsers/chrome:current-build")
        );
        assert_eq!(fake.find_image("browsers/firefox").await.unwrap(), None);
        assert!(matches!(
            fake.find_image("browsers/(chrome").await,
            Err(RuntimeError::Invalid {
                op: Op::FindImage,
                ..
            })
        ));
    }
}
