//! Heap allocations, counted by a global allocator: deriving a key of integers, strings and
//! tuples allocates nothing, and an in-memory replay of a `u64` result allocates nothing either.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use idem::{Key, MemoryStore, idempotent};

struct Counting;

thread_local! {
    // Per thread, so tests running in parallel do not count each other's allocations.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counter is
// a const-initialised thread-local `Cell`, which itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATIONS.with(Cell::get);
    let out = f();
    (out, ALLOCATIONS.with(Cell::get) - before)
}

#[test]
fn deriving_keys_of_integers_strings_and_tuples_allocates_nothing() {
    let name = String::from("customer-4711");
    let long = "x".repeat(10_000); // past the stack buffer: the streaming hasher, still inline
    let (_, n) = allocations(|| {
        std::hint::black_box(Key::new("orders", &42u64));
        std::hint::black_box(Key::new("orders", &-7i128));
        std::hint::black_box(Key::new("orders", &name));
        std::hint::black_box(Key::new("orders", "a str"));
        std::hint::black_box(Key::new("orders", &(&name, 42u64, true, 'x', Some(3u8))));
        std::hint::black_box(Key::new("orders", &long));
        #[allow(deprecated)]
        std::hint::black_box(Key::with_type_args(
            "generic",
            &["u8", "u16"],
            &(1u8, "two"),
        ));
        std::hint::black_box(idem::Fingerprint::of(&(&name, 1999u64)));
    });
    assert_eq!(n, 0, "key derivation allocated {n} times");
}

#[test]
fn the_counter_sees_allocations() {
    // Maps are documented to buffer their entries to sort them: the counter must see that, or the
    // zeros above would prove nothing.
    let map: std::collections::HashMap<u32, u32> = (0..8).map(|i| (i, i)).collect();
    let (_, n) = allocations(|| std::hint::black_box(Key::new("m", &map)));
    assert!(n > 0);
}

#[cfg(feature = "uuid")]
#[test]
fn deriving_a_uuid_key_allocates_nothing() {
    let id = uuid::Uuid::from_u128(0x1234);
    let (_, n) = allocations(|| std::hint::black_box(Key::new("orders", &(id, 1u8))));
    assert_eq!(n, 0);
}

#[idempotent(store = store, key = id, name = "alloc.replay")]
async fn balance(store: &MemoryStore, id: u64) -> Result<u64, idem::Error> {
    Ok(id * 100)
}

#[test]
fn an_in_memory_replay_of_a_u64_allocates_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let store = MemoryStore::new();
    rt.block_on(async {
        assert_eq!(balance(&store, 7).await.ok(), Some(700)); // executes
        // The first replay of a key has the record keep the key's encoding (one allocation,
        // once per key), by which later replays find it without a digest.
        assert_eq!(balance(&store, 7).await.ok(), Some(700));
        let (replayed, n) = {
            let before = ALLOCATIONS.with(Cell::get);
            let mut last = 0;
            for _ in 0..100 {
                last = balance(&store, 7).await.unwrap_or_default();
            }
            (last, ALLOCATIONS.with(Cell::get) - before)
        };
        assert_eq!(replayed, 700);
        assert_eq!(n, 0, "100 replays allocated {n} times");
    });
}

/// The function API's replay takes the same path (a `&'static str` name).
#[test]
fn an_in_memory_replay_through_the_function_api_allocates_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let store = MemoryStore::new();
    let call = || {
        idem::Idempotent::new(&store, (7u64, "eur"))
            .name("alloc.api")
            .run(|| async { Ok::<u64, idem::Error>(700) })
    };
    rt.block_on(async {
        assert_eq!(call().await.ok(), Some(700)); // executes
        assert_eq!(call().await.ok(), Some(700)); // the first replay keeps the key's encoding
        let (replayed, n) = {
            let before = ALLOCATIONS.with(Cell::get);
            let mut last = 0;
            for _ in 0..100 {
                last = call().await.unwrap_or_default();
            }
            (last, ALLOCATIONS.with(Cell::get) - before)
        };
        assert_eq!(replayed, 700);
        assert_eq!(n, 0, "100 replays allocated {n} times");
    });
}
