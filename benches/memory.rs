//! In-memory benchmarks: the cost of `#[idempotent]` against what users would write instead, all
//! measured in the same run on the same value and key types.
//!
//! - replay (the key already completed): `#[idempotent]`, a hand-written `DashMap<K, Arc<V>>`
//!   get-and-clone (the floor), `moka`'s `get_with`, `cached`'s `#[cached]`;
//! - first execution (a fresh key every iteration), against the same three;
//! - 64 tasks racing on one key on a multi-threaded runtime, until all have the value;
//! - heap allocations per replay, counted by a global allocator (printed before the timings);
//! - claims of new keys while a million records live and expire as new ones arrive (issue 14):
//!   the latency of each claim, printed as p50 / p99 / p99.9 / max with its distribution, next to
//!   the same percentiles of an empty timed section (what the OS alone costs on this machine).
//!
//! Run with `cargo bench --bench memory`; BENCHMARKS.md has the numbers and the machine.

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
use idem::store::{Bytes, Claim};
use idem::{Key, MemoryStore, Store, idempotent};

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

/// A distinct key per number, straight from its digest (the key derivation is measured apart).
fn numbered_key(n: u64) -> Key {
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    digest[8..16].copy_from_slice(&n.to_le_bytes());
    Key::from_digest(digest)
}

