//! The store conformance suite: one set of checks, generic over [`Store`], that every store
//! passes. A new backend, in this crate or another, proves itself by passing it.
//!
//! Each check is a public `async fn` taking an `Arc<dyn Store>`; it panics (with what the
//! contract says and what the store did) when the store breaks the contract, like any test.
//! Every check works on keys of its own, so all of them can run at once against one server.
//! Checks about expiry use short real-time leases and ttls (a few hundred milliseconds), because
//! a remote store's clock is the server's.
//!
//! [`conformance_tests!`](crate::conformance_tests) writes one `#[tokio::test]` per check:
//!
//! ```
//! # mod wrapper {
//! use std::sync::Arc;
//! use idem_runtime::{MemoryStore, Store};
//!
//! idem_runtime::conformance_tests!(async { Arc::new(MemoryStore::new()) as Arc<dyn Store> });
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::error::Error;
use crate::exec::{Idempotent, OnConflict, Status};
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Completion, Token};
use crate::store::{BoxFuture, RecordedSteps, StepRecorded, Store};

/// The lease the checks use where it must run out.
pub const SHORT_LEASE: Duration = Duration::from_millis(300);
/// A lease or ttl the checks never see run out.
pub const LONG: Duration = Duration::from_secs(60);

/// The names of every check, in the order [`run_all`] runs them.
pub const CHECKS: &[&str] = &[
    "claim_of_absent_key_acquires",
    "complete_then_claim_replays",
    "claim_while_in_progress_is_busy",
    "lapsed_lease_is_taken_over",
    "stale_token_cannot_complete_renew_or_release",
    "renew_pushes_the_lease_out",
    "release_frees_the_key",
    "completed_record_expires_after_ttl",
    "remove_forgets_a_record",
    "operations_on_absent_key_change_nothing",
    "wait_returns_when_holder_completes",
    "wait_returns_when_holder_releases",
    "wait_is_bounded_by_timeout",
    "concurrent_claims_give_one_acquired",
    "values_round_trip_exactly",
    "keys_do_not_interfere",
    "late_completion_is_stored",
    "complete_is_idempotent_for_its_token",
    "lease_is_granted_in_full",
    "cancelled_body_frees_the_key",
    "cancelled_completion_keeps_the_claim",
    "results_replay_faithfully",
    "unfaithful_results_are_refused_when_stored",
    "steps_are_recorded_under_the_holding_token",
    "steps_survive_a_takeover",
    "steps_survive_a_release",
    "steps_are_fenced_by_the_token",
    "complete_and_remove_delete_steps",
    "steps_expire_with_their_ttl",
    "step_names_and_values_round_trip",
    "steps_stay_with_their_key",
    "steps_are_tied_to_the_fingerprint",
    "a_dropped_call_records_its_steps_then_releases",
];

/// Runs every check, one after another.
pub async fn run_all(store: Arc<dyn Store>) {
    claim_of_absent_key_acquires(store.clone()).await;
    complete_then_claim_replays(store.clone()).await;
    claim_while_in_progress_is_busy(store.clone()).await;
    lapsed_lease_is_taken_over(store.clone()).await;
    stale_token_cannot_complete_renew_or_release(store.clone()).await;
    renew_pushes_the_lease_out(store.clone()).await;
    release_frees_the_key(store.clone()).await;
    completed_record_expires_after_ttl(store.clone()).await;
    remove_forgets_a_record(store.clone()).await;
    operations_on_absent_key_change_nothing(store.clone()).await;
    wait_returns_when_holder_completes(store.clone()).await;
    wait_returns_when_holder_releases(store.clone()).await;
    wait_is_bounded_by_timeout(store.clone()).await;
    concurrent_claims_give_one_acquired(store.clone()).await;
    values_round_trip_exactly(store.clone()).await;
    keys_do_not_interfere(store.clone()).await;
    late_completion_is_stored(store.clone()).await;
    complete_is_idempotent_for_its_token(store.clone()).await;
    lease_is_granted_in_full(store.clone()).await;
    cancelled_body_frees_the_key(store.clone()).await;
    cancelled_completion_keeps_the_claim(store.clone()).await;
    results_replay_faithfully(store.clone()).await;
    unfaithful_results_are_refused_when_stored(store.clone()).await;
    steps_are_recorded_under_the_holding_token(store.clone()).await;
    steps_survive_a_takeover(store.clone()).await;
    steps_survive_a_release(store.clone()).await;
    steps_are_fenced_by_the_token(store.clone()).await;
    complete_and_remove_delete_steps(store.clone()).await;
    steps_expire_with_their_ttl(store.clone()).await;
    step_names_and_values_round_trip(store.clone()).await;
    steps_stay_with_their_key(store.clone()).await;
    steps_are_tied_to_the_fingerprint(store.clone()).await;
    a_dropped_call_records_its_steps_then_releases(store).await;
}

/// A key no other check (or run) uses.
fn fresh_key(check: &str) -> Key {
    Key::new("idem.conformance", &(check, Token::generate().as_u128()))
}

async fn acquire(store: &dyn Store, key: Key, lease: Duration) -> Token {
    match store.claim(key, None, lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim of a free key must acquire it, got {other:?}"),
    }
}

async fn complete(store: &dyn Store, key: Key, token: Token, value: &'static [u8], ttl: Duration) {
    let done = store
        .complete(key, token, None, Bytes::from_static(value), ttl)
        .await;
    assert_eq!(
        done.ok(),
        Some(Completion::Stored),
        "complete with the holding token must store the record"
    );
}

/// Claim of an absent key: `Acquired`.
pub async fn claim_of_absent_key_acquires(store: Arc<dyn Store>) {
    let key = fresh_key("claim_of_absent_key_acquires");
    acquire(&*store, key, LONG).await;
}

/// Complete, then claim: `Completed` with the value and the claim's fingerprint, living at most
/// the ttl.
pub async fn complete_then_claim_replays(store: Arc<dyn Store>) {
    let key = fresh_key("complete_then_claim_replays");
    let fp = Fingerprint::of("request body");
    let token = match store.claim(key, Some(fp), LONG).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim of a free key must acquire it, got {other:?}"),
    };
    complete(&*store, key, token, b"result", LONG).await;
    for _ in 0..2 {
        match store.claim(key, None, LONG).await {
            Ok(Claim::Completed(done)) => {
                assert_eq!(&done.value[..], b"result", "replayed value");
                assert_eq!(
                    done.fingerprint,
                    Some(fp),
                    "the claim's fingerprint is kept"
                );
                assert!(
                    done.expires_in <= LONG && done.expires_in > LONG - Duration::from_secs(10),
                    "expires_in must be what is left of the ttl, got {:?}",
                    done.expires_in
                );
            }
            other => panic!("claim of a completed key must replay it, got {other:?}"),
        }
    }
}

