//! `Idempotency-Key` for HTTP: a [tower](https://docs.rs/tower) layer for axum and any tower
//! service (feature `http`).
//!
//! [`IdempotencyLayer`] gives a service the semantics that Stripe made standard and that the IETF
//! httpapi draft "The Idempotency-Key HTTP Header Field" writes down. A client sends a `POST`
//! with `Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`; the response is lost; the
//! client sends the same request again, and gets the first response back instead of a second
//! order, charge or email.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::post, http::StatusCode};
//! use idem_runtime::{MemoryStore, http::IdempotencyLayer};
//!
//! async fn create_order(body: String) -> (StatusCode, String) {
//!     // Runs once per Idempotency-Key (and client): retries get this response back.
//!     (StatusCode::CREATED, format!("{{\"order\":{body}}}"))
//! }
//!
//! # #[tokio::main] async fn main() -> std::io::Result<()> {
//! let layer = IdempotencyLayer::new(MemoryStore::new())
//!     .ttl(Duration::from_secs(24 * 60 * 60))
//!     .require_key(true)
//!     // Two clients that pick the same key never see each other's responses.
//!     .scope_header(axum::http::HeaderName::from_static("x-api-key"));
//!
//! let app = Router::new().route("/orders", post(create_order)).layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! # What a request gets
//!
//! For a request whose method is guarded (`POST` and `PATCH` unless set with
//! [`methods`](IdempotencyLayer::methods)) and that carries an `Idempotency-Key`:
//!
//! | situation | answer |
//! | --- | --- |
//! | first request with this key (from this client) | the handler runs; its response is stored and returned |
//! | the same key and the same request again | the stored response, byte for byte, plus `Idempotent-Replayed: true`; the handler does not run |
//! | the same key while the first request is still running | `409 Conflict` with `Retry-After` (or, with [`OnConflict::Wait`], the first response once it is there) |
//! | the same key with a different request (method, path and query, or body) | `422 Unprocessable Content` |
//! | no key, where [`require_key`](IdempotencyLayer::require_key) is set | `400 Bad Request` (without it, the request passes through unguarded) |
//! | a malformed key, a repeated header, or a key longer than [`max_key_len`](IdempotencyLayer::max_key_len) | `400 Bad Request` |
//! | a request body larger than [`max_request_bytes`](IdempotencyLayer::max_request_bytes) | `413 Content Too Large` |
//! | the store cannot be reached | `503 Service Unavailable`; the handler never runs unguarded |
//!
//! Methods not guarded (`GET`, `PUT`, `DELETE`, ... by default) pass through untouched, as do
//! guarded requests without a key unless one is required.
//!
//! The key is accepted both as the draft's Structured Field String (`"abc"`, with `\"` and `\\`
//! escapes) and as the bare token Stripe's clients send (`abc`, visible ASCII); both name the
//! same key. The key is scoped by the client the [scope function](IdempotencyLayer::scope) finds
//! in the request, and by the layer's [namespace](IdempotencyLayer::namespace); the store only
//! sees a digest of the three.
//!
//! # What is stored
//!
//! - A `2xx`, `3xx` or `4xx` response is stored for [`ttl`](IdempotencyLayer::ttl): its status,
//!   its end-to-end headers and its body. Hop-by-hop headers (`Connection` and the headers it
//!   names, `Keep-Alive`, `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`,
//!   `Proxy-Authenticate`, `Proxy-Authorization`, `Proxy-Connection`) are not stored, nor is
//!   `Content-Length` (the server sets it again from the stored body), nor trailers.
//! - A `5xx` response is not stored: it is passed through as it is, with
//!   `Idempotent-Not-Stored: server-error`, and a retry runs the handler again.
//! - A response whose body is larger than [`max_response_bytes`](IdempotencyLayer::max_response_bytes)
//!   is not stored either (never truncated): it is passed through whole, with
//!   `Idempotent-Not-Stored: too-large` and a `tracing` warning (target `idem`), and a retry runs
//!   the handler again. Raise the limit for endpoints with large responses.
//! - A handler that fails (its service returns an error, or its body fails) or whose request is
//!   cancelled stores nothing.
//!
//! # Buffering
//!
//! To fingerprint a request the layer reads its whole body first, up to
//! [`max_request_bytes`](IdempotencyLayer::max_request_bytes) (a larger one is answered `413`
//! without running the handler; a `Content-Length` over the limit is refused before reading).
//! To store a response it reads its whole body before sending it, up to
//! [`max_response_bytes`](IdempotencyLayer::max_response_bytes). Unguarded requests are not
//! buffered. Do not guard streaming endpoints (server-sent events) with a key.
//!
//! # Problems
//!
//! The layer's own answers carry an RFC 9457 `application/problem+json` body:
//! `{"type": "...", "title": "...", "status": 409, "detail": "..."}`. Its `type` is this page's
//! address followed by one of these fragments:
//!
//! | `type` fragment | status | when |
//! | --- | --- | --- |
//! | <span id="idempotency-key-missing">`#idempotency-key-missing`</span> | 400 | a guarded request has no key and one is required |
//! | <span id="idempotency-key-invalid">`#idempotency-key-invalid`</span> | 400 | the key is empty, malformed, or the header is repeated |
//! | <span id="idempotency-key-too-long">`#idempotency-key-too-long`</span> | 400 | the key is longer than the limit |
//! | <span id="idempotency-client-unknown">`#idempotency-client-unknown`</span> | 403 | the scope function found no client in the request |
//! | <span id="idempotency-request-too-large">`#idempotency-request-too-large`</span> | 413 | the request body is larger than the limit |
//! | <span id="idempotency-request-unreadable">`#idempotency-request-unreadable`</span> | 400 | the request body failed while it was read |
//! | <span id="idempotency-key-in-progress">`#idempotency-key-in-progress`</span> | 409 | another request with the key is running (`Retry-After` says for how long at most) |
//! | <span id="idempotency-key-reused">`#idempotency-key-reused`</span> | 422 | the key was used for a different request |
//! | <span id="idempotency-store-unavailable">`#idempotency-store-unavailable`</span> | 503 | the store failed; the handler did not run |
//! | <span id="idempotency-record-unreadable">`#idempotency-record-unreadable`</span> | 500 | the stored response for the key no longer decodes |

