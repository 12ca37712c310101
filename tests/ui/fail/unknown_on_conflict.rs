use idem::idempotent;

#[idempotent(on_conflict = retry)]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
