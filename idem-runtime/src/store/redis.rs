//! The Redis store (feature `redis`): records shared by many processes and machines.
//!
//! See [`RedisStore`] for what it promises and how it keeps records.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value};
use bytes::Bytes;
use tokio::time::Instant;

use super::{BoxFuture, Store};
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Completed, Completion, Token};

/// Lua shared by every script: reads the record under `KEYS[1]` and checks that it is ours.
///
/// A record is ours only if it is a hash whose `idem` field is the format version, `1`, with an
/// expiry and well-formed fields. `load(key, with_value)` returns `nil` for no record,
/// `false, why` for a value that is not an idem record (left untouched by every script), or a
/// table `{state, token, fp, ttl, value}`. It costs two commands on the hot paths (`HMGET` under
/// `pcall`, whose WRONGTYPE error marks a value that is not a hash, and `PTTL`): each
/// `redis.call` is several microseconds of server time, and the replay benchmark showed five.
const PRELUDE: &str = r#"
local function load(key, with_value)
  local f
  if with_value then
    f = redis.pcall('HMGET', key, 'idem', 'state', 'token', 'fp', 'value')
  else
    f = redis.pcall('HMGET', key, 'idem', 'state', 'token', 'fp')
  end
  if f.err then return false, 'not a hash' end
  if not f[1] and not f[2] and not f[3] and not f[4] then
    if redis.call('EXISTS', key) == 0 then return nil end
    return false, 'a hash without the idem record marker (idem = 1)'
  end
  if f[1] ~= '1' then return false, 'a hash without the idem record marker (idem = 1)' end
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then return false, 'a record without an expiry' end
  if f[2] ~= 'running' and f[2] ~= 'done' then return false, 'a record in an unknown state' end
  if not f[3] or #f[3] ~= 32 then return false, 'a record without a valid token' end
  if f[4] and #f[4] ~= 32 then return false, 'a record with a malformed fingerprint' end
  if f[2] == 'done' then
    local has_value
    if with_value then has_value = f[5] else has_value = redis.call('HEXISTS', key, 'value') == 1 end
    if not has_value then return false, 'a completed record without a value' end
  end
  return {state = f[2], token = f[3], fp = f[4] or '', ttl = ttl, value = f[5]}
end
"#;

/// claim(KEYS[1] = record, ARGV = token, lease ms, fingerprint or '').
///
/// A record that already holds this very token is this claim, retried after a lost reply: it is
/// acquired again (claims are idempotent).
const CLAIM: &str = r#"
local r, why = load(KEYS[1], true)
if r == false then return {'foreign', why} end
if r == nil then
  if ARGV[3] == '' then
    redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'running', 'token', ARGV[1])
  else
    redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'running', 'token', ARGV[1], 'fp', ARGV[3])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'acquired'}
end
if r.state == 'done' then
  return {'done', r.ttl, r.fp, r.value}
end
if r.token == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'acquired'}
end
return {'busy', r.ttl}
"#;

/// complete(KEYS[1] = record, ARGV = token, value, ttl ms). The completed record keeps the
/// token, so a retried complete whose first reply was lost reports `ok` again.
const COMPLETE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.token ~= ARGV[1] then return {'lost'} end
if r.state == 'done' then return {'ok'} end
redis.call('HSET', KEYS[1], 'state', 'done', 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'ok'}
"#;

/// renew(KEYS[1] = record, ARGV = token, lease ms).
const RENEW: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] then return {'lost'} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'ok'}
"#;

/// release(KEYS[1] = record, ARGV = token).
const RELEASE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] then return {'lost'} end
redis.call('DEL', KEYS[1])
return {'ok'}
"#;

/// remove(KEYS[1] = record).
const REMOVE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil then return {'lost'} end
redis.call('DEL', KEYS[1])
return {'ok'}
"#;

/// One script: its source (for `SCRIPT LOAD`) and its hash (for `EVALSHA`).
struct Lua {
    source: String,
    script: Script,
}

impl Lua {
    fn new(body: &str) -> Lua {
        let source = format!("{PRELUDE}{body}");
        let script = Script::new(&source);
        Lua { source, script }
    }
}

/// The scripts, hashed once per process and loaded into the server when a store connects.
struct Scripts {
    claim: Lua,
    complete: Lua,
    renew: Lua,
    release: Lua,
    remove: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim: Lua::new(CLAIM),
    complete: Lua::new(COMPLETE),
    renew: Lua::new(RENEW),
    release: Lua::new(RELEASE),
    remove: Lua::new(REMOVE),
});

