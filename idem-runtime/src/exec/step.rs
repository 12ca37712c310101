//! Steps (recovery points): [`step`] inside an idempotent body.
//!
//! The executor runs the body inside a task-local [`StepCx`] ([`CURRENT`]). A step does not
//! borrow the store (a task-local must be `'static`, and the store is borrowed by the call): it
//! queues its request in the context, and [`serve`], which polls the body and lives inside the
//! same scope, sends it to the store with the call's key and token (the fence) and hands the
//! answer back. A call whose body runs no step pays for an empty context and a look at its
//! queue per poll: no allocation, no store round trip.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::codec;
use crate::error::Error;
use crate::key::Key;
use crate::store::{BoxFuture, Bytes, RecordedSteps, StepRecorded, Store, Token};

/// What a step asks of the store, and where the answer goes.
enum StepRequest {
    /// The steps recorded under the call's key (the first step of a call asks).
    Read {
        reply: oneshot::Sender<Result<RecordedSteps, Error>>,
    },
    /// Record a step's value.
    Record {
        name: String,
        value: Bytes,
        reply: oneshot::Sender<Result<StepRecorded, Error>>,
    },
}

/// Where a call's steps are recorded.
#[derive(Clone, Copy)]
pub(crate) enum Recording {
    /// In the store, fenced by the call's token (the plain mode).
    Store {
        /// The store's [`max_value_len`](Store::max_value_len).
        max_value_len: Option<usize>,
        /// The call's lease.
        lease: Duration,
    },
    /// Nowhere outside the call: in the transactional mode a step would be written in the
    /// body's transaction, which either commits together with the completion that deletes it,
    /// or rolls back with it; no other holder could ever read it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Transaction,
}

/// What a body's steps see of their call. Only the task polling the body touches it (a
/// task-local), so plain cells do.
pub(crate) struct StepCx {
    recording: Recording,
    /// The steps recorded under the call's key, once the call's first step read them.
    recorded: RefCell<Option<HashMap<String, Bytes>>>,
    /// Names used so far in this call.
    used: RefCell<HashSet<String>>,
    /// Requests for [`serve`] to send.
    requests: RefCell<VecDeque<StepRequest>>,
    /// A step found that the call no longer holds its key.
    lease_lost: Cell<bool>,
    /// A step found the key's steps recorded for another request (another fingerprint).
    key_reused: Cell<bool>,
    /// Names of steps dropped while their record was on its way: whether it landed is known
    /// only to the store, so a step of that name reads the store again before it runs.
    uncertain: RefCell<HashSet<String>>,
    /// When the store last said that the call holds its key (the sending of a step read or
    /// record it answered so).
    confirmed: Cell<Option<Instant>>,
}

impl StepCx {
    pub(crate) fn new(recording: Recording) -> StepCx {
        StepCx {
            recording,
            recorded: RefCell::new(None),
            used: RefCell::new(HashSet::new()),
            requests: RefCell::new(VecDeque::new()),
            lease_lost: Cell::new(false),
            key_reused: Cell::new(false),
            uncertain: RefCell::new(HashSet::new()),
            confirmed: Cell::new(None),
        }
    }
}

tokio::task_local! {
    pub(crate) static CURRENT: StepCx;
}

/// The most bytes a step's name may have: a name is an identifier, and every store keeps it
/// in an index (PostgreSQL's B-tree rows hold at most about 2.7 kB).
pub const MAX_STEP_NAME_LEN: usize = 1024;

/// Step values on their way to the store whose records the store has not acknowledged yet, in
/// the order they were asked: what a call dropped meanwhile hands to
/// [`Store::release_on_drop_after_steps`].
#[derive(Default)]
pub(crate) struct Unrecorded(std::sync::Mutex<Vec<(String, Bytes)>>);

impl Unrecorded {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Bytes)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes them all out.
    pub(crate) fn take(&self) -> Vec<(String, Bytes)> {
        std::mem::take(&mut *self.lock())
    }

    fn push(&self, name: &str, value: &Bytes) {
        self.lock().push((name.to_owned(), value.clone()));
    }

    fn remove(&self, name: &str) {
        let mut list = self.lock();
        if let Some(i) = list.iter().position(|(n, _)| n == name) {
            list.remove(i);
        }
    }
}

/// What the steps of a call found, for the executor's report.
#[derive(Clone, Copy, Default)]
pub(crate) struct Seen {
    /// A step found that the call no longer holds its key.
    pub(crate) lease_lost: bool,
    /// A step found the key's steps recorded for another request.
    pub(crate) key_reused: bool,
}

