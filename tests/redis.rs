#![cfg(feature = "redis")]
//! `RedisStore` against a real `redis-server` that the harness starts (tests/support/redis.rs):
//! the conformance suite on a server and on a cluster, round trips, a server restart, a hung
//! server, garbage under the prefix, several processes on the same keys, the attribute,
//! cancellation at each point of a call, waiting on a slow server, the server settings checked
//! at connect and what happens at `maxmemory` (issue 19), a cluster resharded and failed over
//! under load (issue 21), and the `redis_orders` example.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem::store::{Bytes, Claim, Token};
use idem::{Error, Idempotent, Key, OnConflict, RedisStore, Status, Store, idempotent};
use support::redis::{CountingProxy, RedisCluster, RedisServer, Resp};

/// A prefix no other test (or run) uses.
fn fresh_prefix(test: &str) -> String {
    format!("idem-test:{test}:{}:", Token::generate().as_u128())
}

async fn store_on(url: &str, test: &str) -> RedisStore {
    store_on_prefix(url, &fresh_prefix(test)).await
}

async fn store_on_prefix(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(prefix)
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

    /// Review finding 9: `connect` (one server) pointed at a cluster node used to connect, and
    /// then the keys whose slots other nodes own failed with `MOVED` while the others worked.
    /// It fails at once, saying to use `connect_cluster`; and `connect_cluster` to the same
    /// node works for every key.
    #[tokio::test]
    async fn a_cluster_node_given_to_connect_is_refused_with_the_way_to_connect() {
        let url = RedisCluster::shared().urls()[0].clone();
        let err = match idem::RedisStore::builder()
            .prefix(super::fresh_prefix("cluster-as-one"))
            .connect(&url)
            .await
        {
            Ok(_) => panic!("connect() to a cluster node must fail"),
            Err(err) => err,
        };
        let message = err.to_string();
        assert!(matches!(err, Error::Store(_)), "{err:?}");
        for part in ["cluster_enabled:1", "connect_cluster", "MOVED"] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let store = idem::RedisStore::builder()
            .prefix(super::fresh_prefix("cluster-as-cluster"))
            .connect_cluster([url])
            .await
            .expect("connect_cluster to the same node");
        for k in 0..20u32 {
            let v = Idempotent::new(&store, ("any node", k))
                .name("test")
                .run(|| async move { Ok::<_, Error>(k) })
                .await
                .expect("every key works through the cluster connection");
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

/// A completed record the store has seen is replayed with one `HMGET`, no script; a hint gone
/// stale (the record removed, or completed anew by another claim, or overwritten by something
/// else) is found out by that read, and the call claims as it would have: it never replays a
/// value the record no longer holds, and a fingerprint is still checked.
#[tokio::test]
async fn a_known_record_replays_without_a_script_and_a_stale_hint_falls_back() {
    let server = RedisServer::start();
    let proxy = CountingProxy::start(server.port());
    let prefix = fresh_prefix("known");
    let store = store_on_prefix(&proxy.url(), &prefix).await;
    // Another process on the same records.
    let other = store_on_prefix(&server.url(), &prefix).await;
    let calls = |command: &str| {
        let info = server.info("commandstats");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let call = |store: &RedisStore, value: u32| {
        let store = store.clone();
        async move {
            Idempotent::new(&store, "known")
                .name("test")
                .run_with_outcome(move || async move { Ok::<_, Error>(value) })
                .await
                .map(|out| (out.value, out.status))
        }
    };

    assert_eq!(call(&store, 1).await.unwrap(), (1, Status::Executed));
    let (before, scripts) = (proxy.commands(), calls("evalsha"));
    let out = Idempotent::new(&store, "known")
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(9u32) })
        .await
        .unwrap();
    assert_eq!((out.value, out.status), (1, Status::Replayed));
    let left = out
        .expires_in
        .expect("a replay says when the record expires");
    assert!(
        left > idem::DEFAULT_TTL - Duration::from_secs(60) && left <= idem::DEFAULT_TTL,
        "{left:?}"
    );
    assert_eq!(proxy.commands() - before, 1, "one round trip");
    assert_eq!(calls("evalsha"), scripts, "no script for a known record");

    // Removed by another process: the read finds nothing, and the body runs again.
    let key = Key::new("test", &"known");
    assert!(other.remove(key).await.unwrap());
    let before = proxy.commands();
    assert_eq!(call(&store, 2).await.unwrap(), (2, Status::Executed));
    assert_eq!(
        proxy.commands() - before,
        3,
        "the read that missed, then claim and complete"
    );
    assert_eq!(call(&store, 9).await.unwrap(), (2, Status::Replayed));

    // Completed anew by another claim (another token): its value, not the one seen before.
    assert!(other.remove(key).await.unwrap());
    assert_eq!(call(&other, 3).await.unwrap(), (3, Status::Executed));
    assert_eq!(call(&store, 9).await.unwrap(), (3, Status::Replayed));
    assert_eq!(call(&store, 9).await.unwrap(), (3, Status::Replayed));

    // The fingerprint read without the script is checked as the script's is.
    let with_fp = |fp: &'static str| {
        let store = store.clone();
        async move {
            Idempotent::new(&store, "with a fingerprint")
                .name("test")
                .fingerprint(fp)
                .run_with_outcome(|| async { Ok::<_, Error>(4u32) })
                .await
                .map(|out| (out.value, out.status))
        }
    };
    assert_eq!(with_fp("request").await.unwrap(), (4, Status::Executed));
    let scripts = calls("evalsha");
    assert_eq!(with_fp("request").await.unwrap(), (4, Status::Replayed));
    let reused = with_fp("another request").await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(calls("evalsha"), scripts, "both read without a script");

    // Overwritten by another program: reported as such, and left untouched.
    let name = store.record_name(&key);
    assert_eq!(
        server.cmd(&["SET", &name, "not ours"]),
        Resp::Simple("OK".into())
    );
    match call(&store, 9).await {
        Err(Error::Store(err)) => assert!(err.to_string().contains("not an idem record"), "{err}"),
        other => panic!("expected a store error, got {other:?}"),
    }
    assert_eq!(
        server.cmd(&["GET", &name]),
        Resp::Bulk(Some(b"not ours".to_vec()))
    );
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
                // Who wrote it: not idem; the prefix is shared with another program.
                assert!(
                    msg.contains("another program") && msg.contains(&format!("{prefix:?}")),
                    "{what}: {msg}"
                );
                let kind = match *what {
                    "a string" => "holds a string (not a hash)",
                    "a list" => "holds a list (not a hash)",
                    _ => "holds a",
                };
                assert!(msg.contains(kind), "{what}: {msg}");
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
                    .complete(key, token, None, Bytes::from_static(b"1"), lease)
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
        Ok(Claim::Completed(done)) => {
            assert_eq!(idem::codec::from_slice::<u64>(&done.value).ok(), Some(41));
        }
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

/// `release_on_drop` (and `release_on_drop_after_steps`) outside any runtime does nothing, and
/// does not panic.
#[test]
fn release_on_drop_outside_a_runtime_does_not_panic() {
    const LEASE: Duration = Duration::from_secs(30);
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
    store.release_on_drop_after_steps(key, token, vec![("charge".into(), Bytes::new())], LEASE);
    drop(store);
}

/// The `redis_orders` example against the harness server: two worker processes, each order
/// charged once.
#[test]
fn redis_orders_example_charges_each_order_once() {
    let url = RedisServer::shared().url();
    let stdout = support::run_example("redis_orders", &[("IDEM_REDIS_URL", &url)]);
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

/// Every check of the conformance suite runs on one server and on the cluster: the suite's
/// list of checks is compared with the tests this binary has, so a check added to
/// `conformance::CHECKS` and missing from `conformance_tests!` fails here.
#[test]
fn every_conformance_check_runs_on_a_server_and_on_the_cluster() {
    let me = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(me)
        .args(["--list", "--format", "terse"])
        .output()
        .expect("list this binary's tests");
    let listed = String::from_utf8_lossy(&out.stdout);
    let tests: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    for check in idem::conformance::CHECKS {
        for module in ["conformance", "cluster"] {
            let name = format!("{module}::{check}");
            assert!(
                tests.contains(&name.as_str()),
                "{name} is not a test of this binary:\n{listed}"
            );
        }
    }
}

/// Issue 19: the server settings at-most-once relies on are checked when the store connects,
/// and again after a reconnection; what happens at `maxmemory`.
mod settings {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use idem::store::redis::IfUnsafe;
    use idem::{Error, Idempotent, Key, RedisStore, Status, Store};

    use super::support::LogCapture;
    use super::{RedisServer, Resp, fresh_prefix};

    fn store_error(result: Result<RedisStore, Error>) -> String {
        match result {
            Err(Error::Store(err)) => err.to_string(),
            Err(other) => panic!("expected Error::Store, got {other:?}"),
            Ok(_) => panic!("expected the connection to be refused"),
        }
    }

    fn info_stat(server: &RedisServer, field: &str) -> u64 {
        server
            .info("stats")
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("INFO stats has no {field}"))
    }

    /// Every idem record has a ttl, so a `volatile-*` policy evicts them as an `allkeys-*` one
    /// does: both are refused by default, with the setting and the fix in the message; told to,
    /// the store connects, with one warning or none.
    #[tokio::test]
    async fn an_evicting_policy_is_refused_at_connect_unless_accepted() {
        let logs = LogCapture::install();
        let server = RedisServer::start_configured(
            true,
            &["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"],
        );
        let url = server.url();
        let refused = store_error(RedisStore::connect(&url).await);
        for part in [
            "maxmemory-policy allkeys-lru",
            "noeviction",
            &format!("127.0.0.1:{}", server.port()),
            "if_evicting",
        ] {
            assert!(refused.contains(part), "{part}: {refused}");
        }
        server.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
        let refused = store_error(RedisStore::connect(&url).await);
        assert!(refused.contains("volatile-lru"), "{refused}");
        assert!(
            !logs.contains("WARN"),
            "a refusal is an error, not a warning: {}",
            logs.text()
        );

        let warned = RedisStore::builder()
            .prefix(fresh_prefix("evicting-warn"))
            .if_evicting(IfUnsafe::Warn)
            .connect(&url)
            .await
            .expect("told to warn, the store connects");
        let v = Idempotent::new(&warned, "k")
            .name("test")
            .run(|| async { Ok::<_, Error>(1u8) })
            .await
            .expect("and runs");
        assert_eq!(v, 1);
        let text = logs.text();
        assert_eq!(
            text.matches("maxmemory-policy volatile-lru").count(),
            1,
            "one warning: {text}"
        );

        let logs = LogCapture::install();
        RedisStore::builder()
            .if_evicting(IfUnsafe::Accept)
            .connect(&url)
            .await
            .expect("accepted, the store connects");
        assert!(!logs.contains("WARN"), "accepted silently: {}", logs.text());
        // allkeys-lru and volatile-lru refused, warned, accepted.
        crate::support::chaos::report("settings_redis_eviction", &[("configurations", 4)]);
    }

    /// A server without an append-only file is warned about once (not again when the store
    /// reconnects to it), and refused when the builder says so; a persistent one is not.
    #[tokio::test]
    async fn missing_persistence_is_warned_about_once_or_refused() {
        let logs = LogCapture::install();
        let server = RedisServer::start();
        let store = RedisStore::builder()
            .prefix(fresh_prefix("no-aof"))
            .connect(&server.url())
            .await
            .expect("only a warning by default");
        // A reconnection (the server drops every client) reads the settings again.
        assert!(matches!(
            server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]),
            Resp::Int(n) if n >= 1
        ));
        for i in 0..3u8 {
            let v = Idempotent::new(&store, i)
                .name("test")
                .run(|| async move { Ok::<_, Error>(i) })
                .await
                .expect("the store reconnects");
            assert_eq!(v, i);
        }
        let text = logs.text();
        assert_eq!(
            text.matches("persists nothing").count(),
            1,
            "warned once: {text}"
        );
        assert!(text.contains("appendonly yes"), "{text}");

        let refused = store_error(
            RedisStore::builder()
                .if_not_persistent(IfUnsafe::Refuse)
                .connect(&server.url())
                .await,
        );
        assert!(
            refused.contains("appendonly") && refused.contains("if_not_persistent"),
            "{refused}"
        );

        let logs = LogCapture::install();
        let persistent = RedisServer::start_persistent();
        RedisStore::builder()
            .if_not_persistent(IfUnsafe::Refuse)
            .connect(&persistent.url())
            .await
            .expect("appendonly yes is persistence");
        assert!(!logs.contains("WARN"), "{}", logs.text());
        crate::support::chaos::report("settings_redis_persistence", &[("configurations", 3)]);
    }

    /// Managed services rename `CONFIG` away or do not permit it: the store says once that it
    /// could not check, and goes on (it cannot tell an evicting policy it cannot read).
    #[tokio::test]
    async fn settings_that_cannot_be_read_are_a_warning_not_a_refusal() {
        let logs = LogCapture::install();
        let server = RedisServer::start_configured(
            false,
            &[
                "--maxmemory-policy",
                "allkeys-lru",
                "--rename-command",
                "CONFIG",
                "",
            ],
        );
        assert!(matches!(
            server.cmd(&["CONFIG", "GET", "maxmemory-policy"]),
            Resp::Error(_)
        ));
        let store = RedisStore::builder()
            .prefix(fresh_prefix("no-config"))
            .connect(&server.url())
            .await
            .expect("settings it cannot read do not stop the store");
        let v = Idempotent::new(&store, "k")
            .name("test")
            .run(|| async { Ok::<_, Error>(7u8) })
            .await
            .unwrap();
        assert_eq!(v, 7);
        let text = logs.text();
        assert_eq!(
            text.matches("could not read the settings").count(),
            1,
            "{text}"
        );
        assert!(text.contains("CONFIG GET"), "{text}");
        crate::support::chaos::report("settings_redis_unreadable", &[("configurations", 1)]);
    }

    /// A server whose policy becomes evicting is noticed at the next reconnection, before the
    /// next claim: new claims are refused with the setting and the fix; a claim granted before
    /// is still completed (abandoning it would be worse); once the setting is fixed, claims work
    /// again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_setting_changed_under_the_store_is_found_before_the_next_claim() {
        let server = RedisServer::start_persistent();
        let store = RedisStore::builder()
            .prefix(fresh_prefix("changed"))
            .connect(&server.url())
            .await
            .unwrap();
        let granted = Key::new("test", "granted before");
        let token = match store.claim(granted, None, idem::DEFAULT_LEASE).await {
            Ok(idem::store::Claim::Acquired(token)) => token,
            other => panic!("{other:?}"),
        };

        server.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lfu"]);
        server.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let call = |k: &'static str| {
            Idempotent::new(&store, k).name("test").run(|| async {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, Error>(k.len())
            })
        };
        match call("after the change").await {
            Err(Error::Store(err)) => {
                let msg = err.to_string();
                assert!(
                    msg.contains("maxmemory-policy allkeys-lfu") && msg.contains("noeviction"),
                    "{msg}"
                );
            }
            other => panic!("a claim on an evicting server must be refused: {other:?}"),
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(
            store
                .complete(
                    granted,
                    token,
                    None,
                    idem::store::Bytes::from_static(b"1"),
                    idem::DEFAULT_TTL
                )
                .await
                .ok(),
            Some(idem::store::Completion::Stored),
            "a claim granted before is completed, not abandoned"
        );

        server.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
        let started = std::time::Instant::now();
        loop {
            match call("after the fix").await {
                Ok(v) => {
                    assert_eq!(v, "after the fix".len());
                    break;
                }
                Err(Error::Store(err))
                    if started.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    assert!(err.to_string().contains("maxmemory-policy"), "{err}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(err) => panic!("claims must work again once the setting is fixed: {err}"),
            }
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        crate::support::chaos::report("settings_redis_changed", &[("configurations", 1)]);
    }

    /// Runs `n` calls with 1 KB results on fresh keys `from..from + n`, 16 at a time; returns
    /// the keys that were executed and stored, and the errors.
    async fn fill(
        store: &RedisStore,
        from: u32,
        n: u32,
        runs: &Arc<Mutex<HashMap<u32, u32>>>,
    ) -> (Vec<u32>, Vec<Error>) {
        let mut stored = Vec::new();
        let mut errors = Vec::new();
        let mut next = from;
        while next < from + n {
            let mut tasks = tokio::task::JoinSet::new();
            for k in next..(next + 16).min(from + n) {
                let (store, runs) = (store.clone(), runs.clone());
                tasks.spawn(async move {
                    let out = Idempotent::new(&store, ("fill", k))
                        .name("test")
                        .run_with_outcome(|| async {
                            *runs.lock().unwrap().entry(k).or_default() += 1;
                            Ok::<_, Error>(format!("{k:01024}"))
                        })
                        .await;
                    (k, out)
                });
            }
            next = (next + 16).min(from + n);
            while let Some(joined) = tasks.join_next().await {
                match joined.expect("a call task") {
                    (k, Ok(out)) if out.expires_in.is_some() => stored.push(k),
                    (k, Ok(out)) => panic!("key {k}: executed but not stored: {out:?}"),
                    (_, Err(err)) => errors.push(err),
                }
            }
        }
        (stored, errors)
    }

    /// `noeviction` at `maxmemory`: a new claim fails with `Error::Store` saying so and its body
    /// does not run; no record is lost; every stored record is still replayed (one round trip,
    /// nothing written); claims granted before the limit still complete (their bodies ran),
    /// renew and release.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_maxmemory_with_noeviction_no_record_is_lost_and_replays_work() {
        let server = RedisServer::start_configured(
            false,
            &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
        );
        let store = RedisStore::builder()
            .prefix(fresh_prefix("oom"))
            .if_not_persistent(IfUnsafe::Accept)
            .connect(&server.url())
            .await
            .unwrap();
        let runs = Arc::new(Mutex::new(HashMap::new()));
        // Claims granted before the limit, to be settled after it.
        let mut granted = Vec::new();
        for i in 0..3u32 {
            let key = Key::new("test", &("granted", i));
            match store.claim(key, None, idem::DEFAULT_LEASE).await {
                Ok(idem::store::Claim::Acquired(token)) => granted.push((key, token)),
                other => panic!("{other:?}"),
            }
        }

        let mut stored = Vec::new();
        let mut refused = Vec::new();
        let mut from = 0;
        while refused.len() < 16 {
            assert!(from < 20_000, "4 MB never filled up");
            let (s, e) = fill(&store, from, 512, &runs).await;
            stored.extend(s);
            refused.extend(e);
            from += 512;
        }
        for err in &refused {
            let msg = err.to_string();
            assert!(
                matches!(err, Error::Store(_)) && msg.contains("maxmemory"),
                "a claim at maxmemory fails with Error::Store saying why: {msg}"
            );
        }
        assert_eq!(info_stat(&server, "evicted_keys"), 0);

        // Claims granted before the limit: their bodies ran, so they are completed even now.
        let (done, renewed, released) = (&granted[0], &granted[1], &granted[2]);
        let value = idem::store::Bytes::from(vec![b'7'; 1024]);
        assert_eq!(
            store
                .complete(done.0, done.1, None, value.clone(), idem::DEFAULT_TTL)
                .await
                .ok(),
            Some(idem::store::Completion::Stored),
            "a completion at maxmemory is stored"
        );
        assert_eq!(
            store
                .renew(renewed.0, renewed.1, idem::DEFAULT_LEASE)
                .await
                .ok(),
            Some(true)
        );
        assert_eq!(store.release(released.0, released.1).await.ok(), Some(true));
        match store.claim(done.0, None, idem::DEFAULT_LEASE).await {
            Ok(idem::store::Claim::Completed(c)) => assert_eq!(c.value, value),
            other => panic!("the completion made at maxmemory must replay: {other:?}"),
        }

        // Every stored record replays, and no body ran twice.
        for &k in &stored {
            let out = Idempotent::new(&store, ("fill", k))
                .name("test")
                .run_with_outcome(|| async { Ok::<_, Error>(String::new()) })
                .await
                .unwrap_or_else(|err| panic!("key {k} must replay at maxmemory: {err}"));
            assert_eq!(out.status, Status::Replayed, "key {k}");
            assert_eq!(out.value, format!("{k:01024}"));
        }
        let runs = runs.lock().unwrap();
        assert!(runs.values().all(|&n| n == 1), "a body ran twice");
        assert_eq!(
            runs.len(),
            stored.len(),
            "a refused claim never ran its body"
        );
        assert_eq!(
            info_stat(&server, "evicted_keys"),
            0,
            "noeviction evicts nothing"
        );
        println!(
            "noeviction at 4 MB: {} records stored and replayed, {} claims refused",
            stored.len(),
            refused.len()
        );
        crate::support::chaos::report("settings_redis_maxmemory", &[("configurations", 1)]);
    }

    /// Issue 19's report, with the refusal turned off: `allkeys-lru` at `maxmemory 4mb`, no
    /// persistence; one key completed, then other keys with 1 KB results until Redis has
    /// evicted the first record: its retry runs the body again. This is why an evicting policy
    /// is refused by default.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_evicting_policy_runs_bodies_again_which_is_why_it_is_refused() {
        let server = RedisServer::start_configured(
            false,
            &["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"],
        );
        let store = RedisStore::builder()
            .prefix(fresh_prefix("evicted"))
            .if_evicting(IfUnsafe::Accept)
            .if_not_persistent(IfUnsafe::Accept)
            .connect(&server.url())
            .await
            .expect("the refusal is turned off");
        let runs = Arc::new(Mutex::new(HashMap::new()));
        let first = || {
            let runs = runs.clone();
            Idempotent::new(&store, ("fill", u32::MAX))
                .name("test")
                .run_with_outcome(move || async move {
                    *runs.lock().unwrap().entry(u32::MAX).or_default() += 1;
                    Ok::<_, Error>("the first result".to_owned())
                })
        };
        assert_eq!(first().await.unwrap().status, Status::Executed);
        let first_record = store.record_name(&Key::new("test", &("fill", u32::MAX)));

        let mut written = 0;
        while server.cmd(&["EXISTS", &first_record]) == Resp::Int(1) {
            assert!(
                written < 20_000,
                "20,000 records and the first was never evicted"
            );
            let (stored, errors) = fill(&store, written, 500, &runs).await;
            assert!(errors.is_empty(), "{errors:?}");
            written += 500;
            assert_eq!(stored.len(), 500);
        }
        let evicted = info_stat(&server, "evicted_keys");
        assert!(evicted > 0);

        let again = first().await.unwrap();
        assert_eq!(
            again.status,
            Status::Executed,
            "the evicted record is gone: the retry runs the body"
        );
        assert_eq!(
            runs.lock().unwrap()[&u32::MAX],
            2,
            "the body of the first key ran twice"
        );
        println!(
            "allkeys-lru at 4 MB: {written} records written after the first, {evicted} evicted, \
             the first key's body ran twice"
        );
    }
}

