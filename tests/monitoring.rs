//! Monitoring with the real tools: Debian's prometheus-postgres-exporter runs
//! contrib/prometheus/pgslotguard-queries.yaml against a cluster with leases in known
//! states, and a scrape of /metrics (curl) shows the series with their values. The alert
//! rules are tested by promtool in scripts/test (they need no cluster).

mod common;
use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tools scripts/monitoring-tools unpacked (scripts/test runs it first).
fn tool(name: &str) -> String {
    let p = format!("{}/target/tools/usr/bin/{name}", env!("CARGO_MANIFEST_DIR"));
    assert!(std::path::Path::new(&p).exists(), "{p} is missing: run scripts/monitoring-tools (scripts/test does)");
    p
}

/// One series' value from a scrape, by metric name and the labels it must carry.
fn value(scrape: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (name, rest) = series.split_once('{').unwrap_or((series, ""));
        (name == metric && labels.iter().all(|(k, val)| rest.contains(&format!("{k}=\"{val}\"")))).then(|| v.parse().ok())?
    })
}

struct Exporter {
    child: std::process::Child,
    port: u16,
    /// Its stderr (its log), appended by every start, in the cluster's directory.
    log: PathBuf,
}

impl Exporter {
    fn start(c: &Cluster) -> Exporter {
        Exporter::start_on(c, free_port())
    }

    /// The exporter on 127.0.0.1:`first`, or on another port when that one was taken before
    /// the exporter bound it (`start_on_free_ports`). Returns once it serves /metrics.
    fn start_on(c: &Cluster, first: u16) -> Exporter {
        let log = c.dir.join("exporter.log");
        start_on_free_ports("prometheus-postgres-exporter", [first], |[port]| {
            let from = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
            let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
            let child = Command::new(tool("prometheus-postgres-exporter"))
                .env("DATA_SOURCE_NAME", format!("host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable", c.port()))
                .args([
                    &format!("--web.listen-address=127.0.0.1:{port}"),
                    &format!("--extend.query-path={}/contrib/prometheus/pgslotguard-queries.yaml", env!("CARGO_MANIFEST_DIR")),
                    "--disable-default-metrics",
                    "--disable-settings-metrics",
                ])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start prometheus-postgres-exporter");
            // Dropped on Err: killed by its PID.
            let mut e = Exporter { child, port, log: log.clone() };
            e.wait_serving(from)?;
            Ok(e)
        })
    }

