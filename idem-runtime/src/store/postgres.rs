//! The PostgreSQL store: durable idempotency records, one SQL statement per step, and a
//! transactional mode in which the body's own writes commit together with the record.
//!
//! # The table
//!
//! [`PostgresStore::migrate`] creates it (idempotently; several processes may call it at once at
//! start-up). [`PostgresStore::migration_sql`] returns the same DDL for teams that run
//! migrations with their own tool. With the default names it is:
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
//! ```
//!
//! - `key` is the 32-byte digest of the idempotency key ([`Key`]); no client-chosen text ever
//!   reaches the table or an SQL string. `token` is the claim's fencing [`Token`] (16 bytes,
//!   big-endian).
//! - `value IS NULL` means *in progress*, and `expires_at` is then the end of the lease;
//!   otherwise the record is *completed* and `expires_at` is when it is forgotten.
//! - The schema and table names are configurable ([`PostgresStoreBuilder::schema`],
//!   [`PostgresStoreBuilder::table`]); they must be plain identifiers (`[A-Za-z_][A-Za-z0-9_]*`,
//!   at most 48 bytes), are checked when the store is built and always appear double-quoted.
//!
//! # Statements
//!
//! Every [`Store`] operation is one SQL statement (one round trip once the statement is
//! prepared on the pooled connection; prepared statements are cached per connection). Time is
//! always the database's (`statement_timestamp()`), never the client's clock.
//!
//! - **claim**: one statement whose first CTE reads the live row; only when there is none does
//!   it `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <the row expired> RETURNING`. A replay
//!   (completed record) costs that one statement and writes nothing: it takes no row lock and
//!   flushes no WAL, which an `ON CONFLICT DO UPDATE` whose `WHERE` fails would. When the conflicting row was committed
//!   after the statement's snapshot was taken, `ON CONFLICT` sees it but the `SELECT` does not and
//!   the statement returns no row: the store then runs the statement again (with a new snapshot,
//!   which sees the row). That race is exercised by the concurrency tests.
//! - **complete / renew / release**: an `UPDATE` or `DELETE` whose `WHERE` names the key, the
//!   claim's token and `value IS NULL`, so a holder whose lease was taken over changes nothing.
//! - **remove**: `DELETE ... WHERE key = $1`.
//!
//! # Expired rows
//!
//! A claim takes over an expired row in place, so keys that are reused never pile up. Rows of
//! keys that never come back are deleted by [`PostgresStore::purge_expired`], in batches that
//! the index on `expires_at` keeps cheap; schedule it (for example every few minutes, from one
//! process or all of them: batches skip rows another purge has locked).
//!
//! # Waiting
//!
//! [`Store::wait`] polls the row with a bounded exponential backoff (5 ms doubling up to 200 ms,
//! never past the holder's lease nor the caller's timeout), one indexed primary-key lookup per
//! poll. `LISTEN/NOTIFY` was not chosen: it needs a dedicated connection per store outside the
//! pool (with its own reconnection logic), does not work through PgBouncer in transaction mode,
//! and cannot be set up on a pool the application hands in; waits only happen between
//! concurrent duplicates, where a few milliseconds of latency do not matter.
//!
//! # Timeouts and failures
//!
//! Every operation is bounded on the client by [`PostgresStoreBuilder::timeout`]
//! ([`DEFAULT_TIMEOUT`]: getting a pooled connection plus running the statement); a connection
//! whose statement timed out is dropped, not returned to the pool. A store built from a URL
//! also sets, on its own connections, `connect_timeout` ([`DEFAULT_CONNECT_TIMEOUT`]),
//! `statement_timeout` ([`DEFAULT_STATEMENT_TIMEOUT`]) and `lock_timeout`
//! ([`DEFAULT_LOCK_TIMEOUT`]). A server that is down, refuses connections, times out or answers
//! with an error gives [`Error::Store`] with the driver's error as its source; nothing here
//! panics on what the server returns.
//!
//! A claim that waits on a row lock (another caller's transactional mode holds the key and has
//! not committed) for longer than `lock_timeout` is reported as [`Claim::Busy`], so callers wait
//! or reject as for any in-progress key.
//!
//! # Transactional mode
//!
//! [`PostgresStore::transactional`]: when the body's effect is writes to the same database, the
//! claim, the body's writes and the completed record commit in one transaction, so a crash can
//! never leave the effect without its record nor the record without its effect. See
//! [`Transactional`].
//!
//! Only plain TCP or Unix-socket connections are made by [`PostgresStore::from_url`]; for TLS,
//! build a [`deadpool_postgres::Pool`] with a TLS connector and use
//! [`PostgresStore::from_pool`].

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row, Transaction};

