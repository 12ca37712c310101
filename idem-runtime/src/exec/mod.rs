//! The executor: claim, replay or run, renew, complete or release; and its
//! [transactional](transactional) mode.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::clock::{FOREVER, after};
use crate::codec;
use crate::error::Error;
use crate::key::{Fingerprint, Key, KeyPart};
use crate::metrics;
use crate::record::{Claim, Completion, Token};
use crate::store::Store;
use crate::store::memory::{MAX_EXACT_KEY, Value, ValueClaim};

/// How long a completed result is remembered unless told otherwise: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a claim holds before another caller may take over unless told otherwise: 30
/// seconds. The lease is renewed (every third of it) while the body runs.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// How long a caller waits for another call holding the same key unless told otherwise: 60
/// seconds; then it fails with [`Error::InProgress`].
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The shortest ttl the executor uses; shorter ones are raised to it.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// The shortest lease the executor uses; shorter ones are raised to it. A lease is renewed every
/// third of it, by timers whose resolution is a millisecond: below this, a live holder could not
/// renew in time.
const MIN_LEASE: Duration = Duration::from_millis(10);

/// What a caller does while another call holds its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnConflict {
    /// Wait for the holder (up to the wait timeout), then return its result; if it failed, run
    /// the body.
    #[default]
    Wait,
    /// Fail at once with [`Error::InProgress`].
    Reject,
}

/// How one idempotent call behaves: the knobs of `#[idempotent(...)]` and of [`Idempotent`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policy {
    /// How long a completed result is remembered.
    pub ttl: Duration,
    /// How long a claim holds without renewal.
    pub lease: Duration,
    /// What to do while another call holds the key.
    pub on_conflict: OnConflict,
    /// The longest a caller waits with [`OnConflict::Wait`].
    pub wait_timeout: Duration,
}

impl Policy {
    /// The defaults: [`DEFAULT_TTL`], [`DEFAULT_LEASE`], [`OnConflict::Wait`],
    /// [`DEFAULT_WAIT_TIMEOUT`].
    pub const fn new() -> Policy {
        Policy {
            ttl: DEFAULT_TTL,
            lease: DEFAULT_LEASE,
            on_conflict: OnConflict::Wait,
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

impl Policy {
    /// The policy as the executor applies it: a zero lease or ttl (from a `Duration` expression)
    /// would expire before it could be used, and one beyond a century is as good as forever and
    /// is capped so no clock arithmetic overflows.
    pub(crate) fn bounded(&self) -> Policy {
        Policy {
            ttl: self.ttl.clamp(MIN_DURATION, FOREVER),
            lease: self.lease.clamp(MIN_LEASE, FOREVER),
            wait_timeout: self.wait_timeout.min(FOREVER),
            on_conflict: self.on_conflict,
        }
    }
}

pub(crate) use crate::key::fingerprint_matches;

/// What a call that met a busy key does next (step 4 of the executor).
pub(crate) enum Turn {
    /// The holder finished, failed or lost its lease (or the wait returned early): claim again.
    ClaimAgain,
    /// `on_conflict = reject`, or the wait bound ran out: fail with [`Error::InProgress`].
    Rejected,
    /// The store failed while waiting.
    Failed(Error),
}

/// Step 4: with `Reject`, or once the wait bound (counted from the first busy answer) has run
/// out, the call is rejected; otherwise it waits for the holder.
pub(crate) async fn wait_turn<S: Store + ?Sized>(
    store: &S,
    key: Key,
    policy: &Policy,
    deadline: &mut Option<Instant>,
) -> Turn {
    let now = Instant::now();
    let deadline = *deadline.get_or_insert(after(now, policy.wait_timeout));
    // Waiting needs tokio's timers; polled outside a runtime, the call is refused rather than
    // made to spin or panic.
    if policy.on_conflict == OnConflict::Reject || now >= deadline || !in_runtime() {
        return Turn::Rejected;
    }
    let started = metrics::start();
    let waited = store.wait(key, deadline - now).await;
    metrics::store_operation("wait", started);
    match waited {
        Ok(()) => Turn::ClaimAgain,
        Err(err) => Turn::Failed(err),
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new()
    }
}

/// How an idempotent call got its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// This call ran the body and stored its result.
    Executed,
    /// A completed record was found: its value was returned and the body did not run.
    Replayed,
    /// Another call held the key; this one waited for it and returned its result.
    Waited,
    /// This call ran the body, but its lease ran out and another call took the key over before
    /// the result could be stored: the body may have run twice. A `tracing` warning says so too.
    LeaseLost,
}

impl Status {
    /// Whether the value came from a stored record rather than this call's body.
    pub fn is_replay(self) -> bool {
        matches!(self, Status::Replayed | Status::Waited)
    }

    /// How a replay is reported: after waiting for another call, or not.
    pub(crate) fn replay(waited: bool) -> Status {
        if waited {
            Status::Waited
        } else {
            Status::Replayed
        }
    }

    /// The outcome's name, as the `tracing` event gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Executed => "executed",
            Status::Replayed => "replayed",
            Status::Waited => "waited",
            Status::LeaseLost => "lease_lost",
        }
    }
}

