//! Prometheus metrics (`GET /metrics`). The names are what the operations dashboard expects.
//!
//! The controller's decisions and what became of them: every action of a plan is counted in
//! `whist_scaling_decisions_total{region, kind}` when the algorithm returns it, and in
//! `whist_scaling_actions_total{region, kind, result}` once the executor carried it out (`ok`)
//! or failed (`failed`); an action left untried after an earlier one failed is a decision
//! without an action. `kind` is [`action_kind`].

use dbclient::types::{ImageId, InstanceId};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::algorithm::{Action, TerminationReason};
use crate::controller::{ExecError, PlanExecutor};

/// Every metric the service exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub instances: IntGaugeVec,
    pub free_capacity: IntGaugeVec,
    pub desired_free_capacity: IntGaugeVec,
    pub launches: IntCounterVec,
    pub terminations: IntCounterVec,
    pub assign_requests: IntCounterVec,
    pub assign_seconds: Histogram,
    pub subscription_up: IntGauge,
    pub lingering_instances: IntGaugeVec,
    pub leader: IntGauge,
    /// Actions the algorithm planned, by region and kind.
    pub decisions: IntCounterVec,
    /// Actions carried out, by region, kind and result (`ok`, `failed`).
    pub actions: IntCounterVec,
}

/// The `kind` label of an action: `launch`, `drain`, `terminate`, `delete_row`, `swap_image`,
/// `abandon_upgrade`; `None` for `RequeueAfter`, which is no action.
pub fn action_kind(action: &Action) -> Option<&'static str> {
    Some(match action {
        Action::Launch { .. } => "launch",
        Action::Drain { .. } => "drain",
        Action::Terminate { .. } => "terminate",
        Action::DeleteRow { .. } => "delete_row",
        Action::SwapImage { .. } => "swap_image",
        Action::AbandonUpgrade { .. } => "abandon_upgrade",
        Action::RequeueAfter(_) => return None,
    })
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let assign_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "whist_scaling_assign_seconds",
                "Time to answer POST /mandelbox/assign",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        registry.register(Box::new(assign_seconds.clone()))?;
        Ok(Self {
            instances: gauge_vec(
                "whist_scaling_instances",
                "Instance rows by region and status",
                &["region", "status"],
            )?,
            free_capacity: gauge_vec(
                "whist_scaling_free_capacity",
                "Free mandelboxes on ACTIVE hosts on the current image",
                &["region"],
            )?,
            desired_free_capacity: gauge_vec(
                "whist_scaling_desired_free_capacity",
                "The buffer of free mandelboxes the region is kept at",
                &["region"],
            )?,
            launches: counter_vec(
                "whist_scaling_launches_total",
                "Launches by region and result",
                &["region", "result"],
            )?,
            terminations: counter_vec(
                "whist_scaling_terminations_total",
                "Terminations by region and reason",
                &["region", "reason"],
            )?,
            assign_requests: counter_vec(
                "whist_scaling_assign_requests_total",
                "Assign requests by result",
                &["result"],
            )?,
            assign_seconds,
            subscription_up: gauge(
                "whist_scaling_subscription_up",
                "1 while the database subscriptions deliver",
            )?,
            lingering_instances: gauge_vec(
                "whist_scaling_lingering_instances",
                "DRAINING hosts without users (terminated past the lingering limit)",
                &["region"],
            )?,
            leader: gauge(
                "whist_scaling_leader",
                "1 while this replica holds the lease",
            )?,
            decisions: counter_vec(
                "whist_scaling_decisions_total",
                "Actions the scaling algorithm planned, by region and kind",
                &["region", "kind"],
            )?,
            actions: counter_vec(
                "whist_scaling_actions_total",
                "Actions carried out, by region, kind and result",
                &["region", "kind", "result"],
            )?,
            registry,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Metrics {
    /// Counts the actions of `plan` as decisions of `region`.
    pub fn count_decisions(&self, region: &str, plan: &[Action]) {
        for kind in plan.iter().filter_map(action_kind) {
            self.decisions.with_label_values(&[region, kind]).inc();
        }
    }

    fn count_action<T>(&self, region: &str, kind: &str, result: &Result<T, ExecError>) {
        let result = if result.is_ok() { "ok" } else { "failed" };
        self.actions
            .with_label_values(&[region, kind, result])
            .inc();
    }
}

/// A [`PlanExecutor`] that counts each action's result in `whist_scaling_actions_total` and
/// hands it to `inner`.
#[derive(Debug)]
pub struct Metered<'a, E: ?Sized> {
    pub inner: &'a mut E,
    pub metrics: &'a Metrics,
    pub region: &'a str,
}

#[async_trait::async_trait]
impl<E: PlanExecutor + ?Sized> PlanExecutor for Metered<'_, E> {
    async fn launch(&mut self, count: u32, image_id: ImageId) -> Result<(), ExecError> {
        let result = self.inner.launch(count, image_id).await;
        self.metrics.count_action(self.region, "launch", &result);
        result
    }

    async fn drain(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        let result = self.inner.drain(instance).await;
        self.metrics.count_action(self.region, "drain", &result);
        result
    }

    async fn terminate(
        &mut self,
        instance: InstanceId,
        reason: TerminationReason,
    ) -> Result<(), ExecError> {
        let result = self.inner.terminate(instance, reason).await;
        self.metrics.count_action(self.region, "terminate", &result);
        result
    }

    async fn delete_row(&mut self, instance: InstanceId) -> Result<(), ExecError> {
        let result = self.inner.delete_row(instance).await;
        self.metrics
            .count_action(self.region, "delete_row", &result);
        result
    }

    async fn swap_image(&mut self, image_id: ImageId) -> Result<(), ExecError> {
        let result = self.inner.swap_image(image_id).await;
        self.metrics
            .count_action(self.region, "swap_image", &result);
        result
    }

    fn abandon_upgrade(&mut self, image_id: ImageId) {
        self.inner.abandon_upgrade(image_id);
        self.metrics
            .count_action::<()>(self.region, "abandon_upgrade", &Ok(()));
    }
}
