//! The attribute's forms as a user writes them, run: any expression as `key = ...` (commas,
//! closures, tuples, arrays, branches), signatures with `where` clauses, lifetimes and inner
//! attributes, and `name = ...` as the exact namespace of the keys, computable with `Key::new`.
//! (tests/ui/pass/ checks that the forms compile; this checks what they do.)

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idem::store::Claim;
use idem::{Error, Idempotent, Key, MemoryStore, Status, Store, idempotent};
use support::LogCapture;

// ---------------------------------------------------------------------------------------------
// Any expression is a key.

fn pair<A: Into<u64>, B: Into<u64>>(a: A, b: B) -> (u64, u64) {
    (a.into(), b.into())
}

static TURBOFISH_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = pair::<u64, u64>(a, b), ttl = "1h")]
async fn turbofish(a: u64, b: u64) -> Result<usize, Error> {
    Ok(TURBOFISH_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn a_turbofish_with_a_comma_is_one_key_and_the_options_after_it_apply() {
    let first = turbofish(1, 2).await.unwrap();
    assert_eq!(turbofish(1, 2).await.unwrap(), first, "replayed");
    assert_ne!(
        turbofish(2, 1).await.unwrap(),
        first,
        "(2, 1) is another key"
    );
    assert_eq!(TURBOFISH_RUNS.load(Ordering::SeqCst), 2);
}

fn apply(f: impl Fn(u64) -> u64, x: u64) -> u64 {
    f(x)
}

static CLOSURE_RUNS: AtomicUsize = AtomicUsize::new(0);

// Orders 3 and 13 share a key: the closure inside the call is what makes the key.
#[idempotent(key = apply(|x| x % 10, id), lease = "10s")]
async fn closure(id: u64) -> Result<u64, Error> {
    CLOSURE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(id)
}

#[tokio::test]
async fn a_closure_inside_a_call_makes_the_key() {
    assert_eq!(closure(3).await.unwrap(), 3);
    assert_eq!(
        closure(13).await.unwrap(),
        3,
        "13 % 10 is 3's key: replayed"
    );
    assert_eq!(closure(4).await.unwrap(), 4);
    assert_eq!(CLOSURE_RUNS.load(Ordering::SeqCst), 2);
}

static TUPLE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = (a, b))]
async fn tuple(a: u64, b: &str, _note: &str) -> Result<usize, Error> {
    Ok(TUPLE_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

static ARRAY_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = [a, b], on_conflict = reject)]
async fn array(a: u32, b: u32) -> Result<usize, Error> {
    Ok(ARRAY_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
}

#[tokio::test]
async fn tuples_and_arrays_are_keys() {
    let first = tuple(1, "x", "first").await.unwrap();
    assert_eq!(tuple(1, "x", "second").await.unwrap(), first);
    assert_ne!(tuple(1, "y", "first").await.unwrap(), first);
    assert_eq!(TUPLE_RUNS.load(Ordering::SeqCst), 2);

    let first = array(1, 2).await.unwrap();
    assert_eq!(array(1, 2).await.unwrap(), first);
    assert_ne!(array(2, 1).await.unwrap(), first);
    assert_eq!(ARRAY_RUNS.load(Ordering::SeqCst), 2);
}

#[idempotent(key = if by_email { email } else { user })]
async fn branch(by_email: bool, email: &str, user: &str) -> Result<String, Error> {
    Ok(user.to_owned())
}

#[tokio::test]
async fn an_if_expression_is_a_key() {
    assert_eq!(branch(true, "a@example.com", "ann").await.unwrap(), "ann");
    assert_eq!(
        branch(true, "a@example.com", "bob").await.unwrap(),
        "ann",
        "same email: replayed"
    );
    assert_eq!(
        branch(false, "a@example.com", "bob").await.unwrap(),
        "bob",
        "keyed by user"
    );
}

// ---------------------------------------------------------------------------------------------
// Signatures.

static WHERE_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = id)]
async fn where_clause<T>(id: u64, tag: T) -> Result<String, Error>
where
    T: std::fmt::Display + Send,
{
    WHERE_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{id}:{tag}"))
}

