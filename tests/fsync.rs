//! A failed fsync of the store is a PANIC, as PostgreSQL's own files are treated
//! (data_sync_retry = off): after a failed fsync the kernel may have dropped the pages and
//! cleared the error, so what is on disk is unknown while shared memory says the write
//! happened; the restart reads the truth from the files. The failure is real: the server
//! runs with fsync = on under a small LD_PRELOAD shim (compiled here) that makes fsync of
//! one store record's file fail with EIO while a trigger file names that record.

mod common;
use common::*;
use std::process::Command;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int fails(int fd) {
    const char *trigger = getenv("PGSG_FAIL_FSYNC_TRIGGER");
    char link[64], path[4096], name[128], want[256];
    ssize_t n;
    FILE *f;
    if (!trigger || !(f = fopen(trigger, "r"))) return 0;
    n = fread(name, 1, sizeof name - 1, f);
    fclose(f);
    if (n <= 0) return 0;
    name[n] = 0;
    snprintf(want, sizeof want, "/pg_slotguard/slots/%s", name);
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, want) != NULL;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int)) dlsym(RTLD_NEXT, "fsync");
    if (fails(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int)) dlsym(RTLD_NEXT, "fdatasync");
    if (fails(fd)) { errno = EIO; return -1; }
    return real(fd);
}
"#;

/// Start `c` with the shim preloaded (the postmaster and every child inherit it).
fn start_with_shim(c: &Cluster, shim: &std::path::Path, trigger: &std::path::Path) {
    let out = pg_cmd("env")
        .arg(format!("LD_PRELOAD={}", shim.display()))
        .arg(format!("PGSG_FAIL_FSYNC_TRIGGER={}", trigger.display()))
        .arg(bin("pg_ctl"))
        .args(["-w", "-t", "60", "-D"])
        .arg(&c.data)
        .arg("-l")
        .arg(c.log_path())
        .arg("start")
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_failed_fsync_of_the_store_panics_and_the_restart_reads_the_truth_from_the_files() {
    let c = Cluster::init("fsync_fail", &["fsync = on"]);
    let src = c.dir.join("failfsync.c");
    let shim = c.dir.join("failfsync.so");
    let trigger = c.dir.join("fail-now");
    std::fs::write(&src, SHIM).unwrap();
    let cc = Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o"]).arg(&shim).arg(&src).arg("-ldl").output().unwrap();
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    let _ = Command::new("chmod").args(["a+rx"]).arg(&shim).status();
    start_with_shim(&c, &shim, &trigger);
    c.exec("CREATE EXTENSION pgslotguard");
    c.exec("SELECT * FROM backup_slot_lease('kept', '1h', holder => 'before the failure')");
    c.wait_passes(2);

    // The next fsync of boom's record fails: the lease call's durable write PANICs the server.
    std::fs::write(&trigger, b"boom").unwrap();
    let before = c.log_len();
    let err = c.try_sql("SELECT * FROM backup_slot_lease('boom', '1h')").expect_err("the server went down");
    // The client hears the PANIC itself, or only that the connection went.
    assert!(err.as_db_error().is_none_or(|d| d.severity() == "PANIC"), "{err:?}");
    std::fs::remove_file(&trigger).unwrap();
    c.wait_for("the PANIC and the restart", WAIT, |c| {
        let log = c.log();
        let tail = log.get(before..).unwrap_or("");
        (tail.contains("PANIC:  pgslotguard: could not write file \"pg_slotguard/slots/boom\": could not fsync")
            && tail.contains("database system is ready to accept connections"))
        .then_some(())
    });
    c.wait_for("a connection after the restart", WAIT, |c| c.try_sql("SELECT 1").ok().map(|_| ()));
    c.wait_passes(2);
    // The failed lease never existed, and left no slot; the earlier one is whole.
    assert!(!c.slot_exists("boom") && !c.leased("boom"), "{}", c.describe());
    assert_eq!(c.text("SELECT holder FROM pgslotguard.leases WHERE slot_name = 'kept'"), "before the failure", "{}", c.describe());

    // The same for a renewal: it never happened.
    std::fs::write(&trigger, b"kept").unwrap();
    let before = c.log_len();
    assert!(c.try_sql("SELECT backup_slot_renew('kept', '5h')").is_err());
    std::fs::remove_file(&trigger).unwrap();
    c.wait_for("the second PANIC and the restart", WAIT, |c| {
        let log = c.log();
        let tail = log.get(before..).unwrap_or("");
        (tail.contains("PANIC:") && tail.contains("database system is ready to accept connections")).then_some(())
    });
    c.wait_for("a connection after the restart", WAIT, |c| c.try_sql("SELECT 1").ok().map(|_| ()));
    assert_eq!(
        c.text("SELECT (expires_at < now() + interval '2 hours')::text FROM pgslotguard.leases WHERE slot_name = 'kept'"),
        "true",
        "{}",
        c.describe()
    );
    assert!(!c.log().contains("is damaged"), "{}", c.log_tail(20));
}
