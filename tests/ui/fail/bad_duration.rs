use idem::idempotent;

#[idempotent(ttl = "5 parsecs")]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

#[idempotent(lease = "30")]
async fn refund(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
