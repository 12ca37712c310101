//! Any expression is an option's value, commas and all: syn parses each value as a whole.
//! (tests/attribute.rs runs these and checks which calls share a record.)

use idem::idempotent;

fn pair<A: Into<u64>, B: Into<u64>>(a: A, b: B) -> (u64, u64) {
    (a.into(), b.into())
}

fn apply(f: impl Fn(u64) -> u64, x: u64) -> u64 {
    f(x)
}

// A turbofish: a top-level comma inside `key`, followed by more options.
#[idempotent(key = pair::<u64, u64>(a, b), ttl = "1h")]
async fn turbofish(a: u64, b: u64) -> Result<u64, idem::Error> {
    Ok(a + b)
}

// A closure inside a call.
#[idempotent(key = apply(|x| x * 2, id), lease = "10s")]
async fn closure(id: u64) -> Result<u64, idem::Error> {
    Ok(id)
}

// A tuple, an array, an `if`.
#[idempotent(key = (a, b), name = "expressions.tuple")]
async fn tuple(a: u64, b: &str) -> Result<u64, idem::Error> {
    Ok(a)
}

#[idempotent(key = [a, b], on_conflict = reject)]
async fn array(a: u32, b: u32) -> Result<u32, idem::Error> {
    Ok(a + b)
}

#[idempotent(key = if by_email { email } else { user }, fingerprint = (by_email, user))]
async fn branch(by_email: bool, email: &str, user: &str) -> Result<String, idem::Error> {
    Ok(user.to_owned())
}

// A block, a method chain with generics, a struct literal and a match.
#[idempotent(key = { let k = id % 100; k }, ttl = std::time::Duration::from_secs(60 * 60))]
async fn block(id: u64) -> Result<u64, idem::Error> {
    Ok(id)
}

#[idempotent(key = ids.iter().copied().collect::<Vec<u64>>(), wait_timeout = "5s")]
async fn chain(ids: &[u64]) -> Result<usize, idem::Error> {
    Ok(ids.len())
}

#[derive(Clone, Copy)]
struct Range {
    from: u64,
    to: u64,
}

#[idempotent(key = match range { Range { from, to } => (from, to) })]
async fn matched(range: Range) -> Result<u64, idem::Error> {
    Ok(range.to - range.from)
}

// A trailing comma.
#[idempotent(key = id, ttl = "24h",)]
async fn trailing(id: u64) -> Result<u64, idem::Error> {
    Ok(id)
}

fn main() {
    let _ = turbofish(1, 2);
    let _ = closure(1);
    let _ = tuple(1, "x");
    let _ = array(1, 2);
    let _ = branch(true, "a@b", "a");
    let _ = block(1);
    let _ = chain(&[1, 2]);
    let _ = matched(Range { from: 1, to: 2 });
    let _ = trailing(1);
}
