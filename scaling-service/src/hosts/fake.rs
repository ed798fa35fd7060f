//! An in-memory cloud for the algorithm's and the executor's tests: stateful, idempotent per
//! launch id like the real one, and able to fail the next call of any operation.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use dbclient::types::{ImageId, InstanceId, Region};

use super::{HostError, HostHandler, HostInstance, HostState, InstanceTypeInfo, LaunchRequest};

/// The operations, to name what [`FakeHostHandler::fail_next`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Launch,
    Terminate,
    ListManaged,
    Describe,
    WaitRunning,
    WaitTerminated,
    InstanceType,
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<InstanceId, HostInstance>,
    next_id: u64,
    failures: HashMap<Op, VecDeque<HostError>>,
    calls: HashMap<Op, usize>,
}

/// An in-memory cloud region. Launched instances are `Pending` until `wait_running`.
#[derive(Debug)]
pub struct FakeHostHandler {
    region: Region,
    types: HashMap<String, InstanceTypeInfo>,
    state: Mutex<State>,
    /// While true, `wait_running` waits (a launch held half-way, as EC2 takes minutes).
    hold_running: tokio::sync::watch::Sender<bool>,
}

impl FakeHostHandler {
    /// A region with the g4dn types the service uses.
    pub fn new(region: Region) -> Self {
        let types = [
            ("g4dn.xlarge", 1, 4),
            ("g4dn.2xlarge", 1, 8),
            ("g4dn.4xlarge", 1, 16),
            ("g4dn.12xlarge", 4, 48),
        ]
        .into_iter()
        .map(|(name, gpus, vcpus)| (name.to_owned(), InstanceTypeInfo { gpus, vcpus }))
        .collect();
        Self {
            region,
            types,
            state: Mutex::new(State::default()),
            hold_running: tokio::sync::watch::Sender::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The next call of `op` fails with `error` (queued: several can be set).
    pub fn fail_next(&self, op: Op, error: HostError) {
        self.lock().failures.entry(op).or_default().push_back(error);
    }

    /// How many times `op` was called.
    /// Holds every `wait_running` (until released with `false`): launches stop after
    /// RunInstances, before their rows are inserted.
    pub fn hold_running(&self, hold: bool) {
        self.hold_running.send_replace(hold);
    }

    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Every instance, any state.
    pub fn instances(&self) -> Vec<HostInstance> {
        self.lock().instances.values().cloned().collect()
    }

    /// Instances not terminated or shutting down.
    pub fn live(&self) -> Vec<HostInstance> {
        self.instances()
            .into_iter()
            .filter(|i| !i.state.is_ending())
            .collect()
    }

    /// Adds an instance launched outside the service's knowledge (an orphan), `Running`.
    pub fn add_orphan(
        &self,
        image_id: ImageId,
        instance_type: &str,
    ) -> Result<InstanceId, HostError> {
        let mut state = self.lock();
        let id = Self::new_id(&mut state)?;
        state.instances.insert(
            id.clone(),
            HostInstance {
                id: id.clone(),
                image_id,
                instance_type: instance_type.to_owned(),
                state: HostState::Running,
                launch_id: None,
                launched_at: Some(chrono::Utc::now()),
            },
        );
        Ok(id)
    }

    fn new_id(state: &mut State) -> Result<InstanceId, HostError> {
        state.next_id += 1;
        InstanceId::new(format!("i-fake{:012x}", state.next_id)).map_err(|e| HostError::Invalid {
            operation: "launch",
            message: e.to_string(),
        })
    }

    fn enter(&self, op: Op) -> Result<std::sync::MutexGuard<'_, State>, HostError> {
        let mut state = self.lock();
        *state.calls.entry(op).or_default() += 1;
        if let Some(error) = state.failures.get_mut(&op).and_then(VecDeque::pop_front) {
            return Err(error);
        }
        Ok(state)
    }
}

#[async_trait::async_trait]
impl HostHandler for FakeHostHandler {
    fn region(&self) -> &Region {
        &self.region
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<HostInstance>, HostError> {
        let mut state = self.enter(Op::Launch)?;
        if !self.types.contains_key(&request.instance_type) {
            return Err(HostError::Invalid {
                operation: "launch",
                message: format!("unknown instance type {}", request.instance_type),
            });
        }
        let existing: Vec<HostInstance> = state
            .instances
            .values()
            .filter(|i| i.launch_id.as_deref() == Some(request.launch_id.as_str()))
            .cloned()
            .collect();
        if !existing.is_empty() {
            return Ok(existing);
        }
        let mut launched = Vec::new();
        for _ in 0..request.count {
            let id = Self::new_id(&mut state)?;
            let instance = HostInstance {
                id: id.clone(),
                image_id: request.image_id.clone(),
                instance_type: request.instance_type.clone(),
                state: HostState::Pending,
                launch_id: Some(request.launch_id.clone()),
                launched_at: Some(chrono::Utc::now()),
            };
            state.instances.insert(id, instance.clone());
            launched.push(instance);
        }
        Ok(launched)
    }

    async fn terminate(&self, ids: &[InstanceId]) -> Result<(), HostError> {
        let mut state = self.enter(Op::Terminate)?;
        for id in ids {
            if let Some(instance) = state.instances.get_mut(id) {
                instance.state = HostState::Terminated;
            }
        }
        Ok(())
    }

    async fn list_managed(&self) -> Result<Vec<HostInstance>, HostError> {
        let state = self.enter(Op::ListManaged)?;
        Ok(state.instances.values().cloned().collect())
    }

    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<HostInstance>, HostError> {
        let state = self.enter(Op::Describe)?;
        Ok(ids
            .iter()
            .filter_map(|id| state.instances.get(id).cloned())
            .collect())
    }

    async fn wait_running(&self, ids: &[InstanceId], _timeout: Duration) -> Result<(), HostError> {
        let mut held = self.hold_running.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = held.wait_for(|hold| !*hold).await;
        let mut state = self.enter(Op::WaitRunning)?;
        for id in ids {
            match state.instances.get_mut(id) {
                Some(i) if i.state == HostState::Pending => i.state = HostState::Running,
                Some(i) if i.state == HostState::Running => {}
                _ => {
                    return Err(HostError::NotFound {
                        operation: "wait_running",
                        message: format!("{id} is not pending or running"),
                    });
                }
            }
        }
        Ok(())
    }

    async fn wait_terminated(
        &self,
        ids: &[InstanceId],
        _timeout: Duration,
    ) -> Result<(), HostError> {
        let state = self.enter(Op::WaitTerminated)?;
        for id in ids {
            if let Some(i) = state.instances.get(id)
                && i.state != HostState::Terminated
            {
                return Err(HostError::Timeout {
                    operation: "wait_terminated",
                    message: format!("{id} is {:?}", i.state),
                });
            }
        }
        Ok(())
    }

    async fn instance_type(&self, instance_type: &str) -> Result<InstanceTypeInfo, HostError> {
        let _state = self.enter(Op::InstanceType)?;
        self.types
            .get(instance_type)
            .copied()
            .ok_or_else(|| HostError::Invalid {
                operation: "instance_type",
                message: format!("unknown instance type {instance_type}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(launch_id: &str, count: u32) -> LaunchRequest {
        LaunchRequest {
            launch_id: launch_id.into(),
            count,
            image_id: ImageId::new("ami-1").unwrap(),
            instance_type: "g4dn.xlarge".into(),
            client_sha: "abc".into(),
        }
    }

    #[tokio::test]
    async fn a_retried_launch_launches_nothing_new() {
        let fake = FakeHostHandler::new(Region::new("us-east-1").unwrap());
        let first = fake.launch(&request("l-1", 2)).await.unwrap();
        let again = fake.launch(&request("l-1", 2)).await.unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            again.iter().map(|i| &i.id).collect::<Vec<_>>(),
            first.iter().map(|i| &i.id).collect::<Vec<_>>()
        );
        assert_eq!(fake.instances().len(), 2);
    }

    #[tokio::test]
    async fn injected_failures_come_once_each_in_order() {
        let fake = FakeHostHandler::new(Region::new("us-east-1").unwrap());
        let throttled = HostError::Throttled {
            operation: "launch",
            message: "slow down".into(),
        };
        fake.fail_next(Op::Launch, throttled.clone());
        assert_eq!(fake.launch(&request("l-2", 1)).await, Err(throttled));
        assert!(fake.launch(&request("l-2", 1)).await.is_ok());
        assert_eq!(fake.calls(Op::Launch), 2);
    }

    #[tokio::test]
    async fn instances_run_then_terminate() {
        let fake = FakeHostHandler::new(Region::new("us-east-1").unwrap());
        let ids: Vec<InstanceId> = fake
            .launch(&request("l-3", 1))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        fake.wait_running(&ids, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            fake.describe(&ids).await.unwrap()[0].state,
            HostState::Running
        );
        assert!(
            fake.wait_terminated(&ids, Duration::from_secs(1))
                .await
                .is_err()
        );
        fake.terminate(&ids).await.unwrap();
        fake.wait_terminated(&ids, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(fake.live().is_empty());
    }
}
