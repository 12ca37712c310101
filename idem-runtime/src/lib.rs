//! The runtime of [idem](https://docs.rs/idem): keys, records, the [`Store`] trait, the
//! executor and the stores.
//!
//! Depend on `idem`, not on this crate: `idem` re-exports what users name, and the code
//! `#[idempotent]` generates reaches this crate only through `idem::__private`.
//!
//! - [`key`]: the canonical key encoding ([`KeyPart`]) and its digest ([`Key`]).
//! - [`record`]: fencing [`Token`]s and what store operations return.
//! - [`Store`]: the object-safe trait every backend implements; [`MemoryStore`] is the embedded one.
//! - [`Idempotent`]: the executor as a function API, for closures and code without the attribute.
//! - [`conformance`]: the checks every store passes.

#![warn(missing_docs)]

mod clock;
pub mod codec;
pub mod conformance;
mod error;
mod exec;
#[cfg(feature = "http")]
pub mod http;
pub mod key;
pub mod metrics;
pub mod record;
pub mod store;

/// The byte buffer stores hold results in (re-exported from `bytes`, so stores need not depend on it).
pub use bytes::Bytes;
pub use error::{BoxError, Error};
pub use exec::{
    DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Idempotent, OnConflict, Outcome, Policy,
    Status,
};
#[cfg(feature = "http")]
pub use http::IdempotencyLayer;
pub use key::{Fingerprint, Key, KeyPart};
pub use record::{Claim, Completed, Completion, Token};
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{BoxFuture, Store};

/// What `#[idempotent]`'s expansion names. Not public API: it changes without notice.
#[doc(hidden)]
pub mod __private;