/// Claim of a key another caller holds: `Busy` with at most the lease left.
pub async fn claim_while_in_progress_is_busy(store: Arc<dyn Store>) {
    let key = fresh_key("claim_while_in_progress_is_busy");
    acquire(&*store, key, LONG).await;
    match store.claim(key, None, LONG).await {
        Ok(Claim::Busy { lease_left }) => {
            assert!(
                lease_left <= LONG,
                "lease_left {lease_left:?} exceeds the lease"
            );
            assert!(lease_left > Duration::ZERO, "a live lease has time left");
        }
        other => panic!("claim of a held key must be Busy, got {other:?}"),
    }
}

/// A lease that ran out is taken over with a new token.
pub async fn lapsed_lease_is_taken_over(store: Arc<dyn Store>) {
    let key = fresh_key("lapsed_lease_is_taken_over");
    let first = acquire(&*store, key, SHORT_LEASE).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let second = match store.claim(key, None, LONG).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim after the lease ran out must take over, got {other:?}"),
    };
    assert_ne!(first, second, "a take-over must hand out a new token");
}

/// After a take-over, the stale token can neither complete, renew nor release, and the new
/// holder's claim is untouched.
pub async fn stale_token_cannot_complete_renew_or_release(store: Arc<dyn Store>) {
    let key = fresh_key("stale_token_cannot_complete_renew_or_release");
    let stale = acquire(&*store, key, SHORT_LEASE).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let fresh = acquire(&*store, key, LONG).await;

    let done = store
        .complete(key, stale, None, Bytes::from_static(b"stale"), LONG)
        .await;
    assert_eq!(
        done.ok(),
        Some(Completion::LeaseLost),
        "a stale token must not complete"
    );
    assert_eq!(
        store.renew(key, stale, LONG).await.ok(),
        Some(false),
        "a stale token must not renew"
    );
    assert_eq!(
        store.release(key, stale).await.ok(),
        Some(false),
        "a stale token must not release"
    );
    match store.claim(key, None, LONG).await {
        Ok(Claim::Busy { .. }) => {}
        other => panic!("the new holder's claim must be untouched, got {other:?}"),
    }
    complete(&*store, key, fresh, b"fresh", LONG).await;
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"fresh"),
        other => panic!("the new holder's result must be stored, got {other:?}"),
    }
}

/// Renewal with the holding token keeps the claim past its first lease.
pub async fn renew_pushes_the_lease_out(store: Arc<dyn Store>) {
    let key = fresh_key("renew_pushes_the_lease_out");
    let token = acquire(&*store, key, SHORT_LEASE).await;
    for _ in 0..4 {
        tokio::time::sleep(SHORT_LEASE / 3).await;
        assert_eq!(
            store.renew(key, token, SHORT_LEASE).await.ok(),
            Some(true),
            "the holder must be able to renew"
        );
    }
    // More than one original lease has passed: only renewal keeps the key held.
    match store.claim(key, None, LONG).await {
        Ok(Claim::Busy { .. }) => {}
        other => panic!("a renewed claim must still be held, got {other:?}"),
    }
    complete(&*store, key, token, b"renewed", LONG).await;
}

/// Release with the holding token frees the key at once.
pub async fn release_frees_the_key(store: Arc<dyn Store>) {
    let key = fresh_key("release_frees_the_key");
    let token = acquire(&*store, key, LONG).await;
    assert_eq!(store.release(key, token).await.ok(), Some(true));
    let again = acquire(&*store, key, LONG).await;
    assert_ne!(token, again);
}

/// A completed record is replayed within its ttl and gone after it.
pub async fn completed_record_expires_after_ttl(store: Arc<dyn Store>) {
    let key = fresh_key("completed_record_expires_after_ttl");
    let token = acquire(&*store, key, LONG).await;
    complete(&*store, key, token, b"short-lived", SHORT_LEASE).await;
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(_)) => {}
        other => panic!("within its ttl the record must replay, got {other:?}"),
    }
    tokio::time::sleep(SHORT_LEASE * 2).await;
    acquire(&*store, key, LONG).await;
}

/// `remove` forgets a completed or in-progress record; removing twice finds nothing.
pub async fn remove_forgets_a_record(store: Arc<dyn Store>) {
    let key = fresh_key("remove_forgets_a_record");
    let token = acquire(&*store, key, LONG).await;
    complete(&*store, key, token, b"gone soon", LONG).await;
    assert_eq!(store.remove(key).await.ok(), Some(true));
    assert_eq!(store.remove(key).await.ok(), Some(false));
    let token = acquire(&*store, key, LONG).await;
    assert_eq!(store.remove(key).await.ok(), Some(true));
    let other = acquire(&*store, key, LONG).await;
    assert_eq!(
        store
            .complete(key, token, None, Bytes::from_static(b"x"), LONG)
            .await
            .ok(),
        Some(Completion::LeaseLost),
        "a removed claim cannot complete once another call holds the key"
    );
    complete(&*store, key, other, b"other", LONG).await;
}

/// renew and release of a key that has no record change nothing; complete writes the record
/// (the rule of [`Store::complete`]: no other claim holds the key).
pub async fn operations_on_absent_key_change_nothing(store: Arc<dyn Store>) {
    let key = fresh_key("operations_on_absent_key_change_nothing");
    let token = Token::generate();
    assert_eq!(store.renew(key, token, LONG).await.ok(), Some(false));
    assert_eq!(store.release(key, token).await.ok(), Some(false));
    acquire(&*store, key, LONG).await;

    let absent = fresh_key("operations_on_absent_key_change_nothing");
    complete(&*store, absent, token, b"late", LONG).await;
    match store.claim(absent, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"late"),
        other => panic!("complete of an absent key must write the record, got {other:?}"),
    }
}

/// `wait` on a held key returns once the holder completes, well before its timeout.
pub async fn wait_returns_when_holder_completes(store: Arc<dyn Store>) {
    let key = fresh_key("wait_returns_when_holder_completes");
    let token = acquire(&*store, key, LONG).await;
    let started = tokio::time::Instant::now();
    let waiter = store.wait(key, LONG);
    let holder = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        complete(&*store, key, token, b"done", LONG).await;
    };
    let (waited, ()) = tokio::join!(waiter, holder);
    assert!(waited.is_ok(), "wait failed: {waited:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "wait must return when the holder completes, not at its timeout"
    );
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"done"),
        other => panic!("after the wait the record must be completed, got {other:?}"),
    }
}

/// `wait` on a held key returns once the holder releases.
pub async fn wait_returns_when_holder_releases(store: Arc<dyn Store>) {
    let key = fresh_key("wait_returns_when_holder_releases");
    let token = acquire(&*store, key, LONG).await;
    let started = tokio::time::Instant::now();
    let waiter = store.wait(key, LONG);
    let holder = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.release(key, token).await.ok(), Some(true));
    };
    let (waited, ()) = tokio::join!(waiter, holder);
    assert!(waited.is_ok(), "wait failed: {waited:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    acquire(&*store, key, LONG).await;
}

