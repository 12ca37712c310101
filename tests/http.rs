#![cfg(feature = "http")]
//! `IdempotencyLayer` over real HTTP: an axum server on a loopback port, a hyper client (and, for
//! a chunked request, a raw HTTP/1.1 connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request as AxumRequest, State};
use axum::http::{HeaderMap, HeaderName, Method, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::any;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem::http::{
    IDEMPOTENT_EXPIRES_IN, IDEMPOTENT_NOT_STORED, IDEMPOTENT_REPLAYED, store_by_default,
};
use idem::store::{BoxFuture, Bytes, Claim, Completed, Completion, Token};
use idem::{Error, Fingerprint, IdempotencyLayer, Key, MemoryStore, OnConflict, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

#[allow(dead_code)]
#[path = "../examples/http_orders.rs"]
mod http_orders;
mod support;

use support::chaos;

// ---------------------------------------------------------------------------------------------
// The service under test

/// What the handlers share: how often each ran (and, for `/slow`, how often it ran to its end),
/// and a gate that holds `/slow` until opened.
#[derive(Clone)]
struct Shared {
    calls: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    entered: Arc<Semaphore>,
}

impl Shared {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

/// Every handler counts its runs, and answers with the run number, so a second run shows.
async fn order(State(s): State<Shared>, req: AxumRequest) -> Response {
    let n = s.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let body = String::from_utf8_lossy(&body).into_owned();
    match path.as_str() {
        "/slow" => {
            s.entered.add_permits(1);
            // Held until the test opens the gate.
            if let Ok(permit) = s.gate.acquire().await {
                permit.forget();
            }
            s.finished.fetch_add(1, Ordering::SeqCst);
        }
        // A rate limiter's answer on the first run only.
        "/throttled" if n == 1 => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "slow down",
            )
                .into_response();
        }
        // `/status/NNN?retry-after&location&vary-star`: that status, with those headers.
        _ if path.starts_with("/status/") => {
            let code = path["/status/".len()..].parse().unwrap_or(500);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, format!("status {code}, run {n}")).into_response();
            let headers = response.headers_mut();
            for flag in query.split('&') {
                match flag {
                    "retry-after" => {
                        headers.insert(header::RETRY_AFTER, "1".parse().unwrap());
                    }
                    "location" => {
                        headers.insert(header::LOCATION, "/orders/1".parse().unwrap());
                    }
                    "vary-star" => {
                        headers.insert(header::VARY, "*".parse().unwrap());
                    }
                    _ => {}
                }
            }
            return response;
        }
        "/brief" => tokio::time::sleep(Duration::from_millis(50)).await,
        "/panic" => panic!("a bug in the handler (run {n})"),
        // A 5xx on the first run only.
        "/flaky" if n == 1 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "database hiccup").into_response();
        }
        // A charge recorded as a step, then a 5xx on the first run: the retry resumes after it.
        "/stepped" => {
            let charged = idem::step("charge", || async {
                Ok::<usize, Error>(s.finished.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await;
            return match charged {
                Ok(charge) if n == 1 => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("charge {charge}, then the database hiccuped"),
                )
                    .into_response(),
                Ok(charge) => (StatusCode::CREATED, format!("charge {charge}")).into_response(),
                Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
            };
        }
        "/declined" => {
            return (StatusCode::PAYMENT_REQUIRED, format!("declined #{n}")).into_response();
        }
        "/big" => return (StatusCode::OK, "x".repeat(10_000)).into_response(),
        // A body that ends with trailers, announced in `Trailer` (gRPC-style).
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "c0ffee".parse().unwrap());
            let body = Full::new(Bytes::from(format!("run {n}")))
                .with_trailers(async move { Some(Ok(trailers)) });
            return ([(header::TRAILER, "x-checksum")], Body::new(body)).into_response();
        }
        // A body that fails after its first bytes.
        "/failbody" => {
            let body = Full::new(Bytes::from(format!("run {n}, part")))
                .map_err(|never| match never {})
                .with_trailers(async {
                    Some(Err(std::io::Error::other(
                        "the database went away mid-stream",
                    )))
                });
            return (StatusCode::OK, Body::new(body)).into_response();
        }
        _ => {}
    }
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json"),
            (HeaderName::from_static("x-order"), "yes"),
        ],
        AppendHeaders([(header::SET_COOKIE, "a=1"), (header::SET_COOKIE, "b=2")]),
        format!(r#"{{"run":{n},"body":{body:?}}}"#),
    )
        .into_response()
}

struct Server {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves every path with `order` behind `layer`, on a free loopback port.
async fn serve(layer: IdempotencyLayer) -> Server {
    serve_with(layer, |router| router).await
}

/// Serves every path with `order` behind `layer`, with `wrap` adding layers outside it.
async fn serve_with(
    layer: IdempotencyLayer,
    wrap: impl FnOnce(Router<Shared>) -> Router<Shared>,
) -> Server {
    serve_app(|router| wrap(router.layer(layer))).await
}

/// Serves every path with `order`, with `app` adding every layer.
async fn serve_app(app: impl FnOnce(Router<Shared>) -> Router<Shared>) -> Server {
    serve_router(app(Router::new().route("/{*path}", any(order)))).await
}

impl Shared {
    fn new() -> Shared {
        Shared {
            calls: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(Semaphore::new(0)),
            entered: Arc::new(Semaphore::new(0)),
        }
    }
}

/// Serves `router` (whose handlers are `order`), on a free loopback port.
async fn serve_router(router: Router<Shared>) -> Server {
    let shared = Shared::new();
    let app = router.with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server { addr, shared, task }
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new())
}

// ---------------------------------------------------------------------------------------------
// The client

#[derive(Debug, Clone)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v == "true")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The problem report of an error reply: checks its media type and members.
    fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{self:?}"
        );
        let p: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(p["status"], self.status.as_u16(), "{p}");
        for member in ["type", "title", "detail"] {
            assert!(p[member].as_str().is_some_and(|s| !s.is_empty()), "{p}");
        }
        assert!(p["type"].as_str().unwrap().starts_with("https://"), "{p}");
        p
    }

    /// The headers a replay must repeat: all but the ones the server sets per message (and
    /// `Age` and `Idempotent-Expires-In`, which a replay computes anew).
    fn stable_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = self
            .headers
            .iter()
            .filter(|(name, _)| {
                *name != header::DATE
                    && *name != IDEMPOTENT_REPLAYED
                    && *name != header::AGE
                    && *name != IDEMPOTENT_EXPIRES_IN
            })
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        out.sort();
        out
    }
}

/// The credentials the test client sends unless a test gives its own: with the default scope,
/// a keyed request without `Authorization` is refused (`403`).
const CREDENTIALS: &str = "Bearer test-client";

#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// Sends [`CREDENTIALS`] when a request names no `Authorization` of its own.
    authenticated: bool,
}

