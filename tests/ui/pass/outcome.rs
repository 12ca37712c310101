//! `outcome` with `Result`, an alias of it and a path to `Outcome`.
use idem::{Error, Outcome, Status, idempotent};

type Res<T> = Result<T, Error>;

#[idempotent(key = id, outcome)]
async fn plain(id: u64) -> Result<Outcome<u64>, Error> {
    if id == 0 {
        return Ok(1);
    }
    Ok(id)
}

#[idempotent(key = id, outcome, name = "ui.outcome.alias")]
async fn alias(id: u64) -> Res<idem::Outcome<Vec<String>>> {
    let parsed: u64 = "5".parse().map_err(|_| Error::store("parse"))?;
    Ok(vec![(id + parsed).to_string()])
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let first = plain(4).await.unwrap();
        assert_eq!((first.value, first.status), (4, Status::Executed));
        assert_eq!(plain(4).await.unwrap().status, Status::Replayed);
        assert_eq!(alias(1).await.unwrap().value, vec!["6".to_owned()]);
    });
}
