use idem::idempotent;

#[idempotent(key = order_id)]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
