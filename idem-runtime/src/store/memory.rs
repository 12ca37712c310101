//! The embedded in-memory store.

use std::collections::BTreeSet;
use std::fmt;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BoxFuture, RecordedSteps, StepRecorded, Store};
use crate::clock::after;
use crate::error::Error;
use crate::key::{Fingerprint, Key, fingerprint_matches};
use crate::record::{Claim, Completed, Completion, Token};

/// How many records a [`MemoryStore`] holds at the most unless told otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// How many bytes a [`MemoryStore`]'s records take at the most unless told otherwise: 1 GiB, by
/// the store's accounting (each record's [`RECORD_OVERHEAD`] plus its result's encoded size).
pub const DEFAULT_MAX_BYTES: usize = 1 << 30;

/// The bytes a [`MemoryStore`] counts for each record on top of its result: its key, the record,
/// its slot in the map (with the map's spare capacity), its entry in the expiry queue, the
/// waiters of an in-progress claim, and the exact encoding of its key with its entry in the map
/// that replays find the record's digest by (at its longest). 752 on 64-bit targets: an estimate
/// that errs high (a million records of 1-byte results measured about 450 bytes resident each
/// before the exact encodings were kept), so that a store of many tiny records is bounded too.
pub const RECORD_OVERHEAD: usize = 2 * size_of::<(Key, Record)>()
    + 2 * size_of::<(Instant, Key)>()
    + NOTIFY_ALLOCATION
    + EXACT_ALLOCATION
    + 2 * size_of::<(Arc<[u8]>, Key)>();

/// The longest exact key encoding a record keeps, in bytes. A longer key is found by its
/// digest, as before, and costs its replays a BLAKE3 digest. Keys of a function path, a few
/// integers, UUIDs or short strings fit.
pub(crate) const MAX_EXACT_KEY: usize = 128;

/// The allocation of the longest exact key encoding (`Arc<[u8]>`: two counters and the bytes,
/// rounded up to the allocator's 16 bytes).
const EXACT_ALLOCATION: usize = (2 * size_of::<usize>() + MAX_EXACT_KEY).next_multiple_of(16);

/// The allocation of an in-progress claim's `Arc<Notify>` (two counters and the `Notify`,
/// rounded up to the allocator's size class).
const NOTIFY_ALLOCATION: usize = (2 * size_of::<usize>() + size_of::<Notify>()).next_power_of_two();

/// How many records a shard of the map holds at the entry bound, about. A shard's table grows
/// (and, after many removals, rehashes in place) all at once under its lock, in time that grows
/// with its size: up to 0.5 ms of CPU for a shard of 125,000 records (a million records in the 8
/// shards `dashmap` picks on two cores), so about 15 µs at 4,096 (benches/memory.rs,
/// `expiry_1m_live`, claims while the store grows).
const RECORDS_PER_SHARD: usize = 4096;

/// The fewest shards: enough that claims on many cores rarely wait for one another.
const MIN_SHARDS: usize = 64;

/// The most shards. Each shard's lock is a cache line of its own, and past a few hundred a claim
/// of a new key misses on it: first executions into a store of millions of records took 1.8–1.9
/// µs with 256 shards, 1.95 with 512, 2.2 with 1,024 or 4,096 (benches/memory.rs,
/// `first_execution`). A store bounded above two million records has bigger shards instead.
const MAX_SHARDS: usize = 512;

/// The shard count of a store bounded at `max_entries` records: 256 at the default bound.
fn shards_for(max_entries: usize) -> usize {
    (max_entries / RECORDS_PER_SHARD)
        .clamp(MIN_SHARDS, MAX_SHARDS)
        .next_power_of_two()
}

/// How many expiry queues the store has; a key's queue is chosen by its digest. Few enough that
/// a claim at the bound looks at the head of every one.
const QUEUES: usize = 16;

/// How many due entries of its queue an insert (a claim of a new key, a completion that writes a
/// record) handles, at the most: more than the one record it adds, so expiry keeps up.
const EXPIRE_PER_INSERT: usize = 4;

/// How many due entries a claim at the bound handles, at the most, to make room.
const EVICT_BUDGET: usize = 32;

