//! Completed records a remote store has seen: a hint that lets a replay read its record with a
//! plain lookup (`HMGET` on Redis, a prepared `SELECT` on PostgreSQL) instead of the claim (a
//! Lua script, a writable statement), which costs the server several times as much.
//!
//! Only a hint: the lookup itself checks the record on the server, and a lookup that does not
//! find the completed record the hint names (it expired, was removed, or is another claim's)
//! forgets the hint and the call claims as it would have. A completed record never changes
//! until it expires or is removed, so what the lookup finds is what the claim would have
//! returned. Bounded: at most [`CAPACITY`] keys per store.

use std::hash::{BuildHasherDefault, Hasher};

use dashmap::DashMap;
use tokio::time::Instant;

use crate::key::Key;
use crate::record::Token;

/// The most keys a store remembers. Past it, expired hints are dropped, and if that frees
/// nothing, all of them (the next replay of each key claims, and remembers it again).
pub(crate) const CAPACITY: usize = 16 * 1024;

/// A completed record seen on the server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    /// The token of the claim that completed it (Redis checks it on the lookup: a record with
    /// another token is another claim's, whose expiry the hint does not know).
    pub(crate) token: Option<Token>,
    /// When it expires, by this process's clock: the server's time left, counted from before
    /// the request that read it (so never later than the server's expiry, give or take clock
    /// drift over the record's life).
    pub(crate) expires: Instant,
}

/// The completed records a store has seen, by key.
#[derive(Default)]
pub(crate) struct Known {
    map: DashMap<[u8; 32], Seen, BuildHasherDefault<DigestHasher>>,
}

impl Known {
    /// The hint for `key`, if there is one that has not expired by `now`.
    pub(crate) fn get(&self, key: &Key, now: Instant) -> Option<Seen> {
        let seen = *self.map.get(key.as_bytes())?;
        if seen.expires > now {
            return Some(seen);
        }
        self.forget(key);
        None
    }

    /// Remembers that `key` is completed.
    pub(crate) fn insert(&self, key: &Key, seen: Seen) {
        if self.map.len() >= CAPACITY && !self.map.contains_key(key.as_bytes()) {
            let now = Instant::now();
            self.map.retain(|_, s| s.expires > now);
            if self.map.len() >= CAPACITY {
                self.map.clear();
            }
        }
        // A repeated completion by the same token leaves the record as the first one made it
        // (its value and ttl): never let the hint outlive the record. The earlier of the two
        // expiries is safe either way (a hint that ends early only costs the claim).
        self.map
            .entry(*key.as_bytes())
            .and_modify(|known| {
                if known.token == seen.token {
                    known.expires = known.expires.min(seen.expires);
                } else {
                    *known = seen;
                }
            })
            .or_insert(seen);
    }

    /// Forgets `key` (its lookup missed, or it was removed).
    pub(crate) fn forget(&self, key: &Key) {
        self.map.remove(key.as_bytes());
    }

    /// How many keys are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Keys are uniformly distributed digests already: their first eight bytes are the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length (a `usize`, through `write_usize`) and its bytes.
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }

    fn write_usize(&mut self, _: usize) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A repeated completion by the same token keeps the record's first ttl: the hint must not
    /// take the repeat's longer one (found by `reliability_redis`'s model: a replay reported
    /// 30 s left on a record of 150 ms). Another token's completion replaces the hint.
    #[tokio::test(start_paused = true)]
    async fn a_repeated_completion_never_lengthens_the_hint() {
        let known = Known::default();
        let key = Key::new("t", &2u32);
        let now = Instant::now();
        let token = Token::generate();
        let short = now + Duration::from_millis(150);
        known.insert(
            &key,
            Seen {
                token: Some(token),
                expires: short,
            },
        );
        known.insert(
            &key,
            Seen {
                token: Some(token),
                expires: now + Duration::from_secs(30),
            },
        );
        assert_eq!(known.get(&key, now).map(|s| s.expires), Some(short));
        let other = Token::generate();
        let later = now + Duration::from_secs(5);
        known.insert(
            &key,
            Seen {
                token: Some(other),
                expires: later,
            },
        );
        assert_eq!(known.get(&key, now).map(|s| s.expires), Some(later));
    }

    #[tokio::test(start_paused = true)]
    async fn hints_expire_and_stay_bounded() {
        let known = Known::default();
        let key = Key::new("t", &1u32);
        let now = Instant::now();
        let seen = Seen {
            token: None,
            expires: now + Duration::from_secs(1),
        };
        known.insert(&key, seen);
        assert!(known.get(&key, now).is_some());
        assert!(known.get(&key, now + Duration::from_secs(1)).is_none());
        assert_eq!(known.len(), 0, "an expired hint is dropped when met");

        for i in 0..(CAPACITY as u64 + 10) {
            known.insert(&Key::new("t", &i), seen);
        }
        assert!(known.len() <= CAPACITY, "{}", known.len());
    }
}
