#![cfg(feature = "postgres")]
//! Reliability of `PostgresStore` (issue 6), against real PostgreSQL servers the harness creates
//! (tests/support/postgres.rs):
//!
//! - races: random interleavings of claim / complete / renew / release / remove / wait with
//!   short real leases, checked against the model of DESIGN.md's record states;
//! - crashes: a process holding a key is killed (`SIGKILL`) mid-body, and another takes over once
//!   the lease ran out and runs the body once; a holder paused (`SIGSTOP`) past its lease and
//!   resumed cannot overwrite the new holder's result, and warns `lease_lost`;
//! - outages: the server is killed (`SIGKILL`, a crash) and restarted twice during a run of many
//!   calls: every call ends with its value or `Error::Store` within the store's timeout, none
//!   hangs, every key is served afterwards, and no key whose record was stored runs twice.
//!
//! Each test writes its counts to `<target dir>/reliability/<test>.txt` (see docs/reliability.md).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem::{Claim, Error, Idempotent, Key, PostgresStore, Status, Store};
use proptest::test_runner::TestCaseError;
use support::chaos::{self, ChildLines, ModelCounts, Timing};
use support::postgres::PgServer;

async fn store_on(url: &str) -> PostgresStore {
    let store = PostgresStore::from_url(url).unwrap_or_else(|e| panic!("store for {url}: {e}"));
    store.migrate().await.expect("migrate");
    store
}

const PG_TIMING: Timing = Timing {
    short: Duration::from_millis(150),
    long: Duration::from_secs(30),
    advances: [
        Duration::from_millis(1),
        Duration::from_millis(40),
        Duration::from_millis(200),
    ],
    // The database's clock (`statement_timestamp()`) is read when the statement starts, inside
    // the interval the model knows; allow a little more.
    margin: Duration::from_millis(15),
    paused: false,
    wait: Duration::from_millis(30),
};

/// The model run of tests/support/chaos.rs against PostgreSQL, with short real leases and ttls.
#[test]
fn postgres_store_matches_the_model_under_random_interleavings() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let store = runtime.block_on(store_on(&PgServer::shared().url()));
    let cases = 40 * chaos::env_u64("IDEM_RELIABILITY_CASES", 1).clamp(1, 1000) as u32;
    let total = Mutex::new(ModelCounts::default());
    let mut runner = chaos::runner(cases, 64);
    let result = runner.run(&chaos::ops(1, 40), |ops| {
        let counts = runtime
            .block_on(chaos::run_model(&store, PG_TIMING, "model.postgres", &ops))
            .map_err(TestCaseError::fail)?;
        total.lock().unwrap().add(&counts);
        Ok(())
    });
    if let Err(err) = result {
        panic!("PostgresStore broke the contract: {err}");
    }
    let c = *total.lock().unwrap();
    assert!(c.fenced > 0 && c.acquired > 0, "{c:?}");
    let pairs: Vec<(&str, u64)> = chaos::counts_to_pairs(&c).into_iter().collect();
    chaos::report("model_postgres", &pairs);
}

// ---------------------------------------------------------------------------------------------
// Crashes: this test binary, started again as `crash_child`, holds a key.

const CHILD_ROLE: &str = "IDEM_REL_PG_CHILD_ROLE";
const CHILD_URL: &str = "IDEM_REL_PG_CHILD_URL";
const CHILD_KEY: &str = "IDEM_REL_PG_CHILD_KEY";
const LEASE: Duration = Duration::from_millis(1000);

/// Counts one execution of `key` in the database (shared by every process).
async fn count_execution(store: &PostgresStore, key: &str) {
    let client = store.pool().get().await.expect("a pooled connection");
    client
        .execute(
            "INSERT INTO idem_rel_execs (key, n) VALUES ($1, 1) \
             ON CONFLICT (key) DO UPDATE SET n = idem_rel_execs.n + 1",
            &[&key],
        )
        .await
        .expect("count the execution");
}

