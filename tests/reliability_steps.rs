//! Reliability of `idem::step` (issue 18): random sequences of attempts of a three-step body that
//! fail, are cancelled, crash (their future leaked, so their lease runs out and another call
//! takes over) or stall past their lease and resume as stale holders, checked against the
//! assertions of tests/support/steps_model.rs: no recorded step ever runs again, retries get the
//! first value exactly, and no stale holder's step is recorded. The in-memory store runs on
//! tokio's paused clock; Redis and PostgreSQL on real servers and real time, fewer sequences.
//!
//! Each test writes its counts to `<target dir>/reliability/<test>.txt` (see docs/reliability.md).
//! `IDEM_RELIABILITY_CASES` multiplies the number of random cases for longer runs.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use idem::{MemoryStore, Store};
use proptest::test_runner::TestCaseError;
use support::chaos;
use support::steps_model::{self, StepCounts};

fn scale() -> u32 {
    chaos::env_u64("IDEM_RELIABILITY_CASES", 1).clamp(1, 10_000) as u32
}

/// Runs `cases` random sequences on `store` in `runtime`, and reports their counts as `name`.
fn run(
    name: &str,
    cases: u32,
    runtime: &tokio::runtime::Runtime,
    store: &dyn Store,
    lease: Duration,
) {
    let total = Mutex::new(StepCounts::default());
    let mut runner = chaos::runner(cases, 32);
    let result = runner.run(&steps_model::attempts(1, 12), |attempts| {
        let counts = runtime
            .block_on(steps_model::run_steps_model(store, lease, &attempts))
            .map_err(TestCaseError::fail)?;
        total.lock().unwrap().add(&counts);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{name}: steps broke their contract: {err}");
    }
    let c = *total.lock().unwrap();
    assert!(
        c.replayed_steps > 0 && c.crashed > 0 && c.stalled > 0 && c.stale_lease_lost > 0,
        "{name}: the sequences did not reach every kind of event: {c:?}"
    );
    chaos::report(name, &c.pairs());
}

/// A runtime on real time, for the remote stores.
fn real_time() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn memory_steps_hold_under_crashes_takeovers_and_stale_holders() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let store = MemoryStore::new();
    run(
        "steps_memory",
        256 * scale(),
        &runtime,
        &store,
        Duration::from_millis(100),
    );
}

/// On Redis, with real time: a lease long enough for a few round trips on a busy machine.
#[cfg(feature = "redis")]
#[test]
fn redis_steps_hold_under_crashes_takeovers_and_stale_holders() {
    let runtime = real_time();
    let url = support::redis::RedisServer::shared().url();
    let store = runtime
        .block_on(idem::RedisStore::connect(&url))
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
    run(
        "steps_redis",
        16 * scale(),
        &runtime,
        &store,
        Duration::from_millis(400),
    );
}
