//! The expansion's locals are its own: arguments and bindings named like them are the user's,
//! in the body and in the options, and nothing of the expansion is visible to user code.

use idem::{MemoryStore, idempotent};

// Default key: both arguments, read by the body as the `u64`s they are.
#[idempotent]
async fn sum(__idem_key: u64, __idem_store: u64) -> Result<u64, idem::Error> {
    Ok(__idem_key + __idem_store)
}

// The options name arguments called like the expansion's locals.
#[idempotent(
    key = __idem_name,
    store = __idem_store_owner,
    fingerprint = __idem_fingerprint,
    name = "hygiene.options",
)]
async fn options(
    __idem_name: u64,
    __idem_store_owner: &MemoryStore,
    __idem_fingerprint: u64,
    __idem_policy: String,
    __idem_body: Vec<u8>,
) -> Result<usize, idem::Error> {
    let __idem_out = __idem_policy.len() + __idem_body.len();
    Ok(__idem_out)
}

fn main() {
    let _ = sum(1, 2);
    let store = MemoryStore::new();
    let _ = options(1, &store, 2, String::new(), Vec::new());
}