/// Percentiles of latencies in nanoseconds, as one line.
fn percentiles(what: &str, samples: &mut [u64]) {
    if samples.is_empty() {
        return;
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let max = samples[samples.len() - 1];
    println!(
        "{what}: n={} p50={} ns p99={} ns p99.9={} ns max={} ns (max/p50 {:.1}x)",
        samples.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        max,
        max as f64 / at(0.5).max(1) as f64
    );
    // The distribution: how many samples fall in each power-of-two band above 1 µs.
    let mut line = String::from("  distribution:");
    let mut lo = 0u64;
    let mut hi = 1_024u64;
    while lo <= max {
        let n = samples.iter().filter(|&&s| s >= lo && s < hi).count();
        if n > 0 {
            line.push_str(&format!(" [{}µs,{}µs):{n}", lo / 1_000, hi / 1_000));
        }
        lo = hi;
        hi *= 2;
    }
    println!("{line}");
    let top: Vec<u64> = samples.iter().rev().take(8).map(|s| s / 1_000).collect();
    println!("  largest (µs): {top:?}");
}

/// The CPU time this thread has run, in nanoseconds: unlike the wall clock, it leaves out the
/// time the OS gave the core to another process, so that a stall of the store's own work can be
/// told from a preemption on a shared machine. `None` where it is not implemented.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_ns() -> Option<u64> {
    /// `struct timespec` on 64-bit Linux: two `long`s.
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime(2)` writes one `struct timespec` through its pointer and nothing
    // else; `ts` is a live, aligned, writable value of that layout (two 64-bit fields on 64-bit
    // Linux, which the `cfg` restricts this to), and the clock id is the kernel's constant.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

/// The memory resident in this process, in bytes (Linux: `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Claims of new keys while a million records live, in steady state: every record lives one
/// (paused, hand-advanced) tokio second, and a million claims are made per tokio second, so
/// records expire as fast as new ones arrive. The first million claims, as the store grows, are
/// timed too (a table that doubles is a stall). After a fill of two million claims, three
/// million claims are each timed on their own, by the wall clock and by the thread's CPU time; the
/// completion that follows each is timed apart, and so are, as controls, an empty timed section
/// (what the clocks cost) and a spin as long as a median claim that touches no memory (what the
/// OS and the hypervisor add to any section that long: its tail is the machine's, not the
/// store's). The distribution is recorded by the harness, not by criterion's sampling: a stall
/// once a second is what this measures, and a mean would hide it.
fn expiry(c: &mut Criterion) {
    const LIVE: u64 = 1_000_000;
    const MEASURED: usize = 3_000_000;
    const STEP: u64 = 16; // claims between two advances of the clock
    let tick = Duration::from_micros(1); // tokio time per claim
    let ttl = tick * LIVE as u32;
    let lease = Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    // Room for a million live records and the expired ones not yet removed.
    let store = MemoryStore::with_max_entries(2 * LIVE as usize);
    let next = std::cell::Cell::new(0u64);
    // One claim of a new key and its completion: wall and CPU time of the claim, wall time of
    // the completion.
    let one = async || {
        let n = next.get();
        next.set(n + 1);
        let key = numbered_key(n);
        let cpu = thread_cpu_ns();
        let start = Instant::now();
        let claim = store.claim(key, None, lease).await;
        let claimed = start.elapsed().as_nanos() as u64;
        let claimed_cpu = thread_cpu_ns().zip(cpu).map_or(0, |(b, a)| b - a);
        let Ok(Claim::Acquired(token)) = claim else {
            panic!("a new key must be acquired, got {claim:?}");
        };
        let start = Instant::now();
        let done = store
            .complete(key, token, None, Bytes::from_static(b"1"), ttl)
            .await;
        let completed = start.elapsed().as_nanos() as u64;
        black_box(done.ok());
        if (n + 1).is_multiple_of(STEP) {
            tokio::time::advance(tick * STEP as u32).await;
        }
        [claimed, claimed_cpu, completed]
    };
    let mut recorded: Option<[Vec<u64>; 6]> = None;
    let mut group = c.benchmark_group("expiry_1m_live");
    group.sample_size(10);
    group.bench_function("claim_new_key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                if recorded.is_none() {
                    // A million live records first (the store grows: its tables double as it
                    // does, each shard at once), and one ttl more, so that records expire as
                    // new ones arrive from the first measured claim on.
                    let mut growth = [0; 2].map(|_| Vec::with_capacity(LIVE as usize));
                    let resident_before = resident_bytes();
                    for _ in 0..LIVE {
                        let [wall, cpu, _] = one().await;
                        growth[0].push(wall);
                        growth[1].push(cpu);
                    }
                    if let (Some(before), Some(after)) = (resident_before, resident_bytes()) {
                        println!(
                            "resident memory per record (1-byte results): {} bytes, against an \
                             accounted {} bytes per record",
                            after.saturating_sub(before) / LIVE,
                            store.bytes() as u64 / LIVE,
                        );
                    }
                    let [mut wall, mut cpu] = growth;
                    percentiles(
                        "claim of a new key, growing to 1M records (wall)",
                        &mut wall,
                    );
                    if thread_cpu_ns().is_some() {
                        percentiles(
                            "claim of a new key, growing to 1M records (thread CPU time)",
                            &mut cpu,
                        );
                    }
                    let mut steady = Vec::with_capacity(LIVE as usize);
                    for _ in 0..LIVE {
                        steady.push(one().await[0]);
                    }
                    // The control: a spin as long as the median claim of the fill's last
                    // (steady) half.
                    steady.sort_unstable();
                    let spins = calibrate_spin(Duration::from_nanos(steady[steady.len() / 2]));
                    let mut samples = [0; 6].map(|_| Vec::with_capacity(MEASURED));
                    for _ in 0..MEASURED {
                        for (i, t) in one().await.into_iter().enumerate() {
                            samples[i].push(t);
                        }
                        let cpu = thread_cpu_ns();
                        let start = Instant::now();
                        black_box(&start);
                        samples[3].push(start.elapsed().as_nanos() as u64);
                        samples[4].push(thread_cpu_ns().zip(cpu).map_or(0, |(b, a)| b - a));
                        let start = Instant::now();
                        spin(spins);
                        samples[5].push(start.elapsed().as_nanos() as u64);
                    }
                    let mean = samples[0].iter().sum::<u64>() / MEASURED as u64;
                    recorded = Some(samples);
                    return Duration::from_nanos(mean * iters);
                }
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += Duration::from_nanos(one().await[0]);
                }
                total
            })
        })
    });
    group.finish();
    if let Some(
        [
            mut claims,
            mut claims_cpu,
            mut completes,
            mut empty,
            mut empty_cpu,
            mut spun,
        ],
    ) = recorded
    {
        println!("records at the end: {}", store.len());
        percentiles("claim of a new key, 1M live records (wall)", &mut claims);
        if thread_cpu_ns().is_some() {
            percentiles(
                "claim of a new key, 1M live records (thread CPU time)",
                &mut claims_cpu,
            );
        }
        percentiles("complete, 1M live records (wall)", &mut completes);
        percentiles("empty timed section (wall: the OS noise floor)", &mut empty);
        if thread_cpu_ns().is_some() {
            percentiles("empty timed section (thread CPU time)", &mut empty_cpu);
        }
        percentiles(
            "spin as long as a median claim (wall: the machine's tail)",
            &mut spun,
        );
    }
}

/// Spins `n` rounds of arithmetic on registers only.
fn spin(n: u64) -> u64 {
    let mut x = black_box(0x9e37_79b9_7f4a_7c15_u64);
    for _ in 0..n {
        x = black_box(x.rotate_left(5) ^ 0x2545_f491);
    }
    x
}

/// How many rounds of [`spin`] take about `target`.
fn calibrate_spin(target: Duration) -> u64 {
    let rounds = 1_000_000;
    let start = Instant::now();
    spin(rounds);
    let per_round = start.elapsed().as_nanos().max(1) as f64 / rounds as f64;
    (target.as_nanos() as f64 / per_round).max(1.0) as u64
}

criterion_group!(benches, parts, replay, first_execution, racing, expiry);
criterion_main!(benches);
