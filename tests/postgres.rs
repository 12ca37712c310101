#![cfg(feature = "postgres")]
//! `PostgresStore` against a real PostgreSQL that the harness creates with `initdb` (see
//! `support/postgres.rs`): the conformance suite, one statement per replay, the transactional
//! mode (failure, crash, retry), a server crash, large values and hostile keys, several
//! processes on the same keys, the attribute, and the `postgres_inbox` example; then the
//! deployments of issues 13, 19 and 21: leases counted from their grant, waiting that holds no
//! pooled connection, cancellation with a busy pool, PgBouncer in transaction mode, databases
//! whose default isolation is serializable or repeatable read, concurrent migrations into one
//! new schema, and the durability checks (unlogged table, `synchronous_commit = off`).
//!
//! Tests that need another process re-run this test binary with `IDEM_PG_CHILD` set; the
//! `child_process_entry` test is that process's work, and does nothing otherwise.

mod support;

#[path = "../examples/postgres_inbox.rs"]
#[allow(dead_code)]
mod postgres_inbox;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem::store::postgres::IfUnsafe;
use idem::store::postgres::tokio_postgres;
use idem::store::{Bytes, Claim, Completion};
use idem::{Error, Idempotent, Key, OnConflict, PostgresStore, Status, Store, idempotent};
use support::postgres::PgServer;
use support::postgres::pgbouncer::PgBouncer;

/// A store on the shared server's default table, migrated.
async fn shared_store() -> PostgresStore {
    let store = PostgresStore::connect(&PgServer::shared().url())
        .await
        .expect("store from URL");
    store.migrate().await.expect("migrate");
    store
}

/// A plain client for setting up and inspecting tables.
async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(connection);
    client
}

async fn count(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    client
        .query_one(sql, params)
        .await
        .expect("count query")
        .get(0)
}

mod conformance {
    use std::sync::Arc;

    use idem::Store;

    idem::conformance_tests!(async { Arc::new(super::shared_store().await) as Arc<dyn Store> });
}

/// Every check the conformance suite lists runs in this file: the test binary's own list of
/// tests names each of them.
#[test]
fn every_conformance_check_runs_here() {
    let exe = std::env::current_exe().expect("path of the test binary");
    let out = Command::new(exe)
        .args(["--list", "--format=terse"])
        .stdin(Stdio::null())
        .output()
        .expect("list this binary's tests");
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = idem::conformance::CHECKS
        .iter()
        .copied()
        .filter(|check| !listed.contains(&format!("conformance::{check}: test")))
        .collect();
    assert!(
        missing.is_empty(),
        "conformance checks not run on PostgreSQL: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[tokio::test]
async fn custom_schema_and_table_are_created_and_used() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .schema("Idem_Custom")
        .table("Records_2")
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.expect("migrate is idempotent");
    let key = Key::new("custom", &1u8);
    assert!(matches!(
        store.claim(key, None, Duration::from_secs(60)).await,
        Ok(Claim::Acquired(_))
    ));
    let db = client(&url).await;
    let n = count(
        &db,
        "SELECT count(*) FROM \"Idem_Custom\".\"Records_2\" WHERE key = $1",
        &[&&key.as_bytes()[..]],
    )
    .await;
    assert_eq!(n, 1, "the record is in the configured table");
    assert!(
        store
            .migration_sql()
            .contains("\"Idem_Custom\".\"Records_2\"")
    );
}

/// `connect` opens the first connection, as the Redis store's does: a server that is not there
/// fails at construction, not at the first call; and the store names its table and schema as
/// given (names, not quoted SQL).
#[tokio::test]
async fn connect_is_eager_and_the_store_names_its_table() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let nobody = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let refused = PostgresStore::builder()
        .connect_timeout(Duration::from_secs(1))
        .connect(&nobody)
        .await;
    assert!(matches!(refused, Err(Error::Store(_))), "{refused:?}");

    let store = PostgresStore::builder()
        .schema("idem_named")
        .table("Named_Records")
        .connect(&PgServer::shared().url())
        .await
        .unwrap();
    assert_eq!(
        (store.schema(), store.table()),
        ("idem_named", "Named_Records")
    );
    let default = PostgresStore::connect(&PgServer::shared().url())
        .await
        .unwrap();
    assert_eq!(
        (default.schema(), default.table()),
        ("public", "idem_records")
    );
}

#[tokio::test]
async fn hostile_table_names_are_refused() {
    for bad in ["x\"; DROP TABLE users; --", "a b", "", "1x", "ä", "x'y"] {
        let built = PostgresStore::builder()
            .table(bad)
            .connect("postgres://127.0.0.1/x")
            .await;
        // Refused for its name, before any connection is tried.
        assert!(
            matches!(&built, Err(Error::Store(e)) if e.to_string().contains("table")),
            "table {bad:?} must be refused: {built:?}"
        );
        let built = PostgresStore::builder()
            .schema(bad)
            .connect("postgres://127.0.0.1/x")
            .await;
        assert!(
            matches!(&built, Err(Error::Store(e)) if e.to_string().contains("schema")),
            "schema {bad:?} must be refused: {built:?}"
        );
    }
    assert!(matches!(
        PostgresStore::connect("not a url ::: =").await,
        Err(Error::Store(_))
    ));
}

#[tokio::test]
async fn concurrent_migrations_do_not_conflict() {
    let url = PgServer::shared().url();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let store = PostgresStore::builder()
            .schema("concurrent_mig")
            .table("records")
            .connect(&url)
            .await
            .unwrap();
        tasks.spawn(async move { store.migrate().await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().expect("concurrent migrate");
    }
}

// ---------------------------------------------------------------------------------------------
// One statement per replay.

#[tokio::test]
async fn a_replay_is_one_statement() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .unwrap();
    // A table of its own, so statements of tests running meanwhile are not counted.
    let store = PostgresStore::builder()
        .table("replay_count")
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let runs = AtomicUsize::new(0);
    let call = || {
        Idempotent::new(&store, ("replay", 1u8))
            .name("test")
            .run_with_outcome(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(String::from("receipt"))
            })
    };
    assert_eq!(call().await.unwrap().status, Status::Executed);
    // Count from here: replays only.
    db.execute("SELECT pg_stat_statements_reset()", &[])
        .await
        .unwrap();
    const REPLAYS: i64 = 10;
    for _ in 0..REPLAYS {
        let out = call().await.unwrap();
        assert_eq!(
            (out.value.as_str(), out.status),
            ("receipt", Status::Replayed)
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let statements = count(
        &db,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE query LIKE '%replay_count%' AND query NOT LIKE '%pg_stat_statements%'",
        &[],
    )
    .await;
    assert_eq!(
        statements, REPLAYS,
        "each replay must be exactly one statement"
    );
    let claims = count(
        &db,
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
         WHERE query LIKE '%replay_count%' AND query LIKE '%INSERT%' \
           AND query NOT LIKE '%pg_stat_statements%'",
        &[],
    )
    .await;
    assert_eq!(
        claims, 0,
        "a record the store completed is replayed with a plain lookup, not the claim statement"
    );
}

/// A completed record the store has seen is replayed with a plain lookup; a hint gone stale (the
/// record removed, or completed anew by another process) is found out by that lookup, and the
/// call claims as it would have: it never replays a value the table no longer holds, and a
/// fingerprint is still checked.
#[tokio::test]
async fn a_known_record_that_changed_is_claimed_as_usual() {
    let url = PgServer::shared().url();
    let store = |url: &str| {
        let url = url.to_owned();
        async move {
            let store = PostgresStore::builder()
                .table("known_hints")
                .connect(&url)
                .await
                .unwrap();
            store.migrate().await.unwrap();
            store
        }
    };
    let (mine, other) = (store(&url).await, store(&url).await);
    let call = |store: &PostgresStore, value: u32| {
        let store = store.clone();
        async move {
            Idempotent::new(&store, ("known", std::process::id()))
                .name("test")
                .run_with_outcome(move || async move { Ok::<_, Error>(value) })
                .await
                .map(|out| (out.value, out.status))
        }
    };
    let key = Key::new("test", &("known", std::process::id()));
    assert_eq!(call(&mine, 1).await.unwrap(), (1, Status::Executed));
    assert_eq!(call(&mine, 9).await.unwrap(), (1, Status::Replayed));

    assert!(other.remove(key).await.unwrap());
    assert_eq!(call(&mine, 2).await.unwrap(), (2, Status::Executed));
    assert_eq!(call(&mine, 9).await.unwrap(), (2, Status::Replayed));

    assert!(other.remove(key).await.unwrap());
    assert_eq!(call(&other, 3).await.unwrap(), (3, Status::Executed));
    assert_eq!(call(&mine, 9).await.unwrap(), (3, Status::Replayed));
    assert_eq!(call(&mine, 9).await.unwrap(), (3, Status::Replayed));

    let with_fp = |fp: &'static str| {
        let mine = mine.clone();
        async move {
            Idempotent::new(&mine, ("known fp", std::process::id()))
                .name("test")
                .fingerprint(fp)
                .run_with_outcome(|| async { Ok::<_, Error>(4u32) })
                .await
                .map(|out| (out.value, out.status))
        }
    };
    assert_eq!(with_fp("request").await.unwrap(), (4, Status::Executed));
    assert_eq!(with_fp("request").await.unwrap(), (4, Status::Replayed));
    let reused = with_fp("another request").await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    assert!(
        mine.remove(Key::new("test", &("known fp", std::process::id())))
            .await
            .unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency inside one process: the claim's snapshot race.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_callers_execute_once_and_never_error() {
    let store = Arc::new(shared_store().await);
    for round in 0..10u32 {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (store, runs) = (store.clone(), runs.clone());
            tasks.spawn(async move {
                Idempotent::new(&*store, ("race", round, std::process::id()))
                    .name("tests.postgres.race")
                    .run(|| async {
                        let n = runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok::<_, Error>(n + 100)
                    })
                    .await
            });
        }
        let mut values = HashSet::new();
        while let Some(joined) = tasks.join_next().await {
            values.insert(joined.unwrap().expect("no caller may fail"));
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "round {round}: the body ran once"
        );
        assert_eq!(
            values.len(),
            1,
            "round {round}: every caller got the one result"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Large values and hostile keys.

#[tokio::test]
async fn large_values_and_hostile_keys_round_trip_exactly() {
    let store = shared_store().await;
    let every_byte: Vec<u8> = (0..=255u8).collect();
    let hostile = [
        "'; DROP TABLE idem_records; --".to_string(),
        "\0".to_string(),
        "\"quoted\"\\".to_string(),
        String::from_utf8_lossy(&every_byte).into_owned(),
        "$1 $2 %s {}".to_string(),
    ];
    let mut seen = HashSet::new();
    for (i, text) in hostile.iter().enumerate() {
        let value: Vec<u8> = (0..(3 << 20) + i).map(|j| (j * 31 + i) as u8).collect();
        let key = Key::new(text, &(text.as_str(), &every_byte[..], i));
        assert!(seen.insert(key), "distinct hostile keys are distinct");
        let Ok(Claim::Acquired(token)) = store.claim(key, None, Duration::from_secs(60)).await
        else {
            panic!("hostile key {i} must be claimable");
        };
        let done = store
            .complete(
                key,
                token,
                None,
                Bytes::from(value.clone()),
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(done.unwrap(), Completion::Stored);
        match store.claim(key, None, Duration::from_secs(60)).await {
            Ok(Claim::Completed(done)) => assert!(
                done.value[..] == value[..],
                "a {} byte value changed",
                value.len()
            ),
            other => panic!("expected the completed record, got {other:?}"),
        }
    }
    // Through the executor: a several-MB string result with NULs, quotes and every char.
    let big: String = (0..(2 << 20))
        .map(|i| char::from_u32(i % 0x800).unwrap_or('?'))
        .collect();
    let expect = big.clone();
    let got = Idempotent::new(&store, (hostile[0].as_str(), "\0\u{ffff}"))
        .name("test")
        .run(move || async move { Ok::<_, Error>(big) })
        .await
        .unwrap();
    let again = Idempotent::new(&store, (hostile[0].as_str(), "\0\u{ffff}"))
        .name("test")
        .run(|| async { Ok::<_, Error>(String::from("not run")) })
        .await
        .unwrap();
    assert!(
        got == expect && again == expect,
        "the replayed value is exact"
    );
}

// ---------------------------------------------------------------------------------------------
// Cleanup and cancellation.

#[tokio::test]
async fn purge_removes_expired_rows_only() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .table("purge_test")
        // The purge under test, not the store's own cleanup.
        .auto_cleanup(false)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let short = Duration::from_millis(200);
    for i in 0..20u32 {
        let key = Key::new("purge", &i);
        let Ok(Claim::Acquired(token)) = store.claim(key, None, Duration::from_secs(60)).await
        else {
            panic!("claim");
        };
        let ttl = if i % 2 == 0 {
            short
        } else {
            Duration::from_secs(600)
        };
        store
            .complete(key, token, None, Bytes::from_static(b"v"), ttl)
            .await
            .unwrap();
    }
    tokio::time::sleep(short * 2).await;
    assert_eq!(store.purge_expired().await.unwrap(), 10);
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    let db = client(&url).await;
    assert_eq!(count(&db, "SELECT count(*) FROM purge_test", &[]).await, 10);
}

#[tokio::test]
async fn a_cancelled_call_frees_its_key_at_once() {
    let store = shared_store().await;
    let key = ("cancelled", std::process::id());
    let started = tokio::sync::Notify::new();
    let call = Idempotent::new(&store, key)
        .name("test")
        .lease(Duration::from_secs(60))
        .run(|| async {
            started.notify_one();
            std::future::pending::<Result<u8, Error>>().await
        });
    tokio::select! {
        _ = call => unreachable!(),
        () = started.notified() => {}
    }
    // The release was handed to the runtime; the 60 s lease does not have to run out.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Idempotent::new(&store, key)
            .name("test")
            .on_conflict(idem::OnConflict::Reject)
            .run(|| async { Ok::<_, Error>(7u8) })
            .await;
        match out {
            Ok(v) => {
                assert_eq!(v, 7);
                break;
            }
            Err(Error::InProgress { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the cancelled claim was not released: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The attribute.

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Idem(#[from] Error),
}

struct Payments {
    store: PostgresStore,
    charges: AtomicUsize,
}

impl Payments {
    #[idempotent(store = self.store, key = order, ttl = "1h", name = "tests.postgres.charge")]
    async fn charge(&self, order: u64) -> Result<(u64, usize), AppError> {
        let n = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((order * 100, n))
    }
}

#[tokio::test]
async fn the_attribute_works_with_a_postgres_store() {
    let payments = Payments {
        store: shared_store().await,
        charges: AtomicUsize::new(0),
    };
    let order = u64::from(std::process::id()) << 20 | 7;
    let first = payments.charge(order).await.unwrap();
    let retry = payments.charge(order).await.unwrap();
    assert_eq!(first, retry);
    assert_eq!(payments.charges.load(Ordering::SeqCst), 1);
    // A second store on the same table (another process, say) replays it too.
    let other = Payments {
        store: shared_store().await,
        charges: AtomicUsize::new(0),
    };
    assert_eq!(other.charge(order).await.unwrap(), first);
    assert_eq!(other.charges.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Transactional mode.

async fn orders_table(db: &tokio_postgres::Client) {
    // `CREATE TABLE IF NOT EXISTS` is not safe against itself: two tests creating the table at
    // once can fail on the catalog's unique index. A transaction-scoped advisory lock serialises
    // them.
    db.batch_execute(
        "BEGIN; \
         SELECT pg_advisory_xact_lock(4711); \
         CREATE TABLE IF NOT EXISTS tx_orders (id bigserial PRIMARY KEY, k text NOT NULL, note text); \
         COMMIT;",
    )
    .await
    .unwrap();
}

#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("declined")]
    Declined,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Idem(#[from] Error),
}

fn unique(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn record_exists(db: &tokio_postgres::Client, name: &str, key: &str) -> bool {
    let key = Key::new(name, &key);
    count(
        db,
        "SELECT count(*) FROM idem_records WHERE key = $1",
        &[&&key.as_bytes()[..]],
    )
    .await
        > 0
}

#[tokio::test]
async fn transactional_body_that_fails_leaves_neither_writes_nor_record_and_the_retry_runs_once() {
    let url = PgServer::shared().url();
    let store = shared_store().await;
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("fails");
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |fail: bool| {
        let (k, runs) = (k.clone(), runs.clone());
        store
            .transactional(k.clone())
            .name("tx.orders")
            .run_with_outcome(async move |tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k])
                    .await?;
                if fail {
                    return Err(TxError::Declined);
                }
                Ok(k.len())
            })
    };
    assert!(matches!(call(true).await, Err(TxError::Declined)));
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        0,
        "no writes"
    );
    assert!(!record_exists(&db, "tx.orders", &k).await, "no record");

    let out = call(false).await.unwrap();
    assert_eq!((out.value, out.status), (k.len(), Status::Executed));
    let out = call(false).await.unwrap();
    assert_eq!(out.status, Status::Replayed);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the failure, then the retry, once"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        1
    );
    assert!(record_exists(&db, "tx.orders", &k).await);

    // The ordinary executor sees the same record (same name and key).
    let replay = Idempotent::new(&store, k.clone())
        .name("tx.orders")
        .run(|| async { Ok::<usize, Error>(0) })
        .await
        .unwrap();
    assert_eq!(replay, k.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transactional_duplicates_write_once() {
    let url = PgServer::shared().url();
    let store = Arc::new(shared_store().await);
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("concurrent");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (store, k) = (store.clone(), k.clone());
        tasks.spawn(async move {
            store
                .transactional(k.clone())
                .name("tx.orders")
                .run_with_outcome(async move |tx| {
                    let row = tx
                        .query_one("INSERT INTO tx_orders (k) VALUES ($1) RETURNING id", &[&k])
                        .await?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<i64, TxError>(row.get(0))
                })
                .await
        });
    }
    let mut statuses = BTreeMap::new();
    let mut values = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let out = joined.unwrap().expect("no duplicate may fail");
        *statuses.entry(out.status.as_str()).or_insert(0) += 1;
        values.insert(out.value);
    }
    assert_eq!(statuses.get("executed"), Some(&1), "{statuses:?}");
    assert_eq!(values.len(), 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_blocked_by_an_open_transaction_see_it_busy_then_replay() {
    let url = PgServer::shared().url();
    let store = Arc::new(shared_store().await);
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("blocked");
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let holder = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move {
            store
                .transactional(k.clone())
                .name("tx.orders")
                .run(async move |tx| {
                    tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k])
                        .await?;
                    let _ = entered_tx.send(());
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok::<_, TxError>(String::from("first"))
                })
                .await
        })
    };
    entered.await.unwrap();
    // The claim finds the key lock of the uncommitted claim taken and reports the key busy at
    // once, while the holder is still inside its transaction.
    let rejected = Idempotent::new(&*store, k.clone())
        .name("tx.orders")
        .on_conflict(idem::OnConflict::Reject)
        .run(|| async { Ok::<_, Error>(String::from("second")) })
        .await;
    assert!(
        matches!(rejected, Err(Error::InProgress { .. })),
        "got {rejected:?}"
    );
    assert!(
        !holder.is_finished(),
        "the rejection must not wait for the holder's commit"
    );
    // A waiting caller gets the holder's result once it commits.
    let waited = Idempotent::new(&*store, k.clone())
        .name("tx.orders")
        .run_with_outcome(|| async { Ok::<_, Error>(String::from("second")) })
        .await
        .unwrap();
    assert_eq!(
        (waited.value.as_str(), waited.status.is_replay()),
        ("first", true)
    );
    assert_eq!(holder.await.unwrap().unwrap(), "first");
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        1
    );
}

#[tokio::test]
async fn a_process_killed_before_commit_leaves_neither_and_the_retry_runs_once() {
    let server = PgServer::shared();
    let url = server.url();
    let store = shared_store().await;
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("crash");

    let mut child = child_process("crash", &url, &[("IDEM_PG_KEY", &k)]);
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let wrote = BufReader::new(stdout)
            .lines()
            .any(|l| l.map(|l| l.contains("WROTE")).unwrap_or(false));
        let _ = tx.send(wrote);
    });
    let wrote = rx.recv_timeout(Duration::from_secs(60));
    if wrote != Ok(true) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("the child's output");
        panic!(
            "the child must report its uncommitted write ({wrote:?}); its stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The child has inserted its order inside the transaction and is waiting: kill it.
    child.kill().expect("kill the child");
    let _ = child.wait();

    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        0,
        "no write"
    );
    assert!(!record_exists(&db, "tx.orders", &k).await, "no record");

    let runs = Arc::new(AtomicUsize::new(0));
    for expected in [Status::Executed, Status::Replayed, Status::Replayed] {
        let (k2, runs2) = (k.clone(), runs.clone());
        let out = store
            .transactional(k.clone())
            .name("tx.orders")
            .run_with_outcome(async move |tx| {
                runs2.fetch_add(1, Ordering::SeqCst);
                tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                    .await?;
                Ok::<_, TxError>(1u8)
            })
            .await
            .unwrap();
        assert_eq!(out.status, expected);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran once");
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        1
    );
}

