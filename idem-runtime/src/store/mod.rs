//! The [`Store`] trait, the seam between the executor and a backend; the stores, one module
//! each; and the types a store implementation names ([`Claim`], [`Completed`], [`Completion`],
//! fencing [`Token`]s, [`BoxFuture`], [`Bytes`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::key::{Fingerprint, Key};

pub use crate::record::{Claim, Completed, Completion, Token};
/// The byte buffer stores hold results in (re-exported from `bytes`, so stores need not depend
/// on it).
pub use bytes::Bytes;

#[cfg(any(feature = "redis", feature = "postgres"))]
mod known;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod transaction;

/// What a store does about a server setting that can lose an acknowledged record, and so let a
/// body run twice: a Redis eviction policy or missing persistence, an unlogged PostgreSQL table
/// or `synchronous_commit = off`. Each store's builder says which settings it checks and which
/// answer is its default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IfUnsafe {
    /// Do not run on it: fail with [`Error::Store`] naming the setting and the fix.
    Refuse,
    /// Run, and say so once through a `tracing` warning (target `idem`) naming the setting and
    /// the fix.
    Warn,
    /// Run, knowingly.
    Accept,
}

/// What [`Store::record_step`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepRecorded {
    /// The step's value is recorded (or was already, under this token: the first value stays).
    Recorded,
    /// `token` no longer holds the key (another call took it over, the claim was completed,
    /// released or removed, or its lease ran out): nothing was written.
    LeaseLost,
}

/// What [`Store::steps`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordedSteps {
    /// `token` holds the key; these are the steps recorded under it so far, by this holder or
    /// an earlier one (name, encoded value), in no particular order.
    Held(Vec<(String, Bytes)>),
    /// `token` no longer holds the key: the caller must not run another step.
    LeaseLost,
    /// `token` holds the key, but its steps were recorded by a call with another fingerprint
    /// (the rule of replays: the claim has a fingerprint, and the steps' is another or none).
    /// They are not this call's: the caller must not run another step (a key reused for a
    /// different request must not inherit the first request's effects), and the steps stay
    /// for a retry of the request that recorded them.
    KeyReused,
}

/// A boxed, `Send` future: what [`Store`] methods return, so that `dyn Store` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where idempotency records live.
///
/// A record for a key is absent, `InProgress { token, lease, fingerprint }` or
/// `Completed { value, fingerprint, expiry }`. Every operation is atomic on its own, and every
/// store passes the same [conformance suite](crate::conformance), which is what makes them
/// interchangeable. Expiry uses the store's own clock where it has one, so the clocks of several
/// clients never have to agree.
///
/// The trait is object safe: a program can pick its backend at start-up and hold it as
/// `Arc<dyn Store>`. `&S`, `Box<S>` and `Arc<S>` are stores when `S` is.
///
/// A backend reports its own failures (connection, timeout, protocol, a record it cannot
/// read) as [`Error::Store`], never by panicking, and never touches another key's record.
pub trait Store: Send + Sync {
    /// Claims `key` for a call that will run the body.
    ///
    /// - absent, or expired → writes `InProgress` with a new token and `lease`, returns
    ///   [`Claim::Acquired`];
    /// - live `Completed` → returns it, unchanged, as [`Claim::Completed`];
    /// - live `InProgress` → returns [`Claim::Busy`] with the time left on its lease;
    /// - `InProgress` whose lease ran out → takes it over with a new token ([`Claim::Acquired`]).
    ///
    /// `fingerprint` is kept with the claim and carried into the completed record.
    ///
    /// A lease is counted from the moment the claim is granted, by the store's clock: a claim
    /// that had to wait (for a lock, a connection) is still granted its whole `lease`.
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>>;

