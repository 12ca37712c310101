//! Starts PgBouncer for tests, in front of a [`PgServer`]: in transaction pooling mode, on a
//! free loopback port, with its configuration, log and pid file in a temporary directory.
//!
//! Like the PostgreSQL harness, it runs under a small `bash` supervisor whose stdin is a pipe
//! from the test process: end-of-file (the handle dropped, or the test process died) stops
//! PgBouncer and removes the directory. PgBouncer refuses to run as root: when the tests run as
//! root it runs as the `postgres` system user.
//!
//! The binary is found in `$IDEM_PGBOUNCER`, on `PATH`, or in `/usr/sbin` (Debian installs it
//! there). A missing binary fails the test with the command that installs it.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{PgServer, as_owner, free_port, run_as};

const INSTALL: &str = "install PgBouncer: `apt-get install -y pgbouncer` (Debian/Ubuntu), \
                       `brew install pgbouncer` (macOS), or set IDEM_PGBOUNCER to its binary";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// PgBouncer in transaction pooling mode in front of a test server.
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    supervisor: Child,
    stdin: Option<ChildStdin>,
}

impl PgBouncer {
    /// Starts PgBouncer (`pool_mode = transaction`, at most `server_connections` connections to
    /// the server per database and user) in front of `server`, and waits until it accepts
    /// connections.
    pub fn start(server: &PgServer, server_connections: usize) -> PgBouncer {
        PgBouncer::start_with(server, server_connections, "")
    }

    /// [`start`](Self::start), with `extra` lines added to the `[pgbouncer]` section (for
    /// example `ignore_startup_parameters = options`).
    pub fn start_with(server: &PgServer, server_connections: usize, extra: &str) -> PgBouncer {
        let binary = find_pgbouncer();
        let dir = std::env::temp_dir().join(format!(
            "idem-pgbouncer-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create PgBouncer's temporary directory");
        let port = free_port();
        let config = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={pg_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = transaction\n\
             default_pool_size = {server_connections}\n\
             max_client_conn = 1000\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n\
             {extra}\n",
            pg_port = server.port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).expect("write pgbouncer.ini");
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("write users.txt");
        let owner = run_as();
        if let Some((uid, gid)) = owner {
            for entry in ["", "pgbouncer.ini", "users.txt"] {
                std::os::unix::fs::chown(dir.join(entry), Some(uid), Some(gid))
                    .expect("hand PgBouncer's directory to the postgres user");
            }
        }
        let (supervisor, stdin) = spawn_supervisor(&binary, &dir, owner);
        let bouncer = PgBouncer {
            dir,
            port,
            supervisor,
            stdin: Some(stdin),
        };
        bouncer.wait_ready();
        bouncer
    }

    /// The URL of the `postgres` database through PgBouncer, as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let addr = ("127.0.0.1", self.port);
            if TcpStream::connect(addr).is_ok() {
                return;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let log =
                    std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
                panic!("PgBouncer did not start within 30 s; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // End of file on its stdin: the supervisor stops PgBouncer and removes the directory.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.supervisor.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_supervisor(binary: &Path, dir: &Path, owner: Option<(u32, u32)>) -> (Child, ChildStdin) {
    // `set -m` puts PgBouncer in a process group of its own, out of reach of signals sent to the
    // test's group; it stops when the test process closes the pipe.
    const SCRIPT: &str = r#"
set -m
trap '' TERM HUP INT
"$BOUNCER_BIN" "$BOUNCER_DIR/pgbouncer.ini" >>"$BOUNCER_DIR/stderr" 2>&1 </dev/null &
PID=$!
cat >/dev/null
kill -INT "$PID" 2>/dev/null
sleep 0.2
kill -KILL "$PID" 2>/dev/null
wait "$PID" 2>/dev/null
rm -rf "$BOUNCER_DIR"
"#;
    let mut cmd = Command::new("bash");
    cmd.args(["-c", SCRIPT])
        .env("BOUNCER_BIN", binary)
        .env("BOUNCER_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_owner(&mut cmd, owner);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start bash to supervise pgbouncer: {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    (child, stdin)
}

fn find_pgbouncer() -> PathBuf {
    if let Some(path) = std::env::var_os("IDEM_PGBOUNCER") {
        return PathBuf::from(path);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join("pgbouncer"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("PgBouncer's `pgbouncer` binary was not found: {INSTALL}"))
}
