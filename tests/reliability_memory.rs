//! Reliability of the in-memory store (issue 6): random interleavings checked against a model of
//! DESIGN.md's record states, racing executor calls that fail, succeed and are cancelled, calls
//! cancelled at every point a cancellation can land, and a soak over a million keys that must
//! stay within the store's documented bounds.
//!
//! Each test writes its counts to `<target dir>/reliability/<test>.txt` (see docs/reliability.md).
//! `IDEM_RELIABILITY_CASES` multiplies the number of random cases for longer runs.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use idem::store::{Bytes, Claim, Completion};
use idem::{Error, Idempotent, Key, MemoryStore, Status, Store};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::chaos::{self, ModelCounts, Timing};

fn scale() -> u32 {
    chaos::env_u64("IDEM_RELIABILITY_CASES", 1).clamp(1, 10_000) as u32
}

const MEMORY_TIMING: Timing = Timing {
    short: Duration::from_millis(100),
    long: Duration::from_secs(60),
    advances: [
        Duration::from_millis(1),
        Duration::from_millis(60),
        Duration::from_millis(250),
    ],
    margin: Duration::ZERO,
    paused: true,
    wait: Duration::from_millis(50),
};

/// Random sequences of claim / complete / renew / release / remove / wait and clock advances
/// (tokio's paused clock, so expiries are exact), on a fresh `MemoryStore` each, checked step by
/// step against the model in tests/support/chaos.rs.
#[test]
fn memory_store_matches_the_model_under_random_interleavings() {
    let total = Mutex::new(ModelCounts::default());
    let mut runner = chaos::runner(768 * scale(), 2_000);
    let result = runner.run(&chaos::ops(1, 64), |ops| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let store = MemoryStore::new();
        let counts = runtime
            .block_on(chaos::run_model(
                &store,
                MEMORY_TIMING,
                "model.memory",
                &ops,
            ))
            .map_err(TestCaseError::fail)?;
        // The sequence removed its keys at the end: the record count must not have drifted.
        prop_assert_eq!(store.len(), 0, "records left or miscounted");
        total.lock().unwrap().add(&counts);
        Ok(())
    });
    if let Err(err) = result {
        panic!("the in-memory store broke the contract: {err}");
    }
    let c = *total.lock().unwrap();
    assert!(
        c.takeovers > 0 && c.fenced > 0 && c.replayed > 0 && c.busy > 0,
        "{c:?}"
    );
    let pairs = chaos::counts_to_pairs(&c);
    let pairs: Vec<(&str, u64)> = pairs.into_iter().collect();
    chaos::report("model_memory", &pairs);
}

#[derive(Clone, Copy, Debug)]
enum Caller {
    /// The body succeeds.
    Ok,
    /// The body fails: not memoized, the next caller runs it again.
    Fails,
    /// The call is dropped after this many yields (cancelled mid-body or mid-wait).
    Cancelled(u8),
}

fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![
        6 => Just(Caller::Ok),
        2 => Just(Caller::Fails),
        2 => (0..6u8).prop_map(Caller::Cancelled),
    ]
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Failed,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