impl Http {
    fn new(server: &Server) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{}", server.addr),
            authenticated: true,
        }
    }

    /// A client that sends no credentials.
    fn anonymous(server: &Server) -> Http {
        Http {
            authenticated: false,
            ..Http::new(server)
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if self.authenticated
            && !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        {
            req = req.header(header::AUTHORIZATION, CREDENTIALS);
        }
        let req = req.body(Full::from(body.to_owned())).unwrap();
        let res = self.client.request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> Reply {
        self.send(Method::POST, path, &[("idempotency-key", key)], body)
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn first_request_runs_and_retry_replays_byte_for_byte() {
    let server = serve(layer()).await;
    let http = Http::new(&server);

    let first = http.post("/orders", "\"k-1\"", "book").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), r#"{"run":1,"body":"book"}"#);
    assert!(!first.replayed());
    assert!(!first.headers.contains_key(IDEMPOTENT_NOT_STORED));

    let retry = http.post("/orders", "\"k-1\"", "book").await;
    assert_eq!(server.shared.calls(), 1, "the handler must not run again");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.stable_headers(), first.stable_headers());
    assert_eq!(first.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    assert_eq!(retry.headers.get_all(header::SET_COOKIE).iter().count(), 2);

    // Another key is another request.
    let other = http.post("/orders", "\"k-2\"", "book").await;
    assert_eq!(other.text(), r#"{"run":2,"body":"book"}"#);
}

#[tokio::test]
async fn quoted_and_bare_keys_name_the_same_key() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let first = http.post("/orders", "\"3f2a-bare\"", "x").await;
    let bare = http.post("/orders", "3f2a-bare", "x").await;
    assert!(bare.replayed());
    assert_eq!(bare.body, first.body);
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn same_key_while_running_is_409_then_replays() {
    let server = serve(layer()).await;
    let http = Http::new(&server);

    let first = tokio::spawn({
        let http = http.clone();
        async move { http.post("/slow", "k", "a").await }
    });
    server.shared.entered.acquire().await.unwrap().forget();

    let conflict = http.post("/slow", "k", "a").await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    let p = conflict.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-key-in-progress"),
        "{p}"
    );
    let retry_after: u64 = conflict.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");

    server.shared.gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = http.post("/slow", "k", "a").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn same_key_while_running_waits_when_configured() {
    let server = serve(layer().on_conflict(OnConflict::Wait)).await;
    let http = Http::new(&server);

    let first = tokio::spawn({
        let http = http.clone();
        async move { http.post("/slow", "k", "a").await }
    });
    server.shared.entered.acquire().await.unwrap().forget();
    let second = tokio::spawn({
        let http = http.clone();
        async move { http.post("/slow", "k", "a").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the second request waits for the first"
    );

    server.shared.gate.add_permits(1);
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn same_key_for_a_different_request_is_422() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    http.post("/orders", "k", "book").await;

    let other_body = http.post("/orders", "k", "lamp").await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    let p = other_body.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-key-reused"),
        "{p}"
    );

    let other_path = http.post("/refunds", "k", "book").await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    let other_query = http.post("/orders?express=1", "k", "book").await;
    assert_eq!(other_query.status, StatusCode::UNPROCESSABLE_ENTITY);
    let other_method = http
        .send(
            Method::PATCH,
            "/orders",
            &[("idempotency-key", "k")],
            "book",
        )
        .await;
    assert_eq!(other_method.status, StatusCode::UNPROCESSABLE_ENTITY);
    other_method.problem();

    assert_eq!(server.shared.calls(), 1);
    // The stored response is intact.
    assert!(http.post("/orders", "k", "book").await.replayed());
}

#[tokio::test]
async fn missing_key_is_400_where_required_and_passes_through_otherwise() {
    let server = serve(layer().require_key(true)).await;
    let http = Http::new(&server);
    let reply = http.send(Method::POST, "/orders", &[], "book").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let p = reply.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-key-missing"),
        "{p}"
    );
    assert_eq!(server.shared.calls(), 0);

    let server = serve(layer()).await;
    let http = Http::new(&server);
    for run in 1..=2 {
        let reply = http.send(Method::POST, "/orders", &[], "book").await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text(), format!(r#"{{"run":{run},"body":"book"}}"#));
        assert!(!reply.replayed());
    }
}

#[tokio::test]
async fn bad_keys_are_400() {
    let server = serve(layer().max_key_len(8)).await;
    let http = Http::new(&server);

    let long = http.post("/orders", "123456789", "x").await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST);
    let p = long.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-key-too-long"),
        "{p}"
    );
    assert_eq!(
        http.post("/orders", "\"123456789\"", "x").await.status,
        StatusCode::BAD_REQUEST
    );

    for bad in ["\"unterminated", "\"\"", "a\"b", "\"a\\n\""] {
        let reply = http.post("/orders", bad, "x").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        let p = reply.problem();
        assert!(
            p["type"]
                .as_str()
                .unwrap()
                .ends_with("#idempotency-key-invalid"),
            "{bad}: {p}"
        );
    }
    let twice = http
        .send(
            Method::POST,
            "/orders",
            &[("idempotency-key", "a"), ("idempotency-key", "b")],
            "x",
        )
        .await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    assert_eq!(server.shared.calls(), 0);

    // At the limit is fine.
    assert_eq!(
        http.post("/orders", "12345678", "x").await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_handler_retried_after_a_5xx_resumes_after_its_recorded_steps() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let failed = http.post("/stepped", "k-steps", "x").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.text(), "charge 1, then the database hiccuped");
    let retry = http.post("/stepped", "k-steps", "x").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(
        retry.text(),
        "charge 1",
        "the retry gets the recorded charge"
    );
    assert!(http.post("/stepped", "k-steps", "x").await.replayed());
    assert_eq!(server.shared.calls(), 2, "the handler ran twice");
    assert_eq!(server.shared.finished(), 1, "the card was charged once");
    // Another key is another call, with steps of its own.
    let other = http.post("/stepped", "k-steps-2", "x").await;
    assert_eq!(other.text(), "charge 2");
}

#[tokio::test]
async fn a_key_reused_with_another_request_after_a_5xx_does_not_inherit_its_steps() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let failed = http.post("/stepped", "k-reused", "amount=100").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let reused = http.post("/stepped", "k-reused", "amount=999").await;
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "another request under the key is refused, not served the first one's charge: {}",
        reused.text()
    );
    assert_eq!(
        server.shared.finished(),
        1,
        "charged once, for the first request"
    );
    let retry = http.post("/stepped", "k-reused", "amount=100").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.text(), "charge 1", "the first request resumes");
    assert_eq!(server.shared.finished(), 1);
}

#[tokio::test]
async fn server_errors_are_not_stored_client_errors_are() {
    let server = serve(layer()).await;
    let http = Http::new(&server);

    let failed = http.post("/flaky", "k5", "x").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.text(), "database hiccup");
    assert_eq!(failed.headers[IDEMPOTENT_NOT_STORED], "server-error");
    let retry = http.post("/flaky", "k5", "x").await;
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "the retry runs the handler again"
    );
    assert!(!retry.replayed());
    let again = http.post("/flaky", "k5", "x").await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(server.shared.calls(), 2);

    let declined = http.post("/declined", "k4", "x").await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    let retry = http.post("/declined", "k4", "x").await;
    assert_eq!(retry.status, StatusCode::PAYMENT_REQUIRED);
    assert!(retry.replayed());
    assert_eq!(retry.text(), declined.text());
    assert_eq!(server.shared.calls(), 3);
}

#[tokio::test]
async fn unguarded_methods_pass_through_untouched() {
    // A small request limit: unguarded requests are not buffered, so it does not apply to them.
    let server = serve(layer().max_request_bytes(4)).await;
    let http = Http::new(&server);
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for _ in 0..2 {
            let reply = http
                .send(
                    method.clone(),
                    "/orders",
                    &[("idempotency-key", "k")],
                    "a long body",
                )
                .await;
            assert_eq!(reply.status, StatusCode::CREATED, "{method}");
            assert!(!reply.replayed());
        }
    }
    assert_eq!(server.shared.calls(), 6);

    // Guarded methods are configurable.
    let server = serve(layer().methods([Method::PUT])).await;
    let http = Http::new(&server);
    http.send(Method::PUT, "/orders", &[("idempotency-key", "k")], "")
        .await;
    let again = http
        .send(Method::PUT, "/orders", &[("idempotency-key", "k")], "")
        .await;
    assert!(again.replayed());
    http.post("/orders", "k", "").await;
    assert_eq!(server.shared.calls(), 2);
}

/// A store whose backend is down: every operation fails.
struct DownStore;

impl Store for DownStore {
    fn claim(
        &self,
        _: Key,
        _: Option<Fingerprint>,
        _: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn complete(
        &self,
        _: Key,
        _: Token,
        _: Option<idem::Fingerprint>,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn renew(&self, _: Key, _: Token, _: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn release(&self, _: Key, _: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn wait(&self, _: Key, _: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
    fn remove(&self, _: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Err(Error::store("connection refused")) })
    }
}

/// A memory store at its bound takes no new key: 503 with its own problem type (not "store
/// unavailable": nothing failed), the handler does not run, and stored keys still replay.
#[tokio::test]
async fn a_full_store_gives_503_store_full_and_replays_what_it_holds() {
    let server = serve(IdempotencyLayer::new(MemoryStore::with_max_entries(1))).await;
    let http = Http::new(&server);
    let first = http.post("/orders", "k1", "x").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let full = http.post("/orders", "k2", "y").await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    let p = full.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-store-full"),
        "{p}"
    );
    assert_eq!(server.shared.calls(), 1, "the handler did not run for k2");
    let again = http.post("/orders", "k1", "x").await;
    assert_eq!(again.body, first.body, "k1 replays");
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn a_store_that_is_down_gives_503_and_the_handler_never_runs() {
    let server = serve(IdempotencyLayer::new(DownStore)).await;
    let http = Http::new(&server);
    let reply = http.post("/orders", "k", "x").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let p = reply.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-store-unavailable"),
        "{p}"
    );
    assert!(
        !reply.text().contains("connection refused"),
        "no backend detail leaks"
    );
    assert_eq!(server.shared.calls(), 0);
    // Requests without a key (not required) and unguarded ones do not need the store.
    assert_eq!(
        http.send(Method::GET, "/orders", &[], "").await.status,
        StatusCode::CREATED
    );
    assert_eq!(server.shared.calls(), 1);
}

/// A store whose record for every key is a completed one that does not decode (written by
/// another program, or corrupted), made with the caller's own fingerprint.
struct GarbageStore;

impl Store for GarbageStore {
    fn claim(
        &self,
        _: Key,
        fingerprint: Option<Fingerprint>,
        _: Duration,
    ) -> BoxFuture<'_, Result<Claim, Error>> {
        let garbage = Completed::new(
            Bytes::from_static(b"{\"v\":1,\"status\":"),
            fingerprint,
            Duration::from_secs(60),
        );
        Box::pin(async move { Ok(Claim::Completed(garbage)) })
    }
    fn complete(
        &self,
        _: Key,
        _: Token,
        _: Option<idem::Fingerprint>,
        _: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Completion, Error>> {
        Box::pin(async { Ok(Completion::LeaseLost) })
    }
    fn renew(&self, _: Key, _: Token, _: Duration) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Ok(false) })
    }
    fn release(&self, _: Key, _: Token) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Ok(false) })
    }
    fn wait(&self, _: Key, _: Duration) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
    fn remove(&self, _: Key) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(async { Ok(false) })
    }
}

#[tokio::test]
async fn a_stored_response_that_does_not_decode_is_500_and_the_handler_does_not_run() {
    let server = serve(IdempotencyLayer::new(GarbageStore)).await;
    let http = Http::new(&server);
    let reply = http.post("/orders", "k", "x").await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    let p = reply.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-record-unreadable"),
        "{p}"
    );
    assert_eq!(server.shared.calls(), 0);
}

