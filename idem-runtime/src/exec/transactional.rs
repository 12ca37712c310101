//! The transactional mode: the claim, the body's own writes and the completed record commit in
//! one database transaction, so a crash can never leave the effect without its record nor the
//! record without its effect.
//!
//! Made by [`PostgresStore::transactional`]: the records table, the waiting and the replays are
//! the store's; the transaction is the store's own tokio-postgres pool's
//! ([`TokioPostgres`], the body gets a `&tokio_postgres::Transaction`) or, with the
//! `sqlx-postgres` feature, the user's `sqlx::PgPool`'s ([`Sqlx`], the body gets a
//! `&mut sqlx::PgConnection` inside the transaction). Bodies are async closures:
//!
//! ```no_run
//! use idem_runtime::{Error, PostgresStore};
//!
//! # async fn handle(store: &PostgresStore, order_id: i64) -> Result<(), Error> {
//! let outcome = store
//!     .transactional(order_id)
//!     .name("inbox.v1")
//!     .run_with_outcome(async |tx| {
//!         tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&order_id])
//!             .await
//!             .map_err(Error::store)?;
//!         Ok::<_, Error>(order_id)
//!     })
//!     .await?;
//! println!("{:?}", outcome.status); // Executed the first time, Replayed after
//! # Ok(()) }
//! ```
//!
//! The same with sqlx (feature `sqlx-postgres`), on the application's own pool:
//!
//! ```no_run
//! # #[cfg(feature = "sqlx-postgres")]
//! # async fn handle(store: &idem_runtime::PostgresStore, pool: &sqlx::PgPool, order_id: i64)
//! #     -> Result<(), idem_runtime::Error> {
//! use idem_runtime::Error;
//!
//! let id = store
//!     .transactional(order_id)
//!     .name("inbox.v1")
//!     .sqlx(pool)
//!     .run(async |tx| {
//!         sqlx::query("INSERT INTO orders (id) VALUES ($1)")
//!             .bind(order_id)
//!             .execute(&mut *tx)
//!             .await
//!             .map_err(Error::store)?;
//!         Ok::<_, Error>(order_id)
//!     })
//!     .await?;
//! # let _ = id; Ok(()) }
//! ```
//!
//! The flow is the executor's, generic over a
//! [`TransactionBackend`](crate::store::transaction::TransactionBackend): namespace, claim,
//! replay or wait, fingerprint check, decode and encode, one `tracing` event per call (with
//! `transactional = true`) and the executor's metrics.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{
    Call, OnConflict, Outcome, Policy, Status, Turn, Unreported, call_site_namespace, catch_panics,
    decode_result, fingerprint_matches, wait_turn,
};
use crate::codec;
use crate::error::Error;
use crate::key::{Fingerprint, Key, KeyPart};
use crate::metrics;
use crate::record::{Claim, Token};
use crate::store::Store;
use crate::store::transaction::{
    BUSY_HINT, BodyEndedTransaction, GATED_PAUSES, TransactionBackend, TxCall, TxClaim,
    TxCompletion, TxState,
};

use crate::store::postgres::PostgresStore;
#[cfg(feature = "sqlx-postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-postgres")))]
pub use crate::store::postgres::Sqlx;
pub use crate::store::postgres::TokioPostgres;
use tokio_postgres::IsolationLevel;

/// How many times in a row an attempt may start over (a serialization failure or a row
/// committed after its snapshot) before the key is treated as busy.
const AGAIN_ATTEMPTS: usize = 16;

