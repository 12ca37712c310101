//! The Redis store (feature `redis`): records shared by many processes and machines.
//!
//! See [`RedisStore`] for what it promises and how it keeps records, and [`IfUnsafe`] for the
//! server settings it checks when it connects.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use ::redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Script,
    ServerErrorKind, Value,
};
use bytes::Bytes;
use tokio::time::Instant;

use super::known::{Known, Seen};
use super::{BoxFuture, RecordedSteps, StepRecorded, Store};
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Completed, Completion, Token};

mod wake;

use wake::{Source, Wakes};

/// Lua shared by every script: reads the record under `KEYS[1]` and checks that it is ours.
///
/// A record is ours only if it is a hash whose `idem` field is the format version, `1`, with an
/// expiry and well-formed fields. `load(key, with_value)` returns `nil` for no record,
/// `false, why` for a value that is not an idem record (left untouched by every script), or a
/// table `{state, token, fp, ttl, grace, steps, value}` (`steps`: whether the record's call has
/// step records, see [`STEPS`]). It costs two commands on the hot paths (`HMGET`
/// under `pcall`, whose WRONGTYPE error marks a value that is not a hash, and `PTTL`; any other
/// error of `HMGET` is raised): each
/// `redis.call` is several microseconds of server time, and the replay benchmark showed five.
///
/// A running record lives `grace` milliseconds past its lease (see [`RedisStore`], "Records"):
/// its lease has `ttl - grace` left, and it has lapsed when that is not positive. Records
/// without `grace` (written before it existed) have none.
const PRELUDE: &str = r#"
local function load(key, with_value)
  local f
  if with_value then
    f = redis.pcall('HMGET', key, 'idem', 'state', 'token', 'fp', 'grace', 'steps', 'value')
  else
    f = redis.pcall('HMGET', key, 'idem', 'state', 'token', 'fp', 'grace', 'steps')
  end
  if f.err then
    -- WRONGTYPE: a value of another type. Anything else (an ACL that denies HMGET) is an error.
    if not string.find(f.err, 'WRONGTYPE', 1, true) then error(f) end
    return false, 'a ' .. redis.call('TYPE', key).ok .. ' (not a hash)'
  end
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
  local grace = 0
  if f[5] then
    if #f[5] > 15 or not string.match(f[5], '^%d+$') then
      return false, 'a record with a malformed grace'
    end
    grace = tonumber(f[5])
  end
  if f[6] and f[6] ~= '1' then return false, 'a record with a malformed steps flag' end
  if f[2] == 'done' then
    local has_value
    if with_value then has_value = f[7] else has_value = redis.call('HEXISTS', key, 'value') == 1 end
    if not has_value then return false, 'a completed record without a value' end
  end
  return {state = f[2], token = f[3], fp = f[4] or '', ttl = ttl, grace = grace,
    steps = f[6] == '1', value = f[7]}
end
"#;

/// Lua shared by every script: `notify(command, what)` tells the callers waiting for the record
/// under `KEYS[1]` that it changed (`done`, `free`, or `taken` over), on the channel named like
/// the record's key: `command` is `PUBLISH` on one server and `SPUBLISH` on a cluster (the
/// channel's hash slot is the record's, so it is the node that owns the record that publishes).
/// Under `pcall`, after the writes: a server or an ACL that refuses it fails nothing (the
/// waiters then find the change by polling).
const NOTIFY: &str = r#"
local function notify(command, what)
  redis.pcall(command, KEYS[1], what)
end
"#;

/// Lua shared by every script: the step records of the record under `KEYS[1]`, in the hash
/// `KEYS[2]` (see [`RedisStore`], "Steps"), when a script is given it.
///
/// A steps hash is ours only if its `idem` field is `steps`, it has an expiry, and its `fp`
/// field, if any, is a fingerprint (32 bytes): the fingerprint of the claim that recorded its
/// first step, absent when that claim had none. Every other field is `step:` and a step's
/// name, whose value is the step's. `load_steps(key)` returns `nil` for none, `false, why` for
/// a value that is not (left untouched by every script), or the hash's time left in
/// milliseconds and its fingerprint (`''` for none). `drop_steps(key)` deletes the hash if it
/// is ours, and does nothing without one (no key, no hash, or a value that is not ours: a
/// completion is never refused for it).
///
/// Both read with `HMGET`, as `load` does, so that no command is added to what a store's ACL
/// must allow for the scripts that every call runs.
///
/// A record whose call has step records carries the flag `steps = 1`, set by the scripts that
/// record or read steps: a completion sends the steps hash's name (a second key, and a second
/// round trip) only for such a record. Declaring a second key that does not exist would make
/// every completion in a slot that is migrating fail with `TRYAGAIN` (a multi-key command
/// whose keys are not all on the node) for as long as the migration lasts.
const STEPS: &str = r#"
local function load_steps(key)
  local m = redis.pcall('HMGET', key, 'idem', 'fp')
  if m.err then
    if not string.find(m.err, 'WRONGTYPE', 1, true) then error(m) end
    return false, 'a ' .. redis.call('TYPE', key).ok .. ' (not a hash)'
  end
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then return nil end
  if m[1] ~= 'steps' then return false, 'a hash without the idem steps marker (idem = steps)' end
  if ttl < 0 then return false, 'step records without an expiry' end
  if m[2] and #m[2] ~= 32 then return false, 'step records with a malformed fingerprint' end
  return ttl, m[2] or ''
end
local function drop_steps(key)
  if not key then return end
  local m = redis.pcall('HMGET', key, 'idem')
  if not m.err and m[1] == 'steps' then redis.call('DEL', key) end
end
"#;

/// claim(KEYS[1] = record, ARGV = token, lease ms, fingerprint or '', lease + grace ms, publish
/// command).
///
/// A record that already holds this very token is this claim, retried after a lost reply: it is
/// acquired again (claims are idempotent). A running record whose lease lapsed is taken over,
/// and its waiters are told (see [`NOTIFY`]).
/// The first write is `HSET`, which Redis refuses at `maxmemory`: a claim that would write fails
/// there, while a replay or a busy answer (no write at all) is still served.
const CLAIM: &str = r#"
local r, why = load(KEYS[1], true)
if r == false then return {'foreign', why} end
if r then
  if r.state == 'done' then return {'done', r.ttl, r.fp, r.value, r.token} end
  if r.token ~= ARGV[1] and r.ttl > r.grace then return {'busy', r.ttl - r.grace} end
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'running', 'token', ARGV[1], 'grace', ARGV[2])
  if r then redis.call('HDEL', KEYS[1], 'fp') end
else
  redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'running', 'token', ARGV[1], 'grace', ARGV[2],
    'fp', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if r and r.token ~= ARGV[1] then notify(ARGV[5], 'taken') end
return {'acquired'}
"#;

/// complete(KEYS[1] = record, KEYS[2] = steps (optional), ARGV = token, value, ttl ms,
/// fingerprint or '', publish command): the rule of [`Store::complete`]; the waiters are told
/// (see [`NOTIFY`]), and the call's step records are deleted. A record flagged as having step
/// records, completed without the steps hash's name, is left as it is and answered `steps`: the
/// store sends the completion again with it (see [`STEPS`]).
///
/// The completed record keeps the token, so a complete repeated after its reply was lost
/// reports `ok` again and keeps the first value. A record that is gone (the lapsed claim's grace
/// ran out too, or an operator removed it) is written anew, with the fingerprint the executor
/// passes (the claim's).
///
/// Redis refuses a script's first write that may grow memory at `maxmemory`, but never a later
/// one (it cannot stop a script halfway). The first write here is a `PEXPIRE`, which Redis never
/// refuses: so a body that ran is stored even at `maxmemory` (only new claims are refused there),
/// going past the limit by at most the results of the calls already running.
const COMPLETE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r then
  if r.state == 'done' then
    if r.token == ARGV[1] then return {'ok'} end
    return {'lost'}
  end
  -- Another claim's record: lost while its lease is live; lapsed, it holds the key no more.
  if r.token ~= ARGV[1] and r.ttl > r.grace then return {'lost'} end
  if r.steps and not KEYS[2] then return {'steps'} end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if r and r.token == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'done', 'value', ARGV[2])
elseif r then
  redis.call('HSET', KEYS[1], 'state', 'done', 'token', ARGV[1], 'value', ARGV[2])
  if ARGV[4] == '' then
    redis.call('HDEL', KEYS[1], 'fp')
  else
    redis.call('HSET', KEYS[1], 'fp', ARGV[4])
  end
else
  if ARGV[4] == '' then
    redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'done', 'token', ARGV[1], 'value', ARGV[2])
  else
    redis.call('HSET', KEYS[1], 'idem', '1', 'state', 'done', 'token', ARGV[1], 'value', ARGV[2], 'fp', ARGV[4])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if r and r.steps then redis.call('HDEL', KEYS[1], 'steps') end
drop_steps(KEYS[2])
notify(ARGV[5], 'done')
return {'ok'}
"#;

/// renew(KEYS[1] = record, ARGV = token, lease ms, lease + grace ms). `PEXPIRE` first, so that
/// the `HSET` is not the script's first write (see [`COMPLETE`]): renewal works at `maxmemory`.
const RENEW: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] then return {'lost'} end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[1], 'grace', ARGV[2])
return {'ok'}
"#;

/// release(KEYS[1] = record, ARGV = token, publish command). The step records stay (in their
/// own hash, with their own expiry): the next claim of the key reads them.
const RELEASE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] then return {'lost'} end
redis.call('DEL', KEYS[1])
notify(ARGV[2], 'free')
return {'ok'}
"#;

/// remove(KEYS[1] = record, KEYS[2] = steps (optional), ARGV = publish command): deletes the
/// record and the step records, and answers `ok` if there was either (a released call leaves
/// only its steps). A value that is not ours under either name leaves both untouched.
const REMOVE: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
local s
if KEYS[2] then
  local swhy
  s, swhy = load_steps(KEYS[2])
  if s == false then return {'foreign', swhy, 'steps'} end
end
if r == nil and s == nil then return {'lost'} end
if r then
  redis.call('DEL', KEYS[1])
  notify(ARGV[1], 'free')
end
if s then redis.call('DEL', KEYS[2]) end
return {'ok'}
"#;

/// record_step(KEYS[1] = record, KEYS[2] = steps, ARGV = token, `step:` and the step's name,
/// value, ttl ms): the rule of [`Store::record_step`]. Only a running record of this token whose
/// lease is live is written to: `HSETNX` keeps a step recorded before (a repeat after a lost
/// reply), the hash's expiry is pushed out to `ttl` if that is later, and the record is flagged
/// (see [`STEPS`]). A new hash keeps the claim's fingerprint (`fp`, copied from the record; none
/// without one), for [`STEPS_OF`] to compare; a step added to a hash keeps the hash's. The first
/// write is the step's (`HSET` or `HSETNX`), which Redis refuses at `maxmemory`: then nothing is
/// written.
const RECORD_STEP: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] or r.ttl <= r.grace then
  return {'lost'}
end
-- On success, load_steps's second value is the hash's fingerprint; on failure, why it is not ours.
local ttl, swhy = load_steps(KEYS[2])
if ttl == false then return {'foreign', swhy, 'steps'} end
if ttl == nil then
  if r.fp == '' then
    redis.call('HSET', KEYS[2], 'idem', 'steps', ARGV[2], ARGV[3])
  else
    redis.call('HSET', KEYS[2], 'idem', 'steps', 'fp', r.fp, ARGV[2], ARGV[3])
  end
else
  redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
end
if ttl == nil or ttl < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
if not r.steps then redis.call('HSET', KEYS[1], 'steps', '1') end
return {'ok'}
"#;

/// steps(KEYS[1] = record, KEYS[2] = steps, ARGV = token): the step records, if this token holds
/// the key (the fence of `record_step`), as `held` and the hash's fields and values; `reused`,
/// and nothing written, if they were recorded under another fingerprint than the claim's (the
/// rule of replays, `fingerprint_matches`: they match if the claim has none, or the same one;
/// steps recorded without one are not a fingerprinted claim's). A record that finds step
/// records of an earlier holder is flagged (see [`STEPS`]); under `pcall`, so that a server at
/// `maxmemory` still lets a call read its steps (its completion then leaves them to their
/// expiry). A record that finds another request's steps is not flagged: its completion must
/// leave them for a retry of that request.
const STEPS_OF: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.token ~= ARGV[1] or r.ttl <= r.grace then
  return {'lost'}
end
-- On success, load_steps's second value is the hash's fingerprint; on failure, why it is not ours.
local ttl, sfp = load_steps(KEYS[2])
if ttl == false then return {'foreign', sfp, 'steps'} end
if ttl == nil then return {'held', {}} end
if r.fp ~= '' and sfp ~= r.fp then return {'reused'} end
if not r.steps then redis.pcall('HSET', KEYS[1], 'steps', '1') end
return {'held', redis.call('HGETALL', KEYS[2])}
"#;