/// Polls `body` and sends its steps' requests to `store`, fenced by `token`, one at a time in
/// the order they were asked. Runs inside [`CURRENT`]'s scope. When the body ends, the requests
/// it left (a step whose effect ran, in a `try_join!` that another branch ended) are sent before
/// its output is returned; while a record is on its way, it is in `unrecorded`.
pub(crate) async fn serve<S, F>(
    store: &S,
    key: Key,
    token: Token,
    ttl: Duration,
    unrecorded: &Unrecorded,
    body: F,
) -> (F::Output, Seen)
where
    S: Store + ?Sized,
    F: Future,
{
    let mut body = std::pin::pin!(body);
    let mut out = None;
    let mut queue: VecDeque<StepRequest> = VecDeque::new();
    let mut in_flight: Option<BoxFuture<'_, ()>> = None;
    let out = std::future::poll_fn(|cx| {
        loop {
            if out.is_none()
                && let Poll::Ready(done) = body.as_mut().poll(cx)
            {
                out = Some(done);
            }
            // What the body asked in that poll (taken at once, so that a body that ends in the
            // same poll does not leave it behind).
            let _ = CURRENT.try_with(|steps| {
                for request in steps.requests.borrow_mut().drain(..) {
                    if let StepRequest::Record { name, value, .. } = &request {
                        unrecorded.push(name, value);
                    }
                    queue.push_back(request);
                }
            });
            if in_flight.is_none() {
                match queue.pop_front() {
                    Some(request) => {
                        in_flight = Some(send(store, key, token, ttl, unrecorded, request));
                    }
                    None => {
                        return match out.take() {
                            Some(done) => Poll::Ready(done),
                            None => Poll::Pending,
                        };
                    }
                }
            }
            if let Some(request) = &mut in_flight {
                match request.as_mut().poll(cx) {
                    // Answered: poll the body again (if it has not ended), so that the step
                    // sees its answer.
                    Poll::Ready(()) => in_flight = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    })
    .await;
    let seen = CURRENT
        .try_with(|steps| Seen {
            lease_lost: steps.lease_lost.get(),
            key_reused: steps.key_reused.get(),
        })
        .unwrap_or_default();
    (out, seen)
}

/// One request, sent to the store; the answer goes to the step (gone if the step was dropped).
fn send<'a, S: Store + ?Sized>(
    store: &'a S,
    key: Key,
    token: Token,
    ttl: Duration,
    unrecorded: &'a Unrecorded,
    request: StepRequest,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        match request {
            StepRequest::Read { reply } => {
                let _ = reply.send(store.steps(key, token).await);
            }
            StepRequest::Record { name, value, reply } => {
                let answer = store
                    .record_step(key, token, name.clone(), value, ttl)
                    .await;
                // Answered: landed, or refused. (After a store error it may or may not have
                // landed: the step keeps its name uncertain, and a retry of it reads first.)
                unrecorded.remove(&name);
                let _ = reply.send(answer);
            }
        }
    })
}