// ---------------------------------------------------------------------------------------------
// A server crash.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_gives_prompt_store_errors_and_keeps_every_record() {
    let server = PgServer::start();
    let store = PostgresStore::builder()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(2))
        .connect(&server.url())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut written = Vec::new();
    for i in 0..25u32 {
        let v = Idempotent::new(&store, ("durable", i))
            .name("test")
            .run(|| async move { Ok::<_, Error>(format!("value {i}")) })
            .await
            .unwrap();
        written.push(v);
    }

    server.kill();
    for op in 0..3u32 {
        let started = Instant::now();
        let out = Idempotent::new(&store, ("durable", 1000 + op))
            .name("test")
            .run(|| async { Ok::<_, Error>(String::new()) })
            .await;
        assert!(
            matches!(out, Err(Error::Store(_))),
            "a dead server is a store error, got {out:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the error must be prompt: {:?}",
            started.elapsed()
        );
        assert!(matches!(
            store.remove(Key::new("x", &op)).await,
            Err(Error::Store(_))
        ));
    }

    server.restart();
    let runs = AtomicUsize::new(0);
    for (i, expected) in (0..25u32).zip(&written) {
        let got = Idempotent::new(&store, ("durable", i))
            .name("test")
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(String::from("ran again"))
            })
            .await
            .expect("the store works again after the restart");
        assert_eq!(&got, expected, "record {i} survived the crash");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no body ran again");
}

// ---------------------------------------------------------------------------------------------
// Several processes on the same keys.

const HAMMER_KEYS: u32 = 12;

#[test]
fn processes_hammering_the_same_keys_execute_each_once() {
    let url = PgServer::shared().url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tag = unique("hammer");
    rt.block_on(async {
        let db = client(&url).await;
        db.batch_execute(
            "CREATE TABLE IF NOT EXISTS hammer_runs (tag text, k int, mode text, pid int)",
        )
        .await
        .unwrap();
        shared_store().await;
    });
    let children: Vec<_> = (0..4)
        .map(|_| child_process("hammer", &url, &[("IDEM_PG_KEY", &tag)]))
        .collect();
    let mut results: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for child in children {
        let out = child
            .wait_with_output()
            .expect("wait for a hammering process");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a hammering process failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = 0;
        // libtest prints "test child_process_entry ... " before the first line.
        let reported = text
            .lines()
            .filter_map(|l| l.find("RESULT ").map(|at| &l[at + "RESULT ".len()..]));
        for line in reported {
            let (k, v) = line.split_once('=').expect("RESULT k=v");
            results
                .entry(k.to_owned())
                .or_default()
                .insert(v.to_owned());
            lines += 1;
        }
        assert_eq!(
            lines,
            2 * HAMMER_KEYS as usize * 3,
            "every call of the child reported"
        );
    }
    for (k, values) in &results {
        assert_eq!(
            values.len(),
            1,
            "key {k}: every process got the one result, got {values:?}"
        );
    }
    rt.block_on(async {
        let db = client(&url).await;
        for mode in ["executor", "transactional"] {
            let rows = db
                .query(
                    "SELECT k, count(*) FROM hammer_runs WHERE tag = $1 AND mode = $2 GROUP BY k",
                    &[&tag, &mode],
                )
                .await
                .unwrap();
            assert_eq!(rows.len(), HAMMER_KEYS as usize, "{mode}: every key ran");
            for row in rows {
                let (k, n): (i32, i64) = (row.get(0), row.get(1));
                assert_eq!(n, 1, "{mode}: key {k} executed {n} times");
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The example.

#[tokio::test]
async fn the_postgres_inbox_example_records_each_order_once() {
    let summary = postgres_inbox::run(&PgServer::shared().url())
        .await
        .expect("the example runs");
    assert_eq!(
        summary,
        postgres_inbox::Summary {
            deliveries: 12,
            executed: 6,
            replayed: 6,
            orders_recorded: 6,
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Child processes.

/// Re-runs this test binary as a child doing `role` (see [`child_process_entry`]).
fn child_process(role: &str, url: &str, env: &[(&str, &str)]) -> std::process::Child {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "child_process_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("IDEM_PG_CHILD", role)
    .env("IDEM_PG_URL", url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn a child test process")
}

/// The work of a child process; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var("IDEM_PG_CHILD") else {
        return;
    };
    let url = std::env::var("IDEM_PG_URL").expect("IDEM_PG_URL");
    let key = std::env::var("IDEM_PG_KEY").expect("IDEM_PG_KEY");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
        match role.as_str() {
            "crash" => crash_child(&store, key).await,
            "freeze" => freeze_child(&store, key).await,
            "hammer" => hammer_child(store, key).await,
            other => panic!("unknown child role {other}"),
        }
    });
}

/// Writes inside a transactional body, says so, and waits to be killed before the commit.
async fn crash_child(store: &PostgresStore, k: String) {
    let _ = store
        .transactional(k.clone())
        .name("tx.orders")
        .run(async move |tx| {
            tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k])
                .await?;
            println!("WROTE");
            std::future::pending::<()>().await;
            Ok::<u8, TxError>(0)
        })
        .await;
}

/// Holds a key in a transactional body with a 1 s lease, says so, and waits (to be frozen).
async fn freeze_child(store: &PostgresStore, k: String) {
    let _ = store
        .transactional(k.clone())
        .name("tx.frozen")
        .lease(Duration::from_secs(1))
        .run(async move |tx| {
            tx.execute(
                "INSERT INTO tx_orders (k, note) VALUES ($1, 'frozen')",
                &[&k],
            )
            .await?;
            println!("WROTE");
            std::future::pending::<()>().await;
            Ok::<u8, TxError>(0)
        })
        .await;
}

/// Calls every key three times at once, through the executor and in transactional mode; the
/// body records which process ran it.
async fn hammer_child(store: Arc<PostgresStore>, tag: String) {
    let pid = std::process::id() as i32;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..HAMMER_KEYS as i32 {
        for _ in 0..3 {
            let (store1, tag1) = (store.clone(), tag.clone());
            tasks.spawn(async move {
                let (store, tag) = (store1, tag1);
                let v = Idempotent::new(&*store, (tag.as_str(), k))
                    .name("hammer.executor")
                    .run(|| async {
                        let db = store.pool().get().await.map_err(Error::store)?;
                        db.execute(
                            "INSERT INTO hammer_runs (tag, k, mode, pid) VALUES ($1, $2, 'executor', $3)",
                            &[&tag, &k, &pid],
                        )
                        .await
                        .map_err(Error::store)?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, Error>(format!("{pid}"))
                    })
                    .await
                    .expect("executor call");
                println!("RESULT e{k}={v}");
            });
            let (store2, tag2) = (store.clone(), tag.clone());
            tasks.spawn(async move {
                let (store, tag) = (store2, tag2);
                let tag2 = tag.clone();
                let v = store
                    .transactional((tag.as_str(), k))
                    .name("hammer.transactional")
                    .run(async move |tx| {
                            tx.execute(
                                "INSERT INTO hammer_runs (tag, k, mode, pid) VALUES ($1, $2, 'transactional', $3)",
                                &[&tag2, &k, &pid],
                            )
                            .await?;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok::<_, TxError>(format!("{pid}"))
                        })
                    .await
                    .expect("transactional call");
                println!("RESULT t{k}={v}");
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a hammering task panicked");
    }
}

/// Transactional mode applies the executor's fingerprint rule: the same key with another
/// fingerprint is `KeyReused` and the stored result is untouched.
#[tokio::test]
async fn transactional_key_reused_with_another_fingerprint() {
    let store = shared_store().await;
    let k = unique("fingerprint");
    let runs = Arc::new(AtomicUsize::new(0));
    let call = |fingerprint: &'static str| {
        let runs = runs.clone();
        store
            .transactional(k.clone())
            .name("tx.fingerprint")
            .fingerprint(fingerprint)
            .run_with_outcome(async move |_tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(fingerprint.to_owned())
            })
    };
    let first = call("body A").await.unwrap();
    assert_eq!(
        (first.value.as_str(), first.status),
        ("body A", Status::Executed)
    );
    assert!(matches!(call("body B").await, Err(Error::KeyReused)));
    let again = call("body A").await.unwrap();
    assert_eq!(
        (again.value.as_str(), again.status),
        ("body A", Status::Replayed)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Issue 13: a lease is counted from its grant; waiting holds no pooled connection.

/// A plain call meets a key whose transactional holder keeps its uncommitted claim for 3 s and
/// then rolls back. The plain call must then be granted its whole lease (2 s): a third call
/// 100 ms into its body waits for it, and the body runs once. (Counted from the start of a
/// statement that had waited on the holder's row, the lease would already have run out and the
/// third call would take the key over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_met_a_held_key_is_granted_its_whole_lease() {
    let store = Arc::new(shared_store().await);
    let k = unique("grant");
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let holder = {
        let (store, k) = (store.clone(), k.clone());
        tokio::spawn(async move {
            store
                .transactional(k)
                .name("grant")
                .run(async move |_tx| {
                    let _ = entered_tx.send(());
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Err::<String, _>(TxError::Declined)
                })
                .await
        })
    };
    entered.await.unwrap();

    let runs = Arc::new(AtomicUsize::new(0));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let second = {
        let (store, k, runs) = (store.clone(), k.clone(), runs.clone());
        tokio::spawn(async move {
            Idempotent::new(&*store, k)
                .name("grant")
                .lease(Duration::from_secs(2))
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    Ok::<_, Error>(String::from("second"))
                })
                .await
        })
    };
    started
        .await
        .expect("the second call's body runs once the holder rolled back");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = Idempotent::new(&*store, k.clone())
        .name("grant")
        .lease(Duration::from_secs(2))
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(String::from("third"))
        })
        .await
        .unwrap();
    assert_eq!(second.await.unwrap().unwrap(), "second");
    assert_eq!(
        third, "second",
        "the third call waits for the second's result"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    assert!(matches!(holder.await.unwrap(), Err(TxError::Declined)));
}

/// A transactional call holds key K; seven duplicates of K wait for it; a first call of another
/// key must get a connection and finish while the holder is still inside its transaction. The
/// pool has 4 connections and the store's timeout (2 s) is shorter than the connections'
/// `lock_timeout` (5 s): duplicates sitting on connections, blocked on K's row, would starve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_waiting_for_a_transactional_holder_leave_connections_to_other_keys() {
    let store = Arc::new(
        PostgresStore::builder()
            .pool_size(4)
            .timeout(Duration::from_secs(2))
            .connect(&PgServer::shared().url())
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let k = unique("starve");
    let holding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let (finish_tx, finish) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let (store, k, holding) = (store.clone(), k.clone(), holding.clone());
        tokio::spawn(async move {
            store
                .transactional(k)
                .name("starve")
                .run(async move |_tx| {
                    let _ = entered_tx.send(());
                    let _ = finish.await;
                    holding.store(false, Ordering::SeqCst);
                    Ok::<_, TxError>(String::from("holder"))
                })
                .await
        })
    };
    entered.await.unwrap();

    let duplicate_runs = Arc::new(AtomicUsize::new(0));
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..7 {
        let (store, k, runs) = (store.clone(), k.clone(), duplicate_runs.clone());
        duplicates.spawn(async move {
            Idempotent::new(&*store, k)
                .name("starve")
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(String::from("duplicate"))
                })
                .await
        });
    }
    // Let every duplicate meet the held key (this only sets the scene; nothing is timed).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let other = Idempotent::new(&*store, unique("starve-other"))
        .name("starve")
        .run(|| async { Ok::<_, Error>(7u8) })
        .await;
    assert!(
        matches!(other, Ok(7)),
        "another key's first call must get a connection: {other:?}"
    );
    assert!(
        holding.load(Ordering::SeqCst),
        "the other key's call finished while the holder still held K"
    );

    let _ = finish_tx.send(());
    assert_eq!(holder.await.unwrap().unwrap(), "holder");
    while let Some(joined) = duplicates.join_next().await {
        assert_eq!(
            joined
                .unwrap()
                .expect("a duplicate must get the holder's result"),
            "holder"
        );
    }
    assert_eq!(duplicate_runs.load(Ordering::SeqCst), 0);
}