impl Scripts {
    fn all(&self) -> [&Lua; 5] {
        [
            &self.claim,
            &self.complete,
            &self.renew,
            &self.release,
            &self.remove,
        ]
    }
}

/// An idempotency store in Redis, shared by every process and machine that points at the same
/// server and prefix.
///
/// ```no_run
/// use std::time::Duration;
/// use idem_runtime::{Error, Idempotent, RedisStore};
///
/// # #[tokio::main] async fn main() -> Result<(), Error> {
/// let store = RedisStore::builder()
///     .prefix("payments:idem:")
///     .timeout(Duration::from_secs(1))
///     .connect("redis://127.0.0.1:6379/")
///     .await?;
/// let cents = Idempotent::new(&store, ("charge", 42u64))
///     .run(|| async { Ok::<u64, Error>(1999) })
///     .await?;
/// # let _ = cents; Ok(()) }
/// ```
///
/// # Records
///
/// One Redis key per record, named `{prefix}{digest}` where the digest is the key's 64 hex
/// digits ([`Key::to_hex`]); [`RedisStore::record_name`] gives it. Every operation touches that
/// one key only, so the store works unchanged on Redis Cluster
/// ([`RedisStoreBuilder::connect_cluster`]): each operation goes to the node that owns its key.
/// A record is a hash:
///
/// | field | value |
/// | --- | --- |
/// | `idem` | `1`, the record format version |
/// | `state` | `running` (a claim is held) or `done` (the result is stored) |
/// | `token` | the fencing token of the claim, 32 hex digits |
/// | `fp` | the fingerprint, 32 bytes; absent when the call gave none |
/// | `value` | the result, as the executor encoded it (`done` only) |
///
/// Expiry is Redis's own: a running record expires (`PEXPIRE`) with its lease, a completed one
/// with its ttl, so the clocks of the clients never matter, an expired lease is simply an absent
/// key, and nothing has to be swept.
///
/// # One atomic step per operation
///
/// Each operation is one Lua script run by `EVALSHA` (the scripts are loaded when the store
/// connects; after the server lost its script cache, `NOSCRIPT` makes the `redis` crate load
/// the script and run it again). A script reads the record, checks the fencing token on the
/// server and writes, atomically. `claim` returns a completed record's value in the same reply,
/// so a replay costs **one round trip** and a first execution **two** (claim, complete), plus
/// one per lease renewal for bodies that run longer than a third of the lease.
///
/// # Waiting
///
/// [`Store::wait`] polls the record's state with a bounded exponential backoff: first after
/// 5 ms, then doubling up to [`RedisStoreBuilder::max_poll_interval`] (100 ms unless set),
/// and never past the caller's timeout. Polling rather than pub/sub, because a poll needs no
/// second connection per store, cannot miss a notification across a reconnect or a failover,
/// works the same on Cluster (where `PUBLISH` is broadcast to every node), and notices a holder
/// that died without a word when its lease expires. It costs at most one poll interval of
/// latency and, per waiting caller, at most ten cheap `HGET`s a second.
///
/// # Failures
///
/// - Every operation returns within the store's timeout ([`RedisStore::DEFAULT_TIMEOUT`], 2 s,
///   unless set with [`RedisStoreBuilder::timeout`]): a server that is down, unreachable or
///   hung gives [`Error::Store`], never a hang. The same bound applies to each connection
///   attempt and each reply.
/// - The connection is a `redis` connection manager (or, on a cluster, the `redis` cluster
///   connection): after the server restarts, the next call reconnects. An operation that fails
///   on a broken connection is sent once more on a fresh one within the same timeout; every
///   operation is safe to repeat (a claim or a completion repeated with its own token is
///   recognised as itself).
/// - An operation cut off by the timeout may still have run on the server: a claim made that
///   way is held until its lease runs out.
/// - A value under the prefix that is not an idem record (another type, a hash without the
///   `idem` marker, no expiry, a malformed field) gives [`Error::Store`] and is left untouched,
///   by every operation, [`Store::remove`] included: delete it by hand if it is garbage. A
///   stored result that does not decode is reported by the executor as [`Error::Codec`].
/// - [`Store::release_on_drop`] (a cancelled or panicking body) hands the release to the
///   current tokio runtime without blocking; outside a runtime it does nothing and the claim
///   expires with its lease.
///
/// Create the store inside the tokio runtime that uses it: the connection's I/O runs on that
/// runtime. The store is cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    timeout: Duration,
    max_poll_interval: Duration,
}

