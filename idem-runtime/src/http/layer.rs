//! [`IdempotencyLayer`]: the configuration, and the [`Layer`] that wraps a service with it.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, request};
use tower_layer::Layer;

use super::service::IdempotencyService;
use super::{
    DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_NAMESPACE,
};
use crate::exec::{DEFAULT_LEASE, DEFAULT_TTL, DEFAULT_WAIT_TIMEOUT, OnConflict};
use crate::store::Store;

/// Finds the client a request belongs to.
pub(super) type ScopeFn = Arc<dyn Fn(&request::Parts) -> Option<String> + Send + Sync>;

/// A tower [`Layer`] that gives `POST` and `PATCH` requests `Idempotency-Key` semantics: see
/// the [module documentation](super) for what each request gets.
///
/// Configure it with the builder methods; every instance of the service it makes shares one
/// configuration and one store.
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct IdempotencyLayer {
    pub(super) config: Arc<Config>,
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
    pub(super) ttl: Duration,
    pub(super) lease: Duration,
    pub(super) on_conflict: OnConflict,
    pub(super) wait_timeout: Duration,
    pub(super) scope: ScopeFn,
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
        IdempotencyService::new(inner, Arc::clone(&self.config))
    }
}
