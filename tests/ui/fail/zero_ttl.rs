use idem::idempotent;

#[idempotent(ttl = "0s")]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