/// Issue 21: a Redis Cluster that changes under the store. Records hashed to one slot (a hash
/// tag in the prefix) while a fourth master joins and the slot migrates to it (`ASK`
/// redirections while it is half-way, then `MOVED`), and then while a replica of that master
/// is promoted (`CLUSTER FAILOVER`).
mod resharding {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use idem::store::Token;
    use idem::{Error, Idempotent, RedisStore, Status};

    use super::RedisCluster;

    /// What every call did: each key's body runs once, and a key is replayed only once done.
    #[derive(Default)]
    struct Ledger {
        runs: Mutex<HashMap<u64, u32>>,
        done: Mutex<HashSet<u64>>,
        calls: Mutex<u64>,
    }

    impl Ledger {
        fn done(&self) -> Vec<u64> {
            let mut done: Vec<u64> = self.done.lock().unwrap().iter().copied().collect();
            done.sort_unstable();
            done
        }
    }

    async fn call(store: &RedisStore, ledger: &Ledger, k: u64) -> Result<(), String> {
        let out = Idempotent::new(store, ("reshard", k))
            .name("test")
            .run_with_outcome(|| async {
                *ledger.runs.lock().unwrap().entry(k).or_default() += 1;
                Ok::<_, Error>(k * 3)
            })
            .await
            .map_err(|err| format!("key {k}: {err}"))?;
        *ledger.calls.lock().unwrap() += 1;
        if out.value != k * 3 {
            return Err(format!("key {k}: got {}", out.value));
        }
        match out.status {
            Status::Executed => {
                ledger.done.lock().unwrap().insert(k);
            }
            Status::Replayed | Status::Waited => {
                if !ledger.done.lock().unwrap().contains(&k) {
                    return Err(format!("key {k} replayed before it was executed"));
                }
            }
            other => return Err(format!("key {k}: {other:?}")),
        }
        Ok(())
    }

