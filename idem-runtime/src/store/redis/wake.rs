//! Waking the callers that wait for a key another call holds, by Redis pub/sub (see
//! [`RedisStore`](super::RedisStore), "Waiting").
//!
//! The scripts that end a claim (complete, release, remove) or take a lapsed one over publish
//! on a channel named like the record's Redis key: `PUBLISH` on one server, `SPUBLISH` on a
//! cluster, where the channel's hash slot is the record's, so the message is sent by the node
//! that owns the record and only to the subscribers of that node. Each store has one subscriber
//! connection (on a cluster, one per node, through a second cluster client), shared by all its
//! waiters: a key is subscribed while at least one of the store's callers waits for it.
//!
//! A waiter subscribes before it reads the record, so a completion after the read is a message
//! it receives. A message can still be lost (the subscriber connection dropped, the server
//! failed over): the waiter reads the record again every `fallback_poll_interval`, and after a
//! subscriber connection is made again every waiter is woken to look at its record.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ::redis::aio::{PubSubSink, PubSubStream};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, ProtocolVersion, PushInfo, PushKind, RedisError, RedisResult, Value};
use futures_core::Stream;
use tokio::sync::{oneshot, watch};

/// Where the subscriber connection goes.
pub(super) enum Source {
    /// Nowhere: waiters poll (pub/sub turned off, or a cluster client the store did not build).
    Off,
    /// The server the store's client connects to.
    Single(Client),
    /// A cluster, through these nodes.
    Cluster(Vec<String>),
}

/// The waiters of one store, by channel, and its subscriber connection. Shared by the store's
/// clones.
pub(super) struct Wakes {
    source: Source,
    /// The bound on connecting and on each subscription.
    timeout: Duration,
    waiting: Mutex<HashMap<String, Waiting>>,
    /// The subscriber connection; held while (un)subscribing, so those commands go in order.
    link: tokio::sync::Mutex<Link>,
    /// The number of the subscriber connection that is up, or 0. A channel subscribed on an
    /// earlier one is not subscribed any more.
    live: AtomicU64,
    /// Connections numbered so far.
    epochs: AtomicU64,
    /// Notifications received: for `Debug`.
    received: AtomicU64,
    /// Whether the store warned that its waiters cannot subscribe.
    warned: AtomicBool,
}

/// The waiters of one channel.
struct Waiting {
    entry: Arc<Entry>,
    waiters: usize,
}

struct Entry {
    /// Bumped by each notification on the channel.
    wake: watch::Sender<u64>,
    /// The connection the channel was subscribed on (0: none).
    subscribed: AtomicU64,
}

enum Link {
    Down,
    /// A `redis` pub/sub connection; its messages are read by a task that stops when `_closing`
    /// is dropped (the link replaced, or the store gone).
    Single {
        sink: PubSubSink,
        _closing: oneshot::Sender<()>,
    },
    /// A RESP3 cluster connection whose pushes reach [`Wakes::pushed`]. It reconnects to a
    /// node by itself.
    Cluster(ClusterConnection),
}

/// One caller waiting for a key: registered while it lives.
pub(super) struct Waiter {
    wakes: Arc<Wakes>,
    channel: String,
    entry: Arc<Entry>,
    wake: watch::Receiver<u64>,
}

impl Waiter {
    /// From now on, [`Waiter::woken`] waits for a notification that comes after this call.
    pub(super) fn seen(&mut self) {
        self.wake.borrow_and_update();
    }

