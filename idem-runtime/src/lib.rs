//! The runtime of [idem](https://docs.rs/idem): keys, records, the [`Store`] trait, the
//! executor and the stores.
//!
//! Depend on `idem`, not on this crate: `idem` re-exports what users name, and the code
//! `#[idempotent]` generates reaches this crate only through `idem::__private`.
//!
//! - [`key`]: the canonical key encoding ([`KeyPart`]) and its digest ([`Key`]).
//! - [`Store`]: the object-safe trait every backend implements; [`MemoryStore`] is the embedded one.
//! - [`store`]: the stores, and what a store implementation names (fencing [`Token`](store::Token)s,
//!   what store operations return).
//! - [`Idempotent`]: the executor as a function API, for closures and code without the attribute.
//! - [`conformance`]: the checks every store passes.

#![warn(missing_docs)]
// On docs.rs (nightly), each item behind a feature is marked with it; `doc_cfg` is not stable yet,
// so the docs of those items also say in words which feature they need.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod clock;
pub mod codec;
pub mod conformance;
mod error;
mod exec;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;
pub mod key;
pub mod metrics;
mod record;
pub mod store;

pub use error::{BoxError, Error};
pub use exec::step::{MAX_STEP_NAME_LEN, step};
/// The transactional mode (needs the `postgres` feature): see [`PostgresStore::transactional`].
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use exec::transactional;
pub use exec::{
    DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Idempotent, OnConflict, Outcome, Policy,
    Status,
};
/// The `Idempotency-Key` layer (needs the `http` feature).
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[doc(inline)]
pub use http::IdempotencyLayer;
pub use key::{Fingerprint, Key, KeyPart};
pub use store::Store;
pub use store::memory::MemoryStore;
/// The PostgreSQL store (needs the `postgres` feature).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use store::postgres::PostgresStore;
/// The Redis store (needs the `redis` feature).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use store::redis::RedisStore;

/// What `#[idempotent]`'s expansion names. Not public API: it changes without notice.
#[doc(hidden)]
pub mod __private;