/// An idempotent call in transactional mode: the claim, the body's writes and the completed
/// record commit in one PostgreSQL transaction. Made by [`PostgresStore::transactional`]; `B`
/// is where the transaction comes from: the store's own pool ([`TokioPostgres`], the default)
/// or, after [`sqlx`](Transactional::sqlx), the application's `sqlx::PgPool` ([`Sqlx`]).
///
/// The body receives the transaction and does its writes through it. Then:
///
/// - `Ok(value)` → the record is completed in the same transaction, which commits: the writes
///   and the record become visible together. A replay returns `value` without running the body.
/// - `Err(e)` → the transaction rolls back: neither the writes nor a record remain, and a
///   retry runs the body again. Panic or cancellation rolls back the same way.
/// - The process dies or loses its connection before the commit → the server rolls back:
///   neither remains, and the retry runs the body (at once: no lease to wait out).
///
/// That is an exactly-once *effect* for effects that are writes to this database, not only
/// at-most-once execution. (If the connection breaks *during* `COMMIT`, the caller gets
/// [`Error::Store`] without knowing whether it committed; the retry then replays or runs,
/// never both.)
///
/// **When to use it:** the body's effect is rows in the same database as the store's table
/// (an inbox/outbox, an order, a ledger entry). For effects elsewhere (an HTTP call, an email)
/// use the ordinary executor ([`Idempotent`](crate::Idempotent) or `#[idempotent]`).
///
/// **What it costs:** the transaction holds a pooled connection, the claim's row and the key
/// lock for the whole body. A concurrent caller of the same key (transactional or not) never
/// waits on them inside the database: its claim finds the key lock taken and reports the key
/// busy at once, and the caller waits outside the pool (holding no connection, woken by the
/// notification sent at commit: see the store's
/// [Waiting](crate::store::postgres#waiting)) or rejects per `on_conflict`, like for any
/// in-progress key; once the holder commits it replays, once it rolls back it runs. So
/// duplicates of one key never starve other keys of connections. Keep the body short. The
/// [lease](Self::lease) is the transaction's `idle_in_transaction_session_timeout`: a holder
/// that froze or is no longer polled has its transaction ended by the server once the lease is
/// over (its writes roll back, and the key is free). The connection's `statement_timeout` and
/// `lock_timeout` apply to the body's statements too.
///
/// **The body owns its statements, not the transaction:** it must not end the transaction
/// (`COMMIT`, `ROLLBACK`, `END`); to undo part of its work it uses a savepoint, to undo all of
/// it it returns `Err`. A body that ends it anyway is detected before anything is stored: the
/// call fails with [`Error::Store`] saying so, and its connection is closed (what the body wrote
/// before it ended the transaction may have committed without a record: idem cannot make that
/// exactly-once, so it seals the key with a record saying so). Session state the body leaves
/// behind (a `SET` without `LOCAL`, `SET ROLE`) does not reach later callers: the commit also
/// checks for it, and such a connection is closed instead of returned to the pool (behind a
/// [transaction pooler](crate::store::postgres::PostgresStoreBuilder::transaction_pooler),
/// `RESET ALL` runs with the commit instead).
///
/// **The two backends differ in one thing**, which follows from their drivers: a
/// tokio-postgres `Transaction` is shared (`&Transaction`), so while the body awaits something
/// else this call sends an empty statement every third of the lease on the same transaction
/// (its "renewal"), and a body that ran `COMMIT` is noticed and its key sealed at the next beat.
/// A sqlx transaction is the body's alone (`&mut`) while it runs, so nothing can be sent beside
/// it: with [`Sqlx`], the lease is the longest the body may await something other than its own
/// statements (past it, the server ends the transaction, the body's next statement fails, and
/// nothing is committed), and a body that ran `COMMIT` is noticed when it returns.
///
/// **Isolation:** the transaction runs at the level set with
/// [`isolation_level`](Self::isolation_level) (`READ COMMITTED` unless set), whatever the
/// database's default. A serialization failure or deadlock on the claim starts the attempt
/// over in a new transaction (the body has not run); one in the body or at commit rolls the
/// body's writes back with the claim, and the caller gets the error (the body's own, or
/// [`Error::Store`] at commit): a retry runs it again.
///
/// See the [module docs](self) for an example with each backend.
#[must_use = "a transactional call does nothing until `run` is awaited"]
pub struct Transactional<K, B = TokioPostgres> {
    backend: B,
    key: K,
    /// The namespace `name` gave; without one, the call site and the body's type make it.
    name: Option<Cow<'static, str>>,
    site: &'static std::panic::Location<'static>,
    fingerprint: Option<Fingerprint>,
    policy: Policy,
}

impl PostgresStore {
    /// An idempotent call in transactional mode, keyed by `key`: see [`Transactional`]. Its
    /// transaction is on this store's own pool (the body gets a `&tokio_postgres::Transaction`)
    /// unless [`Transactional::sqlx`] hands it the application's `sqlx::PgPool`.
    ///
    /// Until [`Transactional::name`] gives one, the namespace of the key is the one
    /// [`Idempotent::new`](crate::Idempotent::new) gives: the path of the body's type and this
    /// call site (`file:line:column` of the code that calls `transactional`), so two
    /// operations keyed by the same value at two call sites never share a record. That
    /// namespace changes when the code moves: name records that must outlive a deployment. A
    /// body whose type names no single body (a boxed trait object) needs a name:
    /// [`Error::NameRequired`] otherwise.
    #[track_caller]
    pub fn transactional<K: KeyPart>(&self, key: K) -> Transactional<K> {
        Transactional {
            backend: TokioPostgres::new(self.clone(), IsolationLevel::ReadCommitted),
            key,
            name: None,
            site: std::panic::Location::caller(),
            fingerprint: None,
            policy: Policy::new(),
        }
    }
}

