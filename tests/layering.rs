//! The layering of DESIGN.md, checked: the stores (`idem-runtime/src/store/`) are the layer
//! below the executor and name nothing of it. The executor uses the stores (and runs its
//! transactional mode over a store-side `TransactionBackend`), never the other way round.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The paths by which code under `store/` could reach the executor: its module (`crate::exec`,
/// `super::super::exec`, a `use crate::{exec, ..}` group) and the crate-root re-exports of
/// its items.
fn reaches_the_executor(code: &str) -> Option<&'static str> {
    const PATHS: &[&str] = &[
        "crate::exec",
        "super::exec",
        "super::super::exec",
        "super::super::super::exec",
        "crate::transactional",
        "crate::Idempotent",
        "crate::Outcome",
        "crate::Status",
        "crate::Policy",
        "crate::OnConflict",
        "crate::DEFAULT_",
    ];
    if let Some(path) = PATHS.iter().find(|p| code.contains(*p)) {
        return Some(path);
    }
    // `use crate::{exec::.., ..}` and `use super::super::{exec, ..}`.
    let grouped = code.contains("{") && (code.contains("crate::") || code.contains("super::"));
    const NAMES: &[&str] = &[
        "exec",
        "transactional",
        "Idempotent",
        "Outcome",
        "Status",
        "Policy",
        "OnConflict",
        "DEFAULT_TTL",
        "DEFAULT_LEASE",
        "DEFAULT_WAIT_TIMEOUT",
    ];
    let names_exec = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|word| NAMES.contains(&word));
    (grouped && names_exec).then_some("a `use` group naming the executor or its items")
}

#[test]
fn the_stores_import_nothing_from_the_executor() {
    let store = Path::new(env!("CARGO_MANIFEST_DIR")).join("idem-runtime/src/store");
    let mut files = Vec::new();
    rust_files(&store, &mut files);
    assert!(files.len() >= 5, "the store modules are found: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read a store module");
        // Inside a `use` of this crate spread over several lines.
        let mut in_use = false;
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").trim();
            let starts = ["use ", "pub use ", "pub(crate) use "]
                .iter()
                .any(|u| code.starts_with(u));
            // Each line of such a `use` is checked as part of its group.
            let checked = if in_use && !starts {
                format!("use crate::{{ {code} }}")
            } else {
                code.to_owned()
            };
            if starts {
                in_use =
                    !code.ends_with(';') && (code.contains("crate::") || code.contains("super::"));
            } else if in_use {
                in_use = !code.ends_with(';');
            }
            if let Some(path) = reaches_the_executor(&checked) {
                found.push(format!("{}:{}: {path}: {line}", file.display(), n + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "idem-runtime/src/store/ must not depend on the executor (DESIGN.md, Workspace; issue \
         17): move what it needs below it instead:\n{}",
        found.join("\n")
    );
}

/// The check finds what it must: each way of reaching the executor is caught.
#[test]
fn the_check_catches_each_way_in() {
    for code in [
        "use crate::exec::{Policy, wait_turn};",
        "use crate::{exec::Outcome, key::Key};",
        "let p = crate::exec::Policy::new();",
        "use super::super::exec::Turn;",
        "use crate::transactional::Transactional;",
        "use crate::{Idempotent, Key};",
        "let d = crate::DEFAULT_TTL;",
    ] {
        assert!(reaches_the_executor(code).is_some(), "{code}");
    }
    for code in [
        "use crate::key::{Fingerprint, Key};",
        "use crate::record::{Claim, Token};",
        "let x = tx.batch_execute(&sql);",
        "load.exec_async(&mut conn).await?;",
    ] {
        assert_eq!(reaches_the_executor(code), None, "{code}");
    }
}
