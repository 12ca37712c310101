//! A `'static` reference is borrowed data too: a replay decodes a new value, which no
//! `&'static` can point to.

use idem::idempotent;

#[idempotent(key = id)]
async fn status(id: u64) -> Result<&'static str, idem::Error> {
    Ok("paid")
}

#[idempotent(key = id)]
async fn tags(id: u64) -> Result<Vec<&'static str>, idem::Error> {
    Ok(vec!["paid"])
}

fn main() {}
