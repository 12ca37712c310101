//! The store conformance suite, run against every store this build has.

mod memory {
    use std::sync::Arc;

    use idem::{MemoryStore, Store};

    idem::conformance_tests!(async { Arc::new(MemoryStore::new()) as Arc<dyn Store> });

    /// The process-wide store that `#[idempotent]` uses by default passes too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn global_store_passes_the_whole_suite() {
        idem::conformance::run_all(Arc::new(MemoryStore::global()) as Arc<dyn Store>).await;
    }
}