/// Runs `f` at most once per idempotent call key and step `name`: a recovery point inside an
/// idempotent body.
///
/// The first time, `f` runs, and its `Ok` value is recorded under the running call's key (fenced
/// by the call's claim) before it is returned. When the call does not finish (its body fails
/// later, it panics or is cancelled, its process dies) and the key is run again (a retry, or a
/// takeover after the lease ran out), `step` returns the recorded value without running `f`:
/// the retry resumes after the last recorded step instead of repeating every effect. An `Err`
/// of `f` is not recorded: the retry runs that step again. Step records expire `ttl` (the
/// call's) after the last one was recorded, and are deleted when the call completes (its result
/// replays whole) or its record is removed.
///
/// This is Stripe's "atomic phases" and "recovery points" (Brandur Leach, *Implementing
/// Stripe-like Idempotency Keys in Postgres*, brandur.org/idempotency-keys), one phase per step.
///
/// ```
/// use idem_runtime::{Error, Idempotent, MemoryStore};
/// # async fn charge_card(_: u64) -> Result<String, Error> { Ok("ch_1".into()) }
/// # async fn reserve_stock(_: u64) -> Result<u32, Error> { Ok(7) }
/// # async fn send_email(_: &str) -> Result<(), Error> { Ok(()) }
///
/// async fn checkout(store: &MemoryStore, order: u64) -> Result<String, Error> {
///     Idempotent::new(store, order)
///         .name("shop.checkout")
///         .run(|| async {
///             let charge = idem_runtime::step("charge", || charge_card(order)).await?;
///             let _slot = idem_runtime::step("reserve", || reserve_stock(order)).await?;
///             idem_runtime::step("email", || send_email(&charge)).await?;
///             Ok(charge)
///         })
///         .await
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// assert_eq!(checkout(&store, 42).await.unwrap(), "ch_1");
/// # }
/// ```
///
/// With the attribute (from the `idem` facade, where this is `idem::step`), the body is the
/// function's: `#[idempotent(key = order.id)] async fn checkout(order: &Order) -> .. {
/// idem::step("charge", || psp.charge(order)).await?; .. }`.
///
/// - **Names** are unique per call (a loop names its steps `format!("reserve-{sku}")`). A step
///   belongs to the innermost idempotent call running it; `step` in a task the body spawned
///   has no call.
/// - **Values** follow the rules of results: `T: Serialize + DeserializeOwned`, checked to
///   replay as themselves before they are recorded, and no larger than the store takes.
/// - **Cost**: a call's first step reads the key's step records (one store round trip), and
///   each step that runs `f` records its value (one more); a recorded step costs nothing more.
///   A step that would run `f` more than half a lease after the store last answered a step of
///   the call first checks that the call still holds its key (one more round trip): a holder
///   that was not polled for longer than its lease must not repeat an effect that its
///   successor recorded. Calls that run no step pay nothing. On the in-memory store step
///   values count toward the byte bound.
/// - **Transactional mode** (`PostgresStore::transactional`, feature `postgres`): the
///   transaction is the recovery point. A step there runs `f` and is checked like any other, but
///   its record would be written in the body's transaction and so would commit only together
///   with the call's result (which makes it useless) or roll back with the body's writes: a
///   retry runs every step again. Run external effects (a card network, an email) as steps in
///   the plain mode, and keep database writes in one transaction.
///
/// # Errors
///
/// The error type is the body's own (`E: From<idem::Error>`), so `?` propagates these:
///
/// - [`Error::StepOutsideCall`]: not inside an idempotent body (or in a task it spawned); `f`
///   did not run.
/// - [`Error::StepRepeated`]: `name` was used before in this call by a step that succeeded (or
///   is still running); `f` did not run. A step that failed or was dropped (a `timeout` around
///   it) gives its name back, so a body may retry it; if it was dropped while its value was
///   being recorded, the retry asks the store first and returns that value if it landed.
/// - [`Error::StepNameTooLong`]: `name` is longer than [`MAX_STEP_NAME_LEN`] bytes; `f` did not
///   run.
/// - [`Error::LeaseLost`]: this call no longer holds its key (its lease ran out and another call
///   took the key over, or it was removed). If it is found before `f` runs (at the call's first
///   step, or at the check above), `f` did not run; otherwise `f` ran and is not recorded.
///   Either way, stop: the body's effects belong to the new holder now, and no later step of
///   the call runs (each answers `LeaseLost`). The call is reported as `lease_lost`.
/// - [`Error::KeyReused`]: the key's steps were recorded by a call with another fingerprint (a
///   request that failed after some steps, and now another request under the same key). `f`
///   did not run, no later step of the call runs, and the call itself fails with `KeyReused`
///   (HTTP: 422), whatever its body returns: a key reused for a different request must not
///   inherit the first one's effects. The steps stay for a retry of the first request.
/// - [`Error::Codec`]: a recorded value no longer decodes as `T` (its type changed), or `f`'s
///   value would not replay as itself (then `f` ran and is not recorded).
/// - [`Error::Store`], [`Error::StoreFull`]: the store failed; if it was while recording, `f`
///   ran and may or may not be recorded.
///
/// # What is left to the effect
///
/// Between `f`'s effect and the store's answer to its record, a process that dies loses the
/// record, and the next run of the key runs `f` again: pass the effect an idempotency key of
/// its own (`order-42/charge`) where the provider takes one. A call dropped in that window
/// (cancelled, timed out) hands the value to the store on its way out
/// ([`Store::release_on_drop_after_steps`]). Steps expire `ttl` after the last one was
/// recorded: keep the call's `ttl` above its body's run time.
pub async fn step<F, Fut, T, E>(name: &str, f: F) -> Result<T, E>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    let outside = || Error::StepOutsideCall {
        name: name.to_owned(),
    };
    if name.len() > MAX_STEP_NAME_LEN {
        return Err(Error::StepNameTooLong {
            len: name.len(),
            max: MAX_STEP_NAME_LEN,
        }
        .into());
    }
    let (recording, recorded, confirmed) = CURRENT
        .try_with(|cx| {
            // A call that lost its key, or found another request's steps, runs no more steps.
            if cx.lease_lost.get() {
                return Err(Error::LeaseLost {
                    name: name.to_owned(),
                });
            }
            if cx.key_reused.get() {
                return Err(Error::KeyReused);
            }
            if !cx.used.borrow_mut().insert(name.to_owned()) {
                return Err(Error::StepRepeated {
                    name: name.to_owned(),
                });
            }
            // A step of this name was dropped while its record was on its way: read again (the
            // read goes after that record, so it sees whether it landed).
            let uncertain = cx.uncertain.borrow().contains(name);
            Ok((
                cx.recording,
                cx.recorded
                    .borrow()
                    .as_ref()
                    .filter(|_| !uncertain)
                    .map(|steps| steps.get(name).cloned()),
                cx.confirmed.get(),
            ))
        })
        .map_err(|_| outside())??;
    // Until the step succeeds, its name is free again if it fails or is dropped: a body may
    // retry a failed step (or one it timed out) under the same name within the call.
    let mut name_taken = NameTaken {
        name,
        kept: false,
        recording: false,
    };
    let (max_value_len, lease) = match recording {
        Recording::Transaction => {
            let value = f().await?;
            codec::to_vec(&value)?;
            name_taken.kept = true;
            return Ok(value);
        }
        Recording::Store {
            max_value_len,
            lease,
        } => (max_value_len, lease),
    };
    // The call's first step reads the steps recorded before it. A step about to run `f` also
    // makes sure that the call still holds its key when the store has not said so for half a
    // lease: a holder whose future was not polled for longer than its lease (so it stopped
    // renewing, and another call may have taken the key over and recorded this very step)
    // must not run the effect again. A call that is polled renews every third of its lease, so
    // within half a lease of the store's last answer it still holds the key.
    let recorded = match recorded {
        Some(Some(bytes)) => Some(bytes),
        Some(None) if confirmed.is_some_and(|at| at.elapsed() < lease / 2) => None,
        _ => {
            let sent = Instant::now();
            let (reply, answer) = oneshot::channel();
            ask(StepRequest::Read { reply }).map_err(|()| outside())?;
            match answer.await {
                Ok(Ok(RecordedSteps::Held(steps))) => CURRENT
                    .try_with(|cx| {
                        cx.confirmed.set(Some(sent));
                        cx.uncertain.borrow_mut().remove(name);
                        let steps: HashMap<String, Bytes> = steps.into_iter().collect();
                        let found = steps.get(name).cloned();
                        *cx.recorded.borrow_mut() = Some(steps);
                        found
                    })
                    .map_err(|_| outside())?,
                Ok(Ok(RecordedSteps::LeaseLost)) => return Err(lease_lost(name).into()),
                Ok(Ok(RecordedSteps::KeyReused)) => {
                    let _ = CURRENT.try_with(|cx| cx.key_reused.set(true));
                    return Err(Error::KeyReused.into());
                }
                Ok(Err(err)) => return Err(err.into()),
                Err(_) => return Err(outside().into()),
            }
        }
    };
    if let Some(bytes) = recorded {
        let value = codec::from_slice(&bytes)?;
        name_taken.kept = true;
        return Ok(value);
    }
    let value = f().await?;
    let bytes = Bytes::from(codec::to_vec(&value)?);
    if let Some(max) = max_value_len
        && bytes.len() > max
    {
        return Err(Error::store(TooLarge {
            name: name.to_owned(),
            len: bytes.len(),
            max,
        })
        .into());
    }
    let sent = Instant::now();
    let (reply, answer) = oneshot::channel();
    name_taken.recording = true;
    ask(StepRequest::Record {
        name: name.to_owned(),
        value: bytes,
        reply,
    })
    .map_err(|()| outside())?;
    match answer.await {
        Ok(Ok(StepRecorded::Recorded)) => {
            let _ = CURRENT.try_with(|cx| cx.confirmed.set(Some(sent)));
            name_taken.kept = true;
            Ok(value)
        }
        Ok(Ok(StepRecorded::LeaseLost)) => {
            // Refused for good: nothing landed.
            name_taken.recording = false;
            Err(lease_lost(name).into())
        }
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(outside().into()),
    }
}