/// The value of an idempotent call and how it was obtained: what [`Idempotent::run_with_outcome`]
/// returns, for callers (an HTTP handler setting `Idempotent-Replayed`) that must tell.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome<T> {
    /// The value: this call's own, or the first call's.
    pub value: T,
    /// Whether it was executed or replayed.
    pub status: Status,
    /// How long the record lives on, by the store's clock; `None` when nothing was stored.
    pub expires_in: Option<Duration>,
}

/// An idempotent call built without the attribute: for closures, and for code that cannot take
/// an attribute. `#[idempotent]` expands to the same executor.
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::{Error, Idempotent, MemoryStore, Status};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let store = MemoryStore::new();
/// let order_id = 42u64;
/// let charge = || async { Ok::<u64, Error>(1999) };
///
/// let cents = Idempotent::new(&store, order_id)
///     .name("payments.charge.v1")
///     .ttl(Duration::from_secs(3600))
///     .run(charge)
///     .await?;
/// assert_eq!(cents, 1999);
///
/// // The same name and key, from anywhere: the same record.
/// let again = Idempotent::new(&store, order_id)
///     .name("payments.charge.v1")
///     .run_with_outcome(charge)
///     .await?;
/// assert_eq!(again.status, Status::Replayed);
/// # Ok(()) }
/// ```
#[must_use = "an idempotent call does nothing until `run` is awaited"]
pub struct Idempotent<'s, S: ?Sized, K> {
    store: &'s S,
    key: K,
    /// The namespace `name` gave; without one, the call site and the body's type make it.
    name: Option<Cow<'static, str>>,
    site: &'static std::panic::Location<'static>,
    fingerprint: Option<Fingerprint>,
    policy: Policy,
}

impl<'s, S: Store + ?Sized, K: KeyPart> Idempotent<'s, S, K> {
    /// A call keyed by `key` in `store`, with the default [`Policy`].
    ///
    /// Until [`name`](Self::name) gives one, the namespace of the key is the path of the body's
    /// type (for a closure: its crate, module, function and that function's type arguments)
    /// and this call site (`file:line:column` of the code that calls `new`), so two call sites,
    /// two crates, and two instantiations of a generic function never share records even when
    /// their keys are equal. (Two calls written in one `macro_rules!` body and expanded at one
    /// place do share a call site: name them.) That namespace changes when the code moves: give
    /// a [`name`](Self::name) to records that must outlive a deployment, or that other processes
    /// or an operator must find.
    #[track_caller]
    pub fn new(store: &'s S, key: K) -> Self {
        Idempotent {
            store,
            key,
            name: None,
            site: std::panic::Location::caller(),
            fingerprint: None,
            policy: Policy::new(),
        }
    }

    /// The namespace of the key, exactly as given: `Idempotent::new(&store, key).name(n)` and
    /// `#[idempotent(name = n, key = key)]` address the same record, and an operator finds it as
    /// `Key::new(n, &key)`.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long the result is remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = ttl;
        self
    }

    /// How long a claim holds without renewal.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.policy.lease = lease;
        self
    }

    /// What to do while another call holds the key.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.policy.on_conflict = on_conflict;
        self
    }

    /// The longest to wait for another call holding the key.
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.policy.wait_timeout = wait_timeout;
        self
    }

    /// A value that must match on replay: a completed record made with another fingerprint
    /// gives [`Error::KeyReused`] instead of its result.
    pub fn fingerprint<F: KeyPart + ?Sized>(mut self, fingerprint: &F) -> Self {
        self.fingerprint = Some(Fingerprint::of(fingerprint));
        self
    }

    /// Runs `body` at most once per key while the record lives, and returns its value or the
    /// first call's.
    pub async fn run<F, Fut, T, E>(self, body: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        self.run_with_outcome(body).await.map(|o| o.value)
    }

    /// Like [`run`](Self::run), and also says whether the value was executed or replayed and
    /// how long the record lives.
    pub async fn run_with_outcome<F, Fut, T, E>(self, body: F) -> Result<Outcome<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        let name = match self.name {
            Some(name) => name,
            None => Cow::Owned(call_site_namespace::<F>(self.site)?),
        };
        let CallKey { key, replayable } = CallKey::new(self.store, &name, &self.key);
        let call = Call {
            name: &name,
            key,
            fingerprint: self.fingerprint,
            policy: &self.policy,
        };
        if replayable && let Some(replayed) = replay_in_memory(self.store, &call) {
            return replayed.map_err(E::from);
        }
        execute(self.store, call, None, async move { body().await }).await
    }
}

