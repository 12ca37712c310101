//! The stored type must be nameable: a replay decodes the record into it, and the expansion
//! names the `Ok` and error types.

use idem::idempotent;
use serde::Serialize;
use serde::de::DeserializeOwned;

#[idempotent(key = id)]
async fn receipt(id: u64) -> Result<impl Serialize + DeserializeOwned + Send + 'static, idem::Error> {
    Ok(id)
}

#[idempotent(key = id)]
async fn receipts(id: u64) -> Result<Vec<impl Serialize + DeserializeOwned + Send>, idem::Error> {
    Ok(vec![id])
}

#[idempotent(key = id)]
async fn any_error(id: u64) -> Result<u64, impl From<idem::Error>> {
    Ok::<u64, idem::Error>(id)
}

fn main() {}