    /// Completes the claim `token` holds: writes `Completed { value, fingerprint }` to live for
    /// `ttl`, by the store's clock. `fingerprint` is the claim's (the executor passes what it
    /// claimed with): it is what the record keeps when the claim's own record is gone.
    ///
    /// The rule, the same on every store (the [conformance suite](crate::conformance) checks it):
    ///
    /// - the record is `InProgress` under `token` → it is completed: [`Completion::Stored`]. This
    ///   holds even if the lease ran out, as long as no other call took the key over: the body
    ///   ran, and storing its result is what keeps a retry from running it again;
    /// - the key has no live record (the lease ran out and the store already dropped the claim,
    ///   or an operator removed it; or the only record is a claim of another token whose lease
    ///   ran out too, or an expired completed record) → the completed record is written:
    ///   [`Completion::Stored`];
    /// - the record is already completed under `token` (a `complete` repeated after its reply was
    ///   lost) → nothing changes, the first value stays: [`Completion::Stored`];
    /// - another claim holds the key (its lease is live), or a live completed record of another
    ///   claim is there → nothing is written: [`Completion::LeaseLost`].
    fn complete(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>>;

    /// Pushes the lease of the claim `token` holds out to `lease` from now. Returns `false`, and
    /// changes nothing, if `token` no longer holds the key.
    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>>;

    /// Removes the claim `token` holds (the body failed, panicked or was cancelled), so the next
    /// caller runs the body at once. Returns `false`, and changes nothing, if `token` no longer
    /// holds the key.
    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>>;

    /// Resolves when the record of `key` is no longer a live `InProgress`, or after `timeout`,
    /// whichever comes first. It may also resolve early; callers claim again to see the state.
    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>>;

    /// Forgets the record of `key`, whatever its state (an operator's tool). Returns whether there
    /// was one.
    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>>;

    /// Releases the claim `token` holds without waiting, from a destructor: called when the
    /// future running the body is dropped (cancelled) or unwinds from a panic.
    ///
    /// A store that can do it synchronously does (the in-memory store); a remote store may hand
    /// the release to its runtime. The default does nothing: the claim then expires with its
    /// lease, which is never renewed again because renewal is driven by the dropped future.
    fn release_on_drop(&self, key: Key, token: Token) {
        let _ = (key, token);
    }

    /// Completes the claim `token` holds without waiting, from a destructor: called when the
    /// future of a call whose body already returned `Ok` is dropped (cancelled) while its
    /// [`complete`](Store::complete) had not finished.
    ///
    /// The body ran, so the claim must not be released (a retry would run it again): a store
    /// that can finish the completion does, synchronously or by handing it to its runtime, with
    /// the rule of [`complete`](Store::complete) (a completion that already reached the store is
    /// recognised as itself). The default does nothing: the claim is then left to its lease.
    fn complete_on_drop(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        let _ = (key, token, fingerprint, value, ttl);
    }

    /// The largest value [`complete`](Store::complete) accepts, in bytes, if the store has such a
    /// limit (Redis's `proto-max-bulk-len`, PostgreSQL's 1 GB `bytea`). The executor records a
    /// larger result as one that could not be stored (later calls get
    /// [`Error::Codec`], and the body does not run again) instead of
    /// sending it. `None`, the default: no limit the store knows of.
    fn max_value_len(&self) -> Option<usize> {
        None
    }

    /// Records the `Ok` value of step `step` of the call holding `key` under `token`
    /// ([`step`](crate::step)), to live `ttl` (the call's) from now.
    ///
    /// Fenced: written only if the record is in progress under `token` with its lease not run
    /// out (the store's clock); otherwise nothing is written and the answer is
    /// [`StepRecorded::LeaseLost`] (an absent record is not created: a step is not a final
    /// result). A repeated record of one name under one token keeps the first value. The first
    /// step recorded under a key (with none live) keeps the claim's fingerprint with the steps,
    /// for [`steps`](Store::steps) to compare.
    ///
    /// Step records outlive a [`release`](Store::release) and a lapsed lease: the next claim of
    /// the key (a new token) reads them with [`steps`](Store::steps), so a retry after a failure
    /// or a crash does not run a recorded step again. [`complete`](Store::complete) and
    /// [`remove`](Store::remove) delete them, and they expire `ttl` after the last one was
    /// recorded. The step records of one key never appear under another.
    ///
    /// The default, for stores without steps: [`Error::Store`] saying so.
    fn record_step(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        let _ = (key, token, step, value, ttl);
        Box::pin(async { Err(Error::store(StepsUnsupported)) })
    }

    /// The steps recorded under `key` (by this holder or any earlier one), if `token` holds the
    /// key (the same fence as [`record_step`](Store::record_step)), and if they were recorded
    /// under a fingerprint that matches the claim's: none on the claim, or the same one
    /// ([`RecordedSteps::KeyReused`] otherwise). The executor reads them when a body runs its
    /// first step.
    ///
    /// The default, for stores without steps: [`Error::Store`] saying so.
    fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        let _ = (key, token);
        Box::pin(async { Err(Error::store(StepsUnsupported)) })
    }