    /// Resolves at the first notification on the channel since [`Waiter::seen`].
    pub(super) async fn woken(&mut self) {
        if self.wake.changed().await.is_err() {
            // The sender lives in `entry`, which this waiter holds: unreachable, but never spin.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.wakes.leave(&self.channel);
    }
}

impl Wakes {
    pub(super) fn new(source: Source, timeout: Duration) -> Arc<Wakes> {
        Arc::new(Wakes {
            source,
            timeout,
            waiting: Mutex::new(HashMap::new()),
            link: tokio::sync::Mutex::new(Link::Down),
            live: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            received: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// Whether waiters subscribe at all.
    pub(super) fn enabled(&self) -> bool {
        !matches!(self.source, Source::Off)
    }

    /// Notifications received so far.
    pub(super) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a caller waiting on `channel`.
    pub(super) fn join(self: &Arc<Self>, channel: String) -> Waiter {
        let entry = {
            let mut waiting = self.waiting();
            let w = waiting.entry(channel.clone()).or_insert_with(|| Waiting {
                entry: Arc::new(Entry {
                    wake: watch::channel(0).0,
                    subscribed: AtomicU64::new(0),
                }),
                waiters: 0,
            });
            w.waiters += 1;
            w.entry.clone()
        };
        let wake = entry.wake.subscribe();
        Waiter {
            wakes: self.clone(),
            channel,
            entry,
            wake,
        }
    }

    /// A waiter is gone: the last one of a channel unsubscribes it, in the background.
    fn leave(self: &Arc<Self>, channel: &str) {
        let last = {
            let mut waiting = self.waiting();
            match waiting.get_mut(channel) {
                Some(w) if w.waiters > 1 => {
                    w.waiters -= 1;
                    false
                }
                Some(_) => {
                    waiting.remove(channel);
                    true
                }
                None => false,
            }
        };
        if !last || self.live.load(Ordering::Acquire) == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let wakes = self.clone();
        let channel = channel.to_owned();
        runtime.spawn(async move {
            let bound = wakes.timeout;
            let _ = tokio::time::timeout(bound, wakes.unsubscribe(channel)).await;
        });
    }

    async fn unsubscribe(&self, channel: String) {
        let mut link = self.link.lock().await;
        // A caller that came to wait since then keeps the subscription.
        if self.waiting().contains_key(&channel) {
            return;
        }
        let result = match &mut *link {
            Link::Down => Ok(()),
            Link::Single { sink, .. } => sink.unsubscribe(&channel).await,
            Link::Cluster(conn) => conn.sunsubscribe(&channel).await,
        };
        if let Err(err) = result {
            tracing::debug!(target: "idem", error = %err, "could not unsubscribe a waiters' channel");
        }
    }

    /// Makes sure the waiter's channel is subscribed on a live subscriber connection, connecting
    /// it if need be, within `bound` and the store's timeout. Returns whether it is: if not, the
    /// waiter polls.
    pub(super) async fn listen(self: &Arc<Self>, waiter: &Waiter, bound: Duration) -> bool {
        if !self.enabled() {
            return false;
        }
        let live = self.live.load(Ordering::Acquire);
        if live != 0 && waiter.entry.subscribed.load(Ordering::Acquire) == live {
            return true;
        }
        let bound = bound.min(self.timeout);
        tokio::time::timeout(bound, self.listen_locked(waiter))
            .await
            .unwrap_or(false)
    }

    async fn listen_locked(self: &Arc<Self>, waiter: &Waiter) -> bool {
        let mut link = self.link.lock().await;
        let live = self.live.load(Ordering::Acquire);
        if live == 0 {
            return match self.connect(&mut link).await {
                Ok(epoch) => waiter.entry.subscribed.load(Ordering::Acquire) == epoch,
                Err(err) => {
                    self.cannot(&err);
                    false
                }
            };
        }
        if waiter.entry.subscribed.load(Ordering::Acquire) == live {
            return true;
        }
        let result = match &mut *link {
            Link::Down => return false,
            Link::Single { sink, .. } => sink.subscribe(&waiter.channel).await,
            Link::Cluster(conn) => conn.ssubscribe(&waiter.channel).await,
        };
        match result {
            Ok(()) => {
                waiter.entry.subscribed.store(live, Ordering::Release);
                true
            }
            Err(err) => {
                if super::is_connection_error(&err) {
                    let _ =
                        self.live
                            .compare_exchange(live, 0, Ordering::AcqRel, Ordering::Acquire);
                }
                self.cannot(&err);
                false
            }
        }
    }

    /// Connects the subscriber, subscribes every channel waited on, and wakes every waiter (a
    /// notification may have been missed while nothing listened). Returns the connection's
    /// number.
    async fn connect(self: &Arc<Self>, link: &mut Link) -> RedisResult<u64> {
        let epoch = self.epochs.fetch_add(1, Ordering::AcqRel) + 1;
        let entries: Vec<(String, Arc<Entry>)> = self
            .waiting()
            .iter()
            .map(|(channel, w)| (channel.clone(), w.entry.clone()))
            .collect();
        match &self.source {
            Source::Off => {
                return Err(RedisError::from((
                    ::redis::ErrorKind::Client,
                    "pub/sub is off",
                )));
            }
            Source::Single(client) => {
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                let (closing, closed) = oneshot::channel();
                tokio::spawn(read(Arc::downgrade(self), stream, epoch, closed));
                let channels: Vec<&str> = entries.iter().map(|(c, _)| c.as_str()).collect();
                if !channels.is_empty() {
                    sink.subscribe(&channels).await?;
                }
                *link = Link::Single {
                    sink,
                    _closing: closing,
                };
            }
            Source::Cluster(nodes) => {
                let wakes = Arc::downgrade(self);
                let client = ClusterClient::builder(nodes.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(move |push: PushInfo| {
                        if let Some(wakes) = wakes.upgrade() {
                            wakes.pushed(push);
                        }
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .build()?;
                let mut conn = client.get_async_connection().await?;
                // Channels of different slots cannot share one SSUBSCRIBE.
                for (channel, _) in &entries {
                    conn.ssubscribe(channel).await?;
                }
                *link = Link::Cluster(conn);
            }
        }
        for (_, entry) in &entries {
            entry.subscribed.store(epoch, Ordering::Release);
        }
        self.live.store(epoch, Ordering::Release);
        for (_, entry) in &entries {
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
        tracing::debug!(target: "idem", "the Redis subscriber that wakes waiters is connected");
        Ok(epoch)
    }

    /// A subscription failed: say so once (a refusal by the server: an ACL, a server without
    /// sharded pub/sub); a connection error is only a `debug` event.
    fn cannot(&self, err: &RedisError) {
        if !super::is_connection_error(err) && !self.warned.swap(true, Ordering::AcqRel) {
            let (command, subscribe) = match self.source {
                Source::Cluster(_) => ("SSUBSCRIBE", "+ssubscribe +sunsubscribe +spublish"),
                _ => ("SUBSCRIBE", "+subscribe +unsubscribe +publish"),
            };
            tracing::warn!(
                target: "idem", error = %err,
                "Redis refused {command} for the channels that wake waiters: they poll instead \
                 (every RedisStoreBuilder::max_poll_interval at most). On a cluster this needs \
                 Redis 7; with an ACL, allow {subscribe} and the channels under the prefix \
                 (&<prefix>*)"
            );
        } else {
            tracing::debug!(
                target: "idem", error = %err,
                "could not subscribe to wake waiters; they poll until the subscriber is back"
            );
        }
    }

    /// A message on `channel`: wakes its waiters.
    fn notify(&self, channel: &[u8]) {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return;
        };
        let entry = self.waiting().get(channel).map(|w| w.entry.clone());
        if let Some(entry) = entry {
            self.received.fetch_add(1, Ordering::Relaxed);
            entry.wake.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A push from the cluster subscriber: a message, or a node's connection lost (the client
    /// reconnects and subscribes again by itself, but what was published meanwhile is lost).
    fn pushed(&self, push: PushInfo) {
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    self.notify(channel);
                }
            }
            PushKind::Disconnection => {
                // Every channel is subscribed again (by the next look of its waiters), and
                // every waiter looks at its record.
                let live = self.live.load(Ordering::Acquire);
                if live != 0 {
                    let epoch = self.epochs.fetch_add(1, Ordering::AcqRel) + 1;
                    let _ = self.live.compare_exchange(
                        live,
                        epoch,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                let entries: Vec<Arc<Entry>> =
                    self.waiting().values().map(|w| w.entry.clone()).collect();
                for entry in entries {
                    entry.wake.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            _ => {}
        }
    }
}

/// Reads the messages of a single server's subscriber connection until it closes (then the
/// next waiter to look connects again) or is replaced.
async fn read(
    wakes: Weak<Wakes>,
    mut stream: PubSubStream,
    epoch: u64,
    mut closed: oneshot::Receiver<()>,
) {
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx));
        tokio::select! {
            msg = next => match msg {
                Some(msg) => match wakes.upgrade() {
                    Some(wakes) => wakes.notify(msg.get_channel_name().as_bytes()),
                    None => return,
                },
                None => break,
            },
            _ = &mut closed => return,
        }
    }
    if let Some(wakes) = wakes.upgrade() {
        let _ = wakes
            .live
            .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire);
        tracing::debug!(
            target: "idem",
            "the Redis subscriber that wakes waiters was disconnected; waiters poll until it is back"
        );
    }
}

impl std::fmt::Debug for Wakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wakes")
            .field("enabled", &self.enabled())
            .field("received", &self.received())
            .finish_non_exhaustive()
    }
}
