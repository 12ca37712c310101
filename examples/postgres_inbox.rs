//! An inbox consumer on PostgreSQL, in transactional mode: the broker delivers every message
//! twice (at-least-once delivery), and every order is recorded exactly once.
//!
//! Recording the order (an `INSERT`) and the idempotency record commit in one transaction, so
//! even a crash between the two cannot record an order twice or lose one.
//!
//! ```sh
//! IDEM_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --example postgres_inbox --features postgres
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem::store::postgres::tokio_postgres;
use idem::{PostgresStore, Status};
use serde::{Deserialize, Serialize};

/// A message from the broker: "order `order_id` was placed for `cents`".
#[derive(Clone, Debug)]
pub struct Message {
    /// The broker's message id: the idempotency key.
    pub id: String,
    /// The order it announces.
    pub order_id: i64,
    /// Its amount.
    pub cents: i64,
}

/// What handling a message returns (and what a redelivery replays).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// The order recorded.
    pub order_id: i64,
    /// The row id it got.
    pub row: i64,
}

/// Why handling a message failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// Writing the order failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The idempotency store failed, or another consumer holds the message.
    #[error(transparent)]
    Idem(#[from] idem::Error),
}

/// What a run did.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// Messages delivered, duplicates included.
    pub deliveries: usize,
    /// Deliveries that recorded an order.
    pub executed: usize,
    /// Deliveries that were duplicates and replayed the first result.
    pub replayed: usize,
    /// Orders in the table for this run's messages.
    pub orders_recorded: i64,
}

/// Handles one delivery: records its order, once per message id.
pub async fn handle(
    store: &PostgresStore,
    msg: &Message,
) -> Result<(Recorded, Status), InboxError> {
    let (order_id, cents) = (msg.order_id, msg.cents);
    let outcome = store
        .transactional(("inbox", msg.id.as_str()))
        .name("postgres_inbox.record_order.v1")
        .ttl(Duration::from_secs(7 * 24 * 3600))
        .run_with_outcome(async move |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO inbox_orders (order_id, cents) VALUES ($1, $2) RETURNING id",
                    &[&order_id, &cents],
                )
                .await?;
            Ok::<_, InboxError>(Recorded {
                order_id,
                row: row.try_get(0)?,
            })
        })
        .await?;
    Ok((outcome.value, outcome.status))
}

/// Creates the tables, delivers a batch of messages twice each, and counts what happened.
pub async fn run(url: &str) -> Result<Summary, Box<dyn std::error::Error + Send + Sync>> {
    let store = PostgresStore::connect(url).await?;
    store.migrate().await?;
    let client = store.pool().get().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS inbox_orders ( \
               id bigserial PRIMARY KEY, order_id bigint NOT NULL, cents bigint NOT NULL)",
        )
        .await?;

    // A batch of its own per run, so order ids do not collide with an earlier run.
    let batch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    let messages: Vec<Message> = (0..5)
        .map(|i| Message {
            id: format!("msg-{batch}-{i}"),
            order_id: batch * 10 + i,
            cents: 1000 + i,
        })
        .collect();

    // At-least-once delivery: every message twice, the second copies out of order, and one
    // pair at the same time.
    let mut deliveries: Vec<&Message> = messages.iter().collect();
    deliveries.extend(messages.iter().rev());
    let mut summary = Summary::default();
    let count = |summary: &mut Summary, status: Status| {
        summary.deliveries += 1;
        match status {
            Status::Executed => summary.executed += 1,
            _ => summary.replayed += 1,
        }
    };
    for msg in deliveries {
        let (recorded, status) = handle(&store, msg).await?;
        println!(
            "{} → order {} (row {}): {}",
            msg.id,
            recorded.order_id,
            recorded.row,
            status.as_str()
        );
        count(&mut summary, status);
    }
    let twin = Message {
        id: format!("msg-{batch}-twin"),
        order_id: batch * 10 + 9,
        cents: 4200,
    };
    let (a, b) = tokio::join!(handle(&store, &twin), handle(&store, &twin));
    let ((first, s1), (second, s2)) = (a?, b?);
    assert_eq!(first, second, "both deliveries see the same recorded order");
    println!(
        "{} delivered twice at once → {} and {}",
        twin.id,
        s1.as_str(),
        s2.as_str()
    );
    count(&mut summary, s1);
    count(&mut summary, s2);

    let ids: Vec<i64> = messages
        .iter()
        .map(|m| m.order_id)
        .chain([twin.order_id])
        .collect();
    summary.orders_recorded = client
        .query_one(
            "SELECT count(*) FROM inbox_orders WHERE order_id = ANY($1)",
            &[&ids],
        )
        .await?
        .try_get(0)?;
    println!("{summary:?}");
    Ok(summary)
}

#[tokio::main]
async fn main() {
    let Some(url) = std::env::var("IDEM_POSTGRES_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .ok()
    else {
        eprintln!(
            "set IDEM_POSTGRES_URL (or DATABASE_URL) to a PostgreSQL URL, e.g. \
             IDEM_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres"
        );
        std::process::exit(2);
    };
    match run(&url).await {
        Ok(summary) => {
            assert_eq!(
                summary.orders_recorded, 6,
                "every order recorded exactly once"
            );
        }
        Err(err) => {
            eprintln!("postgres_inbox failed: {err}");
            std::process::exit(1);
        }
    }
}
