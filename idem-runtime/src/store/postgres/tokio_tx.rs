//! The transactional mode on the store's own pool: tokio-postgres transactions.

use std::sync::Arc;

use deadpool_postgres::{Object, StatementCache};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{IsolationLevel, SimpleQueryMessage, Transaction};

use super::{
    Answer, BodyEndedTransaction, Corrupt, On, POOLER_RESET, Params, PostgresStore, SESSION_BASE,
    SESSION_LEAKED, heartbeat, idle_limit_ms, is_conflict, micros, read_claim, read_free,
    read_gated, run, still_ours, token_bytes,
};
use crate::error::Error;
use crate::store::BoxFuture;
use crate::store::transaction::{TransactionBackend, TxCall, TxClaim, TxCompletion, TxState};

/// The transactional mode's backend on the store's own tokio-postgres pool: the body gets a
/// `&tokio_postgres::Transaction`. What [`PostgresStore::transactional`] uses unless told
/// otherwise; users do not name it, except in the type of a `Transactional` they keep.
#[derive(Clone, Debug)]
pub struct TokioPostgres {
    pub(crate) store: PostgresStore,
    pub(crate) isolation: IsolationLevel,
}

impl TokioPostgres {
    pub(crate) fn new(store: PostgresStore, isolation: IsolationLevel) -> TokioPostgres {
        TokioPostgres { store, isolation }
    }

    /// The store whose records the transactions write.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }
}

/// A pooled connection of one attempt, and whether to close it rather than give it back.
pub struct PooledConnection {
    conn: Object,
    close: bool,
}

/// A transaction of one attempt, on a [`PooledConnection`].
pub struct PooledTransaction<'c> {
    tx: Transaction<'c>,
    /// The connection's statement cache, usable while the transaction borrows the connection.
    cache: Arc<StatementCache>,
    close: &'c mut bool,
}

impl TransactionBackend for TokioPostgres {
    type Connection = PooledConnection;
    type Transaction<'c> = PooledTransaction<'c>;
    type Handle<'t> = &'t Transaction<'t>;

    async fn connect(&self) -> Result<PooledConnection, Error> {
        self.store.ready().await?;
        let conn = self.store.connection("transaction").await?;
        Ok(PooledConnection { conn, close: false })
    }

