//! The transactional mode on the application's own sqlx pool (feature `sqlx-postgres`).

use std::future::Future;

use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres, Row as _};
use tokio_postgres::IsolationLevel;

use super::{
    BodyEndedTransaction, Corrupt, POOLER_RESET, PostgresStore, SESSION_BASE, SESSION_LEAKED,
    claim_from_columns, idle_limit_ms, micros, token_bytes,
};
use crate::error::Error;
use crate::store::BoxFuture;
use crate::store::transaction::{TransactionBackend, TxCall, TxClaim, TxCompletion, TxState};

/// The transactional mode's backend on the application's own `sqlx::PgPool` (feature
/// `sqlx-postgres`): the body gets a `&mut sqlx::PgConnection` inside a transaction of that
/// pool, and the claim and the completed record are written in it to the [`PostgresStore`]'s
/// table. Made by `Transactional::sqlx`; users do not name it, except in the type of a
/// `Transactional` they keep.
#[derive(Clone, Debug)]
pub struct Sqlx {
    pub(crate) store: PostgresStore,
    pool: PgPool,
    pub(crate) isolation: IsolationLevel,
}

impl Sqlx {
    pub(crate) fn new(store: PostgresStore, pool: PgPool, isolation: IsolationLevel) -> Sqlx {
        Sqlx {
            store,
            pool,
            isolation,
        }
    }

    /// The store whose records the transactions write.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// The pool whose transactions the bodies run in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// `fut`, boxed as a `Send` future: what every sqlx statement of this backend is awaited as.
/// sqlx's futures carry outlives bounds between their lifetimes (`'c: 'e`, `'q: 'e`); inside
/// the future of a spawned call, where rustc erases those lifetimes (rust-lang/rust#100013),
/// `Send` could not be proven for them ("implementation of `Send` is not general enough").
/// Boxed here, `Send` is proven where the lifetimes are known, and the call's future is `Send`
/// for `tokio::spawn` and axum. One allocation per statement, beside a round trip.
fn boxed<'a, T>(fut: impl Future<Output = T> + Send + 'a) -> BoxFuture<'a, T> {
    Box::pin(fut)
}

/// What an attempt must do with its connection when it ends.
#[derive(Default)]
pub struct Settle {
    /// Close it rather than give it back: a statement timed out, or the body ended the
    /// transaction.
    close: bool,
    /// Committed: check that the body left no state on the session before giving it back.
    check: bool,
    /// From `BEGIN` until [`finish`](TransactionBackend::finish) is done with the connection:
    /// if the attempt's future is dropped meanwhile (the caller was cancelled), the connection
    /// is closed, not given back to the application's pool. A `BEGIN` still in flight leaves
    /// nothing for sqlx to roll back (its transaction depth counts only answered `BEGIN`s),
    /// and a body cut off may have left state on the session.
    open: bool,
}

/// A connection of the sqlx pool, for one attempt.
pub struct SqlxConnection {
    conn: PoolConnection<Postgres>,
    settle: Settle,
}

impl Drop for SqlxConnection {
    fn drop(&mut self) {
        if self.settle.close || self.settle.open {
            self.conn.close_on_drop();
        }
    }
}

/// A transaction of one attempt, on a [`SqlxConnection`].
pub struct SqlxTransaction<'c> {
    tx: sqlx::Transaction<'c, Postgres>,
    settle: &'c mut Settle,
}

/// The SQLSTATE of a database error.
fn code(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// `BEGIN`'s isolation clause.
fn isolation(level: IsolationLevel) -> &'static str {
    match level {
        IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
        IsolationLevel::RepeatableRead => "REPEATABLE READ",
        IsolationLevel::Serializable => "SERIALIZABLE",
        _ => "READ COMMITTED",
    }
}

impl Sqlx {
    /// `fut` within the store's timeout; past it, the connection is closed at the end of the
    /// attempt (it may still be busy with the statement).
    async fn timed<T>(
        &self,
        op: &'static str,
        settle: &mut Settle,
        fut: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.store.inner.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(Error::store(err)),
            Err(_) => {
                settle.close = true;
                Err(self.store.timed_out(op))
            }
        }
    }
}

impl TransactionBackend for Sqlx {
    type Connection = SqlxConnection;
    type Transaction<'c> = SqlxTransaction<'c>;
    type Handle<'t> = &'t mut PgConnection;

    async fn connect(&self) -> Result<SqlxConnection, Error> {
        self.store.ready().await?;
        let mut settle = Settle::default();
        let conn = self
            .timed("transaction", &mut settle, self.pool.acquire())
            .await?;
        Ok(SqlxConnection { conn, settle })
    }

