//! What `#[idempotent]`'s expansion names, through `::idem::__private`. Not public API.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::exec::CallKey;
pub use crate::{
    DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Error, Fingerprint, Key, KeyPart,
    MemoryStore, OnConflict, Policy, Store,
};
use std::future::Future;
use std::marker::PhantomData;

/// The store an `#[idempotent]` function without `store = ...` uses.
pub fn default_store() -> &'static dyn Store {
    MemoryStore::global()
}

/// Checks, at the user's `store = ...` expression, that it is (or points to) a store. Returning
/// one concrete type keeps a mistake here from cascading into errors elsewhere.
pub fn store<S: AsStore>(store: &S) -> &dyn Store {
    store.as_dyn_store()
}

/// A store, or something that points to one: `S`, `&S`, `Box<S>`, `Arc<S>`, `Arc<dyn Store>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idempotency store",
    label = "`store = ...` must be a value of a type that implements `idem::Store`, or a reference or `Arc` to one",
    note = "use `idem::MemoryStore`, a store from one of idem's features, or your own `impl idem::Store`"
)]
pub trait AsStore {
    /// The store, dynamically dispatched (its futures are boxed anyway).
    fn as_dyn_store(&self) -> &dyn Store;
}

// Not recommended: a mistake is then reported as "`X` is not an idempotency store" with the note
// above, instead of a list of every `Store` impl (which would change with the enabled features).
#[diagnostic::do_not_recommend]
impl<S: Store> AsStore for S {
    fn as_dyn_store(&self) -> &dyn Store {
        self
    }
}

/// The key of an `#[idempotent]` call: `Key::new(name, value)`, found without its digest when
/// the in-memory store already holds a record of it.
pub fn key<V: KeyPart + ?Sized>(store: &dyn Store, name: &str, value: &V) -> CallKey {
    CallKey::new(store, name, value)
}

/// Checks a default-key argument at its type: a type that is not a key part is reported on the
/// argument, and nowhere else.
pub fn key_part<T: KeyPart>(value: &T) -> &dyn KeyPart {
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

/// The return type of an `#[idempotent]` function: `Result<T, E>`, or an alias of it.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` functions must return `Result<T, E>`, not `{Self}`",
    label = "not a `Result<T, E>`",
    note = "only `Ok` results are stored and replayed, and store failures reach the caller through `E: From<idem::Error>`"
)]
pub trait IdemResult: Sized {
    /// `T`
    type Ok;
    /// `E`
    type Err;
    /// `self` as a `Result`.
    fn into_result(self) -> Result<Self::Ok, Self::Err>;
    /// A `Result` as `Self`.
    fn from_result(result: Result<Self::Ok, Self::Err>) -> Self;
}

impl<T, E> IdemResult for Result<T, E> {
    type Ok = T;
    type Err = E;
    fn into_result(self) -> Self {
        self
    }
    fn from_result(result: Self) -> Self {
        result
    }
}

/// Runs an `#[idempotent]` function's body through the executor. The bounds name the marker
/// traits, so a violation is reported with their messages; the return type unifies with the
/// function's own, `Result<T, E>` or an alias of it.
///
/// Not an `async fn`: a replay from the in-memory store is done here, when the expansion calls
/// it (in the function's own future, at its first poll), and returns a ready [`Run`], so it never
/// builds the executor's future, whose moves were a tenth of a replay. Any other call runs the
/// executor in one allocation.
#[allow(clippy::too_many_arguments)]
pub fn run<'a, T, E, Fut>(
    store: &'a dyn Store,
    name: &'a str,
    key: CallKey,
    fingerprint: Option<Fingerprint>,
    policy: &'a Policy,
    eq: Option<fn(&T, &T) -> bool>,
    body: Fut,
) -> Run<impl Future<Output = Result<T, E>>>
where
    T: Storable,
    E: FromIdemError,
    Fut: Future<Output = Result<T, E>>,
{
    let call = crate::exec::Call {
        name,
        key: key.key,
        fingerprint,
        policy,
    };
    let replayed = match key.replayable {
        true => crate::exec::replay_in_memory(store, &call),
        false => None,
    };
    match replayed {
        Some(replayed) => Run::ready(replayed.map(|outcome| outcome.value).map_err(E::from)),
        None => Run::running(async move {
            crate::exec::execute(store, call, eq, body)
                .await
                .map(|outcome| outcome.value)
        }),
    }
}

