//! Redis benchmarks: `RedisStore` against the raw floor measured with the same client and the same
//! server in the same run, at 1, 8 and 64 concurrent callers. Criterion reports calls per second
//! (one element = one call).
//!
//! - replay: `#[idempotent]`-style calls through `Idempotent` on a completed key (one `EVALSHA`),
//!   against one `GET` of a key (the floor for reading a stored result);
//! - first execution: a fresh key per call (claim + complete: two `EVALSHA`), against `SET NX PX`
//!   + `SET XX PX` (the floor for claiming and completing with plain commands).
//!
//! The server is a real `redis-server` that the benchmark starts on a free loopback port (the
//! tests' harness). Run with `cargo bench --bench redis --features redis`.

mod common;

#[path = "../tests/support/redis.rs"]
#[allow(dead_code)]
mod redis_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CONCURRENCY, Profile, profile, rounds};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idem::{Idempotent, RedisStore};
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
