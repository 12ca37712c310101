//! Per-client quotas: how many records, running requests, stored bytes and buffered request
//! bytes each client (scope) holds, as this layer counts them in this process.
//!
//! A request that would create a record is admitted with a [`Reservation`]: one record, one
//! running request, and a small room ([`RUNNING_ROOM`]) of the client's byte quota. When its
//! response is stored the reservation is [settled](Reservation::settle) into a record of its
//! real size, which counts until its ttl runs out, whatever that size (the handler ran: a
//! response is never refused for the quota); when nothing is stored (a failure, a response not
//! stored, a panic, a cancellation) the reservation is dropped and frees what it held. So a
//! client's stored bytes stay under its bound plus what its running requests store at once: at
//! most `max_running_per_client` responses of `max_response_bytes`.
//!
//! Separately, a keyed request's body is [held](Quotas::hold_body) against its client's byte
//! bound while the request is in the layer: from before it is read (its `Content-Length`, or
//! chunk by chunk as a body of unknown length is read), then while the request reads its
//! record, waits for another request with its key, or runs. So neither uploads that stall
//! before their last byte nor requests waiting with
//! [`OnConflict::Wait`](crate::OnConflict::Wait) can pile up bodies without bound.

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

/// When running requests hold what a client needs, how long it is told to wait: they free it
/// when they end, which nobody can know in advance, so the client looks again soon.
const RETRY_WHILE_RUNNING: Duration = Duration::from_secs(1);

/// The room of its client's byte quota a running request holds until its response is stored
/// and counted at its real size: enough for the headers and body of a small JSON answer.
pub(super) const RUNNING_ROOM: usize = 16 * 1024;

/// The count of one client's records and bytes: see
/// [`IdempotencyLayer::client_usage`](super::IdempotencyLayer::client_usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientUsage {
    /// Records held: requests running, and responses stored whose ttl has not run out.
    pub records: usize,
    /// Bytes of the stored responses (status, headers, body).
    pub bytes: usize,
    /// Bytes held for the responses of the requests running (a small room each).
    pub reserved_bytes: usize,
    /// Requests running: admitted, their handler started or about to.
    pub running: usize,
    /// Bytes of the request bodies the layer holds for this client's keyed requests: those
    /// being read (counted at their `Content-Length` from before the first byte is read, or,
    /// without one, at what was read so far), those running, and those reading their record
    /// or waiting for another request with their key.
    pub buffered_bytes: usize,
}

/// The bounds a request is admitted against.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// The most records per client.
    pub(super) records: usize,
    /// The most stored bytes per client.
    pub(super) bytes: usize,
    /// The most requests running per client.
    pub(super) running: usize,
    /// The room a running request holds of the byte quota.
    pub(super) room: usize,
    /// How long a stored response counts.
    pub(super) ttl: Duration,
}

/// Which bound a client is at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bound {
    /// Records (running and stored).
    Records,
    /// Stored bytes (and the room held by running requests).
    Bytes,
    /// Requests running at once.
    Running,
    /// Request bodies held at once.
    Buffered,
}

/// Why a request was not admitted, and the soonest time room may free.
#[derive(Debug)]
pub(super) struct OverQuota {
    pub(super) retry_after: Duration,
    pub(super) usage: ClientUsage,
    pub(super) bound: Bound,
}

#[derive(Default)]
struct Usage {
    running: usize,
    reserved: usize,
    bytes: usize,
    buffered: usize,
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
        self.running == 0 && self.buffered == 0 && self.stored.is_empty()
    }

    fn snapshot(&self) -> ClientUsage {
        ClientUsage {
            records: self.running.saturating_add(self.stored.len()),
            bytes: self.bytes,
            reserved_bytes: self.reserved,
            running: self.running,
            buffered_bytes: self.buffered,
        }
    }

    /// The bound one more request would break, if any, and the soonest time room may free for
    /// it: when the running requests end (if any is running), or when enough stored records
    /// expire, whichever is sooner; for several bounds, the latest of those times.
    fn over(&self, limits: Limits, now: Instant) -> Option<(Bound, Duration)> {
        let running = (self.running > 0).then_some(RETRY_WHILE_RUNNING);
        let records = self.running.saturating_add(self.stored.len());
        let mut over: Option<(Bound, Duration)> = None;
        let mut note = |bound: Bound, by_expiry: Option<Instant>| {
            let by_expiry = by_expiry.map(|at| at.saturating_duration_since(now));
            let soonest = match (running, by_expiry) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(limits.ttl),
            };
            over = match over {
                Some((first, wait)) => Some((first, wait.max(soonest))),
                None => Some((bound, soonest)),
            };
        };
        if self.running >= limits.running {
            note(Bound::Running, None);
        }
        if records >= limits.records {
            // The records that must go for one more to fit: the oldest stored ones.
            let excess = records + 1 - limits.records;
            note(
                Bound::Records,
                self.stored.get(excess - 1).map(|&(at, _)| at),
            );
        }
        let wanted = self
            .bytes
            .saturating_add(self.reserved)
            .saturating_add(limits.room);
        if wanted > limits.bytes {
            let mut excess = wanted - limits.bytes;
            let mut frees = None;
            for &(at, size) in &self.stored {
                if excess <= size {
                    frees = Some(at);
                    break;
                }
                excess -= size;
            }
            note(Bound::Bytes, frees);
        }
        over
    }
}

