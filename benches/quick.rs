//! A quick look at the in-memory ratios on a loaded machine: the best of 40 rounds, each timing
//! a batch of every candidate in turn (DashMap floor, `#[idempotent]`, moka), for replays and
//! first executions. The best batch is the one least disturbed by other work, and interleaving
//! gives each candidate the same conditions, so the ratios hold where criterion's means wander
//! with the load. BENCHMARKS.md's tables come from criterion (`scripts/bench-memory`); this is
//! for the loop of changing and measuring.
//!
//! `cargo bench -p idem-benches --bench quick`. With `ONLY_IDEM=1` (replays) or `ONLY_FIRST=1`
//! (first executions) it runs only idem's calls, for a profiler (`perf record`,
//! `valgrind --tool=callgrind`), `CALLS` times (3 000 000 unless given).
mod common;
use common::{Profile, profile};
use dashmap::DashMap;
use idem::{MemoryStore, idempotent};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

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

fn floor_get_or_insert(map: &DashMap<u64, Arc<Profile>>, id: u64) -> Profile {
    if let Some(v) = map.get(&id) {
        return (**v).clone();
    }
    let v = Arc::new(profile(id));
    map.entry(id).or_insert(v).value().as_ref().clone()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let floor: DashMap<u64, Arc<Profile>> = DashMap::new();
    let moka: moka::future::Cache<u64, Profile> = moka::future::Cache::new(10_000_000);
    const N: u32 = 20_000;
    let mut best = [f64::MAX; 6];
    let next = AtomicU64::new(1_000_000);
    // For a profiler: how many calls `ONLY_IDEM` / `ONLY_FIRST` make (callgrind wants few).
    let calls: u64 = std::env::var("CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3_000_000);
    if std::env::var("ONLY_FIRST").is_ok() {
        rt.block_on(async {
            for i in 0..calls {
                black_box(
                    idem_profile(black_box(i + 10_000_000))
                        .await
                        .expect("a call"),
                );
            }
        });
        return;
    }
    if std::env::var("ONLY_IDEM").is_ok() {
        rt.block_on(async {
            for _ in 0..calls {
                black_box(idem_profile(black_box(42)).await.expect("a call"));
            }
        });
        return;
    }
    rt.block_on(async {
        let _ = idem_profile(42).await;
        moka.get_with(42, async { profile(42) }).await;
        floor_get_or_insert(&floor, 42);
        for _ in 0..40 {
            let t = Instant::now();
            for _ in 0..N {
                black_box(floor_get_or_insert(&floor, black_box(42)));
            }
            best[0] = best[0].min(t.elapsed().as_nanos() as f64 / N as f64);
            let t = Instant::now();
            for _ in 0..N {
                black_box(idem_profile(black_box(42)).await.expect("a call"));
            }
            best[1] = best[1].min(t.elapsed().as_nanos() as f64 / N as f64);
            let t = Instant::now();
            for _ in 0..N {
                black_box(moka.get_with(black_box(42), async { profile(42) }).await);
            }
            best[2] = best[2].min(t.elapsed().as_nanos() as f64 / N as f64);
            let n2 = N / 10;
            let t = Instant::now();
            for _ in 0..n2 {
                black_box(floor_get_or_insert(
                    &floor,
                    next.fetch_add(1, Ordering::Relaxed),
                ));
            }
            best[3] = best[3].min(t.elapsed().as_nanos() as f64 / n2 as f64);
            let t = Instant::now();
            for _ in 0..n2 {
                black_box(
                    idem_profile(next.fetch_add(1, Ordering::Relaxed))
                        .await
                        .expect("a call"),
                );
            }
            best[4] = best[4].min(t.elapsed().as_nanos() as f64 / n2 as f64);
            let t = Instant::now();
            for _ in 0..n2 {
                let id = next.fetch_add(1, Ordering::Relaxed);
                black_box(moka.get_with(id, async move { profile(id) }).await);
            }
            best[5] = best[5].min(t.elapsed().as_nanos() as f64 / n2 as f64);
        }
    });
    println!(
        "replay: floor {:.1} idem {:.1} moka {:.1} -> idem/floor {:.2}x idem/moka {:.2}",
        best[0],
        best[1],
        best[2],
        best[1] / best[0],
        best[1] / best[2]
    );
    println!(
        "first:  floor {:.1} idem {:.1} moka {:.1} -> idem/floor {:.2}x idem/moka {:.2}",
        best[3],
        best[4],
        best[5],
        best[4] / best[3],
        best[4] / best[5]
    );
}
