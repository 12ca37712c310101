use idem::idempotent;

trait Payments {
    #[idempotent]
    async fn charge(&self, order: u64) -> Result<u64, idem::Error>;
}

fn main() {}