#[tokio::test]
async fn a_response_over_the_limit_is_passed_through_whole_and_not_stored() {
    let server = serve(layer().max_response_bytes(1000)).await;
    let http = Http::new(&server);
    for run in 1..=2 {
        let reply = http.post("/big", "k", "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body.len(), 10_000, "never truncated");
        assert_eq!(reply.headers[IDEMPOTENT_NOT_STORED], "too-large");
        assert!(!reply.replayed());
        assert_eq!(
            server.shared.calls(),
            run,
            "not stored: the retry runs again"
        );
    }
    // At the default limit it is stored.
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let first = http.post("/big", "k", "").await;
    let retry = http.post("/big", "k", "").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
}

#[tokio::test]
async fn a_request_body_over_the_limit_is_413() {
    let server = serve(layer().max_request_bytes(16)).await;
    let http = Http::new(&server);
    let reply = http.post("/orders", "k", &"x".repeat(17)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    let p = reply.problem();
    assert!(
        p["type"]
            .as_str()
            .unwrap()
            .ends_with("#idempotency-request-too-large"),
        "{p}"
    );
    assert_eq!(
        http.post("/orders", "k", &"x".repeat(16)).await.status,
        StatusCode::CREATED
    );

    // A chunked body has no Content-Length: the limit holds while it is read.
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let chunk = "x".repeat(10);
    let raw = format!(
        "POST /orders HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: k2\r\nAuthorization: {CREDENTIALS}\r\n\
         Transfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\na\r\n{chunk}\r\na\r\n{chunk}\r\n0\r\n\r\n",
        server.addr
    );
    conn.write_all(raw.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert_eq!(server.shared.calls(), 1);
}

/// Puts the caller's user id (from a header, as an authentication layer would) in the extensions.
#[derive(Clone)]
struct UserId(String);

async fn authenticate(mut req: AxumRequest, next: Next) -> Response {
    if let Some(user) = req.headers().get("x-user").and_then(|v| v.to_str().ok()) {
        let user = UserId(user.to_owned());
        req.extensions_mut().insert(user);
    }
    next.run(req).await
}

#[tokio::test]
async fn keys_are_scoped_per_client() {
    // By API key header.
    let server = serve(layer().scope_header(HeaderName::from_static("x-api-key"))).await;
    let http = Http::new(&server);
    let post = |api_key: &'static str| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                "/orders",
                &[("idempotency-key", "same"), ("x-api-key", api_key)],
                "x",
            )
            .await
        }
    };
    let alice = post("alice").await;
    let bob = post("bob").await;
    assert!(!bob.replayed(), "bob never sees alice's response");
    assert_ne!(alice.body, bob.body);
    assert_eq!(post("alice").await.body, alice.body);
    assert_eq!(post("bob").await.body, bob.body);
    assert_eq!(server.shared.calls(), 2);
    let anonymous = http.post("/orders", "same", "x").await;
    assert_eq!(anonymous.status, StatusCode::FORBIDDEN);
    anonymous.problem();

    // By a user id an authentication layer put in the extensions.
    let scoped = layer().scope(|req| req.extensions.get::<UserId>().map(|u| u.0.clone()));
    let server = serve_with(scoped, |r| r.layer(middleware::from_fn(authenticate))).await;
    let http = Http::new(&server);
    let as_user = |user: &'static str| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                "/orders",
                &[("idempotency-key", "same"), ("x-user", user)],
                "x",
            )
            .await
        }
    };
    let carol = as_user("carol").await;
    let dave = as_user("dave").await;
    assert!(!dave.replayed());
    assert!(as_user("carol").await.replayed());
    assert_ne!(carol.body, dave.body);
    assert_eq!(server.shared.calls(), 2);
}

