# Sourced by bench/core, bench/b8, bench/b9 and bench/b10: the work directory and the
# record of what a part started, so that its EXIT trap stops every cluster and unmounts
# every filesystem even when the part fails half-way. The record is kept in files, not in
# shell arrays: the parts start clusters inside functions that run in command
# substitutions ($(b7 floor)), whose variables never reach the trap in the parent shell.
#
#   bench_work NAME      make $work (/tmp/pgslotguard-NAME.XXXXXX, readable by postgres), set the trap
#   bench_started DIR    a cluster (scripts/pgcluster's DIR) to stop at exit
#   bench_mounted DIR    a mount point to unmount at exit
#   bench_build          cargo pgrx install --release for $PG_MAJOR (15: the host's target dir)

bench_work() {
  work=$(mktemp -d "/tmp/pgslotguard-$1.XXXXXX")
  chmod 755 "$work"; chown postgres:postgres "$work"
  : >"$work/.clusters"; : >"$work/.mounts"
  trap bench_cleanup EXIT
}
bench_started() { echo "$1" >>"$work/.clusters"; }
bench_mounted() { echo "$1" >>"$work/.mounts"; }
bench_cleanup() {
  local c m
  # Clusters last started first (a standby before its primary); a stopped one is skipped.
  for c in $(tac "$work/.clusters" 2>/dev/null); do bash scripts/pgcluster stop "$c" || true; done
  for m in $(cat "$work/.mounts" 2>/dev/null); do
    if awk -v m="$m" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; then
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
}

# Build and install the release library for $PG_MAJOR where this runs (the host for 15, a
# Debian root for 17 and 18), each version in a target dir of its own as scripts/suite does.
bench_build() {
  local log
  # The release build goes into the server's own directories, where a test run of this
  # version installs its test build: one at a time (scripts/suite's lock), held by this
  # bench part until it exits.
  mkdir -p /run/lock
  exec 9>"/run/lock/pgslotguard-pg$PG_MAJOR.lock"
  if ! flock -n 9; then
    echo "bench: a test run for PostgreSQL $PG_MAJOR holds its lock; waiting for it" >&2
    flock 9
  fi
  if [ "$PG_MAJOR" != 15 ]; then export CARGO_TARGET_DIR=$PWD/target/pg$PG_MAJOR; fi
  bash scripts/pgrx-init "$PG_MAJOR" >&2
  log=$(mktemp /tmp/pgslotguard-build.XXXXXX)
  . "$(dirname "${BASH_SOURCE[0]}")/../scripts/rust-env"
  if ! cargo pgrx install --release --pg-config "/usr/lib/postgresql/$PG_MAJOR/bin/pg_config" >"$log" 2>&1; then
    tail -30 "$log" >&2; rm -f "$log"
    echo "bench: the release build for PostgreSQL $PG_MAJOR failed" >&2
    return 1
  fi
  rm -f "$log"
}
