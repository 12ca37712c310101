//! At-least-once delivery from a real broker (issue 17): the `redis_streams` example against a
//! redis-server started by the harness. A consumer of a Redis Streams group is killed mid-batch,
//! its pending entries are taken over with `XAUTOCLAIM` by another process, and the producer
//! published two orders twice: every order's effect happens once, counted in Redis.

#![cfg(feature = "redis")]

mod support;

use support::redis::RedisServer;

#[test]
fn a_consumer_killed_mid_batch_charges_nothing_twice() {
    let url = RedisServer::shared().url();
    let stdout = support::run_example("redis_streams", &[("IDEM_REDIS_URL", &url)]);
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