async fn two_hundred_concurrent_posts(layer: IdempotencyLayer) -> (Vec<Reply>, usize) {
    let server = serve(layer).await;
    let http = Http::new(&server);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/brief", "one-key", "order").await })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    (replies, server.shared.calls())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_posts_with_one_key_run_once_waiting() {
    let (replies, calls) =
        two_hundred_concurrent_posts(layer().on_conflict(OnConflict::Wait)).await;
    assert_eq!(calls, 1);
    let first = r#"{"run":1,"body":"order"}"#;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert_eq!(reply.text(), first);
    }
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_posts_with_one_key_run_once_rejecting() {
    let (replies, calls) = two_hundred_concurrent_posts(layer()).await;
    assert_eq!(calls, 1);
    let first = r#"{"run":1,"body":"order"}"#;
    let mut created = 0;
    for reply in &replies {
        match reply.status {
            StatusCode::CREATED => {
                assert_eq!(reply.text(), first);
                created += 1;
            }
            StatusCode::CONFLICT => {
                reply.problem();
            }
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    assert!(created >= 1);
}

#[tokio::test]
async fn the_http_orders_example_creates_one_order() {
    let report = http_orders::run().await.unwrap();
    assert_eq!(report.orders_created, 1, "{report:?}");
    assert_eq!(report.attempts, 3, "{report:?}");
    assert_eq!(report.status, StatusCode::CREATED);
    assert!(report.replayed, "{report:?}");
    assert!(report.body.starts_with(r#"{"id":1,"#), "{report:?}");
}

/// The service's response body works as an axum `Body` (a compile-time check).
#[allow(dead_code)]
fn response_body_is_an_axum_body(body: idem::http::ResponseBody<Body>) -> Body {
    Body::new(body)
}

// ---------------------------------------------------------------------------------------------
// A client that goes away mid-handler (issue 13, scenario 2)

/// Sends a keyed `POST /slow` on a raw connection, waits until the handler has started (and
/// made its effect), then disconnects, and gives the server time to notice.
async fn disconnect_mid_handler(server: &Server, key: &str) {
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = "order";
    let raw = format!(
        "POST /slow HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: {key}\r\nAuthorization: {CREDENTIALS}\r\n\
         Content-Length: {}\r\n\r\n\
         {body}",
        server.addr,
        body.len()
    );
    conn.write_all(raw.as_bytes()).await.unwrap();
    server.shared.entered.acquire().await.unwrap().forget();
    drop(conn);
    // Long enough for hyper to see the connection close and drop the response future.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_handler_gets_the_first_run_on_retry() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    disconnect_mid_handler(&server, "gone-1").await;

    server.shared.gate.add_permits(1);
    // The first run finishes on its own; until then a retry is told to come back.
    let mut retry = http.post("/slow", "gone-1", "order").await;
    for _ in 0..100 {
        if retry.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        retry = http.post("/slow", "gone-1", "order").await;
    }
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.text(), r#"{"run":1,"body":"order"}"#);
    assert_eq!(server.shared.calls(), 1, "the handler ran once");
    assert_eq!(server.shared.finished(), 1, "and to its end");
}

#[tokio::test]
async fn a_retry_while_the_abandoned_run_still_goes_is_409_then_replays() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    disconnect_mid_handler(&server, "gone-2").await;

    let retry = tokio::time::timeout(
        Duration::from_secs(5),
        http.post("/slow", "gone-2", "order"),
    )
    .await
    .expect("the retry must not run the handler (and wait on its gate) again");
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    retry.problem();

    server.shared.gate.add_permits(1);
    let mut last = retry;
    for _ in 0..100 {
        last = http.post("/slow", "gone-2", "order").await;
        if last.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last.replayed(), "{last:?}");
    assert_eq!(last.text(), r#"{"run":1,"body":"order"}"#);
    assert_eq!((server.shared.calls(), server.shared.finished()), (1, 1));
}

#[tokio::test]
async fn a_handler_that_panics_frees_its_key_and_the_panic_reaches_the_server() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for run in 1..=2 {
        let req = Request::post(format!("{}/panic", http.base))
            .header("idempotency-key", "p-1")
            .header(header::AUTHORIZATION, CREDENTIALS)
            .body(Full::from("x"))
            .unwrap();
        // The panic resumes in the response future: hyper's connection task dies with it, and
        // the client sees the connection close (not an answer the layer made up).
        let result = http.client.request(req).await;
        assert!(result.is_err(), "{result:?}");
        assert_eq!(
            server.shared.calls(),
            run,
            "the key was freed: the retry runs again"
        );
    }
}

#[tokio::test]
async fn a_waiting_retry_of_an_abandoned_run_gets_its_response() {
    let server = serve(layer().on_conflict(OnConflict::Wait)).await;
    let http = Http::new(&server);
    disconnect_mid_handler(&server, "gone-3").await;

    let retry = tokio::spawn({
        let http = http.clone();
        async move { http.post("/slow", "gone-3", "order").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!retry.is_finished(), "the retry waits for the first run");
    assert_eq!(server.shared.calls(), 1);

    server.shared.gate.add_permits(1);
    let retry = tokio::time::timeout(Duration::from_secs(5), retry)
        .await
        .expect("the first run finishes and the retry gets its response")
        .unwrap();
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.text(), r#"{"run":1,"body":"order"}"#);
    assert_eq!((server.shared.calls(), server.shared.finished()), (1, 1));

    let later = http.post("/slow", "gone-3", "order").await;
    assert!(later.replayed());
    assert_eq!(later.body, retry.body);
}

// ---------------------------------------------------------------------------------------------
// One client cannot deny another (issue 14)

/// A keyed `POST /orders` with `Authorization: Bearer <client>`.
async fn post_as(http: &Http, client: &str, key: &str) -> Reply {
    let authorization = format!("Bearer {client}");
    http.send(
        Method::POST,
        "/orders",
        &[("idempotency-key", key), ("authorization", &authorization)],
        "order",
    )
    .await
}

/// The problem `type` fragment of a reply.
fn problem_type(reply: &Reply) -> String {
    let p = reply.problem();
    let kind = p["type"].as_str().unwrap_or_default();
    kind.rsplit_once('#')
        .map(|(_, fragment)| fragment.to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_flooding_keyed_posts_cannot_deny_another() {
    // The other client stays within the same quota; the flooder sends four times it.
    const QUOTA: usize = 100;
    const FLOOD: usize = 4 * QUOTA;
    const OTHER_DURING: usize = 60;
    const OTHER_AFTER: usize = 20;
    // A small store, so that the flood alone could fill it.
    let store = MemoryStore::with_max_entries(4 * QUOTA);
    let server = serve(IdempotencyLayer::new(store).max_records_per_client(QUOTA)).await;
    let http = Http::new(&server);

    let flooder = tokio::spawn({
        let http = http.clone();
        async move {
            let in_flight = Arc::new(Semaphore::new(8));
            let mut tasks = Vec::new();
            for i in 0..FLOOD {
                let permit = in_flight.clone().acquire_owned().await.unwrap();
                let http = http.clone();
                tasks.push(tokio::spawn(async move {
                    let reply = post_as(&http, "flooder", &format!("flood-{i}")).await;
                    drop(permit);
                    (i, reply)
                }));
            }
            let mut replies = Vec::new();
            for task in tasks {
                replies.push(task.await.unwrap());
            }
            replies
        }
    });
    let mut other_served = 0;
    for i in 0..OTHER_DURING {
        let reply = post_as(&http, "other", &format!("other-{i}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        other_served += 1;
    }
    let flood = flooder.await.unwrap();
    for i in 0..OTHER_AFTER {
        let reply = post_as(&http, "other", &format!("after-{i}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        other_served += 1;
    }

    let created: Vec<usize> = flood
        .iter()
        .filter(|(_, r)| r.status == StatusCode::CREATED)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(created.len(), QUOTA, "the flooder gets exactly its quota");
    for (_, reply) in flood
        .iter()
        .filter(|(_, r)| r.status != StatusCode::CREATED)
    {
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
        assert_eq!(problem_type(reply), "idempotency-quota-exceeded");
        let retry_after: u64 = reply.headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // Its oldest record expires with the 24 h ttl.
        assert!(retry_after > 23 * 3600, "{retry_after}");
        assert!(!reply.headers.contains_key(IDEMPOTENT_NOT_STORED));
    }
    // Over its quota, the flooder's existing keys still replay...
    let replay = post_as(&http, "flooder", &format!("flood-{}", created[0])).await;
    assert!(replay.replayed(), "{replay:?}");
    // ...and a refused one was not stored: it is refused again, not replayed.
    let refused = (0..FLOOD).find(|i| !created.contains(i)).unwrap();
    let again = post_as(&http, "flooder", &format!("flood-{refused}")).await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(server.shared.calls(), QUOTA + OTHER_DURING + OTHER_AFTER);

    let requests = (FLOOD + OTHER_DURING + OTHER_AFTER + 2) as u64;
    chaos::report(
        "flood_http",
        &[
            ("requests", requests),
            ("flooding_clients", 1),
            ("other_requests_served", other_served as u64),
            ("requests_lost", 0),
        ],
    );

    // Without the quota, the same flood fills the store, and the other client is refused.
    let store = MemoryStore::with_max_entries(4 * QUOTA);
    let server = serve(IdempotencyLayer::new(store).max_records_per_client(usize::MAX)).await;
    let http = Http::new(&server);
    for i in 0..4 * QUOTA {
        post_as(&http, "flooder", &format!("flood-{i}")).await;
    }
    let denied = post_as(&http, "other", "other-0").await;
    assert_eq!(denied.status, StatusCode::SERVICE_UNAVAILABLE, "{denied:?}");
}

#[tokio::test]
async fn a_clients_stored_bytes_stay_within_its_quota_and_what_its_running_requests_store() {
    const QUOTA: usize = 100_000;
    const RUNNING: usize = 4;
    let idempotency = layer()
        .scope_header(HeaderName::from_static("x-client"))
        .max_response_bytes(12_000)
        .max_bytes_per_client(QUOTA)
        .max_running_per_client(RUNNING);
    let server = serve(idempotency.clone()).await;
    let http = Http::new(&server);
    let big = |client: &'static str, key: String| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                "/big",
                &[("idempotency-key", &key), ("x-client", client)],
                "",
            )
            .await
        }
    };

    // One after the other: each 10 kB response is stored while the client is under its quota,
    // and the quota is never passed.
    let mut stored = 0;
    let mut refused = 0;
    for i in 0..30 {
        let reply = big("hog", format!("seq-{i}")).await;
        match reply.status {
            StatusCode::OK => stored += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(problem_type(&reply), "idempotency-quota-exceeded");
                refused += 1;
            }
            other => panic!("unexpected {other}: {reply:?}"),
        }
        let usage = idempotency.client_usage("hog");
        assert!(usage.bytes <= QUOTA, "{usage:?}");
    }
    assert!(stored >= 8, "{stored}");
    assert_eq!(stored + refused, 30);
    assert_eq!(idempotency.client_usage("hog").records, stored);
    assert_eq!(server.shared.calls(), stored, "a refused request never ran");

    // All at once: no response that ran is refused for the quota, so the client may go past it,
    // but only by what its running requests (at most RUNNING) store at once.
    let tasks: Vec<_> = (0..30)
        .map(|i| tokio::spawn(big("herd", format!("par-{i}"))))
        .collect();
    let mut herd_stored = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::OK => {
                assert!(
                    !reply.headers.contains_key(IDEMPOTENT_NOT_STORED),
                    "{reply:?}"
                );
                herd_stored += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    let usage = idempotency.client_usage("herd");
    assert!(
        usage.bytes <= QUOTA + RUNNING * (12_000 + 1024),
        "{usage:?}"
    );
    assert!((1..30).contains(&herd_stored), "{herd_stored}");
    assert_eq!(usage.records, herd_stored);
    assert_eq!((usage.running, usage.reserved_bytes), (0, 0));

    // Another client is served.
    assert_eq!(big("other", "k".into()).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_429_with_retry_after_is_not_stored_and_the_retry_gets_the_201() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let throttled = http.post("/throttled", "t-1", "x").await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers[header::RETRY_AFTER], "1");
    assert_eq!(throttled.headers[IDEMPOTENT_NOT_STORED], "policy");
    assert_eq!(
        throttled.text(),
        "slow down",
        "passed through as the handler gave it"
    );

    let retry = http.post("/throttled", "t-1", "x").await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    assert_eq!(server.shared.calls(), 2, "the handler ran again");

    let again = http.post("/throttled", "t-1", "x").await;
    assert!(again.replayed());
    assert_eq!(
        again.body, retry.body,
        "the second run's answer is the one stored"
    );
    assert_eq!(server.shared.calls(), 2);
}

/// Posts `path` twice with one key: whether the second got the first's stored response.
async fn stored_twice(http: &Http, path: &str, key: &str) -> (Reply, Reply) {
    let first = http.post(path, key, "x").await;
    let second = http.post(path, key, "x").await;
    (first, second)
}

#[tokio::test]
async fn the_default_policy_does_not_store_try_again_answers() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for (i, path) in [
        "/status/408",
        "/status/425",
        "/status/429",
        "/status/400?retry-after",
        "/status/409?retry-after",
    ]
    .into_iter()
    .enumerate()
    {
        let before = server.shared.calls();
        let (first, second) = stored_twice(&http, path, &format!("p-{i}")).await;
        assert_eq!(first.headers[IDEMPOTENT_NOT_STORED], "policy", "{path}");
        assert!(!second.replayed(), "{path}: {second:?}");
        assert_eq!(second.headers[IDEMPOTENT_NOT_STORED], "policy", "{path}");
        assert_eq!(server.shared.calls(), before + 2, "{path}: ran twice");
    }
}

#[tokio::test]
async fn server_errors_are_never_stored_whatever_the_policy() {
    let server = serve(layer().store_if(|_| true)).await;
    let http = Http::new(&server);
    for (i, path) in ["/status/500", "/status/502", "/status/503"]
        .into_iter()
        .enumerate()
    {
        let (first, second) = stored_twice(&http, path, &format!("s-{i}")).await;
        assert_eq!(first.headers[IDEMPOTENT_NOT_STORED], "server-error");
        assert!(!second.replayed(), "{path}");
    }
    assert_eq!(server.shared.calls(), 6);
    // The permissive policy does store a 429, as told.
    let (_, second) = stored_twice(&http, "/status/429", "s-429").await;
    assert!(second.replayed());
}

#[tokio::test]
async fn executed_answers_are_stored_by_default_redirects_included() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for (i, path) in [
        "/status/200",
        "/status/204",
        "/status/303?location",
        "/status/400",
        "/status/401",
        "/status/403",
        "/status/404",
        "/status/422",
    ]
    .into_iter()
    .enumerate()
    {
        let before = server.shared.calls();
        let (first, second) = stored_twice(&http, path, &format!("e-{i}")).await;
        assert!(!first.headers.contains_key(IDEMPOTENT_NOT_STORED), "{path}");
        assert!(second.replayed(), "{path}: {second:?}");
        assert_eq!(second.status, first.status);
        assert_eq!(second.body, first.body);
        assert_eq!(server.shared.calls(), before + 1, "{path}: ran once");
    }
    let (first, second) = stored_twice(&http, "/status/303?location", "e-303").await;
    assert_eq!(first.status, StatusCode::SEE_OTHER);
    assert_eq!(second.headers[header::LOCATION], "/orders/1");
}

#[tokio::test]
async fn a_custom_store_policy_decides_what_is_stored() {
    // Do not remember "not found": the resource may exist by the time the client retries.
    let server = serve(layer().store_if(|head| store_by_default(head) && head.status != 404)).await;
    let http = Http::new(&server);
    let (first, second) = stored_twice(&http, "/status/404", "c-1").await;
    assert_eq!(first.headers[IDEMPOTENT_NOT_STORED], "policy");
    assert!(!second.replayed());
    let (_, second) = stored_twice(&http, "/status/201", "c-2").await;
    assert!(second.replayed());
    assert_eq!(server.shared.calls(), 3);
}

#[tokio::test]
async fn clients_with_different_credentials_never_share_a_key() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let alice = post_as(&http, "alice", "same").await;
    let bob = post_as(&http, "bob", "same").await;
    assert!(!bob.replayed(), "bob never sees alice's response");
    assert_ne!(alice.body, bob.body);
    assert_eq!(post_as(&http, "alice", "same").await.body, alice.body);
    assert_eq!(post_as(&http, "bob", "same").await.body, bob.body);
    // A keyed request without credentials belongs to no client: refused, never put in a space
    // shared with other anonymous clients (finding 2 of the HTTP review: it used to be).
    let anonymous = Http::anonymous(&server)
        .post("/orders", "same", "order")
        .await;
    assert_eq!(anonymous.status, StatusCode::FORBIDDEN, "{anonymous:?}");
    assert_eq!(problem_type(&anonymous), "idempotency-client-unknown");
    let detail = anonymous.problem()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("scope_shared()"), "{detail}");
    assert_eq!(server.shared.calls(), 2);

    // One shared space, when asked for.
    let server = serve(layer().scope_shared()).await;
    let http = Http::new(&server);
    let alice = post_as(&http, "alice", "same").await;
    let bob = post_as(&http, "bob", "same").await;
    assert!(bob.replayed());
    assert_eq!(bob.body, alice.body);
}

// ---------------------------------------------------------------------------------------------
// Compression and content negotiation (issue 21, scenario 5)

/// A keyed `POST /orders` with a body long enough to be compressed, and `headers`.
async fn post_negotiated(http: &Http, key: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![
        ("idempotency-key", key),
        ("content-type", "application/json"),
    ];
    all.extend_from_slice(headers);
    let body = r#"{"sku":"book-42","qty":1,"note":"long enough to be worth compressing"}"#;
    http.send(Method::POST, "/orders", &all, body).await
}

fn is_gzip(reply: &Reply) -> bool {
    reply
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip")
        && reply.body.starts_with(&[0x1f, 0x8b])
}

#[tokio::test]
async fn compression_inside_the_layer_is_replayed_only_to_the_same_accept_encoding() {
    // The natural axum order: the layer added last is outside.
    let server = serve_app(|router| {
        router
            .layer(tower_http::compression::CompressionLayer::new())
            .layer(layer())
    })
    .await;
    let http = Http::new(&server);
    let gzip = [("accept-encoding", "gzip")];
    let first = post_negotiated(&http, "z-1", &gzip).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(is_gzip(&first), "{first:?}");
    assert!(
        first.headers[header::VARY]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("accept-encoding")
    );

    // A retry that does not accept gzip is not given the gzip body, nor a second run.
    let plain = post_negotiated(&http, "z-1", &[]).await;
    assert_eq!(plain.status, StatusCode::UNPROCESSABLE_ENTITY, "{plain:?}");
    assert_eq!(problem_type(&plain), "idempotency-variant-mismatch");
    let detail = plain.problem()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("accept-encoding"), "{detail}");
    let other = post_negotiated(&http, "z-1", &[("accept-encoding", "br")]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The same Accept-Encoding gets the stored response.
    let retry = post_negotiated(&http, "z-1", &gzip).await;
    assert!(retry.replayed(), "{retry:?}");
    assert!(is_gzip(&retry));
    assert_eq!(retry.body, first.body);
    assert_eq!(server.shared.calls(), 1);
    chaos::report(
        "topology_http_compression",
        &[("calls", 4), ("wrong_answers", 0)],
    );
}

#[tokio::test]
async fn compression_outside_the_layer_serves_every_retry() {
    let server = serve_with(layer(), |router| {
        router.layer(tower_http::compression::CompressionLayer::new())
    })
    .await;
    let http = Http::new(&server);
    let first = post_negotiated(&http, "z-2", &[("accept-encoding", "gzip")]).await;
    assert!(is_gzip(&first), "{first:?}");
    let plain = post_negotiated(&http, "z-2", &[]).await;
    assert!(plain.replayed(), "{plain:?}");
    assert!(!plain.headers.contains_key(header::CONTENT_ENCODING));
    assert!(plain.text().starts_with(r#"{"run":1,"#), "{plain:?}");
    let gzip = post_negotiated(&http, "z-2", &[("accept-encoding", "gzip")]).await;
    assert!(gzip.replayed() && is_gzip(&gzip));
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn vary_star_is_replayed_to_every_retry() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let first = http
        .send(
            Method::POST,
            "/status/201?vary-star",
            &[("idempotency-key", "v-1"), ("accept-language", "fr")],
            "x",
        )
        .await;
    let retry = http
        .send(
            Method::POST,
            "/status/201?vary-star",
            &[("idempotency-key", "v-1"), ("accept-language", "de")],
            "x",
        )
        .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(server.shared.calls(), 1);
}

#[tokio::test]
async fn content_type_and_encoding_are_part_of_the_request() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let as_type = |content_type: &'static str, key: &'static str| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                "/orders",
                &[("idempotency-key", key), ("content-type", content_type)],
                "{}",
            )
            .await
        }
    };
    let json = as_type("application/json", "ct-1").await;
    assert_eq!(json.status, StatusCode::CREATED);
    let text = as_type("text/plain", "ct-1").await;
    assert_eq!(text.status, StatusCode::UNPROCESSABLE_ENTITY, "{text:?}");
    assert_eq!(problem_type(&text), "idempotency-key-reused");
    let gzipped = http
        .send(
            Method::POST,
            "/orders",
            &[
                ("idempotency-key", "ct-1"),
                ("content-type", "application/json"),
                ("content-encoding", "gzip"),
            ],
            "{}",
        )
        .await;
    assert_eq!(gzipped.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(as_type("application/json", "ct-1").await.replayed());
    assert_eq!(server.shared.calls(), 1);

    // The fingerprinted headers are configurable: with none, the bytes alone decide.
    let server = serve(layer().fingerprint_headers([])).await;
    let http = Http::new(&server);
    let send = |content_type: &'static str| {
        let http = http.clone();
        async move {
            http.send(
                Method::POST,
                "/orders",
                &[("idempotency-key", "ct-2"), ("content-type", content_type)],
                "{}",
            )
            .await
        }
    };
    send("application/json").await;
    assert!(send("text/plain").await.replayed());
}

// ---------------------------------------------------------------------------------------------
// The hostile review of the HTTP layer: each finding, counted in handler runs

/// Sends `raw` on a new connection and reads the response head (up to the blank line), or what
/// came before the connection closed.
async fn raw_head(server: &Server, raw: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(raw.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A keyed `POST` whose response body may fail: its status and headers only.
async fn post_head(http: &Http, path: &str, key: &str) -> (StatusCode, HeaderMap) {
    let req = Request::post(format!("{}{path}", http.base))
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CREDENTIALS)
        .body(Full::from("x"))
        .unwrap();
    let res = http.client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let _ = body.collect().await; // may fail: the handler's body did
    (parts.status, parts.headers)
}

/// Waits (up to five seconds) until `done` holds.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// Finding 1: axum's `nest` takes its prefix off the path before a layer inside it sees the
/// request; the fingerprint is the path the client sent (axum's `OriginalUri`), so two accounts'
/// charges with one key are two requests, never a replay of the first.
#[cfg(feature = "axum")]
#[tokio::test]
async fn a_layer_inside_a_nested_router_keeps_each_endpoint_apart() {
    let idempotency = layer();
    let accounts = Router::new()
        .route("/charges", any(order))
        .layer(idempotency.clone());
    let server = serve_router(Router::new().nest("/accounts/{account}", accounts)).await;
    let http = Http::new(&server);
    let first = http.post("/accounts/1/charges", "pay", "amount=100").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = http.post("/accounts/2/charges", "pay", "amount=100").await;
    assert_eq!(
        second.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{second:?}"
    );
    assert_eq!(problem_type(&second), "idempotency-key-reused");
    assert_eq!(server.shared.calls(), 1);
    let retry = http.post("/accounts/1/charges", "pay", "amount=100").await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(server.shared.calls(), 1);

    // One layer, cloned into two nested routers.
    let v1 = Router::new()
        .route("/orders", any(order))
        .layer(idempotency.clone());
    let v2 = Router::new()
        .route("/orders", any(order))
        .layer(idempotency);
    let server = serve_router(Router::new().nest("/v1", v1).nest("/v2", v2)).await;
    let http = Http::new(&server);
    assert_eq!(
        http.post("/v1/orders", "n", "").await.status,
        StatusCode::CREATED
    );
    let v2 = http.post("/v2/orders", "n", "").await;
    assert_eq!(v2.status, StatusCode::UNPROCESSABLE_ENTITY, "{v2:?}");
    assert_eq!(server.shared.calls(), 1);
}

/// Finding 2: with the default scope, keyed requests without credentials are refused, so one
/// anonymous client never gets another's stored response (`Set-Cookie` included) nor uses up a
/// quota shared with them; one shared space is an explicit opt-in.
#[tokio::test]
async fn anonymous_keyed_requests_are_refused_and_never_get_anothers_cookies() {
    let server = serve(layer()).await;
    let anonymous = Http::anonymous(&server);
    for _client in ["alice", "mallory"] {
        let reply = anonymous.post("/orders", "welcome", "order").await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{reply:?}");
        assert_eq!(problem_type(&reply), "idempotency-client-unknown");
        assert!(!reply.headers.contains_key(header::SET_COOKIE));
    }
    assert_eq!(server.shared.calls(), 0);
    // Unkeyed, they pass through unguarded as before.
    let unkeyed = anonymous.send(Method::POST, "/orders", &[], "order").await;
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(server.shared.calls(), 1);

    // `scope_shared()` is the opt-in to one space, with the risk its docs name.
    let server = serve(layer().scope_shared()).await;
    let anonymous = Http::anonymous(&server);
    let alice = anonymous.post("/orders", "welcome", "order").await;
    let mallory = anonymous.post("/orders", "welcome", "order").await;
    assert!(mallory.replayed());
    assert_eq!(
        mallory.headers.get_all(header::SET_COOKIE).iter().count(),
        alice.headers.get_all(header::SET_COOKIE).iter().count()
    );
    assert_eq!(server.shared.calls(), 1);
}

/// Finding 3: a client gets `max_running_per_client` keyed requests running at once (not as
/// many as the room for their largest responses allows), and the next gets `429` with
/// `Retry-After: 1` (finding 8: not the day its oldest record expires); other clients are
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_runs_at_most_its_running_quota_and_is_told_to_look_again_soon() {
    const RUNNING: usize = idem::http::DEFAULT_MAX_RUNNING_PER_CLIENT;
    let idempotency = layer();
    let server = serve(idempotency.clone()).await;
    let http = Http::new(&server);
    // One stored record, whose expiry is a day away.
    assert_eq!(
        http.post("/orders", "old", "x").await.status,
        StatusCode::CREATED
    );
    let running: Vec<_> = (0..RUNNING)
        .map(|i| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/slow", &format!("r-{i}"), "x").await })
        })
        .collect();
    for _ in 0..RUNNING {
        server.shared.entered.acquire().await.unwrap().forget();
    }
    let over = tokio::time::timeout(Duration::from_secs(5), http.post("/slow", "one-more", "x"))
        .await
        .expect("refused at once, not run");
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{over:?}");
    assert_eq!(problem_type(&over), "idempotency-quota-exceeded");
    assert_eq!(over.headers[header::RETRY_AFTER], "1");
    assert_eq!(server.shared.calls(), 1 + RUNNING);
    // The stored key still replays, and another client is served.
    assert!(http.post("/orders", "old", "x").await.replayed());
    let other = post_as(&http, "other", "o-1").await;
    assert_eq!(other.status, StatusCode::CREATED);

    server.shared.gate.add_permits(RUNNING);
    for task in running {
        assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
    }
    server.shared.gate.add_permits(1);
    let later = http.post("/slow", "one-more", "x").await;
    assert_eq!(later.status, StatusCode::CREATED, "{later:?}");
    chaos::report(
        "flood_http_running",
        &[
            ("running_allowed", RUNNING as u64),
            ("refused_with_retry_after_1", 1),
            ("other_requests_served", 1),
            ("requests_lost", 0),
        ],
    );
}

/// Finding 8: a client at its record quota because of requests still running is told to look
/// again in a second, not when its oldest stored record expires a day later.
#[tokio::test]
async fn a_quota_held_by_running_requests_says_retry_soon() {
    let server = serve(layer().max_records_per_client(3)).await;
    let http = Http::new(&server);
    http.post("/orders", "stored", "x").await;
    let running: Vec<_> = (0..2)
        .map(|i| {
            let http = http.clone();
            tokio::spawn(async move { http.post("/slow", &format!("s-{i}"), "x").await })
        })
        .collect();
    for _ in 0..2 {
        server.shared.entered.acquire().await.unwrap().forget();
    }
    let over = http.post("/orders", "new", "x").await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{over:?}");
    assert_eq!(over.headers[header::RETRY_AFTER], "1");
    server.shared.gate.add_permits(2);
    for task in running {
        task.await.unwrap();
    }
    // Now three stored records hold the quota: the wait is until the oldest expires.
    let over = http.post("/orders", "new", "x").await;
    let retry_after: u64 = over.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 23 * 3600, "{retry_after}");
    assert_eq!(server.shared.calls(), 3);
}

/// Finding 4: a graceful shutdown waits for connections, not for the handler of a client that
/// went away; `drain` does, so the handler finishes once and its response is stored before the
/// runtime is dropped, and the retry on the next server replays it.
#[test]
fn drain_after_graceful_shutdown_lets_an_abandoned_handler_finish() {
    let store = Arc::new(MemoryStore::new());
    let shared = Shared::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on({
        let (store, shared) = (Arc::clone(&store), shared.clone());
        async move {
            let idempotency = IdempotencyLayer::new(store);
            let app = Router::new()
                .route("/{*path}", any(order))
                .layer(idempotency.clone())
                .with_state(shared.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            let server = Server {
                addr,
                shared: shared.clone(),
                task: tokio::spawn(async {}),
            };
            disconnect_mid_handler(&server, "deploy").await;
            let _ = stop.send(());
            serving.await.unwrap();
            assert_eq!(shared.finished(), 0, "the handler still runs");
            // The handler ends a little later (its gate opens); drain waits for it.
            let gate = shared.gate.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                gate.add_permits(1);
            });
            tokio::time::timeout(Duration::from_secs(5), idempotency.drain())
                .await
                .expect("drained");
            assert_eq!(shared.finished(), 1);
        }
    });
    drop(runtime); // as `main` returning would
    assert_eq!((shared.calls(), shared.finished()), (1, 1));

    // The next deployment, on the same store: the retry gets the first run's response.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = serve(IdempotencyLayer::new(Arc::clone(&store))).await;
        let retry = Http::new(&server).post("/slow", "deploy", "order").await;
        assert!(retry.replayed(), "{retry:?}");
        assert_eq!(retry.text(), r#"{"run":1,"body":"order"}"#);
        assert_eq!(server.shared.calls(), 0);
    });
}

