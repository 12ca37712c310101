//! [`IdempotencyLayer`]: the configuration, and the [`Layer`] that wraps a service with it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{Method, request, response};
use tower_layer::Layer;

use super::drain::Tracker;
use super::quota::{ClientUsage, Quotas};
use super::service::IdempotencyService;
use super::{
    DEFAULT_MAX_BYTES_PER_CLIENT, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_RECORDS_PER_CLIENT,
    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_RUNNING_PER_CLIENT,
    DEFAULT_NAMESPACE, store_by_default,
};
use crate::exec::{DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, OnConflict};
use crate::store::Store;

/// Finds the client a request belongs to.
pub(super) type ScopeFn = Arc<dyn Fn(&request::Parts) -> Option<String> + Send + Sync>;
/// Says whether a response is stored.
pub(super) type StoreIfFn = Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>;

/// A tower [`Layer`] that gives `POST` and `PATCH` requests `Idempotency-Key` semantics: see
/// the [module documentation](super) for what each request gets.
///
/// Configure it with the builder methods; every service it makes (axum makes one per route)
/// shares one configuration and one store. Every layer made from it, by `clone` and builder
/// calls alike, and every service those make, share one count of each client's records (so a
/// client's quota is one across every router it guards) and one count of running requests
/// (so [`drain`](Self::drain) on any of them waits for all). Only
/// [`IdempotencyLayer::new`] starts new counts.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer {
    pub(super) config: Arc<Config>,
    pub(super) quotas: Arc<Quotas>,
    pub(super) tracker: Arc<Tracker>,
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
    pub(super) max_running_per_client: usize,
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
    /// header ([`scope_authorization`](Self::scope_authorization); a keyed request without it
    /// is refused with `403`), each held to [`DEFAULT_MAX_RECORDS_PER_CLIENT`] records,
    /// [`DEFAULT_MAX_BYTES_PER_CLIENT`] bytes and [`DEFAULT_MAX_RUNNING_PER_CLIENT`] requests
    /// running; responses stored by [`store_by_default`]; `Content-Type` and `Content-Encoding` part of
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
                max_running_per_client: DEFAULT_MAX_RUNNING_PER_CLIENT,
                ttl: DEFAULT_TTL,
                lease: DEFAULT_LEASE,
                on_conflict: OnConflict::Reject,
                wait_timeout: DEFAULT_WAIT_TIMEOUT,
                scope: Arc::new(authorization_scope),
                store_if: Arc::new(store_by_default),
                fingerprint_headers: vec![header::CONTENT_TYPE, header::CONTENT_ENCODING],
            }),
            quotas: Arc::new(Quotas::default()),
            tracker: Arc::new(Tracker::default()),
        }
    }

    /// The same layer, configured with `change`. Its counts stay shared with this one's: a
    /// client's quota is one across every router guarded by a layer made from the same `new`.
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
    /// with `Idempotent-Not-Stored: too-large` and a warning: its key is freed, and a retry
    /// runs the handler again. Default:
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

    /// The most bytes of stored responses (status, headers and body) one client may hold. A
    /// new key of a client at this bound is answered `429 Too Many Requests` with
    /// `Retry-After`; its existing keys still replay. Counted by this layer in this process.
    /// Default: [`DEFAULT_MAX_BYTES_PER_CLIENT`] (8 MiB). `usize::MAX` turns the bound off.
    ///
    /// A running request holds 16 KiB of it until its response is stored; the response is then
    /// counted at its real size, whatever that is: a response whose handler ran is never
    /// refused for the quota (a retry would run the handler again). So a client may go past
    /// this bound by what its running requests store at once, at most
    /// [`max_running_per_client`](Self::max_running_per_client) ×
    /// [`max_response_bytes`](Self::max_response_bytes) (16 MiB with the defaults), and then
    /// gets `429` for new keys until its records expire.
    ///
    /// The same bound applies, separately, to the request bodies the layer holds for a
    /// client's keyed requests at once: being read (held at their `Content-Length` before the
    /// first byte is read, or chunk by chunk as a body of unknown length comes), running, or
    /// waiting for another request with their key with [`OnConflict::Wait`]. A request that
    /// would take the client past it is answered `429` with `Retry-After: 1` at once, without
    /// reading the rest of its body.
    pub fn max_bytes_per_client(self, bytes: usize) -> Self {
        self.with(|c| c.max_bytes_per_client = bytes)
    }

    /// The most keyed requests of one client whose handlers run at once. One more (with a new
    /// key) is answered `429 Too Many Requests` with `Retry-After: 1`, without running its
    /// handler; retries of stored keys are still replayed. Counted by this layer in this
    /// process. Default: [`DEFAULT_MAX_RUNNING_PER_CLIENT`] (16); at least 1.
    ///
    /// It bounds what a client's responses stored at once can take past
    /// [`max_bytes_per_client`](Self::max_bytes_per_client), and how much of the server's work
    /// one client holds.
    pub fn max_running_per_client(self, requests: usize) -> Self {
        self.with(|c| c.max_running_per_client = requests.max(1))
    }

    /// What a request does while another request with its key is running:
    /// [`OnConflict::Reject`] answers `409 Conflict` at once (the default, as the draft and Stripe
    /// do); [`OnConflict::Wait`] waits for the first response (up to
    /// [`wait_timeout`](Self::wait_timeout), then `409`).
    ///
    /// A waiting request gets the first response only if it was stored. A `5xx` never is (nor
    /// a response the [policy](Self::store_if) refuses, a too-large one, or one whose body
    /// failed): then each waiting duplicate in turn takes the key and runs the handler itself,
    /// so with `Wait`, N duplicates of a request whose handler answers `5xx` are N executions,
    /// one after another.
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
    ///
    /// The value is taken as it is: unless an authentication layer outside this one rejects
    /// unknown values, a client can make up a new one per request, and with it a new quota.
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
    /// different credentials never share a key (nor a quota). A keyed request without the
    /// header is refused with `403` [`#idempotency-client-unknown`](super#idempotency-client-unknown):
    /// anonymous clients are not put in one space, where one could read another's responses
    /// (`Set-Cookie` included) by guessing its key, and use up everyone's quota
    /// ([`scope_shared`](Self::scope_shared) does that, when asked for). The scope is a digest
    /// of the header's value, so the credentials themselves are not kept.
    ///
    /// Credentials that change between a request and its retry (a bearer token refreshed
    /// meanwhile) make the retry another client's, which runs the handler again: with
    /// short-lived tokens, scope by the stable identity your authentication layer finds
    /// instead ([`scope`](Self::scope)). Cookies are not used, for the same reason.
    ///
    /// **The layer does not check the credentials.** The header is a client's identity only
    /// when an authentication layer *outside* this one rejects bad credentials before they
    /// reach it. Without one, a client can make up a new `Authorization` value for every
    /// request, and with it a fresh quota: enough made-up clients fill the store, and then
    /// every client's new keys get `503`. Better still, scope by the identity your
    /// authentication layer found ([`scope`](Self::scope)).
    pub fn scope_authorization(self) -> Self {
        self.scope(authorization_scope)
    }

    /// Every request belongs to one client: all keys in one space, and one quota for all. For
    /// a service with a single caller (another service of yours), or whose keys are chosen by
    /// the server.
    ///
    /// What it risks with several callers: a caller that sends another's key (guessed, or
    /// seen) with the same request gets the other's stored response, `Set-Cookie` and all;
    /// and one caller that uses up the quota denies every other caller's new keys.
    pub fn scope_shared(self) -> Self {
        self.scope(|_| Some(String::new()))
    }

    /// How many records and bytes the client `scope` (as the [scope function](Self::scope)
    /// names it) holds now, as this layer counts them in this process: for metrics, and to
    /// see a quota at work. With the default scope, whose names are digests, use
    /// [`client_usage_of`](Self::client_usage_of).
    pub fn client_usage(&self, scope: &str) -> ClientUsage {
        self.quotas.usage(scope)
    }

    /// How many records and bytes the client of `request` holds now (see
    /// [`client_usage`](Self::client_usage)), found with the [scope function](Self::scope);
    /// `None` when it finds no client.
    ///
    /// ```
    /// # use idem_runtime::{MemoryStore, http::IdempotencyLayer};
    /// let layer = IdempotencyLayer::new(MemoryStore::new());
    /// let request = http::Request::post("/orders")
    ///     .header("authorization", "Bearer alice")
    ///     .body(())
    ///     .map(|r| r.into_parts().0);
    /// if let Ok(parts) = request {
    ///     assert_eq!(layer.client_usage_of(&parts).map(|u| u.records), Some(0));
    /// }
    /// ```
    pub fn client_usage_of(&self, request: &request::Parts) -> Option<ClientUsage> {
        (self.config.scope)(request).map(|scope| self.quotas.usage(&scope))
    }

    /// Waits until every keyed request this layer (or any layer or service made from it) has
    /// started is finished: its handler ran to completion and its response is stored.
    ///
    /// A keyed request's handler runs in a task of its own, which outlives the connection when
    /// the client goes away, so a server's graceful shutdown, which waits for connections, does
    /// not wait for it; a runtime dropped meanwhile cancels the handler mid-way, and the retry
    /// runs it again once its lease runs out. Await this after the server has stopped and before
    /// the runtime is dropped (before `main` returns):
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use axum::{Router, routing::post};
    /// # use idem_runtime::{MemoryStore, http::IdempotencyLayer};
    /// # async fn create_order() -> &'static str { "ok" }
    /// # async fn shutdown_signal() {}
    /// # #[tokio::main] async fn main() -> std::io::Result<()> {
    /// let idempotency = IdempotencyLayer::new(MemoryStore::new());
    /// let app = Router::new()
    ///     .route("/orders", post(create_order))
    ///     .layer(idempotency.clone());
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(shutdown_signal())
    ///     .await?;
    /// // The handlers of clients that went away may still run: let them finish (bounded by
    /// // what the deployment allows before it kills the process).
    /// let _ = tokio::time::timeout(Duration::from_secs(25), idempotency.drain()).await;
    /// # Ok(()) }
    /// ```
    ///
    /// A request whose client went away before its handler started stops at once (nothing ran);
    /// one whose handler started is waited for. Requests that arrive while it waits are waited
    /// for too.
    pub fn drain(&self) -> impl Future<Output = ()> + Send + 'static {
        let tracker = Arc::clone(&self.tracker);
        async move { tracker.drained().await }
    }
}

/// The default scope: a digest of the `Authorization` header's values; no client without it.
fn authorization_scope(req: &request::Parts) -> Option<String> {
    let mut values = req.headers.get_all(header::AUTHORIZATION).iter().peekable();
    values.peek()?;
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
            .field("max_running_per_client", &c.max_running_per_client)
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
        IdempotencyService::new(
            inner,
            Arc::clone(&self.config),
            Arc::clone(&self.quotas),
            Arc::clone(&self.tracker),
        )
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
        // No credentials, no client: such a keyed request is refused.
        assert_eq!(authorization_scope(&parts(&[])), None);
        let alice = authorization_scope(&parts(&["Bearer alice"]));
        let bob = authorization_scope(&parts(&["Bearer bob"]));
        assert_ne!(alice, bob);
        assert_eq!(alice, authorization_scope(&parts(&["Bearer alice"])));
        assert!(alice.is_some_and(|s| !s.contains("alice")));
        // Values are length-prefixed: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(
            authorization_scope(&parts(&["ab", "c"])),
            authorization_scope(&parts(&["a", "bc"]))
        );
    }
}