    /// New keys `fresh`, then a replay of every key done so far: each must succeed.
    async fn phase(store: &RedisStore, ledger: &Ledger, what: &str, fresh: std::ops::Range<u64>) {
        for k in fresh {
            if let Err(err) = call(store, ledger, k).await {
                panic!("{what}: a new key failed: {err}");
            }
        }
        for k in ledger.done() {
            if let Err(err) = call(store, ledger, k).await {
                panic!("{what}: a replay failed: {err}");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_moving_to_a_new_master_and_a_failover_lose_no_call() {
        let mut cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
        let prefix = format!("{{idem-{}}}:", Token::generate().as_u128());
        let connect = || {
            RedisStore::builder()
                .prefix(prefix.clone())
                .timeout(Duration::from_secs(5))
                .connect_cluster(cluster.urls())
        };

        // Every master's settings are checked, not only the one the client reached first.
        let odd = &cluster.nodes()[2];
        odd.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-ttl"]);
        match connect().await {
            Err(Error::Store(err)) => {
                let msg = err.to_string();
                assert!(
                    msg.contains("volatile-ttl") && msg.contains(&odd.port().to_string()),
                    "{msg}"
                );
            }
            other => panic!(
                "an evicting master must be refused: {:?}",
                other.map(|_| ())
            ),
        }
        odd.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);

        let store = connect().await.expect("connect to the cluster");
        let ledger = Arc::new(Ledger::default());
        let slot = cluster.slot_of(&prefix);
        let owner = cluster.owner_of(slot);
        phase(&store, &ledger, "before", 0..20).await;

        // Calls all along, on new keys and old ones, while the cluster changes.
        let stop = Arc::new(AtomicBool::new(false));
        let driver = {
            let (store, ledger, stop) = (store.clone(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut k = 1_000_000u64;
                while !stop.load(Ordering::SeqCst) {
                    if let Err(err) = call(&store, &ledger, k).await {
                        errors.push(err);
                    }
                    if let Err(err) = call(&store, &ledger, k % 20).await {
                        errors.push(err);
                    }
                    k += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                errors
            })
        };

        // A fourth master joins after the store connected; the slot starts moving to it.
        let joined = tokio::task::block_in_place(|| cluster.add_node());
        tokio::task::block_in_place(|| cluster.begin_migration(slot, owner, joined));
        phase(&store, &ledger, "migrating", 100..120).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        phase(&store, &ledger, "still migrating", 120..140).await;

        // Half-way: some records already moved, others not yet.
        let moved = tokio::task::block_in_place(|| cluster.migrate_keys(slot, owner, joined, 15));
        assert!(moved > 0);
        phase(&store, &ledger, "half moved", 200..220).await;

        tokio::task::block_in_place(|| cluster.finish_migration(slot, owner, joined));
        phase(&store, &ledger, "moved", 300..320).await;

        // A replica of the new master is promoted: it never ran a script of ours.
        let replica = tokio::task::block_in_place(|| cluster.add_node());
        tokio::task::block_in_place(|| cluster.replicate(replica, joined));
        phase(&store, &ledger, "replicated", 400..420).await;
        tokio::task::block_in_place(|| cluster.failover(replica));
        assert_eq!(
            tokio::task::block_in_place(|| cluster.owner_of(slot)),
            replica
        );
        phase(&store, &ledger, "failed over", 500..520).await;

        stop.store(true, Ordering::SeqCst);
        let errors = driver.await.expect("the driver");
        assert!(
            errors.is_empty(),
            "calls failed while the cluster changed: {errors:?}"
        );
        let runs = ledger.runs.lock().unwrap();
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "bodies ran more than once: {twice:?}");
        assert_eq!(
            runs.len(),
            ledger.done.lock().unwrap().len(),
            "no claim was lost"
        );
        println!(
            "resharding: {} calls, {} keys executed once each",
            ledger.calls.lock().unwrap(),
            runs.len()
        );
        let calls = *ledger.calls.lock().unwrap();
        drop(runs);
        crate::support::chaos::report(
            "topology_redis_resharding",
            &[("calls", calls), ("wrong_answers", 0)],
        );
    }
}

/// Issue 13: at most once under cancellation, against a real server. A call cancelled while its
/// claim is on its way, or while its body runs, gives its key back; a call cancelled after its
/// body returned `Ok` never does, and its result is stored.
mod cancellation {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use idem::{Error, Idempotent, OnConflict, RedisStore, Status};

    use super::{RedisServer, fresh_prefix, store_on};

    /// Stops serving writes (every script) for `ms` milliseconds; reads are still served.
    fn pause_writes(server: &RedisServer, ms: u64) {
        let reply = server.cmd(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"]);
        assert_eq!(reply, super::Resp::Simple("OK".into()), "CLIENT PAUSE");
    }

    /// The body returned `Ok` and the server holds its completion (writes paused); the caller's
    /// timeout fires then. The claim is not released: the retry waits and replays, the body ran
    /// once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_cancelled_while_its_result_is_stored_is_replayed_not_run_again() {
        let server = Arc::new(RedisServer::start());
        let store = store_on(&server.url(), "cancel-complete").await;
        let runs = AtomicUsize::new(0);
        let returned = tokio::sync::Notify::new();
        let call = Idempotent::new(&store, "paid").name("test").run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            let server = server.clone();
            tokio::task::spawn_blocking(move || pause_writes(&server, 1000))
                .await
                .unwrap();
            returned.notify_one();
            Ok::<_, Error>(42u32)
        });
        tokio::select! {
            result = call => panic!("the completion cannot finish while writes are paused: {result:?}"),
            () = async {
                returned.notified().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            } => {}
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let again = Idempotent::new(&store, "paid")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(0u32)
            })
            .await
            .expect("the retry waits out the pause");
        assert!(again.status.is_replay(), "{:?}", again.status);
        assert_eq!(again.value, 42);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran again");
    }

    /// A call cancelled while its claim waits in the server (writes paused) never ran its body;
    /// when the server goes on, the claim lands and is released at once (the store releases a
    /// claim whose reply it never read), so the key is not held for the lease (30 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_cancelled_while_its_claim_is_on_its_way_does_not_hold_the_key() {
        let server = RedisServer::start();
        let store = store_on(&server.url(), "cancel-claim").await;
        let runs = AtomicUsize::new(0);
        pause_writes(&server, 300);
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            Idempotent::new(&store, "k").name("test").run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u8)
            }),
        )
        .await;
        assert!(cancelled.is_err(), "the claim is held in the server");
        let mut busy = 0;
        let out = loop {
            match Idempotent::new(&store, "k")
                .name("test")
                .on_conflict(OnConflict::Reject)
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(2u8)
                })
                .await
            {
                Ok(out) => break out,
                // The release may reach the server just after this call's claim.
                Err(Error::InProgress { .. }) if busy < 40 => {
                    busy += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("the cancelled claim still holds the key: {err}"),
            }
        };
        assert_eq!((out.status, out.value), (Status::Executed, 2));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// The body ran, and its completion failed (the server went down meanwhile): the call
    /// returns the value, and the store keeps trying in the background; once the server is back
    /// (with its append-only file, the claim survived), the result is stored and the retry
    /// replays it, well before the claim's lease would have freed the key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_completion_that_failed_is_finished_in_the_background() {
        let server = Arc::new(RedisServer::start_persistent());
        let store = RedisStore::builder()
            .prefix(fresh_prefix("complete-later"))
            .timeout(Duration::from_millis(500))
            .connect(&server.url())
            .await
            .unwrap();
        let runs = AtomicUsize::new(0);
        let out = Idempotent::new(&store, "k")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::task::spawn_blocking(move || server.stop())
                    .await
                    .unwrap();
                Ok::<_, Error>(7u32)
            })
            .await
            .expect("the body ran: its value is returned");
        assert_eq!(out.value, 7);
        assert_eq!(
            out.expires_in, None,
            "the server was down: nothing stored yet"
        );

        let restarted = server.clone();
        tokio::task::spawn_blocking(move || restarted.restart())
            .await
            .unwrap();
        let mut tries = 0;
        let again = loop {
            tries += 1;
            match Idempotent::new(&store, "k")
                .name("test")
                .on_conflict(OnConflict::Reject)
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(0u32)
                })
                .await
            {
                Ok(out) => break out,
                Err(Error::InProgress { .. } | Error::Store(_)) if tries < 100 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("the result was not stored in the background: {err}"),
            }
        };
        assert_eq!((again.status, again.value), (Status::Replayed, 7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// Waiting when the server is slow: waiters back off (a bounded number of polls each), get the
/// holder's result, and take nothing the calls on other keys need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_slow_server_poll_at_a_bounded_rate_and_starve_nothing() {
    const WAITERS: usize = 20;
    const OTHERS: u32 = 10;
    let server = RedisServer::start();
    let proxy = CountingProxy::start_slow(server.port(), Duration::from_millis(20));
    let store = Arc::new(store_on(&proxy.url(), "slow").await);
    let held = Key::new("test", "held");
    let token = match store.claim(held, None, Duration::from_secs(30)).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("{other:?}"),
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let before = proxy.commands();
    let started = Instant::now();
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..WAITERS {
        let (store, runs) = (store.clone(), runs.clone());
        waiters.spawn(async move {
            Idempotent::new(&*store, "held")
                .name("test")
                .run_with_outcome(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(0u32)
                })
                .await
        });
    }
    for i in 0..OTHERS {
        let v = Idempotent::new(&*store, ("other", i))
            .name("test")
            .run(|| async move { Ok::<_, Error>(i) })
            .await
            .expect("calls on other keys are served while the waiters wait");
        assert_eq!(v, i);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = store
        .complete(
            held,
            token,
            None,
            Bytes::from(idem::codec::to_vec(&5u64).unwrap()),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done.ok(), Some(idem::store::Completion::Stored));
    let held_for = started.elapsed();
    while let Some(joined) = waiters.join_next().await {
        let out = joined.unwrap().expect("a waiter gets the holder's result");
        assert_eq!((out.status, out.value), (Status::Waited, 5));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // Every command but the holder's completion, the other keys' claims and completions, and
    // each waiter's claim before and after its wait, is a poll (or, since waiters are woken by
    // pub/sub, the subscriber's commands: fewer than the polls they save).
    let commands = proxy.commands() - before;
    let polls = commands - 1 - 2 * OTHERS as usize - 2 * WAITERS;
    // 5, 10, 20, 40, 80 ms, then one poll per 100 ms at the most (and one more at the end).
    let bound_each = 5 + usize::try_from(held_for.as_millis() / 100).unwrap() + 2;
    assert!(
        polls <= WAITERS * bound_each,
        "{polls} polls by {WAITERS} waiters in {held_for:?}: more than {bound_each} each"
    );
    println!("{polls} polls by {WAITERS} waiters in {held_for:?}");
}

/// A result longer than the server accepts in one argument (`proto-max-bulk-len`) is not sent:
/// Redis would close the connection that every call shares, failing the calls in flight, and
/// the background completion would do it again and again. The call gets its value, unstored,
/// and the connection is never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_servers_limit_breaks_no_other_call() {
    let server = RedisServer::start_configured(false, &["--proto-max-bulk-len", "1mb"]);
    let store = Arc::new(store_on(&server.url(), "too-large").await);
    let connections = || {
        server
            .info("stats")
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("INFO stats")
    };
    let before = connections();
    let mut others = tokio::task::JoinSet::new();
    for i in 0..20u32 {
        let store = store.clone();
        others.spawn(async move {
            Idempotent::new(&*store, ("other", i))
                .name("test")
                .run(|| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, Error>(i)
                })
                .await
        });
    }
    let big = "b".repeat(1 << 20);
    let got = Idempotent::new(&*store, "big")
        .name("test")
        .run_with_outcome(|| async { Ok::<_, Error>(big.clone()) })
        .await
        .expect("the body ran: its value is returned");
    assert!(got.value == big && got.expires_in.is_none());
    while let Some(joined) = others.join_next().await {
        joined
            .unwrap()
            .expect("a call in flight meanwhile is not failed by it");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connections() - before,
        1,
        "the store's connection was dropped (only this INFO's connection is new)"
    );
}

