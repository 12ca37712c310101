//! What the benchmarks share: the value type and the driver of concurrent callers.

#![allow(dead_code)] // each benchmark uses part of it

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The value type of every benchmark: a small struct with two strings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub email: String,
}

/// The value for `id`.
pub fn profile(id: u64) -> Profile {
    Profile {
        name: format!("user {id}"),
        email: format!("user{id}@example.com"),
    }
}

/// The numbers of concurrent callers the remote-store benchmarks measure.
pub const CONCURRENCY: [usize; 3] = [1, 8, 64];

/// Runs `iters` rounds of `callers` concurrent calls; returns the total time.
pub async fn rounds<F, Fut>(iters: u64, callers: usize, call: F) -> Duration
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per_caller = iters.div_ceil(callers as u64).max(1);
    for caller in 0..callers {
        let call = call.clone();
        tasks.spawn(async move {
            for i in 0..per_caller {
                call(caller as u64 * 1_000_000_000 + i).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a benchmark task panicked");
    }
    // Report per call: scale to the `iters * callers` calls criterion counts.
    start
        .elapsed()
        .mul_f64(iters as f64 / (per_caller * callers as u64) as f64)
}