mod body;
mod header;
mod problem;
mod record;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, request};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use tower_layer::Layer;
use tower_service::Service;

pub use body::ResponseBody;

use crate::error::{BoxError, Error};
use crate::exec::{DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, Idempotent, OnConflict};
use crate::key::{Encoder, KeyPart};
use crate::store::{BoxFuture, Store};
use body::Buffered;
use header::KeyError;
use problem::Problem;
use record::StoredResponse;

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header set on a replayed response: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The response header set on a response to a keyed request that was not stored:
/// `Idempotent-Not-Stored: server-error` (a `5xx`) or `too-large` (over
/// [`max_response_bytes`](IdempotencyLayer::max_response_bytes)). A retry runs the handler again.
pub const IDEMPOTENT_NOT_STORED: HeaderName = HeaderName::from_static("idempotent-not-stored");

/// The longest key accepted unless set otherwise: 255 bytes (Stripe's limit).
pub const DEFAULT_MAX_KEY_LEN: usize = 255;
/// The largest request body buffered unless set otherwise: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The largest response body stored unless set otherwise: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The namespace of the keys unless set otherwise.
pub const DEFAULT_NAMESPACE: &str = "idem.http";

/// Finds the client a request belongs to.
type ScopeFn = Arc<dyn Fn(&request::Parts) -> Option<String> + Send + Sync>;

/// A tower [`Layer`] that gives `POST` and `PATCH` requests `Idempotency-Key` semantics: see
/// the [module documentation](self) for what each request gets.
///
/// Configure it with the builder methods; every instance of the service it makes shares one
/// configuration and one store.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    store: Arc<dyn Store>,
    namespace: Cow<'static, str>,
    methods: Vec<Method>,
    require_key: bool,
    max_key_len: usize,
    max_request_bytes: usize,
    max_response_bytes: usize,
    ttl: Duration,
    lease: Duration,
    on_conflict: OnConflict,
    wait_timeout: Duration,
    scope: ScopeFn,
}

