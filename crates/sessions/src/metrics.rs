//! Prometheus metrics of the service, in one registry.
//!
//! The session layer counts what happens to sessions and executions; the
//! HTTP layer counts refused requests by error code. `/metrics` renders the
//! registry in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How an execution ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `success`, `error`, `timeout`, `cancelled`, `died`.
    pub outcome: String,
}

/// Which limit was hit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    /// `time`, `memory`, `output`, `sessions`, `sessions_per_key`.
    pub limit: String,
}

/// A warm pool, by the language its kernels run (`python`, `javascript`
/// for Deno's, shared with TypeScript, and `bash`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolOf {
    /// The pool's language.
    pub language: String,
}

/// How a batch item ended (its `status`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemOutcome {
    /// `success`, `error`, `timeout`, `memory_exceeded`, `infra_error`.
    pub status: String,
}

/// Whether a batch item's test passed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TestOutcome {
    /// `passed` or `failed`.
    pub result: String,
}

/// An API error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    /// The stable code (`session_not_found`, ...).
    pub code: String,
}

/// Every metric kiln exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Live sessions.
    pub sessions_live: Gauge,
    /// Ready kernels in the warm pool.
    pub pool_ready: Gauge,
    /// The pool's current target (adapts to demand).
    pub pool_target: Gauge,
    /// Ready kernels, per pool.
    pub pool_ready_by_language: Family<PoolOf, Gauge>,
    /// Sessions started.
    pub sessions_started: Counter,
    /// Executions by how they ended.
    pub executions: Family<Outcome, Counter>,
    /// Execution wall time, seconds.
    pub execute_seconds: Histogram,
    /// Kernels that died during a cell (crash, `os._exit`, out of memory).
    pub kernel_deaths: Counter,
    /// Limits hit, by limit.
    pub limits_hit: Family<Limit, Counter>,
    /// Refused or failed requests, by error code.
    pub errors: Family<Code, Counter>,
    /// Executions holding a place (see `--max-executions`).
    pub executions_running: Gauge,
    /// Executions waiting in their key's queue for a place.
    pub executions_queued: Gauge,
    /// Batch items by status (`infra_error` is kiln's failure, never the
    /// code's: the one to alert on).
    pub batch_items: Family<ItemOutcome, Counter>,
    /// Batch items' tests, passed or failed.
    pub batch_tests: Family<TestOutcome, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let m = Metrics {
            sessions_live: Gauge::default(),
            pool_ready: Gauge::default(),
            pool_target: Gauge::default(),
            pool_ready_by_language: Family::default(),
            sessions_started: Counter::default(),
            executions: Family::default(),
            execute_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            kernel_deaths: Counter::default(),
            limits_hit: Family::default(),
            errors: Family::default(),
            executions_running: Gauge::default(),
            executions_queued: Gauge::default(),
            batch_items: Family::default(),
            batch_tests: Family::default(),
            registry: Registry::default(),
        };
        registry.register("sessions_live", "Live sessions", m.sessions_live.clone());
        registry.register("pool_ready", "Ready kernels in the warm pool", m.pool_ready.clone());
        registry.register("pool_target", "The warm pool's current target size", m.pool_target.clone());
        registry.register(
            "pool_ready_by_language",
            "Ready kernels in each language's warm pool",
            m.pool_ready_by_language.clone(),
        );
        registry.register("sessions_started", "Sessions started", m.sessions_started.clone());
        registry.register("executions", "Executions by outcome", m.executions.clone());
        registry.register("execute_duration_seconds", "Execution wall time", m.execute_seconds.clone());
        registry.register("kernel_deaths", "Kernels that died during a cell", m.kernel_deaths.clone());
        registry.register("limits_hit", "Limits hit, by limit", m.limits_hit.clone());
        registry.register("request_errors", "Refused or failed requests, by error code", m.errors.clone());
        registry.register("executions_running", "Executions holding a place", m.executions_running.clone());
        registry.register(
            "executions_queued",
            "Executions waiting in their key's queue for a place",
            m.executions_queued.clone(),
        );
        registry.register("batch_items", "Batch items by status", m.batch_items.clone());
        registry.register("batch_tests", "Batch items' tests by result", m.batch_tests.clone());
        Metrics { registry, ..m }
    }

    /// Count an execution's outcome.
    pub fn outcome(&self, outcome: &str) {
        self.executions.get_or_create(&Outcome { outcome: outcome.to_string() }).inc();
    }

    /// Count a limit hit.
    pub fn limit(&self, limit: &str) {
        self.limits_hit.get_or_create(&Limit { limit: limit.to_string() }).inc();
    }

    /// Count a finished batch item and its tests.
    pub fn batch_item(&self, status: &str, passed: usize, failed: usize) {
        self.batch_items.get_or_create(&ItemOutcome { status: status.to_string() }).inc();
        for (result, n) in [("passed", passed), ("failed", failed)] {
            if n > 0 {
                self.batch_tests.get_or_create(&TestOutcome { result: result.to_string() }).inc_by(n as u64);
            }
        }
    }

    /// Count an error response.
    pub fn error(&self, code: &str) {
        self.errors.get_or_create(&Code { code: code.to_string() }).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
