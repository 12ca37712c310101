//! Through `#[idempotent]`, a replay returns the first call's result exactly, on the in-memory
//! store (where `Clone` results are kept typed) as on Redis and PostgreSQL, and a result that
//! cannot be replayed faithfully is refused when it is stored, the same way on every store.
//! (`idem::conformance::results_replay_faithfully` covers the function API on every store.)

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use idem::store::Token;
use idem::{Error, Store, idempotent};
use serde::{Deserialize, Serialize};

/// Returns `value` the first time its key is seen: a generic function, so one definition covers
/// every type (each instantiation has a namespace of its own).
#[idempotent(key = key, store = store)]
async fn first<T>(store: &dyn Store, runs: &AtomicUsize, key: u64, value: T) -> Result<T, Error>
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// A key no other test or run uses (the servers of a test binary are shared).
fn fresh() -> u64 {
    Token::generate().as_u128() as u64
}

/// `first(value)` then `first(other)` under one key: the second call replays `value`.
async fn replays<T>(store: &dyn Store, value: T, other: T) -> T
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let runs = AtomicUsize::new(0);
    let key = fresh();
    first(store, &runs, key, value).await.unwrap();
    let again = first(store, &runs, key, other).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
    again
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
enum Event {
    Created {
        id: u64,
        note: Option<Option<String>>,
    },
    Cancelled,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
enum Ambiguous {
    F(f64),
    U(u32),
}

/// Values that JSON replays wrong or refuses, each replayed exactly.
async fn typed_replays_are_exact(store: &dyn Store) {
    assert_eq!(
        replays(store, Some(None::<u32>), Some(Some(1))).await,
        Some(None)
    );
    assert_eq!(replays(store, Some(()), None).await, Some(()));
    assert!(replays(store, f64::NAN, 0.0).await.is_nan());
    assert_eq!(
        replays(store, f64::NEG_INFINITY, 0.0).await,
        f64::NEG_INFINITY
    );
    let map = HashMap::from([((1u32, 2u32), 3u64)]);
    assert_eq!(replays(store, map.clone(), HashMap::new()).await, map);
    let tree = BTreeMap::from([((1u8, 2u8), 3u8)]);
    assert_eq!(replays(store, tree.clone(), BTreeMap::new()).await, tree);
    let event = Event::Created {
        id: 7,
        note: Some(None),
    };
    assert_eq!(replays(store, event.clone(), Event::Cancelled).await, event);
    let json = serde_json::json!({"a": null, "b": [1.5, "x"]});
    assert_eq!(replays(store, Some(json.clone()), None).await, Some(json));
}

/// An untagged enum that would replay as another variant gives its first caller the value, and
/// later callers `Error::Codec`; the body does not run again.
async fn unfaithful_results_are_refused(store: &dyn Store) {
    let runs = AtomicUsize::new(0);
    let key = fresh();
    let got = first(store, &runs, key, vec![Ambiguous::U(5)])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Ambiguous::U(5)],
        "the first caller gets its value"
    );
    let again = first(store, &runs, key, vec![Ambiguous::U(6)]).await;
    assert!(matches!(again, Err(Error::Codec(_))), "{again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body did not run again");
}

/// The validated-newtype pattern, which JSON round-trips: `Serialize` derives a newtype struct,
/// `Deserialize` reads the inner type and validates it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "String")]
struct Email(String);

impl TryFrom<String> for Email {
    type Error = String;
    fn try_from(s: String) -> Result<Email, String> {
        if s.contains('@') {
            Ok(Email(s))
        } else {
            Err(format!("{s:?} is not an email address"))
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "i64")]
struct Even(i64);

impl TryFrom<i64> for Even {
    type Error = String;
    fn try_from(v: i64) -> Result<Even, String> {
        if v % 2 == 0 {
            Ok(Even(v))
        } else {
            Err(format!("{v} is odd"))
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Subscription {
    email: Email,
    every_days: Even,
}

/// A concrete result type, so that the attribute finds its `PartialEq` (as `first<T>` cannot).
#[idempotent(key = key, store = store)]
async fn subscribe(
    store: &dyn Store,
    runs: &AtomicUsize,
    key: u64,
    email: &str,
) -> Result<Subscription, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Subscription {
        email: Email(email.to_owned()),
        every_days: Even(14),
    })
}

/// Validated newtypes are stored and replayed exactly (they were refused on every path).
async fn validated_newtypes_replay(store: &dyn Store) {
    let email = Email("a@b.c".to_owned());
    assert_eq!(
        replays(store, email.clone(), Email("x@y.z".to_owned())).await,
        email
    );
    assert_eq!(replays(store, Even(-4), Even(6)).await, Even(-4));
    assert_eq!(
        replays(store, vec![Some(Even(2)), None], vec![]).await,
        vec![Some(Even(2)), None]
    );
    let runs = AtomicUsize::new(0);
    let key = fresh();
    let first = subscribe(store, &runs, key, "first@x.y").await.unwrap();
    let again = subscribe(store, &runs, key, "second@x.y").await.unwrap();
    assert_eq!(again, first);
    assert_eq!(again.email, Email("first@x.y".to_owned()));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body ran once");
}

mod memory {
    use idem::MemoryStore;

