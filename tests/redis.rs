#![cfg(feature = "redis")]
//! `RedisStore` against a real `redis-server` that the harness starts (tests/support/redis.rs):
//! the conformance suite, round trips, a server restart, a hung server, garbage under the
//! prefix, several processes on the same keys, the attribute, cancellation, and the
//! `redis_orders` example.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem::{
    Bytes, Claim, Error, Idempotent, Key, OnConflict, RedisStore, Status, Store, Token, idempotent,
};
use support::redis::{CountingProxy, RedisCluster, RedisServer, Resp};

/// A prefix no other test (or run) uses.
fn fresh_prefix(test: &str) -> String {
    format!("idem-test:{test}:{}:", Token::generate().as_u128())
}

async fn store_on(url: &str, test: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(fresh_prefix(test))
        .connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

/// A store on the server shared by this test binary; one per test, because each
/// `#[tokio::test]` has its own runtime and the connection lives on it.
async fn shared_store(test: &str) -> RedisStore {
    store_on(&RedisServer::shared().url(), test).await
}

mod conformance {
    use std::sync::Arc;

    use idem::Store;

    idem::conformance_tests!(async {
        Arc::new(super::shared_store("conformance").await) as Arc<dyn Store>
    });

    /// The whole suite in one go on one store with the default prefix.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn whole_suite_with_the_default_prefix() {
        let url = super::RedisServer::shared().url();
        let store = idem::RedisStore::connect(&url).await.expect("connect");
        assert_eq!(store.prefix(), "idem:");
        idem::conformance::run_all(Arc::new(store) as Arc<dyn Store>).await;
    }
}

/// A store on the three-node cluster shared by this test binary.
async fn cluster_store(test: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(fresh_prefix(test))
        .connect_cluster(RedisCluster::shared().urls())
        .await
        .unwrap_or_else(|err| panic!("connect to the cluster: {err}"))
}

/// The same suite on a Redis Cluster: records live on the node that owns their slot.
mod cluster {
    use std::sync::Arc;

    use idem::{Error, Idempotent, Store};

    use super::{RedisCluster, Resp};

    idem::conformance_tests!(async {
        Arc::new(super::cluster_store("cluster").await) as Arc<dyn Store>
    });

    /// A script cache flushed on every node is refilled (`SCRIPT LOAD` goes to all nodes).
    #[tokio::test]
    async fn scripts_flushed_from_every_node_are_loaded_again() {
        let store = super::cluster_store("cluster-flush").await;
        for node in RedisCluster::shared().nodes() {
            assert_eq!(node.cmd(&["SCRIPT", "FLUSH"]), Resp::Simple("OK".into()));
        }
        for k in 0..10u32 {
            let v = Idempotent::new(&store, ("flushed", k))
                .name("test")
                .run(|| async move { Ok::<_, Error>(k) })
                .await
                .expect("the NOSCRIPT fallback loads the script where it is missing");
            assert_eq!(v, k);
        }
    }

    /// Records are spread over every node, and replays come back from each of them.
    #[tokio::test]
    async fn records_spread_over_every_node() {
        let store = super::cluster_store("cluster-spread").await;
        let dbsize = |node: &super::RedisServer| match node.cmd(&["DBSIZE"]) {
            Resp::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        };
        let before: Vec<i64> = RedisCluster::shared().nodes().iter().map(dbsize).collect();
        for round in 0..2 {
            for k in 0..30u32 {
                let v = Idempotent::new(&store, ("spread", k))
                    .name("test")
                    .run(|| async move { Ok::<_, Error>(k + round) })
                    .await
                    .unwrap();
                assert_eq!(v, k, "round {round} replays round 0's value");
            }
        }
        for (node, before) in RedisCluster::shared().nodes().iter().zip(before) {
            assert!(
                dbsize(node) > before,
                "node {} holds none of the 30 records",
                node.port()
            );
        }
    }
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Failed,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

#[tokio::test]
async fn replay_is_one_round_trip_and_execution_two() {
    // A server of its own: another test flushes the shared server's script cache, which would
    // add a reload to the count.
    let server = RedisServer::start();
    let proxy = CountingProxy::start(server.port());
    let store = store_on(&proxy.url(), "round_trips").await;
    let runs = AtomicUsize::new(0);
    let call = |id: u64| {
        let runs = &runs;
        Idempotent::new(&store, ("order", id))
            .name("test")
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(format!("receipt {id}"))
            })
    };

    let before = proxy.commands();
    assert_eq!(call(1).await.unwrap(), "receipt 1");
    assert_eq!(
        proxy.commands() - before,
        2,
        "a first execution is two round trips: claim, complete"
    );

    let before = proxy.commands();
    assert_eq!(call(1).await.unwrap(), "receipt 1");
    assert_eq!(proxy.commands() - before, 1, "a replay is one round trip");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A failed body: claim and release, and nothing memoized.
    let before = proxy.commands();
    let failed = Idempotent::new(&store, ("order", 2u64))
        .name("test")
        .run(|| async { Err::<u64, _>(AppError::Failed) })
        .await;
    assert!(matches!(failed, Err(AppError::Failed)));
    assert_eq!(proxy.commands() - before, 2, "claim, release");
    let before = proxy.commands();
    assert_eq!(
        Idempotent::new(&store, ("order", 2u64))
            .name("test")
            .run(|| async { Ok::<u64, AppError>(7) })
            .await
            .unwrap(),
        7
    );
    assert_eq!(proxy.commands() - before, 2);
}

