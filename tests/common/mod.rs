//! Shared helpers for the integration suites: throwaway PostgreSQL clusters run as the
//! `postgres` system user, on 127.0.0.1 at a free port with the socket in a temp dir,
//! always stopped (by their own data directory) when the test ends, pass or fail.
//! Each suite uses some of these helpers, none uses all: unused ones are not dead code.
#![allow(dead_code)]

use postgres::{Client, NoTls, Row};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The server binaries of the version the suite is built for (Debian's layout; 17, 18
/// and 19 run inside a Debian root of their own, see scripts/test).
pub const BIN: &str = if cfg!(feature = "pg19") {
    "/usr/lib/postgresql/19/bin"
} else if cfg!(feature = "pg18") {
    "/usr/lib/postgresql/18/bin"
} else if cfg!(feature = "pg17") {
    "/usr/lib/postgresql/17/bin"
} else {
    "/usr/lib/postgresql/15/bin"
};
static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn running_as_postgres() -> bool {
    std::env::var("USER").map(|u| u == "postgres").unwrap_or(false)
        || Command::new("id").arg("-un").output().map(|o| o.stdout == b"postgres\n").unwrap_or(false)
}

/// A command run as the postgres system user, from `/` (the test's own directory may be
/// one postgres cannot enter; `Cluster::tool` runs in the cluster's directory instead).
pub fn pg_cmd(program: &str) -> Command {
    let mut c = if running_as_postgres() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "-u", "postgres", "--", program]);
        c
    };
    c.current_dir("/");
    c
}

pub fn bin(name: &str) -> String {
    format!("{BIN}/{name}")
}

fn check(out: Output, what: &str) -> Output {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A port nothing listens on now. Something else may take it before the server binds it
/// (another test's client connection gets its local port from the same range):
/// `Cluster::pg_ctl_start` then starts the cluster on another.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `N` different free ports (each held until all are chosen, so no two are the same).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held = [(); N].map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().port())
}

/// How many times a server is started before a taken port fails the test.
pub const PORT_TRIES: u32 = 5;

/// Does `log` say a bind failed because the port was taken? PostgreSQL and Python say
/// "Address already in use", Go programs (etcd, the exporter) "address already in use".
pub fn address_in_use(log: &str) -> bool {
    log.to_ascii_lowercase().contains("address already in use")
}

/// Start a server that listens on `N` ports chosen with `free_port`, which another process
/// may take before the server binds them. `start` starts it on `ports` and waits until it
/// serves, and returns Ok(server); or, when the server's log says a port was taken, it
/// stops what it started (by PID) and returns Err(that log), and the server is started
/// again on fresh ports, up to `PORT_TRIES` times in all. Any other failure panics inside
/// `start`. `first`: the ports of the first try (`free_ports()`, or a port a test holds
/// taken on purpose).
pub fn start_on_free_ports<T, const N: usize>(what: &str, first: [u16; N], mut start: impl FnMut([u16; N]) -> Result<T, String>) -> T {
    let mut ports = first;
    for attempt in 1..=PORT_TRIES {
        match start(ports) {
            Ok(server) => return server,
            Err(said) if attempt < PORT_TRIES => {
                let next = free_ports();
                let lines: Vec<&str> = said.lines().filter(|l| address_in_use(l)).collect();
                eprintln!("{what}: port(s) {ports:?} were taken before it bound them; starting on {next:?}\n{}", lines.join("\n"));
                ports = next;
            }
            Err(said) => panic!("{what}: a port was taken on each of {PORT_TRIES} tries, the last {ports:?}:\n{said}"),
        }
    }
    unreachable!("the last try returns or panics")
}

/// Settings of every session a test opens (`Cluster::client`, `Cluster::connect_as`): a
/// call that regresses into waiting for a lock the test holds, or into hanging, fails the
/// test with SQLSTATE 55P03 or 57014 instead of hanging the suite.
pub const SESSION_OPTIONS: &str = "-c lock_timeout=30s -c statement_timeout=300s";