async fn executions(store: &PostgresStore, key: &str) -> i32 {
    let client = store.pool().get().await.expect("a pooled connection");
    client
        .query_opt("SELECT n FROM idem_rel_execs WHERE key = $1", &[&key])
        .await
        .expect("read the count")
        .map_or(0, |row| row.get(0))
}

async fn execs_table(store: &PostgresStore) {
    let client = store.pool().get().await.expect("a pooled connection");
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS idem_rel_execs (key text PRIMARY KEY, n int)")
        .await
        .or_else(|e| {
            // Two tests creating it at once: one of them loses the race, harmlessly.
            if e.to_string().contains("already exists") || e.code().is_some() {
                Ok(())
            } else {
                Err(e)
            }
        })
        .expect("create the executions table");
}

/// The holder: claims the key and runs a body that counts itself, says so, and then hangs
/// (`hold`, to be killed) or runs past its lease (`pause`, to be stopped and resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let (Ok(role), Ok(url), Ok(key)) = (
        std::env::var(CHILD_ROLE),
        std::env::var(CHILD_URL),
        std::env::var(CHILD_KEY),
    ) else {
        return; // not started as a child: nothing to do
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .try_init();
    let store = PostgresStore::from_url(&url).expect("store");
    let out = Idempotent::new(&store, key.as_str())
        .name("test")
        .lease(LEASE)
        .run_with_outcome(|| async {
            count_execution(&store, &key).await;
            println!("BODY STARTED");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            if role == "hold" {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(LEASE * 2).await;
            Ok::<_, Error>("A".to_owned())
        })
        .await
        .expect("the paused holder gets its own value back");
    println!("OUTCOME {:?} {}", out.status, out.value);
}

fn spawn_child(role: &str, url: &str, key: &str) -> std::process::Child {
    let me = std::env::current_exe().expect("the test binary");
    std::process::Command::new(me)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_URL, url)
        .env(CHILD_KEY, key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a child process")
}

/// This process calls the same key: it waits for the dead (or frozen) holder's lease to run
/// out, then runs the body once and stores "B". Returns when its body started.
async fn take_over(store: &PostgresStore, key: &str) -> Duration {
    let since = Instant::now();
    let started = Mutex::new(None);
    let out = Idempotent::new(store, key)
        .name("test")
        .lease(LEASE)
        .wait_timeout(Duration::from_secs(20))
        .run_with_outcome(|| async {
            *started.lock().unwrap() = Some(since.elapsed());
            count_execution(store, key).await;
            Ok::<_, Error>("B".to_owned())
        })
        .await
        .expect("the key is taken over once the holder's lease ran out");
    assert_eq!((out.value.as_str(), out.status), ("B", Status::Executed));
    started.into_inner().unwrap().expect("the body ran")
}

/// What is left of the lease on `key`'s row, by the database's clock (zero if none).
async fn lease_left(store: &PostgresStore, key: &str) -> Duration {
    let client = store.pool().get().await.expect("a pooled connection");
    let sql = format!(
        "SELECT (extract(epoch FROM expires_at - statement_timestamp()) * 1000)::int8 \
         FROM {} WHERE key = $1 AND value IS NULL",
        store.table()
    );
    let key = Key::new("", key);
    let row = client
        .query_opt(&sql, &[&&key.as_bytes()[..]])
        .await
        .expect("read the lease");
    let ms: i64 = row.map_or(0, |r| r.get(0));
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

async fn stored_value(store: &PostgresStore, key: &str) -> String {
    match store.claim(Key::new("", key), None, LEASE).await {
        Ok(Claim::Completed(done)) => String::from_utf8_lossy(&done.value).into_owned(),
        other => panic!("the record of {key} must be completed, got {other:?}"),
    }
}

fn unique(label: &str) -> String {
    format!("{label}-{}", idem::Token::generate().as_u128())
}

/// A holder killed mid-body blocks its key only until its lease runs out; then another process
/// runs the body once and stores its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_body_is_taken_over_after_its_lease() {
    let url = PgServer::shared().url();
    let store = store_on(&url).await;
    execs_table(&store).await;
    const ROUNDS: u64 = 2;
    for round in 0..ROUNDS {
        let key = unique("killed");
        let mut child = spawn_child("hold", &url, &key);
        let mut lines = ChildLines::new(child.stdout.take().unwrap());
        assert!(
            lines.wait_for("BODY STARTED", Duration::from_secs(60)),
            "the child never started its body: {}",
            lines.rest(Duration::ZERO)
        );
        child.kill().expect("SIGKILL the holder");
        let _ = child.wait();
        let left = lease_left(&store, &key).await;
        let started_after = take_over(&store, &key).await;
        // Nobody may take over before the dead holder's lease, as the server had it when the
        // holder died, ran out (allowing for the server's millisecond clock).
        assert!(
            started_after + Duration::from_millis(20) >= left,
            "round {round}: the key was taken over {started_after:?} after the holder died, \
             with {left:?} left on its lease: executions doubled"
        );
        assert_eq!(stored_value(&store, &key).await, "\"B\"");
        assert_eq!(executions(&store, &key).await, 2, "round {round}");
    }
    chaos::report(
        "crash_kill_postgres",
        &[
            ("crashes_survived", ROUNDS),
            ("executions_doubled_within_a_lease", 0),
            ("records_lost", 0),
        ],
    );
}

/// A holder frozen past its lease is taken over; resumed, it cannot overwrite the new holder's
/// result, gets `LeaseLost`, and warns `lease_lost` on its stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_cannot_overwrite_the_new_result() {
    let url = PgServer::shared().url();
    let store = store_on(&url).await;
    execs_table(&store).await;
    const ROUNDS: u64 = 2;
    for round in 0..ROUNDS {
        let key = unique("paused");
        let mut child = spawn_child("pause", &url, &key);
        let pid = child.id();
        let mut out = ChildLines::new(child.stdout.take().unwrap());
        let mut err = ChildLines::new(child.stderr.take().unwrap());
        assert!(
            out.wait_for("BODY STARTED", Duration::from_secs(60)),
            "the child never started its body: {}",
            out.rest(Duration::ZERO)
        );
        chaos::signal(pid, "-STOP");
        let left = lease_left(&store, &key).await;
        let takeover = take_over(&store, &key).await;
        assert!(
            takeover + Duration::from_millis(20) >= left,
            "round {round}: taken over after {takeover:?}, with {left:?} left on the lease"
        );
        chaos::signal(pid, "-CONT");
        let status =
            tokio::task::block_in_place(|| chaos::wait_child(&mut child, Duration::from_secs(60)));
        let stdout = out.rest(Duration::from_secs(2));
        let stderr = err.rest(Duration::from_secs(2));
        assert!(
            status.success(),
            "the paused child failed ({status}):\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("OUTCOME LeaseLost A"),
            "the resumed holder must learn that its lease was lost:\n{stdout}\n{stderr}"
        );
        assert!(
            stderr.contains("lease_lost") && stderr.contains("WARN"),
            "the resumed holder must warn lease_lost:\n{stderr}"
        );
        assert_eq!(
            stored_value(&store, &key).await,
            "\"B\"",
            "round {round}: the new holder's result was overwritten"
        );
        assert_eq!(executions(&store, &key).await, 2, "round {round}");
    }
    chaos::report(
        "crash_pause_postgres",
        &[
            ("pauses_survived", ROUNDS),
            ("lease_lost_warnings", ROUNDS),
            ("results_overwritten", 0),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Outages.

/// Many calls while the server is killed (SIGKILL: a crash, recovered from its WAL) and
/// restarted twice (see `chaos::outage_run`); the store has its default timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crashes_mid_run_lose_nothing_and_hang_nothing() {
    let server = Arc::new(PgServer::start());
    let store = store_on(&server.url()).await;
    let (down, up) = (server.clone(), server.clone());
    let counts = chaos::outage_run(
        Arc::new(store) as Arc<dyn Store>,
        idem::store::postgres::DEFAULT_TIMEOUT,
        Box::new(move || down.kill()),
        Box::new(move || up.restart()),
    )
    .await;
    chaos::report("outage_postgres", &counts);
}