#[tokio::test]
async fn scripts_flushed_from_the_server_are_loaded_again() {
    let server = RedisServer::shared();
    let store = shared_store("script_flush").await;
    assert_eq!(server.cmd(&["SCRIPT", "FLUSH"]), Resp::Simple("OK".into()));
    let value = Idempotent::new(&store, "after flush")
        .name("test")
        .run(|| async { Ok::<_, Error>(5u8) })
        .await
        .expect("a flushed script cache is refilled (NOSCRIPT fallback)");
    assert_eq!(value, 5);
    let out = Idempotent::new(&store, "after flush")
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(6u8) })
        .await
        .unwrap();
    assert_eq!((out.value, out.status), (5, Status::Replayed));
}

#[tokio::test]
async fn connecting_to_nothing_fails_promptly_with_a_store_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = RedisStore::builder()
        .timeout(Duration::from_millis(500))
        .connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let err = RedisStore::connect("not a url").await.expect_err("bad URL");
    assert!(matches!(err, Error::Store(_)), "{err:?}");
}

/// Calls while the server is down fail promptly with `Error::Store`; after it is back they
/// succeed on the same store, and records that survived (append-only file) are not executed
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run() {
    let server = RedisServer::start_persistent();
    let timeout = Duration::from_millis(500);
    let store = RedisStore::builder()
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    let runs = AtomicUsize::new(0);
    let call = |name: &'static str| {
        Idempotent::new(&store, name).name("test").run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(name.len())
        })
    };
    assert_eq!(call("before").await.unwrap(), 6);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    server.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let err = call("during").await.expect_err("the server is down");
        let took = started.elapsed();
        assert!(matches!(err, Error::Store(_)), "{err:?}");
        assert!(
            took < timeout + Duration::from_millis(500),
            "a call while the server is down must fail within the timeout, took {took:?}"
        );
        let started = Instant::now();
        let claimed = store
            .claim(Key::new("test", "during"), None, Duration::from_secs(5))
            .await;
        assert!(matches!(claimed, Err(Error::Store(_))), "{claimed:?}");
        assert!(started.elapsed() < timeout + Duration::from_millis(500));
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "no body runs without its claim"
    );

    server.restart();
    assert_eq!(
        call("before")
            .await
            .expect("the store reconnects by itself"),
        6
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a record that survived the restart is replayed, not executed again"
    );
    assert_eq!(call("during").await.unwrap(), 6);
    assert_eq!(call("after").await.unwrap(), 5);
    assert_eq!(call("during").await.unwrap(), 6);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// A server that accepts connections but does not answer (stopped with SIGSTOP) gives
/// `Error::Store` by the timeout, not a hang; once it resumes, calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_times_out() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(300);
    let store = RedisStore::builder()
        .timeout(timeout)
        .connect(&server.url())
        .await
        .unwrap();
    let pid = server.pid().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    };
    signal("-STOP");
    let started = Instant::now();
    let result = Idempotent::new(&store, "hung")
        .name("test")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await;
    let took = started.elapsed();
    signal("-CONT");
    let err = result.expect_err("the server does not answer");
    assert!(matches!(err, Error::Store(_)), "{err:?}");
    assert!(err.to_string().contains("300ms"), "{err}");
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(700),
        "{took:?}"
    );
    // The claim may have reached the server before it stopped: it is held until its lease runs
    // out. Another key works at once.
    let value = Idempotent::new(&store, "after the hang")
        .name("test")
        .run(|| async { Ok::<_, Error>(2u8) })
        .await
        .expect("the server answers again");
    assert_eq!(value, 2);
}