/// [`run`] for a function with the `outcome` option: its return type is
/// `Result<Outcome<T>, E>` (or an alias of it).
#[allow(clippy::too_many_arguments)]
pub fn run_with_outcome<'a, T, E, Fut>(
    store: &'a dyn Store,
    name: &'a str,
    key: CallKey,
    fingerprint: Option<Fingerprint>,
    policy: &'a Policy,
    eq: Option<fn(&T, &T) -> bool>,
    body: Fut,
) -> Run<impl Future<Output = Result<crate::Outcome<T>, E>>>
where
    T: Storable,
    E: FromIdemError,
    Fut: Future<Output = Result<T, E>>,
{
    let call = crate::exec::Call {
        name,
        key: key.key,
        fingerprint,
        policy,
    };
    let replayed = match key.replayable {
        true => crate::exec::replay_in_memory(store, &call),
        false => None,
    };
    match replayed {
        Some(replayed) => Run::ready(replayed.map_err(E::from)),
        None => Run::running(crate::exec::execute(store, call, eq, body)),
    }
}

/// The future of an `#[idempotent]` call: its result, when it was replayed before the executor
/// started, or the executor, boxed.
#[must_use = "an idempotent call does nothing until it is awaited"]
pub struct Run<F: Future> {
    state: RunState<F>,
}

enum RunState<F: Future> {
    Ready(Option<F::Output>),
    Running(std::pin::Pin<Box<F>>),
}

impl<F: Future> Run<F> {
    fn ready(output: F::Output) -> Self {
        Run {
            state: RunState::Ready(Some(output)),
        }
    }

    fn running(future: F) -> Self {
        Run {
            state: RunState::Running(Box::pin(future)),
        }
    }
}

// `Run` never pins its output, and its future is boxed.
impl<F: Future> Unpin for Run<F> {}

impl<F: Future> Future for Run<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        match &mut self.get_mut().state {
            RunState::Ready(output) => {
                std::task::Poll::Ready(output.take().expect("`Run` polled after it completed"))
            }
            RunState::Running(future) => future.as_mut().poll(cx),
        }
    }
}

/// Finds `T`'s equality by autoref specialisation: `(&EqProbe::<T>::new()).eq_fn()` is
/// `Some(<T as PartialEq>::eq)` when `T: PartialEq`, `None` otherwise. The executor uses it to
/// check, when a result is stored, that its replay is equal to it (which catches a `Serialize`
/// that loses data before it is encoded). Works where `T` is concrete, as in the expansion.
pub struct EqProbe<T>(PhantomData<fn() -> T>);

impl<T> EqProbe<T> {
    /// A probe for `T`.
    pub const fn new() -> EqProbe<T> {
        EqProbe(PhantomData)
    }
}

impl<T> Default for EqProbe<T> {
    fn default() -> Self {
        EqProbe::new()
    }
}

/// The probe's answer for a `T: PartialEq` (found first, by value).
pub trait ViaPartialEq<T> {
    /// `Some(<T as PartialEq>::eq)`.
    fn eq_fn(&self) -> Option<fn(&T, &T) -> bool>;
}

impl<T: PartialEq> ViaPartialEq<T> for EqProbe<T> {
    fn eq_fn(&self) -> Option<fn(&T, &T) -> bool> {
        Some(<T as PartialEq>::eq)
    }
}

/// The probe's answer for any other `T` (found after autoref).
pub trait WithoutPartialEq<T> {
    /// `None`: the encodings alone are compared.
    fn eq_fn(&self) -> Option<fn(&T, &T) -> bool>;
}

impl<T> WithoutPartialEq<T> for &EqProbe<T> {
    fn eq_fn(&self) -> Option<fn(&T, &T) -> bool> {
        None
    }
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

/// The default namespace of an `#[idempotent]` function: its full path as the compiler prints
/// it, taken from a closure that the expansion defines in the function's body.
///
/// The closure's type is nested in the function's own: `core::any::type_name` prints the
/// module path, nested scopes, the impl's self type with its arguments, the trait with its
/// arguments, and every type and const argument of this instantiation
/// (`<app::Consumer as app::Handler<app::OrderCreated>>::handle::{{closure}}::{{closure}}`,
/// `app::Repo<u8>::load::{{closure}}::{{closure}}`). The trailing `::{{closure}}` segments (the
/// async body, then the probe) are dropped, so the namespace is the function's path. It is the
/// same in every call of one instantiation; its format is the compiler's, which Rust does not
/// promise to keep across compiler versions (hence `name = ...`).
pub fn function_path<F>(_probe: &F) -> &'static str {
    let mut path = core::any::type_name::<F>();
    while let Some(outer) = path.strip_suffix("::{{closure}}") {
        path = outer;
    }
    path
}

