#![cfg(feature = "postgres")]
//! The transactional mode, the same tests on each backend: the store's own tokio-postgres pool
//! and (feature `sqlx-postgres`) an application's `sqlx::PgPool`. Each test is written once,
//! over [`Backend`], and `on_each_backend!` runs it on both; the number of times the body ran
//! is the assertion.
//!
//! A failing body leaves neither writes nor record; concurrent duplicates write once; a process
//! killed before the commit leaves neither and the retry runs once; waiters are woken by the
//! commit and after a rollback; a key reused with another fingerprint is refused; a body that
//! runs `COMMIT` itself is refused and its key sealed; the call's future is `Send` (spawned,
//! and held where an axum handler's future must be).
//!
//! The killed process is this test binary again, run with `IDEM_TX_CHILD` set (see
//! `child_process_entry`).

mod support;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "sqlx-postgres")]
use idem::store::postgres::sqlx;
use idem::store::postgres::tokio_postgres;
use idem::{Error, Key, OnConflict, Outcome, PostgresStore, Status};
use support::postgres::PgServer;

/// Where the transaction of a call comes from.
#[derive(Clone)]
enum Backend {
    /// The store's own pool.
    TokioPostgres,
    /// The application's sqlx pool.
    #[cfg(feature = "sqlx-postgres")]
    Sqlx(sqlx::PgPool),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::TokioPostgres => "tokio-postgres",
            #[cfg(feature = "sqlx-postgres")]
            Backend::Sqlx(_) => "sqlx",
        }
    }

    /// The backend called `name`, on the server at `url`.
    async fn named(name: &str, url: &str) -> Backend {
        match name {
            #[cfg(feature = "sqlx-postgres")]
            "sqlx" => Backend::sqlx(url).await,
            _ => {
                let _ = url;
                Backend::TokioPostgres
            }
        }
    }

    #[cfg(feature = "sqlx-postgres")]
    async fn sqlx(url: &str) -> Backend {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await
            .expect("a sqlx pool on the test server");
        Backend::Sqlx(pool)
    }
}

/// What a test's body does besides counting its run and inserting its row.
#[derive(Clone, Copy, Default)]
struct Body {
    /// Returns `Err(TxError::Declined)` after its write.
    fail: bool,
    /// Awaits this long after its write.
    hold: Option<Duration>,
    /// Sends `COMMIT` itself after its write (a misuse idem must catch).
    commit: bool,
    /// Says `WROTE` on stdout after its write, and never returns (to be killed).
    hang: bool,
    /// The call is made with `on_conflict = reject` (not the body's own doing, but where a
    /// test says how its call behaves).
    reject: bool,
}

#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("declined")]
    Declined,
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[cfg(feature = "sqlx-postgres")]
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Idem(#[from] Error),
}

const INSERT: &str = "INSERT INTO tx_items (k) VALUES ($1)";

/// One transactional call keyed by `k` (namespace `tx.items`) whose body counts its run in
/// `runs`, inserts a row of `k` into `tx_items`, then does what `body` says.
async fn call(
    backend: &Backend,
    store: &PostgresStore,
    k: &str,
    fingerprint: Option<&str>,
    body: Body,
    runs: &AtomicUsize,
) -> Result<Outcome<usize>, TxError> {
    let call = store
        .transactional(k.to_owned())
        .name("tx.items")
        .lease(Duration::from_secs(10));
    let call = match fingerprint {
        Some(fingerprint) => call.fingerprint(fingerprint),
        None => call,
    };
    let call = if body.reject {
        call.on_conflict(OnConflict::Reject)
    } else {
        call
    };
    match backend {
        Backend::TokioPostgres => {
            call.run_with_outcome(async |tx| {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.execute(INSERT, &[&k]).await?;
                then(body, async || {
                    tx.batch_execute("COMMIT").await.map_err(TxError::from)
                })
                .await?;
                Ok(k.len())
            })
            .await
        }
        #[cfg(feature = "sqlx-postgres")]
        Backend::Sqlx(pool) => {
            call.sqlx(pool)
                .run_with_outcome(async |tx| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    sqlx::query(INSERT).bind(k).execute(&mut *tx).await?;
                    then(body, async || {
                        // (`sqlx::raw_sql(..).execute` would do too, but its future is not
                        // `Send` inside a spawned call: see `Transactional::run` on `Sqlx`.)
                        sqlx::query("COMMIT").execute(&mut *tx).await?;
                        Ok(())
                    })
                    .await?;
                    Ok(k.len())
                })
                .await
        }
    }
}