impl<K: KeyPart, B> Transactional<K, B> {
    /// The namespace of the key, exactly as given (without it: the call site's, see
    /// [`PostgresStore::transactional`]). Same name and key as an
    /// [`Idempotent`](crate::Idempotent) call → same record.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// How long the result is remembered ([`DEFAULT_TTL`](crate::DEFAULT_TTL) unless set).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = ttl;
        self
    }

    /// How long the transaction of a holder that is no longer polled keeps the key
    /// ([`DEFAULT_LEASE`](crate::DEFAULT_LEASE) unless set), as the executor's lease.
    ///
    /// It is the transaction's `idle_in_transaction_session_timeout` (`SET LOCAL`): a holder
    /// whose process froze (`SIGSTOP`, a paused VM, a partition) or whose future is no longer
    /// polled sends nothing, and once the lease is over the server ends its session, rolling
    /// back its writes and freeing the key for the next caller. With [`TokioPostgres`], a body
    /// that is polled never meets the limit, whatever it awaits (this call sends an empty
    /// statement every third of the lease while the body runs); with [`Sqlx`], it bounds how
    /// long the body may await something other than its own statements (see
    /// [`Transactional`]). Statements that run longer are not idle; the connection's
    /// `statement_timeout` bounds them.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.policy.lease = lease;
        self
    }

    /// What to do while another call holds the key ([`OnConflict::Wait`] unless set).
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.policy.on_conflict = on_conflict;
        self
    }

    /// The longest to wait for another call holding the key
    /// ([`DEFAULT_WAIT_TIMEOUT`](crate::DEFAULT_WAIT_TIMEOUT) unless set).
    pub fn wait_timeout(mut self, wait_timeout: Duration) -> Self {
        self.policy.wait_timeout = wait_timeout;
        self
    }

    /// A value that must match on replay, as [`Idempotent::fingerprint`](crate::Idempotent::fingerprint).
    pub fn fingerprint<F: KeyPart + ?Sized>(mut self, fingerprint: &F) -> Self {
        self.fingerprint = Some(Fingerprint::of(fingerprint));
        self
    }

    /// The same call on another backend.
    #[cfg(feature = "sqlx-postgres")]
    fn with_backend<C>(self, backend: C) -> Transactional<K, C> {
        Transactional {
            backend,
            key: self.key,
            name: self.name,
            site: self.site,
            fingerprint: self.fingerprint,
            policy: self.policy,
        }
    }
}

impl<K: KeyPart> Transactional<K, TokioPostgres> {
    /// The isolation level of the transaction (`READ COMMITTED` unless set, whatever the
    /// database's `default_transaction_isolation`). A serialization failure on the claim is
    /// retried; one in the body or at commit is the caller's error (see [`Transactional`]).
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.backend.isolation = level;
        self
    }

    /// Runs the transaction on the application's own sqlx pool instead of the store's: the body
    /// gets a `&mut sqlx::PgConnection` inside a transaction of that pool (feature
    /// `sqlx-postgres`). The records
    /// table, the waiting and the replays stay the store's; the pool must reach the same
    /// database as the store (the claim and the body's writes commit in one of its
    /// transactions). The isolation level set so far carries over.
    #[cfg(feature = "sqlx-postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sqlx-postgres")))]
    pub fn sqlx(self, pool: &sqlx::PgPool) -> Transactional<K, Sqlx> {
        let backend = Sqlx::new(
            self.backend.store.clone(),
            pool.clone(),
            self.backend.isolation,
        );
        self.with_backend(backend)
    }

    /// Runs `body` in the transaction at most once per key while the record lives, and returns
    /// its value or the first call's. The body is an async closure over the
    /// [`Transaction`](tokio_postgres::Transaction):
    /// `async |tx| { tx.execute(..).await.map_err(Error::store)?; Ok(v) }`.
    pub async fn run<T, E, F>(self, body: F) -> Result<T, E>
    where
        F: for<'t, 'c> AsyncFnOnce(&'t tokio_postgres::Transaction<'c>) -> Result<T, E>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        self.run_with_outcome(body).await.map(|o| o.value)
    }

    /// Like [`run`](Self::run), and also says whether the value was executed or replayed and
    /// how long the record lives.
    pub async fn run_with_outcome<T, E, F>(self, body: F) -> Result<Outcome<T>, E>
    where
        F: for<'t, 'c> AsyncFnOnce(&'t tokio_postgres::Transaction<'c>) -> Result<T, E>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        let name = self.namespace::<F>()?;
        let store = self.backend.store.clone();
        execute(&self.backend, &store, self.call(&name), body).await
    }
}

