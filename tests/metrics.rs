//! Feature `metrics`: every outcome increments exactly one counter, and bodies, waits and store
//! operations are timed. Captured with `metrics-util`'s debugging recorder.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use idem::{Error, Idempotent, MemoryStore, OnConflict};
use metrics::{SharedString, Unit};
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::oneshot;

/// The recorder is global (installed once for this test binary, before any call).
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this test binary");
        snapshotter
    })
}

/// Everything recorded so far. The debugging recorder drains what it reports, so there is one
/// test in this binary, and it takes one snapshot.
type Recorded = Vec<(
    metrics_util::CompositeKey,
    Option<Unit>,
    Option<SharedString>,
    DebugValue,
)>;

/// `idem_calls_total` by (name, outcome), for names starting with `prefix`.
fn calls(recorded: &Recorded, prefix: &str) -> HashMap<(String, String), u64> {
    let mut out = HashMap::new();
    for (composite, _, _, value) in recorded {
        let key = composite.key();
        if composite.kind() != MetricKind::Counter || key.name() != "idem_calls_total" {
            continue;
        }
        let label = |k: &str| {
            key.labels()
                .find(|l| l.key() == k)
                .map(|l| l.value().to_owned())
        };
        let (Some(name), Some(outcome), DebugValue::Counter(n)) =
            (label("name"), label("outcome"), value)
        else {
            continue;
        };
        if name.starts_with(prefix) && *n > 0 {
            out.insert((name, outcome), *n);
        }
    }
    out
}

/// Samples recorded in a histogram, by its `label` value.
fn samples(recorded: &Recorded, metric: &str, label: &str, value: &str) -> usize {
    recorded
        .iter()
        .filter_map(|(composite, _, _, v)| {
            let key = composite.key();
            let matches = key.name() == metric
                && key.labels().any(|l| l.key() == label && l.value() == value);
            match (matches, v) {
                (true, DebugValue::Histogram(s)) => Some(s.len()),
                _ => None,
            }
        })
        .sum()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_outcome_increments_exactly_one_counter_and_operations_are_timed() {
    snapshotter();
    let store = Arc::new(MemoryStore::new());
    let s = &*store;

    // executed, then replayed
    for _ in 0..2 {
        Idempotent::new(s, 1u8)
            .name("m.replayed")
            .run(|| async { Ok::<_, Error>(1u8) })
            .await
            .unwrap();
    }
    // failed
    let _ = Idempotent::new(s, 1u8)
        .name("m.failed")
        .run(|| async { Err::<u8, _>(Error::store("no")) })
        .await;
    // panicked
    let panicking = {
        let store = store.clone();
        tokio::spawn(async move {
            Idempotent::new(&*store, 1u8)
                .name("m.panicked")
                .run(|| async {
                    if store.len() < usize::MAX {
                        panic!("boom");
                    }
                    Ok::<_, Error>(1u8)
                })
                .await
        })
    };
    assert!(panicking.await.is_err());
    // key_reused
    for fp in ["a", "b"] {
        let _ = Idempotent::new(s, 1u8)
            .name("m.key_reused")
            .fingerprint(fp)
            .run(|| async { Ok::<_, Error>(1u8) })
            .await;
    }
    // rejected, waited, cancelled: a holder on a gate
    let (open, gate) = oneshot::channel::<()>();
    let holder = Idempotent::new(s, 1u8).name("m.wait").run(|| async {
        let _ = gate.await;
        Ok::<_, Error>(1u8)
    });
    let others = async {
        tokio::task::yield_now().await;
        let _ = Idempotent::new(s, 1u8)
            .name("m.wait")
            .on_conflict(OnConflict::Reject)
            .run(|| async { Ok::<_, Error>(2u8) })
            .await;
        let cancelled = Idempotent::new(s, 1u8)
            .name("m.wait")
            .run(|| async { Ok::<_, Error>(3u8) });
        let _ = tokio::time::timeout(Duration::from_millis(5), cancelled).await;
        let waiter = Idempotent::new(s, 1u8)
            .name("m.wait")
            .run(|| async { Ok::<_, Error>(4u8) });
        let opener = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = open.send(());
        };
        tokio::join!(waiter, opener).0
    };
    let (held, waited) = tokio::join!(holder, others);
    assert_eq!((held.unwrap(), waited.unwrap()), (1, 1));

    store_operations(&store).await;
    #[cfg(feature = "http")]
    http::keyed_requests().await;
    let recorded = snapshotter().snapshot().into_vec();

    #[cfg(feature = "http")]
    {
        let responses = |status: &str, replayed: &str| {
            recorded
                .iter()
                .filter(|(composite, _, _, _)| {
                    let key = composite.key();
                    key.name() == "idem_http_responses_total"
                        && key
                            .labels()
                            .any(|l| l.key() == "status" && l.value() == status)
                        && key
                            .labels()
                            .any(|l| l.key() == "replayed" && l.value() == replayed)
                })
                .map(|(_, _, _, v)| match v {
                    DebugValue::Counter(n) => *n,
                    _ => 0,
                })
                .sum::<u64>()
        };
        assert_eq!(responses("201", "false"), 1, "the first response");
        assert_eq!(responses("201", "true"), 2, "two replays");
        assert_eq!(
            responses("422", "false"),
            1,
            "a key reused for another body"
        );
    }

    let got = calls(&recorded, "m.");
    let expected: HashMap<(String, String), u64> = [
        ("m.replayed", "executed"),
        ("m.replayed", "replayed"),
        ("m.failed", "failed"),
        ("m.panicked", "panicked"),
        ("m.key_reused", "executed"),
        ("m.key_reused", "key_reused"),
        ("m.wait", "executed"),
        ("m.wait", "rejected"),
        ("m.wait", "cancelled"),
        ("m.wait", "waited"),
        ("m.ops", "executed"),
        ("m.ops", "replayed"),
        ("m.ops", "failed"),
    ]
    .into_iter()
    .map(|(n, o)| ((n.to_owned(), o.to_owned()), 1))
    .collect();
    assert_eq!(got, expected);

    assert!(
        samples(
            &recorded,
            "idem_body_duration_seconds",
            "name",
            "m.replayed"
        ) >= 1
    );
    assert!(samples(&recorded, "idem_wait_duration_seconds", "name", "m.wait") >= 1);
    for op in ["claim", "complete", "release"] {
        assert!(
            samples(
                &recorded,
                "idem_store_operation_duration_seconds",
                "operation",
                op
            ) >= 1,
            "{op} was not timed"
        );
    }
}