/// A timeout layer: answers `408` when the inner service takes longer than 200 ms.
async fn timeout_408(req: AxumRequest, next: Next) -> Response {
    match tokio::time::timeout(Duration::from_millis(200), next.run(req)).await {
        Ok(response) => response,
        Err(_) => StatusCode::REQUEST_TIMEOUT.into_response(),
    }
}

/// Finding 5: a timeout outside the layer answers the client, and the handler runs on to its
/// end: the retry gets `409` while it runs, then the stored response, and it ran once.
#[tokio::test]
async fn a_timeout_outside_the_layer_answers_408_and_the_handler_runs_once() {
    let server = serve_with(layer(), |router| {
        router.layer(middleware::from_fn(timeout_408))
    })
    .await;
    let http = Http::new(&server);
    let first = http.post("/slow", "t-1", "order").await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    let during = http.post("/slow", "t-1", "order").await;
    assert_eq!(during.status, StatusCode::CONFLICT, "{during:?}");
    server.shared.gate.add_permits(1);
    assert!(eventually(|| server.shared.finished() == 1).await);
    let after = http.post("/slow", "t-1", "order").await;
    assert!(after.replayed(), "{after:?}");
    assert_eq!(after.text(), r#"{"run":1,"body":"order"}"#);
    assert_eq!((server.shared.calls(), server.shared.finished()), (1, 1));
}

/// Finding 6: `Retry-After` on a `2xx` or `3xx` is no refusal: "accepted, poll later", or the
/// wait before following a redirect. Those answers are stored by default.
#[tokio::test]
async fn executed_answers_with_retry_after_are_stored() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for (i, path) in [
        "/status/202?retry-after",
        "/status/201?retry-after",
        "/status/303?retry-after&location",
    ]
    .into_iter()
    .enumerate()
    {
        let before = server.shared.calls();
        let (first, second) = stored_twice(&http, path, &format!("ra-{i}")).await;
        assert!(!first.headers.contains_key(IDEMPOTENT_NOT_STORED), "{path}");
        assert!(second.replayed(), "{path}: {second:?}");
        assert_eq!(second.headers[header::RETRY_AFTER], "1");
        assert_eq!(server.shared.calls(), before + 1, "{path}: ran once");
    }
}