/// Pool of 2; the body returns `Ok` while two other calls hold both connections, so `complete`
/// waits for one; the caller's timeout fires and drops the call. The completion is finished in
/// the background (never a release): a retry 0.6 s later replays or waits, and the body runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_dropped_while_complete_waits_for_a_connection_is_not_run_again() {
    let store = Arc::new(
        PostgresStore::builder()
            .pool_size(2)
            .connect(&PgServer::shared().url())
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let k = unique("busy-pool");
    let runs = Arc::new(AtomicUsize::new(0));
    let body_started = Arc::new(tokio::sync::Notify::new());
    let may_return = Arc::new(tokio::sync::Notify::new());
    let returned = Arc::new(tokio::sync::Notify::new());
    let call = {
        let (runs, body_started, may_return, returned) = (
            runs.clone(),
            body_started.clone(),
            may_return.clone(),
            returned.clone(),
        );
        Idempotent::new(&*store, k.clone())
            .name("busy-pool")
            .lease(Duration::from_secs(5))
            .run(move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                body_started.notify_one();
                may_return.notified().await;
                returned.notify_one();
                Ok::<_, Error>(String::from("first"))
            })
    };
    // Boxed, so that dropping it below really drops the call (as a caller's timeout does).
    let mut call = Box::pin(call);

    // Two other calls take both connections and keep them.
    let release_hogs = Arc::new(tokio::sync::Semaphore::new(0));
    let mut hogs = tokio::task::JoinSet::new();
    tokio::select! {
        out = &mut call => panic!("the body waits, yet the call ended: {out:?}"),
        () = body_started.notified() => {}
    }
    let (hog_in_tx, mut hog_in) = tokio::sync::mpsc::channel(2);
    for i in 0..2 {
        let (store, release, hog_in_tx) = (store.clone(), release_hogs.clone(), hog_in_tx.clone());
        hogs.spawn(async move {
            store
                .transactional(unique(&format!("hog{i}")))
                .name("busy-pool")
                .run(async move |_tx| {
                    let _ = hog_in_tx.send(()).await;
                    let _permit = release.acquire().await;
                    Ok::<_, TxError>(i)
                })
                .await
        });
    }
    for _ in 0..2 {
        tokio::select! {
            out = &mut call => panic!("the body waits, yet the call ended: {out:?}"),
            _ = hog_in.recv() => {}
        }
    }
    // The body returns `Ok`; `complete` finds no free connection; the caller gives up.
    may_return.notify_one();
    tokio::select! {
        out = &mut call => panic!("complete cannot get a connection, yet the call ended: {out:?}"),
        () = returned.notified() => {}
    }
    let gave_up = tokio::time::timeout(Duration::from_millis(200), &mut call).await;
    assert!(gave_up.is_err(), "complete had no connection: {gave_up:?}");
    drop(call);

    // The other calls finish; the retry comes 0.6 s after the caller gave up.
    let releaser = {
        let release = release_hogs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            release.add_permits(2);
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = Idempotent::new(&*store, k)
        .name("busy-pool")
        .lease(Duration::from_secs(5))
        .run_with_outcome(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(String::from("retry"))
        })
        .await
        .unwrap();
    assert_eq!(
        (retry.value.as_str(), retry.status.is_replay()),
        ("first", true),
        "the retry gets the first call's result"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    releaser.await.unwrap();
    while let Some(joined) = hogs.join_next().await {
        joined
            .unwrap()
            .expect("the calls holding connections succeed");
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 21: deployments.

/// Four stores in pooler mode, each with 16 tasks calling the same 80 keys, through PgBouncer
/// in transaction mode with 4 server connections: every call succeeds, each body runs once, and
/// a second round replays every key. Transactional calls work through it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_pgbouncer_in_transaction_mode_every_call_succeeds_once() {
    const STORES: usize = 4;
    const TASKS: usize = 16;
    const KEYS: usize = 80;
    let server = PgServer::shared();
    let bouncer = PgBouncer::start(server, 4);
    let url = bouncer.url();
    let mut stores = Vec::new();
    for _ in 0..STORES {
        let store = PostgresStore::builder()
            .table("bouncer_records")
            .transaction_pooler(true)
            .pool_size(8)
            .connect(&url)
            .await
            .unwrap();
        stores.push(Arc::new(store));
    }
    let mut migrations = tokio::task::JoinSet::new();
    for store in &stores {
        let store = store.clone();
        migrations.spawn(async move { store.migrate().await });
    }
    while let Some(done) = migrations.join_next().await {
        done.unwrap().expect("migrate through PgBouncer");
    }

    let tag = unique("bouncer");
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    for round in ["executed", "replayed"] {
        let mut tasks = tokio::task::JoinSet::new();
        for (s, store) in stores.iter().enumerate() {
            for t in 0..TASKS {
                let (store, runs, tag) = (store.clone(), runs.clone(), tag.clone());
                tasks.spawn(async move {
                    let mut failures = Vec::new();
                    for i in 0..KEYS {
                        let k = (i + 7 * (s * TASKS + t)) % KEYS;
                        let runs = &runs;
                        let out = Idempotent::new(&*store, (tag.as_str(), k))
                            .name("bouncer")
                            .run(|| async move {
                                runs[k].fetch_add(1, Ordering::SeqCst);
                                Ok::<_, Error>(k * 10)
                            })
                            .await;
                        match out {
                            Ok(v) if v == k * 10 => {}
                            other => failures.push(format!("key {k}: {other:?}")),
                        }
                    }
                    failures
                });
            }
        }
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            failures.extend(joined.unwrap());
        }
        assert!(
            failures.is_empty(),
            "{round} round: {} of {} calls failed, e.g. {:?}",
            failures.len(),
            STORES * TASKS * KEYS,
            &failures[..failures.len().min(3)]
        );
        let counts: Vec<usize> = runs.iter().map(|n| n.load(Ordering::SeqCst)).collect();
        assert!(
            counts.iter().all(|&n| n == 1),
            "{round} round: every body runs once: {counts:?}"
        );
    }

    // Transactional mode through the pooler: 8 keys, 4 callers each, from every store.
    let db = client(&server.url()).await;
    orders_table(&db).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        for store in &stores {
            let (store, k) = (store.clone(), format!("{tag}-tx-{i}"));
            tasks.spawn(async move {
                let k2 = k.clone();
                store
                    .transactional(k)
                    .name("bouncer.tx")
                    .run(async move |tx| {
                        tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                            .await?;
                        Ok::<_, TxError>(1u8)
                    })
                    .await
            });
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined
            .unwrap()
            .expect("a transactional call through PgBouncer");
    }
    for i in 0..8 {
        let k = format!("{tag}-tx-{i}");
        assert_eq!(
            count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
            1,
            "transactional key {i} wrote once"
        );
    }
    crate::support::chaos::report(
        "topology_pgbouncer",
        &[
            ("calls", (2 * STORES * TASKS * KEYS) as u64),
            ("wrong_answers", 0),
        ],
    );
}

/// A new database on the shared server whose sessions default to `level`.
async fn database_with(name: &str, setting: &str) -> String {
    let server = PgServer::shared();
    let admin = client(&server.url()).await;
    // Two tests never create the same database; a rerun on a kept server finds it.
    if let Err(e) = admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        && e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
    {
        panic!("create database {name}: {e}");
    }
    admin
        .batch_execute(&format!("ALTER DATABASE {name} SET {setting}"))
        .await
        .unwrap();
    format!("postgres://postgres@127.0.0.1:{}/{name}", server.port())
}

/// On databases whose default isolation is serializable or repeatable read, 12 concurrent
/// callers of one key (several rounds, through the executor and in transactional mode) all
/// succeed, and each body runs once: serialization failures are retries, never store errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_default_isolation_gives_retries_not_errors() {
    for (db, level) in [
        ("idem_serializable", "serializable"),
        ("idem_repeatable_read", "repeatable read"),
    ] {
        let url = database_with(db, &format!("default_transaction_isolation = '{level}'")).await;
        let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
        store.migrate().await.unwrap();
        let conn = store.pool().get().await.unwrap();
        let shown: String = conn
            .query_one("SHOW default_transaction_isolation", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(shown, level, "the store's sessions run at {level}");
        drop(conn);
        for round in 0..4 {
            let k = unique("isolation");
            let runs = Arc::new(AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for caller in 0..12 {
                let (store, k, runs) = (store.clone(), k.clone(), runs.clone());
                tasks.spawn(async move {
                    if caller % 4 == 3 {
                        let runs = runs.clone();
                        store
                            .transactional(k)
                            .name("isolation")
                            .run(async move |_tx| {
                                runs.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok::<_, Error>(caller)
                            })
                            .await
                    } else {
                        Idempotent::new(&*store, k)
                            .name("isolation")
                            .on_conflict(idem::OnConflict::Wait)
                            .run(|| async move {
                                runs.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                Ok::<_, Error>(caller)
                            })
                            .await
                    }
                });
            }
            let mut values = HashSet::new();
            while let Some(joined) = tasks.join_next().await {
                let out = joined.unwrap();
                assert!(
                    out.is_ok(),
                    "{level}, round {round}: a caller failed: {out:?}"
                );
                values.extend(out.ok());
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{level}, round {round}");
            assert_eq!(values.len(), 1, "{level}, round {round}: one result");
        }
    }
    // Two isolation levels, four rounds of twelve callers each.
    crate::support::chaos::report(
        "topology_postgres_isolation",
        &[("calls", 2 * 4 * 12), ("wrong_answers", 0)],
    );
}

/// 48 stores (six tables, eight stores each) migrate into one new schema at once: every
/// migration succeeds and the six tables exist, each with its steps table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_into_one_new_schema_all_succeed() {
    let url = PgServer::shared().url();
    let schema = format!(
        "migrate_{}_{}",
        std::process::id(),
        idem::store::Token::generate().as_u128() % 1_000_000_007
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..48 {
        let store = PostgresStore::builder()
            .schema(schema.clone())
            .table(format!("records_{}", i % 6))
            .pool_size(1)
            .connect(&url)
            .await
            .unwrap();
        tasks.spawn(async move { store.migrate().await });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.unwrap() {
            failures.push(format!("{e}: {:?}", std::error::Error::source(&e)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 48 migrations failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let db = client(&url).await;
    let tables = count(
        &db,
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1",
        &[&schema],
    )
    .await;
    assert_eq!(tables, 12, "six records tables and their six steps tables");
    crate::support::chaos::report(
        "topology_postgres_migrations",
        &[("calls", 48), ("wrong_answers", 0)],
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 19: what can lose an acknowledged record is checked.

fn error_text(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `migrate` creates a logged table; a table made `UNLOGGED` is refused by default (by
/// `migrate`, `check_settings` and a store's first operation, naming the setting and the
/// fix), warned about or accepted when the builder says so, and accepted again once it is
/// `SET LOGGED`.
#[tokio::test]
async fn an_unlogged_table_is_refused_unless_the_builder_accepts_it() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    let persistence = |table: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)",
                    &[&table],
                )
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let logged = PostgresStore::builder()
        .table("logged_records")
        .connect(&url)
        .await
        .unwrap();
    logged.migrate().await.unwrap();
    assert_eq!(
        persistence("logged_records").await,
        "p",
        "migrate makes a logged table"
    );

    let table = "unlogged_records";
    let refusing = PostgresStore::builder()
        .table(table)
        .connect(&url)
        .await
        .unwrap();
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
    db.batch_execute(&refusing.migration_sql().replacen(
        "CREATE TABLE",
        "CREATE UNLOGGED TABLE",
        1,
    ))
    .await
    .unwrap();
    assert_eq!(persistence("unlogged_records").await, "u");

    let err = refusing
        .migrate()
        .await
        .expect_err("an unlogged table is refused");
    let text = error_text(&err);
    assert!(
        matches!(err, Error::Store(_)) && text.contains("UNLOGGED") && text.contains("SET LOGGED"),
        "the refusal names the setting and the fix: {text}"
    );
    let fresh = PostgresStore::builder()
        .table(table)
        .connect(&url)
        .await
        .unwrap();
    let first_op = fresh
        .claim(Key::new("unlogged", &1u8), None, Duration::from_secs(5))
        .await;
    assert!(
        matches!(&first_op, Err(Error::Store(e)) if e.to_string().contains("UNLOGGED")),
        "the first operation is refused: {first_op:?}"
    );
    assert!(fresh.check_settings().await.is_err());

    let logs = support::LogCapture::install();
    let warned = PostgresStore::builder()
        .table(table)
        .if_unlogged(IfUnsafe::Warn)
        .connect(&url)
        .await
        .unwrap();
    warned.migrate().await.expect("warned, not refused");
    for i in 0..3u8 {
        let out = Idempotent::new(&warned, i)
            .name("unlogged")
            .run(|| async { Ok::<_, Error>(i) })
            .await;
        assert_eq!(out.unwrap(), i);
    }
    assert_eq!(
        logs.text().matches("is UNLOGGED").count(),
        1,
        "warned once:\n{}",
        logs.text()
    );
    let accepted = PostgresStore::builder()
        .table(table)
        .if_unlogged(IfUnsafe::Accept)
        .connect(&url)
        .await
        .unwrap();
    accepted.migrate().await.expect("accepted");
    assert_eq!(
        logs.text().matches("is UNLOGGED").count(),
        1,
        "accepted silently"
    );

    db.batch_execute(&format!("ALTER TABLE {table} SET LOGGED"))
        .await
        .unwrap();
    refusing
        .check_settings()
        .await
        .expect("a logged table passes");
    let out = Idempotent::new(&refusing, 9u8)
        .name("unlogged")
        .run(|| async { Ok::<_, Error>(9u8) })
        .await;
    assert_eq!(out.unwrap(), 9);
    crate::support::chaos::report("settings_postgres_unlogged", &[("configurations", 3)]);
}

/// Sessions with `synchronous_commit = off` (set on their database) are warned about once by
/// default, refused when the builder says so, and accepted silently when it says that.
#[tokio::test]
async fn synchronous_commit_off_is_warned_about_by_default() {
    let url = database_with("idem_async_commit", "synchronous_commit = off").await;
    let logs = support::LogCapture::install();
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.expect("warned, not refused");
    for i in 0..3u8 {
        let out = Idempotent::new(&store, i)
            .name("async-commit")
            .run(|| async { Ok::<_, Error>(i) })
            .await;
        assert_eq!(out.unwrap(), i);
    }
    assert_eq!(
        logs.text().matches("synchronous_commit = off").count(),
        1,
        "warned once:\n{}",
        logs.text()
    );

    let refusing = PostgresStore::builder()
        .if_synchronous_commit_off(IfUnsafe::Refuse)
        .connect(&url)
        .await
        .unwrap();
    let err = refusing.migrate().await.expect_err("refused on request");
    let text = error_text(&err);
    assert!(
        text.contains("synchronous_commit = off") && text.contains("ALTER ROLE"),
        "the refusal names the setting and the fix: {text}"
    );
    let first_op = refusing
        .claim(Key::new("async", &1u8), None, Duration::from_secs(5))
        .await;
    assert!(matches!(first_op, Err(Error::Store(_))), "{first_op:?}");

    let accepting = PostgresStore::builder()
        .if_synchronous_commit_off(IfUnsafe::Accept)
        .connect(&url)
        .await
        .unwrap();
    accepting.migrate().await.expect("accepted");
    assert_eq!(
        logs.text().matches("synchronous_commit = off").count(),
        1,
        "accepted silently"
    );
    crate::support::chaos::report(
        "settings_postgres_synchronous_commit",
        &[("configurations", 1)],
    );
}

// ---------------------------------------------------------------------------------------------
// The second review of the store: leases granted after a lock wait, the purge and key locks,
// the transactional mode's namespace, idle holders and misuse, partitions, poolers, table
// locks, the store's messages, read-only servers, shadowed functions and squatted names.

/// Makes `k` (in namespace `name`) an expired completed record.
async fn expired_record(store: &PostgresStore, name: &'static str, k: &str) {
    Idempotent::new(store, k.to_owned())
        .name(name)
        .ttl(Duration::from_millis(1))
        .run(|| async { Ok::<_, Error>(0u8) })
        .await
        .expect("the record that will expire");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// What a cleanup job does: deletes the expired row of `key` in `table` in a transaction of its
/// own, and keeps that transaction open for `hold`. `deleted` says how many rows it deleted,
/// once it did.
fn delete_and_hold(
    url: String,
    table: &'static str,
    key: Key,
    hold: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<u64>,
) {
    let (deleted_tx, deleted) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let db = client(&url).await;
        db.batch_execute("BEGIN").await.unwrap();
        let n = db
            .execute(
                &format!("DELETE FROM {table} WHERE key = $1 AND expires_at <= now()"),
                &[&&key.as_bytes()[..]],
            )
            .await
            .unwrap();
        let _ = deleted_tx.send(n);
        tokio::time::sleep(hold).await;
        db.batch_execute("COMMIT").await.unwrap();
    });
    (task, deleted)
}

/// A session deletes a key's expired row and keeps its transaction open longer than the lease;
/// a claim of the key waits for that row lock. It must still be granted its whole lease: a
/// second claim right after the grant finds the key held (through the store), and through the
/// executor (the reviewer's run: lease 2 s, the row held 3 s, a second call 100 ms into the
/// first's body) the body runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_waited_on_a_deleting_session_is_granted_its_whole_lease() {
    let url = PgServer::shared().url();
    let store = Arc::new(shared_store().await);

    // The store alone: the first claim waits 2 s on the row, with a lease of 1 s.
    let k = unique("grant-delete");
    let key = Key::new("grant.delete", &k);
    expired_record(&store, "grant.delete", &k).await;
    let (cleaner, deleted) =
        delete_and_hold(url.clone(), "idem_records", key, Duration::from_secs(2));
    assert_eq!(deleted.await.unwrap(), 1, "the session deleted the row");
    let lease = Duration::from_secs(1);
    let first = store.claim(key, None, lease).await.unwrap();
    assert!(matches!(first, Claim::Acquired(_)), "{first:?}");
    let second = store.claim(key, None, lease).await.unwrap();
    assert!(
        matches!(second, Claim::Busy { .. }),
        "a claim right after another's grant must find the key held, got {second:?}: the \
         first was granted a lease that had already run out"
    );
    cleaner.await.unwrap();

    // Through the executor.
    let k = unique("grant-delete-exec");
    let key = Key::new("grant.delete", &k);
    expired_record(&store, "grant.delete", &k).await;
    let (cleaner, deleted) =
        delete_and_hold(url.clone(), "idem_records", key, Duration::from_secs(3));
    assert_eq!(deleted.await.unwrap(), 1);
    let runs = Arc::new(AtomicUsize::new(0));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let a = {
        let (store, k, runs) = (store.clone(), k.clone(), runs.clone());
        tokio::spawn(async move {
            Idempotent::new(&*store, k)
                .name("grant.delete")
                .lease(Duration::from_secs(2))
                .run(|| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok::<_, Error>(String::from("A"))
                })
                .await
        })
    };
    started.await.expect("the first call's body starts");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = Idempotent::new(&*store, k)
        .name("grant.delete")
        .lease(Duration::from_secs(2))
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(String::from("B"))
        })
        .await
        .unwrap();
    assert_eq!(a.await.unwrap().unwrap(), "A");
    assert_eq!(b, "A", "the second call gets the first's result");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    cleaner.await.unwrap();
}

/// `purge_expired` leaves alone an expired row whose key lock another session holds (as a
/// claim of that key in flight does), so that the purge never makes a claim wait on its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_skips_a_row_whose_key_lock_is_taken() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .table("purge_locked")
        // The purge under test, not the store's own cleanup.
        .auto_cleanup(false)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let k = unique("purge-locked");
    expired_record(&store, "purge.locked", &k).await;
    // The number of the key lock, as the server shows it while a transactional call holds it
    // (the call then rolls back, leaving the expired record as it was).
    let lock = Arc::new(std::sync::Mutex::new(None));
    let out = {
        let lock = lock.clone();
        store
            .transactional(k.clone())
            .name("purge.locked")
            .run(async move |tx| {
                let row = tx
                    .query_one(
                        "SELECT (l.classid::int8 << 32) | l.objid::int8 FROM pg_locks l \
                             WHERE l.locktype = 'advisory' AND l.objsubid = 1 \
                               AND l.pid = pg_backend_pid()",
                        &[],
                    )
                    .await?;
                *lock.lock().unwrap() = Some(row.get::<_, i64>(0));
                Err::<u8, _>(TxError::Declined)
            })
            .await
    };
    assert!(matches!(out, Err(TxError::Declined)), "{out:?}");
    let lock = lock.lock().unwrap().expect("the key lock was seen");

    let holder = client(&url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await
        .unwrap();
    let db = client(&url).await;
    let rows = || count(&db, "SELECT count(*) FROM purge_locked", &[]);
    assert_eq!(rows().await, 1);
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "the row whose key lock is taken is skipped"
    );
    assert_eq!(rows().await, 1);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert_eq!(rows().await, 0);
}

/// The store's errors carry the server's message and SQLSTATE (not "db error"); `migrate`
/// without the privileges to create the table says to apply `migration_sql()` as an owner.
#[tokio::test]
async fn store_errors_carry_the_server_message_and_migrate_names_the_fix() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE idem_no_privileges LOGIN; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .await
    .unwrap();
    let url_np = url.replace("postgres://postgres@", "postgres://idem_no_privileges@");
    let store = PostgresStore::builder()
        .table("no_privileges_records")
        .connect(&url_np)
        .await
        .unwrap();
    let err = store.migrate().await.expect_err("no CREATE on public");
    let text = err.to_string();
    assert!(
        text.contains("permission denied") && text.contains("42501"),
        "the server's message and SQLSTATE: {text}"
    );
    assert!(
        text.contains("migration_sql"),
        "says to apply migration_sql() as an owner: {text}"
    );
    // Created by an owner, but no privileges granted: a call says what the server said.
    db.batch_execute(&store.migration_sql()).await.unwrap();
    let call = Idempotent::new(&store, 1u8)
        .name("no-privileges")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await;
    assert!(
        matches!(&call, Err(e) if e.to_string().contains("permission denied for table no_privileges_records")),
        "{call:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Transactional mode: review fixes.

/// `transactional()` without a name gets the call site's namespace, as `Idempotent::new` does:
/// two operations keyed by the same value at two call sites are two records, not one (it used
/// to be the namespace `""`, so the second operation replayed the first one's result and its
/// effect never happened). One call site called twice still replays.
#[tokio::test]
async fn unnamed_transactional_calls_at_two_sites_are_two_records() {
    let url = PgServer::shared().url();
    let store = shared_store().await;
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("two-sites");
    let record = |k: String| {
        store
            .transactional(k.clone())
            .run_with_outcome(async move |tx| {
                tx.execute(
                    "INSERT INTO tx_orders (k, note) VALUES ($1, 'recorded')",
                    &[&k],
                )
                .await?;
                Ok::<_, TxError>(1u8)
            })
    };
    let first = record(k.clone()).await.unwrap();
    let again = record(k.clone()).await.unwrap();
    assert_eq!(
        (first.status, again.status),
        (Status::Executed, Status::Replayed),
        "one call site: one record"
    );
    let k2 = k.clone();
    let ship = store
        .transactional(k.clone())
        .run_with_outcome(async move |tx| {
            tx.execute(
                "INSERT INTO tx_orders (k, note) VALUES ($1, 'shipped')",
                &[&k2],
            )
            .await?;
            Ok::<_, TxError>(2u8)
        })
        .await
        .unwrap();
    assert_eq!(
        (ship.value, ship.status),
        (2, Status::Executed),
        "another call site is another operation"
    );
    let notes: Vec<String> = db
        .query("SELECT note FROM tx_orders WHERE k = $1 ORDER BY id", &[&k])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, ["recorded", "shipped"]);
    assert!(
        !record_exists(&db, "", &k).await,
        "nothing is recorded under the empty namespace"
    );
}

/// A transactional holder whose process is frozen (SIGSTOP: a paused VM, a stalled process)
/// keeps its key only for its lease: the server ends its idle transaction, its write rolls
/// back, and a duplicate runs. It used to hold the key for as long as the process stayed
/// frozen, and every duplicate ran out of its wait.
#[tokio::test]
async fn a_frozen_transactional_holder_loses_the_key_after_its_lease() {
    let url = PgServer::shared().url();
    let store = shared_store().await;
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("frozen");

    let mut child = child_process("freeze", &url, &[("IDEM_PG_KEY", &k)]);
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let wrote = BufReader::new(stdout)
            .lines()
            .any(|l| l.map(|l| l.contains("WROTE")).unwrap_or(false));
        let _ = tx.send(wrote);
    });
    let wrote = rx.recv_timeout(Duration::from_secs(60));
    if wrote != Ok(true) {
        let _ = child.kill();
        let out = child.wait_with_output().expect("the child's output");
        panic!(
            "the child must report its uncommitted write ({wrote:?}); its stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stopped = Command::new("kill")
        .args(["-STOP", &child.id().to_string()])
        .status()
        .expect("run kill -STOP");
    assert!(stopped.success());

    let started = Instant::now();
    let k2 = k.clone();
    let dup = store
        .transactional(k.clone())
        .name("tx.frozen")
        .wait_timeout(Duration::from_secs(8))
        .run_with_outcome(async move |tx| {
            tx.execute("INSERT INTO tx_orders (k, note) VALUES ($1, 'dup')", &[&k2])
                .await?;
            Ok::<_, TxError>(1u8)
        })
        .await;
    let waited = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let dup = dup.expect("the duplicate runs once the frozen holder's lease is over");
    assert_eq!(dup.status, Status::Executed);
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    let notes: Vec<String> = db
        .query("SELECT note FROM tx_orders WHERE k = $1", &[&k])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notes, ["dup"], "the frozen holder's write rolled back");
}

