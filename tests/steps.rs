//! `idem::step` through the executor, on the in-memory store: each effect is counted, and the
//! count is the assertion. (The store contract of steps is `idem::conformance`'s; Redis and
//! PostgreSQL run it and end-to-end step tests of their own.)

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem::store::{BoxFuture, Bytes, RecordedSteps, StepRecorded, Token};
use idem::{Error, Idempotent, MemoryStore, Store};
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_millis(100);

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

/// An effect: counts its runs and returns a receipt.
async fn charge(count: &AtomicU32) -> Result<u32, Error> {
    Ok(count.fetch_add(1, Ordering::SeqCst) + 100)
}

#[tokio::test]
async fn a_recorded_step_does_not_run_again_after_a_takeover() {
    support::steps_model::a_takeover_does_not_run_a_recorded_step_again(&MemoryStore::new(), LEASE)
        .await;
}

#[tokio::test]
async fn a_failed_step_is_not_recorded() {
    let store = MemoryStore::new();
    let tries = counter();
    for expected in [Err(()), Ok(2)] {
        let tries = tries.clone();
        let got = Idempotent::new(&store, "order-2")
            .name("checkout")
            .run(move || async move {
                idem::step("charge", || async {
                    let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        Err(Error::InProgress {
                            retry_after: Duration::ZERO,
                        })
                    } else {
                        Ok(n)
                    }
                })
                .await
            })
            .await;
        assert_eq!(got.map_err(|_| ()), expected);
    }
    assert_eq!(tries.load(Ordering::SeqCst), 2, "the failed step ran again");
}

#[tokio::test]
async fn a_stale_holder_cannot_record_a_step() {
    let store = MemoryStore::new();
    let charges = counter();
    let (go, wait) = oneshot::channel::<()>();
    let stale = {
        let charges = charges.clone();
        Idempotent::new(&store, "order-3")
            .name("checkout")
            .lease(LEASE)
            .run(move || async move {
                let _ = wait.await;
                idem::step("charge", || charge(&charges)).await
            })
    };
    let mut stale = Box::pin(stale);
    // Start it, then stop polling it past its lease: it stops renewing.
    let _ = tokio::time::timeout(Duration::from_millis(10), &mut stale).await;
    tokio::time::sleep(LEASE * 3).await;
    let c = charges.clone();
    let taken_over = Idempotent::new(&store, "order-3")
        .name("checkout")
        .lease(LEASE)
        .run(move || async move { idem::step("charge", || charge(&c)).await })
        .await;
    assert_eq!(taken_over.unwrap(), 100);
    let _ = go.send(());
    let err = stale.await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
}

#[tokio::test]
async fn misuse_is_a_clear_error() {
    let outside = idem::step("charge", || async { Ok::<u32, Error>(1) })
        .await
        .unwrap_err();
    assert!(
        matches!(outside, Error::StepOutsideCall { .. }),
        "{outside}"
    );
    assert!(outside.to_string().contains("outside an idempotent body"));

    let store = MemoryStore::new();
    let runs = counter();
    let r = runs.clone();
    let twice = Idempotent::new(&store, "order-4")
        .name("checkout")
        .run(move || async move {
            idem::step("charge", || async { Ok::<u32, Error>(1) }).await?;
            idem::step("charge", || async {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, Error>(2)
            })
            .await
        })
        .await
        .unwrap_err();
    assert!(matches!(twice, Error::StepRepeated { .. }), "{twice}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the repeated step did not run"
    );
}

/// A store that counts the step operations the executor sends it, and can refuse values above a
/// size (`max_value_len`), over a `MemoryStore` reached only through the `Store` trait.
struct Counting {
    inner: MemoryStore,
    reads: AtomicU32,
    records: AtomicU32,
    max_value_len: Option<usize>,
    /// How long a step's record takes to land (it lands at the start, answers at the end).
    record_delay: Duration,
}

impl Counting {
    fn new(max_value_len: Option<usize>) -> Counting {
        Counting {
            inner: MemoryStore::new(),
            reads: AtomicU32::new(0),
            records: AtomicU32::new(0),
            max_value_len,
            record_delay: Duration::ZERO,
        }
    }

    fn slow_records(delay: Duration) -> Counting {
        Counting {
            record_delay: delay,
            ..Counting::new(None)
        }
    }
}