/// peek(KEYS[1] = record): whether a live claim holds the key, for [`Store::wait`]. Writes
/// nothing.
const PEEK: &str = r#"
local r, why = load(KEYS[1])
if r == false then return {'foreign', why} end
if r == nil or r.state ~= 'running' or r.ttl <= r.grace then return {'free'} end
return {'held', r.ttl - r.grace}
"#;

/// One script: its source (for `SCRIPT LOAD` and `EVAL`) and its hash (for `EVALSHA`).
struct Lua {
    source: String,
    hash: String,
}

impl Lua {
    fn new(body: &str) -> Lua {
        let source = format!("{PRELUDE}{NOTIFY}{STEPS}{body}");
        let hash = Script::new(&source).get_hash().to_owned();
        Lua { source, hash }
    }
}

/// The scripts, hashed once per process and loaded into the server when a store connects.
struct Scripts {
    claim: Lua,
    complete: Lua,
    renew: Lua,
    release: Lua,
    remove: Lua,
    peek: Lua,
    record_step: Lua,
    steps: Lua,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    claim: Lua::new(CLAIM),
    complete: Lua::new(COMPLETE),
    renew: Lua::new(RENEW),
    release: Lua::new(RELEASE),
    remove: Lua::new(REMOVE),
    peek: Lua::new(PEEK),
    record_step: Lua::new(RECORD_STEP),
    steps: Lua::new(STEPS_OF),
});

impl Scripts {
    fn all(&self) -> [&Lua; 8] {
        [
            &self.claim,
            &self.complete,
            &self.renew,
            &self.release,
            &self.remove,
            &self.peek,
            &self.record_step,
            &self.steps,
        ]
    }
}

/// What the store does about a server setting that puts at-most-once at risk (the shared
/// `IfUnsafe` of `idem::store`): see [`RedisStoreBuilder::if_evicting`] and
/// [`RedisStoreBuilder::if_not_persistent`]. On Redis, `Refuse` fails the connection with
/// [`Error::Store`] naming the setting and the fix; found on a server the store reconnected to,
/// new claims fail with that error (records already claimed are still completed, renewed and
/// released) until the setting is fixed. `Warn` says so once per server; `Accept` logs only a
/// `debug` event.
///
/// ```no_run
/// use idem_runtime::store::redis::{IfUnsafe, RedisStore};
///
/// # #[tokio::main] async fn main() -> Result<(), idem_runtime::Error> {
/// // A cache server shared with other data: keep its LRU policy, knowingly.
/// let store = RedisStore::builder()
///     .if_evicting(IfUnsafe::Warn)
///     .if_not_persistent(IfUnsafe::Accept)
///     .connect("redis://cache.internal:6379/")
///     .await?;
/// # let _ = store; Ok(()) }
/// ```
pub use super::IfUnsafe;
/// The `redis` client (version 1) this store is built on, for building the `Client` or
/// `ClusterClient` that [`RedisStoreBuilder::connect_client`] and
/// [`RedisStoreBuilder::connect_cluster_client`] take without a version mismatch.
pub use redis;

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
/// one key (and, for a call with [steps](crate::step), its steps hash, in the same hash slot:
/// see "Steps" below), so the store works unchanged on Redis Cluster
/// ([`RedisStoreBuilder::connect_cluster`]): each operation goes to the node that owns its key.
/// Give the prefix a hash tag (`{idem}:`) to keep every record on one node. A cluster node
/// given to [`RedisStoreBuilder::connect`] is refused, with an error that says to use
/// `connect_cluster` (through one node, the keys other nodes own would fail with `MOVED`).
/// A record is a hash:
///
/// | field | value |
/// | --- | --- |
/// | `idem` | `1`, the record format version |
/// | `state` | `running` (a claim is held) or `done` (the result is stored) |
/// | `token` | the fencing token of the claim, 32 hex digits |
/// | `fp` | the fingerprint, 32 bytes; absent when the call gave none |
/// | `grace` | (`running`) how many milliseconds the record outlives its lease |
/// | `steps` | (`running`) `1` if the call has step records; absent otherwise |
/// | `value` | (`done`) the result, as the executor encoded it |
///
/// Expiry is Redis's own (`PEXPIRE`), so the clocks of the clients never matter and nothing has
/// to be swept. A completed record expires with its ttl. A running record expires one lease
/// after its lease (the grace): once the lease has run out, another call takes the key over at
/// once, but until then a completion that comes late still finds its claim and its fingerprint.
/// A completion that finds no record at all (the grace ran out too) is stored all the same, with
/// the fingerprint the executor passes (the rule of [`Store::complete`]).
///
/// # One atomic step per operation
///
/// Each operation is one Lua script run by `EVALSHA` (the scripts are loaded into every node
/// when the store connects). A node that does not know a script (restarted, its script cache
/// flushed, promoted from replica, or added to a cluster after the store connected: a slot
/// migrating to it sends `ASK` redirections there) answers `NOSCRIPT`, and the operation sends
/// the script's source with `EVAL` there, once, in the same operation. A script reads the
/// record, checks the fencing token on the server and writes, atomically. `claim` returns a
/// completed record's value in the same reply, so a replay costs **one round trip** and a first
/// execution **two** (claim, complete), plus one per lease renewal for bodies that run longer
/// than a third of the lease.
///
/// # Steps
///
/// The step records of a call ([`crate::step`]) are one Redis hash per key, beside its record
/// and in the record's hash slot, so that one script reads the record and writes the steps
/// atomically on any node of a cluster; [`RedisStore::steps_name`] gives its name:
///
/// | prefix | record | steps hash |
/// | --- | --- | --- |
/// | with a hash tag (`{idem}:`) | `{idem}:<hex>` | `{idem}:<hex>:steps`: the record's name and `:steps`, the same tag |
/// | without braces (`idem:`, the default) | `idem:<hex>` | `idem:{idem:<hex>}:steps`: the record's whole name as the hash tag, which is what Redis hashes for the record |
/// | with braces but no tag (`{}`, an unclosed `{`, a lone `}`) | as always | none: no name under such a prefix shares the record's slot; the store says so in a warning (target `idem`) when it connects, and [`Store::record_step`] and [`Store::steps`] fail with [`Error::Store`] saying so |
///
/// | field | value |
/// | --- | --- |
/// | `idem` | `steps`, the marker (a value at that name without it, or without an expiry, is not ours and is left alone, as a foreign record is) |
/// | `fp` | the fingerprint of the claim that recorded the hash's first step, 32 bytes, copied from its record; absent when that claim had none |
/// | `step:<name>` | one per step: its value, as the executor encoded it |
///
/// No steps hash is ever taken for a record, nor a record for a steps hash (a record's name is
/// the prefix and 64 hex digits, nothing more).
///
/// - [`Store::record_step`] is **one round trip**: one script checks that the record is running
///   under the token with its lease live (the server's clock), writes the step with `HSETNX`
///   (a repeat keeps the first value), pushes the hash's expiry out to `ttl` if that is later,
///   and flags the record (`steps = 1`). A new hash takes the claim's fingerprint; a step added
///   to a hash keeps the hash's. Anything else is `LeaseLost`, and nothing is written.
/// - [`Store::steps`] is one round trip: the same check, then `HGETALL`. The executor reads
///   them once per call, at its first step. Steps are the request's that recorded them: a claim
///   with a fingerprint reads them only if the hash's `fp` is the same (steps recorded without
///   one are not a fingerprinted request's), and otherwise gets
///   [`RecordedSteps::KeyReused`] (the call fails with [`Error::KeyReused`] and runs no step);
///   such a read changes nothing, so the steps stay for a retry of the request that recorded
///   them. A claim without a fingerprint reads any (the rule of replays).
/// - [`Store::release`] deletes the record and leaves the hash: the next claim reads its steps.
///   A lease that runs out leaves it too. The hash expires `ttl` after its last step.
/// - [`Store::complete`] and [`Store::remove`] delete the hash in the same script as the record
///   write, but a completion only when the record is flagged, that is when the completing
///   claim recorded a step or read the steps and was given them: a call without steps
///   completes in one round trip as before, one with steps in two (the first answer says to
///   send it again with the hash). So a completion leaves the hash to its own expiry when its
///   body ran no step (a retry that this time took a path without steps leaves an earlier
///   attempt's steps), when its claim read another request's steps (`KeyReused`), or when it
///   comes after its record is gone. Such a hash is read again only by a claim after the
///   completed record expired, and it expires first when both have one ttl.
/// - A call dropped while the records of steps that ran are on their way
///   ([`Store::release_on_drop_after_steps`]) hands them to a background task that records
///   each (fenced, one round trip each), and then releases the claim, in that order: the retry
///   finds them. See "Failures and cancellation".
/// - While a slot migrates between nodes, Redis refuses an operation on a record and its steps
///   hash with `TRYAGAIN` as long as only one of them is on the node (the other has moved, or
///   does not exist yet); nothing runs. The store sends it again, with pauses, until the
///   migration ends: a step, the completion of a call with steps, or a `remove` in a migrating
///   slot waits for it, and fails with [`Error::Store`] if the store's timeout runs out first (a
///   completion is then retried in the background, see "Failures and cancellation"). The
///   operations of calls without steps never name the hash, and never wait so.
///
/// A call with steps thus costs, beyond a plain first execution (claim, complete), one round
/// trip to read its steps, one per step that runs, and one more for its completion; a step
/// already recorded costs nothing.
///
/// # Replays
///
/// A script costs the server several times what a plain command does, and Redis runs every
/// command on one thread. So a store remembers the completed records it has seen (that it
/// completed, or that a claim returned): their key, the token that completed them and when they
/// expire, up to 16 384 keys. A replay of such a record is one `HMGET` of its `state`,
/// `token`, `fp` and `value`, no script: still **one round trip**. A completed record never
/// changes until it expires or is removed, so the `HMGET` finds exactly what the claim script
/// would have returned, or it finds something else (the record expired or was removed, a new
/// claim holds the key, another program wrote there): then the store forgets the key and claims
/// as usual, a second round trip for that call. The time left that the replay reports is the
/// one the server gave when the record was first seen, counted down by this process's clock.
///
/// # Server settings
///
/// At-most-once needs a server that keeps what it was told. When it connects, and again after a
/// connection error or a `NOSCRIPT` (the node may be another server), before the next claim
/// (which fails if the settings cannot be read: no body starts on a server nobody checked), the
/// store reads `maxmemory-policy`, `appendonly` and `save` on the server, or on every master of
/// a cluster. The reading is sent again on a fresh connection if the connection breaks, within
/// the claim's timeout; one that fails or is cut off (the call dropped, the timeout run out) is
/// done again before the next claim, and a claim that comes while a reading is under way waits
/// for it. What the store checks:
///
/// - any policy but `noeviction` evicts idem records at `maxmemory` (every record has a ttl, so
///   the `volatile-*` policies evict them too), and a completed record that is evicted lets its
///   body run again: refused by default ([`RedisStoreBuilder::if_evicting`]);
/// - without `appendonly yes`, a restart loses the records written since the last snapshot (all
///   of them without `save`): warned about by default
///   ([`RedisStoreBuilder::if_not_persistent`]);
/// - where `CONFIG GET` is renamed away or not permitted (managed services), a warning says that
///   the settings could not be checked, once per server, and the store goes on.
///
/// With `noeviction`, a server at `maxmemory` refuses new claims ([`Error::Store`], saying so)
/// and keeps every record: replays are still served (a replay writes nothing), and claims
/// already granted still complete, renew and release (those scripts are never refused at
/// `maxmemory`; completions go past it by at most the results of the calls in flight).
///
/// # Waiting
///
/// A caller that finds its key held ([`Store::wait`]) is woken by Redis pub/sub when the holder
/// completes or releases the key, or another caller takes a lapsed claim over. The scripts that
/// do it publish a message on a channel named like the record's key ([`RedisStore::record_name`]):
/// `PUBLISH` on one server, `SPUBLISH` (sharded pub/sub, Redis 7) on a cluster, where the
/// channel is in the record's hash slot, so the node that owns the record sends the message to
/// its own subscribers only. Each store has one subscriber connection (on a cluster, one per
/// node), made when one of its callers first waits and shared by all of them: a channel is
/// subscribed while at least one of the store's callers waits for its key, and each waiter is
/// woken by its key's messages only. A waiter subscribes before it reads the record, so a
/// change after that read is a message it receives; woken, it returns, and the caller claims
/// again. A waiter costs one read of the record when it starts, and the subscription of its
/// key once per store, not per waiter.
///
/// A message can be lost: the subscriber connection dropped (it is made again by the next
/// waiter that looks, and every waiter is then woken to look at its record), or the server
/// failed over. So a subscribed waiter also reads the record every
/// [`RedisStoreBuilder::fallback_poll_interval`] (500 ms unless set), and when the holder's
/// lease runs out (a holder that died says nothing). A waiter that cannot subscribe (pub/sub
/// turned off with [`RedisStoreBuilder::pubsub`], a proxy that does not pass it on, an ACL
/// that refuses it, a cluster before Redis 7, or a store made by
/// [`RedisStoreBuilder::connect_cluster_client`]) polls with a bounded exponential backoff:
/// first after 5 ms, then doubling up to [`RedisStoreBuilder::max_poll_interval`] (100 ms
/// unless set). Either way, never past the caller's timeout, one read at a time per waiting
/// caller (a slow server is polled less, not more), on the multiplexed connection every call
/// shares (a waiter holds nothing a claim needs). With an ACL, waking needs `+subscribe
/// +unsubscribe +publish` (`+ssubscribe +sunsubscribe +spublish` on a cluster) and the
/// channels under the prefix (`&<prefix>*`); without them the scripts' notifications are
/// skipped and the waiters poll (a warning says so once).
///
/// # Failures and cancellation
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
/// - A claim whose reply never came (cut off by the timeout, or its call dropped while the claim
///   was on its way) is released in the background, so the key is not left held for a lease by
///   a call that will never run its body.
/// - A call dropped while its body runs releases its claim ([`Store::release_on_drop`]); if
///   the records of some of its steps were on their way, it first records them
///   ([`Store::release_on_drop_after_steps`]: each step, then the release). A call dropped once
///   its body returned `Ok`, or whose completion failed, hands the completion to the runtime
///   ([`Store::complete_on_drop`]). Each is a task on the runtime that tries again with backoff
///   (50 ms doubling to 1 s) while the server is unreachable, for up to a minute in all; a step
///   the store refuses for good (its lease ran out, a value over the server's limit) is left
///   unrecorded, with a warning, and a retry runs it again. All need a tokio runtime; outside
///   one, the claim is left to its lease and the steps are not recorded.
/// - A result longer than the server accepts in one argument (`proto-max-bulk-len`, read with
///   the other settings; 512 MB by default) is not sent, because Redis would close the
///   connection every call shares: the completion fails with [`Error::Store`] saying so, and the
///   claim is left to its lease.
/// - A value under the prefix that is not an idem record (another type, a hash without the
///   `idem` marker, no expiry, a malformed field) gives [`Error::Store`] naming the key and what
///   it holds: another program writes under the same prefix. It is left untouched, by every
///   operation, [`Store::remove`] included: give the store a prefix of its own, or delete it by
///   hand if it is garbage. A stored result that does not decode is reported by the executor as
///   [`Error::Codec`].
/// - An ACL that refuses the store's user a command or a key (`NOPERM`, or a command a script
///   runs) gives [`Error::Store`] naming the command or the key and the rule to add (`ACL
///   SETUSER <user> +evalsha`, `~<prefix>*`). The store sends `EVALSHA`, `EVAL`, `SCRIPT LOAD`,
///   `INFO`, `CONFIG GET` and `HMGET`; its scripts run `HMGET`, `EXISTS`, `PTTL`, `HEXISTS`, `HSET`,
///   `HDEL`, `PEXPIRE`, `DEL` and `TYPE` on the keys under its prefix, and for steps `HSETNX`
///   and `HGETALL`.
///
/// Create the store inside the tokio runtime that uses it: the connection's I/O runs on that
/// runtime. The store is cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    timeout: Duration,
    max_poll_interval: Duration,
    fallback_poll_interval: Duration,
    health: Arc<Health>,
    wakes: Arc<Wakes>,
    /// Completed records seen, replayed with a plain `HMGET` (see "Replays" above).
    known: Arc<Known>,
}

