//! The store's `LISTEN` connection: one per store, outside the pool, shared by every waiter of
//! the store through a map from key to [`Notify`]. See the module docs of the PostgreSQL store
//! ("Waiting") for the protocol; in short:
//!
//! - a waiter registers its key in the map, then takes a *session-level shared* advisory lock on
//!   the key's wait lock through this connection (the "arming"), then re-checks the record;
//! - a statement that changes a record (complete, release, remove, a takeover, a purge) tries the
//!   same lock *exclusively* for its own transaction: when it cannot get it, someone waits on the
//!   key and it sends `pg_notify(channel, key digest hex)`, delivered when it commits. So a
//!   completion that no one waits for sends no notification (a notifying commit takes a
//!   database-wide lock in PostgreSQL, which would serialise every completion);
//! - a waiter that arms while such a statement holds the lock gets `false` and polls soon;
//! - a notification wakes the waiters of its key, which return at once (their callers claim
//!   again: the notification means the record left `InProgress` when its writer committed);
//! - the connection lost, every waiter is woken and polls (with the short backoff) until it is
//!   back, re-arming on the new connection.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// The first pause before reconnecting a lost listener, doubled up to [`MAX_RECONNECT`].
const FIRST_RECONNECT: Duration = Duration::from_millis(50);
const MAX_RECONNECT: Duration = Duration::from_secs(5);
/// How often an idle listener checks that its connection still answers (a half-open TCP
/// connection delivers nothing and reports nothing).
const HEARTBEAT: Duration = Duration::from_secs(30);

/// A digest of a key, as the map holds it.
type Digest = [u8; 32];

/// The store's side of the listener: dropping it stops the task and closes the connection.
pub(super) struct Listener {
    pub(super) shared: Arc<Shared>,
    _stop: watch::Sender<()>,
}

/// What the listener task and the waiters share.
pub(super) struct Shared {
    channel: String,
    config: Config,
    timeout: Duration,
    waiters: Mutex<HashMap<Digest, (Arc<Notify>, usize)>>,
    /// The connection that is listening now, and its generation (`None` while there is none).
    current: Mutex<Option<(u64, Arc<Client>)>>,
    /// Woken whenever the listening connection comes or goes: waiters then arm again, or poll.
    pub(super) changed: Notify,
    /// How many times a connection started listening.
    pub(super) connections: AtomicU64,
    /// How many notifications reached a waiter of this store.
    pub(super) delivered: AtomicU64,
}

impl Listener {
    /// Starts the listener task on the current tokio runtime; `None` without one.
    pub(super) fn start(config: Config, channel: String, timeout: Duration) -> Option<Listener> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let shared = Arc::new(Shared {
            channel,
            config,
            timeout,
            waiters: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            changed: Notify::new(),
            connections: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(());
        handle.spawn(run(Arc::clone(&shared), stopped));
        Some(Listener {
            shared,
            _stop: stop,
        })
    }
}

impl Shared {
    /// Registers a waiter of `key` (before it checks the record, so that nothing is missed).
    pub(super) fn subscribe(self: &Arc<Self>, key: Digest) -> Subscription {
        let notify = {
            let mut map = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map
                .entry(key)
                .or_insert_with(|| (Arc::new(Notify::new()), 0));
            entry.1 += 1;
            Arc::clone(&entry.0)
        };
        Subscription {
            shared: Arc::clone(self),
            key,
            notify,
            armed: None,
        }
    }

    fn current(&self) -> Option<(u64, Arc<Client>)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, now: Option<(u64, Arc<Client>)>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = now;
        // Connected: waiters arm on it. Lost: they poll instead of trusting it.
        self.changed.notify_waiters();
    }

