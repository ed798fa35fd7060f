//! [`FaultyHostHandler`]: wraps any [`HostHandler`] and injects the failures EC2 produces under
//! load (throttling, 5xx, capacity shortfalls, slow answers, answers lost after the call took
//! effect), by a fixed schedule or at random from a seed, so the reliability suite can replay a
//! failing run exactly.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use dbclient::types::{InstanceId, Region};

use super::{HostError, HostHandler, HostInstance, InstanceTypeInfo, LaunchRequest};

/// The calls of [`HostHandler`], to aim faults at some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Launch,
    Terminate,
    ListManaged,
    Describe,
    WaitRunning,
    WaitTerminated,
    InstanceType,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::Launch,
        Operation::Terminate,
        Operation::ListManaged,
        Operation::Describe,
        Operation::WaitRunning,
        Operation::WaitTerminated,
        Operation::InstanceType,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::Launch => "launch",
            Operation::Terminate => "terminate",
            Operation::ListManaged => "list_managed",
            Operation::Describe => "describe",
            Operation::WaitRunning => "wait_running",
            Operation::WaitTerminated => "wait_terminated",
            Operation::InstanceType => "instance_type",
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `RequestLimitExceeded`, without calling the inner handler.
    Throttle,
    /// A 5xx, without calling the inner handler.
    ServerError,
    /// `InsufficientInstanceCapacity`, without calling the inner handler.
    Capacity,
    /// Waits this long, then calls the inner handler.
    Slow(Duration),
    /// Calls the inner handler (so the call takes effect), then answers with a 5xx: the
    /// response lost on the way back. What makes idempotency necessary.
    LostResponse,
}

/// Fault probabilities for [`FaultyHostHandler::random`], each in `[0, 1]`, checked in this
/// order on every targeted call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRates {
    pub throttle: f64,
    pub server_error: f64,
    pub capacity: f64,
    pub lost_response: f64,
    pub slow: f64,
    /// The delay of a slow answer.
    pub slow_delay: Duration,
}

impl Default for FaultRates {
    fn default() -> Self {
        Self {
            throttle: 0.0,
            server_error: 0.0,
            capacity: 0.0,
            lost_response: 0.0,
            slow: 0.0,
            slow_delay: Duration::from_secs(1),
        }
    }
}

/// What each targeted call gets.
#[derive(Debug)]
enum Plan {
    /// Entry `n` is for the `n`th targeted call (`None`: no fault); past the end, none.
    Schedule(VecDeque<Option<Fault>>),
    Random {
        rng: SplitMix64,
        rates: FaultRates,
    },
}

/// How many faults were injected, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InjectedFaults {
    pub calls: u64,
    pub throttles: u64,
    pub server_errors: u64,
    pub capacity: u64,
    pub slow: u64,
    pub lost_responses: u64,
}

impl InjectedFaults {
    pub fn total(&self) -> u64 {
        self.throttles + self.server_errors + self.capacity + self.slow + self.lost_responses
    }
}

/// A [`HostHandler`] that fails on purpose.
pub struct FaultyHostHandler<H> {
    inner: H,
    targets: Vec<Operation>,
    state: Mutex<(Plan, InjectedFaults)>,
}

impl<H: fmt::Debug> fmt::Debug for FaultyHostHandler<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyHostHandler")
            .field("inner", &self.inner)
            .field("targets", &self.targets)
            .field("injected", &self.injected())
            .finish()
    }
}

impl<H> FaultyHostHandler<H> {
    /// How many calls were targeted, and the faults they got.
    pub fn injected(&self) -> InjectedFaults {
        self.state.lock().map(|state| state.1).unwrap_or_default()
    }

    pub fn inner(&self) -> &H {
        &self.inner
    }
}

impl<H: HostHandler> FaultyHostHandler<H> {
    /// Faults in this order, one per targeted call; `None` lets a call through.
    pub fn scheduled(inner: H, schedule: impl IntoIterator<Item = Option<Fault>>) -> Self {
        Self::with_plan(inner, Plan::Schedule(schedule.into_iter().collect()))
    }