/// The namespace of a call made without a name: the path of the body's type (a closure's
/// includes its crate, module, function and that function's type arguments) and the call site,
/// so two call sites, two crates or two instantiations of a generic function never share
/// records.
///
/// A body whose type names no single body (a trait object, a `fn` pointer) is
/// [`Error::NameRequired`]: every body of that type at the call site would share records.
pub(crate) fn call_site_namespace<F>(site: &std::panic::Location<'_>) -> Result<String, Error> {
    let full = std::any::type_name::<F>();
    if !identifies_a_body(full) {
        return Err(Error::NameRequired { body: full });
    }
    let mut body = full;
    while let Some(outer) = body.strip_suffix("::{{closure}}") {
        body = outer;
    }
    Ok(format!(
        "{body}@{}:{}:{}",
        site.file(),
        site.line(),
        site.column()
    ))
}

/// Whether a body type's name is one body's: not a trait object (`dyn`) nor a `fn` pointer
/// anywhere in it (`Box<dyn FnOnce() -> ..>`, `&dyn Fn() -> ..`, `fn() -> ..`,
/// `Arc<dyn Fn() -> ..>`). Closures and `fn` items have a type of their own.
fn identifies_a_body(type_name: &str) -> bool {
    // A `fn` pointer prints as `fn(..)`, `unsafe fn(..)` or `extern "C" fn(..)`; no path has a
    // segment named `dyn` or `fn` (keywords).
    !type_name
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|word| word == "dyn" || word == "fn")
}

/// A call's key as the executor takes it: [`Key::new`]'s digest, and whether the in-memory
/// store may hold a completed record of it.
///
/// With the in-memory store, the key is first looked up by its exact encoding
/// ([`MemoryStore::digest_of`](crate::MemoryStore)): a key whose record was replayed before gets
/// its digest from there, so a replay takes no BLAKE3 digest. Otherwise the digest is taken,
/// and if the key has a completed record (this call is its first replay), the record keeps the
/// encoding for the next ones; if it has none, the call need not look for a replay again.
pub struct CallKey {
    pub(crate) key: Key,
    /// `false` when this call has just seen that the in-memory store holds no live completed
    /// record of the key (most often: a first execution).
    pub(crate) replayable: bool,
}

impl CallKey {
    /// The key of `value` in `namespace` (exactly `Key::new(namespace, value)`), for a call to
    /// `store`.
    pub(crate) fn new<S: Store + ?Sized, V: KeyPart + ?Sized>(
        store: &S,
        namespace: &str,
        value: &V,
    ) -> CallKey {
        let Some(memory) = store.as_memory() else {
            return CallKey {
                key: Key::new(namespace, value),
                replayable: false,
            };
        };
        Key::encode_then(namespace, value, |encoding| {
            let exact = match encoding.exact() {
                Some(exact) if exact.len() <= MAX_EXACT_KEY => {
                    if let Some(key) = memory.digest_of(exact) {
                        return CallKey {
                            key,
                            replayable: true,
                        };
                    }
                    // Copied out (at most MAX_EXACT_KEY bytes) so the encoder can finish.
                    let mut copy = [0u8; MAX_EXACT_KEY];
                    copy[..exact.len()].copy_from_slice(exact);
                    Some((copy, exact.len()))
                }
                // A long key: found by its digest, as remote stores find every key.
                _ => None,
            };
            let key = encoding.digest();
            let replayable = match &exact {
                Some((copy, len)) => memory.keep_exact(&key, &copy[..*len]),
                None => true,
            };
            CallKey { key, replayable }
        })
    }
}

