use idem::idempotent;

#[idempotent(store = "redis://localhost")]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