impl idem::Store for Counting {
    fn claim(
        &self,
        key: idem::Key,
        fingerprint: Option<idem::Fingerprint>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<idem::store::Claim, Error>> {
        self.inner.claim(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: idem::Key,
        token: Token,
        fingerprint: Option<idem::Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<idem::store::Completion, Error>> {
        self.inner.complete(key, token, fingerprint, value, ttl)
    }
    fn renew(
        &self,
        key: idem::Key,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.renew(key, token, lease)
    }
    fn release(&self, key: idem::Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.release(key, token)
    }
    fn wait(&self, key: idem::Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        self.inner.wait(key, timeout)
    }
    fn remove(&self, key: idem::Key) -> BoxFuture<'_, Result<bool, Error>> {
        self.inner.remove(key)
    }
    fn max_value_len(&self) -> Option<usize> {
        self.max_value_len
    }
    fn record_step(
        &self,
        key: idem::Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        self.records.fetch_add(1, Ordering::SeqCst);
        let recorded = self.inner.record_step(key, token, step, value, ttl);
        let delay = self.record_delay;
        Box::pin(async move {
            let recorded = recorded.await;
            tokio::time::sleep(delay).await;
            recorded
        })
    }
    fn release_on_drop(&self, key: idem::Key, token: Token) {
        self.inner.release_on_drop(key, token)
    }
    fn release_on_drop_after_steps(
        &self,
        key: idem::Key,
        token: Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        self.inner
            .release_on_drop_after_steps(key, token, steps, ttl)
    }
    fn steps(&self, key: idem::Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.steps(key, token)
    }
}

/// A failure of the test's effects (not an idem error).
fn failed() -> Error {
    Error::InProgress {
        retry_after: Duration::ZERO,
    }
}

#[tokio::test]
async fn a_failed_body_keeps_its_steps_for_the_retry() {
    let store = MemoryStore::new();
    let (charges, emails) = (counter(), counter());
    let attempt = |fail: bool| {
        let (c, e) = (charges.clone(), emails.clone());
        Idempotent::new(&store, "order-5")
            .name("checkout")
            .run(move || async move {
                let receipt = idem::step("charge", || charge(&c)).await?;
                if fail {
                    return Err(failed());
                }
                idem::step("email", || charge(&e)).await?;
                Ok::<u32, Error>(receipt)
            })
    };
    assert!(attempt(true).await.is_err());
    assert!(
        attempt(true).await.is_err(),
        "a second failure keeps them too"
    );
    assert_eq!(attempt(false).await.unwrap(), 100);
    assert_eq!(attempt(false).await.unwrap(), 100, "then it replays");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "charged once over four calls"
    );
    assert_eq!(emails.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_panicking_body_keeps_its_steps_for_the_retry() {
    let store = Arc::new(MemoryStore::new());
    let charges = counter();
    let attempt = |panic: bool| {
        let (store, c) = (store.clone(), charges.clone());
        tokio::spawn(async move {
            Idempotent::new(&*store, "order-6")
                .name("checkout")
                .run(move || async move {
                    let receipt = idem::step("charge", || charge(&c)).await?;
                    assert!(!panic, "the body panics after its charge");
                    Ok::<u32, Error>(receipt)
                })
                .await
        })
    };
    assert!(attempt(true).await.is_err(), "the task panicked");
    assert_eq!(attempt(false).await.unwrap().unwrap(), 100);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
}

/// Where the first attempt of [`cancel_at_every_await_point`] is dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Point {
    BeforeFirst,
    InsideFirst,
    AfterFirst,
    InsideSecond,
    AfterSecond,
}

#[tokio::test]
async fn cancel_at_every_await_point() {
    use Point::*;
    // (where the first attempt is dropped, whether its first step was recorded)
    for (point, first_recorded) in [
        (BeforeFirst, false),
        (InsideFirst, false),
        (AfterFirst, true),
        (InsideSecond, true),
        (AfterSecond, true),
    ] {
        let store = MemoryStore::new();
        let (first, second) = (counter(), counter());
        let key = format!("{point:?}");
        let (reached, at) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut at = at;
        // The first attempt stops (forever) at `point`, and is dropped there.
        let stop = |here: Point| {
            let reached = reached.clone();
            async move {
                if here == point {
                    let _ = reached.send(());
                    std::future::pending::<()>().await;
                }
            }
        };
        let attempt = {
            let (a, b, stop) = (first.clone(), second.clone(), &stop);
            Idempotent::new(&store, key.as_str())
                .name("checkout")
                .run(move || async move {
                    stop(BeforeFirst).await;
                    let x = idem::step("first", || async {
                        stop(InsideFirst).await;
                        charge(&a).await
                    })
                    .await?;
                    stop(AfterFirst).await;
                    let y = idem::step("second", || async {
                        stop(InsideSecond).await;
                        charge(&b).await
                    })
                    .await?;
                    stop(AfterSecond).await;
                    Ok::<u32, Error>(x + y)
                })
        };
        tokio::select! {
            _ = attempt => panic!("{point:?}: the first attempt stops before it ends"),
            _ = at.recv() => {}
        }
        // Dropped at `point`: the claim is released, its recorded steps stay.
        assert_eq!(
            first.load(Ordering::SeqCst),
            u32::from(first_recorded),
            "{point:?}"
        );
        let (a, b) = (first.clone(), second.clone());
        let total = Idempotent::new(&store, key.as_str())
            .name("checkout")
            .run(move || async move {
                let x = idem::step("first", || charge(&a)).await?;
                let y = idem::step("second", || charge(&b)).await?;
                Ok::<u32, Error>(x + y)
            })
            .await
            .unwrap();
        assert_eq!(total, 200, "{point:?}");
        assert_eq!(
            first.load(Ordering::SeqCst),
            1,
            "{point:?}: first step ran once"
        );
        assert_eq!(
            second.load(Ordering::SeqCst),
            1,
            "{point:?}: second step ran once"
        );
    }
}

#[tokio::test]
async fn a_call_without_steps_reads_none_and_each_recorded_step_costs_one_write() {
    let store = Counting::new(None);
    let runs = counter();
    let r = runs.clone();
    Idempotent::new(&store, "plain")
        .name("checkout")
        .run(move || async move { charge(&r).await })
        .await
        .unwrap();
    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        0,
        "no steps, no step read"
    );
    assert_eq!(store.records.load(Ordering::SeqCst), 0);

    for _ in 0..2 {
        let r = runs.clone();
        let _ = Idempotent::new(&store, "three steps")
            .name("checkout")
            .run(move || async move {
                let a = idem::step("a", || charge(&r)).await?;
                let b = idem::step("b", || charge(&r)).await?;
                let c = idem::step("c", || charge(&r)).await?;
                Ok::<u32, Error>(a + b + c)
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        1,
        "one read per executed call"
    );
    assert_eq!(
        store.records.load(Ordering::SeqCst),
        3,
        "one write per step"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4, "the replay ran nothing");
}

#[tokio::test]
async fn a_step_value_larger_than_the_store_takes_is_refused_and_not_recorded() {
    let store = Counting::new(Some(64));
    let runs = counter();
    for _ in 0..2 {
        let r = runs.clone();
        let err = Idempotent::new(&store, "large")
            .name("checkout")
            .run(move || async move {
                idem::step("receipt", || async {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok::<String, Error>("x".repeat(100))
                })
                .await
            })
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Store(_)), "{message}");
        assert!(
            message.contains("step `receipt`") && message.contains("64"),
            "{message}"
        );
    }
    assert_eq!(store.records.load(Ordering::SeqCst), 0, "nothing was sent");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "not recorded: the retry runs it again"
    );
}

