//! Prometheus metrics (`GET /metrics`). The names are what the operations dashboard expects.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
