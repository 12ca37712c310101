use idem::idempotent;

#[idempotent(ttl = "1h", key = order, ttl = "2h")]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
