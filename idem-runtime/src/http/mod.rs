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
//! // Layers added after this one wrap it: put rate limiting, authentication, validation,
//! // compression and content negotiation there, outside (see "Where the layer goes").
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
//! | first request with this key (from this client) | the handler runs; its response is stored (see [What is stored](#what-is-stored)) and returned, with [`Idempotent-Expires-In`](IDEMPOTENT_EXPIRES_IN) |
//! | the same key and the same request again | the stored response, byte for byte, plus `Idempotent-Replayed: true`, `Age` and [`Idempotent-Expires-In`](IDEMPOTENT_EXPIRES_IN); the handler does not run |
//! | the same key while the first request is still running | `409 Conflict` with `Retry-After` (or, with [`OnConflict::Wait`](crate::OnConflict::Wait), the first response once it is there) |
//! | the same key with a different request (method, path and query, [fingerprinted headers](IdempotencyLayer::fingerprint_headers), or body) | `422 Unprocessable Content` |
//! | the same key and request, but another value of a header the stored response varies on (`Vary`) | `422 Unprocessable Content`; the handler does not run |
//! | a new key from a client that holds as many records, bytes or running requests as its [quota](#quotas) allows, or a request whose body would take the client's bodies held at once past its byte quota | `429 Too Many Requests` with `Retry-After`; the handler does not run, and the client's existing keys still replay |
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
//! # Clients
//!
//! Keys belong to a client: two clients that send the same key never see each other's
//! responses. By default ([`scope_authorization`](IdempotencyLayer::scope_authorization)) the
//! client is a digest of the request's `Authorization` header, so requests with different
//! credentials never share a key space. A keyed request without `Authorization` has no client,
//! and is refused with `403` [`#idempotency-client-unknown`](#idempotency-client-unknown): it
//! is not put in a space shared by every anonymous caller, where one could read another's
//! responses by guessing its key and use up everyone's quota. Cookies are not used: a session
//! cookie that changes between a request and its retry would make the retry miss its record
//! and run the handler again. [`scope`](IdempotencyLayer::scope) sets a client of your own (the
//! user an authentication layer found), [`scope_header`](IdempotencyLayer::scope_header) an API
//! key header, and [`scope_shared`](IdempotencyLayer::scope_shared) puts every request in one
//! space (and one quota), explicitly: the only way keyed requests without credentials are
//! served. Any scope function that finds no client refuses the keyed request with `403`.
//!
//! # Quotas
//!
//! One client cannot deny another. Each client may hold at most
//! [`max_records_per_client`](IdempotencyLayer::max_records_per_client) records (requests
//! running, and stored responses until their ttl runs out; default
//! [`DEFAULT_MAX_RECORDS_PER_CLIENT`]),
//! [`max_bytes_per_client`](IdempotencyLayer::max_bytes_per_client) bytes of stored responses
//! (default [`DEFAULT_MAX_BYTES_PER_CLIENT`], 8 MiB), and
//! [`max_running_per_client`](IdempotencyLayer::max_running_per_client) keyed requests
//! running at once (default [`DEFAULT_MAX_RUNNING_PER_CLIENT`], 16). A request that would make
//! one more record for a client at its quota is answered `429 Too Many Requests`, with
//! `Retry-After` saying when the client's oldest record expires (or `1` when its running
//! requests hold what it needs), and the handler does not run; that answer is not stored.
//! Retries of the client's existing keys are still replayed, and every other client is served.
//!
//! The quota is checked only when a request would create a record: after its key is claimed,
//! before its handler runs. A running request holds a small room (16 KiB) of the byte quota;
//! once its response is stored, the response counts at its real size, whatever that is: a
//! response whose handler ran is never refused for the quota (the retry would run the handler
//! again). So a client can go over its byte quota, by at most what its running requests store
//! at once: `max_running_per_client` × [`max_response_bytes`](IdempotencyLayer::max_response_bytes),
//! 16 MiB with the defaults. Then its new keys get `429` until enough of its records expire.
//!
//! The same byte bound applies, separately, to the request bodies the layer holds for a
//! client's keyed requests at once: from before a body is read (at its `Content-Length`, or
//! chunk by chunk for a body of unknown length) until the request leaves the layer (waiting
//! with [`OnConflict::Wait`](crate::OnConflict::Wait) included). A request that would take the
//! client past it is answered `429` with `Retry-After: 1` at once, before the rest of its body
//! is read, so uploads that stall before their last byte cannot pile up.
//!
//! Each process counts its own: the counts are this layer's, in this process, of the records
//! it created, not a query of the store. Several processes sharing a store each allow a client
//! its quota. The defaults keep one client to 1% of [`MemoryStore`](crate::MemoryStore)'s
//! default bound of 1 000 000 records, and to 8 MiB of responses (8 of the largest size
//! stored), plus what its running requests store at once; a client with more keyed
//! writes per ttl than that needs a higher quota or a shorter ttl. The quota trusts the scope:
//! with the default scope, put the authentication layer outside this one, or a client can make
//! up a new `Authorization` for every request.
//!
//! # What is stored
//!
//! - Responses [`store_if`](IdempotencyLayer::store_if) accepts are stored for
//!   [`ttl`](IdempotencyLayer::ttl): their status, end-to-end headers and body. The default
//!   ([`store_by_default`]) stores `2xx`, `3xx` and `4xx`, except the answers that mean "not
//!   executed, try again": `408 Request Timeout`, `425 Too Early`, `429 Too Many Requests`, and
//!   any response with `Retry-After`. `3xx` is stored because a `303 See Other` after a `POST`
//!   is the executed request's answer: not storing it would run the handler again on retry.
//! - A `5xx` response is never stored, whatever the policy: it is passed through as it is,
//!   with `Idempotent-Not-Stored: server-error`, and a retry runs the handler again. A
//!   response the policy refuses is passed through with `Idempotent-Not-Stored: policy`.
//!   With [`OnConflict::Wait`](crate::OnConflict::Wait), duplicates sent while the first
//!   request runs wait for it; when it answers `5xx` nothing is stored for them to get, so
//!   each in turn takes the key and runs the handler itself: N duplicates of a request whose
//!   handler answers `5xx` are N executions, one after another. With the default
//!   [`OnConflict::Reject`](crate::OnConflict::Reject) they get `409` instead, and retry.
//! - Hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`,
//!   `Transfer-Encoding`, `TE`, `Trailer`, `Upgrade`, `Proxy-Authenticate`,
//!   `Proxy-Authorization`, `Proxy-Connection`) are not stored, nor is `Content-Length` (the
//!   server sets it again from the stored body), nor trailers.
//! - A response whose body is larger than [`max_response_bytes`](IdempotencyLayer::max_response_bytes)
//!   is not stored either (never truncated): it is passed through whole, with
//!   `Idempotent-Not-Stored: too-large` and a `tracing` warning (target `idem`), and a retry runs
//!   the handler again. Raise the limit for endpoints with large responses.
//! - A handler that fails stores nothing. When its service returns an error, the error goes
//!   to the server. When its response body fails while the layer reads it, the response is
//!   sent as far as it went, with `Idempotent-Not-Stored: body-error` and a `tracing` warning,
//!   and then broken off as it would be without the layer: it is sent without a length
//!   (chunked), and the server closes the connection before its end, so the client can tell it
//!   is incomplete.
//!
//! A response that is not stored (`5xx`, refused by the policy, too large, or a body that
//! failed) frees its key: **the retry runs the handler again**.
//!
//! # Vary and content negotiation
//!
//! A stored response is replayed only to a retry that would have been given it. When the
//! response declares `Vary` (a compression layer inside this one adds
//! `Vary: accept-encoding`), the first request's values of the headers it names are stored
//! with it, and a retry that sends other values (no `Accept-Encoding`, where the first request
//! offered gzip) is answered `422` [`#idempotency-variant-mismatch`](#idempotency-variant-mismatch)
//! naming the header, never the first request's gzip body and never a second run. Values match
//! when they carry the same comma-separated items in the same order (spaces aside).
//! `Vary: *` names nothing that can be compared: such a response is replayed to every retry.
//!
//! Put compression and content negotiation **outside** this layer: then the stored response is
//! the handler's own, and each retry gets it encoded for what it accepts.
//!
//! # Where the layer goes
//!
//! Layers that answer in the handler's place without running it belong outside this one, so
//! their answers are never stored in place of the handler's:
//!
//! - **rate limiting and load shedding**: a `429` or `503` inside would be the key's answer
//!   (the default policy refuses those, but a limiter that answers otherwise would be stored);
//!   outside, a limited request never claims its key;
//! - **authentication and authorization**: a `401` or `403` inside would be stored and replayed
//!   to the retry that brings fixed credentials; outside, the scope function sees who the
//!   client is (an extension the authentication layer set), and made-up credentials never
//!   reach the quota;
//! - **validation** that answers `400` or `422` before the handler: the same, for a retry that
//!   fixes the request (it must use a new key anyway, as its fingerprint changed);
//! - **compression and content negotiation**: see [above](#vary-and-content-negotiation);
//! - **timeouts** (tower-http's `TimeoutLayer` and the like): inside, a timeout cancels the
//!   handler mid-way and answers `408 Request Timeout`, which is not stored (it means "not
//!   executed, try again"), so the key is freed and **the retry runs the handler again**, after
//!   the first run may have done part of its work. Outside, the timeout answers the client
//!   `408` while the handler, in its own task, runs to completion and its response is stored:
//!   the retry gets it, and the handler runs once.
//!
//! With axum, `router.layer(a).layer(b)` puts `b` outside `a`: add this layer first.
//!
//! # Buffering
//!
//! To fingerprint a request the layer reads its whole body first, up to
//! [`max_request_bytes`](IdempotencyLayer::max_request_bytes) (a larger one is answered `413`
//! without running the handler; a `Content-Length` over the limit is refused before reading),
//! holding it against its client's byte quota from before it is read (see [Quotas](#quotas)).
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
//! | <span id="idempotency-variant-mismatch">`#idempotency-variant-mismatch`</span> | 422 | the stored response varies (`Vary`) on a request header whose value differs from the first request's; the detail names it |
//! | <span id="idempotency-quota-exceeded">`#idempotency-quota-exceeded`</span> | 429 | the client holds as many records, bytes, running requests or request bodies as its quota allows (`Retry-After` says when room may free) |
//! | <span id="idempotency-store-unavailable">`#idempotency-store-unavailable`</span> | 503 | the store failed; the handler did not run |
//! | <span id="idempotency-store-full">`#idempotency-store-full`</span> | 503 | the store is at its capacity ([`Error::StoreFull`](crate::Error::StoreFull): the in-memory store's bound) and took no new key; the handler did not run |
//! | <span id="idempotency-interrupted">`#idempotency-interrupted`</span> | 503 | the server's runtime shut down while the request ran; retry with the same key |
//! | <span id="idempotency-record-unreadable">`#idempotency-record-unreadable`</span> | 500 | the stored response for the key no longer decodes |

