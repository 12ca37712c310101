use idem::idempotent;

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a, b)
}

// A value that does not parse is reported, and the options after it are still checked.
#[idempotent(key = pair::<u64, u64>(a b), ttl = "soon", colour = blue)]
async fn charge(a: u64, b: u64) -> Result<u64, idem::Error> {
    Ok(a + b)
}

// Two values where one is expected.
#[idempotent(key = a b, lease = "1s")]
async fn refund(a: u64, b: u64) -> Result<u64, idem::Error> {
    Ok(a + b)
}

// A second key value after a comma is read as an option.
#[idempotent(key = a, b)]
async fn notify(a: u64, b: u64) -> Result<u64, idem::Error> {
    Ok(a + b)
}

fn main() {}
