use idem::idempotent;

#[idempotent(skip(conn))]
async fn charge(order: u64, connection: String) -> Result<u64, idem::Error> {
    Ok(order)
}

fn main() {}
