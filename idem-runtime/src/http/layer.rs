//! [`IdempotencyLayer`]: the configuration, and the [`Layer`] that wraps a service with it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{Method, request, response};
use tower_layer::Layer;

use super::quota::{ClientUsage, Quotas};
use super::service::IdempotencyService;
use super::{
    DEFAULT_MAX_BYTES_PER_CLIENT, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_RECORDS_PER_CLIENT,
    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_NAMESPACE, store_by_default,
};
use crate::exec::{DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, OnConflict};
use crate::store::Store;

/// Finds the client a request belongs to.
pub(super) type ScopeFn = Arc<dyn Fn(&request::Parts) -> Option<String> + Send + Sync>;
/// Says whether a response is stored.
pub(super) type StoreIfFn = Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>;

/// The scope of a request without `Authorization` under the default scope function.
pub(super) const ANONYMOUS_SCOPE: &str = "anonymous";

/// A tower [`Layer`] that gives `POST` and `PATCH` requests `Idempotency-Key` semantics: see
/// the [module documentation](super) for what each request gets.
///
/// Configure it with the builder methods; every service it makes (axum makes one per route)
/// shares one configuration, one store and one count of each client's records.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer {
    pub(super) config: Arc<Config>,
    pub(super) quotas: Arc<Quotas>,
}

#[derive(Clone)]
pub(super) struct Config {
    pub(super) store: Arc<dyn Store>,
    pub(super) namespace: Cow<'static, str>,
    pub(super) methods: Vec<Method>,
    pub(super) require_key: bool,
    pub(super) max_key_len: usize,
    pub(super) max_request_bytes: usize,
    pub(super) max_response_bytes: usize,
    pub(super) max_records_per_client: usize,
    pub(super) max_bytes_per_client: usize,
    pub(super) ttl: Duration,
    pub(super) lease: Duration,
    pub(super) on_conflict: OnConflict,
    pub(super) wait_timeout: Duration,
    pub(super) scope: ScopeFn,
    pub(super) store_if: StoreIfFn,
    pub(super) fingerprint_headers: Vec<HeaderName>,
}

