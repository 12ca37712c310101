//! Steps across real crashes (issue 18): the `checkout` example's driver against a redis-server
//! and a PostgreSQL server started by the harness. Its handler (charge, reserve, email, each an
//! `idem::step` calling a fake provider in another process) is SIGKILLed before, inside and after
//! each step and retried until it succeeds; each effect must happen once per order, and a step
//! that had returned must never be requested from the provider again.
//!
//! The driver checks every order itself and exits non-zero on any violation; this test also
//! reads its table, so that a run that checked nothing (no kills, no orders) cannot pass.

#![cfg(all(feature = "redis", feature = "postgres"))]

mod support;

use std::process::Command;
use std::sync::Mutex;

use support::postgres::PgServer;
use support::redis::RedisServer;

/// Orders per store: the first attempts of the first 14 orders stop at each of the 13 kill
/// points in turn (and one at none), so every point is hit.
const ORDERS: u64 = 14;

const POINTS: [&str; 13] = [
    "charge:before",
    "charge:inside-before-call",
    "charge:inside-after-call",
    "charge:after",
    "reserve:before",
    "reserve:inside-before-call",
    "reserve:inside-after-call",
    "reserve:after",
    "email:before",
    "email:inside-before-call",
    "email:inside-after-call",
    "email:after",
    "done",
];

/// One run at a time: two drivers' handlers at once on a small machine could starve a handler
/// past its 1 s lease, which is not what this test is about.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `checkout run --store URL --orders ORDERS --seed SEED`; returns its output, or fails
/// the test with it.
fn run_checkout(store: &str, seed: u64) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary has a path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target folder")
        .join("examples")
        .join("checkout");
    let out = Command::new(&example)
        .args(["run", "--store", store, "--orders", &ORDERS.to_string()])
        .args(["--seed", &seed.to_string()])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (a plain `cargo test --all-features` builds the examples; \
                 with this test file alone, run `cargo build --example checkout --features \
                 redis,postgres` first)",
                example.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the checkout driver found a violation or failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// The number at the end of the table row that starts with `label`.
fn row(stdout: &str, label: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find(|l| {
            l.strip_prefix(label)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{stdout}"));
    line[label.len()..]
        .split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("a bad row {line:?} in:\n{stdout}"))
        })
        .collect()
}

fn check(stdout: &str) {
    // Every kill point was hit, by a real SIGKILL of a handler standing there.
    for point in POINTS {
        let kills = row(stdout, &format!("killed at {point}"))[0];
        assert!(kills >= 1, "no handler was killed at {point}:\n{stdout}");
    }
    assert_eq!(
        row(stdout, "ran to the end"),
        [ORDERS],
        "one successful attempt per order\n{stdout}"
    );
    assert_eq!(
        row(stdout, "failed on its own"),
        [0],
        "every attempt either was killed or succeeded\n{stdout}"
    );
    // Each effect once per order; the provider heard a repeat only where a handler was killed
    // after its answer and before the step returned (the window its idempotency key closes).
    for effect in ["charge", "reserve", "email"] {
        let [performed, requests, repeated, in_window] = row(stdout, effect)[..] else {
            panic!("a bad {effect} row in:\n{stdout}");
        };
        assert_eq!(performed, ORDERS, "{effect}: once per order\n{stdout}");
        assert_eq!(requests, performed + repeated, "{stdout}");
        assert_eq!(
            repeated, in_window,
            "{effect}: a repeated request without a kill in its window: a recorded step ran \
             again\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!(
            "every effect was performed exactly once for each of the {ORDERS} orders, and no \
             finished step ran again"
        )),
        "{stdout}"
    );
}

#[test]
fn checkout_on_redis_survives_sigkill_at_every_point() {
    let url = RedisServer::shared().url();
    let stdout = run_checkout(&url, 1);
    check(&stdout);
}

#[test]
fn checkout_on_postgres_survives_sigkill_at_every_point() {
    let url = PgServer::shared().url();
    let stdout = run_checkout(&url, 2);
    check(&stdout);
}