use super::{BoxFuture, Store};
use crate::error::Error;
use crate::exec::{
    OnConflict, Outcome, Policy, Status, Turn, decode_result, encode_result, fingerprint_matches,
    wait_turn,
};
use crate::key::{Fingerprint, Key, KeyPart};
use crate::record::{Claim, Completed, Completion, Token};

/// The `tokio-postgres` this store is built on, for naming [`tokio_postgres::Transaction`] and
/// its error type in transactional bodies without a version mismatch.
pub use tokio_postgres;

/// The `deadpool-postgres` this store is built on, for building a [`deadpool_postgres::Pool`]
/// to hand to [`PostgresStore::from_pool`].
pub use deadpool_postgres;

/// The schema of the records table unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "public";
/// The name of the records table unless told otherwise.
pub const DEFAULT_TABLE: &str = "idem_records";
/// The longest any one store operation (pool checkout plus statement) may take on the client:
/// 10 seconds. Past it the operation fails with [`Error::Store`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening a connection may take (stores built from a URL): 5 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The server-side `statement_timeout` of the store's own connections (stores built from a
/// URL): 30 seconds.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The server-side `lock_timeout` of the store's own connections (stores built from a URL): 5
/// seconds. A claim blocked on a row lock for longer is reported as busy.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections a store built from a URL opens: 16.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The longest identifier accepted for a schema or table name (the index name adds a suffix
/// and must stay within PostgreSQL's 63 bytes).
const MAX_IDENT: usize = 48;
/// How many times a claim statement is run when it returns no row (see the module docs).
const CLAIM_ATTEMPTS: usize = 16;
/// First and longest pause between two polls of [`Store::wait`].
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(200);
/// Rows deleted per statement by [`PostgresStore::purge_expired`].
const PURGE_BATCH: i64 = 10_000;
/// Leases and ttls are capped here so that `now() + ttl` stays within PostgreSQL's timestamps.
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// An idempotency store in PostgreSQL, on a `deadpool-postgres` connection pool.
///
/// Records survive restarts of the application and of the server, and are shared by every
/// process that points at the same table. Cloning is cheap and shares the pool.
///
/// See the [module documentation](self) for the table, the statements, cleanup, waiting,
/// timeouts and the transactional mode.
///
/// ```no_run
/// use idem_runtime::{Idempotent, store::postgres::PostgresStore};
///
/// # async fn run() -> Result<(), idem_runtime::Error> {
/// let store = PostgresStore::from_url("postgres://app@localhost/app")?;
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
    sql: Sql,
    timeout: Duration,
    /// What a claim that hit `lock_timeout` reports as the lease left.
    busy_hint: Duration,
}