/// A transactional body that is polled keeps its transaction even while it awaits something
/// other than the database for several times its lease (the call sends an empty statement every
/// third of the lease, so the server's idle limit never ends it).
#[tokio::test]
async fn a_polled_transactional_body_outlives_its_lease() {
    let url = PgServer::shared().url();
    let store = shared_store().await;
    let db = client(&url).await;
    orders_table(&db).await;
    let k = unique("slow-body");
    let k2 = k.clone();
    let out = store
        .transactional(k.clone())
        .name("tx.slow")
        .lease(Duration::from_millis(300))
        .run_with_outcome(async move |tx| {
            tx.execute(
                "INSERT INTO tx_orders (k, note) VALUES ($1, 'slow')",
                &[&k2],
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tx.execute(
                "INSERT INTO tx_orders (k, note) VALUES ($1, 'slow')",
                &[&k2],
            )
            .await?;
            Ok::<_, TxError>(2u8)
        })
        .await
        .expect("a polled body is not ended by the idle limit");
    assert_eq!((out.value, out.status), (2, Status::Executed));
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        2
    );
}

/// A transactional body's session-level `SET` (not `SET LOCAL`) or `SET ROLE` does not stay on
/// the pooled connection: it used to, so every later statement of the store on that connection
/// ran with it (here: commits no longer durable, or another role), unseen by the settings check.
#[tokio::test]
async fn a_transactional_body_leaves_no_session_setting_on_the_pool() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE idem_leak_role; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .await
    .unwrap();
    let store = shared_store().await; // the table exists
    drop(store);
    // The completion runs in the body's transaction, so as the role the body set.
    db.batch_execute("GRANT SELECT, INSERT, UPDATE, DELETE ON idem_records, idem_records_steps TO idem_leak_role")
        .await
        .unwrap();
    // One connection: every call below runs on the connection the first body used, unless it
    // was replaced.
    let store = PostgresStore::builder()
        .pool_size(1)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let set = store
        .transactional(unique("leak"))
        .name("tx.leak")
        .run(async move |tx| {
            tx.batch_execute("SET synchronous_commit = off; SET ROLE idem_leak_role")
                .await?;
            Ok::<_, TxError>(1u8)
        })
        .await;
    assert_eq!(set.unwrap(), 1);
    let seen = store
        .transactional(unique("leak-look"))
        .name("tx.leak")
        .run(async move |tx| {
            let row = tx
                .query_one(
                    "SELECT current_setting('synchronous_commit'), current_user::text",
                    &[],
                )
                .await?;
            Ok::<_, TxError>((row.get::<_, String>(0), row.get::<_, String>(1)))
        })
        .await
        .unwrap();
    assert_eq!(seen, ("on".to_owned(), "postgres".to_owned()));
}

/// A transactional body that ends the transaction idem opened (COMMIT or ROLLBACK through the
/// `Transaction`) gets an error saying so, and no record is stored outside that transaction.
/// It used to succeed: the completion then ran on its own, outside the claim's transaction
/// (after ROLLBACK the claim was gone and a duplicate could run the body again meanwhile).
#[tokio::test]
async fn a_transactional_body_that_ends_the_transaction_is_refused() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    orders_table(&db).await;
    let store = PostgresStore::builder()
        .pool_size(1)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    for end in ["COMMIT", "ROLLBACK", "COMMIT AND CHAIN"] {
        let k = unique(&format!("ends-{end}"));
        let runs = Arc::new(AtomicUsize::new(0));
        let call = |k: String, runs: Arc<AtomicUsize>| {
            let k2 = k.clone();
            store.transactional(k).name("tx.ends").run(async move |tx| {
                // Only the first run ends the transaction itself.
                let first = runs.fetch_add(1, Ordering::SeqCst) == 0;
                tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                    .await?;
                if first {
                    tx.batch_execute(end).await?;
                }
                Ok::<_, TxError>(1u8)
            })
        };
        let out = call(k.clone(), runs.clone()).await;
        let text = match &out {
            Err(TxError::Idem(err)) => error_text(err),
            other => panic!("{end}: the call must fail, got {other:?}"),
        };
        assert!(text.contains("ended the transaction"), "{end}: {text}");
        // Review 3, finding 2: a retry used to run the body again once the committed claim's
        // lease ran out, committing its writes a second time.
        let retry = call(k.clone(), runs.clone()).await;
        if end.starts_with("COMMIT") {
            // The writes committed with the claim: the key is sealed, the body never runs
            // again while the record lives.
            assert!(
                matches!(&retry, Err(TxError::Idem(Error::Codec(e))) if e.to_string().contains("ended the transaction")),
                "{end}: {retry:?}"
            );
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{end}");
            assert_eq!(
                count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
                1,
                "{end}: the writes once"
            );
        } else {
            // Rolled back with the claim: nothing happened, and the retry runs.
            assert!(retry.is_ok(), "{end}: {retry:?}");
            assert_eq!(runs.load(Ordering::SeqCst), 2, "{end}");
            assert_eq!(
                count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
                1,
                "{end}: the retry's writes"
            );
        }
    }
    // The connection the bodies left was not handed on: the next call runs in a transaction.
    let k = unique("ends-next");
    let k2 = k.clone();
    let next = store
        .transactional(k.clone())
        .name("tx.ends")
        .run_with_outcome(async move |tx| {
            tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                .await?;
            Ok::<_, TxError>(2u8)
        })
        .await
        .unwrap();
    assert_eq!(next.status, Status::Executed);
}

// ---------------------------------------------------------------------------------------------
// Durability and server checks: review fixes.

/// A records table partitioned (by whoever runs the database) into `UNLOGGED` partitions is
/// refused like an `UNLOGGED` table: a crash empties the partitions. It used to pass the check,
/// which only looked at the (logged) parent.
#[tokio::test]
async fn unlogged_partitions_are_refused() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute(
        "DROP TABLE IF EXISTS part_records; \
         CREATE TABLE part_records ( \
             key bytea PRIMARY KEY CHECK (octet_length(key) = 32), \
             token bytea NOT NULL CHECK (octet_length(token) = 16), \
             fingerprint bytea CHECK (octet_length(fingerprint) = 32), \
             value bytea, \
             expires_at timestamptz NOT NULL \
         ) PARTITION BY HASH (key); \
         CREATE TABLE part_records_0 PARTITION OF part_records \
             FOR VALUES WITH (modulus 2, remainder 0) PARTITION BY HASH (key); \
         CREATE UNLOGGED TABLE part_records_0a PARTITION OF part_records_0 \
             FOR VALUES WITH (modulus 2, remainder 0); \
         CREATE TABLE part_records_0b PARTITION OF part_records_0 \
             FOR VALUES WITH (modulus 2, remainder 1); \
         CREATE TABLE part_records_1 PARTITION OF part_records \
             FOR VALUES WITH (modulus 2, remainder 1); \
         CREATE INDEX part_records_expires_idx ON part_records (expires_at);",
    )
    .await
    .unwrap();
    let store = PostgresStore::builder()
        .table("part_records")
        .connect(&url)
        .await
        .unwrap();
    let err = store
        .migrate()
        .await
        .expect_err("an unlogged partition is refused");
    let text = error_text(&err);
    assert!(
        text.contains("part_records_0a")
            && text.contains("UNLOGGED")
            && text.contains("SET LOGGED"),
        "the refusal names the partition and the fix: {text}"
    );
    let first_op = PostgresStore::builder()
        .table("part_records")
        .connect(&url)
        .await
        .unwrap()
        .claim(Key::new("partitions", &1u8), None, Duration::from_secs(5))
        .await;
    assert!(
        matches!(&first_op, Err(Error::Store(e)) if e.to_string().contains("part_records_0a")),
        "{first_op:?}"
    );
    // Logged again: accepted.
    db.batch_execute("ALTER TABLE part_records_0a SET LOGGED")
        .await
        .unwrap();
    store.migrate().await.expect("all partitions logged");
    let out = Idempotent::new(&store, 1u8)
        .name("partitions")
        .run(|| async { Ok::<_, Error>(7u8) })
        .await;
    assert_eq!(out.unwrap(), 7);
}

/// Through PgBouncer in transaction mode, a store built without `transaction_pooler(true)` is
/// refused before any body runs, with an error that says to set it: PgBouncer either refuses
/// the startup `options` the store sends (now with that advice), or, with
/// `ignore_startup_parameters = options`, drops them, which the store now detects (the
/// session does not run with the timeouts it sent). It used to connect, and its named prepared
/// statements then failed between transactions, mid-call, after bodies had run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_without_pooler_mode_is_refused_before_any_body_runs() {
    let server = PgServer::shared();
    let _ = shared_store().await; // the table exists
    for extra in ["", "ignore_startup_parameters = options"] {
        let bouncer = PgBouncer::start_with(server, 2, extra);
        let built = PostgresStore::builder()
            .pool_size(4)
            .timeout(Duration::from_secs(5))
            .connect(&bouncer.url())
            .await;
        // PgBouncer refusing the startup options refuses the first connection: `connect`
        // fails, with the advice. Dropping them is found before any body runs.
        match built {
            Err(err) => {
                let text = error_text(&err);
                assert!(
                    extra.is_empty() && text.contains("transaction_pooler(true)"),
                    "[{extra}] says to set transaction_pooler(true): {text}"
                );
            }
            Ok(store) => {
                let err = store
                    .migrate()
                    .await
                    .expect_err("refused without pooler mode");
                let text = error_text(&err);
                assert!(
                    text.contains("transaction_pooler(true)"),
                    "[{extra}] says to set transaction_pooler(true): {text}"
                );
                let runs = AtomicUsize::new(0);
                let call = Idempotent::new(&store, unique("bouncer-refused"))
                    .name("bouncer.refused")
                    .run(|| async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Error>(1u8)
                    })
                    .await;
                assert!(
                    matches!(&call, Err(e) if error_text(e).contains("transaction_pooler(true)")),
                    "[{extra}] {call:?}"
                );
                assert_eq!(runs.load(Ordering::SeqCst), 0, "[{extra}] no body ran");
            }
        }

        // In pooler mode, the same PgBouncer works.
        let pooled = PostgresStore::builder()
            .transaction_pooler(true)
            .connect(&bouncer.url())
            .await
            .unwrap();
        pooled
            .migrate()
            .await
            .expect("pooler mode through PgBouncer");
        let out = Idempotent::new(&pooled, unique("bouncer-ok"))
            .name("bouncer.refused")
            .run(|| async { Ok::<_, Error>(2u8) })
            .await;
        assert_eq!(out.unwrap(), 2, "[{extra}]");
    }
}

/// While an operator's lock on the records table blocks writers (`CREATE INDEX` takes SHARE),
/// a replay of a completed key still gets its record: the claim meets the lock (its
/// `lock_timeout`) and the store reads the record instead. It used to answer `InProgress`
/// (with `on_conflict = reject`; a waiting caller waited out the lock). A new key is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_served_while_a_table_lock_blocks_writers() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .table("lock_busy_records")
        .lock_timeout(Some(Duration::from_millis(300)))
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let done = unique("lock-done");
    Idempotent::new(&store, done.clone())
        .name("lock.busy")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let (locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE lock_busy_records IN SHARE MODE")
        .await
        .unwrap();
    let replay = Idempotent::new(&store, done.clone())
        .name("lock.busy")
        .on_conflict(idem::OnConflict::Reject)
        .run_with_outcome(|| async { Ok::<_, Error>(9u8) })
        .await;
    let fresh = Idempotent::new(&store, unique("lock-new"))
        .name("lock.busy")
        .on_conflict(idem::OnConflict::Reject)
        .run(|| async { Ok::<_, Error>(2u8) })
        .await;
    let tx_replay = store
        .transactional(done.clone())
        .name("lock.busy")
        .on_conflict(idem::OnConflict::Reject)
        .run_with_outcome(async |_tx| Ok::<_, Error>(9u8))
        .await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let replay = replay.expect("the completed record is read despite the lock");
    assert_eq!((replay.value, replay.status), (1, Status::Replayed));
    let tx_replay = tx_replay.expect("the transactional mode reads it too");
    assert_eq!((tx_replay.value, tx_replay.status), (1, Status::Replayed));
    assert!(
        matches!(fresh, Err(Error::InProgress { .. })),
        "a new key waits for the lock: {fresh:?}"
    );
}