/// The release of this runtime as a type, which the expansion checks against the macro's own:
/// `#[idempotent]` expands to code for one release of `__private`, and a macro crate of another
/// release must fail with a message that says so, not with errors about the items it names.
pub struct IdemRuntime<const MAJOR: u64, const MINOR: u64, const PATCH: u64>;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// This runtime's release (pre-release and build tags aside: the crates are released together).
pub type ThisRuntime = IdemRuntime<
    { version_part(VERSION, 0) },
    { version_part(VERSION, 1) },
    { version_part(VERSION, 2) },
>;

/// Implemented by [`ThisRuntime`] for its own release only.
#[diagnostic::on_unimplemented(
    message = "this `#[idempotent]` was expanded by idem-macros {MAJOR}.{MINOR}.{PATCH}, which does not match the idem runtime `{Self}`",
    label = "expanded by idem-macros {MAJOR}.{MINOR}.{PATCH}",
    note = "idem-macros and idem-runtime must be the same release: depend on `idem` alone (it pins both to its own version) and run `cargo update -p idem`"
)]
pub trait MacroVersion<const MAJOR: u64, const MINOR: u64, const PATCH: u64> {}

impl
    MacroVersion<
        { version_part(VERSION, 0) },
        { version_part(VERSION, 1) },
        { version_part(VERSION, 2) },
    > for ThisRuntime
{
}

/// Compiles only when the macro's release, given as the arguments, is this runtime's.
///
/// ```compile_fail,E0277
/// const _: () = idem_runtime::__private::version_check::<{ u64::MAX }, 0, 0>();
/// ```
pub const fn version_check<const MAJOR: u64, const MINOR: u64, const PATCH: u64>()
where
    ThisRuntime: MacroVersion<MAJOR, MINOR, PATCH>,
{
}

/// Part `index` (0: major, 1: minor, 2: patch) of a `MAJOR.MINOR.PATCH[-pre][+build]` version.
pub const fn version_part(version: &str, index: usize) -> u64 {
    let bytes = version.as_bytes();
    let mut part = 0;
    let mut value = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'.' {
            if part == index {
                return value;
            }
            part += 1;
            value = 0;
        } else if b.is_ascii_digit() {
            value = value * 10 + (b - b'0') as u64;
        } else {
            break;
        }
        i += 1;
    }
    if part == index { value } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_major_minor_patch() {
        assert_eq!([0, 1, 2].map(|i| version_part("1.22.333", i)), [1, 22, 333]);
        assert_eq!(
            [0, 1, 2].map(|i| version_part("0.2.0-alpha.1+build", i)),
            [0, 2, 0]
        );
    }

    // This release's macro passes the check (the expansion writes these numbers from the macro
    // crate's own `CARGO_PKG_VERSION`; idem-macros' tests check that side).
    const _: () = version_check::<
        { version_part(env!("CARGO_PKG_VERSION"), 0) },
        { version_part(env!("CARGO_PKG_VERSION"), 1) },
        { version_part(env!("CARGO_PKG_VERSION"), 2) },
    >();

    async fn nested_probe() -> &'static str {
        function_path(&|| ())
    }

    #[test]
    fn the_function_path_drops_the_closures() {
        assert_eq!(
            function_path(&|| ()),
            "idem_runtime::__private::tests::the_function_path_drops_the_closures"
        );
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(nested_probe());
        assert_eq!(
            fut.as_mut().poll(&mut cx),
            std::task::Poll::Ready("idem_runtime::__private::tests::nested_probe")
        );
    }
}

/// The result codec's parts, for `benches/codec.rs` (which measures them apart). Not public API.
pub mod codec_bench {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::Error;

    /// Encodes without the store-time check.
    pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
        crate::codec::encode(value).map_err(Error::codec)
    }

    /// Encodes with the store-time check (what the executor does).
    pub fn encode_checked<T: Serialize + DeserializeOwned>(value: &T) -> Result<Vec<u8>, Error> {
        crate::codec::to_vec(value)
    }

    /// Decodes a record.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
        crate::codec::from_slice(bytes)
    }
}