/// Runs calls through a store reached through the trait (not the in-memory fast path), so each
/// operation is a store round trip the executor times.
async fn store_operations(memory: &Arc<MemoryStore>) {
    let _ = memory;
    let store: Arc<dyn idem::Store> = Arc::new(Passthrough(MemoryStore::new()));
    for _ in 0..2 {
        Idempotent::new(&store, 9u8)
            .name("m.ops")
            .run(|| async { Ok::<_, Error>(1u8) })
            .await
            .unwrap();
    }
    let _ = Idempotent::new(&store, 10u8)
        .name("m.ops")
        .run(|| async { Err::<u8, _>(Error::store("no")) })
        .await;
}

/// The in-memory store, reached only through the `Store` trait.
struct Passthrough(MemoryStore);

impl idem::Store for Passthrough {
    fn claim(
        &self,
        key: idem::Key,
        fingerprint: Option<idem::Fingerprint>,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::Claim, Error>> {
        self.0.claim(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: idem::Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: idem::store::Bytes,
        ttl: Duration,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::Completion, Error>> {
        self.0.complete(key, token, fingerprint, value, ttl)
    }
    fn renew(
        &self,
        key: idem::Key,
        token: idem::store::Token,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.renew(key, token, lease)
    }
    fn release(
        &self,
        key: idem::Key,
        token: idem::store::Token,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.release(key, token)
    }
    fn wait(
        &self,
        key: idem::Key,
        timeout: Duration,
    ) -> idem::store::BoxFuture<'_, Result<(), Error>> {
        self.0.wait(key, timeout)
    }
    fn remove(&self, key: idem::Key) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.0.remove(key)
    }
}

#[cfg(feature = "http")]
mod http {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::post;
    use idem::MemoryStore;
    use idem::http::IdempotencyLayer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One POST over a fresh connection; the response's status line.
    async fn send(addr: std::net::SocketAddr, key: &str, body: &str) -> String {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /orders HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\n\
             authorization: Bearer t\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        response.lines().next().unwrap_or_default().to_owned()
    }

    /// A first keyed request, two replays, and a key reused for another body.
    pub(super) async fn keyed_requests() {
        let app = Router::new()
            .route("/orders", post(|| async { (StatusCode::CREATED, "made") }))
            .layer(IdempotencyLayer::new(MemoryStore::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        for _ in 0..3 {
            assert!(send(addr, "k1", "a").await.contains("201"));
        }
        assert!(send(addr, "k1", "b").await.contains("422"));
        server.abort();
    }
}
