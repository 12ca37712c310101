//! Redis benchmarks: `RedisStore` against the raw floor measured with the same client and the same
//! server in the same run, at 1, 8 and 64 concurrent callers. Criterion reports calls per second
//! (one element = one call).
//!
//! - replay: `#[idempotent]`-style calls through `Idempotent` on a completed key (one `EVALSHA`),
//!   against one `GET` of a key (the floor for reading a stored result);
//! - first execution: a fresh key per call (claim + complete: two `EVALSHA`), against `SET NX PX`
//!   + `SET XX PX` (the floor for claiming and completing with plain commands).
//!
//! - wake: 64 callers waiting for one key that another store holds (their own store: another
//!   connection set, as another process would have); the time from the holder's completion to
//!   the last waiter's result, with the waiters polling (`pubsub(false)`, 5 ms doubling to
//!   100 ms: how every waiter waited before pub/sub) and woken by pub/sub.
//!
//! The server is a real `redis-server` that the benchmark starts on a free loopback port (the
//! tests' harness). Run with `cargo bench -p idem-benches --features redis --bench redis`.

mod common;

#[path = "../tests/support/redis.rs"]
#[allow(dead_code)]
mod redis_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{CONCURRENCY, Profile, profile, rounds};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use idem::store::Claim;
use idem::{Idempotent, Key, RedisStore, Store};
use redis_support::RedisServer;

const HOT: u64 = 42;

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (store, raw) = rt.block_on(async {
        let store = RedisStore::connect(&server.url())
            .await
            .expect("connect the store");
        let client = redis::Client::open(server.url()).expect("a redis client");
        let raw = redis::aio::ConnectionManager::new(client)
            .await
            .expect("connect the floor");
        (Arc::new(store), raw)
    });
    rt.block_on(async {
        Idempotent::new(&*store, HOT)
            .name("test")
            .run(|| async { Ok::<_, idem::Error>(profile(HOT)) })
            .await
            .expect("warm the hot key");
        let value = serde_json::to_vec(&profile(HOT)).expect("encode");
        let mut raw = raw.clone();
        redis::cmd("SET")
            .arg("floor:hot")
            .arg(value)
            .query_async::<()>(&mut raw)
            .await
            .expect("set the floor's hot key");
    });

    let mut group = c.benchmark_group("redis_replay");
    group.measurement_time(Duration::from_secs(4));
    for callers in CONCURRENCY {
        group.throughput(Throughput::Elements(callers as u64));
        group.bench_function(BenchmarkId::new("floor_get", callers), |b| {
            b.iter_custom(|iters| {
                let raw = raw.clone();
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let mut raw = raw.clone();
                    async move {
                        let v: Option<Vec<u8>> = redis::cmd("GET")
                            .arg("floor:hot")
                            .query_async(&mut raw)
                            .await
                            .expect("GET");
                        let p: Profile =
                            serde_json::from_slice(&v.expect("the hot key")).expect("decode");
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
    }
    group.finish();

    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("redis_first_execution");
    group.measurement_time(Duration::from_secs(4));
    for callers in CONCURRENCY {
        group.throughput(Throughput::Elements(callers as u64));
        group.bench_function(BenchmarkId::new("floor_setnx_set", callers), |b| {
            b.iter_custom(|iters| {
                let (raw, next) = (raw.clone(), next.clone());
                rt.block_on(rounds(iters * callers as u64, callers, move |_| {
                    let mut raw = raw.clone();
                    let key = format!("floor:{}", next.fetch_add(1, Ordering::Relaxed));
                    async move {
                        let claimed: Option<String> = redis::cmd("SET")
                            .arg(&key)
                            .arg("running")
                            .arg("NX")
                            .arg("PX")
                            .arg(30_000)
                            .query_async(&mut raw)
                            .await
                            .expect("SET NX");
                        assert!(claimed.is_some(), "a fresh key is free");
                        let value = serde_json::to_vec(&profile(1)).expect("encode");
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(value)
                            .arg("XX")
                            .arg("PX")
                            .arg(86_400_000)
                            .query_async::<()>(&mut raw)
                            .await
                            .expect("SET XX");
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
    }
    group.finish();

    wake(c, &rt, &server, &store);
}

/// Callers waiting for one key in the wake benchmark.
const WAITERS: usize = 64;

/// The wake benchmark: per iteration, `holder` claims a fresh key, [`WAITERS`] callers of
/// another store wait for it, and `holder` completes it after 150 to 350 ms (varied, so that
/// polling waiters are caught at every point of their backoff). Measured: from just before the
/// completion is sent to the last waiter's result.
fn wake(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    server: &RedisServer,
    holder: &Arc<RedisStore>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("redis_wake_64_waiters");
    // Each iteration holds the key for a few hundred ms that are not measured: one iteration
    // per sample, whatever criterion would plan from the (short) measured times.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_millis(1));
    for (label, pubsub) in [("poll", false), ("pubsub", true)] {
        let waiting = rt.block_on(async {
            Arc::new(
                RedisStore::builder()
                    .pubsub(pubsub)
                    .connect(&server.url())
                    .await
                    .expect("connect the waiting store"),
            )
        });
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let (holder, waiting, next) = (holder.clone(), waiting.clone(), next.clone());
                rt.block_on(async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        total += wake_once(&holder, &waiting, id).await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

async fn wake_once(holder: &RedisStore, waiting: &Arc<RedisStore>, id: u64) -> Duration {
    let key = Key::new("bench", &("wake", id));
    let token = match holder.claim(key, None, Duration::from_secs(60)).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("a fresh key is free: {other:?}"),
    };
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..WAITERS {
        let waiting = waiting.clone();
        waiters.spawn(async move {
            let p = Idempotent::new(&*waiting, ("wake", id))
                .name("bench")
                .run(|| async { Ok::<_, idem::Error>(profile(0)) })
                .await
                .expect("a waiter gets the holder's result");
            std::hint::black_box(p);
            Instant::now()
        });
    }
    tokio::time::sleep(Duration::from_millis(150 + (id * 67) % 200)).await;
    let value = idem::codec::to_vec(&profile(id)).expect("encode");
    let completed = Instant::now();
    holder
        .complete(key, token, None, value.into(), Duration::from_secs(60))
        .await
        .expect("complete");
    let mut last = completed;
    while let Some(done) = waiters.join_next().await {
        last = last.max(done.expect("a waiter task"));
    }
    last - completed
}

criterion_group!(benches, bench);
criterion_main!(benches);