/// Outages around a call, through a proxy or with the server itself stopped, paused or
/// replaced behind its address: what the review of the Redis store found.
mod outages {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use idem::store::redis::IfUnsafe;
    use idem::{Error, Idempotent, RedisStore, Status};

    use super::support::LogCapture;
    use super::support::redis::{ChaosProxy, Cut};
    use super::{RedisServer, Resp, fresh_prefix};

    async fn store_with_timeout(url: &str, test: &str, timeout: Duration) -> RedisStore {
        RedisStore::builder()
            .prefix(fresh_prefix(test))
            .timeout(timeout)
            .if_not_persistent(IfUnsafe::Accept)
            .connect(url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
    }

    /// Sends `sig` to the process `pid` (read before the server is paused: a paused server
    /// does not answer `INFO`).
    fn signal(pid: u32, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig}");
    }

    /// Whether the log says that another call took the key over: the background completion took
    /// its own completion, which had landed, for another's.
    const TAKEN_OVER: &str = "another call took the key over";
    const STORED_LATER: &str = "stored a result in the background";

    /// Waits (a bounded number of polls) until the background completion says it stored the
    /// result, and checks that it did not take its own landed completion for another call's.
    async fn background_completion_recognised(logs: &LogCapture) {
        for _ in 0..200 {
            if logs.contains(STORED_LATER) || logs.contains(TAKEN_OVER) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = logs.text();
        assert!(
            text.contains(STORED_LATER) && !text.contains(TAKEN_OVER),
            "the background completion must store the result, or recognise the completion that \
             landed as its own: {text}"
        );
    }

    /// Review finding 1: a blip of the connection while the result is sent (the completion is
    /// cut off before it reaches the server, and once more when the store sends it again) used
    /// to leave a record saying the result could not be stored, for the whole ttl, although the
    /// value was in hand. The result is stored (in the background) and the retry replays it;
    /// the body ran once.
    #[tokio::test]
    async fn a_completion_cut_off_on_its_way_is_stored_and_replayed() {
        let logs = LogCapture::install();
        let server = RedisServer::start();
        let proxy = ChaosProxy::start(server.port());
        let store = store_with_timeout(&proxy.url(), "cut-before", Duration::from_secs(2)).await;
        let runs = AtomicUsize::new(0);
        let call = |value: &'static str| {
            let runs = &runs;
            Idempotent::new(&store, "k")
                .name("test")
                .run_with_outcome(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(value.to_owned())
                })
        };
        proxy.cut_on(b"PRECIOUS-RESULT", 2, Cut::Before, false);
        let first = call("PRECIOUS-RESULT-42").await.expect("the body ran");
        assert_eq!(first.value, "PRECIOUS-RESULT-42");
        assert_eq!(proxy.cuts(), 2, "the completion and its retry were cut off");
        background_completion_recognised(&logs).await;
        let again = call("SECOND").await.expect("the retry replays");
        assert_eq!(
            (again.status, again.value.as_str()),
            (Status::Replayed, "PRECIOUS-RESULT-42")
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Review finding 1: the completion reaches the server and runs, but its reply is lost (the
    /// connection is cut, and the server cannot be reached for 1.5 s). The background
    /// completion, sent again once the server is back, recognises the record its own completion
    /// wrote (same token: stored, not "lease lost"); the retry replays; the body ran once.
    #[tokio::test]
    async fn a_completion_that_landed_before_the_outage_is_recognised_as_itself() {
        let logs = LogCapture::install();
        let server = RedisServer::start();
        let proxy = ChaosProxy::start(server.port());
        let store = store_with_timeout(&proxy.url(), "cut-after", Duration::from_millis(500)).await;
        let runs = AtomicUsize::new(0);
        proxy.cut_on(b"PRECIOUS-RESULT", 1, Cut::After, true);
        let first = Idempotent::new(&store, "k")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>("PRECIOUS-RESULT-42".to_owned())
            })
            .await
            .expect("the body ran");
        assert_eq!(first.expires_in, None, "the reply was lost");
        assert_eq!(proxy.cuts(), 1);
        let name = store.record_name(&idem::Key::new("test", "k"));
        assert_eq!(
            server.cmd(&["HGET", &name, "state"]),
            Resp::Bulk(Some(b"done".to_vec())),
            "the completion ran on the server"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.refuse(false);
        background_completion_recognised(&logs).await;
        let again = Idempotent::new(&store, "k")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(String::new())
            })
            .await
            .expect("the retry replays");
        assert_eq!(
            (again.status, again.value.as_str()),
            (Status::Replayed, "PRECIOUS-RESULT-42")
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Review finding 1: the server is paused (SIGSTOP) as the body returns, so the completion
    /// waits in it past the store's timeout; the store goes on trying in the background. When
    /// the server resumes, it runs the first completion, and the ones sent after it are
    /// recognised as the same; the retry replays; the body ran once.
    #[tokio::test]
    async fn a_server_paused_while_the_result_is_stored_keeps_it() {
        let logs = LogCapture::install();
        let server = RedisServer::start();
        let store = store_with_timeout(&server.url(), "paused", Duration::from_millis(300)).await;
        let pid = server.pid();
        let runs = AtomicUsize::new(0);
        let first = Idempotent::new(&store, "k")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                signal(pid, "-STOP");
                Ok::<_, Error>(7u32)
            })
            .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        signal(pid, "-CONT");
        let first = first.expect("the body ran");
        assert_eq!((first.value, first.expires_in), (7, None));
        background_completion_recognised(&logs).await;
        let again = Idempotent::new(&store, "k")
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(0u32)
            })
            .await
            .expect("the retry replays");
        assert_eq!((again.status, again.value), (Status::Replayed, 7));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Review finding 2: after an outage longer than the connection manager's few reconnection
    /// attempts, the first call once the server is back used to fail: the settings read that
    /// follows a connection error got the cached failure of the last reconnection and was not
    /// sent again. It is, on a fresh connection, like any operation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_call_after_an_outage_succeeds() {
        let server = RedisServer::start_persistent();
        let store = store_with_timeout(&server.url(), "after-outage", Duration::from_secs(2)).await;
        let runs = AtomicUsize::new(0);
        let call = |k: u32| {
            let runs = &runs;
            Idempotent::new(&store, k)
                .name("test")
                .run(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(k)
                })
        };
        assert_eq!(call(1).await.unwrap(), 1);
        tokio::task::block_in_place(|| server.stop());
        assert!(matches!(call(2).await, Err(Error::Store(_))), "down");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| server.restart());
        tokio::time::sleep(Duration::from_millis(500)).await;
        match call(3).await {
            Ok(v) => assert_eq!(v, 3),
            Err(err) => panic!("the first call after the server came back failed: {err}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);

        // The same through a proxy that cuts every connection and refuses new ones for 1.5 s.
        let proxy = ChaosProxy::start(server.port());
        let store = store_with_timeout(&proxy.url(), "after-refusal", Duration::from_secs(2)).await;
        let call = |k: u32| {
            let runs = &runs;
            Idempotent::new(&store, k)
                .name("test")
                .run(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(k)
                })
        };
        assert_eq!(call(1).await.unwrap(), 1);
        proxy.refuse(true);
        proxy.cut_all();
        assert!(matches!(call(2).await, Err(Error::Store(_))), "refused");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.refuse(false);
        tokio::time::sleep(Duration::from_millis(500)).await;
        match call(3).await {
            Ok(v) => assert_eq!(v, 3),
            Err(err) => panic!("the first call after the outage failed: {err}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    /// Review finding 3: a failover behind one address, to a server whose policy evicts (refused
    /// by default). The settings read after the connection error is cut off, once by its
    /// caller (dropped) and once by the store's timeout (the new server is slow to answer at
    /// first): neither may let a later claim skip the check, nor may a claim that comes while
    /// another's reading is under way. Every claim is refused once the settings are read; no
    /// body runs on the unchecked server, and nothing is written there. The claim, its reading
    /// included, fails within the store's timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settings_read_cut_off_is_done_again_before_any_claim() {
        let a = RedisServer::start();
        let b = RedisServer::start_configured(false, &["--maxmemory-policy", "allkeys-lru"]);
        let proxy = ChaosProxy::start(a.port());
        let store = store_with_timeout(&proxy.url(), "failover", Duration::from_millis(500)).await;
        let runs = AtomicUsize::new(0);
        let call = |k: u32| {
            let runs = &runs;
            Idempotent::new(&store, k)
                .name("test")
                .run(move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(k)
                })
        };
        assert_eq!(call(0).await.unwrap(), 0);

        proxy.switch_to(b.port());
        proxy.hold(true);
        proxy.cut_all();
        let dropped = tokio::time::timeout(Duration::from_millis(100), call(1)).await;
        assert!(dropped.is_err(), "B does not answer yet: {dropped:?}");
        // The outer bound only keeps a claim whose settings read is unbounded from hanging the
        // test; the claim, its reading included, must fail within the store's timeout.
        let started = std::time::Instant::now();
        match tokio::time::timeout(Duration::from_secs(10), call(2)).await {
            Ok(Err(Error::Store(_))) => {}
            Ok(other) => panic!("B does not answer yet: {other:?}"),
            Err(_) => panic!("the claim's settings read is not bounded by the store's timeout"),
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500 + 300),
            "a claim whose settings read gets no answer fails by the store's timeout (500 ms), \
             took {took:?}"
        );
        // A claim that comes while another's reading is under way waits for that reading: it
        // does not take the reading for done. B answers 100 ms in.
        let (three, four, ()) = tokio::join!(
            call(3),
            async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                call(4).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                proxy.hold(false);
            }
        );
        for (k, result) in [(3, three), (4, four)] {
            match result {
                Err(Error::Store(err)) if err.to_string().contains("allkeys-lru") => {}
                other => panic!("claim {k} on a server nobody checked: {other:?}"),
            }
        }
        for k in 5..8 {
            match call(k).await {
                Err(Error::Store(err)) if err.to_string().contains("allkeys-lru") => {}
                other => panic!("claim {k} on a server nobody checked: {other:?}"),
            }
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a body ran on B");
        let keys = |server: &RedisServer| match server.cmd(&["DBSIZE"]) {
            Resp::Int(n) => n,
            other => panic!("DBSIZE: {other:?}"),
        };
        assert_eq!(keys(&b), 0, "a claim was written on B");
    }
}

/// Servers whose ACL does not let the store's user do what it needs: the error names the command
/// or the key refused and the rule to add, and no ACL refusal is taken for a foreign value.
mod acl {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use idem::store::redis::IfUnsafe;
    use idem::{Error, Idempotent, RedisStore};

    use super::support::LogCapture;
    use super::{RedisServer, fresh_prefix};

    /// A user `name` on `server` with `rules` after `on >pw`, and its URL.
    fn user(server: &RedisServer, name: &str, rules: &[&str]) -> String {
        let mut args = vec!["ACL", "SETUSER", name, "on", ">pw"];
        args.extend_from_slice(rules);
        let reply = server.cmd(&args);
        assert!(
            matches!(reply, super::Resp::Simple(ref ok) if ok == "OK"),
            "{reply:?}"
        );
        format!("redis://{name}:pw@127.0.0.1:{}/", server.port())
    }

    async fn connect(url: &str, prefix: &str) -> Result<RedisStore, Error> {
        RedisStore::builder()
            .prefix(prefix)
            .if_not_persistent(IfUnsafe::Accept)
            .connect(url)
            .await
    }

