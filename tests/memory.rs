//! The in-memory store's bounds and expiry, as a user meets them: bounded in records and in
//! bytes (each record counted as `RECORD_OVERHEAD` plus its result's encoded size), what a call
//! gets at each bound, expiry that needs no sweep, and the late completions the rule of
//! `Store::complete` stores. Time is tokio's paused clock; counts, never timings, are asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem::store::memory::{DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, RECORD_OVERHEAD};
use idem::store::{Bytes, Claim, Completion};
use idem::{Error, Idempotent, Key, MemoryStore, Status, Store, idempotent};
use serde::{Deserialize, Serialize};

const MIB: usize = 1 << 20;

/// A string whose stored record (idem's codec) is exactly `len` bytes.
fn large(len: usize, c: char) -> String {
    std::iter::repeat_n(c, chars_for(len)).collect()
}

/// How many one-byte characters make a string whose record is `len` bytes.
fn chars_for(len: usize) -> usize {
    let framing = |n: usize| idem::codec::to_vec(&"a".repeat(n)).unwrap().len() - n;
    let mut n = len - framing(len);
    while n + framing(n) < len {
        n += 1;
    }
    assert_eq!(n + framing(n), len, "no string has a record of {len} bytes");
    n
}

fn acquired(claim: Result<Claim, Error>) -> idem::store::Token {
    match claim {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected the key to be acquired, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Constructors and bounds.

#[test]
fn constructors_set_each_bound_and_keep_the_other_default() {
    let store = MemoryStore::new();
    assert_eq!(
        (store.max_entries(), store.max_bytes()),
        (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    );
    assert_eq!(DEFAULT_MAX_BYTES, 1 << 30);
    let global = MemoryStore::global();
    assert_eq!(
        (global.max_entries(), global.max_bytes()),
        (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    );
    let store = MemoryStore::with_max_entries(10);
    assert_eq!(
        (store.max_entries(), store.max_bytes()),
        (10, DEFAULT_MAX_BYTES)
    );
    let store = MemoryStore::with_max_bytes(64 * MIB);
    assert_eq!(
        (store.max_entries(), store.max_bytes()),
        (DEFAULT_MAX_ENTRIES, 64 * MIB)
    );
    let store = MemoryStore::builder().max_entries(5).max_bytes(MIB).build();
    assert_eq!((store.max_entries(), store.max_bytes()), (5, MIB));
    // Degenerate bounds still let one record in.
    let store = MemoryStore::builder().max_entries(0).max_bytes(0).build();
    assert_eq!(
        (store.max_entries(), store.max_bytes()),
        (1, RECORD_OVERHEAD)
    );
    assert!(store.is_empty() && store.bytes() == 0);
}

// ---------------------------------------------------------------------------------------------
// The byte bound.

/// Sequential calls with 1 MiB results against an 8 MiB bound: the store's accounting never
/// passes the bound by more than the one result in flight, a new key at the bound gets
/// `Error::StoreFull` naming the bound and how to raise it (and its body does not run), stored keys
/// still replay, and once the records expire a new key is accepted at once, with no sweep.
#[tokio::test(start_paused = true)]
async fn large_results_never_grow_the_store_past_its_byte_bound() {
    let max_bytes = 8 * MIB;
    let store = MemoryStore::with_max_bytes(max_bytes);
    let ttl = Duration::from_secs(60);
    let slack = MIB + RECORD_OVERHEAD; // the one result in flight
    let runs = AtomicUsize::new(0);
    let (mut stored, mut refused) = (0, 0);
    for k in 0..20u32 {
        let out = Idempotent::new(&store, k)
            .name("bytes")
            .ttl(ttl)
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(large(MIB, 'a'))
            })
            .await;
        match out {
            Ok(v) => {
                assert_eq!(v.len(), chars_for(MIB));
                stored += 1;
            }
            Err(Error::StoreFull(err)) => {
                let msg = err.to_string();
                assert!(
                    msg.contains("max_bytes") && msg.contains(&max_bytes.to_string()),
                    "the message names the bound: {msg}"
                );
                assert!(
                    msg.contains("MemoryStore::builder().max_bytes"),
                    "the message says how to raise it: {msg}"
                );
                refused += 1;
            }
            Err(other) => panic!("key {k}: {other}"),
        }
        assert!(
            store.bytes() <= max_bytes + slack,
            "{} bytes accounted, bound {max_bytes} + {slack} in flight",
            store.bytes()
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        stored,
        "no body runs without a record"
    );
    assert!(
        (7..=8).contains(&stored),
        "{stored} results of 1 MiB stored"
    );
    assert_eq!(refused, 20 - stored);
    assert_eq!(store.len(), stored);
    assert_eq!(store.bytes(), stored * (MIB + RECORD_OVERHEAD));

    // Stored keys are served at the bound.
    for k in 0..stored as u32 {
        let out = Idempotent::new(&store, k)
            .name("bytes")
            .run_with_outcome(|| async { Ok::<_, Error>(String::new()) })
            .await
            .unwrap();
        assert_eq!(
            (out.status, out.value.len()),
            (Status::Replayed, chars_for(MIB))
        );
    }

    // Expiry frees the bytes: a new key is accepted at once, without a sweep.
    tokio::time::advance(ttl + Duration::from_secs(1)).await;
    let out = Idempotent::new(&store, 100u32)
        .name("bytes")
        .run_with_outcome(|| async { Ok::<_, Error>(large(MIB, 'b')) })
        .await
        .expect("expired records make room at once");
    assert_eq!(out.status, Status::Executed);
    assert!(store.bytes() <= max_bytes + slack);
    store.sweep();
    assert_eq!((store.len(), store.bytes()), (1, MIB + RECORD_OVERHEAD));
}

/// Calls in flight on a multi-threaded runtime: a claim reserves only its record's overhead, so
/// the results of calls already running are stored even when they take the store past its byte
/// bound (each body ran), by exactly those results; after that, no claim of a new key is
/// granted until expiry brings the store back under the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_in_flight_are_stored_past_the_bound_and_then_new_keys_wait() {
    const TASKS: usize = 16;
    const SIZE: usize = 256 * 1024;
    let max_bytes = 2 * MIB;
    let store = Arc::new(MemoryStore::with_max_bytes(max_bytes));
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..TASKS {
        let (store, started, gate) = (store.clone(), started.clone(), gate.clone());
        tasks.spawn(async move {
            Idempotent::new(&*store, k as u64)
                .name("bytes.in_flight")
                .run(|| async {
                    started.add_permits(1);
                    let _open = gate.acquire().await;
                    Ok::<_, Error>(large(SIZE, 'c'))
                })
                .await
        });
    }
    // Every call holds its claim and runs its body: only their overheads are counted.
    let all = started.acquire_many(TASKS as u32).await.expect("open");
    all.forget();
    assert_eq!(store.bytes(), TASKS * RECORD_OVERHEAD);
    gate.add_permits(TASKS);
    while let Some(joined) = tasks.join_next().await {
        let value = joined
            .expect("no task panics")
            .expect("a result in flight is stored");
        assert_eq!(value.len(), chars_for(SIZE));
    }
    assert_eq!(store.len(), TASKS);
    assert_eq!(store.bytes(), TASKS * (SIZE + RECORD_OVERHEAD));
    assert!(
        store.bytes() > max_bytes,
        "the results in flight took the store past its bound"
    );
    assert!(store.bytes() <= max_bytes + TASKS * (SIZE + RECORD_OVERHEAD));
    let refused = Idempotent::new(&*store, TASKS as u64)
        .name("bytes.in_flight")
        .run(|| async { Ok::<_, Error>(String::new()) })
        .await;
    assert!(matches!(refused, Err(Error::StoreFull(_))), "{refused:?}");
    for k in 0..TASKS as u64 {
        let replay = Idempotent::new(&*store, k)
            .name("bytes.in_flight")
            .run_with_outcome(|| async { Ok::<_, Error>(String::new()) })
            .await
            .expect("stored keys are served past the bound");
        assert_eq!(replay.status, Status::Replayed);
    }
}

/// A fixed overhead per record bounds a store of tiny results too.
#[tokio::test(start_paused = true)]
async fn many_tiny_records_are_bounded_by_their_overhead() {
    let store = MemoryStore::with_max_bytes(100 * RECORD_OVERHEAD);
    let mut stored = 0;
    for k in 0..1_000u32 {
        match Idempotent::new(&store, k)
            .name("tiny")
            .run(|| async { Ok::<_, Error>(()) })
            .await
        {
            Ok(()) => stored += 1,
            Err(Error::StoreFull(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    // Each record is its overhead and the 4 bytes of `null`; a claim fits while the records so
    // far and one more overhead fit.
    assert_eq!(stored, 99 * RECORD_OVERHEAD / (RECORD_OVERHEAD + 4) + 1);
    assert_eq!(store.bytes(), stored * (RECORD_OVERHEAD + 4));
    assert!(store.bytes() <= store.max_bytes() + 4);
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: u64,
    lines: Vec<String>,
}

#[idempotent(store = store, key = order, name = "memory.typed")]
async fn receipt(store: &MemoryStore, order: u64) -> Result<Receipt, Error> {
    Ok(Receipt {
        order,
        lines: vec!["one".into(), "two".into(), "three".into()],
    })
}

/// A result kept typed (a `Clone` type through the attribute) counts its encoded size, like one
/// kept encoded.
#[tokio::test]
async fn typed_results_count_their_encoded_size() {
    let store = MemoryStore::new();
    let first = receipt(&store, 7).await.unwrap();
    let encoded = idem::codec::to_vec(&first).unwrap().len();
    assert_eq!(store.bytes(), RECORD_OVERHEAD + encoded);
    assert_eq!(receipt(&store, 7).await.unwrap(), first);
    assert_eq!(
        store.bytes(),
        RECORD_OVERHEAD + encoded,
        "a replay adds nothing"
    );
    assert!(store.remove(Key::new("memory.typed", &7u64)).await.unwrap());
    assert_eq!((store.len(), store.bytes()), (0, 0));
}

static COUNTED_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(store = store, key = id, name = "memory.by_digest")]
async fn counted(store: &MemoryStore, id: u64) -> Result<u64, Error> {
    COUNTED_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(id)
}

/// Replays find a record by its key's exact encoding, but the record is still the digest's: an
/// operator who removes it by the digest a log shows (`Key::from_digest`) removes it, and the
/// next call runs the body again (then replays again).
#[tokio::test]
async fn a_record_found_by_its_exact_key_is_removed_by_its_digest() {
    let store = MemoryStore::new();
    assert_eq!(counted(&store, 5).await.unwrap(), 5);
    assert_eq!(counted(&store, 5).await.unwrap(), 5);
    assert_eq!(
        COUNTED_RUNS.load(Ordering::SeqCst),
        1,
        "the second call replayed"
    );

    let logged = Key::new("memory.by_digest", &5u64).to_hex();
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(logged.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
    }
    assert!(store.remove(Key::from_digest(digest)).await.unwrap());
    assert_eq!((store.len(), store.bytes()), (0, 0));

    assert_eq!(counted(&store, 5).await.unwrap(), 5);
    assert_eq!(
        COUNTED_RUNS.load(Ordering::SeqCst),
        2,
        "removed: the body ran again"
    );
    assert_eq!(counted(&store, 5).await.unwrap(), 5);
    assert_eq!(COUNTED_RUNS.load(Ordering::SeqCst), 2, "then replayed");
}

/// A key too long to keep exactly is found by its digest: the same answers, and its record is
/// removed by its key.
#[tokio::test]
async fn a_long_key_replays_and_is_removed_by_its_digest() {
    let store = MemoryStore::new();
    let long = "k".repeat(500);
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        let value = Idempotent::new(&store, long.as_str())
            .name("memory.long")
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(7u8)
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        store
            .remove(Key::new("memory.long", long.as_str()))
            .await
            .unwrap()
    );
    assert!(store.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The entry bound.

#[tokio::test(start_paused = true)]
async fn the_entry_bound_error_names_the_bound_and_how_to_raise_it() {
    let store = MemoryStore::with_max_entries(3);
    for k in 0..3u8 {
        Idempotent::new(&store, k)
            .name("entries")
            .run(|| async { Ok::<_, Error>(k) })
            .await
            .unwrap();
    }
    let ran = AtomicUsize::new(0);
    let refused = Idempotent::new(&store, 3u8)
        .name("entries")
        .run(|| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(3u8)
        })
        .await;
    let Err(Error::StoreFull(err)) = refused else {
        panic!("a new key at the bound must get Error::StoreFull, got {refused:?}");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("3 live records") && msg.contains("max_entries"),
        "{msg}"
    );
    assert!(msg.contains("MemoryStore::builder().max_entries"), "{msg}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

/// The store is full of records that expired a moment ago: a new key is accepted at once (an
/// expired record is removed on the spot), not after a sweep. The store used to refuse new keys
/// for up to a second here, until its once-a-second sweep came round.
#[tokio::test(start_paused = true)]
async fn a_store_full_of_expired_records_accepts_a_new_key_at_once() {
    let store = MemoryStore::with_max_entries(100);
    let ttl = Duration::from_millis(100);
    // Past the store's first second, so a sweep that runs at most once a second has just run.
    tokio::time::advance(Duration::from_millis(1_500)).await;
    for k in 0..100u32 {
        Idempotent::new(&store, k)
            .name("expired")
            .ttl(ttl)
            .run(|| async { Ok::<_, Error>(k) })
            .await
            .unwrap();
    }
    tokio::time::advance(ttl * 2).await;
    for k in 100..200u32 {
        let out = Idempotent::new(&store, k)
            .name("expired")
            .ttl(ttl)
            .run_with_outcome(|| async { Ok::<_, Error>(k) })
            .await
            .unwrap_or_else(|e| panic!("key {k} refused by a store of expired records: {e}"));
        assert_eq!(out.status, Status::Executed);
        assert!(store.len() <= store.max_entries());
    }
}

/// The same at the byte bound: expired large results make room for a new key at once.
#[tokio::test(start_paused = true)]
async fn a_store_full_of_expired_results_accepts_a_new_key_at_once() {
    let store = MemoryStore::with_max_bytes(4 * MIB);
    let ttl = Duration::from_millis(100);
    let mut k = 0u32;
    while Idempotent::new(&store, k)
        .name("expired.bytes")
        .ttl(ttl)
        .run(|| async { Ok::<_, Error>(large(MIB / 2, 'd')) })
        .await
        .is_ok()
    {
        k += 1;
    }
    assert!(k >= 7, "{k} results stored before the bound");
    tokio::time::advance(ttl * 2).await;
    let out = Idempotent::new(&store, k)
        .name("expired.bytes")
        .run_with_outcome(|| async { Ok::<_, Error>(large(MIB / 2, 'e')) })
        .await
        .expect("expired results make room at once");
    assert_eq!(out.status, Status::Executed);
}

// ---------------------------------------------------------------------------------------------
// Expiry without sweeps.

/// Records expire as new ones arrive: the inserts remove the expired ones as they go, so the
/// store holds the live records only, with no sweep.
#[tokio::test(start_paused = true)]
async fn inserts_remove_expired_records_without_a_sweep() {
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(1);
    let lease = Duration::from_secs(30);
    let key = |n: u32| Key::new("expiry", &n);
    for n in 0..5_000 {
        let token = acquired(store.claim(key(n), None, lease).await);
        let done = store
            .complete(key(n), token, None, Bytes::from_static(b"1"), ttl)
            .await;
        assert_eq!(done.ok(), Some(Completion::Stored));
    }
    tokio::time::advance(ttl * 2).await;
    for n in 5_000..10_000 {
        let token = acquired(store.claim(key(n), None, lease).await);
        let done = store
            .complete(key(n), token, None, Bytes::from_static(b"1"), ttl)
            .await;
        assert_eq!(done.ok(), Some(Completion::Stored));
    }
    assert_eq!(
        store.len(),
        5_000,
        "the 5,000 expired records were removed by the inserts"
    );
    assert_eq!(store.bytes(), 5_000 * (RECORD_OVERHEAD + 1));
    assert_eq!(store.sweep(), 0, "nothing left for a sweep");
}

/// `sweep` removes every expired record, and only those.
#[tokio::test(start_paused = true)]
async fn sweep_removes_every_expired_record() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(30);
    for n in 0..1_000u32 {
        let key = Key::new("sweep", &n);
        let token = acquired(store.claim(key, None, lease).await);
        let ttl = if n % 10 == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        store
            .complete(key, token, None, Bytes::from_static(b"x"), ttl)
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    let removed = store.sweep();
    // The inserts after the short-lived ones expired removed none (there were none after).
    assert_eq!(removed, 100);
    assert_eq!(store.len(), 900);
    assert_eq!(store.bytes(), 900 * (RECORD_OVERHEAD + 1));
}

// ---------------------------------------------------------------------------------------------
// Late completions (the rule of `Store::complete`).

/// A claim whose lease ran out is removed by expiry work (here at the bound, to make room for
/// another key); its holder's completion still stores the result (its body ran), even though it
/// takes the store past its entry bound, and a retry replays it.
#[tokio::test(start_paused = true)]
async fn a_late_completion_whose_claim_was_removed_is_stored_past_the_bound() {
    let store = MemoryStore::with_max_entries(1);
    let late = Key::new("late", &1u8);
    let other = Key::new("late", &2u8);
    let token = acquired(store.claim(late, None, Duration::from_secs(1)).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    // At the bound: the lapsed claim is removed on the spot to make room.
    acquired(store.claim(other, None, Duration::from_secs(30)).await);
    assert_eq!(store.len(), 1);
    let done = store
        .complete(
            late,
            token,
            None,
            Bytes::from_static(b"late"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done.ok(), Some(Completion::Stored));
    assert_eq!(store.len(), 2, "stored past the bound: its body ran");
    match store.claim(late, None, Duration::from_secs(30)).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"late"),
        other => panic!("the late result must replay, got {other:?}"),
    }
    // Repeated, it changes nothing.
    let again = store
        .complete(
            late,
            token,
            None,
            Bytes::from_static(b"again"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(again.ok(), Some(Completion::Stored));
    match store.claim(late, None, Duration::from_secs(30)).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"late"),
        other => panic!("the first value stays, got {other:?}"),
    }
    // No claim of a new key is granted past the bound.
    let refused = store
        .claim(Key::new("late", &3u8), None, Duration::from_secs(30))
        .await;
    assert!(matches!(refused, Err(Error::StoreFull(_))), "{refused:?}");
}

/// A call whose claim disappears while its body runs (an operator removed it) still stores its
/// result, with its fingerprint: a retry with the same fingerprint replays it, one with another
/// gets `KeyReused`, and the body ran once.
#[tokio::test]
async fn a_result_whose_claim_was_removed_is_stored_with_its_fingerprint() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let call = || {
        Idempotent::new(&store, 1u32)
            .name("removed")
            .fingerprint("request a")
    };
    let first = call()
        .run_with_outcome(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            assert!(store.remove(Key::new("removed", &1u32)).await.unwrap());
            Ok::<_, Error>(42u32)
        })
        .await
        .unwrap();
    assert_eq!((first.status, first.value), (Status::Executed, 42));
    let again = call()
        .run_with_outcome(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(0u32)
        })
        .await
        .unwrap();
    assert_eq!((again.status, again.value), (Status::Replayed, 42));
    let reused = Idempotent::new(&store, 1u32)
        .name("removed")
        .fingerprint("request b")
        .run(|| async { Ok::<_, Error>(0u32) })
        .await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `complete_on_drop` completes at once (the store is in memory), with the rule of `complete`.
#[tokio::test]
async fn complete_on_drop_completes_at_once() {
    let store = MemoryStore::new();
    let key = Key::new("on_drop", &1u8);
    let token = acquired(store.claim(key, None, Duration::from_secs(30)).await);
    store.complete_on_drop(
        key,
        idem::store::Token::generate(),
        None,
        Bytes::from_static(b"no"),
        Duration::from_secs(60),
    );
    assert!(matches!(
        store.claim(key, None, Duration::from_secs(30)).await,
        Ok(Claim::Busy { .. })
    ));
    store.complete_on_drop(
        key,
        token,
        None,
        Bytes::from_static(b"yes"),
        Duration::from_secs(60),
    );
    match store.claim(key, None, Duration::from_secs(30)).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"yes"),
        other => panic!("complete_on_drop must have stored the result, got {other:?}"),
    }
}