impl IdempotencyLayer {
    /// A layer keeping its records in `store` (any [`Store`]: `MemoryStore`, `Arc<S>`,
    /// `Arc<dyn Store>`, ...), with the defaults: methods `POST` and `PATCH`; key optional;
    /// [`DEFAULT_TTL`]; [`DEFAULT_LEASE`]; [`DEFAULT_MAX_KEY_LEN`];
    /// [`DEFAULT_MAX_REQUEST_BYTES`]; [`DEFAULT_MAX_RESPONSE_BYTES`]; `409` while a request with
    /// the key is running ([`OnConflict::Reject`]); and every request from one client (set
    /// [`scope`](Self::scope) as soon as there are several).
    pub fn new(store: impl Store + 'static) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                store: Arc::new(store),
                namespace: Cow::Borrowed(DEFAULT_NAMESPACE),
                methods: vec![Method::POST, Method::PATCH],
                require_key: false,
                max_key_len: DEFAULT_MAX_KEY_LEN,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
                ttl: DEFAULT_TTL,
                lease: DEFAULT_LEASE,
                on_conflict: OnConflict::Reject,
                wait_timeout: DEFAULT_WAIT_TIMEOUT,
                scope: Arc::new(|_| Some(String::new())),
            }),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        self
    }

    /// The methods guarded; others pass through untouched. Default: `POST` and `PATCH`.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|c| c.methods = methods)
    }

    /// Whether a guarded request without `Idempotency-Key` is refused with `400` (`true`) or
    /// passed through unguarded (`false`, the default).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|c| c.require_key = required)
    }

    /// How long a stored response is replayed. Default: [`DEFAULT_TTL`] (24 hours).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// How long a running request holds its key without renewal; renewed while the handler
    /// runs. A request whose handler stops being polled (its server died) frees the key after
    /// this. Default: [`DEFAULT_LEASE`] (30 seconds).
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease)
    }

    /// The longest key accepted, in bytes after unquoting; a longer one is refused with `400`.
    /// Default: [`DEFAULT_MAX_KEY_LEN`] (255).
    pub fn max_key_len(self, len: usize) -> Self {
        self.with(|c| c.max_key_len = len)
    }

    /// The largest request body read to fingerprint a keyed request; a larger one is refused
    /// with `413`. Default: [`DEFAULT_MAX_REQUEST_BYTES`] (1 MiB).
    pub fn max_request_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_bytes = bytes)
    }

    /// The largest response body stored. A larger one is passed through whole and not stored,
    /// with `Idempotent-Not-Stored: too-large` and a warning. Default:
    /// [`DEFAULT_MAX_RESPONSE_BYTES`] (1 MiB).
    pub fn max_response_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_response_bytes = bytes)
    }

    /// What a request does while another request with its key is running:
    /// [`OnConflict::Reject`] answers `409 Conflict` at once (the default, as the draft and Stripe
    /// do); [`OnConflict::Wait`] waits for the first response (up to
    /// [`wait_timeout`](Self::wait_timeout), then `409`).
    pub fn on_conflict(self, on_conflict: OnConflict) -> Self {
        self.with(|c| c.on_conflict = on_conflict)
    }

    /// The longest a request waits with [`OnConflict::Wait`]. Default:
    /// [`DEFAULT_WAIT_TIMEOUT`] (60 seconds).
    pub fn wait_timeout(self, wait_timeout: Duration) -> Self {
        self.with(|c| c.wait_timeout = wait_timeout)
    }

    /// The namespace of the keys, so that several services sharing a store never share
    /// records. Default: [`DEFAULT_NAMESPACE`].
    pub fn namespace(self, namespace: impl Into<Cow<'static, str>>) -> Self {
        let namespace = namespace.into();
        self.with(|c| c.namespace = namespace)
    }

    /// How to tell clients apart: `scope` maps a request to the client it belongs to (an API
    /// key, a user id that an authentication layer put in the extensions), and keys are
    /// per client, so two clients that pick the same key never see each other's responses.
    /// `None` refuses a keyed request with `403`.
    ///
    /// ```
    /// # use idem_runtime::{MemoryStore, http::IdempotencyLayer};
    /// #[derive(Clone)]
    /// struct UserId(u64); // inserted by the authentication layer
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .scope(|req| req.extensions.get::<UserId>().map(|u| u.0.to_string()));
    /// ```
    ///
    /// Default: every request belongs to one client.
    pub fn scope<F>(self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        let scope: ScopeFn = Arc::new(scope);
        self.with(|c| c.scope = scope)
    }

    /// Clients told apart by the value of a request header (an API key): a request without it
    /// (or with a value that is not UTF-8) is refused with `403` when it carries a key.
    pub fn scope_header(self, name: HeaderName) -> Self {
        self.scope(move |req| {
            let mut values = req.headers.get_all(&name).iter();
            let value = values.next()?;
            if values.next().is_some() {
                return None; // which one would it be?
            }
            std::str::from_utf8(value.as_bytes())
                .ok()
                .map(str::to_owned)
        })
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &c.namespace)
            .field("methods", &c.methods)
            .field("require_key", &c.require_key)
            .field("max_key_len", &c.max_key_len)
            .field("max_request_bytes", &c.max_request_bytes)
            .field("max_response_bytes", &c.max_response_bytes)
            .field("ttl", &c.ttl)
            .field("lease", &c.lease)
            .field("on_conflict", &c.on_conflict)
            .field("wait_timeout", &c.wait_timeout)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around `S`.
