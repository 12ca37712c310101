//! The public API as a user meets it: the attribute's options, the semantics of DESIGN.md's
//! executor, and the function API. Each test uses a store or keys of its own.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem::{Error, Idempotent, MemoryStore, OnConflict, Status, idempotent};
use serde::{Deserialize, Serialize};
use support::LogCapture;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("declined")]
    Declined,
    #[error(transparent)]
    Idem(#[from] Error),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: u64,
    run: usize,
}

// ---------------------------------------------------------------------------------------------
// Execute once, replay after.

static CHARGES: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = order, ttl = "1h")]
async fn charge(order: u64) -> Result<Receipt, AppError> {
    let run = CHARGES.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(Receipt { order, run })
}

#[tokio::test]
async fn body_runs_once_and_retries_get_the_first_result() {
    let first = charge(1001).await.unwrap();
    let retry = charge(1001).await.unwrap();
    assert_eq!(first, retry);
    assert_eq!(CHARGES.load(Ordering::SeqCst), first.run);
    let other = charge(1002).await.unwrap();
    assert_ne!(other.run, first.run, "another key runs the body");
}

// ---------------------------------------------------------------------------------------------
// A failure is not memoized.

static FLAKY_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent]
async fn flaky(id: u64) -> Result<usize, AppError> {
    let run = FLAKY_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    if run == 1 {
        Err(AppError::Declined)
    } else {
        Ok(run)
    }
}

#[tokio::test]
async fn a_failed_body_runs_again_on_the_next_call() {
    assert!(matches!(flaky(7).await, Err(AppError::Declined)));
    assert_eq!(flaky(7).await.unwrap(), 2);
    assert_eq!(flaky(7).await.unwrap(), 2, "the success is memoized");
    assert_eq!(FLAKY_RUNS.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Panic and cancellation free the key at once.

struct Panicky {
    store: MemoryStore,
    runs: AtomicUsize,
}

impl Panicky {
    #[idempotent(store = self.store, key = id)]
    async fn work(&self, id: u64, panic: bool) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if panic {
            panic!("the body panicked");
        }
        Ok(run)
    }

    #[idempotent(store = self.store, key = id, name = "panicky.hang")]
    async fn hang(&self, id: u64, gate: Option<oneshot::Receiver<()>>) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        Ok(run)
    }
}