    /// One call's error, with the body never run.
    async fn call_error(store: &RedisStore) -> String {
        let runs = AtomicUsize::new(0);
        let result = Idempotent::new(store, 7u32)
            .name("acl")
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(7u32)
            })
            .await;
        assert_eq!(runs.load(Ordering::SeqCst), 0, "no body runs unclaimed");
        match result {
            Err(Error::Store(err)) => err.to_string(),
            other => panic!("expected Error::Store, got {other:?}"),
        }
    }

    fn assert_says(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    /// `NOPERM` for a command the store sends, for the keys under its prefix, and for the
    /// scripts' `SCRIPT LOAD` at connect: each error names what was refused and the rule.
    #[tokio::test]
    async fn a_noperm_reply_names_the_command_or_key_and_the_rule_to_add() {
        let server = RedisServer::start();

        let url = user(&server, "noevalsha", &["~*", "+@all", "-evalsha"]);
        let store = connect(&url, &fresh_prefix("acl")).await.expect("connect");
        let message = call_error(&store).await;
        assert_says(
            &message,
            &["NOPERM", "EVALSHA", "ACL SETUSER noevalsha +evalsha"],
        );

        let url = user(&server, "otherkeys", &["~other:*", "+@all"]);
        let prefix = fresh_prefix("acl");
        let store = connect(&url, &prefix).await.expect("connect");
        let message = call_error(&store).await;
        let record = store.record_name(&idem::Key::new("acl", &7u32));
        assert_says(
            &message,
            &[
                "NOPERM",
                &record,
                &format!("ACL SETUSER otherkeys ~{prefix}*"),
            ],
        );
        assert!(!message.contains("not an idem record"), "{message}");

        let url = user(&server, "noload", &["~*", "+@all", "-script|load"]);
        match connect(&url, &fresh_prefix("acl")).await {
            Ok(_) => panic!("connect without SCRIPT LOAD must fail"),
            Err(err) => assert_says(
                &err.to_string(),
                &["NOPERM", "SCRIPT|LOAD", "ACL SETUSER noload +script|load"],
            ),
        }
    }

    /// A command a script runs on the record, refused by the ACL: Redis does not name it, the
    /// error does (the store asks the server which ones the user may not run). `HMGET` refused
    /// used to read as "the key holds not a hash".
    #[tokio::test]
    async fn a_command_refused_inside_a_script_is_named_with_its_rule() {
        let server = RedisServer::start();
        for (name, denied) in [("nohset", "hset"), ("nohmget", "hmget")] {
            let minus = format!("-{denied}");
            let url = user(&server, name, &["~*", "+@all", &minus]);
            let store = connect(&url, &fresh_prefix("acl")).await.expect("connect");
            let message = call_error(&store).await;
            assert_says(
                &message,
                &[
                    &denied.to_ascii_uppercase(),
                    &format!("ACL SETUSER {name} +{denied}"),
                ],
            );
            assert!(!message.contains("not an idem record"), "{message}");
        }
    }

    /// `CONFIG GET` refused: the warning that the settings could not be checked says which rule
    /// lets the store read them.
    #[tokio::test]
    async fn config_refused_by_the_acl_is_a_warning_with_the_rule() {
        let logs = LogCapture::install();
        let server = RedisServer::start();
        let url = user(&server, "noconfig", &["~*", "+@all", "-config"]);
        let store = connect(&url, &fresh_prefix("acl")).await.expect("connect");
        drop(store);
        assert_says(
            &logs.text(),
            &["no permissions", "ACL SETUSER <user> +config|get"],
        );
    }
}

/// Review findings 6 and 7, checked on Redis: the 10 ms minimum lease keeps a herd of callers
/// with a 1 ms lease out of a live holder's body, and a server that hangs while a result is
/// stored holds the call up for one store timeout, not two.
mod bounds {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use idem::store::redis::IfUnsafe;
    use idem::{Error, Idempotent, Key, OnConflict, RedisStore};

    use super::{RedisServer, Resp, fresh_prefix};

    /// What a herd on one key did: the most bodies running at once, how many ran, how many
    /// distinct values the callers got, and the record's `grace` field (the granted lease, in
    /// ms) as the first body saw it.
    struct Herd {
        most: usize,
        runs: usize,
        values: usize,
        grace: Option<Resp>,
    }

    /// Twelve callers of one key with a 1 ms lease and a 60 ms body.
    async fn herd(store: &Arc<RedisStore>, key: &str) -> Herd {
        let server = RedisServer::shared();
        let name = store.record_name(&Key::new("herd", key));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let grace = Arc::new(std::sync::Mutex::new(None));
        let mut tasks = Vec::new();
        for i in 0..12usize {
            let (store, running, most, runs) =
                (store.clone(), running.clone(), most.clone(), runs.clone());
            let (grace, name, key) = (grace.clone(), name.clone(), key.to_owned());
            tasks.push(tokio::spawn(async move {
                Idempotent::new(&*store, key.as_str())
                    .name("herd")
                    .lease(Duration::from_millis(1))
                    .wait_timeout(Duration::from_secs(30))
                    .on_conflict(OnConflict::Wait)
                    .run(|| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        let field = tokio::task::spawn_blocking(move || {
                            server.cmd(&["HGET", &name, "grace"])
                        })
                        .await
                        .expect("HGET");
                        grace
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(field);
                        tokio::time::sleep(Duration::from_millis(60)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Error>(i)
                    })
                    .await
            }));
        }
        let mut values = std::collections::BTreeSet::new();
        for task in tasks {
            values.insert(task.await.expect("task").expect("every call succeeds"));
        }
        let grace = grace.lock().unwrap_or_else(|e| e.into_inner()).take();
        Herd {
            most: most.load(Ordering::SeqCst),
            runs: runs.load(Ordering::SeqCst),
            values: values.len(),
            grace,
        }
    }

    /// Review finding 6: with leases of 1 or 2 ms, the record lapsed between two renewals
    /// (renewed every millisecond at best) and callers waiting on the key took it over while
    /// its holder was running and renewing: bodies ran side by side, every time. A lease is at
    /// least 10 ms, renewed every 3.3 ms: the claim's record says 10, and a herd on one key with
    /// a 1 ms lease runs one body at a time, and once.
    ///
    /// A 10 ms lease is still lost by a process that stalls for more than its slack (about 7 ms),
    /// which a machine shared with builds does now and then: the herd gets three tries, and
    /// must run one body at a time in one of them (with the old 1 ms floor, it never does).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_of_one_millisecond_is_ten_and_no_body_runs_beside_a_live_holder() {
        let store = Arc::new(
            RedisStore::builder()
                .prefix(fresh_prefix("min-lease"))
                .if_not_persistent(IfUnsafe::Accept)
                .connect(&RedisServer::shared().url())
                .await
                .expect("connect"),
        );
        let mut tries = Vec::new();
        for attempt in 0..3 {
            let herd = herd(&store, &format!("herd {attempt}")).await;
            assert_eq!(
                herd.grace,
                Some(Resp::Bulk(Some(b"10".to_vec()))),
                "the claim was granted a 10 ms lease"
            );
            if (herd.most, herd.runs, herd.values) == (1, 1, 1) {
                return;
            }
            tries.push((herd.most, herd.runs, herd.values));
        }
        panic!(
            "in every try, bodies ran side by side or again (most at once, runs, distinct \
             values): {tries:?}"
        );
    }

    /// Review finding 7: a server that hangs (SIGSTOP) as the body returns used to hold the
    /// call up for twice the store's timeout while the result was stored. The call returns the
    /// body's value within about one timeout (the result is stored in the background once the
    /// server answers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_hung_during_the_completion_holds_the_call_for_one_timeout() {
        let server = RedisServer::start();
        let timeout = Duration::from_millis(600);
        let store = RedisStore::builder()
            .prefix(fresh_prefix("hung-complete"))
            .timeout(timeout)
            .if_not_persistent(IfUnsafe::Accept)
            .connect(&server.url())
            .await
            .expect("connect");
        let pid = server.pid().to_string();
        let signal = |sig: &str| {
            let status = std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {sig}");
        };
        let returned = std::sync::Mutex::new(None);
        let outcome = Idempotent::new(&store, "hung")
            .name("test")
            .run_with_outcome(|| async {
                signal("-STOP");
                *returned.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Ok::<_, Error>(5u8)
            })
            .await;
        let took = returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed());
        signal("-CONT");
        let outcome = outcome.expect("the body ran: its value is returned");
        assert_eq!((outcome.value, outcome.expires_in), (5, None));
        let took = took.expect("the body ran");
        assert!(
            took >= timeout && took < timeout + Duration::from_millis(400),
            "from the body's return to the call's: {took:?}, the store's timeout is {timeout:?}"
        );
    }
}

/// Waiters woken across processes (issue 16): the scripts that end a claim publish on the
/// record's channel, and a waiter in another store (another connection set, as in another
/// process) is woken by the message, not by a poll. Counted on the server: every script run is
/// an `EVALSHA`, so a waiter that read the record once and then found the result was woken.
mod wake {
    use std::sync::Arc;
    use std::time::Duration;

    use idem::store::{Bytes, Claim, Token};
    use idem::{Error, Idempotent, Key, RedisStore, Status, Store};

    use super::{RedisCluster, RedisServer, Resp, fresh_prefix};

    /// A guard against a hang, not a measure of speed: the waiters under test read the record
    /// again only after a minute, so a woken waiter is done long before it.
    const HANG: Duration = Duration::from_secs(30);
    /// Longer than [`HANG`]: a waiter that is not woken does not poll in time.
    const NEVER: Duration = Duration::from_secs(60);