/// Poll `probe` every `every` until it returns Some; None once `timeout` has passed.
pub fn poll<T>(timeout: Duration, every: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A fresh temp directory that postgres owns.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pgsg-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if !running_as_postgres() {
        check(Command::new("chown").args(["postgres:postgres"]).arg(&dir).output().unwrap(), "chown");
    }
    dir
}

pub struct Cluster {
    pub dir: PathBuf,
    pub data: PathBuf,
    /// Changed only by `pg_ctl_start`, when the port was taken meanwhile.
    port: Cell<u16>,
}

impl Cluster {
    /// A cluster whose data directory `data` exists (made by initdb, pg_basebackup, ...),
    /// on a free port: `port = N` is added to its postgresql.conf, with `conf` lines.
    pub fn at(dir: PathBuf, data: PathBuf, conf: &str) -> Cluster {
        let c = Cluster { dir, data, port: Cell::new(free_port()) };
        c.append_conf(&format!("port = {}\n{conf}", c.port()));
        c
    }

    /// The cluster a program other than pg_ctl starts (Patroni), on `port`.
    pub fn started_by_others(dir: PathBuf, data: PathBuf, port: u16) -> Cluster {
        Cluster { dir, data, port: Cell::new(port) }
    }

    pub fn port(&self) -> u16 {
        self.port.get()
    }

    /// initdb + our settings + `extra` postgresql.conf lines, then start. The extension
    /// is preloaded with pgslotguard.database = 'postgres' and naptime 1s unless `extra`
    /// says otherwise (later lines win).
    pub fn start(tag: &str, extra: &[&str]) -> Cluster {
        let c = Cluster::init(tag, extra);
        c.pg_ctl_start();
        c
    }

    pub fn init(tag: &str, extra: &[&str]) -> Cluster {
        Cluster::init_with_waldir(tag, extra, None)
    }

