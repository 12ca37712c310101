//! An order service whose `POST /orders` is guarded by [`IdempotencyLayer`], and a client on a
//! lossy link that retries.
//!
//! The link between them loses the first two responses: the server creates the order and answers,
//! but the connection drops before the answer reaches the client. The client retries with the same
//! `Idempotency-Key`, and on the third try gets the first response back (`Idempotent-Replayed:
//! true`). One order was created, not three.
//!
//! The service is laid out as a real one should be: an authentication layer *outside* the
//! idempotency layer rejects unknown credentials and puts the customer it found in the request's
//! extensions, and the idempotency layer scopes keys (and quotas) by that customer. At the end the
//! server shuts down gracefully and waits for the idempotency layer to
//! [`drain`](idem::IdempotencyLayer::drain): a handler whose client went away still finishes
//! before the process exits.
//!
//! ```text
//! cargo run --example http_orders --features http
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request as AxumRequest, State};
use axum::http::{HeaderName, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idem::http::IDEMPOTENT_REPLAYED;
use idem::store::Bytes;
use idem::{IdempotencyLayer, MemoryStore};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The orders the service created.
#[derive(Clone, Default)]
struct Orders {
    created: Arc<AtomicU64>,
}

/// The customers and their API tokens. A real service checks a signed token or a database.
const CUSTOMERS: [(&str, &str); 2] = [("tok_4f1c2a9e", "acme"), ("tok_77d0b3c1", "globex")];

/// The customer the authentication layer found, in the request's extensions.
#[derive(Clone)]
struct Customer(&'static str);

/// The authentication layer: a request without known credentials is answered `401` here, before
/// it reaches the idempotency layer, so made-up credentials never make a client (nor a quota).
async fn authenticate(mut req: AxumRequest, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let customer = CUSTOMERS
        .iter()
        .find(|(known, _)| Some(*known) == token)
        .map(|&(_, customer)| Customer(customer));
    match customer {
        Some(customer) => {
            req.extensions_mut().insert(customer);
            next.run(req).await
        }
        None => (StatusCode::UNAUTHORIZED, "unknown credentials").into_response(),
    }
}

/// `POST /orders`: creates an order. Not idempotent by itself: every call makes a new one.
async fn create_order(
    State(orders): State<Orders>,
    body: String,
) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    let id = orders.created.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"id":{id},"order":{body}}}"#),
    )
}

/// What the run ended with.
#[derive(Debug)]
pub struct Report {
    /// How many orders the service created.
    pub orders_created: u64,
    /// How many times the client sent the request.
    pub attempts: u32,
    /// The status of the response the client finally got.
    pub status: StatusCode,
    /// Whether that response was a replay.
    pub replayed: bool,
    /// Its body.
    pub body: String,
}

/// Starts the service and the lossy link, and lets the client create one order.
pub async fn run() -> Result<Report, BoxError> {
    let orders = Orders::default();
    // Keys (and quotas) belong to the customer the authentication layer found: two customers
    // that pick the same key never see each other's responses.
    let idempotency = IdempotencyLayer::new(MemoryStore::new())
        .ttl(Duration::from_secs(24 * 60 * 60))
        .require_key(true)
        .scope(|req| req.extensions.get::<Customer>().map(|c| c.0.to_owned()));
    // The idempotency layer goes right around the handlers; what answers in their place goes
    // outside it, added after it: authentication here, and timeouts, rate limiting, validation
    // and compression in a real service, so that their answers are never stored.
    let app = Router::new()
        .route("/orders", post(create_order))
        .layer(idempotency.clone())
        .layer(middleware::from_fn(authenticate))
        .with_state(orders.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });
    let link = lossy_link(server_addr, 2).await?;
    println!("order service on http://{server_addr}; the client reaches it through a lossy link");

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let key = "\"4f1c2a9e-order-book-42\"";
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let request = Request::post(format!("http://{link}/orders"))
            .header(header::AUTHORIZATION, "Bearer tok_4f1c2a9e")
            .header("idempotency-key", key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(r#"{"sku":"book-42","qty":1}"#))?;
        match client.request(request).await {
            Ok(response) => {
                let status = response.status();
                let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
                let body = response.into_body().collect().await?.to_bytes();
                let body = String::from_utf8_lossy(&body).into_owned();
                println!(
                    "attempt {attempts}: {status}{}: {body}",
                    if replayed {
                        ", Idempotent-Replayed: true"
                    } else {
                        ""
                    }
                );
                break Report {
                    orders_created: 0,
                    attempts,
                    status,
                    replayed,
                    body,
                };
            }
            Err(err) if attempts < 5 => {
                println!(
                    "attempt {attempts}: no response ({}); retrying with the same key",
                    causes(&err)
                );
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempts))).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    // Shut down as a deployment does: stop taking connections, let those open finish, then wait
    // for the keyed requests whose clients went away (bounded by what the deployment allows).
    drop(client);
    let _ = stop.send(());
    server.await??;
    tokio::time::timeout(Duration::from_secs(10), idempotency.drain()).await?;
    let orders_created = orders.created.load(Ordering::SeqCst);
    println!("orders created: {orders_created}");
    Ok(Report {
        orders_created,
        ..result
    })
}

/// An error and its causes, as one line.
fn causes(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// A TCP link to `upstream` that drops the first `lose` responses: it forwards the request, and
/// cuts the connection as soon as the response starts to come back.
async fn lossy_link(upstream: SocketAddr, lose: usize) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            connections += 1;
            let lossy = connections <= lose;
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    return;
                };
                if !lossy {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                let (mut from_client, _) = client.split();
                let (mut from_server, mut to_server) = server.split();
                let mut first_bytes = [0u8; 1];
                tokio::select! {
                    _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
                    _ = from_server.read(&mut first_bytes) => {} // the response is lost here
                }
                // Both connections close here.
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let report = run().await?;
    assert_eq!(
        report.orders_created, 1,
        "the retries must not create orders"
    );
    Ok(())
}