/// The statements, built once from the validated, quoted table name.
struct Sql {
    claim: String,
    complete: String,
    renew: String,
    release: String,
    wait: String,
    remove: String,
    purge: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        Sql {
            // The live row is read first: a replay or a busy key then inserts nothing, so it
            // locks no row and writes no WAL (an `ON CONFLICT DO UPDATE ... WHERE false` would
            // lock the row, making every replay a write transaction with a commit flush).
            claim: format!(
                "WITH live AS ( \
                   SELECT r.value, r.fingerprint, r.expires_at FROM {table} r \
                   WHERE r.key = $1 AND r.expires_at > statement_timestamp() \
                 ), claimed AS ( \
                   INSERT INTO {table} AS r (key, token, fingerprint, value, expires_at) \
                   SELECT $1::bytea, $2::bytea, $3::bytea, NULL, \
                          statement_timestamp() + $4::float8 * interval '1 microsecond' \
                   WHERE NOT EXISTS (SELECT 1 FROM live) \
                   ON CONFLICT (key) DO UPDATE \
                     SET token = excluded.token, fingerprint = excluded.fingerprint, \
                         value = NULL, expires_at = excluded.expires_at \
                     WHERE r.expires_at <= statement_timestamp() \
                   RETURNING 1 \
                 ) \
                 SELECT true, NULL::bytea, NULL::bytea, 0::int8 FROM claimed \
                 UNION ALL \
                 SELECT false, l.value, l.fingerprint, \
                        (extract(epoch FROM l.expires_at - statement_timestamp()) * 1000000)::int8 \
                 FROM live l"
            ),
            complete: format!(
                "UPDATE {table} SET value = $3, \
                   expires_at = statement_timestamp() + $4::float8 * interval '1 microsecond' \
                 WHERE key = $1 AND token = $2 AND value IS NULL"
            ),
            renew: format!(
                "UPDATE {table} \
                 SET expires_at = statement_timestamp() + $3::float8 * interval '1 microsecond' \
                 WHERE key = $1 AND token = $2 AND value IS NULL"
            ),
            release: format!("DELETE FROM {table} WHERE key = $1 AND token = $2 AND value IS NULL"),
            wait: format!(
                "SELECT (extract(epoch FROM expires_at - statement_timestamp()) * 1000000)::int8 \
                 FROM {table} \
                 WHERE key = $1 AND value IS NULL AND expires_at > statement_timestamp()"
            ),
            remove: format!("DELETE FROM {table} WHERE key = $1"),
            purge: format!(
                "DELETE FROM {table} WHERE key IN ( \
                   SELECT key FROM {table} WHERE expires_at <= statement_timestamp() \
                   ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }
}

/// Builds a [`PostgresStore`] with names and timeouts other than the defaults.
///
/// ```no_run
/// use std::time::Duration;
/// use idem_runtime::store::postgres::PostgresStore;
///
/// # fn build() -> Result<(), idem_runtime::Error> {
/// let store = PostgresStore::builder()
///     .schema("billing")
///     .table("idempotency")
///     .timeout(Duration::from_secs(3))
///     .from_url("postgres://app@db.internal/app")?;
/// # let _ = store; Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `from_url` or `from_pool`"]
pub struct PostgresStoreBuilder {
    schema: String,
    table: String,
    timeout: Duration,
    connect_timeout: Duration,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    pool_size: usize,
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
    /// the URL sets `connect_timeout`). Only for [`from_url`](Self::from_url).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The server-side `statement_timeout` of the store's connections (`None`: the server's
    /// default). Only for [`from_url`](Self::from_url); options in the URL take precedence.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The server-side `lock_timeout` of the store's connections (`None`: the server's
    /// default, usually none, so a claim blocked by a transactional holder waits until it
    /// commits or [`timeout`](Self::timeout) runs out). Only for [`from_url`](Self::from_url);
    /// options in the URL take precedence.
    pub fn lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The most connections the pool opens ([`DEFAULT_POOL_SIZE`] unless set; at least one).
    /// Only for [`from_url`](Self::from_url).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// A store on a new pool for `url` (`postgres://user:password@host:port/db?...` or the
    /// `key=value` form libpq accepts). Connections are opened lazily: a bad URL fails here, an
    /// unreachable server on the first operation. No TLS; for TLS use
    /// [`from_pool`](Self::from_pool).
    pub fn from_url(self, url: &str) -> Result<PostgresStore, Error> {
        let mut config: tokio_postgres::Config = url.parse().map_err(Error::store)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.connect_timeout);
        }
        // Ours first, so that options the URL gives win.
        let mut options = String::new();
        if let Some(t) = self.statement_timeout {
            options.push_str(&format!("-c statement_timeout={} ", t.as_millis().max(1)));
        }
        if let Some(t) = self.lock_timeout {
            options.push_str(&format!("-c lock_timeout={} ", t.as_millis().max(1)));
        }
        if let Some(existing) = config.get_options() {
            options.push_str(existing);
        }
        let options = options.trim_end().to_owned();
        if !options.is_empty() {
            config.options(options);
        }
        if config.get_application_name().is_none() {
            config.application_name("idem");
        }
        let manager = Manager::from_config(
            config,
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
        let busy_hint = self.lock_timeout.unwrap_or(Duration::from_secs(1));
        self.build(pool, busy_hint)
    }

    /// A store on a pool the application already has (its TLS, sizes and session settings
    /// are used as they are). Give the pool a `runtime` if it has timeouts.
    pub fn from_pool(self, pool: Pool) -> Result<PostgresStore, Error> {
        self.build(pool, Duration::from_secs(1))
    }

    fn build(self, pool: Pool, busy_hint: Duration) -> Result<PostgresStore, Error> {
        check_ident("schema", &self.schema)?;
        check_ident("table", &self.table)?;
        let qualified = format!("\"{}\".\"{}\"", self.schema, self.table);
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&qualified),
                schema: self.schema,
                table: self.table,
                timeout: self.timeout,
                busy_hint,
            }),
        })
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
            "PostgreSQL did not complete `{}` within {:?}",
            self.op, self.after
        )
    }
}

impl std::error::Error for TimedOut {}

