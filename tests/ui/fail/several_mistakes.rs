use idem::idempotent;

// Every mistake is reported in one compile, and callers of the function still type-check.
#[idempotent(ttl = "soon", on_conflict = maybe, colour = blue)]
async fn charge(order: u64) -> Result<u64, idem::Error> {
    Ok(order)
}

async fn caller() -> Result<u64, idem::Error> {
    charge(7).await
}

fn main() {}
