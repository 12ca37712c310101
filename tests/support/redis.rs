//! Starts a real `redis-server` for tests: on a free loopback port, in a temporary directory,
//! without persistence unless asked, stopped when dropped.
//!
//! The server runs under a small `sh` watchdog that holds a pipe from this process: when the
//! pipe closes (the harness stops the server, or the test process exits or is killed), the
//! watchdog stops `redis-server`. So a server shared by a whole test binary (kept in a static,
//! which is never dropped) does not outlive it.
//!
//! A missing `redis-server` binary fails the test with the command that installs it. Set
//! `IDEM_REDIS_SERVER` to use a binary that is not on `PATH`.
//!
//! Also here: a tiny blocking RESP client ([`RedisServer::cmd`]) that checks the server
//! independently of the crate under test, and a [`CountingProxy`] that counts the commands a
//! client sends (round trips).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const INSTALL: &str = "install it with `apt-get install -y redis-server` (Debian/Ubuntu; \
                       `brew install redis` on macOS), or point IDEM_REDIS_SERVER at the binary";

/// The watchdog: starts redis-server with the given arguments, waits for its stdin to close,
/// then stops the server (SIGTERM: it writes its append-only file, if any, and exits) and waits.
/// `$2`, if not empty, is a directory to remove afterwards (the shared server's, which is never
/// dropped).
const WATCHDOG: &str = r#"bin="$1"; cleanup="$2"; shift 2; "$bin" "$@" & pid=$!; read _unused; kill "$pid" 2>/dev/null; wait "$pid"; [ -z "$cleanup" ] || rm -rf "$cleanup""#;