/// A row the store cannot read (written by something else, or corrupted).
#[derive(Debug)]
struct Corrupt(&'static str);

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable idempotency record: {}", self.0)
    }
}

impl std::error::Error for Corrupt {}

/// Why a statement failed: the driver (kept, so claim can recognise a lock timeout) or
/// anything else.
enum Failure {
    Db(tokio_postgres::Error),
    Other(Error),
}

impl Failure {
    fn is_lock_timeout(&self) -> bool {
        matches!(self, Failure::Db(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE))
    }

    fn into_error(self) -> Error {
        match self {
            Failure::Db(e) => Error::store(e),
            Failure::Other(e) => e,
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

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

/// Reads the row the claim statement returned (`None`: no row, run the statement again).
fn read_claim(rows: &[Row], token: Token) -> Result<Option<Claim>, Error> {
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let acquired: bool = row.try_get(0).map_err(Error::store)?;
    if acquired {
        return Ok(Some(Claim::Acquired(token)));
    }
    let value: Option<Vec<u8>> = row.try_get(1).map_err(Error::store)?;
    let fingerprint: Option<Vec<u8>> = row.try_get(2).map_err(Error::store)?;
    let left: Option<i64> = row.try_get(3).map_err(Error::store)?;
    let left = from_micros(left.unwrap_or(1));
    Ok(Some(match value {
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
    }))
}

impl PostgresStore {
    /// A store on a new connection pool for `url`, with the default table
    /// (`"public"."idem_records"`) and timeouts. See [`PostgresStoreBuilder::from_url`].
    pub fn from_url(url: &str) -> Result<PostgresStore, Error> {
        PostgresStoreBuilder::default().from_url(url)
    }

    /// A store on an existing pool, with the default table. See
    /// [`PostgresStoreBuilder::from_pool`].
    pub fn from_pool(pool: Pool) -> PostgresStore {
        let builder = PostgresStoreBuilder::default();
        let qualified = format!("\"{DEFAULT_SCHEMA}\".\"{DEFAULT_TABLE}\"");
        PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&qualified),
                schema: builder.schema,
                table: builder.table,
                timeout: builder.timeout,
                busy_hint: Duration::from_secs(1),
            }),
        }
    }

    /// A builder, for another schema, table, timeouts or pool size.
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder::default()
    }

    /// The connection pool (shared with the application if it handed it in).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The records table, schema-qualified and quoted as it appears in SQL.
    pub fn table(&self) -> String {
        format!("\"{}\".\"{}\"", self.inner.schema, self.inner.table)
    }

    /// The DDL that [`migrate`](Self::migrate) applies (without the schema creation and the
    /// lock), for running with a migration tool instead. Idempotent: every statement is
    /// `IF NOT EXISTS`.
    pub fn migration_sql(&self) -> String {
        let table = self.table();
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

    /// Creates the schema (if missing), the records table and its index, unless they exist.
    /// Safe to call from every process at start-up: concurrent calls serialise on an advisory
    /// lock, and when the table and index exist no DDL runs (so no table lock is taken while
    /// other processes use the table). Needs the privileges to create them; otherwise apply
    /// [`migration_sql`](Self::migration_sql) with an owner's role.
    pub async fn migrate(&self) -> Result<(), Error> {
        let mut conn = self.connection("migrate").await?;
        let run = async {
            let tx = conn.transaction().await?;
            let lock_name = self.table();
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1)::int8)",
                &[&lock_name],
            )
            .await?;
            let schema_exists: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    &[&self.inner.schema],
                )
                .await?
                .try_get(0)?;
            // Already there: no DDL at all, so no table lock that would queue behind open
            // transactional bodies (and hold up every claim queued behind it).
            let index = format!(
                "\"{}\".\"{}_expires_idx\"",
                self.inner.schema, self.inner.table
            );
            let present: bool = tx
                .query_one(
                    "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
                    &[&lock_name, &index],
                )
                .await?
                .try_get(0)?;
            if present {
                return tx.commit().await;
            }
            if !schema_exists {
                tx.batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                    self.inner.schema
                ))
                .await?;
            }
            tx.batch_execute(&self.migration_sql()).await?;
            tx.commit().await
        };
        run.await.map_err(Error::store)
    }

    /// Deletes every expired row (completed records past their ttl, and claims whose lease ran
    /// out long enough ago that no one took them over); returns how many. Runs in batches of
    /// 10 000 rows, each one statement using the `expires_at` index, skipping rows locked by a
    /// concurrent purge or claim. Schedule it, for example with `tokio::time::interval`.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let deleted = self
                .execute("purge_expired", &self.inner.sql.purge, &[&PURGE_BATCH])
                .await
                .map_err(Failure::into_error)?;
            total += deleted;
            if deleted < PURGE_BATCH.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    /// An idempotent call in transactional mode, keyed by `key`: see [`Transactional`].
    pub fn transactional<K: KeyPart>(&self, key: K) -> Transactional<'_, K> {
        Transactional {
            store: self,
            key,
            name: Cow::Borrowed(""),
            fingerprint: None,
            policy: Policy::new(),
            isolation: IsolationLevel::ReadCommitted,
        }
    }

    /// A pooled connection, within the store's timeout.
    async fn connection(&self, op: &'static str) -> Result<Object, Error> {
        match tokio::time::timeout(self.inner.timeout, self.inner.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(Error::store(err)),
            Err(_) => Err(self.timed_out(op)),
        }
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
        let deadline = crate::clock::after(Instant::now(), self.inner.timeout);
        let conn = self.connection(op).await.map_err(Failure::Other)?;
        let run = async {
            let statement = conn.prepare_cached(sql).await?;
            conn.query(&statement, params).await
        };
        match tokio::time::timeout_at(deadline, run).await {
            Ok(result) => result.map_err(Failure::Db),
            Err(_) => {
                drop(Object::take(conn));
                Err(Failure::Other(self.timed_out(op)))
            }
        }
    }

    /// Like [`query`](Self::query), for statements that return a row count.
    async fn execute(
        &self,
        op: &'static str,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<u64, Failure> {
        let deadline = crate::clock::after(Instant::now(), self.inner.timeout);
        let conn = self.connection(op).await.map_err(Failure::Other)?;
        let run = async {
            let statement = conn.prepare_cached(sql).await?;
            conn.execute(&statement, params).await
        };
        match tokio::time::timeout_at(deadline, run).await {
            Ok(result) => result.map_err(Failure::Db),
            Err(_) => {
                drop(Object::take(conn));
                Err(Failure::Other(self.timed_out(op)))
            }
        }
    }

    async fn claim_now(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let token = Token::generate();
        let token_bytes = token_bytes(token);
        let fp = fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let lease = micros(lease);
        let key_bytes = &key.as_bytes()[..];
        for _ in 0..CLAIM_ATTEMPTS {
            let params: &Params<'_> = &[&key_bytes, &&token_bytes[..], &fp, &lease];
            match self.query("claim", &self.inner.sql.claim, params).await {
                Ok(rows) => {
                    if let Some(claim) = read_claim(&rows, token)? {
                        return Ok(claim);
                    }
                    // The conflicting row was committed after this statement's snapshot: run
                    // it again, with a snapshot that sees the row.
                }
                Err(failure) if failure.is_lock_timeout() => {
                    return Ok(Claim::Busy {
                        lease_left: self.inner.busy_hint,
                    });
                }
                Err(failure) => return Err(failure.into_error()),
            }
        }
        Err(Error::store(Corrupt(
            "the claim statement kept finding a row it could not read back",
        )))
    }

    async fn wait_for(&self, key: Key, timeout: Duration) -> Result<(), Error> {
        let deadline = crate::clock::after(Instant::now(), timeout);
        let key_bytes = &key.as_bytes()[..];
        let poll = async {
            let mut pause = FIRST_POLL;
            loop {
                let rows = self
                    .query("wait", &self.inner.sql.wait, &[&key_bytes])
                    .await
                    .map_err(Failure::into_error)?;
                let Some(row) = rows.first() else {
                    return Ok(());
                };
                let left: Option<i64> = row.try_get(0).map_err(Error::store)?;
                // A holder that stops renewing loses its lease: look again when it runs out.
                let nap = pause.min(from_micros(left.unwrap_or(1)) + Duration::from_millis(1));
                tokio::time::sleep(nap).await;
                pause = (pause * 2).min(MAX_POLL);
            }
        };
        match tokio::time::timeout_at(deadline, poll).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("PostgresStore")
            .field("table", &self.table())
            .field("timeout", &self.inner.timeout)
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
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async move {
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let ttl = micros(ttl);
            let value = &value[..];
            let params: &Params<'_> = &[&key_bytes, &&token_bytes[..], &value, &ttl];
            let updated = self
                .execute("complete", &self.inner.sql.complete, params)
                .await
                .map_err(Failure::into_error)?;
            Ok(if updated == 1 {
                Completion::Stored
            } else {
                Completion::LeaseLost
            })
        })
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let lease = micros(lease);
            let params: &Params<'_> = &[&key_bytes, &&token_bytes[..], &lease];
            let updated = self
                .execute("renew", &self.inner.sql.renew, params)
                .await
                .map_err(Failure::into_error)?;
            Ok(updated == 1)
        })
    }

    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let key_bytes = &key.as_bytes()[..];
            let token_bytes = token_bytes(token);
            let params: &Params<'_> = &[&key_bytes, &&token_bytes[..]];
            let deleted = self
                .execute("release", &self.inner.sql.release, params)
                .await
                .map_err(Failure::into_error)?;
            Ok(deleted == 1)
        })
    }

    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.wait_for(key, timeout))
    }

    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let key_bytes = &key.as_bytes()[..];
            let deleted = self
                .execute("remove", &self.inner.sql.remove, &[&key_bytes])
                .await
                .map_err(Failure::into_error)?;
            Ok(deleted > 0)
        })
    }

    /// Hands the release to the current tokio runtime, if there is one; otherwise (or if it
    /// fails) the claim frees when its lease runs out.
    fn release_on_drop(&self, key: Key, token: Token) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.clone();
            handle.spawn(async move {
                if let Err(err) = store.release(key, token).await {
                    tracing::warn!(
                        target: "idem", key = %key, error = %err,
                        "could not release a dropped claim; it frees when its lease runs out"
                    );
                }
            });
        }
    }
}