/// A store pointed at a hot standby (by mistake, or during a failover): `migrate` fails saying
/// so (it used to succeed, the table being there), replays of completed records are served
/// from the standby (they used to fail: the claim is an `INSERT`), and a call that would write
/// fails before its body runs with an error that says to point the store at the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_standby_serves_replays_and_refuses_writes_with_the_fix() {
    let primary = PgServer::shared();
    let store = PostgresStore::builder()
        .table("standby_records")
        .connect(&primary.url())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let done = unique("standby-done");
    Idempotent::new(&store, done.clone())
        .name("standby")
        .run(|| async { Ok::<_, Error>(1u8) })
        .await
        .unwrap();
    let standby = PgServer::standby_of(primary);
    let replica = client(&standby.url()).await;
    let key = Key::new("standby", &done);
    let started = Instant::now();
    loop {
        let n = count(
            &replica,
            "SELECT count(*) FROM standby_records WHERE key = $1 AND value IS NOT NULL",
            &[&&key.as_bytes()[..]],
        )
        .await;
        if n == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not replicated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let on_standby = PostgresStore::builder()
        .table("standby_records")
        .connect(&standby.url())
        .await
        .unwrap();
    let err = on_standby
        .migrate()
        .await
        .expect_err("migrate on a standby fails");
    let text = error_text(&err);
    assert!(
        text.contains("hot standby") && text.contains("primary"),
        "{text}"
    );

    let logs = support::LogCapture::install();
    let fresh_store = PostgresStore::builder()
        .table("standby_records")
        .connect(&standby.url())
        .await
        .unwrap();
    let replay = Idempotent::new(&fresh_store, done.clone())
        .name("standby")
        .run_with_outcome(|| async { Ok::<_, Error>(9u8) })
        .await
        .expect("a completed record is replayed from the standby");
    assert!(
        logs.contains("read-only") && logs.contains("target_session_attrs"),
        "the first operation warns that the server is read-only: {}",
        logs.text()
    );
    assert_eq!((replay.value, replay.status), (1, Status::Replayed));
    let tx_replay = on_standby
        .transactional(done.clone())
        .name("standby")
        .run_with_outcome(async |_tx| Ok::<_, Error>(9u8))
        .await
        .expect("and in the transactional mode");
    assert_eq!((tx_replay.value, tx_replay.status), (1, Status::Replayed));

    let runs = Arc::new(AtomicUsize::new(0));
    let fresh = Idempotent::new(&on_standby, unique("standby-new"))
        .name("standby")
        .run(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(2u8)
        })
        .await;
    assert!(
        matches!(&fresh, Err(e) if error_text(e).contains("read-only")
            && error_text(e).contains("target_session_attrs")),
        "{fresh:?}"
    );
    let tx_fresh = on_standby
        .transactional(unique("standby-new"))
        .name("standby")
        .run({
            let runs = runs.clone();
            async move |_tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2u8)
            }
        })
        .await;
    assert!(
        matches!(&tx_fresh, Err(e) if error_text(e).contains("target_session_attrs")),
        "{tx_fresh:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no body ran");
}

/// `purge_expired` under `default_transaction_isolation = serializable`, while callers keep
/// claiming and taking over the expiring rows it deletes: no errors, from the purge or the
/// callers (reviewer's q_purge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_under_serializable_default_isolation_gives_no_errors() {
    let url = database_with(
        "idem_serializable",
        "default_transaction_isolation = 'serializable'",
    )
    .await;
    let store = Arc::new(
        PostgresStore::builder()
            .table("purge_serial_records")
            .pool_size(6)
            .connect(&url)
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let stop = Instant::now() + Duration::from_secs(4);
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (store, errors) = (store.clone(), errors.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                if let Err(e) = store.purge_expired().await {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("purge: {}", error_text(&e)));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    for w in 0..6u32 {
        let (store, errors) = (store.clone(), errors.clone());
        tasks.spawn(async move {
            let mut i = w;
            while Instant::now() < stop {
                i = i.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let k = (i >> 8) % 40;
                let out = Idempotent::new(&*store, k)
                    .name("purge.serializable")
                    .ttl(Duration::from_millis(2))
                    .run(|| async move { Ok::<_, Error>(k) })
                    .await;
                if let Err(e) = out {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("call: {}", error_text(&e)));
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>()
    );
}

/// `migrate` gives the table its `expires_at` index even when another relation of the schema
/// already has the index's name (`<table>_expires_idx`): it used to skip the index
/// (`CREATE INDEX IF NOT EXISTS` saw the name taken) and then take the name for the index,
/// leaving every purge a scan of the whole table. Migrating again adds no second index.
#[tokio::test]
async fn migrate_indexes_the_table_when_the_index_name_is_taken() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute(
        "DROP TABLE IF EXISTS collide; \
         DROP TABLE IF EXISTS collide_expires_idx; \
         CREATE TABLE collide_expires_idx (a int)",
    )
    .await
    .unwrap();
    let store = PostgresStore::builder()
        .table("collide")
        .connect(&url)
        .await
        .unwrap();
    let indexes = || async {
        count(
            &db,
            "SELECT count(*) FROM pg_indexes \
             WHERE schemaname = 'public' AND tablename = 'collide' AND indexdef LIKE '%(expires_at)%'",
            &[],
        )
        .await
    };
    store.migrate().await.unwrap();
    assert_eq!(indexes().await, 1, "the table has its expires_at index");
    store.migrate().await.unwrap();
    assert_eq!(indexes().await, 1, "and only one after migrating again");
    assert_eq!(
        Idempotent::new(&store, 1u8)
            .name("collide")
            .run(|| async { Ok::<_, Error>(3u8) })
            .await
            .unwrap(),
        3
    );
}

/// The store's statements name PostgreSQL's own functions (`pg_catalog.clock_timestamp()`,
/// ...), so a session whose `search_path` puts an application schema first, with a function of
/// the same name (a test clock, an hour behind), computes leases on the server's real clock:
/// another store of the same table does not see the lease as long expired and take the key
/// over. It used to: the two bodies then ran at once.
#[tokio::test]
async fn leases_use_the_servers_clock_whatever_the_search_path() {
    let url = database_with("idem_search_path", "work_mem = '4MB'").await;
    let db = client(&url).await;
    db.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS app; \
         CREATE OR REPLACE FUNCTION app.clock_timestamp() RETURNS timestamptz \
           LANGUAGE sql AS $$ SELECT pg_catalog.clock_timestamp() - interval '1 hour' $$",
    )
    .await
    .unwrap();
    let shadowed = PostgresStore::connect(&format!(
        "{url}?options=-c%20search_path%3Dapp%2Cpg_catalog"
    ))
    .await
    .unwrap();
    shadowed.migrate().await.unwrap();
    let conn = shadowed.pool().get().await.unwrap();
    let shown: String = conn
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "app,pg_catalog", "the session's search_path");
    drop(conn);
    let plain = PostgresStore::connect(&url).await.unwrap();
    let key = Key::new("search-path", &unique("k"));
    let lease = Duration::from_secs(60);
    let first = shadowed.claim(key, None, lease).await.unwrap();
    assert!(matches!(first, Claim::Acquired(_)), "{first:?}");
    let second = plain.claim(key, None, lease).await.unwrap();
    assert!(
        matches!(second, Claim::Busy { lease_left } if lease_left > Duration::from_secs(50)),
        "the lease is live for the other store too: {second:?}"
    );
}

/// A transactional body whose statement failed (the common failure: a constraint, a division by
/// zero) and that returns `Err` is not mistaken for one that ended the transaction: nothing
/// says so, and the retry runs. (The check of a failed body's transaction must read an aborted
/// transaction as the call's own.)
#[tokio::test]
async fn a_transactional_body_whose_statement_failed_is_an_ordinary_failure() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .pool_size(1)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let logs = support::LogCapture::install();
    let k = unique("failed-statement");
    let failed = store
        .transactional(k.clone())
        .name("tx.failed-statement")
        .run(async move |tx| {
            tx.execute("SELECT 1 / 0", &[]).await?;
            Ok::<_, TxError>(1u8)
        })
        .await;
    assert!(matches!(failed, Err(TxError::Db(_))), "{failed:?}");
    assert!(
        !logs.contains("ended the transaction"),
        "not reported as a body that ended the transaction: {}",
        logs.text()
    );
    let retry = store
        .transactional(k)
        .name("tx.failed-statement")
        .run_with_outcome(async |_tx| Ok::<_, TxError>(2u8))
        .await
        .unwrap();
    assert_eq!((retry.value, retry.status), (2, Status::Executed));
}

/// A transactional body that swallows a failed statement and returns `Ok` gets an error that
/// says what happened and what to do (the transaction is aborted: nothing is stored), and the
/// retry runs.
#[tokio::test]
async fn a_transactional_body_that_swallows_a_failed_statement_is_told_why() {
    let store = shared_store().await;
    let k = unique("swallow");
    let out = store
        .transactional(k.clone())
        .name("tx.swallow")
        .run(async move |tx| {
            let _ = tx.execute("SELECT 1 / 0", &[]).await;
            Ok::<_, TxError>(1u8)
        })
        .await;
    let text = match &out {
        Err(TxError::Idem(err)) => error_text(err),
        other => panic!("must fail: {other:?}"),
    };
    assert!(
        text.contains("25P02") && text.contains("savepoint"),
        "names the cause and the fix: {text}"
    );
    let retry = store
        .transactional(k)
        .name("tx.swallow")
        .run_with_outcome(async |_tx| Ok::<_, TxError>(2u8))
        .await
        .unwrap();
    assert_eq!(retry.status, Status::Executed);
}

/// Behind PgBouncer in transaction mode, a transactional body's session-level `SET` does not
/// stay on PgBouncer's server connection for its next client: `RESET ALL` runs in the same
/// message as the commit. (The store cannot close a pooler's server connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_a_transactional_body_leaves_no_session_setting() {
    let server = PgServer::shared();
    let _ = shared_store().await; // the table exists
    // One server connection: every client below runs on it.
    let bouncer = PgBouncer::start(server, 1);
    let store = PostgresStore::builder()
        .transaction_pooler(true)
        .connect(&bouncer.url())
        .await
        .unwrap();
    let set = store
        .transactional(unique("bouncer-leak"))
        .name("bouncer.leak")
        .run(async move |tx| {
            tx.batch_execute(
                "DO $$ BEGIN CREATE ROLE idem_bouncer_other SUPERUSER; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
                 SET synchronous_commit = off; SET ROLE idem_bouncer_other",
            )
            .await?;
            Ok::<_, TxError>(1u8)
        })
        .await;
    assert_eq!(set.unwrap(), 1);
    let other = client(&bouncer.url()).await;
    let seen: String = other
        .simple_query("SHOW synchronous_commit")
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        seen, "on",
        "another client of PgBouncer's server connection"
    );
    // `RESET ALL` leaves the role: the store resets it too.
    let role: String = other
        .simple_query("SELECT current_user::text")
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap();
    assert_eq!(role, "postgres", "the body's role stays with the body");
}

/// Review 3, finding 1: a live, polled holder whose store's pool is taken by the application
/// (or by transactional bodies) used to queue its renewals behind the pool, lose its lease, and
/// let a second process run the body beside it. Renewals never wait in line: they use an idle
/// pooled connection or the store's reserve connection.
#[tokio::test]
async fn a_busy_pool_does_not_cost_a_running_body_its_lease() {
    let url = PgServer::shared().url();
    let a = Arc::new(
        PostgresStore::builder()
            .pool_size(2)
            .connect(&url)
            .await
            .expect("store"),
    );
    let b = PostgresStore::builder()
        .pool_size(2)
        .connect(&url)
        .await
        .expect("store");
    a.migrate().await.expect("migrate");
    let runs = Arc::new(AtomicUsize::new(0));
    let key = unique("busy-pool");
    let lease = Duration::from_millis(600);
    let holder = {
        let (a, runs, key) = (a.clone(), runs.clone(), key.clone());
        tokio::spawn(async move {
            Idempotent::new(&*a, key)
                .name("busy-pool")
                .lease(lease)
                .run_with_outcome(|| async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok::<_, Error>(1u8)
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The application holds every connection of the store's pool for two seconds.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let a = a.clone();
        hogs.push(tokio::spawn(async move {
            let conn = a.pool().get().await.expect("a pooled connection");
            conn.simple_query("SELECT pg_sleep(2)")
                .await
                .expect("sleep");
        }));
    }
    tokio::time::sleep(Duration::from_millis(1400)).await;
    // Another process asks for the key while the holder is alive and its pool is busy.
    let duplicate = Idempotent::new(&b, key.clone())
        .name("busy-pool")
        .lease(lease)
        .run_with_outcome(|| async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Error>(2u8)
        })
        .await
        .expect("the duplicate waits and replays");
    let first = holder.await.expect("holder").expect("holder's call");
    for hog in hogs {
        hog.await.expect("hog");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    assert_eq!(first.status, Status::Executed);
    assert_eq!((duplicate.value, duplicate.status), (1, Status::Waited));
}

// ---------------------------------------------------------------------------------------------
// Issue 16: waiters woken across processes (LISTEN/NOTIFY), and expired rows cleaned by normal
// traffic. Counts of polls and wakes, never times.

/// A store of its own on `table` of the shared server, migrated.
async fn table_store(
    table: &str,
    build: impl FnOnce(
        idem::store::postgres::PostgresStoreBuilder,
    ) -> idem::store::postgres::PostgresStoreBuilder,
) -> PostgresStore {
    let store = build(PostgresStore::builder().table(table))
        .connect(&PgServer::shared().url())
        .await
        .expect("store from URL");
    store.migrate().await.expect("migrate");
    store
}

/// Starts `store`'s listening connection (its first wait does) and waits until it listens, so
/// that the next wait is notified from its first poll on.
async fn listening(store: &PostgresStore) {
    let absent = Key::new("notify.absent", &unique("absent"));
    store.wait(absent, Duration::from_secs(1)).await.unwrap();
    until("the store listens", || {
        store.wait_stats().listener_connections >= 1
    })
    .await;
}

/// Waits (a bounded number of tries, 10 ms apart) until `ready` holds, and fails with `what`.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..3_000 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// A waiter in another store instance (another connection pool and listener, as another process
/// would have) is woken by the holder's completion through NOTIFY: it polls once before it
/// sleeps and once after the notification, not on a backoff schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_in_another_store_is_woken_by_the_notification() {
    let holder = table_store("notify_wake", |b| b).await;
    let waiter = Arc::new(table_store("notify_wake", |b| b).await);
    assert_eq!(holder.channel(), waiter.channel(), "one channel per table");
    let key = Key::new("notify.wake", &unique("k"));
    let Ok(Claim::Acquired(token)) = holder.claim(key, None, Duration::from_secs(60)).await else {
        panic!("the key is free");
    };
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait(key, Duration::from_secs(60)).await })
    };
    until("the waiter polled once, on a listening connection", || {
        let stats = waiter.wait_stats();
        stats.polls >= 1 && stats.listener_connections == 1
    })
    .await;
    let before = waiter.wait_stats();
    assert_eq!(before.notified, 0);
    let stored = holder
        .complete(
            key,
            token,
            None,
            Bytes::from_static(b"\"v\""),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(matches!(stored, Completion::Stored));
    waiting.await.unwrap().expect("the wait ends");
    let after = waiter.wait_stats();
    assert_eq!(after.notified, 1, "woken by the notification: {after:?}");
    assert!(
        after.polls <= 3,
        "a notified waiter polls before it sleeps and after it is woken, not on a schedule: \
         {after:?}"
    );
    // The holder's own store never waited: it opened no listener.
    assert_eq!(holder.wait_stats().listener_connections, 0);
}

/// Many waiters of one key through the executor, in another store: all get the holder's value,
/// woken by its completion; a release (failed body) wakes them too and one of them runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_through_the_executor_are_woken_by_completion_and_by_release() {
    let holder = Arc::new(table_store("notify_exec", |b| b).await);
    let waiter = Arc::new(table_store("notify_exec", |b| b).await);
    listening(&waiter).await;
    for fail_first in [false, true] {
        let k = unique("exec");
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let first = {
            let (holder, k) = (holder.clone(), k.clone());
            tokio::spawn(async move {
                Idempotent::new(&*holder, k)
                    .name("notify.exec")
                    .run(|| async move {
                        let _ = entered_tx.send(());
                        let _ = go.await;
                        if fail_first {
                            Err(Error::InProgress {
                                retry_after: Duration::ZERO,
                            })
                        } else {
                            Ok(String::from("first"))
                        }
                    })
                    .await
            })
        };
        entered.await.unwrap();
        let before = waiter.wait_stats();
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (waiter, k) = (waiter.clone(), k.clone());
            waiters.spawn(async move {
                Idempotent::new(&*waiter, k)
                    .name("notify.exec")
                    .run(|| async { Ok::<_, Error>(String::from("second")) })
                    .await
            });
        }
        until("every waiter polled", || {
            waiter.wait_stats().polls >= before.polls + 8
        })
        .await;
        let _ = go_tx.send(());
        let _ = first.await.unwrap();
        let mut values = Vec::new();
        while let Some(done) = waiters.join_next().await {
            values.push(done.unwrap().expect("a waiter's result"));
        }
        let expected = if fail_first { "second" } else { "first" };
        assert!(values.iter().all(|v| v == expected), "{values:?}");
        let after = waiter.wait_stats();
        assert!(
            after.notified > before.notified,
            "woken by a notification (fail_first = {fail_first}): {before:?} → {after:?}"
        );
    }
}

/// A transactional holder notifies in its own transaction: its waiters are woken when it
/// commits; when its body fails, the rollback is followed by a notification too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_a_transactional_holder_are_woken_at_commit_and_after_rollback() {
    let holder = Arc::new(shared_store().await);
    let waiter = Arc::new(shared_store().await);
    listening(&waiter).await;
    for fail in [false, true] {
        let k = unique("tx-wake");
        let key = Key::new("notify.tx", &k);
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let first = {
            let (holder, k) = (holder.clone(), k.clone());
            tokio::spawn(async move {
                holder
                    .transactional(k)
                    .name("notify.tx")
                    .run(async move |_tx| {
                        let _ = entered_tx.send(());
                        let _ = go.await;
                        if fail {
                            Err(Error::InProgress {
                                retry_after: Duration::ZERO,
                            })
                        } else {
                            Ok(1u32)
                        }
                    })
                    .await
            })
        };
        entered.await.unwrap();
        let before = waiter.wait_stats();
        let waiting = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.wait(key, Duration::from_secs(60)).await })
        };
        until("the waiter polled", || {
            waiter.wait_stats().polls > before.polls
        })
        .await;
        let _ = go_tx.send(());
        let _ = first.await.unwrap();
        waiting.await.unwrap().expect("the wait ends");
        let after = waiter.wait_stats();
        assert_eq!(
            after.notified,
            before.notified + 1,
            "woken by a notification (fail = {fail}): {before:?} → {after:?}"
        );
        assert!(after.polls - before.polls <= 3, "{before:?} → {after:?}");
    }
}

