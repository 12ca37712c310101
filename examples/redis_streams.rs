//! At-least-once delivery from a real broker: Redis Streams consumer groups, a consumer killed
//! mid-batch, and its pending entries redelivered to another with `XAUTOCLAIM`. Each payment's
//! effect happens once.
//!
//! ```text
//! redis-server &   # Redis 6.2 or later (XAUTOCLAIM)
//! IDEM_REDIS_URL=redis://127.0.0.1:6379/ cargo run --example redis_streams --features redis
//! ```
//!
//! Without arguments the program is the coordinator:
//!
//! 1. it publishes 12 payment events to a stream, two of them twice (a producer that retried
//!    after a timeout: at-least-once on the way in too), and creates the consumer group;
//! 2. it starts worker A (this program, as `worker A RUN`), which reads a batch of 6 with
//!    `XREADGROUP`, handles 4 of them and is killed (`SIGKILL`) before it acknowledges any: its 6
//!    entries stay pending, 4 of them with their effect done;
//! 3. it starts worker B, which takes A's pending entries over with `XAUTOCLAIM`, then reads the
//!    rest of the stream, handling and acknowledging everything;
//! 4. it counts the effects (a counter per order, incremented by the handler's body) and the
//!    pending entries, and checks that every order's effect happened exactly once (exit
//!    status 1 if not).
//!
//! The handler is an `#[idempotent]` function keyed by the order: a redelivered entry, or a
//! second entry for the same order, replays the first handling's receipt instead of charging
//! again. The effect here is a Redis counter so that the coordinator can count it across
//! processes; in a service it is the call to the payment provider.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use idem::{RedisStore, idempotent};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// The orders the producer published, in order: 3 and 7 twice.
const PUBLISHED: [u64; 12] = [1, 2, 3, 4, 3, 5, 6, 7, 8, 7, 9, 10];
/// How many entries worker A reads in its batch, and after how many it is killed.
const A_BATCH: usize = 6;
const A_HANDLES: usize = 4;
const GROUP: &str = "billing";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Receipt {
    order: u64,
    charged_by: String,
}

#[derive(Debug)]
enum HandlerError {
    Idem(idem::Error),
    Redis(redis::RedisError),
}

impl From<idem::Error> for HandlerError {
    fn from(e: idem::Error) -> Self {
        HandlerError::Idem(e)
    }
}

impl From<redis::RedisError> for HandlerError {
    fn from(e: redis::RedisError) -> Self {
        HandlerError::Redis(e)
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Idem(e) => write!(f, "{e}"),
            HandlerError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

/// The names of one run's keys, so that runs against one Redis never meet.
struct Names {
    stream: String,
    effects: String,
}

impl Names {
    fn of(run: &str) -> Names {
        Names {
            stream: format!("idem-example:{run}:payments"),
            effects: format!("idem-example:{run}:effects"),
        }
    }
}

/// Charges an order: its body (the effect) runs once per (run, order), however many times the
/// broker delivers it and to whichever consumer.
#[idempotent(
    store = store,
    key = (run, order),
    name = "examples.redis_streams.charge.v1",
    ttl = "24h"
)]
async fn charge(
    store: &RedisStore,
    conn: &ConnectionManager,
    run: &str,
    order: u64,
    worker: &str,
) -> Result<Receipt, HandlerError> {
    // The effect: one increment per charge made.
    let mut conn = conn.clone();
    let _: i64 = conn.hincr(&Names::of(run).effects, order, 1).await?;
    Ok(Receipt {
        order,
        charged_by: worker.to_owned(),
    })
}

fn redis_url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

async fn connect() -> Result<(RedisStore, ConnectionManager), HandlerError> {
    let store = RedisStore::connect(&redis_url()).await?;
    let client = redis::Client::open(redis_url())?;
    let conn = ConnectionManager::new(client).await?;
    Ok((store, conn))
}

/// One stream entry: its id and the order it carries.
type Entry = (String, u64);

/// The entries of an `XREADGROUP` or `XAUTOCLAIM` reply's list of `[id, [field, value, ...]]`.
fn entries(list: &redis::Value) -> Vec<Entry> {
    let redis::Value::Array(items) = list else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let redis::Value::Array(pair) = item else {
                return None;
            };
            let id: String = redis::from_redis_value(pair.first()?.clone()).ok()?;
            let fields: Vec<String> = redis::from_redis_value(pair.get(1)?.clone()).ok()?;
            let order = fields
                .chunks(2)
                .find(|kv| kv[0] == "order")
                .and_then(|kv| kv.get(1)?.parse().ok())?;
            Some((id, order))
        })
        .collect()
}

/// Reads up to `count` new entries for `consumer`.
async fn read_new(
    conn: &mut ConnectionManager,
    stream: &str,
    consumer: &str,
    count: usize,
) -> Result<Vec<Entry>, HandlerError> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    // [[stream, [entries...]]], or nil when there is nothing new.
    let redis::Value::Array(streams) = reply else {
        return Ok(Vec::new());
    };
    Ok(streams
        .iter()
        .filter_map(|s| match s {
            redis::Value::Array(pair) => pair.get(1).map(entries),
            _ => None,
        })
        .flatten()
        .collect())
}