/// `wait` on a key whose holder never finishes returns by its timeout.
pub async fn wait_is_bounded_by_timeout(store: Arc<dyn Store>) {
    let key = fresh_key("wait_is_bounded_by_timeout");
    acquire(&*store, key, LONG).await;
    let started = tokio::time::Instant::now();
    let waited = store.wait(key, Duration::from_millis(200)).await;
    assert!(waited.is_ok(), "wait failed: {waited:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "wait must return by its timeout"
    );
}

/// Many concurrent claims of one free key: exactly one `Acquired`, the rest `Busy`.
pub async fn concurrent_claims_give_one_acquired(store: Arc<dyn Store>) {
    for round in 0..8 {
        let key = fresh_key("concurrent_claims_give_one_acquired");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..32 {
            let store = store.clone();
            tasks.spawn(async move { store.claim(key, None, LONG).await });
        }
        let (mut acquired, mut busy) = (0, 0);
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(Claim::Acquired(_))) => acquired += 1,
                Ok(Ok(Claim::Busy { .. })) => busy += 1,
                other => panic!("unexpected concurrent claim result: {other:?}"),
            }
        }
        assert_eq!(
            (acquired, busy),
            (1, 31),
            "round {round}: exactly one claim acquires"
        );
    }
}

/// Empty, binary and large values come back byte for byte.
pub async fn values_round_trip_exactly(store: Arc<dyn Store>) {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let large: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for value in [Vec::new(), all_bytes, large] {
        let key = fresh_key("values_round_trip_exactly");
        let token = acquire(&*store, key, LONG).await;
        let done = store
            .complete(key, token, None, Bytes::from(value.clone()), LONG)
            .await;
        assert_eq!(done.ok(), Some(Completion::Stored));
        match store.claim(key, None, LONG).await {
            Ok(Claim::Completed(done)) => {
                assert!(
                    done.value[..] == value[..],
                    "a {} byte value changed in the store",
                    value.len()
                );
            }
            other => panic!("expected the completed record, got {other:?}"),
        }
    }
}

/// Operations on one key never touch another's record.
pub async fn keys_do_not_interfere(store: Arc<dyn Store>) {
    let a = fresh_key("keys_do_not_interfere");
    let b = fresh_key("keys_do_not_interfere");
    let ta = acquire(&*store, a, LONG).await;
    let tb = acquire(&*store, b, LONG).await;
    complete(&*store, a, ta, b"a", LONG).await;
    assert_eq!(store.release(b, tb).await.ok(), Some(true));
    assert_eq!(store.remove(b).await.ok(), Some(false));
    match store.claim(a, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"a"),
        other => panic!("key a must be untouched by b's operations, got {other:?}"),
    }
}

/// `complete` after the lease ran out, with no other call having taken the key over, stores
/// the result (the same rule on every store, whether or not it still keeps the expired claim),
/// with the claim's fingerprint, also where the claim's own record is gone.
pub async fn late_completion_is_stored(store: Arc<dyn Store>) {
    let fp = Fingerprint::of("the request");
    for gone in [false, true] {
        let key = fresh_key("late_completion_is_stored");
        let token = match store.claim(key, Some(fp), SHORT_LEASE).await {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("claim of a free key must acquire it, got {other:?}"),
        };
        tokio::time::sleep(SHORT_LEASE * 2).await;
        if gone {
            // As a purge or a sweep would have done with the lapsed claim.
            let _ = store.remove(key).await;
        }
        let done = store
            .complete(key, token, Some(fp), Bytes::from_static(b"late"), LONG)
            .await;
        assert_eq!(
            done.ok(),
            Some(Completion::Stored),
            "a completion after the lease ran out, with no takeover, must be stored (record gone: \
             {gone})"
        );
        match store.claim(key, Some(fp), LONG).await {
            Ok(Claim::Completed(done)) => {
                assert_eq!(&done.value[..], b"late");
                assert_eq!(
                    done.fingerprint,
                    Some(fp),
                    "the late result keeps the claim's fingerprint (record gone: {gone})"
                );
            }
            other => panic!("the late result must replay, got {other:?}"),
        }
    }

    // A holder whose key was taken over by a call that then lapsed too (it crashed): the lapsed
    // claim holds the key no more, so the first holder's late result is stored.
    let key = fresh_key("late_completion_is_stored");
    let first = acquire(&*store, key, SHORT_LEASE).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let second = acquire(&*store, key, SHORT_LEASE).await;
    assert_ne!(first, second);
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let done = store
        .complete(key, first, None, Bytes::from_static(b"first"), LONG)
        .await;
    assert_eq!(
        done.ok(),
        Some(Completion::Stored),
        "a late completion over another claim whose lease ran out too must be stored"
    );
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"first"),
        other => panic!("the late result must replay, got {other:?}"),
    }
}

/// A `complete` repeated with the same token (its first reply was lost) reports `Stored` again
/// and keeps the first value.
pub async fn complete_is_idempotent_for_its_token(store: Arc<dyn Store>) {
    let key = fresh_key("complete_is_idempotent_for_its_token");
    let token = acquire(&*store, key, LONG).await;
    complete(&*store, key, token, b"first", LONG).await;
    let again = store
        .complete(key, token, None, Bytes::from_static(b"second"), LONG)
        .await;
    assert_eq!(
        again.ok(),
        Some(Completion::Stored),
        "a repeated complete with the holding token must report Stored"
    );
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(done)) => {
            assert_eq!(&done.value[..], b"first", "the first value stays")
        }
        other => panic!("expected the completed record, got {other:?}"),
    }
}

/// A lease is granted in full, counted from the grant: right after a claim (fresh, or a takeover
/// of a lapsed one), another claim sees nearly the whole lease left.
pub async fn lease_is_granted_in_full(store: Arc<dyn Store>) {
    let slack = Duration::from_secs(5);
    let key = fresh_key("lease_is_granted_in_full");
    acquire(&*store, key, LONG).await;
    match store.claim(key, None, LONG).await {
        Ok(Claim::Busy { lease_left }) => assert!(
            lease_left > LONG - slack && lease_left <= LONG,
            "a fresh claim of {LONG:?} must have nearly all of it left, had {lease_left:?}"
        ),
        other => panic!("claim of a held key must be Busy, got {other:?}"),
    }
    let lapsed = fresh_key("lease_is_granted_in_full");
    acquire(&*store, lapsed, SHORT_LEASE).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    acquire(&*store, lapsed, LONG).await;
    match store.claim(lapsed, None, LONG).await {
        Ok(Claim::Busy { lease_left }) => assert!(
            lease_left > LONG - slack && lease_left <= LONG,
            "a takeover with a lease of {LONG:?} must have nearly all of it left, had {lease_left:?}"
        ),
        other => panic!("claim of a held key must be Busy, got {other:?}"),
    }
}