    /// Wait until this exporter serves /metrics: it logged that it listens on its port (so
    /// the answer is its own, not from whatever took the port) and a GET of /metrics
    /// succeeds. Err(its log since `from`) when the port was taken; a panic when it exits
    /// for another reason or is not serving after 30 s.
    fn wait_serving(&mut self, from: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self.child.try_wait().expect("wait for the exporter");
            let said = self.log().get(from..).unwrap_or("").to_string();
            if address_in_use(&said) {
                return Err(said);
            }
            if let Some(status) = exited {
                panic!("the exporter exited ({status}) before it served on {}:\n{said}", self.port);
            }
            let listening = said.contains(&format!("address=127.0.0.1:{}", self.port)) && said.contains("Listening on");
            if listening && self.get_metrics().is_some() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "the exporter did not serve /metrics on {} within 30 s:\n{said}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics: the body, or None when the request fails or is not answered with 2xx.
    fn get_metrics(&self) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "10", &format!("http://127.0.0.1:{}/metrics", self.port)])
            .output()
            .expect("curl");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn scrape(&self) -> String {
        self.get_metrics().unwrap_or_default()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_exporter_shows_each_slot_and_the_worker_with_their_values() {
    // dry_run: an expired lease stays (would_drop), to be seen; then the guard acts.
    let c = with_extension("exporter", &["pgslotguard.dry_run = on", "pgslotguard.warn_fraction = 0.5", "pgslotguard.max_retained_wal = '1GB'"]);
    let leased = std::time::Instant::now();
    c.exec("SELECT backup_slot_lease('live', '1h')");
    c.exec("SELECT backup_slot_lease('cdc', '1h', plugin => 'test_decoding')");
    c.exec("SELECT backup_slot_lease('lapsed', '1s')");
    c.exec("SELECT pg_create_physical_replication_slot('unleased', true)");
    // a logical slot holds catalog_xmin (out of scope: scope = leased)
    c.exec("SELECT pg_create_logical_replication_slot('sub', 'test_decoding')");
    c.make_wal(2);
    c.wait_for("the lapsed lease to be seen as a would-be drop", WAIT, |c| {
        (c.count("SELECT count(*) FROM pgslotguard.events WHERE action = 'would_drop'") == 1).then_some(())
    });
    let e = Exporter::start(&c);
    let scrape = c.wait_for("the exporter to serve pgslotguard's series", WAIT, |_| {
        let s = e.scrape();
        s.contains("pgslotguard_worker_up").then_some(s)
    });
    let slot = |metric: &str, name: &str| value(&scrape, metric, &[("slot_name", name)]).unwrap_or_else(|| panic!("no {metric} for {name}:\n{scrape}"));

    // the live lease: an hour to go, nothing to do
    // the time the test took since the lease bounds what is left of its hour, however slow
    let left = slot("pgslotguard_slot_lease_expires_in_seconds", "live");
    let since = leased.elapsed().as_secs_f64();
    assert!(left <= 3600.0 && left >= 3600.0 - since - 1.0, "{left} s left {since:.1} s after a lease of an hour");
    assert_eq!(value(&scrape, "pgslotguard_slot_leased", &[("slot_name", "live"), ("next_action", "none")]), Some(1.0), "{scrape}");
    assert_eq!(slot("pgslotguard_slot_in_scope", "live"), 1.0);
    assert_eq!(slot("pgslotguard_slot_active", "live"), 0.0);
    assert_eq!(slot("pgslotguard_slot_over_limit", "live"), 0.0);
    let retained = slot("pgslotguard_slot_retained_bytes", "live");
    let sql_retained = c.count("SELECT retained_bytes FROM pgslotguard.slots WHERE slot_name = 'live'") as f64;
    assert!(retained >= 2e6 && (retained - sql_retained).abs() < 1e6, "{retained} vs {sql_retained}");
    // the lapsed one: expired (zero or negative time left), over its limit, to be dropped
    // (would_drop: the guard runs in dry run so far)
    assert!(slot("pgslotguard_slot_lease_expires_in_seconds", "lapsed") <= 0.0);
    assert_eq!(value(&scrape, "pgslotguard_slot_over_limit", &[("slot_name", "lapsed"), ("next_action", "would_drop")]), Some(1.0), "{scrape}");
    // a leased logical slot: its type, plugin and database as labels
    assert_eq!(
        value(&scrape, "pgslotguard_slot_leased", &[("slot_name", "cdc"), ("slot_type", "logical"), ("plugin", "test_decoding"), ("database", "postgres")]),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(value(&scrape, "pgslotguard_slot_leased", &[("slot_name", "live"), ("slot_type", "physical"), ("plugin", "")]), Some(1.0), "{scrape}");
    // the unleased one: out of scope, no lease expiry series
    assert_eq!(slot("pgslotguard_slot_in_scope", "unleased"), 0.0);
    assert_eq!(slot("pgslotguard_slot_leased", "unleased"), 0.0);
    assert_eq!(value(&scrape, "pgslotguard_slot_lease_expires_in_seconds", &[("slot_name", "unleased")]).map(|v| v.is_nan()), Some(true));
    // the horizon the logical slot holds, in transactions (it only grows after the scrape)
    let held = slot("pgslotguard_slot_xmin_age", "sub");
    let sql_held = c.count("SELECT catalog_xmin_age FROM pgslotguard.slots WHERE slot_name = 'sub'") as f64;
    assert!(held > 0.0 && held <= sql_held, "{held} vs {sql_held}");
    assert_eq!(slot("pgslotguard_slot_xmin_age", "live"), 0.0, "a backup slot holds no horizon");
    assert!(value(&scrape, "pgslotguard_worker_oldest_xmin_age", &[]).unwrap() >= held);
    assert_eq!(value(&scrape, "pgslotguard_worker_max_xmin_age", &[]), Some(-1.0));
    assert_eq!(value(&scrape, "pgslotguard_worker_autovacuum_freeze_max_age", &[]), Some(200e6));
    // the worker
    assert_eq!(value(&scrape, "pgslotguard_worker_up", &[]), Some(1.0));
    assert_eq!(value(&scrape, "pgslotguard_worker_naptime_seconds", &[]), Some(1.0));
    assert!(value(&scrape, "pgslotguard_worker_passes_total", &[]).unwrap() >= 1.0);
    assert_eq!(value(&scrape, "pgslotguard_worker_errors_total", &[]), Some(0.0));
    assert_eq!(value(&scrape, "pgslotguard_worker_drops_total", &[]), Some(0.0));
    assert!(value(&scrape, "pgslotguard_worker_seconds_since_last_pass", &[]).unwrap() < 5.0);
    assert!(value(&scrape, "pgslotguard_worker_wal_fs_total_bytes", &[]).unwrap() > 0.0);
    assert!(scrape.contains("# TYPE pgslotguard_worker_passes_total counter"), "{scrape}");

    // The guard acts: the lapsed slot is dropped and disappears from the metrics.
    c.set_policy(&[("pgslotguard.dry_run", "off")]);
    c.wait_for("the lapsed slot to be dropped", WAIT, |c| c.dropped("lapsed").then_some(()));
    let after = c.wait_for("a scrape without the dropped slot", Duration::from_secs(30), |_| {
        let s = e.scrape();
        (s.contains("pgslotguard_worker_up") && !s.contains("slot_name=\"lapsed\"")).then_some(s)
    });
    assert_eq!(value(&after, "pgslotguard_worker_drops_total", &[]), Some(1.0), "{after}");
    assert!(value(&after, "pgslotguard_slot_leased", &[("slot_name", "live")]).is_some());
}

/// `free_port` hands out a port nothing listens on, and another process (another test's
/// server or client connection) can take it before the exporter binds it: the exporter then
/// starts on another port, as a cluster does (tests/faults.rs), instead of the test failing.
#[test]
fn an_exporter_whose_port_was_taken_meanwhile_starts_on_another() {
    let c = with_extension("exportertaken", &[]);
    let taken = free_port();
    let _meanwhile = std::net::TcpListener::bind(("127.0.0.1", taken)).expect("the port free_port chose is free");
    let e = Exporter::start_on(&c, taken);
    assert_ne!(e.port, taken);
    assert!(address_in_use(&e.log()), "the first start did not fail on the taken port:\n{}", e.log());
    c.wait_for("the exporter on its second port to serve pgslotguard's series", WAIT, |_| {
        e.scrape().contains("pgslotguard_worker_up").then_some(())
    });
}