/// Takes over every entry pending for another consumer (whose process died), with `XAUTOCLAIM`.
async fn claim_pending(
    conn: &mut ConnectionManager,
    stream: &str,
    consumer: &str,
) -> Result<Vec<Entry>, HandlerError> {
    let mut claimed = Vec::new();
    let mut cursor = "0-0".to_owned();
    loop {
        let reply: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(0) // min idle time, ms: the owner is known to be dead here
            .arg(&cursor)
            .query_async(conn)
            .await?;
        let redis::Value::Array(parts) = reply else {
            break;
        };
        if let Some(list) = parts.get(1) {
            claimed.extend(entries(list));
        }
        cursor = parts
            .first()
            .and_then(|c| redis::from_redis_value::<String>(c.clone()).ok())
            .unwrap_or_else(|| "0-0".to_owned());
        if cursor == "0-0" {
            break;
        }
    }
    Ok(claimed)
}

async fn worker(name: &str, run: &str) -> Result<(), HandlerError> {
    let (store, mut conn) = connect().await?;
    let names = Names::of(run);
    if name == "A" {
        // Read a batch, handle part of it, then wait to be killed before acknowledging.
        let batch = read_new(&mut conn, &names.stream, name, A_BATCH).await?;
        for (id, order) in batch.iter().take(A_HANDLES) {
            let receipt = charge(&store, &conn, run, *order, name).await?;
            println!(
                "handled entry={id} order={order} worker={name} charged_by={}",
                receipt.charged_by
            );
        }
        println!("crashing with {} entries unacknowledged", batch.len());
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    // Worker B: first what the dead consumer left pending, then everything new.
    let mut batch = claim_pending(&mut conn, &names.stream, name).await?;
    println!("claimed {} pending entries", batch.len());
    loop {
        for (id, order) in &batch {
            let receipt = charge(&store, &conn, run, *order, name).await?;
            let _: i64 = redis::cmd("XACK")
                .arg(&names.stream)
                .arg(GROUP)
                .arg(id)
                .query_async(&mut conn)
                .await?;
            println!(
                "handled entry={id} order={order} worker={name} charged_by={}",
                receipt.charged_by
            );
        }
        batch = read_new(&mut conn, &names.stream, name, 4).await?;
        if batch.is_empty() {
            return Ok(());
        }
    }
}

async fn publish(conn: &mut ConnectionManager, names: &Names) -> Result<(), HandlerError> {
    for order in PUBLISHED {
        let _: String = redis::cmd("XADD")
            .arg(&names.stream)
            .arg("*")
            .arg("order")
            .arg(order)
            .query_async(conn)
            .await?;
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&names.stream)
        .arg(GROUP)
        .arg("0")
        .query_async(conn)
        .await?;
    Ok(())
}

async fn coordinator() -> Result<bool, HandlerError> {
    let Ok(me) = std::env::current_exe() else {
        eprintln!("cannot find this program to start the workers");
        return Ok(false);
    };
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let names = Names::of(&run);
    let (_, mut conn) = connect().await?;
    publish(&mut conn, &names).await?;
    println!(
        "Redis at {}; {} events published for {} orders",
        redis_url(),
        PUBLISHED.len(),
        PUBLISHED
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );

    // Worker A: killed once it says it is about to crash.
    let mut a = match Command::new(&me)
        .args(["worker", "A", &run])
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(a) => a,
        Err(err) => {
            eprintln!("cannot start worker A: {err}");
            return Ok(false);
        }
    };
    let mut crashed = false;
    if let Some(out) = a.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  A: {line}");
            if line.starts_with("crashing") {
                crashed = a.kill().is_ok();
                break;
            }
        }
    }
    let _ = a.wait();
    println!("worker A killed mid-batch: {crashed}");

    // Worker B: takes over and finishes.
    let b = Command::new(&me)
        .args(["worker", "B", &run])
        .stdout(Stdio::piped())
        .output();
    let b = match b {
        Ok(b) => b,
        Err(err) => {
            eprintln!("cannot run worker B: {err}");
            return Ok(false);
        }
    };
    for line in String::from_utf8_lossy(&b.stdout).lines() {
        println!("  B: {line}");
    }

    let effects: BTreeMap<u64, u64> = conn.hgetall(&names.effects).await?;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&names.stream)
        .arg(GROUP)
        .query_async(&mut conn)
        .await?;
    let pending_count = match &pending {
        redis::Value::Array(parts) => parts
            .first()
            .and_then(|c| redis::from_redis_value::<u64>(c.clone()).ok())
            .unwrap_or(u64::MAX),
        _ => u64::MAX,
    };
    let _: () = conn.del(&[&names.stream, &names.effects]).await?;

    let mut ok = crashed && b.status.success() && pending_count == 0;
    for order in PUBLISHED.iter().collect::<std::collections::BTreeSet<_>>() {
        let times = effects.get(order).copied().unwrap_or(0);
        let deliveries = PUBLISHED.iter().filter(|o| *o == order).count();
        println!("order {order}: published {deliveries} time(s), charged {times} time(s)");
        ok &= times == 1;
    }
    println!("entries left pending: {pending_count}");
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [] => coordinator().await,
        [cmd, name, run] if cmd == "worker" => worker(name, run).await.map(|()| true),
        _ => {
            eprintln!("usage: redis_streams [worker NAME RUN]");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Ok(true) => {
            if args.is_empty() {
                println!("every order was charged exactly once");
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("FAILED: an order was not charged exactly once, or a worker failed");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}