#[cfg(feature = "sqlx-postgres")]
impl<K: KeyPart> Transactional<K, Sqlx> {
    /// The isolation level of the transaction (`READ COMMITTED` unless set), as with the
    /// store's own pool.
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.backend.isolation = level;
        self
    }

    /// Runs `body` in a transaction of the sqlx pool at most once per key while the record
    /// lives, and returns its value or the first call's. The body is an async closure over the
    /// transaction's connection, `&mut sqlx::PgConnection`:
    /// `async |tx| { sqlx::query(..).execute(&mut *tx).await..; Ok(v) }`.
    ///
    /// The connection is what sqlx's `Executor` takes, so the application's own functions that
    /// run statements on `&mut PgConnection` work inside and outside a transactional call;
    /// savepoints are `tx.begin()` (`sqlx::Connection::begin`, a nested transaction). The
    /// transaction itself is idem's: the body does not commit it (a `COMMIT` sent through the
    /// connection is caught, and the key sealed: see [`Transactional`]). A function that takes
    /// `&mut sqlx::Transaction<'_, Postgres>` is called with a savepoint:
    /// `let mut sp = tx.begin().await?; f(&mut sp).await?; sp.commit().await?`.
    pub async fn run<T, E, F>(self, body: F) -> Result<T, E>
    where
        F: for<'t> AsyncFnOnce(&'t mut sqlx::PgConnection) -> Result<T, E>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        self.run_with_outcome(body).await.map(|o| o.value)
    }

    /// Like [`run`](Self::run), and also says whether the value was executed or replayed and
    /// how long the record lives.
    pub async fn run_with_outcome<T, E, F>(self, body: F) -> Result<Outcome<T>, E>
    where
        F: for<'t> AsyncFnOnce(&'t mut sqlx::PgConnection) -> Result<T, E>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        let name = self.namespace::<F>()?;
        let store = self.backend.store().clone();
        execute(&self.backend, &store, self.call(&name), body).await
    }
}

impl<K: KeyPart, B> Transactional<K, B> {
    /// The namespace: the given name, or the executor's (the body's type and the call site).
    /// A body type that names no single body (a boxed trait object) would share its records
    /// with every other such body at this call site: `Error::NameRequired`, as for
    /// `Idempotent`.
    fn namespace<F>(&self) -> Result<Cow<'static, str>, Error> {
        Ok(match &self.name {
            Some(name) => name.clone(),
            None => Cow::Owned(call_site_namespace::<F>(self.site)?),
        })
    }

    fn call<'a>(&'a self, name: &'a str) -> Call<'a> {
        Call {
            name,
            key: Key::new(name, &self.key),
            fingerprint: self.fingerprint,
            policy: &self.policy,
        }
    }
}

/// Emits the one `tracing` event of a transactional call, as the executor's `outcome!` does.
macro_rules! tx_outcome {
    ($level:ident, $call:expr, $outcome:expr $(, $($rest:tt)*)?) => {
        outcome!($level, $call, $outcome, transactional = true $(, $($rest)*)?)
    };
}

/// How one attempt of a transactional call ended.
enum Attempt<T, E> {
    Done(Result<Outcome<T>, E>),
    Busy(Duration),
    /// Nothing was written and the body did not run; start over.
    Again,
    /// The key's lock was held by another session and no live record was visible (see
    /// [`TxClaim::Gated`]): start over after a short pause.
    Gated,
}