#[tokio::test]
async fn step_values_replay_faithfully() {
    use std::collections::BTreeMap;
    let store = MemoryStore::new();
    let runs = counter();
    let mut seen = Vec::new();
    for fail in [true, false] {
        let r = runs.clone();
        let got = Idempotent::new(&store, "values")
            .name("checkout")
            .run(move || async move {
                let nested = idem::step("nested", || async {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(Some(None::<u32>))
                })
                .await?;
                let nan = idem::step("nan", || async { Ok::<_, Error>(f64::NAN) }).await?;
                let inf = idem::step("inf", || async { Ok::<_, Error>(f64::NEG_INFINITY) }).await?;
                idem::step("unit", || async { Ok::<_, Error>(()) }).await?;
                let map = idem::step("map", || async {
                    Ok::<_, Error>(BTreeMap::from([((1u8, 2u8), "a".to_owned())]))
                })
                .await?;
                if fail {
                    return Err(failed());
                }
                Ok::<_, Error>((nested, nan.is_nan(), inf, map))
            })
            .await;
        if let Ok(values) = got {
            seen.push(values);
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        seen,
        vec![(
            Some(None),
            true,
            f64::NEG_INFINITY,
            std::collections::BTreeMap::from([((1u8, 2u8), "a".to_owned())])
        )]
    );
}

/// Serializes a field that its `Deserialize` skips: it does not replay as itself.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Lossy {
    kept: u32,
    #[serde(skip_deserializing)]
    lost: u32,
}

