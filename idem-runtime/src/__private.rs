//! What `#[idempotent]`'s expansion names, through `::idem::__private`. Not public API.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::exec::run_attributed as run;
pub use crate::{
    DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Error, Fingerprint, Key, KeyPart,
    MemoryStore, OnConflict, Policy, Store,
};

/// The store an `#[idempotent]` function without `store = ...` uses.
pub fn default_store() -> &'static MemoryStore {
    MemoryStore::global()
}

/// Checks, at the user's `store = ...` expression, that it is (or points to) a store.
pub fn store<S: AsStore + ?Sized>(store: &S) -> &S::Target {
    store.as_store()
}

/// A store, or something that points to one: `S`, `&S`, `Box<S>`, `Arc<S>`, `Arc<dyn Store>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store",
    label = "`store = ...` must be a value of a type that implements `idem::Store`, or a reference or `Arc` to one",
    note = "use `idem::MemoryStore`, a store from one of idem's features, or your own `impl idem::Store`"
)]
pub trait AsStore {
    /// The store type.
    type Target: Store + ?Sized;
    /// The store.
    fn as_store(&self) -> &Self::Target;
}

impl<S: Store + ?Sized> AsStore for S {
    type Target = S;
    fn as_store(&self) -> &S {
        self
    }
}

/// Points the type checker at a key argument: a type that is not a key part is reported on it.
pub fn key_part<T: KeyPart + ?Sized>(value: &T) -> &T {
    value
}

/// A result type an idempotent call can store: serde both ways, owned, `Send`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored as the result of an idempotent function",
    label = "the `Ok` type must implement `serde::Serialize` and `serde::de::DeserializeOwned`, and be `Send + 'static`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to the type; a result is replayed to later callers, possibly in another process"
)]
pub trait Storable: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Storable for T {}

/// An error type an idempotent function can return: store failures and conflicts convert into it.
#[diagnostic::on_unimplemented(
    message = "the error type `{Self}` cannot carry idem's errors",
    label = "`{Self}` must implement `From<idem::Error>`",
    note = "implement `From<idem::Error>` for the error type (with thiserror: a variant `#[error(transparent)] Idem(#[from] idem::Error)`), so store failures and conflicts reach callers as your own error"
)]
pub trait FromIdemError: From<Error> {}
impl<E: From<Error>> FromIdemError for E {}

/// The parts of `Result<T, E>`, named through the return type even when it is an alias.
pub trait IdemResult {
    /// `T`
    type Ok;
    /// `E`
    type Err;
}

impl<T, E> IdemResult for Result<T, E> {
    type Ok = T;
    type Err = E;
}

/// Asserts the bounds of an idempotent function's result at its return type's span.
pub const fn assert_result<R>()
where
    R: IdemResult,
    R::Ok: Storable,
    R::Err: FromIdemError,
{
}

/// A duration from whole nanoseconds, as the macro writes parsed literals.
pub const fn nanos(n: u64) -> Duration {
    Duration::from_nanos(n)
}

/// A policy from the attribute's options.
pub const fn policy(
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    wait_timeout: Duration,
) -> Policy {
    Policy {
        ttl,
        lease,
        on_conflict,
        wait_timeout,
    }
}

/// The namespace type arguments of a generic function: `core::any::type_name` of each.
pub use core::any::type_name;
