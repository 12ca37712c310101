#![cfg(feature = "redis")]
//! Reliability of `RedisStore` (issue 6), against real `redis-server`s the harness starts:
//!
//! - races: random interleavings of claim / complete / renew / release / remove / wait with
//!   short real leases, checked against the model of DESIGN.md's record states;
//! - crashes: a process holding a key is killed (`SIGKILL`) mid-body, and another takes over once
//!   the lease ran out and runs the body once; a holder paused (`SIGSTOP`) past its lease and
//!   resumed cannot overwrite the new holder's result, and warns `lease_lost`;
//! - outages: the server is stopped and restarted twice during a run of many calls: every call
//!   ends with its value or `Error::Store` within the store's timeout, none hangs, every key is
//!   served afterwards, and no key whose record was stored runs twice;
//! - cancellation: hundreds of calls dropped at random points (before, during the claim, in the
//!   body, right after it returned `Ok`, during the completion): no key's body returns `Ok`
//!   twice, and every result that was returned is stored.
//!
//! Each test writes its counts to `<target dir>/reliability/<test>.txt` (see docs/reliability.md).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem::store::{Claim, Token};
use idem::{Error, Idempotent, Key, RedisStore, Status, Store};
use proptest::test_runner::TestCaseError;
use support::chaos::{self, ChildLines, ModelCounts, Timing};
use support::redis::RedisServer;

/// A prefix no other test (or run) uses.
fn fresh_prefix(test: &str) -> String {
    format!("idem-rel:{test}:{}:", Token::generate().as_u128())
}

async fn store_on(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(prefix)
        .connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
}

const REDIS_TIMING: Timing = Timing {
    short: Duration::from_millis(150),
    long: Duration::from_secs(30),
    advances: [
        Duration::from_millis(1),
        Duration::from_millis(40),
        Duration::from_millis(200),
    ],
    // Redis keeps expiry in milliseconds by its own clock: allow that much (and some) around
    // the model's interval.
    margin: Duration::from_millis(15),
    paused: false,
    wait: Duration::from_millis(30),
};

/// The model run of tests/support/chaos.rs against Redis, with short real leases and ttls: fewer
/// sequences than on the in-memory store, because time passes for real.
#[test]
fn redis_store_matches_the_model_under_random_interleavings() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = RedisServer::shared();
    let store = runtime.block_on(store_on(&server.url(), &fresh_prefix("model")));
    let cases = 40 * chaos::env_u64("IDEM_RELIABILITY_CASES", 1).clamp(1, 1000) as u32;
    let total = Mutex::new(ModelCounts::default());
    let mut runner = chaos::runner(cases, 64);
    let result = runner.run(&chaos::ops(1, 40), |ops| {
        let counts = runtime
            .block_on(chaos::run_model(&store, REDIS_TIMING, "model.redis", &ops))
            .map_err(TestCaseError::fail)?;
        total.lock().unwrap().add(&counts);
        Ok(())
    });
    if let Err(err) = result {
        panic!("RedisStore broke the contract: {err}");
    }
    let c = *total.lock().unwrap();
    assert!(c.fenced > 0 && c.acquired > 0, "{c:?}");
    let pairs: Vec<(&str, u64)> = chaos::counts_to_pairs(&c).into_iter().collect();
    chaos::report("model_redis", &pairs);
}

// ---------------------------------------------------------------------------------------------
// Crashes: this test binary, started again as `crash_child`, holds a key.

const CHILD_ROLE: &str = "IDEM_REL_CHILD_ROLE";
const CHILD_URL: &str = "IDEM_REL_CHILD_URL";
const CHILD_PREFIX: &str = "IDEM_REL_CHILD_PREFIX";
const CHILD_KEY: &str = "IDEM_REL_CHILD_KEY";
const LEASE: Duration = Duration::from_millis(1000);

/// The counter of a key's executions, in Redis (shared by every process).
fn execs_counter(prefix: &str, key: &str) -> String {
    format!("{prefix}execs:{key}")
}

