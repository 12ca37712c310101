//! Through `#[idempotent]`, a replay returns the first call's result exactly, on the in-memory
//! store (where `Clone` results are kept typed) as on the others, and a result that cannot be
//! replayed faithfully is refused when it is stored, the same way on every store.
//! (`idem::conformance::results_replay_faithfully` covers the function API on every store.)

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use idem::{Error, MemoryStore, idempotent};
use serde::{Deserialize, Serialize};

/// Returns `value` the first time its key is seen: a generic function, so one definition covers
/// every type (each instantiation has a namespace of its own).
#[idempotent(key = key, store = store)]
async fn first<T>(store: &MemoryStore, runs: &AtomicUsize, key: u64, value: T) -> Result<T, Error>
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(value)
}

/// `first(value)` then `first(other)` under one key: the second call replays `value`.
async fn replays<T>(store: &MemoryStore, key: u64, value: T, other: T) -> T
where
    T: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let runs = AtomicUsize::new(0);
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

#[tokio::test]
async fn typed_replays_are_exact() {
    let store = MemoryStore::new();
    assert_eq!(
        replays(&store, 1, Some(None::<u32>), Some(Some(1))).await,
        Some(None)
    );
    assert_eq!(replays(&store, 2, Some(()), None).await, Some(()));
    assert!(replays(&store, 3, f64::NAN, 0.0).await.is_nan());
    assert_eq!(
        replays(&store, 4, f64::NEG_INFINITY, 0.0).await,
        f64::NEG_INFINITY
    );
    let map = HashMap::from([((1u32, 2u32), 3u64)]);
    assert_eq!(replays(&store, 5, map.clone(), HashMap::new()).await, map);
    let tree = BTreeMap::from([((1u8, 2u8), 3u8)]);
    assert_eq!(
        replays(&store, 6, tree.clone(), BTreeMap::new()).await,
        tree
    );
    let event = Event::Created {
        id: 7,
        note: Some(None),
    };
    assert_eq!(
        replays(&store, 7, event.clone(), Event::Cancelled).await,
        event
    );
    let json = serde_json::json!({"a": null, "b": [1.5, "x"]});
    assert_eq!(
        replays(&store, 8, Some(json.clone()), None).await,
        Some(json)
    );
}

/// The in-memory store refuses what a remote store would: an untagged enum that would replay
/// as another variant gives its first caller the value, and later callers `Error::Codec`.
#[tokio::test]
async fn unfaithful_results_are_refused_on_the_in_memory_store_too() {
    let store = MemoryStore::new();
    let runs = AtomicUsize::new(0);
    let got = first(&store, &runs, 1, vec![Ambiguous::U(5)])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Ambiguous::U(5)],
        "the first caller gets its value"
    );
    let again = first(&store, &runs, 1, vec![Ambiguous::U(6)]).await;
    assert!(matches!(again, Err(Error::Codec(_))), "{again:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the body did not run again");
}