/// An idempotent call in transactional mode: the claim, the body's writes and the completed
/// record commit in one PostgreSQL transaction. Made by [`PostgresStore::transactional`].
///
/// The body receives the [`Transaction`] and does its writes through it. Then:
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
/// **What it costs:** the claim's row lock is held until commit, and the transaction holds a
/// pooled connection for the whole body. A concurrent caller of the same key (transactional or
/// not) blocks in its claim on that row lock until the holder commits (then it replays) or
/// rolls back (then it runs); past the connections' `lock_timeout` it sees the key busy and
/// waits or rejects per `on_conflict`, like for any in-progress key. Keep the body short, and
/// mind `idle_in_transaction_session_timeout` if it awaits anything but the database. The
/// lease does not apply while the transaction is open (the row lock protects the claim). The
/// connection's `statement_timeout` and `lock_timeout` (see [`PostgresStoreBuilder`]) apply to
/// the body's statements too.
///
/// ```no_run
/// use idem_runtime::store::postgres::PostgresStore;
///
/// # async fn handle(store: &PostgresStore, order_id: i64) -> Result<(), idem_runtime::Error> {
/// let outcome = store
///     .transactional(("orders.record", order_id))
///     .name("inbox.v1")
///     .run_with_outcome(move |tx| {
///         Box::pin(async move {
///             tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&order_id])
///                 .await
///                 .map_err(idem_runtime::Error::store)?;
///             Ok::<_, idem_runtime::Error>(order_id)
///         })
///     })
///     .await?;
/// println!("{:?}", outcome.status); // Executed the first time, Replayed after
/// # Ok(()) }
/// ```
#[must_use = "a transactional call does nothing until `run` is awaited"]
pub struct Transactional<'s, K> {
    store: &'s PostgresStore,
    key: K,
    name: Cow<'static, str>,
    fingerprint: Option<Fingerprint>,
    policy: Policy,
    isolation: IsolationLevel,
}