/// An idempotency store in this process's memory, on a sharded concurrent map (`dashmap`).
///
/// The zero-setup default: `#[idempotent]` without `store = ...` uses [`MemoryStore::global`].
/// Records live as long as the process, so it deduplicates within one process only; use a
/// remote store for many processes or machines.
///
/// - A claim is atomic per key (it holds the key's shard lock for a few instructions).
/// - Waiters for an in-progress key are woken the moment its holder completes or releases: no
///   polling.
/// - Time is tokio's clock ([`tokio::time::Instant`]), so tests can pause and advance it.
///
/// # Bounds
///
/// The store is bounded in records and in bytes: at most `max_entries` records
/// ([`DEFAULT_MAX_ENTRIES`], a million) whose accounted size is at most `max_bytes`
/// ([`DEFAULT_MAX_BYTES`], 1 GiB). A record is accounted as [`RECORD_OVERHEAD`] bytes plus its
/// result's encoded size (a result kept typed is counted by its encoding too), and each of its
/// steps ([`step`](crate::step), kept until the call completes) as [`STEP_OVERHEAD`] bytes plus
/// its name and encoded value. A step that would take the store past `max_bytes` is not
/// recorded: the step fails with [`Error::StoreFull`] after its effect ran. Set them with
/// [`MemoryStore::builder`], [`with_max_entries`](MemoryStore::with_max_entries) or
/// [`with_max_bytes`](MemoryStore::with_max_bytes); [`MemoryStore::new`] and
/// [`MemoryStore::global`] use the defaults.
///
/// - **At the bound**, a claim of a *new* key first removes expired records on the spot (a
///   store full of expired records accepts a new key at once); if none has expired it fails with
///   [`Error::StoreFull`], whose message names the bound and how to raise it. No live record is
///   evicted: evicting a completed record would let its body run twice. Keys already in the
///   store are served as usual (replays, waits, takeovers of their own expired records).
/// - **A result is always stored**: a call that holds a claim completes it even when the store
///   is at its bound, because its body has run. So the accounted bytes may exceed `max_bytes` by
///   the results of the calls in flight, and a result whose claim expired and was removed before
///   it arrived (a late completion) is stored as a new record, which may take the record count
///   past `max_entries` by the number of such completions. Claims never take the store past
///   either bound.
///
/// # Expiry
///
/// Each record has an entry in a time-ordered expiry queue. Every insert (a claim of a new key,
/// or a late completion) removes up to four records whose time has come from its queue, so
/// expiry keeps pace with inserts; a claim at the bound looks at up to 32 more, across all
/// queues. No caller ever scans the store: the expiry work of any call is bounded by these
/// constants, whatever the number of records. Replays do no expiry work at all (a read under
/// the shard's read lock, and a clone of the value). An expired record that no insert has
/// removed yet is never served: a claim sees it as absent and takes it over.
///
/// [`MemoryStore::sweep`] removes every expired record now; its cost is in proportion to the
/// number of records that fell due, not to the size of the store.
///
/// ```
/// use idem_runtime::{Idempotent, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::builder()
///     .max_entries(100_000)
///     .max_bytes(256 << 20)
///     .build();
/// let first = Idempotent::new(&store, 7u64)
///     .name("greet")
///     .run(|| async { Ok::<_, idem_runtime::Error>(String::from("hello")) })
///     .await;
/// let again = Idempotent::new(&store, 7u64)
///     .name("greet")
///     .run(|| async { Ok::<_, idem_runtime::Error>(String::from("not run")) })
///     .await;
/// assert_eq!(first.unwrap(), again.unwrap());
/// assert_eq!(store.len(), 1);
/// # }
/// ```
pub struct MemoryStore {
    records: DashMap<Key, Record>,
    /// The digest of a record's key by the key's exact encoding ([`Key::new`] hashes it), for
    /// the records that were replayed: a replay finds its record by the bytes it encoded,
    /// without taking the digest (BLAKE3 was most of an in-memory replay). Records stay keyed by
    /// the digest, so every operation of the [`Store`] trait, `remove(Key::from_digest(..))`
    /// among them, finds them as before. An entry is added by a record's first replay
    /// ([`keep_exact`](Self::keep_exact)) and removed with the record, both under the record's
    /// shard write lock (taken first; a lookup here holds no lock on `records`), so there is
    /// never more than one per record.
    digests: DashMap<Arc<[u8]>, Key>,
    /// Per queue, `(due, key)` of every record whose key falls in it: exactly one entry per
    /// record, at the record's `due`. Changed only under the key's shard lock (taken first), or
    /// by a pop that takes no shard lock while it holds the queue.
    queues: Box<[Mutex<Queue>]>,
    len: AtomicUsize,
    bytes: AtomicUsize,
    max_entries: usize,
    max_bytes: usize,
}

/// An expiry queue: `(due, key)` pairs in time order, and the earliest `due` kept apart, so that
/// an insert that finds nothing due touches no node of the tree (its oldest nodes are the
/// coldest: a look at them was a few cache misses on every insert).
#[derive(Default)]
struct Queue {
    entries: BTreeSet<(Instant, Key)>,
    head: Option<Instant>,
}

impl Queue {
    fn insert(&mut self, due: Instant, key: Key) {
        self.entries.insert((due, key));
        if self.head.is_none_or(|head| due < head) {
            self.head = Some(due);
        }
    }

    fn remove(&mut self, due: Instant, key: Key) {
        if self.entries.remove(&(due, key)) && self.head == Some(due) {
            self.head = self.entries.first().map(|(due, _)| *due);
        }
    }

    /// The earliest entry, taken out, if it is due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, Key)> {
        if self.head.is_none_or(|head| head > now) {
            return None;
        }
        let popped = self.entries.pop_first();
        self.head = self.entries.first().map(|(due, _)| *due);
        popped
    }
}

/// Due entries taken out of a queue by an insert, to handle once its shard lock is released.
type Due = [Option<(Instant, Key)>; EXPIRE_PER_INSERT];

/// A record and the time of its entry in the expiry queue.
struct Record {
    state: State,
    /// When the expiry queue looks at the record next: never later than its expiry (a renewal
    /// pushes the lease out without moving it; the record is queued again when it comes due).
    due: Instant,
    /// Its key's exact encoding, once the record was replayed: its entry in `digests`.
    exact: Option<Arc<[u8]>>,
}

impl Record {
    /// The bytes it counts against the store's byte bound.
    fn size(&self) -> usize {
        RECORD_OVERHEAD + self.state.size()
    }
}

/// The steps recorded under a key, by name (see [`Store::record_step`]). They live in the
/// record's state (an in-progress claim, or a released one kept for them): the variants that
/// hold them are smaller than `Completed`, so records pay nothing for them.
struct Steps {
    values: std::collections::HashMap<String, Bytes>,
    /// `ttl` after the last one was recorded.
    until: Instant,
    /// The fingerprint of the claim that recorded the first of them.
    fingerprint: Option<Fingerprint>,
    /// What they count against the byte bound: [`STEP_OVERHEAD`] per step, plus its name and
    /// value.
    bytes: usize,
}

/// The bytes a step counts on top of its name and value: its slot in the step map (with spare
/// capacity), the name's and the value's allocation headers.
pub const STEP_OVERHEAD: usize = 2 * size_of::<(String, Bytes)>() + 32;

enum State {
    /// A claim released (its body failed, panicked or was cancelled) that kept its record for
    /// its steps, until they expire: free to claim, like an absent key.
    Released { steps: Box<Steps> },
    InProgress {
        token: Token,
        lease_until: Instant,
        fingerprint: Option<Fingerprint>,
        waiters: Arc<Notify>,
        /// The steps recorded under the key so far, by this claim and the ones before it.
        steps: Option<Box<Steps>>,
    },
    Completed {
        value: Value,
        fingerprint: Option<Fingerprint>,
        /// The claim that completed it: a repeated completion of the same claim is recognised.
        token: Token,
        expires_at: Instant,
    },
}

/// A completed result as the in-memory store keeps it: its record, as every store keeps it
/// (replays decode it, so they are exactly what Redis's and PostgreSQL's are).
#[derive(Clone)]
pub(crate) enum Value {
    Bytes(Bytes),
}

impl Value {
    /// The encoded value.
    pub(crate) fn to_bytes(&self) -> Result<Bytes, Error> {
        match self {
            Value::Bytes(bytes) => Ok(bytes.clone()),
        }
    }

    /// The bytes it counts against the store's byte bound.
    fn size(&self) -> usize {
        match self {
            Value::Bytes(bytes) => bytes.len(),
        }
    }
}

