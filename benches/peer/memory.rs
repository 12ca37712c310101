//! In-memory store, idem against the `idempotent` crate (2.x), on the workloads and value type of
//! `../memory.rs`: a replay of a completed key, and a first execution (a fresh key every call),
//! by 1 caller and by 64 concurrent callers (tasks on a two-worker runtime).
//!
//! Each side is used as its documentation shows: idem through `#[idempotent]` on a
//! `MemoryStore`; `idempotent` through `claim(..).fingerprint(..).json().execute_or_replay(..)`
//! on its `MemoryStore` (its builder requires a fingerprint before `execute_or_replay`; an empty
//! body is given), with the key as a string (`IdempotencyKey::new(id.to_string())`).
//!
//! Run with `cargo bench --ignore-rust-version` in this directory.

#[path = "../common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Profile, profile, rounds};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idem::{MemoryStore, idempotent};
use idempotent::memory::MemoryStore as PeerStore;
use idempotent::{ExecutionOutcome, IdempotencyKey, IdempotencyStore};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
const HOT: u64 = 42;

// No bound on entries or bytes, like the peer's store (first executions insert millions of keys).
static STORE: LazyLock<MemoryStore> = LazyLock::new(|| {
    MemoryStore::builder()
        .max_entries(usize::MAX)
        .max_bytes(usize::MAX)
        .build()
});

#[idempotent(store = &*STORE, key = id, name = "bench.profile")]
async fn idem_profile(id: u64) -> Result<Profile, idem::Error> {
    Ok(profile(id))
}

async fn peer_profile(store: &PeerStore, id: u64) -> Profile {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let peer = rt.block_on(async { PeerStore::builder().try_build().expect("the peer's store") });
    rt.block_on(async {
        black_box(idem_profile(HOT).await.expect("an execution"));
        black_box(peer_profile(&peer, HOT).await);
    });
    let next = std::sync::Arc::new(AtomicU64::new(1_000_000_000_000));

    for (group_name, fresh) in [("replay", false), ("first_execution", true)] {
        let mut group = c.benchmark_group(format!("peer_{group_name}"));
        for callers in [1usize, 64] {
            group.throughput(Throughput::Elements(1));
            let id = move |next: &AtomicU64| {
                if fresh {
                    next.fetch_add(1, Ordering::Relaxed)
                } else {
                    HOT
                }
            };
            let n = next.clone();
            group.bench_function(BenchmarkId::new("idem", callers), |b| {
                b.iter_custom(|iters| {
                    let n = n.clone();
                    rt.block_on(rounds(iters, callers, move |_| {
                        let n = n.clone();
                        async move {
                            black_box(idem_profile(id(&n)).await.expect("a call"));
                        }
                    }))
                })
            });
            let n = next.clone();
            let store = peer.clone();
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