#[tokio::test]
async fn a_where_clause_is_kept() {
    assert_eq!(where_clause(1, "a").await.unwrap(), "1:a");
    assert_eq!(where_clause(1, "b").await.unwrap(), "1:a", "replayed");
    assert_eq!(WHERE_RUNS.load(Ordering::SeqCst), 1);
}

static LIFETIME_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent]
async fn lifetime<'a>(name: &'a str, id: u64) -> Result<String, Error> {
    LIFETIME_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(format!("{name}{id}"))
}

#[tokio::test]
async fn lifetime_generic_arguments_share_one_namespace() {
    let owned = String::from("ann");
    assert_eq!(lifetime(&owned, 1).await.unwrap(), "ann1");
    {
        let shorter = String::from("ann");
        assert_eq!(lifetime(&shorter, 1).await.unwrap(), "ann1");
    }
    assert_eq!(lifetime("ann", 1).await.unwrap(), "ann1");
    assert_eq!(
        LIFETIME_RUNS.load(Ordering::SeqCst),
        1,
        "lifetimes are not part of a function's identity"
    );
}

static INNER_RUNS: AtomicUsize = AtomicUsize::new(0);

#[idempotent(key = id)]
async fn inner_attribute(id: u64, unused: u64) -> Result<u64, Error> {
    #![allow(unused_variables)]
    let also_unused = 0;
    INNER_RUNS.fetch_add(1, Ordering::SeqCst);
    Ok(id)
}

/// A doc comment and a `cfg_attr` stay on the function: without the `allow`, the unused
/// argument would fail `cargo clippy -- -D warnings`, which CI runs on this file.
#[cfg_attr(test, allow(unused_variables))]
#[idempotent(key = id)]
async fn documented(id: u64, unused: u64) -> Result<u64, Error> {
    Ok(id)
}