/// What [`MemoryStore::claim_value`] found: a [`Claim`] with the completed value as kept.
pub(crate) enum ValueClaim {
    Acquired(Token),
    Completed {
        value: Value,
        fingerprint: Option<Fingerprint>,
        expires_in: Duration,
    },
    Busy {
        lease_left: Duration,
    },
}

impl State {
    fn in_progress(
        token: Token,
        lease_until: Instant,
        fingerprint: Option<Fingerprint>,
        steps: Option<Box<Steps>>,
    ) -> State {
        State::InProgress {
            token,
            lease_until,
            fingerprint,
            waiters: Arc::new(Notify::new()),
            steps,
        }
    }

    /// Its steps, if it has any.
    fn steps(&self) -> Option<&Steps> {
        match self {
            State::InProgress { steps, .. } => steps.as_deref(),
            State::Released { steps } => Some(steps),
            State::Completed { .. } => None,
        }
    }

    /// Takes its steps out, if it has any that have not expired at `now`.
    fn take_steps(&mut self, now: Instant) -> Option<Box<Steps>> {
        let steps = match self {
            State::InProgress { steps, .. } => steps.take(),
            State::Released { steps } => Some(std::mem::replace(
                steps,
                Box::new(Steps {
                    values: Default::default(),
                    until: now,
                    fingerprint: None,
                    bytes: 0,
                }),
            )),
            State::Completed { .. } => None,
        };
        steps.filter(|steps| steps.until > now)
    }

    /// When the record stops being needed: its expiry, or its steps' if later.
    fn kept_until(&self) -> Instant {
        match self.steps() {
            Some(steps) => self.expiry().max(steps.until),
            None => self.expiry(),
        }
    }

    /// The bytes it counts on top of [`RECORD_OVERHEAD`]: its value and its steps.
    fn size(&self) -> usize {
        self.value_size() + self.steps().map_or(0, |steps| steps.bytes)
    }

    /// When the record stops being live.
    fn expiry(&self) -> Instant {
        match self {
            State::InProgress { lease_until, .. } => *lease_until,
            State::Completed { expires_at, .. } => *expires_at,
            State::Released { steps } => steps.until,
        }
    }

    /// The bytes its value counts (an in-progress claim has none).
    fn value_size(&self) -> usize {
        match self {
            State::InProgress { .. } | State::Released { .. } => 0,
            State::Completed { value, .. } => value.size(),
        }
    }

    fn wake_waiters(&self) {
        if let State::InProgress { waiters, .. } = self {
            waiters.notify_waiters();
        }
    }
}

/// A claim of a new key met a bound; see [`MemoryStore`].
#[derive(Debug)]
enum Full {
    Entries {
        max_entries: usize,
    },
    Bytes {
        bytes: usize,
        max_bytes: usize,
    },
    Step {
        name: String,
        size: usize,
        bytes: usize,
        max_bytes: usize,
    },
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Full::Entries { max_entries } => write!(
                f,
                "it holds {max_entries} live records, its max_entries bound; raise it with \
                 MemoryStore::builder().max_entries(..) (or MemoryStore::with_max_entries), or \
                 lower the ttl"
            ),
            Full::Bytes { bytes, max_bytes } => write!(
                f,
                "its live records take {bytes} bytes of its max_bytes bound of {max_bytes}; \
                 raise it with MemoryStore::builder().max_bytes(..) (or \
                 MemoryStore::with_max_bytes), or lower the ttl or the size of the results"
            ),
            Full::Step {
                name,
                size,
                bytes,
                max_bytes,
            } => write!(
                f,
                "step `{name}` takes {size} bytes (its name and value, and {STEP_OVERHEAD} for \
                 its slot), and its live records take {bytes} bytes of its max_bytes bound of \
                 {max_bytes}; the step ran and is not recorded: raise the bound with \
                 MemoryStore::builder().max_bytes(..), or record a smaller value"
            ),
        }
    }
}

impl std::error::Error for Full {}

/// Builds a [`MemoryStore`] with bounds of its own: `MemoryStore::builder().max_entries(n)
/// .max_bytes(b).build()`. A bound left unset keeps its default.
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records the store holds (at least one; [`DEFAULT_MAX_ENTRIES`] unless set).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The most bytes the store's records take, by its accounting: [`RECORD_OVERHEAD`] per record
    /// plus each result's encoded size (at least one record's overhead; [`DEFAULT_MAX_BYTES`]
    /// unless set).
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(RECORD_OVERHEAD);
        self
    }

    /// The empty store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            records: DashMap::with_shard_amount(shards_for(self.max_entries)),
            digests: DashMap::with_shard_amount(shards_for(self.max_entries)),
            queues: (0..QUEUES).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
        }
    }
}

static GLOBAL: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