/// The holder: claims the key and runs a body that counts itself, says so, and then hangs
/// (`hold`, to be killed) or runs past its lease (`pause`, to be stopped and resumed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let (Ok(role), Ok(url), Ok(prefix), Ok(key)) = (
        std::env::var(CHILD_ROLE),
        std::env::var(CHILD_URL),
        std::env::var(CHILD_PREFIX),
        std::env::var(CHILD_KEY),
    ) else {
        return; // not started as a child: nothing to do
    };
    // The warning goes to stderr, where the parent looks for it.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .try_init();
    let store = store_on(&url, &prefix).await;
    let port = chaos::port_of(&url);
    let counter = execs_counter(&prefix, &key);
    let out = Idempotent::new(&store, key.as_str())
        .name("test")
        .lease(LEASE)
        .run_with_outcome(|| async {
            chaos::raw_redis(port, &["INCR", &counter]);
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

fn spawn_child(role: &str, url: &str, prefix: &str, key: &str) -> std::process::Child {
    let me = std::env::current_exe().expect("the test binary");
    std::process::Command::new(me)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_URL, url)
        .env(CHILD_PREFIX, prefix)
        .env(CHILD_KEY, key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start a child process")
}

/// The takeover: this process calls the same key; it waits for the dead (or frozen) holder's
/// lease to run out, then runs the body once and stores "B". Returns when its body started,
/// measured from `since`.
async fn take_over(store: &RedisStore, port: u16, prefix: &str, key: &str) -> Duration {
    let since = Instant::now();
    let started = Mutex::new(None);
    let counter = execs_counter(prefix, key);
    let out = Idempotent::new(store, key)
        .name("test")
        .lease(LEASE)
        .wait_timeout(Duration::from_secs(20))
        .run_with_outcome(|| async {
            *started.lock().unwrap() = Some(since.elapsed());
            let counter = counter.clone();
            tokio::task::spawn_blocking(move || chaos::raw_redis(port, &["INCR", &counter]))
                .await
                .unwrap();
            Ok::<_, Error>("B".to_owned())
        })
        .await
        .expect("the key is taken over once the holder's lease ran out");
    assert_eq!((out.value.as_str(), out.status), ("B", Status::Executed));
    started.into_inner().unwrap().expect("the body ran")
}

/// What is left of the lease on `key`'s record, by the server's clock (zero if none): the
/// record's expiry less its grace (a running record outlives its lease by that much).
fn lease_left(server: &RedisServer, store: &RedisStore, key: &str) -> Duration {
    use support::redis::Resp;
    let name = store.record_name(&Key::new("test", key));
    let pttl = match server.cmd(&["PTTL", &name]) {
        Resp::Int(ms) => u64::try_from(ms).unwrap_or(0),
        other => panic!("PTTL {name}: {other:?}"),
    };
    let grace = match server.cmd(&["HGET", &name, "grace"]) {
        Resp::Bulk(Some(ms)) => String::from_utf8_lossy(&ms).parse().unwrap_or(0),
        _ => 0,
    };
    Duration::from_millis(pttl.saturating_sub(grace))
}

async fn stored_value(store: &RedisStore, key: &str) -> String {
    match store.claim(Key::new("test", key), None, LEASE).await {
        Ok(Claim::Completed(done)) => idem::codec::from_slice::<String>(&done.value)
            .unwrap_or_else(|err| panic!("the record of {key} does not decode: {err}")),
        other => panic!("the record of {key} must be completed, got {other:?}"),
    }
}

/// A holder killed mid-body (SIGKILL: no destructor, no release) blocks its key only until its
/// lease runs out; then another process runs the body once and stores its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_mid_body_is_taken_over_after_its_lease() {
    let server = RedisServer::shared();
    let prefix = fresh_prefix("crash-kill");
    let store = store_on(&server.url(), &prefix).await;
    let port = server.port();
    const ROUNDS: u64 = 3;
    for round in 0..ROUNDS {
        let key = format!("killed-{round}");
        let mut child = spawn_child("hold", &server.url(), &prefix, &key);
        let mut lines = ChildLines::new(child.stdout.take().unwrap());
        assert!(
            lines.wait_for("BODY STARTED", Duration::from_secs(60)),
            "the child never started its body: {}",
            lines.rest(Duration::ZERO)
        );
        child.kill().expect("SIGKILL the holder");
        let _ = child.wait();
        let left = lease_left(server, &store, &key);
        let started_after = take_over(&store, port, &prefix, &key).await;
        // Nobody may take over before the dead holder's lease, as the server had it when the
        // holder died, ran out (allowing for the server's millisecond clock).
        assert!(
            started_after + Duration::from_millis(20) >= left,
            "round {round}: the key was taken over {started_after:?} after the holder died, \
             with {left:?} left on its lease: executions doubled"
        );
        assert_eq!(stored_value(&store, &key).await, "B");
        assert_eq!(
            server.cmd(&["GET", &execs_counter(&prefix, &key)]),
            support::redis::Resp::Bulk(Some(b"2".to_vec())),
            "round {round}: the dead holder's run and the takeover's, nothing more"
        );
    }
    chaos::report(
        "crash_kill_redis",
        &[
            ("crashes_survived", ROUNDS),
            ("executions_doubled_within_a_lease", 0),
            ("records_lost", 0),
        ],
    );
}

/// A holder frozen (SIGSTOP) past its lease is taken over; resumed (SIGCONT), it finishes its
/// body but cannot overwrite the new holder's stored result (fencing), gets `LeaseLost`, and its
/// `lease_lost` warning is on its stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_paused_past_its_lease_cannot_overwrite_the_new_result() {
    let server = RedisServer::shared();
    let prefix = fresh_prefix("crash-stop");
    let store = store_on(&server.url(), &prefix).await;
    let port = server.port();
    const ROUNDS: u64 = 2;
    for round in 0..ROUNDS {
        let key = format!("paused-{round}");
        let mut child = spawn_child("pause", &server.url(), &prefix, &key);
        let pid = child.id();
        let mut out = ChildLines::new(child.stdout.take().unwrap());
        let mut err = ChildLines::new(child.stderr.take().unwrap());
        assert!(
            out.wait_for("BODY STARTED", Duration::from_secs(60)),
            "the child never started its body: {}",
            out.rest(Duration::ZERO)
        );
        chaos::signal(pid, "-STOP");
        let left = lease_left(server, &store, &key);
        let takeover = take_over(&store, port, &prefix, &key).await;
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
        assert_eq!(
            server.cmd(&["GET", &execs_counter(&prefix, &key)]),
            support::redis::Resp::Bulk(Some(b"2".to_vec()))
        );
    }
    chaos::report(
        "crash_pause_redis",
        &[
            ("pauses_survived", ROUNDS),
            ("lease_lost_warnings", ROUNDS),
            ("results_overwritten", 0),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Outages.

/// Many calls (400 keys, 6 workers) while the server is stopped and restarted twice (see
/// `chaos::outage_run`). The server keeps an append-only file fsynced on every write, so every
/// acknowledged record survives; the store has its default timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_outages_mid_run_lose_nothing_and_hang_nothing() {
    let server = Arc::new(RedisServer::start_persistent());
    let store = store_on(&server.url(), &fresh_prefix("outage")).await;
    assert_eq!(store.timeout(), RedisStore::DEFAULT_TIMEOUT);
    let (down, up) = (server.clone(), server.clone());
    let counts = chaos::outage_run(
        Arc::new(store) as Arc<dyn Store>,
        RedisStore::DEFAULT_TIMEOUT,
        Box::new(move || down.stop()),
        Box::new(move || up.restart()),
    )
    .await;
    chaos::report("outage_redis", &counts);
}

// ---------------------------------------------------------------------------------------------
// Cancellation (issue 13).

/// Where a call of [`calls_cancelled_at_random_points_never_double_an_execution`] is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Cut {
    /// Not at all.
    Never,
    /// Before it is first polled: nothing was sent.
    BeforeClaim,
    /// After a random 0-2 ms: during the claim, a wait for another holder, or later.
    Early,
    /// While the body runs (it has started, and not returned).
    InBody,
    /// At the first moment after the body returned `Ok`: the completion has just been sent.
    AfterOk,
    /// A random 0-2 ms after the body returned `Ok`: during the completion, or after it.
    DuringComplete,
}

/// A call, dropped when `cut` says; `None` if it was.
async fn cut_call<F: std::future::Future>(
    call: F,
    cut: Cut,
    delay: Duration,
    started: &std::sync::atomic::AtomicBool,
    returned: &std::sync::atomic::AtomicBool,
) -> Option<F::Output> {
    use std::sync::atomic::Ordering::SeqCst;
    use std::task::Poll;
    let mut call = std::pin::pin!(call);
    match cut {
        Cut::Never => Some(call.await),
        Cut::BeforeClaim => None,
        Cut::Early => tokio::time::timeout(delay, call).await.ok(),
        Cut::InBody | Cut::AfterOk => {
            let flag = if cut == Cut::InBody {
                started
            } else {
                returned
            };
            std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
                Poll::Ready(out) => Poll::Ready(Some(out)),
                Poll::Pending if flag.load(SeqCst) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await
        }
        Cut::DuringComplete => {
            let mut cut_at: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = call.as_mut().poll(cx) {
                    return Poll::Ready(Some(out));
                }
                if returned.load(SeqCst) {
                    let sleep = cut_at.get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            })
            .await
        }
    }
}

