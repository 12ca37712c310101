use idem::idempotent;

#[idempotent(key = order, retries = 3)]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
