//! Records and what the store operations return.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::key::Fingerprint;

/// A fencing token: names one claim of a key, so that a holder whose lease ran out and was taken
/// over can neither complete, renew nor release the new holder's claim.
///
/// Tokens are 128 bits: 64 random bits chosen once per process and a 64-bit counter, so they are
/// unique within a process and, with overwhelming probability, across processes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u128);

static PROCESS_SEED: LazyLock<u64> =
    LazyLock::new(|| RandomState::new().hash_one(std::process::id()));
static COUNTER: AtomicU64 = AtomicU64::new(1);

impl Token {
    /// A token never handed out before by this process.
    pub fn generate() -> Token {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Token((u128::from(*PROCESS_SEED) << 64) | u128::from(n))
    }

    /// The token as a number, as remote stores keep it.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds a token read back from a store.
    pub fn from_u128(v: u128) -> Token {
        Token(v)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:032x})", self.0)
    }
}

/// A completed record: the memoized result of the call that ran the body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completed {
    /// The result, encoded (JSON) by the executor.
    pub value: Bytes,
    /// The fingerprint of the call that produced it, if it gave one.
    pub fingerprint: Option<Fingerprint>,
    /// How long the record lives on, by the store's clock.
    pub expires_in: Duration,
}

impl Completed {
    /// A completed record, as a store reads it back.
    pub fn new(value: Bytes, fingerprint: Option<Fingerprint>, expires_in: Duration) -> Completed {
        Completed {
            value,
            fingerprint,
            expires_in,
        }
    }
}

/// What [`Store::claim`](crate::Store::claim) found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// The key was free (absent, expired, or its holder's lease ran out): it is now held by the
    /// caller under this token until the lease runs out.
    Acquired(Token),
    /// The key has a live completed record: replay it.
    Completed(Completed),
    /// Another caller holds the key; its lease has this long left at the most.
    Busy {
        /// Time left on the holder's lease.
        lease_left: Duration,
    },
}

/// What [`Store::complete`](crate::Store::complete) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The record is completed and lives for the ttl.
    Stored,
    /// The token no longer holds the key (the lease ran out and another caller took over, or the
    /// record was removed): nothing was written.
    LeaseLost,
}
