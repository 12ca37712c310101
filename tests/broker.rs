//! At-least-once delivery from a real broker (issue 17): the `redis_streams` example against a
//! redis-server started by the harness. A consumer of a Redis Streams group is killed mid-batch,
//! its pending entries are taken over with `XAUTOCLAIM` by another process, and the producer
//! published two orders twice: every order's effect happens once, counted in Redis.

#![cfg(feature = "redis")]

mod support;

use support::redis::RedisServer;

#[test]
fn a_consumer_killed_mid_batch_charges_nothing_twice() {
    let server = RedisServer::shared();
    // `cargo test` builds the examples next to the test binaries' folder.
    let exe = std::env::current_exe().expect("the test binary has a path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target folder")
        .join("examples")
        .join("redis_streams");
    let out = std::process::Command::new(&example)
        .env("IDEM_REDIS_URL", server.url())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (a plain `cargo test --all-features` builds the examples; with `--test broker` alone, run `cargo build --examples --features redis` first)",
                example.display()
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The scenario happened: A was killed holding 6 entries, B took them over, and the 4 that
    // A had handled (and the second entry of order 3) were replayed with A's receipts.
    assert!(
        stdout.contains("worker A killed mid-batch: true"),
        "{stdout}"
    );
    assert!(stdout.contains("B: claimed 6 pending entries"), "{stdout}");
    let replayed = stdout
        .lines()
        .filter(|l| l.contains("worker=B charged_by=A"))
        .count();
    assert_eq!(
        replayed, 5,
        "redelivered entries replay A's receipts\n{stdout}"
    );
    // The count is the assertion: every order once, nothing left pending.
    for order in 1..=10 {
        assert!(
            stdout.contains(&format!("order {order}: published ")),
            "{stdout}"
        );
    }
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.ends_with("charged 1 time(s)"))
            .count(),
        10,
        "{stdout}"
    );
    assert!(stdout.contains("entries left pending: 0"), "{stdout}");
    assert!(
        stdout.contains("every order was charged exactly once"),
        "{stdout}"
    );
}