/// Values written by hand under the prefix are never taken for records, never overwritten or
/// deleted, and do not disturb other keys.
#[tokio::test]
async fn garbage_under_the_prefix_is_an_error_and_left_alone() {
    let server = RedisServer::shared();
    let store = shared_store("garbage").await;
    let prefix = store.prefix().to_owned();

    // Neighbours: a real record, a plain key under the prefix, a key outside it.
    let neighbour_key = Key::new("test", "neighbour");
    Idempotent::new(&store, "neighbour")
        .name("test")
        .run(|| async { Ok::<_, Error>(41u32) })
        .await
        .unwrap();
    let plain = format!("{prefix}plain");
    let outside = format!("outside:{prefix}");
    server.cmd(&["SET", &plain, "plain value"]);
    server.cmd(&["SET", &outside, "outside value"]);

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    const R: &str = "{record}";
    let cases: &[(&str, &[&[&str]])] = &[
        ("a string", &[&["SET", R, "hello"]]),
        ("a list", &[&["RPUSH", R, "a", "b"]]),
        (
            "a hash without the marker",
            &[&["HSET", R, "state", "done", "value", "1"]],
        ),
        (
            "another format version",
            &[
                &[
                    "HSET", R, "idem", "2", "state", "done", "token", TOKEN, "value", "1",
                ],
                &["PEXPIRE", R, "60000"],
            ],
        ),
        (
            "a record without expiry",
            &[&["HSET", R, "idem", "1", "state", "running", "token", TOKEN]],
        ),
        (
            "an unknown state",
            &[
                &["HSET", R, "idem", "1", "state", "weird", "token", TOKEN],
                &["PEXPIRE", R, "60000"],
            ],
        ),
        (
            "a bad token",
            &[
                &["HSET", R, "idem", "1", "state", "running", "token", "12"],
                &["PEXPIRE", R, "60000"],
            ],
        ),
        (
            "a completed record without a value",
            &[
                &["HSET", R, "idem", "1", "state", "done", "token", TOKEN],
                &["PEXPIRE", R, "60000"],
            ],
        ),
        (
            "a short fingerprint",
            &[
                &[
                    "HSET", R, "idem", "1", "state", "done", "token", TOKEN, "fp", "short",
                    "value", "1",
                ],
                &["PEXPIRE", R, "60000"],
            ],
        ),
    ];

    for (i, (what, setup)) in cases.iter().enumerate() {
        let key_value = format!("garbage {i}");
        let key = Key::new("test", key_value.as_str());
        let name = store.record_name(&key);
        assert!(name.starts_with(&prefix) && name.ends_with(&key.to_hex()));
        for cmd in *setup {
            let cmd: Vec<&str> = cmd
                .iter()
                .map(|a| if *a == R { name.as_str() } else { a })
                .collect();
            let reply = server.cmd(&cmd);
            assert!(!matches!(reply, Resp::Error(_)), "{cmd:?}: {reply:?}");
        }
        let snapshot = server.cmd(&["DUMP", &name]);
        let pttl = |server: &RedisServer| match server.cmd(&["PTTL", &name]) {
            Resp::Int(ms) => ms,
            other => panic!("PTTL: {other:?}"),
        };
        let pttl_before = pttl(server);

        let runs = AtomicUsize::new(0);
        let result = Idempotent::new(&store, key_value.as_str())
            .name("test")
            .wait_timeout(Duration::from_millis(200))
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u32)
            })
            .await;
        match result {
            Err(Error::Store(err)) => {
                let msg = err.to_string();
                assert!(
                    msg.contains(&name) && msg.contains("not an idem record"),
                    "{what}: {msg}"
                );
            }
            other => panic!("{what}: expected Error::Store, got {other:?}"),
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "{what}: the body must not run"
        );

        let token = Token::generate();
        let lease = Duration::from_secs(5);
        assert!(
            matches!(store.claim(key, None, lease).await, Err(Error::Store(_))),
            "{what}"
        );
        assert!(
            matches!(
                store
                    .complete(key, token, Bytes::from_static(b"1"), lease)
                    .await,
                Err(Error::Store(_))
            ),
            "{what}"
        );
        assert!(
            matches!(store.renew(key, token, lease).await, Err(Error::Store(_))),
            "{what}"
        );
        assert!(
            matches!(store.release(key, token).await, Err(Error::Store(_))),
            "{what}"
        );
        assert!(
            matches!(store.remove(key).await, Err(Error::Store(_))),
            "{what}"
        );
        store.release_on_drop(key, token);
        tokio::time::sleep(Duration::from_millis(50)).await;

        assert_eq!(
            server.cmd(&["DUMP", &name]),
            snapshot,
            "{what}: left untouched"
        );
        let pttl_after = pttl(server);
        assert!(
            if pttl_before < 0 {
                pttl_after == pttl_before
            } else {
                pttl_after <= pttl_before && pttl_before - pttl_after < 5_000
            },
            "{what}: the expiry changed from {pttl_before} to {pttl_after}"
        );
    }

    // A completed record whose value is not the function's type: a codec error.
    let key = Key::new("test", "not json");
    let name = store.record_name(&key);
    server.cmd(&[
        "HSET",
        &name,
        "idem",
        "1",
        "state",
        "done",
        "token",
        TOKEN,
        "value",
        "{not json",
    ]);
    server.cmd(&["PEXPIRE", &name, "60000"]);
    let result = Idempotent::new(&store, "not json")
        .name("test")
        .run(|| async { Ok::<_, Error>(1u32) })
        .await;
    assert!(matches!(result, Err(Error::Codec(_))), "{result:?}");

    // The neighbours are untouched.
    assert_eq!(
        server.cmd(&["GET", &plain]),
        Resp::Bulk(Some(b"plain value".to_vec()))
    );
    assert_eq!(
        server.cmd(&["GET", &outside]),
        Resp::Bulk(Some(b"outside value".to_vec()))
    );
    match store
        .claim(neighbour_key, None, Duration::from_secs(5))
        .await
    {
        Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"41"),
        other => panic!("the neighbouring record changed: {other:?}"),
    }
}

