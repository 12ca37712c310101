//! The PostgreSQL store: durable idempotency records and [step](crate::step) records, one SQL
//! statement per operation, and a transactional mode in which the body's own writes commit
//! together with the record.
//!
//! # The tables
//!
//! [`PostgresStore::migrate`] creates them (idempotently; any number of stores and processes may
//! call it at once, for tables in the same new schema too). [`PostgresStore::migration_sql`]
//! returns the same DDL for teams that run migrations with their own tool. With the default
//! names it is:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "public"."idem_records" (
//!     key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),
//!     token       bytea       NOT NULL CHECK (octet_length(token) = 16),
//!     fingerprint bytea       CHECK (octet_length(fingerprint) = 32),
//!     value       bytea,
//!     expires_at  timestamptz NOT NULL
//! );
//! CREATE INDEX IF NOT EXISTS "idem_records_expires_idx" ON "public"."idem_records" (expires_at);
//!
//! CREATE TABLE IF NOT EXISTS "public"."idem_records_steps" (
//!     key         bytea       NOT NULL CHECK (octet_length(key) = 32),
//!     name        bytea       NOT NULL,
//!     value       bytea       NOT NULL,
//!     fingerprint bytea       CHECK (octet_length(fingerprint) = 32),
//!     expires_at  timestamptz NOT NULL,
//!     PRIMARY KEY (key, name)
//! );
//! CREATE INDEX IF NOT EXISTS "idem_records_steps_exp_idx"
//!     ON "public"."idem_records_steps" (expires_at);
//! CREATE INDEX IF NOT EXISTS "idem_records_steps_key_idx"
//!     ON "public"."idem_records_steps" (key, expires_at);
//! ```
//!
//! (plus a `COMMENT ON TABLE` for each).
//!
//! - `key` is the 32-byte digest of the idempotency key ([`Key`]); no client-chosen text ever
//!   reaches the table or an SQL string. `token` is the claim's fencing [`Token`] (16 bytes,
//!   big-endian).
//! - `value IS NULL` means *in progress*, and `expires_at` is then the end of the lease;
//!   otherwise the record is *completed* and `expires_at` is when it is forgotten.
//! - The steps table holds the [steps](crate::step) recorded under a key (see [Steps](#steps)),
//!   one row per step: `name` is the step's name as UTF-8 bytes (`bytea`, not `text`: a Rust
//!   string may hold NUL, which `text` cannot), `value` its encoded value, `fingerprint` the
//!   [`Fingerprint`] of the request that recorded the key's first step (the same on every row
//!   of a key), `expires_at` `ttl` after the step was recorded. A key's steps are live while any
//!   of its rows is (`max(expires_at)`, which the `(key, expires_at)` index answers in one
//!   step), and forgotten together when none is. Its name is the records table's with
//!   [`STEPS_SUFFIX`] ([`PostgresStore::steps_table`]), in the same schema (so a store on a
//!   table named `x_steps` would share its table with the steps of a store on `x`: do not name
//!   records tables that way). There is no foreign key to the records table: a released claim's row is
//!   deleted, and its steps stay for the next claim.
//! - The schema and table names are configurable ([`PostgresStoreBuilder::schema`],
//!   [`PostgresStoreBuilder::table`]); they must be plain identifiers (`[A-Za-z_][A-Za-z0-9_]*`,
//!   at most 48 bytes), are checked when the store is built and always appear double-quoted.
//! - The tables are plain (logged) tables; `migrate` never creates an `UNLOGGED` one. See
//!   [Durability](#durability).
//!
//! **Upgrading** a deployment made by a version without steps (a records table, no steps
//! table): call `migrate()` (it creates the steps table and its indexes, and runs no DDL on the
//! records table), or apply `migration_sql()` again (every statement is `IF NOT EXISTS`), and
//! grant the store's role `SELECT, INSERT, UPDATE, DELETE` on the steps table. Until then a
//! store refuses every call with [`Error::Store`] saying so, before any body runs (a completion
//! deletes the key's steps, so it could not store a result), and looks again at each call, so
//! it works as soon as the migration ran, without a restart.
//!
//! # Statements
//!
//! Every [`Store`] operation is one SQL statement, in one round trip. Time is always the
//! database's, read with `clock_timestamp()` where a row is written (after any lock the
//! statement took), never the client's clock: a lease is counted from the moment it is granted.
//!
//! **No caller ever waits on another caller's lock.** Every statement that writes a key first
//! takes `pg_try_advisory_xact_lock` on a 64-bit number derived from the key's digest and the
//! table (the *key lock*), which never waits: it is held for the statement's own transaction
//! (a few microseconds), or, in the [transactional mode](crate::transactional::Transactional), until the body's
//! transaction ends. So a claim never queues on the uncommitted row of a transactional call:
//!
//! - **claim**: one statement whose first CTE reads the live row. A replay (completed record) or
//!   a busy key (live claim) ends there: no lock, no write, no WAL. Otherwise it takes the key
//!   lock; if another caller has it (a claim of the same key in flight, typically a
//!   transactional call that has not committed), the answer is [`Claim::Busy`] at once.
//!   With the lock it runs `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <the row expired>`.
//!   When a conflicting row was committed after the statement's snapshot, the statement returns
//!   no row and is run again with a new snapshot. A granted claim also returns the lease left
//!   at the end of the statement: an `INSERT` computes its row before it checks for a
//!   conflicting one, and that check waits for a session deleting or updating the expired row
//!   (a cleanup job of your own, say), so after such a wait the lease written can be short, or
//!   already over. The store then renews it (one `UPDATE` more) before it answers
//!   [`Claim::Acquired`], and claims again if the key was taken over meanwhile: no caller is
//!   granted less than its whole lease.
//! - **replay of a record the store has seen completed** (it completed it, or a claim returned
//!   it; up to 16 384 keys per store): a plain `SELECT` of the key's live completed row, one
//!   index lookup, instead of the claim statement (whose plan also carries the `INSERT`, the
//!   key lock and a `UNION ALL`). A completed row never changes until it expires or is removed,
//!   so the lookup finds exactly what the claim would have returned; if it finds none, the
//!   store forgets the key and runs the claim statement, two statements for that call.
//! - **complete**: an upsert under the key lock: the row holding this token (lease live or
//!   lapsed) is completed, an absent key gets the completed record, a record already completed
//!   by this token is left as it is (the first value stays) and reported stored, and a row of
//!   any other token is left alone: [`Completion::LeaseLost`].
//!   The same statement deletes the key's steps when it stored the record (the value replays
//!   whole; the steps are never read again).
//! - **renew / release**: an `UPDATE` / `DELETE` under the key lock whose `WHERE` names the key,
//!   the claim's token and `value IS NULL`. A release keeps the key's steps.
//! - **remove**: `DELETE ... WHERE key = $1` of the record and of the key's steps, in one
//!   statement under the key lock.
//! - **record a step / read the steps**: see [Steps](#steps).
//!
//! A lock on the table itself that blocks writers (an operator's `CREATE INDEX`, `ALTER
//! TABLE`, `LOCK TABLE`) makes the claim wait until its `lock_timeout`; the store then reads
//! the key's completed record with a plain `SELECT` (a reader's lock, which all but `ACCESS
//! EXCLUSIVE` allow) and replays it, so replays keep being served; a key with no completed
//! record is reported busy. On a pool without a `lock_timeout` the claim waits up to the
//! store's timeout instead.
//!
//! complete, renew, release and remove, when the key lock is taken (a claim of that key is in
//! flight), pause outside the pool and try again, within the store's timeout.
//!
//! The key locks share PostgreSQL's advisory lock space (`int8` keys) with whatever else uses
//! advisory locks on the database; a collision (vanishingly unlikely with 64-bit numbers)
//! makes a claim see the key busy while the other lock is held, and never anything worse. [`PostgresStore::migrate`] also takes `pg_advisory_xact_lock(hashtext(name))` on the
//! quoted schema and table names.
//!
//! # Steps
//!
//! [`idem::step`](crate::step) records its value in the steps table ([The tables](#the-tables)),
//! fenced by the call's claim, so a retry after a failure or a takeover after a crash gets it
//! without running the step again.
//!
//! - **Recording a step** ([`Store::record_step`]) is one statement: the record must be in
//!   progress under the call's token with its lease not run out (`clock_timestamp()`);
//!   otherwise nothing is written and the step gets [`Error::LeaseLost`], at once. Only then
//!   does the statement try the key lock (taken by another caller: it pauses outside the pool
//!   and runs again, as a completion does), lock the claim's row `FOR SHARE` (which re-reads a
//!   row changed since the statement's snapshot, so a step is never accepted after a takeover
//!   or a removal was committed, and keeps the row from changing until the step commits), read
//!   the key's latest-expiring step row (one step of the `(key, expires_at)` index: are the
//!   key's steps live, and under which fingerprint), and `INSERT ... ON CONFLICT (key, name) DO
//!   UPDATE` the step's row, expiring `ttl` (the call's) from now. Nothing else is written. A
//!   repeated record of a live step (a reply lost, the step recorded again) keeps the first
//!   value and pushes the row's expiry out.
//! - **Fingerprint**: the first step of a key (none live) is recorded under the claim's
//!   fingerprint, and later ones under the same, so the steps are the request's that began them.
//!   [`Store::steps`] compares it with the current claim's by the rule of replays: they match
//!   if the claim has no fingerprint, or the same one (steps recorded without one do not match
//!   a claim with one). Otherwise the answer is [`RecordedSteps::KeyReused`]: a key reused for
//!   another request does not inherit the first request's effects (its step gets
//!   [`Error::KeyReused`] before it runs), and the steps stay for a retry of the request that
//!   recorded them.
//! - **Reading the steps** ([`Store::steps`]) is one plain `SELECT` (the claim's row, the key's
//!   liveness, its steps and their fingerprint), under the same fence. The executor reads them
//!   once per call, at the call's first step (again only where it must check its lease, or for a
//!   step whose record it lost track of).
//! - **A dropped call** whose steps ran but whose records were not acknowledged (the call was
//!   cancelled between a step's effect and its record) hands them to the store
//!   ([`Store::release_on_drop_after_steps`]): in the background, each is recorded as above,
//!   tried again with backoff like a background completion (see
//!   [Timeouts and failures](#timeouts-and-failures)), and only then is the claim released, so
//!   the retry, which waits for the claim, reads them instead of running them again. Without a
//!   tokio runtime nothing is recorded and the claim is left to its lease.
//! - **Cost**: a call that runs no step sends no statement for steps (its completion's
//!   statement also looks up the key's steps in the primary key's index, to delete them); a
//!   call with steps sends one read, then one statement per step it runs (a step already
//!   recorded costs nothing more). A step writes one row (and its three index entries) whatever
//!   the number recorded before it, and rewrites none: 2 000 steps in one call cost what 2 000
//!   calls of one step do.
//! - **Lifetime**: steps outlive a release and a lapsed lease: the next claim of the key (a
//!   new token) reads them. A completion and `remove` delete them in their own statement. A
//!   key's steps expire together, `ttl` (the call's) after the last one was recorded: a row
//!   whose own expiry passed is still read while a later row of its key lives. Expired steps
//!   are not read; their rows are deleted by the same cleanup as expired records (see
//!   [Expired rows](#expired-rows)), or, when a step is recorded under their key first, by that
//!   step, which clears them in a transaction of its own before it records itself (two
//!   statements more, once).
//! - **Names** are any Rust string, NUL bytes included, of at most
//!   [`MAX_STEP_NAME_LEN`](crate::MAX_STEP_NAME_LEN) bytes (checked by [`idem::step`](crate::step)
//!   before the step runs). A name is part of the primary key, and the longest one, with the
//!   key, fits PostgreSQL's index rows (at most 2 704 bytes) whatever its bytes.
//! - **The transactional mode** records no steps (the transaction is the recovery point, see
//!   [`idem::step`](crate::step)), and its completion does not touch the steps table.
//!
//! # Isolation
//!
//! Each statement of the store is its own transaction, at the database's default isolation. A
//! statement that fails with a serialization failure (`40001`) or a deadlock (`40P01`) is run
//! again, so the store works on a database whose `default_transaction_isolation` is
//! `repeatable read` or `serializable`; a claim that keeps failing that way is reported as
//! [`Claim::Busy`], never as an error. The transactional mode sets its own level
//! (`Transactional::isolation_level`, `READ COMMITTED` unless set: see
//! [`Transactional`](crate::transactional::Transactional)).
//!
//! # Session settings
//!
//! The store relies on no session setting: not on the isolation level (see above), the time
//! zone (all times are `timestamptz` arithmetic), `search_path` (every table and every function
//! is schema-qualified: the store's table, and `pg_catalog.clock_timestamp()` and the like, so
//! an application schema earlier in the path cannot shadow them), nor on anything set on a connection before (no session-level `SET`: the
//! transactional mode's `SET LOCAL` ends with its transaction; no session
//! advisory lock, no temporary table). A store built with [`PostgresStoreBuilder::connect`]
//! passes `statement_timeout` and `lock_timeout` in the connection's startup packet as safety
//! nets (nothing here waits on a lock); `application_name` is `idem`.
//!
//! # Behind a transaction pooler (PgBouncer)
//!
//! [`PostgresStoreBuilder::transaction_pooler`] makes the store work through a pooler in
//! transaction mode (PgBouncer `pool_mode = transaction`, and poolers like it), where each
//! transaction may run on another server connection: the store then prepares no named
//! statements (each statement is sent unnamed, Parse/Bind/Execute in one round trip), and
//! `connect` sends no `options` in the startup packet (PgBouncer refuses them; set
//! `statement_timeout` with `ALTER ROLE ... SET` instead). Everything else already holds through a
//! pooler: no session state, transaction-scoped advisory locks only, and the transactional
//! mode is one transaction. The cost is the server parsing and planning each statement again.
//!
//! A store built with `connect` without this mode checks, with the settings (see
//! [Durability](#durability)), that its sessions run with the `statement_timeout` and
//! `lock_timeout` it sent in the startup packet: a pooler that drops them (PgBouncer with
//! `ignore_startup_parameters = options`) is refused with [`Error::Store`] saying to set
//! `transaction_pooler(true)`, before any body runs, and so is a pooler that refuses them
//! (PgBouncer's "unsupported startup parameter"). Errors about prepared statements that vanish
//! between transactions (`26000`, `42P05`) carry the same advice.
//!
//! # Durability
//!
//! A completed record that a crash loses makes its body run again. So the store checks, at
//! [`migrate`](PostgresStore::migrate) and once before its first operation (or when
//! [`check_settings`](PostgresStore::check_settings) is called), what can lose an
//! acknowledged record:
//!
//! - the records table or the steps table, or any of their partitions (a table partitioned by
//!   whoever runs the database), is `UNLOGGED` (`pg_class.relpersistence = 'u'`): a crash of
//!   the server empties it. Refused by default with [`Error::Store`] (the fix: `ALTER TABLE
//!   ... SET LOGGED`); [`PostgresStoreBuilder::if_unlogged`] chooses otherwise;
//! - the store's sessions run with `synchronous_commit = off`: a crash can lose the last
//!   commits the server acknowledged (up to three times `wal_writer_delay`). Warned about
//!   once by default, through `tracing`; [`PostgresStoreBuilder::if_synchronous_commit_off`]
//!   chooses otherwise.
//!
//! # Read-only servers
//!
//! The store writes its records, so it belongs on the primary. Pointed at a hot standby or a
//! database with `default_transaction_read_only = on`, [`PostgresStore::migrate`] fails saying
//! so (even when the table is there), a replay of a completed record is still served (the
//! claim is refused, and the record is read with a plain `SELECT`), and any other call fails
//! with [`Error::Store`] before its body runs, with the fix: point the store at the primary
//! (with several hosts in the URL, `target_session_attrs=read-write`). The settings check
//! before the store's first operation also warns once, through `tracing`, that the server is
//! read-only.
//!
//! # Expired rows
//!
//! A claim takes over an expired row in place, so keys that are reused never pile up. Rows of
//! keys that never come back are deleted by the store itself, as part of normal traffic: after
//! every 1 000 granted claims, and at the first claim after a minute without a cleanup
//! ([`PostgresStoreBuilder::cleanup_every`]), a background task runs batches of
//! [`PostgresStore::purge_expired`] (up to 1 000 rows each, through the `expires_at` index) while
//! they come back full, at most 16 per cleanup and never two at once per store, then the same
//! for expired step rows (the steps of a released call that no retry came for; their own
//! `expires_at` index, and only the rows of keys none of whose steps is live; each batch is two
//! statements in one transaction, which takes the keys' locks and then deletes their rows on a
//! snapshot taken with the locks held, so a step recorded just before is always seen). That can
//! delete 16 rows per claim, more than any traffic adds, so under steady traffic the tables
//! hold the live records and steps and at most a few batches of expired ones. Several stores and processes on one table split the work (each skips the rows
//! another is deleting).
//! [`PostgresStoreBuilder::auto_cleanup`]`(false)` turns it off; then schedule `purge_expired`
//! yourself (for example every few minutes, from one process or all of them).
//!
//! A purge tries each row's key lock and leaves a row whose lock is taken (by a claim of that
//! key in flight, a transactional call, a step being recorded, another purge); of the rest it skips any row another
//! session has locked (`FOR UPDATE SKIP LOCKED`), so it never makes a claim wait for its row
//! and never waits itself. Until its transaction ends it holds the key locks of the rows it is
//! deleting: a claim of one of those (expired) keys in that moment finds the key busy, and
//! waits (`OnConflict::Wait`) or is refused (`OnConflict::Reject`). A cleanup job of your own that deletes rows holds their row
//! locks to the end of its transaction, and a claim of such a key waits for it (the claim's
//! lease is then renewed, see above): prefer `purge_expired`, or short transactions.
//!
//! # Waiting
//!
//! A caller that meets a busy key holds no pooled connection while it waits. Waiters are woken
//! by `LISTEN`/`NOTIFY` when the holder completes or releases, and when the record is removed or
//! purged; polling stays as the fallback. A holder that stops renewing loses its lease at a time
//! the waiter already knows (its poll reads the lease left), so the waiter looks again then, and
//! claims the key itself or finds it taken over; a claim sends no notification (in the
//! transactional mode it would hold the wait lock for the whole body, see below).
//!
//! - **One listening connection per store**, outside the pool, opened by the store's first
//!   wait (stores built with [`PostgresStoreBuilder::connect`]), `LISTEN`ing on the table's
//!   channel ([`PostgresStore::channel`]). Every waiter of the store shares it: a waiter registers
//!   its key in a map of key → [`tokio::sync::Notify`], then takes a session-level *shared*
//!   advisory lock on the key's *wait lock* (a 64-bit number derived from the key's digest and
//!   the table, distinct from its key lock) through that connection, and only then re-checks
//!   the record, so a completion between the check and the sleep is not missed.
//! - **The notification is sent in the writer's transaction**, so it is delivered when (and only
//!   if) the change commits: `complete` (in the [transactional mode](crate::transactional::Transactional), inside the
//!   user's transaction, delivered at its commit), `release`, `remove`, a purge. Each tries the wait lock exclusively for its transaction: when a
//!   waiter holds it, it sends `pg_notify(channel, digest in hex)`; when no one waits, nothing
//!   (a transaction that notifies takes a database-wide lock at commit in PostgreSQL, which
//!   would serialise every completion). A waiter that arrives while such a statement holds the
//!   wait lock polls again at once. A transactional body that fails is rolled back, then a
//!   statement of its own wakes the key's waiters.
//! - **Polling stays as the fallback.** A waiter that will be notified still polls every
//!   [`NOTIFIED_POLL`] (2 s), never past the holder's lease nor its own timeout (a holder
//!   whose transaction was rolled back by a crash or a dropped call notifies no one). While
//!   the listening connection is down (terminated, or the server restarted), every waiter is
//!   woken and polls with the backoff below, and the connection is opened again (50 ms doubling
//!   to 5 s); back, the waiters register on it again. A connection that stops answering is
//!   noticed by a heartbeat every 30 s.
//! - **Without a listening connection** waiters poll with a bounded exponential backoff (5 ms
//!   doubling up to 200 ms, never past the holder's lease nor the caller's timeout): in
//!   [`PostgresStoreBuilder::transaction_pooler`] mode (a pooler in transaction mode cannot keep
//!   a `LISTEN`: each transaction may run on another server connection), for stores built with
//!   [`PostgresStoreBuilder::connect_pool`] (the store cannot read the pool's connection settings),
//!   and with [`PostgresStoreBuilder::notifications`]`(false)`. Their completions still notify
//!   waiters of other stores (`NOTIFY` passes a pooler).
//!
//! Each poll is one primary-key lookup that also sees a claim still in flight (the key lock
//! taken). A poll never queues for a connection: it takes an idle one or, when the pool is
//! exhausted, skips that poll, so waiters never get ahead of claims of other keys.
//! [`PostgresStore::wait_stats`] counts polls and notified wakes.
//!
//! # Timeouts and failures
//!
//! Every operation is bounded on the client by [`PostgresStoreBuilder::timeout`]
//! ([`DEFAULT_TIMEOUT`]: getting a pooled connection plus running the statement); a connection
//! whose statement timed out is dropped, not returned to the pool. A server that is down,
//! refuses connections, times out or answers with an error gives [`Error::Store`] with the
//! driver's error as its source; nothing here panics on what the server returns.
//!
//! A call dropped while its claim statement is in flight releases that claim on the same
//! connection, after the statement (so the key is not left held until its lease runs out). A
//! call dropped while its `complete` is under way, or whose `complete` failed (the server is
//! down, restarting, or timed out), has the completion finished in the background
//! ([`Store::complete_on_drop`]): tried again with backoff (50 ms doubling to 1 s) for up to
//! a minute while the failure can pass, so a result whose body ran during a
//! short outage is stored once the server is back, and a retry replays it (a retry that comes
//! meanwhile waits for the claim, whose lease outlives the outage if it is longer). A call
//! dropped with steps whose records were not acknowledged has them recorded the same way, in
//! the background, before its claim is released (see [Steps](#steps)); a minute in all.
//!
//! # Transactional mode
//!
//! [`PostgresStore::transactional`]: when the body's effect is writes to the same database, the
//! claim, the body's writes and the completed record commit in one transaction, so a crash can
//! never leave the effect without its record nor the record without its effect, on this store's
//! pool ([`TokioPostgres`]) or, with the `sqlx-postgres` feature, on an application's
//! `sqlx::PgPool` (`Sqlx`). See [`Transactional`](crate::transactional::Transactional); the flow
//! is the executor's, and this module only provides the two
//! [`TransactionBackend`](super::transaction::TransactionBackend)s.
//!
//! Only plain TCP or Unix-socket connections are made by [`PostgresStore::connect`]; for TLS,
//! build a [`deadpool_postgres::Pool`] with a TLS connector and use
//! [`PostgresStore::connect_pool`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use deadpool::managed::Manager as _;
use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    StatementCache, TimeoutType,
};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{IsolationLevel, NoTls, Row, Transaction};