    #[tokio::test]
    async fn validated_newtypes_replay() {
        super::validated_newtypes_replay(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn typed_replays_are_exact() {
        super::typed_replays_are_exact(&MemoryStore::new()).await;
    }

    /// The in-memory store refuses what a remote store would.
    #[tokio::test]
    async fn unfaithful_results_are_refused() {
        super::unfaithful_results_are_refused(&MemoryStore::new()).await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::support::redis::RedisServer;

    pub(super) async fn store() -> idem::RedisStore {
        let url = RedisServer::shared().url();
        idem::RedisStore::builder()
            .prefix(format!("idem-test:results:{}:", super::fresh()))
            .connect(&url)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
    }

    #[tokio::test]
    async fn typed_replays_are_exact() {
        super::typed_replays_are_exact(&store().await).await;
    }

    #[tokio::test]
    async fn unfaithful_results_are_refused() {
        super::unfaithful_results_are_refused(&store().await).await;
    }

    #[tokio::test]
    async fn validated_newtypes_replay() {
        super::validated_newtypes_replay(&store().await).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::support::postgres::PgServer;

    pub(super) async fn store() -> idem::PostgresStore {
        let store = idem::PostgresStore::connect(&PgServer::shared().url())
            .await
            .expect("store from URL");
        store.migrate().await.expect("migrate");
        store
    }

    #[tokio::test]
    async fn typed_replays_are_exact() {
        super::typed_replays_are_exact(&store().await).await;
    }

    #[tokio::test]
    async fn unfaithful_results_are_refused() {
        super::unfaithful_results_are_refused(&store().await).await;
    }

    #[tokio::test]
    async fn validated_newtypes_replay() {
        super::validated_newtypes_replay(&store().await).await;
    }
}

/// A `Serialize` that loses data before it reaches the format (a skipped field): the encodings
/// of the value and of its replay agree, but the replay is not `==` to it. With `PartialEq` the
/// attribute catches it when the result is stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Session {
    user: u64,
    #[serde(skip)]
    secret: String,
}

#[idempotent(key = key, store = store)]
async fn login(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Session, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Session {
        user: key,
        secret: "s3cr3t".to_owned(),
    })
}

async fn lossy_serialize_is_refused(store: &dyn Store) {
    let runs = AtomicUsize::new(0);
    let key = fresh();
    let first = login(store, &runs, key).await.unwrap();
    assert_eq!(first.secret, "s3cr3t", "the first caller gets its value");
    let again = login(store, &runs, key).await;
    assert!(
        matches!(&again, Err(Error::Codec(e)) if e.to_string().contains("not `==`")),
        "{again:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body did not run again");
}

/// A result whose `Serialize` panics after the body returned `Ok`: the panic reaches the
/// caller, and the claim is not released (a retry would run the body again): later calls get
/// `Error::Codec`.
#[derive(Clone, Debug)]
struct Exploding;

impl Serialize for Exploding {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("Serialize panicked");
    }
}

impl<'de> Deserialize<'de> for Exploding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| Exploding)
    }
}

#[idempotent(key = key, store = store)]
async fn explode(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Exploding, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(Exploding)
}

