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
//!   hangs, every key is served afterwards, and no key whose record was stored runs twice;
//! - cancellations: hundreds of calls dropped at random points (before the claim, during it,
//!   while the body runs, right after it returned `Ok`, in `complete` with a busy pool), with
//!   leases that never run out: no body returns `Ok` twice for one key.
//!
//! Each test writes its counts to `<target dir>/reliability/<test>.txt` (see docs/reliability.md).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem::store::Claim;
use idem::{Error, Idempotent, Key, PostgresStore, Status, Store};
use proptest::test_runner::TestCaseError;
use support::chaos::{self, ChildLines, ModelCounts, Timing};
use support::postgres::PgServer;

async fn store_on(url: &str) -> PostgresStore {
    let store = PostgresStore::connect(url)
        .await
        .unwrap_or_else(|e| panic!("store for {url}: {e}"));
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
    let store = PostgresStore::connect(&url).await.expect("store");
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
         FROM \"{}\".\"{}\" WHERE key = $1 AND value IS NULL",
        store.schema(),
        store.table()
    );
    let key = Key::new("test", key);
    let row = client
        .query_opt(&sql, &[&&key.as_bytes()[..]])
        .await
        .expect("read the lease");
    let ms: i64 = row.map_or(0, |r| r.get(0));
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

async fn stored_value(store: &PostgresStore, key: &str) -> String {
    match store.claim(Key::new("test", key), None, LEASE).await {
        Ok(Claim::Completed(done)) => idem::codec::from_slice::<String>(&done.value)
            .unwrap_or_else(|err| panic!("the record of {key} does not decode: {err}")),
        other => panic!("the record of {key} must be completed, got {other:?}"),
    }
}

fn unique(label: &str) -> String {
    format!("{label}-{}", idem::store::Token::generate().as_u128())
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
        assert_eq!(stored_value(&store, &key).await, "B");
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
            "B",
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

/// The server goes down while a body runs, so the body's `Ok` cannot be stored; it comes back
/// about two seconds later. The completion is tried again in the background until it lands:
/// the retry (which waits for the claim, whose lease outlives the outage) replays the first
/// call's result, and the body ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_that_failed_while_the_server_was_down_lands_once_it_is_back() {
    let server = Arc::new(PgServer::start());
    let store = store_on(&server.url()).await;
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lease = Duration::from_secs(15);
    let first = {
        let (server, runs) = (server.clone(), runs.clone());
        Idempotent::new(&store, "restart")
            .name("restart")
            .lease(lease)
            .run_with_outcome(|| async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::spawn_blocking(move || server.kill())
                    .await
                    .expect("kill the server");
                Ok::<_, Error>(String::from("charged once"))
            })
            .await
            .expect("the body's value comes back even though it could not be stored")
    };
    assert_eq!(first.value, "charged once");
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.restart())
            .await
            .expect("restart the server");
    }
    let retry = Idempotent::new(&store, "restart")
        .name("restart")
        .lease(lease)
        .wait_timeout(Duration::from_secs(60))
        .run_with_outcome(|| async {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, Error>(String::from("charged again"))
        })
        .await
        .expect("the retry");
    assert_eq!(
        (retry.value.as_str(), retry.status.is_replay()),
        ("charged once", true),
        "the retry gets the first call's result"
    );
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the body ran once"
    );
    chaos::report(
        "outage_postgres_completion_retried",
        &[("outages_survived", 1), ("executions_doubled", 0)],
    );
}

// ---------------------------------------------------------------------------------------------
// Cancellation at random points.

/// Where a call of [`calls_cancelled_at_random_points_never_double_an_execution`] is dropped.
#[derive(Clone, Copy, Debug)]
enum CancelAt {
    /// Never polled.
    BeforeTheClaim,
    /// After a random few hundred microseconds: in the claim, or just after it.
    DuringTheClaim,
    /// While the body runs.
    WhileTheBodyRuns,
    /// As soon as the body has returned `Ok`: in `complete`.
    RightAfterOk,
    /// In `complete`, while every pooled connection is taken by someone else.
    InCompleteWithABusyPool,
    /// Not cancelled.
    Never,
}