/// A small deterministic generator (xorshift), seeded so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Hundreds of calls over a few keys at a time, each dropped at a random point (before its
/// claim, during it or a wait, while its body runs, right after its body returned `Ok`, during
/// its completion) or not at all, eight at once, with a lease no call outlives. Per key, at most
/// one body returns `Ok` (a cancelled body may be followed by another: it returned nothing), every
/// call that gets a value gets that body's value, and afterwards every key whose body returned
/// `Ok` replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cancelled_at_random_points_never_double_an_execution() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

    const ROUNDS: u64 = 40;
    const KEYS: u64 = 4;
    const CALLS_PER_ROUND: u64 = 20;
    const AT_ONCE: usize = 8;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let seed = chaos::env_u64("IDEM_CANCEL_SEED", now | 1);
    println!("cancel_redis: IDEM_CANCEL_SEED={seed}");
    let mut rng = Rng(seed);
    let server = RedisServer::shared();
    let store = Arc::new(store_on(&server.url(), &fresh_prefix("cancel")).await);

    let cuts = [
        Cut::Never,
        Cut::BeforeClaim,
        Cut::Early,
        Cut::InBody,
        Cut::AfterOk,
        Cut::DuringComplete,
    ];
    let mut by_cut: BTreeMap<Cut, u64> = BTreeMap::new();
    let (mut cancellations, mut doubled, mut calls) = (0u64, 0u64, 0u64);
    let (mut bodies_started, mut bodies_ok, mut stored) = (0u64, 0u64, 0u64);
    for round in 0..ROUNDS {
        // Per key: bodies started, bodies that returned Ok, and the value of the last of those.
        let started_bodies: Arc<Vec<AtomicU64>> =
            Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
        let ok_bodies: Arc<Vec<AtomicU64>> =
            Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
        let ok_value: Arc<Vec<AtomicU64>> =
            Arc::new((0..KEYS).map(|_| AtomicU64::new(u64::MAX)).collect());
        let mut tasks = tokio::task::JoinSet::new();
        let mut results = Vec::new();
        for i in 0..CALLS_PER_ROUND {
            let k = rng.below(KEYS);
            let cut = cuts[rng.below(cuts.len() as u64) as usize];
            let delay = Duration::from_micros(rng.below(2000));
            let body_sleep = Duration::from_micros(rng.below(3000));
            *by_cut.entry(cut).or_default() += 1;
            let value = round * 1000 + i;
            let (store, started_bodies, ok_bodies, ok_value) = (
                store.clone(),
                started_bodies.clone(),
                ok_bodies.clone(),
                ok_value.clone(),
            );
            tasks.spawn(async move {
                let (started, returned) = (AtomicBool::new(false), AtomicBool::new(false));
                let call = Idempotent::new(&*store, ("cancel", round, k))
                    .name("test")
                    .run_with_outcome(|| async {
                        started_bodies[k as usize].fetch_add(1, SeqCst);
                        started.store(true, SeqCst);
                        tokio::time::sleep(body_sleep).await;
                        ok_bodies[k as usize].fetch_add(1, SeqCst);
                        ok_value[k as usize].store(value, SeqCst);
                        returned.store(true, SeqCst);
                        Ok::<_, Error>(value)
                    });
                let out = cut_call(call, cut, delay, &started, &returned).await;
                (k, out)
            });
            while tasks.len() >= AT_ONCE {
                results.push(
                    tasks
                        .join_next()
                        .await
                        .expect("a call")
                        .expect("a call task"),
                );
            }
        }
        while let Some(joined) = tasks.join_next().await {
            results.push(joined.expect("a call task"));
        }
        for (k, out) in results {
            calls += 1;
            match out {
                None => cancellations += 1,
                Some(Ok(out)) => {
                    assert_ne!(out.status, Status::LeaseLost, "no lease may run out here");
                    assert_eq!(
                        out.value,
                        ok_value[k as usize].load(SeqCst),
                        "round {round} key {k}: a call got another body's value (seed {seed})"
                    );
                }
                Some(Err(err)) => panic!("round {round} key {k}: a call failed: {err}"),
            }
        }
        for k in 0..KEYS {
            let oks = ok_bodies[k as usize].load(SeqCst);
            bodies_started += started_bodies[k as usize].load(SeqCst);
            bodies_ok += oks;
            doubled += oks.saturating_sub(1);
            if oks == 0 {
                continue;
            }
            // The body that returned Ok is stored (in the background, where its call was
            // dropped during the completion): a later call replays it, or waits for it.
            let out = Idempotent::new(&*store, ("cancel", round, k))
                .name("test")
                .run_with_outcome(|| async { Ok::<_, Error>(u64::MAX) })
                .await
                .expect("a last call");
            assert!(
                out.status.is_replay() && out.value == ok_value[k as usize].load(SeqCst),
                "round {round} key {k}: the body that returned Ok was not stored: {out:?} \
                 (seed {seed})"
            );
            stored += 1;
        }
        assert_eq!(
            doubled, 0,
            "round {round}: a body returned Ok twice for one key (seed {seed}); started: {:?}",
            started_bodies
        );
    }
    println!(
        "cancel_redis: {calls} calls, {cancellations} cancelled (cut at {by_cut:?}); bodies: \
         {bodies_started} started, {bodies_ok} returned Ok, {stored} results stored"
    );
    chaos::report(
        "cancel_redis",
        &[
            ("cancellations", cancellations),
            ("executions_doubled", doubled),
        ],
    );
}
