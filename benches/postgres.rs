//! PostgreSQL benchmarks: `PostgresStore` against the raw floor measured through the same pool
//! and the same server in the same run, at 1, 8 and 64 concurrent callers. Criterion reports calls
//! per second (one element = one call).
//!
//! - replay: calls through `Idempotent` on a completed key (one claim statement), against one
//!   `SELECT value FROM floor WHERE key = $1` (the floor for reading a stored result);
//! - first execution: a fresh key per call (claim + complete: two statements), against
//!   `INSERT ... ON CONFLICT DO NOTHING` + `UPDATE ... SET value` (the floor for claiming and
//!   completing with plain statements).
//!
//! - wake: 64 waiters of one key through another store instance (another pool, as another
//!   process would have), woken when the holder completes: the time from the holder's
//!   `complete` to the last waiter's result, with the waiters' store polling
//!   (`notifications(false)`, the behaviour before `LISTEN`/`NOTIFY`) and listening.
//!
//! Each of the first two groups also measures `idem_pooler`: the same calls on a store in
//! `transaction_pooler(true)` mode (unnamed statements, parsed and planned on every call),
//! against the same server directly, which is what that mode costs before any pooler's own hop.
//!
//! The server is a real PostgreSQL that the benchmark creates with `initdb` on a free loopback port
//! (the tests' harness). Run with `cargo bench -p idem-benches --features postgres --bench postgres`.

mod common;

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod pg_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CONCURRENCY, Profile, profile, rounds};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use idem::{Idempotent, PostgresStore};
use pg_support::PgServer;

const HOT: u64 = 42;

fn bench(c: &mut Criterion) {
    let server = PgServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let store = rt.block_on(async {
        let store = PostgresStore::builder()
            .pool_size(64)
            .connect(&server.url())
            .await
            .expect("a store");
        store.migrate().await.expect("migrate");
        let client = store.pool().get().await.expect("a connection");
        client
            .batch_execute(
                "CREATE TABLE floor (key bytea PRIMARY KEY, value bytea); \
                 INSERT INTO floor VALUES ('hot', NULL)",
            )
            .await
            .expect("the floor's table");
        let value = serde_json::to_vec(&profile(HOT)).expect("encode");
        client
            .execute("UPDATE floor SET value = $1 WHERE key = 'hot'", &[&value])
            .await
            .expect("the floor's hot row");
        Idempotent::new(&store, HOT)
            .name("test")
            .run(|| async { Ok::<_, idem::Error>(profile(HOT)) })
            .await
            .expect("warm the hot key");
        Arc::new(store)
    });
    let pooler = rt.block_on(async {
        let pooler = PostgresStore::builder()
            .pool_size(64)
            .transaction_pooler(true)
            .connect(&server.url())
            .await
            .expect("a store in pooler mode");
        pooler.migrate().await.expect("migrate");
        Arc::new(pooler)
    });

    let mut group = c.benchmark_group("postgres_replay");
    group.measurement_time(Duration::from_secs(4));
    for callers in CONCURRENCY {
        group.throughput(Throughput::Elements(callers as u64));
        group.bench_function(BenchmarkId::new("floor_select", callers), |b| {
            b.iter_custom(|iters| {
                let store = store.clone();
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let store = store.clone();
                    async move {
                        let client = store.pool().get().await.expect("a connection");
                        let statement = client
                            .prepare_cached("SELECT value FROM floor WHERE key = $1")
                            .await
                            .expect("prepare");
                        let row = client
                            .query_one(&statement, &[&b"hot".as_slice()])
                            .await
                            .expect("SELECT");
                        let value: Vec<u8> = row.get(0);
                        let p: Profile = serde_json::from_slice(&value).expect("decode");
                        std::hint::black_box(p);
                    }
                }))
            })
        });
        group.bench_function(BenchmarkId::new("idem", callers), |b| {
            b.iter_custom(|iters| {
                let store = store.clone();
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let store = store.clone();
                    async move {
                        let p = Idempotent::new(&*store, HOT)
                            .name("test")
                            .run(|| async { Ok::<_, idem::Error>(profile(HOT)) })
                            .await
                            .expect("a replay");
                        std::hint::black_box(p);
                    }
                }))
            })
        });
        group.bench_function(BenchmarkId::new("idem_pooler", callers), |b| {
            b.iter_custom(|iters| {
                let pooler = pooler.clone();
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let pooler = pooler.clone();
                    async move {
                        let p = Idempotent::new(&*pooler, HOT)
                            .name("test")
                            .run(|| async { Ok::<_, idem::Error>(profile(HOT)) })
                            .await
                            .expect("a replay");
                        std::hint::black_box(p);
                    }
                }))
            })
        });
    }
    group.finish();

    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("postgres_first_execution");
    group.measurement_time(Duration::from_secs(4));
    for callers in CONCURRENCY {
        group.throughput(Throughput::Elements(callers as u64));
        group.bench_function(BenchmarkId::new("floor_insert_update", callers), |b| {
            b.iter_custom(|iters| {
                let (store, next) = (store.clone(), next.clone());
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let store = store.clone();
                    let key = next.fetch_add(1, Ordering::Relaxed).to_le_bytes().to_vec();
                    async move {
                        let client = store.pool().get().await.expect("a connection");
                        let claim = client
                            .prepare_cached(
                                "INSERT INTO floor (key) VALUES ($1) ON CONFLICT DO NOTHING",
                            )
                            .await
                            .expect("prepare");
                        let claimed = client.execute(&claim, &[&key]).await.expect("INSERT");
                        assert_eq!(claimed, 1, "a fresh key is free");
                        let value = serde_json::to_vec(&profile(1)).expect("encode");
                        let complete = client
                            .prepare_cached("UPDATE floor SET value = $2 WHERE key = $1")
                            .await
                            .expect("prepare");
                        client
                            .execute(&complete, &[&key, &value])
                            .await
                            .expect("UPDATE");
                    }
                }))
            })
        });
        group.bench_function(BenchmarkId::new("idem", callers), |b| {
            b.iter_custom(|iters| {
                let (store, next) = (store.clone(), next.clone());
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let store = store.clone();
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let p = Idempotent::new(&*store, ("fresh", key))
                            .name("test")
                            .run(|| async { Ok::<_, idem::Error>(profile(key)) })
                            .await
                            .expect("an execution");
                        std::hint::black_box(p);
                    }
                }))
            })
        });
        group.bench_function(BenchmarkId::new("idem_pooler", callers), |b| {
            b.iter_custom(|iters| {
                let (pooler, next) = (pooler.clone(), next.clone());
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let pooler = pooler.clone();
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let p = Idempotent::new(&*pooler, ("fresh", key))
                            .name("test")
                            .run(|| async { Ok::<_, idem::Error>(profile(key)) })
                            .await
                            .expect("an execution");
                        std::hint::black_box(p);
                    }
                }))
            })
        });
    }
    group.finish();

    wake(c, &server, &rt, &store);
}

