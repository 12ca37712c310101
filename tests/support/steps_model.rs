//! A model of `idem::step` under random crashes, cancellations, failures, takeovers and stale
//! holders, through the executor and a real store (issue 18). Each sequence runs attempts of a
//! three-step body on a few keys; every attempt meets a random fate at a random point, and a
//! final clean attempt per key must return what the steps recorded.
//!
//! The assertions, checked as the effects run:
//! - **no recorded step ever runs again**: once a step has returned `Ok` to any holder, its
//!   effect never starts again for that key;
//! - **retries get the first value, exactly**: every later `Ok` of that step is the same value;
//! - **no stale holder's step is recorded**: a value whose step answered `LeaseLost` is never
//!   returned by a later step.
//!
//! An effect may run more than once only before its step was first recorded: a holder stopped
//! inside the step after the effect (crash, cancel, stall), which is the window a provider's own
//! idempotency key closes. Those repeats are counted, not forbidden. So is the effect of a holder
//! that was paused longer than its lease *inside* a step, between the step's check of its lease
//! and the effect: no fencing token reaches a provider that does not check it (the same window,
//! seen from the other side), and the model counts it apart (`stale_effects`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idem::store::Token;
use idem::{Error, Idempotent, Store};
use proptest::prelude::*;
use tokio::sync::oneshot;

/// Steps per body.
pub const STEPS: usize = 3;
/// Keys per sequence.
pub const KEYS: usize = 2;
const NAMES: [&str; STEPS] = ["charge", "reserve", "email"];

/// Where in the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Before,
    InsideBeforeEffect,
    InsideAfterEffect,
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub step: usize,
    pub at: At,
}

/// What happens to an attempt.
#[derive(Clone, Copy, Debug)]
pub enum Fate {
    /// Runs to its end.
    Finish,
    /// The body returns `Err` after this step.
    FailAfter(usize),
    /// The call's future is dropped at the point.
    Cancel(Point),
    /// The call's future is leaked at the point: never polled or dropped again, like a process
    /// that died; its claim runs out.
    Crash(Point),
    /// The call's future is not polled past its lease at the point, then resumed after the next
    /// attempt: a stale holder.
    Stall(Point),
}

#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub key: usize,
    pub fate: Fate,
}

fn point() -> impl Strategy<Value = Point> {
    (
        0..STEPS,
        prop_oneof![
            Just(At::Before),
            Just(At::InsideBeforeEffect),
            Just(At::InsideAfterEffect),
            Just(At::After)
        ],
    )
        .prop_map(|(step, at)| Point { step, at })
}

/// Random sequences of `min..max` attempts.
pub fn attempts(min: usize, max: usize) -> impl Strategy<Value = Vec<Attempt>> {
    let fate = prop_oneof![
        1 => Just(Fate::Finish),
        2 => (0..STEPS).prop_map(Fate::FailAfter),
        2 => point().prop_map(Fate::Cancel),
        2 => point().prop_map(Fate::Crash),
        2 => point().prop_map(Fate::Stall),
    ];
    proptest::collection::vec(
        (0..KEYS, fate).prop_map(|(key, fate)| Attempt { key, fate }),
        min..max,
    )
}

/// Counts of model runs, summed over sequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepCounts {
    pub sequences: u64,
    pub attempts: u64,
    pub effects: u64,
    pub replayed_steps: u64,
    pub window_repeats: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub crashed: u64,
    pub stalled: u64,
    pub stale_lease_lost: u64,
    pub stale_effects: u64,
}

impl StepCounts {
    pub fn add(&mut self, o: &StepCounts) {
        self.sequences += o.sequences;
        self.attempts += o.attempts;
        self.effects += o.effects;
        self.replayed_steps += o.replayed_steps;
        self.window_repeats += o.window_repeats;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.crashed += o.crashed;
        self.stalled += o.stalled;
        self.stale_lease_lost += o.stale_lease_lost;
        self.stale_effects += o.stale_effects;
    }