async fn a_panicking_serialize_never_runs_the_body_again(store: &(dyn Store + Sync)) {
    let runs = AtomicUsize::new(0);
    let key = fresh();
    let first = std::panic::AssertUnwindSafe(explode(store, &runs, key));
    let caught = futures_catch_unwind(first).await;
    assert!(caught.is_err(), "the panic reaches the caller");
    // Remote stores complete in the background: give them a moment.
    for _ in 0..50 {
        match explode(store, &runs, key).await {
            Err(Error::Codec(e)) => {
                assert!(e.to_string().contains("panicked"), "{e}");
                break;
            }
            Err(Error::InProgress { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => panic!("expected Error::Codec, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body did not run again");
}

/// Polls `fut` to completion, catching a panic from one of its polls.
async fn futures_catch_unwind<F: std::future::Future>(
    fut: std::panic::AssertUnwindSafe<F>,
) -> std::thread::Result<F::Output> {
    let mut fut = std::pin::pin!(fut.0);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// Review 2, finding 1: a `Deserialize` that loses or changes data, with an `==` loose enough
/// not to see it (an entity compared by id, a case-insensitive address, `-0.0 == 0.0`). The
/// type's `==` adds to the comparison of the encodings; it does not replace it.
mod loose_eq {
    use super::*;

    #[derive(Serialize, Deserialize, Clone, Debug)]
    pub struct Order {
        pub id: u64,
        #[serde(skip_deserializing)]
        pub note: String,
    }

    impl PartialEq for Order {
        fn eq(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }

    #[derive(Serialize, Deserialize, Clone, Debug)]
    pub struct Address(#[serde(deserialize_with = "lowercase")] pub String);

    fn lowercase<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        String::deserialize(d).map(|s| s.to_lowercase())
    }

    impl PartialEq for Address {
        fn eq(&self, other: &Self) -> bool {
            self.0.eq_ignore_ascii_case(&other.0)
        }
    }

    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub struct Temp {
        #[serde(deserialize_with = "plus_zero")]
        pub c: f64,
    }

    fn plus_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        f64::deserialize(d).map(|c| c + 0.0)
    }

    #[idempotent(key = key, store = store)]
    async fn order(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Order, Error> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Order {
            id: key,
            note: "gift wrap".to_owned(),
        })
    }

    #[idempotent(key = key, store = store)]
    async fn address(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Address, Error> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Address("Bob@Example.COM".to_owned()))
    }

    #[idempotent(key = key, store = store)]
    async fn temp(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Temp, Error> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Temp { c: -0.0 })
    }

    fn refused<T: std::fmt::Debug>(again: &Result<T, Error>) {
        assert!(matches!(again, Err(Error::Codec(_))), "{again:?}");
    }

    pub async fn are_refused(store: &dyn Store) {
        let runs = AtomicUsize::new(0);
        let key = fresh();
        assert_eq!(order(store, &runs, key).await.unwrap().note, "gift wrap");
        refused(&order(store, &runs, key).await);
        let key = fresh();
        assert_eq!(
            address(store, &runs, key).await.unwrap().0,
            "Bob@Example.COM"
        );
        refused(&address(store, &runs, key).await);
        let key = fresh();
        assert!(temp(store, &runs, key).await.unwrap().c.is_sign_negative());
        refused(&temp(store, &runs, key).await);
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no body ran again");
    }

    #[tokio::test]
    async fn in_memory() {
        are_refused(&idem::MemoryStore::new()).await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn on_redis() {
        are_refused(&super::redis::store().await).await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn on_postgres() {
        are_refused(&super::postgres::store().await).await;
    }
}

/// Review 2, findings 2 and 3: in-memory replays were clones of a kept value, so a lossy
/// `Clone` changed them, and replays shared the kept value's `Arc`s (a replay's change showed in
/// the next). Every replay is now decoded from the record, as on Redis and PostgreSQL.
mod replays_are_their_own_values {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    pub struct Cached {
        pub id: u64,
        pub cache: Option<u64>,
    }

    /// A `Clone` that drops the cache, as some caches' do.
    impl Clone for Cached {
        fn clone(&self) -> Self {
            Cached {
                id: self.id,
                cache: None,
            }
        }
    }

    /// A list behind a shared lock: its `Clone` shares the list.
    #[derive(Clone, Debug)]
    pub struct Shared(pub Arc<Mutex<Vec<u8>>>);

    impl Serialize for Shared {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let list = self.0.lock().map(|l| l.clone()).unwrap_or_default();
            list.serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for Shared {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Vec::<u8>::deserialize(d).map(|list| Shared(Arc::new(Mutex::new(list))))
        }
    }

    #[idempotent(key = key, store = store)]
    async fn cached(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Cached, Error> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Cached {
            id: key,
            cache: Some(9),
        })
    }

    #[idempotent(key = key, store = store)]
    async fn shared(store: &dyn Store, runs: &AtomicUsize, key: u64) -> Result<Shared, Error> {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok(Shared(Arc::new(Mutex::new(vec![1]))))
    }

    async fn check(store: &dyn Store) {
        let runs = AtomicUsize::new(0);
        let key = fresh();
        cached(store, &runs, key).await.unwrap();
        let replay = cached(store, &runs, key).await.unwrap();
        assert_eq!(replay.cache, Some(9), "a replay is not a clone");

        let key = fresh();
        shared(store, &runs, key).await.unwrap();
        let one = shared(store, &runs, key).await.unwrap();
        one.0.lock().unwrap().push(66);
        let two = shared(store, &runs, key).await.unwrap();
        assert_eq!(*two.0.lock().unwrap(), vec![1], "replays share nothing");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn in_memory() {
        check(&idem::MemoryStore::new()).await;
        // The process-wide default store, through the attribute without `store = ...`.
        check(idem::MemoryStore::global()).await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn on_redis() {
        check(&super::redis::store().await).await;
    }
}

mod refusals {
    use idem::MemoryStore;

    #[tokio::test]
    async fn lossy_serialize_is_refused_in_memory() {
        super::lossy_serialize_is_refused(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn a_panicking_serialize_never_runs_the_body_again_in_memory() {
        super::a_panicking_serialize_never_runs_the_body_again(&MemoryStore::new()).await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn lossy_serialize_is_refused_on_redis() {
        super::lossy_serialize_is_refused(&super::redis::store().await).await;
    }

    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn a_panicking_serialize_never_runs_the_body_again_on_redis() {
        super::a_panicking_serialize_never_runs_the_body_again(&super::redis::store().await).await;
    }

    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_panicking_serialize_never_runs_the_body_again_on_postgres() {
        super::a_panicking_serialize_never_runs_the_body_again(&super::postgres::store().await)
            .await;
    }
}
