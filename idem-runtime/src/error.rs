//! The one error type of idem.

use std::time::Duration;

/// A boxed error from a store's backend or a codec, kept as the [`source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an idempotent call could not run its body or return a result.
///
/// An `#[idempotent]` function returns `Result<T, E>` with `E: From<idem::Error>`, so these reach
/// the caller as the caller's own error type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call holds the key and has not finished: returned at once with
    /// `on_conflict = reject`, or after the wait bound ran out with `on_conflict = wait`.
    #[error("another call with this idempotency key is in progress (retry in {retry_after:?})")]
    InProgress {
        /// How long the holder's lease has left at the most; retrying sooner is pointless.
        retry_after: Duration,
    },

    /// The key was used before by a call with a different fingerprint: the stored result
    /// belongs to another request and is not returned.
    #[error("this idempotency key was already used by a different request (fingerprint mismatch)")]
    KeyReused,

    /// The store failed: connection, timeout, protocol, a record the store cannot read, or a
    /// limit of the store.
    #[error("idempotency store failed: {0}")]
    Store(#[source] BoxError),

    /// The store is at its capacity and refused a new key: the in-memory store's `max_entries`
    /// or `max_bytes` bound, with every record in it still live. Nothing was claimed and the
    /// body did not run. The backend did not fail: retry once records expire, or raise the
    /// bound (the source says which bound, its value, and the builder option that raises it).
    /// Keys already stored keep replaying.
    #[error("idempotency store is full: {0}")]
    StoreFull(#[source] BoxError),

    /// A result cannot be stored or replayed faithfully: it does not encode, or it would not
    /// decode back equal to itself (detected when it is stored, before any later call can see
    /// it); a stored result no longer decodes as the function's return type (its type changed
    /// between deployments, or the record was written by another version of idem); or the first
    /// call's result could not be stored, so later calls with its key get this error rather than
    /// a second run of the body.
    #[error("idempotent result codec: {0}")]
    Codec(#[source] BoxError),

    /// `idem::step` was called outside an idempotent body (or in a task the body spawned):
    /// steps are recorded under the running call's key. The step did not run.
    #[error(
        "`idem::step(\"{name}\", ..)` was called outside an idempotent body (or in a task it \
         spawned): steps are recorded under the running call's key; the step did not run"
    )]
    StepOutsideCall {
        /// The step's name.
        name: String,
    },

    /// The same step name was used twice in one idempotent call. The second did not run.
    #[error(
        "step `{name}` was used twice in one idempotent call: step names must be unique per call"
    )]
    StepRepeated {
        /// The step's name.
        name: String,
    },

    /// A step's name is longer than [`MAX_STEP_NAME_LEN`](crate::MAX_STEP_NAME_LEN) bytes. The
    /// step did not run.
    #[error(
        "a step name of {len} bytes is longer than the {max} bytes a step name may have: name \
         steps with short identifiers (`reserve-{{sku}}`); the step did not run"
    )]
    StepNameTooLong {
        /// The name's length, in bytes.
        len: usize,
        /// The most a name may have.
        max: usize,
    },

    /// A step's effect ran but could not be recorded: another call took the key over (this
    /// holder's lease ran out). Stop: the new holder owns the call.
    #[error(
        "step `{name}` ran but was not recorded: this call's lease ran out and another call took the key over"
    )]
    LeaseLost {
        /// The step's name.
        name: String,
    },

    /// A call of the function API without a [`name`](crate::Idempotent::name) whose body's type
    /// does not identify it (`Box<dyn FnOnce() -> ..>`, `&dyn Fn`, a `fn` pointer): every body
    /// of that type at that call site would share one namespace, and one would replay
    /// another's result. Nothing was claimed and the body did not run; give the call a name.
    #[error(
        "an idempotent call without a name needs a body whose type identifies it, and `{body}` \
         does not (every body of this type at this call site would share records): give the \
         call `.name(\"...\")`"
    )]
    NameRequired {
        /// The body's type, as `std::any::type_name` prints it.
        body: &'static str,
    },
}

impl Error {
    /// An [`Error::Store`] from any backend error.
    pub fn store(err: impl Into<BoxError>) -> Error {
        Error::Store(err.into())
    }

    /// An [`Error::StoreFull`]: the store refused a new key at its capacity (`why` names the
    /// bound).
    pub fn store_full(why: impl Into<BoxError>) -> Error {
        Error::StoreFull(why.into())
    }

    /// An [`Error::Codec`] from any codec error.
    pub fn codec(err: impl Into<BoxError>) -> Error {
        Error::Codec(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_bounds<T: std::error::Error + Send + Sync + 'static>() {}

    #[test]
    fn error_is_a_proper_error() {
        assert_bounds::<Error>();
        let e = Error::store("connection refused");
        assert_eq!(
            e.to_string(),
            "idempotency store failed: connection refused"
        );
        assert!(std::error::Error::source(&e).is_some());
    }
}
