//! Runs the examples that need no server, as a user would, and checks what they print. (The
//! examples assert their own claims too; a failed assertion is a non-zero exit here.)

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries' folder.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    debug.join("examples").join(name)
}

fn run(name: &str) -> String {
    let path = example(name);
    let out = Command::new(&path).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e} (a plain `cargo test` builds the examples; with `--test examples` alone, run `cargo build --examples` first)",
            path.display()
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn quickstart_executes_replays_waits_and_retries() {
    let out = run("quickstart");
    assert!(out.contains("The provider was called 4 times"), "{out}");
}

#[test]
fn double_charge_charges_each_payment_once_with_idem() {
    let out = run("double_charge");
    let charges = out
        .lines()
        .find(|l| l.starts_with("charges made"))
        .expect("a charges line");
    let numbers: Vec<&str> = charges.split_whitespace().skip(2).collect();
    assert_eq!(numbers.len(), 2, "{charges}");
    assert_eq!(numbers[1], "10", "with idem: one charge per payment\n{out}");
    assert_ne!(
        numbers[0], "10",
        "without idem the retries charge again\n{out}"
    );
}

#[test]
fn event_handlers_send_one_email_per_payment() {
    let out = run("event_handlers");
    assert!(out.contains("5 payments,"), "{out}");
    assert!(out.contains("5 emails sent"), "{out}");
}