    /// What a call dropped while its body runs does when some of its steps ran but their records
    /// were not acknowledged (the body was stopped between a step's effect and its record):
    /// record `steps` as [`record_step`](Store::record_step) would (fenced by `token`), then
    /// release the claim as [`release_on_drop`](Store::release_on_drop), in that order and
    /// without blocking. A retry then does not run those steps again.
    ///
    /// The default releases only: the steps are lost, and a retry runs them again.
    fn release_on_drop_after_steps(
        &self,
        key: Key,
        token: Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        let _ = (steps, ttl);
        self.release_on_drop(key, token);
    }

    /// The in-memory store behind this one, if it is one: lets the executor call it directly,
    /// without boxed futures, and keep results typed. Not for other stores to implement.
    #[doc(hidden)]
    fn as_memory(&self) -> Option<&memory::MemoryStore> {
        None
    }
}

macro_rules! forward_store {
    ($($ptr:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ptr {
            fn claim(&self, key: Key, fingerprint: Option<Fingerprint>, lease: Duration) -> BoxFuture<'_, Result<Claim, Error>> {
                (**self).claim(key, fingerprint, lease)
            }
            fn complete(&self, key: Key, token: Token, fingerprint: Option<Fingerprint>, value: Bytes, ttl: Duration) -> BoxFuture<'_, Result<Completion, Error>> {
                (**self).complete(key, token, fingerprint, value, ttl)
            }
            fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
                (**self).renew(key, token, lease)
            }
            fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
                (**self).release(key, token)
            }
            fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
                (**self).wait(key, timeout)
            }
            fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
                (**self).remove(key)
            }
            fn release_on_drop(&self, key: Key, token: Token) {
                (**self).release_on_drop(key, token)
            }
            fn complete_on_drop(&self, key: Key, token: Token, fingerprint: Option<Fingerprint>, value: Bytes, ttl: Duration) {
                (**self).complete_on_drop(key, token, fingerprint, value, ttl)
            }
            fn max_value_len(&self) -> Option<usize> {
                (**self).max_value_len()
            }
            fn record_step(&self, key: Key, token: Token, step: String, value: Bytes, ttl: Duration) -> BoxFuture<'_, Result<StepRecorded, Error>> {
                (**self).record_step(key, token, step, value, ttl)
            }
            fn release_on_drop_after_steps(&self, key: Key, token: Token, steps: Vec<(String, Bytes)>, ttl: Duration) {
                (**self).release_on_drop_after_steps(key, token, steps, ttl)
            }
            fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
                (**self).steps(key, token)
            }
            fn as_memory(&self) -> Option<&memory::MemoryStore> {
                (**self).as_memory()
            }
        }
    )*};
}
forward_store!(&S, Box<S>, Arc<S>);

/// The error of a store that does not implement [`Store::record_step`] and [`Store::steps`].
#[derive(Debug)]
struct StepsUnsupported;

impl std::fmt::Display for StepsUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "this store does not implement Store::record_step and Store::steps, so idem::step \
             cannot record a step; use MemoryStore, RedisStore or PostgresStore, or implement them",
        )
    }
}

impl std::error::Error for StepsUnsupported {}

/// How long [`Store::complete_on_drop`] keeps trying to store a result while the server is
/// unreachable (or answers with an error that can pass), and a remote store's
/// [`Store::release_on_drop_after_steps`] its steps and its release: a minute.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) const BACKGROUND_COMPLETION: Duration = Duration::from_secs(60);

