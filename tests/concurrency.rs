//! Concurrency claims, tested with many tasks on a multi-threaded runtime and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem::{Error, MemoryStore, idempotent};

static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

/// Returns a number unique to the execution, so callers can tell whose result they got.
#[idempotent(store = store, key = key, name = "concurrency.stress")]
async fn work(store: &MemoryStore, key: u32) -> Result<usize, Error> {
    let execution = EXECUTIONS.fetch_add(1, Ordering::SeqCst);
    // Yield so concurrent callers pile up on the held key.
    tokio::task::yield_now().await;
    Ok(execution)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn a_thousand_calls_over_a_hundred_keys_execute_a_hundred_times() {
    let store = Arc::new(MemoryStore::new());
    let mut tasks = tokio::task::JoinSet::new();
    for call in 0..1_000u32 {
        let store = store.clone();
        tasks.spawn(async move {
            let key = call % 100;
            (key, work(&store, key).await)
        });
    }
    let mut seen: HashMap<u32, usize> = HashMap::new();
    let mut calls = 0;
    while let Some(joined) = tasks.join_next().await {
        let (key, result) = joined.expect("no task panics");
        let value = result.expect("every call gets a value");
        calls += 1;
        let first = *seen.entry(key).or_insert(value);
        assert_eq!(
            first, value,
            "every caller of key {key} gets the same value"
        );
    }
    assert_eq!(calls, 1_000);
    assert_eq!(seen.len(), 100);
    assert_eq!(
        EXECUTIONS.load(Ordering::SeqCst),
        100,
        "exactly one execution per key"
    );
}

/// Many rounds of 64 tasks racing on one fresh key through the function API.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn racing_tasks_on_one_key_run_the_body_once() {
    let store = Arc::new(MemoryStore::new());
    for round in 0..50u32 {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let (store, runs) = (store.clone(), runs.clone());
            tasks.spawn(async move {
                idem::Idempotent::new(&*store, ("race", round))
                    .name("test")
                    .run(|| async {
                        tokio::task::yield_now().await;
                        Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst))
                    })
                    .await
            });
        }
        while let Some(joined) = tasks.join_next().await {
            assert_eq!(joined.expect("no task panics").expect("a value"), 0);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
    }
}

/// Bodies that fail, panic or are cancelled never leave a key stuck, under contention.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn failures_under_contention_never_leave_a_key_held() {
    let store = Arc::new(MemoryStore::new());
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let (store, attempts) = (store.clone(), attempts.clone());
        tasks.spawn(async move {
            idem::Idempotent::new(&*store, ("flaky", i % 10))
                .name("test")
                .run(|| async move {
                    let n = attempts.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    match n % 3 {
                        0 => Err(Error::KeyReused), // any failure: not memoized
                        1 if i % 2 == 0 => panic!("body panics"),
                        _ => Ok(i % 10),
                    }
                })
                .await
        });
    }
    while tasks.join_next().await.is_some() {}
    // Every key is free or completed now: a final call per key gets a value promptly.
    for k in 0..10u32 {
        let value = idem::Idempotent::new(&*store, ("flaky", k))
            .name("test")
            .run(|| async move { Ok::<_, Error>(k) })
            .await
            .expect("no key is left held");
        assert_eq!(value, k);
    }
}
