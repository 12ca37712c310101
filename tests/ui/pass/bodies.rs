//! Bodies keep the meaning they have without the attribute: `return` and `?` convert into the
//! declared return type, an alias of `Result` included, and a body that never returns adds no
//! `unreachable_code` warning of the attribute's own.
#![deny(unreachable_code)]

use idem::idempotent;

#[derive(Debug)]
enum AppError {
    Parse(std::num::ParseIntError),
    Idem(idem::Error),
}

impl From<std::num::ParseIntError> for AppError {
    fn from(e: std::num::ParseIntError) -> Self {
        AppError::Parse(e)
    }
}

impl From<idem::Error> for AppError {
    fn from(e: idem::Error) -> Self {
        AppError::Idem(e)
    }
}

type AppResult<T> = Result<T, AppError>;

// `?` converts the error with `From`, as in any function returning `Result`.
#[idempotent(key = text)]
async fn parse(text: &str) -> AppResult<u64> {
    if text.is_empty() {
        return Ok(0);
    }
    let n: u64 = text.parse()?;
    Ok(n)
}

// A `return` in a loop, and an `Err` return.
#[idempotent(key = ids)]
async fn first_even(ids: Vec<u64>) -> Result<u64, AppError> {
    for id in ids {
        if id % 2 == 0 {
            return Ok(id);
        }
    }
    Err(AppError::Idem(idem::Error::KeyReused))
}

// A body that does not return.
#[idempotent(key = id)]
async fn unfinished(id: u64) -> Result<u64, idem::Error> {
    todo!()
}

#[idempotent(key = id)]
async fn forever(id: u64) -> Result<u64, idem::Error> {
    loop {
        tokio::task::yield_now().await;
    }
}

fn main() {
    let _ = parse("5");
    let _ = first_even(vec![1, 2]);
    let _ = unfinished(1);
    let _ = forever(1);
}