///
/// It takes `Request<ReqB>` and gives the inner service `Request<Either<Full<Bytes>, ReqB>>`:
/// the buffered body of a keyed request (left), or the original body, untouched (right). axum's
/// routers and handlers take both. Its responses have a [`ResponseBody`].
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The body the inner service receives: a keyed request's buffered body, or the original.
pub type RequestBody<B> = Either<Full<Bytes>, B>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The instance that was polled ready serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);

        if !config.methods.contains(req.method()) {
            return passthrough(inner.call(req.map(Either::Right)));
        }
        let key = match header::idempotency_key(req.headers(), config.max_key_len) {
            Ok(Some(key)) => key,
            Ok(None) if !config.require_key => {
                return passthrough(inner.call(req.map(Either::Right)));
            }
            Ok(None) => {
                let detail = format!(
                    "{} {} requires an Idempotency-Key header",
                    req.method(),
                    req.uri().path()
                );
                return refuse(Problem::KeyMissing, &detail, None);
            }
            Err(err) => {
                let (problem, detail) = match err {
                    KeyError::TooLong(len) => (
                        Problem::KeyTooLong,
                        format!(
                            "the Idempotency-Key is {len} bytes long; the limit is {}",
                            config.max_key_len
                        ),
                    ),
                    KeyError::Repeated => (
                        Problem::KeyInvalid,
                        "send one Idempotency-Key header, not several".to_owned(),
                    ),
                    KeyError::Empty => (
                        Problem::KeyInvalid,
                        "the Idempotency-Key is empty".to_owned(),
                    ),
                    KeyError::Malformed => (
                        Problem::KeyInvalid,
                        "the Idempotency-Key must be a Structured Field String (\"abc\") or a \
                         bare token of visible ASCII characters"
                            .to_owned(),
                    ),
                };
                return refuse(problem, &detail, None);
            }
        };
        Box::pin(guarded(config, inner, req, key))
    }
}

/// The inner service's response, its body untouched.
fn passthrough<F, ResB, E>(future: F) -> BoxFuture<'static, Result<Response<ResponseBody<ResB>>, E>>
where
    F: Future<Output = Result<Response<ResB>, E>> + Send + 'static,
{
    Box::pin(async move { Ok(future.await?.map(ResponseBody::passthrough)) })
}

/// The layer's own answer, the handler not run.
fn refuse<ResB, E>(
    problem: Problem,
    detail: &str,
    retry_after: Option<Duration>,
) -> BoxFuture<'static, Result<Response<ResponseBody<ResB>>, E>>
where
    ResB: Send + 'static,
    E: Send + 'static,
{
    tracing::debug!(
        target: "idem",
        status = problem.status().as_u16(),
        detail,
        "idempotency layer refused a request"
    );
    let response = problem.response(detail, retry_after);
    Box::pin(std::future::ready(Ok(response)))
}