/// Callers racing on a few keys on a multi-threaded runtime, each succeeding, failing or being
/// cancelled at a random point: per key, at most one body ever succeeds (executions doubled:
/// 0), every caller that gets a value gets that body's value, and no caller is left hanging.
#[test]
fn racing_callers_that_fail_and_are_cancelled_never_double_an_execution() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let interleavings = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let mut runner = chaos::runner(192 * scale(), 200);
    let strategy = (
        1..4u32,
        proptest::collection::vec((0..4u32, caller(), 0..4u8), 2..24),
    );
    let result = runner.run(&strategy, |(keys, callers)| {
        let store = Arc::new(MemoryStore::new());
        let successes: Arc<Mutex<HashMap<u32, Vec<u64>>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(1));
        let outcome = runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (i, (key, kind, yields)) in callers.iter().copied().enumerate() {
                let key = key % keys;
                let (store, successes, next) = (store.clone(), successes.clone(), next.clone());
                tasks.spawn(async move {
                    let call = Idempotent::new(&*store, ("race", key)).name("test")
                        .wait_timeout(Duration::from_secs(30))
                        .run(|| async {
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                            if matches!(kind, Caller::Fails) {
                                return Err(AppError::Failed);
                            }
                            let v = next.fetch_add(1, Ordering::SeqCst);
                            successes.lock().unwrap().entry(key).or_default().push(v);
                            Ok::<u64, AppError>(v)
                        });
                    let result = match kind {
                        Caller::Cancelled(after) => {
                            tokio::select! {
                                r = call => Some(r),
                                () = async { for _ in 0..after { tokio::task::yield_now().await; } } => None,
                            }
                        }
                        _ => Some(call.await),
                    };
                    (i, key, result)
                });
            }
            let mut results = Vec::new();
            let all = async {
                while let Some(joined) = tasks.join_next().await {
                    results.push(joined.expect("no caller panics"));
                }
            };
            if tokio::time::timeout(Duration::from_secs(60), all).await.is_err() {
                return Err("a caller hung for 60s".to_owned());
            }
            Ok(results)
        });
        let results = outcome.map_err(TestCaseError::fail)?;
        let successes = successes.lock().unwrap();
        for (key, ran) in successes.iter() {
            prop_assert!(
                ran.len() <= 1,
                "key {key}: {} bodies succeeded ({ran:?}); executions doubled",
                ran.len()
            );
        }
        for (i, key, result) in results {
            match result {
                None | Some(Err(AppError::Failed)) => {}
                Some(Ok(v)) => prop_assert_eq!(
                    successes.get(&key).map(|r| r[0]),
                    Some(v),
                    "caller {} of key {} got a value no successful body produced",
                    i,
                    key
                ),
                Some(Err(AppError::Idem(e))) => {
                    return Err(TestCaseError::fail(format!("caller {i}: {e}")));
                }
            }
        }
        interleavings.fetch_add(1, Ordering::Relaxed);
        calls.fetch_add(callers.len() as u64, Ordering::Relaxed);
        Ok(())
    });
    if let Err(err) = result {
        panic!("racing callers broke the contract: {err}");
    }
    chaos::report(
        "race_memory",
        &[
            ("interleavings", interleavings.load(Ordering::Relaxed)),
            ("calls", calls.load(Ordering::Relaxed)),
            ("executions_doubled", 0),
        ],
    );
}

/// A distinct key per number, made from its digest directly: hashing a million keys in a debug
/// build would take longer than the store's work (the key encoding has tests of its own).
fn soak_key(k: u64) -> Key {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&k.to_le_bytes());
    digest[8..16].copy_from_slice(&k.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    Key::from_digest(digest)
}

/// A million distinct keys through a store with a short ttl (tokio's paused clock, advanced by
/// hand): the inserts remove expired records as they go (a few each), so the store holds the
/// live records and at most a batch more, with no sweep and never near its bounds, and every
/// key's record is served while it lives.
#[test]
fn a_million_keys_with_a_short_ttl_stay_within_the_bound() {
    const KEYS: u64 = 1_000_000;
    const BATCH: u64 = 2_000;
    const MAX_ENTRIES: usize = 400_000;
    let ttl = Duration::from_millis(500);
    let lease = Duration::from_secs(30);
    let step = Duration::from_millis(10); // per batch: 2,000 keys per 10 ms, 100,000 per ttl
    // Live at any time: ttl / step batches of keys, and one executor key per batch.
    let live = (ttl.as_millis() / step.as_millis()) as u64 * (BATCH + 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let store = MemoryStore::with_max_entries(MAX_ENTRIES);
    let runs = AtomicUsize::new(0);
    let (peak, peak_bytes, left) = runtime.block_on(async {
        let mut peak = 0;
        let mut peak_bytes = 0;
        for batch in 0..KEYS / BATCH {
            // The store's own operations (what the executor calls), to keep a million keys fast
            // in a debug build; the executor path is checked on one key per batch below.
            for k in batch * BATCH..(batch + 1) * BATCH {
                let key = soak_key(k);
                match store.claim(key, None, lease).await {
                    Ok(Claim::Acquired(token)) => {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let done = store
                            .complete(key, token, None, Bytes::from_static(b"1"), ttl)
                            .await;
                        assert_eq!(done.ok(), Some(Completion::Stored), "key {k}");
                    }
                    other => panic!("key {k} is new, got {other:?}"),
                }
            }
            let len = store.len();
            assert!(
                len as u64 <= live + BATCH,
                "{len} records, {live} live: expired records are not removed as new ones arrive"
            );
            assert!(store.bytes() <= store.max_bytes());
            peak = peak.max(len);
            peak_bytes = peak_bytes.max(store.bytes());
            // A key of this batch is still replayed, not run again.
            let k = batch * BATCH;
            match store.claim(soak_key(k), None, lease).await {
                Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"1"),
                other => panic!("a live record must be replayed, got {other:?}"),
            }
            let out = Idempotent::new(&store, ("soak executor", batch))
                .name("test")
                .ttl(ttl)
                .run_with_outcome(|| async { Ok::<u64, Error>(batch) })
                .await
                .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
            assert_eq!((out.value, out.status), (batch, Status::Executed));
            tokio::time::advance(step).await;
        }
        // Once every ttl ran out, a sweep removes what the last inserts had no reason to.
        let left = store.len();
        tokio::time::advance(ttl * 2).await;
        assert_eq!(store.sweep(), left);
        assert_eq!(
            (store.len(), store.bytes()),
            (0, 0),
            "records left after a sweep"
        );
        (peak, peak_bytes, left)
    });
    assert_eq!(
        runs.load(Ordering::Relaxed) as u64,
        KEYS,
        "each key ran once"
    );
    chaos::report(
        "soak_memory",
        &[
            ("keys", KEYS),
            ("max_entries", MAX_ENTRIES as u64),
            ("live", live),
            ("peak_len", peak as u64),
            ("peak_bytes", peak_bytes as u64),
            ("swept_at_the_end", left as u64),
            ("executions_doubled", 0),
        ],
    );
}