use super::known::{Known, Seen};
use super::transaction::{BUSY_HINT, BodyEndedTransaction, GATED_PAUSES};
use super::{BoxFuture, RecordedSteps, StepRecorded, Store};
use crate::clock::after;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Completed, Completion, Token};

mod listener;
use listener::{Armed, Listener};
#[cfg(feature = "sqlx-postgres")]
mod sqlx_tx;
mod tokio_tx;
#[cfg(feature = "sqlx-postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-postgres")))]
pub use sqlx_tx::Sqlx;
pub use tokio_tx::TokioPostgres;

/// The `tokio-postgres` this store is built on, for naming [`tokio_postgres::Transaction`] and
/// its error type in transactional bodies without a version mismatch.
pub use tokio_postgres;

/// The `deadpool-postgres` this store is built on, for building a [`deadpool_postgres::Pool`]
/// to hand to [`PostgresStore::connect_pool`].
pub use deadpool_postgres;
/// The sqlx the [`Sqlx`] backend is built against (needs the `sqlx-postgres` feature), so a
/// program can name the same version.
#[cfg(feature = "sqlx-postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx-postgres")))]
pub use sqlx;

/// The schema of the records table unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "public";
/// The name of the records table unless told otherwise.
pub const DEFAULT_TABLE: &str = "idem_records";
/// What the name of the steps table adds to the records table's (`idem_records_steps` with the
/// default names); see [the module docs](self#steps).
pub const STEPS_SUFFIX: &str = "_steps";
/// What the name of the steps table's `expires_at` index adds to the steps table's name
/// (`idem_records_steps_exp_idx`): short enough that the longest table name allowed (48 bytes)
/// gives an index name within PostgreSQL's 63.
const STEPS_INDEX_SUFFIX: &str = "_exp_idx";
/// What the name of the steps table's `(key, expires_at)` index adds to the steps table's name
/// (`idem_records_steps_key_idx`), within PostgreSQL's 63 bytes too.
const STEPS_KEY_INDEX_SUFFIX: &str = "_key_idx";
/// The longest any one store operation (pool checkout plus statement) may take on the client:
/// 10 seconds. Past it the operation fails with [`Error::Store`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a connection may take (stores built from a URL): 5 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The server-side `statement_timeout` of the store's own connections (stores built from a URL,
/// not in [transaction pooler](PostgresStoreBuilder::transaction_pooler) mode): 30 seconds.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The server-side `lock_timeout` of the store's own connections (stores built from a URL, not
/// in [transaction pooler](PostgresStoreBuilder::transaction_pooler) mode): 5 seconds. A safety
/// net only: the store's statements never wait on another caller's lock.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections a store built from a URL opens: 16.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The longest identifier accepted for a schema or table name (the index name adds a suffix
/// and must stay within PostgreSQL's 63 bytes).
const MAX_IDENT: usize = 48;
/// How many times a claim statement is run when it returns no row or hits a serialization
/// failure (see the module docs) before the key is reported busy.
const CLAIM_ATTEMPTS: usize = 16;
/// First and longest pause between two polls of [`Store::wait`], and between two tries of a
/// statement that found its key lock taken.
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(200);
/// The pause between two polls of a waiter that a notification will wake (its key registered on
/// the store's listening connection): a safety net only, for a notification that cannot come (a
/// transactional holder whose transaction was rolled back by a dropped call or a crash). Never
/// past the holder's lease nor the caller's timeout.
pub const NOTIFIED_POLL: Duration = Duration::from_secs(2);
/// A store cleans expired rows after this many granted claims (see
/// [`PostgresStoreBuilder::cleanup_every`]).
pub const DEFAULT_CLEANUP_CLAIMS: u64 = 1_000;
/// A store cleans expired rows at its first claim after this long without a cleanup (see
/// [`PostgresStoreBuilder::cleanup_every`]): a minute.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// The most batches one automatic cleanup runs (each up to `PURGE_BATCH` rows) before it leaves
/// the rest to the next one.
const CLEANUP_BATCHES: usize = 16;
/// The state a session keeps past a transaction, as one digest: the settings a `SET` without
/// `LOCAL` (or the application's own connection set-up: sqlx's `after_connect`, a pool's
/// `post_create`) put there, the session and current users (`SET SESSION AUTHORIZATION`,
/// `SET ROLE`), the channels it `LISTEN`s on, its SQL-level prepared statements, its temporary
/// relations and its holdable cursors. A transactional call keeps it in the session setting
/// `idem.base` at `BEGIN`, before its own `SET LOCAL`s, and compares it after its `COMMIT`
/// ([`SESSION_LEAKED`]): only what the call's body left (a `LISTEN` takes effect at the commit)
/// closes the connection, never what the application sets on every connection. Session-level
/// advisory locks and a body that failed (rolled back) are not checked.
macro_rules! session_digest {
    () => {
        "(SELECT pg_catalog.md5(COALESCE((SELECT pg_catalog.string_agg(name || '=' || setting, \
         ',' ORDER BY name) FROM pg_catalog.pg_settings WHERE source = 'session' AND name NOT \
         LIKE 'idem.%' AND name NOT LIKE 'transaction\\_%'), '') || '|' || session_user || '|' \
         || current_user || '|' || (SELECT pg_catalog.count(*) FROM \
         pg_catalog.pg_listening_channels()) || '|' || (SELECT pg_catalog.count(*) FROM \
         pg_catalog.pg_prepared_statements WHERE from_sql) || '|' || (SELECT pg_catalog.count(*) \
         FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) || '|' || \
         (SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)))"
    };
}
/// See [`session_digest!`]: what a transactional call's `BEGIN` keeps.
pub(crate) const SESSION_BASE: &str = concat!(
    "SELECT pg_catalog.set_config('idem.base', ",
    session_digest!(),
    ", false)"
);
/// Whether a transactional call's body left state on its session: a digest that differs from
/// the one kept at `BEGIN` ([`SESSION_BASE`]). Run after the `COMMIT`.
pub(crate) const SESSION_LEAKED: &str = concat!(
    "SELECT ",
    session_digest!(),
    " IS DISTINCT FROM pg_catalog.current_setting('idem.base', true)"
);
/// What a transactional call sends behind a transaction pooler with its `COMMIT` (tokio-postgres)
/// or before it (sqlx), where the session is the pooler's server connection, shared with other
/// clients, and closing the client's connection does not reset it: the settings, the role and
/// the session authorization back to the connection's own (`RESET ALL` leaves the last two).
pub(crate) const POOLER_RESET: [&str; 3] =
    ["RESET ALL", "RESET SESSION AUTHORIZATION", "RESET ROLE"];
/// What to do about a read-only server.
const READ_ONLY_ADVICE: &str = "The server is read-only (a hot standby, or \
    `default_transaction_read_only = on`): idem writes its records there, so point the store at \
    the primary (with several hosts in the URL, add `target_session_attrs=read-write`); until \
    then only completed records are replayed";

/// Rows deleted per statement by [`PostgresStore::purge_expired`] at the most. Each takes a key
/// lock (an advisory lock, held to the end of the statement), and PostgreSQL's lock table is
/// sized for about `max_locks_per_transaction` (64) times `max_connections` of them.
const PURGE_BATCH: i64 = 1_000;
/// How many times `migrate` runs when it meets a concurrent creator that does not take its lock.
const MIGRATE_ATTEMPTS: usize = 8;
/// Leases and ttls are capped here so that `now() + ttl` stays within PostgreSQL's timestamps.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// What the store does when a setting of the database can lose acknowledged records (the
/// shared `IfUnsafe` of `idem::store`; see the [module documentation](self#durability)). On
/// PostgreSQL, `Refuse` makes [`PostgresStore::migrate`], [`PostgresStore::check_settings`] and
/// every operation return [`Error::Store`] naming the setting and how to fix it; `Warn` says so
/// once through `tracing`; `Accept` is silent.
pub use super::IfUnsafe;

/// An idempotency store in PostgreSQL, on a `deadpool-postgres` connection pool.
///
/// Records survive restarts of the application and of the server, and are shared by every
/// process that points at the same table. Cloning is cheap and shares the pool.
///
/// See the [module documentation](self) for the table, the statements, the session settings,
/// poolers, durability, cleanup, waiting, timeouts and the transactional mode.
///
/// ```no_run
/// use idem_runtime::{Idempotent, store::postgres::PostgresStore};
///
/// # async fn run() -> Result<(), idem_runtime::Error> {
/// let store = PostgresStore::connect("postgres://app@localhost/app").await?;
/// store.migrate().await?;
/// let cents = Idempotent::new(&store, ("charge", 42u64))
///     .run(|| async { Ok::<_, idem_runtime::Error>(1999u64) })
///     .await?;
/// # let _ = cents; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    schema: String,
    table: String,
    /// The steps table: the records table's name and [`STEPS_SUFFIX`].
    steps_table: String,
    sql: Sql,
    timeout: Duration,
    /// Named statements, prepared once per connection (`false` behind a transaction pooler:
    /// unnamed statements, parsed each time).
    prepared: bool,
    /// Mixed into every key lock, so that two tables never share one.
    lock_salt: i64,
    on_unlogged: IfUnsafe,
    on_async_commit: IfUnsafe,
    /// The settings `connect` sent in the startup packet (and the URL did not override), in
    /// milliseconds: a session that does not run with them is behind a pooler that dropped them.
    sent_options: Vec<(&'static str, f64)>,
    /// The outcome of the latest settings check, once one has been made.
    verdict: RwLock<Option<Verdict>>,
    warned_unlogged: AtomicBool,
    warned_async_commit: AtomicBool,
    warned_read_only: AtomicBool,
    /// The `NOTIFY` channel of the table (`idem_` and 16 hex digits).
    channel: String,
    /// Mixed into every wait lock (see `listener`), so that two tables never share one.
    wait_salt: i64,
    /// Where the listening connection connects (`None`: waiters poll, see the module docs).
    listen_config: Option<tokio_postgres::Config>,
    /// The listening connection, started by the first wait (`None` inside: no runtime to run it).
    listener: OnceLock<Option<Listener>>,
    /// Polls made by waiters, and waits woken by a notification.
    polls: AtomicU64,
    notified: AtomicU64,
    cleanup: Option<Cleanup>,
    /// Claims granted since the last automatic cleanup started.
    grants: AtomicU64,
    /// When the last automatic cleanup started.
    last_cleanup: Mutex<Instant>,
    /// An automatic cleanup is running.
    cleaning: AtomicBool,
    /// A connection outside the pool, opened (with the pool's own settings and TLS) when a
    /// renewal finds no idle pooled connection: a running body's lease must not wait in line
    /// behind the application's own use of the pool, or it runs out while its holder is alive
    /// and another caller runs the body a second time.
    reserve: tokio::sync::Mutex<Option<ClientWrapper>>,
    /// Completed records seen, replayed with the plain `lookup` statement instead of the claim
    /// (see the module docs, "Statements").
    known: Known,
}

/// When a store deletes expired rows by itself (see [`PostgresStoreBuilder::cleanup_every`]).
#[derive(Clone, Copy, Debug)]
struct Cleanup {
    claims: u64,
    interval: Duration,
}

/// What a store's waiters did so far ([`PostgresStore::wait_stats`]): for operators, and for
/// tests that check waiters are woken rather than polling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitStats {
    /// Polls of a key's record by waiters (one primary-key lookup each).
    pub polls: u64,
    /// Waits woken by a notification (`NOTIFY`) rather than by their poll timer.
    pub notified: u64,
    /// How many times the store's listening connection (re)started listening: 0 before the first
    /// wait, and for a store that does not listen; more than 1 after it was lost and came back.
    pub listener_connections: u64,
}

/// What the settings check concluded: go on, or refuse with this reason.
type Verdict = Result<(), Refused>;

/// The statements, built once from the validated, quoted table name.
struct Sql {
    claim: String,
    complete: String,
    /// `complete` in the transactional mode: also checks the transaction is the call's own.
    complete_tx: String,
    renew: String,
    release: String,
    wait: String,
    /// The live completed record of a key, read only (see `PostgresStore::replay_read_only`).
    lookup: String,
    remove: String,
    purge: String,
    /// Records a step's value, fenced by the claim's token (see `Store::record_step`).
    record_step: String,
    /// The live steps of a key and whether they are the claim's (its fingerprint), fenced by
    /// the claim's token (see `Store::steps`).
    steps: String,
    /// The first statement of a cleanup batch of the steps table: the oldest rows of keys whose
    /// steps all expired, and the key locks of those keys (see `PostgresStore::clear_steps`).
    lock_dead_steps: String,
    /// The same for one key (`$1`, its key lock `$2`): a step recorded where the key's expired
    /// steps are still there clears them first.
    lock_key_steps: String,
    /// The second statement: deletes the rows of the keys locked by the first whose steps all
    /// expired, at most a batch.
    delete_dead_steps: String,
    /// Whether a claim of this token is committed (after a transactional body ended the
    /// transaction itself).
    committed_claim: String,
    /// Wakes the waiters of key `$1` on their own (after a transactional body's rollback).
    wake: String,
}

/// The SQL that wakes the waiters of the key whose digest is `key` (a `bytea` expression) when
/// the statement's transaction commits: the wait lock is tried exclusively for the transaction;
/// when a waiter holds it shared (see `listener`), `pg_notify` on the store's channel with the
/// digest in hex. Without waiters it sends nothing (a notifying commit takes a database-wide
/// lock). The wait lock is computed as `PostgresStore::wait_lock_id` does: the digest's bytes 9
/// to 16, big-endian, xor the table's wait salt.
fn wake_sql(key: &str, channel: &str, wait_salt: i64) -> String {
    format!(
        "CASE WHEN pg_catalog.pg_try_advisory_xact_lock(('x' || pg_catalog.encode( \
           pg_catalog.substring({key}, 9, 8), 'hex'))::bit(64)::int8 # CAST({wait_salt} AS int8)) \
         THEN NULL \
         ELSE pg_catalog.pg_notify('{channel}', pg_catalog.encode({key}, 'hex')) END"
    )
}