    pub fn pairs(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("sequences", self.sequences),
            ("attempts", self.attempts),
            ("effects", self.effects),
            ("replayed_steps", self.replayed_steps),
            ("window_repeats", self.window_repeats),
            ("failed", self.failed),
            ("cancelled", self.cancelled),
            ("crashed", self.crashed),
            ("stalled", self.stalled),
            ("stale_lease_lost", self.stale_lease_lost),
            ("stale_effects", self.stale_effects),
        ]
    }
}

/// What the effects and steps of one sequence did.
#[derive(Default)]
struct Ledger {
    /// Per key and step: the value its step first returned `Ok` with.
    acked: [[Option<u64>; STEPS]; KEYS],
    /// Per key and step: how many times its effect ran.
    runs: [[u64; STEPS]; KEYS],
    /// Values whose step answered `LeaseLost`.
    refused: HashSet<u64>,
    violations: Vec<String>,
    counts: StepCounts,
}

static VALUES: AtomicU64 = AtomicU64::new(1);

/// One attempt's plan: where it stops, and how it is told to go on (a stall).
struct Plan {
    stop_at: Option<Point>,
    /// The step it was resumed inside of, before the effect, after a stall.
    resumed_inside: Mutex<Option<usize>>,
    reached: Mutex<Option<oneshot::Sender<()>>>,
    resume: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Plan {
    async fn point(&self, here: Point) {
        if self.stop_at != Some(here) {
            return;
        }
        if let Some(reached) = self.reached.lock().unwrap().take() {
            let _ = reached.send(());
        }
        let resume = self.resume.lock().unwrap().take();
        match resume {
            Some(resume) => {
                let _ = resume.await;
                if here.at == At::InsideBeforeEffect {
                    *self.resumed_inside.lock().unwrap() = Some(here.step);
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

async fn body(
    ledger: &Mutex<Ledger>,
    key: usize,
    plan: &Plan,
    fail_after: Option<usize>,
) -> Result<[u64; STEPS], Error> {
    let mut out = [0; STEPS];
    for (step, name) in NAMES.iter().enumerate() {
        let at = |at| Point { step, at };
        plan.point(at(At::Before)).await;
        let ran = Mutex::new(None);
        let got = idem::step(name, || async {
            plan.point(at(At::InsideBeforeEffect)).await;
            let value = VALUES.fetch_add(1, Ordering::SeqCst);
            {
                let mut l = ledger.lock().unwrap();
                if *plan.resumed_inside.lock().unwrap() == Some(step) {
                    l.counts.stale_effects += 1;
                } else if l.acked[key][step].is_some() {
                    l.violations.push(format!(
                        "key {key} step {name}: its effect ran again after the step was recorded"
                    ));
                }
                if l.runs[key][step] > 0 {
                    l.counts.window_repeats += 1;
                }
                l.runs[key][step] += 1;
                l.counts.effects += 1;
            }
            *ran.lock().unwrap() = Some(value);
            plan.point(at(At::InsideAfterEffect)).await;
            Ok::<u64, Error>(value)
        })
        .await;
        let ran = *ran.lock().unwrap();
        match got {
            Ok(value) => {
                let mut l = ledger.lock().unwrap();
                if ran.is_none() {
                    l.counts.replayed_steps += 1;
                }
                if l.refused.contains(&value) {
                    l.violations.push(format!(
                        "key {key} step {name}: returned {value}, the value of a holder whose step was refused"
                    ));
                }
                match l.acked[key][step] {
                    Some(first) if first != value => l.violations.push(format!(
                        "key {key} step {name}: returned {value}, but it first returned {first}"
                    )),
                    Some(_) => {}
                    None => l.acked[key][step] = Some(value),
                }
                out[step] = value;
            }
            Err(err) => {
                if let (Error::LeaseLost { .. }, Some(value)) = (&err, ran) {
                    ledger.lock().unwrap().refused.insert(value);
                }
                return Err(err);
            }
        }
        plan.point(at(At::After)).await;
        if fail_after == Some(step) {
            return Err(Error::InProgress {
                retry_after: Duration::ZERO,
            });
        }
    }
    Ok(out)
}

type Call<'a> = Pin<Box<dyn Future<Output = Result<[u64; STEPS], Error>> + Send + 'a>>;

fn call<'a>(
    store: &'a dyn Store,
    key: &'a str,
    lease: Duration,
    ledger: &'a Mutex<Ledger>,
    k: usize,
    plan: &'a Plan,
    fail_after: Option<usize>,
) -> Call<'a> {
    Box::pin(
        Idempotent::new(store, key)
            .name("model.steps")
            .lease(lease)
            .wait_timeout(lease * 40)
            .run(move || body(ledger, k, plan, fail_after)),
    )
}

/// Runs `attempts` against `store` and checks the assertions of this module. `lease` must be
/// long enough for a store round trip or two; stalls and crashes wait twice that.
pub async fn run_steps_model(
    store: &dyn Store,
    lease: Duration,
    attempts: &[Attempt],
) -> Result<StepCounts, String> {
    let ledger = Mutex::new(Ledger::default());
    let keys: Vec<String> = (0..KEYS)
        .map(|k| format!("{k}-{}", Token::generate().as_u128()))
        .collect();
    // Plans outlive the calls that borrow them (crashed ones are leaked with their plan).
    let plans: Vec<Plan> = attempts
        .iter()
        .map(|a| {
            let stop_at = match a.fate {
                Fate::Cancel(p) | Fate::Crash(p) | Fate::Stall(p) => Some(p),
                Fate::Finish | Fate::FailAfter(_) => None,
            };
            Plan {
                stop_at,
                resumed_inside: Mutex::new(None),
                reached: Mutex::new(None),
                resume: Mutex::new(None),
            }
        })
        .collect();
    let plans: &'static [Plan] = Box::leak(plans.into_boxed_slice());
    let mut stalled: Vec<(Call<'_>, oneshot::Sender<()>)> = Vec::new();
    for (i, attempt) in attempts.iter().enumerate() {
        let plan = &plans[i];
        let k = attempt.key;
        let (reached, at) = oneshot::channel();
        *plan.reached.lock().unwrap() = Some(reached);
        let fail_after = match attempt.fate {
            Fate::FailAfter(step) => Some(step),
            _ => None,
        };
        let resume = match attempt.fate {
            Fate::Stall(_) => {
                let (go, resume) = oneshot::channel();
                *plan.resume.lock().unwrap() = Some(resume);
                Some(go)
            }
            _ => None,
        };
        ledger.lock().unwrap().counts.attempts += 1;
        let mut running = call(store, &keys[k], lease, &ledger, k, plan, fail_after);
        let stopped = tokio::select! {
            result = &mut running => {
                if result.is_err() {
                    ledger.lock().unwrap().counts.failed += 1;
                }
                false
            }
            _ = at => true,
        };
        if stopped {
            match attempt.fate {
                Fate::Cancel(_) => {
                    ledger.lock().unwrap().counts.cancelled += 1;
                    drop(running);
                }
                Fate::Crash(_) => {
                    ledger.lock().unwrap().counts.crashed += 1;
                    std::mem::forget(running);
                    tokio::time::sleep(lease * 2).await;
                }
                Fate::Stall(_) => {
                    ledger.lock().unwrap().counts.stalled += 1;
                    if let Some(go) = resume {
                        stalled.push((running, go));
                    }
                    tokio::time::sleep(lease * 2).await;
                }
                Fate::Finish | Fate::FailAfter(_) => {
                    return Err(format!("attempt {i} stopped without a stop point"));
                }
            }
        }
        // Stale holders stalled before this attempt go on now, after it.
        if !stopped || !matches!(attempt.fate, Fate::Stall(_)) {
            for (mut call, go) in stalled.drain(..) {
                let _ = go.send(());
                let result = tokio::time::timeout(lease * 40, &mut call).await;
                match result {
                    Ok(Err(Error::LeaseLost { .. })) => {
                        ledger.lock().unwrap().counts.stale_lease_lost += 1
                    }
                    Ok(_) => {}
                    Err(_) => return Err(format!("a resumed holder did not end (attempt {i})")),
                }
            }
        }
    }
    for (mut call, go) in stalled.drain(..) {
        let _ = go.send(());
        let _ = tokio::time::timeout(lease * 40, &mut call).await;
    }
    // A clean attempt per key returns exactly what its steps recorded.
    for (k, key) in keys.iter().enumerate() {
        let plan = Plan {
            stop_at: None,
            resumed_inside: Mutex::new(None),
            reached: Mutex::new(None),
            resume: Mutex::new(None),
        };
        let got = call(store, key, lease, &ledger, k, &plan, None).await;
        {
            let l = &mut *ledger.lock().unwrap();
            match got {
                Ok(values) => {
                    for (step, value) in values.iter().enumerate() {
                        if l.acked[k][step] != Some(*value) {
                            l.violations.push(format!(
                            "key {k}: the clean attempt returned {value} for step {}, recorded {:?}",
                            NAMES[step], l.acked[k][step]
                        ));
                        }
                    }
                }
                Err(err) => l
                    .violations
                    .push(format!("key {k}: the clean attempt failed: {err}")),
            }
        }
        let _ = store
            .remove(idem::Key::new("model.steps", &key.as_str()))
            .await;
    }
    drop(stalled);
    let l = ledger.into_inner().unwrap();
    if !l.violations.is_empty() {
        return Err(l.violations.join("\n"));
    }
    let mut counts = l.counts;
    counts.sequences = 1;
    Ok(counts)
}

/// One scenario every store runs (tests/steps.rs, tests/redis.rs, tests/postgres.rs): a holder
/// charges (a step) and then "crashes": its call's future is leaked, never polled again nor
/// dropped, so it stops renewing and never releases. After its lease runs out, the next call
/// takes the key over and gets the recorded charge without charging again; its other step runs
/// once.
pub async fn a_takeover_does_not_run_a_recorded_step_again(store: &dyn Store, lease: Duration) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    let key = format!("takeover-{}", Token::generate().as_u128());
    let charges = Arc::new(AtomicUsize::new(0));
    let emails = Arc::new(AtomicUsize::new(0));
    let (recorded, crashed) = oneshot::channel::<()>();
    let first = {
        let charges = charges.clone();
        Idempotent::new(store, key.as_str())
            .name("steps.takeover")
            .lease(lease)
            .run(move || async move {
                let receipt = idem::step("charge", || async {
                    Ok::<_, Error>(charges.fetch_add(1, Ordering::SeqCst) + 100)
                })
                .await?;
                let _ = recorded.send(());
                std::future::pending::<()>().await;
                Ok::<usize, Error>(receipt)
            })
    };
    let mut first = Box::pin(first);
    tokio::select! {
        _ = &mut first => panic!("the first holder never finishes"),
        _ = crashed => {}
    }
    std::mem::forget(first);
    assert_eq!(charges.load(Ordering::SeqCst), 1);

    // Waits for the lapsed lease, then takes over.
    let (c, e) = (charges.clone(), emails.clone());
    let out = Idempotent::new(store, key.as_str())
        .name("steps.takeover")
        .lease(lease)
        .run_with_outcome(move || async move {
            let receipt = idem::step("charge", || async {
                Ok::<_, Error>(c.fetch_add(1, Ordering::SeqCst) + 100)
            })
            .await?;
            idem::step("email", || async {
                Ok::<_, Error>(e.fetch_add(1, Ordering::SeqCst))
            })
            .await?;
            Ok::<usize, Error>(receipt)
        })
        .await
        .expect("the takeover completes");
    assert_eq!(
        (out.value, out.status),
        (100, idem::Status::Executed),
        "the takeover returns the recorded charge"
    );
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the card is charged once"
    );
    assert_eq!(emails.load(Ordering::SeqCst), 1);
}
