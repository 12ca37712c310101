//! `idem::step` on the in-memory store (STEPS-DESIGN.md): each effect is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem::{Error, Idempotent, MemoryStore};
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_millis(100);

fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}

/// An effect: counts its runs and returns a receipt.
async fn charge(count: &AtomicU32) -> Result<u32, Error> {
    Ok(count.fetch_add(1, Ordering::SeqCst) + 100)
}

#[tokio::test]
async fn a_recorded_step_does_not_run_again_after_a_takeover() {
    let store = MemoryStore::new();
    let charges = counter();
    let emails = counter();
    let (recorded, crashed) = oneshot::channel::<()>();
    // First holder: charges, then "crashes" (its future is leaked: never polled, never dropped).
    let first = {
        let charges = charges.clone();
        Idempotent::new(&store, "order-1")
            .name("checkout")
            .lease(LEASE)
            .run(move || async move {
                let receipt = idem::step("charge", || charge(&charges)).await?;
                let _ = recorded.send(());
                std::future::pending::<()>().await;
                Ok::<u32, Error>(receipt)
            })
    };
    let mut first = Box::pin(first);
    tokio::select! {
        _ = &mut first => unreachable!("the first holder never finishes"),
        _ = crashed => {}
    }
    std::mem::forget(first);
    assert_eq!(charges.load(Ordering::SeqCst), 1);

    tokio::time::sleep(LEASE * 3).await;
    let (c, e) = (charges.clone(), emails.clone());
    let receipt = Idempotent::new(&store, "order-1")
        .name("checkout")
        .lease(LEASE)
        .run(move || async move {
            let receipt = idem::step("charge", || charge(&c)).await?;
            idem::step("email", || charge(&e)).await?;
            Ok::<u32, Error>(receipt)
        })
        .await
        .unwrap();
    assert_eq!(receipt, 100, "the recorded receipt is returned");
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "the card is charged once"
    );
    assert_eq!(emails.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_step_is_not_recorded() {
    let store = MemoryStore::new();
    let tries = counter();
    for expected in [Err(()), Ok(2)] {
        let tries = tries.clone();
        let got = Idempotent::new(&store, "order-2")
            .name("checkout")
            .run(move || async move {
                idem::step("charge", || async {
                    let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == 1 {
                        Err(Error::InProgress {
                            retry_after: Duration::ZERO,
                        })
                    } else {
                        Ok(n)
                    }
                })
                .await
            })
            .await;
        assert_eq!(got.map_err(|_| ()), expected);
    }
    assert_eq!(tries.load(Ordering::SeqCst), 2, "the failed step ran again");
}

#[tokio::test]
async fn a_stale_holder_cannot_record_a_step() {
    let store = MemoryStore::new();
    let charges = counter();
    let (go, wait) = oneshot::channel::<()>();
    let stale = {
        let charges = charges.clone();
        Idempotent::new(&store, "order-3")
            .name("checkout")
            .lease(LEASE)
            .run(move || async move {
                let _ = wait.await;
                idem::step("charge", || charge(&charges)).await
            })
    };
    let mut stale = Box::pin(stale);
    // Start it, then stop polling it past its lease: it stops renewing.
    let _ = tokio::time::timeout(Duration::from_millis(10), &mut stale).await;
    tokio::time::sleep(LEASE * 3).await;
    let c = charges.clone();
    let taken_over = Idempotent::new(&store, "order-3")
        .name("checkout")
        .lease(LEASE)
        .run(move || async move { idem::step("charge", || charge(&c)).await })
        .await;
    assert_eq!(taken_over.unwrap(), 100);
    let _ = go.send(());
    let err = stale.await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
}

#[tokio::test]
async fn misuse_is_a_clear_error() {
    let outside = idem::step("charge", || async { Ok::<u32, Error>(1) })
        .await
        .unwrap_err();
    assert!(
        matches!(outside, Error::StepOutsideCall { .. }),
        "{outside}"
    );
    assert!(outside.to_string().contains("outside an idempotent body"));

    let store = MemoryStore::new();
    let runs = counter();
    let r = runs.clone();
    let twice = Idempotent::new(&store, "order-4")
        .name("checkout")
        .run(move || async move {
            idem::step("charge", || async { Ok::<u32, Error>(1) }).await?;
            idem::step("charge", || async {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, Error>(2)
            })
            .await
        })
        .await
        .unwrap_err();
    assert!(matches!(twice, Error::StepRepeated { .. }), "{twice}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the repeated step did not run"
    );
}
