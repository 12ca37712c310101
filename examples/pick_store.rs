//! The store is a start-up decision, not a code change: this program reads `IDEM_STORE` and runs
//! the same annotated handlers on the store it names.
//!
//! - `IDEM_STORE=memory` (or unset): the embedded in-memory store;
//! - `IDEM_STORE=redis://127.0.0.1:6379/`: Redis (feature `redis`);
//! - `IDEM_STORE=postgres://user@host/db`: PostgreSQL (feature `postgres`).
//!
//! Run it with `cargo run --example pick_store --features redis,postgres`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use idem::{MemoryStore, Store, idempotent};

/// The handlers hold whichever store was picked.
struct Payments {
    store: Arc<dyn Store>,
    /// This run's id, so records of earlier runs (a remote store keeps them) are not replayed.
    run: String,
    provider_calls: AtomicU32,
}

impl Payments {
    #[idempotent(store = self.store, key = (&self.run, order_id), name = "pick_store.charge.v1")]
    async fn charge(&self, order_id: u64, cents: u64) -> Result<String, idem::Error> {
        let n = self.provider_calls.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(format!("charge #{n}: {cents} cents for order {order_id}"))
    }
}

async fn open(spec: &str) -> Result<(&'static str, Arc<dyn Store>), String> {
    if spec.is_empty() || spec == "memory" {
        return Ok(("memory", Arc::new(MemoryStore::new())));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        return idem::RedisStore::connect(spec)
            .await
            .map(|s| ("redis", Arc::new(s) as Arc<dyn Store>))
            .map_err(|e| format!("cannot open the Redis store: {e}"));
        #[cfg(not(feature = "redis"))]
        return Err("this build has no Redis store: build with `--features redis`".into());
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        return open_postgres(spec).await;
        #[cfg(not(feature = "postgres"))]
        return Err("this build has no PostgreSQL store: build with `--features postgres`".into());
    }
    Err(format!(
        "IDEM_STORE={spec:?} names no store: use `memory`, a `redis://` URL or a `postgres://` URL"
    ))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<(&'static str, Arc<dyn Store>), String> {
    let store = idem::PostgresStore::connect(url)
        .await
        .map_err(|e| format!("cannot open the PostgreSQL store: {e}"))?;
    store
        .migrate()
        .await
        .map_err(|e| format!("cannot create the PostgreSQL table: {e}"))?;
    Ok(("postgres", Arc::new(store)))
}

#[tokio::main]
async fn main() {
    let spec = std::env::var("IDEM_STORE").unwrap_or_default();
    let (kind, store) = match open(&spec).await {
        Ok(opened) => opened,
        Err(message) => {
            eprintln!("pick_store: {message}");
            std::process::exit(2);
        }
    };
    let payments = Payments {
        store,
        run: idem::store::Token::generate().as_u128().to_string(),
        provider_calls: AtomicU32::new(0),
    };
    println!("store: {kind}");
    for order in [1, 2, 3] {
        for attempt in 1..=2 {
            match payments.charge(order, 1_000 * order).await {
                Ok(receipt) => println!("order {order}, attempt {attempt}: {receipt}"),
                Err(e) => {
                    eprintln!("pick_store: order {order}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let calls = payments.provider_calls.load(Ordering::SeqCst);
    println!("6 calls, {calls} charges on the {kind} store");
    if calls != 3 {
        eprintln!("pick_store: expected 3 charges");
        std::process::exit(1);
    }
}