/// Everything the executor needs to know about one call besides its store and body.
pub(crate) struct Call<'a> {
    pub(crate) name: &'a str,
    pub(crate) key: Key,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) policy: &'a Policy,
}

/// Emits the one `tracing` event of a call.
macro_rules! outcome {
    ($level:ident, $call:expr, $outcome:expr $(, $($rest:tt)*)?) => {{
        crate::metrics::call($call.name, $outcome);
        tracing::event!(
            target: "idem",
            tracing::Level::$level,
            outcome = $outcome,
            name = $call.name,
            key = %$call.key,
            $($($rest)*)?
        )
    }};
}

pub(crate) mod step;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod transactional;

/// Decodes a stored result; a record that says the first call's result could not be stored is
/// [`Error::Codec`] with the reason.
pub(crate) fn decode_result<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    codec::from_slice(bytes)
}

/// The record stored in place of a result that could not be encoded: a retry gets
/// [`Error::Codec`] with `why`, and the body never runs again while the record lives.
pub(crate) fn unstorable_result(why: &Error) -> Vec<u8> {
    let why = match why {
        Error::Codec(source) => source.to_string(),
        other => other.to_string(),
    };
    codec::unstorable(&why)
}

/// A result larger than its store takes ([`Store::max_value_len`]).
#[derive(Debug)]
struct TooLarge {
    len: usize,
    max: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the result is {} bytes, more than the {} bytes the store takes",
            self.len, self.max
        )
    }
}

impl std::error::Error for TooLarge {}

/// Claims through the in-memory store directly when that is the store (no boxed future), or
/// through the trait.
async fn claim<S: Store + ?Sized>(
    store: &S,
    call: &Call<'_>,
    lease: Duration,
) -> Result<ValueClaim, Error> {
    if let Some(memory) = store.as_memory() {
        return memory.claim_value(call.key, call.fingerprint, lease);
    }
    let started = metrics::start();
    let claimed = store.claim(call.key, call.fingerprint, lease).await;
    metrics::store_operation("claim", started);
    Ok(match claimed? {
        Claim::Acquired(token) => ValueClaim::Acquired(token),
        Claim::Busy { lease_left } => ValueClaim::Busy { lease_left },
        Claim::Completed(done) => ValueClaim::Completed {
            value: Value::Bytes(done.value),
            fingerprint: done.fingerprint,
            expires_in: done.expires_in,
        },
    })
}

/// A stored value as `T`: decoded from its record on every replay, on every store, so a replay
/// is a value of its own, exactly what any store returns (a clone of a kept value would share
/// its `Arc`s and go through the type's own `Clone`, which need not be faithful).
fn decode<T: DeserializeOwned + 'static>(
    call: Option<Fingerprint>,
    value: &[u8],
    stored: Option<Fingerprint>,
) -> Result<T, Unreplayable> {
    if !fingerprint_matches(call, stored) {
        return Err(Unreplayable::KeyReused);
    }
    decode_result(value).map_err(Unreplayable::Undecodable)
}

/// Why a completed record found by a call is not its result.
enum Unreplayable {
    /// The record was made with another fingerprint.
    KeyReused,
    /// The record does not decode as `T`.
    Undecodable(Error),
}

/// Step 3 of the executor: a completed record was found and [`decode`]d; emits the call's
/// outcome.
fn replay<T>(
    call: &Call<'_>,
    decoded: Result<T, Unreplayable>,
    expires_in: Duration,
    waited: bool,
) -> Result<Outcome<T>, Error> {
    match decoded {
        Ok(value) => {
            let status = Status::replay(waited);
            outcome!(DEBUG, call, status.as_str());
            Ok(Outcome {
                value,
                status,
                expires_in: Some(expires_in),
            })
        }
        Err(Unreplayable::KeyReused) => {
            outcome!(INFO, call, "key_reused");
            Err(Error::KeyReused)
        }
        Err(Unreplayable::Undecodable(err)) => {
            outcome!(WARN, call, "store_error", error = %err, step = "decode");
            Err(err)
        }
    }
}

