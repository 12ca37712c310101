//! Helpers of the reliability tests (tests/reliability_*.rs, tests/hostile.rs): a reference
//! model of DESIGN.md's record states that random operation sequences are checked against, the
//! counts each test writes for the reliability table, and small process helpers.
//!
//! # The model
//!
//! A record is `Absent`, `InProgress { token, fingerprint, lease }` or
//! `Completed { token, fingerprint, value, ttl }`. Time is tokio's clock: paused and advanced by
//! hand for the in-memory store (so every expiry is exact), real for remote stores. For a remote
//! store the moment an operation takes effect is only known to lie between the instants before
//! and after the call, so each record keeps the interval its expiry lies in, and an operation
//! whose interval overlaps it may see the record either live or expired: both outcomes are
//! accepted, and the model follows the one the store reported. Everything outside that window is
//! checked exactly: claim outcomes, replayed values and fingerprints, fencing of stale tokens,
//! renewals, releases and removes.
//!
//! Where the contract leaves a choice, the model accepts every allowed answer:
//! - an operation with the holder's token after its lease ran out but before anyone took over may
//!   succeed (the in-memory store keeps the claim until it is taken over) or report the claim as
//!   lost (Redis expires it);
//! - `complete` repeated with the token that completed a record may report `Stored` (Redis: a
//!   retried completion whose first reply was lost) but must not change the stored value;
//! - `complete` where no live record is (absent, or expired and not yet dropped) stores the
//!   result, whatever the token (the rule of `Store::complete`); where another claim's live
//!   record is, it reports the lease as lost;
//! - `remove` of an expired record may find it or not.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use idem::store::{Bytes, Claim, Completion, Token};
use idem::{Fingerprint, Key, Store};
use proptest::prelude::*;
use tokio::time::Instant;

/// A number from the environment (for longer runs), or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the counts of the reliability tests go: `<target dir>/reliability/`.
pub fn report_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent()
        .map(|p| p.join("reliability"))
        .unwrap_or_else(|| tmp.join("reliability"))
}

/// Writes one test's counts as `name key=value ...` to `<target dir>/reliability/<name>.txt`,
/// and prints them (visible with `--nocapture`).
pub fn report(name: &str, counts: &[(&str, u64)]) {
    let mut line = String::from(name);
    for (k, v) in counts {
        let _ = write!(line, " {k}={v}");
    }
    println!("reliability: {line}");
    let dir = report_dir();
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("{name}.txt")), format!("{line}\n"));
    }
}

/// Sends a signal to a process with `kill(1)`.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

/// How long a span of the model lasts, per store (short ones run out during a sequence).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// A lease or ttl that a few advances run out.
    pub short: Duration,
    /// A lease or ttl no sequence outlives.
    pub long: Duration,
    /// The steps time is moved by.
    pub advances: [Duration; 3],
    /// How far a store's expiry may be from the model's interval (clock granularity).
    pub margin: Duration,
    /// Whether time is tokio's paused clock (advanced by hand) or real (slept through).
    pub paused: bool,
    /// The timeout given to `wait`.
    pub wait: Duration,
}

/// One operation of a random sequence. Keys and tokens are small indexes, so that sequences
/// keep hitting the same records and reusing old (stale) tokens.
#[derive(Clone, Debug)]
pub enum Op {
    Claim {
        key: u8,
        fp: u8,
        long: bool,
    },
    Complete {
        key: u8,
        token: u8,
        value: u8,
        long: bool,
    },
    Renew {
        key: u8,
        token: u8,
        long: bool,
    },
    Release {
        key: u8,
        token: u8,
    },
    Remove {
        key: u8,
    },
    Wait {
        key: u8,
    },
    Advance(u8),
}

/// How many keys a sequence works on.
pub const KEYS: u8 = 3;