/// Finding 19 of the review (with 6): a `1xx` is never stored, whatever the policy: a replayed
/// `101 Switching Protocols` would leave the retry's client hanging.
#[tokio::test]
async fn an_informational_response_is_never_stored() {
    let server = serve(layer().store_if(|_| true)).await;
    let raw = format!(
        "POST /status/101 HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: up\r\nAuthorization: \
         {CREDENTIALS}\r\nContent-Length: 0\r\n\r\n",
        server.addr
    );
    for run in 1..=2 {
        let head = raw_head(&server, &raw).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains("idempotent-not-stored: informational"),
            "{head}"
        );
        assert!(!head.contains("idempotent-replayed"), "{head}");
        assert_eq!(server.shared.calls(), run);
    }
}

/// Finding 7: with `OnConflict::Wait`, a retry whose client went away before its handler
/// started stops at once and lets go of its body; one still connected waits, its body counted
/// against its client's byte quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_retries_whose_clients_left_stop_and_free_their_bodies() {
    const WAITERS: usize = 40;
    const BODY: usize = 100_000;
    let idempotency = layer()
        .on_conflict(OnConflict::Wait)
        .scope_header(HeaderName::from_static("x-client"));
    let server = serve(idempotency.clone()).await;
    let http = Http::new(&server);
    let body = "x".repeat(BODY);
    let holder = tokio::spawn({
        let (http, body) = (http.clone(), body.clone());
        async move {
            http.send(
                Method::POST,
                "/slow",
                &[("idempotency-key", "w"), ("x-client", "mallory")],
                &body,
            )
            .await
        }
    });
    server.shared.entered.acquire().await.unwrap().forget();
    let raw = format!(
        "POST /slow HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: w\r\nX-Client: mallory\r\n\
         Content-Length: {BODY}\r\n\r\n{body}",
        server.addr
    );
    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        conn.write_all(raw.as_bytes()).await.unwrap();
        waiters.push(conn);
    }
    let usage = || idempotency.client_usage("mallory");
    let all_waiting = eventually(|| usage().buffered_bytes == (WAITERS + 1) * BODY).await;
    assert!(all_waiting, "{:?}", usage());
    drop(waiters); // the clients go away
    let freed = eventually(|| usage().buffered_bytes == BODY).await;
    assert!(freed, "{:?}", usage());
    let left = usage().buffered_bytes / BODY - 1;
    assert_eq!(server.shared.calls(), 1, "no waiter ran the handler");

    server.shared.gate.add_permits(1);
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    let retry = http
        .send(
            Method::POST,
            "/slow",
            &[("idempotency-key", "w"), ("x-client", "mallory")],
            &body,
        )
        .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(server.shared.calls(), 1);
    assert!(eventually(|| usage().buffered_bytes == 0).await);
    chaos::report(
        "flood_http_waiters",
        &[
            ("waiters", WAITERS as u64),
            ("waiters_left_after_clients_went", left as u64),
            ("handler_runs", server.shared.calls() as u64),
            ("requests_lost", 0),
        ],
    );
}

