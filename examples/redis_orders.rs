//! Two workers in separate processes share one Redis: an order delivered to both is charged once.
//!
//! A broker with at-least-once delivery handed orders 1002 and 1003 to both workers. Each worker
//! charges every order it receives through the same `#[idempotent]` handler backed by a
//! [`RedisStore`]; whichever claims an order first charges it, and the other waits for that
//! charge and gets its receipt back.
//!
//! ```text
//! redis-server &   # or any Redis
//! IDEM_REDIS_URL=redis://127.0.0.1:6379/ cargo run --example redis_orders --features redis
//! ```
//!
//! Without arguments the program is the coordinator: it starts the two workers (this same
//! program, as `worker A RUN` and `worker B RUN`, where RUN keeps each run's keys apart), prints
//! what they did, and checks that every order was charged exactly once (exit status 1 if not).

use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use idem::{RedisStore, idempotent};
use serde::{Deserialize, Serialize};

/// The orders the broker delivered to each worker: 1002 and 1003 went to both, at about the same
/// time, so one worker charges each while the other waits for its receipt.
const DELIVERIES: [(&str, [u64; 3]); 2] = [("A", [1002, 1001, 1003]), ("B", [1002, 1004, 1003])];

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    order: u64,
    cents: u64,
    charged_by: String,
}

#[derive(Debug)]
enum ChargeError {
    Idem(idem::Error),
}

impl From<idem::Error> for ChargeError {
    fn from(e: idem::Error) -> Self {
        ChargeError::Idem(e)
    }
}

impl std::fmt::Display for ChargeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChargeError::Idem(e) => write!(f, "{e}"),
        }
    }
}

/// Charges an order: runs once per (run, order) across every process sharing the Redis.
#[idempotent(store = store, key = (run, order), name = "examples.redis_orders.charge.v1", ttl = "1h")]
async fn charge(
    store: &RedisStore,
    run: &str,
    order: u64,
    worker: &str,
) -> Result<Receipt, ChargeError> {
    // Talking to the payment provider takes a while: long enough for the duplicate to arrive.
    tokio::time::sleep(Duration::from_millis(150)).await;
    Ok(Receipt {
        order,
        cents: 1000 + order % 1000 * 99,
        charged_by: worker.to_owned(),
    })
}

fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

async fn worker(name: &str, run: &str) -> Result<(), ChargeError> {
    let store = RedisStore::connect(&redis_url()).await?;
    let orders = DELIVERIES
        .iter()
        .find(|(w, _)| *w == name)
        .map(|(_, orders)| *orders)
        .unwrap_or_default();
    for order in orders {
        let receipt = charge(&store, run, order, name).await?;
        if receipt.charged_by == name {
            println!(
                "executed order={order} worker={name} cents={}",
                receipt.cents
            );
        } else {
            println!(
                "replayed order={order} worker={name} charged_by={}",
                receipt.charged_by
            );
        }
    }
    Ok(())
}

fn coordinator() -> ExitCode {
    let Ok(me) = std::env::current_exe() else {
        eprintln!("cannot find this program to start the workers");
        return ExitCode::FAILURE;
    };
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    println!("Redis at {}; two workers, one per process", redis_url());
    let children: Vec<_> = DELIVERIES
        .iter()
        .map(|(name, _)| {
            Command::new(&me)
                .args(["worker", name, &run])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect();
    let mut executions: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut ok = true;
    for child in children {
        let output = match child.and_then(|c| c.wait_with_output()) {
            Ok(output) => output,
            Err(err) => {
                eprintln!("could not run a worker: {err}");
                return ExitCode::FAILURE;
            }
        };
        ok &= output.status.success();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            println!("  {line}");
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            let order = field("order").and_then(|o| o.parse::<u64>().ok());
            if let Some(order) = order {
                let entry = executions.entry(order).or_default();
                if line.starts_with("executed") {
                    entry.extend(field("worker"));
                }
            }
        }
    }
    for (order, by) in &executions {
        let delivered_to: Vec<&str> = DELIVERIES
            .iter()
            .filter(|(_, orders)| orders.contains(order))
            .map(|(w, _)| *w)
            .collect();
        println!(
            "order {order}: delivered to {}, executed {} time(s){}",
            delivered_to.join(" and "),
            by.len(),
            if by.len() == 1 {
                format!(" (by worker {})", by[0])
            } else {
                String::new()
            }
        );
        ok &= by.len() == 1;
    }
    ok &= executions.len() == 4;
    if ok {
        println!("every order was charged exactly once");
        ExitCode::SUCCESS
    } else {
        println!("FAILED: an order was not charged exactly once, or a worker failed");
        ExitCode::FAILURE
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => coordinator(),
        [cmd, name, run] if cmd == "worker" => match worker(name, run).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("worker {name}: {err}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: redis_orders [worker NAME RUN]");
            ExitCode::FAILURE
        }
    }
}