/// `$1 * interval '1 microsecond'` from now, by the server's clock at this point of the
/// statement.
macro_rules! from_now {
    ($param:literal) => {
        concat!(
            "pg_catalog.clock_timestamp() + ",
            $param,
            " * interval '1 microsecond'"
        )
    };
}

impl Sql {
    /// `table` and `steps`: the records and steps tables, quoted and schema-qualified.
    fn new(table: &str, steps: &str, channel: &str, wait_salt: i64) -> Sql {
        let wake = |key: &str| wake_sql(key, channel, wait_salt);
        Sql {
            // The live row is read first: a replay or a busy key then takes no lock and writes
            // nothing (an `ON CONFLICT DO UPDATE ... WHERE false` would lock the row, making
            // every replay a write). Only then is the key lock tried: taken elsewhere, the key
            // is busy (state 2), without waiting on anyone's row.
            //
            // A granted claim (state 1) returns the lease left at the end of the statement: an
            // inserted row's expiry is computed before the `INSERT` checks for a conflicting
            // row, and that check waits for a session that is deleting or updating the row (a
            // cleanup job's `DELETE`), so after such a wait the lease can be short, or over.
            // The store then renews it before answering (see `claim_now`).
            claim: format!(
                "WITH live AS ( \
                   SELECT r.value, r.fingerprint, r.expires_at FROM {table} r \
                   WHERE r.key = $1 AND r.expires_at > pg_catalog.clock_timestamp() \
                 ), gate AS MATERIALIZED ( \
                   SELECT pg_catalog.pg_try_advisory_xact_lock($5) AS free \
                   WHERE NOT EXISTS (SELECT 1 FROM live) \
                 ), claimed AS ( \
                   INSERT INTO {table} AS r (key, token, fingerprint, value, expires_at) \
                   SELECT $1, $2, $3, NULL, {lease} FROM gate WHERE gate.free \
                   ON CONFLICT (key) DO UPDATE \
                     SET token = excluded.token, fingerprint = excluded.fingerprint, \
                         value = NULL, expires_at = {lease} \
                     WHERE r.expires_at <= pg_catalog.clock_timestamp() \
                   RETURNING (extract(epoch FROM r.expires_at - pg_catalog.clock_timestamp()) \
                     * 1000000)::int8 \
                     AS left_us \
                 ) \
                 SELECT 1::int2, NULL::bytea, NULL::bytea, c.left_us FROM claimed c \
                 UNION ALL \
                 SELECT 2::int2, NULL, NULL, 0 FROM gate WHERE NOT gate.free \
                 UNION ALL \
                 SELECT 3::int2, l.value, l.fingerprint, \
                        (extract(epoch FROM l.expires_at - pg_catalog.clock_timestamp()) * \
                          1000000)::int8 \
                 FROM live l",
                lease = from_now!("$4"),
            ),
            // The row this token holds is completed (lease live or lapsed); an absent key gets
            // the record; this token's completed record is left as it is (a repeated
            // complete); another token's row is left alone (no row updated: lease lost).
            //
            // A completion that wrote (or found its own) completed record deletes the key's
            // steps in the same statement: the value replays whole, and the steps are never read
            // again.
            complete: complete_sql(
                table,
                "pg_catalog.pg_try_advisory_xact_lock($5)",
                &wake("$1"),
                Some(steps),
            ),
            // In the transactional mode, the transaction must still be the one the call opened
            // (a body that ran COMMIT or ROLLBACK would have this statement run on its own,
            // outside the transaction that holds the claim): otherwise `free` is NULL and
            // nothing is written.
            complete_tx: complete_sql(
                table,
                "CASE WHEN pg_catalog.current_setting('idem.tx', true) IS DISTINCT FROM $7 \
                 THEN NULL \
                 ELSE pg_catalog.pg_try_advisory_xact_lock($5) END",
                &wake("$1"),
                // No steps are recorded in the transactional mode (see `idem::step`), but a
                // plain call that failed before may have left some: they go with the commit.
                Some(steps),
            ),
            renew: format!(
                "WITH gate AS MATERIALIZED (SELECT pg_catalog.pg_try_advisory_xact_lock($4) \
                 AS free), \
                 done AS ( \
                   UPDATE {table} SET expires_at = {lease} \
                   WHERE key = $1 AND token = $2 AND value IS NULL AND (SELECT free FROM gate) \
                   RETURNING 1 \
                 ) \
                 SELECT gate.free, (SELECT pg_catalog.count(*) FROM done) FROM gate",
                lease = from_now!("$3"),
            ),
            release: format!(
                "WITH gate AS MATERIALIZED (SELECT pg_catalog.pg_try_advisory_xact_lock($3) \
                 AS free), \
                 done AS ( \
                   DELETE FROM {table} \
                   WHERE key = $1 AND token = $2 AND value IS NULL AND (SELECT free FROM gate) \
                   RETURNING {wake} \
                 ) \
                 SELECT gate.free, (SELECT pg_catalog.count(*) FROM done) FROM gate",
                wake = wake("$1"),
            ),
            // A live claim, or a claim still in flight (its key lock taken, its row not
            // committed yet): keep waiting. The lock is only tried when no live claim is seen.
            wait: format!(
                "WITH live AS ( \
                   SELECT (extract(epoch FROM expires_at - pg_catalog.clock_timestamp()) * \
                     1000000)::int8 \
                          AS left_us \
                   FROM {table} \
                   WHERE key = $1 AND value IS NULL AND expires_at > pg_catalog.clock_timestamp() \
                 ) \
                 SELECT (SELECT left_us FROM live), \
                        CASE WHEN EXISTS (SELECT 1 FROM live) THEN true \
                             ELSE pg_catalog.pg_try_advisory_xact_lock($2) END"
            ),
            // The claim statement's answer for a completed record (state 3), without its
            // `INSERT`: it takes only the lock of a reader on the table.
            lookup: format!(
                "SELECT 3::int2, value, fingerprint, \
                        (extract(epoch FROM expires_at - pg_catalog.clock_timestamp()) * \
                          1000000)::int8 \
                 FROM {table} \
                 WHERE key = $1 AND value IS NOT NULL AND expires_at > pg_catalog.clock_timestamp()"
            ),
            committed_claim: format!("SELECT 1 FROM {table} WHERE key = $1 AND token = $2"),
            // The record and its steps (a released call's steps have no record: they count
            // as one too).
            remove: format!(
                "WITH gate AS MATERIALIZED (SELECT pg_catalog.pg_try_advisory_xact_lock($2) \
                 AS free), \
                 done AS ( \
                   DELETE FROM {table} WHERE key = $1 AND (SELECT free FROM gate) \
                   RETURNING {wake} \
                 ), \
                 steps_done AS ( \
                   DELETE FROM {steps} WHERE key = $1 AND (SELECT free FROM gate) \
                   RETURNING 1 \
                 ) \
                 SELECT gate.free, (SELECT pg_catalog.count(*) FROM done) \
                   + (SELECT pg_catalog.count(*) FROM steps_done) FROM gate",
                wake = wake("$1"),
            ),
            // The oldest expired rows, at most a batch (the `expires_at` index, bounded by the
            // statement's start: `clock_timestamp()` is volatile, so it cannot bound an index
            // scan, and with fewer expired rows than a batch the scan would read every live row
            // of the table to find none more); of those, the ones whose key lock this statement
            // gets (a claim of the key in flight, or a transactional call holding it, keeps its
            // row: the purge never makes a claim wait on its row lock, and two purges split the
            // rows); deleted if still expired (a claim may have taken one over since the
            // statement's snapshot). Returns how many rows it looked at and how many it
            // deleted. The key lock is computed as `PostgresStore::lock_id` does: the digest's
            // first 8 bytes, big-endian, xor the table's salt.
            purge: format!(
                "WITH candidates AS MATERIALIZED ( \
                   SELECT key FROM {table} \
                   WHERE expires_at <= pg_catalog.statement_timestamp() \
                     AND expires_at <= pg_catalog.clock_timestamp() \
                   ORDER BY expires_at LIMIT $1 \
                 ), free AS MATERIALIZED ( \
                   SELECT key FROM candidates \
                   WHERE pg_catalog.pg_try_advisory_xact_lock( \
                     ('x' || pg_catalog.encode(pg_catalog.substring(key, 1, 8), \
                       'hex'))::bit(64)::int8 # $2) \
                 ), unlocked AS MATERIALIZED ( \
                   SELECT key FROM {table} \
                   WHERE key IN (SELECT key FROM free) AND expires_at <= \
                     pg_catalog.clock_timestamp() \
                   FOR UPDATE SKIP LOCKED \
                 ), gone AS ( \
                   DELETE FROM {table} \
                   WHERE key IN (SELECT key FROM unlocked) AND expires_at <= \
                     pg_catalog.clock_timestamp() \
                   RETURNING {wake} \
                 ) \
                 SELECT (SELECT pg_catalog.count(*) FROM candidates), (SELECT \
                   pg_catalog.count(*) FROM gone)",
                wake = wake("key"),
            ),
            // A step is recorded only while `token` holds the key with a live lease: the key
            // lock is tried only then (a holder that lost its lease learns it at once, even
            // while another caller holds the lock), and the claim's row is locked `FOR SHARE`
            // under it, which re-reads a row changed since the statement's snapshot (an
            // operator's `remove`, a takeover) and keeps it from changing until this statement
            // commits. Every writer of the key's records row and steps rows takes the key lock
            // first, so that row lock never waits.
            //
            // Each step row keeps its own expiry, `ttl` from when it was recorded, and nothing
            // else is rewritten: a key's steps are live while any of its rows is (they expire
            // together, `ttl` after the last one was recorded), so a step costs one row
            // whatever the number of earlier ones. The key's latest-expiring row (one step of
            // the `(key, expires_at)` index) tells whether they are live, and their
            // fingerprint: a step recorded while they are live keeps it (all of a key's rows
            // carry one fingerprint, that of the claim that recorded the first of them), the
            // first of a new set takes the claim's. A repeated record of a live step keeps its
            // value (a lost reply) and pushes its expiry out.
            //
            // When the key's steps all expired but their rows are still there (no cleanup came
            // by), nothing is written and the answer is 2: the store clears them first, in a
            // transaction that takes the key lock before its snapshot (`lock_key_steps`, then
            // `delete_dead_steps`), and records the step again. Deleting them here would trust
            // this statement's snapshot, taken before the key lock: a step of the same call
            // committed in between (its row, which keeps the key's steps live, unseen here)
            // would lose the others. What this statement does see is safe to act on: rows are
            // deleted only under the key lock and only once dead (or by a completion or a
            // removal, which the `FOR SHARE` re-read of the claim's row catches), so rows seen
            // live are; and a row committed unseen can only be a live one of this same claim
            // (the snapshot sees the claim, and an earlier holder's last step committed before
            // the claim's takeover did), recorded under the same fingerprint.
            //
            // Answers `free` (the key lock, or true when `token` does not hold the key) and 1
            // (recorded), 0 (the lease is lost) or 2 (expired rows to clear first).
            record_step: format!(
                "WITH gate AS MATERIALIZED ( \
                   SELECT CASE WHEN EXISTS ( \
                     SELECT 1 FROM {table} \
                     WHERE key = $1 AND token = $2 AND value IS NULL \
                       AND expires_at > pg_catalog.clock_timestamp()) \
                   THEN pg_catalog.pg_try_advisory_xact_lock($6) ELSE true END AS free \
                 ), held AS MATERIALIZED ( \
                   SELECT r.fingerprint FROM {table} r \
                   WHERE r.key = $1 AND r.token = $2 AND r.value IS NULL \
                     AND r.expires_at > pg_catalog.clock_timestamp() AND (SELECT free FROM gate) \
                   FOR SHARE \
                 ), latest AS MATERIALIZED ( \
                   SELECT s.fingerprint, s.expires_at > pg_catalog.clock_timestamp() AS live \
                   FROM {steps} s \
                   WHERE s.key = $1 AND EXISTS (SELECT 1 FROM held) \
                   ORDER BY s.expires_at DESC LIMIT 1 \
                 ), step AS MATERIALIZED ( \
                   SELECT CASE WHEN (SELECT live FROM latest) \
                            THEN (SELECT fingerprint FROM latest) \
                            ELSE h.fingerprint END AS fingerprint, \
                          (SELECT live FROM latest) IS TRUE AS live \
                   FROM held h \
                   WHERE NOT EXISTS (SELECT 1 FROM latest WHERE NOT latest.live) \
                 ), recorded AS ( \
                   INSERT INTO {steps} AS s (key, name, value, fingerprint, expires_at) \
                   SELECT $1, $3, $4, step.fingerprint, {ttl} FROM step \
                   ON CONFLICT (key, name) DO UPDATE \
                     SET value = CASE WHEN {keep} THEN s.value ELSE excluded.value END, \
                         fingerprint = CASE WHEN {keep} THEN s.fingerprint \
                                       ELSE excluded.fingerprint END, \
                         expires_at = GREATEST(s.expires_at, excluded.expires_at) \
                   RETURNING 1 \
                 ) \
                 SELECT gate.free, \
                        CASE WHEN EXISTS (SELECT 1 FROM recorded) THEN 1 \
                             WHEN EXISTS (SELECT 1 FROM latest WHERE NOT latest.live) THEN 2 \
                             ELSE 0 END::int8 \
                 FROM gate",
                ttl = from_now!("$5"),
                keep = "(s.expires_at > pg_catalog.clock_timestamp() \
                         OR (SELECT live FROM step))",
            ),
            // The key's steps if `token` holds it with a live lease and they are live (any of
            // the key's rows is: one step of the `(key, expires_at)` index, judged once), and
            // whether they are the claim's: every row's fingerprint matches the claim's by the
            // rule of replays (the claim has none, or the same one). No row when `token` does
            // not hold the key; one row `(true, NULL, NULL)` when it holds no live steps, and
            // `(false, NULL, NULL)` when they are another request's. A read: no lock.
            steps: format!(
                "WITH held AS MATERIALIZED ( \
                   SELECT r.fingerprint FROM {table} r \
                   WHERE r.key = $1 AND r.token = $2 AND r.value IS NULL \
                     AND r.expires_at > pg_catalog.clock_timestamp() \
                 ), live AS MATERIALIZED ( \
                   SELECT coalesce(pg_catalog.max(expires_at) > pg_catalog.clock_timestamp(), \
                                   false) AS yes \
                   FROM {steps} WHERE key = $1 AND EXISTS (SELECT 1 FROM held) \
                 ), found AS MATERIALIZED ( \
                   SELECT s.name, s.value, \
                          (h.fingerprint IS NULL OR s.fingerprint = h.fingerprint) IS TRUE \
                            AS ours \
                   FROM held h JOIN {steps} s ON s.key = $1 \
                   WHERE (SELECT yes FROM live) \
                 ), verdict AS MATERIALIZED ( \
                   SELECT coalesce(pg_catalog.bool_and(ours), true) AS ours FROM found \
                 ) \
                 SELECT v.ours, f.name, f.value \
                 FROM held h CROSS JOIN verdict v LEFT JOIN found f ON v.ours"
            ),
            // A cleanup batch of the steps table is two statements in one transaction: this
            // one finds the oldest expired rows of keys whose steps all expired (the
            // `expires_at` index, bounded by the statement's start so that the scan stops at
            // the first live row; a key's liveness is one step of the `(key, expires_at)`
            // index), at most a batch, and tries the key lock of each of their keys (a step
            // being recorded, a claim of the key in flight or a transactional call keeps its
            // key). Returns how many rows it looked at and the keys it locked. The key lock is
            // computed as `PostgresStore::lock_id` does: the digest's first 8 bytes, big-endian,
            // xor the table's salt.
            lock_dead_steps: format!(
                "WITH candidates AS MATERIALIZED ( \
                   SELECT c.key FROM {steps} c \
                   WHERE c.expires_at <= pg_catalog.statement_timestamp() \
                     AND c.expires_at <= pg_catalog.clock_timestamp() \
                     AND (SELECT pg_catalog.max(l.expires_at) FROM {steps} l \
                          WHERE l.key = c.key) <= pg_catalog.clock_timestamp() \
                   ORDER BY c.expires_at LIMIT $1 \
                 ), keys AS MATERIALIZED ( \
                   SELECT DISTINCT key FROM candidates \
                 ) \
                 SELECT (SELECT pg_catalog.count(*) FROM candidates), \
                        (SELECT pg_catalog.array_agg(key) FROM keys \
                         WHERE pg_catalog.pg_try_advisory_xact_lock( \
                           ('x' || pg_catalog.encode(pg_catalog.substring(key, 1, 8), \
                             'hex'))::bit(64)::int8 # $2))"
            ),
            lock_key_steps: "SELECT 0::int8, CASE WHEN pg_catalog.pg_try_advisory_xact_lock($2) \
                             THEN ARRAY[$1::bytea] END"
                .to_owned(),
            // Then, on a snapshot taken with those key locks held (so no step of those keys can
            // be committed unseen: see `record_step`), the rows of the keys whose steps are
            // still all expired (any of them: all are dead), at most a batch; a row another
            // session has locked is left (`SKIP LOCKED`). Returns how many it deleted. No
            // waiter waits on steps: no wake.
            delete_dead_steps: format!(
                "WITH dead AS MATERIALIZED ( \
                   SELECT k.key FROM pg_catalog.unnest($1::bytea[]) AS k(key) \
                   WHERE coalesce((SELECT pg_catalog.max(l.expires_at) FROM {steps} l \
                                   WHERE l.key = k.key) <= pg_catalog.clock_timestamp(), false) \
                 ), doomed AS MATERIALIZED ( \
                   SELECT s.key, s.name FROM {steps} s \
                   WHERE s.key IN (SELECT key FROM dead) \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED \
                 ), gone AS ( \
                   DELETE FROM {steps} s USING doomed d \
                   WHERE s.key = d.key AND s.name = d.name \
                   RETURNING 1 \
                 ) \
                 SELECT pg_catalog.count(*) FROM gone"
            ),
            wake: format!("SELECT ({}) IS NULL", wake("$1")),
        }
    }
}