/// Finding 7, connected: the bodies of a client's waiting requests count against its byte quota.
#[tokio::test]
async fn waiting_request_bodies_are_bounded_by_the_byte_quota() {
    const BODY: usize = 100_000;
    let idempotency = layer()
        .on_conflict(OnConflict::Wait)
        .max_bytes_per_client(3 * BODY);
    let server = serve(idempotency.clone()).await;
    let http = Http::new(&server);
    let body = "x".repeat(BODY);
    let post = || {
        let (http, body) = (http.clone(), body.clone());
        tokio::spawn(async move { http.post("/slow", "w", &body).await })
    };
    let holder = post();
    server.shared.entered.acquire().await.unwrap().forget();
    let waiters = [post(), post()];
    let parts = Request::post("/slow")
        .header(header::AUTHORIZATION, CREDENTIALS)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let usage = || idempotency.client_usage_of(&parts).unwrap_or_default();
    assert!(
        eventually(|| usage().buffered_bytes == 3 * BODY).await,
        "{:?}",
        usage()
    );
    let over = http.post("/slow", "w", &body).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{over:?}");
    assert_eq!(problem_type(&over), "idempotency-quota-exceeded");
    assert_eq!(over.headers[header::RETRY_AFTER], "1");
    server.shared.gate.add_permits(1);
    assert_eq!(holder.await.unwrap().status, StatusCode::CREATED);
    for waiter in waiters {
        assert!(waiter.await.unwrap().replayed());
    }
    assert_eq!(server.shared.calls(), 1);
}

/// Finding 9: on a tokio runtime without timers the layer answers `500` with a problem, and
/// never panics nor runs the handler unguarded.
#[test]
fn a_runtime_without_timers_gets_a_problem_not_a_panic() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .build()
        .unwrap();
    let shared = Shared::new();
    let addr = runtime.block_on({
        let shared = shared.clone();
        async move {
            let app = Router::new()
                .route("/{*path}", any(order))
                .layer(layer())
                .with_state(shared);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            addr
        }
    });
    let client = tokio::runtime::Runtime::new().unwrap();
    client.block_on(async {
        let server = Server {
            addr,
            shared: shared.clone(),
            task: tokio::spawn(async {}),
        };
        let http = Http::new(&server);
        for _ in 0..2 {
            let reply = http.post("/orders", "k", "x").await;
            assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
            assert_eq!(problem_type(&reply), "idempotency-runtime-unsupported");
        }
        assert_eq!(shared.calls(), 0);
        // Unguarded requests need no timers.
        let get = http.send(Method::GET, "/orders", &[], "").await;
        assert_eq!(get.status, StatusCode::CREATED);
    });
    runtime.shutdown_background();
}

/// Finding 10: a key list (two headers folded into one) is not one key.
#[tokio::test]
async fn a_folded_key_list_is_400() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for bad in ["k1, k2", "k1,k2", "k 1"] {
        let reply = http.post("/orders", bad, "x").await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}: {reply:?}");
        assert_eq!(problem_type(&reply), "idempotency-key-invalid");
    }
    // Quoted, a comma or a space is part of one key.
    assert_eq!(
        http.post("/orders", "\"k1, k2\"", "x").await.status,
        StatusCode::CREATED
    );
    assert_eq!(server.shared.calls(), 1);
}

/// Finding 10: layers made from one layer by builder calls share its quota table: a client's
/// quota is one across the routers they guard.
#[tokio::test]
async fn builder_calls_after_clone_share_the_quota() {
    let base = layer()
        .scope_header(HeaderName::from_static("x-api-key"))
        .max_records_per_client(2);
    let orders = base.clone().methods([Method::POST]);
    let refunds = base.clone().namespace("refunds");
    let router = Router::new()
        .route("/orders", any(order).layer(orders))
        .route("/refunds", any(order).layer(refunds));
    let server = serve_router(router).await;
    let http = Http::new(&server);
    let mut statuses = Vec::new();
    for (path, key) in [("/orders", "o1"), ("/refunds", "r1"), ("/orders", "o2")] {
        let reply = http
            .send(
                Method::POST,
                path,
                &[("idempotency-key", key), ("x-api-key", "alice")],
                "",
            )
            .await;
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [201, 201, 429]);
    assert_eq!(base.client_usage("alice").records, 2);
    assert_eq!(server.shared.calls(), 2);
}

/// Finding 10: the layer applied twice (on a router and on its route): the outer one guards,
/// the inner one lets the request through; the key is not claimed twice.
#[tokio::test]
async fn a_layer_applied_twice_guards_once() {
    let idempotency = layer();
    let router = Router::new()
        .route("/orders", any(order).layer(idempotency.clone()))
        .layer(idempotency);
    let server = serve_router(router).await;
    let http = Http::new(&server);
    let first = http.post("/orders", "k", "x").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(http.post("/orders", "k", "x").await.replayed());
    assert_eq!(
        http.post("/orders", "k2", "x").await.status,
        StatusCode::CREATED
    );
    assert_eq!(server.shared.calls(), 2);
}

/// Finding 10: a response whose body fails says why it was not stored.
#[tokio::test]
async fn a_failing_response_body_is_not_stored_and_says_so() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    for run in 1..=2 {
        let (status, headers) = post_head(&http, "/failbody", "f-1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[IDEMPOTENT_NOT_STORED], "body-error");
        assert_eq!(
            server.shared.calls(),
            run,
            "not stored: the retry runs again"
        );
    }
}

/// Finding 10: the first (executing) response keeps its trailers; a replay has none (they are
/// not stored).
#[tokio::test]
async fn the_first_response_keeps_its_trailers() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let send = || async {
        let req = Request::post(format!("{}/trailers", http.base))
            .header("idempotency-key", "tr")
            .header(header::AUTHORIZATION, CREDENTIALS)
            .header(header::TE, "trailers")
            .body(Full::from("x"))
            .unwrap();
        let res = http.client.request(req).await.unwrap();
        let replayed = res.headers().contains_key(IDEMPOTENT_REPLAYED);
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (replayed, collected.to_bytes(), trailers)
    };
    let (replayed, body, trailers) = send().await;
    assert!(!replayed);
    assert_eq!(&body[..], b"run 1");
    assert_eq!(
        trailers.map(|t| t["x-checksum"].clone()),
        Some("c0ffee".parse().unwrap())
    );
    let (replayed, body, trailers) = send().await;
    assert!(replayed);
    assert_eq!(&body[..], b"run 1");
    assert!(trailers.is_none());
    assert_eq!(server.shared.calls(), 1);
}

/// Finding 10: a replay says how long ago its response was made (`Age`, RFC 9111 §5.1).
#[tokio::test]
async fn a_replay_carries_its_age() {
    let server = serve(layer()).await;
    let http = Http::new(&server);
    let first = http.post("/orders", "aged", "x").await;
    assert!(!first.headers.contains_key(header::AGE));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retry = http.post("/orders", "aged", "x").await;
    assert!(retry.replayed());
    let age: u64 = retry.headers[header::AGE]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&age), "{age}");
}

/// Finding 10: `client_usage_of` finds the client of a request with any scope, the default
/// (whose names are digests) included.
#[tokio::test]
async fn client_usage_of_a_request_works_with_the_default_scope() {
    let idempotency = layer();
    let server = serve(idempotency.clone()).await;
    let http = Http::new(&server);
    http.post("/orders", "u-1", "x").await;
    http.post("/orders", "u-2", "x").await;
    let request = |authorization: Option<&str>| {
        let mut req = Request::post("/orders");
        if let Some(value) = authorization {
            req = req.header(header::AUTHORIZATION, value);
        }
        req.body(()).unwrap().into_parts().0
    };
    let usage = idempotency.client_usage_of(&request(Some(CREDENTIALS)));
    assert_eq!(usage.map(|u| u.records), Some(2));
    assert!(usage.is_some_and(|u| u.bytes > 0));
    let stranger = idempotency.client_usage_of(&request(Some("Bearer stranger")));
    assert_eq!(stranger.map(|u| u.records), Some(0));
    assert_eq!(idempotency.client_usage_of(&request(None)), None);
}

