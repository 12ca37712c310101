use idem::idempotent;

#[idempotent]
fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
