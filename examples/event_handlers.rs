//! Event handlers under at-least-once delivery. A small queue redelivers every message that was
//! not acknowledged, as a broker does when a consumer crashes after doing the work but before the
//! ack. Each handler is deduplicated by the message's payment id, so redeliveries do no harm.
//!
//! Run it with `cargo run --example event_handlers`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use idem::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PaymentSucceeded {
    payment_id: String,
    customer: String,
    cents: u64,
}

/// Effects the outside world would see.
static EMAILS_SENT: AtomicU32 = AtomicU32::new(0);
static POINTS_CREDITED: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = &event.payment_id, name = "events.receipt_email.v1", ttl = "7d")]
async fn send_receipt_email(event: &PaymentSucceeded) -> Result<(), idem::Error> {
    EMAILS_SENT.fetch_add(1, Ordering::SeqCst);
    println!(
        "  email: receipt for {} to {}",
        event.payment_id, event.customer
    );
    Ok(())
}

#[idempotent(key = &event.payment_id, name = "events.loyalty_points.v1", ttl = "7d")]
async fn credit_loyalty_points(event: &PaymentSucceeded) -> Result<u64, idem::Error> {
    let points = event.cents / 100;
    POINTS_CREDITED.fetch_add(points as u32, Ordering::SeqCst);
    println!("  loyalty: {points} points to {}", event.customer);
    Ok(points)
}

/// An at-least-once queue: a message stays until it is acknowledged.
struct Queue {
    pending: Mutex<VecDeque<PaymentSucceeded>>,
    deliveries: AtomicU32,
}

impl Queue {
    fn receive(&self) -> Option<PaymentSucceeded> {
        let message = self.pending.lock().ok()?.front().cloned();
        if message.is_some() {
            self.deliveries.fetch_add(1, Ordering::SeqCst);
        }
        message
    }

    fn ack(&self, payment_id: &str) {
        if let Ok(mut pending) = self.pending.lock()
            && pending.front().is_some_and(|m| m.payment_id == payment_id)
        {
            pending.pop_front();
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), idem::Error> {
    let events = (1..=5).map(|i| PaymentSucceeded {
        payment_id: format!("pay_{i:03}"),
        customer: format!("customer{i}@example.com"),
        cents: 2_500 * i,
    });
    let queue = Queue {
        pending: Mutex::new(events.collect()),
        deliveries: AtomicU32::new(0),
    };

    // The consumer "crashes" before the ack on every other delivery: the broker redelivers.
    let mut attempt = 0;
    while let Some(event) = queue.receive() {
        attempt += 1;
        println!("delivery {attempt}: {}", event.payment_id);
        send_receipt_email(&event).await?;
        credit_loyalty_points(&event).await?;
        if attempt % 2 == 0 {
            println!("  (consumer crashed before the ack: the message will be redelivered)");
            attempt += 1;
            // The redelivery comes right back; this time the consumer survives.
            let again = queue.receive().unwrap_or(event);
            println!("delivery {attempt}: {} (redelivered)", again.payment_id);
            send_receipt_email(&again).await?;
            credit_loyalty_points(&again).await?;
            queue.ack(&again.payment_id);
        } else {
            queue.ack(&event.payment_id);
        }
    }

    let deliveries = queue.deliveries.load(Ordering::SeqCst);
    let emails = EMAILS_SENT.load(Ordering::SeqCst);
    let points = POINTS_CREDITED.load(Ordering::SeqCst);
    println!(
        "\n5 payments, {deliveries} deliveries, {emails} emails sent, {points} points credited."
    );
    assert_eq!(
        emails, 5,
        "one email per payment, whatever the redeliveries"
    );
    assert_eq!(points, (1..=5).map(|i| 25 * i).sum::<u32>());
    Ok(())
}
