use idem::{idempotent, Error, Outcome};

// `outcome` needs `Result<Outcome<T>, E>`.
#[idempotent(outcome)]
async fn plain(order: u64) -> Result<u64, Error> {
    Ok(order)
}

// It takes no value.
#[idempotent(outcome = true)]
async fn valued(order: u64) -> Result<Outcome<u64>, Error> {
    Ok(order)
}

// Without `outcome`, an `Outcome` would be stored as the value.
#[idempotent(outcome)]
async fn nothing(_order: u64) {}

// The body returns `Result<T, E>`, not the `Outcome`.
#[idempotent(outcome)]
async fn wrapped(order: u64) -> Result<Outcome<u64>, Error> {
    Ok(Outcome { value: order })
}

// `Outcome` in the return type without the option.
#[idempotent]
async fn forgotten(order: u64) -> Result<Outcome<u64>, Error> {
    Ok(order)
}

// A type of one's own named `Outcome`, with its path: stored as any result.
mod mine {
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Outcome<T>(pub T);
}

#[idempotent]
async fn own(order: u64) -> Result<mine::Outcome<u64>, Error> {
    Ok(mine::Outcome(order))
}

fn main() {}
