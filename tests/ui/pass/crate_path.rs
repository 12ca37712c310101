//! `crate = path` lets a crate that re-exports idem under another name use the attribute.

mod facade {
    pub use ::idem as inner;
}

use idem::idempotent;

#[idempotent(crate = crate::facade::inner)]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {
    let _ = charge(1);
}