/// The rest of a test body, after its write: `commit` is how the backend sends `COMMIT`.
async fn then(
    body: Body,
    commit: impl AsyncFnOnce() -> Result<(), TxError>,
) -> Result<(), TxError> {
    if let Some(hold) = body.hold {
        tokio::time::sleep(hold).await;
    }
    if body.commit {
        commit().await?;
    }
    if body.hang {
        println!("WROTE");
        std::future::pending::<()>().await;
    }
    if body.fail {
        return Err(TxError::Declined);
    }
    Ok(())
}

/// A store on the shared server's default table, migrated, with the test table.
async fn store() -> PostgresStore {
    let url = PgServer::shared().url();
    let store = PostgresStore::connect(&url).await.expect("store from URL");
    store.migrate().await.expect("migrate");
    let db = client(&url).await;
    // `CREATE TABLE IF NOT EXISTS` is not safe against itself: a transaction-scoped advisory
    // lock serialises the tests that create it at once.
    db.batch_execute(
        "BEGIN; SELECT pg_advisory_xact_lock(4712); \
         CREATE TABLE IF NOT EXISTS tx_items (id bigserial PRIMARY KEY, k text NOT NULL); \
         COMMIT;",
    )
    .await
    .expect("the test table");
    store
}

async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(connection);
    client
}

/// How many rows of `k` the bodies wrote (committed).
async fn rows(k: &str) -> i64 {
    let db = client(&PgServer::shared().url()).await;
    db.query_one("SELECT count(*) FROM tx_items WHERE k = $1", &[&k])
        .await
        .expect("count rows")
        .get(0)
}

/// Whether `k` has a record (of any state) in the store's table.
async fn record_exists(k: &str) -> bool {
    let db = client(&PgServer::shared().url()).await;
    let key = Key::new("tx.items", &k);
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM idem_records WHERE key = $1",
            &[&&key.as_bytes()[..]],
        )
        .await
        .expect("look for the record")
        .get(0);
    n > 0
}

fn unique(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Each test once per backend, in a module named after it.
macro_rules! on_each_backend {
    ($(async fn $name:ident($backend:ident: Backend) $body:block)*) => {
        $(async fn $name($backend: Backend) $body)*

        mod tokio_postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::TokioPostgres).await
                }
            )*
        }

        #[cfg(feature = "sqlx-postgres")]
        mod sqlx_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let url = super::PgServer::shared().url();
                    super::$name(super::Backend::sqlx(&url).await).await
                }
            )*
        }
    };
}

