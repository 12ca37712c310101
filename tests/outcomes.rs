//! Every call emits exactly one `tracing` outcome event, whatever happens to it: executed,
//! failed, panicked, cancelled, replayed, waited, rejected, key_reused, lease_lost, store_error,
//! store_full.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem::store::{BoxFuture, Bytes, Claim, Completion, Token};
use idem::{Error, Fingerprint, Idempotent, Key, MemoryStore, OnConflict, Status, Store};
use support::LogCapture;
use tokio::sync::oneshot;

/// The outcomes logged so far, in order.
fn outcomes(logs: &LogCapture) -> Vec<String> {
    logs.text()
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("outcome=\"")? + "outcome=\"".len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn executed_then_replayed() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    for _ in 0..2 {
        Idempotent::new(&store, 1u8)
            .name("outcomes")
            .run(|| async { Ok::<_, Error>(1u8) })
            .await
            .unwrap();
    }
    assert_eq!(outcomes(&logs), ["executed", "replayed"]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_body_is_failed_not_executed() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let failed = Idempotent::new(&store, 1u8)
        .name("outcomes")
        .run(|| async { Err::<u8, _>(Error::store("declined")) })
        .await;
    assert!(failed.is_err());
    assert_eq!(outcomes(&logs), ["failed"]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_body_is_panicked_and_frees_the_key() {
    let logs = LogCapture::install();
    let store = Arc::new(MemoryStore::new());
    let task = {
        let store = store.clone();
        tokio::spawn(async move {
            Idempotent::new(&*store, 1u8)
                .name("outcomes")
                .run(|| async {
                    if store.len() < usize::MAX {
                        panic!("the body panicked");
                    }
                    Ok::<_, Error>(1u8)
                })
                .await
        })
    };
    let joined = task.await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    let again = Idempotent::new(&*store, 1u8)
        .name("outcomes")
        .run_with_outcome(|| async { Ok::<_, Error>(2u8) })
        .await
        .unwrap();
    assert_eq!((again.value, again.status), (2, Status::Executed));
    assert_eq!(outcomes(&logs), ["panicked", "executed"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_dropped_call_is_cancelled_while_running_and_while_waiting() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let (_never, gate) = oneshot::channel::<()>();
    let holder = Idempotent::new(&store, 1u8).name("outcomes").run(|| async {
        let _ = gate.await;
        Ok::<_, Error>(1u8)
    });
    let waiter = async {
        tokio::task::yield_now().await;
        let waiting = Idempotent::new(&store, 1u8)
            .name("outcomes")
            .run(|| async { Ok::<_, Error>(2u8) });
        // Dropped while it waits for the holder.
        let _ = tokio::time::timeout(Duration::from_secs(1), waiting).await;
    };
    tokio::select! {
        _ = holder => panic!("the holder never finishes"),
        () = waiter => {}
    }
    // The holder was dropped by the select: cancelled, and its key is free.
    let again = Idempotent::new(&store, 1u8)
        .name("outcomes")
        .run_with_outcome(|| async { Ok::<_, Error>(3u8) })
        .await
        .unwrap();
    assert_eq!(again.status, Status::Executed);
    assert_eq!(outcomes(&logs), ["cancelled", "cancelled", "executed"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn waited_and_rejected() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let (open, gate) = oneshot::channel::<()>();
    let holder = Idempotent::new(&store, 1u8).name("outcomes").run(|| async {
        let _ = gate.await;
        Ok::<_, Error>(1u8)
    });
    let others = async {
        tokio::task::yield_now().await;
        let rejected = Idempotent::new(&store, 1u8)
            .name("outcomes")
            .on_conflict(OnConflict::Reject)
            .run(|| async { Ok::<_, Error>(2u8) })
            .await;
        assert!(matches!(rejected, Err(Error::InProgress { .. })));
        let waiter = Idempotent::new(&store, 1u8)
            .name("outcomes")
            .run_with_outcome(|| async { Ok::<_, Error>(3u8) });
        let opener = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let _ = open.send(());
        };
        let (waited, ()) = tokio::join!(waiter, opener);
        waited.unwrap()
    };
    let (held, waited) = tokio::join!(holder, others);
    assert_eq!(held.unwrap(), 1);
    assert_eq!((waited.value, waited.status), (1, Status::Waited));
    assert_eq!(outcomes(&logs), ["rejected", "executed", "waited"]);
}

#[tokio::test(flavor = "current_thread")]
async fn key_reused() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    Idempotent::new(&store, 1u8)
        .name("outcomes")
        .fingerprint("a")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let reused = Idempotent::new(&store, 1u8)
        .name("outcomes")
        .fingerprint("b")
        .run(|| async { Ok::<_, Error>(2u8) })
        .await;
    assert!(matches!(reused, Err(Error::KeyReused)));
    assert_eq!(outcomes(&logs), ["executed", "key_reused"]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn lease_lost() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let lease = Duration::from_millis(200);
    let (open, gate) = oneshot::channel::<()>();
    // A holder that stops being polled stops renewing; another call takes the key over.
    let mut stale = Box::pin(
        Idempotent::new(&store, 1u8)
            .name("outcomes")
            .lease(lease)
            .run_with_outcome(|| async {
                let _ = gate.await;
                Ok::<_, Error>(1u8)
            }),
    );
    assert!(futures_poll_once(stale.as_mut()).await.is_none());
    tokio::time::sleep(lease * 2).await;
    let fresh = Idempotent::new(&store, 1u8)
        .name("outcomes")
        .lease(lease)
        .run_with_outcome(|| async { Ok::<_, Error>(2u8) })
        .await
        .unwrap();
    assert_eq!(fresh.status, Status::Executed);
    let _ = open.send(());
    let stale = stale.await.unwrap();
    assert_eq!(stale.status, Status::LeaseLost);
    assert_eq!(outcomes(&logs), ["executed", "lease_lost"]);
}

/// Polls `fut` once; `Some` if it finished.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// A store whose every operation fails, as an unreachable server would.
struct Down {
    claims: AtomicUsize,
}

impl Store for Down {
    fn claim(
        &self,
        _: Key,
        _: Option<Fingerprint>,
        _: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn complete(
        &self,
        _: Key,
        _: Token,
        _: Option<idem::Fingerprint>,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn renew(&self, _: Key, _: Token, _: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn release(&self, _: Key, _: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn wait(&self, _: Key, _: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn remove(&self, _: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn store_error() {
    let logs = LogCapture::install();
    let store = Down {
        claims: AtomicUsize::new(0),
    };
    let runs = AtomicUsize::new(0);
    let failed = Idempotent::new(&store, 1u8)
        .name("outcomes")
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(1u8)
        })
        .await;
    assert!(matches!(failed, Err(Error::Store(_))));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the body never runs unguarded"
    );
    assert_eq!(outcomes(&logs), ["store_error"]);
}

#[tokio::test(flavor = "current_thread")]
async fn store_full() {
    let logs = LogCapture::install();
    let store = idem::MemoryStore::with_max_entries(1);
    Idempotent::new(&store, 1u8)
        .name("outcomes")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let runs = AtomicUsize::new(0);
    let full = Idempotent::new(&store, 2u8)
        .name("outcomes")
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(2u8)
        })
        .await;
    assert!(matches!(full, Err(Error::StoreFull(_))), "{full:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(outcomes(&logs), ["executed", "store_full"]);
}

#[tokio::test(flavor = "current_thread")]
async fn a_step_that_finds_its_lease_lost_is_lease_lost() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let lease = Duration::from_millis(50);
    let (go, resume) = oneshot::channel::<()>();
    let stale = Idempotent::new(&store, 1u8)
        .name("outcomes.steps")
        .lease(lease)
        .run(|| async {
            let _ = resume.await;
            idem::step("charge", || async { Ok::<_, Error>(1u8) }).await
        });
    let mut stale = Box::pin(stale);
    // Claimed, then not polled past its lease; another call takes the key over.
    let _ = tokio::time::timeout(Duration::from_millis(5), &mut stale).await;
    tokio::time::sleep(lease * 3).await;
    Idempotent::new(&store, 1u8)
        .name("outcomes.steps")
        .lease(lease)
        .run(|| async { Ok::<_, Error>(2u8) })
        .await
        .unwrap();
    let _ = go.send(());
    let err = stale.await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert_eq!(outcomes(&logs), ["executed", "lease_lost"]);
}
