//! In-memory benchmarks: the cost of `#[idempotent]` against what users would write instead, all
//! measured in the same run on the same value and key types.
//!
//! - replay (the key already completed): `#[idempotent]`, a hand-written `DashMap<K, Arc<V>>`
//!   get-and-clone (the floor), `moka`'s `get_with`, `cached`'s `#[cached]`;
//! - first execution (a fresh key every iteration), against the same three;
//! - 64 tasks racing on one key on a multi-threaded runtime, until all have the value;
//! - heap allocations per replay, counted by a global allocator (printed before the timings).
//!
//! Claims of new keys while a million records live and expire are in `expiry.rs` (they need
//! tokio's paused clock, which these must not have).
//!
//! Run with `cargo bench -p idem-benches --bench memory`; BENCHMARKS.md has the numbers and the
//! machine.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cached::proc_macro::cached;
use common::{Profile, profile};
use criterion::{Criterion, criterion_group, criterion_main};
use dashmap::DashMap;
use idem::{MemoryStore, idempotent};

/// Counts heap allocations, to report allocations per replay.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are this allocator's; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// First executions insert millions of keys: no bound on entries or bytes, like the baselines (a
// full store would answer "full" fast and the benchmark would measure that instead).
static STORE: std::sync::LazyLock<MemoryStore> = std::sync::LazyLock::new(|| {
    MemoryStore::builder()
        .max_entries(usize::MAX)
        .max_bytes(usize::MAX)
        .build()
});

#[idempotent(store = &*STORE, key = id, name = "bench.profile")]
async fn idem_profile(id: u64) -> Result<Profile, idem::Error> {
    Ok(profile(id))
}

#[cached(max_size = 10_000_000)]
async fn cached_profile(id: u64) -> Profile {
    profile(id)
}

/// The floor: what a hand-written memoization costs.
fn floor_get_or_insert(map: &DashMap<u64, Arc<Profile>>, id: u64) -> Profile {
    if let Some(v) = map.get(&id) {
        return (**v).clone();
    }
    let v = Arc::new(profile(id));
    map.entry(id).or_insert(v).value().as_ref().clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

const HOT: u64 = 42;

fn allocations_per_replay(rt: &tokio::runtime::Runtime) {
    const N: usize = 10_000;
    let floor: DashMap<u64, Arc<Profile>> = DashMap::new();
    floor_get_or_insert(&floor, HOT);
    rt.block_on(async {
        let _ = idem_profile(HOT).await;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..N {
            black_box(idem_profile(black_box(HOT)).await.expect("a replay"));
        }
        let idem = ALLOCATIONS.load(Ordering::Relaxed) - before;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..N {
            black_box(floor_get_or_insert(&floor, black_box(HOT)));
        }
        let floor = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "allocations per replay: #[idempotent] {:.1}, DashMap floor {:.1} (the floor's are the value's two strings)",
            idem as f64 / N as f64,
            floor as f64 / N as f64
        );
    });
}

/// The parts of a replay, to see where its time goes.
fn parts(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("parts");
    group.bench_function("key_derivation", |b| {
        b.iter(|| idem::Key::new(black_box("bench.profile"), &black_box(HOT)))
    });
    let store = MemoryStore::new();
    rt.block_on(async {
        idem::Idempotent::new(&store, HOT)
            .name("test")
            .run(|| async { Ok::<_, idem::Error>(profile(HOT)) })
            .await
            .ok()
    });
    let key = idem::Key::new("", &HOT);
    group.bench_function("store_claim_through_trait", |b| {
        b.to_async(&rt).iter(|| async {
            idem::Store::claim(&store, black_box(key), None, Duration::from_secs(30))
                .await
                .ok()
        })
    });
    group.bench_function("empty_async_call", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(profile_ref(black_box(HOT))) })
    });
    println!(
        "size of the future of an #[idempotent] call: {} bytes",
        std::mem::size_of_val(&idem_profile(HOT))
    );
    group.finish();
}

fn profile_ref(id: u64) -> u64 {
    id
}

fn replay(c: &mut Criterion) {
    let rt = runtime();
    allocations_per_replay(&rt);
    let floor: DashMap<u64, Arc<Profile>> = DashMap::new();
    let moka: moka::future::Cache<u64, Profile> = moka::future::Cache::new(10_000_000);
    rt.block_on(async {
        let _ = idem_profile(HOT).await;
        let _ = cached_profile(HOT).await;
        moka.get_with(HOT, async { profile(HOT) }).await;
    });
    floor_get_or_insert(&floor, HOT);

    let mut group = c.benchmark_group("replay");
    group.bench_function("dashmap_floor", |b| {
        b.iter(|| floor_get_or_insert(&floor, black_box(HOT)))
    });
    group.bench_function("idem", |b| {
        b.to_async(&rt)
            .iter(|| async { idem_profile(black_box(HOT)).await.expect("a replay") })
    });
    group.bench_function("moka", |b| {
        b.to_async(&rt)
            .iter(|| async { moka.get_with(black_box(HOT), async { profile(HOT) }).await })
    });
    group.bench_function("cached", |b| {
        b.to_async(&rt)
            .iter(|| async { cached_profile(black_box(HOT)).await })
    });
    group.finish();
}

