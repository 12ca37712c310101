//! Two distinct functions never share a default namespace (DESIGN "Keys"): for each pair below,
//! both functions are called twice with one key, and each body must run exactly once and get its
//! own result back. A shared namespace would show as the second function's body never running
//! and its caller getting the first function's value.
//!
//! Each pair runs on the in-memory store and, with their features, on Redis and PostgreSQL
//! servers that the harnesses in tests/support/ start.

mod support;

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idem::store::Token;
use idem::{Error, Store, idempotent};

/// Counts one function's body executions.
type Runs = Arc<AtomicUsize>;

/// A key no other test or run uses (the servers of a test binary are shared by its tests).
fn fresh_id() -> u64 {
    Token::generate().as_u128() as u64
}

/// Calls `a` then `b` with one key, twice over, and checks that each body ran once and that
/// each function got back its own value.
async fn assert_apart<A, B, FA, FB>(a: A, b: B, expect_a: &str, expect_b: &str)
where
    A: Fn(Runs) -> FA,
    B: Fn(Runs) -> FB,
    FA: Future<Output = Result<String, Error>>,
    FB: Future<Output = Result<String, Error>>,
{
    let (runs_a, runs_b) = (Runs::default(), Runs::default());
    for round in 0..2 {
        assert_eq!(a(runs_a.clone()).await.unwrap(), expect_a, "round {round}");
        assert_eq!(
            b(runs_b.clone()).await.unwrap(),
            expect_b,
            "round {round}: the second function read the first one's record"
        );
    }
    assert_eq!(runs_a.load(Ordering::SeqCst), 1, "the first body runs once");
    assert_eq!(
        runs_b.load(Ordering::SeqCst),
        1,
        "the second body runs once"
    );
}

fn ran(runs: &Runs, value: impl Display) -> Result<String, Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    Ok(value.to_string())
}

// ---------------------------------------------------------------------------------------------
// Receiverless associated functions of two types in one module.

struct Orders;
struct Refunds;

impl Orders {
    #[idempotent(key = id, store = store)]
    async fn create(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "orders")
    }
}

impl Refunds {
    #[idempotent(key = id, store = store)]
    async fn create(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "refunds")
    }
}

async fn associated_functions_of_two_types(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| Orders::create(store, runs, id),
        |runs| Refunds::create(store, runs, id),
        "orders",
        "refunds",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// One type implementing a generic trait twice.

trait Handler<E> {
    async fn handle(&self, store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error>;
}

struct Consumer;
struct OrderCreated;
struct OrderCancelled;

impl Handler<OrderCreated> for Consumer {
    #[idempotent(key = id, store = store)]
    async fn handle(&self, store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "created")
    }
}

impl Handler<OrderCancelled> for Consumer {
    #[idempotent(key = id, store = store)]
    async fn handle(&self, store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "cancelled")
    }
}

async fn one_type_implementing_a_generic_trait_twice(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| <Consumer as Handler<OrderCreated>>::handle(&Consumer, store, runs, id),
        |runs| <Consumer as Handler<OrderCancelled>>::handle(&Consumer, store, runs, id),
        "created",
        "cancelled",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// A generic impl.

struct Repo<T>(std::marker::PhantomData<T>);
struct A;
struct B;

impl<T> Repo<T> {
    #[idempotent(key = id, store = store)]
    async fn load(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, std::any::type_name::<T>())
    }
}

async fn a_generic_impl(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| Repo::<A>::load(store, runs, id),
        |runs| Repo::<B>::load(store, runs, id),
        std::any::type_name::<A>(),
        std::any::type_name::<B>(),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Const generics.

#[idempotent(key = id, store = store)]
async fn constant<const N: u8>(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
    ran(&runs, N)
}

async fn const_generics(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| constant::<1>(store, runs, id),
        |runs| constant::<2>(store, runs, id),
        "1",
        "2",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// An `impl Trait` argument.

#[idempotent(key = id, store = store)]
async fn describe(
    store: &dyn Store,
    runs: Runs,
    id: u64,
    x: impl Display + Send,
) -> Result<String, Error> {
    ran(&runs, x)
}

async fn an_impl_trait_argument(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| describe(store, runs, id, 5u8),
        |runs| describe(store, runs, id, "x"),
        "5",
        "x",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Two `async fn nested` declared inside two different functions.

async fn one(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
    #[idempotent(key = id, store = store)]
    async fn nested(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "one")
    }
    nested(store, runs, id).await
}

async fn two(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
    #[idempotent(key = id, store = store)]
    async fn nested(store: &dyn Store, runs: Runs, id: u64) -> Result<String, Error> {
        ran(&runs, "two")
    }
    nested(store, runs, id).await
}

async fn nested_functions_of_one_name(store: &dyn Store) {
    let id = fresh_id();
    assert_apart(
        |runs| one(store, runs, id),
        |runs| two(store, runs, id),
        "one",
        "two",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Each pair on each store.

macro_rules! on_every_store {
    ($($pair:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $pair() {
                    super::$pair(&idem::MemoryStore::new()).await;
                }
            )*
        }

        /// The process-wide store that functions without `store = ...` use.
        mod global_memory {
            $(
                #[tokio::test]
                async fn $pair() {
                    super::$pair(idem::MemoryStore::global()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            use super::support::redis::RedisServer;

            async fn store(test: &str) -> idem::RedisStore {
                let url = RedisServer::shared().url();
                idem::RedisStore::builder()
                    .prefix(format!("idem-test:namespaces:{test}:{}:", super::fresh_id()))
                    .connect(&url)
                    .await
                    .unwrap_or_else(|err| panic!("connect to {url}: {err}"))
            }

            $(
                #[tokio::test]
                async fn $pair() {
                    super::$pair(&store(stringify!($pair)).await).await;
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            use super::support::postgres::PgServer;

            async fn store() -> idem::PostgresStore {
                let store = idem::PostgresStore::connect(&PgServer::shared().url()).await
                    .expect("store from URL");
                store.migrate().await.expect("migrate");
                store
            }

            $(
                #[tokio::test]
                async fn $pair() {
                    super::$pair(&store().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    associated_functions_of_two_types,
    one_type_implementing_a_generic_trait_twice,
    a_generic_impl,
    const_generics,
    an_impl_trait_argument,
    nested_functions_of_one_name,
);
