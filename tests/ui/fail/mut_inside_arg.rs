use std::pin::Pin;

use idem::idempotent;

// A `&mut` held inside another type is still a borrow the body could change.
#[idempotent(key = order)]
async fn optional(order: u64, log: Option<&mut Vec<u64>>) -> Result<u64, idem::Error> {
    Ok(order)
}

#[idempotent(key = order)]
async fn tuple(order: u64, pair: (u8, &mut u8)) -> Result<u64, idem::Error> {
    Ok(order)
}

#[idempotent(key = order)]
async fn array(order: u64, slots: [&mut u8; 2]) -> Result<u64, idem::Error> {
    Ok(order)
}

#[idempotent(key = order)]
async fn boxed<T: Send>(order: u64, target: Box<&mut T>) -> Result<u64, idem::Error> {
    Ok(order)
}

struct Account;

impl Account {
    #[idempotent(key = order)]
    async fn pinned(self: Pin<&mut Self>, order: u64) -> Result<u64, idem::Error> {
        Ok(order)
    }
}

fn main() {}
