//! The supported forms of `#[idempotent]` compile.
#![allow(unused_variables)]

use std::sync::Arc;
use std::time::Duration;

use idem::{MemoryStore, Store, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Receipt {
    order: u64,
}

#[derive(Debug)]
enum PaymentError {
    Idem(idem::Error),
}

impl From<idem::Error> for PaymentError {
    fn from(e: idem::Error) -> Self {
        PaymentError::Idem(e)
    }
}

struct Order {
    id: u64,
    cents: u64,
}

// Default key: every argument.
#[idempotent]
async fn by_all_arguments(a: u64, b: &str) -> Result<u64, idem::Error> {
    Ok(a + b.len() as u64)
}

// Every option at once.
#[idempotent(
    key = order.id,
    ttl = "24h",
    lease = "30s",
    wait_timeout = "1m",
    name = "payments.charge.v1",
    fingerprint = order.cents,
    on_conflict = reject,
    store = MemoryStore::global(),
)]
pub async fn charge(order: &Order) -> Result<Receipt, PaymentError> {
    Ok(Receipt { order: order.id })
}

// Skipped arguments, Duration expressions, an error alias.
type AppResult<T> = Result<T, PaymentError>;

#[idempotent(skip(_log), ttl = Duration::from_secs(60), lease = Duration::from_millis(500))]
async fn with_skip(order: u64, _log: Vec<f64>) -> AppResult<u64> {
    Ok(order)
}

// Methods with the store in `self`, as `Arc<dyn Store>`, `Arc<S>` or `S`.
struct Service {
    dynamic: Arc<dyn Store>,
    shared: Arc<MemoryStore>,
    owned: MemoryStore,
}

impl Service {
    #[idempotent(store = self.dynamic, key = id)]
    async fn dynamic(&self, id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }

    #[idempotent(store = self.shared, key = id, on_conflict = wait)]
    async fn shared(&self, id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }

    #[idempotent(store = &self.owned)]
    async fn owned(&self, id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }

    #[idempotent(store = Arc::clone(&self.shared), key = id)]
    async fn by_arc(self: Arc<Self>, id: u64) -> Result<u64, idem::Error> {
        Ok(id)
    }
}

// Generic functions: each instantiation has its own namespace.
#[idempotent]
async fn generic<T: Serialize + idem::KeyPart + Send + Sync>(item: T) -> Result<String, idem::Error> {
    Ok(String::new())
}

// Early returns and `?` in the body.
#[idempotent]
async fn early(n: u64) -> Result<u64, PaymentError> {
    if n == 0 {
        return Ok(0);
    }
    let parsed: u64 = "5".parse().map_err(|_| idem::Error::KeyReused)?;
    Ok(parsed)
}

// The futures stay `Send`, so they can be spawned.
fn assert_send<F: std::future::Future + Send>(_: F) {}

fn main() {
    assert_send(by_all_arguments(1, "x"));
    assert_send(charge(&Order { id: 1, cents: 2 }));
    assert_send(with_skip(1, vec![]));
    assert_send(generic::<u64>(1));
    assert_send(early(1));
    let svc = Service { dynamic: Arc::new(MemoryStore::new()), shared: Arc::new(MemoryStore::new()), owned: MemoryStore::new() };
    assert_send(svc.dynamic(1));
    assert_send(svc.shared(1));
    assert_send(svc.owned(1));
}