    async fn begin<'c>(
        &'c self,
        conn: &'c mut PooledConnection,
        _call: &TxCall,
    ) -> Result<PooledTransaction<'c>, Error> {
        let store = &self.store;
        let PooledConnection { conn, close } = conn;
        let cache = Arc::clone(&conn.statement_cache);
        let begun = tokio::time::timeout(
            store.inner.timeout,
            tokio_postgres::Client::build_transaction(conn)
                .isolation_level(self.isolation)
                .start(),
        )
        .await;
        match begun {
            Ok(Ok(tx)) => Ok(PooledTransaction { tx, cache, close }),
            Ok(Err(err)) => Err(store.db_error("begin", err)),
            Err(_) => {
                *close = true;
                Err(store.timed_out("begin"))
            }
        }
    }

    async fn claim<'c>(
        &'c self,
        tx: &mut PooledTransaction<'c>,
        call: &TxCall,
    ) -> Result<TxClaim, Error> {
        let store = &self.store;
        let token_bytes = token_bytes(call.token);
        let fp = call.fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let lease = micros(call.lease);
        let key_bytes = &call.key.as_bytes()[..];
        let lock = store.lock_id(call.key);
        let params: &Params<'_> = &[
            (&key_bytes, Type::BYTEA),
            (&&token_bytes[..], Type::BYTEA),
            (&fp, Type::BYTEA),
            (&lease, Type::FLOAT8),
            (&lock, Type::INT8),
        ];
        // The lease bounds how long the transaction may sit idle: a holder that stops sending
        // (its process frozen, its future no longer polled) has its transaction ended by the
        // server once the lease is over, which frees the key. `SET LOCAL` ends with the
        // transaction. Sent pipelined ahead of the claim: no round trip more, and no moment
        // when the key lock is held without the bound. With it, the marker of this call's
        // transaction (`idem.tx`, reverted when the transaction ends), which the completion
        // checks (see `Sql::complete_tx`).
        // Before them, the digest of the session's state, to tell after the commit what the
        // body left on it (see `SESSION_BASE`).
        let idle = format!(
            "{SESSION_BASE}; SET LOCAL idle_in_transaction_session_timeout = {}; \
             SET LOCAL idem.tx = '{}'",
            idle_limit_ms(call.lease),
            call.marker()
        );
        let on = On::Tx(&tx.tx, &tx.cache);
        let claimed = async {
            let (bounded, claimed) = tokio::join!(
                tx.tx.batch_execute(&idle),
                run(on, store.inner.prepared, &store.inner.sql.claim, params)
            );
            bounded?;
            claimed
        };
        match tokio::time::timeout(store.inner.timeout, claimed).await {
            Ok(Ok(rows)) => match read_claim(&rows, call.token, call.lease)? {
                // The lease of an uncommitted claim is seen by no one (the key lock guards it).
                Answer::Claim(claim, _) => Ok(TxClaim::Claim(claim)),
                // Another session holds the key lock and no live row is visible.
                Answer::Gated => Ok(TxClaim::Gated),
                // A row committed after the snapshot (which, past READ COMMITTED, the
                // transaction keeps): start over in a new transaction.
                Answer::Again => Ok(TxClaim::Again),
            },
            Ok(Err(err)) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                Ok(TxClaim::Claim(
                    store
                        .replay_read_only(call.key, call.token, call.lease)
                        .await,
                ))
            }
            Ok(Err(err)) if err.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => {
                match store.read_completed(call.key, call.token, call.lease).await {
                    Some(completed) => Ok(TxClaim::Claim(completed)),
                    None => Err(store.db_error("claim", err)),
                }
            }
            Ok(Err(err)) if is_conflict(&err) => Ok(TxClaim::Again),
            Ok(Err(err)) => Err(store.db_error("claim", err)),
            Err(_) => {
                *tx.close = true;
                Err(store.timed_out("claim"))
            }
        }
    }

    fn lend<'t, 'c: 't>(
        &'t self,
        tx: &'t mut PooledTransaction<'c>,
        call: &'t TxCall,
    ) -> (&'t Transaction<'t>, BoxFuture<'t, ()>) {
        let shared: &'t Transaction<'t> = &tx.tx;
        let seal = self
            .store
            .seal_ended(call.key, call.token, call.fingerprint, call.ttl);
        let beat = async move {
            let marker = call.marker();
            heartbeat(shared, call.lease, &marker, seal).await
        };
        (shared, Box::pin(beat))
    }

    async fn still_ours<'c>(&'c self, tx: &mut PooledTransaction<'c>, call: &TxCall) -> TxState {
        let marker = call.marker();
        let checked = tokio::time::timeout(self.store.inner.timeout, still_ours(&tx.tx, &marker));
        let state = match checked.await {
            Ok(Ok(true)) => TxState::Ours,
            Ok(Ok(false)) => TxState::EndedByBody,
            // A statement of the body failed: the transaction is still open (aborted), and
            // the rollback ends it.
            Ok(Err(err)) if err.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                TxState::Ours
            }
            Ok(Err(_)) | Err(_) => TxState::Lost,
        };
        if state != TxState::Ours {
            // A connection whose transaction the body ended may carry anything; a lost one is
            // of no use.
            *tx.close = true;
        }
        state
    }

    async fn complete<'c>(
        &'c self,
        tx: &mut PooledTransaction<'c>,
        call: &TxCall,
        value: &[u8],
    ) -> Result<TxCompletion, Error> {
        let store = &self.store;
        let key_bytes = &call.key.as_bytes()[..];
        let token_bytes = token_bytes(call.token);
        let fp = call.fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let ttl = micros(call.ttl);
        let lock = store.lock_id(call.key);
        let marker = call.marker();
        let params: &Params<'_> = &[
            (&key_bytes, Type::BYTEA),
            (&&token_bytes[..], Type::BYTEA),
            (&value, Type::BYTEA),
            (&ttl, Type::FLOAT8),
            (&lock, Type::INT8),
            (&fp, Type::BYTEA),
            (&marker, Type::TEXT),
        ];
        let on = On::Tx(&tx.tx, &tx.cache);
        let finish = run(
            on,
            store.inner.prepared,
            &store.inner.sql.complete_tx,
            params,
        );
        match tokio::time::timeout(store.inner.timeout, finish).await {
            Ok(Ok(rows)) if matches!(read_gated(&rows), Ok(Some(1))) => Ok(TxCompletion::Stored),
            Ok(Ok(rows)) if matches!(read_free(&rows), Ok(None)) => {
                // The body ran COMMIT or ROLLBACK: nothing was written by this statement, and
                // the connection's state is the body's.
                *tx.close = true;
                Ok(TxCompletion::EndedByBody(Error::store(
                    BodyEndedTransaction,
                )))
            }
            Ok(Ok(_)) => Err(Error::store(Corrupt(
                "the claim vanished inside its own transaction",
            ))),
            Ok(Err(err)) => Err(store.db_error("complete", err)),
            Err(_) => {
                *tx.close = true;
                Err(store.timed_out("complete"))
            }
        }
    }

    async fn commit<'c>(&'c self, tx: PooledTransaction<'c>) -> Result<(), Error> {
        let store = &self.store;
        let PooledTransaction { tx, close, .. } = tx;
        // The commit, and in the same message whether the body left state on the session (a
        // `SET` without `LOCAL`, `SET ROLE`; compared with the settings at `BEGIN`, so what the
        // application's pool sets on every connection does not count): such a connection is
        // closed rather than handed to the next caller. Behind a transaction pooler the session
        // is the pooler's server connection, which only a reset in the same message
        // reaches.
        let (prepared_closing, pooler_closing);
        let closing = if store.inner.prepared {
            prepared_closing = format!("COMMIT; {SESSION_LEAKED}");
            prepared_closing.as_str()
        } else {
            pooler_closing = format!("COMMIT; {}; SELECT false", POOLER_RESET.join("; "));
            pooler_closing.as_str()
        };
        let committed = tokio::time::timeout(store.inner.timeout, tx.simple_query(closing)).await;
        // The transaction is over either way (committed, or rolled back by a failed COMMIT):
        // nothing for `Transaction`'s drop to roll back.
        std::mem::forget(tx);
        match committed {
            Ok(Ok(messages)) => {
                *close = messages
                    .iter()
                    .any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) != Some("f")));
                store.granted();
                Ok(())
            }
            Ok(Err(err)) => Err(store.db_error("commit", err)),
            Err(_) => {
                *close = true;
                Err(store.timed_out("commit"))
            }
        }
    }

    async fn rollback<'c>(&'c self, tx: PooledTransaction<'c>) {
        let PooledTransaction { tx, close, .. } = tx;
        if *close {
            // The connection is closed anyway (it may still be busy with a statement that
            // timed out): the server discards the transaction with it.
            return;
        }
        match tokio::time::timeout(self.store.inner.timeout, tx.rollback()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(
                    target: "idem", error = %err,
                    "a transactional call's rollback failed; its connection is closed, which \
                     discards the transaction"
                );
                *close = true;
            }
            Err(_) => *close = true,
        }
    }

    async fn seal(&self, call: &TxCall) {
        self.store
            .seal_ended(call.key, call.token, call.fingerprint, call.ttl)
            .await;
    }

    async fn finish(&self, conn: PooledConnection, call: &TxCall, wake: bool) {
        let PooledConnection { conn, close } = conn;
        if close {
            // A statement timed out (the connection may still be busy with it), or the body
            // left state on the session or ended the transaction: the connection is closed
            // rather than handed to the next caller.
            drop(Object::take(conn));
            return;
        }
        if wake {
            // The transaction rolled back (a failed body, or a store error after the claim): if
            // it held the key, the key is free again, and a rollback notifies no one. Wake the
            // key's waiters (only if there are any: see `wake_sql`); best effort, they also
            // poll.
            let key_bytes = &call.key.as_bytes()[..];
            let params: &Params<'_> = &[(&key_bytes, Type::BYTEA)];
            let wake = run(
                On::Pooled(&conn),
                self.store.inner.prepared,
                &self.store.inner.sql.wake,
                params,
            );
            let _ = tokio::time::timeout(self.store.inner.timeout, wake).await;
        }
    }
}
