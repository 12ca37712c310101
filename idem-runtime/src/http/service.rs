//! [`IdempotencyService`]: what a request gets, up to the point where its key is known.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower_service::Service;

use super::body::ResponseBody;
use super::drain::Tracker;
use super::future::ResponseFuture;
use super::header::{self, KeyError};
use super::keyed;
use super::layer::Config;
use super::problem::Problem;
use super::quota::Quotas;
use crate::error::BoxError;

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps around `S`.
///
/// It takes `Request<ReqB>` and gives the inner service `Request<Either<Full<Bytes>, ReqB>>`:
/// the buffered body of a keyed request (left), or the original body, untouched (right). axum's
/// routers and handlers take both. Its responses have a [`ResponseBody`].
///
/// A keyed request's handler runs in a task of its own on the current tokio runtime (inline
/// when there is none), so that it runs to completion and its response is stored even when
/// the client goes away: `S`, its future and its response body must be `Send + 'static`.
///
/// A request that an idempotency layer outside this one already guards (the layer applied
/// twice: on a router and on one of its routes, say) passes through this one untouched: the
/// outermost layer answers for it.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
    quotas: Arc<Quotas>,
    tracker: Arc<Tracker>,
}

/// The mark an idempotency layer leaves in the extensions of a keyed request it guards, so that
/// another idempotency layer inside it lets the request through.
#[derive(Clone, Copy, Debug)]
pub(super) struct Guarded;

impl<S> IdempotencyService<S> {
    pub(super) fn new(
        inner: S,
        config: Arc<Config>,
        quotas: Arc<Quotas>,
        tracker: Arc<Tracker>,
    ) -> Self {
        IdempotencyService {
            inner,
            config,
            quotas,
            tracker,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
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
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if !config.methods.contains(req.method()) || req.extensions().get::<Guarded>().is_some() {
            return ResponseFuture::passthrough(self.inner.call(req.map(Either::Right)));
        }
        let key = match header::idempotency_key(req.headers(), config.max_key_len) {
            Ok(Some(key)) => key,
            Ok(None) if !config.require_key => {
                return ResponseFuture::passthrough(self.inner.call(req.map(Either::Right)));
            }
            Ok(None) => {
                let detail = format!(
                    "{} {} requires an Idempotency-Key header",
                    req.method(),
                    keyed::target(req.uri(), req.extensions())
                );
                return refuse(Problem::KeyMissing, &detail);
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
                    KeyError::List => (
                        Problem::KeyInvalid,
                        "the Idempotency-Key holds a comma or a space: it is a list of keys (two \
                         headers folded into one?), not one key; send one key, or quote it as a \
                         Structured Field String (\"a b\")"
                            .to_owned(),
                    ),
                    KeyError::Malformed => (
                        Problem::KeyInvalid,
                        "the Idempotency-Key must be a Structured Field String (\"abc\") or a \
                         bare token of visible ASCII characters"
                            .to_owned(),
                    ),
                };
                return refuse(problem, &detail);
            }
        };
        // The instance that was polled ready serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        let quotas = Arc::clone(&self.quotas);
        let tracker = Arc::clone(&self.tracker);
        ResponseFuture::keyed(Box::pin(async move {
            let response = keyed::serve(config, quotas, tracker, inner, req, key).await;
            if let Ok(response) = &response {
                crate::metrics::http_response(
                    response.status().as_u16(),
                    response.headers().contains_key(super::IDEMPOTENT_REPLAYED),
                );
            }
            response
        }))
    }
}

/// The layer's own answer, the handler not run.
fn refuse<F, B, E>(problem: Problem, detail: &str) -> ResponseFuture<F, B, E> {
    tracing::debug!(
        target: "idem",
        status = problem.status().as_u16(),
        detail,
        "idempotency layer refused a request"
    );
    ResponseFuture::answered(problem.response(detail, None))
}