    async fn begin<'c>(
        &'c self,
        conn: &'c mut SqlxConnection,
        call: &TxCall,
    ) -> Result<SqlxTransaction<'c>, Error> {
        let SqlxConnection { conn, settle } = conn;
        // The lease bounds how long the transaction may sit idle (a holder that stops sending
        // has its transaction ended by the server, which frees the key), and the marker tells
        // the call's transaction apart; both `SET LOCAL`, sent with `BEGIN` in one message.
        // Before them, the digest of the session's state, to tell after the commit what the
        // body left on it (see `SESSION_BASE`).
        let begin = format!(
            "BEGIN ISOLATION LEVEL {}; {SESSION_BASE}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; SET LOCAL idem.tx = '{}'",
            isolation(self.isolation),
            idle_limit_ms(call.lease),
            call.marker()
        );
        let limit = self.store.inner.timeout;
        settle.open = true;
        match tokio::time::timeout(limit, conn.begin_with(begin)).await {
            Ok(Ok(tx)) => Ok(SqlxTransaction { tx, settle }),
            Ok(Err(err)) => Err(Error::store(err)),
            Err(_) => {
                settle.close = true;
                Err(self.store.timed_out("begin"))
            }
        }
    }

    async fn claim<'c>(
        &'c self,
        tx: &mut SqlxTransaction<'c>,
        call: &TxCall,
    ) -> Result<TxClaim, Error> {
        let store = &self.store;
        let token_bytes = token_bytes(call.token);
        let fingerprint = call.fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let claimed = sqlx::query(&store.inner.sql.claim)
            .bind(&call.key.as_bytes()[..])
            .bind(&token_bytes[..])
            .bind(fingerprint)
            .bind(micros(call.lease))
            .bind(store.lock_id(call.key))
            .persistent(store.inner.prepared)
            .fetch_optional(&mut *tx.tx);
        let claimed = boxed(claimed);
        let row = match tokio::time::timeout(store.inner.timeout, claimed).await {
            Ok(Ok(row)) => row,
            Ok(Err(err)) => {
                return match code(&err).as_deref() {
                    // A lock on the table itself: replay a completed record read outside.
                    Some("55P03") => Ok(TxClaim::Claim(
                        store
                            .replay_read_only(call.key, call.token, call.lease)
                            .await,
                    )),
                    Some("25006") => {
                        match store.read_completed(call.key, call.token, call.lease).await {
                            Some(completed) => Ok(TxClaim::Claim(completed)),
                            None => Err(Error::store(err)),
                        }
                    }
                    Some("40001" | "40P01") => Ok(TxClaim::Again),
                    _ => Err(Error::store(err)),
                };
            }
            Err(_) => {
                tx.settle.close = true;
                return Err(store.timed_out("claim"));
            }
        };
        // No row: a conflicting row was committed after the statement's snapshot.
        let Some(row) = row else {
            return Ok(TxClaim::Again);
        };
        let state: i16 = row.try_get(0).map_err(Error::store)?;
        if state == 2 {
            // Another session holds the key lock and no live row is visible.
            return Ok(TxClaim::Gated);
        }
        let value: Option<Vec<u8>> = row.try_get(1).map_err(Error::store)?;
        let stored: Option<Vec<u8>> = row.try_get(2).map_err(Error::store)?;
        let left: Option<i64> = row.try_get(3).map_err(Error::store)?;
        let (claim, _) = claim_from_columns(state, value, stored, left, call.token, call.lease)?;
        Ok(TxClaim::Claim(claim))
    }

    fn lend<'t, 'c: 't>(
        &'t self,
        tx: &'t mut SqlxTransaction<'c>,
        _call: &'t TxCall,
    ) -> (&'t mut PgConnection, BoxFuture<'t, ()>) {
        // The body holds the connection (`&mut`) while it runs: nothing can be sent beside it,
        // so there is no heartbeat (see `Transactional`), and a body that ended the transaction
        // is noticed when it returns.
        (&mut *tx.tx, Box::pin(std::future::ready(())))
    }

    async fn still_ours<'c>(&'c self, tx: &mut SqlxTransaction<'c>, call: &TxCall) -> TxState {
        let marker = call.marker();
        let checked = sqlx::query_scalar::<_, bool>(
            "SELECT pg_catalog.current_setting('idem.tx', true) IS NOT DISTINCT FROM $1",
        )
        .bind(&marker)
        .persistent(self.store.inner.prepared)
        .fetch_one(&mut *tx.tx);
        let checked = boxed(checked);
        let state = match tokio::time::timeout(self.store.inner.timeout, checked).await {
            Ok(Ok(true)) => TxState::Ours,
            Ok(Ok(false)) => TxState::EndedByBody,
            // A statement of the body failed: the transaction is still open (aborted), and the
            // rollback ends it.
            Ok(Err(err)) if code(&err).as_deref() == Some("25P02") => TxState::Ours,
            Ok(Err(_)) | Err(_) => TxState::Lost,
        };
        if state != TxState::Ours {
            // A connection whose transaction the body ended may carry anything; a lost one is
            // of no use.
            tx.settle.close = true;
        }
        state
    }

    async fn complete<'c>(
        &'c self,
        tx: &mut SqlxTransaction<'c>,
        call: &TxCall,
        value: &[u8],
    ) -> Result<TxCompletion, Error> {
        let store = &self.store;
        let token_bytes = token_bytes(call.token);
        let fingerprint = call.fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let marker = call.marker();
        let completed = sqlx::query(&store.inner.sql.complete_tx)
            .bind(&call.key.as_bytes()[..])
            .bind(&token_bytes[..])
            .bind(value)
            .bind(micros(call.ttl))
            .bind(store.lock_id(call.key))
            .bind(fingerprint)
            .bind(&marker)
            .persistent(store.inner.prepared)
            .fetch_one(&mut *tx.tx);
        let completed = boxed(completed);
        let row = self.timed("complete", tx.settle, completed).await?;
        let free: Option<bool> = row.try_get(0).map_err(Error::store)?;
        let written: i64 = row.try_get(1).map_err(Error::store)?;
        match (free, written) {
            (Some(true), 1) => Ok(TxCompletion::Stored),
            (None, _) => {
                // The body ran COMMIT or ROLLBACK: nothing was written by this statement, and
                // the connection's state is the body's.
                tx.settle.close = true;
                Ok(TxCompletion::EndedByBody(Error::store(
                    BodyEndedTransaction,
                )))
            }
            _ => Err(Error::store(Corrupt(
                "the claim vanished inside its own transaction",
            ))),
        }
    }

    async fn commit<'c>(&'c self, tx: SqlxTransaction<'c>) -> Result<(), Error> {
        let SqlxTransaction { mut tx, settle } = tx;
        if !self.store.inner.prepared {
            // Behind a transaction pooler the session is the pooler's server connection, which
            // only a statement of this transaction reaches: undo what the body may have left on
            // it (a `SET` without `LOCAL`, `SET ROLE`, `SET SESSION AUTHORIZATION`) before the
            // commit: one statement each (the extended protocol takes one at a time).
            for statement in POOLER_RESET {
                let conn: &mut PgConnection = &mut tx;
                let reset = boxed(sqlx::query(statement).persistent(false).execute(conn));
                self.timed("commit", settle, reset).await?;
            }
        }
        self.timed("commit", settle, boxed(tx.commit())).await?;
        // What the body may have left on the session is checked before the connection goes
        // back to the pool (`finish`).
        settle.check = self.store.inner.prepared;
        self.store.granted();
        Ok(())
    }

    async fn rollback<'c>(&'c self, tx: SqlxTransaction<'c>) {
        let SqlxTransaction { tx, settle } = tx;
        if settle.close {
            // The connection is closed anyway (it may still be busy with a statement that
            // timed out): the server discards the transaction with it.
            return;
        }
        match tokio::time::timeout(self.store.inner.timeout, boxed(tx.rollback())).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(
                    target: "idem", error = %err,
                    "a transactional call's rollback failed; its connection is closed, which \
                     discards the transaction"
                );
                settle.close = true;
            }
            Err(_) => settle.close = true,
        }
    }

    async fn seal(&self, call: &TxCall) {
        self.store
            .seal_ended(call.key, call.token, call.fingerprint, call.ttl)
            .await;
    }

    async fn finish(&self, conn: SqlxConnection, call: &TxCall, wake: bool) {
        let mut conn = conn;
        let SqlxConnection {
            conn: pooled,
            settle,
        } = &mut conn;
        let limit = self.store.inner.timeout;
        if !settle.close && settle.check {
            // What the body left on the session (a `SET` without `LOCAL`, `SET ROLE`, a
            // `LISTEN`, ...; compared with the state at `BEGIN`, so what the pool's
            // `after_connect` sets does not count) must not reach the pool's next user: such a
            // connection is closed.
            let leaked = sqlx::query_scalar::<_, bool>(SESSION_LEAKED)
                .persistent(true)
                .fetch_one(&mut **pooled);
            let leaked = boxed(leaked);
            settle.close = !matches!(tokio::time::timeout(limit, leaked).await, Ok(Ok(false)));
        }
        if settle.close {
            // Closed when `conn` is dropped.
            return;
        }
        if wake {
            // The transaction rolled back: if it held the key, the key is free again, and a
            // rollback notifies no one. Wake the key's waiters (only if there are any); best
            // effort, they also poll.
            let woken = sqlx::query(&self.store.inner.sql.wake)
                .bind(&call.key.as_bytes()[..])
                .persistent(self.store.inner.prepared)
                .execute(&mut **pooled);
            let woken = boxed(woken);
            if !matches!(tokio::time::timeout(limit, woken).await, Ok(Ok(_))) {
                settle.close = true;
            }
        }
        // Given back to the pool when `conn` is dropped, unless closed above.
        settle.open = false;
    }
}