/// Emits the one `tracing` event of a transactional call, like the executor does.
macro_rules! outcome {
    ($level:ident, $name:expr, $key:expr, $outcome:expr $(, $($rest:tt)*)?) => {
        tracing::event!(
            target: "idem",
            tracing::Level::$level,
            outcome = $outcome,
            name = &*$name,
            key = %$key,
            transactional = true,
            $($($rest)*)?
        )
    };
}

/// How one attempt of a transactional call ended.
enum Attempt<T, E> {
    Done(Result<Outcome<T>, E>),
    Busy(Duration),
}

impl<K: KeyPart> Transactional<'_, K> {
    /// The namespace of the key (the empty one unless set). Same name and key as an
    /// [`Idempotent`](crate::Idempotent) call → same record.
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// How long the result is remembered ([`DEFAULT_TTL`](crate::DEFAULT_TTL) unless set).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = ttl;
        self
    }

    /// The lease written with the claim ([`DEFAULT_LEASE`](crate::DEFAULT_LEASE) unless set).
    /// It only matters if the claim were ever visible uncommitted, which it is not; kept for
    /// symmetry with the executor.
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

    /// The isolation level of the transaction (`READ COMMITTED` unless set). Under
    /// `REPEATABLE READ` or `SERIALIZABLE`, a concurrent duplicate may fail with a
    /// serialization error ([`Error::Store`]) instead of waiting; retry it.
    pub fn isolation_level(mut self, level: IsolationLevel) -> Self {
        self.isolation = level;
        self
    }

    /// Runs `body` in the transaction at most once per key while the record lives, and returns
    /// its value or the first call's.
    pub async fn run<T, E, F>(self, body: F) -> Result<T, E>
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        self.run_with_outcome(body).await.map(|o| o.value)
    }

    /// Like [`run`](Self::run), and also says whether the value was executed or replayed and
    /// how long the record lives.
    pub async fn run_with_outcome<T, E, F>(self, body: F) -> Result<Outcome<T>, E>
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        // The executor's bounds, so a zero or huge ttl means here what it means there.
        let this = Transactional {
            policy: self.policy.bounded(),
            ..self
        };
        let key = Key::new(&this.name, &this.key);
        let mut deadline = None;
        let mut waited = false;
        let mut body = Some(body);
        loop {
            match this.attempt(key, waited, &mut body).await {
                Attempt::Done(result) => return result,
                Attempt::Busy(lease_left) => {
                    match wait_turn(this.store, key, &this.policy, &mut deadline).await {
                        Turn::ClaimAgain => waited = true,
                        Turn::Rejected => {
                            outcome!(INFO, this.name, key, "rejected", waited);
                            return Err(Error::InProgress {
                                retry_after: lease_left,
                            }
                            .into());
                        }
                        Turn::Failed(err) => {
                            outcome!(WARN, this.name, key, "store_error", error = %err, step = "wait");
                            return Err(err.into());
                        }
                    }
                }
            }
        }
    }

    /// One transaction: claim, then replay, report busy, or run the body and commit.
    async fn attempt<T, E, F>(&self, key: Key, waited: bool, body: &mut Option<F>) -> Attempt<T, E>
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        let mut conn = match self.store.connection("transaction").await {
            Ok(conn) => conn,
            Err(err) => {
                outcome!(WARN, self.name, key, "store_error", error = %err, step = "begin");
                return Attempt::Done(Err(err.into()));
            }
        };
        let (attempt, discard) = self.in_transaction(&mut conn, key, waited, body).await;
        if discard {
            // A statement timed out: the connection may still be busy with it, so it is closed
            // rather than handed to the next caller.
            drop(Object::take(conn));
        }
        attempt
    }

    /// [`attempt`](Self::attempt) on a connection; also says whether to discard it.
    async fn in_transaction<T, E, F>(
        &self,
        conn: &mut Object,
        key: Key,
        waited: bool,
        body: &mut Option<F>,
    ) -> (Attempt<T, E>, bool)
    where
        F: for<'t> FnOnce(&'t Transaction<'t>) -> BoxFuture<'t, Result<T, E>>,
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error>,
    {
        let store = self.store;
        let limit = store.inner.timeout;
        let fail = |step: &'static str, err: Error| {
            outcome!(WARN, self.name, key, "store_error", error = %err, step);
            (Attempt::Done(Err(err.into())), false)
        };
        let discard = |step: &'static str| {
            let err = store.timed_out(step);
            outcome!(WARN, self.name, key, "store_error", error = %err, step);
            (Attempt::Done(Err(err.into())), true)
        };
        // The connection's statement cache, usable while the transaction borrows the connection.
        let cache = Arc::clone(&conn.statement_cache);
        let begun = tokio::time::timeout(
            limit,
            tokio_postgres::Client::build_transaction(conn)
                .isolation_level(self.isolation)
                .start(),
        )
        .await;
        let tx = match begun {
            Ok(Ok(tx)) => tx,
            Ok(Err(err)) => return fail("begin", Error::store(err)),
            Err(_) => return discard("begin"),
        };

        // Claim, in the transaction.
        let token = Token::generate();
        let token_bytes = token_bytes(token);
        let fp = self.fingerprint.as_ref().map(|f| &f.as_bytes()[..]);
        let lease = micros(self.policy.lease);
        let key_bytes = &key.as_bytes()[..];
        let mut claim = None;
        for _ in 0..CLAIM_ATTEMPTS {
            let params: &Params<'_> = &[&key_bytes, &&token_bytes[..], &fp, &lease];
            let run = async {
                let statement = cache.prepare(tx.client(), &store.inner.sql.claim).await?;
                tx.query(&statement, params).await
            };
            match tokio::time::timeout(limit, run).await {
                Ok(Ok(rows)) => match read_claim(&rows, token) {
                    Ok(Some(found)) => {
                        claim = Some(found);
                        break;
                    }
                    Ok(None) => {}
                    Err(err) => return fail("claim", err),
                },
                Ok(Err(err)) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    claim = Some(Claim::Busy {
                        lease_left: store.inner.busy_hint,
                    });
                    break;
                }
                Ok(Err(err)) => return fail("claim", Error::store(err)),
                Err(_) => return discard("claim"),
            }
        }
        let Some(claim) = claim else {
            return fail(
                "claim",
                Error::store(Corrupt(
                    "the claim statement kept finding a row it could not read back",
                )),
            );
        };

        match claim {
            Claim::Busy { lease_left } => {
                // Nothing was written; the rollback also clears a lock-timeout error.
                let _ = tokio::time::timeout(limit, tx.rollback()).await;
                (Attempt::Busy(lease_left), false)
            }
            Claim::Completed(done) => {
                let _ = tokio::time::timeout(limit, tx.rollback()).await;
                if !fingerprint_matches(self.fingerprint, done.fingerprint) {
                    outcome!(INFO, self.name, key, "key_reused");
                    return (Attempt::Done(Err(Error::KeyReused.into())), false);
                }
                match decode_result::<T>(&done.value) {
                    Ok(value) => {
                        let status = Status::replay(waited);
                        outcome!(DEBUG, self.name, key, status.as_str());
                        let outcome = Outcome {
                            value,
                            status,
                            expires_in: Some(done.expires_in),
                        };
                        (Attempt::Done(Ok(outcome)), false)
                    }
                    Err(err) => fail("decode", err),
                }
            }
            Claim::Acquired(_) => {
                let Some(body) = body.take() else {
                    // Unreachable: a body runs at most once, and an attempt that ran it returns.
                    return fail("claim", Error::store(Corrupt("the body was already run")));
                };
                let value = match body(&tx).await {
                    Ok(value) => value,
                    Err(err) => {
                        // Not memoized: the writes and the claim go away together.
                        if let Ok(Err(rollback)) = tokio::time::timeout(limit, tx.rollback()).await
                        {
                            tracing::warn!(
                                target: "idem", key = %key, error = %rollback,
                                "rollback after a failed transactional body failed; the server \
                                 discards the transaction when the connection closes"
                            );
                        }
                        outcome!(DEBUG, self.name, key, "executed", failed = true);
                        return (Attempt::Done(Err(err)), false);
                    }
                };
                let encoded = match encode_result(&value) {
                    Ok(bytes) => bytes,
                    Err(err) => {
                        let _ = tokio::time::timeout(limit, tx.rollback()).await;
                        return fail("encode", err);
                    }
                };
                let ttl = micros(self.policy.ttl);
                let encoded = &encoded[..];
                let params: &Params<'_> = &[&key_bytes, &&token_bytes[..], &encoded, &ttl];
                let finish = async {
                    let statement = cache
                        .prepare(tx.client(), &store.inner.sql.complete)
                        .await?;
                    let updated = tx.execute(&statement, params).await?;
                    Ok::<_, tokio_postgres::Error>(updated)
                };
                match tokio::time::timeout(limit, finish).await {
                    Ok(Ok(1)) => {}
                    Ok(Ok(_)) => {
                        let _ = tokio::time::timeout(limit, tx.rollback()).await;
                        return fail(
                            "complete",
                            Error::store(Corrupt("the claim vanished inside its own transaction")),
                        );
                    }
                    Ok(Err(err)) => return fail("complete", Error::store(err)),
                    Err(_) => return discard("complete"),
                }
                match tokio::time::timeout(limit, tx.commit()).await {
                    Ok(Ok(())) => {
                        outcome!(DEBUG, self.name, key, "executed");
                        let outcome = Outcome {
                            value,
                            status: Status::Executed,
                            expires_in: Some(self.policy.ttl),
                        };
                        (Attempt::Done(Ok(outcome)), false)
                    }
                    Ok(Err(err)) => fail("commit", Error::store(err)),
                    Err(_) => discard("commit"),
                }
            }
        }
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
    fn bad_names_fail_at_build() {
        let pool_free = PostgresStore::builder()
            .table("x\"; DROP TABLE users; --")
            .from_url("postgres://localhost/db");
        assert!(matches!(pool_free, Err(Error::Store(_))));
    }
}