    /// `init`, with pg_wal at `waldir` (initdb -X: pg_wal is a symlink to it).
    pub fn init_with_waldir(tag: &str, extra: &[&str], waldir: Option<&Path>) -> Cluster {
        let dir = temp_dir(tag);
        let data = dir.join("data");
        let mut initdb = pg_cmd(&bin("initdb"));
        initdb.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data);
        if let Some(w) = waldir {
            initdb.arg("-X").arg(w);
        }
        check(initdb.output().unwrap(), "initdb");
        let socket_dir = dir.display().to_string();
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{socket_dir}'"),
            "shared_preload_libraries = 'pgslotguard'".into(),
            "pgslotguard.database = 'postgres'".into(),
            "pgslotguard.naptime = '1s'".into(),
            // Warnings off unless a test is about them (tests/notify.rs sets it): the other
            // tests assert exact event sequences of the rule they test.
            "pgslotguard.warn_fraction = 0".into(),
            "max_replication_slots = 20".into(),
            "max_wal_senders = 20".into(),
            "wal_level = logical".into(),
            "fsync = off".into(),
            "log_line_prefix = '%m [%p] %b '".into(),
        ];
        conf.extend(extra.iter().map(|s| s.to_string()));
        Cluster::at(dir, data, &conf.join("\n"))
    }

    pub fn append_conf(&self, text: &str) {
        let path = self.data.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&path).unwrap();
        conf.push('\n');
        conf.push_str(text);
        conf.push('\n');
        std::fs::write(&path, conf).unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("server-{}.log", self.data.file_name().unwrap().to_string_lossy()))
    }

    /// pg_ctl start, and wait for it. When the port was taken between `free_port` and the
    /// start (the server logs "Address already in use"), start again on another port.
    pub fn pg_ctl_start(&self) {
        for attempt in 1.. {
            let logged = self.log().len();
            let out = pg_cmd(&bin("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .arg("start")
                .stdout(Stdio::null())
                .output()
                .unwrap();
            let log = self.log();
            let taken = log.get(logged..).is_some_and(|new| new.contains("Address already in use"));
            if !out.status.success() && taken && attempt < 5 {
                let port = free_port();
                eprintln!("port {} was taken before the server bound it; starting on {port}", self.port());
                self.port.set(port);
                self.append_conf(&format!("port = {port}"));
                continue;
            }
            if !out.status.success() {
                panic!("pg_ctl start failed ({}): {}\n{}", out.status, String::from_utf8_lossy(&out.stderr), self.log_tail(20));
            }
            return;
        }
    }

    /// pg_ctl stop with `mode` (fast, immediate); quiet if already stopped.
    pub fn stop(&self, mode: &str) {
        if self.data.join("postmaster.pid").exists() {
            let _ = pg_cmd(&bin("pg_ctl"))
                .args(["-w", "-t", "60", "-m", mode, "-D"])
                .arg(&self.data)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    pub fn restart(&self, mode: &str) {
        self.stop(mode);
        self.pg_ctl_start();
    }

    pub fn conninfo(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port())
    }

    /// The conninfo of a test's session as `role`, with `SESSION_OPTIONS`.
    pub fn session_conninfo(&self, db: &str, role: &str) -> String {
        format!("host=127.0.0.1 port={} user={role} dbname={db} options='{SESSION_OPTIONS}'", self.port())
    }

    pub fn client_db(&self, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.session_conninfo(db, "postgres"), NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect to cluster on port {}: {e}\n{}", self.port(), self.log_tail(30)),
            }
        }
    }

    /// A session as `role` in database postgres (a role made by the test).
    pub fn connect_as(&self, role: &str) -> Client {
        Client::connect(&self.session_conninfo("postgres", role), NoTls).unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    pub fn client(&self) -> Client {
        self.client_db("postgres")
    }

    pub fn try_sql(&self, q: &str) -> Result<Vec<Row>, postgres::Error> {
        let mut c = self.client();
        c.simple_query("SET client_min_messages = error").ok();
        c.query(q, &[])
    }

    pub fn sql(&self, q: &str) -> Vec<Row> {
        self.try_sql(q).unwrap_or_else(|e| panic!("{q}: {e}\n{}", self.log_tail(20)))
    }

    pub fn exec(&self, q: &str) {
        let mut c = self.client();
        c.batch_execute(q).unwrap_or_else(|e| panic!("{q}: {e}\n{}", self.log_tail(20)));
    }

    pub fn text(&self, q: &str) -> String {
        self.sql(q).first().and_then(|r| r.get::<_, Option<String>>(0)).unwrap_or_default()
    }

    pub fn count(&self, q: &str) -> i64 {
        self.sql(q).first().map(|r| r.get::<_, i64>(0)).unwrap_or(0)
    }

    /// The SQLSTATE `q` fails with, or None when it succeeds.
    pub fn sqlstate(&self, q: &str) -> Option<String> {
        match self.client().batch_execute(q) {
            Ok(()) => None,
            Err(e) => Some(e.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no code: {e}"))),
        }
    }

    pub fn slot_exists(&self, name: &str) -> bool {
        self.sql(&format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}'")).len() == 1
    }

    /// Is `name` dropped and its drop settled: the slot gone and no drop intent left for it?
    /// On a primary the guard drops the slot inside the subtransaction that writes its event,
    /// so the slot leaves pg_replication_slots a moment before the event commits; the intent
    /// goes only after that commit. One query per look (each opens a connection); a cluster
    /// without the extension (no pgslotguard.tracking) has no intents.
    pub fn dropped(&self, name: &str) -> bool {
        let both = format!(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}'
             UNION ALL SELECT 1 FROM pgslotguard.tracking WHERE slot_name = '{name}' AND drop_action IS NOT NULL"
        );
        match self.try_sql(&both) {
            Ok(rows) => rows.is_empty(),
            Err(_) => !self.slot_exists(name),
        }
    }

    /// Slots and leases as text, for failure messages.
    pub fn describe(&self) -> String {
        let slots = self
            .try_sql("SELECT string_agg(format('%s(active=%s restart=%s)', slot_name, active, restart_lsn), ', ') FROM pg_replication_slots")
            .ok()
            .and_then(|r| r.first().and_then(|r| r.get::<_, Option<String>>(0)))
            .unwrap_or_default();
        let events = self
            .try_sql("SELECT string_agg(format('%s %s %s', slot_name, action, reason), E'\\n  ' ORDER BY id) FROM pgslotguard.events")
            .ok()
            .and_then(|r| r.first().and_then(|r| r.get::<_, Option<String>>(0)))
            .unwrap_or_default();
        let leases = self
            .try_sql("SELECT string_agg(format('%s(%s until %s)', slot_name, state, expires_at), ', ') FROM pgslotguard.leases")
            .ok()
            .and_then(|r| r.first().and_then(|r| r.get::<_, Option<String>>(0)))
            .unwrap_or_default();
        let tracking = self
            .try_sql("SELECT string_agg(format('%s(drop %s)', slot_name, drop_action), ', ') FROM pgslotguard.tracking WHERE drop_action IS NOT NULL")
            .ok()
            .and_then(|r| r.first().and_then(|r| r.get::<_, Option<String>>(0)))
            .unwrap_or_default();
        format!("slots: [{slots}]\nleases: [{leases}]\ndrop intents: [{tracking}]\nevents:\n  {events}\nserver log tail:\n{}", self.log_tail(25))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Poll `probe` every 100 ms until it returns Some, or panic after `timeout` saying
    /// what we waited for and what we saw.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut probe: impl FnMut(&Cluster) -> Option<T>) -> T {
        poll(timeout, Duration::from_millis(100), || probe(self))
            .unwrap_or_else(|| panic!("gave up after {timeout:?} waiting for {what}\n{}", self.describe()))
    }

    pub fn worker_pid(&self) -> Option<i32> {
        self.try_sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pgslotguard guard'")
            .ok()
            .and_then(|r| r.first().map(|r| r.get::<_, i32>(0)))
    }

    /// Wait for the guard to complete `n` more passes (reads pgslotguard.status).
    pub fn wait_passes(&self, n: i64) {
        let start = self.count("SELECT passes FROM pgslotguard.status");
        self.wait_for(&format!("{n} more guard passes"), Duration::from_secs(60), |c| {
            (c.count("SELECT passes FROM pgslotguard.status") >= start + n).then_some(())
        });
    }

    /// ALTER SYSTEM SET each (name, value) — one statement each: ALTER SYSTEM cannot run in a
    /// transaction block — then reload.
    pub fn set_policy(&self, settings: &[(&str, &str)]) {
        for (name, value) in settings {
            self.exec(&format!("ALTER SYSTEM SET {name} = '{value}'"));
        }
        self.reload();
    }

    /// Write a bit more than `mb` MB of WAL (and switch segment).
    pub fn make_wal(&self, mb: i64) {
        self.exec(&format!(
            "CREATE TABLE IF NOT EXISTS filler (x text);
             INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, {});
             SELECT pg_switch_wal();",
            mb * 1100
        ));
    }

    pub fn reload(&self) {
        self.exec("SELECT pg_reload_conf()");
    }

    /// Run a client program (pg_basebackup, pgbench, ...) as postgres against this cluster.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = pg_cmd(&bin(name));
        c.current_dir(&self.dir);
        c
    }

    pub fn run_tool(&self, name: &str, args: &[&str]) -> Output {
        check(self.tool(name).args(args).output().unwrap(), name)
    }

    /// Start pg_receivewal streaming from `slot` into a fresh temp dir; returns the
    /// process (stopped by PID when dropped) and the dir.
    pub fn receivewal(&self, slot: &str) -> (Proc, PathBuf) {
        let dir = temp_dir("recv");
        let child = self
            .tool("pg_receivewal")
            .args(["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-S", slot, "--status-interval=1", "-D"])
            .arg(&dir)
            .spawn()
            .unwrap();
        (Proc(child), dir)
    }

    pub fn port_s(&self) -> String {
        self.port().to_string()
    }

    /// `pgbench -i -s scale`, quietly.
    pub fn pgbench_init(&self, scale: u32) {
        self.run_tool(
            "pgbench",
            &["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-i", "-s", &scale.to_string(), "-q", "postgres"],
        );
    }

    /// Start `pgbench -n -c clients -T secs` in the background (stopped by PID when dropped).
    pub fn pgbench_run(&self, clients: u32, secs: u32) -> Proc {
        let child = self
            .tool("pgbench")
            .args(["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-n"])
            .args(["-c", &clients.to_string(), "-j", &clients.to_string(), "-T", &secs.to_string(), "postgres"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// A new cluster from a base backup of `primary` (pg_basebackup -X stream, fast
    /// checkpoint), on a port and socket dir of its own, not started. `standby`: with -R
    /// (standby.signal and primary_conninfo), so it starts as a hot standby of `primary`.
    /// `waldir`: its pg_wal there (--waldir), e.g. on a small filesystem.
    pub fn from_base_backup(primary: &Cluster, tag: &str, standby: bool, waldir: Option<&Path>) -> Cluster {
        let dir = temp_dir(tag);
        let data = dir.join("data");
        let port = primary.port_s();
        let mut args = vec!["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres", "-X", "stream", "-c", "fast", "-D"];
        if standby {
            args.insert(0, "-R");
        }
        let mut cmd = primary.tool("pg_basebackup");
        cmd.args(&args).arg(&data);
        if let Some(w) = waldir {
            cmd.arg(format!("--waldir={}", w.display()));
        }
        let out = cmd.output().unwrap();
        check(out, "pg_basebackup");
        let socket_dir = dir.display().to_string();
        Cluster::at(dir, data, &format!("unix_socket_directories = '{socket_dir}'\nhot_standby = on"))
    }

    /// Start a trickle of writes: `per_sec` transactions a second, each inserting one small
    /// row into table `trickle` (made here), for `secs` at most (`pgbench -R`: its schedule,
    /// no segment switch). Stopped by PID when dropped.
    pub fn trickle(&self, per_sec: u32, secs: u32) -> Proc {
        self.exec("CREATE TABLE IF NOT EXISTS trickle (id bigserial, at timestamptz DEFAULT now(), x text)");
        let script = self.dir.join("trickle.sql");
        std::fs::write(&script, "INSERT INTO trickle (x) VALUES (md5(random()::text));\n").unwrap();
        let child = self
            .tool("pgbench")
            .args(["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-n", "-R", &per_sec.to_string()])
            .args(["-T", &secs.to_string(), "-f"])
            .arg(&script)
            .arg("postgres")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// A hot standby of this cluster: `pg_basebackup -R` streaming through `slot` (which
    /// must exist), started on a port of its own with `hot_standby_feedback = on` (so the
    /// slot holds the standby's xmin), status every second, and `extra` settings. Stopped
    /// (by its data directory) when dropped, like any cluster.
    pub fn standby(&self, tag: &str, slot: &str, extra: &[&str]) -> Cluster {
        let dir = temp_dir(tag);
        let data = dir.join("data");
        let target = data.display().to_string();
        self.run_tool(
            "pg_basebackup",
            &["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-R", "-S", slot, "-X", "stream", "-c", "fast", "-D", &target],
        );
        // A primary_conninfo of the caller's (slot sync needs a dbname in it) replaces the
        // one pg_basebackup -R wrote to postgresql.auto.conf, which would otherwise win.
        if extra.iter().any(|e| e.trim_start().starts_with("primary_conninfo")) {
            let auto = data.join("postgresql.auto.conf");
            let kept: String = std::fs::read_to_string(&auto)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&auto, kept).unwrap();
        }
        let mut conf = vec![
            format!("unix_socket_directories = '{}'", dir.display()),
            "hot_standby_feedback = on".into(),
            "wal_receiver_status_interval = '1s'".into(),
        ];
        conf.extend(extra.iter().map(|s| s.to_string()));
        let c = Cluster::at(dir, data, &conf.join("\n"));
        c.pg_ctl_start();
        c
    }

    /// Start pgbench burning transaction IDs: every transaction assigns one
    /// (`SELECT txid_current()`), over `clients` connections, at full speed (tens of
    /// thousands a second with fsync off) or at `rate` a second (`pgbench -R`), until
    /// stopped (by PID, when dropped). Returns the process.
    pub fn burn_xids(&self, clients: u32, rate: Option<u32>) -> Proc {
        let script = self.dir.join("burn_xid.sql");
        std::fs::write(&script, "SELECT txid_current();\n").unwrap();
        let mut cmd = self.tool("pgbench");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-n", "-f"]).arg(&script);
        if let Some(r) = rate {
            cmd.args(["-R", &r.to_string()]);
        }
        let child = cmd
            .args(["-c", &clients.to_string(), "-j", &clients.to_string(), "-T", "3600", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Proc(child)
    }

    /// Start `pg_basebackup -c fast -S slot --wal-method=stream --max-rate=rate` into a
    /// fresh dir in the cluster's (removed with it); returns the process (stopped by PID
    /// when dropped) and the dir.
    pub fn basebackup_throttled(&self, slot: &str, rate: &str) -> (Proc, PathBuf) {
        let dir = self.dir.join(format!("backup-{slot}"));
        let child = self
            .tool("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-c", "fast", "-S", slot])
            .args(["--wal-method=stream", &format!("--max-rate={rate}"), "-D"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (Proc(child), dir)
    }

    /// `VACUUM (VERBOSE) table` through psql: what it reported (psql prints the INFO lines
    /// on stderr).
    pub fn vacuum_verbose(&self, table: &str) -> String {
        let out = self.run_tool(
            "psql",
            &["-h", "127.0.0.1", "-p", &self.port_s(), "-U", "postgres", "-X", "-d", "postgres", "-c", &format!("VACUUM (VERBOSE) {table}")],
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Bytes of WAL segments in pg_wal, as the server lists them.
    pub fn pg_wal_bytes(&self) -> i64 {
        self.count("SELECT COALESCE(sum(size), 0)::bigint FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'")
    }
}

/// A cluster started with `extra` settings and the extension created in `postgres`.
pub fn with_extension(tag: &str, extra: &[&str]) -> Cluster {
    let c = Cluster::start(tag, extra);
    c.exec("CREATE EXTENSION pgslotguard");
    c
}

/// How long a test waits for the guard to do something it should do within seconds.
pub const WAIT: Duration = Duration::from_secs(60);

/// The mount source name of every tmpfs the tests mount (scripts/test unmounts leftovers
/// of a killed run by it).
pub const TMPFS_SOURCE: &str = "pgsg-walfs";

/// A small tmpfs owned by postgres, mounted for one test and unmounted when dropped, pass
/// or fail. Mounting needs root; where it is refused the test fails and says so.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(tag: &str, size_mb: u64) -> Tmpfs {
        let dir = temp_dir(tag);
        let id = |flag: &str| {
            let o = Command::new("id").args([flag, "postgres"]).output().unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let opts = format!("size={size_mb}m,mode=0700,uid={},gid={}", id("-u"), id("-g"));
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, TMPFS_SOURCE]).arg(&dir).output().unwrap();
        if !out.status.success() {
            panic!(
                "mounting a {size_mb} MB tmpfs on {} was refused ({}): this test needs root with the right to mount; it does not skip",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Tmpfs { dir }
    }

    /// (free bytes for unprivileged users, total bytes) of the mount.
    pub fn space(&self) -> (i64, i64) {
        fs_space(&self.dir)
    }
}

/// statvfs of the filesystem holding `dir`: (free bytes for unprivileged users, total bytes).
pub fn fs_space(dir: &Path) -> (i64, i64) {
    let path = std::ffi::CString::new(dir.as_os_str().to_string_lossy().as_bytes()).unwrap();
    // SAFETY: all-zero is a valid statvfs; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", dir.display());
    ((st.f_bavail * st.f_frsize) as i64, (st.f_blocks * st.f_frsize) as i64)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.dir).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            // Something still has a file open there (a server that would not stop): detach
            // it lazily so the mount goes as soon as that process does.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop("immediate");
        if std::env::var_os("PGSG_KEEP").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A child process we started, killed by its own PID when dropped.
pub struct Proc(pub Child);

/// Every process below `pid` (children first found, then theirs), by PID.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let o = Command::new("pgrep").args(["-P", &p.to_string()]).output();
        for c in o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines() {
            if let Ok(c) = c.trim().parse::<u32>() {
                out.push(c);
                queue.push(c);
            }
        }
    }
    out
}

impl Proc {
    /// SIGTERM to the program and every process it forked (pg_basebackup streams WAL from
    /// a child), by their PIDs; wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        for pid in descendants(self.0.id()) {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// The PID of the program itself. Run through sudo (`pg_cmd`, as root) the child we
    /// hold is sudo, which without a terminal relays no SIGSTOP: a signal meant for the
    /// program goes to this PID.
    pub fn program_pid(&self) -> u32 {
        let pid = self.0.id();
        if running_as_postgres() {
            return pid;
        }
        let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim().to_string();
        poll(Duration::from_secs(10), Duration::from_millis(20), || descendants(pid).into_iter().find(|&p| comm(p) != "sudo"))
            .unwrap_or_else(|| panic!("sudo (PID {pid}) started no program"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send SIGKILL to a process by its PID: a server process found by its own report (its
/// pause log line, pg_stat_activity, postmaster.pid), never by name.
pub fn kill9(pid: i32) {
    assert!(pid > 0, "no PID to kill");
    let st = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill -KILL {pid} failed");
}

/// Whether a process with this PID exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Cluster {
    /// The size of the server log now: what a later wait reads from.
    pub fn log_len(&self) -> usize {
        self.log().len()
    }

    /// The PID of the process that logged it paused at `point` (src/testhook.rs) after the
    /// log had `from` bytes, once it has.
    pub fn paused_at(&self, point: &str, from: usize) -> i32 {
        let needle = format!("pgslotguard test: pausing at {point} (pid ");
        self.wait_for(&format!("a process to pause at {point}"), WAIT, |c| {
            let log = c.log();
            let tail = log.get(from..).unwrap_or("");
            let at = tail.find(&needle)?;
            let rest = &tail[at + needle.len()..];
            rest[..rest.find(')')?].parse::<i32>().ok()
        })
    }

    /// Wait for the server to accept connections (read-only ones, on a standby) again, as
    /// its log says after `from` (a log_len() taken before a crash), and for a connection.
    pub fn wait_ready(&self, from: usize) {
        self.wait_for("the server to restart after the crash", WAIT, |c| {
            c.log().get(from..).unwrap_or("").contains("database system is ready to accept ").then_some(())
        });
        self.wait_for("a connection after the restart", WAIT, |c| c.try_sql("SELECT 1").ok().map(|_| ()));
    }

    /// After a server process was killed, the postmaster ends every other one and starts
    /// again (crash recovery): wait until it accepts connections and the guard has made a
    /// pass (`from`: the log's size before the kill).
    pub fn wait_crash_restart(&self, from: usize) {
        self.wait_ready(from);
        self.wait_for("the guard after the restart", WAIT, |c| {
            c.try_sql("SELECT passes FROM pgslotguard.status").ok().and_then(|r| r.first().map(|r| r.get::<_, i64>(0))).filter(|p| *p >= 2)
        });
    }

    /// The postmaster's PID (postmaster.pid).
    pub fn postmaster_pid(&self) -> u32 {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        pid.lines().next().unwrap().trim().parse().unwrap()
    }

    /// SIGKILL the postmaster (no shutdown at all), wait for its children to go, start again.
    pub fn kill_postmaster_and_start(&self) {
        let pm = self.postmaster_pid();
        let children = descendants(pm);
        kill9(pm as i32);
        let deadline = Instant::now() + WAIT;
        while (alive(pm) || children.iter().any(|&p| alive(p))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pg_ctl_start();
    }

    /// Run `sql` (several statements) in a session of its own on a thread; joined, it gives
    /// the statements' error, if any.
    pub fn session(&self, sql: &str) -> std::thread::JoinHandle<Result<(), String>> {
        let (conninfo, sql) = (self.conninfo("postgres"), sql.to_string());
        std::thread::spawn(move || {
            let mut c = Client::connect(&conninfo, NoTls).map_err(|e| e.to_string())?;
            c.batch_execute(&sql).map_err(|e| e.as_db_error().map(|d| format!("{}: {}", d.code().code(), d.message())).unwrap_or_else(|| e.to_string()))
        })
    }

    /// The actions recorded about `slot`, in order, comma-separated.
    pub fn actions(&self, slot: &str) -> String {
        self.text(&format!("SELECT coalesce(string_agg(action, ',' ORDER BY id), '') FROM pgslotguard.events WHERE slot_name = '{slot}'"))
    }

    /// Is `slot` leased (in pgslotguard.leases)?
    pub fn leased(&self, slot: &str) -> bool {
        self.count(&format!("SELECT count(*) FROM pgslotguard.leases WHERE slot_name = '{slot}'")) == 1
    }
}

/// Send `sig` (STOP, CONT, ...) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A process's state as the kernel shows it (`/proc/PID/stat`): 'R', 'S', 'T' (stopped), ...
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // after the command name, in parentheses that may hold spaces
    stat.rsplit_once(") ")?.1.chars().next()
}

/// SIGSTOP to `pid`, and wait until the kernel shows it stopped.
pub fn stop_process(pid: u32) {
    signal(pid, "STOP");
    poll(Duration::from_secs(10), Duration::from_millis(10), || (process_state(pid) == Some('T')).then_some(()))
        .unwrap_or_else(|| panic!("PID {pid} did not stop: its state is {:?}", process_state(pid)));
}

// Hostile operators in a writable `public` (doc/security.md; tests/security.rs, tests/upgrade.rs).

/// Operators a role may make in `public` for the type pairs our SQL uses, each running a
/// function that tries to make the role a superuser and says so in `public.pwned`: if any
/// is ever bound into our views or run by our functions, a superuser reading or calling
/// them runs it.
pub fn plant_hostile_operators(c: &Cluster) {
    c.exec(
        "GRANT CREATE ON SCHEMA public TO PUBLIC;
         CREATE ROLE attacker LOGIN;
         CREATE TABLE public.pwned (what text);
         GRANT INSERT, SELECT ON public.pwned TO PUBLIC;",
    );
    let types = [
        "bigint", "integer", "numeric", "double precision", "real", "timestamptz", "interval", "text", "name", "oid", "pg_lsn", "boolean",
    ];
    let mut a = c.connect_as("attacker");
    let mut n = 0;
    let mut sql = String::new();
    for t1 in types.iter() {
        for t2 in types.iter() {
            for op in ["=", "<>", "<", ">", "<=", ">=", "+", "-", "*", "/", "||", "~~"] {
                n += 1;
                sql.push_str(&format!(
                    "CREATE FUNCTION public.hijack_{n}(a {t1}, b {t2}) RETURNS boolean LANGUAGE plpgsql AS $f$
                     BEGIN
                       BEGIN EXECUTE 'ALTER ROLE attacker SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                       INSERT INTO public.pwned VALUES ('{op} ({t1}, {t2})');
                       RETURN NULL;
                     END $f$;
                     CREATE OPERATOR public.{op} (LEFTARG = {t1}, RIGHTARG = {t2}, FUNCTION = public.hijack_{n});\n"
                ));
            }
        }
    }
    a.batch_execute(&sql).unwrap();
}

/// Read every view and call every function, as a superuser with the default search_path.
pub fn use_everything(c: &Cluster) {
    c.exec(
        "SELECT * FROM backup_slot_lease('sec_a', '1h', holder => 'x', max_retained => '1GB', max_inactive => '1h', max_age => '2h');
         SELECT backup_slot_renew('sec_a', '2h');
         SELECT * FROM backup_slot_lease('sec_b', '1h');
         SELECT backup_slot_keep('sec_b');
         SELECT pg_drop_replication_slot('sec_b');
         SELECT * FROM backup_slot_enforce(dry_run => true);
         SELECT * FROM backup_slot_enforce();
         SELECT * FROM pgslotguard.leases; SELECT * FROM pgslotguard.slots; SELECT * FROM pgslotguard.events;
         SELECT * FROM pgslotguard.status; SELECT * FROM pgslotguard.tracking;
         SELECT backup_slot_release('sec_a');",
    );
}

pub fn assert_not_pwned(c: &Cluster) {
    assert_eq!(c.text("SELECT rolsuper::text FROM pg_roles WHERE rolname = 'attacker'"), "false", "the attacker became a superuser");
    assert_eq!(c.text("SELECT coalesce(string_agg(what, '; '), '') FROM public.pwned"), "", "a hostile operator ran");
}
