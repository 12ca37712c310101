use idem::idempotent;

#[idempotent]
async fn charge(order: u64) -> u64 {
    order
}

#[idempotent]
async fn notify(order: u64) {}

fn main() {}