/// A call cancelled (its future dropped) while its body runs gives the key back: released at
/// once where the store can, and never held past its lease. The next call runs the body.
pub async fn cancelled_body_frees_the_key(store: Arc<dyn Store>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let key = ("cancelled_body_frees_the_key", Token::generate().as_u128());
    let call = {
        let runs = runs.clone();
        Idempotent::new(&*store, key)
            .name("idem.conformance")
            .lease(SHORT_LEASE)
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok::<u64, Error>(0)
            })
    };
    let cancelled = tokio::time::timeout(Duration::from_millis(100), call).await;
    assert!(
        cancelled.is_err(),
        "the body never returns: the call must still be running"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Released, or at worst left to its lease: either way a new call runs the body soon.
    let deadline = tokio::time::Instant::now() + SHORT_LEASE * 2 + Duration::from_secs(5);
    loop {
        let again = Idempotent::new(&*store, key)
            .name("idem.conformance")
            .on_conflict(OnConflict::Reject)
            .run_with_outcome(|| async { Ok::<u64, Error>(7) })
            .await;
        match again {
            Ok(outcome) => {
                assert_eq!(
                    outcome.status,
                    Status::Executed,
                    "the cancelled call stored nothing"
                );
                assert_eq!(outcome.value, 7);
                break;
            }
            Err(Error::InProgress { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => {
                panic!("a cancelled call's key must be free by the end of its lease: {err}")
            }
        }
    }
}

/// A call cancelled after its body returned `Ok`, while its result is being stored, never
/// releases the claim (a retry would run the body a second time): a retry within the lease
/// finds the key busy or replays the result, and the body runs once.
pub async fn cancelled_completion_keeps_the_claim(store: Arc<dyn Store>) {
    let gated = Arc::new(GatedComplete {
        inner: store.clone(),
        entered: tokio::sync::Notify::new(),
    });
    let runs = Arc::new(AtomicUsize::new(0));
    let key = (
        "cancelled_completion_keeps_the_claim",
        Token::generate().as_u128(),
    );
    {
        let runs = runs.clone();
        let call = Idempotent::new(&*gated, key)
            .name("idem.conformance")
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u64, Error>(42)
            });
        tokio::select! {
            result = call => panic!("complete never returns, yet the call ended: {result:?}"),
            () = gated.entered.notified() => {} // the call is inside `complete`: drop it
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    for _ in 0..10 {
        let again = Idempotent::new(&*store, key)
            .name("idem.conformance")
            .on_conflict(OnConflict::Reject)
            .run_with_outcome(|| async { Ok::<u64, Error>(0) })
            .await;
        match again {
            Ok(outcome) => {
                assert_eq!(
                    outcome.status,
                    Status::Replayed,
                    "the body must not run again"
                );
                assert_eq!(outcome.value, 42, "the replay is the first call's result");
            }
            Err(Error::InProgress { .. }) => {}
            Err(err) => panic!("unexpected error after a cancelled completion: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran again");
}

/// Results replay **equal** to the first call's value, through the executor, for every shape
/// of the serde data model: options inside options, unit values, NaN and infinities, maps with
/// non-string keys, every kind of enum, `flatten`, `serde_json::Value`, bytes, extreme integers
/// and floats, empty and large collections, and Unicode of every kind. The body runs once per
/// value.
pub async fn results_replay_faithfully(store: Arc<dyn Store>) {
    use results::*;
    let store = &*store;
    let nan_eq = |a: &f64, b: &f64| a.to_bits() == b.to_bits();
    faithful(store, "Some(None)", Some(None::<u32>), PartialEq::eq).await;
    faithful(store, "Some(())", Some(()), PartialEq::eq).await;
    faithful(
        store,
        "Some(NaN)",
        Some(f64::NAN),
        |a: &Option<f64>, b: &Option<f64>| {
            a.zip(*b).is_some_and(|(a, b)| a.to_bits() == b.to_bits())
        },
    )
    .await;
    faithful(
        store,
        "Some(Value::Null)",
        Some(serde_json::Value::Null),
        PartialEq::eq,
    )
    .await;
    faithful(store, "inf", f64::INFINITY, PartialEq::eq).await;
    faithful(store, "-inf", f64::NEG_INFINITY, PartialEq::eq).await;
    faithful(store, "NaN", f64::NAN, nan_eq).await;
    faithful(store, "-0.0", -0.0f64, nan_eq).await;
    faithful(store, "f32 NaN", f32::NAN, |a: &f32, b: &f32| {
        a.to_bits() == b.to_bits()
    })
    .await;
    faithful(
        store,
        "f64 limits",
        F64_LIMITS,
        |a: &[f64; 6], b: &[f64; 6]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
    )
    .await;
    faithful(
        store,
        "f32 limits",
        [f32::MIN, f32::MAX, f32::MIN_POSITIVE, f32::EPSILON],
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "BTreeMap<(u8, u8), u8>",
        BTreeMap::from([((1u8, 2u8), 3u8), ((0, 0), 0)]),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "HashMap<(u32, u32), u64>",
        HashMap::from([((1u32, 2u32), 3u64), ((4, 5), 6)]),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "HashSet<String>",
        HashSet::from(["a".to_owned(), "b".to_owned(), String::new()]),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "nested options",
        Some(Some(Some(None::<u8>))),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "Option<Vec<Option<()>>>",
        Some(vec![Some(()), None, Some(())]),
        PartialEq::eq,
    )
    .await;
    faithful(store, "()", (), PartialEq::eq).await;
    faithful(store, "unit struct", Unit, PartialEq::eq).await;
    faithful(store, "Option<unit struct>", Some(Unit), PartialEq::eq).await;
    faithful(store, "newtype struct", Newtype(5), PartialEq::eq).await;
    faithful(
        store,
        "tuple struct",
        Pair(1, "x".to_owned()),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "struct",
        Record {
            a: Some(None),
            b: 1.5,
            c: vec![],
        },
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "externally tagged enum",
        vec![
            Ext::Unit,
            Ext::Newtype(1),
            Ext::Tuple(1, 2),
            Ext::Struct { x: -1 },
        ],
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "internally tagged enum",
        vec![
            Internal::A { x: 1 },
            Internal::B(Record {
                a: Some(None),
                b: 2.0,
                c: vec![1],
            }),
            Internal::C,
        ],
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "adjacently tagged enum",
        vec![
            Adjacent::A(1),
            Adjacent::B { y: "q".to_owned() },
            Adjacent::C,
        ],
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "untagged enum",
        vec![
            Untagged::A(1),
            Untagged::B("s".to_owned()),
            Untagged::C { z: true },
        ],
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "flatten",
        Flat {
            id: 1,
            inner: Inner { p: 2, q: None },
        },
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "flatten over a map of options",
        FlatMap {
            id: 1,
            extra: BTreeMap::from([("k".to_owned(), Some(None)), ("l".to_owned(), None)]),
        },
        PartialEq::eq,
    )
    .await;
    faithful(store, "serde_json::Value", serde_json::json!({"a": [1, null, 2.5, "x", {"b": true}], "n": -5, "big": u64::MAX, "": {}}), PartialEq::eq).await;
    faithful(store, "Vec<u8>", vec![0u8, 255, 3], PartialEq::eq).await;
    faithful(store, "bytes", ByteBuf((0..=255).collect()), PartialEq::eq).await;
    faithful(store, "char", ['\0', 'a', 'é', '\u{10FFFF}'], PartialEq::eq).await;
    faithful(
        store,
        "u128 and i128",
        (u128::MAX, i128::MIN, i128::MAX),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "integer limits",
        (u64::MAX, i64::MIN, u8::MAX, i8::MIN, u16::MAX, i32::MIN),
        PartialEq::eq,
    )
    .await;
    faithful(store, "Unicode", UNICODE.to_owned(), PartialEq::eq).await;
    faithful(
        store,
        "empty collections",
        (
            Vec::<u8>::new(),
            BTreeMap::<u8, u8>::new(),
            String::new(),
            HashSet::<u8>::new(),
        ),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "large collection",
        (0..100_000u32).collect::<Vec<_>>(),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "Result as a value",
        (Ok::<u8, String>(1), Err::<u8, String>("no".to_owned())),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "Duration",
        Duration::new(5, 999_999_999),
        PartialEq::eq,
    )
    .await;
    faithful(
        store,
        "IpAddr and SocketAddr",
        (
            "::1".parse::<IpAddr>().ok(),
            "10.0.0.1:443".parse::<SocketAddr>().ok(),
        ),
        PartialEq::eq,
    )
    .await;
    faithful(store, "Box<str>", Box::<str>::from("boxed"), PartialEq::eq).await;
    faithful(store, "[u8; 32]", [7u8; 32], PartialEq::eq).await;
    faithful(store, "bool", (true, false), PartialEq::eq).await;
    faithful(
        store,
        "nested struct with every option",
        Nested {
            outer: Some(Some(Record {
                a: Some(Some(3)),
                b: f64::MAX,
                c: vec![0, 255],
            })),
            list: vec![None, Some(Ext::Unit)],
        },
        PartialEq::eq,
    )
    .await;
}

/// A result that no codec can replay faithfully (serde itself loses it: an untagged enum whose
/// first variant also accepts the second's data, a `u128` under `#[serde(flatten)]`) is refused
/// when it is stored, never replayed wrong: the first caller gets its value, later calls get
/// [`Error::Codec`], and the body does not run again.
pub async fn unfaithful_results_are_refused_when_stored(store: Arc<dyn Store>) {
    use results::*;
    refused(&*store, "untagged f64/u32", vec![Ambiguous::U(5)]).await;
    refused(
        &*store,
        "u128 under flatten",
        FlatU128 {
            inner: Big { v: u128::MAX },
        },
    )
    .await;
}

/// Values, types and helpers of [`results_replay_faithfully`].
mod results {
    pub(super) use std::collections::{BTreeMap, HashMap, HashSet};
    pub(super) use std::net::{IpAddr, SocketAddr};

    use std::fmt::Debug;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Serialize};

    use crate::error::Error;
    use crate::exec::{Idempotent, Status};
    use crate::record::Token;
    use crate::store::Store;

    pub(super) const F64_LIMITS: [f64; 6] = [
        f64::MIN,
        f64::MAX,
        f64::MIN_POSITIVE,
        f64::EPSILON,
        5e-324, // the smallest subnormal
        -0.0,
    ];

    /// NUL and controls, Latin, combining marks, right-to-left, CJK, a ZWJ emoji sequence, a
    /// byte order mark, a noncharacter and the last code point. (Lone surrogates cannot be in a
    /// Rust string.)
    pub(super) const UNICODE: &str = "\0\u{1}\u{7f}\t\r\n é e\u{301} ש\u{5b8}לוֹם 漢字 \
        👩\u{200d}👩\u{200d}👧 \u{feff} \u{fffe} \u{10ffff}";

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Unit;
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Newtype(pub u32);
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Pair(pub u8, pub String);
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Record {
        pub a: Option<Option<u32>>,
        pub b: f64,
        pub c: Vec<u8>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) enum Ext {
        Unit,
        Newtype(u32),
        Tuple(u8, u8),
        Struct { x: i32 },
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(tag = "type")]
    pub(super) enum Internal {
        A { x: u32 },
        B(Record),
        C,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(tag = "t", content = "c")]
    pub(super) enum Adjacent {
        A(u32),
        B { y: String },
        C,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(untagged)]
    pub(super) enum Untagged {
        A(u32),
        B(String),
        C { z: bool },
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Inner {
        pub p: u32,
        pub q: Option<String>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Flat {
        pub id: u64,
        #[serde(flatten)]
        pub inner: Inner,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct FlatMap {
        pub id: u64,
        #[serde(flatten)]
        pub extra: BTreeMap<String, Option<Option<u8>>>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Nested {
        pub outer: Option<Option<Record>>,
        pub list: Vec<Option<Ext>>,
    }
    /// Bytes serialised as serde's byte string (`serialize_bytes`), as `serde_bytes` does.
    #[derive(Debug, PartialEq, Clone)]
    pub(super) struct ByteBuf(pub Vec<u8>);

    impl Serialize for ByteBuf {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
            }
            deserializer.deserialize_bytes(Visitor)
        }
    }

    /// `U(5)` is stored as the integer 5, which the untagged `F(f64)` accepts first.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    #[serde(untagged)]
    pub(super) enum Ambiguous {
        F(f64),
        U(u32),
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct Big {
        pub v: u128,
    }
    /// serde buffers a flattened field without 128-bit integers.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    pub(super) struct FlatU128 {
        #[serde(flatten)]
        pub inner: Big,
    }

    /// Runs `value` through the executor twice under a fresh key: the first call executes, the
    /// second replays a value that `eq` finds equal, and the body runs once.
    pub(super) async fn faithful<T>(
        store: &dyn Store,
        label: &str,
        value: T,
        eq: impl Fn(&T, &T) -> bool,
    ) where
        T: Serialize + DeserializeOwned + Clone + Debug + Send + 'static,
    {
        let key = (label, Token::generate().as_u128());
        let runs = AtomicUsize::new(0);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let out = Idempotent::new(store, key)
                .name("idem.conformance.results")
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<T, Error>(value.clone())
                })
                .await;
            match out {
                Ok(out) => seen.push(out),
                Err(err) => panic!("{label}: the call failed: {err}"),
            }
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{label}: the body ran again"
        );
        assert_eq!(seen[0].status, Status::Executed, "{label}");
        assert_eq!(seen[1].status, Status::Replayed, "{label}");
        assert!(
            eq(&seen[1].value, &value),
            "{label}: replayed {:?}, but the first call returned {value:?}",
            seen[1].value
        );
    }

    /// Runs `value` through the executor twice: the first caller gets it, the second gets
    /// [`Error::Codec`], and the body runs once.
    pub(super) async fn refused<T>(store: &dyn Store, label: &str, value: T)
    where
        T: Serialize + DeserializeOwned + Clone + Debug + PartialEq + Send + 'static,
    {
        let key = (label, Token::generate().as_u128());
        let runs = AtomicUsize::new(0);
        let call = || {
            Idempotent::new(store, key)
                .name("idem.conformance.results")
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<T, Error>(value.clone())
                })
        };
        match call().await {
            Ok(out) => {
                assert_eq!(out.value, value, "{label}: the first caller gets its value");
                assert_eq!(out.status, Status::Executed, "{label}");
            }
            Err(err) => panic!("{label}: the first call must return its value, got {err}"),
        }
        match call().await {
            Err(Error::Codec(_)) => {}
            other => panic!("{label}: a later call must get Error::Codec, got {other:?}"),
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{label}: the body ran again"
        );
    }
}