/// Settings of a [`RedisStore`] before it connects: made by [`RedisStore::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `connect` is awaited"]
pub struct RedisStoreBuilder {
    prefix: String,
    timeout: Duration,
    max_poll_interval: Duration,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            prefix: RedisStore::DEFAULT_PREFIX.to_owned(),
            timeout: RedisStore::DEFAULT_TIMEOUT,
            max_poll_interval: RedisStore::DEFAULT_MAX_POLL_INTERVAL,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every record's Redis key ([`RedisStore::DEFAULT_PREFIX`] unless set).
    ///
    /// Stores with different prefixes never see each other's records, on one server.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest any operation, connection attempt or reply takes before it fails with
    /// [`Error::Store`] ([`RedisStore::DEFAULT_TIMEOUT`] unless set; at least 1 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The longest pause between two polls of a key another call holds
    /// ([`RedisStore::DEFAULT_MAX_POLL_INTERVAL`] unless set; at least 1 ms).
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Connects to the server at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` with the `redis` crate's TLS features, or `redis+unix:///path`).
    ///
    /// Fails with [`Error::Store`] if the URL is malformed or the server cannot be reached
    /// within the timeout.
    pub async fn connect(self, url: &str) -> Result<RedisStore, Error> {
        let client = Client::open(url).map_err(|source| failure("connect", source))?;
        self.connect_client(client).await
    }

    /// Connects with an existing `redis` (version 1) client.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let store = idem_runtime::RedisStore::builder().connect_client(client).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_client(self, client: Client) -> Result<RedisStore, Error> {
        require_tokio("connect")?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // A refused connection fails fast (three attempts within ~150 ms) instead of
            // retrying for seconds; the next call starts a new attempt.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let connect = async {
            let mut conn = ConnectionManager::new_with_config(client, config).await?;
            // Load every script in one round trip, so that the first calls are single EVALSHAs.
            let mut load = ::redis::pipe();
            for script in SCRIPTS.all() {
                load.cmd("SCRIPT").arg("LOAD").arg(&script.source);
            }
            load.exec_async(&mut conn).await?;
            Ok::<_, RedisError>(Conn::Single(conn))
        };
        self.finish(connect).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each; the
    /// others are discovered).
    ///
    /// Every record is one key and every operation one script on that key, so each operation
    /// goes to the node that owns the key's slot, in one round trip as on a single server; the
    /// client follows `MOVED` and `ASK` redirections and reconnects to nodes by itself.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), idem_runtime::Error> {
    /// let store = idem_runtime::RedisStore::builder()
    ///     .connect_cluster(["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/"])
    ///     .await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_cluster<I, U>(self, nodes: I) -> Result<RedisStore, Error>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let client = ClusterClient::builder(nodes)
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|source| failure("connect", source))?;
        self.connect_cluster_client(client).await
    }

    /// Connects to a Redis Cluster with an existing `redis` (version 1) cluster client.
    pub async fn connect_cluster_client(self, client: ClusterClient) -> Result<RedisStore, Error> {
        require_tokio("connect")?;
        let connect = async {
            let mut conn = client.get_async_connection().await?;
            // `SCRIPT LOAD` goes to every node.
            for script in SCRIPTS.all() {
                ::redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(&script.source)
                    .exec_async(&mut conn)
                    .await?;
            }
            Ok::<_, RedisError>(Conn::Cluster(conn))
        };
        self.finish(connect).await
    }

    async fn finish(
        self,
        connect: impl Future<Output = RedisResult<Conn>>,
    ) -> Result<RedisStore, Error> {
        let conn = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(source)) => return Err(failure("connect", source)),
            Err(_) => {
                return Err(Error::store(TimedOut {
                    op: "connect",
                    after: self.timeout,
                }));
            }
        };
        Ok(RedisStore {
            conn,
            prefix: Arc::from(self.prefix),
            timeout: self.timeout,
            max_poll_interval: self.max_poll_interval,
        })
    }
}