#[tokio::test]
async fn a_panicking_body_leaves_the_key_free_at_once() {
    let p = Arc::new(Panicky {
        store: MemoryStore::new(),
        runs: AtomicUsize::new(0),
    });
    let task = tokio::spawn({
        let p = p.clone();
        async move { p.work(1, true).await }
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(p.store.len(), 0, "the claim was released during unwinding");
    assert_eq!(
        p.work(1, false).await.unwrap(),
        2,
        "the next caller runs the body at once"
    );
}

#[tokio::test]
async fn a_cancelled_call_leaves_the_key_free_at_once() {
    let p = Panicky {
        store: MemoryStore::new(),
        runs: AtomicUsize::new(0),
    };
    let (_never, gate) = oneshot::channel();
    let cancelled = tokio::time::timeout(Duration::from_millis(50), p.hang(9, Some(gate))).await;
    assert!(cancelled.is_err(), "the call was cancelled mid-body");
    assert_eq!(p.store.len(), 0, "dropping the future released the claim");
    assert_eq!(
        p.hang(9, None).await.unwrap(),
        2,
        "the next caller runs the body at once"
    );
}

// ---------------------------------------------------------------------------------------------
// Conflict: reject, or wait for the holder.

struct Gated {
    store: Arc<MemoryStore>,
    runs: AtomicUsize,
}

impl Gated {
    #[idempotent(store = self.store, key = id, on_conflict = reject, name = "gated.reject")]
    async fn reject(
        &self,
        id: u64,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        Ok(run)
    }

    #[idempotent(store = self.store, key = id, on_conflict = wait, name = "gated.wait")]
    async fn wait(&self, id: u64, gate: Option<oneshot::Receiver<()>>) -> Result<usize, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(gate) = gate {
            let _ = gate.await;
        }
        Ok(run)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_fails_at_once_while_the_key_is_held() {
    let g = Arc::new(Gated {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicUsize::new(0),
    });
    let (open, gate) = oneshot::channel();
    let holder = tokio::spawn({
        let g = g.clone();
        async move { g.reject(5, Some(gate)).await }
    });
    while g.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    match g.reject(5, None).await {
        Err(AppError::Idem(Error::InProgress { retry_after })) => {
            assert!(retry_after <= idem::DEFAULT_LEASE)
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    open.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(
        g.reject(5, None).await.unwrap(),
        1,
        "after completion the result replays"
    );
    assert_eq!(g.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gets_the_holders_value_without_running_the_body() {
    let g = Arc::new(Gated {
        store: Arc::new(MemoryStore::new()),
        runs: AtomicUsize::new(0),
    });
    let (open, gate) = oneshot::channel();
    let holder = tokio::spawn({
        let g = g.clone();
        async move { g.wait(6, Some(gate)).await }
    });
    while g.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let waiter = tokio::spawn({
        let g = g.clone();
        async move { g.wait(6, None).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    open.send(()).unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 1);
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        1,
        "the waiter got the holder's value"
    );
    assert_eq!(
        g.runs.load(Ordering::SeqCst),
        1,
        "the waiter did not run the body"
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_is_bounded_by_wait_timeout() {
    let store = MemoryStore::new();
    let (_never, gate) = oneshot::channel::<()>();
    let holder = Idempotent::new(&store, "slow").name("test").run(|| async {
        let _ = gate.await;
        Ok::<_, Error>(1u8)
    });
    let waiter = async {
        tokio::task::yield_now().await;
        Idempotent::new(&store, "slow")
            .name("test")
            .wait_timeout(Duration::from_secs(5))
            .run(|| async { Ok::<_, Error>(2u8) })
            .await
    };
    tokio::select! {
        _ = holder => panic!("the holder never finishes"),
        waited = waiter => assert!(matches!(waited, Err(Error::InProgress { .. })), "{waited:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Fingerprints.

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Transfer {
    to: String,
    cents: u64,
}

static TRANSFERS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = idempotency_key, fingerprint = (&transfer.to, transfer.cents))]
async fn transfer(idempotency_key: &str, transfer: &Transfer) -> Result<Transfer, AppError> {
    TRANSFERS.fetch_add(1, Ordering::SeqCst);
    Ok(transfer.clone())
}

#[tokio::test]
async fn same_key_with_another_fingerprint_is_key_reused() {
    let first = Transfer {
        to: "alice".into(),
        cents: 500,
    };
    let other = Transfer {
        to: "mallory".into(),
        cents: 500_000,
    };
    assert_eq!(transfer("k-1", &first).await.unwrap(), first);
    assert!(matches!(
        transfer("k-1", &other).await,
        Err(AppError::Idem(Error::KeyReused))
    ));
    assert_eq!(
        transfer("k-1", &first).await.unwrap(),
        first,
        "the stored result is untouched"
    );
    assert_eq!(TRANSFERS.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Time to live, on tokio's paused clock.

#[tokio::test(start_paused = true)]
async fn after_ttl_the_body_runs_again_and_within_it_does_not() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let call = || {
        Idempotent::new(&store, ("ttl", 1u8))
            .name("test")
            .ttl(Duration::from_secs(60))
            .run(|| async { Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1) })
    };
    assert_eq!(call().await.unwrap(), 1);
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(call().await.unwrap(), 1, "within the ttl: replayed");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(call().await.unwrap(), 2, "after the ttl: executed again");
}

#[idempotent(key = n, ttl = ttl, store = store)]
async fn with_ttl_expr(store: &MemoryStore, n: u8, ttl: Duration) -> Result<u8, AppError> {
    Ok(n)
}

#[tokio::test(start_paused = true)]
async fn ttl_may_be_a_duration_expression() {
    let store = MemoryStore::new();
    with_ttl_expr(&store, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let out = Idempotent::new(&store, 0u8)
        .name("test")
        .run(|| async { Ok::<_, Error>(0u8) })
        .await
        .unwrap();
    assert_eq!(out, 0);
    assert_eq!(store.len(), 2);
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        store.sweep(),
        1,
        "the 10 s record expired, the 24 h one did not"
    );
}

// ---------------------------------------------------------------------------------------------
// Leases: a holder that stops being polled loses its lease; its result is fenced off.

#[tokio::test]
async fn a_lapsed_lease_is_taken_over_and_the_stale_holder_is_fenced() {
    let logs = LogCapture::install();
    let store = MemoryStore::new();
    let lease = Duration::from_millis(200);
    let (open, gate) = oneshot::channel::<()>();
    let mut stale = Box::pin(
        Idempotent::new(&store, "lease")
            .name("test")
            .lease(lease)
            .run_with_outcome(|| async {
                let _ = gate.await;
                Ok::<_, Error>(String::from("stale holder"))
            }),
    );
    // Poll the first call until it holds the key and waits in its body, then stop polling it:
    // it no longer renews, as if its process were paused.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), &mut stale)
            .await
            .is_err()
    );
    tokio::time::sleep(lease * 2).await;

    let fresh = Idempotent::new(&store, "lease")
        .name("test")
        .lease(lease)
        .run_with_outcome(|| async { Ok::<_, Error>(String::from("new holder")) })
        .await
        .unwrap();
    assert_eq!(
        (fresh.value.as_str(), fresh.status),
        ("new holder", Status::Executed)
    );

    open.send(()).unwrap();
    let late = stale.await.unwrap();
    assert_eq!(
        (late.value.as_str(), late.status),
        ("stale holder", Status::LeaseLost)
    );

    let replay = Idempotent::new(&store, "lease")
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(String::from("not run")) })
        .await
        .unwrap();
    assert_eq!(
        replay.value, "new holder",
        "the stale holder could not overwrite the result"
    );
    assert!(
        logs.contains("lease_lost"),
        "the user sees a lease_lost warning: {}",
        logs.text()
    );
}

#[tokio::test(start_paused = true)]
async fn a_long_body_keeps_its_lease_by_renewal() {
    let store = MemoryStore::new();
    let lease = Duration::from_secs(3);
    let holder = Idempotent::new(&store, "long")
        .name("test")
        .lease(lease)
        .run_with_outcome(|| async {
            tokio::time::sleep(lease * 10).await;
            Ok::<_, Error>(1u8)
        });
    let rival = async {
        tokio::time::sleep(lease * 5).await;
        Idempotent::new(&store, "long")
            .name("test")
            .on_conflict(OnConflict::Reject)
            .run(|| async { Ok::<_, Error>(2u8) })
            .await
    };
    let (held, rivalled) = tokio::join!(holder, rival);
    assert_eq!(held.unwrap().status, Status::Executed);
    assert!(
        matches!(rivalled, Err(Error::InProgress { .. })),
        "{rivalled:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Namespaces.

#[idempotent]
async fn type_tag<T: 'static>(id: u32) -> Result<String, AppError> {
    Ok(std::any::type_name::<T>().to_owned())
}

#[tokio::test]
async fn generic_instantiations_never_share_results() {
    assert_eq!(type_tag::<u8>(1).await.unwrap(), "u8");
    assert_eq!(type_tag::<u16>(1).await.unwrap(), "u16");
    assert_eq!(type_tag::<u8>(1).await.unwrap(), "u8");
}

#[idempotent(name = "shared.v1", key = id)]
async fn shared_a(id: u32) -> Result<String, AppError> {
    Ok("a".into())
}

#[idempotent(name = "shared.v1", key = id)]
async fn shared_b(id: u32) -> Result<String, AppError> {
    Ok("b".into())
}

#[tokio::test]
async fn functions_with_one_name_share_records() {
    assert_eq!(shared_a(1).await.unwrap(), "a");
    assert_eq!(shared_b(1).await.unwrap(), "a", "one namespace, one record");
}

#[idempotent(key = id)]
async fn answer_one(id: u32) -> Result<u32, AppError> {
    Ok(1)
}

#[idempotent(key = id)]
async fn answer_two(id: u32) -> Result<u32, AppError> {
    Ok(2)
}

#[tokio::test]
async fn functions_default_to_namespaces_of_their_own() {
    assert_eq!(answer_one(3).await.unwrap(), 1);
    assert_eq!(answer_two(3).await.unwrap(), 2);
}

// ---------------------------------------------------------------------------------------------
// Codec: a record of another type under the same key.

#[tokio::test]
async fn a_stored_result_of_another_type_is_a_codec_error() {
    let store = MemoryStore::new();
    Idempotent::new(&store, "typed")
        .name("test")
        .run(|| async { Ok::<_, Error>(String::from("text")) })
        .await
        .unwrap();
    let read = Idempotent::new(&store, "typed")
        .name("test")
        .run(|| async { Ok::<_, Error>(5u64) })
        .await;
    assert!(matches!(read, Err(Error::Codec(_))), "{read:?}");
}

// ---------------------------------------------------------------------------------------------
// The function API works on `Arc<dyn Store>`, chosen at run time.

#[tokio::test]
async fn the_store_can_be_chosen_at_run_time() {
    let store: Arc<dyn idem::Store> = Arc::new(MemoryStore::new());
    let first = Idempotent::new(&store, 1u8)
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(1u8) });
    assert_eq!(first.await.unwrap().status, Status::Executed);
    let again = Idempotent::new(&store, 1u8)
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(2u8) });
    let again = again.await.unwrap();
    assert_eq!((again.value, again.status), (1, Status::Replayed));
    assert!(again.expires_in.unwrap() <= idem::DEFAULT_TTL);
}

struct Service {
    store: Arc<dyn idem::Store>,
}

impl Service {
    #[idempotent(store = self.store, key = id)]
    async fn handle(&self, id: u64) -> Result<u64, AppError> {
        Ok(id * 2)
    }
}

#[tokio::test]
async fn methods_take_their_store_from_self() {
    let svc = Service {
        store: Arc::new(MemoryStore::new()),
    };
    assert_eq!(svc.handle(21).await.unwrap(), 42);
    assert_eq!(svc.handle(21).await.unwrap(), 42);
}

// ---------------------------------------------------------------------------------------------
// The in-memory store's bound.

#[tokio::test(start_paused = true)]
async fn a_full_memory_store_refuses_new_keys_but_serves_old_ones_and_frees_by_expiry() {
    let store = MemoryStore::with_max_entries(10);
    let ttl = Duration::from_secs(5);
    for k in 0..10u8 {
        Idempotent::new(&store, k)
            .name("test")
            .ttl(ttl)
            .run(|| async { Ok::<_, Error>(k) })
            .await
            .unwrap();
    }
    let refused = Idempotent::new(&store, 10u8)
        .name("test")
        .run(|| async { Ok::<_, Error>(10u8) })
        .await;
    assert!(matches!(refused, Err(Error::StoreFull(_))), "{refused:?}");
    assert_eq!(
        Idempotent::new(&store, 3u8)
            .name("test")
            .run(|| async { Ok::<_, Error>(99u8) })
            .await
            .unwrap(),
        3,
        "stored keys still replay at the bound"
    );
    assert_eq!(store.len(), 10);
    tokio::time::advance(ttl * 2).await;
    let admitted = Idempotent::new(&store, 10u8)
        .name("test")
        .run(|| async { Ok::<_, Error>(10u8) })
        .await;
    assert_eq!(admitted.unwrap(), 10, "expired records make room");
    assert!(store.len() <= 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_inserts_never_overshoot_the_bound() {
    let store = Arc::new(MemoryStore::with_max_entries(50));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..400u32 {
        let store = store.clone();
        tasks.spawn(async move {
            Idempotent::new(&*store, k)
                .name("test")
                .run(|| async move { Ok::<_, Error>(k) })
                .await
        });
    }
    let mut stored = 0;
    while let Some(joined) = tasks.join_next().await {
        if joined.unwrap().is_ok() {
            stored += 1;
        }
    }
    assert_eq!(stored, 50);
    assert_eq!(store.len(), 50);
}

// ---------------------------------------------------------------------------------------------
// The in-memory store keeps `Clone` results typed; readers through the trait still see JSON.

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    tags: Vec<String>,
}

struct Typed {
    store: MemoryStore,
}

impl Typed {
    #[idempotent(store = self.store, key = id, name = "typed.v1")]
    async fn profile(&self, id: u64) -> Result<Profile, AppError> {
        Ok(Profile {
            name: format!("user {id}"),
            tags: vec!["a".into()],
        })
    }

    #[idempotent(store = self.store, key = id, name = "typed.v1")]
    async fn as_number(&self, id: u64) -> Result<u64, AppError> {
        Ok(id)
    }
}

#[tokio::test]
async fn typed_results_replay_and_read_through_the_trait() {
    let t = Typed {
        store: MemoryStore::new(),
    };
    let first = t.profile(1).await.unwrap();
    assert_eq!(
        t.profile(1).await.unwrap(),
        first,
        "replayed from the typed record"
    );

    let key = idem::Key::new("typed.v1", &1u64);
    match idem::Store::claim(&t.store, key, None, Duration::from_secs(1))
        .await
        .unwrap()
    {
        idem::store::Claim::Completed(done) => {
            assert_eq!(
                idem::codec::from_slice::<Profile>(&done.value).unwrap(),
                first,
                "encoded on demand"
            );
        }
        other => panic!("expected the completed record, got {other:?}"),
    }
    // A function reading the record as another type gets a codec error, not a wrong value.
    assert!(matches!(
        t.as_number(1).await,
        Err(AppError::Idem(Error::Codec(_)))
    ));
}

#[tokio::test]
async fn a_record_written_through_the_trait_replays_into_a_typed_function() {
    let t = Typed {
        store: MemoryStore::new(),
    };
    let stored = Profile {
        name: "from elsewhere".into(),
        tags: vec![],
    };
    let key = idem::Key::new("typed.v1", &2u64);
    let token = match idem::Store::claim(&t.store, key, None, Duration::from_secs(5))
        .await
        .unwrap()
    {
        idem::store::Claim::Acquired(token) => token,
        other => panic!("{other:?}"),
    };
    let bytes = idem::store::Bytes::from(idem::codec::to_vec(&stored).unwrap());
    idem::Store::complete(&t.store, key, token, None, bytes, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(t.profile(2).await.unwrap(), stored);
}

// ---------------------------------------------------------------------------------------------
// The function API without a name: the call site is the namespace.

async fn one_call_site(store: &MemoryStore, run: u8) -> u8 {
    Idempotent::new(store, 7u64)
        .run(|| async move { Ok::<_, Error>(run) })
        .await
        .unwrap()
}

#[tokio::test]
async fn two_call_sites_without_a_name_never_share_records() {
    let store = MemoryStore::new();
    let a = Idempotent::new(&store, 7u64)
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let b = Idempotent::new(&store, 7u64)
        .run(|| async { Ok::<_, Error>(2u8) })
        .await
        .unwrap();
    assert_eq!((a, b), (1, 2), "each call site ran its own body");
    // One call site, called twice, replays.
    assert_eq!(one_call_site(&store, 3).await, 3);
    assert_eq!(one_call_site(&store, 4).await, 3);
}

// ---------------------------------------------------------------------------------------------
// Outside a tokio runtime: no panic.

/// Polls `fut` to completion on this thread, with no runtime (a spinning executor).
fn block_on_without_runtime<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::yield_now();
    }
}

#[test]
fn calls_outside_a_tokio_runtime_run_and_replay_without_panicking() {
    let store = MemoryStore::new();
    let call = || {
        Idempotent::new(&store, 1u8)
            .name("no-runtime")
            .run_with_outcome(|| async { Ok::<_, Error>(5u8) })
    };
    let first = block_on_without_runtime(call()).unwrap();
    assert_eq!((first.value, first.status), (5, Status::Executed));
    let again = block_on_without_runtime(call()).unwrap();
    assert_eq!((again.value, again.status), (5, Status::Replayed));
    // A busy key is refused at once rather than waited for (waiting needs tokio's timers).
    let held = Idempotent::new(&store, 2u8)
        .name("no-runtime")
        .run(|| async {
            let waiter = Idempotent::new(&store, 2u8)
                .name("no-runtime")
                .run(|| async { Ok::<_, Error>(0u8) });
            let waited = waiter.await;
            assert!(
                matches!(waited, Err(Error::InProgress { .. })),
                "{waited:?}"
            );
            Ok::<_, Error>(1u8)
        });
    assert_eq!(block_on_without_runtime(held).unwrap(), 1);
}

/// One call site in a generic function: each instantiation is a namespace of its own (the
/// body's type names the function's type arguments).
async fn generic_call_site<
    T: Default + Serialize + serde::de::DeserializeOwned + Send + 'static,
>(
    store: &MemoryStore,
    runs: &std::sync::atomic::AtomicUsize,
) -> T {
    Idempotent::new(store, 9u64)
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(T::default())
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_generic_call_site_keeps_its_instantiations_apart() {
    let store = MemoryStore::new();
    let runs = std::sync::atomic::AtomicUsize::new(0);
    assert_eq!(generic_call_site::<u8>(&store, &runs).await, 0);
    assert_eq!(generic_call_site::<String>(&store, &runs).await, "");
    assert_eq!(generic_call_site::<u8>(&store, &runs).await, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "one body per instantiation");
}

// ---------------------------------------------------------------------------------------------
// A store that fails or lags: the in-memory store behind a wrapper that is reached only through
// the `Store` trait.

/// Fails the first `complete` (the value never reaches the store), or answers claims late.
struct Troubled {
    inner: MemoryStore,
    fail_completes: std::sync::atomic::AtomicUsize,
    claim_delay: Duration,
    renewals: std::sync::atomic::AtomicUsize,
}

impl Troubled {
    fn new(fail_completes: usize, claim_delay: Duration) -> Troubled {
        Troubled {
            inner: MemoryStore::new(),
            fail_completes: std::sync::atomic::AtomicUsize::new(fail_completes),
            claim_delay,
            renewals: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl idem::Store for Troubled {
    fn claim(
        &self,
        key: idem::Key,
        fingerprint: Option<idem::Fingerprint>,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::Claim, Error>> {
        Box::pin(async move {
            let claim = self.inner.claim(key, fingerprint, lease).await;
            tokio::time::sleep(self.claim_delay).await; // the reply is slow
            claim
        })
    }
    fn complete(
        &self,
        key: idem::Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: idem::store::Bytes,
        ttl: Duration,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::Completion, Error>> {
        let failing = self
            .fail_completes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Box::pin(async { Err(Error::store("connection reset")) });
        }
        self.inner.complete(key, token, fingerprint, value, ttl)
    }
    fn renew(
        &self,
        key: idem::Key,
        token: idem::store::Token,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.inner.renew(key, token, lease)
    }
    fn release(
        &self,
        key: idem::Key,
        token: idem::store::Token,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.inner.release(key, token)
    }
    fn wait(
        &self,
        key: idem::Key,
        timeout: Duration,
    ) -> idem::store::BoxFuture<'_, Result<(), Error>> {
        self.inner.wait(key, timeout)
    }
    fn remove(&self, key: idem::Key) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.inner.remove(key)
    }
    fn complete_on_drop(
        &self,
        key: idem::Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: idem::store::Bytes,
        ttl: Duration,
    ) {
        self.inner
            .complete_on_drop(key, token, fingerprint, value, ttl)
    }
}

/// A `complete` that fails once (a connection reset) leaves the result to the background
/// completion: the retry replays it, never an error in its place, and the body runs once.
#[tokio::test]
async fn a_transient_completion_failure_stores_the_result_in_the_background() {
    let store = Troubled::new(1, Duration::ZERO);
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let call = || {
        Idempotent::new(&store, 1u8)
            .name("troubled")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(String::from("precious"))
            })
    };
    let first = call().await.unwrap();
    assert_eq!(first.value, "precious", "the caller gets its value");
    assert_eq!(
        first.expires_in, None,
        "nothing was stored by the call itself"
    );
    let again = call().await.unwrap();
    assert_eq!(
        (again.value.as_str(), again.status),
        ("precious", Status::Replayed)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A claim whose reply took half the lease or more is renewed before the body starts: the lease
/// counted on the store may have run out while the reply travelled.
#[tokio::test(start_paused = true)]
async fn a_slow_claim_reply_is_renewed_before_the_body_starts() {
    let store = Troubled::new(0, Duration::from_millis(60));
    let renewals_before_body = Idempotent::new(&store, 1u8)
        .name("troubled")
        .lease(Duration::from_millis(100))
        .run(|| async { Ok::<_, Error>(store.renewals.load(Ordering::SeqCst)) })
        .await
        .unwrap();
    assert_eq!(renewals_before_body, 1, "renewed once, before the body");
}

// ---------------------------------------------------------------------------------------------
// `outcome`: attribute users learn whether a call executed, waited or replayed (issue 16).

struct Seats {
    store: MemoryStore,
    runs: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

impl Seats {
    #[idempotent(store = self.store, key = seat, ttl = "1h", outcome)]
    async fn reserve(&self, seat: u64) -> Result<idem::Outcome<Receipt>, AppError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if seat == 0 {
            return Err(AppError::Declined);
        }
        // Held until the test lets it finish, so that a second call can wait for it.
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
        Ok(Receipt { order: seat, run })
    }
}

#[tokio::test]
async fn the_outcome_option_tells_executed_waited_and_replayed_apart() {
    let seats = Arc::new(Seats {
        store: MemoryStore::new(),
        runs: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    let first = tokio::spawn({
        let seats = seats.clone();
        async move { seats.reserve(7).await }
    });
    while seats.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let second = tokio::spawn({
        let seats = seats.clone();
        async move { seats.reserve(7).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    seats.gate.add_permits(1);
    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(first.status, Status::Executed);
    assert_eq!(second.status, Status::Waited);
    assert_eq!(first.value, second.value);
    let left = first.expires_in.expect("stored");
    assert!(left > Duration::from_secs(3590) && left <= Duration::from_secs(3600));

    let replay = seats.reserve(7).await.unwrap();
    assert_eq!(replay.status, Status::Replayed);
    assert_eq!(replay.value, Receipt { order: 7, run: 1 });
    assert!(
        replay
            .expires_in
            .is_some_and(|left| left <= Duration::from_secs(3600))
    );

    assert!(matches!(seats.reserve(0).await, Err(AppError::Declined)));
    assert_eq!(seats.runs.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// Review 2, finding 5: a body whose type names no single body needs a name.

type Job = Box<dyn FnOnce() -> idem::store::BoxFuture<'static, Result<String, Error>> + Send>;

fn job(label: &'static str, runs: &'static AtomicUsize) -> Job {
    Box::new(move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(label.to_owned())
        })
    })
}

#[tokio::test]
async fn a_trait_object_or_fn_pointer_body_without_a_name_is_refused() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let store = MemoryStore::new();
    let run = |body: Job| Idempotent::new(&store, 1u64).run(body);
    let charged = run(job("charged", &RUNS)).await;
    assert!(
        matches!(&charged, Err(Error::NameRequired { body }) if body.contains("dyn")),
        "{charged:?}"
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 0, "nothing ran");
    assert!(store.is_empty(), "nothing was claimed");

    async fn plain() -> Result<u8, Error> {
        Ok(1)
    }
    let pointer: fn() -> _ = || plain();
    let refused = Idempotent::new(&store, 2u64).run(pointer).await;
    assert!(
        matches!(refused, Err(Error::NameRequired { .. })),
        "{refused:?}"
    );

    // Named, the same bodies are two operations.
    let named = |name: &'static str, body: Job| Idempotent::new(&store, 1u64).name(name).run(body);
    assert_eq!(
        named("charge", job("charged", &RUNS)).await.unwrap(),
        "charged"
    );
    assert_eq!(
        named("email", job("emailed", &RUNS)).await.unwrap(),
        "emailed"
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 2);
    // A fn item has a type of its own: no name needed.
    assert_eq!(Idempotent::new(&store, 3u64).run(plain).await.unwrap(), 1);
}