mod body;
mod drain;
mod future;
mod header;
mod keyed;
mod layer;
mod problem;
mod quota;
mod record;
mod service;
mod vary;

use http::StatusCode;
use http::header::{HeaderName, RETRY_AFTER};
use http::response;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use layer::IdempotencyLayer;
pub use quota::ClientUsage;
pub use service::{IdempotencyService, RequestBody};

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header set on a replayed response: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The response header set on a response to a keyed request that was not stored, with the
/// reason: `server-error` (a `5xx`), `informational` (a `1xx`, such as `101 Switching
/// Protocols`), `policy` (refused by [`store_if`](IdempotencyLayer::store_if)), `too-large`
/// (over [`max_response_bytes`](IdempotencyLayer::max_response_bytes)) or `body-error` (the
/// handler's response body failed while it was read). A retry runs the handler again.
pub const IDEMPOTENT_NOT_STORED: HeaderName = HeaderName::from_static("idempotent-not-stored");

/// The response header that says how long the record of the request's key lives on, in whole
/// seconds (rounded down), on the response that was stored and on every replay:
/// `Idempotent-Expires-In: 86399`. Until then a retry with the key gets the stored response;
/// after it, the handler runs again. Absent when the response was not stored
/// ([`IDEMPOTENT_NOT_STORED`]) or the store does not know (a record stored late, in the
/// background).
pub const IDEMPOTENT_EXPIRES_IN: HeaderName = HeaderName::from_static("idempotent-expires-in");