/// How the handler's run ended when it gives no response to store.
enum Unstored<B, E> {
    /// The executor's error: conflict, key reuse, store failure.
    Idem(Error),
    /// The inner service failed: its error goes to the caller.
    Service(E),
    /// A response that is sent but not stored (`5xx`, too large, or a body that failed).
    Response(Box<Response<ResponseBody<B>>>),
}

impl<B, E> From<Error> for Unstored<B, E> {
    fn from(err: Error) -> Self {
        Unstored::Idem(err)
    }
}

/// What must match for a key's stored response to be replayed: method, path and query, body.
struct RequestFingerprint<'a> {
    method: &'a str,
    target: &'a str,
    body: &'a [u8],
}

impl KeyPart for RequestFingerprint<'_> {
    fn encode(&self, enc: &mut Encoder) {
        enc.write_tuple_header(3);
        enc.write_str(self.method);
        enc.write_str(self.target);
        enc.write_bytes(self.body);
    }
}

/// A guarded request with a key: buffer, fingerprint, then run the handler through the executor.
async fn guarded<S, ReqB, ResB>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<ReqB>,
    key: String,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body<Data = Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let Some(scope) = (config.scope)(&parts) else {
        let detail = "this request does not say which client sent it, so its Idempotency-Key \
                      cannot be scoped";
        tracing::debug!(target: "idem", detail, "idempotency layer refused a request");
        return Ok(Problem::ClientUnknown.response(detail, None));
    };

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
    let body = match Limited::new(body, config.max_request_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => return Ok(too_large()),
        Err(err) => {
            tracing::debug!(target: "idem", error = %err, "could not read a keyed request's body");
            return Ok(Problem::RequestUnreadable
                .response("the request body failed before it was read whole", None));
        }
    };

    let fingerprint = RequestFingerprint {
        method: parts.method.as_str(),
        target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        body: &body,
    };
    let call = Idempotent::new(&*config.store, (scope.as_str(), key.as_str()))
        .name(config.namespace.clone())
        .fingerprint(&fingerprint)
        .ttl(config.ttl)
        .lease(config.lease)
        .on_conflict(config.on_conflict)
        .wait_timeout(config.wait_timeout);

    let max_response = config.max_response_bytes;
    let req = Request::from_parts(parts, Either::Left(Full::new(body)));
    let outcome = call
        .run_with_outcome(move || async move {
            let response = inner.call(req).await.map_err(Unstored::Service)?;
            let (mut head, body) = response.into_parts();
            if head.status.is_server_error() {
                head.headers.insert(
                    IDEMPOTENT_NOT_STORED,
                    HeaderValue::from_static("server-error"),
                );
                let response = Response::from_parts(head, ResponseBody::passthrough(body));
                return Err(Unstored::Response(Box::new(response)));
            }
            match body::buffer(body, max_response).await {
                Buffered::Whole { data, trailers } => Ok(StoredResponse::new(head, data, trailers)),
                Buffered::TooLarge(body) => {
                    tracing::warn!(
                        target: "idem",
                        limit = max_response,
                        "response larger than max_response_bytes: sent but not stored, so a \
                         retry with the same Idempotency-Key runs the handler again"
                    );
                    head.headers
                        .insert(IDEMPOTENT_NOT_STORED, HeaderValue::from_static("too-large"));
                    Err(Unstored::Response(Box::new(Response::from_parts(
                        head, body,
                    ))))
                }
                Buffered::Failed(body) => Err(Unstored::Response(Box::new(Response::from_parts(
                    head, body,
                )))),
            }
        })
        .await;

    match outcome {
        Ok(outcome) if outcome.status.is_replay() => Ok(outcome.value.into_replay()),
        Ok(outcome) => Ok(outcome.value.into_first()),
        Err(Unstored::Response(response)) => Ok(*response),
        Err(Unstored::Service(err)) => Err(err),
        Err(Unstored::Idem(err)) => Ok(executor_problem(&err, &key)),
    }
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
                "Idempotency-Key {shown} was used for a request with another method, path, query \
                 or body; use a new key for a new request"
            ),
            None,
        ),
        Error::Codec(_) => Problem::RecordUnreadable.response(
            &format!("the stored response for Idempotency-Key {shown} could not be read"),
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
