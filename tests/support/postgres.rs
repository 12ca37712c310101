//! Starts a real PostgreSQL for tests: `initdb` in a temporary directory, `postgres` on a free
//! loopback port, stopped (and the directory removed) when the server is dropped or, for a
//! server kept in a `static`, when the test process exits.
//!
//! The server runs under a small `bash` supervisor whose stdin is a pipe from the test process:
//! commands on it kill (SIGKILL to the postmaster and its children: a crash) and restart the
//! server, and
//! end-of-file (the test process dropped the handle or died) shuts it down and removes the
//! directory. So no server outlives its test process, not even one in a `static`.
//!
//! `initdb` and `postgres` refuse to run as root: when the tests run as root, both run as the
//! `postgres` system user, in a directory owned by it.
//!
//! The binaries are found in `$IDEM_PG_BINDIR`, on `PATH`, through `pg_config --bindir`, or in
//! the highest `/usr/lib/postgresql/*/bin`. A missing binary fails the test with the command that
//! installs it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// PgBouncer in front of a test server (the pooler-mode tests).
#[path = "pgbouncer.rs"]
pub mod pgbouncer;

const INSTALL: &str = "install PostgreSQL: `apt-get install -y postgresql` (Debian/Ubuntu), \
                       `brew install postgresql` (macOS), or set IDEM_PG_BINDIR to its bin directory";

/// A PostgreSQL server for tests.
pub struct PgServer {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    supervisor: Mutex<Supervisor>,
}

struct Supervisor {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl PgServer {
    /// The server shared by every test of this test binary, started on first use.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(PgServer::start)
    }

    /// A new server of its own (for tests that kill it).
    pub fn start() -> PgServer {
        let (bindir, dir, owner) = prepare_dir(&["initdb", "postgres", "pg_isready"]);

        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        as_owner(&mut initdb, owner);
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("could not run initdb ({e}): {INSTALL}"));
        assert!(
            out.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        PgServer::launch(bindir, dir, owner)
    }