/// The `complete` statement, under the given key-lock `gate` (a `bool`: NULL or false writes
/// nothing). With a `steps` table, a completion that wrote (or found its own completed record)
/// also deletes the key's steps.
fn complete_sql(table: &str, gate: &str, wake: &str, steps: Option<&str>) -> String {
    let steps = match steps {
        Some(steps) => format!(
            ", steps_done AS ( \
               DELETE FROM {steps} WHERE key = $1 AND EXISTS (SELECT 1 FROM done) \
             ) "
        ),
        None => String::new(),
    };
    format!(
        "WITH gate AS MATERIALIZED (SELECT {gate} AS free), \
         done AS ( \
           INSERT INTO {table} AS r (key, token, fingerprint, value, expires_at) \
           SELECT $1, $2, $6, $3, {ttl} FROM gate WHERE gate.free \
           ON CONFLICT (key) DO UPDATE \
             SET token = excluded.token, \
                 fingerprint = CASE WHEN {keep} THEN r.fingerprint \
                               WHEN r.token = excluded.token AND r.value IS NULL \
                                 THEN coalesce(excluded.fingerprint, r.fingerprint) \
                               ELSE excluded.fingerprint END, \
                 value = CASE WHEN {keep} THEN r.value ELSE excluded.value END, \
                 expires_at = CASE WHEN {keep} THEN r.expires_at ELSE {ttl} END \
             WHERE r.token = excluded.token OR r.expires_at <= pg_catalog.clock_timestamp() \
           RETURNING {wake} \
         ) {steps}\
         SELECT gate.free, (SELECT pg_catalog.count(*) FROM done) FROM gate",
        ttl = from_now!("$4"),
        // A completion repeated after it was stored keeps the first value.
        keep = "(r.token = excluded.token AND r.value IS NOT NULL \
                 AND r.expires_at > pg_catalog.clock_timestamp())",
    )
}

/// `ddl`, with its `CREATE INDEX IF NOT EXISTS "<index>" ON <table>` left for the server to
/// name when `taken`: another relation has the index's name, and `IF NOT EXISTS` would skip,
/// leaving the table without its index.
fn unnamed_index_if(taken: bool, ddl: String, index: &str, table_q: &str) -> String {
    if !taken {
        return ddl;
    }
    let named = format!("CREATE INDEX IF NOT EXISTS \"{index}\" ON {table_q}");
    ddl.replacen(&named, &format!("CREATE INDEX ON {table_q}"), 1)
}

/// How `migrate` creates one index of the steps table.
#[derive(Clone, Copy)]
enum IndexDdl {
    /// `CREATE INDEX IF NOT EXISTS` under its name (what `migration_sql` says).
    Named,
    /// Named by the server: another relation of the schema has the index's name, and `IF NOT
    /// EXISTS` would skip, leaving the table without its index.
    Unnamed,
    /// Not at all: the table has it (under whatever name).
    Present,
}

impl IndexDdl {
    /// `present`: the table has an index on these columns; `taken`: a relation of the schema has
    /// the index's name.
    fn pick(present: bool, taken: bool) -> IndexDdl {
        match (present, taken) {
            (true, _) => IndexDdl::Present,
            (false, true) => IndexDdl::Unnamed,
            (false, false) => IndexDdl::Named,
        }
    }

    /// The statement for index `index` of `table_q` on `columns`.
    fn sql(self, index: &str, table_q: &str, columns: &str) -> String {
        match self {
            IndexDdl::Named => {
                format!("CREATE INDEX IF NOT EXISTS \"{index}\" ON {table_q} ({columns});\n")
            }
            IndexDdl::Unnamed => format!("CREATE INDEX ON {table_q} ({columns});\n"),
            IndexDdl::Present => String::new(),
        }
    }
}

/// Builds a [`PostgresStore`] with names, timeouts, a pooler mode or durability choices other
/// than the defaults.
///
/// ```no_run
/// use std::time::Duration;
/// use idem_runtime::store::postgres::PostgresStore;
///
/// # async fn build() -> Result<(), idem_runtime::Error> {
/// let store = PostgresStore::builder()
///     .schema("billing")
///     .table("idempotency")
///     .timeout(Duration::from_secs(3))
///     .connect("postgres://app@db.internal/app")
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `connect` or `connect_pool`"]
pub struct PostgresStoreBuilder {
    schema: String,
    table: String,
    timeout: Duration,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    pool_size: usize,
    transaction_pooler: bool,
    on_unlogged: IfUnsafe,
    on_async_commit: IfUnsafe,
    notifications: bool,
    cleanup: Option<Cleanup>,
}

impl Default for PostgresStoreBuilder {
    fn default() -> Self {
        PostgresStoreBuilder {
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
            lock_timeout: Some(DEFAULT_LOCK_TIMEOUT),
            pool_size: DEFAULT_POOL_SIZE,
            transaction_pooler: false,
            on_unlogged: IfUnsafe::Refuse,
            on_async_commit: IfUnsafe::Warn,
            notifications: true,
            cleanup: Some(Cleanup {
                claims: DEFAULT_CLEANUP_CLAIMS,
                interval: DEFAULT_CLEANUP_INTERVAL,
            }),
        }
    }
}

impl PostgresStoreBuilder {
    /// The schema of the records table ([`DEFAULT_SCHEMA`] unless set). A plain identifier:
    /// checked when the store is built.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The name of the records table ([`DEFAULT_TABLE`] unless set). A plain identifier:
    /// checked when the store is built.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The longest one store operation may take on the client, pool checkout included
    /// ([`DEFAULT_TIMEOUT`] unless set).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long opening a connection may take ([`DEFAULT_CONNECT_TIMEOUT`] unless set, or unless
    /// the URL sets `connect_timeout`). Only for [`connect`](Self::connect).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of the store's connections (`None`: the server's
    /// default). Only for [`connect`](Self::connect), and not sent in
    /// [`transaction_pooler`](Self::transaction_pooler) mode; options in the URL take
    /// precedence.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The server-side `lock_timeout` of the store's connections (`None`: the server's
    /// default). A safety net: the store's own statements never wait on another caller's lock,
    /// but a transactional body's statements may. Only for [`connect`](Self::connect), and
    /// not sent in [`transaction_pooler`](Self::transaction_pooler) mode; options in the URL
    /// take precedence.
    pub fn lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The most connections the pool opens ([`DEFAULT_POOL_SIZE`] unless set; at least one).
    /// Only for [`connect`](Self::connect).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// The store reaches PostgreSQL through a pooler in transaction mode (PgBouncer
    /// `pool_mode = transaction`, and poolers like it), where consecutive transactions of one
    /// client connection may run on different server connections (`false` unless set).
    ///
    /// Then the store sends every statement unnamed (Parse, Bind and Execute in one round trip;
    /// no prepared statement outlives it), and [`connect`](Self::connect) sends no `options`
    /// in the startup packet, so [`statement_timeout`](Self::statement_timeout) and
    /// [`lock_timeout`](Self::lock_timeout) are not applied: set them on the role instead
    /// (`ALTER ROLE app SET statement_timeout = '30s'`). What it costs: the server parses and
    /// plans each statement again (see the README's benchmark line).
    pub fn transaction_pooler(mut self, behind_pooler: bool) -> Self {
        self.transaction_pooler = behind_pooler;
        self
    }

    /// Whether waiters are woken by `LISTEN`/`NOTIFY` (`true` unless set). With it, a store built
    /// with [`connect`](Self::connect) opens one more connection, outside the pool, on its
    /// first wait, and `LISTEN`s on it for the table's channel; a waiter then polls only every
    /// [`NOTIFIED_POLL`] as a safety net. Without it (and always in
    /// [`transaction_pooler`](Self::transaction_pooler) mode, where `LISTEN` cannot work, and
    /// for stores built with [`connect_pool`](Self::connect_pool), whose connection settings the store
    /// cannot read), waiters poll with a backoff of 5 ms doubling to 200 ms. Whatever this says,
    /// the store's completions notify the waiters of other stores. See the
    /// [module documentation](self#waiting).
    pub fn notifications(mut self, listen: bool) -> Self {
        self.notifications = listen;
        self
    }

    /// Whether the store deletes expired rows by itself (`true` unless set): see
    /// [`cleanup_every`](Self::cleanup_every). Turn it off when a job of yours calls
    /// [`PostgresStore::purge_expired`] on a schedule, or the table's rows must stay (an audit).
    pub fn auto_cleanup(mut self, on: bool) -> Self {
        self.cleanup = on.then_some(self.cleanup.unwrap_or(Cleanup {
            claims: DEFAULT_CLEANUP_CLAIMS,
            interval: DEFAULT_CLEANUP_INTERVAL,
        }));
        self
    }

    /// How often the store deletes expired rows by itself: after every `claims` granted claims
    /// ([`DEFAULT_CLEANUP_CLAIMS`] unless set; at least 1), and at the first claim after
    /// `interval` without a cleanup ([`DEFAULT_CLEANUP_INTERVAL`]). Each cleanup is a
    /// background task that runs batches of [`PostgresStore::purge_expired`] (up to 1 000 rows
    /// each) while they come back full, at most 16, and never two at once per store: it can
    /// delete 16 rows per claim, so the table stays within the live records and a few
    /// batches under any steady traffic. Turns automatic cleanup on.
    pub fn cleanup_every(mut self, claims: u64, interval: Duration) -> Self {
        self.cleanup = Some(Cleanup {
            claims: claims.max(1),
            interval,
        });
        self
    }

    /// What to do when the records table is `UNLOGGED` ([`IfUnsafe::Refuse`] unless set): a crash
    /// of the server empties an unlogged table, so every completed record vanishes and every
    /// body runs again. Accept it only for records that may be lost.
    pub fn if_unlogged(mut self, on_risk: IfUnsafe) -> Self {
        self.on_unlogged = on_risk;
        self
    }

    /// What to do when the store's sessions run with `synchronous_commit = off`
    /// ([`IfUnsafe::Warn`] unless set): a crash of the server can lose the last commits it
    /// acknowledged (up to three times `wal_writer_delay`, 600 ms by default), and with them
    /// completed records whose bodies then run again.
    pub fn if_synchronous_commit_off(mut self, on_risk: IfUnsafe) -> Self {
        self.on_async_commit = on_risk;
        self
    }

    /// A store on a new pool for `url` (`postgres://user:password@host:port/db?...` or the
    /// `key=value` form libpq accepts), connected: the first connection is opened here, so a
    /// bad URL, an unreachable server or refused credentials fail here with [`Error::Store`]
    /// (within `connect_timeout`), as [`RedisStoreBuilder::connect`] does. The records table
    /// need not exist yet ([`PostgresStore::migrate`] creates it). No TLS; for TLS use
    /// [`connect_pool`](Self::connect_pool).
    ///
    /// [`RedisStoreBuilder::connect`]: crate::store::redis::RedisStoreBuilder::connect
    pub async fn connect(self, url: &str) -> Result<PostgresStore, Error> {
        let store = self.on_url(url)?;
        store.first_connection().await?;
        Ok(store)
    }

    /// A store on a new pool for `url`, not connected yet (see [`connect`](Self::connect)).
    fn on_url(self, url: &str) -> Result<PostgresStore, Error> {
        let mut config: tokio_postgres::Config = url.parse().map_err(Error::store)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        let mut sent = Vec::new();
        if !self.transaction_pooler {
            // Ours first, so that options the URL gives win.
            let mut options = String::new();
            let existing = config.get_options().unwrap_or("").to_owned();
            for (name, timeout) in [
                ("statement_timeout", self.statement_timeout),
                ("lock_timeout", self.lock_timeout),
            ] {
                if let Some(t) = timeout {
                    let ms = t.as_millis().clamp(1, i32::MAX as u128);
                    options.push_str(&format!("-c {name}={ms} "));
                    if !existing.contains(name) {
                        sent.push((name, ms as f64));
                    }
                }
            }
            options.push_str(&existing);
            let options = options.trim_end().to_owned();
            if !options.is_empty() {
                config.options(options);
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("idem");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.timeout))
            .create_timeout(Some(self.connect_timeout.max(Duration::from_millis(1))))
            .recycle_timeout(Some(self.timeout))
            .build()
            .map_err(Error::store)?;
        check_ident("schema", &self.schema)?;
        check_ident("table", &self.table)?;
        let listen = (self.notifications && !self.transaction_pooler).then(|| {
            let mut listen = config.clone();
            let name = config.get_application_name().unwrap_or("idem");
            let name: String = format!("{name} listener").chars().take(63).collect();
            listen.application_name(name);
            listen
        });
        Ok(self.assemble(pool, sent, listen))
    }

    /// A store on a pool the application already has (its TLS, sizes and session settings
    /// are used as they are). Give the pool a `runtime` if it has timeouts.
    ///
    /// Like [`connect`](Self::connect), it takes a first connection from the pool here, so an
    /// unreachable server fails here.
    pub async fn connect_pool(self, pool: Pool) -> Result<PostgresStore, Error> {
        check_ident("schema", &self.schema)?;
        check_ident("table", &self.table)?;
        let store = self.assemble(pool, Vec::new(), None);
        store.first_connection().await?;
        Ok(store)
    }

    /// The store, with names already checked.
    fn assemble(
        self,
        pool: Pool,
        sent: Vec<(&'static str, f64)>,
        listen_config: Option<tokio_postgres::Config>,
    ) -> PostgresStore {
        let qualified = format!("\"{}\".\"{}\"", self.schema, self.table);
        let steps_table = format!("{}{STEPS_SUFFIX}", self.table);
        let qualified_steps = format!("\"{}\".\"{}\"", self.schema, steps_table);
        let salt_of = |what: &str| {
            let hash = blake3::hash(format!("idem {what} {qualified}").as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&hash.as_bytes()[..8]);
            i64::from_be_bytes(first)
        };
        let wait_salt = salt_of("wait lock");
        let channel = format!("idem_{:016x}", salt_of("channel"));
        PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&qualified, &qualified_steps, &channel, wait_salt),
                schema: self.schema,
                table: self.table,
                steps_table,
                timeout: self.timeout,
                prepared: !self.transaction_pooler,
                lock_salt: salt_of("key lock"),
                on_unlogged: self.on_unlogged,
                on_async_commit: self.on_async_commit,
                sent_options: sent,
                verdict: RwLock::new(None),
                warned_unlogged: AtomicBool::new(false),
                warned_async_commit: AtomicBool::new(false),
                warned_read_only: AtomicBool::new(false),
                reserve: tokio::sync::Mutex::new(None),
                known: Known::default(),
                channel,
                wait_salt,
                listen_config,
                listener: OnceLock::new(),
                polls: AtomicU64::new(0),
                notified: AtomicU64::new(0),
                cleanup: self.cleanup,
                grants: AtomicU64::new(0),
                last_cleanup: Mutex::new(Instant::now()),
                cleaning: AtomicBool::new(false),
            }),
        }
    }
}

/// A schema or table name that is not a plain identifier.
#[derive(Debug)]
struct BadIdentifier {
    what: &'static str,
    name: String,
}

impl fmt::Display for BadIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid PostgreSQL {} name {:?}: use 1 to {MAX_IDENT} ASCII letters, digits and \
             underscores, not starting with a digit",
            self.what, self.name
        )
    }
}

impl std::error::Error for BadIdentifier {}

fn check_ident(what: &'static str, name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let ok = name.len() <= MAX_IDENT
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::store(BadIdentifier {
            what,
            name: name.to_owned(),
        }))
    }
}

/// An operation that did not finish within the store's timeout.
#[derive(Debug)]
struct TimedOut {
    op: &'static str,
    after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL did not complete `{}` within {:?}; raise the store's `timeout` if the \
             server is slow, or check that it is reachable",
            self.op, self.after
        )
    }
}

impl std::error::Error for TimedOut {}

/// An operation whose key stayed locked by another caller for the whole store timeout.
#[derive(Debug)]
struct KeyLocked {
    op: &'static str,
    after: Duration,
}

impl fmt::Display for KeyLocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL: `{}` could not run within {:?}: another call kept the key locked (a \
             transactional call holding the key, or a run of serialization failures); try again",
            self.op, self.after
        )
    }
}

impl std::error::Error for KeyLocked {}

/// `migrate` on a server that cannot write (a hot standby, or a read-only database).
#[derive(Debug)]
struct ReadOnlyServer {
    standby: bool,
}

impl fmt::Display for ReadOnlyServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.standby {
            "a hot standby (pg_is_in_recovery())"
        } else {
            "read-only (transaction_read_only = on)"
        };
        write!(
            f,
            "PostgreSQL `migrate`: the server is {what}, so the idem store cannot write its \
             records there. Point the store at the primary (with several hosts in the URL, add \
             `target_session_attrs=read-write`)"
        )
    }
}

impl std::error::Error for ReadOnlyServer {}

/// A records table without its steps table: made by an earlier version of idem (which had
/// none) and not migrated since. Refused before any body runs, since every completion deletes
/// the key's steps.
#[derive(Debug)]
struct MissingSteps {
    table: String,
    steps: String,
}

impl fmt::Display for MissingSteps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the idem records table {} has no steps table {} (it was made by an earlier version \
             of idem, which kept no steps): call `PostgresStore::migrate()`, or apply \
             `PostgresStore::migration_sql()` (it adds the steps table and leaves the records \
             table as it is), and grant the store's role SELECT, INSERT, UPDATE and DELETE on it",
            self.table, self.steps
        )
    }
}

impl std::error::Error for MissingSteps {}

/// A row the store cannot read (written by something else, or corrupted).
#[derive(Debug)]
struct Corrupt(&'static str);

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable idempotency record: {}", self.0)
    }
}

impl std::error::Error for Corrupt {}

