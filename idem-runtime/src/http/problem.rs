//! The layer's own answers: small RFC 9457 problem reports.
//!
//! Not `http-api-problem` (weighed for issue 17): the layer writes a fixed set of reports with
//! four members each, serialized with serde; the crate's builder, extension map and framework
//! integrations would add a dependency and code paths without making these simpler.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use super::body::ResponseBody;

/// Where the problem types are described: the `Problems` table of the module's documentation.
const TYPE_BASE: &str = "https://docs.rs/idem/latest/idem/http/index.html#";

/// The media type of a problem report.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// Every way the layer answers a request itself instead of the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    KeyMissing,
    KeyInvalid,
    KeyTooLong,
    ClientUnknown,
    RequestTooLarge,
    RequestUnreadable,
    InProgress,
    KeyReused,
    StoreUnavailable,
    StoreFull,
    RecordUnreadable,
    QuotaExceeded,
    VariantMismatch,
    Interrupted,
    RuntimeUnsupported,
}

impl Problem {
    /// The problem's `type` fragment, its HTTP status and its title.
    fn describe(self) -> (&'static str, StatusCode, &'static str) {
        match self {
            Problem::KeyMissing => (
                "idempotency-key-missing",
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is missing",
            ),
            Problem::KeyInvalid => (
                "idempotency-key-invalid",
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is malformed",
            ),
            Problem::KeyTooLong => (
                "idempotency-key-too-long",
                StatusCode::BAD_REQUEST,
                "Idempotency-Key is too long",
            ),
            Problem::ClientUnknown => (
                "idempotency-client-unknown",
                StatusCode::FORBIDDEN,
                "The client of this request is not known",
            ),
            Problem::RequestTooLarge => (
                "idempotency-request-too-large",
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large for an idempotent request",
            ),
            Problem::RequestUnreadable => (
                "idempotency-request-unreadable",
                StatusCode::BAD_REQUEST,
                "Request body could not be read",
            ),
            Problem::InProgress => (
                "idempotency-key-in-progress",
                StatusCode::CONFLICT,
                "A request with this Idempotency-Key is in progress",
            ),
            Problem::KeyReused => (
                "idempotency-key-reused",
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused for a different request",
            ),
            Problem::StoreUnavailable => (
                "idempotency-store-unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store unavailable",
            ),
            Problem::StoreFull => (
                "idempotency-store-full",
                StatusCode::SERVICE_UNAVAILABLE,
                "Idempotency store full",
            ),
            Problem::RecordUnreadable => (
                "idempotency-record-unreadable",
                StatusCode::INTERNAL_SERVER_ERROR,
                "Stored response unreadable",
            ),
            Problem::QuotaExceeded => (
                "idempotency-quota-exceeded",
                StatusCode::TOO_MANY_REQUESTS,
                "Too many idempotency records for this client",
            ),
            Problem::VariantMismatch => (
                "idempotency-variant-mismatch",
                StatusCode::UNPROCESSABLE_ENTITY,
                "The stored response was negotiated for other request headers",
            ),
            Problem::Interrupted => (
                "idempotency-interrupted",
                StatusCode::SERVICE_UNAVAILABLE,
                "The server stopped while the request ran",
            ),
            Problem::RuntimeUnsupported => (
                "idempotency-runtime-unsupported",
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server's runtime cannot guard idempotent requests",
            ),
        }
    }

    /// The problem's HTTP status.
    pub(crate) fn status(self) -> StatusCode {
        self.describe().1
    }

    /// The response that reports the problem; `retry_after` adds a `Retry-After` header.
    pub(crate) fn response<B>(
        self,
        detail: &str,
        retry_after: Option<Duration>,
    ) -> Response<ResponseBody<B>> {
        let (slug, status, title) = self.describe();
        let report = Report {
            kind: format!("{TYPE_BASE}{slug}"),
            title,
            status: status.as_u16(),
            detail,
        };
        // Serializing strings and a number into JSON cannot fail; stay panic-free regardless.
        let body = serde_json::to_vec(&report).unwrap_or_default();
        let mut response = Response::new(ResponseBody::full(Bytes::from(body), None));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(after) = retry_after {
            // Whole seconds, rounded up, at least one.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// RFC 9457 §3.1 members.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: &'a str,
}