on_each_backend! {
    async fn leftovers_on_the_session_never_reach_the_next_caller(backend: Backend) {
        let url = PgServer::shared().url();
        let store = store().await;
        let db = client(&url).await;
        db.batch_execute(
            "DO $$ BEGIN CREATE ROLE idem_tx_other SUPERUSER; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await
        .expect("a second role");
        for leftover in [
            "SET SESSION AUTHORIZATION idem_tx_other",
            "SET ROLE idem_tx_other",
            "LISTEN idem_tx_leftover",
            "PREPARE idem_tx_leftover AS SELECT 1",
            "CREATE TEMP TABLE idem_tx_leftover (x int)",
        ] {
            let state = session_leftovers(&backend, &store, leftover).await;
            assert!(
                state.dirty.is_empty(),
                "[{}] after `{leftover}`, later calls saw {:?}",
                backend.name(),
                state.dirty
            );
        }
    }
    async fn a_key_lock_held_for_a_moment_is_not_a_busy_key(backend: Backend) {
        // A claim that finds the key's lock taken and no live record (a cleanup batch deleting
        // the key's expired record holds it so) pauses and claims again: a caller that does not
        // wait is not refused a key that nobody holds.
        let url = PgServer::shared().url();
        let store = store().await;
        let k = unique("gated");
        let runs = AtomicUsize::new(0);
        let lock = support::postgres::key_lock_of(&store, &url, "tx.items", &k).await;

        // Another session holds the lock for 40 ms; a call in reject mode meanwhile runs once.
        let holder = client(&url).await;
        holder.batch_execute("BEGIN").await.expect("begin");
        let free: bool = holder
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&lock])
            .await
            .expect("take the key lock")
            .get(0);
        assert!(free, "the key lock is free before the test takes it");
        let release = async {
            tokio::time::sleep(Duration::from_millis(40)).await;
            holder.batch_execute("COMMIT").await.expect("commit");
        };
        let reject = Body { reject: true, ..Body::default() };
        let (out, ()) = tokio::join!(call(&backend, &store, &k, None, reject, &runs), release);
        let out = out.unwrap_or_else(|e| panic!("[{}] the key was free: {e}", backend.name()));
        assert_eq!(out.status, Status::Executed);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "[{}]", backend.name());
        assert_eq!(rows(&k).await, 1);
    }

    async fn a_failing_body_leaves_neither_writes_nor_record_and_the_retry_runs_once(backend: Backend) {
        let store = store().await;
        let k = unique("fails");
        let runs = AtomicUsize::new(0);
        let failing = Body { fail: true, ..Body::default() };
        let failed = call(&backend, &store, &k, None, failing, &runs).await;
        assert!(matches!(failed, Err(TxError::Declined)), "{failed:?}");
        assert_eq!(rows(&k).await, 0, "no write");
        assert!(!record_exists(&k).await, "no record");

        let done = call(&backend, &store, &k, None, Body::default(), &runs).await.unwrap();
        assert_eq!((done.value, done.status), (k.len(), Status::Executed));
        let again = call(&backend, &store, &k, None, Body::default(), &runs).await.unwrap();
        assert_eq!((again.value, again.status), (k.len(), Status::Replayed));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the failure, then the retry, once");
        assert_eq!(rows(&k).await, 1);
        assert!(record_exists(&k).await);

        // The ordinary executor sees the same record (same name and key).
        let replay = idem::Idempotent::new(&store, k.clone())
            .name("tx.items")
            .run(|| async { Ok::<usize, Error>(0) })
            .await
            .unwrap();
        assert_eq!(replay, k.len());
    }

    async fn concurrent_duplicates_write_once(backend: Backend) {
        let store = Arc::new(store().await);
        let k = unique("concurrent");
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (backend, store, k, runs) = (backend.clone(), store.clone(), k.clone(), runs.clone());
            // Spawned: the call's future is `Send`.
            tasks.spawn(async move {
                let hold = Body { hold: Some(Duration::from_millis(200)), ..Body::default() };
                call(&backend, &store, &k, None, hold, &runs).await
            });
        }
        let mut statuses = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let done = done.expect("the task").expect("the call");
            assert_eq!(done.value, k.len());
            statuses.push(done.status);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one execution: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == Status::Executed).count(), 1);
        assert_eq!(rows(&k).await, 1, "one write");
    }

    async fn waiters_are_woken_by_the_commit_and_after_a_rollback(backend: Backend) {
        let store = Arc::new(store().await);
        for fail in [false, true] {
            let k = unique("wake");
            let runs = Arc::new(AtomicUsize::new(0));
            let holder = {
                let (backend, store, k, runs) = (backend.clone(), store.clone(), k.clone(), runs.clone());
                tokio::spawn(async move {
                    let body = Body { fail, hold: Some(Duration::from_millis(400)), ..Body::default() };
                    call(&backend, &store, &k, None, body, &runs).await
                })
            };
            // The holder has claimed the key once it runs.
            let started = Instant::now();
            while runs.load(Ordering::SeqCst) == 0 {
                assert!(started.elapsed() < Duration::from_secs(10), "the holder runs");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let before = store.wait_stats();
            let waited = Instant::now();
            let mut waiters = tokio::task::JoinSet::new();
            for _ in 0..3 {
                let (backend, store, k, runs) = (backend.clone(), store.clone(), k.clone(), runs.clone());
                waiters.spawn(async move {
                    call(&backend, &store, &k, None, Body::default(), &runs).await
                });
            }
            let held = holder.await.expect("the holder's task");
            assert_eq!(held.is_err(), fail, "{held:?}");
            let mut statuses = Vec::new();
            while let Some(done) = waiters.join_next().await {
                statuses.push(done.expect("a waiter's task").expect("a waiter's call").status);
            }
            // Woken, not left to the 2 s poll of a notified waiter.
            assert!(waited.elapsed() < Duration::from_millis(1500), "{:?}", waited.elapsed());
            assert!(store.wait_stats().notified > before.notified, "woken by a notification");
            if fail {
                assert_eq!(runs.load(Ordering::SeqCst), 2, "the rollback, then one waiter ran");
                assert_eq!(statuses.iter().filter(|s| **s == Status::Executed).count(), 1);
            } else {
                assert_eq!(runs.load(Ordering::SeqCst), 1, "only the holder ran");
                assert!(statuses.iter().all(|s| *s == Status::Waited), "{statuses:?}");
            }
            assert_eq!(rows(&k).await, 1);
        }
    }

    async fn a_key_reused_with_another_fingerprint_is_refused(backend: Backend) {
        let store = store().await;
        let k = unique("reused");
        let runs = AtomicUsize::new(0);
        let first = call(&backend, &store, &k, Some("a"), Body::default(), &runs).await.unwrap();
        assert_eq!(first.status, Status::Executed);
        let same = call(&backend, &store, &k, Some("a"), Body::default(), &runs).await.unwrap();
        assert_eq!(same.status, Status::Replayed);
        let other = call(&backend, &store, &k, Some("b"), Body::default(), &runs).await;
        assert!(matches!(other, Err(TxError::Idem(Error::KeyReused))), "{other:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(rows(&k).await, 1);
    }

    async fn a_body_that_commits_itself_is_refused_and_its_key_sealed(backend: Backend) {
        let store = store().await;
        let k = unique("commits");
        let runs = AtomicUsize::new(0);
        let committing = Body { commit: true, ..Body::default() };
        let refused = call(&backend, &store, &k, None, committing, &runs).await;
        assert!(
            matches!(&refused, Err(TxError::Idem(Error::Store(e))) if e.to_string().contains("ended the transaction")),
            "{refused:?}"
        );
        // Its write committed with the claim: the key is sealed, and the body never runs again.
        assert_eq!(rows(&k).await, 1);
        let retry = call(&backend, &store, &k, None, Body::default(), &runs).await;
        assert!(matches!(retry, Err(TxError::Idem(Error::Codec(_)))), "{retry:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
        assert_eq!(rows(&k).await, 1);
    }

    async fn a_process_killed_before_the_commit_leaves_neither_and_the_retry_runs_once(backend: Backend) {
        let url = PgServer::shared().url();
        let store = store().await;
        let k = unique("killed");
        let mut child = child_process(backend.name(), &url, &k);
        let stdout = child.stdout.take().expect("the child's stdout");
        let (said, heard) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let wrote = BufReader::new(stdout)
                .lines()
                .any(|l| l.map(|l| l.contains("WROTE")).unwrap_or(false));
            let _ = said.send(wrote);
        });
        let wrote = heard.recv_timeout(Duration::from_secs(60));
        if wrote != Ok(true) {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the child's output");
            panic!(
                "the child must report its uncommitted write ({wrote:?}); its stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The child wrote inside its transaction and waits: kill it before it commits.
        child.kill().expect("kill the child");
        let _ = child.wait();
        // The server rolls the transaction back when it sees the connection gone.
        let gone = Instant::now();
        while record_exists(&k).await || rows(&k).await > 0 {
            assert!(gone.elapsed() < Duration::from_secs(10), "the server rolled back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let runs = AtomicUsize::new(0);
        for expected in [Status::Executed, Status::Replayed, Status::Replayed] {
            let done = call(&backend, &store, &k, None, Body::default(), &runs).await.unwrap();
            assert_eq!(done.status, expected);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the retry ran once");
        assert_eq!(rows(&k).await, 1);
    }

    async fn the_call_is_send_where_an_axum_handler_must_be(backend: Backend) {
        let store = Arc::new(store().await);
        let k = unique("send");
        // What axum asks of a handler's future (`Send + 'static`), checked by the compiler.
        fn handler<F: Future + Send + 'static>(future: F) -> F {
            future
        }
        let runs = Arc::new(AtomicUsize::new(0));
        let handled = handler({
            let (store, k, runs) = (store.clone(), k.clone(), runs.clone());
            async move { call(&backend, &store, &k, None, Body::default(), &runs).await }
        });
        let done = tokio::spawn(handled).await.expect("the task").expect("the call");
        assert_eq!(done.status, Status::Executed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

/// The tokio-postgres body written inline, as a user would, is `Send`, spawned.
#[tokio::test]
async fn an_inline_tokio_postgres_body_is_send() {
    let store = Arc::new(store().await);
    let k = unique("inline");
    let task = tokio::spawn({
        let store = store.clone();
        let k = k.clone();
        async move {
            store
                .transactional(k.clone())
                .name("tx.items")
                .run(async move |tx| {
                    tx.execute(INSERT, &[&k]).await.map_err(Error::store)?;
                    Ok::<_, Error>(1u8)
                })
                .await
        }
    });
    assert_eq!(task.await.expect("the task").expect("the call"), 1);
    assert_eq!(rows(&k).await, 1);
}

/// The sqlx body written inline, as a user would, is `Send`, spawned.
#[cfg(feature = "sqlx-postgres")]
#[tokio::test]
async fn an_inline_sqlx_body_is_send() {
    let url = PgServer::shared().url();
    let store = Arc::new(store().await);
    let pool = sqlx::PgPool::connect(&url).await.expect("a sqlx pool");
    let k = unique("inline-sqlx");
    let task = tokio::spawn({
        let (store, k) = (store.clone(), k.clone());
        async move {
            store
                .transactional(k.clone())
                .name("tx.items")
                .sqlx(&pool)
                .run(async move |tx| {
                    sqlx::query(INSERT)
                        .bind(&k)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::store)?;
                    Ok::<_, Error>(1u8)
                })
                .await
        }
    });
    assert_eq!(task.await.expect("the task").expect("the call"), 1);
    assert_eq!(rows(&k).await, 1);
}

/// Re-runs this test binary as a child that writes `k` in a transactional body of `backend`
/// and waits to be killed (see [`child_process_entry`]).
fn child_process(backend: &str, url: &str, k: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("path of the test binary");
    Command::new(exe)
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IDEM_TX_CHILD", backend)
        .env("IDEM_TX_URL", url)
        .env("IDEM_TX_KEY", k)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a child test process")
}

/// The work of a child process; does nothing in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(backend) = std::env::var("IDEM_TX_CHILD") else {
        return;
    };
    let url = std::env::var("IDEM_TX_URL").expect("IDEM_TX_URL");
    let k = std::env::var("IDEM_TX_KEY").expect("IDEM_TX_KEY");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let store = PostgresStore::connect(&url).await.expect("store from URL");
        let backend = Backend::named(&backend, &url).await;
        let runs = AtomicUsize::new(0);
        let hang = Body {
            hang: true,
            ..Body::default()
        };
        let _ = call(&backend, &store, &k, None, hang, &runs).await;
    });
}

/// A tokio-postgres body whose statement failed and that recovered with `ROLLBACK TO SAVEPOINT`
/// keeps its transaction while it awaits something else for longer than the lease: the
/// keep-alive beside it goes on in the aborted transaction (each beat fails, but counts as the
/// session's activity), as it does in a healthy one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_recovers_with_a_savepoint_keeps_its_transaction() {
    let store = store().await;
    let k = unique("savepoint");
    let runs = AtomicUsize::new(0);
    let out = store
        .transactional(k.clone())
        .name("tx.items")
        .lease(Duration::from_millis(600))
        .run(async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            tx.batch_execute("SAVEPOINT s").await?;
            let failed = tx.batch_execute("SELECT 1/0").await;
            assert!(failed.is_err(), "the statement fails");
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.batch_execute("ROLLBACK TO SAVEPOINT s").await?;
            tx.execute(INSERT, &[&k]).await?;
            // Longer than the lease, with nothing sent by the body.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tx.execute(INSERT, &[&k]).await?;
            Ok::<_, TxError>(7u8)
        })
        .await;
    assert_eq!(out.expect("the call"), 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(rows(&k).await, 2, "both writes committed");
    assert!(record_exists(&k).await);
}

/// A sqlx call cancelled while its `BEGIN` is in flight (here: the server's backend frozen
/// with SIGSTOP) does not give the application's pool a connection inside an open transaction:
/// the application's next autocommit write through the pool commits.
#[cfg(feature = "sqlx-postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlx_call_cancelled_during_begin_leaves_the_pool_clean() {
    let url = PgServer::shared().url();
    let store = Arc::new(store().await);
    // Without the ping before each acquire, the call reaches its `BEGIN` on the frozen backend
    // (with it, the call would wait in `acquire`).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .expect("a sqlx pool of one");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the backend's pid");
    let signal = |sig: &str| {
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let k = unique("begin-cancelled");
    let call = tokio::spawn({
        let (store, pool, k) = (store.clone(), pool.clone(), k.clone());
        async move {
            store
                .transactional(k.clone())
                .name("tx.items")
                .sqlx(&pool)
                .run(async move |tx| {
                    sqlx::query(INSERT).bind(&k).execute(&mut *tx).await?;
                    Ok::<_, TxError>(1u8)
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    let _ = call.await;
    signal("-CONT");
    // The thawed backend runs the `BEGIN` it was sent before the application's write arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let app = unique("app-write");
    sqlx::query(INSERT)
        .bind(&app)
        .execute(&pool)
        .await
        .expect("the application's write");
    assert_eq!(rows(&app).await, 1, "the application's write committed");
    assert_eq!(rows(&k).await, 0, "the cancelled call wrote nothing");
}

/// A sqlx pool whose connections get session settings from `after_connect` (a common set-up)
/// keeps its connections across transactional calls: only settings a body changes close a
/// connection, and a body's `SET` without `LOCAL` still does.
#[cfg(feature = "sqlx-postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlx_pool_with_session_settings_keeps_its_connections() {
    use sqlx::Executor as _;
    let url = PgServer::shared().url();
    let store = store().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET statement_timeout = '5s'; SET search_path = public")
                    .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("a sqlx pool with after_connect");
    let mut pids = std::collections::HashSet::new();
    for i in 0..10 {
        let k = unique("after-connect");
        let pid = store
            .transactional(k.clone())
            .name("tx.items")
            .sqlx(&pool)
            .run(async |tx| {
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *tx)
                    .await?;
                Ok::<_, TxError>(pid)
            })
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        pids.insert(pid);
    }
    assert!(
        pids.len() <= 2,
        "10 calls on a pool of 2 used {} connections",
        pids.len()
    );

    // A body that changes a session setting for good gets its connection closed.
    let leaking = store
        .transactional(unique("leaks"))
        .name("tx.items")
        .sqlx(&pool)
        .run(async |tx| {
            sqlx::query("SET statement_timeout = '7s'")
                .execute(&mut *tx)
                .await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *tx)
                .await?;
            Ok::<_, TxError>(pid)
        })
        .await
        .expect("the leaking call");
    for _ in 0..4 {
        let seen: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&pool)
            .await
            .expect("show");
        assert_eq!(
            seen, "5s",
            "no connection of the pool carries the body's setting"
        );
    }
    let still: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE pid = $1")
        .bind(leaking)
        .fetch_all(&pool)
        .await
        .expect("pg_stat_activity");
    assert!(still.is_empty(), "the leaking connection was closed");
}

/// What a body leaves on its session past the commit, besides settings: the session
/// authorization, a `LISTEN`, an SQL `PREPARE`, a temporary table. The connection is closed, so
/// no later user of the pool runs as another user or meets the body's leftovers; a connection
/// the body left clean goes back to the pool.
async fn session_leftovers(backend: &Backend, store: &PostgresStore, leftover: &str) -> State {
    let k = unique("leftover");
    let call = store.transactional(k).name("tx.leftovers");
    let leftover = leftover.to_owned();
    match backend {
        Backend::TokioPostgres => call
            .run(async |tx| {
                tx.batch_execute(&leftover).await?;
                Ok::<_, TxError>(())
            })
            .await
            .expect("the leaving call"),
        #[cfg(feature = "sqlx-postgres")]
        Backend::Sqlx(pool) => call
            .sqlx(pool)
            .run(async |tx| {
                sqlx::query(&leftover).execute(&mut *tx).await?;
                Ok::<_, TxError>(())
            })
            .await
            .expect("the leaving call"),
    }
    // What the next calls' sessions look like.
    let mut seen = State::default();
    for _ in 0..4 {
        let call = store.transactional(unique("look")).name("tx.leftovers");
        let look = "SELECT session_user::text || '/' || current_user::text || '/' || \
                    (SELECT count(*) FROM pg_listening_channels())::text || '/' || \
                    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)::text || '/' || \
                    (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::text";
        let state: String = match backend {
            Backend::TokioPostgres => call
                .run(async |tx| Ok::<_, TxError>(tx.query_one(look, &[]).await?.get(0)))
                .await
                .expect("a later call"),
            #[cfg(feature = "sqlx-postgres")]
            Backend::Sqlx(pool) => call
                .sqlx(pool)
                .run(async |tx| {
                    Ok::<_, TxError>(sqlx::query_scalar(look).fetch_one(&mut *tx).await?)
                })
                .await
                .expect("a later call"),
        };
        if state != "postgres/postgres/0/0/0" {
            seen.dirty.push(state);
        }
    }
    seen
}

#[derive(Default)]
struct State {
    dirty: Vec<String>,
}

/// A sqlx pool whose connections take a role when they open (`after_connect`: `SET ROLE`, as
/// row-level security set-ups do) keeps its connections: the role is the connection's, not the
/// body's.
#[cfg(feature = "sqlx-postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlx_pool_whose_connections_set_a_role_keeps_them() {
    use sqlx::Executor as _;
    let url = PgServer::shared().url();
    let store = store().await;
    let db = client(&url).await;
    db.batch_execute(
        "DO $$ BEGIN CREATE ROLE idem_tx_rls SUPERUSER; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    )
    .await
    .expect("a role");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute("SET ROLE idem_tx_rls").await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("a sqlx pool that sets a role");
    let mut pids = std::collections::HashSet::new();
    for i in 0..10 {
        let (pid, role) = store
            .transactional(unique("rls"))
            .name("tx.items")
            .sqlx(&pool)
            .run(async |tx| {
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *tx)
                    .await?;
                let role: String = sqlx::query_scalar("SELECT current_user::text")
                    .fetch_one(&mut *tx)
                    .await?;
                Ok::<_, TxError>((pid, role))
            })
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(role, "idem_tx_rls");
        pids.insert(pid);
    }
    assert_eq!(pids.len(), 1, "10 calls on a pool of 1 kept its connection");
}

/// The store's own pool keeps its connections across clean transactional calls (the state check
/// after the commit closes only what a body left dirty).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_pool_keeps_its_connections_across_clean_calls() {
    let url = PgServer::shared().url();
    let _ = store().await; // the tables exist
    let store = PostgresStore::builder()
        .pool_size(1)
        .connect(&url)
        .await
        .expect("a store with a pool of one");
    let mut pids = std::collections::HashSet::new();
    for i in 0..10 {
        let pid = store
            .transactional(unique("clean"))
            .name("tx.items")
            .run(async |tx| {
                let row = tx.query_one("SELECT pg_backend_pid()", &[]).await?;
                Ok::<_, TxError>(row.get::<_, i32>(0))
            })
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}"));
        pids.insert(pid);
    }
    assert_eq!(
        pids.len(),
        1,
        "10 clean calls on a pool of one kept its connection"
    );
}