#[tokio::test]
async fn a_body_may_start_with_an_inner_attribute() {
    assert_eq!(inner_attribute(5, 0).await.unwrap(), 5);
    assert_eq!(inner_attribute(5, 1).await.unwrap(), 5);
    assert_eq!(INNER_RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(documented(6, 0).await.unwrap(), 6);
}

// ---------------------------------------------------------------------------------------------
// `name = ...` is the namespace exactly as written.

/// `Key::new("payments.charge.v1", &42u64)`: the golden vector of tests/keys.rs, pinned here too
/// because it is what an operator computes for the record of `charge(42)` below.
const CHARGE_42: &str = "09eac351bf7e9e0b0ae7b807a06265549e3eecb32eac5fc9434ab8ec35160090";

#[idempotent(name = "payments.charge.v1", key = id, store = store)]
async fn charge(store: &dyn Store, id: u64) -> Result<u64, Error> {
    Ok(1999)
}

async fn is_completed(store: &dyn Store, key: Key) -> bool {
    matches!(
        store.claim(key, None, Duration::from_secs(1)).await,
        Ok(Claim::Completed(_))
    )
}

#[tokio::test]
async fn a_named_function_stores_under_key_new_of_its_name() {
    let store = MemoryStore::new();
    assert_eq!(charge(&store, 42).await.unwrap(), 1999);

    let key = Key::new("payments.charge.v1", &42u64);
    assert_eq!(key.to_hex(), CHARGE_42);
    assert!(
        is_completed(&store, key).await,
        "the record is at Key::new(name, &key)"
    );

    let out = Idempotent::new(&store, 42u64)
        .name("payments.charge.v1")
        .run_with_outcome(|| async { Ok::<_, Error>(0u64) })
        .await
        .unwrap();
    assert_eq!(
        (out.value, out.status),
        (1999, Status::Replayed),
        "the function API with the same name reads the attribute's record"
    );
}

#[tokio::test]
async fn a_named_function_replays_what_the_function_api_stored() {
    let store = MemoryStore::new();
    Idempotent::new(&store, 7u64)
        .name("payments.charge.v1")
        .run(|| async { Ok::<_, Error>(5u64) })
        .await
        .unwrap();
    assert_eq!(charge(&store, 7).await.unwrap(), 5);
}

// The default key of one argument is that argument itself, not a 1-tuple of it: with a name, its
// record is `Key::new(name, &id)`, the one `key = id` and the function API address.
#[idempotent(name = "payments.charge.v1", store = store, skip(store))]
async fn charge_by_default_key(store: &dyn Store, id: u64) -> Result<u64, Error> {
    Ok(2999)
}

#[tokio::test]
async fn one_default_key_argument_is_the_key_itself() {
    let store = MemoryStore::new();
    assert_eq!(charge_by_default_key(&store, 42).await.unwrap(), 2999);

    let key = Key::new("payments.charge.v1", &42u64);
    assert_eq!(key.to_hex(), CHARGE_42);
    assert!(
        is_completed(&store, key).await,
        "the record is at Key::new(name, &id)"
    );
    assert_eq!(
        charge(&store, 42).await.unwrap(),
        2999,
        "`key = id` under the same name reads the default key's record"
    );
    let out = Idempotent::new(&store, 42u64)
        .name("payments.charge.v1")
        .run_with_outcome(|| async { Ok::<_, Error>(0u64) })
        .await
        .unwrap();
    assert_eq!((out.value, out.status), (2999, Status::Replayed));
}

// Several default-key arguments are a tuple of them, in the order of the signature.
#[idempotent(name = "ledger.transfer.v1", store = store, skip(store))]
async fn transfer(store: &dyn Store, from: u64, to: &str) -> Result<u64, Error> {
    Ok(from)
}

#[tokio::test]
async fn several_default_key_arguments_are_a_tuple() {
    let store = MemoryStore::new();
    assert_eq!(transfer(&store, 1, "bob").await.unwrap(), 1);
    assert!(is_completed(&store, Key::new("ledger.transfer.v1", &(1u64, "bob"))).await);
}

struct Ledger<T>(std::marker::PhantomData<T>);

static LEDGER_RUNS: AtomicUsize = AtomicUsize::new(0);

impl<T: Send + Sync> Ledger<T> {
    // Neither `Self` nor `T` is added to an explicit name.
    #[idempotent(name = "ledger.post.v1", key = id, store = store)]
    async fn post(&self, store: &dyn Store, id: u64) -> Result<usize, Error> {
        Ok(LEDGER_RUNS.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[tokio::test]
async fn an_explicit_name_adds_neither_self_nor_type_arguments() {
    let store = MemoryStore::new();
    let bytes = Ledger::<u8>(std::marker::PhantomData);
    let words = Ledger::<u16>(std::marker::PhantomData);
    let first = bytes.post(&store, 3).await.unwrap();
    assert_eq!(
        words.post(&store, 3).await.unwrap(),
        first,
        "one name, one record"
    );
    assert_eq!(LEDGER_RUNS.load(Ordering::SeqCst), 1);
    assert!(is_completed(&store, Key::new("ledger.post.v1", &3u64)).await);
}

// ---------------------------------------------------------------------------------------------
// The default namespace is the function's path, as logs show it.

mod billing {
    use idem::{Error, idempotent};

    pub struct Invoices;

    impl Invoices {
        #[idempotent(key = id)]
        pub async fn send(id: u64) -> Result<u64, Error> {
            Ok(id)
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_default_namespace_is_logged_as_the_function_path() {
    let logs = LogCapture::install();
    billing::Invoices::send(1).await.unwrap();
    let text = logs.text();
    assert!(
        text.contains("attribute::billing::Invoices::send"),
        "the path names the module, the type and the function: {text}"
    );
    assert!(
        !text.contains("{{closure}}"),
        "the closures the path is read from are not shown: {text}"
    );
}