/// Where a cancelled call was when its future was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Stage {
    /// Not polled yet, or waiting for another call's key (the in-memory claim is synchronous:
    /// there is no await inside it to cancel at).
    BeforeBody = 0,
    /// At one of the body's awaits.
    InBody = 1,
    /// The body returned `Ok` and the completion was awaited (a store reached through the
    /// trait, whose `complete` yields): the claim must be completed on drop, never released.
    AfterOk = 2,
}

/// The in-memory store reached through the `Store` trait (no `as_memory`), with a `complete`
/// that yields once before it completes: the one way a cancellation can land between a body's
/// `Ok` and its stored result. Dropped there, the executor hands the completion to
/// `complete_on_drop`, which the in-memory store finishes at once.
struct YieldingComplete(Arc<MemoryStore>);

impl Store for YieldingComplete {
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<idem::Fingerprint>,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<Claim, Error>> {
        self.0.claim(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> idem::store::BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.0.complete(key, token, fingerprint, value, ttl).await
        })
    }
    fn renew(
        &self,
        key: Key,
        token: idem::store::Token,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.renew(key, token, lease)
    }
    fn release(
        &self,
        key: Key,
        token: idem::store::Token,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.release(key, token)
    }
    fn wait(&self, key: Key, timeout: Duration) -> idem::store::BoxFuture<'_, Result<(), Error>> {
        self.0.wait(key, timeout)
    }
    fn remove(&self, key: Key) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.remove(key)
    }
    fn release_on_drop(&self, key: Key, token: idem::store::Token) {
        self.0.release_on_drop(key, token)
    }
    fn complete_on_drop(
        &self,
        key: Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        self.0.complete_on_drop(key, token, fingerprint, value, ttl)
    }
}