/// A database setting that can lose acknowledged records, refused by the store's
/// [`IfUnsafe`] choice.
#[derive(Clone, Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A failure of PostgreSQL or of its driver, as the store reports it: what the server said (its
/// message, SQLSTATE, detail and hint, which the driver's own `Display` leaves out: it prints
/// "db error"), and what to do about it where the store knows. The driver's error is the
/// [`source`](std::error::Error::source), for callers that match on it.
#[derive(Debug)]
struct DbFailure {
    /// The store operation that failed.
    op: &'static str,
    source: tokio_postgres::Error,
    advice: Option<String>,
}

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source.as_db_error() {
            Some(db) => {
                write!(
                    f,
                    "PostgreSQL {} in `{}`: {} (SQLSTATE {})",
                    db.severity(),
                    self.op,
                    db.message(),
                    db.code().code()
                )?;
                if let Some(detail) = db.detail() {
                    write!(f, "; detail: {detail}")?;
                }
                if let Some(hint) = db.hint() {
                    write!(f, "; hint: {hint}")?;
                }
            }
            None => {
                // Not the server's answer (a closed connection, an I/O error): the driver's words
                // and their causes.
                write!(f, "PostgreSQL `{}` failed: {}", self.op, self.source)?;
                let mut cause = std::error::Error::source(&self.source);
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
            }
        }
        if let Some(advice) = &self.advice {
            write!(f, ". {advice}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DbFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Why a statement failed: the driver (kept, so that callers can recognise a lock timeout or a
/// serialization failure) or anything else.
enum Failure {
    Db(tokio_postgres::Error),
    Other(Error),
}

impl Failure {
    fn is_lock_timeout(&self) -> bool {
        matches!(self, Failure::Db(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE))
    }

    /// The server refused to write: a hot standby, or `default_transaction_read_only`.
    fn is_read_only(&self) -> bool {
        matches!(self, Failure::Db(e) if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION))
    }

    /// A serialization failure or a deadlock: the statement's transaction was rolled back and
    /// running it again is safe.
    fn is_conflict(&self) -> bool {
        matches!(self, Failure::Db(e) if is_conflict(e))
    }

    fn into_error(self, store: &PostgresStore, op: &'static str) -> Error {
        match self {
            Failure::Db(e) => store.db_error(op, e),
            Failure::Other(e) => e,
        }
    }
}

fn is_conflict(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

/// Statement parameters with their types (unnamed statements need them; prepared ones use them
/// too, so both modes run the same statement).
type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

/// Where a statement runs: a pooled connection, or the transaction of a transactional call.
#[derive(Clone, Copy)]
enum On<'a> {
    /// A pooled connection, or the store's reserve connection.
    Pooled(&'a ClientWrapper),
    Tx(&'a Transaction<'a>, &'a StatementCache),
}

/// Runs one statement, prepared once per connection or unnamed (see
/// [`PostgresStoreBuilder::transaction_pooler`]).
async fn run(
    on: On<'_>,
    prepared: bool,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if !prepared {
        return match on {
            On::Pooled(conn) => conn.query_typed(sql, params).await,
            On::Tx(tx, _) => tx.query_typed(sql, params).await,
        };
    }
    let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
    let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
    match on {
        On::Pooled(conn) => {
            let statement = conn.prepare_typed_cached(sql, &types).await?;
            conn.query(&statement, &values).await
        }
        On::Tx(tx, cache) => {
            let statement = cache.prepare_typed(tx.client(), sql, &types).await?;
            tx.query(&statement, &values).await
        }
    }
}

/// Microseconds, as the `float8` the statements multiply an interval by.
fn micros(d: Duration) -> f64 {
    d.min(MAX_SPAN).as_micros() as f64
}

fn from_micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us.max(1)).unwrap_or(1))
}

fn token_bytes(token: Token) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// The table a cleanup batch works on.
#[derive(Clone, Copy)]
enum Purge {
    Records,
    Steps,
}

/// What the claim statement answered.
enum Answer {
    /// The claim, and for a granted one how much of its lease was left at the end of the
    /// statement, in microseconds (less than asked after a wait on a row lock; see `Sql::new`).
    Claim(Claim, Option<i64>),
    /// No row: a conflicting row was committed after the statement's snapshot; run it again.
    Again,
    /// No live row, and the key lock taken by another session (state 2): a claim whose row is
    /// not committed yet, or a statement that holds the lock for a moment (a completion, a
    /// release, a cleanup batch deleting the key's expired row). The key is busy only in the
    /// first case; a short pause and a new statement tell which.
    Gated,
}

/// Reads the row the claim statement returned.
fn read_claim(rows: &[Row], token: Token, lease: Duration) -> Result<Answer, Error> {
    if let Some(row) = rows.first() {
        let state: i16 = row.try_get(0).map_err(Error::store)?;
        if state == 2 {
            return Ok(Answer::Gated);
        }
    }
    read_claim_row(rows, token, lease).map(|read| match read {
        Some((claim, left)) => Answer::Claim(claim, left),
        None => Answer::Again,
    })
}

/// Whether a claim granted with `left_us` of its lease left got materially less than `lease`:
/// the statement waited (for a row lock) between computing the expiry and writing it.
fn short_grant(left_us: i64, lease: Duration) -> bool {
    let lease = lease.min(MAX_SPAN);
    let slack = (lease / 20).max(Duration::from_millis(2));
    let enough = i64::try_from((lease - lease.min(slack)).as_micros()).unwrap_or(i64::MAX);
    left_us < enough
}

fn read_claim_row(
    rows: &[Row],
    token: Token,
    lease: Duration,
) -> Result<Option<(Claim, Option<i64>)>, Error> {
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let state: i16 = row.try_get(0).map_err(Error::store)?;
    let value: Option<Vec<u8>> = row.try_get(1).map_err(Error::store)?;
    let fingerprint: Option<Vec<u8>> = row.try_get(2).map_err(Error::store)?;
    let left: Option<i64> = row.try_get(3).map_err(Error::store)?;
    claim_from_columns(state, value, fingerprint, left, token, lease).map(Some)
}

/// The claim statement's answer from its four columns (`state`, `value`, `fingerprint`, the
/// lease or ttl left in microseconds), whichever driver read them.
fn claim_from_columns(
    state: i16,
    value: Option<Vec<u8>>,
    fingerprint: Option<Vec<u8>>,
    left: Option<i64>,
    token: Token,
    lease: Duration,
) -> Result<(Claim, Option<i64>), Error> {
    match state {
        1 => return Ok((Claim::Acquired(token), left)),
        2 => {
            return Ok((
                Claim::Busy {
                    lease_left: BUSY_HINT.min(lease),
                },
                None,
            ));
        }
        _ => {}
    }
    let left = from_micros(left.unwrap_or(1));
    let claim = match value {
        None => Claim::Busy { lease_left: left },
        Some(value) => {
            let fingerprint = match fingerprint {
                None => None,
                Some(bytes) => Some(Fingerprint::from_digest(
                    <[u8; 32]>::try_from(bytes.as_slice())
                        .map_err(|_| Error::store(Corrupt("the fingerprint is not 32 bytes")))?,
                )),
            };
            Claim::Completed(Completed::new(Bytes::from(value), fingerprint, left))
        }
    };
    Ok((claim, None))
}

/// The `free` column of a gated statement's answer: `None` when it is NULL (the transactional
/// completion found that the transaction is not the call's own).
fn read_free(rows: &[Row]) -> Result<Option<bool>, Error> {
    let Some(row) = rows.first() else {
        return Err(Error::store(Corrupt("a gated statement returned no row")));
    };
    row.try_get(0).map_err(Error::store)
}

/// Reads the `(free, rows)` answer of a statement under the key lock: `None` when the lock
/// was taken by another caller.
fn read_gated(rows: &[Row]) -> Result<Option<u64>, Error> {
    let Some(row) = rows.first() else {
        return Err(Error::store(Corrupt("a gated statement returned no row")));
    };
    let free: bool = row.try_get(0).map_err(Error::store)?;
    let n: i64 = row.try_get(1).map_err(Error::store)?;
    Ok(free.then_some(n.unsigned_abs()))
}

