//! Claims of new keys while a million records live and expire as new ones arrive (issue 14):
//! the latency of each claim, printed as p50 / p99 / p99.9 / max with its distribution, next to
//! the same percentiles of an empty timed section (what the OS alone costs on this machine).
//!
//! Time is tokio's paused clock, advanced by hand, so this benchmark needs tokio's `test-util`
//! (the package feature `paused-clock`); it is a target of its own so that the other benchmarks
//! are built without it (`test-util` puts a mutex in `Instant::now()`). Run with
//! `cargo bench -p idem-benches --features paused-clock --bench expiry`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use idem::store::{Bytes, Claim};
use idem::{Key, MemoryStore, Store};

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

criterion_group!(benches, expiry);
criterion_main!(benches);