/// A small deterministic generator (xorshift), so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Calls over a few keys on a multi-threaded runtime, cancelled at random points: before their
/// first poll, while waiting for another call's key, at the body's awaits, and (through a store
/// whose completion yields) after the body returned `Ok`, before its result was stored. Bodies
/// that returned `Ok` are counted per key against the stored results: every key whose body ran
/// has exactly one stored result, that body's value, and no body ran twice. Reached directly,
/// the in-memory store completes in the same poll as the body's `Ok`, so no cancellation can
/// land between the two (counted: none does).
#[test]
fn calls_cancelled_at_random_points_never_double_an_execution() {
    const KEYS: u64 = 3;
    const CALLS: u64 = 12;
    let rounds = 200 * u64::from(scale());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let memory = Arc::new(MemoryStore::new());
    let through_trait = Arc::new(YieldingComplete(memory.clone()));
    let next_value = Arc::new(AtomicU64::new(1));
    // Cancellations by stage and store path (0: direct, 1: through the trait).
    let cancelled: Arc<[[AtomicU64; 3]; 2]> = Arc::default();
    let (mut calls, mut executions, mut stored, mut doubled) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..rounds {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (round + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let ran: Arc<Mutex<HashMap<u64, Vec<u64>>>> = Arc::default();
        let results = runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..CALLS {
                let key = rng.below(KEYS);
                let via_trait = rng.below(2) == 1;
                let body_yields = rng.below(6);
                // None: runs to the end; Some(0): dropped before its first poll; Some(n):
                // dropped after n yields of its caller, wherever the call is then.
                let cancel = match rng.below(3) {
                    0 => None,
                    _ => Some(rng.below(12)),
                };
                let (memory, through_trait, ran, next_value, cancelled) = (
                    memory.clone(),
                    through_trait.clone(),
                    ran.clone(),
                    next_value.clone(),
                    cancelled.clone(),
                );
                tasks.spawn(async move {
                    let stage = AtomicU8::new(Stage::BeforeBody as u8);
                    let body = || async {
                        stage.store(Stage::InBody as u8, Ordering::SeqCst);
                        for _ in 0..body_yields {
                            tokio::task::yield_now().await;
                        }
                        let v = next_value.fetch_add(1, Ordering::SeqCst);
                        ran.lock().unwrap().entry(key).or_default().push(v);
                        stage.store(Stage::AfterOk as u8, Ordering::SeqCst);
                        Ok::<u64, Error>(v)
                    };
                    let name = format!("cancel.{round}");
                    let call: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                        if via_trait {
                            Box::pin(Idempotent::new(&*through_trait, key).name(name).run(body))
                        } else {
                            Box::pin(Idempotent::new(&*memory, key).name(name).run(body))
                        };
                    let result = match cancel {
                        None => Some(call.await),
                        Some(0) => None,
                        Some(after) => tokio::select! {
                            r = call => Some(r),
                            () = async { for _ in 0..after { tokio::task::yield_now().await; } } => None,
                        },
                    };
                    if result.is_none() {
                        let at = stage.load(Ordering::SeqCst) as usize;
                        cancelled[usize::from(via_trait)][at].fetch_add(1, Ordering::SeqCst);
                    }
                    (key, result)
                });
            }
            let mut results = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                results.push(joined.expect("no caller panics"));
            }
            results
        });
        calls += CALLS;
        let ran = ran.lock().unwrap();
        // Every key whose body ran holds exactly that body's result.
        for key in 0..KEYS {
            let bodies = ran.get(&key).cloned().unwrap_or_default();
            executions += bodies.len() as u64;
            doubled += bodies.len().saturating_sub(1) as u64;
            let record = runtime.block_on(async {
                Store::claim(
                    &*memory,
                    Key::new(&format!("cancel.{round}"), &key),
                    None,
                    Duration::from_secs(30),
                )
                .await
            });
            match (record, bodies.first()) {
                (Ok(Claim::Completed(done)), Some(v)) => {
                    assert_eq!(
                        idem::codec::from_slice::<u64>(&done.value).ok(),
                        Some(*v),
                        "round {round} key {key}"
                    );
                    stored += 1;
                }
                (Ok(Claim::Acquired(_)), None) => {}
                (other, first) => panic!(
                    "round {round} key {key}: bodies {bodies:?} ran (first {first:?}), the store has {other:?}"
                ),
            }
        }
        for (key, result) in results {
            match result {
                None => {}
                Some(Ok(v)) => assert_eq!(
                    Some(&v),
                    ran.get(&key).and_then(|b| b.first()),
                    "round {round} key {key}"
                ),
                Some(Err(e)) => panic!("round {round} key {key}: {e}"),
            }
        }
        assert_eq!(doubled, 0, "round {round}: executions doubled: {ran:?}");
    }
    let count = |path: usize, stage: Stage| cancelled[path][stage as usize].load(Ordering::SeqCst);
    let total: u64 = (0..2)
        .map(|p| {
            [Stage::BeforeBody, Stage::InBody, Stage::AfterOk]
                .iter()
                .map(|s| count(p, *s))
                .sum::<u64>()
        })
        .sum();
    println!(
        "cancel_memory: {calls} calls, {total} cancelled (direct: {} before the body, {} in it, {} after its Ok; \
         through the trait: {} before, {} in, {} after its Ok), {executions} executions, {stored} stored",
        count(0, Stage::BeforeBody),
        count(0, Stage::InBody),
        count(0, Stage::AfterOk),
        count(1, Stage::BeforeBody),
        count(1, Stage::InBody),
        count(1, Stage::AfterOk),
    );
    assert_eq!(
        executions, stored,
        "every body that ran has its result stored"
    );
    assert_eq!(
        count(0, Stage::AfterOk),
        0,
        "the direct path completes in the poll of the body's Ok"
    );
    assert!(
        count(1, Stage::AfterOk) > 0,
        "no cancellation landed between a body's Ok and its completion"
    );
    assert!(
        count(0, Stage::InBody) + count(1, Stage::InBody) > 0 && count(0, Stage::BeforeBody) > 0
    );
    chaos::report(
        "cancel_memory",
        &[("cancellations", total), ("executions_doubled", doubled)],
    );
}