/// A replay from the in-memory store, done before the executor's future is made, with the
/// checks and the outcome event of `execute`'s replay. `None` when there is no live completed
/// record: then `execute` claims as usual.
///
/// The value is decoded from a reference to the record's bytes (not a copy), taken under the
/// shard's read lock and decoded after it is released, like the outcome event, which runs the
/// subscriber's code.
pub(crate) fn replay_in_memory<S, T>(
    store: &S,
    call: &Call<'_>,
) -> Option<Result<Outcome<T>, Error>>
where
    S: Store + ?Sized,
    T: DeserializeOwned + 'static,
{
    let (decoded, expires_in) = store
        .as_memory()?
        .read_completed(&call.key, |value, fingerprint, expires_in| {
            (decode(call.fingerprint, value, fingerprint), expires_in)
        })?;
    Some(replay(call, decoded, expires_in, false))
}

/// Emits the `cancelled` (or `panicked`) event of a call whose future is dropped before it
/// reports an outcome of its own, so that every call emits exactly one outcome event.
struct Unreported<'c, 'a> {
    call: &'c Call<'a>,
    panicked: &'c AtomicBool,
    /// Set once the body returned `Ok`: a drop after it leaves a result to store.
    body_ok: &'c AtomicBool,
    armed: bool,
}

impl Unreported<'_, '_> {
    /// The call reports its own outcome from here on.
    fn reported(&mut self) {
        self.armed = false;
    }
}

impl Drop for Unreported<'_, '_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let call = self.call;
        if self.panicked.load(Ordering::Relaxed) || std::thread::panicking() {
            outcome!(WARN, call, "panicked");
        } else if self.body_ok.load(Ordering::Relaxed) {
            outcome!(
                WARN,
                call,
                "cancelled",
                after_body = true,
                "the call was dropped after its body ran: its result is stored in the background \
                 if the store and the runtime allow it, otherwise the claim is left to its lease \
                 and a retry after it runs the body again"
            );
        } else {
            outcome!(DEBUG, call, "cancelled");
        }
    }
}

pub(crate) async fn execute<S, T, E, Fut>(
    store: &S,
    call: Call<'_>,
    eq: Option<fn(&T, &T) -> bool>,
    body: Fut,
) -> Result<Outcome<T>, E>
where
    S: Store + ?Sized,
    T: Serialize + DeserializeOwned + Send + 'static,
    E: From<Error>,
    Fut: Future<Output = Result<T, E>>,
{
    let panicked = AtomicBool::new(false);
    let body_ok = AtomicBool::new(false);
    let mut report = Unreported {
        call: &call,
        panicked: &panicked,
        body_ok: &body_ok,
        armed: true,
    };
    let policy = &call.policy.bounded();
    // Only a call that meets a busy key needs a deadline (and a look at the clock).
    let mut deadline: Option<Instant> = None;
    let mut waited = false;
    let mut wait_started: Option<metrics::Stopwatch> = None;
    let token = loop {
        // Remote stores only: the in-memory claim takes no time, and a replay reads no clock.
        let asked = store.as_memory().is_none().then(Instant::now);
        let claim = match claim(store, &call, policy.lease).await {
            Ok(claim) => claim,
            Err(err) => {
                report.reported();
                if matches!(err, Error::StoreFull(_)) {
                    // Capacity, not a failing backend: its own outcome, so that an alert on
                    // `store_error` does not fire for it.
                    outcome!(WARN, call, "store_full", error = %err);
                } else {
                    outcome!(WARN, call, "store_error", error = %err, step = "claim");
                }
                return Err(err.into());
            }
        };
        if let (Some(started), false) = (wait_started, matches!(claim, ValueClaim::Busy { .. })) {
            metrics::waited(call.name, started);
        }
        match claim {
            ValueClaim::Acquired(token) => {
                // A reply that took half the lease or more may have come after the lease (counted
                // from the grant, on the store) ran out: renew before the body starts, and claim
                // again if another call took the key over meanwhile.
                if asked.is_some_and(|asked| asked.elapsed() >= policy.lease / 2) {
                    match store.renew(call.key, token, policy.lease).await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(err) => {
                            store.release_on_drop(call.key, token);
                            report.reported();
                            outcome!(WARN, call, "store_error", error = %err, step = "claim");
                            return Err(err.into());
                        }
                    }
                }
                break token;
            }
            ValueClaim::Completed {
                value: Value::Bytes(value),
                fingerprint,
                expires_in,
            } => {
                report.reported();
                let decoded = decode(call.fingerprint, &value, fingerprint);
                return replay(&call, decoded, expires_in, waited).map_err(E::from);
            }
            ValueClaim::Busy { lease_left } => {
                wait_started.get_or_insert_with(metrics::start);
                match wait_turn(store, call.key, policy, &mut deadline).await {
                    Turn::ClaimAgain => {}
                    Turn::Rejected => {
                        report.reported();
                        if let (Some(started), true) = (wait_started, waited) {
                            metrics::waited(call.name, started);
                        }
                        outcome!(INFO, call, "rejected", waited);
                        return Err(Error::InProgress {
                            retry_after: lease_left,
                        }
                        .into());
                    }
                    Turn::Failed(err) => {
                        report.reported();
                        outcome!(WARN, call, "store_error", error = %err, step = "wait");
                        return Err(err.into());
                    }
                }
                waited = true;
            }
        }
    };

    // The execution path (renewal timers, completion) lives in its own allocation, so the
    // future of a replay stays small: one allocation per execution, none per replay.
    let policy = policy.clone();
    let claimed = Claimed {
        store,
        call: &call,
        policy,
        token,
        panicked: &panicked,
        report: &mut report,
    };
    Box::pin(claimed.run(eq, body)).await
}