const CHILD_URL: &str = "IDEM_TEST_REDIS_URL";
const CHILD_RUN: &str = "IDEM_TEST_REDIS_RUN";
const CHILD_WORKER: &str = "IDEM_TEST_REDIS_WORKER";
const HAMMER_KEYS: u64 = 40;
const HAMMER_PROCESSES: usize = 4;

/// Several processes (this test binary, started again as `hammer_child`) run the same keys at
/// the same time: each key's body runs exactly once, counted by `INCR` in Redis.
#[test]
fn processes_hammering_the_same_keys_execute_each_once() {
    let server = RedisServer::shared();
    let run = Token::generate().as_u128().to_string();
    let me = std::env::current_exe().expect("the test binary");
    let children: Vec<_> = (0..HAMMER_PROCESSES)
        .map(|worker| {
            std::process::Command::new(&me)
                .args(["--exact", "hammer_child", "--nocapture", "--test-threads=1"])
                .env(CHILD_URL, server.url())
                .env(CHILD_RUN, &run)
                .env(CHILD_WORKER, worker.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a child process")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("child process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "a child failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("hammer child done"),
            "the child did not run: {stdout}"
        );
    }
    for k in 0..HAMMER_KEYS {
        assert_eq!(
            server.cmd(&["GET", &format!("hammer:{run}:{k}")]),
            Resp::Bulk(Some(b"1".to_vec())),
            "key {k} must execute exactly once across all processes"
        );
    }
}

/// The worker of the test above; does nothing unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hammer_child() {
    let (Ok(url), Ok(run), Ok(worker)) = (
        std::env::var(CHILD_URL),
        std::env::var(CHILD_RUN),
        std::env::var(CHILD_WORKER),
    ) else {
        return;
    };
    let worker: u64 = worker.parse().unwrap();
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    let store = Arc::new(
        RedisStore::builder()
            .prefix(format!("hammer:{run}:idem:"))
            .connect(&url)
            .await
            .unwrap(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..HAMMER_KEYS {
        // Each process walks the keys from another starting point, some of them backwards.
        let k = if worker.is_multiple_of(2) {
            (i + worker * 7) % HAMMER_KEYS
        } else {
            (HAMMER_KEYS - 1 - i + worker * 7) % HAMMER_KEYS
        };
        let store = store.clone();
        let run = run.clone();
        tasks.spawn(async move {
            Idempotent::new(&*store, ("hammer", k))
                .name("test")
                .on_conflict(OnConflict::Wait)
                .run(|| async move {
                    let counter = format!("hammer:{run}:{k}");
                    tokio::task::spawn_blocking(move || {
                        let server = RawRedis(port);
                        server.incr(&counter);
                    })
                    .await
                    .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, Error>(k * 10)
                })
                .await
                .map(|v| (k, v))
        });
    }
    let mut seen = 0;
    while let Some(joined) = tasks.join_next().await {
        let (k, v) = joined.unwrap().unwrap();
        assert_eq!(v, k * 10);
        seen += 1;
    }
    assert_eq!(seen, HAMMER_KEYS);
    println!("hammer child done");
}

/// A bare connection for the child processes (they have no harness of their own).
struct RawRedis(u16);

impl RawRedis {
    fn incr(&self, key: &str) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.0)).unwrap();
        let cmd = format!("*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len());
        stream.write_all(cmd.as_bytes()).unwrap();
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).unwrap();
        assert!(reply[..n].starts_with(b":"), "INCR: {:?}", &reply[..n]);
    }
}

