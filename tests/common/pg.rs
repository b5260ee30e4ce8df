//! A real 3-server PostgreSQL 15 cluster on loopback for integration tests: a primary and two synchronous
//! standbys, built by `scripts/pg-cluster` in a temporary directory (see that script's header for what it sets
//! up and why). This module owns the cluster's lifetime: `Drop` stops every server, so no postgres process
//! outlives a test. It never leaves a wait unbounded: the script and every `psql` it runs have deadlines.
//!
//! Only std and tempfile: it is compiled into every integration test that includes `common`.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Exit code of `scripts/pg-cluster` when PostgreSQL 15 is missing and cannot be installed.
const EXIT_UNAVAILABLE: i32 = 3;
/// Exit code of `scripts/pg-cluster start` when one of its three ports is taken.
const EXIT_PORT_IN_USE: i32 = 4;
/// Base ports are drawn from here: below Linux's ephemeral range (32768-60999), so a port the kernel hands to
/// some client socket cannot collide with one we picked.
const BASE_PORTS: std::ops::Range<u16> = 20000..32700;
/// How many base ports `start` tries before giving up.
const START_ATTEMPTS: usize = 5;
/// `start` may install Debian's postgresql-15 first, which can take minutes on a cold machine.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// stop, stop-primary, promote (which itself waits 30 s at most for the promotion and 10 s for a follower).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// One `psql` statement.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers, by index: 0 is `primary`, 1 is `standby1`, 2 is `standby2` (the script's names).
pub const SERVER_NAMES: [&str; 3] = ["primary", "standby1", "standby2"];

/// A running cluster. The data directories live in a temporary directory removed on drop, after the servers
/// are stopped.
pub struct PgCluster {
    dir: TempDir,
    base_port: u16,
}

