//! The seam of the transactional mode: a backend in which a call's claim, its body's own writes
//! and its completed record commit in one database transaction.
//!
//! The executor runs the flow (namespace, claim, wait, replay, fingerprint check, decode and
//! encode, the one `tracing` event of each call); a [`TransactionBackend`] only opens, uses and
//! ends transactions. idem has two: the [`PostgresStore`](crate::PostgresStore)'s own
//! tokio-postgres pool ([`TokioPostgres`](crate::store::postgres::TokioPostgres)) and, with the
//! `sqlx-postgres` feature, the user's `sqlx::PgPool`
//! ([`Sqlx`](crate::store::postgres::Sqlx)). Users never name this trait: they call
//! `PostgresStore::transactional`.
//!
//! One attempt of a call, as the executor drives it:
//!
//! 1. [`connect`](TransactionBackend::connect), [`begin`](TransactionBackend::begin) (the
//!    transaction's idle time bounded by the lease, and marked as the call's own),
//!    [`claim`](TransactionBackend::claim) in it.
//! 2. Not granted → [`rollback`](TransactionBackend::rollback); replay, wait or claim again.
//! 3. Granted → the body, on the transaction [lent](TransactionBackend::lend) to it (the
//!    backend keeps the transaction alive while the body awaits something else, where it can), then
//!    [`complete`](TransactionBackend::complete) and [`commit`](TransactionBackend::commit); or,
//!    for a failed body, [`still_ours`](TransactionBackend::still_ours),
//!    [`seal`](TransactionBackend::seal) if the body ended the transaction itself, and
//!    [`rollback`](TransactionBackend::rollback).
//! 4. [`finish`](TransactionBackend::finish): wake the key's waiters after a rollback, give the
//!    connection back or close it.

use std::future::Future;
use std::time::Duration;

use super::BoxFuture;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Token};

/// The time left reported with a busy key whose holder is a claim still in flight (its lease
/// is not visible yet): shared by the PostgreSQL claim and the transactional executor.
pub(crate) const BUSY_HINT: Duration = Duration::from_secs(1);

/// The pauses of a claim that found the key's lock taken and no live record (see
/// [`TxClaim::Gated`]) before it treats the key as busy: about a quarter of a second in all,
/// longer than a cleanup batch holds its key locks on a loaded server. Shared by the PostgreSQL
/// claim and the transactional executor.
pub(crate) const GATED_PAUSES: [Duration; 7] = [
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
    Duration::from_millis(128),
];

/// One transactional call's claim, as the executor hands it to its backend.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct TxCall {
    /// The key's digest.
    pub key: Key,
    /// This attempt's fencing token.
    pub token: Token,
    /// The call's fingerprint, if it gave one.
    pub fingerprint: Option<Fingerprint>,
    /// How long the transaction of a holder that is no longer polled keeps the key.
    pub lease: Duration,
    /// How long the completed record lives.
    pub ttl: Duration,
}

impl TxCall {
    /// A call's claim (the executor makes these; a backend's own tests may too).
    pub fn new(
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
        ttl: Duration,
    ) -> TxCall {
        TxCall {
            key,
            token,
            fingerprint,
            lease,
            ttl,
        }
    }

    /// The marker of this attempt's transaction: the token in 32 hex digits. A backend sets
    /// it transaction-locally at [`begin`](TransactionBackend::begin) and checks it in
    /// [`still_ours`](TransactionBackend::still_ours) and
    /// [`complete`](TransactionBackend::complete), so a body that ended the transaction itself
    /// is told apart from one that did not.
    pub fn marker(&self) -> String {
        format!("{:032x}", self.token.as_u128())
    }
}

/// Whether a transaction is still a call's own, once its body failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxState {
    /// Still the call's own (an aborted transaction is): the rollback ends it.
    Ours,
    /// The body ended it itself (`COMMIT`, `ROLLBACK`, `END`): what it wrote may have
    /// committed, claim included, so the executor [seals](TransactionBackend::seal) the key.
    EndedByBody,
    /// The question could not be asked: the connection failed or the server ended the session
    /// (the lease ran out while the body was not sending, a shutdown, a network failure). The
    /// server rolled the transaction back unless the body had committed it first, which the
    /// executor's [seal](TransactionBackend::seal) finds out.
    Lost,
}

/// What a claim made inside the transaction answered.
#[derive(Debug)]
#[non_exhaustive]
pub enum TxClaim {
    /// The store's answer: granted (the key is held until the transaction ends), completed, or
    /// busy.
    Claim(Claim),
    /// Nothing was written and no body ran (a serialization failure, a deadlock, a row committed
    /// after the statement's snapshot): roll back and start over in a new transaction.
    Again,
    /// No live record, and the key's lock held by another session: a statement that holds it for
    /// a moment (a cleanup batch deleting the key's expired record, a completion) or a claim not
    /// committed yet. Nothing was written: the executor rolls back, pauses briefly and starts
    /// over (a few times, about a quarter of a second in all) before it treats the key as busy,
    /// so that a caller that does not wait is not refused a key nobody holds.
    Gated,
}

/// What completing the claim inside the transaction did.
#[derive(Debug)]
#[non_exhaustive]
pub enum TxCompletion {
    /// The record is written in the transaction; it becomes visible at commit.
    Stored,
    /// The transaction is no longer the call's: the body ended it (`COMMIT`, `ROLLBACK`). The
    /// error says so; the executor [seals](TransactionBackend::seal) the key and returns it.
    EndedByBody(Error),
}