async fn record_step(
    store: &dyn Store,
    key: Key,
    token: Token,
    name: &str,
    value: &[u8],
    ttl: Duration,
) -> StepRecorded {
    match store
        .record_step(
            key,
            token,
            name.to_owned(),
            Bytes::copy_from_slice(value),
            ttl,
        )
        .await
    {
        Ok(recorded) => recorded,
        Err(err) => panic!("record_step of step {name:?} failed: {err}"),
    }
}

/// The steps `token` reads under `key`, sorted by name; `None` for `LeaseLost`.
async fn steps_of(store: &dyn Store, key: Key, token: Token) -> Option<Vec<(String, Bytes)>> {
    match store.steps(key, token).await {
        Ok(RecordedSteps::Held(mut steps)) => {
            steps.sort();
            Some(steps)
        }
        Ok(RecordedSteps::LeaseLost) => None,
        Ok(RecordedSteps::KeyReused) => {
            panic!("steps of a claim without a fingerprint are its own")
        }
        Err(err) => panic!("steps failed: {err}"),
    }
}

fn step(name: &str, value: &[u8]) -> (String, Bytes) {
    (name.to_owned(), Bytes::copy_from_slice(value))
}

/// The holder of a claim records steps and reads them back; a repeated record of one name under
/// one token keeps the first value.
pub async fn steps_are_recorded_under_the_holding_token(store: Arc<dyn Store>) {
    let key = fresh_key("steps_are_recorded_under_the_holding_token");
    let token = acquire(&*store, key, LONG).await;
    assert_eq!(
        steps_of(&*store, key, token).await,
        Some(vec![]),
        "a new claim has no steps"
    );
    for (name, value) in [("charge", &b"ch_1"[..]), ("reserve", b"r_1")] {
        assert_eq!(
            record_step(&*store, key, token, name, value, LONG).await,
            StepRecorded::Recorded,
            "the holder must be able to record step {name:?}"
        );
    }
    assert_eq!(
        record_step(&*store, key, token, "charge", b"ch_2", LONG).await,
        StepRecorded::Recorded,
        "a repeated record under the same token (a lost reply) is answered Recorded"
    );
    assert_eq!(
        steps_of(&*store, key, token).await,
        Some(vec![step("charge", b"ch_1"), step("reserve", b"r_1")]),
        "the holder reads its steps, the first value of a repeated one"
    );
    assert!(
        store.renew(key, token, LONG).await.unwrap_or(false),
        "the holder must be able to renew"
    );
    assert_eq!(
        steps_of(&*store, key, token).await.map(|s| s.len()),
        Some(2),
        "a renewal keeps the steps"
    );
}