/// Random operation sequences of `min..max` operations.
pub fn ops(min: usize, max: usize) -> impl Strategy<Value = Vec<Op>> {
    let key = 0..KEYS;
    let op = prop_oneof![
        4 => (key.clone(), 0..3u8, any::<bool>()).prop_map(|(key, fp, long)| Op::Claim { key, fp, long }),
        3 => (key.clone(), any::<u8>(), any::<u8>(), any::<bool>())
            .prop_map(|(key, token, value, long)| Op::Complete { key, token, value, long }),
        2 => (key.clone(), any::<u8>(), any::<bool>()).prop_map(|(key, token, long)| Op::Renew { key, token, long }),
        2 => (key.clone(), any::<u8>()).prop_map(|(key, token)| Op::Release { key, token }),
        1 => key.clone().prop_map(|key| Op::Remove { key }),
        1 => key.prop_map(|key| Op::Wait { key }),
        3 => (0..3u8).prop_map(Op::Advance),
    ];
    proptest::collection::vec(op, min..max)
}

#[derive(Clone, Debug)]
enum State {
    Absent,
    InProgress {
        token: Token,
        fp: Option<Fingerprint>,
        lease: Duration,
        /// The expiry lies in `[lo, hi]`.
        lo: Instant,
        hi: Instant,
    },
    Completed {
        token: Token,
        fp: Option<Fingerprint>,
        /// The record may hold no fingerprint instead of `fp`: a completion after the claim's
        /// lease ran out, where the store may have dropped the claim first, is written with the
        /// fingerprint `complete` is given, and the model gives none. Pinned by the next replay.
        fp_or_none: bool,
        value: Bytes,
        ttl: Duration,
        lo: Instant,
        hi: Instant,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Live {
    Yes,
    No,
    Either,
}

/// Counts of one model run, summed over sequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelCounts {
    pub sequences: u64,
    pub ops: u64,
    pub acquired: u64,
    pub takeovers: u64,
    pub busy: u64,
    pub replayed: u64,
    pub stored: u64,
    pub fenced: u64,
    pub ambiguous: u64,
}

impl ModelCounts {
    pub fn add(&mut self, other: &ModelCounts) {
        self.sequences += other.sequences;
        self.ops += other.ops;
        self.acquired += other.acquired;
        self.takeovers += other.takeovers;
        self.busy += other.busy;
        self.replayed += other.replayed;
        self.stored += other.stored;
        self.fenced += other.fenced;
        self.ambiguous += other.ambiguous;
    }
}

/// The fingerprints a claim may carry.
fn fingerprint(i: u8) -> Option<Fingerprint> {
    match i {
        0 => None,
        1 => Some(Fingerprint::of("request a")),
        _ => Some(Fingerprint::of("request b")),
    }
}

fn value_bytes(v: u8) -> Bytes {
    // Values of several sizes, the empty one included.
    let len = usize::from(v % 5) * 7;
    Bytes::from(
        (0..len)
            .map(|i| v.wrapping_add(i as u8))
            .collect::<Vec<u8>>(),
    )
}

/// Runs `ops` against `store` and checks every result against the model. `namespace` keeps the
/// keys of one sequence apart from every other's.
pub async fn run_model(
    store: &dyn Store,
    timing: Timing,
    namespace: &str,
    ops: &[Op],
) -> Result<ModelCounts, String> {
    let keys: Vec<Key> = (0..KEYS)
        .map(|i| Key::new(namespace, &(i, Token::generate().as_u128())))
        .collect();
    let mut states: Vec<State> = vec![State::Absent; usize::from(KEYS)];
    // Every token handed out, per key, in order: old ones are stale.
    let mut issued: Vec<Vec<Token>> = vec![Vec::new(); usize::from(KEYS)];
    let mut all_tokens: HashSet<Token> = HashSet::new();
    let mut counts = ModelCounts {
        sequences: 1,
        ..ModelCounts::default()
    };
    let span = |long: bool| if long { timing.long } else { timing.short };
    let pick = |issued: &Vec<Token>, i: u8| -> Token {
        let n = issued.len();
        let i = usize::from(i) % (n + 1);
        if i == n {
            Token::generate() // never handed out for this key
        } else {
            issued[i]
        }
    };
    let live = |lo: Instant, hi: Instant, t0: Instant, t1: Instant| -> Live {
        if t1 + timing.margin < lo {
            Live::Yes
        } else if t0 >= hi + timing.margin {
            Live::No
        } else {
            Live::Either
        }
    };
    for (step, op) in ops.iter().enumerate() {
        counts.ops += 1;
        let ctx = |what: String| format!("step {step} {op:?}: {what}\nsequence: {ops:?}");
        let t0 = Instant::now();
        match *op {
            Op::Advance(i) => {
                let d = timing.advances[usize::from(i) % 3];
                if timing.paused {
                    tokio::time::advance(d).await;
                } else {
                    tokio::time::sleep(d).await;
                }
            }
            Op::Claim { key, fp, long } => {
                let k = usize::from(key);
                let fp = fingerprint(fp);
                let lease = span(long);
                let got = store.claim(keys[k], fp, lease).await;
                let t1 = Instant::now();
                let got = got.map_err(|e| ctx(format!("claim failed: {e}")))?;
                let state = &states[k];
                let liveness = match state {
                    State::Absent => Live::No,
                    State::InProgress { lo, hi, .. } | State::Completed { lo, hi, .. } => {
                        live(*lo, *hi, t0, t1)
                    }
                };
                match got {
                    Claim::Acquired(token) => {
                        if liveness == Live::Yes {
                            return Err(ctx(format!(
                                "acquired a key whose record is live: {state:?} (an execution would double)"
                            )));
                        }
                        if !all_tokens.insert(token) {
                            return Err(ctx(format!("token {token:?} handed out twice")));
                        }
                        if liveness == Live::Either {
                            counts.ambiguous += 1;
                        }
                        if !matches!(state, State::Absent) {
                            counts.takeovers += 1;
                        }
                        counts.acquired += 1;
                        issued[k].push(token);
                        states[k] = State::InProgress {
                            token,
                            fp,
                            lease,
                            lo: t0 + lease,
                            hi: t1 + lease,
                        };
                    }
                    Claim::Busy { lease_left } => {
                        let State::InProgress { lease, .. } = state else {
                            return Err(ctx(format!("busy, but the record is {state:?}")));
                        };
                        if liveness == Live::No {
                            return Err(ctx(format!("busy, but the lease ran out: {state:?}")));
                        }
                        if lease_left.is_zero() || lease_left > *lease + timing.margin {
                            return Err(ctx(format!(
                                "busy with {lease_left:?} left of a {lease:?} lease"
                            )));
                        }
                        counts.busy += 1;
                    }
                    Claim::Completed(done) => {
                        let State::Completed {
                            fp,
                            fp_or_none,
                            value,
                            ttl,
                            ..
                        } = state
                        else {
                            return Err(ctx(format!(
                                "replayed {done:?}, but the record is {state:?}"
                            )));
                        };
                        if liveness == Live::No {
                            return Err(ctx(format!("replayed an expired record: {state:?}")));
                        }
                        let fp_matches =
                            done.fingerprint == *fp || (*fp_or_none && done.fingerprint.is_none());
                        if done.value != *value || !fp_matches {
                            return Err(ctx(format!(
                                "replayed {done:?}, but the record holds value {value:?} fp {fp:?}"
                            )));
                        }
                        if done.expires_in > *ttl + timing.margin {
                            return Err(ctx(format!(
                                "expires in {:?}, more than its ttl {ttl:?}",
                                done.expires_in
                            )));
                        }
                        counts.replayed += 1;
                        if let State::Completed { fp, fp_or_none, .. } = &mut states[k] {
                            *fp = done.fingerprint;
                            *fp_or_none = false;
                        }
                    }
                    other => return Err(ctx(format!("unknown claim result {other:?}"))),
                }
            }
            Op::Complete {
                key,
                token,
                value,
                long,
            } => {
                let k = usize::from(key);
                let token = pick(&issued[k], token);
                let value = value_bytes(value);
                let ttl = span(long);
                let got = store
                    .complete(keys[k], token, None, value.clone(), ttl)
                    .await;
                let t1 = Instant::now();
                let got = got.map_err(|e| ctx(format!("complete failed: {e}")))?;
                let state = states[k].clone();
                match state {
                    State::InProgress {
                        token: held,
                        fp,
                        lo,
                        hi,
                        ..
                    } if held == token => {
                        let liveness = live(lo, hi, t0, t1);
                        match (got, liveness) {
                            (Completion::Stored, liveness) => {
                                counts.stored += 1;
                                states[k] = State::Completed {
                                    token,
                                    fp,
                                    fp_or_none: liveness != Live::Yes,
                                    value,
                                    ttl,
                                    lo: t0 + ttl,
                                    hi: t1 + ttl,
                                };
                            }
                            (Completion::LeaseLost, Live::No | Live::Either) => {
                                counts.ambiguous += 1;
                                states[k] = State::Absent;
                            }
                            (other, _) => {
                                return Err(ctx(format!(
                                    "the holder of a live claim got {other:?}"
                                )));
                            }
                        }
                    }
                    State::Completed {
                        token: held,
                        lo,
                        hi,
                        ..
                    } if held == token && live(lo, hi, t0, t1) == Live::Yes => {
                        // A repeated completion: `Stored` (Redis, retry-safe) or `LeaseLost`,
                        // and the value is unchanged either way (checked by later claims).
                        if !matches!(got, Completion::Stored | Completion::LeaseLost) {
                            return Err(ctx(format!("unknown completion {got:?}")));
                        }
                    }
                    _ => {
                        // No live claim of this token: the rule of `Store::complete` stores the
                        // result where no other live record is (absent or expired: the claim
                        // ran out and was dropped, or was released or removed), and reports the
                        // lease as lost where one is.
                        let liveness = match &state {
                            State::Absent => Live::No,
                            State::InProgress { lo, hi, .. } | State::Completed { lo, hi, .. } => {
                                live(*lo, *hi, t0, t1)
                            }
                        };
                        match (got, liveness) {
                            (Completion::LeaseLost, Live::Yes | Live::Either) => counts.fenced += 1,
                            (Completion::Stored, Live::No | Live::Either) => {
                                if liveness == Live::Either {
                                    counts.ambiguous += 1;
                                }
                                counts.stored += 1;
                                states[k] = State::Completed {
                                    token,
                                    fp: None,
                                    fp_or_none: false,
                                    value,
                                    ttl,
                                    lo: t0 + ttl,
                                    hi: t1 + ttl,
                                };
                            }
                            (got, _) => {
                                return Err(ctx(format!(
                                    "complete with a token that holds nothing got {got:?}; record {state:?}"
                                )));
                            }
                        }
                    }
                }
            }
            Op::Renew { key, token, long } => {
                let k = usize::from(key);
                let token = pick(&issued[k], token);
                let lease = span(long);
                let got = store.renew(keys[k], token, lease).await;
                let t1 = Instant::now();
                let got = got.map_err(|e| ctx(format!("renew failed: {e}")))?;
                let state = states[k].clone();
                match state {
                    State::InProgress {
                        token: held,
                        fp,
                        lo,
                        hi,
                        ..
                    } if held == token => match (got, live(lo, hi, t0, t1)) {
                        (true, _) => {
                            states[k] = State::InProgress {
                                token,
                                fp,
                                lease,
                                lo: t0 + lease,
                                hi: t1 + lease,
                            }
                        }
                        (false, Live::No | Live::Either) => {
                            counts.ambiguous += 1;
                            states[k] = State::Absent;
                        }
                        (false, Live::Yes) => {
                            return Err(ctx("the holder of a live claim could not renew".into()));
                        }
                    },
                    _ => {
                        if got {
                            return Err(ctx(format!(
                                "a token that does not hold the key renewed it; record {state:?}"
                            )));
                        }
                        counts.fenced += 1;
                    }
                }
            }
            Op::Release { key, token } => {
                let k = usize::from(key);
                let token = pick(&issued[k], token);
                let got = store.release(keys[k], token).await;
                let t1 = Instant::now();
                let got = got.map_err(|e| ctx(format!("release failed: {e}")))?;
                let state = states[k].clone();
                match state {
                    State::InProgress {
                        token: held,
                        lo,
                        hi,
                        ..
                    } if held == token => {
                        if !got && live(lo, hi, t0, t1) == Live::Yes {
                            return Err(ctx("the holder of a live claim could not release".into()));
                        }
                        states[k] = State::Absent;
                    }
                    _ => {
                        if got {
                            return Err(ctx(format!(
                                "a token that does not hold the key released it; record {state:?}"
                            )));
                        }
                        counts.fenced += 1;
                    }
                }
            }
            Op::Remove { key } => {
                let k = usize::from(key);
                let got = store.remove(keys[k]).await;
                let t1 = Instant::now();
                let got = got.map_err(|e| ctx(format!("remove failed: {e}")))?;
                let liveness = match &states[k] {
                    State::Absent => Live::No,
                    State::InProgress { lo, hi, .. } | State::Completed { lo, hi, .. } => {
                        live(*lo, *hi, t0, t1)
                    }
                };
                let absent = matches!(states[k], State::Absent);
                if (absent && got) || (liveness == Live::Yes && !got) {
                    return Err(ctx(format!("remove said {got} of record {:?}", states[k])));
                }
                states[k] = State::Absent;
            }
            Op::Wait { key } => {
                let k = usize::from(key);
                store
                    .wait(keys[k], timing.wait)
                    .await
                    .map_err(|e| ctx(format!("wait failed: {e}")))?;
            }
        }
    }
    // Leave nothing behind on a shared server.
    for key in keys {
        let _ = store.remove(key).await;
    }
    Ok(counts)
}

/// A proptest runner for a model run: `cases` sequences, no regression files (the failing
/// sequence is in the panic message), a bounded shrink.
pub fn runner(cases: u32, max_shrink_iters: u32) -> proptest::test_runner::TestRunner {
    let config = proptest::test_runner::Config {
        cases,
        max_shrink_iters,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    proptest::test_runner::TestRunner::new(config)
}

/// A model run's counts as [`report`] takes them, by name.
pub fn counts_to_pairs(c: &ModelCounts) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("sequences", c.sequences),
        ("ops", c.ops),
        ("acquired", c.acquired),
        ("takeovers", c.takeovers),
        ("busy", c.busy),
        ("replayed", c.replayed),
        ("stored", c.stored),
        ("fenced", c.fenced),
        ("ambiguous", c.ambiguous),
    ])
}

