//! Per-client quotas: how many records and stored bytes each client (scope) holds, as this
//! layer counts them in this process.
//!
//! A request that would create a record is admitted with a [`Reservation`]: one record, and
//! room for the largest response it may store. When its response is stored the reservation is
//! [settled](Reservation::settle) into a record of its real size that counts until its ttl runs
//! out; when nothing is stored (a failure, a response not stored, a panic, a cancellation) the
//! reservation is dropped and frees what it held. No stored response ever takes a client over
//! its byte bound, because its room was held before the handler ran.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::clock::after;

/// A client's identity in the quota table: a digest of its scope.
type ClientId = [u8; 32];

/// How many expired records a call sweeps from other clients, so that clients that never come
/// back are forgotten without any call doing more than a small, bounded slice of work.
const SWEEP_PER_CALL: usize = 4;

/// When only running requests hold a client's quota, how long it is told to wait.
const RETRY_WHILE_RUNNING: Duration = Duration::from_secs(1);

/// The count of one client's records and stored bytes: see
/// [`IdempotencyLayer::client_usage`](super::IdempotencyLayer::client_usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientUsage {
    /// Records held: requests running, and responses stored whose ttl has not run out.
    pub records: usize,
    /// Bytes of the stored responses (status, headers, body).
    pub bytes: usize,
    /// Bytes held for the responses of the requests running.
    pub reserved_bytes: usize,
}

/// The bounds a request is admitted against.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// The most records per client.
    pub(super) records: usize,
    /// The most stored bytes per client.
    pub(super) bytes: usize,
    /// The room a running request holds: the largest response it may store.
    pub(super) room: usize,
    /// How long a stored response counts.
    pub(super) ttl: Duration,
}

/// Why a request was not admitted, and when the client's oldest record frees.
#[derive(Debug)]
pub(super) struct OverQuota {
    pub(super) retry_after: Duration,
    pub(super) usage: ClientUsage,
    pub(super) bytes: bool,
}

#[derive(Default)]
struct Usage {
    running: usize,
    reserved: usize,
    bytes: usize,
    /// The stored records: when each stops counting, and its size, oldest first.
    stored: VecDeque<(Instant, usize)>,
}

impl Usage {
    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, size)) = self.stored.front() {
            if expires > now {
                break;
            }
            self.stored.pop_front();
            self.bytes = self.bytes.saturating_sub(size);
        }
    }

    fn is_empty(&self) -> bool {
        self.running == 0 && self.stored.is_empty()
    }

    fn snapshot(&self) -> ClientUsage {
        ClientUsage {
            records: self.running.saturating_add(self.stored.len()),
            bytes: self.bytes,
            reserved_bytes: self.reserved,
        }
    }
}

/// The per-client counts of one layer.
#[derive(Default)]
pub(crate) struct Quotas {
    clients: DashMap<ClientId, Usage>,
    /// Every stored record's expiry and client, oldest first: what sweeps clients that do not
    /// come back.
    expiries: Mutex<VecDeque<(Instant, ClientId)>>,
}

fn client_id(scope: &str) -> ClientId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"idem.http.quota");
    hasher.update(scope.as_bytes());
    *hasher.finalize().as_bytes()
}

impl Quotas {
    /// Admits one more record for `scope`, holding `limits.room` bytes for its response.
    pub(super) fn admit(
        self: &Arc<Self>,
        scope: &str,
        limits: Limits,
    ) -> Result<Reservation, OverQuota> {
        let now = Instant::now();
        self.sweep(now);
        let id = client_id(scope);
        let mut usage = self.clients.entry(id).or_default();
        usage.expire(now);
        let records = usage.running.saturating_add(usage.stored.len());
        let bytes_after = usage
            .bytes
            .saturating_add(usage.reserved)
            .saturating_add(limits.room);
        let over_records = records >= limits.records;
        if over_records || bytes_after > limits.bytes {
            let retry_after = match usage.stored.front() {
                Some(&(expires, _)) => expires.saturating_duration_since(now),
                None => RETRY_WHILE_RUNNING,
            };
            let over = OverQuota {
                retry_after,
                usage: usage.snapshot(),
                bytes: !over_records,
            };
            let empty = usage.is_empty();
            drop(usage);
            if empty {
                self.clients.remove_if(&id, |_, u| u.is_empty());
            }
            return Err(over);
        }
        usage.running += 1;
        usage.reserved = usage.reserved.saturating_add(limits.room);
        Ok(Reservation {
            quotas: Arc::clone(self),
            id,
            room: limits.room,
            ttl: limits.ttl,
            settled: false,
        })
    }

    /// What `scope` holds now.
    pub(super) fn usage(&self, scope: &str) -> ClientUsage {
        let now = Instant::now();
        match self.clients.get_mut(&client_id(scope)) {
            Some(mut usage) => {
                usage.expire(now);
                usage.snapshot()
            }
            None => ClientUsage::default(),
        }
    }