impl PostgresStore {
    /// A store on a new connection pool for `url`, with the default table
    /// (`"public"."idem_records"`) and timeouts, connected. See
    /// [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<PostgresStore, Error> {
        PostgresStoreBuilder::default().connect(url).await
    }

    /// A store on an existing pool, with the default table, connected. See
    /// [`PostgresStoreBuilder::connect_pool`].
    pub async fn connect_pool(pool: Pool) -> Result<PostgresStore, Error> {
        PostgresStoreBuilder::default().connect_pool(pool).await
    }

    /// Takes a first connection from the pool (opening it), within the store's timeout.
    async fn first_connection(&self) -> Result<(), Error> {
        drop(self.connection("connect").await?);
        Ok(())
    }

    /// A builder, for another schema, table, timeouts, pool size, pooler mode or durability
    /// choices.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// The connection pool (shared with the application if it handed it in).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The name of the records table, as given to [`PostgresStoreBuilder::table`]
    /// (`idem_records` unless set): the name, not quoted SQL.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The schema of the records table, as given to [`PostgresStoreBuilder::schema`]
    /// (`public` unless set).
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The records table, schema-qualified and quoted as it appears in SQL.
    fn qualified_table(&self) -> String {
        format!("\"{}\".\"{}\"", self.inner.schema, self.inner.table)
    }

    /// The name of the steps table (see [the module docs](self#steps)): the records table's
    /// name with [`STEPS_SUFFIX`] (`idem_records_steps` unless the table is named otherwise), in
    /// the same schema. The name, not quoted SQL.
    pub fn steps_table(&self) -> &str {
        &self.inner.steps_table
    }

    /// The steps table, schema-qualified and quoted as it appears in SQL.
    fn qualified_steps(&self) -> String {
        format!("\"{}\".\"{}\"", self.inner.schema, self.inner.steps_table)
    }

    /// The DDL that [`migrate`](Self::migrate) applies (without the schema creation and the
    /// locks), for running with a migration tool instead: the records table and its index,
    /// then the steps table and its index (see [the module docs](self#the-tables)).
    /// Idempotent: every statement is `IF NOT EXISTS`, so a deployment whose records table
    /// exists (made by an earlier version, which had no steps table) applies it whole to gain
    /// the steps table. Both tables are plain, logged tables. (Where another relation of the
    /// schema already has an index's name, `<table>_expires_idx`, `<table>_steps_exp_idx` or
    /// `<table>_steps_key_idx`, this SQL skips that index; [`migrate`](Self::migrate) checks
    /// for each index by its definition and lets the server name it instead.)
    pub fn migration_sql(&self) -> String {
        format!("{}{}", self.records_ddl(), self.steps_ddl())
    }

    /// The records table's part of [`migration_sql`](Self::migration_sql).
    fn records_ddl(&self) -> String {
        let table = self.qualified_table();
        let index = format!(
            "\"{}_expires_idx\"",
            self.inner.table // validated identifier
        );
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (\n\
             \x20   key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),\n\
             \x20   token       bytea       NOT NULL CHECK (octet_length(token) = 16),\n\
             \x20   fingerprint bytea       CHECK (octet_length(fingerprint) = 32),\n\
             \x20   value       bytea,\n\
             \x20   expires_at  timestamptz NOT NULL\n\
             );\n\
             CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);\n\
             COMMENT ON TABLE {table} IS 'idem idempotency records: value IS NULL = in progress \
             (expires_at = end of the lease), otherwise completed (expires_at = when it is \
             forgotten)';\n"
        )
    }

    /// The steps table's part of [`migration_sql`](Self::migration_sql). No foreign key to the
    /// records table: a released claim's row is deleted, and its steps stay for the next one.
    fn steps_ddl(&self) -> String {
        self.steps_ddl_with(IndexDdl::Named, IndexDdl::Named)
    }

    /// [`steps_ddl`](Self::steps_ddl), with each of its indexes (the `expires_at` one, then the
    /// `(key, expires_at)` one) as `migrate` needs it.
    fn steps_ddl_with(&self, by_expiry: IndexDdl, by_key: IndexDdl) -> String {
        let steps = self.qualified_steps();
        // Validated identifiers and fixed suffixes.
        let name = &self.inner.steps_table;
        let by_expiry = by_expiry.sql(&format!("{name}{STEPS_INDEX_SUFFIX}"), &steps, "expires_at");
        let by_key = by_key.sql(
            &format!("{name}{STEPS_KEY_INDEX_SUFFIX}"),
            &steps,
            "key, expires_at",
        );
        format!(
            "CREATE TABLE IF NOT EXISTS {steps} (\n\
             \x20   key         bytea       NOT NULL CHECK (octet_length(key) = 32),\n\
             \x20   name        bytea       NOT NULL,\n\
             \x20   value       bytea       NOT NULL,\n\
             \x20   fingerprint bytea       CHECK (octet_length(fingerprint) = 32),\n\
             \x20   expires_at  timestamptz NOT NULL,\n\
             \x20   PRIMARY KEY (key, name)\n\
             );\n\
             {by_expiry}{by_key}\
             COMMENT ON TABLE {steps} IS 'idem step records (idem::step) of the calls in {table}: \
             name = the step name (UTF-8), value = its recorded value, fingerprint = that of the \
             request that recorded the key''s first step, expires_at = when this step expires; \
             a key''s steps are forgotten when all of them expired';\n",
            table = self.inner.table,
        )
    }

    /// Creates the schema (if missing), the records table, the steps table and their indexes,
    /// unless they exist, then [checks the settings](Self::check_settings). On a records table
    /// made by a version without steps it creates only the steps table and its indexes (see
    /// [Upgrading](self#the-tables)).
    ///
    /// Safe to call from every process at start-up, for any number of tables in one schema:
    /// concurrent calls serialise on transaction-scoped advisory locks of the schema and of the
    /// table, a concurrent creator that takes no such lock (another tool) is tolerated (the
    /// migration runs again and finds its work done), and when the tables and indexes exist no
    /// DDL runs (so no table lock is taken while other processes use the tables). Needs the
    /// privileges to create them; otherwise apply [`migration_sql`](Self::migration_sql) with
    /// an owner's role.
    pub async fn migrate(&self) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.migrate_once().await {
                Ok(()) => break,
                Err(Failure::Db(e)) if attempt < MIGRATE_ATTEMPTS && concurrent_ddl(&e) => {
                    tokio::time::sleep(FIRST_POLL * attempt as u32).await;
                }
                Err(failure) => return Err(failure.into_error(self, "migrate")),
            }
        }
        self.check_settings().await
    }

    async fn migrate_once(&self) -> Result<(), Failure> {
        let mut conn = self.connection("migrate").await.map_err(Failure::Other)?;
        let prepared = self.inner.prepared;
        let cache = Arc::clone(&conn.statement_cache);
        let run_ddl = async {
            let tx = tokio_postgres::Client::transaction(&mut conn).await?;
            let on = On::Tx(&tx, &cache);
            let schema_q = format!("\"{}\"", self.inner.schema);
            let table_q = self.qualified_table();
            // The schema first, then the table, always in that order: two stores creating
            // tables in one new schema must not both create the schema.
            for name in [&schema_q, &table_q] {
                run(
                    on,
                    prepared,
                    "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext($1)::int8)",
                    &[(name, Type::TEXT)],
                )
                .await?;
            }
            let index = format!(
                "\"{}\".\"{}_expires_idx\"",
                self.inner.schema, self.inner.table
            );
            let steps_q = self.qualified_steps();
            let steps_index = format!(
                "\"{}\".\"{}{STEPS_INDEX_SUFFIX}\"",
                self.inner.schema, self.inner.steps_table
            );
            let steps_key_index = format!(
                "\"{}\".\"{}{STEPS_KEY_INDEX_SUFFIX}\"",
                self.inner.schema, self.inner.steps_table
            );
            // Whether each table exists, has an index leading with `expires_at` (whatever its
            // name), and whether the name of its index is taken (by that index, or by another
            // relation of the schema); the same for the steps table's `(key, expires_at)` index.
            let rows = run(
                on,
                prepared,
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1), \
                        pg_catalog.to_regclass($2) IS NOT NULL, \
                        pg_catalog.pg_is_in_recovery(), \
                        pg_catalog.current_setting('transaction_read_only') = 'on', \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                JOIN pg_catalog.pg_attribute a \
                                  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                                WHERE i.indrelid = pg_catalog.to_regclass($2) \
                                  AND a.attname = 'expires_at'), \
                        pg_catalog.to_regclass($3) IS NOT NULL, \
                        pg_catalog.to_regclass($4) IS NOT NULL, \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                JOIN pg_catalog.pg_attribute a \
                                  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                                WHERE i.indrelid = pg_catalog.to_regclass($4) \
                                  AND a.attname = 'expires_at'), \
                        pg_catalog.to_regclass($5) IS NOT NULL, \
                        EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                                JOIN pg_catalog.pg_attribute a \
                                  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                                JOIN pg_catalog.pg_attribute b \
                                  ON b.attrelid = i.indrelid AND b.attnum = i.indkey[1] \
                                WHERE i.indrelid = pg_catalog.to_regclass($4) \
                                  AND a.attname = 'key' AND b.attname = 'expires_at'), \
                        pg_catalog.to_regclass($6) IS NOT NULL",
                &[
                    (&self.inner.schema, Type::TEXT),
                    (&table_q, Type::TEXT),
                    (&index, Type::TEXT),
                    (&steps_q, Type::TEXT),
                    (&steps_index, Type::TEXT),
                    (&steps_key_index, Type::TEXT),
                ],
            )
            .await?;
            let row = rows
                .first()
                .ok_or_else(|| Failure::Other(Error::store(Corrupt("no catalog answer"))))?;
            let schema_exists: bool = row.try_get(0)?;
            let table_exists: bool = row.try_get(1)?;
            let standby: bool = row.try_get(2)?;
            let read_only: bool = row.try_get(3)?;
            let indexed: bool = row.try_get(4)?;
            let name_taken: bool = row.try_get(5)?;
            let steps_exist: bool = row.try_get(6)?;
            let steps_indexed: bool = row.try_get(7)?;
            let steps_name_taken: bool = row.try_get(8)?;
            let steps_key_indexed: bool = row.try_get(9)?;
            let steps_key_name_taken: bool = row.try_get(10)?;
            let records_present = table_exists && indexed;
            let steps_present = steps_exist && steps_indexed && steps_key_indexed;
            if standby || read_only {
                // Even with the tables there: a store on this server cannot write a record.
                return Err(Failure::Other(Error::store(ReadOnlyServer { standby })));
            }
            if records_present && steps_present {
                // Already there: no DDL at all, so no table lock that would queue behind open
                // transactional bodies (and hold up every claim queued behind it).
                tx.commit().await?;
                return Ok(());
            }
            if !schema_exists {
                tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema_q}"))
                    .await?;
            }
            // Only the missing part: a records table made by an earlier version (no steps
            // table) gains the steps table without any DDL on itself (a `CREATE INDEX IF NOT
            // EXISTS` on it would take a lock that writers queue behind).
            let mut ddl = String::new();
            if !records_present {
                let index = format!("{}_expires_idx", self.inner.table);
                ddl.push_str(&unnamed_index_if(
                    name_taken,
                    self.records_ddl(),
                    &index,
                    &table_q,
                ));
            }
            if !steps_present {
                ddl.push_str(&self.steps_ddl_with(
                    IndexDdl::pick(steps_indexed, steps_name_taken),
                    IndexDdl::pick(steps_key_indexed, steps_key_name_taken),
                ));
            }
            tx.batch_execute(&ddl).await?;
            tx.commit().await?;
            Ok::<_, Failure>(())
        };
        match tokio::time::timeout(self.inner.timeout, run_ddl).await {
            Ok(result) => result,
            Err(_) => {
                drop(Object::take(conn));
                Err(Failure::Other(self.timed_out("migrate")))
            }
        }
    }

    /// Checks what can lose an acknowledged record (see the [module docs](self#durability)):
    /// whether the records table or the steps table (or a partition of either) is `UNLOGGED`,
    /// and whether the store's sessions run with
    /// `synchronous_commit = off`; then refuses, warns or accepts as the builder chose
    /// ([`PostgresStoreBuilder::if_unlogged`],
    /// [`PostgresStoreBuilder::if_synchronous_commit_off`]).
    ///
    /// [`migrate`](Self::migrate) calls it, and so does the store's first operation; call it
    /// yourself to check again (after an operator changed a setting, say). A refusal is
    /// [`Error::Store`] naming the setting and the fix, and every operation of the store gives
    /// it until a check passes. A records table without its steps table (see
    /// [Upgrading](self#the-tables)) is an [`Error::Store`] saying to migrate.
    pub async fn check_settings(&self) -> Result<(), Error> {
        match self.inspect().await? {
            Some(verdict) => {
                self.remember(verdict.clone());
                verdict.map_err(Error::store)
            }
            None => Ok(()), // no table yet: `migrate` creates it and checks again
        }
    }

    fn remember(&self, verdict: Verdict) {
        let mut slot = self
            .inner
            .verdict
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *slot = Some(verdict);
    }

    /// Reads the settings and applies the builder's choices: `None` while the records table
    /// does not exist (nothing to judge yet). A records table without its steps table (made by
    /// an earlier version, not migrated since) is [`MissingSteps`], not remembered: every
    /// operation looks again until the migration ran.
    async fn inspect(&self) -> Result<Option<Verdict>, Error> {
        let table = self.qualified_table();
        let steps = self.qualified_steps();
        // The partitions of a table (as a table partitioned by whoever runs the database has)
        // that are UNLOGGED, by name.
        let unlogged_partitions = |param: &str| {
            format!(
                "(WITH RECURSIVE part(oid) AS ( \
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                   WHERE i.inhparent = pg_catalog.to_regclass({param}) \
                   UNION \
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN part ON \
                     i.inhparent = part.oid \
                 ) \
                 SELECT pg_catalog.string_agg(c.oid::regclass::text, ', ' ORDER BY \
                   c.oid::regclass::text) \
                 FROM part JOIN pg_catalog.pg_class c ON c.oid = part.oid \
                 WHERE c.relispartition AND c.relpersistence = 'u')"
            )
        };
        let sql = format!(
            "SELECT (SELECT c.relpersistence::text FROM pg_catalog.pg_class c \
                     WHERE c.oid = pg_catalog.to_regclass($1)), \
                    pg_catalog.current_setting('synchronous_commit'), \
                    {records_partitions}, \
                    (extract(epoch FROM \
                      pg_catalog.current_setting('statement_timeout')::interval) \
                      * 1000)::float8, \
                    (extract(epoch FROM pg_catalog.current_setting('lock_timeout')::interval) \
                      * 1000)::float8, \
                    pg_catalog.pg_is_in_recovery() \
                      OR pg_catalog.current_setting('transaction_read_only') = 'on', \
                    (SELECT c.relpersistence::text FROM pg_catalog.pg_class c \
                     WHERE c.oid = pg_catalog.to_regclass($2)), \
                    {steps_partitions}",
            records_partitions = unlogged_partitions("$1"),
            steps_partitions = unlogged_partitions("$2"),
        );
        let rows = self
            .query(
                "check_settings",
                &sql,
                &[(&table, Type::TEXT), (&steps, Type::TEXT)],
            )
            .await
            .map_err(|failure| failure.into_error(self, "check_settings"))?;
        let Some(row) = rows.first() else {
            return Err(Error::store(Corrupt("no answer to the settings check")));
        };
        let persistence: Option<String> = row.try_get(0).map_err(Error::store)?;
        let synchronous_commit: String = row.try_get(1).map_err(Error::store)?;
        let unlogged_partitions: Option<String> = row.try_get(2).map_err(Error::store)?;
        let read_only: bool = row.try_get(5).map_err(Error::store)?;
        if read_only && !self.inner.warned_read_only.swap(true, Ordering::Relaxed) {
            // Not a refusal: replays are served from here (see the module docs). Calls that
            // would write fail with the same advice.
            tracing::warn!(target: "idem", table = %table, "{READ_ONLY_ADVICE}");
        }
        let mut dropped = Vec::new();
        for &(name, sent) in &self.inner.sent_options {
            let column = if name == "statement_timeout" { 3 } else { 4 };
            let now: Option<f64> = row.try_get(column).map_err(Error::store)?;
            if now.is_none_or(|now| (now - sent).abs() > 0.5) {
                let now = now.map_or_else(|| "none".to_owned(), |ms| format!("{ms} ms"));
                dropped.push(format!(
                    "{name} = {sent} ms, but the session runs with {now}"
                ));
            }
        }
        if !dropped.is_empty() {
            return Ok(Some(Err(Refused(format!(
                "the connection did not apply the startup options the store sent ({}): it goes \
                 through a pooler that drops them (PgBouncer with `ignore_startup_parameters = \
                 options`?). Behind a pooler in transaction mode the store's prepared statements \
                 fail between transactions, mid-call: build the store with \
                 `PostgresStoreBuilder::transaction_pooler(true)`, and set the timeouts on \
                   the role \
                 (`ALTER ROLE ... SET statement_timeout = '30s'`)",
                dropped.join("; ")
            )))));
        }
        let Some(persistence) = persistence else {
            return Ok(None);
        };
        let Some(steps_persistence) = row.try_get::<_, Option<String>>(6).map_err(Error::store)?
        else {
            return Err(Error::store(MissingSteps { table, steps }));
        };
        let unlogged_step_partitions: Option<String> = row.try_get(7).map_err(Error::store)?;
        let inner = &self.inner;
        let mut verdict = Ok(());
        if persistence == "u" {
            let why = format!(
                "the idem records table {table} is UNLOGGED: a crash of the PostgreSQL server \
                 empties it, so completed records vanish and their bodies run again. Make it \
                 durable with `ALTER TABLE {table} SET LOGGED`, or accept the risk with \
                 `PostgresStoreBuilder::if_unlogged(IfUnsafe::Accept)`"
            );
            verdict = verdict.and(judge(inner.on_unlogged, &inner.warned_unlogged, why));
        }
        if steps_persistence == "u" {
            let why = format!(
                "the idem steps table {steps} is UNLOGGED: a crash of the PostgreSQL server \
                 empties it, so recorded steps (idem::step) vanish and run again. Make it \
                 durable with `ALTER TABLE {steps} SET LOGGED`, or accept the risk with \
                 `PostgresStoreBuilder::if_unlogged(IfUnsafe::Accept)`"
            );
            verdict = verdict.and(judge(inner.on_unlogged, &inner.warned_unlogged, why));
        }
        if let Some(partitions) = unlogged_step_partitions {
            let why = format!(
                "partitions of the idem steps table {steps} are UNLOGGED ({partitions}): a \
                 crash of the PostgreSQL server empties them, so recorded steps (idem::step) \
                 vanish and run again. Make each durable with `ALTER TABLE <partition> SET \
                 LOGGED`, or accept the risk with \
                 `PostgresStoreBuilder::if_unlogged(IfUnsafe::Accept)`"
            );
            verdict = verdict.and(judge(inner.on_unlogged, &inner.warned_unlogged, why));
        }
        if let Some(partitions) = unlogged_partitions {
            let why = format!(
                "partitions of the idem records table {table} are UNLOGGED ({partitions}): a \
                 crash of the PostgreSQL server empties them, so completed records vanish and \
                 their bodies run again. Make each durable with `ALTER TABLE <partition> SET \
                 LOGGED`, or accept the risk with \
                 `PostgresStoreBuilder::if_unlogged(IfUnsafe::Accept)`"
            );
            verdict = verdict.and(judge(inner.on_unlogged, &inner.warned_unlogged, why));
        }
        if synchronous_commit.eq_ignore_ascii_case("off") {
            let why = format!(
                "the idem store's sessions run with synchronous_commit = off: a crash of the \
                 PostgreSQL server can lose the last commits it acknowledged, and with them \
                 completed records of {table} whose bodies then run again. Set it to `on` for \
                 the store's role or database (`ALTER ROLE ... SET synchronous_commit = on`), \
                 or accept the risk with \
                 `PostgresStoreBuilder::if_synchronous_commit_off(IfUnsafe::Accept)`"
            );
            verdict = verdict.and(judge(
                inner.on_async_commit,
                &inner.warned_async_commit,
                why,
            ));
        }
        Ok(Some(verdict))
    }

    /// The settings check, made once before the store's first operation.
    async fn ready(&self) -> Result<(), Error> {
        let known = self
            .inner
            .verdict
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(verdict) = known {
            return verdict.map_err(Error::store);
        }
        match self.inspect().await? {
            Some(verdict) => {
                self.remember(verdict.clone());
                verdict.map_err(Error::store)
            }
            None => Ok(()), // no table: the operation itself says so
        }
    }

    /// Deletes every expired row (completed records past their ttl, claims whose lease ran
    /// out long enough ago that no one took them over, and the step records of keys none of
    /// whose steps is live); returns how many, of both tables. Runs in batches of at most 1 000
    /// rows using a table's `expires_at` index, each one statement (two for the steps table: see
    /// [Expired rows](self#expired-rows)). A row whose key lock is taken (a claim of that key in
    /// flight, a transactional call holding it, a step being recorded, another purge) is left
    /// for a later run, so a purge never makes a claim wait for its row. Schedule it, for
    /// example with `tokio::time::interval`.
    ///
    /// Each batch runs in a `READ COMMITTED` transaction whatever the database's default
    /// isolation: a purge needs no more (each row is deleted only if it is still expired when
    /// deleted), and under `SERIALIZABLE` its range scan of the index would keep meeting
    /// serialization failures with the claims that write the same rows.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        self.purge_some(usize::MAX).await
    }

    /// Batches of [`purge_expired`](Self::purge_expired) while they come back full, at most
    /// `batches` of them per table: the records table, then the steps table.
    async fn purge_some(&self, batches: usize) -> Result<u64, Error> {
        let records = self.purge_table(Purge::Records, batches).await?;
        let steps = self.purge_table(Purge::Steps, batches).await?;
        Ok(records + steps)
    }

    /// Batches of one table's purge while they come back full, at most `batches` of them.
    async fn purge_table(&self, table: Purge, batches: usize) -> Result<u64, Error> {
        let mut total = 0;
        let mut conflicts = 0;
        let mut done = 0;
        loop {
            let (seen, deleted) = match self.purge_batch(table).await {
                Ok(counts) => counts,
                Err(failure) if failure.is_conflict() && conflicts < CLAIM_ATTEMPTS => {
                    conflicts += 1;
                    continue;
                }
                Err(failure) => return Err(failure.into_error(self, "purge_expired")),
            };
            total += deleted.unsigned_abs();
            // A short batch was the last; a batch that deleted nothing (every row of it held)
            // would find the same rows again.
            done += 1;
            if seen < PURGE_BATCH || deleted == 0 || done >= batches {
                return Ok(total);
            }
        }
    }

    /// One batch of [`purge_expired`](Self::purge_expired) on `table`, in a `READ COMMITTED`
    /// transaction, within the store's timeout: how many rows it looked at, and how many it
    /// deleted.
    async fn purge_batch(&self, table: Purge) -> Result<(i64, i64), Failure> {
        let salt = self.inner.lock_salt;
        let lock: &Params<'_> = &[(&PURGE_BATCH, Type::INT8), (&salt, Type::INT8)];
        match table {
            Purge::Records => {
                self.in_transaction("purge_expired", async |tx: On<'_>, prepared| {
                    let rows = run(tx, prepared, &self.inner.sql.purge, lock).await?;
                    let Some(row) = rows.first() else {
                        return Err(Failure::Other(Error::store(Corrupt(
                            "the purge returned no row",
                        ))));
                    };
                    Ok((row.try_get(0)?, row.try_get(1)?))
                })
                .await
            }
            Purge::Steps => {
                let (seen, deleted) = self
                    .clear_steps("purge_expired", &self.inner.sql.lock_dead_steps, lock)
                    .await?;
                Ok((seen, deleted.unwrap_or(0)))
            }
        }
    }

    /// Deletes the rows of keys whose steps all expired, at most a batch, in a `READ COMMITTED`
    /// transaction within the store's timeout: `lock` (`lock_dead_steps` or `lock_key_steps`,
    /// with its parameters) chooses the keys and takes their key locks, then
    /// `delete_dead_steps`, on a snapshot taken with the locks held, deletes their rows if their
    /// steps are still all expired (see `Sql::new`). Returns how many rows `lock` looked at and
    /// how many were deleted; `None` for the latter when `lock` took no key lock.
    async fn clear_steps(
        &self,
        op: &'static str,
        lock: &str,
        params: &Params<'_>,
    ) -> Result<(i64, Option<i64>), Failure> {
        self.in_transaction(op, async |tx: On<'_>, prepared| {
            let rows = run(tx, prepared, lock, params).await?;
            let Some(row) = rows.first() else {
                return Err(Failure::Other(Error::store(Corrupt(
                    "the steps cleanup returned no row",
                ))));
            };
            let seen: i64 = row.try_get(0)?;
            let keys: Option<Vec<Vec<u8>>> = row.try_get(1)?;
            let Some(keys) = keys.filter(|keys| !keys.is_empty()) else {
                return Ok((seen, None));
            };
            let rows = run(
                tx,
                prepared,
                &self.inner.sql.delete_dead_steps,
                &[(&keys, Type::BYTEA_ARRAY), (&PURGE_BATCH, Type::INT8)],
            )
            .await?;
            let deleted: i64 = match rows.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            Ok((seen, Some(deleted)))
        })
        .await
    }

    /// Runs `work` in a `READ COMMITTED` transaction on a pooled connection, whatever the
    /// database's default isolation, and commits it, all within the store's timeout (a
    /// connection whose transaction timed out is dropped, not returned to the pool).
    async fn in_transaction<T>(
        &self,
        op: &'static str,
        work: impl AsyncFnOnce(On<'_>, bool) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut conn = self.connection(op).await.map_err(Failure::Other)?;
        let prepared = self.inner.prepared;
        let cache = Arc::clone(&conn.statement_cache);
        let transaction = async {
            let tx = tokio_postgres::Client::build_transaction(&mut conn)
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .await?;
            let out = work(On::Tx(&tx, &cache), prepared).await?;
            tx.commit().await?;
            Ok::<_, Failure>(out)
        };
        match tokio::time::timeout(self.inner.timeout, transaction).await {
            Ok(result) => result,
            Err(_) => {
                drop(Object::take(conn));
                Err(Failure::Other(self.timed_out(op)))
            }
        }
    }

    /// The key lock of `key` in this table (see the module docs).
    fn lock_id(&self, key: Key) -> i64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&key.as_bytes()[..8]);
        i64::from_be_bytes(first) ^ self.inner.lock_salt
    }

    /// A pooled connection, within the store's timeout (waiting in line for one if all are in
    /// use).
    async fn connection(&self, op: &'static str) -> Result<Object, Error> {
        let deadline = after(Instant::now(), self.inner.timeout);
        self.connection_until(op, deadline).await
    }

    async fn connection_until(&self, op: &'static str, deadline: Instant) -> Result<Object, Error> {
        match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(self.pool_error(op, err)),
            Err(_) => Err(self.timed_out(op)),
        }
    }

    /// An idle pooled connection (or a new one, if the pool may grow), without waiting in line:
    /// `None` when the pool is exhausted.
    async fn idle_connection(&self) -> Result<Option<Object>, Error> {
        let mut timeouts = self.inner.pool.timeouts();
        timeouts.wait = Some(Duration::ZERO);
        let get = self.inner.pool.timeout_get(&timeouts);
        match tokio::time::timeout(self.inner.timeout, get).await {
            Ok(Ok(conn)) => Ok(Some(conn)),
            Ok(Err(PoolError::Timeout(TimeoutType::Wait))) => Ok(None),
            Ok(Err(err)) => Err(self.pool_error("wait", err)),
            Err(_) => Err(self.timed_out("wait")),
        }
    }

    /// A driver error as the store reports it ([`DbFailure`]): the server's message, SQLSTATE,
    /// detail and hint, and what to do where the store knows.
    fn db_error(&self, op: &'static str, err: tokio_postgres::Error) -> Error {
        let advice = self.advice(op, &err);
        Error::store(DbFailure {
            op,
            source: err,
            advice,
        })
    }

    /// A pool's failure to hand out a connection: the driver's error when opening one failed.
    fn pool_error(&self, op: &'static str, err: PoolError) -> Error {
        match err {
            PoolError::Backend(err) => self.db_error(op, err),
            other => Error::store(other),
        }
    }

    /// What to do about a server error, where the store knows.
    fn advice(&self, op: &'static str, err: &tokio_postgres::Error) -> Option<String> {
        let table = self.qualified_table();
        let steps = self.qualified_steps();
        let code = err.code()?;
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            return Some(if op == "migrate" {
                format!(
                    "The store's role may not create the records table or its schema: apply \
                     `PostgresStore::migration_sql()` with a role that owns the schema (your \
                     migration tool, an administrator), and grant the store's role SELECT, \
                     INSERT, UPDATE and DELETE on {table} and {steps}; `migrate()` then only \
                     checks the tables"
                )
            } else {
                format!(
                    "Grant the store's role SELECT, INSERT, UPDATE and DELETE on {table} and \
                     {steps}"
                )
            });
        }
        if *code == SqlState::PROGRAM_LIMIT_EXCEEDED && op == "record_step" {
            return Some(format!(
                "A step's name is part of the primary key of {steps}, and PostgreSQL indexes \
                 at most 2704 bytes of it (after compression): use a shorter step name \
                 (idem::step takes at most idem::MAX_STEP_NAME_LEN bytes, which fit)"
            ));
        }
        if *code == SqlState::INVALID_SQL_STATEMENT_NAME
            || *code == SqlState::DUPLICATE_PSTATEMENT
            || (*code == SqlState::PROTOCOL_VIOLATION
                && err
                    .as_db_error()
                    .is_some_and(|db| db.message().contains("unsupported startup parameter")))
        {
            return Some(
                "The store seems to reach PostgreSQL through a pooler in transaction mode \
                 (PgBouncer): build it with `PostgresStoreBuilder::transaction_pooler(true)`, \
                 which prepares no named statements and sends no startup options"
                    .to_owned(),
            );
        }
        if *code == SqlState::IN_FAILED_SQL_TRANSACTION && op == "complete" {
            return Some(
                "A statement of the transactional body failed and the body went on to return \
                 `Ok`: the transaction is aborted, so neither its writes nor the result were \
                 stored. Return the statement's error from the body, or run the statement in a \
                 savepoint (`Transaction::transaction`) to recover from its failure"
                    .to_owned(),
            );
        }
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return Some(READ_ONLY_ADVICE.to_owned());
        }
        if *code == SqlState::UNDEFINED_TABLE {
            return Some(format!(
                "Create the records table {table} and the steps table {steps}: call \
                 `PostgresStore::migrate()`, or apply `PostgresStore::migration_sql()`"
            ));
        }
        None
    }

    fn timed_out(&self, op: &'static str) -> Error {
        Error::store(TimedOut {
            op,
            after: self.inner.timeout,
        })
    }

    /// Runs one statement on a pooled connection and returns its rows, all within the store's
    /// timeout. A connection whose statement timed out is dropped rather than reused.
    async fn query(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Failure> {
        let deadline = after(Instant::now(), self.inner.timeout);
        self.query_until(op, sql, params, deadline).await
    }

    async fn query_until(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
        deadline: Instant,
    ) -> Result<Vec<Row>, Failure> {
        let conn = self
            .connection_until(op, deadline)
            .await
            .map_err(Failure::Other)?;
        self.query_pooled(op, conn, sql, params, deadline).await
    }

    /// Runs one statement on a pooled connection by `deadline`; a connection whose statement
    /// timed out is dropped rather than reused.
    async fn query_pooled(
        &self,
        op: &'static str,
        conn: Object,
        sql: &str,
        params: &Params<'_>,
        deadline: Instant,
    ) -> Result<Vec<Row>, Failure> {
        let statement = run(On::Pooled(&conn), self.inner.prepared, sql, params);
        match tokio::time::timeout_at(deadline, statement).await {
            Ok(result) => result.map_err(Failure::Db),
            Err(_) => {
                drop(Object::take(conn));
                Err(Failure::Other(self.timed_out(op)))
            }
        }
    }

    /// After a transactional body ended the transaction idem opened: if the call's claim was
    /// committed with it (the body ran `COMMIT`), the body's writes may have been committed too,
    /// so the claim is replaced by a record saying so (later calls get [`Error::Codec`] with
    /// the reason, and the body never runs again while it lives). If it was rolled back, so
    /// were the writes: the key is free and nothing is written. Best effort, on a pooled
    /// connection: a failure leaves the committed claim to its lease.
    async fn seal_ended(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        ttl: Duration,
    ) {
        let key_bytes = &key.as_bytes()[..];
        let token_bytes = token_bytes(token);
        let params: &Params<'_> = &[(&key_bytes, Type::BYTEA), (&&token_bytes[..], Type::BYTEA)];
        // The call's own connection is still out of the pool (it may be the only one): the
        // reserve connection is used when no other is idle.
        let deadline = after(Instant::now(), self.inner.timeout);
        let committed = self
            .query_reserved_until(
                "complete",
                &self.inner.sql.committed_claim,
                params,
                deadline,
            )
            .await;
        match committed {
            Ok(rows) if rows.is_empty() => {}
            Ok(_) => {
                let why = Error::store(BodyEndedTransaction);
                let record = Bytes::from(crate::codec::unstorable(&why.to_string()));
                let sealed = self
                    .complete_on(key, token, fingerprint, record, ttl, true)
                    .await;
                if let Err(err) = sealed {
                    tracing::warn!(
                        target: "idem", key = %key, error = %err,
                        "the claim of a transactional body that ended its transaction could not \
                         be sealed; it is left to its lease, after which a retry runs the body \
                         again"
                    );
                }
            }
            Err(failure) => {
                let err = failure.into_error(self, "complete");
                tracing::warn!(
                    target: "idem", key = %key, error = %err,
                    "could not tell whether a transactional body that ended its transaction \
                     committed its claim; it is left to its lease"
                );
            }
        }
    }

    /// Runs one statement on an idle pooled connection or, when the pool has none, on the
    /// store's reserve connection (opened on first need, replaced when it breaks), all within
    /// `deadline`. Never waits in line for the pool.
    async fn query_reserved_until(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
        deadline: Instant,
    ) -> Result<Vec<Row>, Failure> {
        if let Some(conn) = self.idle_connection().await.map_err(Failure::Other)? {
            return self.query_pooled(op, conn, sql, params, deadline).await;
        }
        let Ok(mut reserve) = tokio::time::timeout_at(deadline, self.inner.reserve.lock()).await
        else {
            return Err(Failure::Other(self.timed_out(op)));
        };
        if reserve.as_ref().is_none_or(|conn| conn.is_closed()) {
            let opened = tokio::time::timeout_at(deadline, self.inner.pool.manager().create());
            *reserve = match opened.await {
                Ok(Ok(conn)) => Some(conn),
                Ok(Err(err)) => return Err(Failure::Other(self.pool_error(op, err.into()))),
                Err(_) => return Err(Failure::Other(self.timed_out(op))),
            };
        }
        let Some(conn) = reserve.as_ref() else {
            return Err(Failure::Other(self.timed_out(op)));
        };
        let statement = run(On::Pooled(conn), self.inner.prepared, sql, params);
        let result = match tokio::time::timeout_at(deadline, statement).await {
            Ok(result) => result.map_err(Failure::Db),
            Err(_) => Err(Failure::Other(self.timed_out(op))),
        };
        if result.is_err() {
            // A connection in an unknown state is not used again.
            *reserve = None;
        }
        result
    }

    /// Runs a statement under the key lock (complete, renew, release, remove) and returns how
    /// many rows it changed. While another caller holds the key lock (a claim of the key in
    /// flight) or the server reports a serialization failure, pauses outside the pool and runs
    /// it again, within the store's timeout.
    async fn gated(&self, op: &'static str, sql: &str, params: &Params<'_>) -> Result<u64, Error> {
        self.gated_on(op, sql, params, false).await
    }

    /// [`gated`](Self::gated), on the reserve connection when the pool has no idle one
    /// (`reserved`: for renewals, which must not queue behind the pool).
    async fn gated_on(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
        reserved: bool,
    ) -> Result<u64, Error> {
        let deadline = after(Instant::now(), self.inner.timeout);
        self.gated_until(op, sql, params, reserved, deadline).await
    }

    /// [`gated_on`](Self::gated_on), by `deadline`.
    async fn gated_until(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
        reserved: bool,
        deadline: Instant,
    ) -> Result<u64, Error> {
        let mut pause = FIRST_POLL;
        loop {
            let rows = if reserved {
                self.query_reserved_until(op, sql, params, deadline).await
            } else {
                self.query_until(op, sql, params, deadline).await
            };
            match rows {
                Ok(rows) => {
                    if let Some(n) = read_gated(&rows)? {
                        return Ok(n);
                    }
                }
                Err(failure) if failure.is_conflict() => {}
                Err(failure) => return Err(failure.into_error(self, op)),
            }
            let now = Instant::now();
            if now + pause >= deadline {
                return Err(Error::store(KeyLocked {
                    op,
                    after: self.inner.timeout,
                }));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    async fn claim_now(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        self.ready().await?;
        let token = Token::generate();
        let asked = Instant::now();
        if self.inner.known.get(&key, asked).is_some() {
            // A completed record seen before: one index lookup, no writable statement.
            if let Some(claim @ Claim::Completed(_)) = self.read_completed(key, token, lease).await
            {
                self.seen_completed(key, &claim, asked);
                return Ok(claim);
            }
            // Expired or removed since (or the lookup failed): claim as usual.
            self.inner.known.forget(&key);
        }
        // The claim statement's future in a box of its own: a replay's stays small.
        Box::pin(self.claim_statement(key, fingerprint, lease, token, asked)).await
    }

    /// The claim statement (see the module docs, "Statements"), run again while its snapshot
    /// missed a conflicting row; `asked`: when the claim began.
    async fn claim_statement(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
        token: Token,
        asked: Instant,
    ) -> Result<Claim, Error> {
        let token_bytes = token_bytes(token);
        let fp = fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let lease_us = micros(lease);
        let key_bytes = &key.as_bytes()[..];
        let lock = self.lock_id(key);
        let params: &Params<'_> = &[
            (&key_bytes, Type::BYTEA),
            (&&token_bytes[..], Type::BYTEA),
            (&fp, Type::BYTEA),
            (&lease_us, Type::FLOAT8),
            (&lock, Type::INT8),
        ];
        let deadline = after(Instant::now(), self.inner.timeout);
        let mut gated = GATED_PAUSES.iter();
        let mut attempts = 0;
        while attempts < CLAIM_ATTEMPTS {
            attempts += 1;
            let conn = self.connection_until("claim", deadline).await?;
            // From here the claim may reach the server: if this future is dropped before the
            // answer, the guard releases it (a no-op if it never landed).
            let mut in_flight = ClaimInFlight {
                store: self,
                key,
                token,
                conn: Some(conn),
            };
            let statement = run(
                On::Pooled(in_flight.conn()),
                self.inner.prepared,
                &self.inner.sql.claim,
                params,
            );
            let answer = tokio::time::timeout_at(deadline, statement).await;
            let conn = in_flight.settle();
            match answer {
                Ok(Ok(rows)) => {
                    drop(conn);
                    match read_claim(&rows, token, lease)? {
                        Answer::Claim(Claim::Acquired(token), Some(left_us))
                            if short_grant(left_us, lease) =>
                        {
                            // The statement waited on a row lock after computing the lease: the
                            // grant must not be shorter than asked (another caller could take
                            // the key over at once). Renew it, from now.
                            match self.renew(key, token, lease).await {
                                Ok(true) => {
                                    self.granted();
                                    return Ok(Claim::Acquired(token));
                                }
                                // Taken over, or deleted, meanwhile: claim again.
                                Ok(false) => {}
                                Err(err) => {
                                    self.release_on_drop(key, token);
                                    return Err(err);
                                }
                            }
                        }
                        Answer::Claim(claim, _) => {
                            match claim {
                                Claim::Acquired(_) => self.granted(),
                                Claim::Completed(_) => self.seen_completed(key, &claim, asked),
                                Claim::Busy { .. } => {}
                            }
                            return Ok(claim);
                        }
                        // The conflicting row was committed after this statement's snapshot:
                        // run it again, with a snapshot that sees the row.
                        Answer::Again => {}
                        // Another session holds the key lock and no live row is visible: look
                        // again after a short pause (a cleanup deleting the key's expired row,
                        // or another claim committing its row, ends within milliseconds), and
                        // only after the last pause report the key busy.
                        Answer::Gated => match gated.next() {
                            Some(&pause) if after(Instant::now(), pause) < deadline => {
                                attempts -= 1;
                                tokio::time::sleep(pause).await;
                            }
                            _ => {
                                return Ok(Claim::Busy {
                                    lease_left: BUSY_HINT.min(lease),
                                });
                            }
                        },
                    }
                }
                Ok(Err(err)) => {
                    drop(conn);
                    let failure = Failure::Db(err);
                    if failure.is_lock_timeout() {
                        return Ok(self.replay_read_only(key, token, lease).await);
                    }
                    if failure.is_read_only() {
                        // A standby, or a read-only database: completed records are still
                        // served; anything else is the server's error, with the fix.
                        if let Some(completed) = self.read_completed(key, token, lease).await {
                            return Ok(completed);
                        }
                    }
                    if !failure.is_conflict() {
                        return Err(failure.into_error(self, "claim"));
                    }
                    // A serialization failure or deadlock rolled it back: run it again.
                }
                Err(_) => {
                    // No answer in time: the connection may still be busy with the statement,
                    // so it is closed; whatever landed is released in the background.
                    if let Some(conn) = conn {
                        drop(Object::take(conn));
                    }
                    self.release_on_drop(key, token);
                    return Err(self.timed_out("claim"));
                }
            }
        }
        // Kept racing with other writers of the key: report it busy; the caller waits and
        // claims again.
        Ok(Claim::Busy {
            lease_left: BUSY_HINT.min(lease),
        })
    }

    /// Remembers a completed record a claim returned, so that its next replay is a plain
    /// lookup ([`Known`]); `asked`: when the statement was sent.
    fn seen_completed(&self, key: Key, claim: &Claim, asked: Instant) {
        if let Claim::Completed(done) = claim {
            let seen = Seen {
                token: None,
                expires: after(asked, done.expires_in),
            };
            self.inner.known.insert(&key, seen);
        }
    }

    /// The answer to a claim that met a lock on the table itself (`lock_timeout`: `CREATE
    /// INDEX`, `ALTER TABLE`, `LOCK TABLE` block writers): a completed record is still read
    /// (a reader's lock goes with all but `ACCESS EXCLUSIVE`) and replayed; otherwise, or if
    /// that read fails too, the key is reported busy, and the caller waits or rejects.
    async fn replay_read_only(&self, key: Key, token: Token, lease: Duration) -> Claim {
        match self.read_completed(key, token, lease).await {
            Some(completed) => completed,
            None => Claim::Busy {
                lease_left: BUSY_HINT.min(lease),
            },
        }
    }

    /// The key's live completed record as a [`Claim::Completed`], read with a plain `SELECT`
    /// (for a claim that could not write: a table lock, a read-only server). `None` when there
    /// is none, or the read failed too.
    async fn read_completed(&self, key: Key, token: Token, lease: Duration) -> Option<Claim> {
        let key_bytes = &key.as_bytes()[..];
        let rows = self
            .query(
                "claim",
                &self.inner.sql.lookup,
                &[(&key_bytes, Type::BYTEA)],
            )
            .await
            .ok()?;
        match read_claim_row(&rows, token, lease) {
            Ok(Some((claim @ Claim::Completed(_), _))) => Some(claim),
            _ => None,
        }
    }

    async fn complete_now(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> Result<Completion, Error> {
        self.complete_on(key, token, fingerprint, value, ttl, false)
            .await
    }

    /// [`complete_now`](Self::complete_now), on the reserve connection when the pool has no
    /// idle one (`reserved`).
    async fn complete_on(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
        reserved: bool,
    ) -> Result<Completion, Error> {
        self.ready().await?;
        let asked = Instant::now();
        let ttl_left = ttl;
        let key_bytes = &key.as_bytes()[..];
        let token_bytes = token_bytes(token);
        let ttl = micros(ttl);
        let value = &value[..];
        let lock = self.lock_id(key);
        let fp = fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let params: &Params<'_> = &[
            (&key_bytes, Type::BYTEA),
            (&&token_bytes[..], Type::BYTEA),
            (&value, Type::BYTEA),
            (&ttl, Type::FLOAT8),
            (&lock, Type::INT8),
            (&fp, Type::BYTEA),
        ];
        let stored = self
            .gated_on("complete", &self.inner.sql.complete, params, reserved)
            .await?;
        if stored == 1 {
            let seen = Seen {
                token: Some(token),
                expires: after(asked, ttl_left),
            };
            self.inner.known.insert(&key, seen);
        }
        Ok(if stored == 1 {
            Completion::Stored
        } else {
            Completion::LeaseLost
        })
    }

    /// [`Store::complete_on_drop`]'s task (see [`super::complete_in_background`]).
    async fn complete_in_background(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        let attempt = || self.complete_now(key, token, fingerprint, value.clone(), ttl);
        super::complete_in_background(key, attempt, worth_retrying).await;
    }

    async fn record_step_now(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> Result<StepRecorded, Error> {
        self.ready().await?;
        let key_bytes = &key.as_bytes()[..];
        let token_bytes = token_bytes(token);
        let name = step.as_bytes();
        let value = &value[..];
        let ttl = micros(ttl);
        let lock = self.lock_id(key);
        let params: &Params<'_> = &[
            (&key_bytes, Type::BYTEA),
            (&&token_bytes[..], Type::BYTEA),
            (&name, Type::BYTEA),
            (&value, Type::BYTEA),
            (&ttl, Type::FLOAT8),
            (&lock, Type::INT8),
        ];
        let op = "record_step";
        let deadline = after(Instant::now(), self.inner.timeout);
        let mut pause = FIRST_POLL;
        loop {
            match self
                .gated_until(op, &self.inner.sql.record_step, params, false, deadline)
                .await?
            {
                1 => return Ok(StepRecorded::Recorded),
                0 => return Ok(StepRecorded::LeaseLost),
                _ => {}
            }
            // The key's steps all expired and their rows are still there: they go first (see
            // `Sql::new`), then the step is recorded as the first of a new set.
            let key_params: &Params<'_> = &[(&key_bytes, Type::BYTEA), (&lock, Type::INT8)];
            let cleared = self
                .clear_steps(op, &self.inner.sql.lock_key_steps, key_params)
                .await
                .map_err(|failure| failure.into_error(self, op))?;
            if cleared.1.is_none() {
                // Another caller holds the key lock: as `gated` does.
                if Instant::now() + pause >= deadline {
                    return Err(Error::store(KeyLocked {
                        op,
                        after: self.inner.timeout,
                    }));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_POLL);
            }
        }
    }

    async fn steps_now(&self, key: Key, token: Token) -> Result<RecordedSteps, Error> {
        self.ready().await?;
        let key_bytes = &key.as_bytes()[..];
        let token_bytes = token_bytes(token);
        let params: &Params<'_> = &[(&key_bytes, Type::BYTEA), (&&token_bytes[..], Type::BYTEA)];
        let rows = self
            .query("steps", &self.inner.sql.steps, params)
            .await
            .map_err(|failure| failure.into_error(self, "steps"))?;
        let Some(first) = rows.first() else {
            return Ok(RecordedSteps::LeaseLost);
        };
        let ours: bool = first.try_get(0).map_err(Error::store)?;
        if !ours {
            return Ok(RecordedSteps::KeyReused);
        }
        let mut steps = Vec::with_capacity(rows.len());
        for row in &rows {
            let name: Option<Vec<u8>> = row.try_get(1).map_err(Error::store)?;
            let value: Option<Vec<u8>> = row.try_get(2).map_err(Error::store)?;
            // One row of NULLs: the key holds no live steps.
            let (Some(name), Some(value)) = (name, value) else {
                continue;
            };
            let name = String::from_utf8(name)
                .map_err(|_| Error::store(Corrupt("a step name is not UTF-8")))?;
            steps.push((name, Bytes::from(value)));
        }
        Ok(RecordedSteps::Held(steps))
    }

    /// Hands `work`, given a clone of the store, to the current tokio runtime: what the
    /// `*_on_drop` methods, called from destructors, do instead of waiting. Without a runtime
    /// nothing is done (a claim is then left to its lease).
    fn in_background<F, Fut>(&self, work: F)
    where
        F: FnOnce(PostgresStore) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(work(self.clone()));
        }
    }

    async fn wait_for(&self, key: Key, timeout: Duration) -> Result<(), Error> {
        let deadline = after(Instant::now(), timeout);
        let key_bytes = &key.as_bytes()[..];
        let lock = self.lock_id(key);
        let params: &Params<'_> = &[(&key_bytes, Type::BYTEA), (&lock, Type::INT8)];
        // Registered before the first look at the record, so that a completion between the look
        // and the sleep is not missed.
        let mut subscription = self
            .listener()
            .map(|listener| listener.shared.subscribe(*key.as_bytes()));
        let wait_lock = self.wait_lock_id(key);
        let mut pause = FIRST_POLL;
        loop {
            // Both registered before the subscription is armed and the record is looked at.
            let notify = subscription.as_ref().map(|s| Arc::clone(&s.notify));
            let notified = notify.as_ref().map(|n| n.notified());
            tokio::pin!(notified);
            let changed = self.listener().map(|l| l.shared.changed.notified());
            tokio::pin!(changed);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            if let Some(c) = changed.as_mut().as_pin_mut() {
                c.enable();
            }
            let armed = match subscription.as_mut() {
                Some(subscription) => subscription.arm(wait_lock).await,
                None => Armed::No,
            };
            let mut nap = match armed {
                Armed::Yes => NOTIFIED_POLL,
                Armed::Contended => FIRST_POLL,
                Armed::No => pause,
            };
            match self.poll_wait(params).await? {
                Some(None) => return Ok(()),
                // A holder that stops renewing loses its lease: look again when it runs out.
                Some(Some(left)) => nap = nap.min(from_micros(left) + Duration::from_millis(1)),
                // Skipped (no idle connection): a notification may have come meanwhile and
                // been missed by no one, but the record was not seen; look again soon.
                None => nap = nap.min(pause),
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            let sleep = tokio::time::sleep(nap.min(deadline - now));
            let woken = async {
                match (notified.as_pin_mut(), changed.as_pin_mut()) {
                    (Some(n), Some(c)) => tokio::select! {
                        () = n => true,
                        () = c => false,
                    },
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                notified = woken => {
                    if notified {
                        // The key's record left `InProgress` when its writer committed: the
                        // caller claims again (one statement), no poll needed.
                        self.inner.notified.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    // The listening connection came or went: arm again, or poll.
                }
                () = sleep => {}
            }
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// One poll of a waited-for key: `None` when no connection was idle (the poll is skipped, so
    /// waiters never get ahead of claims of other keys), `Some(None)` when the key is no longer
    /// held, `Some(Some(us))` with the lease left of a live claim, or `Some(Some(i64::MAX))`
    /// for a claim still in flight (its key lock taken, its row not visible yet).
    async fn poll_wait(&self, params: &Params<'_>) -> Result<Option<Option<i64>>, Error> {
        let Some(conn) = self.idle_connection().await? else {
            return Ok(None);
        };
        self.inner.polls.fetch_add(1, Ordering::Relaxed);
        let poll = run(
            On::Pooled(&conn),
            self.inner.prepared,
            &self.inner.sql.wait,
            params,
        );
        match tokio::time::timeout(self.inner.timeout, poll).await {
            Ok(Ok(rows)) => {
                let Some(row) = rows.first() else {
                    return Err(Error::store(Corrupt("the wait poll returned no row")));
                };
                let left: Option<i64> = row.try_get(0).map_err(Error::store)?;
                let free: bool = row.try_get(1).map_err(Error::store)?;
                Ok(match left {
                    Some(left) => Some(Some(left)),
                    None if free => Some(None),
                    None => Some(Some(i64::MAX)),
                })
            }
            Ok(Err(err)) if is_conflict(&err) => Ok(None),
            Ok(Err(err)) => Err(self.db_error("wait", err)),
            Err(_) => {
                drop(Object::take(conn));
                Err(self.timed_out("wait"))
            }
        }
    }

    /// The store's listening connection, started on first use; `None` for a store that polls.
    fn listener(&self) -> Option<&Listener> {
        let config = self.inner.listen_config.as_ref()?;
        self.inner
            .listener
            .get_or_init(|| {
                Listener::start(
                    config.clone(),
                    self.inner.channel.clone(),
                    self.inner.timeout,
                )
            })
            .as_ref()
    }

    /// The wait lock of `key` in this table (see `listener`): the digest's bytes 9 to 16, as
    /// the statements compute it (`wake_sql`).
    fn wait_lock_id(&self, key: Key) -> i64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&key.as_bytes()[8..16]);
        i64::from_be_bytes(bytes) ^ self.inner.wait_salt
    }

    /// What this store's waiters did so far: polls, wakes by a notification, and how many times
    /// its listening connection started listening (see the [module docs](self#waiting)).
    pub fn wait_stats(&self) -> WaitStats {
        let listener_connections = self
            .inner
            .listener
            .get()
            .and_then(Option::as_ref)
            .map_or(0, |l| l.shared.connections.load(Ordering::Relaxed));
        WaitStats {
            polls: self.inner.polls.load(Ordering::Relaxed),
            notified: self.inner.notified.load(Ordering::Relaxed),
            listener_connections,
        }
    }

    /// The `NOTIFY` channel of this store's table: `idem_` and 16 hex digits derived from the
    /// schema and table names. Each notification's payload is a key's digest in hex.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Counts a granted claim and, when the store's automatic cleanup is due (see
    /// [`PostgresStoreBuilder::cleanup_every`]), starts it in the background.
    fn granted(&self) {
        let Some(cleanup) = self.inner.cleanup else {
            return;
        };
        let grants = self.inner.grants.fetch_add(1, Ordering::Relaxed) + 1;
        let due = grants >= cleanup.claims || {
            let last = self
                .inner
                .last_cleanup
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            last.elapsed() >= cleanup.interval
        };
        if !due || self.inner.cleaning.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.inner.cleaning.store(false, Ordering::Release);
            return;
        };
        self.inner.grants.store(0, Ordering::Relaxed);
        *self
            .inner
            .last_cleanup
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let store = self.clone();
        handle.spawn(async move {
            match store.purge_some(CLEANUP_BATCHES).await {
                Ok(deleted) => {
                    tracing::debug!(target: "idem", table = %store.qualified_table(), deleted, "deleted expired rows");
                }
                Err(err) => {
                    tracing::warn!(
                        target: "idem", table = %store.qualified_table(), error = %err,
                        "could not delete expired rows; the next cleanup tries again"
                    );
                }
            }
            store.inner.cleaning.store(false, Ordering::Release);
        });
    }
}

/// Whether the transaction is still the one a transactional call opened (its `idem.tx` marker is
/// set): a body may have ended it with COMMIT or ROLLBACK.
async fn still_ours(tx: &Transaction<'_>, marker: &str) -> Result<bool, tokio_postgres::Error> {
    let rows = tx
        .query_typed(
            "SELECT pg_catalog.current_setting('idem.tx', true) IS NOT DISTINCT FROM $1",
            &[(&marker, Type::TEXT)],
        )
        .await?;
    Ok(rows
        .first()
        .and_then(|row| row.try_get::<_, bool>(0).ok())
        .unwrap_or(false))
}

/// The `idle_in_transaction_session_timeout` of a transactional call, in milliseconds: its lease
/// (at least 1 ms, at most what the setting holds).
fn idle_limit_ms(lease: Duration) -> u128 {
    lease.as_millis().clamp(1, i32::MAX as u128)
}

/// Keeps a transactional body's transaction from looking idle to the server, polled beside the
/// body until it returns: an empty statement every third of the lease while the body awaits
/// something other than the database. So the server's idle-in-transaction limit (the lease, see
/// [`Transactional::lease`]) ends only the transaction of a holder that is no longer polled,
/// like the executor's renewal, which this future drives too.
///
/// Each beat also checks that the transaction is still the call's own (`marker`): a body that
/// ran `COMMIT` itself committed the claim with its lease, which no beat extends any more, so
/// `seal` runs at once (see `PostgresStore::seal_ended`) rather than when the body returns,
/// which may be after the lease ran out and another caller ran the body again.
async fn heartbeat<S: Future<Output = ()>>(
    tx: &Transaction<'_>,
    lease: Duration,
    marker: &str,
    seal: S,
) {
    let every = (lease / 3).max(Duration::from_millis(3));
    let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Queued behind the body's own statement if one is running. In a transaction that a
        // failed statement of the body aborted, the beat fails too, but it still counts as the
        // session's activity, and the body may recover (`ROLLBACK TO SAVEPOINT`): keep beating.
        // Any other failure (the connection is gone) is the body's to meet: stop.
        match still_ours(tx, marker).await {
            Ok(true) => {}
            Ok(false) => {
                seal.await;
                break;
            }
            Err(err) if err.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {}
            Err(_) => break,
        }
    }
}

/// Whether a failed operation may succeed if run again later: the server did not answer (down,
/// restarting, unreachable: no SQLSTATE), the operation timed out or met the key lock, or the
/// server answered with an error of a class that passes (a connection failure, a shutdown,
/// resources, a conflict, a read-only server being promoted, ...). Not: a refused setting, an
/// unreadable record, or an error the same statement meets again (data, integrity,
/// authorization, a missing database or schema, syntax or privileges, program limits,
/// internal errors).
fn worth_retrying(err: &Error) -> bool {
    let Error::Store(source) = err else {
        return false;
    };
    if let Some(db) = source.downcast_ref::<DbFailure>() {
        return match db.source.code() {
            None => true,
            Some(code) => {
                let class = code.code().get(..2).unwrap_or("");
                !matches!(
                    class,
                    "0A" | "22" | "23" | "28" | "2B" | "3D" | "3F" | "42" | "54" | "XX"
                )
            }
        };
    }
    source.is::<TimedOut>()
        || source.is::<KeyLocked>()
        || matches!(
            source.downcast_ref::<PoolError>(),
            Some(PoolError::Timeout(_))
        )
}

/// Applies an [`IfUnsafe`] choice to one risky setting.
fn judge(on_risk: IfUnsafe, warned: &AtomicBool, why: String) -> Verdict {
    match on_risk {
        IfUnsafe::Refuse => Err(Refused(why)),
        IfUnsafe::Warn => {
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(target: "idem", "{why}");
            }
            Ok(())
        }
        IfUnsafe::Accept => Ok(()),
    }
}