/// After the lease ran out and another call took the key over, the new holder reads the steps
/// of the old one; the old token can neither read nor record steps, and what it tried to record
/// is not seen.
pub async fn steps_survive_a_takeover(store: Arc<dyn Store>) {
    let key = fresh_key("steps_survive_a_takeover");
    let stale = acquire(&*store, key, SHORT_LEASE).await;
    assert_eq!(
        record_step(&*store, key, stale, "charge", b"ch_1", LONG).await,
        StepRecorded::Recorded
    );
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let fresh = acquire(&*store, key, LONG).await;
    assert_ne!(stale, fresh);
    assert_eq!(
        steps_of(&*store, key, fresh).await,
        Some(vec![step("charge", b"ch_1")]),
        "a takeover must read the steps recorded by the holder it replaced"
    );
    assert_eq!(
        record_step(&*store, key, stale, "reserve", b"stale", LONG).await,
        StepRecorded::LeaseLost,
        "a stale holder must not record a step"
    );
    assert_eq!(
        steps_of(&*store, key, stale).await,
        None,
        "a stale holder must learn that it lost the lease when it reads steps"
    );
    assert_eq!(
        record_step(&*store, key, fresh, "reserve", b"r_1", LONG).await,
        StepRecorded::Recorded
    );
    assert_eq!(
        steps_of(&*store, key, fresh).await,
        Some(vec![step("charge", b"ch_1"), step("reserve", b"r_1")]),
        "the stale holder's attempt must not be seen"
    );
}

/// A released claim (its body failed, panicked or was cancelled) frees the key at once but keeps
/// its steps: the next claim reads them, so a retry does not run a recorded step again. Waiters
/// are woken by the release as by any other.
pub async fn steps_survive_a_release(store: Arc<dyn Store>) {
    let key = fresh_key("steps_survive_a_release");
    let first = acquire(&*store, key, LONG).await;
    assert_eq!(
        record_step(&*store, key, first, "charge", b"ch_1", LONG).await,
        StepRecorded::Recorded
    );
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let _ = store.wait(key, LONG).await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.release(key, first).await.ok(), Some(true));
    let waited = waiter.await.unwrap_or(LONG);
    assert!(
        waited < Duration::from_secs(10),
        "a release with steps must end waits on the key, it took {waited:?}"
    );
    assert_eq!(
        store.release(key, first).await.ok(),
        Some(false),
        "a released token cannot release again"
    );
    assert_eq!(
        record_step(&*store, key, first, "late", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "a released token cannot record a step"
    );
    let second = acquire(&*store, key, LONG).await;
    assert_ne!(first, second);
    assert_eq!(
        steps_of(&*store, key, second).await,
        Some(vec![step("charge", b"ch_1")]),
        "the next claim after a release must read the released claim's steps"
    );
    // And again: a second failure keeps both holders' steps.
    assert_eq!(
        record_step(&*store, key, second, "reserve", b"r_1", LONG).await,
        StepRecorded::Recorded
    );
    assert_eq!(store.release(key, second).await.ok(), Some(true));
    let third = acquire(&*store, key, LONG).await;
    assert_eq!(
        steps_of(&*store, key, third).await,
        Some(vec![step("charge", b"ch_1"), step("reserve", b"r_1")])
    );
    complete(&*store, key, third, b"done", LONG).await;
}