/// The listener connection terminated by the server (`pg_terminate_backend`): its waiters fall
/// back to polling, the store connects again, and waits are woken by notifications again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_falls_back_to_polling_and_recovers() {
    let server = PgServer::shared();
    let app = unique("killme").replace('-', "_");
    let holder = table_store("notify_kill", |b| b).await;
    let waiter = Arc::new(
        PostgresStore::builder()
            .table("notify_kill")
            .connect(&format!("{}?application_name={app}", server.url()))
            .await
            .unwrap(),
    );
    let db = client(&server.url()).await;
    let lease = Duration::from_secs(60);
    let first = Key::new("notify.kill", &unique("first"));
    let Ok(Claim::Acquired(first_token)) = holder.claim(first, None, lease).await else {
        panic!("the key is free");
    };
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait(first, Duration::from_secs(120)).await })
    };
    until("the waiter listens", || {
        let stats = waiter.wait_stats();
        stats.polls >= 1 && stats.listener_connections == 1
    })
    .await;
    let before = waiter.wait_stats();
    let killed = count(
        &db,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
        &[&format!("{app} listener")],
    )
    .await;
    assert_eq!(killed, 1, "exactly the listener connection");
    until("the listener is back", || {
        waiter.wait_stats().listener_connections == 2
    })
    .await;
    let after_kill = waiter.wait_stats();
    assert!(
        after_kill.polls > before.polls,
        "the waiter polled when its listener was lost: {before:?} → {after_kill:?}"
    );
    assert!(!waiting.is_finished(), "the key is still held");
    // A new wait is woken by a notification on the new connection.
    let second = Key::new("notify.kill", &unique("second"));
    let Ok(Claim::Acquired(second_token)) = holder.claim(second, None, lease).await else {
        panic!("the key is free");
    };
    let waiting_second = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.wait(second, Duration::from_secs(120)).await })
    };
    let polls = waiter.wait_stats().polls;
    until("the second waiter polled", || {
        waiter.wait_stats().polls > polls
    })
    .await;
    let notified = waiter.wait_stats().notified;
    for (key, token) in [(second, second_token), (first, first_token)] {
        let stored = holder
            .complete(key, token, None, Bytes::from_static(b"1"), lease)
            .await
            .unwrap();
        assert!(matches!(stored, Completion::Stored));
    }
    waiting_second.await.unwrap().expect("the second wait ends");
    waiting.await.unwrap().expect("the first wait ends");
    let end = waiter.wait_stats();
    assert!(
        end.notified > notified,
        "woken by notifications again after the reconnection: {end:?}"
    );
}

/// Behind PgBouncer in transaction mode the store does not listen (LISTEN cannot work there):
/// its waiters poll and get their results; a completion sent through PgBouncer still wakes
/// the waiters of a store connected directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_waiters_poll_and_completions_still_notify() {
    let server = PgServer::shared();
    let bouncer = PgBouncer::start(server, 2);
    let pooled = Arc::new(
        PostgresStore::builder()
            .table("notify_bouncer")
            .transaction_pooler(true)
            .connect(&bouncer.url())
            .await
            .unwrap(),
    );
    pooled.migrate().await.unwrap();
    let direct = Arc::new(table_store("notify_bouncer", |b| b).await);
    listening(&direct).await;
    let lease = Duration::from_secs(60);
    // The pooled store waits for the direct store's claim: by polling.
    // Then the direct store waits for the pooled store's claim: woken by its notification.
    for (holder, waiter, notified) in [(&direct, &pooled, false), (&pooled, &direct, true)] {
        let key = Key::new("notify.bouncer", &unique("k"));
        let Ok(Claim::Acquired(token)) = holder.claim(key, None, lease).await else {
            panic!("the key is free");
        };
        let before = waiter.wait_stats();
        let waiting = {
            let waiter = waiter.clone();
            tokio::spawn(async move { waiter.wait(key, Duration::from_secs(60)).await })
        };
        until("the waiter polled", || {
            waiter.wait_stats().polls > before.polls
        })
        .await;
        let stored = holder
            .complete(key, token, None, Bytes::from_static(b"1"), lease)
            .await
            .unwrap();
        assert!(matches!(stored, Completion::Stored));
        waiting.await.unwrap().expect("the wait ends");
        let after = waiter.wait_stats();
        if notified {
            assert_eq!(after.notified, before.notified + 1, "{after:?}");
        } else {
            assert_eq!(after.notified, 0, "a pooler-mode store does not listen");
            assert_eq!(after.listener_connections, 0);
        }
    }
}

/// Under steady traffic with a short ttl, the store deletes expired rows by itself: the row
/// count stays bounded without any `purge_expired()` call. With `auto_cleanup(false)` every
/// row stays.
#[tokio::test]
async fn expired_rows_are_cleaned_by_normal_traffic_unless_turned_off() {
    const CALLS: usize = 1_500;
    const EVERY: u64 = 50;
    let db = client(&PgServer::shared().url()).await;
    let cleaned = table_store("cleanup_auto", |b| {
        b.cleanup_every(EVERY, Duration::from_secs(3600))
    })
    .await;
    let mut most = 0;
    for i in 0..CALLS {
        Idempotent::new(&cleaned, ("cleanup", i))
            .name("cleanup.auto")
            .ttl(Duration::from_millis(1))
            .run(|| async { Ok::<_, Error>(i) })
            .await
            .unwrap();
        if i % 50 == 49 {
            let rows = count(&db, "SELECT count(*) FROM cleanup_auto", &[]).await;
            most = most.max(rows);
        }
    }
    assert!(
        most <= 4 * EVERY as i64,
        "at most a few cleanups' worth of rows at any time, saw {most} of {CALLS}"
    );

    let kept = table_store("cleanup_off", |b| b.auto_cleanup(false)).await;
    for i in 0..300usize {
        Idempotent::new(&kept, ("cleanup", i))
            .name("cleanup.off")
            .ttl(Duration::from_millis(1))
            .run(|| async { Ok::<_, Error>(i) })
            .await
            .unwrap();
    }
    tokio::task::yield_now().await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM cleanup_off", &[]).await,
        300
    );
    assert_eq!(kept.purge_expired().await.unwrap(), 300);
}

/// Final review, finding 2: a transactional body that ran `COMMIT` itself and then went on past
/// its lease let another caller take the committed claim over and run the body again: the key
/// was sealed only when the body returned. The heartbeat now sees the transaction is no longer
/// the call's and seals the key at once.
#[tokio::test]
async fn a_body_that_commits_and_outlives_its_lease_is_sealed_at_once() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    orders_table(&db).await;
    let a = PostgresStore::connect(&url).await.expect("store");
    a.migrate().await.expect("migrate");
    let b = PostgresStore::connect(&url).await.expect("store");
    let k = unique("commit-then-slow");
    let runs = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (k, runs) = (k.clone(), runs.clone());
        async move {
            let k2 = k.clone();
            a.transactional(k)
                .name("tx.commit-slow")
                .lease(Duration::from_millis(600))
                .run(async move |tx| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                        .await?;
                    tx.batch_execute("COMMIT").await?;
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok::<_, TxError>(1u8)
                })
                .await
        }
    };
    let others = {
        let (k, runs) = (k.clone(), runs.clone());
        async move {
            let mut answers = Vec::new();
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let k2 = k.clone();
                let runs = runs.clone();
                let answer = b
                    .transactional(k.clone())
                    .name("tx.commit-slow")
                    .on_conflict(idem::OnConflict::Reject)
                    .run(async move |tx| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tx.execute("INSERT INTO tx_orders (k) VALUES ($1)", &[&k2])
                            .await?;
                        Ok::<_, TxError>(2u8)
                    })
                    .await;
                answers.push(answer);
            }
            answers
        }
    };
    let (first, answers) = tokio::join!(holder, others);
    assert!(matches!(first, Err(TxError::Idem(_))), "{first:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the body ran once: {answers:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM tx_orders WHERE k = $1", &[&k]).await,
        1
    );
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, Err(TxError::Idem(Error::Codec(_))))),
        "later calls see the sealed key: {answers:?}"
    );
}

/// A claim that finds the key lock taken by a statement that holds it for a moment (a cleanup
/// batch deleting the key's expired row, a completion) and no live row looks again after a
/// short pause instead of reporting the key busy: a caller in reject mode is not refused a key
/// that nobody holds. A lock held past the pauses (a claim still in flight) is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_lock_held_for_a_moment_is_not_a_busy_key() {
    let url = PgServer::shared().url();
    let store = PostgresStore::builder()
        .table("gated_claims")
        .auto_cleanup(false)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let k = unique("gated");
    let lock = support::postgres::key_lock_of(&store, &url, "gated", &k).await;
    let runs = Arc::new(AtomicUsize::new(0));

    // The record expires; another session takes the key lock for 40 ms, as a cleanup batch
    // deleting that row would. A claim in reject mode meanwhile executes the body, once.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Takes the key lock in another session, commits after `for_`; the receiver says when the
    // lock is taken.
    let hold = |for_: Duration| {
        let url = url.clone();
        let (locked_tx, locked) = tokio::sync::oneshot::channel();
        let released = tokio::spawn(async move {
            let holder = client(&url).await;
            holder.batch_execute("BEGIN").await.unwrap();
            let free: bool = holder
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock])
                .await
                .unwrap()
                .get(0);
            assert!(free, "the key lock is free before the test takes it");
            let _ = locked_tx.send(());
            tokio::time::sleep(for_).await;
            holder.batch_execute("COMMIT").await.unwrap();
        });
        (released, locked)
    };
    let (released, locked) = hold(Duration::from_millis(40));
    locked.await.unwrap();
    let out = {
        let runs = runs.clone();
        Idempotent::new(&store, k.clone())
            .name("gated")
            .ttl(Duration::from_millis(1))
            .on_conflict(OnConflict::Reject)
            .run(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(2u8)
            })
            .await
    };
    released.await.unwrap();
    assert_eq!(out.unwrap(), 2, "the key was free: the body runs");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Held for longer than the pauses (as by a claim whose row is not committed): busy.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (released, locked) = hold(Duration::from_secs(2));
    locked.await.unwrap();
    let out = {
        let runs = runs.clone();
        Idempotent::new(&store, k)
            .name("gated")
            .on_conflict(OnConflict::Reject)
            .run(|| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(3u8)
            })
            .await
    };
    assert!(matches!(out, Err(Error::InProgress { .. })), "{out:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a busy key's body does not run"
    );
    released.await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Steps (recovery points, `idem::step`) on PostgreSQL. The conformance suite checks the store's
// rules; these check the table, its migration and cleanup, and the executor end to end, with
// each effect counted.

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("the stock reservation was declined")]
    Declined,
    #[error(transparent)]
    Idem(#[from] Error),
}

/// A checkout whose stock reservation can be made to fail: a charge, then a reservation, each a
/// step; every effect counted.
struct Checkout {
    store: PostgresStore,
    charges: AtomicUsize,
    reservations: AtomicUsize,
    declines: AtomicUsize,
}

impl Checkout {
    #[idempotent(store = self.store, key = order, ttl = "1h", name = "tests.postgres.steps.checkout")]
    async fn checkout(&self, order: String) -> Result<String, StepError> {
        let charge = idem::step("charge", || async {
            let n = self.charges.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, StepError>(format!("ch_{n}"))
        })
        .await?;
        idem::step("reserve", || async {
            if self.declines.load(Ordering::SeqCst) > 0 {
                self.declines.fetch_sub(1, Ordering::SeqCst);
                return Err(StepError::Declined);
            }
            Ok(self.reservations.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .await?;
        Ok(charge)
    }
}

/// The step rows of `key` in `steps` (a quoted, schema-qualified table): names as bytes, values.
async fn step_rows(
    db: &tokio_postgres::Client,
    steps: &str,
    key: Key,
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    db.query(
        &format!("SELECT name, value FROM {steps} WHERE key = $1"),
        &[&&key.as_bytes()[..]],
    )
    .await
    .expect("read the steps table")
    .iter()
    .map(|row| (row.get::<_, Vec<u8>>(0), row.get::<_, Vec<u8>>(1)))
    .collect()
}

/// Through the attribute: the body charges, then its reservation fails, so the call fails and
/// its claim is released; the retry gets the recorded charge without charging again, reserves,
/// and completes, which deletes the steps; a third call replays the result.
#[tokio::test]
async fn a_body_that_failed_after_a_step_is_retried_without_running_the_step_again() {
    let shop = Checkout {
        store: shared_store().await,
        charges: AtomicUsize::new(0),
        reservations: AtomicUsize::new(0),
        declines: AtomicUsize::new(1),
    };
    let db = client(&PgServer::shared().url()).await;
    let order = unique("steps-order");
    let key = Key::new("tests.postgres.steps.checkout", &order);

    let failed = shop.checkout(order.clone()).await;
    assert!(matches!(failed, Err(StepError::Declined)), "{failed:?}");
    assert_eq!(shop.charges.load(Ordering::SeqCst), 1);
    assert_eq!(shop.reservations.load(Ordering::SeqCst), 0);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM idem_records WHERE key = $1",
            &[&&key.as_bytes()[..]]
        )
        .await,
        0,
        "the failed call's claim was released"
    );
    let rows = step_rows(&db, "idem_records_steps", key).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        [&b"charge".to_vec()],
        "the charge is recorded and outlives the release; the failed reservation is not"
    );

    assert_eq!(shop.checkout(order.clone()).await.unwrap(), "ch_1");
    assert_eq!(
        shop.charges.load(Ordering::SeqCst),
        1,
        "the retry got the recorded charge: the card was charged once"
    );
    assert_eq!(shop.reservations.load(Ordering::SeqCst), 1);
    assert!(
        step_rows(&db, "idem_records_steps", key).await.is_empty(),
        "the completion deleted the call's steps"
    );

    assert_eq!(shop.checkout(order).await.unwrap(), "ch_1");
    assert_eq!(shop.charges.load(Ordering::SeqCst), 1);
    assert_eq!(shop.reservations.load(Ordering::SeqCst), 1, "replayed");
}

/// The scenario of `support::steps_model::a_takeover_does_not_run_a_recorded_step_again`.
#[tokio::test]
async fn a_recorded_step_is_not_run_again_after_a_takeover() {
    let store = shared_store().await;
    support::steps_model::a_takeover_does_not_run_a_recorded_step_again(
        &store,
        Duration::from_millis(500),
    )
    .await;
}

/// A holder that stopped being polled past its lease, while another call took the key over,
/// gets `Error::LeaseLost` from its next step when it resumes: the step checks its lease before
/// its effect (the store has not answered it for more than half a lease), so the effect does
/// not run, nothing is recorded, and the new holder's steps are untouched.
#[tokio::test]
async fn a_holder_whose_lease_was_taken_over_cannot_record_a_step() {
    let store = shared_store().await;
    let db = client(&PgServer::shared().url()).await;
    let lease = Duration::from_millis(400);
    let order = unique("steps-stale");
    let key = Key::new("steps.stale", &order);
    let reservations = Arc::new(AtomicUsize::new(0));
    let (charged_tx, charged) = tokio::sync::oneshot::channel::<()>();
    let (go, resume) = tokio::sync::oneshot::channel::<()>();
    let stale = {
        let reservations = reservations.clone();
        Idempotent::new(&store, order.clone())
            .name("steps.stale")
            .lease(lease)
            .run(move || async move {
                idem::step("charge", || async { Ok::<_, Error>(1u8) }).await?;
                let _ = charged_tx.send(());
                let _ = resume.await;
                idem::step("reserve", || async {
                    Ok::<_, Error>(reservations.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
                Ok::<u8, Error>(1)
            })
    };
    let mut stale = Box::pin(stale);
    tokio::select! {
        _ = &mut stale => unreachable!("the holder waits"),
        _ = charged => {}
    }
    // Not polled: no renewal. Past its lease, another caller takes the key over.
    tokio::time::sleep(lease * 2).await;
    let Ok(Claim::Acquired(fresh)) = store.claim(key, None, Duration::from_secs(60)).await else {
        panic!("the lapsed key must be taken over");
    };
    let _ = go.send(());
    let err = stale.await.expect_err("the stale holder's step must fail");
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert_eq!(
        reservations.load(Ordering::SeqCst),
        0,
        "the stale holder learned that it lost the key before the step's effect"
    );
    let rows = step_rows(&db, "idem_records_steps", key).await;
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        [&b"charge".to_vec()],
        "the stale holder's step is not recorded"
    );
    match store.steps(key, fresh).await.unwrap() {
        idem::store::RecordedSteps::Held(steps) => assert_eq!(
            steps
                .iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>(),
            ["charge"],
            "the new holder reads the charge and nothing else"
        ),
        other => panic!("the new holder holds the key: {other:?}"),
    }
    assert_eq!(
        store
            .complete(
                key,
                fresh,
                None,
                Bytes::from_static(b"1"),
                Duration::from_secs(60)
            )
            .await
            .unwrap(),
        Completion::Stored
    );
}

/// Step names are stored as `bytea`, so a NUL byte is kept where `text` would refuse it: names
/// that differ only after a NUL are distinct steps, in the table and through the executor.
#[tokio::test]
async fn step_names_keep_their_nul_bytes() {
    let store = shared_store().await;
    let db = client(&PgServer::shared().url()).await;
    let key = Key::new("steps.nul", &unique("nul"));
    let Ok(Claim::Acquired(token)) = store.claim(key, None, Duration::from_secs(60)).await else {
        panic!("claim");
    };
    let names = ["a", "a\0", "a\0b", "\0", "\0\0"];
    for (i, name) in names.iter().enumerate() {
        let recorded = store
            .record_step(
                key,
                token,
                (*name).to_owned(),
                Bytes::from(vec![i as u8]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert_eq!(recorded, idem::store::StepRecorded::Recorded, "{name:?}");
    }
    let rows = step_rows(&db, "idem_records_steps", key).await;
    let expected: BTreeMap<Vec<u8>, Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.as_bytes().to_vec(), vec![i as u8]))
        .collect();
    assert_eq!(rows, expected, "each name is stored with its NUL bytes");
    assert!(store.remove(key).await.unwrap());

    // Through the executor: a retry gets each value under its own name.
    let runs = Arc::new(AtomicUsize::new(0));
    let order = unique("nul-order");
    for attempt in 0..2 {
        let runs = runs.clone();
        let out = Idempotent::new(&store, order.clone())
            .name("steps.nul")
            .run(move || async move {
                let mut got = Vec::new();
                for name in ["x", "x\0", "x\0y"] {
                    got.push(
                        idem::step(name, || async {
                            Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst))
                        })
                        .await?,
                    );
                }
                if attempt == 0 {
                    return Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    });
                }
                Ok(got)
            })
            .await;
        if attempt == 1 {
            assert_eq!(
                out.unwrap(),
                [0, 1, 2],
                "each name got its own recorded value"
            );
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "no step ran twice");
}

