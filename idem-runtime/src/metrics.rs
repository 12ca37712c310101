//! Metrics (feature `metrics`), through the [`metrics`](https://docs.rs/metrics) crate's facade,
//! so any exporter (Prometheus, OpenTelemetry, StatsD, ...) records them.
//!
//! | metric | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `idem_calls_total` | counter | `name`, `outcome` | one per idempotent call, by its outcome: `executed`, `failed`, `panicked`, `cancelled`, `replayed`, `waited`, `rejected`, `key_reused`, `lease_lost`, `store_error`, `store_full` (the same outcomes as the `tracing` events) |
//! | `idem_body_duration_seconds` | histogram | `name` | how long a body ran (calls that executed, failed or lost their lease) |
//! | `idem_wait_duration_seconds` | histogram | `name` | how long a call waited for another holder of its key |
//! | `idem_store_operation_duration_seconds` | histogram | `operation` | the latency of each store operation the executor makes: `claim`, `complete`, `renew`, `release`, `wait` |
//! | `idem_http_responses_total` | counter | `status`, `replayed` | responses of keyed requests through the HTTP layer |
//!
//! Names follow the Prometheus and OpenTelemetry conventions (base units, `_total` for
//! counters, `_seconds` for durations). `name` is the function's namespace (its `name = ...`,
//! or its path): keep it low-cardinality (never put a key in it). The handles of the first
//! 1,000 names are registered once and reused, so recording allocates nothing after a name's
//! first call; further names share the `name="other"` series. Install the recorder before the
//! first call: handles registered before it are no-ops, as the `metrics` crate documents.

use std::time::Duration;

/// A point in time for measuring a duration: `std::time::Instant` with the feature, nothing
/// without it (so no clock is read).
#[cfg(feature = "metrics")]
pub(crate) type Stopwatch = std::time::Instant;
/// A point in time for measuring a duration: nothing without the feature.
#[cfg(not(feature = "metrics"))]
pub(crate) type Stopwatch = ();

/// Starts a stopwatch.
#[inline(always)]
pub(crate) fn start() -> Stopwatch {
    #[cfg(feature = "metrics")]
    {
        std::time::Instant::now()
    }
}

/// The time since `start`.
#[inline(always)]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables, dead_code))]
fn elapsed(start: Stopwatch) -> Duration {
    #[cfg(feature = "metrics")]
    {
        start.elapsed()
    }
    #[cfg(not(feature = "metrics"))]
    {
        Duration::ZERO
    }
}

/// The outcomes a call can have.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const OUTCOMES: [&str; 11] = [
    "executed",
    "failed",
    "panicked",
    "cancelled",
    "replayed",
    "waited",
    "rejected",
    "key_reused",
    "lease_lost",
    "store_error",
    "store_full",
];

/// Counts one call of `name` by its outcome (one of [`OUTCOMES`]).
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn call(name: &str, outcome: &'static str) {
    #[cfg(feature = "metrics")]
    enabled::call(name, outcome);
}

/// Records how long a body of `name` ran.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn body(name: &str, start: Stopwatch) {
    #[cfg(feature = "metrics")]
    enabled::body(name, elapsed(start));
}

/// Records how long a call of `name` waited for another holder.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn waited(name: &str, start: Stopwatch) {
    #[cfg(feature = "metrics")]
    enabled::waited(name, elapsed(start));
}

/// Records the latency of one store operation.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn store_operation(operation: &'static str, start: Stopwatch) {
    #[cfg(feature = "metrics")]
    enabled::store_operation(operation, elapsed(start));
}

/// Counts one response of a keyed request through the HTTP layer.
#[inline]
#[cfg_attr(not(feature = "http"), allow(dead_code))]
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn http_response(status: u16, replayed: bool) {
    #[cfg(feature = "metrics")]
    enabled::http_response(status, replayed);
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::sync::{Arc, LazyLock};
    use std::time::Duration;

    use dashmap::DashMap;
    use metrics::{Counter, Histogram, counter, histogram};

    use super::OUTCOMES;

    /// How many names get series of their own; the rest share `name="other"`.
    const MAX_NAMES: usize = 1_000;

    /// The handles of one name, registered on its first call.
    struct Handles {
        calls: [Counter; OUTCOMES.len()],
        body: Histogram,
        waited: Histogram,
    }

    impl Handles {
        fn register(name: &str) -> Handles {
            Handles {
                calls: OUTCOMES.map(|outcome| {
                    counter!("idem_calls_total", "name" => name.to_owned(), "outcome" => outcome)
                }),
                body: histogram!("idem_body_duration_seconds", "name" => name.to_owned()),
                waited: histogram!("idem_wait_duration_seconds", "name" => name.to_owned()),
            }
        }
    }

    static HANDLES: LazyLock<DashMap<Box<str>, Arc<Handles>>> = LazyLock::new(DashMap::new);
    static OTHER: LazyLock<Arc<Handles>> = LazyLock::new(|| Arc::new(Handles::register("other")));

    fn handles(name: &str) -> Arc<Handles> {
        if let Some(found) = HANDLES.get(name) {
            return Arc::clone(&found);
        }
        if HANDLES.len() >= MAX_NAMES {
            return Arc::clone(&OTHER);
        }
        let entry = HANDLES
            .entry(Box::from(name))
            .or_insert_with(|| Arc::new(Handles::register(name)));
        Arc::clone(&entry)
    }

    pub(super) fn call(name: &str, outcome: &'static str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            handles(name).calls[i].increment(1);
        }
    }

    pub(super) fn body(name: &str, took: Duration) {
        handles(name).body.record(took.as_secs_f64());
    }

    pub(super) fn waited(name: &str, took: Duration) {
        handles(name).waited.record(took.as_secs_f64());
    }

    pub(super) fn store_operation(operation: &'static str, took: Duration) {
        histogram!("idem_store_operation_duration_seconds", "operation" => operation)
            .record(took.as_secs_f64());
    }

    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(super) fn http_response(status: u16, replayed: bool) {
        let replayed = if replayed { "true" } else { "false" };
        counter!("idem_http_responses_total", "status" => status.to_string(), "replayed" => replayed)
            .increment(1);
    }
}
