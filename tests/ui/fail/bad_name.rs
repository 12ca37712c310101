use idem::idempotent;

const NAME: &str = "payments.charge.v1";

#[idempotent(name = "  ")]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

#[idempotent(name = NAME)]
async fn refund(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
