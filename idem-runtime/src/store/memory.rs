//! The embedded in-memory store.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BoxFuture, Store};
use crate::clock::after;
use crate::error::Error;
use crate::key::{Fingerprint, Key};
use crate::record::{Claim, Completed, Completion, Token};

/// How many records a [`MemoryStore`] holds at the most unless told otherwise.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;

/// How often, at the most, inserting a record sweeps the expired ones out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
/// - Memory is bounded: expired records are swept (lazily on access, and in bulk at most once a
///   second when records are inserted), and claims let the store hold at most `max_entries`
///   records ([`DEFAULT_MAX_ENTRIES`] unless set with [`MemoryStore::with_max_entries`]), exactly,
///   even under concurrent inserts; a result is always stored, even one whose claim expired and
///   was swept before it arrived (its body ran), which may take the store past the bound by the
///   number of such late completions. At the bound a claim of a *new* key sweeps expired records
///   (at most once a second); if the store is still full it fails with [`Error::Store`] rather
///   than evict a live record (evicting a completed record would let its body run twice). Keys
///   already in the store are served as usual. [`MemoryStore::sweep`] sweeps at once.
///
/// ```
/// use idem_runtime::{Idempotent, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new();
/// let first = Idempotent::new(&store, ("greet", 7u64))
///     .run(|| async { Ok::<_, idem_runtime::Error>(String::from("hello")) })
///     .await;
/// let again = Idempotent::new(&store, ("greet", 7u64))
///     .run(|| async { Ok::<_, idem_runtime::Error>(String::from("not run")) })
///     .await;
/// assert_eq!(first.unwrap(), again.unwrap());
/// # }
/// ```
pub struct MemoryStore {
    records: DashMap<Key, Record>,
    len: AtomicUsize,
    max_entries: usize,
    last_sweep: Mutex<Instant>,
}

enum Record {
    InProgress {
        token: Token,
        lease_until: Instant,
        fingerprint: Option<Fingerprint>,
        waiters: Arc<Notify>,
    },
    Completed {
        value: Value,
        fingerprint: Option<Fingerprint>,
        /// The claim that completed it: a repeated completion of the same claim is recognised.
        token: Token,
        expires_at: Instant,
    },
}

/// A completed result as the in-memory store keeps it: encoded (written through the [`Store`]
/// trait), or typed (written by the executor, which then replays it by cloning, with no decoding).
#[derive(Clone)]
pub(crate) enum Value {
    Bytes(Bytes),
    Typed(Typed),
}

/// A result kept as its own type, with the function that encodes it for readers that need bytes.
#[derive(Clone)]
pub(crate) struct Typed {
    pub(crate) value: Arc<dyn Any + Send + Sync>,
    pub(crate) encode: fn(&(dyn Any + Send + Sync)) -> Result<Vec<u8>, Error>,
}

impl Value {
    /// The encoded value, encoding a typed one.
    pub(crate) fn to_bytes(&self) -> Result<Bytes, Error> {
        match self {
            Value::Bytes(bytes) => Ok(bytes.clone()),
            Value::Typed(typed) => (typed.encode)(&*typed.value).map(Bytes::from),
        }
    }
}

/// What [`MemoryStore::claim_value`] found: a [`Claim`] whose completed value may be typed.
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

impl Record {
    fn is_live(&self, now: Instant) -> bool {
        self.expiry() > now
    }

    /// When the record stops being live.
    fn expiry(&self) -> Instant {
        match self {
            Record::InProgress { lease_until, .. } => *lease_until,
            Record::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn wake_waiters(&self) {
        if let Record::InProgress { waiters, .. } = self {
            waiters.notify_waiters();
        }
    }
}

/// The store is full of live records; see [`MemoryStore`].
#[derive(Debug)]
struct Full {
    max_entries: usize,
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the in-memory store holds {} live records, its bound; raise it with \
             MemoryStore::with_max_entries or lower the ttl",
            self.max_entries
        )
    }
}

impl std::error::Error for Full {}

static GLOBAL: LazyLock<MemoryStore> = LazyLock::new(MemoryStore::new);

impl MemoryStore {
    /// An empty store that holds at most [`DEFAULT_MAX_ENTRIES`] records.
    pub fn new() -> MemoryStore {
        MemoryStore::with_max_entries(DEFAULT_MAX_ENTRIES)
    }