/// Locks an expiry queue. A queue is never left half-changed by a panic (its only panic is an
/// allocation failure, which aborts), so a poisoned lock is taken as it is.
fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
thread_local! {
    /// Queue entries handled on this thread: what the tests count expiry work by.
    static EXAMINED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl MemoryStore {
    /// An empty store with the default bounds: [`DEFAULT_MAX_ENTRIES`] records,
    /// [`DEFAULT_MAX_BYTES`] bytes.
    pub fn new() -> MemoryStore {
        MemoryStore::builder().build()
    }

    /// A builder, to set both bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// An empty store that holds at most `max_entries` records (at least one), and the default
    /// [`DEFAULT_MAX_BYTES`].
    pub fn with_max_entries(max_entries: usize) -> MemoryStore {
        MemoryStore::builder().max_entries(max_entries).build()
    }

    /// An empty store whose records take at most `max_bytes` bytes by its accounting (see
    /// [`MemoryStoreBuilder::max_bytes`]), and the default [`DEFAULT_MAX_ENTRIES`].
    pub fn with_max_bytes(max_bytes: usize) -> MemoryStore {
        MemoryStore::builder().max_bytes(max_bytes).build()
    }

    /// The process-wide store that `#[idempotent]` uses when no `store = ...` is given, created
    /// on first use, with the default bounds.
    pub fn global() -> &'static MemoryStore {
        &GLOBAL
    }

    /// How many records the store holds, live or expired but not yet removed.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many bytes the store's records take by its accounting: [`RECORD_OVERHEAD`] per record
    /// plus each result's encoded size.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The most records a claim lets the store hold.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The most bytes a claim lets the store's records take.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Removes every expired record now; returns how many were removed.
    ///
    /// It does not scan the store: it takes the entries that fell due from the expiry queues,
    /// so its cost is in proportion to their number (each one a queue pop and a map update, with
    /// no lock held from one to the next). Calls need not wait for it: inserts remove expired
    /// records as they go, and a claim at the bound makes room on the spot.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        for queue in 0..QUEUES {
            while let Some((due, key)) = self.pop_due(queue, now) {
                removed += usize::from(self.expire(queue, due, key, now));
            }
        }
        removed
    }

    /// The expiry queue of `key`.
    fn queue_of(key: &Key) -> usize {
        let bytes = key.as_bytes();
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&bytes[..8]);
        hi.copy_from_slice(&bytes[8..16]);
        let mixed = (u64::from_le_bytes(lo) ^ u64::from_le_bytes(hi).rotate_left(29))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 60) as usize % QUEUES
    }

    /// Moves the queue entry of `key` from `from` (if there is one) to `to`. Called under the
    /// key's shard lock.
    fn requeue(&self, key: Key, from: Option<Instant>, to: Option<Instant>) {
        let mut queue = lock(&self.queues[Self::queue_of(&key)]);
        if let Some(from) = from {
            queue.remove(from, key);
        }
        if let Some(to) = to {
            queue.insert(to, key);
        }
    }

    /// Queues the entry of a new record of `key` at `due`, and takes out, in the same look at the
    /// queue, up to [`EXPIRE_PER_INSERT`] entries that are due at `now`: the expiry work of an
    /// insert, for [`expire_due`](Self::expire_due) once the key's shard lock is released. Called
    /// under that lock.
    fn queue_new(&self, key: Key, due: Instant, now: Instant) -> Due {
        let mut queue = lock(&self.queues[Self::queue_of(&key)]);
        queue.insert(due, key);
        let mut taken = [None; EXPIRE_PER_INSERT];
        for slot in &mut taken {
            *slot = queue.pop_due(now);
            if slot.is_none() {
                break;
            }
        }
        taken
    }

    /// Handles the entries [`queue_new`](Self::queue_new) took out of `key`'s queue.
    fn expire_due(&self, key: &Key, taken: Due, now: Instant) {
        let queue = Self::queue_of(key);
        for (due, key) in taken.into_iter().flatten() {
            self.expire(queue, due, key, now);
        }
    }

    /// The earliest entry of `queue`, taken out of it, if it is due at `now`.
    fn pop_due(&self, queue: usize, now: Instant) -> Option<(Instant, Key)> {
        lock(&self.queues[queue]).pop_due(now)
    }

    /// Handles an entry popped from `queue`: removes its record if it expired, queues it again at
    /// its expiry if it lives on (a renewed lease). Returns whether a record was removed.
    fn expire(&self, queue: usize, due: Instant, key: Key, now: Instant) -> bool {
        #[cfg(test)]
        EXAMINED.with(|n| n.set(n.get() + 1));
        let Entry::Occupied(mut entry) = self.records.entry(key) else {
            return false; // released or removed since it was queued
        };
        if entry.get().due != due {
            return false; // the record has another entry, queued since
        }
        let expiry = entry.get().state.kept_until();
        if expiry > now {
            lock(&self.queues[queue]).insert(expiry, key);
            entry.get_mut().due = expiry;
            return false;
        }
        self.forget_exact(entry.get());
        let (_, old) = entry.remove_entry();
        self.forget(&old);
        old.state.wake_waiters();
        true
    }

    /// At the bound: removes expired records, starting with `key`'s queue and going round the
    /// others, until a new record fits or [`EVICT_BUDGET`] entries were handled. Returns whether
    /// a record was removed.
    fn make_room(&self, key: &Key, now: Instant) -> bool {
        let first = Self::queue_of(key);
        let mut budget = EVICT_BUDGET;
        let mut removed = false;
        for i in 0..QUEUES {
            let queue = (first + i) % QUEUES;
            while budget > 0 && !self.has_room() {
                let Some((due, key)) = self.pop_due(queue, now) else {
                    break;
                };
                budget -= 1;
                removed |= self.expire(queue, due, key, now);
            }
            if budget == 0 || self.has_room() {
                break;
            }
        }
        removed
    }

    /// Whether a claim of a new key would fit now.
    fn has_room(&self) -> bool {
        self.len() < self.max_entries
            && self
                .bytes()
                .checked_add(RECORD_OVERHEAD)
                .is_some_and(|b| b <= self.max_bytes)
    }

    /// Counts a new record for a claim, if it fits under both bounds; racing claims cannot
    /// overshoot either.
    fn reserve(&self) -> Result<(), Full> {
        let max_entries = self.max_entries;
        if self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_entries).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Full::Entries { max_entries });
        }
        let max_bytes = self.max_bytes;
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(RECORD_OVERHEAD).filter(|&b| b <= max_bytes)
            });
        match reserved {
            Ok(_) => Ok(()),
            Err(bytes) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                Err(Full::Bytes { bytes, max_bytes })
            }
        }
    }

    /// Counts a new record that is stored whatever the bounds (a late completion).
    fn count(&self, value_size: usize) {
        self.len.fetch_add(1, Ordering::AcqRel);
        self.bytes
            .fetch_add(RECORD_OVERHEAD + value_size, Ordering::AcqRel);
    }

    /// Uncounts a record that left the map.
    fn forget(&self, record: &Record) {
        self.len.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(record.size(), Ordering::AcqRel);
    }

    /// Removes the `digests` entry of a record that is leaving the map. Called under the
    /// record's shard lock, so that a new record of the same key cannot have added its own yet.
    fn forget_exact(&self, record: &Record) {
        if let Some(exact) = &record.exact {
            self.digests.remove(&**exact);
        }
    }

    /// The digest of the key whose exact encoding is `exact`, if a record holds it (see
    /// [`keep_exact`](Self::keep_exact)): [`Key::new`]'s, without BLAKE3. `None` says nothing
    /// about the record.
    pub(crate) fn digest_of(&self, exact: &[u8]) -> Option<Key> {
        self.digests.get(exact).map(|digest| *digest)
    }

    /// After a call missed [`digest_of`](Self::digest_of) and took the digest: if `key` has a
    /// live completed record, it keeps `exact` (at most [`MAX_EXACT_KEY`] bytes), so that its
    /// later replays find it without the digest. Returns whether there was such a record.
    ///
    /// Only a record that is replayed keeps its key's encoding: a first execution neither
    /// allocates it nor writes to `digests` (most keys are never replayed; their first
    /// executions were 1.5 times slower when every record kept it).
    pub(crate) fn keep_exact(&self, key: &Key, exact: &[u8]) -> bool {
        let now = Instant::now();
        let completed = |record: &Record| matches!(record.state, State::Completed { expires_at, .. } if expires_at > now);
        match self.records.get(key) {
            Some(record) if completed(&record) => {
                if record.exact.is_some() {
                    return true;
                }
            }
            _ => return false,
        }
        // Under the shard's write lock, so that the record and its entry in `digests` come and
        // go together.
        if let Some(mut record) = self.records.get_mut(key)
            && record.exact.is_none()
        {
            let exact: Arc<[u8]> = Arc::from(exact);
            self.digests.insert(Arc::clone(&exact), *key);
            record.exact = Some(exact);
        }
        true
    }

    /// Accounts a record whose value changed in place.
    fn resize(&self, old: usize, new: usize) {
        if new > old {
            self.bytes.fetch_add(new - old, Ordering::AcqRel);
        } else if old > new {
            self.bytes.fetch_sub(old - new, Ordering::AcqRel);
        }
    }

    /// `claim`, synchronously, handing back a completed value as it is kept.
    pub(crate) fn claim_value(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<ValueClaim, Error> {
        let mut now = Instant::now();
        // A replay or a busy key only reads: look under the shard's read lock first. No expiry
        // work here: replays stay as cheap as a map read.
        if let Some(record) = self.records.get(&key)
            && let Some(found) = Self::live(&record.state, now)
        {
            return Ok(found);
        }
        let token = Token::generate();
        let mut made_room = false;
        loop {
            let lease_until = after(now, lease);
            match self.records.entry(key) {
                Entry::Occupied(mut entry) => {
                    // Looked at again under the write lock: another claim may have come first.
                    if let Some(found) = Self::live(&entry.get().state, now) {
                        return Ok(found);
                    }
                    // Expired: take over, in the same slot. Waiters of a lapsed claim look again
                    // at once.
                    let record = entry.get_mut();
                    self.requeue(key, Some(record.due), Some(lease_until));
                    record.due = lease_until;
                    // The steps of the calls before it are this claim's (expired ones are not).
                    let before = record.state.size();
                    let steps = record.state.take_steps(now);
                    let kept = steps.as_ref().map_or(0, |steps| steps.bytes);
                    let old = std::mem::replace(
                        &mut record.state,
                        State::in_progress(token, lease_until, fingerprint, steps),
                    );
                    drop(entry);
                    self.resize(before, kept);
                    old.wake_waiters();
                    return Ok(ValueClaim::Acquired(token));
                }
                Entry::Vacant(entry) => match self.reserve() {
                    Ok(()) => {
                        let taken = self.queue_new(key, lease_until, now);
                        drop(entry.insert(Record {
                            state: State::in_progress(token, lease_until, fingerprint, None),
                            due: lease_until,
                            exact: None,
                        }));
                        self.expire_due(&key, taken, now);
                        return Ok(ValueClaim::Acquired(token));
                    }
                    Err(full) => {
                        // Make room outside the shard lock (the records removed may share it).
                        drop(entry);
                        if made_room || !self.make_room(&key, now) {
                            return Err(Error::store_full(full));
                        }
                        made_room = true;
                        now = Instant::now();
                    }
                },
            }
        }
    }

    /// Hands a live completed record of `key` to `read` (its encoded value, fingerprint and
    /// time left); `None` when there is no such record (absent, in progress, expired).
    ///
    /// A replay's read: no expiry work, no write lock. The shard's read lock is held only to
    /// take a reference to the value (`Bytes`: a reference count, no copy); `read` runs after
    /// it is released, so a slow or large decode, or a user's `Deserialize` that calls into
    /// this store, never holds the shard's writers off.
    pub(crate) fn read_completed<R>(
        &self,
        key: &Key,
        read: impl FnOnce(&[u8], Option<Fingerprint>, Duration) -> R,
    ) -> Option<R> {
        let (bytes, fingerprint, expires_in) = {
            let record = self.records.get(key)?;
            match &record.state {
                State::Completed {
                    value: Value::Bytes(bytes),
                    fingerprint,
                    expires_at,
                    ..
                } => {
                    let now = Instant::now();
                    if *expires_at <= now {
                        return None;
                    }
                    (bytes.clone(), *fingerprint, *expires_at - now)
                }
                State::InProgress { .. } | State::Released { .. } => return None,
            }
        };
        Some(read(&bytes, fingerprint, expires_in))
    }

    /// What a claim finds in a live record: its completed value, or that it is busy.
    fn live(state: &State, now: Instant) -> Option<ValueClaim> {
        match state {
            State::Completed {
                value,
                fingerprint,
                expires_at,
                ..
            } if *expires_at > now => Some(ValueClaim::Completed {
                value: value.clone(),
                fingerprint: *fingerprint,
                expires_in: *expires_at - now,
            }),
            State::InProgress { lease_until, .. } if *lease_until > now => Some(ValueClaim::Busy {
                lease_left: *lease_until - now,
            }),
            _ => None,
        }
    }

    /// `complete`, synchronously, keeping the value as given: the rule of [`Store::complete`].
    ///
    /// `fingerprint` is the call's, for a record written where its claim is gone (the claim's
    /// own is kept otherwise); the [`Store`] trait passes none.
    pub(crate) fn complete_value(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Value,
        ttl: Duration,
    ) -> Completion {
        let now = Instant::now();
        let expires_at = after(now, ttl);
        let size = value.size();
        match self.records.entry(key) {
            Entry::Occupied(mut entry) => {
                let record = entry.get_mut();
                let fingerprint = match &record.state {
                    State::InProgress {
                        token: held,
                        fingerprint,
                        ..
                    } if *held == token => *fingerprint,
                    // Completed by this claim already (a repeated completion): the first value
                    // stays.
                    State::Completed {
                        token: held,
                        expires_at,
                        ..
                    } if *held == token && *expires_at > now => return Completion::Stored,
                    // Released, kept for its steps: as if absent.
                    State::Released { .. } => fingerprint,
                    state if state.expiry() > now => return Completion::LeaseLost,
                    // An expired record, not yet removed: as if absent.
                    _ => fingerprint,
                };
                self.requeue(key, Some(record.due), Some(expires_at));
                record.due = expires_at;
                // The completed value replays whole: its steps (in the old state) go.
                let old = std::mem::replace(
                    &mut record.state,
                    State::Completed {
                        value,
                        fingerprint,
                        token,
                        expires_at,
                    },
                );
                drop(entry);
                self.resize(old.size(), size);
                old.wake_waiters();
                Completion::Stored
            }
            Entry::Vacant(entry) => {
                // The claim expired and was removed (or an operator removed it), and no other
                // call took the key: the body ran, so its result is stored, past the bounds if
                // need be.
                self.count(size);
                let taken = self.queue_new(key, expires_at, now);
                drop(entry.insert(Record {
                    state: State::Completed {
                        value,
                        fingerprint,
                        token,
                        expires_at,
                    },
                    due: expires_at,
                    exact: None,
                }));
                self.expire_due(&key, taken, now);
                Completion::Stored
            }
        }
    }

    fn renew_now(&self, key: Key, token: Token, lease: Duration) -> bool {
        let Some(mut record) = self.records.get_mut(&key) else {
            return false;
        };
        match &mut record.state {
            State::InProgress {
                token: held,
                lease_until,
                ..
            } if *held == token => {
                // The queue entry stays where it is: when it comes due, the record is queued
                // again at its new expiry.
                *lease_until = after(Instant::now(), lease);
                true
            }
            _ => false,
        }
    }

    /// Removes the record of `key` if `which` says so, with its queue entry.
    fn remove_where(&self, key: Key, which: impl FnOnce(&State) -> bool) -> bool {
        let Entry::Occupied(entry) = self.records.entry(key) else {
            return false;
        };
        if !which(&entry.get().state) {
            return false;
        }
        self.requeue(key, Some(entry.get().due), None);
        self.forget_exact(entry.get());
        let (_, old) = entry.remove_entry();
        self.forget(&old);
        old.state.wake_waiters();
        true
    }

    /// Releases the claim of `token`: removes its record, or, if the record holds steps, keeps
    /// it (released, free to claim) until they expire.
    fn release_now(&self, key: Key, token: Token) -> bool {
        let holds = |state: &State| matches!(state, State::InProgress { token: held, .. } if *held == token);
        {
            let Some(mut record) = self.records.get_mut(&key) else {
                return false;
            };
            if !holds(&record.state) {
                return false;
            }
            let now = Instant::now();
            let before = record.state.size();
            let steps = record.state.take_steps(now);
            let after = steps.as_ref().map_or(0, |steps| steps.bytes);
            // Expired steps, if any, were taken out: uncount them.
            self.resize(before, after);
            if let Some(steps) = steps {
                // Queued no later than its steps expire.
                if steps.until < record.due {
                    self.requeue(key, Some(record.due), Some(steps.until));
                    record.due = steps.until;
                }
                let old = std::mem::replace(&mut record.state, State::Released { steps });
                drop(record);
                old.wake_waiters();
                return true;
            }
        }
        self.remove_where(key, holds)
    }

    /// `record_step`, synchronously.
    fn record_step_now(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> Result<StepRecorded, Error> {
        let now = Instant::now();
        let Some(mut record) = self.records.get_mut(&key) else {
            return Ok(StepRecorded::LeaseLost);
        };
        if !Self::held(&record.state, token, now) {
            return Ok(StepRecorded::LeaseLost);
        }
        let until = after(now, ttl);
        let State::InProgress {
            steps, fingerprint, ..
        } = &mut record.state
        else {
            return Ok(StepRecorded::LeaseLost);
        };
        let fingerprint = *fingerprint;
        if steps.as_ref().is_some_and(|steps| steps.until <= now) {
            // Expired: as if none.
            let freed = steps.take().map_or(0, |steps| steps.bytes);
            self.resize(freed, 0);
        }
        let steps = steps.get_or_insert_with(|| {
            Box::new(Steps {
                values: Default::default(),
                until,
                fingerprint,
                bytes: 0,
            })
        });
        steps.until = steps.until.max(until);
        if steps.values.contains_key(&step) {
            // A repeated record (a lost reply): the first value stays.
            return Ok(StepRecorded::Recorded);
        }
        let size = STEP_OVERHEAD + step.len() + value.len();
        let max_bytes = self.max_bytes;
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(size).filter(|&b| b <= max_bytes)
            })
            .map_err(|bytes| {
                Error::store_full(Full::Step {
                    name: step.clone(),
                    size,
                    bytes,
                    max_bytes,
                })
            })?;
        steps.bytes += size;
        steps.values.insert(step, value);
        Ok(StepRecorded::Recorded)
    }

    /// `steps`, synchronously.
    fn steps_now(&self, key: Key, token: Token) -> RecordedSteps {
        let now = Instant::now();
        let Some(record) = self.records.get(&key) else {
            return RecordedSteps::LeaseLost;
        };
        if !Self::held(&record.state, token, now) {
            return RecordedSteps::LeaseLost;
        }
        let State::InProgress { fingerprint, .. } = &record.state else {
            return RecordedSteps::LeaseLost;
        };
        match record.state.steps().filter(|steps| steps.until > now) {
            None => RecordedSteps::Held(Vec::new()),
            Some(steps) if !fingerprint_matches(*fingerprint, steps.fingerprint) => {
                RecordedSteps::KeyReused
            }
            Some(steps) => RecordedSteps::Held(
                steps
                    .values
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .collect(),
            ),
        }
    }

    /// Whether `state` is a claim of `token` whose lease has not run out at `now`: the fence of
    /// steps.
    fn held(state: &State, token: Token, now: Instant) -> bool {
        matches!(state, State::InProgress { token: held, lease_until, .. } if *held == token && *lease_until > now)
    }

    fn remove_now(&self, key: Key) -> bool {
        self.remove_where(key, |_| true)
    }

    async fn wait_for(&self, key: Key, timeout: Duration) {
        if tokio::runtime::Handle::try_current().is_err() {
            // Waiting needs tokio's timers; outside a runtime, return at once (callers claim
            // again to see the state).
            return;
        }
        let now = Instant::now();
        let (waiters, lease_left) = {
            let Some(record) = self.records.get(&key) else {
                return;
            };
            match &record.state {
                State::InProgress {
                    lease_until,
                    waiters,
                    ..
                } if *lease_until > now => (Arc::clone(waiters), *lease_until - now),
                _ => return,
            }
        };
        let notified = waiters.notified();
        tokio::pin!(notified);
        // Register before looking again, so a wake-up between the two cannot be missed.
        notified.as_mut().enable();
        let still_held = self.records.get(&key).is_some_and(|record| {
            matches!(&record.state, State::InProgress { waiters: w, .. } if Arc::ptr_eq(w, &waiters))
        });
        if !still_held {
            return;
        }
        // A holder that stops renewing loses its lease: look again when it runs out.
        let _ = tokio::time::timeout(timeout.min(lease_left), notified).await;
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field("max_entries", &self.max_entries)
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Store for MemoryStore {
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        let result = self
            .claim_value(key, fingerprint, lease)
            .and_then(|claim| match claim {
                ValueClaim::Acquired(token) => Ok(Claim::Acquired(token)),
                ValueClaim::Busy { lease_left } => Ok(Claim::Busy { lease_left }),
                ValueClaim::Completed {
                    value,
                    fingerprint,
                    expires_in,
                } => Ok(Claim::Completed(Completed::new(
                    value.to_bytes()?,
                    fingerprint,
                    expires_in,
                ))),
            });
        Box::pin(std::future::ready(result))
    }

    fn complete(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        let result = self.complete_value(key, token, fingerprint, Value::Bytes(value), ttl);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        let result = self.renew_now(key, token, lease);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn record_step(
        &self,
        key: Key,
        token: Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<StepRecorded, Error>> {
        Box::pin(std::future::ready(
            self.record_step_now(key, token, step, value, ttl),
        ))
    }

    fn steps(&self, key: Key, token: Token) -> BoxFuture<'_, Result<RecordedSteps, Error>> {
        Box::pin(std::future::ready(Ok(self.steps_now(key, token))))
    }

    fn release(&self, key: Key, token: Token) -> BoxFuture<'_, Result<bool, Error>> {
        let result = self.release_now(key, token);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn wait(&self, key: Key, timeout: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.wait_for(key, timeout).await;
            Ok(())
        })
    }

    fn remove(&self, key: Key) -> BoxFuture<'_, Result<bool, Error>> {
        let result = self.remove_now(key);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn release_on_drop(&self, key: Key, token: Token) {
        self.release_now(key, token);
    }

    fn release_on_drop_after_steps(
        &self,
        key: Key,
        token: Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        for (step, value) in steps {
            // Fenced as any step; a store at its bound leaves it unrecorded (a retry runs it).
            let _ = self.record_step_now(key, token, step, value, ttl);
        }
        self.release_now(key, token);
    }

    /// Completes at once: the in-memory store has nothing to wait for.
    fn complete_on_drop(
        &self,
        key: Key,
        token: Token,
        fingerprint: Option<Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        self.complete_value(key, token, fingerprint, Value::Bytes(value), ttl);
    }

    fn as_memory(&self) -> Option<&MemoryStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn key(n: u64) -> Key {
        Key::new("memory.tests", &n)
    }

    /// Queue entries handled on this thread since the last call.
    fn examined() -> usize {
        EXAMINED.with(|n| n.replace(0))
    }

    fn acquire(store: &MemoryStore, key: Key, lease: Duration) -> Token {
        match store.claim_value(key, None, lease) {
            Ok(ValueClaim::Acquired(token)) => token,
            Ok(_) => panic!("the key is taken"),
            Err(err) => panic!("claim failed: {err}"),
        }
    }

    fn insert(store: &MemoryStore, n: u64, ttl: Duration) {
        let token = acquire(store, key(n), LEASE);
        let value = Value::Bytes(Bytes::from_static(b"1"));
        assert_eq!(
            store.complete_value(key(n), token, None, value, ttl),
            Completion::Stored
        );
    }

    /// Every record has exactly one queue entry, at its `due`, and the counters match the map.
    fn assert_consistent(store: &MemoryStore) {
        let queued: usize = store.queues.iter().map(|q| lock(q).entries.len()).sum();
        for queue in store.queues.iter() {
            let queue = lock(queue);
            let first = queue.entries.first().map(|(due, _)| *due);
            assert_eq!(queue.head, first, "the head is the earliest due");
        }
        assert_eq!(queued, store.records.len(), "one queue entry per record");
        for record in store.records.iter() {
            let queue = lock(&store.queues[MemoryStore::queue_of(record.key())]);
            assert!(
                queue.entries.contains(&(record.due, *record.key())),
                "a record without its entry"
            );
            assert!(
                record.due <= record.state.kept_until(),
                "queued after its expiry"
            );
        }
        assert_eq!(store.len(), store.records.len());
        let bytes: usize = store.records.iter().map(|r| r.size()).sum();
        assert_eq!(store.bytes(), bytes);
        let exact = store.records.iter().filter(|r| r.exact.is_some()).count();
        assert_eq!(
            store.digests.len(),
            exact,
            "one digests entry per record that has one"
        );
        for record in store.records.iter() {
            if let Some(bytes) = &record.exact {
                assert_eq!(store.digest_of(bytes), Some(*record.key()));
            }
        }
    }

    /// With 20,000 expired records waiting, each claim of a new key handles at most
    /// `EXPIRE_PER_INSERT` of them, and together the claims remove them all.
    #[tokio::test(start_paused = true)]
    async fn an_insert_does_a_bounded_slice_of_expiry_work() {
        let store = MemoryStore::new();
        for n in 0..20_000 {
            insert(&store, n, Duration::from_secs(1));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        examined();
        let mut most = 0;
        for n in 20_000..30_000 {
            acquire(&store, key(n), LEASE);
            most = most.max(examined());
        }
        assert!(
            (1..=EXPIRE_PER_INSERT).contains(&most),
            "a claim handled {most} entries"
        );
        assert_eq!(store.len(), 10_000, "the expired records were all removed");
        assert_consistent(&store);
    }

    /// Replays and busy answers do no expiry work, however much is waiting.
    #[tokio::test(start_paused = true)]
    async fn replays_do_no_expiry_work() {
        let store = MemoryStore::new();
        for n in 0..1_000 {
            insert(&store, n, Duration::from_secs(1));
        }
        insert(&store, 1_000, Duration::from_secs(3600));
        acquire(&store, key(1_001), Duration::from_secs(3600));
        tokio::time::advance(Duration::from_secs(2)).await;
        examined();
        for _ in 0..100 {
            assert!(matches!(
                store.claim_value(key(1_000), None, LEASE),
                Ok(ValueClaim::Completed { .. })
            ));
            assert!(matches!(
                store.claim_value(key(1_001), None, LEASE),
                Ok(ValueClaim::Busy { .. })
            ));
        }
        assert_eq!(examined(), 0);
        assert_eq!(store.len(), 1_002);
    }

    /// A store full of expired records takes a new key at once, handling a bounded number of
    /// entries; a store full of live ones refuses it after looking at the queues' heads only.
    #[tokio::test(start_paused = true)]
    async fn at_the_bound_a_claim_does_a_bounded_slice_of_work() {
        let store = MemoryStore::with_max_entries(1_000);
        for n in 0..1_000 {
            insert(&store, n, Duration::from_secs(1));
        }
        examined();
        assert!(store.claim_value(key(5_000), None, LEASE).is_err());
        assert_eq!(examined(), 0, "nothing is due: nothing to handle");

        tokio::time::advance(Duration::from_secs(2)).await;
        for n in 1_000..2_000 {
            acquire(&store, key(n), LEASE);
            let handled = examined();
            assert!(
                handled <= EVICT_BUDGET + EXPIRE_PER_INSERT,
                "claim {n} handled {handled} entries"
            );
        }
        assert_eq!(store.len(), 1_000);
        assert_consistent(&store);
    }

    /// Claims whose leases were renewed come due without having expired: at the bound, a claim
    /// queues at most `EVICT_BUDGET` of them again, then gives up.
    #[tokio::test(start_paused = true)]
    async fn renewed_claims_cost_a_claim_at_the_bound_a_bounded_slice() {
        let store = MemoryStore::with_max_entries(500);
        let tokens: Vec<Token> = (0..500)
            .map(|n| acquire(&store, key(n), Duration::from_secs(1)))
            .collect();
        for (n, token) in tokens.iter().enumerate() {
            assert!(store.renew_now(key(n as u64), *token, Duration::from_secs(3600)));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        examined();
        for n in 500..600 {
            assert!(store.claim_value(key(n), None, LEASE).is_err());
            assert!(examined() <= EVICT_BUDGET);
        }
        assert_consistent(&store);
        // Every renewed claim is still held.
        for n in 0..500 {
            assert!(matches!(
                store.claim_value(key(n), None, LEASE),
                Ok(ValueClaim::Busy { .. })
            ));
        }
    }

    /// `sweep` handles the entries that fell due, not the whole store.
    #[tokio::test(start_paused = true)]
    async fn sweep_handles_only_what_fell_due() {
        let store = MemoryStore::new();
        for n in 0..10_000 {
            let ttl = if n % 100 == 0 { 1 } else { 3600 };
            insert(&store, n, Duration::from_secs(ttl));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        examined();
        assert_eq!(store.sweep(), 100);
        assert_eq!(examined(), 100);
        assert_eq!(store.len(), 9_900);
        assert_consistent(&store);
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_record_overhead_is_what_the_docs_say() {
        // RECORD_OVERHEAD's docs and the README give this number: update them with it.
        assert_eq!(RECORD_OVERHEAD, 752);
    }

    #[test]
    fn the_shard_count_follows_the_entry_bound() {
        assert_eq!(shards_for(DEFAULT_MAX_ENTRIES), 256);
        assert_eq!(shards_for(1), MIN_SHARDS);
        assert_eq!(shards_for(usize::MAX), MAX_SHARDS);
        assert_eq!(shards_for(2 * DEFAULT_MAX_ENTRIES), 512);
    }

    /// Every operation keeps one queue entry per record and the counters exact.
    #[tokio::test(start_paused = true)]
    async fn operations_keep_the_queues_and_counters_exact() {
        let store = MemoryStore::with_max_entries(64);
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut tokens: Vec<Token> = Vec::new();
        let (mut recorded, mut released_with_steps) = (0, 0);
        // The latest claims, with their keys: the ones steps are recorded under.
        let mut held: Vec<(Key, Token)> = Vec::new();
        for _ in 0..20_000 {
            let k = key(next() % 96);
            let span = Duration::from_millis(next() % 2_000 + 1);
            match next() % 9 {
                7 => {
                    if let Some(&(k, token)) = held.get((next() as usize) % (held.len() + 1)) {
                        let name = format!("step-{}", next() % 3);
                        let value = Bytes::from(vec![1u8; (next() % 100) as usize]);
                        if let Ok(StepRecorded::Recorded) =
                            store.record_step_now(k, token, name, value, span)
                        {
                            recorded += 1;
                        }
                    }
                }
                8 => {
                    if let Some(&(k, token)) = held.get((next() as usize) % (held.len() + 1)) {
                        let _ = store.steps_now(k, token);
                        // And fail: released, keeping its steps.
                        if next() % 2 == 0 {
                            store.release_now(k, token);
                            if store
                                .records
                                .get(&k)
                                .is_some_and(|r| matches!(r.state, State::Released { .. }))
                            {
                                released_with_steps += 1;
                            }
                        }
                    }
                }
                0 | 1 => {
                    if let Ok(ValueClaim::Acquired(token)) = store.claim_value(k, None, span) {
                        tokens.push(token);
                        held.push((k, token));
                        if held.len() > 16 {
                            held.remove(0);
                        }
                    }
                }
                2 => {
                    let token = tokens
                        .get((next() as usize) % (tokens.len() + 1))
                        .copied()
                        .unwrap_or_else(Token::generate);
                    let size = (next() % 64) as usize;
                    let value = Value::Bytes(Bytes::from(vec![7u8; size]));
                    store.complete_value(k, token, None, value, span);
                }
                3 => {
                    if let Some(token) = tokens.get((next() as usize) % (tokens.len() + 1)) {
                        store.renew_now(k, *token, span);
                    }
                }
                4 => {
                    if let Some(token) = tokens.get((next() as usize) % (tokens.len() + 1)) {
                        store.release_now(k, *token);
                        if store
                            .records
                            .get(&k)
                            .is_some_and(|r| matches!(r.state, State::Released { .. }))
                        {
                            released_with_steps += 1;
                        }
                    }
                }
                5 => {
                    store.remove_now(k);
                }
                _ => tokio::time::advance(Duration::from_millis(next() % 300)).await,
            }
        }
        assert_consistent(&store);
        assert!(
            recorded > 100 && released_with_steps > 10,
            "{recorded} {released_with_steps}"
        );
        tokio::time::advance(Duration::from_secs(3_600)).await;
        store.sweep();
        assert_consistent(&store);
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }
}