/// The connection: to one server (or a proxy), or to a cluster. Both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The first pause of [`RedisStore`]'s wait poll.
const FIRST_POLL: Duration = Duration::from_millis(5);

impl RedisStore {
    /// The key prefix unless one is set: `idem:`.
    pub const DEFAULT_PREFIX: &'static str = "idem:";
    /// The bound on every operation, connection attempt and reply unless one is set: 2 seconds.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The longest pause between polls of a held key unless one is set: 100 ms.
    pub const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

    /// Connects to the server at `url` with the default settings (see [`RedisStore::builder`]).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), idem_runtime::Error> {
    /// let store = idem_runtime::RedisStore::connect("redis://127.0.0.1:6379/").await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        RedisStoreBuilder::default().connect(url).await
    }

    /// Connects with an existing `redis` (version 1) client and the default settings.
    pub async fn from_client(client: Client) -> Result<RedisStore, Error> {
        RedisStoreBuilder::default().connect_client(client).await
    }

    /// Settings for a store: prefix, timeout, poll interval.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// The prefix of every record's Redis key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The name of the Redis key that holds the record of `key`: the prefix and the key's 64 hex
    /// digits. For operators (`redis-cli HGETALL ...`) and tests.
    pub fn record_name(&self, key: &Key) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 64);
        name.push_str(&self.prefix);
        name.push_str(&key.to_hex());
        name
    }

    /// Runs one command against the server within the timeout; a command that fails on a broken
    /// connection is sent once more (the connection manager has started to reconnect by then).
    async fn run<T, F, Fut>(&self, op: &'static str, attempt: F) -> Result<T, Error>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        require_tokio(op)?;
        let work = async {
            match attempt(self.conn.clone()).await {
                Err(err) if is_connection_error(&err) => attempt(self.conn.clone()).await,
                other => other,
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(failure(op, source)),
            Err(_) => Err(Error::store(TimedOut {
                op,
                after: self.timeout,
            })),
        }
    }

    /// Runs one of our scripts on the record of `key`; `foreign` replies become errors.
    async fn script(
        &self,
        op: &'static str,
        script: &'static Lua,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<Vec<Value>, Error> {
        let name = self.record_name(key);
        let mut invocation = script.script.key(name.as_str());
        for arg in args {
            invocation.arg(*arg);
        }
        let invocation = &invocation;
        let reply: Value = self
            .run(op, move |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let items = match reply {
            Value::Array(items) if !items.is_empty() => items,
            other => return Err(bad_reply(op, &other)),
        };
        if as_bytes(&items[0]) == Some(b"foreign") {
            let reason = items
                .get(1)
                .and_then(as_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(Error::store(Foreign { name, reason }));
        }
        Ok(items)
    }

    /// Runs a script whose reply is `ok` or `lost`.
    async fn ok_or_lost(
        &self,
        op: &'static str,
        script: &'static Lua,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<bool, Error> {
        let items = self.script(op, script, key, args).await?;
        match as_bytes(&items[0]) {
            Some(b"ok") => Ok(true),
            Some(b"lost") => Ok(false),
            _ => Err(bad_reply(op, &items[0])),
        }
    }

    async fn claim_now(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let token = Token::generate();
        let token_hex = token_hex(token);
        let lease_ms = millis(lease);
        let fp: &[u8] = match &fingerprint {
            Some(fp) => fp.as_bytes(),
            None => b"",
        };
        let args: [&[u8]; 3] = [token_hex.as_bytes(), lease_ms.as_bytes(), fp];
        let items = self.script("claim", &SCRIPTS.claim, &key, &args).await?;
        parse_claim(token, items)
    }

    async fn wait_for(&self, key: Key, timeout: Duration) -> Result<(), Error> {
        let deadline = crate::clock::after(Instant::now(), timeout);
        let name = self.record_name(&key);
        let name = name.as_str();
        let mut pause = FIRST_POLL;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(self.max_poll_interval);
            let state: Option<Vec<u8>> = self
                .run("wait", move |mut conn| async move {
                    ::redis::cmd("HGET")
                        .arg(name)
                        .arg("state")
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if state.as_deref() != Some(b"running") {
                return Ok(());
            }
        }
    }

    async fn release_now(&self, key: Key, token: Token) -> Result<bool, Error> {
        let token_hex = token_hex(token);
        self.ok_or_lost("release", &SCRIPTS.release, &key, &[token_hex.as_bytes()])
            .await
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .finish_non_exhaustive()
    }
}

impl Store for RedisStore {
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
            let token_hex = token_hex(token);
            let ttl_ms = millis(ttl);
            let args: [&[u8]; 3] = [token_hex.as_bytes(), &value, ttl_ms.as_bytes()];
            let stored = self
                .ok_or_lost("complete", &SCRIPTS.complete, &key, &args)
                .await?;
            Ok(if stored {
                Completion::Stored
            } else {
                Completion::LeaseLost
            })
        })
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let token_hex = token_hex(token);
            let lease_ms = millis(lease);
            let args: [&[u8]; 2] = [token_hex.as_bytes(), lease_ms.as_bytes()];
            self.ok_or_lost("renew", &SCRIPTS.renew, &key, &args).await
        })
    }

    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(self.release_now(key, token))
    }

    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.wait_for(key, timeout))
    }

    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move { self.ok_or_lost("remove", &SCRIPTS.remove, &key, &[]).await })
    }

    /// Spawns the release on the current tokio runtime and returns at once; outside a runtime
    /// it does nothing (the claim expires with its lease, which is no longer renewed).
    fn release_on_drop(&self, key: Key, token: Token) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            if let Err(err) = store.release_now(key, token).await {
                tracing::debug!(
                    target: "idem", key = %key, error = %err,
                    "could not release a dropped claim; it frees when its lease runs out"
                );
            }
        });
    }
}