/// Settings of a [`RedisStore`] before it connects: made by [`RedisStore::builder`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `connect` is awaited"]
pub struct RedisStoreBuilder {
    prefix: String,
    timeout: Duration,
    max_poll_interval: Duration,
    fallback_poll_interval: Duration,
    pubsub: bool,
    if_evicting: IfUnsafe,
    if_not_persistent: IfUnsafe,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            prefix: RedisStore::DEFAULT_PREFIX.to_owned(),
            timeout: RedisStore::DEFAULT_TIMEOUT,
            max_poll_interval: RedisStore::DEFAULT_MAX_POLL_INTERVAL,
            fallback_poll_interval: RedisStore::DEFAULT_FALLBACK_POLL_INTERVAL,
            pubsub: true,
            if_evicting: IfUnsafe::Refuse,
            if_not_persistent: IfUnsafe::Warn,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every record's Redis key ([`RedisStore::DEFAULT_PREFIX`] unless set).
    ///
    /// Stores with different prefixes never see each other's records, on one server. On a
    /// cluster, a prefix with a hash tag (`{idem}:`) puts every record in one slot.
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

    /// The longest pause between two polls of a key another call holds, for a waiter that is
    /// not subscribed to its key's notifications (pub/sub turned off or refused, or the
    /// subscriber connection down; [`RedisStore::DEFAULT_MAX_POLL_INTERVAL`] unless set; at
    /// least 1 ms). See [`RedisStore`], "Waiting".
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How often a waiter that is subscribed to its key's notifications reads the record all
    /// the same, in case a notification was lost
    /// ([`RedisStore::DEFAULT_FALLBACK_POLL_INTERVAL`] unless set; at least 1 ms). See
    /// [`RedisStore`], "Waiting".
    pub fn fallback_poll_interval(mut self, interval: Duration) -> Self {
        self.fallback_poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Whether this store's waiters subscribe to be woken by Redis pub/sub when the holder of
    /// their key completes or releases it (`true` unless set). Turned off, they poll, as they
    /// do wherever pub/sub is not available (a proxy that does not pass it on, an ACL that
    /// refuses it). The store's scripts notify other stores' waiters either way.
    pub fn pubsub(mut self, on: bool) -> Self {
        self.pubsub = on;
        self
    }

    /// What to do with a server whose `maxmemory-policy` is not `noeviction`
    /// ([`IfUnsafe::Refuse`] unless set).
    ///
    /// At `maxmemory`, such a server evicts keys to make room, idem records included: every
    /// record has a ttl, so the `volatile-*` policies evict them as readily as the `allkeys-*`
    /// ones. A completed record that is evicted is a key with no record, so its retry runs the
    /// body again. Accept it only for a server that never reaches `maxmemory`.
    pub fn if_evicting(mut self, action: IfUnsafe) -> Self {
        self.if_evicting = action;
        self
    }

    /// What to do with a server without an append-only file (`appendonly no`)
    /// ([`IfUnsafe::Warn`] unless set).
    ///
    /// Such a server loses, when it restarts or crashes, every record written since its last
    /// RDB snapshot (all of them if `save` is off), and the retries of those calls run their
    /// bodies again. A replica promoted by a failover may lack the last writes as well, whatever
    /// the persistence: replication is asynchronous.
    pub fn if_not_persistent(mut self, action: IfUnsafe) -> Self {
        self.if_not_persistent = action;
        self
    }

    /// Connects to the server at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` with the `redis` crate's TLS features, or `redis+unix:///path`), and checks
    /// its settings (see [`RedisStore`], "Server settings").
    ///
    /// Fails with [`Error::Store`] if the URL is malformed, the server cannot be reached within
    /// the timeout, a setting is refused ([`RedisStoreBuilder::if_evicting`],
    /// [`RedisStoreBuilder::if_not_persistent`]), or the server is a Redis Cluster node
    /// (`cluster_enabled:1` in `INFO cluster`): through one node, the keys other nodes own fail
    /// with `MOVED`, so the error says to use [`RedisStoreBuilder::connect_cluster`], which
    /// follows the cluster's slot map. (The store does not switch to a cluster connection by
    /// itself: the URL's credentials, TLS and database would have to be carried over, and a
    /// cluster connection is better asked for by name.)
    pub async fn connect(self, url: &str) -> Result<RedisStore, Error> {
        let client = Client::open(url).map_err(|source| failure("connect", source))?;
        self.connect_client(client).await
    }

    /// Connects with an existing `redis` (version 1) client. Fails as
    /// [`RedisStoreBuilder::connect`] does, a Redis Cluster node included.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1/")?;
    /// let store = idem_runtime::RedisStore::builder().connect_client(client).await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn connect_client(self, client: Client) -> Result<RedisStore, Error> {
        require_tokio("connect")?;
        let server = client.get_connection_info().addr().to_string();
        // Without a user name, Redis authenticates the `default` user.
        let user = client
            .get_connection_info()
            .redis_settings()
            .username()
            .unwrap_or("default")
            .to_owned();
        let subscriber = client.clone();
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
        let source = if self.pubsub {
            Source::Single(subscriber)
        } else {
            Source::Off
        };
        self.finish(connect, server, user, source).await
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://host:port` each; the
    /// others are discovered), and checks the settings of every master.
    ///
    /// Every record is one key and every operation one script on that key, so each operation
    /// goes to the node that owns the key's slot, in one round trip as on a single server; the
    /// client follows `MOVED` and `ASK` redirections and reconnects to nodes by itself, and a
    /// node that joined later gets the scripts the first time it is asked to run one.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), idem_runtime::Error> {
    /// let store = idem_runtime::RedisStore::builder()
    ///     .prefix("{idem}:")
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
        let client = ClusterClient::builder(nodes.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|source| failure("connect", source))?;
        let source = if self.pubsub {
            Source::Cluster(nodes)
        } else {
            Source::Off
        };
        self.connect_cluster_with(client, source).await
    }

    /// Connects to a Redis Cluster with an existing `redis` (version 1) cluster client.
    ///
    /// The store cannot make a subscriber connection like the client's (a cluster client does
    /// not tell its nodes and credentials), so its waiters poll (see [`RedisStore`], "Waiting"):
    /// [`RedisStoreBuilder::connect_cluster`] wakes them by pub/sub.
    pub async fn connect_cluster_client(self, client: ClusterClient) -> Result<RedisStore, Error> {
        self.connect_cluster_with(client, Source::Off).await
    }

    async fn connect_cluster_with(
        self,
        client: ClusterClient,
        source: Source,
    ) -> Result<RedisStore, Error> {
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
        self.finish(
            connect,
            "the cluster".to_owned(),
            "<user>".to_owned(),
            source,
        )
        .await
    }