/// A database in which a call's claim, its body's writes and its completed record commit in one
/// transaction: what the executor's transactional mode runs over (see the
/// [module docs](self)).
///
/// Every method reports the backend's own failures as [`Error::Store`] and never panics on what
/// the server returns. A method that times out, or that leaves the connection in a state it
/// cannot vouch for, marks the connection so that [`finish`](Self::finish) closes it rather
/// than hand it to the next caller.
///
/// The trait is not object safe (the executor is generic over it, and over the body). Its
/// futures carry no `Send` bound: for a concrete backend the compiler sees whether they are, so
/// a call is `Send` (for `tokio::spawn`, for an axum handler) when the backend's futures and the
/// body's are. One caveat for implementers: inside a spawned call rustc erases the lifetimes
/// of what the executor holds across an await (rust-lang/rust#100013), and a driver future whose
/// type carries outlives bounds between two lifetimes (sqlx's `'c: 'e`) can then no longer be
/// proven `Send`. Await such futures boxed (`Pin<Box<dyn Future + Send + '_>>`, made where the
/// lifetimes are known), as the sqlx backend does; the keep-alive of [`lend`](Self::lend) is a
/// [`BoxFuture`] for the same reason.
pub trait TransactionBackend {
    /// A connection taken for one attempt.
    type Connection;
    /// A transaction open on a connection.
    type Transaction<'c>
    where
        Self: 'c;
    /// What the body receives, for as long as it runs: the transaction, as the driver's users
    /// know it. One lifetime, so that bodies are `for<'t> AsyncFnOnce(Self::Handle<'t>)`.
    type Handle<'t>
    where
        Self: 't;

    /// Takes a connection (from a pool), within the backend's timeout.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, Error>>;

    /// Begins a transaction on `conn`. Before the key is claimed in it (here, or pipelined with
    /// the claim), the transaction's idle time is bounded by `call.lease` (a holder that is no
    /// longer polled has its transaction ended by the server, which frees the key) and the
    /// transaction is marked as the call's own ([`TxCall::marker`]), both transaction-locally.
    fn begin<'c>(
        &'c self,
        conn: &'c mut Self::Connection,
        call: &TxCall,
    ) -> impl Future<Output = Result<Self::Transaction<'c>, Error>>;

    /// Claims `call.key` with `call.token` inside the transaction: the store's claim, whose key
    /// lock is held until the transaction ends. A claim that cannot write (a table lock, a
    /// read-only server) may still answer a completed record read outside the transaction.
    fn claim<'c>(
        &'c self,
        tx: &mut Self::Transaction<'c>,
        call: &TxCall,
    ) -> impl Future<Output = Result<TxClaim, Error>>;

    /// Lends the transaction to the body: the handle the body receives, and a future that the
    /// executor polls beside the body until the body returns (it may finish earlier, or never).
    /// A backend that can reach the transaction while the body holds it keeps it from looking
    /// idle with that future (the lease) while the body awaits something else, and
    /// [seals](Self::seal) the key as soon as it finds the transaction is no longer the call's;
    /// one that cannot returns a future that finishes at once.
    fn lend<'t, 'c: 't>(
        &'t self,
        tx: &'t mut Self::Transaction<'c>,
        call: &'t TxCall,
    ) -> (Self::Handle<'t>, BoxFuture<'t, ()>);

    /// After a failed body: whether the transaction is still the call's own (an aborted
    /// transaction is), the body ended it, or its connection was lost (in the last two cases
    /// the connection is closed at [`finish`](Self::finish)).
    fn still_ours<'c>(
        &'c self,
        tx: &mut Self::Transaction<'c>,
        call: &TxCall,
    ) -> impl Future<Output = TxState>;

    /// Completes the claim with `value` inside the transaction, if the transaction is still the
    /// call's own.
    fn complete<'c>(
        &'c self,
        tx: &mut Self::Transaction<'c>,
        call: &TxCall,
        value: &[u8],
    ) -> impl Future<Output = Result<TxCompletion, Error>>;

    /// Commits, and checks that the body left no state on the session (a `SET` without
    /// `LOCAL`, `SET ROLE`): a connection with some is closed at [`finish`](Self::finish).
    fn commit<'c>(&'c self, tx: Self::Transaction<'c>) -> impl Future<Output = Result<(), Error>>;

    /// Rolls back (best effort: a connection whose rollback fails is closed).
    fn rollback<'c>(&'c self, tx: Self::Transaction<'c>) -> impl Future<Output = ()>;

    /// After a body ended the transaction itself: if the claim committed with it (and so,
    /// maybe, the body's writes), replaces it with a record saying so, so the body never runs
    /// again while it lives; if it rolled back, leaves the key free. Best effort, outside the
    /// call's transaction.
    fn seal(&self, call: &TxCall) -> impl Future<Output = ()>;

    /// Ends the attempt: with `wake` (its transaction rolled back, which notifies no one), wakes
    /// the key's waiters; gives the connection back, or closes it if it was marked.
    fn finish(&self, conn: Self::Connection, call: &TxCall, wake: bool)
    -> impl Future<Output = ()>;
}

/// A transactional body that ended the transaction the call opened (it sent `COMMIT`,
/// `ROLLBACK` or `END` through it).
#[derive(Debug)]
pub(crate) struct BodyEndedTransaction;

impl std::fmt::Display for BodyEndedTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the transactional body ended the transaction idem opened (it ran COMMIT, ROLLBACK \
             or END): its result was not stored. If its writes committed, so did the claim, and \
             the key is sealed with this error (the body does not run again while the record \
             lives); if they rolled back, a retry runs the body again. Never end the \
             transaction in the body: use a savepoint to undo part of it, or return `Err` to \
             roll it all back",
        )
    }
}

impl std::error::Error for BodyEndedTransaction {}
