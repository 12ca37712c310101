//! A guarded request with a key: scope, buffer, fingerprint, then claim, run the handler and
//! store its response through the executor, in a task the client's going away does not cancel
//! once the handler has started.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Extensions, Request, Response, Uri, request};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tokio::sync::oneshot;
use tower_service::Service;
use tracing::Instrument;

use super::IDEMPOTENT_NOT_STORED;
use super::body::{self, Buffered, ResponseBody};
use super::drain::Tracker;
use super::layer::Config;
use super::problem::Problem;
use super::quota::{BodyHold, Bound, Limits, OverQuota, Quotas, RUNNING_ROOM};
use super::record::{StoredHead, StoredResponse};
use super::service::{Guarded, RequestBody};
use crate::error::{BoxError, Error};
use crate::exec::Idempotent;
use crate::key::{Encoder, KeyPart};

/// How the handler's run ended when it gives no response to store.
enum Unstored<B, E> {
    /// The executor's error: conflict, key reuse, store failure.
    Idem(Error),
    /// The client holds as many records or bytes as it may: the handler did not run.
    OverQuota(OverQuota),
    /// The inner service failed: its error goes to the caller.
    Service(E),
    /// A response that is sent but not stored (`5xx`, refused by the policy, too large, or a
    /// body that failed).
    Response(Box<Response<ResponseBody<B>>>),
}

impl<B, E> From<Error> for Unstored<B, E> {
    fn from(err: Error) -> Self {
        Unstored::Idem(err)
    }
}

/// What must match for a key's stored response to be replayed: method, path and query, the
/// fingerprinted headers, body.
struct RequestFingerprint<'a> {
    method: &'a str,
    target: &'a str,
    names: &'a [HeaderName],
    headers: &'a HeaderMap,
    body: &'a [u8],
}

impl KeyPart for RequestFingerprint<'_> {
    fn encode(&self, enc: &mut Encoder) {
        enc.write_tuple_header(4);
        enc.write_str(self.method);
        enc.write_str(self.target);
        enc.write_seq_header(self.names.len());
        for name in self.names {
            let values = self.headers.get_all(name);
            enc.write_tuple_header(2);
            enc.write_str(name.as_str());
            enc.write_seq_header(values.iter().count());
            for value in values {
                enc.write_bytes(value.as_bytes());
            }
        }
        enc.write_bytes(self.body);
    }
}

/// The request target a keyed request is fingerprinted with: its path and query as the client
/// sent them. With the `axum` feature, that is axum's [`OriginalUri`](axum::extract::OriginalUri)
/// when a router put one in the extensions: a router `nest`ed in another sees its path with the
/// prefix taken off (`/charges` for `/accounts/1/charges`), and two accounts' charges must not
/// be one request.
pub(super) fn target<'a>(uri: &'a Uri, extensions: &'a Extensions) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(original)) = extensions.get() {
        return path_and_query(original);
    }
    #[cfg(not(feature = "axum"))]
    let _ = extensions;
    path_and_query(uri)
}

fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// Answers a guarded request with a key.
pub(super) async fn serve<S, ReqB, ResB>(
    config: Arc<Config>,
    quotas: Arc<Quotas>,
    tracker: Arc<Tracker>,
    inner: S,
    req: Request<ReqB>,
    key: String,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let Some(scope) = (config.scope)(&parts) else {
        let detail = "the server could not tell which client sent this request (with the default \
                      scope: it carries no Authorization header), so its Idempotency-Key cannot \
                      be kept apart from other clients' keys: authenticate; or the server must \
                      tell clients apart with scope(...) or scope_header(...), or opt in to one \
                      key space shared by all with scope_shared()";
        tracing::debug!(target: "idem", detail, "idempotency layer refused a request");
        return Ok(Problem::ClientUnknown.response(detail, None));
    };
    if !timers_ready() {
        let detail = "the server's tokio runtime has no timers, which the idempotency layer \
                      needs to renew a running request's lease; the request was not processed";
        tracing::error!(
            target: "idem",
            "the idempotency layer runs on a tokio runtime without timers: build the runtime \
             with enable_time() (or enable_all()); keyed requests are refused with 500"
        );
        return Ok(Problem::RuntimeUnsupported.response(detail, None));
    }

    let too_large = || {
        Problem::RequestTooLarge.response(
            &format!(
                "a request with an Idempotency-Key may have a body of at most {} bytes",
                config.max_request_bytes
            ),
            None,
        )
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > config.max_request_bytes as u64) {
        return Ok(too_large());
    }
    // The body is held against its client from before it is read until the request leaves the
    // layer (waiting included): at its declared length at once, so that a client's uploads that
    // stall before their last byte hold no more than its bound; chunk by chunk without one.
    let declared = declared.and_then(|len| usize::try_from(len).ok());
    let mut hold =
        match quotas.hold_body(&scope, declared.unwrap_or(0), config.max_bytes_per_client) {
            Ok(hold) => hold,
            Err(over) => return Ok(over_quota(&over, &config)),
        };
    // Until the body is read nothing is claimed: a client that goes away here cancels nothing.
    let body = match read_body(body, config.max_request_bytes, &mut hold).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => return Ok(too_large()),
        Err(ReadError::OverQuota(over)) => return Ok(over_quota(&over, &config)),
        Err(ReadError::Failed(err)) => {
            tracing::debug!(target: "idem", error = %err, "could not read a keyed request's body");
            return Ok(Problem::RequestUnreadable
                .response("the request body failed before it was read whole", None));
        }
    };
    // An idempotency layer inside this one lets the request through.
    parts.extensions.insert(Guarded);

    // Dropped with this future, when the client goes away: the keyed request then stops if its
    // handler has not started.
    let (_client_here, client_gone) = oneshot::channel::<()>();
    let tracked = tracker.enter();
    let keyed = async move {
        let _tracked = tracked;
        let _hold = hold;
        let started = AtomicBool::new(false);
        let call = run(config, quotas, inner, parts, body, scope, key, &started);
        unless_gone(call, client_gone, &started).await
    };
    match detach(keyed).await {
        Some(Some(response)) => response,
        // Nobody is left to read it.
        Some(None) => Ok(Problem::Interrupted.response("the client went away", None)),
        None => Ok(Problem::Interrupted.response(
            "the server shut down while the request ran; retry it with the same Idempotency-Key",
            None,
        )),
    }
}

/// Why a keyed request's body was not read whole.
enum ReadError {
    /// It is larger than `max_request_bytes`.
    TooLarge,
    /// Its client's bodies would take more than its bound.
    OverQuota(OverQuota),
    /// It failed while it was read (the client went away mid-upload, a malformed chunk).
    Failed(BoxError),
}

/// Reads a keyed request's body whole, up to `limit` bytes, growing `hold` to what was read as
/// each chunk comes (a body with a `Content-Length` is held at it already).
async fn read_body<B>(body: B, limit: usize, hold: &mut BodyHold) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    // One chunk, the common case, is kept as it is; more are copied into one buffer.
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| ReadError::Failed(err.into()))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // request trailers are not part of the fingerprint
        };
        if chunk.is_empty() {
            continue;
        }
        len = len.saturating_add(chunk.len());
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        hold.grow_to(len).map_err(ReadError::OverQuota)?;
        match first.take() {
            None if more.is_empty() => first = Some(chunk),
            held => {
                if let Some(held) = held {
                    more.extend_from_slice(&held);
                }
                more.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| more.freeze()))
}

/// Whether the current tokio runtime has timers, which the executor needs to renew leases and
/// bound waits: a runtime built without `enable_time` panics on the first timer. Checked once
/// per thread (the check itself panics, caught, where the answer is no). Outside a runtime the
/// executor does without timers, so the answer is yes.
fn timers_ready() -> bool {
    thread_local! {
        static READY: Cell<bool> = const { Cell::new(false) };
    }
    if tokio::runtime::Handle::try_current().is_err() || READY.with(Cell::get) {
        return true;
    }
    let ready = std::panic::catch_unwind(|| drop(tokio::time::sleep(Duration::ZERO))).is_ok();
    if ready {
        READY.with(|r| r.set(true));
    }
    ready
}

