//! The in-memory store as a user meets it: the rule of `Store::complete` for results whose claim
//! is gone (late completions), and completions handed over from a dropped call. Time is tokio's
//! paused clock; counts, never timings, are asserted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem::{Bytes, Claim, Completion, Error, Idempotent, Key, MemoryStore, Status, Store};

fn acquired(claim: Result<Claim, Error>) -> idem::Token {
    match claim {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected the key to be acquired, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Late completions (the rule of `Store::complete`).

/// A claim whose lease ran out and was swept: its holder's completion still stores the result (its
/// body ran), and a repeated completion keeps the first value.
#[tokio::test(start_paused = true)]
async fn a_late_completion_whose_claim_was_swept_is_stored() {
    let store = MemoryStore::new();
    let late = Key::new("late", &1u8);
    let token = acquired(store.claim(late, None, Duration::from_secs(1)).await);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.sweep(), 1, "the lapsed claim is swept");
    let done = store
        .complete(
            late,
            token,
            Bytes::from_static(b"late"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done.ok(), Some(Completion::Stored));
    assert_eq!(store.len(), 1);
    let again = store
        .complete(
            late,
            token,
            Bytes::from_static(b"again"),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(again.ok(), Some(Completion::Stored));
    match store.claim(late, None, Duration::from_secs(30)).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"late", "the first value stays"),
        other => panic!("the late result must replay, got {other:?}"),
    }
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
        idem::Token::generate(),
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
        Bytes::from_static(b"yes"),
        Duration::from_secs(60),
    );
    match store.claim(key, None, Duration::from_secs(30)).await {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"yes"),
        other => panic!("complete_on_drop must have stored the result, got {other:?}"),
    }
}