/// Steps are written and read only under the token that holds the key with a live lease: not on
/// an absent key (nothing is created), not on a completed one, not with another token, not
/// after the lease ran out (even with no takeover yet).
pub async fn steps_are_fenced_by_the_token(store: Arc<dyn Store>) {
    let absent = fresh_key("steps_are_fenced_by_the_token");
    let stranger = Token::generate();
    assert_eq!(
        record_step(&*store, absent, stranger, "charge", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "a step on an absent key must not be recorded"
    );
    assert_eq!(steps_of(&*store, absent, stranger).await, None);
    let token = acquire(&*store, absent, LONG).await;
    assert_eq!(
        steps_of(&*store, absent, token).await,
        Some(vec![]),
        "a refused step must not have created anything"
    );
    assert_eq!(
        record_step(&*store, absent, stranger, "charge", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "a token that does not hold the key must not record a step"
    );
    assert_eq!(steps_of(&*store, absent, stranger).await, None);
    complete(&*store, absent, token, b"done", LONG).await;
    assert_eq!(
        record_step(&*store, absent, token, "charge", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "a completed call records no more steps"
    );
    assert_eq!(steps_of(&*store, absent, token).await, None);

    let lapsed = fresh_key("steps_are_fenced_by_the_token");
    let token = acquire(&*store, lapsed, SHORT_LEASE).await;
    tokio::time::sleep(SHORT_LEASE * 2).await;
    assert_eq!(
        record_step(&*store, lapsed, token, "charge", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "a holder whose lease ran out must not record a step, even before a takeover"
    );
    assert_eq!(steps_of(&*store, lapsed, token).await, None);
}

/// `complete` deletes the call's steps (its value replays whole), and so does `remove`: a new
/// call with the key after either starts with none.
pub async fn complete_and_remove_delete_steps(store: Arc<dyn Store>) {
    let key = fresh_key("complete_and_remove_delete_steps");
    let token = acquire(&*store, key, LONG).await;
    record_step(&*store, key, token, "charge", b"ch_1", LONG).await;
    complete(&*store, key, token, b"done", SHORT_LEASE).await;
    match store.claim(key, None, LONG).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"done"),
        other => panic!("a completed call with steps must replay, got {other:?}"),
    }
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let again = acquire(&*store, key, LONG).await;
    assert_eq!(
        steps_of(&*store, key, again).await,
        Some(vec![]),
        "a call after a completed record expired must not see the completed call's steps"
    );

    let removed = fresh_key("complete_and_remove_delete_steps");
    let token = acquire(&*store, removed, LONG).await;
    record_step(&*store, removed, token, "charge", b"ch_1", LONG).await;
    assert_eq!(store.release(removed, token).await.ok(), Some(true));
    assert_eq!(
        store.remove(removed).await.ok(),
        Some(true),
        "remove must find a released call's steps"
    );
    let fresh = acquire(&*store, removed, LONG).await;
    assert_eq!(
        steps_of(&*store, removed, fresh).await,
        Some(vec![]),
        "remove must delete the steps"
    );
    record_step(&*store, removed, fresh, "charge", b"ch_2", LONG).await;
    assert_eq!(store.remove(removed).await.ok(), Some(true));
    let last = acquire(&*store, removed, LONG).await;
    assert_eq!(steps_of(&*store, removed, last).await, Some(vec![]));
}

/// Steps expire `ttl` after the last one was recorded: a released call's steps are gone after
/// it, and the key is a new one.
pub async fn steps_expire_with_their_ttl(store: Arc<dyn Store>) {
    let key = fresh_key("steps_expire_with_their_ttl");
    let token = acquire(&*store, key, LONG).await;
    record_step(&*store, key, token, "charge", b"ch_1", SHORT_LEASE).await;
    assert_eq!(store.release(key, token).await.ok(), Some(true));
    tokio::time::sleep(SHORT_LEASE * 3).await;
    let again = acquire(&*store, key, LONG).await;
    assert_eq!(
        steps_of(&*store, key, again).await,
        Some(vec![]),
        "steps must expire with their ttl"
    );
}

/// Step names are any string (empty, Unicode, separators, NUL) and values any bytes (empty,
/// binary, large); both come back exactly.
pub async fn step_names_and_values_round_trip(store: Arc<dyn Store>) {
    let key = fresh_key("step_names_and_values_round_trip");
    let token = acquire(&*store, key, LONG).await;
    let large: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut expected = vec![
        step("", b"empty name"),
        step("emp\u{fc}ty/\u{2603}", b""),
        step("a:b{c}", &[0, 255, 0, 1, 0x80, 0xfe]),
        step("nul\0inside", b"\0"),
        step("large", &large),
        step(&"n".repeat(1000), b"long name"),
    ];
    for (name, value) in &expected {
        assert_eq!(
            record_step(&*store, key, token, name, value, LONG).await,
            StepRecorded::Recorded,
            "step {name:?} must be recorded"
        );
    }
    assert_eq!(store.release(key, token).await.ok(), Some(true));
    let again = acquire(&*store, key, LONG).await;
    expected.sort();
    assert!(
        steps_of(&*store, key, again).await == Some(expected),
        "every step name and value must come back exactly"
    );
}

/// The steps of one key are never read under another, and completing or removing one key's
/// call leaves another's steps alone.
pub async fn steps_stay_with_their_key(store: Arc<dyn Store>) {
    let a = fresh_key("steps_stay_with_their_key");
    let b = fresh_key("steps_stay_with_their_key");
    let ta = acquire(&*store, a, LONG).await;
    let tb = acquire(&*store, b, LONG).await;
    record_step(&*store, a, ta, "charge", b"a", LONG).await;
    record_step(&*store, b, tb, "charge", b"b", LONG).await;
    assert_eq!(
        record_step(&*store, b, ta, "other", b"x", LONG).await,
        StepRecorded::LeaseLost,
        "one key's token must not record a step under another key"
    );
    assert_eq!(
        steps_of(&*store, a, ta).await,
        Some(vec![step("charge", b"a")])
    );
    assert_eq!(
        steps_of(&*store, b, tb).await,
        Some(vec![step("charge", b"b")])
    );
    complete(&*store, a, ta, b"done", LONG).await;
    assert_eq!(store.release(b, tb).await.ok(), Some(true));
    let tb = acquire(&*store, b, LONG).await;
    assert_eq!(
        steps_of(&*store, b, tb).await,
        Some(vec![step("charge", b"b")]),
        "completing another key must leave these steps alone"
    );
    assert_eq!(store.remove(a).await.ok(), Some(true));
    assert_eq!(steps_of(&*store, b, tb).await.map(|s| s.len()), Some(1));
}

/// Steps are the request's that recorded them: a claim with another fingerprint reads
/// `KeyReused` (and they stay), a claim with the same one or none reads them.
pub async fn steps_are_tied_to_the_fingerprint(store: Arc<dyn Store>) {
    let key = fresh_key("steps_are_tied_to_the_fingerprint");
    let (a, b) = (Fingerprint::of("amount=100"), Fingerprint::of("amount=200"));
    let claim = |fingerprint| {
        let store = store.clone();
        async move {
            match store.claim(key, fingerprint, LONG).await {
                Ok(Claim::Acquired(token)) => token,
                other => panic!("claim of a free key must acquire it, got {other:?}"),
            }
        }
    };
    let first = claim(Some(a)).await;
    assert_eq!(
        record_step(&*store, key, first, "charge", b"ch_100", LONG).await,
        StepRecorded::Recorded
    );
    assert_eq!(store.release(key, first).await.ok(), Some(true));

    let other = claim(Some(b)).await;
    assert_eq!(
        store.steps(key, other).await.ok(),
        Some(RecordedSteps::KeyReused),
        "a claim with another fingerprint must not inherit the steps"
    );
    assert_eq!(store.release(key, other).await.ok(), Some(true));

    let retry = claim(Some(a)).await;
    assert_eq!(
        steps_of(&*store, key, retry).await,
        Some(vec![step("charge", b"ch_100")]),
        "a retry of the request that recorded them reads them"
    );
    assert_eq!(store.release(key, retry).await.ok(), Some(true));
    let unfingerprinted = claim(None).await;
    assert_eq!(
        steps_of(&*store, key, unfingerprinted).await,
        Some(vec![step("charge", b"ch_100")]),
        "a claim without a fingerprint reads them (the rule of replays)"
    );
    assert_eq!(store.release(key, unfingerprinted).await.ok(), Some(true));

    // Steps recorded without a fingerprint are not a fingerprinted request's.
    let bare = fresh_key("steps_are_tied_to_the_fingerprint");
    let token = acquire(&*store, bare, LONG).await;
    record_step(&*store, bare, token, "charge", b"x", LONG).await;
    assert_eq!(store.release(bare, token).await.ok(), Some(true));
    let token = match store.claim(bare, Some(a), LONG).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("claim of a released key must acquire it, got {other:?}"),
    };
    assert_eq!(
        store.steps(bare, token).await.ok(),
        Some(RecordedSteps::KeyReused)
    );
}

/// `release_on_drop_after_steps` records the steps it is given, then releases: the next claim
/// reads them (a remote store does it in the background: the check waits for it).
pub async fn a_dropped_call_records_its_steps_then_releases(store: Arc<dyn Store>) {
    let key = fresh_key("a_dropped_call_records_its_steps_then_releases");
    let token = acquire(&*store, key, LONG).await;
    record_step(&*store, key, token, "charge", b"ch_1", LONG).await;
    store.release_on_drop_after_steps(
        key,
        token,
        vec![
            ("charge".to_owned(), Bytes::from_static(b"ch_other")),
            ("reserve".to_owned(), Bytes::from_static(b"r_1")),
        ],
        LONG,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let next = loop {
        match store.claim(key, None, LONG).await {
            Ok(Claim::Acquired(next)) => break next,
            Ok(Claim::Busy { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("the dropped call's claim must be released, got {other:?}"),
        }
    };
    assert_eq!(
        steps_of(&*store, key, next).await,
        Some(vec![step("charge", b"ch_1"), step("reserve", b"r_1")]),
        "the dropped call's steps are recorded before its release (the first value of a \
         repeated one stays)"
    );
}

/// A store whose `complete` never returns (it says when it is entered), for
/// [`cancelled_completion_keeps_the_claim`]; everything else goes to the store inside.
struct GatedComplete {
    inner: Arc<dyn Store>,
    entered: tokio::sync::Notify,
}

impl Store for GatedComplete {
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        self.inner.claim(key, fingerprint, lease)
    }
    fn complete(
        &self,
        _key: Key,
        _token: Token,
        _fingerprint: Option<Fingerprint>,
        _value: Bytes,
        _ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async move {
            self.entered.notify_one();
            std::future::pending().await
        })
    }
    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.renew(key, token, lease)
    }
    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.release(key, token)
    }
    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        self.inner.wait(key, timeout)
    }
    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.remove(key)
    }
    fn release_on_drop(&self, key: Key, token: Token) {
        self.inner.release_on_drop(key, token)
    }
    fn complete_on_drop(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        self.inner
            .complete_on_drop(key, token, fingerprint, value, ttl)
    }
    fn record_step(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        self.inner.record_step(key, token, step, value, ttl)
    }
    fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        self.inner.steps(key, token)
    }
    fn release_on_drop_after_steps(
        &self,
        key: Key,
        token: Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        self.inner
            .release_on_drop_after_steps(key, token, steps, ttl)
    }
}