fn server_binary() -> String {
    std::env::var("IDEM_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// Fails the test, with the install command, if redis-server cannot be run.
fn check_binary(bin: &str) {
    match Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{bin} --version` failed ({}): {}; {INSTALL}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => {
            panic!("cannot run `{bin}` ({err}): redis-server is needed by these tests; {INSTALL}")
        }
    }
}

/// A free port whose cluster bus port (the port + 10000, as Redis before 7 fixes it) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local address").port()
}

fn temp_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "idem-redis-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create the server's temporary directory");
    dir
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// A `redis-server` on a loopback port, in a temporary directory, stopped when dropped.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    persistent: bool,
    /// Whether the watchdog removes the directory when the server stops for good.
    watchdog_cleans_up: bool,
    /// More arguments for redis-server.
    extra: Vec<String>,
    running: Mutex<Option<Running>>,
}

impl RedisServer {
    /// A server without persistence (a restart starts empty).
    pub fn start() -> RedisServer {
        RedisServer::start_with(false, false, Vec::new())
    }

    /// A server with an append-only file fsynced on every write, so that every acknowledged
    /// write survives a restart.
    pub fn start_persistent() -> RedisServer {
        RedisServer::start_with(true, false, Vec::new())
    }

    /// A server with more settings (`["--maxmemory", "4mb", ...]`), with or without an
    /// append-only file fsynced on every write.
    pub fn start_configured(persistent: bool, settings: &[&str]) -> RedisServer {
        let extra = settings.iter().map(|s| (*s).to_owned()).collect();
        RedisServer::start_with(persistent, false, extra)
    }

    /// One server for the whole test binary, started on first use.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| RedisServer::start_with(false, true, Vec::new()))
    }

    fn start_with(persistent: bool, watchdog_cleans_up: bool, extra: Vec<String>) -> RedisServer {
        check_binary(&server_binary());
        let dir = temp_dir();
        let mut last_error = String::new();
        // Another process may take the port between our probe and the server's bind: try again.
        for _ in 0..5 {
            let server = RedisServer {
                port: if extra.iter().any(|a| a == "--cluster-enabled") {
                    free_cluster_port()
                } else {
                    free_port()
                },
                dir: dir.clone(),
                persistent,
                watchdog_cleans_up,
                extra: extra.clone(),
                running: Mutex::new(None),
            };
            match server.launch() {
                Ok(()) => return server,
                Err(err) => {
                    last_error = err;
                    // Keep the directory for the next attempt.
                    std::mem::forget(server);
                }
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// The `redis://` URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn launch(&self) -> Result<(), String> {
        let mut args: Vec<String> = vec![
            "--port".into(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--logfile".into(),
            "redis.log".into(),
            "--daemonize".into(),
            "no".into(),
            "--save".into(),
            String::new(),
        ];
        if self.persistent {
            args.extend(
                ["--appendonly", "yes", "--appendfsync", "always"]
                    .into_iter()
                    .map(String::from),
            );
        } else {
            args.extend(["--appendonly", "no"].into_iter().map(String::from));
        }
        args.extend(self.extra.iter().cloned());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("idem-redis-watchdog")
            .arg(server_binary())
            .arg(if self.watchdog_cleans_up {
                self.dir.as_os_str()
            } else {
                std::ffi::OsStr::new("")
            })
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| format!("cannot run sh: {err}"))?;
        let stdin = child.stdin.take();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if self.ping() {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                drop(stdin);
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within 10s; its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running { child, stdin });
        Ok(())
    }

    fn ping(&self) -> bool {
        matches!(self.try_cmd(&[b"PING"]), Ok(Resp::Simple(s)) if s == "PONG")
    }

    /// Stops the server and waits until it has exited (its port is then free).
    pub fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut running) = running {
            drop(running.stdin.take());
            let _ = running.child.wait();
        }
    }

    /// Starts the server again on the same port and in the same directory (a persistent server
    /// comes back with its data).
    pub fn restart(&self) {
        self.stop();
        let started = Instant::now();
        loop {
            match self.launch() {
                Ok(()) => return,
                // The port may linger for a moment after the old server exited.
                Err(err) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("redis-server did not restart: {err}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The server's process id (`INFO server`), to signal it.
    pub fn pid(&self) -> u32 {
        let info = self.info("server");
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("INFO server gives process_id")
    }

    /// A section of `INFO`, as text.
    pub fn info(&self, section: &str) -> String {
        match self.cmd(&["INFO", section]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("INFO {section}: {other:?}"),
        }
    }

    /// Runs one command on a new connection and returns the reply; panics if the server cannot
    /// be reached.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd_bytes(&args)
    }

    /// [`RedisServer::cmd`] with binary arguments.
    pub fn cmd_bytes(&self, args: &[&[u8]]) -> Resp {
        self.try_cmd(args)
            .unwrap_or_else(|err| panic!("redis on port {}: {err}", self.port))
    }

    fn try_cmd(&self, args: &[&[u8]]) -> std::io::Result<Resp> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&encode(args))?;
        let mut reader = BufReader::new(stream);
        read_reply(&mut reader)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `redis-server`s on loopback ports, every slot assigned, stopped when
/// dropped.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// A cluster of `n` primaries (no replicas), each owning an equal share of the slots.
    pub fn start(n: usize) -> RedisCluster {
        RedisCluster::start_with(n, false)
    }

    /// One three-node cluster for the whole test binary, started on first use.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| RedisCluster::start_with(3, true))
    }

    fn start_with(n: usize, watchdog_cleans_up: bool) -> RedisCluster {
        let extra = cluster_args();
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| RedisServer::start_with(false, watchdog_cleans_up, extra.clone()))
            .collect();
        const SLOTS: usize = 16384;
        for (i, node) in nodes.iter().enumerate() {
            let slots: Vec<String> = (i * SLOTS / n..(i + 1) * SLOTS / n)
                .map(|slot| slot.to_string())
                .collect();
            let mut cmd = vec!["CLUSTER", "ADDSLOTS"];
            cmd.extend(slots.iter().map(String::as_str));
            assert_eq!(
                node.cmd(&cmd),
                Resp::Simple("OK".into()),
                "CLUSTER ADDSLOTS"
            );
        }
        for node in &nodes[1..] {
            let reply = nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &node.port().to_string()]);
            assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER MEET");
        }
        let cluster = RedisCluster { nodes };
        let started = Instant::now();
        let known = format!("cluster_known_nodes:{n}");
        while !cluster.nodes.iter().all(|node| {
            let info = match node.cmd(&["CLUSTER", "INFO"]) {
                Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                _ => String::new(),
            };
            info.contains("cluster_state:ok")
                && info.contains(&known)
                && info.contains("cluster_slots_ok:16384")
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the cluster did not come up within 30s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The `redis://` URLs of the nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Starts one more node, empty (no slots), and introduces it to the cluster (`CLUSTER MEET`);
    /// returns its index once every node knows it.
    pub fn add_node(&mut self) -> usize {
        let node = RedisServer::start_with(false, false, cluster_args());
        let reply = self.nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &node.port().to_string()]);
        assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER MEET");
        self.nodes.push(node);
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        self.wait_until(
            "every node knows the new one, and the new one every slot",
            |node| {
                let info = node.cluster_info();
                info.contains(&known)
                    && info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
            },
        );
        self.nodes.len() - 1
    }

    /// Makes node `replica` a replica of node `master` and waits until it has synced.
    pub fn replicate(&self, replica: usize, master: usize) {
        let master_id = self.nodes[master].node_id();
        let reply = self.nodes[replica].cmd(&["CLUSTER", "REPLICATE", &master_id]);
        assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER REPLICATE");
        let started = Instant::now();
        while !self.nodes[replica]
            .info("replication")
            .contains("master_link_status:up")
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the replica did not sync within 30s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The masters vote in a failover only for a replica they know as one.
        let replica_id = self.nodes[replica].node_id();
        self.wait_until("every node knows the replica", |node| {
            cluster_nodes(node).lines().any(|l| {
                l.starts_with(&replica_id) && l.contains("slave") && l.contains(&master_id)
            })
        });
    }

    /// Promotes node `replica` with `CLUSTER FAILOVER` (coordinated: no acknowledged write is
    /// lost) and waits until every node sees it as the master of its slots.
    pub fn failover(&self, replica: usize) {
        let id = self.nodes[replica].node_id();
        let promoted = |node: &RedisServer| {
            cluster_nodes(node)
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("myself,master"))
        };
        // A manual failover that does not complete within its own timeout (5 s) is abandoned:
        // ask again.
        let started = Instant::now();
        while !promoted(&self.nodes[replica]) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the replica was not promoted within 30s"
            );
            let reply = self.nodes[replica].cmd(&["CLUSTER", "FAILOVER"]);
            assert_eq!(reply, Resp::Simple("OK".into()), "CLUSTER FAILOVER");
            let asked = Instant::now();
            while !promoted(&self.nodes[replica]) && asked.elapsed() < Duration::from_secs(6) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.wait_until("the promoted replica is a master everywhere", |node| {
            cluster_nodes(node)
                .lines()
                .any(|l| l.starts_with(&id) && l.contains("master"))
        });
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        match self.nodes[0].cmd(&["CLUSTER", "KEYSLOT", key]) {
            Resp::Int(slot) => u16::try_from(slot).expect("a slot"),
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        }
    }

    /// The index of the node that serves `slot` (as node 0 sees it).
    pub fn owner_of(&self, slot: u16) -> usize {
        let nodes = cluster_nodes(&self.nodes[0]);
        let owner = nodes
            .lines()
            .find(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                fields.get(2).is_some_and(|flags| flags.contains("master"))
                    && fields.iter().skip(8).any(|range| {
                        let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
                        match (ends.next().flatten(), ends.next()) {
                            (Some(one), None) => one == slot,
                            (Some(lo), Some(Some(hi))) => (lo..=hi).contains(&slot),
                            _ => false,
                        }
                    })
            })
            .and_then(|line| line.split(' ').next())
            .unwrap_or_else(|| panic!("nobody serves slot {slot}:\n{nodes}"))
            .to_owned();
        self.nodes
            .iter()
            .position(|node| node.node_id() == owner)
            .expect("the owner is one of ours")
    }

    /// Starts moving `slot` from node `from` to node `to` (`IMPORTING` on `to`, then `MIGRATING`
    /// on `from`): from now on, keys of the slot that `from` does not hold are answered with
    /// `ASK` redirections to `to`.
    pub fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let slot = slot.to_string();
        let (from_id, to_id) = (self.nodes[from].node_id(), self.nodes[to].node_id());
        let ok = Resp::Simple("OK".into());
        assert_eq!(
            self.nodes[to].cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]),
            ok
        );
        assert_eq!(
            self.nodes[from].cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]),
            ok
        );
    }

    /// Moves up to `count` of the keys of `slot` that node `from` still holds to node `to`
    /// (`MIGRATE`); returns how many it moved.
    pub fn migrate_keys(&self, slot: u16, from: usize, to: usize, count: usize) -> usize {
        let keys = match self.nodes[from].cmd(&[
            "CLUSTER",
            "GETKEYSINSLOT",
            &slot.to_string(),
            &count.to_string(),
        ]) {
            Resp::Array(Some(keys)) => keys,
            other => panic!("CLUSTER GETKEYSINSLOT: {other:?}"),
        };
        if keys.is_empty() {
            return 0;
        }
        let port = self.nodes[to].port().to_string();
        let mut cmd: Vec<Vec<u8>> = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"]
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect();
        for key in &keys {
            match key {
                Resp::Bulk(Some(key)) => cmd.push(key.clone()),
                other => panic!("a key: {other:?}"),
            }
        }
        let args: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
        let reply = self.nodes[from].cmd_bytes(&args);
        assert!(
            matches!(&reply, Resp::Simple(s) if s == "OK" || s == "NOKEY"),
            "MIGRATE: {reply:?}"
        );
        keys.len()
    }

    /// Ends the move of `slot` to node `to`: the remaining keys are migrated, and every master
    /// is told the new owner (`SETSLOT ... NODE`, the new owner first).
    pub fn finish_migration(&self, slot: u16, from: usize, to: usize) {
        while self.migrate_keys(slot, from, to, 100) > 0 {}
        let to_id = self.nodes[to].node_id();
        let slot_text = slot.to_string();
        let mut order = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|i| *i != to && *i != from));
        for i in order {
            // Replicas refuse SETSLOT; they learn it from their masters.
            let reply = self.nodes[i].cmd(&["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id]);
            assert!(
                reply == Resp::Simple("OK".into())
                    || matches!(&reply, Resp::Error(e) if e.contains("replica") || e.contains("slave")),
                "CLUSTER SETSLOT NODE on node {i}: {reply:?}"
            );
        }
        self.wait_until("every node sees the slot's new owner", |node| {
            node.cluster_info().contains("cluster_state:ok")
        });
        let started = Instant::now();
        while self.owner_of(slot) != to {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "slot {slot} did not move"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_until(&self, what: &str, ready: impl Fn(&RedisServer) -> bool) {
        let started = Instant::now();
        while !self.nodes.iter().all(&ready) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the cluster did not settle within 30s: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What a cluster node needs on its command line: only what Redis 6 understands, so that older
/// distributions' servers work too.
fn cluster_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
        // A replica syncs at once, not after the default 5 s wait for more replicas.
        "--repl-diskless-sync-delay",
        "0",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn cluster_nodes(node: &RedisServer) -> String {
    match node.cmd(&["CLUSTER", "NODES"]) {
        Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        other => panic!("CLUSTER NODES: {other:?}"),
    }
}

impl RedisServer {
    /// This node's cluster id (`CLUSTER MYID`).
    pub fn node_id(&self) -> String {
        match self.cmd(&["CLUSTER", "MYID"]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("CLUSTER MYID: {other:?}"),
        }
    }

    fn cluster_info(&self) -> String {
        match self.cmd(&["CLUSTER", "INFO"]) {
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            _ => String::new(),
        }
    }
}

/// A reply, as the RESP2 protocol gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Int(i64),
    /// `$3 abc`, or nil
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`, or nil
    Array(Option<Vec<Resp>>),
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| bad("empty reply line"))?;
    let int = || {
        rest.parse::<i64>()
            .map_err(|_| bad("bad length or integer"))
    };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(int()?),
        "$" => match usize::try_from(int()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut buf = vec![0; len + 2];
                reader.read_exact(&mut buf)?;
                buf.truncate(len);
                Resp::Bulk(Some(buf))
            }
        },
        "*" => match usize::try_from(int()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(bad("unknown reply type")),
    })
}

/// A TCP proxy in front of a Redis server that counts the commands clients send through it:
/// with one command per request, that is the number of round trips.
pub struct CountingProxy {
    port: u16,
    commands: Arc<AtomicUsize>,
}

impl CountingProxy {
    /// A proxy to the server on `target_port`, listening on a free loopback port.
    pub fn start(target_port: u16) -> CountingProxy {
        CountingProxy::start_slow(target_port, Duration::ZERO)
    }

    /// A proxy that holds what clients send for `delay` before passing it on: a slow server (or
    /// link), as its clients see it.
    pub fn start_slow(target_port: u16, delay: Duration) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let commands = Arc::new(AtomicUsize::new(0));
        let counter = commands.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let counter = counter.clone();
                let (Ok(client_read), Ok(server_write)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                // Replies flow back untouched.
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    forward_counting(client_read, server_write, &counter, delay)
                });
            }
        });
        CountingProxy { port, commands }
    }

    /// The `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// How many commands went through so far.
    pub fn commands(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }
}

fn forward_counting(
    mut from: TcpStream,
    mut to: TcpStream,
    counter: &AtomicUsize,
    delay: Duration,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        // Count before forwarding, so a reply can never be seen before its command is counted.
        while let Some(len) = command_len(&pending) {
            counter.fetch_add(1, Ordering::SeqCst);
            pending.drain(..len);
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if to.write_all(&chunk[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

/// The length of the first complete command in `buf`, if there is one.
fn command_len(buf: &[u8]) -> Option<usize> {
    fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
        let end = buf.get(from..)?.windows(2).position(|w| w == b"\r\n")? + from;
        Some((&buf[from..end], end + 2))
    }
    fn number(text: &[u8]) -> Option<usize> {
        std::str::from_utf8(text).ok()?.parse().ok()
    }
    if buf.first() != Some(&b'*') {
        // An inline command: one line.
        return line(buf, 0).map(|(_, next)| next);
    }
    let (header, mut at) = line(buf, 0)?;
    for _ in 0..number(&header[1..])? {
        let (len, next) = line(buf, at)?;
        let len = number(len.get(1..)?)?;
        at = next + len + 2;
        if at > buf.len() {
            return None;
        }
    }
    Some(at)
}

/// A TCP proxy in front of a Redis server whose outages a test controls: it can send new
/// connections to another server (a failover behind one address), cut every live connection,
/// refuse new ones, hold what clients send (a server slow to answer), and cut the connection that
/// carries a command with a marker, before the command reaches the server or right after (the
/// server runs it; its reply is lost).
pub struct ChaosProxy {
    port: u16,
    state: Arc<ChaosState>,
}

/// Where [`ChaosProxy::cut_on`] cuts a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Before the data with the marker reaches the server: the command never runs.
    Before,
    /// Right after it reached the server: the command runs, its reply is lost.
    After,
}

struct CutOn {
    marker: Vec<u8>,
    times: usize,
    when: Cut,
    then_refuse: bool,
}

#[derive(Default)]
struct ChaosState {
    /// Where new connections go.
    upstream: std::sync::atomic::AtomicU16,
    refusing: std::sync::atomic::AtomicBool,
    holding: std::sync::atomic::AtomicBool,
    /// The marker to cut on, how many more times, where, and whether to refuse new connections
    /// from then on.
    cut_on: Mutex<Option<CutOn>>,
    cuts: AtomicUsize,
    accepted: AtomicUsize,
    /// Both sockets of every connection, to cut them.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
}

impl ChaosProxy {
    /// A proxy to the server on `target_port`, listening on a free loopback port.
    pub fn start(target_port: u16) -> ChaosProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(ChaosState::default());
        state.upstream.store(target_port, Ordering::SeqCst);
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.refusing.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let upstream = shared.upstream.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let clones = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(client_read), Ok(server_write), Ok(client_kept), Ok(server_kept)) = clones
                else {
                    continue;
                };
                shared
                    .live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((client_kept, server_kept));
                let muted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let down_muted = muted.clone();
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let mut chunk = [0u8; 64 * 1024];
                    loop {
                        let n = match from.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if down_muted.load(Ordering::SeqCst) {
                            continue;
                        }
                        if to.write_all(&chunk[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
                let state = shared.clone();
                std::thread::spawn(move || {
                    forward_chaos(client_read, server_write, &state, &muted)
                });
            }
        });
        ChaosProxy { port, state }
    }

    /// The `redis://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// New connections go to the server on `port` from now on (live ones stay where they are:
    /// cut them with [`ChaosProxy::cut_all`]).
    pub fn switch_to(&self, port: u16) {
        self.state.upstream.store(port, Ordering::SeqCst);
    }

    /// Cuts every live connection now.
    pub fn cut_all(&self) {
        let live = std::mem::take(&mut *self.state.live.lock().unwrap_or_else(|e| e.into_inner()));
        for (client, server) in live {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    /// Refuses new connections (accepts and closes them at once) while `on`.
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }

    /// Holds what clients send (passes nothing on to the server) while `on`: a server that does
    /// not answer. What was held is passed on, in order, when it is turned off.
    pub fn hold(&self, on: bool) {
        self.state.holding.store(on, Ordering::SeqCst);
    }

    /// Cuts the connections whose client data contains `marker`, the next `times` times it is
    /// seen, [`Cut::Before`] or [`Cut::After`] the data reaches the server; with `then_refuse`,
    /// refuses new connections from the first cut on (until [`ChaosProxy::refuse`]`(false)`).
    pub fn cut_on(&self, marker: &[u8], times: usize, when: Cut, then_refuse: bool) {
        *self.state.cut_on.lock().unwrap_or_else(|e| e.into_inner()) = Some(CutOn {
            marker: marker.to_vec(),
            times,
            when,
            then_refuse,
        });
    }

    /// How many connections [`ChaosProxy::cut_on`] cut so far.
    pub fn cuts(&self) -> usize {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// How many connections clients opened so far (refused ones included).
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.hold(false);
        self.cut_all();
    }
}

fn forward_chaos(
    mut from: TcpStream,
    mut to: TcpStream,
    state: &ChaosState,
    muted: &std::sync::atomic::AtomicBool,
) {
    // The end of what came before, so that a marker split across two reads is still found.
    let mut tail: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&chunk[..n]);
        let cut = {
            let mut armed = state.cut_on.lock().unwrap_or_else(|e| e.into_inner());
            match armed.as_mut() {
                Some(on)
                    if on.times > 0
                        && !on.marker.is_empty()
                        && window
                            .windows(on.marker.len())
                            .any(|w| w == on.marker.as_slice()) =>
                {
                    on.times -= 1;
                    Some((on.when, on.then_refuse))
                }
                _ => None,
            }
        };
        let keep = window.len().min(4096);
        tail = window[window.len() - keep..].to_vec();
        if let Some((when, then_refuse)) = cut {
            if then_refuse {
                state.refusing.store(true, Ordering::SeqCst);
            }
            state.cuts.fetch_add(1, Ordering::SeqCst);
            if when == Cut::Before {
                // Neither the command nor anything after it reaches the server.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        while state.holding.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        if cut.is_some() {
            // Muted before the command is sent: a server quick enough to reply before this
            // thread ran again would otherwise get its reply through.
            muted.store(true, Ordering::SeqCst);
        }
        if to.write_all(&chunk[..n]).is_err() {
            break;
        }
        if cut.is_some() {
            // The server has the command: it runs it, and its reply goes nowhere. The client
            // sees its connection closed.
            let _ = from.shutdown(Shutdown::Both);
        }
    }
    // Half-close towards the server, so that it still runs what it was sent before it sees the
    // end of the connection.
    let _ = to.shutdown(Shutdown::Write);
}