    /// Connects, then checks the server's settings: both within the timeout.
    async fn finish(
        self,
        connect: impl Future<Output = RedisResult<Conn>>,
        server: String,
        user: String,
        source: Source,
    ) -> Result<RedisStore, Error> {
        let timeout = self.timeout;
        let work = async {
            let conn = match connect.await {
                Ok(conn) => conn,
                Err(source) => {
                    return Err(match acl_denial(&source, &user, &self.prefix, None) {
                        Some(denied) => denied.into_error("connect", source),
                        None => failure("connect", source),
                    });
                }
            };
            let store = RedisStore {
                conn,
                prefix: Arc::from(self.prefix),
                timeout: self.timeout,
                max_poll_interval: self.max_poll_interval,
                fallback_poll_interval: self.fallback_poll_interval,
                wakes: Wakes::new(source, self.timeout),
                known: Arc::new(Known::default()),
                health: Arc::new(Health {
                    server,
                    user,
                    if_evicting: self.if_evicting,
                    if_not_persistent: self.if_not_persistent,
                    recheck: Recheck::default(),
                    checking: tokio::sync::Mutex::new(()),
                    max_value: AtomicU64::new(DEFAULT_MAX_BULK),
                    state: Mutex::new(HealthState::default()),
                }),
            };
            let nodes = store
                .read_settings()
                .await
                .map_err(|source| failure("connect (reading the server's settings)", source))?;
            if let Some(refusal) = store.health.judge(&nodes) {
                return Err(Error::store(refusal));
            }
            if !has_steps_slot(&store.prefix) {
                // Said now, once, rather than by the first step in production.
                tracing::warn!(
                    target: "idem", prefix = %store.prefix,
                    "{}; until then, idem::step fails with Error::Store on this store (every \
                     other operation works)",
                    NoStepsSlot { prefix: store.prefix.to_string() }
                );
            }
            Ok(store)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::store(TimedOut {
                op: "connect",
                after: timeout,
            })),
        }
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

/// The first and the longest pause before a command answered `TRYAGAIN` (its slot migrating)
/// is sent again (the cluster client has tried a few times already).
const FIRST_TRY_AGAIN: Duration = Duration::from_millis(20);
const MAX_TRY_AGAIN: Duration = Duration::from_millis(200);

/// While settings must be read again, how often an operation other than a claim tries (a claim
/// always does, first).
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// How many times a settings reading is sent when it fails on a broken connection: each failure
/// starts a new connection attempt, which the next one waits for.
const SETTINGS_ATTEMPTS: u32 = 3;

/// Redis's default `proto-max-bulk-len`: the longest argument it accepts.
const DEFAULT_MAX_BULK: u64 = 512 * 1024 * 1024;

/// What the store knows of the server's settings, shared by its clones.
struct Health {
    /// The server the store connected to, for messages.
    server: String,
    /// The ACL user the store connects as, for messages (`<user>` where unknown).
    user: String,
    if_evicting: IfUnsafe,
    if_not_persistent: IfUnsafe,
    /// Whether the settings must be read again before the next operation: after a connection
    /// error or a `NOSCRIPT` (the node may be another server), or while a setting is refused.
    recheck: Recheck,
    /// One reading at a time.
    checking: tokio::sync::Mutex<()>,
    /// The longest argument every node accepts (`proto-max-bulk-len`, 512 MB unless read): a
    /// longer one makes Redis close the connection, which every call shares.
    max_value: AtomicU64,
    state: Mutex<HealthState>,
}

/// Whether the server's settings must be read again: every request for a reading has a number,
/// and a reading that succeeds answers the requests made before it started.
///
/// A flag cleared when a reading starts would be cleared for good by a reading that then fails,
/// or whose caller is dropped or cut off by the timeout, and claims would run unchecked on what
/// may be another server; and while a reading runs, other calls would take it as done. A flag
/// cleared when a reading succeeds would lose a request made while it ran. Two counters do
/// neither.
#[derive(Default)]
struct Recheck {
    /// Requests so far.
    asked: AtomicU64,
    /// The requests that a successful reading answered (those made before it started).
    answered: AtomicU64,
}

impl Recheck {
    /// Asks for a reading before the next operation.
    fn ask(&self) {
        self.asked.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a request is not answered yet.
    fn needed(&self) -> bool {
        self.asked.load(Ordering::Acquire) > self.answered.load(Ordering::Acquire)
    }

    /// Before a reading: the requests it answers if it succeeds.
    fn begin(&self) -> u64 {
        self.asked.load(Ordering::Acquire)
    }

    /// After a successful reading that began at `begun`.
    fn answered(&self, begun: u64) {
        self.answered.fetch_max(begun, Ordering::AcqRel);
    }
}

#[derive(Default)]
struct HealthState {
    last_attempt: Option<Instant>,
    /// Why new claims are refused, as last found.
    refusal: Option<Unsafe>,
    /// What was warned about already: `server id|setting`.
    warned: HashSet<String>,
}

/// What one node reported: each reply may be an error (`CONFIG` renamed away, not permitted).
struct NodeSettings {
    addr: String,
    info: Value,
    /// `INFO cluster`, read through a connection to one server only: a cluster node there is
    /// refused ([`single_on_cluster`]). `Nil` on a cluster connection.
    cluster: Value,
    policy: Value,
    appendonly: Value,
    save: Value,
    max_bulk: Value,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Judges what the nodes reported: warns (once per server and setting) where the builder
    /// says to, and returns the first refusal.
    fn judge(&self, nodes: &[NodeSettings]) -> Option<Unsafe> {
        if let Some(refusal) = nodes.iter().find_map(single_on_cluster) {
            return Some(refusal);
        }
        let max_value = nodes
            .iter()
            .filter_map(|node| config_value(&node.max_bulk, "proto-max-bulk-len").ok())
            .filter_map(|max| max.parse::<u64>().ok())
            .min()
            .unwrap_or(DEFAULT_MAX_BULK);
        self.max_value.store(max_value, Ordering::Release);
        let mut refusal = None;
        for node in nodes {
            for finding in assess(node) {
                let action = match &finding.risk {
                    Risk::Evicting => self.if_evicting,
                    Risk::NotPersistent => self.if_not_persistent,
                    Risk::Unreadable => IfUnsafe::Warn,
                };
                match action {
                    IfUnsafe::Refuse => {
                        refusal.get_or_insert(Unsafe {
                            message: finding.message(true),
                        });
                    }
                    IfUnsafe::Warn => {
                        if self.state().warned.insert(finding.id.clone()) {
                            tracing::warn!(
                                target: "idem", server = %finding.addr,
                                "{}", finding.message(false)
                            );
                        }
                    }
                    IfUnsafe::Accept => {
                        tracing::debug!(
                            target: "idem", server = %finding.addr,
                            "accepted: {}", finding.message(false)
                        );
                    }
                }
            }
        }
        refusal
    }
}

/// A setting that puts at-most-once at risk, found on one node.
struct Finding {
    addr: String,
    /// `server id|setting`, to warn once.
    id: String,
    risk: Risk,
    detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Risk {
    Evicting,
    NotPersistent,
    Unreadable,
}

impl Finding {
    /// What is wrong, why it matters, and the fix; `refused` adds how to accept it instead.
    fn message(&self, refused: bool) -> String {
        let addr = &self.addr;
        let detail = &self.detail;
        match self.risk {
            Risk::Evicting => {
                let mut m = format!(
                    "Redis at {addr} has maxmemory-policy {detail}: at maxmemory it evicts keys, \
                     idem records included (each has a ttl, so the volatile-* policies evict them \
                     too), and a completed record that is evicted lets its body run again. Set \
                     `maxmemory-policy noeviction` (in redis.conf, and CONFIG SET \
                     maxmemory-policy noeviction)"
                );
                if refused {
                    m.push_str(
                        ", or accept the risk with RedisStoreBuilder::if_evicting(IfUnsafe::Warn)",
                    );
                }
                m
            }
            Risk::NotPersistent => {
                let mut m = if detail.is_empty() {
                    format!(
                        "Redis at {addr} persists nothing (appendonly no, save \"\"): a restart \
                         loses every idem record, and retries run their bodies again"
                    )
                } else {
                    format!(
                        "Redis at {addr} keeps no append-only file (appendonly no; RDB snapshots \
                         only, save \"{detail}\"): a restart loses the records written since the \
                         last snapshot, and their retries run their bodies again"
                    )
                };
                m.push_str(
                    ". Set `appendonly yes` (with appendfsync everysec a crash loses at most the \
                     last second of records; with always, none)",
                );
                if refused {
                    m.push_str(
                        ", or accept the risk with \
                         RedisStoreBuilder::if_not_persistent(IfUnsafe::Warn)",
                    );
                }
                m
            }
            Risk::Unreadable => {
                let mut m = format!(
                    "could not read the settings of Redis at {addr} ({detail}): idem cannot \
                     check that maxmemory-policy is noeviction and that appendonly is yes; make \
                     sure they are (CONFIG GET is renamed away or not permitted, as on some \
                     managed services)"
                );
                if detail.contains("NOPERM") || detail.contains("no permissions") {
                    m.push_str(
                        ", or let the store's ACL user read them: ACL SETUSER <user> +config|get",
                    );
                }
                m
            }
        }
    }
}

/// The risks in what one node reported.
fn assess(node: &NodeSettings) -> Vec<Finding> {
    let id = info_field(&node.info, "run_id").unwrap_or_else(|| node.addr.clone());
    let finding = |risk: Risk, detail: String| Finding {
        addr: node.addr.clone(),
        id: format!("{id}|{risk:?}"),
        risk,
        detail,
    };
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    match config_value(&node.policy, "maxmemory-policy") {
        Ok(policy) if policy == "noeviction" => {}
        Ok(policy) => found.push(finding(Risk::Evicting, policy)),
        Err(why) => unreadable.push(why),
    }
    match (
        config_value(&node.appendonly, "appendonly"),
        config_value(&node.save, "save"),
    ) {
        (Ok(aof), _) if aof == "yes" => {}
        (Ok(_), Ok(save)) => found.push(finding(Risk::NotPersistent, save)),
        (Err(why), _) | (_, Err(why)) => unreadable.push(why),
    }
    if let Some(why) = unreadable.into_iter().next() {
        found.push(finding(Risk::Unreadable, why));
    }
    found
}

/// A Redis Cluster node reached through a connection to one server
/// ([`RedisStoreBuilder::connect`]): refused whatever the builder says, because through it every
/// key whose slot another node owns fails with `MOVED`, and which keys work depends on their
/// digests. [`RedisStoreBuilder::connect_cluster`] is the way to a cluster.
fn single_on_cluster(node: &NodeSettings) -> Option<Unsafe> {
    if info_field(&node.cluster, "cluster_enabled").as_deref() != Some("1") {
        return None;
    }
    let addr = &node.addr;
    Some(Unsafe {
        message: format!(
            "Redis at {addr} is a Redis Cluster node (cluster_enabled:1), reached through a \
             connection to one server: the records whose slots other nodes own would fail with \
             MOVED. Connect with RedisStoreBuilder::connect_cluster([\"redis://{addr}/\"]) (any \
             of the cluster's nodes; the others are discovered)"
        ),
    })
}

/// The value of `name` in a `CONFIG GET name` reply, or why there is none.
fn config_value(reply: &Value, name: &str) -> Result<String, String> {
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::ServerError(err) => return Err(format!("CONFIG GET {name}: {err}")),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|p| p.first().zip(p.get(1)))
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
        other => return Err(format!("CONFIG GET {name} replied {other:?}")),
    };
    pairs
        .into_iter()
        .find(|(k, _)| as_text(k).is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .and_then(|(_, v)| as_text(v))
        .ok_or_else(|| format!("CONFIG GET {name} did not report it"))
}

/// A `field:value` line of an `INFO` reply.
fn info_field(reply: &Value, field: &str) -> Option<String> {
    let text = as_text(reply)?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

impl RedisStore {
    /// The key prefix unless one is set: `idem:`.
    pub const DEFAULT_PREFIX: &'static str = "idem:";
    /// The bound on every operation, connection attempt and reply unless one is set: 2 seconds.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    /// The longest pause between polls of a held key, for a waiter not subscribed to its
    /// notifications, unless one is set: 100 ms.
    pub const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);
    /// How often a waiter subscribed to its key's notifications reads the record all the same,
    /// unless set: 500 ms.
    pub const DEFAULT_FALLBACK_POLL_INTERVAL: Duration = Duration::from_millis(500);

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

    /// Connects with an existing `redis` (version 1) client and the default settings. See
    /// [`RedisStoreBuilder::connect_client`].
    pub async fn connect_client(client: Client) -> Result<RedisStore, Error> {
        RedisStoreBuilder::default().connect_client(client).await
    }

    /// Settings for a store: prefix, timeout, poll interval, and what to do about a server
    /// whose settings put at-most-once at risk.
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

    /// The command the scripts notify waiters with: sharded pub/sub on a cluster, so that a
    /// message goes from the node that owns the record to that node's subscribers only.
    fn publish(&self) -> &'static [u8] {
        match self.conn {
            Conn::Single(_) => b"PUBLISH",
            Conn::Cluster(_) => b"SPUBLISH",
        }
    }

    /// The name of the Redis key that holds the record of `key`: the prefix and the key's 64 hex
    /// digits. For operators (`redis-cli HGETALL ...`) and tests.
    pub fn record_name(&self, key: &Key) -> String {
        record_name(&self.prefix, key)
    }

    /// The name of the Redis hash that holds the step records of `key` ([`crate::step`]), in
    /// the record's hash slot (see [`RedisStore`], "Steps"): the record's name and `:steps`
    /// when the prefix has a hash tag (`{idem}:<hex>:steps`), or else the prefix and the
    /// record's name as the hash tag (`idem:{idem:<hex>}:steps`). `None` for a prefix with
    /// braces but no hash tag (`{}`, an unclosed `{`, a `}` before any `{`), under which no name
    /// shares the record's slot: such a store records no steps. For operators and tests.
    pub fn steps_name(&self, key: &Key) -> Option<String> {
        steps_name(&self.prefix, key)
    }

    /// Reads `maxmemory-policy`, `appendonly`, `save` and the run id of the server, or of every
    /// master of the cluster: one round trip.
    async fn read_settings(&self) -> RedisResult<Vec<NodeSettings>> {
        let config = |name: &str| {
            let mut cmd = ::redis::cmd("CONFIG");
            cmd.arg("GET").arg(name);
            cmd
        };
        let mut info = ::redis::cmd("INFO");
        info.arg("server");
        let cmds = [
            info,
            config("maxmemory-policy"),
            config("appendonly"),
            config("save"),
            config("proto-max-bulk-len"),
        ];
        match self.conn.clone() {
            Conn::Single(mut conn) => {
                let mut pipe = ::redis::pipe();
                pipe.ignore_errors();
                for cmd in &cmds {
                    pipe.add_command(cmd.clone());
                }
                // Its own command: before Redis 7, INFO takes one section.
                pipe.cmd("INFO").arg("cluster");
                let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
                let mut replies = replies.into_iter();
                let mut next = || replies.next().unwrap_or(Value::Nil);
                Ok(vec![NodeSettings {
                    addr: self.health.server.clone(),
                    info: next(),
                    policy: next(),
                    appendonly: next(),
                    save: next(),
                    max_bulk: next(),
                    cluster: next(),
                }])
            }
            Conn::Cluster(conn) => {
                let ask = |cmd: Cmd| {
                    let mut conn = conn.clone();
                    async move {
                        let all =
                            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                        match conn.route_command(cmd, all).await? {
                            Value::Map(per_node) => Ok(per_node),
                            other => Err(RedisError::from((
                                ErrorKind::Client,
                                "a per-node reply was expected",
                                format!("{other:?}"),
                            ))),
                        }
                    }
                };
                let [info, policy, appendonly, save, max_bulk] = cmds;
                let (info, policy, appendonly, save, max_bulk) = tokio::try_join!(
                    ask(info),
                    ask(policy),
                    ask(appendonly),
                    ask(save),
                    ask(max_bulk)
                )?;
                let reply_of = |replies: &[(Value, Value)], addr: &str| {
                    replies
                        .iter()
                        .find(|(a, _)| as_text(a).as_deref() == Some(addr))
                        .map(|(_, v)| v.clone())
                        .unwrap_or(Value::Nil)
                };
                Ok(info
                    .iter()
                    .filter_map(|(addr, _)| as_text(addr))
                    .map(|addr| NodeSettings {
                        info: reply_of(&info, &addr),
                        policy: reply_of(&policy, &addr),
                        appendonly: reply_of(&appendonly, &addr),
                        save: reply_of(&save, &addr),
                        max_bulk: reply_of(&max_bulk, &addr),
                        cluster: Value::Nil,
                        addr,
                    })
                    .collect())
            }
        }
    }