/// A key this call holds: what [`Claimed::run`] needs to run the body and settle the claim.
struct Claimed<'c, 'a, 'r, S: ?Sized> {
    store: &'c S,
    call: &'c Call<'a>,
    policy: Policy,
    token: Token,
    panicked: &'c AtomicBool,
    report: &'r mut Unreported<'c, 'a>,
}

impl<S: Store + ?Sized> Claimed<'_, '_, '_, S> {
    /// Runs the body, renewing the lease, then completes the claim (`Ok`) or releases it
    /// (`Err`, panic, cancellation).
    ///
    /// Once the body has returned `Ok`, the claim is never released: a call dropped while its
    /// result is being stored hands the completion to the store
    /// ([`Store::complete_on_drop`]), or leaves the claim to its lease. Releasing a claim whose
    /// body succeeded would let a retry run the body a second time.
    async fn run<T, E, Fut>(
        self,
        eq: Option<fn(&T, &T) -> bool>,
        body: Fut,
    ) -> Result<Outcome<T>, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
        Fut: Future<Output = Result<T, E>>,
    {
        let Claimed {
            store,
            call,
            policy,
            token,
            panicked,
            report,
        } = self;
        let key = call.key;
        // Step values whose effects ran and whose records the store has not acknowledged: a
        // drop hands them to the store with the release (declared before the guard, which
        // reads it when it drops).
        let unrecorded = step::Unrecorded::default();
        let mut guard = ClaimGuard {
            store,
            key,
            token,
            fingerprint: call.fingerprint,
            stage: Stage::Running,
            unrecorded: &unrecorded,
            ttl: policy.ttl,
        };
        // The body's steps (`idem::step`) are sent to the store by the future that polls the
        // body, with the call's key and token: the store stays borrowed by the call.
        let cx = step::StepCx::new(step::Recording::Store {
            max_value_len: store.max_value_len(),
            lease: policy.lease,
        });
        let body = step::CURRENT.scope(
            cx,
            step::serve(
                store,
                key,
                token,
                policy.ttl,
                &unrecorded,
                catch_panics(body, panicked),
            ),
        );
        let started = metrics::start();
        let (result, seen) = renewing(store, key, token, policy.lease, body).await;
        metrics::body(call.name, started);
        if seen.key_reused {
            // A step found the key's steps recorded for another request: whatever the body
            // made of that, the call is refused like a replay of another request's result.
            guard.release(call.name).await;
            report.reported();
            outcome!(INFO, call, "key_reused");
            return Err(Error::KeyReused.into());
        }
        let value = match result {
            Ok(value) => value,
            Err(err) => {
                // A failure is not memoized: free the key so a retry runs the body again (its
                // recorded steps stay, so the retry does not run them again).
                guard.release(call.name).await;
                report.reported();
                if seen.lease_lost {
                    outcome!(
                        WARN,
                        call,
                        "lease_lost",
                        "a step found that this call's lease ran out and another call took the \
                         key over: the body stopped; raise `lease` above the body's run time"
                    );
                } else {
                    outcome!(DEBUG, call, "failed");
                }
                return Err(err);
            }
        };

        report.body_ok.store(true, Ordering::Relaxed);
        // The body returned `Ok`: from here on the claim is completed or left to its lease, never
        // released. Should the result's own Serialize, Deserialize or Clone panic while it is
        // checked, the unwinding call stores a record saying so (a retry must not run the body
        // again).
        guard.stage = Stage::Completing {
            value: Bytes::from(codec::unstorable(
                "the result's Serialize or Deserialize panicked while it was checked",
            )),
            ttl: policy.ttl,
        };
        let (encoded, mut unstorable) = match codec::encode_checked_replay(&value, eq) {
            Ok((bytes, _replay)) => (Bytes::from(bytes), None),
            Err(err) => {
                let err = Error::codec(err);
                (Bytes::from(unstorable_result(&err)), Some(err))
            }
        };
        let completion = match store.as_memory() {
            Some(memory) => {
                guard.stage = Stage::Settled;
                Ok(memory.complete_value(
                    key,
                    token,
                    call.fingerprint,
                    Value::Bytes(encoded),
                    policy.ttl,
                ))
            }
            None => {
                // A result larger than the store takes is refused deterministically: record that
                // it could not be stored (later calls get an error, the body never runs again)
                // rather than send it.
                let (encoded, refused) = match store.max_value_len() {
                    Some(max) if unstorable.is_none() && encoded.len() > max => {
                        let err = Error::store(TooLarge {
                            len: encoded.len(),
                            max,
                        });
                        (Bytes::from(unstorable_result(&err)), Some(err))
                    }
                    _ => (encoded, None),
                };
                if refused.is_some() {
                    unstorable = refused;
                }
                let completion = complete(store, &mut guard, encoded.clone(), policy.ttl).await;
                match completion {
                    Err(err) => {
                        // The store failed (down, slow, a lock): the value may or may not have
                        // landed. Finish the completion in the background where the store can
                        // (a completion that landed is recognised as itself), so that once the
                        // store is back a retry replays rather than runs again.
                        store.complete_on_drop(key, token, call.fingerprint, encoded, policy.ttl);
                        Err(err)
                    }
                    other => other,
                }
            }
        };
        report.reported();
        match completion {
            Ok(Completion::Stored) => {
                let expires_in = if let Some(err) = unstorable {
                    outcome!(
                        WARN,
                        call,
                        "executed",
                        stored = false,
                        error = %err,
                        "the body ran but its result could not be stored; later calls with this \
                         key get this error instead of a result, and the body does not run again \
                         while the record lives"
                    );
                    None
                } else {
                    outcome!(DEBUG, call, "executed");
                    Some(policy.ttl)
                };
                Ok(Outcome {
                    value,
                    status: Status::Executed,
                    expires_in,
                })
            }
            Ok(Completion::LeaseLost) => {
                outcome!(
                    WARN,
                    call,
                    "lease_lost",
                    "the lease ran out and another call took the key over before this call's \
                     result was stored: the body may have run twice; raise `lease` above the \
                     body's run time"
                );
                Ok(Outcome {
                    value,
                    status: Status::LeaseLost,
                    expires_in: None,
                })
            }
            Err(err) => {
                // The body ran and its value is in hand: return it rather than make the caller
                // retry a done effect.
                outcome!(
                    WARN,
                    call,
                    "store_error",
                    error = %err,
                    step = "complete",
                    "the body ran but its result could not be stored yet; it is stored in the \
                     background once the store recovers, otherwise a retry after the lease runs \
                     the body again"
                );
                Ok(Outcome {
                    value,
                    status: Status::Executed,
                    expires_in: None,
                })
            }
        }
    }
}