/// A small deterministic generator (splitmix64), seeded per run and printed, so a failing run
/// can be replayed with `IDEM_CANCEL_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Hundreds of calls over a few keys at a time, each dropped at a random point (before its claim, during
/// it, while its body runs, right after the body returned `Ok`, or in `complete` while other
/// callers hold every pooled connection) or left to finish. Leases are long (none expires during
/// the run), so a body that returns `Ok` twice for one key is an execution doubled by a
/// cancellation: there must be none, and every finished call and the final replay of each key
/// return the value of its one execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_at_random_points_never_double_an_execution() {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Five keys at a time; every 25 calls move on to five new ones, so that cancellations keep
    // meeting keys whose body has not run yet.
    const KEYS_AT_ONCE: u64 = 5;
    const CALLS_PER_GENERATION: u64 = 25;
    const POOL: usize = 3;
    let calls = 300 * chaos::env_u64("IDEM_RELIABILITY_CASES", 1).clamp(1, 100);
    let keys = calls.div_ceil(CALLS_PER_GENERATION) * KEYS_AT_ONCE;
    let fresh = idem::store::Token::generate().as_u128();
    let seed = chaos::env_u64("IDEM_CANCEL_SEED", (fresh >> 64) as u64 ^ fresh as u64);
    println!("cancel_postgres: seed {seed} (IDEM_CANCEL_SEED to replay)");
    let mut rng = Rng(seed);

    let store = Arc::new(
        PostgresStore::builder()
            .pool_size(POOL)
            .connect(&PgServer::shared().url())
            .await
            .expect("store"),
    );
    store.migrate().await.expect("migrate");
    let tag = unique("cancel");
    // Per key: the run ids of bodies that returned `Ok`.
    let oks: Arc<Vec<Mutex<Vec<u64>>>> =
        Arc::new((0..keys).map(|_| Mutex::new(Vec::new())).collect());
    let cancellations = Arc::new(AtomicU64::new(0));
    // One caller at a time takes the whole pool (two could each hold part of it forever).
    let hog = Arc::new(tokio::sync::Mutex::new(()));
    let lanes = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();

    for run in 0..calls {
        let key = run / CALLS_PER_GENERATION * KEYS_AT_ONCE + rng.below(KEYS_AT_ONCE);
        let at = match rng.below(6) {
            0 => CancelAt::BeforeTheClaim,
            1 => CancelAt::DuringTheClaim,
            2 => CancelAt::WhileTheBodyRuns,
            3 => CancelAt::RightAfterOk,
            4 => CancelAt::InCompleteWithABusyPool,
            _ => CancelAt::Never,
        };
        let micros = rng.below(1500);
        let (store, oks, tag, hog, cancellations) = (
            store.clone(),
            oks.clone(),
            tag.clone(),
            hog.clone(),
            cancellations.clone(),
        );
        let permit = lanes.clone().acquire_owned().await.expect("lanes");
        tasks.spawn(async move {
            let _permit = permit;
            let started = Arc::new(tokio::sync::Notify::new());
            let returned = Arc::new(tokio::sync::Notify::new());
            let body = {
                let (store, oks, hog, started, returned) = (
                    store.clone(),
                    oks.clone(),
                    hog.clone(),
                    started.clone(),
                    returned.clone(),
                );
                move || async move {
                    started.notify_one();
                    match at {
                        CancelAt::WhileTheBodyRuns => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        CancelAt::InCompleteWithABusyPool => {
                            // Take every connection for 30 ms, from a task of its own.
                            let turn = hog.lock_owned().await;
                            let mut held = Vec::new();
                            for _ in 0..POOL {
                                held.push(store.pool().get().await.expect("a connection"));
                            }
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(30)).await;
                                drop(held);
                                drop(turn);
                            });
                        }
                        _ => tokio::time::sleep(Duration::from_micros(micros)).await,
                    }
                    oks[key as usize].lock().unwrap().push(run);
                    returned.notify_one();
                    Ok::<_, Error>(run)
                }
            };
            let call = Idempotent::new(&*store, (tag.as_str(), key))
                .name("cancel")
                .wait_timeout(Duration::from_secs(30))
                .run(body);
            let mut call = Box::pin(call);
            let finished = match at {
                CancelAt::BeforeTheClaim => None,
                CancelAt::DuringTheClaim => {
                    tokio::time::timeout(Duration::from_micros(micros), &mut call)
                        .await
                        .ok()
                }
                CancelAt::WhileTheBodyRuns => tokio::select! {
                    out = &mut call => Some(out),
                    () = started.notified() => None,
                },
                CancelAt::RightAfterOk => tokio::select! {
                    out = &mut call => Some(out),
                    () = returned.notified() => None,
                },
                CancelAt::InCompleteWithABusyPool => tokio::select! {
                    out = &mut call => Some(out),
                    () = returned.notified() => {
                        tokio::time::timeout(Duration::from_millis(5), &mut call).await.ok()
                    }
                },
                CancelAt::Never => Some((&mut call).await),
            };
            drop(call);
            if finished.is_none() {
                cancellations.fetch_add(1, Ordering::Relaxed);
            }
            (key, at, finished)
        });
    }

    let mut answers: Vec<Vec<u64>> = vec![Vec::new(); keys as usize];
    while let Some(joined) = tasks.join_next().await {
        let (key, at, finished) = joined.expect("a call task panicked");
        match finished {
            None => {}
            Some(Ok(value)) => answers[key as usize].push(value),
            Some(Err(err)) => panic!("a call ({at:?}) that was not cancelled failed: {err}"),
        }
    }
    // Each key once more, waiting for whatever is still being settled.
    for key in 0..keys {
        let oks = oks.clone();
        let value = Idempotent::new(&*store, (tag.as_str(), key))
            .name("cancel")
            .wait_timeout(Duration::from_secs(30))
            .run(|| async move {
                oks[key as usize].lock().unwrap().push(u64::MAX);
                Ok::<_, Error>(u64::MAX)
            })
            .await
            .expect("the final call of a key");
        answers[key as usize].push(value);
    }

    let mut doubled = 0u64;
    for key in 0..keys as usize {
        let ran = oks[key].lock().unwrap().clone();
        doubled += (ran.len() as u64).saturating_sub(1);
        assert!(
            ran.len() <= 1,
            "key {key}: the body returned Ok {} times ({ran:?}) with no lease expired",
            ran.len()
        );
        for value in &answers[key] {
            assert!(
                ran.first() == Some(value),
                "key {key}: a call returned {value}, not the one execution's {ran:?}"
            );
        }
    }
    let n = cancellations.load(Ordering::Relaxed);
    chaos::report(
        "cancel_postgres",
        &[("cancellations", n), ("executions_doubled", doubled)],
    );
}
