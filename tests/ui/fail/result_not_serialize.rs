use idem::idempotent;

#[derive(serde::Deserialize)]
struct Receipt {
    order: u64,
}

#[idempotent]
async fn charge(order: u64) -> Result<Receipt, idem::Error> {
    Ok(Receipt { order })
}

fn main() {}