/// The transactional flow over `backend`, waiting through `store` (whose records the backend
/// writes).
async fn execute<B, S, T, E, F>(
    backend: &B,
    store: &S,
    call: Call<'_>,
    body: F,
) -> Result<Outcome<T>, E>
where
    B: TransactionBackend,
    S: Store + ?Sized,
    F: for<'t> AsyncFnOnce(B::Handle<'t>) -> Result<T, E>,
    T: Serialize + DeserializeOwned + Send + 'static,
    E: From<Error>,
{
    let panicked = AtomicBool::new(false);
    let body_ok = AtomicBool::new(false);
    let mut report = Unreported {
        call: &call,
        panicked: &panicked,
        body_ok: &body_ok,
        armed: true,
    };
    let policy = call.policy.bounded();
    let mut deadline: Option<Instant> = None;
    let mut waited = false;
    let mut again = 0;
    let mut gated = GATED_PAUSES.iter();
    let mut body = Some(body);
    loop {
        let attempt = attempt(backend, &call, &policy, waited, &mut body, &panicked).await;
        let lease_left = match attempt {
            Attempt::Done(result) => {
                report.reported();
                return result;
            }
            Attempt::Again if again < AGAIN_ATTEMPTS => {
                again += 1;
                continue;
            }
            // Kept racing with other writers of the key: treat it as busy.
            Attempt::Again => BUSY_HINT.min(policy.lease),
            Attempt::Gated => match gated.next() {
                Some(&pause) => {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                None => BUSY_HINT.min(policy.lease),
            },
            Attempt::Busy(lease_left) => lease_left,
        };
        again = 0;
        match wait_turn(store, call.key, &policy, &mut deadline).await {
            Turn::ClaimAgain => waited = true,
            Turn::Rejected => {
                report.reported();
                tx_outcome!(INFO, call, "rejected", waited);
                return Err(Error::InProgress {
                    retry_after: lease_left,
                }
                .into());
            }
            Turn::Failed(err) => {
                report.reported();
                tx_outcome!(WARN, call, "store_error", error = %err, step = "wait");
                return Err(err.into());
            }
        }
    }
}

/// One attempt: a connection, a transaction, the claim in it, then replay, busy, or the body and
/// the commit; then the connection is given back (or closed) and, after a rollback, the key's
/// waiters are woken.
async fn attempt<B, T, E, F>(
    backend: &B,
    call: &Call<'_>,
    policy: &Policy,
    waited: bool,
    body: &mut Option<F>,
    panicked: &AtomicBool,
) -> Attempt<T, E>
where
    B: TransactionBackend,
    F: for<'t> AsyncFnOnce(B::Handle<'t>) -> Result<T, E>,
    T: Serialize + DeserializeOwned + Send + 'static,
    E: From<Error>,
{
    let tx_call = TxCall::new(
        call.key,
        Token::generate(),
        call.fingerprint,
        policy.lease,
        policy.ttl,
    );
    let conn = backend.connect().await;
    let mut conn = match conn {
        Ok(conn) => conn,
        Err(err) => {
            tx_outcome!(WARN, call, "store_error", error = %err, step = "begin");
            return Attempt::Done(Err(err.into()));
        }
    };
    let attempt = in_transaction(backend, &mut conn, call, &tx_call, waited, body, panicked).await;
    let wake = matches!(attempt, Attempt::Done(Err(_)));
    backend.finish(conn, &tx_call, wake).await;
    attempt
}