/// Whether a DDL failure is a concurrent creator's doing (it created the schema, table or
/// index between our check and our `CREATE`), so running the migration again finds it done.
fn concurrent_ddl(e: &tokio_postgres::Error) -> bool {
    is_conflict(e)
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::UNIQUE_VIOLATION
                || *c == SqlState::DUPLICATE_SCHEMA
                || *c == SqlState::DUPLICATE_TABLE
                || *c == SqlState::DUPLICATE_OBJECT
        )
}

/// A claim statement that may have reached the server: dropped before its answer was read (the
/// call was cancelled), it releases the claim on the same connection, which runs it after the
/// claim statement, so the key is not left held until its lease runs out.
struct ClaimInFlight<'s> {
    store: &'s PostgresStore,
    key: Key,
    token: Token,
    conn: Option<Object>,
}

impl ClaimInFlight<'_> {
    fn conn(&self) -> &Object {
        // Set at construction and only taken by `settle` or `drop`.
        self.conn
            .as_ref()
            .unwrap_or_else(|| unreachable!("the connection of a claim in flight"))
    }

    /// The answer was read: nothing to undo. Gives the connection back.
    fn settle(&mut self) -> Option<Object> {
        self.conn.take()
    }
}

impl Drop for ClaimInFlight<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return; // the claim is left to its lease
        };
        let (store, key, token) = (self.store.clone(), self.key, self.token);
        handle.spawn(async move {
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let lock = store.lock_id(key);
            let params: &Params<'_> = &[
                (&key_bytes, Type::BYTEA),
                (&&token_bytes[..], Type::BYTEA),
                (&lock, Type::INT8),
            ];
            // Same connection: the server runs this after the claim statement, if it was sent.
            let first = tokio::time::timeout(
                store.inner.timeout,
                run(
                    On::Pooled(&conn),
                    store.inner.prepared,
                    &store.inner.sql.release,
                    params,
                ),
            )
            .await;
            let done = matches!(&first, Ok(Ok(rows)) if matches!(read_gated(rows), Ok(Some(_))));
            if first.is_err() {
                drop(Object::take(conn));
            } else {
                drop(conn);
            }
            if !done && let Err(err) = store.release(key, token).await {
                tracing::warn!(
                    target: "idem", key = %key, error = %err,
                    "could not release the claim of a cancelled call; it frees when its lease \
                     runs out"
                );
            }
        });
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("PostgresStore")
            .field("table", &self.qualified_table())
            .field("timeout", &self.inner.timeout)
            .field("transaction_pooler", &!self.inner.prepared)
            .field("pool_size", &status.size)
            .field("pool_max_size", &status.max_size)
            .finish()
    }
}

