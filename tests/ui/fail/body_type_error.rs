//! A type error in the body is reported at the expression, as it would be without the attribute,
//! not at the attribute or the return type.

use idem::idempotent;

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, idem::Error> {
    Ok("not a number")
}

#[idempotent(key = id)]
async fn refund(id: u64) -> Result<u64, idem::Error> {
    if id == 0 {
        return Ok("nothing to refund");
    }
    Ok(id)
}

fn main() {}
