//! A checkout of three effects (charge the card, reserve the stock, send the email), each an
//! [`idem::step`], with the handler process killed (`SIGKILL`) at random points and retried
//! until it succeeds: every effect still happens exactly once per order, on Redis and on
//! PostgreSQL.
//!
//! ```text
//! redis-server &   # or any Redis
//! cargo run --example checkout --features redis,postgres -- \
//!     run --store redis://127.0.0.1:6379/ --orders 14 --seed 1
//! cargo run --example checkout --features redis,postgres -- \
//!     run --store postgres://postgres@127.0.0.1:5432/postgres --orders 14 --seed 1
//! ```
//!
//! One program, three roles (the first argument):
//!
//! - `provider`: the fake payment, stock and email provider, a process of its own (a loopback TCP
//!   server with a one-line protocol). Like a real payment provider it takes an idempotency key
//!   with each request (`order-7/charge`), performs the effect once per key and answers a repeat
//!   with the first answer. It counts the effects it performed and the requests it received, per
//!   order and effect.
//! - `handler --store URL --order N ...`: one checkout attempt for one order, an `#[idempotent]`
//!   function keyed by the order whose body runs the three steps. It announces each point it
//!   passes on stdout (`at charge:inside-after-call`), and with `--kill-at POINT` stops there
//!   until it is killed.
//! - `run --store URL --orders N [--seed S]`: the driver. It starts the provider, then for each
//!   order (4 at a time) starts handlers, each told to stop at a point picked at random (or
//!   nowhere), kills each one that reaches its point, and starts the next, until one exits
//!   successfully. (The first attempts of orders 1 to 13 stop at each point in turn, so that
//!   14 orders are enough to see every point; `--seed` picks the rest.) A killed handler keeps its claim until its lease (1 s) runs out; the next one
//!   waits for it and takes the key over. Then the driver asks the provider for its counts and
//!   checks them (exit status 1 if any check fails).
//!
//! What the steps promise, and what the driver checks, per order:
//!
//! - each effect was performed exactly once;
//! - a step that had returned (its value recorded) never ran again: no later attempt entered it,
//!   and the provider got no other request for it;
//! - the provider got a repeated request for an effect only after a kill inside that step after
//!   the provider's answer and before the step returned (`<effect>:inside-after-call`): there the
//!   effect has happened but its step is not recorded, so the next attempt runs the step again.
//!   That window is the provider's to close, and its idempotency key does: the repeat gets the
//!   first answer back and performs nothing (Brandur Leach, *Implementing Stripe-like
//!   Idempotency Keys in Postgres*, brandur.org/idempotency-keys: foreign state mutations);
//! - the order's final receipt holds the provider's first answers (recorded step values replay
//!   as themselves).
//!
//! The provider's idempotency keys alone would keep every effect at one; what shows the steps at
//! work is the request count. Without them every retry would ask for every effect again, and a
//! provider without idempotency keys would perform it again.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use idem::{Store, idempotent};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The effects, in the order the checkout performs them.
const EFFECTS: [&str; 3] = ["charge", "reserve", "email"];

/// Where a handler can be killed, in the order a first attempt passes them: before each step,
/// inside it (just before the provider call, and just after the provider answered, before the
/// step returns), after it, and once the call has returned (its result stored).
fn kill_points() -> Vec<String> {
    let mut points = Vec::new();
    for effect in EFFECTS {
        for at in ["before", "inside-before-call", "inside-after-call", "after"] {
            points.push(format!("{effect}:{at}"));
        }
    }
    points.push("done".to_owned());
    points
}

/// How many orders the driver runs at once.
const PARALLEL: usize = 4;
/// The most attempts for one order, and the most attempts that fail without being killed.
const MAX_ATTEMPTS: usize = 60;
const MAX_FAILURES: usize = 3;

// ----------------------------------------------------------------------------------------------
// The provider
// ----------------------------------------------------------------------------------------------

/// What the provider did for one idempotency key.
struct Performed {
    /// The request's parameters: a repeat must send the same ones.
    request: String,
    /// The first (and only) answer.
    answer: String,
}

