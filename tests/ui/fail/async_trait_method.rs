//! `#[async_trait]` on an impl rewrites its `async fn`s before `#[idempotent]` runs, into the
//! shape written out below by hand; the attribute names the cause instead of asking for the
//! `async fn` the user did write.

use std::future::Future;
use std::pin::Pin;

use idem::idempotent;

trait Handler {
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = Result<u64, idem::Error>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait;
}

struct Consumer;

// What `#[async_trait] impl Handler for Consumer { #[idempotent(key = id)] async fn handle(..) }`
// hands to `#[idempotent]`.
impl Handler for Consumer {
    #[idempotent(key = id)]
    fn handle<'life0, 'async_trait>(
        &'life0 self,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = Result<u64, idem::Error>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let __self = self;
            let __ret: Result<u64, idem::Error> = { Ok(id) };
            #[allow(unreachable_code)]
            __ret
        })
    }
}

fn main() {}
