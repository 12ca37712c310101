//! Helpers shared by the integration tests: log capture, and (in their own modules) harnesses
//! that start real servers.

#![allow(dead_code)]

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

type Buffer = Arc<Mutex<Vec<u8>>>;

thread_local! {
    /// The buffers of the captures alive on this thread; events go to the innermost.
    static CAPTURES: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
}

/// Captures the `tracing` events of the current thread as text, for as long as it lives.
///
/// One global subscriber, installed by the first capture, formats every event and writes it to
/// the innermost capture of the thread that emitted it (or nowhere). A subscriber per thread
/// (`set_default`) loses events: `tracing` caches a callsite's interest globally, and a callsite
/// first hit on a thread with no subscriber while another thread installs one can stay cached as
/// "never interested".
pub struct LogCapture {
    buffer: Buffer,
}

/// Writes to the innermost capture of the current thread.
struct ThreadSink;

impl Write for ThreadSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURES.with(|captures| {
            if let Some(buffer) = captures.borrow().last()
                && let Ok(mut out) = buffer.lock()
            {
                out.extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Starts capturing this thread's events (use a current-thread runtime, so the events of
    /// the calls under test are emitted on this thread).
    pub fn install() -> LogCapture {
        static GLOBAL: Once = Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(|| ThreadSink)
                .finish();
            let _ = tracing::subscriber::set_global_default(subscriber);
        });
        let buffer = Buffer::default();
        CAPTURES.with(|captures| captures.borrow_mut().push(buffer.clone()));
        LogCapture { buffer }
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.buffer
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the log contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURES.with(|captures| {
            captures
                .borrow_mut()
                .retain(|buffer| !Arc::ptr_eq(buffer, &self.buffer));
        });
    }
}

pub mod chaos;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
pub mod steps_model;

/// Runs an example that `cargo test --all-features` built next to the test binaries' folder,
/// with `env` set, and returns its standard output; fails the test, with its output, when it
/// fails.
pub fn run_example(name: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the target folder")
        .join("examples")
        .join(name);
    let mut command = std::process::Command::new(&example);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {}: {e} (a plain `cargo test --all-features` builds the examples; with \
             one test file alone, run `cargo build --examples --all-features` first)",
            example.display()
        )
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the example {name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