#[derive(Default)]
struct Ledger {
    /// Effects performed, by idempotency key.
    by_key: HashMap<String, Performed>,
    /// (order, effect) → (effects performed, requests received).
    counts: BTreeMap<(u64, String), (u32, u32)>,
    /// Receipt numbers handed out so far.
    issued: u32,
}

impl Ledger {
    /// `DO <idempotency-key> <order> <effect> <detail>`: performs the effect once per key.
    fn perform(&mut self, key: &str, order: u64, effect: &str, detail: &str) -> String {
        let request = format!("{order} {effect} {detail}");
        let counts = self.counts.entry((order, effect.to_owned())).or_default();
        counts.1 += 1;
        if let Some(done) = self.by_key.get(key) {
            return if done.request == request {
                format!("OK {}", done.answer)
            } else {
                // As a payment provider refuses a key reused for another request.
                format!("ERR idempotency key {key} was used for another request")
            };
        }
        counts.0 += 1;
        self.issued += 1;
        let prefix = match effect {
            "charge" => "ch",
            "reserve" => "rs",
            _ => "em",
        };
        let answer = format!("{prefix}_{}", self.issued);
        self.by_key.insert(
            key.to_owned(),
            Performed {
                request,
                answer: answer.clone(),
            },
        );
        format!("OK {answer}")
    }

    /// `REPORT`: one line per (order, effect), then `END`.
    fn report(&self) -> String {
        let mut out = String::new();
        for ((order, effect), (performed, requests)) in &self.counts {
            let answer = self
                .by_key
                .get(&format!("order-{order}/{effect}"))
                .map_or("-", |p| p.answer.as_str());
            out.push_str(&format!(
                "{order} {effect} {performed} {requests} {answer}\n"
            ));
        }
        out.push_str("END\n");
        out
    }
}

/// Serves the provider on a free loopback port, prints `listening ADDR`, and exits when its
/// standard input closes (the driver is done, or gone).
async fn provider() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    tokio::spawn(async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        std::process::exit(0);
    });
    loop {
        let (socket, _) = listener.accept().await?;
        let ledger = ledger.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = {
                    let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["DO", key, order, effect, detail] if EFFECTS.contains(effect) => {
                            match order.parse() {
                                Ok(order) => {
                                    format!("{}\n", ledger.perform(key, order, effect, detail))
                                }
                                Err(_) => "ERR bad order\n".to_owned(),
                            }
                        }
                        ["REPORT"] => ledger.report(),
                        _ => format!("ERR unknown request {line:?}\n"),
                    }
                };
                if write.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

// ----------------------------------------------------------------------------------------------
// The handler
// ----------------------------------------------------------------------------------------------

/// What a checkout returns (and what a retry after it completed replays).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    charge: String,
    reservation: String,
    email: String,
}

#[derive(Debug)]
enum CheckoutError {
    Idem(idem::Error),
    Provider(String),
}

impl From<idem::Error> for CheckoutError {
    fn from(e: idem::Error) -> Self {
        CheckoutError::Idem(e)
    }
}

impl std::fmt::Display for CheckoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckoutError::Idem(e) => write!(f, "{e}"),
            CheckoutError::Provider(e) => write!(f, "provider: {e}"),
        }
    }
}

struct Handler {
    store: Arc<dyn Store>,
    /// The provider's address.
    provider: String,
    /// The driver's run, so that the records of earlier runs (a remote store keeps them for
    /// the ttl) are not replayed.
    run: String,
    /// The point to stop at, waiting to be killed.
    kill_at: Option<String>,
}