/// The task behind a remote store's [`Store::complete_on_drop`]: runs `attempt` (one
/// completion) until it stores or another call took the key over, trying again while
/// `worth_retrying` says the failure can pass, for up to [`BACKGROUND_COMPLETION`] (see
/// [`retry_until`]). Each end is one `tracing` event.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) async fn complete_in_background<F, Fut>(
    key: Key,
    attempt: F,
    worth_retrying: fn(&Error) -> bool,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Completion, Error>>,
{
    let deadline = crate::clock::after(tokio::time::Instant::now(), BACKGROUND_COMPLETION);
    match retry_until(key, "store a result", deadline, attempt, worth_retrying).await {
        Ok(Completion::Stored) => {
            tracing::debug!(target: "idem", key = %key, "stored a result in the background");
        }
        Ok(Completion::LeaseLost) => {
            tracing::warn!(
                target: "idem", key = %key,
                "the lease ran out and another call took the key over before this call's \
                 result was stored: the body may have run twice; raise `lease` above the \
                 body's run time"
            );
        }
        Err(err) => {
            tracing::warn!(
                target: "idem", key = %key, error = %err,
                "could not store the result of a call whose body ran; the claim is left to \
                 its lease, after which a retry runs the body again"
            );
        }
    }
}

/// The task behind a remote store's [`Store::release_on_drop_after_steps`] (and, with no steps,
/// its [`Store::release_on_drop`]): records each step (fenced by `token`, one try after another
/// while `worth_retrying` says the failure can pass), then releases the claim, in that order (a
/// release first would let another call take the key, and the steps would be refused); all
/// within [`BACKGROUND_COMPLETION`]. A step that cannot be recorded is left (a retry runs it
/// again); once the lease is found lost, the rest are too.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) async fn record_steps_then_release<S: Store + ?Sized>(
    store: &S,
    key: Key,
    token: Token,
    steps: Vec<(String, Bytes)>,
    ttl: Duration,
    worth_retrying: fn(&Error) -> bool,
) {
    let deadline = crate::clock::after(tokio::time::Instant::now(), BACKGROUND_COMPLETION);
    for (step, value) in steps {
        let attempt = || store.record_step(key, token, step.clone(), value.clone(), ttl);
        match retry_until(key, "record a step", deadline, attempt, worth_retrying).await {
            Ok(StepRecorded::Recorded) => {}
            Ok(StepRecorded::LeaseLost) => {
                tracing::warn!(
                    target: "idem", key = %key, step = %step,
                    "the lease of a dropped call ran out before the steps whose effects ran \
                     were recorded: a retry runs them again; raise `lease` above the body's \
                     run time"
                );
                return;
            }
            Err(err) => tracing::warn!(
                target: "idem", key = %key, step = %step, error = %err,
                "could not record a step of a dropped call whose effect ran; a retry runs it \
                 again"
            ),
        }
    }
    let attempt = || store.release(key, token);
    if let Err(err) = retry_until(
        key,
        "release a dropped claim",
        deadline,
        attempt,
        worth_retrying,
    )
    .await
    {
        tracing::debug!(
            target: "idem", key = %key, error = %err,
            "could not release a dropped claim; it frees when its lease runs out"
        );
    }
}

/// The retry loop of a remote store's background tasks ([`Store::complete_on_drop`],
/// [`Store::release_on_drop_after_steps`]): runs `attempt` until it answers, or fails in a way
/// `worth_retrying` says cannot pass, or the next try would come after `deadline`; meanwhile
/// tries again with backoff (50 ms doubling to 1 s), each retry a `debug` event saying it could
/// not `what` yet. Returns the last answer or failure.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) async fn retry_until<T, F, Fut>(
    key: Key,
    what: &str,
    deadline: tokio::time::Instant,
    mut attempt: F,
    worth_retrying: fn(&Error) -> bool,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match attempt().await {
            Err(err) if worth_retrying(&err) && tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(
                    target: "idem", key = %key, error = %err,
                    "could not {what} yet; trying again"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