/// Issue 16: the record's expiry is sent with the stored response and every replay, in whole
/// seconds, and never with a response that was not stored.
#[tokio::test]
async fn stored_responses_and_replays_say_when_the_record_expires() {
    let server = serve(layer().ttl(Duration::from_secs(3600))).await;
    let http = Http::new(&server);
    let seconds = |reply: &Reply| -> u64 {
        reply.headers[IDEMPOTENT_EXPIRES_IN]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = http.post("/orders", "exp-1", "x").await;
    assert!(!first.replayed());
    assert!((3595..=3600).contains(&seconds(&first)), "{first:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retry = http.post("/orders", "exp-1", "x").await;
    assert!(retry.replayed());
    assert!((3590..3600).contains(&seconds(&retry)), "{retry:?}");

    let failed = http.post("/status/503", "exp-2", "x").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!failed.headers.contains_key(IDEMPOTENT_EXPIRES_IN));
    assert_eq!(server.shared.calls(), 2);
}

// ---------------------------------------------------------------------------------------------
// The second hostile review (scratch harness in review-http2)

/// How a raw exchange ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The server closed (or reset) the connection.
    Closed,
    /// Nothing more came for a second, the connection still open.
    Open,
}

/// Sends `raw` on a new connection and reads what comes back until the server closes the
/// connection or a second passes without a byte.
async fn raw_exchange(server: &Server, raw: &[u8]) -> (String, Ended) {
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Ended::Closed,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break Ended::Open,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), ended)
}

/// Round 2, finding 1: a response body that fails mid-way reaches the client as a broken
/// response (chunked, cut off before its last chunk, the connection closed), as it does without
/// the layer, never as a complete `2xx` whose `Content-Length` matches the part that was sent.
#[tokio::test]
async fn a_response_body_that_fails_midway_reaches_the_client_broken() {
    let server = serve(layer()).await;
    let raw = format!(
        "POST /failbody HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: fb\r\nAuthorization: {CREDENTIALS}\r\n\
         Content-Length: 1\r\n\r\nx",
        server.addr
    );
    for run in 1..=2 {
        let (response, ended) = raw_exchange(&server, raw.as_bytes()).await;
        let lower = response.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{response:?}");
        assert!(
            lower.contains("idempotent-not-stored: body-error"),
            "{response:?}"
        );
        assert!(lower.contains(&format!("run {run}, part")), "{response:?}");
        // Not framed as complete: no length to match, no last chunk, and the connection ends.
        assert!(!lower.contains("content-length"), "{response:?}");
        assert!(lower.contains("transfer-encoding: chunked"), "{response:?}");
        assert!(!response.ends_with("0\r\n\r\n"), "{response:?}");
        assert_eq!(ended, Ended::Closed, "{response:?}");
        // Not stored: the retry runs the handler again.
        assert_eq!(server.shared.calls(), run);
    }
}

/// The head of a keyed `POST /orders` from client `client` (`X-Client`), with `framing`
/// (`Content-Length: n` or `Transfer-Encoding: chunked`).
fn upload_head(server: &Server, client: &str, key: &str, framing: &str) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: {key}\r\nX-Client: {client}\r\n\
         {framing}\r\n\r\n",
        server.addr
    )
}

/// One chunk of a chunked upload.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Reads a response head (up to the blank line) from `conn`.
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn is_quota_refusal(response: &str) -> bool {
    let lower = response.to_ascii_lowercase();
    lower.starts_with("http/1.1 429 ")
        && lower.contains("retry-after: 1\r\n")
        && lower.contains("#idempotency-quota-exceeded")
}

/// Round 2, finding 2: a client's keyed uploads are held against its byte bound from before
/// their bodies are read (at their `Content-Length`), so uploads that stall before their last
/// byte cannot pile up: one more is refused at once, another client is still served, and the
/// stalled ones run when they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_stall_before_their_last_byte_are_held_against_their_client() {
    const BODY: usize = 100_000;
    const STALLED: usize = 3;
    let idempotency = layer()
        .scope_header(HeaderName::from_static("x-client"))
        .max_bytes_per_client(STALLED * BODY);
    let server = serve(idempotency.clone()).await;
    let usage = || idempotency.client_usage("mallory");
    let length = format!("Content-Length: {BODY}");
    let body = vec![b'x'; BODY];
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = upload_head(&server, "mallory", &format!("up-{i}"), &length);
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body[..BODY - 1]).await.unwrap();
        stalled.push(conn);
    }
    let held = eventually(|| usage().buffered_bytes == STALLED * BODY).await;
    assert!(held, "{:?}", usage());

    // One more is refused from its head alone, not a byte of its body sent...
    let head = upload_head(&server, "mallory", "up-more", &length);
    let (refused, _) = raw_exchange(&server, head.as_bytes()).await;
    assert!(is_quota_refusal(&refused), "{refused:?}");
    // ... and so is a chunked one, at its first chunk.
    let mut raw = upload_head(
        &server,
        "mallory",
        "up-chunked",
        "Transfer-Encoding: chunked",
    )
    .into_bytes();
    raw.extend(chunk(b"sixteen bytes!!!"));
    let (refused, _) = raw_exchange(&server, &raw).await;
    assert!(is_quota_refusal(&refused), "{refused:?}");
    assert_eq!(usage().buffered_bytes, STALLED * BODY);

    // Another client is served.
    let http = Http::new(&server);
    let bob = http
        .send(
            Method::POST,
            "/orders",
            &[("idempotency-key", "b-1"), ("x-client", "bob")],
            "x",
        )
        .await;
    assert_eq!(bob.status, StatusCode::CREATED, "{bob:?}");
    assert_eq!(server.shared.calls(), 1);

    // The stalled uploads end, and run.
    for conn in &mut stalled {
        conn.write_all(b"x").await.unwrap();
    }
    for conn in &mut stalled {
        let head = read_head(conn).await;
        assert!(head.starts_with("HTTP/1.1 201 "), "{head:?}");
    }
    assert_eq!(server.shared.calls(), 1 + STALLED);
    assert!(
        eventually(|| usage().buffered_bytes == 0).await,
        "{:?}",
        usage()
    );
}

/// Round 2, finding 2: a chunked upload (no `Content-Length`) grows its client's hold chunk by
/// chunk as it is read, and one that would take the client over its byte bound is refused
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_are_held_as_they_are_read() {
    const BODY: usize = 100_000;
    let idempotency = layer()
        .scope_header(HeaderName::from_static("x-client"))
        .max_bytes_per_client(3 * BODY);
    let server = serve(idempotency.clone()).await;
    let usage = || idempotency.client_usage("mallory");
    let chunked = "Transfer-Encoding: chunked";
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut raw = upload_head(&server, "mallory", "c-1", chunked).into_bytes();
    for _ in 0..2 {
        raw.extend(chunk(&vec![b'x'; BODY]));
    }
    stalled.write_all(&raw).await.unwrap();
    let held = eventually(|| usage().buffered_bytes == 2 * BODY).await;
    assert!(held, "{:?}", usage());

    // Another chunked upload fits until it takes the client past its bound.
    let mut raw = upload_head(&server, "mallory", "c-2", chunked).into_bytes();
    raw.extend(chunk(&vec![b'y'; BODY / 2]));
    raw.extend(chunk(&vec![b'y'; BODY / 2 + 1]));
    raw.extend(b"0\r\n\r\n");
    let (refused, _) = raw_exchange(&server, &raw).await;
    assert!(is_quota_refusal(&refused), "{refused:?}");
    assert_eq!(usage().buffered_bytes, 2 * BODY);
    assert_eq!(server.shared.calls(), 0);

    // The stalled one ends, and runs.
    stalled.write_all(b"0\r\n\r\n").await.unwrap();
    let head = read_head(&mut stalled).await;
    assert!(head.starts_with("HTTP/1.1 201 "), "{head:?}");
    assert_eq!(server.shared.calls(), 1);
    assert!(
        eventually(|| usage().buffered_bytes == 0).await,
        "{:?}",
        usage()
    );
}

/// Round 2, finding 3: `Age` on a replay is how long ago the response was stored, from the ttl
/// the record was stored with: a deployment that changed the ttl (here from an hour to a day)
/// replays a response stored a moment ago with an `Age` of about zero, not 23 hours.
#[tokio::test]
async fn age_is_counted_from_the_ttl_the_response_was_stored_with() {
    let store = Arc::new(MemoryStore::new());
    let before =
        serve(IdempotencyLayer::new(Arc::clone(&store)).ttl(Duration::from_secs(3600))).await;
    let after =
        serve(IdempotencyLayer::new(Arc::clone(&store)).ttl(Duration::from_secs(86_400))).await;
    let first = Http::new(&before).post("/orders", "ttl-change", "x").await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let replay = Http::new(&after).post("/orders", "ttl-change", "x").await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(after.shared.calls(), 0);
    let seconds = |name: &str| -> u64 { replay.headers[name].to_str().unwrap().parse().unwrap() };
    assert!(seconds("age") <= 2, "{replay:?}");
    // The record lives as long as it was stored for.
    assert!(
        (3590..3600).contains(&seconds("idempotent-expires-in")),
        "{replay:?}"
    );
    assert_eq!(first.body, replay.body);
}