impl Handler {
    /// One checkout: at most one charge, one reservation and one email per order, however
    /// often the process dies and the order is retried.
    #[idempotent(
        store = self.store,
        key = (&self.run, order),
        name = "examples.checkout.v1",
        lease = "1s",
        ttl = "1h",
        outcome
    )]
    async fn checkout(&self, order: u64) -> Result<idem::Outcome<Receipt>, CheckoutError> {
        self.at("charge:before").await;
        let charge = idem::step("charge", || self.call(order, "charge", "4242")).await?;
        self.at("charge:after").await;

        self.at("reserve:before").await;
        let reservation = idem::step("reserve", || self.call(order, "reserve", "sku-1")).await?;
        self.at("reserve:after").await;

        // The email quotes the charge and the reservation: after a retry, the recorded ones.
        self.at("email:before").await;
        let details = format!("{charge},{reservation}");
        let email = idem::step("email", || self.call(order, "email", &details)).await?;
        self.at("email:after").await;

        Ok(Receipt {
            charge,
            reservation,
            email,
        })
    }

    /// A request to the provider, with the effect's idempotency key.
    async fn call(&self, order: u64, effect: &str, detail: &str) -> Result<String, CheckoutError> {
        self.at(&format!("{effect}:inside-before-call")).await;
        let key = format!("order-{order}/{effect}");
        let answer = request(
            &self.provider,
            &format!("DO {key} {order} {effect} {detail}"),
        )
        .await
        .map_err(|e| CheckoutError::Provider(e.to_string()))?;
        let answer = match answer.strip_prefix("OK ") {
            Some(receipt) => receipt.to_owned(),
            None => return Err(CheckoutError::Provider(answer)),
        };
        self.at(&format!("{effect}:inside-after-call")).await;
        Ok(answer)
    }

    /// Announces a point; stops there if told to, until the driver kills the process.
    async fn at(&self, point: &str) {
        println!("at {point}");
        if self.kill_at.as_deref() == Some(point) {
            // The driver kills us now. Should it go away instead, our stdin closes: exit.
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            eprintln!("stopped at {point}, and the driver went away");
            std::process::exit(3);
        }
    }
}

/// Sends one line to the provider and returns its one-line answer.
async fn request(provider: &str, line: &str) -> std::io::Result<String> {
    let mut socket = tokio::net::TcpStream::connect(provider).await?;
    socket.write_all(format!("{line}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::io::BufReader::new(socket)
        .read_line(&mut answer)
        .await?;
    Ok(answer.trim_end().to_owned())
}

async fn open(url: &str) -> Result<Arc<dyn Store>, String> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        let store = idem::RedisStore::connect(url)
            .await
            .map_err(|e| format!("cannot open the Redis store: {e}"))?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = idem::PostgresStore::connect(url)
            .await
            .map_err(|e| format!("cannot open the PostgreSQL store: {e}"))?;
        // Safe from every process at once; does nothing once the tables exist.
        store
            .migrate()
            .await
            .map_err(|e| format!("cannot create the PostgreSQL tables: {e}"))?;
        return Ok(Arc::new(store));
    }
    Err(format!(
        "--store {url:?}: give a redis:// or a postgres:// URL"
    ))
}