impl Store for PostgresStore {
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        Box::pin(self.claim_now(key, fingerprint, lease))
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(self.complete_now(key, token, fingerprint, value, ttl))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            self.ready().await?;
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let lease = micros(lease);
            let lock = self.lock_id(key);
            let params: &Params<'_> = &[
                (&key_bytes, Type::BYTEA),
                (&&token_bytes[..], Type::BYTEA),
                (&lease, Type::FLOAT8),
                (&lock, Type::INT8),
            ];
            // Never behind the pool: see `Inner::reserve`.
            let renewed = self
                .gated_on("renew", &self.inner.sql.renew, params, true)
                .await?;
            Ok(renewed == 1)
        })
    }

    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            self.ready().await?;
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let lock = self.lock_id(key);
            let params: &Params<'_> = &[
                (&key_bytes, Type::BYTEA),
                (&&token_bytes[..], Type::BYTEA),
                (&lock, Type::INT8),
            ];
            let deleted = self
                .gated("release", &self.inner.sql.release, params)
                .await?;
            Ok(deleted == 1)
        })
    }

    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.wait_for(key, timeout))
    }

    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            self.inner.known.forget(&key);
            self.ready().await?;
            let key_bytes = &key.as_bytes()[..];
            let lock = self.lock_id(key);
            let params: &Params<'_> = &[(&key_bytes, Type::BYTEA), (&lock, Type::INT8)];
            let deleted = self.gated("remove", &self.inner.sql.remove, params).await?;
            Ok(deleted > 0)
        })
    }

    /// PostgreSQL's largest `bytea` value, 1 GB.
    fn max_value_len(&self) -> Option<usize> {
        Some((1 << 30) - 1)
    }

    /// One statement (see [the module docs](self#steps)): under the key lock, and only while
    /// `token` holds the key with a live lease. Where the key's expired steps are still there,
    /// a transaction of two statements clears them first.
    fn record_step(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        Box::pin(self.record_step_now(key, token, step, value, ttl))
    }

    /// One statement, a read (see [the module docs](self#steps)).
    fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        Box::pin(self.steps_now(key, token))
    }

    /// Hands the release to the current tokio runtime, if there is one; otherwise (or if it
    /// fails) the claim frees when its lease runs out.
    fn release_on_drop(&self, key: Key, token: Token) {
        self.in_background(move |store| async move {
            super::record_steps_then_release(
                &store,
                key,
                token,
                Vec::new(),
                Duration::ZERO,
                worth_retrying,
            )
            .await;
        });
    }

    /// Hands the completion to the current tokio runtime, if there is one: called when a call
    /// whose body returned `Ok` is dropped while it stores the result, and when storing it
    /// failed. It follows the rule of [`complete`](Store::complete), so a completion that
    /// already landed is recognised as itself and the first value stays; while the server is
    /// unreachable or answers with an error that can pass, it is tried again with backoff (50 ms
    /// doubling to 1 s) for up to a minute. Without a runtime, or once that minute is over, the
    /// claim is left to its lease.
    fn complete_on_drop(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        self.in_background(move |store| async move {
            store
                .complete_in_background(key, token, fingerprint, value, ttl)
                .await;
        });
    }

    /// Hands the steps and then the release to the current tokio runtime, if there is one, in
    /// that order: each step is recorded as [`record_step`](Store::record_step) does (fenced by
    /// `token`; the first value of a step already recorded stays), tried again like a
    /// background completion (with backoff, for up to a minute in all) while the server is
    /// unreachable or answers with an error that can pass; then the claim is released as
    /// [`release_on_drop`](Store::release_on_drop) does. Without a runtime nothing is
    /// recorded, and the claim is left to its lease, as `release_on_drop` leaves it.
    fn release_on_drop_after_steps(
        &self,
        key: Key,
        token: Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        self.in_background(move |store| async move {
            super::record_steps_then_release(&store, key, token, steps, ttl, worth_retrying).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked() {
        for good in ["idem_records", "_x", "Records2", "a"] {
            assert!(check_ident("table", good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_IDENT + 1);
        for bad in [
            "",
            "1abc",
            "a-b",
            "a\"b",
            "a;DROP TABLE x",
            "a b",
            "é",
            "a\0",
            long.as_str(),
        ] {
            assert!(check_ident("table", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_grant_is_short_when_the_claim_statement_waited() {
        let lease = Duration::from_secs(2);
        assert!(!short_grant(1_999_000, lease));
        assert!(short_grant(1_000_000, lease));
        assert!(short_grant(-843_000, lease), "granted already over");
        let tiny = Duration::from_millis(10);
        assert!(!short_grant(9_000, tiny));
        assert!(short_grant(7_000, tiny));
        assert!(!short_grant(i64::MAX, Duration::MAX), "no overflow");
    }

    #[test]
    fn bad_names_fail_at_build() {
        let pool_free = PostgresStore::builder()
            .table("x\"; DROP TABLE users; --")
            .on_url("postgres://localhost/db");
        assert!(matches!(pool_free, Err(Error::Store(_))));
    }
}
