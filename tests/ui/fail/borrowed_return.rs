use idem::idempotent;

#[idempotent]
async fn name_of<'a>(id: u64, names: &'a [String]) -> Result<&'a str, idem::Error> {
    Ok(&names[0])
}

fn main() {}
