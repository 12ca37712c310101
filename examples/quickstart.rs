//! The quickstart: no set-up, the embedded in-memory store.
//!
//! Shows a first call that executes, a retry that replays, a concurrent duplicate that waits for
//! the first call instead of running again, and a failing call whose retry runs again.
//!
//! Run it with `cargo run --example quickstart`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    order: u64,
    charge_id: u32,
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    /// The provider declined for now; the caller may retry.
    #[error("the provider declined; try again")]
    TryAgain,
    /// The idempotency store failed, or another call holds the key.
    #[error(transparent)]
    Idem(#[from] idem::Error),
}

struct Order {
    id: u64,
    cents: u64,
}

/// How many times the payment provider was really called.
static PROVIDER_CALLS: AtomicU32 = AtomicU32::new(0);
/// The provider declines order 3 the first time.
static DECLINED_ONCE: AtomicBool = AtomicBool::new(false);

#[idempotent(key = order.id, ttl = "24h")]
async fn charge(order: &Order) -> Result<Receipt, PaymentError> {
    let charge_id = PROVIDER_CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(50)).await; // the provider takes a while
    if order.id == 3 && !DECLINED_ONCE.swap(true, Ordering::SeqCst) {
        println!(
            "  provider: charge #{charge_id} of {} cents declined, try again",
            order.cents
        );
        return Err(PaymentError::TryAgain);
    }
    println!(
        "  provider: charge #{charge_id} of {} cents for order {}",
        order.cents, order.id
    );
    Ok(Receipt {
        order: order.id,
        charge_id,
    })
}

#[tokio::main]
async fn main() -> Result<(), PaymentError> {
    println!("1. The first call runs the body:");
    let order = Order { id: 1, cents: 1999 };
    let first = charge(&order).await?;
    println!("   -> {first:?}");

    println!("2. A retry with the same key gets the first result back; the body does not run:");
    let retry = charge(&order).await?;
    println!("   -> {retry:?}");
    assert_eq!(first, retry);

    println!("3. Two concurrent calls with one key: the second waits for the first:");
    let order = Order { id: 2, cents: 500 };
    let (a, b) = tokio::join!(charge(&order), charge(&order));
    let (a, b) = (a?, b?);
    println!("   -> {a:?}\n   -> {b:?}");
    assert_eq!(a, b);

    println!("4. A failure is not remembered: the retry runs the body again:");
    let order = Order { id: 3, cents: 750 };
    match charge(&order).await {
        Err(PaymentError::TryAgain) => println!("   -> declined; retrying"),
        other => println!("   -> unexpected: {other:?}"),
    }
    let retried = charge(&order).await?;
    println!("   -> {retried:?}");

    let calls = PROVIDER_CALLS.load(Ordering::SeqCst);
    println!("The provider was called {calls} times for 3 orders and 6 calls (one declined).");
    assert_eq!(calls, 4);
    Ok(())
}