/// Reads a claim script's reply.
fn parse_claim(token: Token, mut items: Vec<Value>) -> Result<Claim, Error> {
    let op = "claim";
    match items.first().and_then(as_bytes) {
        Some(b"acquired") => Ok(Claim::Acquired(token)),
        Some(b"busy") => {
            let left = items
                .get(1)
                .and_then(as_millis)
                .ok_or_else(|| bad(op, &items))?;
            Ok(Claim::Busy {
                lease_left: left.max(Duration::from_millis(1)),
            })
        }
        Some(b"done") => {
            let (Some(expires_in), Some(fp)) = (
                items.get(1).and_then(as_millis),
                items.get(2).and_then(as_bytes),
            ) else {
                return Err(bad(op, &items));
            };
            let fingerprint = match fp.len() {
                0 => None,
                _ => match <[u8; 32]>::try_from(fp) {
                    Ok(digest) => Some(Fingerprint::from_digest(digest)),
                    Err(_) => return Err(bad(op, &items)),
                },
            };
            // Hand the reply's buffer over as is: results can be large.
            let value = match items.get_mut(3) {
                Some(Value::BulkString(value)) => Bytes::from(std::mem::take(value)),
                _ => return Err(bad(op, &items)),
            };
            Ok(Claim::Completed(Completed::new(
                value,
                fingerprint,
                expires_in,
            )))
        }
        _ => Err(bad(op, &items)),
    }
}

fn bad(op: &'static str, items: &[Value]) -> Error {
    bad_reply(op, &Value::Array(items.to_vec()))
}

fn as_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn as_millis(value: &Value) -> Option<Duration> {
    match value {
        Value::Int(ms) => u64::try_from(*ms).ok().map(Duration::from_millis),
        _ => None,
    }
}

fn token_hex(token: Token) -> String {
    format!("{:032x}", token.as_u128())
}

/// A duration as whole milliseconds for `PEXPIRE`: at least 1 (0 would delete the key), at most
/// about 1000 years (Redis refuses expiry times that overflow).
fn millis(d: Duration) -> String {
    const MAX_MS: u128 = 1000 * 365 * 24 * 60 * 60 * 1000;
    d.as_millis().clamp(1, MAX_MS).to_string()
}

/// The connection and the timeouts run on tokio: polled elsewhere, fail rather than panic.
fn require_tokio(op: &'static str) -> Result<(), Error> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(Error::store(NoRuntime { op })),
    }
}

fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error()
}

fn failure(op: &'static str, source: RedisError) -> Error {
    Error::store(Failure { op, source })
}

fn bad_reply(op: &'static str, reply: &Value) -> Error {
    let mut detail = format!("{reply:?}");
    if detail.len() > 200 {
        let mut end = 200;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    Error::store(BadReply { op, detail })
}

/// Redis (or the connection to it) failed an operation.
#[derive(Debug)]
struct Failure {
    op: &'static str,
    source: RedisError,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redis {} failed: {}", self.op, self.source)
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Redis did not answer within the store's timeout.
#[derive(Debug)]
struct TimedOut {
    op: &'static str,
    after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Redis did not complete {} within {:?} (the RedisStore timeout)",
            self.op, self.after
        )
    }
}

