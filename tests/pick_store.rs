//! The `pick_store` example runs the same handlers on the store `IDEM_STORE` names.
#![cfg(feature = "redis")]

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::redis::RedisServer;

fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    debug.join("examples").join("pick_store")
}

fn run(store: &str) -> (bool, String) {
    let path = example();
    let out = Command::new(&path)
        .env("IDEM_STORE", store)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (a plain `cargo test --all-features` builds the examples; with `--test pick_store` alone, run `cargo build --examples --all-features` first)",
                path.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_same_handlers_run_on_memory_and_on_redis() {
    let (ok, out) = run("memory");
    assert!(ok, "{out}");
    assert!(
        out.contains("6 calls, 3 charges on the memory store"),
        "{out}"
    );

    let server = RedisServer::shared();
    let (ok, out) = run(&server.url());
    assert!(ok, "{out}");
    assert!(
        out.contains("6 calls, 3 charges on the redis store"),
        "{out}"
    );
}

#[test]
fn an_unknown_store_is_a_clear_error() {
    let (ok, out) = run("mongodb://localhost");
    assert!(!ok);
    assert!(out.contains("names no store"), "{out}");
}

#[cfg(feature = "postgres")]
#[test]
fn the_same_handlers_run_on_postgres() {
    let server = support::postgres::PgServer::shared();
    let (ok, out) = run(&server.url());
    assert!(ok, "{out}");
    assert!(
        out.contains("6 calls, 3 charges on the postgres store"),
        "{out}"
    );
}
