//! Steps (recovery points): `idem::step(name, f)` inside an idempotent body. See
//! `STEPS-DESIGN.md` at the repository root.
//!
//! The executor sets a task-local [`StepCx`] around the body's future. A step does not borrow
//! the store (the task-local must be `'static`, the store is borrowed by the call): it sends its
//! record to the executor over a channel, and the executor, which polls the body and this
//! channel together, records it with the call's key and token (fenced by the store).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::codec;
use crate::error::Error;
use crate::store::{Bytes, StepRecorded};

/// A step's value on its way to the store, and where the store's answer goes.
pub(crate) struct StepRequest {
    pub(crate) name: String,
    pub(crate) value: Bytes,
    pub(crate) reply: oneshot::Sender<Result<StepRecorded, Error>>,
}

/// What a body's steps see of their call.
pub(crate) struct StepCx {
    /// Steps recorded under the call's key when the body started (by an earlier holder).
    pub(crate) recorded: HashMap<String, Bytes>,
    /// Names used so far in this call.
    pub(crate) used: Mutex<HashSet<String>>,
    pub(crate) sink: mpsc::UnboundedSender<StepRequest>,
}

tokio::task_local! {
    pub(crate) static CURRENT: StepCx;
}

/// Runs `f` once per (idempotent call key, `name`): its `Ok` value is recorded under the running
/// call's key, fenced by the call's claim, before it is returned; a later holder of the same key
/// (after a crash and a takeover) gets the recorded value without running `f`. A failed step is
/// not recorded.
///
/// Errors: [`Error::StepOutsideCall`] outside an idempotent body (or in a task it spawned);
/// [`Error::StepRepeated`] for a name used twice in one call; [`Error::LeaseLost`] when the
/// effect ran but another call took the key over first (stop: the new holder owns the call);
/// [`Error::Codec`] / [`Error::Store`] when the value cannot be recorded. In those three cases
/// `f` ran and is not recorded.
pub async fn step<F, Fut, T, E>(name: &str, f: F) -> Result<T, E>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    let found = CURRENT.try_with(|cx| {
        if !cx
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned())
        {
            return Err(Error::StepRepeated {
                name: name.to_owned(),
            });
        }
        Ok((cx.recorded.get(name).cloned(), cx.sink.clone()))
    });
    let (recorded, sink) = match found {
        Err(_) => {
            return Err(Error::StepOutsideCall {
                name: name.to_owned(),
            }
            .into());
        }
        Ok(Err(err)) => return Err(err.into()),
        Ok(Ok(found)) => found,
    };
    if let Some(bytes) = recorded {
        return Ok(codec::from_slice(&bytes)?);
    }
    let value = f().await?;
    let bytes = Bytes::from(codec::to_vec(&value)?);
    let (reply, answer) = oneshot::channel();
    let request = StepRequest {
        name: name.to_owned(),
        value: bytes,
        reply,
    };
    if sink.send(request).is_err() {
        return Err(Error::StepOutsideCall {
            name: name.to_owned(),
        }
        .into());
    }
    match answer.await {
        Ok(Ok(StepRecorded::Recorded)) => Ok(value),
        Ok(Ok(_)) => Err(Error::LeaseLost {
            name: name.to_owned(),
        }
        .into()),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Error::StepOutsideCall {
            name: name.to_owned(),
        }
        .into()),
    }
}