#[tokio::test]
async fn an_unfaithful_step_value_is_an_error_and_not_recorded() {
    let store = Counting::new(None);
    let runs = counter();
    for _ in 0..2 {
        let r = runs.clone();
        let err = Idempotent::new(&store, "lossy")
            .name("checkout")
            .run(move || async move {
                idem::step("lossy", || async {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(Lossy { kept: 1, lost: 2 })
                })
                .await
                .map(|v| v.kept)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Codec(_)), "{err}");
    }
    assert_eq!(store.records.load(Ordering::SeqCst), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_step_may_be_retried_in_the_same_call_under_its_name() {
    let store = MemoryStore::new();
    let tries = counter();
    let t = tries.clone();
    let got = Idempotent::new(&store, "retry inside")
        .name("checkout")
        .run(move || async move {
            for _ in 0..3 {
                let t = t.clone();
                let got = idem::step("charge", || async move {
                    if t.fetch_add(1, Ordering::SeqCst) < 2 {
                        Err(failed())
                    } else {
                        Ok(7u32)
                    }
                })
                .await;
                if got.is_ok() {
                    return got;
                }
            }
            Err(failed())
        })
        .await;
    assert_eq!(got.unwrap(), 7);
    assert_eq!(tries.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_step_in_a_task_the_body_spawned_is_outside_the_call() {
    let store = MemoryStore::new();
    let runs = counter();
    let r = runs.clone();
    let err = Idempotent::new(&store, "spawned")
        .name("checkout")
        .run(move || async move {
            tokio::spawn(async move { idem::step("charge", || charge(&r)).await })
                .await
                .map_err(|_| failed())?
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StepOutsideCall { .. }), "{err}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a step with no call does not run"
    );
}

#[tokio::test]
async fn a_nested_call_owns_its_steps() {
    let store = MemoryStore::new();
    let (outer, inner) = (counter(), counter());
    for fail in [true, false] {
        let (o, i, store) = (outer.clone(), inner.clone(), &store);
        let _ = Idempotent::new(store, "outer")
            .name("checkout")
            .run(move || async move {
                let a = idem::step("charge", || charge(&o)).await?;
                // The same name in a nested call is that call's own step.
                let b = Idempotent::new(store, "inner")
                    .name("refund")
                    .run(move || async move { idem::step("charge", || charge(&i)).await })
                    .await?;
                if fail {
                    return Err(failed());
                }
                Ok::<u32, Error>(a + b)
            })
            .await;
    }
    assert_eq!(outer.load(Ordering::SeqCst), 1);
    assert_eq!(inner.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_steps_in_one_body_are_each_recorded() {
    let store = MemoryStore::new();
    let runs = counter();
    for fail in [true, false] {
        let r = runs.clone();
        let _ = Idempotent::new(&store, "joined")
            .name("checkout")
            .run(move || async move {
                let (a, b, c) = tokio::join!(
                    idem::step("a", || charge(&r)),
                    idem::step("b", || charge(&r)),
                    // Polled only when its own waker is woken, like FuturesUnordered does.
                    OnlyWhenWoken::new(idem::step("c", || charge(&r))),
                );
                let total = a? + b? + c?;
                if fail {
                    return Err(failed());
                }
                Ok::<u32, Error>(total)
            })
            .await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "three steps, each run once");
}

/// Polls its future only after the future woke it (the first poll aside): a step that forgot
/// to wake its task would hang here.
struct OnlyWhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    woken: Arc<WokenFlag>,
}

struct WokenFlag {
    woken: std::sync::atomic::AtomicBool,
    parent: std::sync::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if let Some(waker) = self.parent.lock().unwrap().take() {
            waker.wake();
        }
    }
}

impl<F: std::future::Future> OnlyWhenWoken<F> {
    fn new(inner: F) -> Self {
        OnlyWhenWoken {
            inner: Box::pin(inner),
            woken: Arc::new(WokenFlag {
                woken: std::sync::atomic::AtomicBool::new(true),
                parent: std::sync::Mutex::new(None),
            }),
        }
    }
}

impl<F: std::future::Future> std::future::Future for OnlyWhenWoken<F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        *self.woken.parent.lock().unwrap() = Some(cx.waker().clone());
        if !self.woken.woken.swap(false, Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(self.woken.clone());
        let mut inner_cx = std::task::Context::from_waker(&waker);
        self.inner.as_mut().poll(&mut inner_cx)
    }
}

#[tokio::test]
async fn step_bytes_count_toward_the_memory_bound_and_leave_with_the_completion() {
    let store = MemoryStore::with_max_bytes(idem::store::memory::RECORD_OVERHEAD + 4096);
    let err = Idempotent::new(&store, "big")
        .name("checkout")
        .run(|| async { idem::step("big", || async { Ok::<_, Error>(vec![7u8; 8192]) }).await })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StoreFull(_)), "{err}");
    let before = store.bytes();
    let done = Idempotent::new(&store, "small")
        .name("checkout")
        .run(|| async { idem::step("small", || async { Ok::<_, Error>(vec![7u8; 1024]) }).await })
        .await
        .unwrap();
    assert_eq!(done.len(), 1024);
    assert!(store.bytes() > before, "the completed value is counted");
    let completed = store.bytes();
    store
        .remove(idem::Key::new("checkout", &"small"))
        .await
        .unwrap();
    assert!(store.bytes() < completed);
}

#[idem::idempotent(key = order, store = store, name = "steps.attribute")]
async fn checkout(
    store: &MemoryStore,
    order: u64,
    charges: &AtomicU32,
    fail: bool,
) -> Result<u32, Error> {
    let receipt = idem::step("charge", || charge(charges)).await?;
    if fail {
        return Err(failed());
    }
    Ok(receipt)
}

#[tokio::test]
async fn steps_work_under_the_attribute() {
    let store = MemoryStore::new();
    let charges = AtomicU32::new(0);
    assert!(checkout(&store, 9, &charges, true).await.is_err());
    assert_eq!(checkout(&store, 9, &charges, false).await.unwrap(), 100);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_holder_resumed_after_a_takeover_does_not_repeat_its_successors_step() {
    let store = MemoryStore::new();
    let (first, second) = (counter(), counter());
    let (reached, at) = oneshot::channel::<()>();
    let (resume, resumed) = oneshot::channel::<()>();
    let stale = {
        let (a, b) = (first.clone(), second.clone());
        Idempotent::new(&store, "resumed")
            .name("checkout")
            .lease(LEASE)
            .run(move || async move {
                let x = idem::step("first", || charge(&a)).await?;
                let _ = reached.send(());
                let _ = resumed.await;
                let y = idem::step("second", || charge(&b)).await?;
                Ok::<u32, Error>(x + y)
            })
    };
    let mut stale = Box::pin(stale);
    tokio::select! {
        _ = &mut stale => panic!("it waits to be resumed"),
        _ = at => {}
    }
    // Not polled past its lease: it stops renewing, and another call takes the key over and
    // records the second step.
    tokio::time::sleep(LEASE * 3).await;
    let (a, b) = (first.clone(), second.clone());
    let total = Idempotent::new(&store, "resumed")
        .name("checkout")
        .lease(LEASE)
        .run(move || async move {
            let x = idem::step("first", || charge(&a)).await?;
            let y = idem::step("second", || charge(&b)).await?;
            Ok::<u32, Error>(x + y)
        })
        .await
        .unwrap();
    assert_eq!(total, 200);
    let _ = resume.send(());
    let err = stale.await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert_eq!(first.load(Ordering::SeqCst), 1);
    assert_eq!(
        second.load(Ordering::SeqCst),
        1,
        "the resumed holder checked its lease before running the second step"
    );
}

#[tokio::test]
async fn a_step_timed_out_while_its_record_is_on_its_way_and_retried_is_not_run_again() {
    let store = Counting::slow_records(Duration::from_millis(200));
    let charges = counter();
    let c = charges.clone();
    let got = Idempotent::new(&store, "timed out")
        .name("checkout")
        .run(move || async move {
            loop {
                let c = c.clone();
                let charge = idem::step("charge", || async move { charge(&c).await });
                match tokio::time::timeout(Duration::from_millis(50), charge).await {
                    Ok(receipt) => break receipt,
                    Err(_) => continue, // retried under its name, as the docs allow
                }
            }
        })
        .await;
    assert_eq!(
        got.unwrap(),
        100,
        "the retry gets the first charge's receipt"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
}

#[tokio::test]
async fn a_try_join_that_fails_records_the_step_that_succeeded() {
    let store = MemoryStore::new();
    let (charges, reservations) = (counter(), counter());
    for _ in 0..2 {
        let (c, r) = (charges.clone(), reservations.clone());
        let _ = Idempotent::new(&store, "joined failure")
            .name("checkout")
            .run(move || async move {
                let reserve = idem::step("reserve", || async {
                    // Out of stock the first time.
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(failed())
                    } else {
                        Ok(1u32)
                    }
                });
                let (charge, _) = tokio::try_join!(idem::step("charge", || charge(&c)), reserve)?;
                Ok::<u32, Error>(charge)
            })
            .await;
    }
    assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
    assert_eq!(reservations.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_call_dropped_while_a_step_record_is_on_its_way_hands_it_to_the_store() {
    let store = Counting::slow_records(Duration::from_millis(200));
    let charges = counter();
    for _ in 0..2 {
        let c = charges.clone();
        // Dropped by the timeout while the charge's record is on its way (the first time).
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            Idempotent::new(&store, "dropped")
                .name("checkout")
                .run(move || async move { idem::step("charge", || charge(&c)).await }),
        )
        .await;
    }
    assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
}

#[tokio::test]
async fn steps_are_not_inherited_by_a_key_reused_for_another_request() {
    let store = MemoryStore::new();
    let charges = counter();
    let attempt = |amount: u32, fail: bool| {
        let c = charges.clone();
        Idempotent::new(&store, "reused")
            .name("checkout")
            .fingerprint(&amount)
            .run(move || async move {
                let receipt = idem::step("charge", || charge(&c)).await?;
                if fail {
                    return Err(failed());
                }
                Ok::<u32, Error>(receipt + amount)
            })
    };
    assert!(attempt(100, true).await.is_err());
    let reused = attempt(200, false).await.unwrap_err();
    assert!(matches!(reused, Error::KeyReused), "{reused}");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the other request charged nothing"
    );
    assert_eq!(
        attempt(100, false).await.unwrap(),
        200,
        "the first request resumes"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn after_a_lost_lease_no_later_step_runs() {
    let store = MemoryStore::new();
    let later = counter();
    let l = later.clone();
    let store_ref = &store;
    let err = Idempotent::new(&store, "lost")
        .name("checkout")
        .run(move || async move {
            idem::step("first", || async { Ok::<_, Error>(1u8) }).await?;
            // An operator removes the record: the call no longer holds its key.
            store_ref
                .remove(idem::Key::new("checkout", &"lost"))
                .await?;
            tokio::time::sleep(LEASE).await;
            let lost = idem::step("second", || async { Ok::<_, Error>(2u8) }).await;
            assert!(matches!(lost, Err(Error::LeaseLost { .. })), "{lost:?}");
            // A body that ignores it: its next step does not run either.
            idem::step("third", || async {
                l.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(3u8)
            })
            .await
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert_eq!(later.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_step_name_longer_than_the_limit_is_refused_before_it_runs() {
    let store = MemoryStore::new();
    let runs = counter();
    let r = runs.clone();
    let err = Idempotent::new(&store, "long name")
        .name("checkout")
        .run(move || async move {
            let name = "n".repeat(idem::MAX_STEP_NAME_LEN + 1);
            idem::step(&name, || charge(&r)).await
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StepNameTooLong { .. }), "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