impl std::error::Error for TimedOut {}

/// An operation was polled outside a tokio runtime.
#[derive(Debug)]
struct NoRuntime {
    op: &'static str,
}

impl fmt::Display for NoRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RedisStore {} must run inside a tokio runtime (its connection and timeouts use tokio)",
            self.op
        )
    }
}

impl std::error::Error for NoRuntime {}

/// A value under the prefix that is not an idem record.
#[derive(Debug)]
struct Foreign {
    name: String,
    reason: String,
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the Redis key {} holds {}, not an idem record; it was left untouched (delete it by \
             hand if it is garbage)",
            self.name, self.reason
        )
    }
}

impl std::error::Error for Foreign {}

/// Redis replied something no script of ours returns.
#[derive(Debug)]
struct BadReply {
    op: &'static str,
    detail: String,
}

impl fmt::Display for BadReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unexpected reply from Redis to {}: {}",
            self.op, self.detail
        )
    }
}

impl std::error::Error for BadReply {}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn claim_replies_parse() {
        let token = Token::generate();
        assert_eq!(
            parse_claim(token, vec![bulk(b"acquired")]).ok(),
            Some(Claim::Acquired(token))
        );
        assert_eq!(
            parse_claim(token, vec![bulk(b"busy"), Value::Int(1500)]).ok(),
            Some(Claim::Busy {
                lease_left: Duration::from_millis(1500)
            })
        );
        let fp = Fingerprint::of("body");
        let done = vec![
            bulk(b"done"),
            Value::Int(60_000),
            bulk(fp.as_bytes()),
            bulk(b"\"v\""),
        ];
        assert_eq!(
            parse_claim(token, done).ok(),
            Some(Claim::Completed(Completed::new(
                Bytes::from_static(b"\"v\""),
                Some(fp),
                Duration::from_secs(60)
            )))
        );
    }

    #[test]
    fn malformed_replies_are_store_errors_not_panics() {
        let token = Token::generate();
        let cases: Vec<Vec<Value>> = vec![
            vec![bulk(b"what")],
            vec![bulk(b"busy")],
            vec![bulk(b"busy"), Value::Int(-5)],
            vec![bulk(b"busy"), bulk(b"12")],
            vec![bulk(b"done"), Value::Int(5)],
            vec![bulk(b"done"), Value::Int(5), bulk(b"short"), bulk(b"v")],
            vec![Value::Nil],
            vec![Value::Int(1)],
            vec![],
        ];
        for items in cases {
            assert!(
                matches!(parse_claim(token, items.clone()), Err(Error::Store(_))),
                "{items:?}"
            );
        }
    }

    #[test]
    fn durations_become_valid_pexpire_arguments() {
        assert_eq!(millis(Duration::ZERO), "1");
        assert_eq!(millis(Duration::from_micros(10)), "1");
        assert_eq!(millis(Duration::from_secs(30)), "30000");
        assert_eq!(millis(Duration::MAX), "31536000000000");
    }

    #[test]
    fn connecting_outside_a_runtime_is_an_error_not_a_panic() {
        let connect = RedisStore::connect("redis://127.0.0.1:1/");
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut connect = std::pin::pin!(connect);
        match connect.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Err(Error::Store(err))) => {
                assert!(err.to_string().contains("tokio runtime"), "{err}");
            }
            other => panic!(
                "expected a store error, got {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
    }

    #[test]
    fn tokens_are_32_hex_digits() {
        assert_eq!(token_hex(Token::from_u128(0xab)).len(), 32);
        assert_eq!(
            token_hex(Token::from_u128(u128::MAX)),
            "ffffffffffffffffffffffffffffffff"
        );
    }

    #[test]
    fn scripts_have_distinct_sources() {
        let all = SCRIPTS.all();
        for (i, a) in all.iter().enumerate() {
            assert!(a.source.starts_with(PRELUDE));
            assert_eq!(Script::new(&a.source).get_hash(), a.script.get_hash());
            for b in &all[i + 1..] {
                assert_ne!(a.script.get_hash(), b.script.get_hash());
            }
        }
    }
}