fn first_execution(c: &mut Criterion) {
    let rt = runtime();
    let next = AtomicU64::new(1_000_000);
    let floor: DashMap<u64, Arc<Profile>> = DashMap::new();
    let moka: moka::future::Cache<u64, Profile> = moka::future::Cache::new(10_000_000);
    let fresh = || next.fetch_add(1, Ordering::Relaxed);

    let mut group = c.benchmark_group("first_execution");
    group.bench_function("dashmap_floor", |b| {
        b.iter(|| floor_get_or_insert(&floor, fresh()))
    });
    group.bench_function("idem", |b| {
        b.to_async(&rt)
            .iter(|| async { idem_profile(fresh()).await.expect("an execution") })
    });
    group.bench_function("moka", |b| {
        b.to_async(&rt).iter(|| async {
            let id = fresh();
            moka.get_with(id, async move { profile(id) }).await
        })
    });
    group.bench_function("cached", |b| {
        b.to_async(&rt)
            .iter(|| async { cached_profile(fresh()).await })
    });
    group.finish();
}

/// 64 tasks racing on one fresh key: the time until every task has the value.
fn racing(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let store = Arc::new(MemoryStore::new());
    let next = Arc::new(AtomicU64::new(0));
    let mut group = c.benchmark_group("racing_64_tasks_one_key");
    group.bench_function("idem", |b| {
        b.iter_custom(|iters| {
            let (store, next) = (store.clone(), next.clone());
            rt.block_on(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..64 {
                        let store = store.clone();
                        tasks.spawn(async move {
                            idem::Idempotent::new(&*store, key)
                                .name("test")
                                .run(|| async move { Ok::<_, idem::Error>(profile(key)) })
                                .await
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        black_box(done.ok());
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    let moka: Arc<moka::future::Cache<u64, Profile>> =
        Arc::new(moka::future::Cache::new(10_000_000));
    group.bench_function("moka", |b| {
        b.iter_custom(|iters| {
            let (moka, next) = (moka.clone(), next.clone());
            rt.block_on(async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..64 {
                        let moka = moka.clone();
                        tasks.spawn(async move {
                            moka.get_with(key, async move { profile(key) }).await
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        black_box(done.ok());
                    }
                    total += start.elapsed();
                }
                total
            })
        })
    });
    group.finish();
}

/// A ttl that lets the store expire the steps group's records as it goes (a million records
/// is its default bound).
const SHORT: Duration = Duration::from_millis(1);

/// What steps cost a first execution on the in-memory store: a body without steps (the
/// baseline: what every call pays for the steps machinery is in it), the same body with three
/// steps, and a retry that finds the three steps recorded by a failed call.
fn steps(c: &mut Criterion) {
    let rt = runtime();
    let store = MemoryStore::new();
    let next = AtomicU64::new(0);
    let fresh = || next.fetch_add(1, Ordering::Relaxed);
    let mut group = c.benchmark_group("steps");
    group.bench_function("no_steps", |b| {
        b.to_async(&rt).iter(|| async {
            let id = fresh();
            idem::Idempotent::new(&store, id)
                .name("bench.steps")
                .ttl(SHORT)
                .run(|| async move { Ok::<_, idem::Error>(profile(id)) })
                .await
                .expect("an execution")
        })
    });
    group.bench_function("three_steps", |b| {
        b.to_async(&rt).iter(|| async {
            let id = fresh();
            idem::Idempotent::new(&store, id)
                .name("bench.steps")
                .ttl(SHORT)
                .run(|| async move {
                    let a = idem::step("a", || async { Ok::<_, idem::Error>(id) }).await?;
                    let b = idem::step("b", || async { Ok::<_, idem::Error>(id + 1) }).await?;
                    let c = idem::step("c", || async { Ok::<_, idem::Error>(id + 2) }).await?;
                    Ok::<_, idem::Error>(profile(a + b + c))
                })
                .await
                .expect("an execution")
        })
    });
    group.bench_function("failed_then_resumed_three_steps", |b| {
        b.to_async(&rt).iter(|| async {
            let id = fresh();
            for fail in [true, false] {
                let _ = idem::Idempotent::new(&store, id)
                    .name("bench.steps")
                    .ttl(SHORT)
                    .run(|| async move {
                        let a = idem::step("a", || async { Ok::<_, idem::Error>(id) }).await?;
                        let b = idem::step("b", || async { Ok::<_, idem::Error>(id + 1) }).await?;
                        let c = idem::step("c", || async { Ok::<_, idem::Error>(id + 2) }).await?;
                        if fail {
                            return Err(idem::Error::InProgress {
                                retry_after: Duration::ZERO,
                            });
                        }
                        Ok::<_, idem::Error>(profile(a + b + c))
                    })
                    .await;
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parts, replay, first_execution, racing, steps);
criterion_main!(benches);