    /// Before an operation: reads the settings again if a connection error or a `NOSCRIPT` asked
    /// for it (the server may be another one).
    ///
    /// A claim waits for the reading and fails if it fails: no body starts on a server whose
    /// settings were not read. Other operations go on whatever the reading says (a claim already
    /// granted is better completed, renewed or released on any server than abandoned), and try
    /// to read at most once per [`RECHECK_EVERY`].
    ///
    /// The request for a reading is answered only by a reading that succeeds: one that fails,
    /// or is cut off (its caller dropped, or the timeout ran out), leaves it for the next
    /// operation. The caller bounds this by the store's timeout.
    async fn settle(&self, op: &'static str) -> Result<(), Error> {
        let health = &*self.health;
        if !health.recheck.needed() {
            return Ok(());
        }
        let claim = op == "claim";
        {
            let _one = health.checking.lock().await;
            let due = health.recheck.needed()
                && (claim
                    || health
                        .state()
                        .last_attempt
                        .is_none_or(|at| at.elapsed() >= RECHECK_EVERY));
            if due {
                let begun = health.recheck.begin();
                health.state().last_attempt = Some(Instant::now());
                match self.read_settings_afresh().await {
                    Ok(nodes) => {
                        let refusal = health.judge(&nodes);
                        if let Some(refusal) = &refusal {
                            // Not answered: read again before each claim until the setting is
                            // fixed.
                            if health.state().warned.insert(refusal.message.clone()) {
                                tracing::warn!(
                                    target: "idem",
                                    "new claims are refused: {}", refusal.message
                                );
                            }
                        } else {
                            health.recheck.answered(begun);
                        }
                        health.state().refusal = refusal;
                    }
                    Err(err) => {
                        if claim {
                            return Err(failure("claim (reading the server's settings)", err));
                        }
                        tracing::debug!(
                            target: "idem", error = %err,
                            "could not read the Redis settings; trying again before the next claim"
                        );
                    }
                }
            }
        }
        if claim && let Some(refusal) = health.state().refusal.clone() {
            return Err(Error::store(refusal));
        }
        Ok(())
    }

    /// [`RedisStore::read_settings`], sent again on a fresh connection after a connection
    /// error, up to [`SETTINGS_ATTEMPTS`] times in all.
    ///
    /// A reading is asked for after a connection error, and the connection manager hands the
    /// first command after a failed reconnection that failure (`Connection refused`, cached
    /// from the outage) while it starts a new attempt: sent once, the first claim after an
    /// outage would fail on a server that is back.
    async fn read_settings_afresh(&self) -> RedisResult<Vec<NodeSettings>> {
        let mut attempt = 1;
        loop {
            match self.read_settings().await {
                Err(err) if is_connection_error(&err) && attempt < SETTINGS_ATTEMPTS => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Runs one command against the server within the timeout; a command that fails on a broken
    /// connection is sent once more (the connection manager has started to reconnect by then),
    /// after the server's settings are read again. A command that a cluster node answers with
    /// `TRYAGAIN` (a script on a record and its steps hash while their slot migrates and only
    /// one of them has moved; nothing ran) is sent again after a pause, until the migration
    /// ends or the timeout runs out.
    async fn run<T, F, Fut>(&self, op: &'static str, name: &str, attempt: F) -> Result<T, Error>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        require_tokio(op)?;
        let work = async {
            self.settle(op).await?;
            let mut pause = FIRST_TRY_AGAIN;
            let result = loop {
                let result = match attempt(self.conn.clone()).await {
                    Err(err) if is_connection_error(&err) => {
                        self.health.recheck.ask();
                        self.settle(op).await?;
                        attempt(self.conn.clone()).await
                    }
                    other => other,
                };
                match result {
                    Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_TRY_AGAIN);
                    }
                    other => break other,
                }
            };
            match result {
                Ok(reply) => Ok(reply),
                Err(err) => Err(self.failed(op, name, err).await),
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::store(TimedOut {
                op,
                after: self.timeout,
            })),
        }
    }

    /// The error of a failed command on the record `name`; a failure that may mean another
    /// server asks for its settings to be read again. An ACL's refusal names what it refused
    /// and the rule to add: a command that a script ran is found by asking the server which of
    /// the scripts' commands the user may not run (Redis does not name it).
    async fn failed(&self, op: &'static str, name: &str, err: RedisError) -> Error {
        if is_connection_error(&err) || err.is_cluster_error() {
            self.health.recheck.ask();
        }
        if err.code() == Some("OOM") {
            return Error::store(OutOfMemory { op, source: err });
        }
        let user = &self.health.user;
        if let Some(denied) = acl_denial(&err, user, &self.prefix, Some(name)) {
            return denied.into_error(op, err);
        }
        if is_script_acl_denial(&err) {
            let denied = self.denied_script_commands(name).await;
            return Denied::ScriptCommands(denied).into_error_for(op, user, err);
        }
        failure(op, err)
    }

    /// Which of the commands the scripts run on a record the user may not run on `name`
    /// (`redis.acl_check_cmd`, Redis 7); all of them if the server cannot say.
    async fn denied_script_commands(&self, name: &str) -> Vec<String> {
        let mut conn = self.conn.clone();
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(ACL_PROBE).arg(1).arg(name);
        match cmd.query_async::<Vec<String>>(&mut conn).await {
            Ok(denied) if !denied.is_empty() => denied,
            _ => SCRIPT_COMMANDS.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    /// Runs one of our scripts on the record of `key` ([`ScriptCall::send`]); `foreign` replies
    /// become errors.
    async fn script(
        &self,
        op: &'static str,
        lua: &'static Lua,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<Vec<Value>, Error> {
        let name = self.record_name(key);
        self.script_on(op, lua, &[name.as_str()], args).await
    }

    /// Runs one of our scripts on `keys`: a record's name, and for the scripts that take it,
    /// its steps hash's. `foreign` replies become errors naming the key that is not ours.
    async fn script_on(
        &self,
        op: &'static str,
        lua: &'static Lua,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Vec<Value>, Error> {
        let name = keys.first().copied().unwrap_or_default();
        let call = ScriptCall {
            lua,
            keys,
            args,
            recheck: &self.health.recheck,
        };
        let call = &call;
        let reply: Value = self.run(op, name, move |conn| call.send(conn)).await?;
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
            let steps = items.get(2).and_then(as_bytes) == Some(b"steps");
            let name = match (steps, keys.get(1)) {
                (true, Some(steps)) => steps,
                _ => name,
            };
            return Err(Error::store(Foreign {
                name: name.to_owned(),
                prefix: self.prefix.to_string(),
                reason,
                steps,
            }));
        }
        Ok(items)
    }

    /// Runs a script whose reply is `ok` or `lost`.
    async fn ok_or_lost(
        &self,
        op: &'static str,
        lua: &'static Lua,
        key: &Key,
        args: &[&[u8]],
    ) -> Result<bool, Error> {
        let items = self.script(op, lua, key, args).await?;
        match as_bytes(&items[0]) {
            Some(b"ok") => Ok(true),
            Some(b"lost") => Ok(false),
            _ => Err(bad_reply(op, &items[0])),
        }
    }

    /// A claim, the reading of the settings it may wait for included, within the timeout.
    async fn claim_now(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        require_tokio("claim")?;
        let claim = async {
            // A refused claim is refused before it is sent: nothing to release.
            self.settle("claim").await?;
            if let Some(done) = self.replay_known(&key).await {
                return Ok(Claim::Completed(done));
            }
            // The script's future in a box of its own: a replay's stays small.
            Box::pin(self.claim_script(key, fingerprint, lease)).await
        };
        match tokio::time::timeout(self.timeout, claim).await {
            Ok(claim) => claim,
            Err(_) => Err(Error::store(TimedOut {
                op: "claim",
                after: self.timeout,
            })),
        }
    }

    /// The claim script, once the settings are settled.
    async fn claim_script(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<Claim, Error> {
        let sent = Instant::now();
        let token = Token::generate();
        let token_hex = token_hex(token);
        let (lease_ms, total_ms) = lease_millis(lease);
        let fp: &[u8] = match &fingerprint {
            Some(fp) => fp.as_bytes(),
            None => b"",
        };
        let args: [&[u8]; 5] = [
            token_hex.as_bytes(),
            lease_ms.as_bytes(),
            fp,
            total_ms.as_bytes(),
            self.publish(),
        ];
        // Until its reply is read, the claim may have been granted to a call that will never
        // run the body (it was dropped, or the reply timed out): release it then.
        let mut unanswered = Unanswered {
            store: self,
            key,
            token,
            armed: true,
        };
        let claim = self
            .script("claim", &SCRIPTS.claim, &key, &args)
            .await
            .and_then(|items| {
                let completed_by = items.get(4).and_then(parse_token);
                parse_claim(token, items).map(|claim| (claim, completed_by))
            });
        unanswered.armed = match &claim {
            Ok(_) => false,
            Err(err) => !wrote_nothing(err),
        };
        let (claim, completed_by) = claim?;
        if let (Claim::Completed(done), Some(by)) = (&claim, completed_by) {
            self.known.insert(
                &key,
                Seen {
                    token: Some(by),
                    expires: crate::clock::after(sent, done.expires_in),
                },
            );
        }
        Ok(claim)
    }

    /// A replay of a completed record seen before ([`Known`]), read with one `HMGET`: no script,
    /// so it costs the server about what a `GET` does. `None` if the store has not seen the key
    /// completed, or the record is no longer the completed one the hint names (same token: a
    /// completed record never changes), or the read failed: the hint is then forgotten, and the
    /// caller claims as usual (the script says what the record is).
    ///
    /// Its time left is the hint's, counted from before the request that first read the record
    /// (the server's `PTTL` then): the record's expiry never moves once it is completed.
    async fn replay_known(&self, key: &Key) -> Option<Completed> {
        let now = Instant::now();
        let seen = self.known.get(key, now)?;
        let done = self.read_known(key, seen, now).await;
        if done.is_none() {
            // Expired, removed, or another claim's record now.
            self.known.forget(key);
        }
        done
    }

    async fn read_known(&self, key: &Key, seen: Seen, now: Instant) -> Option<Completed> {
        let token = seen.token?;
        let expires_in = seen.expires.checked_duration_since(now)?;
        let mut cmd = ::redis::cmd("HMGET");
        cmd.arg(self.record_name(key))
            .arg("state")
            .arg("token")
            .arg("fp")
            .arg("value");
        let mut conn = self.conn.clone();
        let reply: Value = cmd.query_async(&mut conn).await.ok()?;
        let Value::Array(mut items) = reply else {
            return None;
        };
        if items.len() != 4
            || as_bytes(&items[0]) != Some(b"done")
            || as_bytes(&items[1]) != Some(&token_digits(token)[..])
        {
            return None;
        }
        let fingerprint = match &items[2] {
            Value::Nil => None,
            fp => Some(Fingerprint::from_digest(
                <[u8; 32]>::try_from(as_bytes(fp)?).ok()?,
            )),
        };
        let Value::BulkString(value) = &mut items[3] else {
            return None;
        };
        let value = Bytes::from(std::mem::take(value));
        Some(Completed::new(
            value,
            fingerprint,
            expires_in.max(Duration::from_millis(1)),
        ))
    }

    async fn complete_now(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: &Bytes,
        ttl: Duration,
    ) -> Result<Completion, Error> {
        let max = self.health.max_value.load(Ordering::Acquire);
        TooLarge::check("result", value.len(), max)?;
        let token_hex = token_hex(token);
        let ttl_ms = millis(ttl);
        let sent = Instant::now();
        let fp: &[u8] = match &fingerprint {
            Some(fp) => fp.as_bytes(),
            None => b"",
        };
        let args: [&[u8]; 5] = [
            token_hex.as_bytes(),
            value,
            ttl_ms.as_bytes(),
            fp,
            self.publish(),
        ];
        let record = self.record_name(&key);
        let mut items = self
            .script_on("complete", &SCRIPTS.complete, &[&record], &args)
            .await?;
        if as_bytes(&items[0]) == Some(b"steps") {
            // The call has step records: completed with its steps hash's name, which deletes
            // them in the same script (see `STEPS`). The script looks at the record afresh.
            let steps = self
                .steps_name(&key)
                .ok_or_else(|| bad("complete", &items))?;
            items = self
                .script_on("complete", &SCRIPTS.complete, &[&record, &steps], &args)
                .await?;
        }
        let stored = match as_bytes(&items[0]) {
            Some(b"ok") => true,
            Some(b"lost") => false,
            _ => return Err(bad("complete", &items)),
        };
        if stored {
            // The record is this token's, completed with this ttl. (If this completion repeated
            // one whose reply was lost, the record was stored a little earlier and expires that
            // much before the hint does: a replay in between finds no record and claims.)
            self.known.insert(
                &key,
                Seen {
                    token: Some(token),
                    expires: crate::clock::after(sent, ttl),
                },
            );
        }
        Ok(if stored {
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
        let attempt = || self.complete_now(key, token, fingerprint, &value, ttl);
        super::complete_in_background(key, attempt, worth_retrying).await;
    }

    /// Runs `task` (given a clone of the store) on the current tokio runtime and returns at
    /// once: the destructors' hand-off. Outside a runtime it does nothing.
    fn in_background<F, Fut>(&self, task: F)
    where
        F: FnOnce(RedisStore) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(task(self.clone()));
        }
    }

    /// [`Store::wait`]: see [`RedisStore`], "Waiting".
    async fn wait_for(&self, key: Key, timeout: Duration) -> Result<(), Error> {
        let deadline = crate::clock::after(Instant::now(), timeout);
        let mut waiter = self.wakes.join(self.record_name(&key));
        let mut pause = FIRST_POLL;
        // What the last read of the record said of its lease: the waiter reads it again once
        // it has run out, in case its holder died without a word.
        let mut lease_left = Duration::MAX;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            // Subscribed before the record is read, so a change after the read is a message.
            let listening = self.wakes.listen(&waiter, deadline - now).await;
            if !listening {
                // A poll, as before pub/sub: the caller has just found the key held.
                let nap = pause.min(lease_left.saturating_add(Duration::from_millis(1)));
                pause = (pause * 2).min(self.max_poll_interval);
                if !self.nap(&mut waiter, nap, deadline).await {
                    return Ok(());
                }
            }
            waiter.seen();
            let items = self.script("wait", &SCRIPTS.peek, &key, &[]).await?;
            lease_left = match as_bytes(&items[0]) {
                Some(b"free") => return Ok(()),
                Some(b"held") => items
                    .get(1)
                    .and_then(as_millis)
                    .ok_or_else(|| bad_reply("wait", &items[0]))?,
                _ => return Err(bad_reply("wait", &items[0])),
            };
            if listening {
                let nap = self
                    .fallback_poll_interval
                    .min(lease_left.saturating_add(Duration::from_millis(1)));
                if !self.nap(&mut waiter, nap, deadline).await {
                    return Ok(());
                }
            }
        }
    }

    /// Sleeps `nap`, cut short by the deadline: returns whether to read the record again
    /// (`false`: a notification came, or the deadline passed, so the wait is over).
    async fn nap(&self, waiter: &mut wake::Waiter, nap: Duration, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::select! {
            () = waiter.woken() => false,
            () = tokio::time::sleep(nap.min(deadline - now)) => Instant::now() < deadline,
        }
    }

    async fn release_now(&self, key: Key, token: Token) -> Result<bool, Error> {
        let token_hex = token_hex(token);
        let args: [&[u8]; 2] = [token_hex.as_bytes(), self.publish()];
        self.ok_or_lost("release", &SCRIPTS.release, &key, &args)
            .await
    }

    /// [`Store::remove`]: the record and its step records, in one script.
    async fn remove_now(&self, key: Key) -> Result<bool, Error> {
        self.known.forget(&key);
        let args: [&[u8]; 1] = [self.publish()];
        let record = self.record_name(&key);
        let steps = self.steps_name(&key);
        let keys: Vec<&str> = std::iter::once(record.as_str())
            .chain(steps.as_deref())
            .collect();
        let items = self
            .script_on("remove", &SCRIPTS.remove, &keys, &args)
            .await?;
        match as_bytes(&items[0]) {
            Some(b"ok") => Ok(true),
            Some(b"lost") => Ok(false),
            _ => Err(bad("remove", &items)),
        }
    }

    /// The record's and the steps hash's names, or the error of a prefix that cannot place
    /// step records in the record's hash slot.
    fn step_keys(&self, key: &Key) -> Result<(String, String), Error> {
        match self.steps_name(key) {
            Some(steps) => Ok((self.record_name(key), steps)),
            None => Err(Error::store(NoStepsSlot {
                prefix: self.prefix.to_string(),
            })),
        }
    }

    /// [`Store::record_step`]: one script, one round trip (see [`RECORD_STEP`]).
    async fn record_step_now(
        &self,
        key: Key,
        token: Token,
        step: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<StepRecorded, Error> {
        let max = self.health.max_value.load(Ordering::Acquire);
        TooLarge::check("step value", value.len(), max)?;
        let field = step_field(step);
        TooLarge::check("step name", field.len(), max)?;
        let (record, steps) = self.step_keys(&key)?;
        let token_hex = token_hex(token);
        let ttl_ms = millis(ttl);
        let args: [&[u8]; 4] = [token_hex.as_bytes(), &field, value, ttl_ms.as_bytes()];
        let items = self
            .script_on(
                "record_step",
                &SCRIPTS.record_step,
                &[&record, &steps],
                &args,
            )
            .await?;
        match as_bytes(&items[0]) {
            Some(b"ok") => Ok(StepRecorded::Recorded),
            Some(b"lost") => Ok(StepRecorded::LeaseLost),
            _ => Err(bad("record_step", &items)),
        }
    }

    /// [`Store::steps`]: one script, one round trip (see [`STEPS_OF`]).
    async fn steps_now(&self, key: Key, token: Token) -> Result<RecordedSteps, Error> {
        let (record, steps) = self.step_keys(&key)?;
        let token_hex = token_hex(token);
        let args: [&[u8]; 1] = [token_hex.as_bytes()];
        let items = self
            .script_on("steps", &SCRIPTS.steps, &[&record, &steps], &args)
            .await?;
        match parse_steps(items) {
            Ok(found) => Ok(found),
            Err(StepsReply::Bad(items)) => Err(bad("steps", &items)),
            Err(StepsReply::Foreign(reason)) => Err(Error::store(Foreign {
                name: steps,
                prefix: self.prefix.to_string(),
                reason: reason.to_owned(),
                steps: true,
            })),
        }
    }
}

/// Releases, from its destructor, a claim whose reply was not read (see `claim_now`).
struct Unanswered<'a> {
    store: &'a RedisStore,
    key: Key,
    token: Token,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release_on_drop(self.key, self.token);
        }
    }
}

/// One script run on one record (and its steps hash), as [`RedisStore::run`] attempts it.
struct ScriptCall<'a> {
    lua: &'static Lua,
    /// The record's name, then, for the scripts given it, its steps hash's (one slot).
    keys: &'a [&'a str],
    args: &'a [&'a [u8]],
    /// Set on `NOSCRIPT`: the node may be one whose settings were never read.
    recheck: &'a Recheck,
}