/// `purge_expired` deletes the step rows whose ttl ran out (a released call's, left there for
/// a retry that never came) and keeps live ones; the store's automatic cleanup does too.
#[tokio::test]
async fn expired_step_rows_are_purged() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    let store = table_store("purge_steps", |b| b.auto_cleanup(false)).await;
    let steps = format!("\"public\".\"{}\"", store.steps_table());
    assert_eq!(store.steps_table(), "purge_steps_steps");
    db.batch_execute(&format!("DELETE FROM {steps}"))
        .await
        .unwrap();
    let short = Duration::from_millis(200);
    let released_with = |names: &'static [&'static str], ttl: Duration, label: &'static str| {
        let store = store.clone();
        async move {
            let key = Key::new("steps.purge", &unique(label));
            let Ok(Claim::Acquired(token)) = store.claim(key, None, Duration::from_secs(60)).await
            else {
                panic!("claim");
            };
            for name in names {
                let recorded = store
                    .record_step(
                        key,
                        token,
                        (*name).to_owned(),
                        Bytes::from_static(b"v"),
                        ttl,
                    )
                    .await
                    .unwrap();
                assert_eq!(recorded, idem::store::StepRecorded::Recorded);
            }
            assert!(store.release(key, token).await.unwrap());
            key
        }
    };
    let gone = released_with(&["charge", "reserve", "email"], short, "short").await;
    let kept = released_with(&["charge", "reserve"], Duration::from_secs(600), "long").await;
    tokio::time::sleep(short * 2).await;
    assert_eq!(
        store.purge_expired().await.unwrap(),
        3,
        "the three expired step rows (and no record: both claims were released)"
    );
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    assert!(step_rows(&db, &steps, gone).await.is_empty());
    assert_eq!(
        step_rows(&db, &steps, kept).await.len(),
        2,
        "live steps stay"
    );

    // The automatic cleanup (here after every granted claim) deletes them too.
    let cleaned = table_store("purge_steps_auto", |b| {
        b.cleanup_every(1, Duration::from_secs(3600))
    })
    .await;
    let auto_steps = format!("\"public\".\"{}\"", cleaned.steps_table());
    for i in 0..3u8 {
        let key = Key::new("steps.purge.auto", &unique("auto"));
        let Ok(Claim::Acquired(token)) = cleaned.claim(key, None, Duration::from_secs(60)).await
        else {
            panic!("claim");
        };
        cleaned
            .record_step(
                key,
                token,
                format!("step-{i}"),
                Bytes::from_static(b"v"),
                short,
            )
            .await
            .unwrap();
        cleaned.release(key, token).await.unwrap();
    }
    tokio::time::sleep(short * 2).await;
    let mut left = i64::MAX;
    for _ in 0..200 {
        // Each granted claim may start a cleanup.
        let key = Key::new("steps.purge.auto", &unique("trigger"));
        let _ = cleaned
            .claim(key, None, Duration::from_millis(1))
            .await
            .unwrap();
        left = count(&db, &format!("SELECT count(*) FROM {auto_steps}"), &[]).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "the automatic cleanup deletes expired step rows");
}

/// The migration of a deployment made before steps existed: its records table (made by the
/// earlier `migration_sql`, holding a completed record) has no steps table. A store refuses to
/// run a call there (before its body runs), saying to migrate; `migrate` adds the steps table
/// without touching the records table, the record still replays, and steps work, in the store
/// that was refused too (no restart). Applying `migration_sql()` with a tool does the same.
#[tokio::test]
async fn an_existing_deployment_gains_the_steps_table_by_migrating() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    for (table, by_tool) in [("upgrade_records", false), ("upgrade_tool_records", true)] {
        // The DDL of the version before steps, as a deployment applied it.
        db.batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_steps; \
             CREATE TABLE IF NOT EXISTS \"public\".\"{table}\" (\n\
                 key         bytea       PRIMARY KEY CHECK (octet_length(key) = 32),\n\
                 token       bytea       NOT NULL CHECK (octet_length(token) = 16),\n\
                 fingerprint bytea       CHECK (octet_length(fingerprint) = 32),\n\
                 value       bytea,\n\
                 expires_at  timestamptz NOT NULL\n\
             );\n\
             CREATE INDEX IF NOT EXISTS \"{table}_expires_idx\" ON \"public\".\"{table}\" \
               (expires_at);"
        ))
        .await
        .unwrap();
        // A completed record written before the upgrade.
        let old = Key::new("steps.upgrade", &"before");
        db.execute(
            &format!(
                "INSERT INTO {table} (key, token, value, expires_at) \
                 VALUES ($1, $2, $3, now() + interval '1 hour')"
            ),
            &[
                &&old.as_bytes()[..],
                &&[7u8; 16][..],
                &&b"\x93\x01\x02\x03"[..],
            ],
        )
        .await
        .unwrap();
        let store = PostgresStore::builder()
            .table(table)
            .connect(&url)
            .await
            .unwrap();
        let runs = AtomicUsize::new(0);
        let refused = Idempotent::new(&store, 1u8)
            .name("steps.upgrade")
            .run(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(1u8)
            })
            .await;
        let text = refused
            .as_ref()
            .map_err(error_text)
            .err()
            .unwrap_or_default();
        assert!(
            matches!(refused, Err(Error::Store(_)))
                && text.contains(&format!("{table}_steps"))
                && text.contains("migrate"),
            "a records table without its steps table is refused, naming the fix: {refused:?}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "refused before the body runs"
        );

        if by_tool {
            db.batch_execute(&store.migration_sql()).await.unwrap();
        } else {
            let migrator = PostgresStore::builder()
                .table(table)
                .connect(&url)
                .await
                .unwrap();
            migrator.migrate().await.unwrap();
        }
        let steps_tables = count(
            &db,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = $1",
            &[&format!("{table}_steps")],
        )
        .await;
        assert_eq!(steps_tables, 1, "the steps table was added");
        let indexes = count(
            &db,
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1",
            &[&table],
        )
        .await;
        assert_eq!(
            indexes, 2,
            "the records table keeps its two indexes, no more"
        );
        match store.claim(old, None, Duration::from_secs(60)).await {
            Ok(Claim::Completed(done)) => assert_eq!(&done.value[..], b"\x93\x01\x02\x03"),
            other => panic!("the record from before the upgrade replays, got {other:?}"),
        }

        // Steps work now, in the store that was refused before.
        let charges = Arc::new(AtomicUsize::new(0));
        for attempt in 0..2 {
            let charges = charges.clone();
            let out = Idempotent::new(&store, 2u8)
                .name("steps.upgrade")
                .run(move || async move {
                    let receipt = idem::step("charge", || async {
                        Ok::<_, Error>(charges.fetch_add(1, Ordering::SeqCst))
                    })
                    .await?;
                    if attempt == 0 {
                        return Err(Error::InProgress {
                            retry_after: Duration::ZERO,
                        });
                    }
                    Ok(receipt)
                })
                .await;
            if attempt == 1 {
                assert_eq!(out.unwrap(), 0);
            }
        }
        assert_eq!(charges.load(Ordering::SeqCst), 1, "{table}: charged once");
        store
            .migrate()
            .await
            .expect("migrating again changes nothing");
    }
}

/// An `UNLOGGED` steps table is refused like an unlogged records table (a crash would empty
/// it, and recorded steps would run again), and accepted once it is `SET LOGGED`.
#[tokio::test]
async fn an_unlogged_steps_table_is_refused() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    let store = PostgresStore::builder()
        .table("unlogged_steps")
        .connect(&url)
        .await
        .unwrap();
    db.batch_execute(
        "DROP TABLE IF EXISTS unlogged_steps; DROP TABLE IF EXISTS unlogged_steps_steps",
    )
    .await
    .unwrap();
    let steps_create = format!(
        "CREATE TABLE IF NOT EXISTS \"public\".\"{}\"",
        store.steps_table()
    );
    let ddl = store.migration_sql();
    assert!(ddl.contains(&steps_create), "{ddl}");
    db.batch_execute(&ddl.replacen(
        &steps_create,
        &steps_create.replacen("CREATE TABLE", "CREATE UNLOGGED TABLE", 1),
        1,
    ))
    .await
    .unwrap();
    let err = store.migrate().await.expect_err("an unlogged steps table");
    let text = error_text(&err);
    assert!(
        text.contains("unlogged_steps_steps")
            && text.contains("UNLOGGED")
            && text.contains("SET LOGGED"),
        "the refusal names the steps table and the fix: {text}"
    );
    db.batch_execute("ALTER TABLE unlogged_steps_steps SET LOGGED")
        .await
        .unwrap();
    store.migrate().await.expect("logged again");
}

/// What steps cost: a call that runs none sends no statement for them (claim, complete); a call
/// with steps reads them once (at its first step) and sends one statement per recorded step;
/// its retry reads them once and records only the step that had not been recorded.
#[tokio::test]
async fn a_step_costs_one_statement_and_a_call_one_read() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .unwrap();
    // A table of its own, so statements of tests running meanwhile are not counted.
    let store = table_store("steps_cost", |b| b.auto_cleanup(false)).await;
    let statements = |like: &'static str| {
        let db = &db;
        async move {
            count(
                db,
                "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
                 WHERE query LIKE '%steps_cost%' AND query LIKE $1 \
                   AND query NOT LIKE '%pg_stat_statements%'",
                &[&like],
            )
            .await
        }
    };
    let reset = || db.execute("SELECT pg_stat_statements_reset()", &[]);
    let call = |fail: bool, order: &str| {
        Idempotent::new(&store, order.to_owned())
            .name("steps.cost")
            .run(move || async move {
                let a = idem::step("charge", || async { Ok::<_, Error>(1u8) }).await?;
                let b = idem::step("reserve", || async { Ok::<_, Error>(2u8) }).await?;
                if fail {
                    return Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    });
                }
                let c = idem::step("email", || async { Ok::<_, Error>(3u8) }).await?;
                Ok(a + b + c)
            })
    };
    let plain = unique("cost-plain");
    reset().await.unwrap();
    Idempotent::new(&store, plain)
        .name("steps.cost")
        .run(|| async { Ok::<_, Error>(0u8) })
        .await
        .unwrap();
    assert_eq!(
        statements("%").await,
        2,
        "a call without steps: claim and complete"
    );

    let order = unique("cost-steps");
    reset().await.unwrap();
    assert!(call(true, &order).await.is_err());
    assert_eq!(statements("%LEFT JOIN%").await, 1, "one read of the steps");
    assert_eq!(
        statements("%INSERT INTO \"public\".\"steps_cost_steps\"%").await,
        2,
        "one statement per recorded step"
    );
    assert_eq!(statements("%").await, 5, "claim, read, 2 steps, release");

    reset().await.unwrap();
    assert_eq!(call(false, &order).await.unwrap(), 6);
    assert_eq!(statements("%LEFT JOIN%").await, 1, "one read of the steps");
    assert_eq!(
        statements("%INSERT INTO \"public\".\"steps_cost_steps\"%").await,
        1,
        "only the step not recorded yet is written"
    );
    assert_eq!(statements("%").await, 4, "claim, read, 1 step, complete");
}

/// Behind PgBouncer in transaction mode (no named statements), the store passes the steps
/// checks of the conformance suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_pgbouncer_steps_pass_the_conformance_checks() {
    let server = PgServer::shared();
    let bouncer = PgBouncer::start(server, 2);
    let store = PostgresStore::builder()
        .table("bouncer_steps")
        .transaction_pooler(true)
        .pool_size(4)
        .connect(&bouncer.url())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    use idem::conformance as c;
    c::steps_are_recorded_under_the_holding_token(store.clone()).await;
    c::steps_survive_a_takeover(store.clone()).await;
    c::steps_survive_a_release(store.clone()).await;
    c::steps_are_fenced_by_the_token(store.clone()).await;
    c::complete_and_remove_delete_steps(store.clone()).await;
    c::steps_expire_with_their_ttl(store.clone()).await;
    c::step_names_and_values_round_trip(store.clone()).await;
    c::steps_stay_with_their_key(store).await;
}

/// A key's steps expire together, `ttl` after the last one was recorded: a step recorded
/// earlier is not lost while a later one lives (the retry would run the earlier effect again
/// and skip the later one), and none is purged before then.
#[tokio::test]
async fn a_keys_steps_expire_together_after_the_last_one() {
    let store = table_store("steps_together", |b| b.auto_cleanup(false)).await;
    let ttl = Duration::from_millis(600);
    let key = Key::new("steps.together", &unique("together"));
    let Ok(Claim::Acquired(token)) = store.claim(key, None, Duration::from_secs(60)).await else {
        panic!("claim");
    };
    let record = |name: &'static str| {
        store.record_step(key, token, name.to_owned(), Bytes::from_static(b"v"), ttl)
    };
    assert_eq!(
        record("charge").await.unwrap(),
        idem::store::StepRecorded::Recorded
    );
    tokio::time::sleep(ttl / 2).await;
    assert_eq!(
        record("reserve").await.unwrap(),
        idem::store::StepRecorded::Recorded
    );
    assert!(store.release(key, token).await.unwrap());
    // Past the first step's own ttl, within the second's.
    tokio::time::sleep(ttl * 3 / 4).await;
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "nothing expired yet"
    );
    let Ok(Claim::Acquired(next)) = store.claim(key, None, Duration::from_secs(60)).await else {
        panic!("claim");
    };
    match store.steps(key, next).await.unwrap() {
        idem::store::RecordedSteps::Held(mut steps) => {
            steps.sort();
            assert_eq!(
                steps
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>(),
                ["charge", "reserve"],
                "the first step lives as long as the last"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(store.release(key, next).await.unwrap());
    tokio::time::sleep(ttl).await;
    assert_eq!(store.purge_expired().await.unwrap(), 2, "then both expire");
}

/// A step is never accepted after a takeover was granted: a stale holder records steps in a
/// tight loop across the moment its lease runs out while another caller takes the key over the
/// moment it can; whatever the new holder reads right after its grant is all it ever sees of the
/// stale holder's steps (a step that landed after the grant would be seen by no read at the
/// grant, and its effect would then run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_step_is_accepted_after_a_takeover_was_granted() {
    let store = Arc::new(table_store("steps_race", |b| b.auto_cleanup(false)).await);
    let lease = Duration::from_millis(150);
    let mut stale_steps = 0;
    for round in 0..12u32 {
        let key = Key::new("steps.race", &unique("race"));
        let Ok(Claim::Acquired(stale)) = store.claim(key, None, lease).await else {
            panic!("claim");
        };
        let recorder = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut recorded = 0usize;
                loop {
                    let name = format!("step-{recorded}");
                    match store
                        .record_step(key, stale, name, Bytes::from_static(b"v"), LONG_TTL)
                        .await
                    {
                        Ok(idem::store::StepRecorded::Recorded) => recorded += 1,
                        Ok(_) => return recorded,
                        Err(e) => panic!("record_step: {e}"),
                    }
                }
            })
        };
        let fresh = loop {
            match store
                .claim(key, None, Duration::from_secs(60))
                .await
                .unwrap()
            {
                Claim::Acquired(token) => break token,
                Claim::Busy { .. } => tokio::task::yield_now().await,
                other => panic!("{other:?}"),
            }
        };
        let at_grant = store.steps(key, fresh).await.unwrap();
        let recorded = recorder.await.unwrap();
        let after = store.steps(key, fresh).await.unwrap();
        let (
            idem::store::RecordedSteps::Held(mut at_grant),
            idem::store::RecordedSteps::Held(mut after),
        ) = (at_grant, after)
        else {
            panic!("the new holder holds the key");
        };
        at_grant.sort();
        after.sort();
        assert_eq!(
            at_grant.len(),
            recorded,
            "round {round}: every step the stale holder was told is recorded is read at the grant"
        );
        assert_eq!(
            at_grant, after,
            "round {round}: no step landed after the grant"
        );
        stale_steps += recorded;
        store
            .complete(
                key,
                fresh,
                None,
                Bytes::from_static(b"done"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(stale_steps > 0, "the stale holders recorded steps");
}

const LONG_TTL: Duration = Duration::from_secs(600);

/// Steps are the request's that recorded them (the claim's fingerprint is kept with them),
/// through the executor: a request that charged and then failed leaves its charge; the same key
/// reused for another amount gets `Error::KeyReused` at its first step, whose effect does not
/// run; the first request's retry resumes with the recorded charge, and the steps it ran were
/// never run again.
#[tokio::test]
async fn steps_are_not_inherited_by_a_key_reused_for_another_request() {
    let store = shared_store().await;
    let order = unique("steps-reused");
    let charges = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(AtomicUsize::new(0));
    let attempt = |amount: u32, fail: bool| {
        let (charges, bodies) = (charges.clone(), bodies.clone());
        Idempotent::new(&store, order.clone())
            .name("steps.reused")
            .fingerprint(&amount)
            .run(move || async move {
                bodies.fetch_add(1, Ordering::SeqCst);
                let receipt = idem::step("charge", || async {
                    Ok::<_, Error>(charges.fetch_add(1, Ordering::SeqCst) as u32 + 1)
                })
                .await?;
                if fail {
                    return Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    });
                }
                Ok(receipt * 1000 + amount)
            })
    };
    assert!(attempt(100, true).await.is_err());
    assert_eq!(charges.load(Ordering::SeqCst), 1);

    let reused = attempt(200, false).await;
    assert!(matches!(reused, Err(Error::KeyReused)), "{reused:?}");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the other request's charge did not run"
    );

    assert_eq!(
        attempt(100, false).await.unwrap(),
        1100,
        "the first request resumes with its recorded charge"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1, "charged once in all");
    assert_eq!(bodies.load(Ordering::SeqCst), 3, "three bodies ran");
    assert_eq!(attempt(100, false).await.unwrap(), 1100, "replayed");
    assert_eq!(bodies.load(Ordering::SeqCst), 3);
}

