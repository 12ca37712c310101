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
//! | the same key while the first request is still running | `409 Conflict` with `Retry-After` (or, with [`OnConflict::Wait`](crate::OnConflict::Wait), the first response once it is there) |
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
//! # A handler that started finishes
//!
//! Once a keyed request has claimed its key, its handler runs in a task of its own on the
//! current tokio runtime, and the response future only waits for it. A client that disconnects
//! (hyper then drops the response future) does not cancel the handler: it runs to completion,
//! its response is stored, and the client's retry gets that response with
//! `Idempotent-Replayed: true` instead of a second run. A retry that arrives while the first
//! run is still going gets `409` (or waits for it, with [`OnConflict::Wait`](crate::OnConflict::Wait)). A panic in the
//! handler frees the key and is resumed in the response future. Outside a tokio runtime the
//! handler runs in the response future itself.
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
//! - A handler that fails (its service returns an error, or its body fails) stores nothing.
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
//! | <span id="idempotency-interrupted">`#idempotency-interrupted`</span> | 503 | the server's runtime shut down while the request ran; retry with the same key |
//! | <span id="idempotency-record-unreadable">`#idempotency-record-unreadable`</span> | 500 | the stored response for the key no longer decodes |

mod body;
mod future;
mod header;
mod keyed;
mod layer;
mod problem;
mod record;
mod service;

use http::header::HeaderName;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use service::{IdempotencyService, RequestBody};

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
