use idem::idempotent;

#[idempotent]
async fn convert(order: u64, rate: f64) -> Result<u64, idem::Error> {
    Ok((order as f64 * rate) as u64)
}

fn main() {}