struct Billing {
    store: RedisStore,
    runs: AtomicUsize,
}

impl Billing {
    #[idempotent(store = self.store, key = order, name = "tests.redis.billing.charge")]
    async fn charge(&self, order: u64) -> Result<u64, AppError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(order * 100)
    }
}

#[idempotent(store = store, key = order, name = "tests.redis.refund", on_conflict = reject)]
async fn refund(store: &Arc<dyn Store>, order: u64, runs: &AtomicUsize) -> Result<u64, AppError> {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attribute_runs_on_a_redis_store() {
    let billing = Billing {
        store: shared_store("attribute").await,
        runs: AtomicUsize::new(0),
    };
    // Concurrent duplicates: one runs, the other waits for its result through Redis.
    let (a, b) = tokio::join!(billing.charge(7), billing.charge(7));
    assert_eq!((a.unwrap(), b.unwrap()), (700, 700));
    assert_eq!(billing.charge(7).await.unwrap(), 700);
    assert_eq!(billing.runs.load(Ordering::SeqCst), 1);

    let store: Arc<dyn Store> = Arc::new(shared_store("attribute-dyn").await);
    let runs = AtomicUsize::new(0);
    let (a, b) = tokio::join!(refund(&store, 3, &runs), async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        refund(&store, 3, &runs).await
    });
    assert_eq!(a.unwrap(), 3);
    assert!(
        matches!(b, Err(AppError::Idem(Error::InProgress { .. }))),
        "{b:?}"
    );
    assert_eq!(refund(&store, 3, &runs).await.unwrap(), 3);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A call whose future is dropped mid-body frees its key at once (release_on_drop spawns the
/// release), not when its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_releases_its_claim_at_once() {
    let store = shared_store("cancel").await;
    let lease = Duration::from_secs(30);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        Idempotent::new(&store, "cancelled")
            .name("test")
            .lease(lease)
            .run(|| async {
                std::future::pending::<()>().await;
                Ok::<_, Error>(0u8)
            }),
    )
    .await;
    assert!(cancelled.is_err(), "the call was cancelled");
    let started = Instant::now();
    loop {
        match store
            .claim(Key::new("test", "cancelled"), None, lease)
            .await
        {
            Ok(Claim::Acquired(_)) => break,
            Ok(Claim::Busy { .. }) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("the cancelled call's claim was not released: {other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// `release_on_drop` outside any runtime does nothing, and does not panic.
#[test]
fn release_on_drop_outside_a_runtime_does_not_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(shared_store("no_runtime"));
    let key = Key::new("", "no runtime");
    let token = match runtime.block_on(store.claim(key, None, Duration::from_secs(30))) {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    store.release_on_drop(key, token);
    drop(runtime);
    store.release_on_drop(key, token);
    drop(store);
}

/// The `redis_orders` example against the harness server: two worker processes, each order
/// charged once.
#[test]
fn redis_orders_example_charges_each_order_once() {
    let server = RedisServer::shared();
    // `cargo test` builds the examples next to the test binaries' folder.
    let exe = std::env::current_exe().expect("the test binary has a path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target folder")
        .join("examples")
        .join("redis_orders");
    let out = std::process::Command::new(&example)
        .env("IDEM_REDIS_URL", server.url())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (a plain `cargo test --all-features` builds the examples; with `--test redis` alone, run `cargo build --examples --features redis` first)",
                example.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every order was charged exactly once"),
        "{stdout}"
    );
    for order in [1002, 1003] {
        assert!(
            stdout.contains(&format!(
                "order {order}: delivered to A and B, executed 1 time(s)"
            )),
            "{stdout}"
        );
    }
}