/// The waiters of one key in another store: how long from the holder's completion until the
/// last of 64 has its result, polling against listening.
fn wake(
    c: &mut Criterion,
    server: &PgServer,
    rt: &tokio::runtime::Runtime,
    holder: &PostgresStore,
) {
    const WAITERS: usize = 64;
    let waiters = |listen: bool| {
        rt.block_on(async {
            let store = PostgresStore::builder()
                .pool_size(16)
                .notifications(listen)
                .connect(&server.url())
                .await
                .expect("a waiters' store");
            store.migrate().await.expect("migrate");
            Arc::new(store)
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("postgres_wake");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    for (name, listen) in [("polling", false), ("notify", true)] {
        let store = waiters(listen);
        group.bench_function(BenchmarkId::new(name, WAITERS), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
                        let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
                        let first = {
                            let holder = holder.clone();
                            tokio::spawn(async move {
                                Idempotent::new(&holder, k)
                                    .name("wake")
                                    .run(|| async move {
                                        let _ = entered_tx.send(());
                                        let _ = go.await;
                                        Ok::<_, idem::Error>(1u64)
                                    })
                                    .await
                                    .expect("the holder's call")
                            })
                        };
                        entered.await.expect("the holder runs");
                        let mut tasks = tokio::task::JoinSet::new();
                        for _ in 0..WAITERS {
                            let store = store.clone();
                            tasks.spawn(async move {
                                Idempotent::new(&*store, k)
                                    .name("wake")
                                    .run(|| async { Ok::<_, idem::Error>(0u64) })
                                    .await
                                    .expect("a waiter's result")
                            });
                        }
                        // Every waiter is asleep (a polling one at its longest pause, 200 ms).
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        // From the body's return: the holder's `complete`, then every waiter
                        // woken (or polling), claiming again and replaying.
                        let started = std::time::Instant::now();
                        let _ = go_tx.send(());
                        assert_eq!(first.await.expect("the holder"), 1);
                        while let Some(done) = tasks.join_next().await {
                            assert_eq!(done.expect("a waiter"), 1, "the holder's value");
                        }
                        total += started.elapsed();
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