/// Runs one command on a new connection to the Redis server on `port` and returns the reply's
/// first line (enough for `INCR`, `GET` of small values and `DEL`). For child processes, which
/// have no harness of their own.
pub fn raw_redis(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n{a}\r\n", a.len());
    }
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    stream.write_all(out.as_bytes()).expect("send to redis");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read from redis");
    if line.starts_with('$') && !line.starts_with("$-1") {
        let mut value = String::new();
        reader.read_line(&mut value).expect("read from redis");
        return value.trim_end().to_owned();
    }
    line.trim_end().to_owned()
}

/// The port of a `redis://host:port/` URL.
pub fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a redis://host:port/ URL")
}

/// A child process's output, read line by line on a thread so the parent can wait for one line
/// with a timeout.
pub struct ChildLines {
    rx: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl ChildLines {
    pub fn new(out: impl std::io::Read + Send + 'static) -> ChildLines {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildLines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits (at most `timeout`) for a line containing `needle`; false if none came.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Everything read so far, and whatever else arrives within `timeout` (until the end).
    pub fn rest(&mut self, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        self.seen.join("\n")
    }
}

/// Waits for a child to exit, at most `timeout`; kills it (SIGKILL) if it does not.
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("wait for the killed child");
            panic!("the child process did not exit within {timeout:?}; killed ({status})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum First {
    /// Executed and its record stored (acknowledged by the server).
    Stored,
    /// Executed, but the record could not be stored (the server went away mid-call).
    RanUnstored,
    /// `Error::Store`: the body did not run.
    Failed,
}

/// How many times [`outage_run`] takes the server down.
pub const OUTAGES: u64 = 2;

/// Many calls (400 keys, 6 workers, one call per key) on `store` while a controller thread takes
/// the server down (`down`) and brings it back (`up`) twice: after 60 and 180 calls, each time
/// until 20 calls failed (or 5 s). Then every key is called again. While `down` runs, at most 30
/// calls start (they race the outage, some are cut off mid-call), and none while `up` runs: so
/// whatever the machine's speed, every outage is met by calls and keys are left for after it.
///
/// Checks: every call ends with its value or `Error::Store` within two store timeouts (claim
/// and complete) and a few seconds; none hangs (30 s); after the restarts every key is served
/// with its own value; a key whose record was stored (the call returned with an expiry) is
/// replayed, never run again (`records_lost` = 0); a key whose call failed with `Error::Store`
/// ran exactly once in all; a key whose body ran but whose record could not be stored may run
/// once more, after its lease (counted). The server must keep acknowledged writes across the
/// restart (Redis: append-only file fsynced always; PostgreSQL: its WAL).
pub async fn outage_run(
    store: std::sync::Arc<dyn Store>,
    op_timeout: Duration,
    down: Box<dyn Fn() + Send>,
    up: Box<dyn Fn() + Send>,
) -> Vec<(&'static str, u64)> {
    use idem::{Error, Idempotent, Status};
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const KEYS: u32 = 400;
    const WORKERS: u32 = 6;
    let lease = Duration::from_secs(2);
    let call_bound = op_timeout * 2 + Duration::from_secs(3);
    let hang = Duration::from_secs(30);

    let execs: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let ended = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // 0: calls start freely; 1: the server is going down, `budget` more calls may start (they
    // race the outage); 2: no call starts (the server is coming back).
    let gate = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let budget = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let namespace = format!("outage.{}", Token::generate().as_u128());
    let call = {
        let (store, execs) = (store.clone(), execs.clone());
        move |k: u32| {
            let (store, execs, namespace) = (store.clone(), execs.clone(), namespace.clone());
            async move {
                let started = std::time::Instant::now();
                let result = tokio::time::timeout(
                    hang,
                    Idempotent::new(&*store, k)
                        .name(namespace)
                        .lease(lease)
                        .wait_timeout(lease * 2)
                        .run_with_outcome(|| async {
                            execs[k as usize].fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, Error>(u64::from(k) * 3)
                        }),
                )
                .await;
                let took = started.elapsed();
                let result =
                    result.unwrap_or_else(|_| panic!("key {k}: the call hung for {hang:?}"));
                (result, took)
            }
        }
    };

    let controller = {
        let (ended, failed, gate, budget) =
            (ended.clone(), failed.clone(), gate.clone(), budget.clone());
        std::thread::spawn(move || {
            let wait_until = |what: &dyn Fn() -> bool, at_most: Duration| {
                let deadline = std::time::Instant::now() + at_most;
                while !what() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            for outage in 0..OUTAGES as usize {
                let target = 60 + outage * 120;
                wait_until(
                    &|| ended.load(Ordering::SeqCst) >= target,
                    Duration::from_secs(60),
                );
                let failed_before = failed.load(Ordering::SeqCst);
                budget.store(30, Ordering::SeqCst);
                gate.store(1, Ordering::SeqCst);
                down();
                gate.store(0, Ordering::SeqCst);
                wait_until(
                    &|| failed.load(Ordering::SeqCst) >= failed_before + 20,
                    Duration::from_secs(5),
                );
                gate.store(2, Ordering::SeqCst);
                up();
                gate.store(0, Ordering::SeqCst);
            }
        })
    };

    let firsts: Arc<Mutex<HashMap<u32, (First, Duration)>>> = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (call, ended, failed, firsts, gate, budget) = (
            call.clone(),
            ended.clone(),
            failed.clone(),
            firsts.clone(),
            gate.clone(),
            budget.clone(),
        );
        workers.spawn(async move {
            for k in (w..KEYS).step_by(WORKERS as usize) {
                let waiting = std::time::Instant::now();
                loop {
                    match gate.load(Ordering::SeqCst) {
                        0 => break,
                        1 if budget.fetch_sub(1, Ordering::SeqCst) > 0 => break,
                        _ => {}
                    }
                    assert!(
                        waiting.elapsed() < Duration::from_secs(120),
                        "the server did not go down or come back within 120 s"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let (result, took) = call(k).await;
                let first = match result {
                    Ok(out) => {
                        assert_eq!(out.value, u64::from(k) * 3);
                        assert_eq!(out.status, Status::Executed, "key {k} is new");
                        if out.expires_in.is_some() {
                            First::Stored
                        } else {
                            First::RanUnstored
                        }
                    }
                    Err(Error::Store(_)) => First::Failed,
                    Err(other) => panic!("key {k}: expected a value or Error::Store, got {other}"),
                };
                firsts.lock().unwrap().insert(k, (first, took));
                ended.fetch_add(1, Ordering::SeqCst);
                if first == First::Failed {
                    failed.fetch_add(1, Ordering::SeqCst);
                    // A consumer backs off while its store is down.
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.expect("a worker panicked");
    }
    tokio::task::block_in_place(|| controller.join()).expect("the controller panicked");
    let firsts = std::mem::take(&mut *firsts.lock().unwrap());
    let mut slowest = Duration::ZERO;
    for (k, (first, took)) in &firsts {
        slowest = slowest.max(*took);
        assert!(
            *took <= call_bound,
            "key {k} ({first:?}) took {took:?}, more than {call_bound:?} (2 × the store timeout \
             and the body)"
        );
    }
    let count = |f: First| firsts.values().filter(|(x, _)| *x == f).count() as u64;
    let (stored, unstored, failed_calls) = (
        count(First::Stored),
        count(First::RanUnstored),
        count(First::Failed),
    );
    assert!(failed_calls > 0, "no call saw the outage");
    assert!(stored > 0, "no call succeeded");

    // After the restarts every key is served, and a stored record is replayed, not run again.
    let mut records_lost = 0;
    let mut reran_unstored = 0;
    for k in 0..KEYS {
        let mut attempts = 0;
        let out = loop {
            attempts += 1;
            let (result, _) = call(k).await;
            match result {
                Ok(out) => break out,
                // A claim that reached the server just before it went down is held until its
                // lease runs out.
                Err(Error::InProgress { .. } | Error::Store(_)) if attempts < 20 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("key {k} is not served after the restart: {err}"),
            }
        };
        assert_eq!(out.value, u64::from(k) * 3, "key {k} got another value");
        let execs = execs[k as usize].load(Ordering::SeqCst);
        match firsts[&k].0 {
            First::Stored => {
                if out.status != Status::Replayed || execs != 1 {
                    records_lost += 1;
                }
            }
            First::RanUnstored => {
                assert!((1..=2).contains(&execs), "key {k} ran {execs} times");
                reran_unstored += execs - 1;
            }
            // `Error::Store` means the body did not run: the retry ran it, once.
            First::Failed => assert_eq!(execs, 1, "key {k} ran {execs} times"),
        }
    }
    assert_eq!(
        records_lost, 0,
        "records acknowledged before an outage were lost (their keys ran again)"
    );
    vec![
        ("outages_survived", OUTAGES),
        ("calls", u64::from(KEYS) * 2),
        ("stored", stored),
        ("store_errors", failed_calls),
        ("ran_but_unstored", unstored),
        ("reran_after_unstored", reran_unstored),
        ("slowest_call_ms", slowest.as_millis() as u64),
        ("hung", 0),
        ("records_lost", records_lost),
    ]
}