impl ScriptCall<'_> {
    fn command(&self, with_source: bool) -> Cmd {
        let mut cmd = if with_source {
            let mut cmd = ::redis::cmd("EVAL");
            cmd.arg(&self.lua.source);
            cmd
        } else {
            let mut cmd = ::redis::cmd("EVALSHA");
            cmd.arg(&self.lua.hash);
            cmd
        };
        cmd.arg(self.keys.len());
        for key in self.keys {
            cmd.arg(*key);
        }
        for arg in self.args {
            cmd.arg(*arg);
        }
        cmd
    }

    /// `EVALSHA` first; a node that does not have the script (`NOSCRIPT`: restarted, flushed,
    /// promoted, or new to the cluster and reached through a redirection) gets its source with
    /// `EVAL`, which runs it and caches it there. `SCRIPT LOAD` would not do: it goes to the
    /// nodes the client knows, and a node a slot is migrating to is not among them.
    ///
    /// On a cluster, an `ASK` redirection that the client gave up on is followed here.
    async fn send(&self, mut conn: Conn) -> RedisResult<Value> {
        let mut rounds = 0;
        loop {
            let result = match self.command(false).query_async(&mut conn).await {
                Err(err) if is_noscript(&err) => {
                    self.recheck.ask();
                    self.command(true).query_async(&mut conn).await
                }
                other => other,
            };
            let err = match result {
                Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::Ask) => err,
                other => return other,
            };
            let (Conn::Cluster(cluster), Some(route)) = (
                &mut conn,
                err.redirect_node().and_then(|(node, _)| node_route(node)),
            ) else {
                return Err(err);
            };
            match self.asking(cluster, route).await {
                // The client dropped its connection to that node (a node that serves no slot
                // yet is forgotten when the slot map is read again): the next send through the
                // redirection connects again.
                Err(err) if err.kind() == ErrorKind::ClusterConnectionNotFound && rounds < 3 => {
                    rounds += 1;
                }
                other => return other,
            }
        }
    }

    /// Sends `ASKING` and the script to the node an `ASK` redirection names, in one pipeline.
    ///
    /// The `redis` cluster client follows `ASK` by sending `ASKING` and then the command as two
    /// requests on the node's shared connection, so another call's command can come between them
    /// and take the `ASKING`: its command is then redirected back, and after its retries the
    /// client gives up with the `ASK` error. A pipeline is written in one piece: nothing comes
    /// between.
    async fn asking(
        &self,
        conn: &mut ClusterConnection,
        route: ::redis::cluster_routing::SingleNodeRoutingInfo,
    ) -> RedisResult<Value> {
        let mut with_source = false;
        loop {
            let mut pipe = ::redis::pipe();
            pipe.cmd("ASKING").add_command(self.command(with_source));
            let mut replies = conn.route_pipeline(pipe, 0, 2, route.clone()).await?;
            let reply = replies.pop().unwrap_or(Value::Nil);
            match reply {
                Value::ServerError(err)
                    if !with_source && err.kind() == Some(ServerErrorKind::NoScript) =>
                {
                    self.recheck.ask();
                    with_source = true;
                }
                Value::ServerError(err) => return Err(err.into()),
                reply => return Ok(reply),
            }
        }
    }
}

