//! Redis, idem against the `idempotent` crate (2.x) on the same `redis-server`, on the workloads
//! and value type of `../redis.rs`: a replay of a completed key, and a first execution (a fresh
//! key every call), by 1, 8 and 64 concurrent callers (tasks on a two-worker runtime).
//!
//! Each side is used as its documentation shows: idem through `#[idempotent]` on a
//! `RedisStore`; `idempotent` through `claim(..).fingerprint(..).json().execute_or_replay(..)` on
//! its `ValkeyStore` (feature `valkey`), with the key as a string. Both connect with their
//! defaults to one server, a real `redis-server` that the benchmark starts on a free loopback
//! port (the tests' harness, as `../redis.rs` does) and stops when it ends.
//!
//! Run with `cargo bench --ignore-rust-version --bench peer_redis` in this directory
//! (`scripts/bench-memory --redis` runs it with the in-memory ones).

#[path = "../common/mod.rs"]
mod common;

#[path = "../../tests/support/redis.rs"]
#[allow(dead_code)]
mod redis_support;

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CONCURRENCY, Profile, profile, rounds};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idem::{RedisStore, idempotent};
use idempotent::store::valkey::ValkeyStore;
use idempotent::{ExecutionOutcome, IdempotencyKey, IdempotencyStore};
use redis_support::RedisServer;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
const HOT: u64 = 42;

#[idempotent(store = store, key = id, name = "bench.profile")]
async fn idem_profile(store: &RedisStore, id: u64) -> Result<Profile, idem::Error> {
    Ok(profile(id))
}

async fn peer_profile(store: &ValkeyStore, id: u64) -> Profile {
    let key = IdempotencyKey::new(id.to_string()).expect("a valid key");
    let outcome = store
        .claim(&key, LEASE)
        .fingerprint("profile", b"")
        .json()
        .execute_or_replay(TTL, |_token| async move { Ok(profile(id)) })
        .await;
    match outcome {
        Ok(ExecutionOutcome::Executed(v) | ExecutionOutcome::Replayed(v)) => v,
        _ => panic!("the peer neither executed nor replayed"),
    }
}

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (idem, peer) = rt.block_on(async {
        let idem = RedisStore::connect(&server.url())
            .await
            .expect("connect idem's store");
        let peer = ValkeyStore::with_url(server.url())
            .prefix("peer")
            .try_build()
            .await
            .expect("connect the peer's store");
        (Arc::new(idem), peer)
    });
    rt.block_on(async {
        black_box(idem_profile(&idem, HOT).await.expect("an execution"));
        black_box(peer_profile(&peer, HOT).await);
    });
    let next = Arc::new(AtomicU64::new(1_000_000_000_000));

    for (group_name, fresh) in [("replay", false), ("first_execution", true)] {
        let mut group = c.benchmark_group(format!("peer_redis_{group_name}"));
        for callers in CONCURRENCY {
            group.throughput(Throughput::Elements(1));
            let id = move |next: &AtomicU64| {
                if fresh {
                    next.fetch_add(1, Ordering::Relaxed)
                } else {
                    HOT
                }
            };
            let (n, store) = (next.clone(), idem.clone());
            group.bench_function(BenchmarkId::new("idem", callers), |b| {
                b.iter_custom(|iters| {
                    let (n, store) = (n.clone(), store.clone());
                    rt.block_on(rounds(iters, callers, move |_| {
                        let (n, store) = (n.clone(), store.clone());
                        async move {
                            black_box(idem_profile(&store, id(&n)).await.expect("a call"));
                        }
                    }))
                })
            });
            let (n, store) = (next.clone(), peer.clone());
            group.bench_function(BenchmarkId::new("idempotent", callers), |b| {
                b.iter_custom(|iters| {
                    let (n, store) = (n.clone(), store.clone());
                    rt.block_on(rounds(iters, callers, move |_| {
                        let (n, store) = (n.clone(), store.clone());
                        async move {
                            black_box(peer_profile(&store, id(&n)).await);
                        }
                    }))
                })
            });
        }
        group.finish();
    }
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