/// A step's name, taken in its call: given back on drop unless the step succeeded.
struct NameTaken<'a> {
    name: &'a str,
    kept: bool,
    /// Its record was asked for and not answered (or answered with a store error): it may
    /// have landed.
    recording: bool,
}

impl Drop for NameTaken<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let _ = CURRENT.try_with(|cx| {
                cx.used.borrow_mut().remove(self.name);
                if self.recording {
                    cx.uncertain.borrow_mut().insert(self.name.to_owned());
                }
            });
        }
    }
}

/// Queues a request for [`serve`].
fn ask(request: StepRequest) -> Result<(), ()> {
    CURRENT
        .try_with(|cx| cx.requests.borrow_mut().push_back(request))
        .map_err(|_| ())
}

/// [`Error::LeaseLost`], noted for the executor's report.
fn lease_lost(name: &str) -> Error {
    let _ = CURRENT.try_with(|cx| cx.lease_lost.set(true));
    Error::LeaseLost {
        name: name.to_owned(),
    }
}

/// A step value larger than its store takes ([`Store::max_value_len`]).
#[derive(Debug)]
struct TooLarge {
    name: String,
    len: usize,
    max: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the value of step `{}` is {} bytes, more than the {} bytes the store takes; it ran \
             and is not recorded",
            self.name, self.len, self.max
        )
    }
}

impl std::error::Error for TooLarge {}