/// A key whose steps all expired while their rows are still there (no cleanup came by) starts
/// anew at its next step: the old rows are not read, are cleared before the step is recorded
/// (none is left to be revived by it, not even one of another name), the step is recorded under
/// the new claim's fingerprint, and a step of an old name gets the new value.
#[tokio::test]
async fn a_step_recorded_after_the_keys_steps_expired_starts_them_anew() {
    let store = table_store("steps_anew", |b| b.auto_cleanup(false)).await;
    let db = client(&PgServer::shared().url()).await;
    let steps = format!("\"public\".\"{}\"", store.steps_table());
    let key = Key::new("steps.anew", &unique("anew"));
    let (old, new) = (
        idem::Fingerprint::of("amount=100"),
        idem::Fingerprint::of("amount=200"),
    );
    let claim = |fingerprint| {
        let store = &store;
        async move {
            match store.claim(key, fingerprint, Duration::from_secs(60)).await {
                Ok(Claim::Acquired(token)) => token,
                other => panic!("claim: {other:?}"),
            }
        }
    };
    let held = |steps: idem::store::RecordedSteps| match steps {
        idem::store::RecordedSteps::Held(mut steps) => {
            steps.sort();
            steps
        }
        other => panic!("the claim holds the key: {other:?}"),
    };
    let short = Duration::from_millis(300);
    let first = claim(Some(old)).await;
    for (name, value) in [("charge", "ch_1"), ("reserve", "r_1")] {
        let recorded = store
            .record_step(
                key,
                first,
                name.to_owned(),
                Bytes::from_static(value.as_bytes()),
                short,
            )
            .await
            .unwrap();
        assert_eq!(recorded, idem::store::StepRecorded::Recorded);
    }
    assert!(store.release(key, first).await.unwrap());
    tokio::time::sleep(short * 2).await;
    assert_eq!(step_rows(&db, &steps, key).await.len(), 2, "not purged");

    let second = claim(Some(new)).await;
    assert_eq!(
        held(store.steps(key, second).await.unwrap()),
        [],
        "expired steps are nobody's"
    );
    let recorded = store
        .record_step(
            key,
            second,
            "charge".to_owned(),
            Bytes::from_static(b"ch_2"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(recorded, idem::store::StepRecorded::Recorded);
    let rows = db
        .query(
            &format!("SELECT name, value, fingerprint FROM {steps} WHERE key = $1"),
            &[&&key.as_bytes()[..]],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the expired rows were cleared: {rows:?}");
    assert_eq!(rows[0].get::<_, Vec<u8>>(0), b"charge");
    assert_eq!(rows[0].get::<_, Vec<u8>>(1), b"ch_2", "the new value");
    assert_eq!(
        rows[0].get::<_, Option<Vec<u8>>>(2).as_deref(),
        Some(&new.as_bytes()[..]),
        "recorded under the new claim's fingerprint"
    );
    assert_eq!(
        held(store.steps(key, second).await.unwrap()),
        [("charge".to_owned(), Bytes::from_static(b"ch_2"))]
    );
    assert!(store.release(key, second).await.unwrap());
    let again = claim(Some(old)).await;
    assert_eq!(
        store.steps(key, again).await.unwrap(),
        idem::store::RecordedSteps::KeyReused,
        "the new steps are the new request's"
    );
}

/// Over `PostgresStore`, a store whose step records take `delay` to leave (the record is sent
/// only after it, so a call dropped meanwhile never sends it): the executor then hands the step
/// to `release_on_drop_after_steps`, which `PostgresStore` implements.
struct SlowRecords {
    inner: PostgresStore,
    delay: Duration,
}

impl Store for SlowRecords {
    fn claim(
        &self,
        key: Key,
        fingerprint: Option<idem::Fingerprint>,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<Claim, Error>> {
        self.inner.claim(key, fingerprint, lease)
    }
    fn complete(
        &self,
        key: Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) -> idem::store::BoxFuture<'_, Result<Completion, Error>> {
        self.inner.complete(key, token, fingerprint, value, ttl)
    }
    fn renew(
        &self,
        key: Key,
        token: idem::store::Token,
        lease: Duration,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.inner.renew(key, token, lease)
    }
    fn release(
        &self,
        key: Key,
        token: idem::store::Token,
    ) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.inner.release(key, token)
    }
    fn wait(&self, key: Key, timeout: Duration) -> idem::store::BoxFuture<'_, Result<(), Error>> {
        self.inner.wait(key, timeout)
    }
    fn remove(&self, key: Key) -> idem::store::BoxFuture<'_, Result<bool, Error>> {
        self.inner.remove(key)
    }
    fn release_on_drop(&self, key: Key, token: idem::store::Token) {
        self.inner.release_on_drop(key, token)
    }
    fn complete_on_drop(
        &self,
        key: Key,
        token: idem::store::Token,
        fingerprint: Option<idem::Fingerprint>,
        value: Bytes,
        ttl: Duration,
    ) {
        self.inner
            .complete_on_drop(key, token, fingerprint, value, ttl)
    }
    fn max_value_len(&self) -> Option<usize> {
        self.inner.max_value_len()
    }
    fn record_step(
        &self,
        key: Key,
        token: idem::store::Token,
        step: String,
        value: Bytes,
        ttl: Duration,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::StepRecorded, Error>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.record_step(key, token, step, value, ttl).await
        })
    }
    fn steps(
        &self,
        key: Key,
        token: idem::store::Token,
    ) -> idem::store::BoxFuture<'_, Result<idem::store::RecordedSteps, Error>> {
        self.inner.steps(key, token)
    }
    fn release_on_drop_after_steps(
        &self,
        key: Key,
        token: idem::store::Token,
        steps: Vec<(String, Bytes)>,
        ttl: Duration,
    ) {
        self.inner
            .release_on_drop_after_steps(key, token, steps, ttl)
    }
}

/// A call dropped (a client's timeout) after its step's effect ran but before the step's record
/// reached the store: the store records it in the background and only then releases the claim,
/// so the retry, which waits for the claim, finds the step recorded and does not run it again,
/// long before the dropped call's lease would have run out.
#[tokio::test]
async fn a_dropped_call_hands_its_unrecorded_steps_to_the_store_then_releases() {
    let store = SlowRecords {
        inner: shared_store().await,
        delay: Duration::from_millis(300),
    };
    let order = unique("steps-dropped");
    let charges = Arc::new(AtomicUsize::new(0));
    let call = || {
        let charges = charges.clone();
        Idempotent::new(&store, order.clone())
            .name("steps.dropped")
            .lease(Duration::from_secs(60))
            .run(move || async move {
                let receipt = idem::step("charge", || async {
                    Ok::<_, Error>(charges.fetch_add(1, Ordering::SeqCst) + 1)
                })
                .await?;
                let reservation =
                    idem::step("reserve", || async { Ok::<_, Error>(7usize) }).await?;
                Ok::<usize, Error>(receipt * 10 + reservation)
            })
    };
    let dropped = tokio::time::timeout(Duration::from_millis(100), call()).await;
    assert!(dropped.is_err(), "dropped while the charge's record waits");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "the charge ran");
    // The hand-off records it in the background (racing this test: not looked at here). Had
    // the drop only released the claim, the retry below would charge again.

    let started = Instant::now();
    assert_eq!(call().await.unwrap(), 17, "the retry got the first receipt");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the dropped call's step was recorded before its claim was released: charged once"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the claim was released, not left to its lease: {:?}",
        started.elapsed()
    );
}

/// Recording a step costs the same however many the call recorded before it: a call of 2,000
/// steps writes 2,000 rows and rewrites none (each row is still the version its own step wrote,
/// and the server counts no row updated on the steps table), and its last steps take about as
/// long as its first ones. Each step used to rewrite the expiry of every earlier row of its key:
/// n²/2 row versions, 17 ms per step at the end of such a call.
#[tokio::test]
async fn recording_a_step_costs_the_same_however_many_came_before() {
    const STEPS: usize = 2_000;
    const WINDOW: usize = 200;
    let store = table_store("steps_many", |b| b.auto_cleanup(false)).await;
    let db = client(&PgServer::shared().url()).await;
    let steps = format!("\"public\".\"{}\"", store.steps_table());
    let stats = || {
        let (db, steps) = (&db, &steps);
        async move {
            let row = db
                .query_one(
                    "SELECT coalesce(n_tup_ins, 0), coalesce(n_tup_upd, 0) \
                     FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
                    &[steps],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    let (inserted_before, updated_before) = stats().await;
    let order = unique("many");
    let key = Key::new("steps.many", &order);
    let times = Arc::new(std::sync::Mutex::new(Vec::with_capacity(STEPS)));
    let out = {
        let times = times.clone();
        Idempotent::new(&store, order.clone())
            .name("steps.many")
            .lease(Duration::from_secs(600))
            .run(move || async move {
                for i in 0..STEPS {
                    let started = Instant::now();
                    idem::step(&format!("step-{i}"), || async { Ok::<_, Error>(i) }).await?;
                    times.lock().unwrap().push(started.elapsed());
                }
                // Fails, so that its steps stay for the checks.
                Err::<u8, _>(Error::InProgress {
                    retry_after: Duration::ZERO,
                })
            })
            .await
    };
    assert!(matches!(out, Err(Error::InProgress { .. })), "{out:?}");
    // Its sessions end, which sends their counters to the statistics at once.
    drop(store);

    let versions = count(
        &db,
        &format!("SELECT count(DISTINCT xmin::text) FROM {steps} WHERE key = $1"),
        &[&&key.as_bytes()[..]],
    )
    .await;
    assert_eq!(
        versions, STEPS as i64,
        "each row is the version its own step wrote: no step rewrote another's row"
    );
    // (Or within seconds of going idle.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let (inserted, updated) = loop {
        let (inserted, updated) = stats().await;
        if inserted - inserted_before >= STEPS as i64 || Instant::now() > deadline {
            break (inserted - inserted_before, updated - updated_before);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(inserted, STEPS as i64, "one row written per step");
    assert_eq!(updated, 0, "no row rewritten");

    let median = |window: &[Duration]| {
        let mut window = window.to_vec();
        window.sort();
        window[window.len() / 2]
    };
    let times = times.lock().unwrap().clone();
    let (first, last) = (median(&times[..WINDOW]), median(&times[STEPS - WINDOW..]));
    let total: Duration = times.iter().sum();
    eprintln!(
        "{STEPS} steps in {total:?}: median of the first {WINDOW} {first:?}, of the last \
         {WINDOW} {last:?}"
    );
    assert!(
        last < first * 3,
        "the last steps cost about what the first did: {first:?} then {last:?}"
    );
}

/// The longest step name the executor takes (`idem::MAX_STEP_NAME_LEN` bytes), of bytes that
/// compression cannot shrink, fits the steps table's primary key together with the key: it is
/// recorded, and a retry gets its value without running it again.
#[tokio::test]
async fn the_longest_step_name_is_recorded() {
    let store = shared_store().await;
    let db = client(&PgServer::shared().url()).await;
    // Pseudo-random ASCII (xorshift): nothing for the index's compression to find.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let name: String = (0..idem::MAX_STEP_NAME_LEN)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from((state >> 32) as u8 & 0x7f)
        })
        .collect();
    assert_eq!(name.len(), idem::MAX_STEP_NAME_LEN);
    let order = unique("long-name");
    let key = Key::new("steps.long_name", &order);
    let runs = Arc::new(AtomicUsize::new(0));
    for attempt in 0..2 {
        let (runs, step_name) = (runs.clone(), name.clone());
        let out = Idempotent::new(&store, order.clone())
            .name("steps.long_name")
            .run(move || async move {
                let got = idem::step(&step_name, || async {
                    Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
                if attempt == 0 {
                    return Err(Error::InProgress {
                        retry_after: Duration::ZERO,
                    });
                }
                Ok(got)
            })
            .await;
        if attempt == 0 {
            assert!(matches!(out, Err(Error::InProgress { .. })), "{out:?}");
            let rows = step_rows(&db, "idem_records_steps", key).await;
            assert_eq!(
                rows.keys().collect::<Vec<_>>(),
                [&name.as_bytes().to_vec()],
                "recorded under its whole name"
            );
        } else {
            assert_eq!(out.unwrap(), 0, "the retry got the recorded value");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the step ran once");
}

/// `migrate` gives the steps table both its indexes (`expires_at`, for the cleanup, and
/// `(key, expires_at)`, for a key's liveness) even when other relations have their names;
/// migrating again adds none.
#[tokio::test]
async fn migrate_indexes_the_steps_table_when_the_index_names_are_taken() {
    let url = PgServer::shared().url();
    let db = client(&url).await;
    let indexes = |table: &'static str, columns: &'static str| {
        let db = &db;
        async move {
            count(
                db,
                "SELECT count(*) FROM pg_indexes \
                 WHERE schemaname = 'public' AND tablename = $1 AND indexdef LIKE $2",
                &[&table, &format!("%btree ({columns})")],
            )
            .await
        }
    };
    let plain = table_store("steps_idx", |b| b).await;
    assert_eq!(plain.steps_table(), "steps_idx_steps");
    assert!(
        plain.migration_sql().contains(
            "\"steps_idx_steps_key_idx\" ON \"public\".\"steps_idx_steps\" (key, expires_at)"
        ),
        "{}",
        plain.migration_sql()
    );
    assert_eq!(indexes("steps_idx_steps", "expires_at").await, 1);
    assert_eq!(indexes("steps_idx_steps", "key, expires_at").await, 1);
    assert_eq!(
        indexes("steps_idx_steps", "key, name").await,
        1,
        "the primary key"
    );

    db.batch_execute(
        "DROP TABLE IF EXISTS steps_taken, steps_taken_steps, steps_taken_steps_exp_idx, \
           steps_taken_steps_key_idx; \
         CREATE TABLE steps_taken_steps_exp_idx (a int); \
         CREATE TABLE steps_taken_steps_key_idx (a int)",
    )
    .await
    .unwrap();
    let store = table_store("steps_taken", |b| b).await;
    store.migrate().await.unwrap();
    assert_eq!(indexes("steps_taken_steps", "expires_at").await, 1);
    assert_eq!(indexes("steps_taken_steps", "key, expires_at").await, 1);

    // A table whose `(key, expires_at)` index went missing gets it back, and only it; once
    // there, it is found by its definition, whatever its name.
    db.batch_execute(
        "DO $$ DECLARE i text; BEGIN \
           SELECT indexname INTO i FROM pg_indexes WHERE tablename = 'steps_taken_steps' \
             AND indexdef LIKE '%(key, expires_at)'; \
           EXECUTE format('DROP INDEX %I', i); END $$",
    )
    .await
    .unwrap();
    assert_eq!(indexes("steps_taken_steps", "key, expires_at").await, 0);
    store.migrate().await.unwrap();
    assert_eq!(indexes("steps_taken_steps", "expires_at").await, 1);
    assert_eq!(indexes("steps_taken_steps", "key, expires_at").await, 1);
    db.batch_execute("DROP TABLE steps_taken_steps_exp_idx, steps_taken_steps_key_idx")
        .await
        .unwrap();
    store.migrate().await.unwrap();
    assert_eq!(indexes("steps_taken_steps", "key, expires_at").await, 1);
}

/// A purge reads the expired rows only: with 5,000 live records and 5,000 live step rows and
/// nothing expired, it reads (next to) no entry of either table's `expires_at` index. Its scan
/// used to be bounded by `clock_timestamp()`, which PostgreSQL cannot use to bound an index scan
/// (it is volatile), so a purge with less than a batch to do read every live row.
#[tokio::test]
async fn a_purge_reads_no_live_row() {
    let store = table_store("purge_reads", |b| b.auto_cleanup(false)).await;
    let db = client(&PgServer::shared().url()).await;
    db.batch_execute(
        "INSERT INTO purge_reads (key, token, value, expires_at) \
           SELECT sha256(i::text::bytea), '\\x00000000000000000000000000000000', '\\x01', \
                  now() + interval '1 hour' \
           FROM generate_series(1, 5000) i; \
         INSERT INTO purge_reads_steps (key, name, value, expires_at) \
           SELECT sha256((i % 100)::text::bytea), i::text::bytea, '\\x01', \
                  now() + interval '1 hour' \
           FROM generate_series(1, 5000) i; \
         ANALYZE purge_reads; ANALYZE purge_reads_steps",
    )
    .await
    .unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    // Its sessions end, which sends their counters to the statistics at once.
    drop(store);
    let read = |index: &'static str| {
        let db = &db;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let row = db
                    .query_one(
                        "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes \
                         WHERE indexrelname = $1",
                        &[&index],
                    )
                    .await
                    .unwrap();
                let (scans, read) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
                if scans > 0 || Instant::now() > deadline {
                    break (scans, read);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let (scans, records) = read("purge_reads_expires_idx").await;
    assert!(scans > 0, "the purge used the records' expires_at index");
    assert!(records < 10, "read {records} live records");
    let (scans, steps) = read("purge_reads_steps_exp_idx").await;
    assert!(scans > 0, "the purge used the steps' expires_at index");
    assert!(steps < 10, "read {steps} live step rows");
}