fn is_noscript(err: &RedisError) -> bool {
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// The route to `host:port`, as a redirection names a node.
fn node_route(node: &str) -> Option<::redis::cluster_routing::SingleNodeRoutingInfo> {
    let (host, port) = node.rsplit_once(':')?;
    Some(::redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port: port.parse().ok()?,
    })
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("fallback_poll_interval", &self.fallback_poll_interval)
            .field("pubsub", &self.wakes.enabled())
            .field("notifications_received", &self.wakes.received())
            .field("if_evicting", &self.health.if_evicting)
            .field("if_not_persistent", &self.health.if_not_persistent)
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
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async move {
            self.complete_now(key, token, fingerprint, &value, ttl)
                .await
        })
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async move {
            let token_hex = token_hex(token);
            let (lease_ms, total_ms) = lease_millis(lease);
            let args: [&[u8]; 3] = [
                token_hex.as_bytes(),
                lease_ms.as_bytes(),
                total_ms.as_bytes(),
            ];
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
        Box::pin(self.remove_now(key))
    }

    fn record_step(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        Box::pin(async move { self.record_step_now(key, token, &step, &value, ttl).await })
    }

    fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        Box::pin(self.steps_now(key, token))
    }

    /// The server's `proto-max-bulk-len` (read at connect and after a reconnection): a larger
    /// result would make Redis close the connection.
    fn max_value_len(&self) -> Option<usize> {
        let max = self.health.max_value.load(Ordering::Acquire);
        Some(usize::try_from(max).unwrap_or(usize::MAX))
    }

    /// Spawns the release on the current tokio runtime and returns at once (the task of
    /// [`Store::release_on_drop_after_steps`], with no steps); outside a runtime it does nothing
    /// (the claim expires with its lease, which is no longer renewed).
    fn release_on_drop(&self, key: Key, token: Token) {
        self.in_background(move |store| async move {
            // No steps: the ttl is not used.
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

    /// Spawns, on the current tokio runtime, a task that records the steps (each as
    /// [`Store::record_step`], fenced by `token`: one round trip each) and then releases the
    /// claim, in that order (a release first would let another call take the key, and the steps
    /// would be refused); returns at once. While the server is unreachable the task tries again
    /// with backoff, for up to a minute in all; a step that already reached the server keeps
    /// its first value. Outside a runtime it does nothing, as [`Store::release_on_drop`]: the
    /// claim is left to its lease, and the steps are not recorded.
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

    /// Spawns the completion on the current tokio runtime and returns at once. The task tries
    /// again with backoff while the server is unreachable, for up to a minute; a completion that
    /// already reached the server is recognised as itself and keeps its value. Outside a runtime
    /// it does nothing (the claim is left to its lease).
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

/// `prefix` and `key`'s 64 hex digits: [`Key::to_hex`], without a formatter call per byte (this
/// is on every operation's path).
fn record_name(prefix: &str, key: &Key) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = String::with_capacity(prefix.len() + 64);
    name.push_str(prefix);
    for &b in key.as_bytes() {
        name.push(char::from(HEX[usize::from(b >> 4)]));
        name.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    name
}

/// Where the step records of the record `prefix` + hex go: a name under the prefix in the
/// record's hash slot, or `None` if the prefix leaves none (see [`RedisStore::steps_name`]).
///
/// Redis Cluster hashes the part of a name between its first `{` and the first `}` after it,
/// if that is not empty, and else the whole name. A record's name is the prefix and hex digits
/// (no braces), so its hash tag, if it has one, is the prefix's: a name that starts with the
/// record's and adds no brace keeps it. Without one, the whole record name is hashed, and the
/// only names under the prefix that hash the same put it whole in a tag of their own, which
/// works only if the prefix has no brace at all (the tag must be the first `{`, and may not
/// hold a `}`).
fn steps_name(prefix: &str, key: &Key) -> Option<String> {
    let record = record_name(prefix, key);
    Some(if prefix_hash_tag(prefix)? {
        format!("{record}:steps")
    } else {
        format!("{prefix}{{{record}}}:steps")
    })
}

/// Whether `prefix` has a hash tag (`Some(true)`), no brace at all (`Some(false)`), or braces
/// without a tag (`None`: no name under it shares a record's slot; see [`steps_name`]).
fn prefix_hash_tag(prefix: &str) -> Option<bool> {
    match prefix.find('{') {
        Some(open) => match prefix[open + 1..].find('}') {
            Some(len) if len > 0 => Some(true),
            _ => None,
        },
        None if prefix.contains('}') => None,
        None => Some(false),
    }
}

/// Whether step records can be kept under `prefix` (in each record's hash slot).
fn has_steps_slot(prefix: &str) -> bool {
    prefix_hash_tag(prefix).is_some()
}

/// A step's field in its steps hash: `step:` and its name (so that no name can be the hash's
/// `idem` marker).
fn step_field(step: &str) -> Vec<u8> {
    let mut field = Vec::with_capacity(STEP_FIELD.len() + step.len());
    field.extend_from_slice(STEP_FIELD);
    field.extend_from_slice(step.as_bytes());
    field
}

/// What starts a step's field in a steps hash.
const STEP_FIELD: &[u8] = b"step:";

/// Why a steps script's reply could not be read.
#[derive(Debug)]
enum StepsReply {
    /// Not a reply our script gives.
    Bad(Vec<Value>),
    /// A field that is not ours in the steps hash: what it is.
    Foreign(&'static str),
}

/// Reads a steps script's reply: `held` and the hash's fields and values (the `idem` marker,
/// the `fp` fingerprint and `step:`-named steps), `lost` or `reused`. Hands the values' buffers
/// over as they are.
fn parse_steps(mut items: Vec<Value>) -> Result<RecordedSteps, StepsReply> {
    match items.first().and_then(as_bytes) {
        Some(b"lost") => return Ok(RecordedSteps::LeaseLost),
        Some(b"reused") => return Ok(RecordedSteps::KeyReused),
        Some(b"held") => {}
        _ => return Err(StepsReply::Bad(items)),
    }
    let Some(Value::Array(fields)) = items.get_mut(1) else {
        return Err(StepsReply::Bad(items));
    };
    let fields = std::mem::take(fields);
    if fields.len() % 2 != 0 {
        return Err(StepsReply::Bad(items));
    }
    let mut steps = Vec::with_capacity(fields.len() / 2);
    let mut fields = fields.into_iter();
    while let (Some(field), Some(value)) = (fields.next(), fields.next()) {
        let (Value::BulkString(field), Value::BulkString(value)) = (field, value) else {
            return Err(StepsReply::Bad(items));
        };
        if field == b"idem" || field == b"fp" {
            continue;
        }
        let Some(name) = field.strip_prefix(STEP_FIELD) else {
            return Err(StepsReply::Foreign(
                "a steps hash with a field that is not a step",
            ));
        };
        let Ok(name) = String::from_utf8(name.to_vec()) else {
            return Err(StepsReply::Foreign(
                "a steps hash with a step name that is not UTF-8",
            ));
        };
        steps.push((name, Bytes::from(value)));
    }
    Ok(RecordedSteps::Held(steps))
}

fn token_hex(token: Token) -> String {
    token_digits(token).iter().map(|&d| char::from(d)).collect()
}

/// A token's 32 lowercase hex digits, as a record keeps it.
fn token_digits(token: Token) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 32];
    for (i, d) in digits.iter_mut().enumerate() {
        let nibble = (token.as_u128() >> (4 * (31 - i))) & 0xf;
        *d = HEX[nibble as usize];
    }
    digits
}

/// A token as a record keeps it (32 hex digits), read back.
fn parse_token(value: &Value) -> Option<Token> {
    let hex = as_bytes(value).filter(|b| b.len() == 32)?;
    let hex = std::str::from_utf8(hex).ok()?;
    u128::from_str_radix(hex, 16).ok().map(Token::from_u128)
}

/// The longest expiry the store sets: about 1000 years (Redis refuses expiry times that
/// overflow).
const MAX_MS: u128 = 1000 * 365 * 24 * 60 * 60 * 1000;

/// A duration as whole milliseconds for `PEXPIRE`: at least 1 (0 would delete the key), at most
/// [`MAX_MS`].
fn millis(d: Duration) -> String {
    d.as_millis().clamp(1, MAX_MS).to_string()
}

/// A lease as the claim and renew scripts take it: the lease, and the lease with its grace (the
/// record's expiry), both in milliseconds. The grace is one more lease, cut short where the sum
/// would pass [`MAX_MS`].
fn lease_millis(lease: Duration) -> (String, String) {
    let lease = lease.as_millis().clamp(1, MAX_MS);
    let grace = lease.min(MAX_MS - lease);
    (lease.to_string(), (lease + grace).to_string())
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

/// Whether a failed operation certainly wrote nothing (so a claim it was need not be released).
fn wrote_nothing(err: &Error) -> bool {
    match err {
        Error::Store(source) => {
            source.is::<Foreign>()
                || source.is::<Unsafe>()
                // Refused before the script ran; a command refused inside the script may come
                // after one of its writes.
                || source.downcast_ref::<AclRefused>().is_some_and(|acl| {
                    matches!(acl.denied, Denied::Command(_) | Denied::Key { .. })
                })
        }
        _ => false,
    }
}

/// Whether an operation that failed this way may succeed if sent again later (the server was
/// unreachable, slow, or out of memory), as opposed to a refusal or a record that is not ours.
fn worth_retrying(err: &Error) -> bool {
    match err {
        Error::Store(source) => {
            source.is::<Failure>() || source.is::<TimedOut>() || source.is::<OutOfMemory>()
        }
        _ => false,
    }
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

/// Redis is at `maxmemory` with `noeviction` and refused a write.
#[derive(Debug)]
struct OutOfMemory {
    op: &'static str,
    source: RedisError,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Redis refused the {} because it is at maxmemory: new claims fail until memory is \
             freed (records expire with their ttl) or maxmemory is raised; records already \
             stored are kept and still replayed",
            self.op
        )
    }
}

impl std::error::Error for OutOfMemory {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A result (or a step's value or name) longer than the server accepts in one argument.
#[derive(Debug)]
struct TooLarge {
    /// `result`, `step value` or `step name`.
    what: &'static str,
    len: usize,
    max: u64,
}

impl TooLarge {
    /// An error if `len` bytes are more than `max`.
    fn check(what: &'static str, len: usize, max: u64) -> Result<(), Error> {
        if u64::try_from(len).unwrap_or(u64::MAX) > max {
            return Err(Error::store(TooLarge { what, len, max }));
        }
        Ok(())
    }
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} is {} bytes, more than the {} Redis accepts in one argument \
             (proto-max-bulk-len): it was not sent (Redis would close the connection every call \
             shares); raise proto-max-bulk-len or make it smaller",
            self.what, self.len, self.max
        )
    }
}

impl std::error::Error for TooLarge {}

/// A server setting puts at-most-once at risk and the builder says to refuse it.
#[derive(Clone, Debug)]
struct Unsafe {
    message: String,
}

impl fmt::Display for Unsafe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unsafe {}

/// A prefix under which no name shares a record's hash slot, so no step can be recorded.
#[derive(Debug)]
struct NoStepsSlot {
    prefix: String,
}

impl fmt::Display for NoStepsSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the RedisStore prefix {:?} has braces but no Redis Cluster hash tag (an empty {{}}, \
             an unclosed {{, or a }} before any {{), so no key under it shares a record's hash \
             slot, and step records (idem::step) must: give the store a prefix without braces \
             (\"idem:\") or with a hash tag (\"{{idem}}:\")",
            self.prefix
        )
    }
}

impl std::error::Error for NoStepsSlot {}

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

/// A value under the prefix that is not an idem record (or, at a steps hash's name, not idem's
/// step records).
#[derive(Debug)]
struct Foreign {
    name: String,
    prefix: String,
    /// What the key holds, as the script saw it.
    reason: String,
    /// Whether the key is a steps hash's name.
    steps: bool,
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ours = if self.steps {
            "idem's step records of a call"
        } else {
            "an idem record"
        };
        write!(
            f,
            "the Redis key {} holds {}, not {ours}: something other than idem wrote it, \
             so the prefix {:?} is shared with another program. It was left untouched; give \
             this store a prefix of its own (RedisStoreBuilder::prefix), or delete the key by \
             hand if it is garbage",
            self.name, self.reason, self.prefix
        )
    }
}

/// What an ACL refused (`NOPERM`, or a command a script ran).
#[derive(Debug)]
enum Denied {
    /// A command the store sends (lowercase, as in an ACL rule: `evalsha`, `script|load`).
    Command(String),
    /// The record's key (or, at connect, a key under the prefix).
    Key {
        name: Option<String>,
        prefix: String,
    },
    /// Commands that the scripts run on a record (lowercase).
    ScriptCommands(Vec<String>),
}

/// The commands the scripts run on a record, for an ACL rule.
const SCRIPT_COMMANDS: [&str; 11] = [
    "hmget", "exists", "pttl", "hexists", "hset", "hdel", "pexpire", "del", "type", "hsetnx",
    "hgetall",
];

/// Returns which of the scripts' commands the user may not run on `KEYS[1]`.
const ACL_PROBE: &str = r#"
local denied = {}
local probes = {
  {'HMGET', KEYS[1], 'f'}, {'EXISTS', KEYS[1]}, {'PTTL', KEYS[1]}, {'HEXISTS', KEYS[1], 'f'},
  {'HSET', KEYS[1], 'f', 'v'}, {'HDEL', KEYS[1], 'f'}, {'PEXPIRE', KEYS[1], '1'},
  {'DEL', KEYS[1]}, {'TYPE', KEYS[1]}, {'HSETNX', KEYS[1], 'f', 'v'}, {'HGETALL', KEYS[1]}
}
for _, p in ipairs(probes) do
  if not redis.acl_check_cmd(unpack(p)) then table.insert(denied, string.lower(p[1])) end
end
return denied
"#;

/// What a `NOPERM` reply refused, if it is one: `user` and `prefix` make the rule, `name` is
/// the record the command was about.
fn acl_denial(err: &RedisError, user: &str, prefix: &str, name: Option<&str>) -> Option<AclDenied> {
    if err.code() != Some("NOPERM") {
        return None;
    }
    let text = err
        .detail()
        .map(str::to_owned)
        .unwrap_or_else(|| err.to_string());
    // "no permissions to access one of the keys used as arguments"; a command reads "no
    // permissions to run the 'evalsha' command".
    let denied = if text.contains("access one of the keys") {
        Denied::Key {
            name: name.map(str::to_owned),
            prefix: prefix.to_owned(),
        }
    } else {
        let command = text
            .split('\'')
            .nth(1)
            .filter(|c| !c.is_empty())
            .unwrap_or("?")
            .to_ascii_lowercase();
        Denied::Command(command)
    };
    Some(AclDenied {
        denied,
        user: user.to_owned(),
    })
}

/// Whether a script failed because the ACL denies a command it ran (Redis 7 says so with
/// `ERR`, not `NOPERM`, and does not name the command).
fn is_script_acl_denial(err: &RedisError) -> bool {
    let text = err
        .detail()
        .map(str::to_owned)
        .unwrap_or_else(|| err.to_string());
    text.contains("can't run this command or subcommand")
}

/// An ACL refusal and the user it refused.
struct AclDenied {
    denied: Denied,
    user: String,
}

impl AclDenied {
    fn into_error(self, op: &'static str, source: RedisError) -> Error {
        self.denied.into_error_for(op, &self.user, source)
    }
}

impl Denied {
    fn into_error_for(self, op: &'static str, user: &str, source: RedisError) -> Error {
        Error::store(AclRefused {
            op,
            user: user.to_owned(),
            denied: self,
            source,
        })
    }
}

