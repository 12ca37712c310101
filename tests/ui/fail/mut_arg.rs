use idem::idempotent;

#[idempotent(key = order)]
async fn charge(order: u64, balance: &mut u64) -> Result<u64, idem::Error> {
    *balance -= 100;
    Ok(*balance)
}

struct Account;

impl Account {
    #[idempotent(key = order)]
    async fn charge(&mut self, order: u64) -> Result<u64, idem::Error> {
        Ok(order)
    }
}

fn main() {}