    fn calls(info: &str, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Scripts run on these servers so far.
    fn scripts(servers: &[&RedisServer]) -> u64 {
        servers
            .iter()
            .map(|s| calls(&s.info("commandstats"), "evalsha"))
            .sum()
    }

    /// Reads of a record so far: every script reads its record with one `HMGET`, and so does a
    /// replay of a record the store has seen completed (no script).
    fn reads(servers: &[&RedisServer]) -> u64 {
        servers
            .iter()
            .map(|s| calls(&s.info("commandstats"), "hmget"))
            .sum()
    }

    /// Subscribers of `channel` on these servers (`PUBSUB NUMSUB`, or `SHARDNUMSUB`).
    fn subscribers(servers: &[&RedisServer], sharded: bool, channel: &str) -> i64 {
        let sub = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
        servers
            .iter()
            .map(|s| match s.cmd(&["PUBSUB", sub, channel]) {
                Resp::Array(Some(items)) => match items.get(1) {
                    Some(Resp::Int(n)) => *n,
                    other => panic!("PUBSUB {sub}: {other:?}"),
                },
                other => panic!("PUBSUB {sub}: {other:?}"),
            })
            .sum()
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let give_up = tokio::time::Instant::now() + HANG;
        while !done() {
            assert!(tokio::time::Instant::now() < give_up, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn value(v: u64) -> Bytes {
        Bytes::from(idem::codec::to_vec(&v).expect("encode"))
    }

    async fn hold(store: &RedisStore, key: Key) -> Token {
        match store.claim(key, None, Duration::from_secs(60)).await {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("{other:?}"),
        }
    }

    /// A waiter on `name`, in `store`: runs the body (returning 9) only if the key is released.
    fn waiter(
        store: &Arc<RedisStore>,
        name: impl Into<String>,
    ) -> tokio::task::JoinHandle<Result<idem::Outcome<u64>, Error>> {
        let (store, name) = (store.clone(), name.into());
        tokio::spawn(async move {
            Idempotent::new(&*store, name.as_str())
                .name("test")
                .wait_timeout(Duration::from_secs(120))
                .run_with_outcome(|| async { Ok::<_, Error>(9u64) })
                .await
        })
    }

    async fn joined(
        task: tokio::task::JoinHandle<Result<idem::Outcome<u64>, Error>>,
    ) -> (Status, u64) {
        let out = tokio::time::timeout(HANG, task)
            .await
            .expect("the waiter was not woken")
            .expect("the waiter task")
            .expect("the waiter's call");
        (out.status, out.value)
    }

    /// A store that waits as another process would: its own connections, and no poll before
    /// a minute has passed.
    async fn waiting_store(url: &str, prefix: &str, fallback: Duration) -> Arc<RedisStore> {
        Arc::new(
            RedisStore::builder()
                .prefix(prefix)
                .fallback_poll_interval(fallback)
                .connect(url)
                .await
                .expect("connect the waiting store"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiter_in_another_store_is_woken_by_the_completion_and_the_release() {
        let server = RedisServer::start();
        let prefix = fresh_prefix("wake");
        let holder = super::store_on_prefix(&server.url(), &prefix).await;
        let waiting = waiting_store(&server.url(), &prefix, NEVER).await;

        // Completed: the waiter gets the holder's value.
        let key = Key::new("test", "completed");
        let channel = holder.record_name(&key);
        let base = scripts(&[&server]);
        let token = hold(&holder, key).await;
        let task = waiter(&waiting, "completed");
        // The holder's claim, the waiter's claim (busy) and its one read of the record.
        until("the waiter reads the record", || {
            scripts(&[&server]) == base + 3
        })
        .await;
        assert_eq!(subscribers(&[&server], false, &channel), 1);
        let done = holder
            .complete(key, token, None, value(5), Duration::from_secs(60))
            .await;
        assert_eq!(done.ok(), Some(idem::store::Completion::Stored));
        assert_eq!(joined(task).await, (Status::Waited, 5));
        assert_eq!(
            scripts(&[&server]) - base,
            5,
            "claim, busy claim, one read, complete, the replaying claim: no poll"
        );

        // Released: the waiter claims the key and runs the body.
        let key = Key::new("test", "released");
        let base = scripts(&[&server]);
        let token = hold(&holder, key).await;
        let task = waiter(&waiting, "released");
        until("the waiter reads the record", || {
            scripts(&[&server]) == base + 3
        })
        .await;
        assert_eq!(holder.release(key, token).await.ok(), Some(true));
        assert_eq!(joined(task).await, (Status::Executed, 9));
        assert_eq!(
            scripts(&[&server]) - base,
            6,
            "claim, busy claim, one read, release, claim, complete: no poll"
        );
        // The last waiter of a key unsubscribes it.
        until("the channel is unsubscribed", || {
            subscribers(&[&server], false, &channel) == 0
        })
        .await;
    }

    /// 64 waiters of one key in one store share one subscriber connection and one
    /// subscription, and each reads the record once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_waiters_share_one_subscriber_connection() {
        const WAITERS: u64 = 64;
        let server = RedisServer::start();
        let prefix = fresh_prefix("wake-many");
        let holder = super::store_on_prefix(&server.url(), &prefix).await;
        let waiting = waiting_store(&server.url(), &prefix, NEVER).await;
        let key = Key::new("test", "many");
        let base = scripts(&[&server]);
        let base_reads = reads(&[&server]);
        let token = hold(&holder, key).await;
        let tasks: Vec<_> = (0..WAITERS).map(|_| waiter(&waiting, "many")).collect();
        until("every waiter reads the record", || {
            scripts(&[&server]) == base + 1 + 2 * WAITERS
        })
        .await;
        assert_eq!(
            subscribers(&[&server], false, &waiting.record_name(&key)),
            1
        );
        let pubsub_clients = server
            .info("clients")
            .lines()
            .find_map(|l| l.strip_prefix("pubsub_clients:"))
            .map(|n| n.trim().to_owned());
        // `pubsub_clients` is reported from Redis 7.4 on.
        if let Some(n) = pubsub_clients {
            assert_eq!(n, "1", "one subscriber connection for the store");
        }
        holder
            .complete(key, token, None, value(5), Duration::from_secs(60))
            .await
            .expect("complete");
        for task in tasks {
            assert_eq!(joined(task).await, (Status::Waited, 5));
        }
        // Each waiter claims once more: with the claim script, or with a plain `HMGET` once its
        // store has seen the result. Either is one read of the record; a poll would be another.
        assert_eq!(reads(&[&server]) - base_reads, 2 + 3 * WAITERS, "no poll");
        assert!(scripts(&[&server]) - base <= 2 + 3 * WAITERS);
    }

    /// The subscriber connection killed (`CLIENT KILL TYPE pubsub`) before the holder
    /// completes: the message is lost, and the waiter finds the result at its next poll; then
    /// the subscriber is connected again and the next waiter is woken by its message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_subscriber_connection_falls_back_to_polling_and_comes_back() {
        let server = RedisServer::start();
        let prefix = fresh_prefix("wake-kill");
        let holder = super::store_on_prefix(&server.url(), &prefix).await;
        let waiting = waiting_store(&server.url(), &prefix, Duration::from_secs(1)).await;

        let key = Key::new("test", "lost");
        let channel = holder.record_name(&key);
        let base = scripts(&[&server]);
        let token = hold(&holder, key).await;
        let task = waiter(&waiting, "lost");
        until("the waiter reads the record", || {
            scripts(&[&server]) == base + 3
        })
        .await;
        assert_eq!(
            server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]),
            Resp::Int(1),
            "the store's one subscriber connection"
        );
        assert_eq!(subscribers(&[&server], false, &channel), 0);
        holder
            .complete(key, token, None, value(5), Duration::from_secs(60))
            .await
            .expect("complete");
        assert_eq!(joined(task).await, (Status::Waited, 5));
        assert_eq!(
            scripts(&[&server]) - base,
            6,
            "the waiter's second read of the record (its poll) found the result"
        );

        let key = Key::new("test", "back");
        let base = scripts(&[&server]);
        let token = hold(&holder, key).await;
        let task = waiter(&waiting, "back");
        until("the waiter reads the record", || {
            scripts(&[&server]) == base + 3
        })
        .await;
        holder
            .complete(key, token, None, value(6), Duration::from_secs(60))
            .await
            .expect("complete");
        assert_eq!(joined(task).await, (Status::Waited, 6));
        assert_eq!(scripts(&[&server]) - base, 5, "woken again: no poll");
    }

    /// Pub/sub turned off: the waiter polls (5 ms doubling to `max_poll_interval`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_pubsub_off_a_waiter_polls() {
        let server = RedisServer::start();
        let prefix = fresh_prefix("wake-off");
        let holder = super::store_on_prefix(&server.url(), &prefix).await;
        let waiting = Arc::new(
            RedisStore::builder()
                .prefix(&prefix)
                .pubsub(false)
                .max_poll_interval(Duration::from_millis(20))
                .connect(&server.url())
                .await
                .expect("connect"),
        );
        let key = Key::new("test", "polled");
        let base = scripts(&[&server]);
        let token = hold(&holder, key).await;
        let task = waiter(&waiting, "polled");
        until("the waiter polls five times", || {
            scripts(&[&server]) >= base + 7
        })
        .await;
        assert_eq!(subscribers(&[&server], false, &holder.record_name(&key)), 0);
        holder
            .complete(key, token, None, value(5), Duration::from_secs(60))
            .await
            .expect("complete");
        assert_eq!(joined(task).await, (Status::Waited, 5));
    }

    /// On a cluster the channel is sharded (`SSUBSCRIBE`/`SPUBLISH` in the record's slot): the
    /// waiters of keys on every node are woken, and after their subscriber connections are
    /// killed on every node they still get their results, and are woken again afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_cluster_waiters_are_woken_by_sharded_pubsub() {
        const KEYS: usize = 6;
        let names = |round: u64| (0..KEYS).map(move |i| format!("round {round} key {i}"));
        let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
        let nodes: Vec<&RedisServer> = cluster.nodes().iter().collect();
        let prefix = fresh_prefix("wake-cluster");
        let connect = |fallback: Duration| {
            let (urls, prefix) = (cluster.urls(), prefix.clone());
            async move {
                RedisStore::builder()
                    .prefix(prefix)
                    .fallback_poll_interval(fallback)
                    .connect_cluster(urls)
                    .await
                    .expect("connect to the cluster")
            }
        };
        let holder = connect(NEVER).await;
        let waiting = Arc::new(connect(Duration::from_secs(1)).await);
        let owners: std::collections::HashSet<usize> = names(0)
            .map(|k| {
                cluster
                    .owner_of(cluster.slot_of(&holder.record_name(&Key::new("test", k.as_str()))))
            })
            .collect();
        assert!(owners.len() >= 2, "keys on several nodes: {owners:?}");

        for round in 0..3u64 {
            let base = scripts(&nodes);
            let mut held = Vec::new();
            for k in names(round) {
                let key = Key::new("test", k.as_str());
                held.push((key, hold(&holder, key).await));
            }
            let tasks: Vec<_> = names(round).map(|k| waiter(&waiting, k)).collect();
            let n = KEYS as u64;
            until("every waiter reads its record", || {
                scripts(&nodes) >= base + 3 * n
            })
            .await;
            for (key, _) in &held {
                assert_eq!(subscribers(&nodes, true, &holder.record_name(key)), 1);
            }
            if round == 1 {
                let killed: i64 = nodes
                    .iter()
                    .map(|s| match s.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]) {
                        Resp::Int(n) => n,
                        other => panic!("CLIENT KILL: {other:?}"),
                    })
                    .sum();
                assert!(killed >= 2, "the subscriber's connections: {killed}");
            }
            for (key, token) in held {
                holder
                    .complete(key, token, None, value(round), Duration::from_secs(60))
                    .await
                    .expect("complete");
            }
            for task in tasks {
                assert_eq!(joined(task).await, (Status::Waited, round));
            }
            if round != 1 {
                assert_eq!(scripts(&nodes) - base, 5 * n, "round {round}: no poll");
            }
        }
    }
}

/// Steps (`idem::step`) on Redis: where the step records live (a hash beside the record, in
/// its hash slot), what they cost, and that a retry or a takeover does not run a recorded step
/// again, on one server and on the cluster. The rules themselves are the conformance suite's.
mod steps {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use idem::store::{Bytes, Claim, RecordedSteps, StepRecorded, Token};
    use idem::{Error, Fingerprint, Idempotent, Key, RedisStore, Status, Store};

    use super::support::LogCapture;
    use super::support::redis::ChaosProxy;
    use super::{
        AppError, CountingProxy, RedisCluster, RedisServer, Resp, cluster_store, fresh_prefix,
        shared_store, store_on, store_on_prefix,
    };

    const LONG: Duration = Duration::from_secs(60);

    async fn acquire(store: &RedisStore, key: Key, lease: Duration) -> Token {
        match store.claim(key, None, lease).await {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("expected to acquire, got {other:?}"),
        }
    }

    async fn record_one(store: &RedisStore, key: Key, token: Token, name: &str) -> StepRecorded {
        store
            .record_step(key, token, name.into(), Bytes::from_static(b"\"v\""), LONG)
            .await
            .unwrap_or_else(|err| panic!("record_step {name:?}: {err}"))
    }