/// The longest key accepted unless set otherwise: 255 bytes (Stripe's limit).
pub const DEFAULT_MAX_KEY_LEN: usize = 255;
/// The largest request body buffered unless set otherwise: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The largest response body stored unless set otherwise: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// The most records one client holds unless set otherwise: 10 000, 1% of
/// [`MemoryStore`](crate::MemoryStore)'s default bound of a million, so that it takes a hundred
/// clients at their record quota to fill the default store's entries.
pub const DEFAULT_MAX_RECORDS_PER_CLIENT: usize = 10_000;
/// The most bytes of stored responses one client holds unless set otherwise: 8 MiB, 1/128 of
/// [`MemoryStore`](crate::MemoryStore)'s default bound of 1 GiB. A client may go past it by
/// what its running requests store at once (at most [`DEFAULT_MAX_RUNNING_PER_CLIENT`]
/// responses of [`DEFAULT_MAX_RESPONSE_BYTES`]: 16 MiB), so it takes 128 clients at their byte
/// quota, and at least 43 in the worst case (each 24 MiB), to fill the default store's bytes.
pub const DEFAULT_MAX_BYTES_PER_CLIENT: usize = 8 * 1024 * 1024;
/// The most keyed requests of one client running at once unless set otherwise: 16.
pub const DEFAULT_MAX_RUNNING_PER_CLIENT: usize = 16;
/// The namespace of the keys unless set otherwise.
pub const DEFAULT_NAMESPACE: &str = "idem.http";