/// A step in a transactional body runs, and is checked (a name twice is refused), but the
/// transaction is its recovery point: a rolled-back body's step runs again on the retry, and a
/// committed call replays whole.
#[tokio::test]
async fn steps_in_a_transactional_body_commit_or_roll_back_with_it() {
    let store = store().await;
    let k = unique("steps");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut got = Vec::new();
    for fail in [true, false, false] {
        let (k, runs) = (k.clone(), runs.clone());
        let result = store
            .transactional(k.clone())
            .name("tx.items")
            .run(async move |tx| {
                let charge = idem::step("charge", || async {
                    Ok::<_, Error>(runs.fetch_add(1, Ordering::SeqCst) + 1)
                })
                .await?;
                tx.execute(INSERT, &[&k]).await.map_err(Error::store)?;
                let twice = idem::step("charge", || async { Ok::<_, Error>(0usize) }).await;
                assert!(
                    matches!(twice, Err(Error::StepRepeated { .. })),
                    "{twice:?}"
                );
                if fail {
                    return Err(Error::store("declined"));
                }
                Ok::<_, Error>(charge)
            })
            .await;
        got.push(result.ok());
    }
    assert_eq!(got, [None, Some(2), Some(2)]);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "rolled back with the body, then replayed whole"
    );
    assert_eq!(rows(&k).await, 1);
}