    /// A hot standby of `primary`: a base backup of it (`pg_basebackup -R`, streaming
    /// replication) running read-only on a port of its own.
    pub fn standby_of(primary: &PgServer) -> PgServer {
        let (bindir, dir, owner) = prepare_dir(&["pg_basebackup", "postgres", "pg_isready"]);
        let mut backup = Command::new(bindir.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        as_owner(&mut backup, owner);
        let out = backup
            .output()
            .unwrap_or_else(|e| panic!("could not run pg_basebackup ({e}): {INSTALL}"));
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        PgServer::launch(bindir, dir, owner)
    }

    /// Starts `postgres` on the data directory in `dir`, on a free port, and waits for it.
    fn launch(bindir: PathBuf, dir: PathBuf, owner: Option<(u32, u32)>) -> PgServer {
        let port = free_port();
        let supervisor = spawn_supervisor(&bindir, &dir, port, owner);
        let server = PgServer {
            bindir,
            dir,
            port,
            supervisor: Mutex::new(supervisor),
        };
        server.wait_ready();
        server
    }

    /// The URL of the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and all its processes with SIGKILL (a crash), and waits until they are
    /// gone.
    pub fn kill(&self) {
        self.command("kill", "killed");
    }

    /// Starts the server again on the same directory and port (after [`kill`](Self::kill)), and
    /// waits until it accepts connections (crash recovery included).
    pub fn restart(&self) {
        self.command("start", "started");
        self.wait_ready();
    }

    fn command(&self, cmd: &str, answer: &str) {
        let mut sup = self.supervisor.lock().unwrap_or_else(|e| e.into_inner());
        let stdin = sup.stdin.as_mut().expect("the supervisor is running");
        writeln!(stdin, "{cmd}").expect("talk to the server's supervisor");
        stdin.flush().expect("talk to the server's supervisor");
        let mut line = String::new();
        sup.stdout
            .read_line(&mut line)
            .expect("hear from the server's supervisor");
        assert_eq!(line.trim(), answer, "supervisor answered {line:?} to {cmd}");
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let status = Command::new(self.bindir.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .stdin(Stdio::null())
                .status();
            if matches!(status, Ok(s) if s.success()) {
                return;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
                panic!("PostgreSQL did not start within 60 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let sup = self.supervisor.get_mut().unwrap_or_else(|e| e.into_inner());
        // End of file on its stdin: the supervisor stops the server and removes the directory.
        drop(sup.stdin.take());
        let _ = sup.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binaries' directory (checked for `tools`), a new temporary directory for a server (with
/// its socket directory), and the user to run the server as.
fn prepare_dir(tools: &[&str]) -> (PathBuf, PathBuf, Option<(u32, u32)>) {
    let bindir = find_bindir();
    for tool in tools {
        assert!(
            bindir.join(tool).is_file(),
            "PostgreSQL's `{tool}` is not in {}: {INSTALL}",
            bindir.display()
        );
    }
    let dir = std::env::temp_dir().join(format!(
        "idem-pg-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sock")).expect("create the server's temporary directory");
    let owner = run_as();
    if let Some((uid, gid)) = owner {
        for path in [dir.clone(), dir.join("sock")] {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .expect("hand the temporary directory to the postgres user");
        }
    }
    (bindir, dir, owner)
}

fn spawn_supervisor(bindir: &Path, dir: &Path, port: u16, owner: Option<(u32, u32)>) -> Supervisor {
    // `set -m` puts the server in a process group of its own, out of reach of signals sent to
    // the test's group (Ctrl-C, `timeout`).
    const SCRIPT: &str = r#"
set -m
# Outlive signals sent to the test's process group: the server stops when stdin closes.
trap '' TERM HUP INT
start() {
  "$PG_BIN/postgres" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR/sock" \
    -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements \
    -c max_connections=200 \
    >>"$PG_DIR/log" 2>&1 </dev/null &
  PM=$!
}
start
while read -r cmd; do
  case "$cmd" in
    kill)
      kids=$(pgrep -P "$PM")
      kill -KILL "$PM" $kids 2>/dev/null
      wait "$PM" 2>/dev/null
      while [ -n "$kids" ] && kill -0 $kids 2>/dev/null; do sleep 0.05; done
      echo killed ;;
    start) start; echo started ;;
  esac
done
kill -QUIT "$PM" 2>/dev/null
wait "$PM" 2>/dev/null
rm -rf "$PG_DIR"
"#;
    let mut cmd = Command::new("bash");
    cmd.args(["-c", SCRIPT])
        .env("PG_BIN", bindir)
        .env("PG_DIR", dir)
        .env("PG_PORT", port.to_string())
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    as_owner(&mut cmd, owner);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start bash to supervise postgres: {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    Supervisor {
        child,
        stdin: Some(stdin),
        stdout,
    }
}

pub fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/tmp")
            .env("USER", "postgres");
    }
}

/// `Some((uid, gid))` of the `postgres` user when running as root (PostgreSQL refuses root).
pub fn run_as() -> Option<(u32, u32)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u32>().ok())?;
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .unwrap_or_else(|| {
            panic!(
                "the tests run as root and PostgreSQL refuses root, but there is no `postgres` \
                 user to run it as: {INSTALL} (the package creates the user)"
            )
        });
    let fields: Vec<&str> = entry.split(':').collect();
    let uid = fields
        .get(2)
        .and_then(|v| v.parse().ok())
        .expect("uid of postgres");
    let gid = fields
        .get(3)
        .and_then(|v| v.parse().ok())
        .expect("gid of postgres");
    Some((uid, gid))
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

fn find_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IDEM_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let has_all = |dir: &Path| {
        ["initdb", "postgres", "pg_isready"]
            .iter()
            .all(|tool| dir.join(tool).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_all(&dir) {
                // Resolve symlinks (e.g. /usr/local/bin/initdb → /usr/lib/postgresql/15/bin).
                let real = std::fs::canonicalize(dir.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| has_all(d));
                return real.unwrap_or(dir);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_all(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!("PostgreSQL's server binaries (initdb, postgres) were not found: {INSTALL}"),
    }
}

/// The number of the key lock (`pg_advisory_xact_lock`) that `store` takes for `key` in namespace
/// `name`, read off the server, so that a test can take it from another session as a cleanup
/// batch or a claim in flight would. Found without knowing the store's salt: the key gets an
/// expired record; a session row-locks it; a claim of the key then waits on that row with the
/// key lock held, and the lock is the advisory lock of the one session that the row lock blocks
/// (other tests running meanwhile are told apart by `pg_blocking_pids`). Leaves the key with an
/// expired record (its ttl is 1 ms).
#[cfg(feature = "postgres")]
pub async fn key_lock_of(
    store: &idem::PostgresStore,
    url: &str,
    name: &'static str,
    key: &str,
) -> i64 {
    use idem::store::postgres::tokio_postgres;
    let expired = || async {
        idem::Idempotent::new(store, key.to_owned())
            .name(name)
            .ttl(Duration::from_millis(1))
            .run(|| async { Ok::<_, idem::Error>(0u8) })
            .await
            .expect("a record that expires at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    expired().await;
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(connection);
        client
    };
    let (holder, db) = (connect().await, connect().await);
    let digest = idem::Key::new(name, &key);
    let table = format!("\"{}\".\"{}\"", store.schema(), store.table());
    holder.batch_execute("BEGIN").await.expect("begin");
    let row = holder
        .query_one(
            &format!("SELECT pg_backend_pid() FROM {table} WHERE key = $1 FOR UPDATE"),
            &[&&digest.as_bytes()[..]],
        )
        .await
        .expect("row-lock the expired record");
    let holder_pid: i32 = row.get(0);
    let (lock, ()) = tokio::join!(
        async {
            loop {
                let row = db
                    .query_opt(
                        "SELECT (l.classid::int8 << 32) | l.objid::int8 FROM pg_catalog.pg_locks l \
                         WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted \
                           AND $1 = ANY (pg_catalog.pg_blocking_pids(l.pid))",
                        &[&holder_pid],
                    )
                    .await
                    .expect("read pg_locks");
                if let Some(row) = row {
                    holder.batch_execute("ROLLBACK").await.expect("rollback");
                    break row.get::<_, i64>(0);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
        expired(),
    );
    lock
}