    /// Faults at random with `rates`, reproducible from `seed`.
    pub fn random(inner: H, seed: u64, rates: FaultRates) -> Self {
        Self::with_plan(
            inner,
            Plan::Random {
                rng: SplitMix64(seed),
                rates,
            },
        )
    }

    fn with_plan(inner: H, plan: Plan) -> Self {
        Self {
            inner,
            targets: Operation::ALL.to_vec(),
            state: Mutex::new((plan, InjectedFaults::default())),
        }
    }

    /// Injects faults only into these operations (default: all); the others pass through
    /// without consuming the schedule.
    pub fn only(mut self, operations: &[Operation]) -> Self {
        self.targets = operations.to_vec();
        self
    }

    /// Appends to the schedule (after the entries not yet used). No effect on a random plan.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Option<Fault>>) {
        if let Ok(mut state) = self.state.lock()
            && let Plan::Schedule(schedule) = &mut state.0
        {
            schedule.extend(faults);
        }
    }

    /// Draws the fault for one call of `operation`.
    fn next_fault(&self, operation: Operation) -> Option<Fault> {
        if !self.targets.contains(&operation) {
            return None;
        }
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let (plan, counts) = &mut *state;
        counts.calls += 1;
        let fault = match plan {
            Plan::Schedule(schedule) => schedule.pop_front().flatten(),
            Plan::Random { rng, rates } => {
                let roll = rng.next_f64();
                let mut threshold = 0.0;
                let mut pick = None;
                for (rate, fault) in [
                    (rates.throttle, Fault::Throttle),
                    (rates.server_error, Fault::ServerError),
                    (rates.capacity, Fault::Capacity),
                    (rates.lost_response, Fault::LostResponse),
                    (rates.slow, Fault::Slow(rates.slow_delay)),
                ] {
                    threshold += rate;
                    if roll < threshold {
                        pick = Some(fault);
                        break;
                    }
                }
                pick
            }
        };
        match fault {
            Some(Fault::Throttle) => counts.throttles += 1,
            Some(Fault::ServerError) => counts.server_errors += 1,
            Some(Fault::Capacity) => counts.capacity += 1,
            Some(Fault::Slow(_)) => counts.slow += 1,
            Some(Fault::LostResponse) => counts.lost_responses += 1,
            None => {}
        }
        fault
    }

    /// Runs `call` under the fault drawn for `operation`.
    async fn faulty<T, Fut>(&self, operation: Operation, call: Fut) -> Result<T, HostError>
    where
        Fut: Future<Output = Result<T, HostError>>,
    {
        let fault = self.next_fault(operation);
        if let Some(fault) = fault {
            tracing::debug!(operation = operation.name(), ?fault, "injecting fault");
        }
        let op = operation.name();
        match fault {
            None => call.await,
            Some(Fault::Throttle) => Err(HostError::Throttled {
                operation: op,
                message: "RequestLimitExceeded: injected by FaultyHostHandler".to_owned(),
            }),
            Some(Fault::ServerError) => Err(HostError::Server {
                operation: op,
                message: "InternalError: injected by FaultyHostHandler".to_owned(),
            }),
            Some(Fault::Capacity) => Err(HostError::Capacity {
                operation: op,
                message: "InsufficientInstanceCapacity: injected by FaultyHostHandler".to_owned(),
            }),
            Some(Fault::Slow(delay)) => {
                tokio::time::sleep(delay).await;
                call.await
            }
            Some(Fault::LostResponse) => {
                // The outcome is dropped on purpose: the caller must not learn it.
                let _ = call.await;
                Err(HostError::Server {
                    operation: op,
                    message:
                        "response lost after the call took effect: injected by FaultyHostHandler"
                            .to_owned(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl<H: HostHandler> HostHandler for FaultyHostHandler<H> {
    fn region(&self) -> &Region {
        self.inner.region()
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Vec<HostInstance>, HostError> {
        self.faulty(Operation::Launch, self.inner.launch(request))
            .await
    }

    async fn terminate(&self, ids: &[InstanceId]) -> Result<(), HostError> {
        self.faulty(Operation::Terminate, self.inner.terminate(ids))
            .await
    }

    async fn list_managed(&self) -> Result<Vec<HostInstance>, HostError> {
        self.faulty(Operation::ListManaged, self.inner.list_managed())
            .await
    }

    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<HostInstance>, HostError> {
        self.faulty(Operation::Describe, self.inner.describe(ids))
            .await
    }

    async fn wait_running(&self, ids: &[InstanceId], timeout: Duration) -> Result<(), HostError> {
        self.faulty(
            Operation::WaitRunning,
            self.inner.wait_running(ids, timeout),
        )
        .await
    }

    async fn wait_terminated(
        &self,
        ids: &[InstanceId],
        timeout: Duration,
    ) -> Result<(), HostError> {
        self.faulty(
            Operation::WaitTerminated,
            self.inner.wait_terminated(ids, timeout),
        )
        .await
    }

    async fn instance_type(&self, instance_type: &str) -> Result<InstanceTypeInfo, HostError> {
        self.faulty(
            Operation::InstanceType,
            self.inner.instance_type(instance_type),
        )
        .await
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, and its sequence for a seed never changes with a
/// dependency upgrade, so a seed in a failing test's output replays the same faults.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::fake::FakeHostHandler;

    fn fake() -> FakeHostHandler {
        FakeHostHandler::new(Region::new("us-east-1").unwrap())
    }

    #[tokio::test]
    async fn schedule_is_consumed_in_order_by_targeted_calls_only() {
        let hosts = FaultyHostHandler::scheduled(
            fake(),
            [
                Some(Fault::Throttle),
                None,
                Some(Fault::ServerError),
                Some(Fault::Capacity),
                Some(Fault::Slow(Duration::from_millis(1))),
            ],
        )
        .only(&[Operation::InstanceType]);
        let kind = |r: Result<InstanceTypeInfo, HostError>| match r {
            Ok(_) => "ok",
            Err(HostError::Throttled { .. }) => "throttled",
            Err(HostError::Server { .. }) => "server",
            Err(HostError::Capacity { .. }) => "capacity",
            Err(other) => panic!("unexpected {other:?}"),
        };

        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(kind(hosts.instance_type("g4dn.xlarge").await));
            // Not targeted: passes through and leaves the schedule alone.
            hosts.list_managed().await.unwrap();
        }

        assert_eq!(seen, ["throttled", "ok", "server", "capacity", "ok", "ok"]);
        let injected = hosts.injected();
        assert_eq!(injected.calls, 6);
        assert_eq!(injected.total(), 4);
        assert_eq!(injected.slow, 1);
    }

    #[tokio::test]
    async fn lost_response_takes_effect_but_reports_a_server_error() {
        let hosts = FaultyHostHandler::scheduled(fake(), [Some(Fault::LostResponse)]);
        let request = LaunchRequest {
            launch_id: "lost".to_owned(),
            count: 2,
            image_id: dbclient::types::ImageId::new("ami-1").unwrap(),
            instance_type: "g4dn.xlarge".to_owned(),
            client_sha: "abc".to_owned(),
        };

        let error = hosts.launch(&request).await.unwrap_err();
        assert!(matches!(error, HostError::Server { .. }), "{error:?}");
        assert_eq!(hosts.inner().instances().len(), 2, "the launch happened");
        // The caller's retry, idempotent per launch id, gets the same instances.
        assert_eq!(hosts.launch(&request).await.unwrap().len(), 2);
        assert_eq!(hosts.inner().instances().len(), 2);
    }

    #[test]
    fn splitmix_is_reproducible_and_in_range() {
        let mut a = SplitMix64(42);
        let mut b = SplitMix64(42);
        for _ in 0..1000 {
            let x = a.next_f64();
            assert_eq!(x.to_bits(), b.next_f64().to_bits());
            assert!((0.0..1.0).contains(&x));
        }
        // Reference value of SplitMix64 for seed 0.
        assert_eq!(SplitMix64(0).next_u64(), 0xe220_a839_7b1d_cdaf);
    }
}