/// [`attempt`] on a connection.
async fn in_transaction<B, T, E, F>(
    backend: &B,
    conn: &mut B::Connection,
    call: &Call<'_>,
    tx_call: &TxCall,
    waited: bool,
    body: &mut Option<F>,
    panicked: &AtomicBool,
) -> Attempt<T, E>
where
    B: TransactionBackend,
    F: for<'t> AsyncFnOnce(B::Handle<'t>) -> Result<T, E>,
    T: Serialize + DeserializeOwned + Send + 'static,
    E: From<Error>,
{
    let fail = |step: &'static str, err: Error| {
        tx_outcome!(WARN, call, "store_error", error = %err, step);
        Attempt::Done(Err(err.into()))
    };
    let mut tx = match backend.begin(conn, tx_call).await {
        Ok(tx) => tx,
        Err(err) => return fail("begin", err),
    };
    let claim = match backend.claim(&mut tx, tx_call).await {
        Ok(TxClaim::Claim(claim)) => claim,
        Ok(TxClaim::Again) => {
            backend.rollback(tx).await;
            return Attempt::Again;
        }
        Ok(TxClaim::Gated) => {
            backend.rollback(tx).await;
            return Attempt::Gated;
        }
        Err(err) => {
            backend.rollback(tx).await;
            return fail("claim", err);
        }
    };
    let done = match claim {
        Claim::Acquired(_) => None,
        Claim::Busy { lease_left } => Some(Attempt::Busy(lease_left)),
        Claim::Completed(done) => Some(
            if !fingerprint_matches(call.fingerprint, done.fingerprint) {
                tx_outcome!(INFO, call, "key_reused");
                Attempt::Done(Err(Error::KeyReused.into()))
            } else {
                match decode_result::<T>(&done.value) {
                    Ok(value) => {
                        let status = Status::replay(waited);
                        tx_outcome!(DEBUG, call, status.as_str());
                        Attempt::Done(Ok(Outcome {
                            value,
                            status,
                            expires_in: Some(done.expires_in),
                        }))
                    }
                    Err(err) => fail("decode", err),
                }
            },
        ),
    };
    if let Some(done) = done {
        // Nothing was written; the rollback also clears a lock-timeout error.
        backend.rollback(tx).await;
        return done;
    }
    let Some(body) = body.take() else {
        // Unreachable: a body runs at most once, and an attempt that ran it returns.
        backend.rollback(tx).await;
        return fail("claim", Error::store(AlreadyRun));
    };

    let started = metrics::start();
    let result = {
        let (handle, keep_alive) = backend.lend(&mut tx, tx_call);
        // Steps run, and are checked, but are not recorded: in a transaction a record would
        // commit with the result that deletes it, or roll back with the body's writes.
        let steps = super::step::StepCx::new(super::step::Recording::Transaction);
        let body = super::step::CURRENT.scope(steps, catch_panics(body(handle), panicked));
        beside(body, keep_alive).await
    };
    metrics::body(call.name, started);
    let value = match result {
        Ok(value) => value,
        Err(err) => {
            // Not memoized: the writes and the claim go away together, if the transaction is
            // still the call's own.
            match backend.still_ours(&mut tx, tx_call).await {
                TxState::Ours => {}
                TxState::EndedByBody => {
                    tracing::error!(
                        target: "idem", key = %call.key, error = %BodyEndedTransaction,
                        "a failed transactional body"
                    );
                    backend.seal(tx_call).await;
                }
                TxState::Lost => {
                    tracing::warn!(
                        target: "idem", key = %call.key,
                        "a failed transactional body lost its transaction's connection (the \
                         lease ran out while it sent nothing, or the server or network failed): \
                         the server rolled the transaction back unless the body committed it"
                    );
                    // Sealed only if the claim committed (the body ran COMMIT before).
                    backend.seal(tx_call).await;
                }
            }
            backend.rollback(tx).await;
            tx_outcome!(DEBUG, call, "executed", failed = true);
            return Attempt::Done(Err(err));
        }
    };
    let encoded = match codec::to_vec(&value) {
        Ok(bytes) => bytes,
        Err(err) => {
            backend.rollback(tx).await;
            return fail("encode", err);
        }
    };
    match backend.complete(&mut tx, tx_call, &encoded).await {
        Ok(TxCompletion::Stored) => {}
        Ok(TxCompletion::EndedByBody(err)) => {
            // The body ran COMMIT or ROLLBACK: nothing was written by the completion, and the
            // connection's state is the body's.
            tx_outcome!(ERROR, call, "store_error", error = %err, step = "complete");
            backend.rollback(tx).await;
            backend.seal(tx_call).await;
            return Attempt::Done(Err(err.into()));
        }
        Err(err) => {
            backend.rollback(tx).await;
            return fail("complete", err);
        }
    }
    if let Err(err) = backend.commit(tx).await {
        return fail("commit", err);
    }
    tx_outcome!(DEBUG, call, "executed");
    Attempt::Done(Ok(Outcome {
        value,
        status: Status::Executed,
        expires_in: Some(tx_call.ttl),
    }))
}

/// `body`, with `beside` polled too until it finishes or the body returns.
async fn beside<F: Future, K: Future<Output = ()>>(body: F, beside: K) -> F::Output {
    tokio::pin!(body);
    tokio::select! {
        biased;
        out = &mut body => return out,
        () = beside => {}
    }
    body.await
}

/// A body asked to run twice (never happens: an attempt that ran it returns).
#[derive(Debug)]
struct AlreadyRun;

impl std::fmt::Display for AlreadyRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the transactional body was already run")
    }
}

impl std::error::Error for AlreadyRun {}
