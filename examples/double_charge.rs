//! A payment service behind a network that loses half of its responses. The client retries until
//! it gets an answer, as clients do. Without idempotency every lost response becomes another
//! charge; with it, each payment is charged once.
//!
//! Run it with `cargo run --example double_charge`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use idem::{MemoryStore, idempotent};

/// A deterministic coin, so every run tells the same story.
struct Network {
    state: AtomicU64,
}

impl Network {
    /// Whether the response of this request is lost (about half of them are).
    fn loses_response(&self) -> bool {
        let mut x = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (x ^ (x >> 31)) & 1 == 1
    }
}

struct Bank {
    balance_cents: Mutex<i64>,
    charges: AtomicU64,
    store: MemoryStore,
}

impl Bank {
    fn new(balance_cents: i64) -> Bank {
        Bank {
            balance_cents: Mutex::new(balance_cents),
            charges: AtomicU64::new(0),
            store: MemoryStore::new(),
        }
    }

    fn debit(&self, cents: i64) -> Result<i64, idem::Error> {
        self.charges.fetch_add(1, Ordering::SeqCst);
        let mut balance = self
            .balance_cents
            .lock()
            .map_err(|_| idem::Error::store("the ledger lock is poisoned"))?;
        *balance -= cents;
        Ok(*balance)
    }

    /// The handler as it is usually written first.
    async fn charge_plain(&self, _payment_id: u64, cents: i64) -> Result<i64, idem::Error> {
        self.debit(cents)
    }

    /// The same handler, idempotent per payment id.
    #[idempotent(store = self.store, key = payment_id, name = "bank.charge.v1")]
    async fn charge(&self, payment_id: u64, cents: i64) -> Result<i64, idem::Error> {
        self.debit(cents)
    }

    fn balance(&self) -> i64 {
        self.balance_cents.lock().map(|b| *b).unwrap_or_default()
    }
}

const PAYMENTS: u64 = 10;
const CENTS: i64 = 1_000;
const OPENING: i64 = 100_000;

async fn run(bank: &Bank, network: &Network, idempotent: bool) -> u64 {
    let mut requests = 0;
    for payment_id in 1..=PAYMENTS {
        loop {
            requests += 1;
            let answer = if idempotent {
                bank.charge(payment_id, CENTS).await
            } else {
                bank.charge_plain(payment_id, CENTS).await
            };
            // The work is done; whether the client hears about it is up to the network.
            if answer.is_ok() && !network.loses_response() {
                break;
            }
        }
    }
    requests
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[tokio::main]
async fn main() {
    let plain = Bank::new(OPENING);
    let guarded = Bank::new(OPENING);
    let requests_plain = run(
        &plain,
        &Network {
            state: AtomicU64::new(7),
        },
        false,
    )
    .await;
    let requests_guarded = run(
        &guarded,
        &Network {
            state: AtomicU64::new(7),
        },
        true,
    )
    .await;

    println!(
        "{PAYMENTS} payments of {} from {}, over a network that loses half the responses:\n",
        dollars(CENTS),
        dollars(OPENING)
    );
    println!("{:<24}{:>16}{:>16}", "", "without idem", "with idem");
    println!(
        "{:<24}{:>16}{:>16}",
        "requests sent", requests_plain, requests_guarded
    );
    println!(
        "{:<24}{:>16}{:>16}",
        "charges made",
        plain.charges.load(Ordering::SeqCst),
        guarded.charges.load(Ordering::SeqCst)
    );
    println!(
        "{:<24}{:>16}{:>16}",
        "balance",
        dollars(plain.balance()),
        dollars(guarded.balance())
    );
    println!(
        "{:<24}{:>16}{:>16}",
        "expected balance",
        dollars(OPENING - PAYMENTS as i64 * CENTS),
        dollars(OPENING - PAYMENTS as i64 * CENTS)
    );

    assert_eq!(
        guarded.balance(),
        OPENING - PAYMENTS as i64 * CENTS,
        "with idem each payment is charged once"
    );
    assert!(
        plain.balance() < guarded.balance(),
        "without idem retries charge again"
    );
}
