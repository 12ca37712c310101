use idem::idempotent;

#[derive(Debug)]
enum PaymentError {
    Declined,
}

#[idempotent]
async fn charge(order: u64) -> Result<u64, PaymentError> {
    if order == 0 {
        return Err(PaymentError::Declined);
    }
    Ok(order)
}

fn main() {}