    /// A notification: wakes the waiters of its key, if any. A payload that is not a digest
    /// (someone else's `NOTIFY` on the channel) is ignored.
    fn dispatch(&self, payload: &str) {
        let Some(key) = parse_digest(payload) else {
            return;
        };
        let map = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((notify, _)) = map.get(&key) {
            notify.notify_waiters();
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn parse_digest(hex: &str) -> Option<Digest> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// One waiter's registration: its key's [`Notify`], and the shared lock it holds on the
/// listening connection once armed. Dropped, it leaves the map and releases the lock.
pub(super) struct Subscription {
    shared: Arc<Shared>,
    key: Digest,
    pub(super) notify: Arc<Notify>,
    /// The generation and connection this waiter's shared lock was taken on.
    armed: Option<(u64, Arc<Client>, i64)>,
}

/// Whether a waiter can count on a notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Armed {
    /// Its shared lock is held on the listening connection: a change is notified.
    Yes,
    /// A statement changing the key holds the wait lock right now: look again soon.
    Contended,
    /// No listening connection (lost, or not yet up): poll.
    No,
}

impl Subscription {
    /// Takes the shared wait lock `lock` on the listening connection, unless this waiter already
    /// holds it on that connection.
    pub(super) async fn arm(&mut self, lock: i64) -> Armed {
        let Some((generation, client)) = self.shared.current() else {
            return Armed::No;
        };
        if matches!(&self.armed, Some((g, _, _)) if *g == generation) {
            return Armed::Yes;
        }
        let taken = tokio::time::timeout(
            self.shared.timeout,
            client.query_typed(
                "SELECT pg_catalog.pg_try_advisory_lock_shared($1)",
                &[(&lock, Type::INT8)],
            ),
        )
        .await;
        match taken {
            Ok(Ok(rows)) => match rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()) {
                Some(true) => {
                    // A lock on a connection that was replaced went with its session.
                    self.armed = Some((generation, client, lock));
                    Armed::Yes
                }
                Some(false) => Armed::Contended,
                None => Armed::No,
            },
            _ => Armed::No,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        {
            let mut map = self
                .shared
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = map.get_mut(&self.key) {
                entry.1 = entry.1.saturating_sub(1);
                if entry.1 == 0 {
                    map.remove(&self.key);
                }
            }
        }
        if let Some((_, client, lock)) = self.armed.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            // Left held (no runtime, or a failure), it only makes a completion of the key send a
            // notification no one needs; it goes with the connection.
            let timeout = self.shared.timeout;
            handle.spawn(async move {
                let _ = tokio::time::timeout(
                    timeout,
                    client.query_typed(
                        "SELECT pg_catalog.pg_advisory_unlock_shared($1)",
                        &[(&lock, Type::INT8)],
                    ),
                )
                .await;
            });
        }
    }
}

/// The listener task: connect, `LISTEN`, deliver notifications; when the connection is lost,
/// wake every waiter (they poll meanwhile) and connect again with backoff. Ends when the store
/// is dropped.
async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<()>) {
    let mut pause = FIRST_RECONNECT;
    let mut generation = 0u64;
    loop {
        let session = tokio::select! {
            _ = stop.changed() => return,
            session = listen(&shared) => session,
        };
        if let Some((client, mut closed)) = session {
            generation += 1;
            pause = FIRST_RECONNECT;
            let client = Arc::new(client);
            shared.set_current(Some((generation, Arc::clone(&client))));
            shared.connections.fetch_add(1, Ordering::Relaxed);
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.tick().await;
            loop {
                tokio::select! {
                    _ = stop.changed() => {
                        shared.set_current(None);
                        return;
                    }
                    _ = &mut closed => break,
                    _ = beat.tick() => {
                        let alive =
                            tokio::time::timeout(shared.timeout, client.simple_query("")).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            shared.set_current(None);
            tracing::debug!(
                target: "idem", channel = %shared.channel,
                "the PostgreSQL listener connection was lost; waiters poll until it is back"
            );
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_RECONNECT);
    }
}

/// Opens a connection, starts delivering its notifications and runs `LISTEN`: the client, and a
/// receiver that resolves when the connection ends. `None` when any of it failed.
async fn listen(shared: &Arc<Shared>) -> Option<(Client, tokio::sync::oneshot::Receiver<()>)> {
    let connect = tokio::time::timeout(shared.timeout, shared.config.connect(NoTls)).await;
    let (client, mut connection) = match connect {
        Ok(Ok(pair)) => pair,
        Ok(Err(err)) => {
            tracing::debug!(target: "idem", error = %err, "the PostgreSQL listener could not connect");
            return None;
        }
        Err(_) => return None,
    };
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let delivering = Arc::clone(shared);
    tokio::spawn(async move {
        while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(n)) => delivering.dispatch(n.payload()),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = closed_tx.send(());
    });
    // The channel name is made of `idem_` and hex digits only.
    let statement = format!("LISTEN \"{}\"", shared.channel);
    match tokio::time::timeout(shared.timeout, client.batch_execute(&statement)).await {
        Ok(Ok(())) => Some((client, closed)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_parsed_from_hex_and_anything_else_is_ignored() {
        let hex = "00ff".repeat(16);
        let digest = parse_digest(&hex).expect("64 hex digits");
        assert_eq!(digest[0], 0);
        assert_eq!(digest[1], 0xff);
        assert!(parse_digest("").is_none());
        assert!(parse_digest(&"zz".repeat(32)).is_none());
        assert!(parse_digest(&"é".repeat(32)).is_none());
        assert!(parse_digest(&"0".repeat(63)).is_none());
    }
}