    /// An empty store that holds at most `max_entries` records (at least one).
    pub fn with_max_entries(max_entries: usize) -> MemoryStore {
        MemoryStore {
            records: DashMap::new(),
            len: AtomicUsize::new(0),
            max_entries: max_entries.max(1),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// The process-wide store that `#[idempotent]` uses when no `store = ...` is given, created
    /// on first use.
    pub fn global() -> &'static MemoryStore {
        &GLOBAL
    }

    /// How many records the store holds, live or expired but not yet swept.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most records the store holds.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Removes every expired record now; returns how many were removed.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        self.records.retain(|_, record| {
            let live = record.is_live(now);
            if !live {
                record.wake_waiters();
                removed += 1;
            }
            live
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    fn sweep_if_due(&self, now: Instant) {
        // One sweeper at a time; the others go on without waiting.
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        if now.duration_since(*last) >= SWEEP_EVERY {
            *last = now;
            drop(last);
            self.sweep();
        }
    }

    /// `claim`, synchronously, handing back a completed value as it is kept.
    pub(crate) fn claim_value(
        &self,
        key: Key,
        fingerprint: Option<Fingerprint>,
        lease: Duration,
    ) -> Result<ValueClaim, Error> {
        let now = Instant::now();
        // A replay or a busy key only reads: look under the shard's read lock first.
        if let Some(record) = self.records.get(&key)
            && let Some(found) = Self::live(&record, now)
        {
            return Ok(found);
        }
        if self.len() >= self.max_entries {
            // Full: make room from expired records, at most once a second (a store full of live
            // records must not rescan itself on every claim).
            self.sweep_if_due(now);
        }
        let token = Token::generate();
        let fresh = || Record::InProgress {
            token,
            lease_until: after(now, lease),
            fingerprint,
            waiters: Arc::new(Notify::new()),
        };
        let inserted = match self.records.entry(key) {
            Entry::Occupied(mut entry) => {
                // Looked at again under the write lock: another claim may have come first.
                if let Some(found) = Self::live(entry.get(), now) {
                    return Ok(found);
                }
                // Expired: take over. Waiters of a lapsed claim look again at once.
                let old = entry.insert(fresh());
                old.wake_waiters();
                false
            }
            Entry::Vacant(entry) => {
                // Reserve a slot first, so racing inserts cannot overshoot the bound.
                let max = self.max_entries;
                let reserved = self
                    .len
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    });
                if reserved.is_err() {
                    return Err(Error::store(Full { max_entries: max }));
                }
                entry.insert(fresh());
                true
            }
        };
        if inserted {
            self.sweep_if_due(now);
        }
        Ok(ValueClaim::Acquired(token))
    }

    /// What a claim finds in a live record: its completed value, or that it is busy.
    fn live(record: &Record, now: Instant) -> Option<ValueClaim> {
        match record {
            Record::Completed {
                value,
                fingerprint,
                expires_at,
                ..
            } if *expires_at > now => Some(ValueClaim::Completed {
                value: value.clone(),
                fingerprint: *fingerprint,
                expires_in: *expires_at - now,
            }),
            Record::InProgress { lease_until, .. } if *lease_until > now => {
                Some(ValueClaim::Busy {
                    lease_left: *lease_until - now,
                })
            }
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
        let completed = |fingerprint| Record::Completed {
            value,
            fingerprint,
            token,
            expires_at: after(now, ttl),
        };
        match self.records.entry(key) {
            Entry::Occupied(mut entry) => {
                let fingerprint = match entry.get() {
                    Record::InProgress {
                        token: held,
                        fingerprint,
                        ..
                    } if *held == token => *fingerprint,
                    // Completed by this claim already (a repeated completion): the first value
                    // stays.
                    Record::Completed {
                        token: held,
                        expires_at,
                        ..
                    } if *held == token && *expires_at > now => return Completion::Stored,
                    record if record.is_live(now) => return Completion::LeaseLost,
                    // An expired record, not yet swept: as if absent.
                    _ => fingerprint,
                };
                let old = entry.insert(completed(fingerprint));
                drop(entry);
                old.wake_waiters();
                Completion::Stored
            }
            Entry::Vacant(entry) => {
                // The claim expired and was swept (or an operator removed it), and no other call
                // took the key: the body ran, so its result is stored, past the bound if need be.
                self.len.fetch_add(1, Ordering::AcqRel);
                entry.insert(completed(fingerprint));
                Completion::Stored
            }
        }
    }

    fn renew_now(&self, key: Key, token: Token, lease: Duration) -> bool {
        let Some(mut record) = self.records.get_mut(&key) else {
            return false;
        };
        match &mut *record {
            Record::InProgress {
                token: held,
                lease_until,
                ..
            } if *held == token => {
                *lease_until = after(Instant::now(), lease);
                true
            }
            _ => false,
        }
    }

    fn release_now(&self, key: Key, token: Token) -> bool {
        let removed = self.records.remove_if(
            &key,
            |_, record| matches!(record, Record::InProgress { token: held, .. } if *held == token),
        );
        match removed {
            Some((_, record)) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                record.wake_waiters();
                true
            }
            None => false,
        }
    }

    fn remove_now(&self, key: Key) -> bool {
        match self.records.remove(&key) {
            Some((_, record)) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                record.wake_waiters();
                true
            }
            None => false,
        }
    }

    async fn wait_for(&self, key: Key, timeout: Duration) {
        let now = Instant::now();
        let (waiters, lease_left) = {
            let Some(record) = self.records.get(&key) else {
                return;
            };
            match &*record {
                Record::InProgress {
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
            matches!(&*record, Record::InProgress { waiters: w, .. } if Arc::ptr_eq(w, &waiters))
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
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        let result = self.complete_value(key, token, None, Value::Bytes(value), ttl);
        Box::pin(std::future::ready(Ok(result)))
    }

    fn renew(&self, key: Key, token: Token, lease: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        let result = self.renew_now(key, token, lease);
        Box::pin(std::future::ready(Ok(result)))
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

    /// Completes at once: the in-memory store has nothing to wait for.
    fn complete_on_drop(&self, key: Key, token: Token, value: Bytes, ttl: Duration) {
        self.complete_value(key, token, None, Value::Bytes(value), ttl);
    }

    fn as_memory(&self) -> Option<&MemoryStore> {
        Some(self)
    }
}