/// The per-client counts of one layer, shared by every layer and service cloned from it.
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
    /// Admits one more record and running request for `scope`, holding `limits.room` bytes.
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
        if let Some((bound, retry_after)) = usage.over(limits, now) {
            let over = OverQuota {
                retry_after,
                usage: usage.snapshot(),
                bound,
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

    /// Holds `len` bytes of a request body for `scope` while the request is in the layer, from
    /// before its body is read (`len` is then its `Content-Length`, or 0 for a body of unknown
    /// length, which [grows](BodyHold::grow_to) the hold as it is read): at most `limit` bytes
    /// per client at once (a body alone is always held, so a limit below the largest body
    /// never refuses every request).
    pub(super) fn hold_body(
        self: &Arc<Self>,
        scope: &str,
        len: usize,
        limit: usize,
    ) -> Result<BodyHold, OverQuota> {
        let id = client_id(scope);
        let mut usage = self.clients.entry(id).or_default();
        if usage.buffered > 0 && usage.buffered.saturating_add(len) > limit {
            return Err(OverQuota {
                retry_after: RETRY_WHILE_RUNNING,
                usage: usage.snapshot(),
                bound: Bound::Buffered,
            });
        }
        usage.buffered = usage.buffered.saturating_add(len);
        Ok(BodyHold {
            quotas: Arc::clone(self),
            id,
            len,
            limit,
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

    /// Lets go of a request body's bytes.
    fn release_body(&self, id: ClientId, len: usize) {
        if let Some(mut usage) = self.clients.get_mut(&id) {
            usage.buffered = usage.buffered.saturating_sub(len);
        }
        self.clients.remove_if(&id, |_, u| u.is_empty());
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
    /// The response was stored and takes `size` bytes: it counts against the client until its
    /// ttl runs out, whatever its size (it ran; it is never refused for the quota).
    pub(super) fn settle(mut self, size: usize) {
        self.settled = true;
        self.quotas.end(self.id, self.room, Some((size, self.ttl)));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.quotas.end(self.id, self.room, None);
        }
    }
}

/// A keyed request's body, held against its client while the request is in the layer.
pub(super) struct BodyHold {
    quotas: Arc<Quotas>,
    id: ClientId,
    /// The bytes held.
    len: usize,
    /// The most bytes the client's bodies may take at once.
    limit: usize,
}

impl BodyHold {
    /// Grows the hold to `len` bytes (a body of unknown length was read that far): refused
    /// when the client's other bodies and this one would then take more than its limit. A body
    /// alone is never refused, as in [`Quotas::hold_body`].
    pub(super) fn grow_to(&mut self, len: usize) -> Result<(), OverQuota> {
        let Some(more) = len.checked_sub(self.len).filter(|&more| more > 0) else {
            return Ok(());
        };
        // The entry may have been forgotten while this hold was empty.
        let mut usage = self.quotas.clients.entry(self.id).or_default();
        let others = usage.buffered.saturating_sub(self.len);
        if others > 0 && usage.buffered.saturating_add(more) > self.limit {
            return Err(OverQuota {
                retry_after: RETRY_WHILE_RUNNING,
                usage: usage.snapshot(),
                bound: Bound::Buffered,
            });
        }
        usage.buffered = usage.buffered.saturating_add(more);
        self.len = len;
        Ok(())
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        self.quotas.release_body(self.id, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(records: usize, bytes: usize, room: usize) -> Limits {
        Limits {
            records,
            bytes,
            running: usize::MAX,
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
        quotas.admit("a", l).map(|r| r.settle(5)).ok();
        let over = quotas.admit("a", l).err();
        let over = over.as_ref().map(|o| (o.retry_after, o.bound));
        // The oldest record frees 50 s from now; the bound is on records, not bytes.
        assert_eq!(over, Some((Duration::from_secs(50), Bound::Records)));
        // Another client is not affected.
        assert!(quotas.admit("b", l).is_ok());
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(quotas.usage("a").records, 1);
        let running = quotas.admit("a", l).ok();
        assert!(running.is_some());
        // A request running holds the quota: the client is told to look again soon, not when
        // the stored record expires.
        let over = quotas.admit("a", l).err();
        let over = over.as_ref().map(|o| (o.retry_after, o.bound));
        assert_eq!(over, Some((RETRY_WHILE_RUNNING, Bound::Records)));
        // A request that stores nothing frees its record.
        drop(running);
        assert_eq!(quotas.usage("a").records, 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(quotas.usage("a"), ClientUsage::default());
    }

    #[tokio::test(start_paused = true)]
    async fn stored_bytes_count_at_their_size_and_free_with_their_ttl() {
        let quotas = Arc::new(Quotas::default());
        let l = limits(usize::MAX, 100, 10);
        let mut admitted = 0;
        while let Ok(r) = quotas.admit("a", l) {
            r.settle(30);
            admitted += 1;
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // At 0, 30, 60 and 90 bytes there is room for the 10 a request holds; the fourth
        // response takes the client past its bound (it ran: it is stored), and at 120 no more
        // is admitted.
        assert_eq!(admitted, 4);
        assert_eq!(quotas.usage("a").bytes, 120);
        let over = quotas.admit("a", l).err();
        // One record (the oldest, 56 s from now) must expire for 10 more bytes to fit.
        let over = over.as_ref().map(|o| (o.retry_after, o.bound));
        assert_eq!(over, Some((Duration::from_secs(56), Bound::Bytes)));
        // A response larger than the room held is stored all the same, and counted whole.
        let b = quotas.admit("b", l).ok();
        assert!(b.is_some());
        if let Some(r) = b {
            r.settle(500);
        }
        assert_eq!(quotas.usage("b").bytes, 500);
        assert!(quotas.admit("b", l).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn running_requests_are_bounded_per_client() {
        let quotas = Arc::new(Quotas::default());
        let l = Limits {
            running: 2,
            ..limits(usize::MAX, usize::MAX, 10)
        };
        let r1 = quotas.admit("a", l).ok();
        let r2 = quotas.admit("a", l).ok();
        assert!(r1.is_some() && r2.is_some());
        let over = quotas.admit("a", l).err();
        let over = over.as_ref().map(|o| (o.retry_after, o.bound));
        assert_eq!(over, Some((RETRY_WHILE_RUNNING, Bound::Running)));
        assert_eq!(quotas.usage("a").running, 2);
        assert_eq!(quotas.usage("a").reserved_bytes, 20);
        if let Some(r) = r1 {
            r.settle(1);
        }
        assert!(quotas.admit("a", l).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn buffered_bodies_are_bounded_per_client() {
        let quotas = Arc::new(Quotas::default());
        // One body is always held, even over the limit.
        let big = quotas.hold_body("a", 500, 100).ok();
        assert!(big.is_some());
        assert!(quotas.hold_body("a", 1, 100).is_err());
        drop(big);
        let holds: Vec<_> = (0..4)
            .map_while(|_| quotas.hold_body("a", 30, 100).ok())
            .collect();
        assert_eq!(holds.len(), 3);
        assert_eq!(quotas.usage("a").buffered_bytes, 90);
        assert!(quotas.hold_body("b", 30, 100).is_ok(), "another client");
        drop(holds);
        assert_eq!(quotas.usage("a"), ClientUsage::default());
        assert!(quotas.clients.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_of_unknown_length_grows_its_hold_within_the_bound() {
        let quotas = Arc::new(Quotas::default());
        // Alone, a body grows past the limit (one body is always held).
        let mut alone = quotas.hold_body("a", 0, 100).ok();
        assert!(alone.as_mut().is_some_and(|h| h.grow_to(150).is_ok()));
        assert_eq!(quotas.usage("a").buffered_bytes, 150);
        drop(alone);
        assert!(quotas.clients.is_empty());

        let declared = quotas.hold_body("a", 60, 100).ok();
        let mut chunked = quotas.hold_body("a", 0, 100).ok();
        let grown = chunked
            .as_mut()
            .map(|h| (h.grow_to(30).is_ok(), h.grow_to(20).is_ok()));
        // Growing to less than is held changes nothing.
        assert_eq!(grown, Some((true, true)));
        assert_eq!(quotas.usage("a").buffered_bytes, 90);
        let over = chunked.as_mut().and_then(|h| h.grow_to(41).err());
        assert_eq!(over.map(|o| o.bound), Some(Bound::Buffered));
        // A refusal holds nothing more; reaching the limit exactly is allowed.
        assert_eq!(quotas.usage("a").buffered_bytes, 90);
        assert!(chunked.as_mut().is_some_and(|h| h.grow_to(40).is_ok()));
        assert_eq!(quotas.usage("a").buffered_bytes, 100);
        assert!(quotas.hold_body("b", 100, 100).is_ok(), "another client");
        drop((declared, chunked));
        assert!(quotas.clients.is_empty());
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