/// Completes the claim through the store, timed; a drop meanwhile hands the completion to the
/// store ([`Store::complete_on_drop`]) and never releases.
async fn complete<S: Store + ?Sized>(
    store: &S,
    guard: &mut ClaimGuard<'_, S>,
    value: Bytes,
    ttl: Duration,
) -> Result<Completion, Error> {
    guard.stage = Stage::Completing {
        value: value.clone(),
        ttl,
    };
    let started = metrics::start();
    let completion = store
        .complete(guard.key, guard.token, guard.fingerprint, value, ttl)
        .await;
    metrics::store_operation("complete", started);
    guard.stage = Stage::Settled;
    completion
}

/// `body`, with a panic inside it noted in `panicked` before it unwinds on, so that the call's
/// destructor can tell a panic from a cancellation even after a runtime caught the unwind.
async fn catch_panics<Fut: Future>(body: Fut, panicked: &AtomicBool) -> Fut::Output {
    let mut body = std::pin::pin!(body);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| body.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                panicked.store(true, Ordering::Relaxed);
                std::panic::resume_unwind(payload)
            }
        }
    })
    .await
}

/// Whether this call is polled inside a tokio runtime, whose timers renewal and waiting use.
/// (A runtime built without timers still panics on them: idem needs tokio's `time` driver, which
/// `#[tokio::main]` and `Runtime::new` enable.)
fn in_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// Runs `body` while renewing the lease every third of it. Renewal is driven by this future, so
/// a holder that is no longer polled stops renewing and loses its lease.
async fn renewing<S, Fut>(
    store: &S,
    key: Key,
    token: Token,
    lease: Duration,
    body: Fut,
) -> Fut::Output
where
    S: Store + ?Sized,
    Fut: Future,
{
    if !in_runtime() {
        // Renewal needs tokio's timers. Outside a runtime the body runs on its first lease
        // alone, which a body shorter than the lease never notices.
        tracing::warn!(
            target: "idem", key = %key,
            "not polled inside a tokio runtime: the lease is not renewed while the body runs"
        );
        return body.await;
    }
    let every = (lease / 3).max(Duration::from_millis(1));
    // After a failed renewal, try again soon: the next regular renewal could come after the
    // lease has run out, and a live holder would lose its key.
    let again = (lease / 10).max(Duration::from_millis(1));
    let renew = async {
        let mut pause = every;
        loop {
            tokio::time::sleep(pause).await;
            let started = metrics::start();
            let renewed = store.renew(key, token, lease).await;
            metrics::store_operation("renew", started);
            pause = if renewed.is_err() { again } else { every };
            match renewed {
                Ok(true) => {}
                Ok(false) => return, // taken over: `complete` will report the lost lease
                Err(err) => {
                    tracing::warn!(target: "idem", key = %key, error = %err, "could not renew the lease; trying again");
                }
            }
        }
    };
    tokio::pin!(body);
    tokio::pin!(renew);
    let mut renewing = true;
    loop {
        tokio::select! {
            biased;
            out = &mut body => return out,
            () = &mut renew, if renewing => renewing = false,
        }
    }
}