/// Redis's ACL refused a command or a key the store needs.
#[derive(Debug)]
struct AclRefused {
    op: &'static str,
    user: String,
    denied: Denied,
    source: RedisError,
}

impl fmt::Display for AclRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (op, user) = (self.op, &self.user);
        match &self.denied {
            Denied::Command(command) => write!(
                f,
                "Redis refused the {op}: the ACL of user {user} does not allow the command \
                 {} (NOPERM). Add it: ACL SETUSER {user} +{command} (idem sends EVALSHA, EVAL, \
                 SCRIPT LOAD, INFO, CONFIG GET and HMGET: +evalsha +eval +script|load +info \
                 +config|get +hmget)",
                command.to_ascii_uppercase()
            ),
            Denied::Key { name, prefix } => {
                write!(
                    f,
                    "Redis refused the {op}: the ACL of user {user} does not allow "
                )?;
                match name {
                    Some(name) => write!(f, "the key {name}")?,
                    None => write!(f, "the keys under the prefix {prefix:?}")?,
                }
                write!(
                    f,
                    " (NOPERM). Add the rule: ACL SETUSER {user} ~{prefix}* (idem reads and \
                     writes every key under its prefix)"
                )
            }
            Denied::ScriptCommands(commands) => {
                let names: Vec<String> = commands.iter().map(|c| c.to_ascii_uppercase()).collect();
                let rules: Vec<String> = commands.iter().map(|c| format!("+{c}")).collect();
                write!(
                    f,
                    "Redis refused the {op}: the ACL of user {user} does not allow {}, which \
                     idem's scripts run on its records. Add it: ACL SETUSER {user} {}",
                    names.join(", "),
                    rules.join(" ")
                )
            }
        }
    }
}

impl std::error::Error for AclRefused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
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
    fn a_running_record_outlives_its_lease_by_a_lease_within_the_bound() {
        let l = |d: Duration| lease_millis(d);
        assert_eq!(l(Duration::ZERO), ("1".into(), "2".into()));
        assert_eq!(l(Duration::from_secs(30)), ("30000".into(), "60000".into()));
        // Near the bound the grace shrinks; the lease itself is never cut by it.
        assert_eq!(
            l(Duration::MAX),
            ("31536000000000".into(), "31536000000000".into())
        );
        let century = Duration::from_secs(100 * 365 * 24 * 60 * 60);
        assert_eq!(l(century), ("3153600000000".into(), "6307200000000".into()));
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
    fn record_names_are_the_prefix_and_the_keys_hex_digits() {
        for i in 0..100u32 {
            let key = Key::new("t", &i);
            assert_eq!(record_name("idem:", &key), format!("idem:{}", key.to_hex()));
        }
    }

    /// What Redis Cluster hashes of a key's name: its hash tag (between the first `{` and the
    /// first `}` after it, if not empty), or else the whole name.
    fn hashed(name: &str) -> &str {
        if let Some(open) = name.find('{')
            && let Some(len) = name[open + 1..].find('}')
            && len > 0
        {
            return &name[open + 1..open + 1 + len];
        }
        name
    }

    #[test]
    fn steps_hashes_share_their_records_slot() {
        let key = Key::new("t", &7u32);
        let hex = key.to_hex();
        for prefix in [
            "idem:",
            "",
            "payments:idem:",
            "{idem}:",
            "a{b}c:",
            "}{x}:",
            "{a}{b}:",
            "x{y}}z:",
            "caf\u{e9}:",
        ] {
            let record = record_name(prefix, &key);
            let steps = steps_name(prefix, &key).unwrap_or_else(|| panic!("{prefix:?}"));
            assert_eq!(hashed(&steps), hashed(&record), "{prefix:?}: {steps}");
            assert!(steps.starts_with(prefix) && steps.contains(&hex), "{steps}");
            assert_ne!(steps, record);
            assert!(steps.len() != record.len(), "never another record's name");
        }
        assert_eq!(
            steps_name("idem:", &key),
            Some(format!("idem:{{idem:{hex}}}:steps"))
        );
        assert_eq!(
            steps_name("{idem}:", &key),
            Some(format!("{{idem}}:{hex}:steps"))
        );
        // Braces without a tag: no name under the prefix hashes like the record.
        for prefix in ["{}", "{}:", "a{b:", "a}b:", "{:", "}"] {
            assert_eq!(steps_name(prefix, &key), None, "{prefix:?}");
            assert!(!has_steps_slot(prefix), "{prefix:?}");
        }
        assert!(has_steps_slot("idem:") && has_steps_slot("{idem}:") && has_steps_slot(""));
    }

    #[test]
    fn steps_replies_parse() {
        let held = |fields: Vec<Value>| vec![bulk(b"held"), Value::Array(fields)];
        let found = parse_steps(held(vec![
            bulk(b"idem"),
            bulk(b"steps"),
            bulk(b"step:charge"),
            bulk(b"\"ch_1\""),
            bulk(b"step:"),
            bulk(b""),
            bulk(b"step:nul\0{}:"),
            bulk(&[0, 255]),
        ]));
        assert_eq!(
            found.ok(),
            Some(RecordedSteps::Held(vec![
                ("charge".into(), Bytes::from_static(b"\"ch_1\"")),
                (String::new(), Bytes::new()),
                ("nul\0{}:".into(), Bytes::from_static(&[0, 255])),
            ]))
        );
        assert_eq!(
            parse_steps(held(vec![])).ok(),
            Some(RecordedSteps::Held(vec![]))
        );
        assert_eq!(
            parse_steps(vec![bulk(b"lost")]).ok(),
            Some(RecordedSteps::LeaseLost)
        );
        assert_eq!(
            parse_steps(vec![bulk(b"reused")]).ok(),
            Some(RecordedSteps::KeyReused)
        );
        assert_eq!(
            parse_steps(held(vec![
                bulk(b"fp"),
                bulk(&[7; 32]),
                bulk(b"step:a"),
                bulk(b"1"),
            ]))
            .ok(),
            Some(RecordedSteps::Held(vec![(
                "a".into(),
                Bytes::from_static(b"1")
            )])),
            "the fingerprint is not a step"
        );
        for foreign in [
            vec![bulk(b"other"), bulk(b"x")],
            vec![bulk(b"step:\xff"), bulk(b"x")],
        ] {
            assert!(
                matches!(parse_steps(held(foreign)), Err(StepsReply::Foreign(_))),
                "a field that is not a step"
            );
        }
        for bad in [
            vec![],
            vec![bulk(b"held")],
            vec![bulk(b"held"), bulk(b"x")],
            held(vec![bulk(b"step:a")]),
            held(vec![bulk(b"step:a"), Value::Int(1)]),
            vec![bulk(b"what"), Value::Array(vec![])],
        ] {
            assert!(
                matches!(parse_steps(bad.clone()), Err(StepsReply::Bad(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn step_fields_cannot_be_the_marker() {
        assert_eq!(step_field("idem"), b"step:idem");
        assert_eq!(step_field(""), b"step:");
    }

    #[test]
    fn tokens_read_back_as_written() {
        for t in [
            0,
            0xab,
            u128::MAX,
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        ] {
            let token = Token::from_u128(t);
            assert_eq!(parse_token(&bulk(token_hex(token).as_bytes())), Some(token));
        }
        assert_eq!(parse_token(&bulk(b"12")), None);
        assert_eq!(parse_token(&bulk(&[b'g'; 32])), None);
        assert_eq!(parse_token(&Value::Nil), None);
    }

    #[test]
    fn token_digits_are_the_formatted_hex() {
        for t in [
            0,
            1,
            0xab,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let token = Token::from_u128(t);
            assert_eq!(token_hex(token), format!("{t:032x}"));
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
            assert_eq!(Script::new(&a.source).get_hash(), a.hash);
            for b in &all[i + 1..] {
                assert_ne!(a.hash, b.hash);
            }
        }
    }

    fn config(name: &str, value: &str) -> Value {
        Value::Array(vec![bulk(name.as_bytes()), bulk(value.as_bytes())])
    }

    fn node(policy: Value, appendonly: Value, save: Value) -> NodeSettings {
        NodeSettings {
            addr: "10.0.0.1:6379".into(),
            info: bulk(b"# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\ntcp_port:6379\r\n"),
            policy,
            appendonly,
            save,
            max_bulk: config("proto-max-bulk-len", "1048576"),
            cluster: bulk(b"# Cluster\r\ncluster_enabled:0\r\n"),
        }
    }

    fn risks(node: &NodeSettings) -> Vec<(Risk, String)> {
        assess(node)
            .into_iter()
            .map(|f| (f.risk, f.detail))
            .collect()
    }

    #[test]
    fn settings_are_judged_as_documented() {
        let safe = node(
            config("maxmemory-policy", "noeviction"),
            config("appendonly", "yes"),
            config("save", ""),
        );
        assert_eq!(risks(&safe), vec![]);

        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            let evicting = node(
                config("maxmemory-policy", policy),
                config("appendonly", "yes"),
                config("save", ""),
            );
            assert_eq!(risks(&evicting), vec![(Risk::Evicting, policy.into())]);
        }

        let rdb_only = node(
            config("maxmemory-policy", "noeviction"),
            config("appendonly", "no"),
            config("save", "3600 1 300 100"),
        );
        assert_eq!(
            risks(&rdb_only),
            vec![(Risk::NotPersistent, "3600 1 300 100".into())]
        );

        // RESP3 maps, and a server that hides its settings.
        let resp3 = node(
            Value::Map(vec![(bulk(b"maxmemory-policy"), bulk(b"noeviction"))]),
            Value::Map(vec![(bulk(b"appendonly"), bulk(b"yes"))]),
            Value::Map(vec![]),
        );
        assert_eq!(risks(&resp3), vec![]);
        let hidden = node(
            Value::Array(vec![]),
            config("appendonly", "yes"),
            Value::Nil,
        );
        assert_eq!(assess(&hidden)[0].risk, Risk::Unreadable);
    }

    #[test]
    fn findings_name_the_setting_the_fix_and_the_way_out() {
        let evicting = node(
            config("maxmemory-policy", "allkeys-lru"),
            config("appendonly", "no"),
            config("save", ""),
        );
        let found = assess(&evicting);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].id, "abc123|Evicting", "warned once per server run");
        let refused = found[0].message(true);
        for part in [
            "10.0.0.1:6379",
            "maxmemory-policy allkeys-lru",
            "noeviction",
            "if_evicting(IfUnsafe::Warn)",
        ] {
            assert!(refused.contains(part), "{part}: {refused}");
        }
        assert!(!found[0].message(false).contains("IfUnsafe"));
        let persistence = found[1].message(true);
        for part in ["persists nothing", "appendonly yes", "if_not_persistent"] {
            assert!(persistence.contains(part), "{part}: {persistence}");
        }
    }

    #[test]
    fn a_cluster_node_reached_as_one_server_is_refused_with_the_way_to_connect() {
        let mut single = node(
            config("maxmemory-policy", "noeviction"),
            config("appendonly", "yes"),
            config("save", ""),
        );
        assert!(single_on_cluster(&single).is_none());
        single.cluster = Value::Nil;
        assert!(
            single_on_cluster(&single).is_none(),
            "INFO cluster not permitted"
        );
        single.cluster = bulk(b"# Cluster\r\ncluster_enabled:1\r\n");
        let refusal = single_on_cluster(&single).map(|r| r.message);
        let message = refusal.as_deref().unwrap_or_default();
        for part in [
            "10.0.0.1:6379",
            "cluster_enabled:1",
            "MOVED",
            "connect_cluster",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
    }

    #[test]
    fn an_unreadable_setting_is_a_warning_with_the_servers_answer() {
        let denied = ::redis::parse_redis_value(
            b"-ERR unknown command 'CONFIG', with args beginning with: 'GET'\r\n",
        )
        .unwrap_or(Value::Nil);
        assert!(matches!(denied, Value::ServerError(_)), "{denied:?}");
        let renamed = node(denied.clone(), denied.clone(), denied);
        let found = assess(&renamed);
        assert_eq!(found.len(), 1, "one warning, not one per setting");
        let message = found[0].message(false);
        assert!(
            message.contains("CONFIG GET maxmemory-policy") && message.contains("make sure"),
            "{message}"
        );
    }

    #[test]
    fn the_errors_that_are_worth_retrying_in_the_background() {
        let io = || RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(worth_retrying(&failure("complete", io())));
        assert!(worth_retrying(&Error::store(TimedOut {
            op: "complete",
            after: Duration::from_secs(1)
        })));
        assert!(
            !worth_retrying(&Error::store(TooLarge {
                what: "result",
                len: 2,
                max: 1
            })),
            "a result over the server's limit breaks the shared connection each time it is sent"
        );
        assert!(!worth_retrying(&Error::store(Foreign {
            name: "k".into(),
            prefix: "idem:".into(),
            reason: "a string (not a hash)".into(),
            steps: false,
        })));
        assert!(wrote_nothing(&Error::store(Unsafe {
            message: "x".into()
        })));
        assert!(!wrote_nothing(&failure("claim", io())));
    }
}