async fn handler(args: &Args) -> ExitCode {
    let (Some(url), Some(order), Some(provider), Some(run)) = (
        args.get("--store"),
        args.get("--order").and_then(|o| o.parse::<u64>().ok()),
        args.get("--provider"),
        args.get("--run"),
    ) else {
        return usage();
    };
    let store = match open(url).await {
        Ok(store) => store,
        Err(message) => {
            eprintln!("handler: {message}");
            return ExitCode::from(2);
        }
    };
    let handler = Handler {
        store,
        provider: provider.to_owned(),
        run: run.to_owned(),
        kill_at: args.get("--kill-at").map(str::to_owned),
    };
    match handler.checkout(order).await {
        Ok(out) => {
            handler.at("done").await;
            let r = out.value;
            println!(
                "receipt {} {} {} {:?}",
                r.charge, r.reservation, r.email, out.status
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("handler: order {order}: {err}");
            ExitCode::FAILURE
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The driver
// ----------------------------------------------------------------------------------------------

/// A small seeded generator (xorshift64*), so that a seed tells the same story every time.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: nearby seeds give unrelated sequences, and never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// One handler process, as the driver saw it.
struct Attempt {
    /// The point it was told to stop at (`None`: run to the end).
    kill_at: Option<String>,
    /// The points it announced, in order.
    passed: Vec<String>,
    /// Whether it reached its point and was killed there.
    killed: bool,
    /// Its receipt line, if it succeeded.
    receipt: Option<String>,
    /// How it failed, if it did without being killed.
    failure: Option<String>,
}

/// One order's attempts, and why the driver gave up on it if it did.
struct OrderRun {
    attempts: Vec<Attempt>,
    gave_up: Option<String>,
}

impl OrderRun {
    fn gave_up(attempts: Vec<Attempt>, why: String) -> OrderRun {
        OrderRun {
            attempts,
            gave_up: Some(why),
        }
    }
}

struct Driver {
    exe: std::path::PathBuf,
    store: String,
    provider: String,
    run: String,
    seed: u64,
    points: Vec<String>,
}

impl Driver {
    /// Runs one order until an attempt succeeds: its attempts, and why it gave up if it did.
    fn order(&self, order: u64) -> OrderRun {
        let mut rng = Rng::new(self.seed ^ order.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut attempts: Vec<Attempt> = Vec::new();
        loop {
            if attempts.len() == MAX_ATTEMPTS {
                let message = format!("order {order}: no success in {MAX_ATTEMPTS} attempts");
                return OrderRun::gave_up(attempts, message);
            }
            // One choice more than there are points: run to the end. The first attempts of the
            // first orders stop at each point in turn, so that a run of 14 orders or more stops
            // at every point at least once; the rest is up to the seed.
            let choices = self.points.len() + 1;
            let pick = if attempts.is_empty() {
                (order as usize - 1) % choices
            } else {
                rng.below(choices)
            };
            let attempt = match self.attempt(order, self.points.get(pick).cloned()) {
                Ok(attempt) => attempt,
                Err(message) => {
                    return OrderRun::gave_up(attempts, format!("order {order}: {message}"));
                }
            };
            let succeeded = attempt.receipt.is_some();
            if let Some(failure) = &attempt.failure {
                eprintln!("order {order}: an attempt failed without being killed: {failure}");
            }
            attempts.push(attempt);
            if succeeded {
                return OrderRun {
                    attempts,
                    gave_up: None,
                };
            }
            let failures = attempts.iter().filter(|a| a.failure.is_some()).count();
            if failures == MAX_FAILURES {
                let message = format!(
                    "order {order}: {failures} attempts failed without being killed; the last: {}",
                    attempts
                        .last()
                        .and_then(|a| a.failure.as_deref())
                        .unwrap_or_default()
                );
                return OrderRun::gave_up(attempts, message);
            }
        }
    }

    /// Starts a handler, kills it if it reaches `kill_at`, and waits for it.
    fn attempt(&self, order: u64, kill_at: Option<String>) -> Result<Attempt, String> {
        let mut command = Command::new(&self.exe);
        command
            .args(["handler", "--store", &self.store, "--order"])
            .arg(order.to_string())
            .args(["--provider", &self.provider, "--run", &self.run]);
        if let Some(point) = &kill_at {
            command.args(["--kill-at", point]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a handler: {e}"))?;
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        });
        let mut attempt = Attempt {
            kill_at,
            passed: Vec::new(),
            killed: false,
            receipt: None,
            failure: None,
        };
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if let Some(point) = line.strip_prefix("at ") {
                attempt.passed.push(point.to_owned());
                if attempt.kill_at.as_deref() == Some(point) {
                    // It waits right there: SIGKILL, the crash nothing can clean up after.
                    child
                        .kill()
                        .map_err(|e| format!("cannot kill a handler: {e}"))?;
                    attempt.killed = true;
                    break;
                }
            } else if let Some(receipt) = line.strip_prefix("receipt ") {
                attempt.receipt = Some(receipt.to_owned());
            }
        }
        let status = wait(&mut child)?;
        let stderr = stderr
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !attempt.killed && !status.success() {
            attempt.receipt = None;
            attempt.failure = Some(format!("{status}: {stderr}"));
        } else if !attempt.killed && attempt.receipt.is_none() {
            attempt.failure = Some(format!("exited without a receipt: {stderr}"));
        }
        Ok(attempt)
    }
}

fn wait(child: &mut Child) -> Result<std::process::ExitStatus, String> {
    child
        .wait()
        .map_err(|e| format!("cannot wait for a handler: {e}"))
}

/// What the provider reports for one (order, effect).
#[derive(Clone, Default)]
struct Count {
    performed: u32,
    requests: u32,
    /// Its first answer (the receipt).
    answer: String,
}

/// The provider's report: (order, effect) → its count.
type Counts = BTreeMap<(u64, String), Count>;

/// Reads the provider's counts.
fn report(provider: &str) -> Result<Counts, String> {
    let mut socket = std::net::TcpStream::connect(provider)
        .map_err(|e| format!("cannot reach the provider: {e}"))?;
    socket
        .write_all(b"REPORT\n")
        .map_err(|e| format!("cannot ask the provider: {e}"))?;
    let mut counts = BTreeMap::new();
    for line in BufReader::new(socket).lines() {
        let line = line.map_err(|e| format!("cannot read the provider's report: {e}"))?;
        if line == "END" {
            return Ok(counts);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let parsed = match words.as_slice() {
            [order, effect, performed, requests, answer] => (|| {
                Some((
                    (order.parse().ok()?, (*effect).to_owned()),
                    Count {
                        performed: performed.parse().ok()?,
                        requests: requests.parse().ok()?,
                        answer: (*answer).to_owned(),
                    },
                ))
            })(),
            _ => None,
        };
        let (key, value) = parsed.ok_or_else(|| format!("a bad report line: {line:?}"))?;
        counts.insert(key, value);
    }
    Err("the provider's report ended early".to_owned())
}

/// Checks one order's attempts against the provider's counts; returns what went wrong.
fn check(order: u64, attempts: &[Attempt], counts: &Counts) -> Vec<String> {
    let mut violations = Vec::new();
    let mut answers = Vec::new();
    for effect in EFFECTS {
        let Count {
            performed,
            requests,
            answer,
        } = counts
            .get(&(order, effect.to_owned()))
            .cloned()
            .unwrap_or_default();
        answers.push(answer);
        if performed != 1 {
            violations.push(format!(
                "order {order}: {effect} was performed {performed} times"
            ));
        }
        // A repeated request is expected only after a kill between the provider's answer and
        // the step's return: the effect happened, its step was not recorded.
        let window = format!("{effect}:inside-after-call");
        // (An attempt that failed there on its own, its step not recorded, opens it too: the
        // driver reports such failures, which a healthy run does not have.)
        let after = format!("{effect}:after");
        let in_window = attempts
            .iter()
            .filter(|a| {
                let failed_there =
                    a.failure.is_some() && a.passed.contains(&window) && !a.passed.contains(&after);
                (a.killed && a.kill_at.as_deref() == Some(window.as_str())) || failed_there
            })
            .count() as u32;
        if requests != 1 + in_window {
            violations.push(format!(
                "order {order}: the provider got {requests} {effect} requests, expected {} (1, \
                 and 1 more per kill at {window}): a recorded step ran again",
                1 + in_window
            ));
        }
        // From the handlers' side: once a step returned, no later attempt entered it.
        let inside = format!("{effect}:inside-before-call");
        if let Some(first) = attempts.iter().position(|a| a.passed.contains(&after))
            && let Some(again) = attempts[first + 1..]
                .iter()
                .position(|a| a.passed.contains(&inside))
        {
            violations.push(format!(
                "order {order}: attempt {} ran the {effect} step again after attempt {} had \
                 finished it",
                first + again + 2,
                first + 1
            ));
        }
    }
    // Once the call completed, a retry replays its receipt: the body does not run again.
    if let Some(done) = attempts
        .iter()
        .position(|a| a.passed.iter().any(|p| p == "done"))
        && let Some(again) = attempts[done + 1..]
            .iter()
            .position(|a| a.passed.iter().any(|p| p != "done"))
    {
        violations.push(format!(
            "order {order}: attempt {} ran the body again after attempt {} had completed the call",
            done + again + 2,
            done + 1
        ));
    }
    // The receipt quotes the provider's first answers: recorded values replayed as themselves.
    let receipt = attempts.last().and_then(|a| a.receipt.as_deref());
    let got: Vec<&str> = receipt.unwrap_or_default().split_whitespace().collect();
    if got.len() < 3 || got[..3] != answers.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        violations.push(format!(
            "order {order}: the receipt {receipt:?} is not the provider's answers {answers:?}"
        ));
    }
    violations
}

fn driver(args: &Args) -> ExitCode {
    let (Some(store), Some(orders)) = (
        args.get("--store"),
        args.get("--orders").and_then(|n| n.parse::<u64>().ok()),
    ) else {
        return usage();
    };
    let seed = args.get("--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    let started = Instant::now();
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("cannot find this program to start the provider and the handlers");
        return ExitCode::FAILURE;
    };

    // The provider: its own process, stopped when its stdin (held here) closes.
    let mut provider = match Command::new(&exe)
        .arg("provider")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("cannot start the provider: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut first = String::new();
    if let Some(out) = provider.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut first);
    }
    let Some(address) = first.trim().strip_prefix("listening ") else {
        eprintln!("the provider did not start: {first:?}");
        let _ = provider.kill();
        let _ = provider.wait();
        return ExitCode::FAILURE;
    };

    let driver = Driver {
        exe,
        store: store.to_owned(),
        provider: address.to_owned(),
        run: format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ),
        seed,
        points: kill_points(),
    };
    println!("checkout: {orders} orders on {store}, seed {seed}, {PARALLEL} at a time");

    // Each worker takes the next order until none are left.
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<u64, OrderRun>> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL {
            scope.spawn(|| {
                loop {
                    let order = next.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                    if order > orders {
                        break;
                    }
                    let result = driver.order(order);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(order, result);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let counts = report(&driver.provider);
    drop(provider.stdin.take());
    let _ = provider.wait();

    let mut violations = Vec::new();
    let counts = counts.unwrap_or_else(|e| {
        violations.push(e);
        BTreeMap::new()
    });
    let mut kills: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut attempt_count, mut finished, mut failed) = (0, 0, 0);
    for (order, OrderRun { attempts, gave_up }) in &results {
        attempt_count += attempts.len();
        for a in attempts {
            match (&a.kill_at, a.killed, &a.failure) {
                (Some(point), true, _) => *kills.entry(point.as_str()).or_default() += 1,
                (_, _, Some(_)) => failed += 1,
                _ => finished += 1,
            }
        }
        match gave_up {
            Some(message) => violations.push(message.clone()),
            None => violations.extend(check(*order, attempts, &counts)),
        }
    }

    println!(
        "{attempt_count} attempts in {:.1} s\n",
        started.elapsed().as_secs_f64()
    );
    println!("{:<38}{:>9}", "handler", "attempts");
    for point in &driver.points {
        let n = kills.get(point.as_str()).copied().unwrap_or(0);
        println!("{:<38}{n:>9}", format!("killed at {point}"));
    }
    println!("{:<38}{finished:>9}", "ran to the end");
    println!("{:<38}{failed:>9}\n", "failed on its own");
    println!(
        "{:<10}{:>10}{:>10}{:>10}{:>30}",
        "effect", "performed", "requests", "repeated", "kills inside after the call"
    );
    for effect in EFFECTS {
        let (mut performed, mut requests) = (0, 0);
        for ((_, e), count) in &counts {
            if e == effect {
                performed += count.performed;
                requests += count.requests;
            }
        }
        let window = format!("{effect}:inside-after-call");
        let in_window = kills.get(window.as_str()).copied().unwrap_or(0);
        println!(
            "{effect:<10}{performed:>10}{requests:>10}{:>10}{in_window:>30}",
            requests - performed
        );
    }
    println!();
    if violations.is_empty() {
        println!(
            "every effect was performed exactly once for each of the {orders} orders, and no \
             finished step ran again"
        );
        ExitCode::SUCCESS
    } else {
        for v in &violations {
            println!("VIOLATION: {v}");
        }
        println!(
            "FAILED: {} violations (reproduce with --orders {orders} --seed {seed})",
            violations.len()
        );
        ExitCode::FAILURE
    }
}

// ----------------------------------------------------------------------------------------------

/// `--flag value` pairs after the mode.
struct Args(Vec<String>);

impl Args {
    fn get(&self, flag: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == flag)?;
        self.0.get(i + 1).map(String::as_str)
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: checkout run --store URL --orders N [--seed S]\n       \
         checkout provider\n       \
         checkout handler --store URL --order N --provider ADDR --run RUN [--kill-at POINT]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let args = Args(args.collect());
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    };
    match mode.as_str() {
        "run" => driver(&args),
        "provider" => match runtime().block_on(provider()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("provider: {e}");
                ExitCode::FAILURE
            }
        },
        "handler" => runtime().block_on(handler(&args)),
        _ => usage(),
    }
}