/// The default storage policy of [`IdempotencyLayer::store_if`]: whether a response is the
/// answer of an executed request, worth replaying to a retry.
///
/// `true` for `2xx`, `3xx` and `4xx`, except `408 Request Timeout`, `425 Too Early`,
/// `429 Too Many Requests` and a `4xx` with a `Retry-After` header: those mean "not executed,
/// try again", and storing them would replay the refusal to the retry for the whole ttl.
///
/// `Retry-After` on a `2xx` or `3xx` does not mean that: `202 Accepted` with `Retry-After` is
/// "accepted, poll later", and on a redirect it is the wait before following it (RFC 9110
/// §10.2.3); the request was executed, and is stored. `3xx` is stored because a
/// `303 See Other` after a `POST` is the executed answer. (`1xx` and `5xx` are never stored,
/// whatever the policy.)
pub fn store_by_default(head: &response::Parts) -> bool {
    let status = head.status;
    if status.is_success() || status.is_redirection() {
        return true;
    }
    status.is_client_error()
        && !matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
        && !head.headers.contains_key(RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn head(status: u16, retry_after: bool) -> response::Parts {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or_default();
        if retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        response.into_parts().0
    }

    #[test]
    fn the_default_policy_stores_executed_answers_only() {
        for stored in [
            200, 201, 204, 301, 303, 400, 401, 402, 403, 404, 409, 410, 422,
        ] {
            assert!(store_by_default(&head(stored, false)), "{stored}");
        }
        for not in [100, 408, 425, 429, 500, 502, 503] {
            assert!(!store_by_default(&head(not, false)), "{not}");
        }
        // "Accepted, poll later" and "follow after a while" were executed: stored.
        for executed in [200, 201, 202, 303, 307] {
            assert!(store_by_default(&head(executed, true)), "{executed}");
        }
        for refused in [400, 403, 409, 422] {
            assert!(!store_by_default(&head(refused, true)), "{refused}");
        }
    }
}
