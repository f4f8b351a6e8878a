//! Shared helpers for the integration suites: throwaway PostgreSQL clusters run as the
//! `postgres` system user, on 127.0.0.1 at a free port with the socket in a temp dir,
//! always stopped (by their own data directory) when the test ends, pass or fail.
//! Each suite uses some of these helpers, none uses all: unused ones are not dead code.
#![allow(dead_code)]

use postgres::{Client, NoTls, Row};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The server binaries of the version the suite is built for (Debian's layout; 17 and 18
/// run inside a Debian root of their own, see scripts/test).
pub const BIN: &str = if cfg!(feature = "pg18") {
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    pub port: u16,
}

impl Cluster {
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
        let c = Cluster { dir, data, port: free_port() };
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("port = {}", c.port),
            format!("unix_socket_directories = '{}'", c.dir.display()),
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
        c.append_conf(&conf.join("\n"));
        c
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

    pub fn pg_ctl_start(&self) {
        check(
            pg_cmd(&bin("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(self.log_path())
                .arg("start")
                .stdout(Stdio::null())
                .output()
                .unwrap(),
            "pg_ctl start",
        );
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
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    pub fn client_db(&self, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.conninfo(db), NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect to cluster on port {}: {e}\n{}", self.port, self.log_tail(30)),
            }
        }
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
        format!("slots: [{slots}]\nevents:\n  {events}\nserver log tail:\n{}", self.log_tail(25))
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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("gave up after {timeout:?} waiting for {what}\n{}", self.describe());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
        self.port.to_string()
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
        let c = Cluster { dir, data, port: free_port() };
        c.append_conf(&format!(
            "port = {}\nunix_socket_directories = '{}'\nhot_standby = on",
            c.port,
            c.dir.display()
        ));
        c
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
        let c = Cluster { dir, data, port: free_port() };
        let mut conf = vec![
            format!("port = {}", c.port),
            format!("unix_socket_directories = '{}'", c.dir.display()),
            "hot_standby_feedback = on".into(),
            "wal_receiver_status_interval = '1s'".into(),
        ];
        conf.extend(extra.iter().map(|s| s.to_string()));
        c.append_conf(&conf.join("\n"));
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

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