    /// Forgets the expired records of a few clients, oldest first.
    fn sweep(&self, now: Instant) {
        let mut due = [None; SWEEP_PER_CALL];
        if let Ok(mut expiries) = self.expiries.lock() {
            for slot in &mut due {
                match expiries.front() {
                    Some(&(expires, id)) if expires <= now => {
                        expiries.pop_front();
                        *slot = Some(id);
                    }
                    _ => break,
                }
            }
        }
        for id in due.into_iter().flatten() {
            if let Some(mut usage) = self.clients.get_mut(&id) {
                usage.expire(now);
            }
            self.clients.remove_if(&id, |_, u| u.is_empty());
        }
    }

    /// Ends a reservation: into a stored record of `stored` bytes, or into nothing.
    fn end(&self, id: ClientId, room: usize, stored: Option<(usize, Duration)>) {
        let now = Instant::now();
        let mut expiry = None;
        if let Some(mut usage) = self.clients.get_mut(&id) {
            usage.running = usage.running.saturating_sub(1);
            usage.reserved = usage.reserved.saturating_sub(room);
            if let Some((size, ttl)) = stored {
                let expires = after(now, ttl);
                usage.bytes = usage.bytes.saturating_add(size);
                usage.stored.push_back((expires, size));
                expiry = Some(expires);
            }
        }
        match expiry {
            Some(expires) => {
                if let Ok(mut expiries) = self.expiries.lock() {
                    expiries.push_back((expires, id));
                }
            }
            None => {
                self.clients.remove_if(&id, |_, u| u.is_empty());
            }
        }
    }
}

/// One admitted request's hold on its client's quota: freed when dropped, unless
/// [settled](Self::settle) into a stored record.
pub(super) struct Reservation {
    quotas: Arc<Quotas>,
    id: ClientId,
    room: usize,
    ttl: Duration,
    settled: bool,
}

impl Reservation {
    /// The most bytes the response may take to be stored.
    pub(super) fn room(&self) -> usize {
        self.room
    }

    /// The response was stored and takes `size` bytes (at most [`room`](Self::room)): it
    /// counts against the client until its ttl runs out.
    pub(super) fn settle(mut self, size: usize) {
        self.settled = true;
        self.quotas
            .end(self.id, self.room, Some((size.min(self.room), self.ttl)));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.quotas.end(self.id, self.room, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(records: usize, bytes: usize, room: usize) -> Limits {
        Limits {
            records,
            bytes,
            room,
            ttl: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn records_are_bounded_per_client_and_free_with_their_ttl() {
        let quotas = Arc::new(Quotas::default());
        let l = limits(2, usize::MAX, 10);
        quotas.admit("a", l).map(|r| r.settle(5)).ok();
        tokio::time::advance(Duration::from_secs(10)).await;
        let running = quotas.admit("a", l).ok();
        assert!(running.is_some());
        let over = quotas.admit("a", l).err();
        let over = over.as_ref().map(|o| (o.retry_after, o.bytes));
        // The oldest record frees 50 s from now; the bound is on records, not bytes.
        assert_eq!(over, Some((Duration::from_secs(50), false)));
        // Another client is not affected.
        assert!(quotas.admit("b", l).is_ok());
        // A request that stores nothing frees its record.
        drop(running);
        assert_eq!(quotas.usage("a").records, 1);
        assert!(quotas.admit("a", l).is_ok());
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(quotas.usage("a"), ClientUsage::default());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_never_exceed_the_bound() {
        let quotas = Arc::new(Quotas::default());
        let l = limits(usize::MAX, 100, 30);
        let mut admitted = 0;
        while let Ok(r) = quotas.admit("a", l) {
            r.settle(30);
            admitted += 1;
            assert!(quotas.usage("a").bytes <= 100);
        }
        assert_eq!(admitted, 3);
        let over = quotas.admit("a", l).err();
        assert!(over.is_some_and(|o| o.bytes));
        // Room held by running requests counts too.
        let b1 = quotas.admit("b", l).ok();
        let b2 = quotas.admit("b", l).ok();
        let b3 = quotas.admit("b", l).ok();
        assert!(b1.is_some() && b2.is_some() && b3.is_some());
        assert!(quotas.admit("b", l).is_err());
        assert_eq!(quotas.usage("b").reserved_bytes, 90);
    }

    #[tokio::test(start_paused = true)]
    async fn clients_that_do_not_come_back_are_forgotten() {
        let quotas = Arc::new(Quotas::default());
        let l = limits(10, 1000, 10);
        for client in ["a", "b", "c"] {
            quotas.admit(client, l).map(|r| r.settle(1)).ok();
        }
        assert_eq!(quotas.clients.len(), 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        drop(quotas.admit("d", l));
        assert_eq!(quotas.clients.len(), 0);
    }
}