impl PgCluster {
    /// Builds and starts the cluster on a free base port; returns once both standbys are synchronous.
    ///
    /// `Err` carries the script's message when PostgreSQL 15 is not installed and cannot be installed here, so
    /// the caller can skip the test with it. Any other failure panics: it is a broken test environment or a
    /// broken script, not a reason to skip.
    pub fn start() -> Result<PgCluster, String> {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let base_port = free_base_port();
            // The script chowns this directory to postgres when we are root; a directory of its own (not a
            // subdirectory) because TempDir's are closed (0700) to other users.
            let dir = tempfile::Builder::new()
                .prefix("pg-cluster-")
                .tempdir()
                .expect("create a temporary directory for the cluster");
            let output = run_with_timeout(
                Command::new(script_path()).arg("start").arg(dir.path()).arg(base_port.to_string()),
                START_TIMEOUT,
            );
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            match output.status.code() {
                Some(0) => {
                    let cluster = PgCluster { dir, base_port };
                    let stdout = String::from_utf8_lossy(&output.stdout);
                    for (name, url) in SERVER_NAMES.iter().zip(cluster.url_list()) {
                        let line = format!("{name} {url}");
                        assert!(
                            stdout.lines().any(|l| l == line),
                            "pg-cluster start printed no line {line:?}:\n{stdout}"
                        );
                    }
                    return Ok(cluster);
                }
                Some(EXIT_UNAVAILABLE) => return Err(stderr),
                Some(EXIT_PORT_IN_USE) => last_error = stderr,
                _ => {
                    stop_dir(dir.path());
                    panic!("pg-cluster start failed ({}):\n{stderr}", output.status);
                }
            }
        }
        panic!("pg-cluster start found no free base port in {START_ATTEMPTS} attempts; last: {last_error}");
    }

    /// The directory holding the three data directories and their logs (`primary.log`, ...).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The port of server `n` (0 primary, 1 standby1, 2 standby2).
    pub fn port(&self, n: usize) -> u16 {
        assert!(n < SERVER_NAMES.len(), "no server {n}: 0 is the primary, 1 and 2 the standbys");
        self.base_port + n as u16
    }

    /// The URL of server `n`: `postgres://broker@127.0.0.1:PORT/broker`.
    pub fn url(&self, n: usize) -> String {
        format!("postgres://broker@127.0.0.1:{}/broker", self.port(n))
    }

    /// The URL of the server started as primary (server 0). After `promote(n)`, the primary is `url(n)`.
    pub fn primary_url(&self) -> String {
        self.url(0)
    }

    /// The URLs of the servers started as standbys (servers 1 and 2).
    pub fn standby_urls(&self) -> Vec<String> {
        vec![self.url(1), self.url(2)]
    }

    /// All three URLs, primary first.
    pub fn url_list(&self) -> Vec<String> {
        (0..SERVER_NAMES.len()).map(|n| self.url(n)).collect()
    }

    /// One libpq-style URL naming all three servers, which tokio-postgres and libpq understand:
    /// `postgres://broker@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/broker?target_session_attrs=read-write`.
    /// A client connects to whichever server accepts writes, so it finds a promoted standby by itself.
    pub fn multi_host_url(&self) -> String {
        let hosts: Vec<String> = (0..SERVER_NAMES.len()).map(|n| format!("127.0.0.1:{}", self.port(n))).collect();
        format!("postgres://broker@{}/broker?target_session_attrs=read-write", hosts.join(","))
    }

    /// Crashes the current primary (an immediate stop: no shutdown checkpoint, like kill -9).
    pub fn stop_primary(&self) {
        self.run(&["stop-primary"]);
    }

    /// Promotes standby `n` (1 or 2) once the primary is down; returns when it accepts writes. The other
    /// standby, if running, is pointed at it and follows asynchronously; the new primary runs with
    /// `synchronous_standby_names=''` so it accepts writes alone.
    pub fn promote(&self, n: usize) {
        assert!(n == 1 || n == 2, "promote(n) takes a standby: 1 or 2, not {n}");
        self.run(&["promote", SERVER_NAMES[n]]);
    }

    /// Promotes the standby that received the most WAL (it holds every acknowledged commit) and returns its
    /// index.
    pub fn promote_most_advanced(&self) -> usize {
        let stdout = self.run(&["promote", "auto"]);
        let url = stdout
            .lines()
            .find_map(|l| l.strip_prefix("primary "))
            .unwrap_or_else(|| panic!("pg-cluster promote auto printed no primary: {stdout}"));
        (1..SERVER_NAMES.len())
            .find(|&n| self.url(n) == url)
            .unwrap_or_else(|| panic!("pg-cluster promoted an unknown server: {url}"))
    }

    /// The script's `status`: one line per server and the primary's pg_stat_replication.
    pub fn status(&self) -> String {
        self.run(&["status"])
    }

    /// Runs one SQL command with `psql` as broker on database broker of server `n`; returns the rows in
    /// unaligned form (`|` between columns, one row a line), or psql's error.
    pub fn psql(&self, n: usize, sql: &str) -> Result<String, String> {
        let output = run_with_timeout(
            Command::new(psql_path())
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .arg("-p")
                .arg(self.port(n).to_string())
                .args(["-U", "broker", "-d", "broker", "-c", sql])
                .env("PGCONNECT_TIMEOUT", "5"),
            PSQL_TIMEOUT,
        );
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    }

    /// Polls `psql(n, sql)` until it returns `expected` or `timeout` passes; returns the last answer on timeout.
    pub fn wait_for_psql(&self, n: usize, sql: &str, expected: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.psql(n, sql);
            if answer.as_deref() == Ok(expected) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("server {n} answered {answer:?} to {sql:?} for {timeout:?}, not {expected:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process ids of the running postmasters (first line of each `postmaster.pid`).
    pub fn postmaster_pids(&self) -> Vec<u32> {
        SERVER_NAMES
            .iter()
            .filter_map(|name| std::fs::read_to_string(self.dir().join(name).join("postmaster.pid")).ok())
            .filter_map(|pid_file| pid_file.lines().next()?.trim().parse().ok())
            .collect()
    }

    fn run(&self, args: &[&str]) -> String {
        let output = run_with_timeout(
            Command::new(script_path()).arg(args[0]).arg(self.dir()).args(&args[1..]),
            COMMAND_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "pg-cluster {} failed ({}):\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        stop_dir(self.dir.path());
    }
}

/// Stops every server of the cluster in `dir` (immediate), ignoring those not running.
fn stop_dir(dir: &Path) {
    let output = run_with_timeout(Command::new(script_path()).arg("stop").arg(dir), COMMAND_TIMEOUT);
    if !output.status.success() {
        eprintln!(
            "pg-cluster stop {} failed ({}): {}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-cluster")
}

fn psql_path() -> PathBuf {
    let debian = Path::new("/usr/lib/postgresql/15/bin/psql");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("/usr/bin/psql")
    }
}

/// A random base port whose three ports are free now (the script reports a race with exit code 4).
fn free_base_port() -> u16 {
    loop {
        let random = RandomState::new().build_hasher().finish();
        let span = (BASE_PORTS.end - BASE_PORTS.start) as u64;
        let base = BASE_PORTS.start + (random % span) as u16;
        let all_free = (0..3).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
}

/// Runs `command` with its output captured; kills it (and fails the test) when it outlives `timeout`.
fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe while we wait for it.
    let mut stdout_pipe = child.stdout.take().expect("stdout is piped");
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stdout_reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut bytes);
        bytes
    });
    let stderr_reader = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{command:?} did not finish within {timeout:?}");
            }
            Err(e) => panic!("waiting for {command:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout_reader.join().unwrap_or_default(),
        stderr: stderr_reader.join().unwrap_or_default(),
    }
}