impl IdempotencyLayer {
    /// A layer keeping its records in `store` (any [`Store`]: `MemoryStore`, `Arc<S>`,
    /// `Arc<dyn Store>`, ...), with the defaults: methods `POST` and `PATCH`; key optional;
    /// [`DEFAULT_TTL`]; [`DEFAULT_LEASE`]; [`DEFAULT_MAX_KEY_LEN`];
    /// [`DEFAULT_MAX_REQUEST_BYTES`]; [`DEFAULT_MAX_RESPONSE_BYTES`]; `409` while a request with
    /// the key is running ([`OnConflict::Reject`]); clients told apart by their `Authorization`
    /// header ([`scope_authorization`](Self::scope_authorization)), each held to
    /// [`DEFAULT_MAX_RECORDS_PER_CLIENT`] records and [`DEFAULT_MAX_BYTES_PER_CLIENT`] bytes;
    /// responses stored by [`store_by_default`]; `Content-Type` and `Content-Encoding` part of
    /// the request fingerprint.
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
                max_records_per_client: DEFAULT_MAX_RECORDS_PER_CLIENT,
                max_bytes_per_client: DEFAULT_MAX_BYTES_PER_CLIENT,
                ttl: DEFAULT_TTL,
                lease: DEFAULT_LEASE,
                on_conflict: OnConflict::Reject,
                wait_timeout: DEFAULT_WAIT_TIMEOUT,
                scope: Arc::new(authorization_scope),
                store_if: Arc::new(store_by_default),
                fingerprint_headers: vec![header::CONTENT_TYPE, header::CONTENT_ENCODING],
            }),
            quotas: Arc::new(Quotas::default()),
        }
    }

    fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(Arc::make_mut(&mut self.config));
        // A layer configured differently counts its clients on its own.
        self.quotas = Arc::new(Quotas::default());
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

    /// The most records one client (one [scope](Self::scope)) may hold at once: requests
    /// running, and responses stored until their [`ttl`](Self::ttl) runs out. A request that
    /// would make one more is answered `429 Too Many Requests` with `Retry-After`; retries of
    /// the client's existing keys are still replayed. Counted by this layer in this process.
    /// Default: [`DEFAULT_MAX_RECORDS_PER_CLIENT`] (10 000). `usize::MAX` turns the bound off.
    pub fn max_records_per_client(self, records: usize) -> Self {
        self.with(|c| c.max_records_per_client = records)
    }

    /// The most bytes of stored responses (status, headers and body) one client may hold at
    /// once. A running request holds room for the largest response it may store
    /// ([`max_response_bytes`](Self::max_response_bytes) and its headers) until it is known how
    /// much it stored, so that no response ever takes the client over this bound: a request
    /// for which that room is not left is answered `429`. Counted by this layer in this
    /// process. Default: [`DEFAULT_MAX_BYTES_PER_CLIENT`] (64 MiB). `usize::MAX` turns the bound
    /// off.
    ///
    /// The room held also bounds how many keyed requests one client has running at once: about
    /// `max_bytes_per_client / (max_response_bytes + 16 KiB)`, 63 with the defaults. For
    /// clients that send many keyed requests at once, lower
    /// [`max_response_bytes`](Self::max_response_bytes) to what the endpoints answer (64 KiB
    /// gives room for about 800), or raise this bound.
    pub fn max_bytes_per_client(self, bytes: usize) -> Self {
        self.with(|c| c.max_bytes_per_client = bytes)
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

    /// Which responses are stored and replayed: `store_if` sees the response's head (status
    /// and headers) and says whether it is the answer of an executed request. A response it
    /// refuses is sent as it is, with `Idempotent-Not-Stored: policy`, and its key is freed, so
    /// a retry runs the handler again. A `5xx` is never stored, whatever `store_if` says.
    ///
    /// Default: [`store_by_default`], which a policy of your own can build on:
    ///
    /// ```
    /// # use idem_runtime::{MemoryStore, http::{IdempotencyLayer, store_by_default}};
    /// # use http::StatusCode;
    /// // Do not remember "not found": the resource may appear before the client retries.
    /// let layer = IdempotencyLayer::new(MemoryStore::new())
    ///     .store_if(|head| store_by_default(head) && head.status != StatusCode::NOT_FOUND);
    /// ```
    pub fn store_if<F>(self, store_if: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        let store_if: StoreIfFn = Arc::new(store_if);
        self.with(|c| c.store_if = store_if)
    }

    /// The request headers that are part of the request's fingerprint, besides its method,
    /// path and query, and body: a retry with the same key whose values differ is answered
    /// `422`. Default: `Content-Type` and `Content-Encoding` (the same bytes as `text/plain`
    /// or gzipped are another request). Values are compared byte for byte; a header sent
    /// several times is compared value by value, in order.
    pub fn fingerprint_headers(self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut names: Vec<HeaderName> = names.into_iter().collect();
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        self.with(|c| c.fingerprint_headers = names)
    }

    /// How to tell clients apart: `scope` maps a request to the client it belongs to (an API
    /// key, a user id that an authentication layer put in the extensions), and keys are
    /// per client, so two clients that pick the same key never see each other's responses;
    /// [quotas](Self::max_records_per_client) are per client too. `None` refuses a keyed
    /// request with `403`.
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
    /// Default: [`scope_authorization`](Self::scope_authorization).
    pub fn scope<F>(self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        let scope: ScopeFn = Arc::new(scope);
        self.with(|c| c.scope = scope)
    }

    /// Clients told apart by the value of a request header (an API key): a request without it
    /// (or with a value that is not UTF-8, or with the header repeated) is refused with `403`
    /// when it carries a key.
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

    /// Clients told apart by their `Authorization` header, the default: requests with
    /// different credentials never share a key (nor a quota); requests without the header
    /// share one anonymous client. The scope is a digest of the header's value, so the
    /// credentials themselves are not kept.
    ///
    /// Credentials that change between a request and its retry (a bearer token refreshed
    /// meanwhile) make the retry another client's, which runs the handler again: with
    /// short-lived tokens, scope by the stable identity your authentication layer finds
    /// instead ([`scope`](Self::scope)). Cookies are not used, for the same reason.
    ///
    /// The layer does not check the credentials: put the authentication layer outside it, so
    /// that a client cannot make up a new `Authorization` value (and with it a fresh quota)
    /// for every request.
    pub fn scope_authorization(self) -> Self {
        self.scope(authorization_scope)
    }

    /// Every request belongs to one client: all keys in one space, and one quota for all. For
    /// a service with a single caller (another service of yours), or whose keys are chosen by
    /// the server.
    pub fn scope_shared(self) -> Self {
        self.scope(|_| Some(String::new()))
    }

    /// How many records and bytes the client `scope` (as the [scope function](Self::scope)
    /// names it) holds now, as this layer counts them in this process: for metrics, and to
    /// see a quota at work.
    pub fn client_usage(&self, scope: &str) -> ClientUsage {
        self.quotas.usage(scope)
    }
}

/// The default scope: a digest of the `Authorization` header's values, or the anonymous client.
fn authorization_scope(req: &request::Parts) -> Option<String> {
    let mut values = req.headers.get_all(header::AUTHORIZATION).iter().peekable();
    if values.peek().is_none() {
        return Some(ANONYMOUS_SCOPE.to_owned());
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"idem.http.authorization");
    for value in values {
        let bytes = value.as_bytes();
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    Some(format!("authorization:{}", hasher.finalize().to_hex()))
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
            .field("max_records_per_client", &c.max_records_per_client)
            .field("max_bytes_per_client", &c.max_bytes_per_client)
            .field("ttl", &c.ttl)
            .field("lease", &c.lease)
            .field("on_conflict", &c.on_conflict)
            .field("wait_timeout", &c.wait_timeout)
            .field("fingerprint_headers", &c.fingerprint_headers)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService::new(inner, Arc::clone(&self.config), Arc::clone(&self.quotas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(authorization: &[&str]) -> request::Parts {
        let mut req = Request::builder();
        for value in authorization {
            req = req.header(header::AUTHORIZATION, *value);
        }
        req.body(()).map(|r| r.into_parts().0).unwrap_or_else(|_| {
            panic!("a request with these headers builds");
        })
    }

    #[test]
    fn authorization_scopes_apart_and_hides_credentials() {
        let anonymous = authorization_scope(&parts(&[]));
        assert_eq!(anonymous.as_deref(), Some(ANONYMOUS_SCOPE));
        let alice = authorization_scope(&parts(&["Bearer alice"]));
        let bob = authorization_scope(&parts(&["Bearer bob"]));
        assert_ne!(alice, bob);
        assert_ne!(alice, anonymous);
        assert_eq!(alice, authorization_scope(&parts(&["Bearer alice"])));
        assert!(alice.is_some_and(|s| !s.contains("alice")));
        // Values are length-prefixed: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(
            authorization_scope(&parts(&["ab", "c"])),
            authorization_scope(&parts(&["a", "bc"]))
        );
    }
}