    fn int(reply: Resp) -> i64 {
        match reply {
            Resp::Int(n) => n,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    fn bulk(reply: Resp) -> Option<Vec<u8>> {
        match reply {
            Resp::Bulk(b) => b,
            other => panic!("expected a bulk string, got {other:?}"),
        }
    }

    /// Both layouts on the cluster (a prefix with a hash tag, and one without braces, whose
    /// records spread over every node): the steps hash is in its record's slot, on the node
    /// that owns it, and the scripts that name both keys run there.
    #[tokio::test]
    async fn the_steps_hash_is_in_its_records_slot_on_the_cluster() {
        let cluster = RedisCluster::shared();
        let plain = fresh_prefix("steps-slot");
        let tagged = format!("{{{}}}:", Token::generate().as_u128());
        for prefix in [plain, tagged] {
            let store = RedisStore::builder()
                .prefix(prefix.as_str())
                .connect_cluster(cluster.urls())
                .await
                .expect("connect to the cluster");
            let mut owners = std::collections::HashSet::new();
            for k in 0..12u32 {
                let key = Key::new("test", &("slot", k));
                let record = store.record_name(&key);
                let steps = store.steps_name(&key).expect("a name in the record's slot");
                assert!(steps.starts_with(&prefix), "{steps} is under the prefix");
                let slot = cluster.slot_of(&record);
                assert_eq!(cluster.slot_of(&steps), slot, "{record} and {steps}");
                let token = acquire(&store, key, LONG).await;
                assert_eq!(
                    record_one(&store, key, token, "charge").await,
                    StepRecorded::Recorded
                );
                let owner = cluster.owner_of(slot);
                owners.insert(owner);
                let node = &cluster.nodes()[owner];
                assert_eq!(int(node.cmd(&["EXISTS", &record, &steps])), 2);
                assert_eq!(
                    store.steps(key, token).await.ok(),
                    Some(RecordedSteps::Held(vec![(
                        "charge".into(),
                        Bytes::from_static(b"\"v\"")
                    )]))
                );
                assert!(store.release(key, token).await.unwrap());
                assert_eq!(int(node.cmd(&["EXISTS", &record, &steps])), 1);
                let token = acquire(&store, key, LONG).await;
                // As the executor does at a call's first step.
                match store.steps(key, token).await {
                    Ok(RecordedSteps::Held(steps)) => assert_eq!(steps.len(), 1),
                    other => panic!("{other:?}"),
                }
                let stored = store
                    .complete(key, token, None, Bytes::from_static(b"1"), LONG)
                    .await;
                assert!(matches!(stored, Ok(idem::store::Completion::Stored)));
                assert_eq!(int(node.cmd(&["EXISTS", &steps])), 0);
            }
            if !prefix.starts_with('{') {
                assert!(owners.len() > 1, "records without a tag spread: {owners:?}");
            }
        }
    }

    /// A step is one round trip, and so is reading them; a call with one step costs a claim, a
    /// read of its steps, the step, and a completion of two round trips (the first answer says
    /// the record has steps). The calls without steps keep their two (see
    /// `replay_is_one_round_trip_and_execution_two`).
    #[tokio::test]
    async fn a_step_is_one_round_trip() {
        let server = RedisServer::start();
        let proxy = CountingProxy::start(server.port());
        let store = store_on(&proxy.url(), "steps-round-trips").await;

        let key = Key::new("test", "rt");
        let token = acquire(&store, key, LONG).await;
        for name in ["charge", "reserve", "charge"] {
            let before = proxy.commands();
            assert_eq!(
                record_one(&store, key, token, name).await,
                StepRecorded::Recorded
            );
            assert_eq!(proxy.commands() - before, 1, "a step is one round trip");
        }
        let before = proxy.commands();
        match store.steps(key, token).await {
            Ok(RecordedSteps::Held(steps)) => assert_eq!(steps.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            proxy.commands() - before,
            1,
            "reading steps is one round trip"
        );

        let charges = AtomicUsize::new(0);
        let call = || {
            Idempotent::new(&store, "with a step")
                .name("test")
                .run_with_outcome(|| async {
                    let receipt = idem::step("charge", || async {
                        charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>(7u32)
                    })
                    .await?;
                    Ok::<_, Error>(receipt)
                })
        };
        let before = proxy.commands();
        let out = call().await.unwrap();
        assert_eq!((out.value, out.status), (7, Status::Executed));
        assert_eq!(
            proxy.commands() - before,
            5,
            "claim, read the steps, the step, complete (twice: the record has steps)"
        );
        let before = proxy.commands();
        let out = call().await.unwrap();
        assert_eq!((out.value, out.status), (7, Status::Replayed));
        assert_eq!(
            proxy.commands() - before,
            1,
            "a replay is still one round trip"
        );
        assert_eq!(charges.load(Ordering::SeqCst), 1);
    }

    /// What the server holds: the hash's marker, its fields and expiry, the record's flag; a
    /// release keeps the hash, a completion deletes it and the flag.
    #[tokio::test]
    async fn the_steps_hash_on_the_server() {
        let server = RedisServer::shared();
        let store = shared_store("steps-layout").await;
        let key = Key::new("test", "layout");
        let (record_name, steps_name) = (
            store.record_name(&key),
            store.steps_name(&key).expect("a steps name"),
        );
        assert_eq!(
            steps_name,
            format!("{prefix}{{{record_name}}}:steps", prefix = store.prefix())
        );
        let token = acquire(&store, key, LONG).await;
        assert_eq!(int(server.cmd(&["EXISTS", &steps_name])), 0);
        let ttl = Duration::from_secs(3600);
        store
            .record_step(key, token, "idem".into(), Bytes::from_static(b"x"), ttl)
            .await
            .unwrap();
        let hget = |name: &str, field: &str| bulk(server.cmd(&["HGET", name, field]));
        assert_eq!(hget(&steps_name, "idem").as_deref(), Some(&b"steps"[..]));
        assert_eq!(hget(&steps_name, "step:idem").as_deref(), Some(&b"x"[..]));
        assert_eq!(hget(&record_name, "steps").as_deref(), Some(&b"1"[..]));
        let pttl = int(server.cmd(&["PTTL", &steps_name]));
        assert!(pttl > 3_590_000 && pttl <= 3_600_000, "{pttl}");
        // A step with a shorter ttl does not shorten the hash's.
        store
            .record_step(key, token, "b".into(), Bytes::new(), Duration::from_secs(1))
            .await
            .unwrap();
        assert!(int(server.cmd(&["PTTL", &steps_name])) > 3_590_000);

        assert!(store.release(key, token).await.unwrap());
        assert_eq!(int(server.cmd(&["EXISTS", &record_name])), 0);
        assert_eq!(
            int(server.cmd(&["HLEN", &steps_name])),
            3,
            "the release kept them"
        );
        let token = acquire(&store, key, LONG).await;
        assert_eq!(
            hget(&record_name, "steps"),
            None,
            "a fresh claim is not flagged before it reads the steps"
        );
        match store.steps(key, token).await {
            Ok(RecordedSteps::Held(steps)) => assert_eq!(steps.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(hget(&record_name, "steps").as_deref(), Some(&b"1"[..]));
        store
            .complete(key, token, None, Bytes::from_static(b"1"), LONG)
            .await
            .unwrap();
        assert_eq!(int(server.cmd(&["EXISTS", &steps_name])), 0);
        assert_eq!(
            hget(&record_name, "steps"),
            None,
            "a completed record has no flag"
        );
        assert_eq!(hget(&record_name, "state").as_deref(), Some(&b"done"[..]));
    }

    /// The call's body charges (a step), then fails; the retry gets the recorded charge without
    /// charging again, and completes.
    async fn a_failed_call_is_retried_without_its_recorded_step(store: &RedisStore) {
        let charges = AtomicUsize::new(0);
        let attempts = AtomicUsize::new(0);
        let call = || {
            Idempotent::new(store, ("checkout", 1u32))
                .name("test")
                .run_with_outcome(|| async {
                    let receipt = idem::step("charge", || async {
                        let n = charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, AppError>(format!("ch_{n}"))
                    })
                    .await?;
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(AppError::Failed);
                    }
                    Ok(receipt)
                })
        };
        assert!(matches!(call().await, Err(AppError::Failed)));
        assert_eq!(charges.load(Ordering::SeqCst), 1);
        let out = call().await.expect("the retry completes");
        assert_eq!(
            (out.value.as_str(), out.status),
            ("ch_0", Status::Executed),
            "the retry gets the recorded charge"
        );
        assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
        let out = call().await.expect("a replay");
        assert_eq!((out.value.as_str(), out.status), ("ch_0", Status::Replayed));
        assert_eq!(charges.load(Ordering::SeqCst), 1);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    /// The scenario of `support::steps_model::a_takeover_does_not_run_a_recorded_step_again`.
    async fn a_takeover_does_not_run_a_recorded_step_again(store: &RedisStore) {
        crate::support::steps_model::a_takeover_does_not_run_a_recorded_step_again(
            store,
            Duration::from_millis(300),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_call_is_retried_without_its_recorded_step_on_a_server() {
        a_failed_call_is_retried_without_its_recorded_step(&shared_store("steps-retry").await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_call_is_retried_without_its_recorded_step_on_the_cluster() {
        a_failed_call_is_retried_without_its_recorded_step(&cluster_store("steps-retry").await)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_does_not_run_a_recorded_step_again_on_a_server() {
        a_takeover_does_not_run_a_recorded_step_again(&shared_store("steps-takeover").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_takeover_does_not_run_a_recorded_step_again_on_the_cluster() {
        a_takeover_does_not_run_a_recorded_step_again(&cluster_store("steps-takeover").await).await;
    }

    /// A key reused for another request (another amount: another fingerprint) does not inherit
    /// the first request's steps: the first request (100) charges and fails; the other (200)
    /// gets `Error::KeyReused` and its charge does not run; the first, retried, resumes with its
    /// recorded charge and completes.
    async fn a_key_reused_for_another_amount_does_not_inherit_its_steps(store: &RedisStore) {
        let charges = AtomicUsize::new(0);
        let attempt = |amount: u64, fail: bool| {
            let charges = &charges;
            Idempotent::new(store, ("pay", 1u32))
                .name("test")
                .fingerprint(&amount)
                .run_with_outcome(move || async move {
                    let receipt = idem::step("charge", || async {
                        charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, AppError>(format!("ch_{amount}"))
                    })
                    .await?;
                    if fail {
                        return Err(AppError::Failed);
                    }
                    Ok(receipt)
                })
        };
        assert!(matches!(attempt(100, true).await, Err(AppError::Failed)));
        assert_eq!(charges.load(Ordering::SeqCst), 1);
        match attempt(200, false).await {
            Err(AppError::Idem(Error::KeyReused)) => {}
            other => panic!("another amount must get KeyReused, got {other:?}"),
        }
        assert_eq!(
            charges.load(Ordering::SeqCst),
            1,
            "the other request's charge did not run"
        );
        let out = attempt(100, false)
            .await
            .expect("the first request resumes");
        assert_eq!(
            (out.value.as_str(), out.status),
            ("ch_100", Status::Executed)
        );
        assert_eq!(
            charges.load(Ordering::SeqCst),
            1,
            "and does not charge again"
        );
        match attempt(200, false).await {
            Err(AppError::Idem(Error::KeyReused)) => {}
            other => panic!("the completed key replays only to its request, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_reused_for_another_amount_does_not_inherit_its_steps_on_a_server() {
        a_key_reused_for_another_amount_does_not_inherit_its_steps(
            &shared_store("steps-reused").await,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_reused_for_another_amount_does_not_inherit_its_steps_on_the_cluster() {
        a_key_reused_for_another_amount_does_not_inherit_its_steps(
            &cluster_store("steps-reused").await,
        )
        .await;
    }

    /// What the server holds for the fingerprint: the steps hash keeps its first claim's (`fp`,
    /// none without one), later steps do not change it; a claim with another one reads
    /// `KeyReused`, which flags nothing, so its completion leaves the steps to the request that
    /// recorded them; a malformed `fp` makes the hash foreign.
    #[tokio::test]
    async fn the_steps_hash_keeps_its_first_claims_fingerprint() {
        let server = RedisServer::shared();
        let store = shared_store("steps-fp").await;
        let (a, b) = (Fingerprint::of(&100u64), Fingerprint::of(&200u64));
        let claim = |key: Key, fp: Option<Fingerprint>| {
            let store = store.clone();
            async move {
                match store.claim(key, fp, LONG).await {
                    Ok(Claim::Acquired(token)) => token,
                    other => panic!("expected to acquire, got {other:?}"),
                }
            }
        };
        let hget = |name: &str, field: &str| bulk(server.cmd(&["HGET", name, field]));

        let key = Key::new("test", "fp");
        let (record, steps) = (store.record_name(&key), store.steps_name(&key).unwrap());
        let token = claim(key, Some(a)).await;
        assert_eq!(
            record_one(&store, key, token, "charge").await,
            StepRecorded::Recorded
        );
        assert_eq!(hget(&steps, "fp").as_deref(), Some(&a.as_bytes()[..]));
        assert!(store.release(key, token).await.unwrap());
        let token = claim(key, None).await;
        assert_eq!(
            record_one(&store, key, token, "reserve").await,
            StepRecorded::Recorded
        );
        assert_eq!(
            hget(&steps, "fp").as_deref(),
            Some(&a.as_bytes()[..]),
            "a later step keeps the hash's fingerprint"
        );
        assert!(store.release(key, token).await.unwrap());

        let other = claim(key, Some(b)).await;
        assert_eq!(
            store.steps(key, other).await.ok(),
            Some(RecordedSteps::KeyReused)
        );
        assert_eq!(hget(&record, "steps"), None, "a reused read flags nothing");
        let stored = store
            .complete(key, other, Some(b), Bytes::from_static(b"1"), LONG)
            .await;
        assert!(
            matches!(stored, Ok(idem::store::Completion::Stored)),
            "{stored:?}"
        );
        assert_eq!(
            int(server.cmd(&["HLEN", &steps])),
            4,
            "the other request's completion left the steps (idem, fp, two steps)"
        );
        assert!(store.remove(key).await.unwrap());
        assert_eq!(int(server.cmd(&["EXISTS", &steps])), 0);

        let bare = Key::new("test", "no fp");
        let steps = store.steps_name(&bare).unwrap();
        let token = claim(bare, None).await;
        record_one(&store, bare, token, "charge").await;
        assert_eq!(hget(&steps, "fp"), None, "no fingerprint, no fp");
        assert!(matches!(
            store.steps(bare, token).await,
            Ok(RecordedSteps::Held(found)) if found.len() == 1
        ));

        server.cmd(&["HSET", &steps, "fp", "short"]);
        match store.steps(bare, token).await {
            Err(Error::Store(err)) => {
                let msg = err.to_string();
                assert!(msg.contains(&steps) && msg.contains("fingerprint"), "{msg}");
            }
            other => panic!("a malformed fp must be foreign, got {other:?}"),
        }
        server.cmd(&["DEL", &steps]);
        assert!(store.remove(bare).await.unwrap());
    }

    /// The call is dropped (its caller's timeout) while the record of a step whose effect ran
    /// is on its way, and that record never reaches the server (the connection is cut under
    /// it): the store records the step in the background and only then releases the claim, so
    /// the retry gets the recorded charge instead of charging again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_call_hands_its_lost_step_record_to_the_store() {
        let server = RedisServer::start();
        let proxy = ChaosProxy::start(server.port());
        let store = store_on(&proxy.url(), "steps-dropped").await;
        let charges = AtomicUsize::new(0);
        let call = || {
            Idempotent::new(&store, "dropped")
                .name("test")
                .run_with_outcome(|| async {
                    let receipt = idem::step("charge", || async {
                        let n = charges.fetch_add(1, Ordering::SeqCst);
                        // The effect ran; its record will not reach the server.
                        proxy.hold(true);
                        Ok::<_, Error>(format!("ch_{n}"))
                    })
                    .await?;
                    Ok::<_, Error>(receipt)
                })
        };
        let dropped = tokio::time::timeout(Duration::from_millis(300), call()).await;
        assert!(dropped.is_err(), "the call waits for its step's record");
        // The background task's record is held too; then the connection is cut under both.
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.cut_all();
        proxy.hold(false);
        let out = call().await.expect("the retry completes");
        assert_eq!(
            (out.value.as_str(), out.status),
            ("ch_0", Status::Executed),
            "the retry gets the recorded charge"
        );
        assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once");
    }

    /// `release_on_drop_after_steps` while the server cannot be reached: the background task
    /// tries again with backoff, and records the steps, then releases, once it is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_steps_are_recorded_when_the_server_is_back() {
        let server = RedisServer::start();
        let proxy = ChaosProxy::start(server.port());
        let store = RedisStore::builder()
            .prefix(fresh_prefix("steps-dropped-outage"))
            .timeout(Duration::from_millis(300))
            .connect(&proxy.url())
            .await
            .expect("connect");
        let key = Key::new("test", "outage");
        let token = acquire(&store, key, LONG).await;
        proxy.refuse(true);
        proxy.cut_all();
        store.release_on_drop_after_steps(
            key,
            token,
            vec![("charge".into(), Bytes::from_static(b"\"ch_1\""))],
            LONG,
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        proxy.refuse(false);
        let started = std::time::Instant::now();
        let next = loop {
            match store.claim(key, None, LONG).await {
                Ok(Claim::Acquired(next)) => break next,
                Ok(Claim::Busy { .. }) | Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("the dropped claim must be released, got {other:?}"),
            }
        };
        assert_eq!(
            store.steps(key, next).await.ok(),
            Some(RecordedSteps::Held(vec![(
                "charge".into(),
                Bytes::from_static(b"\"ch_1\"")
            )])),
            "recorded before the release"
        );
    }

    /// A value at a steps hash's name that is not ours (another program shares the prefix): a
    /// step or a read of steps is an error naming it; a completion is stored all the same; a
    /// removal refuses; it is left untouched by all of them.
    #[tokio::test]
    async fn garbage_at_a_steps_name_is_an_error_and_left_alone() {
        let server = RedisServer::shared();
        let store = shared_store("steps-garbage").await;
        let cases: &[(&str, &[&[&str]])] = &[
            ("a string", &[&["SET", "S", "hello"]]),
            (
                "a hash without the marker",
                &[&["HSET", "S", "step:x", "1"]],
            ),
            (
                "another marker",
                &[&["HSET", "S", "idem", "1"], &["PEXPIRE", "S", "60000"]],
            ),
            (
                "no expiry",
                &[&["HSET", "S", "idem", "steps", "step:x", "1"]],
            ),
        ];
        for (i, (what, setup)) in cases.iter().enumerate() {
            let key = Key::new("test", &("garbage", i));
            let steps = store.steps_name(&key).expect("a steps name");
            for cmd in *setup {
                let cmd: Vec<&str> = cmd
                    .iter()
                    .map(|a| if *a == "S" { steps.as_str() } else { a })
                    .collect();
                assert!(!matches!(server.cmd(&cmd), Resp::Error(_)), "{cmd:?}");
            }
            let snapshot = server.cmd(&["DUMP", &steps]);
            let token = acquire(&store, key, LONG).await;
            let recorded = store
                .record_step(key, token, "charge".into(), Bytes::new(), LONG)
                .await;
            let read = store.steps(key, token).await;
            let messages = [
                recorded.map(|r| format!("{r:?}")),
                read.map(|r| format!("{r:?}")),
            ];
            for message in messages {
                match message {
                    Err(Error::Store(err)) => {
                        let msg = err.to_string();
                        assert!(
                            msg.contains(&steps) && msg.contains("not idem's step records"),
                            "{what}: {msg}"
                        );
                    }
                    other => panic!("{what}: expected Error::Store, got {other:?}"),
                }
            }
            let stored = store
                .complete(key, token, None, Bytes::from_static(b"1"), LONG)
                .await;
            assert!(
                matches!(stored, Ok(idem::store::Completion::Stored)),
                "{what}: {stored:?}"
            );
            assert!(
                matches!(store.remove(key).await, Err(Error::Store(_))),
                "{what}: remove refuses"
            );
            assert_eq!(
                server.cmd(&["DUMP", &steps]),
                snapshot,
                "{what}: left untouched"
            );
            assert!(
                matches!(store.claim(key, None, LONG).await, Ok(Claim::Completed(_))),
                "{what}: the record is still there"
            );
            server.cmd(&["DEL", &steps]);
            assert!(store.remove(key).await.unwrap());
        }
    }

    /// A prefix with braces but no hash tag leaves no name in a record's slot: the store says
    /// so once when it connects (a warning naming the prefix and the fix), steps are refused
    /// with an error that says how to fix the prefix, and everything else works.
    #[tokio::test]
    async fn a_prefix_without_a_slot_for_steps_refuses_them_and_nothing_else() {
        const NO_TAG: &str = "has braces but no Redis Cluster hash tag";
        let logs = LogCapture::install();
        let url = RedisServer::shared().url();
        store_on(&url, "steps-slot-fine").await;
        assert!(!logs.contains(NO_TAG), "{}", logs.text());
        let prefix = format!("{{}}{}", fresh_prefix("steps-no-slot"));
        let store = store_on_prefix(&url, &prefix).await;
        let text = logs.text();
        let warning = text
            .lines()
            .find(|line| line.contains(NO_TAG))
            .unwrap_or_else(|| panic!("a warning at connect: {text}"));
        for part in ["WARN", "idem", prefix.as_str(), "{idem}:", "idem::step"] {
            assert!(warning.contains(part), "{part}: {warning}");
        }
        assert_eq!(text.matches(NO_TAG).count(), 1, "once: {text}");
        let key = Key::new("test", "no slot");
        assert_eq!(store.steps_name(&key), None);
        let runs = AtomicUsize::new(0);
        let result = Idempotent::new(&store, "no slot")
            .name("test")
            .run(|| async {
                idem::step("charge", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(1u32)
                })
                .await
            })
            .await;
        match result {
            Err(Error::Store(err)) => {
                let msg = err.to_string();
                assert!(msg.contains("hash tag") && msg.contains(&prefix), "{msg}");
            }
            other => panic!("expected Error::Store, got {other:?}"),
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "read first: the step did not run"
        );
        let v = Idempotent::new(&store, "no slot")
            .name("test")
            .run(|| async { Ok::<_, Error>(2u32) })
            .await
            .unwrap();
        assert_eq!(v, 2);
        assert!(store.remove(key).await.unwrap());
    }

    /// While a slot migrates, Redis answers `TRYAGAIN` to a script on a record and its steps
    /// hash as long as only one of them is on the node: a call without steps (whose operations
    /// name the record only) is not held up, a step waits for the migration to end, within the
    /// store's timeout, and fails cleanly (nothing written) when the timeout comes first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_in_a_migrating_slot_waits_for_the_migration() {
        let cluster = tokio::task::block_in_place(|| RedisCluster::start(3));
        let prefix = format!("{{steps-{}}}:", Token::generate().as_u128());
        let connect = |timeout: Duration| {
            RedisStore::builder()
                .prefix(prefix.clone())
                .timeout(timeout)
                .connect_cluster(cluster.urls())
        };
        let store = connect(Duration::from_secs(10)).await.expect("connect");
        let impatient = connect(Duration::from_millis(300)).await.expect("connect");
        let slot = cluster.slot_of(&prefix);
        let (from, to) = (cluster.owner_of(slot), (cluster.owner_of(slot) + 1) % 3);
        let plain = Key::new("test", "no steps");
        let stepping = Key::new("test", "steps");
        let plain_token = acquire(&store, plain, LONG).await;
        let token = acquire(&store, stepping, LONG).await;

        tokio::task::block_in_place(|| cluster.begin_migration(slot, from, to));
        let started = std::time::Instant::now();
        let stored = store
            .complete(plain, plain_token, None, Bytes::from_static(b"1"), LONG)
            .await;
        assert!(
            matches!(stored, Ok(idem::store::Completion::Stored)),
            "{stored:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "not held up"
        );

        let started = std::time::Instant::now();
        let refused = impatient
            .record_step(stepping, token, "early".into(), Bytes::new(), LONG)
            .await;
        assert!(matches!(refused, Err(Error::Store(_))), "{refused:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let steps_name = store.steps_name(&stepping).expect("a steps name");

        let step = {
            let store = store.clone();
            tokio::spawn(async move {
                let recorded = store
                    .record_step(stepping, token, "charge".into(), Bytes::new(), LONG)
                    .await;
                (recorded, std::time::Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let finished = std::time::Instant::now();
        tokio::task::block_in_place(|| cluster.finish_migration(slot, from, to));
        let (recorded, at) = step.await.expect("the step's task");
        assert_eq!(recorded.ok(), Some(StepRecorded::Recorded));
        assert!(at >= finished, "the step waited for the migration");
        assert_eq!(
            store.steps(stepping, token).await.ok(),
            Some(RecordedSteps::Held(vec![("charge".into(), Bytes::new())])),
            "the step refused before wrote nothing"
        );
        let stored = store
            .complete(stepping, token, None, Bytes::from_static(b"1"), LONG)
            .await;
        assert!(
            matches!(stored, Ok(idem::store::Completion::Stored)),
            "{stored:?}"
        );
        assert_eq!(int(cluster.nodes()[to].cmd(&["EXISTS", &steps_name])), 0);
    }
}