/// Polls `call` to its end, unless the client goes away (`client_gone` resolves) before
/// `started` is set, that is before the handler starts: then `call` is dropped, which releases
/// its claim if it made one, and `None` is returned. Once the handler has started, the call runs
/// to completion whatever the client does.
async fn unless_gone<F: Future>(
    call: F,
    client_gone: oneshot::Receiver<()>,
    started: &AtomicBool,
) -> Option<F::Output> {
    let mut call = std::pin::pin!(call);
    let mut client_gone = Some(client_gone);
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(out) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        // Read after the call was polled: the handler may have started in that very poll.
        if started.load(Ordering::SeqCst) {
            client_gone = None;
        } else if let Some(gone) = client_gone.as_mut()
            && Pin::new(gone).poll(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Runs `future` in a task of its own on the current tokio runtime and waits for it, so that
/// dropping the returned future (the client went away) does not cancel it. A panic in it
/// resumes here; `None` when the runtime shut down before it finished. Without a runtime it
/// runs inline.
async fn detach<F>(future: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            let task = runtime.spawn(future.instrument(tracing::Span::current()));
            match task.await {
                Ok(output) => Some(output),
                Err(err) => match err.try_into_panic() {
                    Ok(payload) => std::panic::resume_unwind(payload),
                    Err(_cancelled) => None,
                },
            }
        }
        Err(_) => Some(future.await),
    }
}

/// Claim, check the quota, run the handler, store its response: the part of a keyed request
/// that runs to completion once its handler has started (`started` says when).
#[allow(clippy::too_many_arguments)]
async fn run<S, ReqB, ResB>(
    config: Arc<Config>,
    quotas: Arc<Quotas>,
    inner: S,
    parts: request::Parts,
    body: Bytes,
    scope: String,
    key: String,
    started: &AtomicBool,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let config = &*config;
    let fingerprint = RequestFingerprint {
        method: parts.method.as_str(),
        target: target(&parts.uri, &parts.extensions),
        names: &config.fingerprint_headers,
        headers: &parts.headers,
        body: &body,
    };
    let call = Idempotent::new(&*config.store, (scope.as_str(), key.as_str()))
        .name(config.namespace.clone())
        .fingerprint(&fingerprint)
        .ttl(config.ttl)
        .lease(config.lease)
        .on_conflict(config.on_conflict)
        .wait_timeout(config.wait_timeout);

    let limits = Limits {
        records: config.max_records_per_client,
        bytes: config.max_bytes_per_client,
        running: config.max_running_per_client,
        room: RUNNING_ROOM.min(config.max_bytes_per_client),
        ttl: config.ttl,
    };
    // Kept to capture the values a response varies on, and to check them on replay.
    let request_headers = parts.headers.clone();
    let req = Request::from_parts(parts, Either::Left(Full::new(body)));
    let (quotas, scope_name, first_headers) = (&quotas, scope.as_str(), &request_headers);
    let outcome = call
        .run_with_outcome(move || async move {
            // Only a request that would create a record gets here: replays never count.
            let reservation = quotas
                .admit(scope_name, limits)
                .map_err(Unstored::OverQuota)?;
            // From here on the handler runs to completion, whatever the client does.
            started.store(true, Ordering::SeqCst);
            let mut inner = inner;
            let response = inner.call(req).await.map_err(Unstored::Service)?;
            let (mut head, body) = response.into_parts();
            let not_stored = if head.status.is_informational() {
                // `101 Switching Protocols` and the like: not an answer that can be replayed
                // (the connection is now another protocol's), whatever the policy says.
                Some("informational")
            } else if head.status.is_server_error() {
                Some("server-error")
            } else if !(config.store_if)(&head) {
                Some("policy")
            } else {
                None
            };
            if let Some(reason) = not_stored {
                head.headers
                    .insert(IDEMPOTENT_NOT_STORED, HeaderValue::from_static(reason));
                let response = Response::from_parts(head, ResponseBody::passthrough(body));
                return Err(Unstored::Response(Box::new(response)));
            }
            let stored_head = StoredHead::new(&head, first_headers);
            let head_size = stored_head.size();
            let limit = config.max_response_bytes;
            match body::buffer(body, limit).await {
                Buffered::Whole { data, trailers } => {
                    // Counted at its real size: a response that ran is never refused for the
                    // quota.
                    reservation.settle(head_size.saturating_add(data.len()));
                    Ok(StoredResponse::new(
                        head,
                        stored_head,
                        data,
                        trailers,
                        config.ttl,
                    ))
                }
                Buffered::TooLarge(body) => {
                    tracing::warn!(
                        target: "idem",
                        limit,
                        "response larger than max_response_bytes: sent but not stored, so a \
                         retry with the same Idempotency-Key runs the handler again"
                    );
                    head.headers
                        .insert(IDEMPOTENT_NOT_STORED, HeaderValue::from_static("too-large"));
                    Err(Unstored::Response(Box::new(Response::from_parts(
                        head, body,
                    ))))
                }
                Buffered::Failed(body) => {
                    tracing::warn!(
                        target: "idem",
                        "the handler's response body failed: sent as far as it went, not \
                         stored, so a retry with the same Idempotency-Key runs the handler again"
                    );
                    head.headers.insert(
                        IDEMPOTENT_NOT_STORED,
                        HeaderValue::from_static("body-error"),
                    );
                    Err(Unstored::Response(Box::new(Response::from_parts(
                        head, body,
                    ))))
                }
            }
        })
        .await;

    match outcome {
        Ok(outcome) if outcome.status.is_replay() => {
            match outcome.value.vary_mismatch(&request_headers) {
                Some(name) => Ok(variant_mismatch(name, &key)),
                None => Ok(outcome.value.into_replay(outcome.expires_in)),
            }
        }
        Ok(outcome) => Ok(outcome.value.into_first(outcome.expires_in)),
        Err(Unstored::Response(response)) => Ok(*response),
        Err(Unstored::Service(err)) => Err(err),
        Err(Unstored::OverQuota(over)) => Ok(over_quota(&over, config)),
        Err(Unstored::Idem(err)) => Ok(executor_problem(&err, &key)),
    }
}