/// Writes one `#[tokio::test]` per conformance check, each on a store made by `$make` (an
/// expression whose value is a future of `Arc<dyn Store>`, evaluated once per check).
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            claim_of_absent_key_acquires,
            complete_then_claim_replays,
            claim_while_in_progress_is_busy,
            lapsed_lease_is_taken_over,
            stale_token_cannot_complete_renew_or_release,
            renew_pushes_the_lease_out,
            release_frees_the_key,
            completed_record_expires_after_ttl,
            remove_forgets_a_record,
            operations_on_absent_key_change_nothing,
            wait_returns_when_holder_completes,
            wait_returns_when_holder_releases,
            wait_is_bounded_by_timeout,
            concurrent_claims_give_one_acquired,
            values_round_trip_exactly,
            keys_do_not_interfere,
            late_completion_is_stored,
            complete_is_idempotent_for_its_token,
            lease_is_granted_in_full,
            cancelled_body_frees_the_key,
            cancelled_completion_keeps_the_claim,
            results_replay_faithfully,
            unfaithful_results_are_refused_when_stored,
            steps_are_recorded_under_the_holding_token,
            steps_survive_a_takeover,
            steps_survive_a_release,
            steps_are_fenced_by_the_token,
            complete_and_remove_delete_steps,
            steps_expire_with_their_ttl,
            step_names_and_values_round_trip,
            steps_stay_with_their_key,
            steps_are_tied_to_the_fingerprint,
            a_dropped_call_records_its_steps_then_releases
        );
    };
    (@each $make:expr; $($check:ident),*) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $check() {
            let store: ::std::sync::Arc<dyn $crate::Store> = $make.await;
            $crate::conformance::$check(store).await;
        }
    )*};
}