/// Where a claimed call is, for what its destructor must do.
enum Stage {
    /// The body has not returned: a drop releases the claim.
    Running,
    /// The body returned `Ok` and its result is being stored: a drop hands the completion to
    /// the store, and never releases.
    Completing { value: Bytes, ttl: Duration },
    /// The claim is completed, released, or left to its lease: a drop does nothing.
    Settled,
}

/// Settles a claim when the call's future is dropped or unwinds: releases it while the body
/// runs, completes it once the body has returned `Ok`.
struct ClaimGuard<'a, S: Store + ?Sized> {
    store: &'a S,
    key: Key,
    token: Token,
    fingerprint: Option<Fingerprint>,
    stage: Stage,
    /// Steps whose records were not acknowledged: recorded before a release.
    unrecorded: &'a step::Unrecorded,
    /// The call's ttl, for those steps.
    ttl: Duration,
}

impl<S: Store + ?Sized> ClaimGuard<'_, S> {
    /// Releases the claim now, waiting for the store. A release that fails leaves the claim to
    /// expire with its lease, which is no longer renewed.
    async fn release(&mut self, name: &str) {
        // Stays `Running` while the release is under way: if this future is dropped meanwhile,
        // the destructor still releases.
        let started = metrics::start();
        for (name, value) in self.unrecorded.take() {
            // Normally none: the body's steps are recorded before the body's end is reported.
            let _ = self
                .store
                .record_step(self.key, self.token, name, value, self.ttl)
                .await;
        }
        let released = self.store.release(self.key, self.token).await;
        metrics::store_operation("release", started);
        self.stage = Stage::Settled;
        if let Err(err) = released {
            tracing::warn!(
                target: "idem", name, key = %self.key, error = %err,
                "could not release the claim; it frees when its lease runs out"
            );
        }
    }
}

impl<S: Store + ?Sized> Drop for ClaimGuard<'_, S> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.stage, Stage::Settled) {
            Stage::Running => match self.unrecorded.take() {
                steps if steps.is_empty() => self.store.release_on_drop(self.key, self.token),
                steps => self
                    .store
                    .release_on_drop_after_steps(self.key, self.token, steps, self.ttl),
            },
            Stage::Completing { value, ttl } => {
                self.store
                    .complete_on_drop(self.key, self.token, self.fingerprint, value, ttl)
            }
            Stage::Settled => {}
        }
    }
}