/// The answer to a client over its quota.
fn over_quota<B>(over: &OverQuota, config: &Config) -> Response<ResponseBody<B>> {
    let usage = &over.usage;
    let detail = match over.bound {
        Bound::Records => format!(
            "this client holds {} idempotency records ({} of them running); the limit is {}: \
             retry after Retry-After",
            usage.records, usage.running, config.max_records_per_client
        ),
        Bound::Bytes => format!(
            "this client's stored responses take {} bytes, and {} more are held for its {} \
             requests running; the limit is {} bytes: retry after Retry-After",
            usage.bytes, usage.reserved_bytes, usage.running, config.max_bytes_per_client
        ),
        Bound::Running => format!(
            "this client has {} keyed requests running; the limit is {}: retry when one ends",
            usage.running, config.max_running_per_client
        ),
        Bound::Buffered => format!(
            "the server holds {} bytes of this client's keyed request bodies; the limit is {} \
             bytes: retry when its requests in progress end",
            usage.buffered_bytes, config.max_bytes_per_client
        ),
    };
    tracing::info!(
        target: "idem",
        bound = ?over.bound,
        records = usage.records,
        bytes = usage.bytes,
        running = usage.running,
        buffered_bytes = usage.buffered_bytes,
        "a client is over its idempotency quota"
    );
    Problem::QuotaExceeded.response(&detail, Some(over.retry_after))
}

/// The answer to a retry whose negotiated headers differ from the first request's.
fn variant_mismatch<B>(name: &HeaderName, key: &str) -> Response<ResponseBody<B>> {
    Problem::VariantMismatch.response(
        &format!(
            "the stored response for Idempotency-Key {} varies on {name}, and this request's \
             {name} differs from the first request's: send the same {name}, or put content \
             negotiation (compression) outside the idempotency layer",
            show_key(key)
        ),
        None,
    )
}

/// The answer to an executor error; the handler has not run (or its run was not stored).
fn executor_problem<B>(err: &Error, key: &str) -> Response<ResponseBody<B>> {
    let shown = show_key(key);
    match err {
        Error::InProgress { retry_after } => Problem::InProgress.response(
            &format!(
                "a request with Idempotency-Key {shown} is still in progress; retry after it \
                 completes"
            ),
            Some(*retry_after),
        ),
        Error::KeyReused => Problem::KeyReused.response(
            &format!(
                "Idempotency-Key {shown} was used for a request with another method, path, \
                 query, body or content headers; use a new key for a new request"
            ),
            None,
        ),
        Error::Codec(_) => Problem::RecordUnreadable.response(
            &format!("the stored response for Idempotency-Key {shown} could not be read"),
            None,
        ),
        Error::StoreFull(_) => Problem::StoreFull.response(
            "the idempotency store is at its capacity and took no new key; the request was not \
             processed, retry later",
            None,
        ),
        // The executor logged the cause; the client learns only that it should retry later.
        _ => Problem::StoreUnavailable.response(
            "the idempotency store could not be reached; the request was not processed",
            None,
        ),
    }
}

/// The key as a JSON-safe, bounded string for a problem's detail.
fn show_key(key: &str) -> String {
    let mut shown: String = key.chars().take(64).collect();
    if shown.len() < key.len() {
        shown.push('…');
    }
    format!("\"{shown}\"")
}
