//! Make async functions idempotent with one attribute.
//!
//! Networks time out after the work was done, brokers redeliver, users double-click "Pay". A
//! handler that runs twice charges twice. With `#[idempotent]`, the body runs at most once per
//! key while the record lives; concurrent duplicates wait for the first call (or are refused);
//! retries get the first call's result back.
//!
//! ```
//! use idem::idempotent;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
//! struct Receipt { order: u64, cents: u64 }
//!
//! #[derive(Debug)]
//! enum PaymentError { Declined, Idem(idem::Error) }
//! impl From<idem::Error> for PaymentError {
//!     fn from(e: idem::Error) -> Self { PaymentError::Idem(e) }
//! }
//!
//! struct Order { id: u64, cents: u64 }
//!
//! #[idempotent(key = order.id, ttl = "24h")]
//! async fn charge(order: &Order) -> Result<Receipt, PaymentError> {
//!     // Talk to the payment provider: this runs once per order id.
//!     Ok(Receipt { order: order.id, cents: order.cents })
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), PaymentError> {
//! let order = Order { id: 7, cents: 1999 };
//! let first = charge(&order).await?;
//! let retry = charge(&order).await?; // replayed: the body did not run again
//! assert_eq!(first, retry);
//! # Ok(()) }
//! ```
//!
//! # The attribute
//!
//! | option | meaning | default |
//! | --- | --- | --- |
//! | `key = EXPR` | expression over the arguments whose value is the key ([`KeyPart`]) | all arguments but `self` and `skip(...)` ones: one is the key itself, several a tuple |
//! | `skip(a, b)` | arguments left out of the default key | none |
//! | `store = EXPR` | the [`Store`]: `S`, `&S`, `Arc<S>` or `Arc<dyn Store>`; may use `self` | [`MemoryStore::global()`] |
//! | `ttl = "24h"` | how long a completed result is remembered (literal or `Duration` expression) | 24 hours |
//! | `lease = "30s"` | how long a claim holds before another caller may take over; renewed while the body runs | 30 seconds |
//! | `wait_timeout = "60s"` | the longest a caller waits for another holding the key (`on_conflict = wait`) | 60 seconds |
//! | `name = "payments.charge.v1"` | the namespace of the keys, exactly as written: the key is [`Key::new`]`(name, &key)` | the function's full path: module, impl type and trait with their arguments, type and const arguments |
//! | `fingerprint = EXPR` | a value that must match on replay; another one for the same key is [`Error::KeyReused`] | none |
//! | `on_conflict = wait` / `reject` | while another call holds the key: wait for its result, or fail with [`Error::InProgress`] | `wait` |
//! | `outcome` | the function returns `Result<`[`Outcome`]`<T>, E>`: the value with its [`Status`] (executed or replayed) and `expires_in`; the body still returns `Result<T, E>` | off: `Result<T, E>` |
//! | `crate = path` | where the `idem` crate is, for re-exporters | `::idem` |
//!
//! With `outcome`, a caller can tell a replay from an execution (to set `Idempotent-Replayed`,
//! or count replays):
//!
//! ```
//! # use idem::{idempotent, Outcome, Status};
//! # #[derive(Debug)] struct MyError(idem::Error);
//! # impl From<idem::Error> for MyError { fn from(e: idem::Error) -> Self { MyError(e) } }
//! #[idempotent(key = id, outcome)]
//! async fn reserve(id: u64) -> Result<Outcome<String>, MyError> {
//!     Ok(format!("seat {id}")) // the body returns `Result<String, MyError>`
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), MyError> {
//! let first = reserve(9).await?;
//! assert_eq!((first.status, first.value.as_str()), (Status::Executed, "seat 9"));
//! let retry = reserve(9).await?;
//! assert_eq!(retry.status, Status::Replayed);
//! assert!(retry.expires_in.is_some());
//! # Ok(()) }
//! ```
//!
//! Only an explicit `name` is stable across compiler versions and renames: the default namespace
//! is the path `std::any::type_name` prints for the function, whose format Rust does not promise.
//! Give `name` to functions whose records must outlive a compiler upgrade or a refactor.
//!
//! A type of your own becomes a key, or a default-key argument, with `#[derive(KeyPart)]`
//! (encoding and options in [`KeyPart`](trait@KeyPart)):
//!
//! ```
//! use idem::{KeyPart, idempotent};
//!
//! #[derive(KeyPart)]
//! struct Shipment {
//!     order: u64,
//!     warehouse: String,
//!     #[key(skip)]
//!     note: String, // does not make it another shipment
//! }
//!
//! #[idempotent(name = "shipping.book.v1", ttl = "7d")]
//! async fn book(shipment: &Shipment) -> Result<String, idem::Error> {
//!     Ok(format!("label for {} from {}", shipment.order, shipment.warehouse))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem::Error> {
//! let shipment = Shipment { order: 7, warehouse: "north".into(), note: String::new() };
//! book(&shipment).await?;
//! // The struct is the tuple of its fields: any code finds the record from them.
//! let replay = idem::Idempotent::new(idem::MemoryStore::global(), (7u64, "north"))
//!     .name("shipping.book.v1")
//!     .run_with_outcome(|| async { Ok::<String, idem::Error>("not run".into()) })
//!     .await?;
//! assert_eq!(replay.value, "label for 7 from north");
//! # Ok(()) }
//! ```
//!
//! Duration literals are a whole number and a unit: `ns`, `us`, `ms`, `s`, `m`, `h`, `d`
//! (`"250ms"`, `"30s"`, `"24h"`, `"7d"`), checked at compile time.
//!
//! The function must be `async`, return `Result<T, E>` with `T: Serialize + DeserializeOwned +
//! Send + 'static` and `E: From<idem::Error>`, and take no `&mut` argument (a replay could not
//! repeat its effect on it). Misuse is a compile error that points at the offending tokens.
//!
//! # Semantics
//!
//! - **At most once per key while the record lives.** The first call claims the key, runs the
//!   body, stores `Ok(value)` for `ttl`; later calls return the stored value.
//! - **Errors are not memoized.** `Err(e)` releases the claim, so the retry runs the body again.
//! - **Panic or cancellation** (the future is dropped) releases the claim (the in-memory store at
//!   once; a remote store at once or, where that cannot be done synchronously, when the lease runs
//!   out). Never held longer than the lease.
//! - **Conflict.** While a call holds the key, others wait for its result (up to
//!   `wait_timeout`) or, with `on_conflict = reject`, fail at once with [`Error::InProgress`].
//! - **Lease.** Renewed every third of it while the body runs, by the call's own future. A holder
//!   that stops being polled loses its lease and another caller takes over; the stale holder's
//!   result is then refused (fencing) and a `tracing` warning (`lease_lost`) says the body may have
//!   run twice.
//! - **Steps.** Inside a body, [`step`]`("charge", || ..)` is a recovery point: its `Ok` value
//!   is recorded under the call's key, so a run of the key after a failure, a panic, a
//!   cancellation or a crash (and a takeover) gets it back without running it again, and goes on
//!   from the first step not recorded. See [`step`] for the rules and their cost.
//!
//! # Without the attribute
//!
//! [`Idempotent`] is the same executor as a builder, for closures:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem::Error> {
//! use std::time::Duration;
//! let store = idem::MemoryStore::new();
//! let order_id = 7u64;
//! let out = idem::Idempotent::new(&store, ("charge", order_id))
//!     .ttl(Duration::from_secs(24 * 3600))
//!     .run_with_outcome(|| async { Ok::<_, idem::Error>(1999u64) })
//!     .await?;
//! assert_eq!((out.value, out.status), (1999, idem::Status::Executed));
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `redis`: `RedisStore`, records in Redis (or Redis
//!   Cluster), shared by many processes and machines.
//! - `postgres`: `PostgresStore`, durable records in
//!   PostgreSQL, with a transactional mode (`transactional`).
//! - `sqlx-postgres`: with `postgres`, the transactional mode on an application's own
//!   `sqlx::PgPool` (sqlx 0.8; its PostgreSQL driver and tokio runtime only).
//! - `http`: `IdempotencyLayer`, `Idempotency-Key` semantics for
//!   tower and axum services.
//! - `uuid`: [`uuid::Uuid`](https://docs.rs/uuid) as a key part.
//! - `metrics`: counters of calls by outcome and histograms of body, wait and store-operation
//!   latency, through the [`metrics`](https://docs.rs/metrics) facade (see `idem_runtime::metrics`
//!   for the list).
//!
//! Every store passes the same [`conformance`] suite; a store of your own implements [`Store`]
//! and runs it with [`conformance_tests!`].

#![warn(missing_docs)]
// On docs.rs (nightly), each item behind a feature is marked with it; `doc_cfg` is not stable yet,
// so the docs of those items also say in words which feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use idem_macros::{KeyPart, idempotent};
/// `Idempotency-Key` semantics for tower and axum services (needs the `http` feature).
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use idem_runtime::IdempotencyLayer;
/// The HTTP layer, its options and responses (needs the `http` feature).
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use idem_runtime::http;
pub use idem_runtime::{
    BoxError, DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Error, Fingerprint, Idempotent,
    Key, KeyPart, MAX_STEP_NAME_LEN, MemoryStore, OnConflict, Outcome, Policy, Status, Store,
    codec, conformance, conformance_tests, key, step,
};

/// Durable records in PostgreSQL, with a transactional mode (needs the `postgres` feature).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use idem_runtime::PostgresStore;
/// Records in Redis, shared by many processes and machines (needs the `redis` feature).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use idem_runtime::RedisStore;
/// The transactional mode: the record and the body's own writes commit in one PostgreSQL
/// transaction, on the store's pool or (feature `sqlx-postgres`) a `sqlx::PgPool` (needs the
/// `postgres` feature).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use idem_runtime::transactional;

/// The stores, one module each: builders, constants and the types their APIs name (for
/// PostgreSQL, the re-exported `tokio_postgres` whose `Transaction` transactional bodies take,
/// and with `sqlx-postgres` the re-exported `sqlx`); and what a store of your own implements and
/// names: the [`Store`] trait, [`Claim`](store::Claim), [`Completed`](store::Completed),
/// [`Completion`](store::Completion), fencing [`Token`](store::Token)s,
/// [`BoxFuture`](store::BoxFuture), [`Bytes`](store::Bytes), and for step records
/// [`StepRecorded`](store::StepRecorded) and [`RecordedSteps`](store::RecordedSteps).
pub mod store {
    #[doc(no_inline)]
    pub use idem_runtime::Store;
    pub use idem_runtime::store::memory;
    /// The PostgreSQL store (needs the `postgres` feature).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub use idem_runtime::store::postgres;
    /// The Redis store (needs the `redis` feature).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub use idem_runtime::store::redis;
    /// The seam of the transactional mode, for backends (needs the `postgres` feature).
    #[cfg(feature = "postgres")]
    #[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
    pub use idem_runtime::store::transaction;
    pub use idem_runtime::store::{
        BoxFuture, Bytes, Claim, Completed, Completion, IfUnsafe, RecordedSteps, StepRecorded,
        Token,
    };
}

/// What `#[idempotent]`'s expansion names. Not public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use idem_runtime::__private::*;
}
