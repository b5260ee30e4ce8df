//! Shared test harness: a real daemon in-process on 127.0.0.1:0 with a temporary data directory, and helpers to
//! poll for a condition with a deadline (never a bare sleep).
#![allow(dead_code)]

pub mod pg;

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker::clock::{Clock, ManualClock, SystemClock};
use broker::config::Config;
use broker::server::ServerHandle;
use broker_client::proto::{map_get, Value};
use broker_client::{Client, ConnectOptions};
use tempfile::TempDir;

/// A daemon running in this process.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub dir: TempDir,
    pub config: Config,
    /// Set when the server runs on a manual clock.
    pub clock: Option<ManualClock>,
}

/// A config for tests: port 0, the given data dir, a fast tick.
pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: Some(String::new()), // no HTTP listener unless a test asks for one
        data_dir: dir.to_path_buf(),
        tick_ms: 10,
        ..Config::default()
    }
}

impl TestServer {
    /// A daemon on the wall clock with default settings.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}, false).await
    }

    /// A daemon on a manual clock (starting at a fixed time) with default settings.
    pub async fn start_manual() -> TestServer {
        Self::start_with(|_| {}, true).await
    }

    /// A daemon with settings changed by `tweak`, on a manual clock if `manual`.
    ///
    /// With `BROKER_TEST_PG` set (a PostgreSQL URL, as `scripts/test` sets it for a second run of the suites that
    /// do not need the single node), a wall-clock daemon runs over that database, in a schema of its own.
    pub async fn start_with(tweak: impl FnOnce(&mut Config), manual: bool) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        if !manual {
            config.store = pg_schema_url();
        }
        tweak(&mut config);
        let clock = manual.then(|| ManualClock::new(1_700_000_000_000));
        let handle = launch(&config, clock.clone()).await;
        TestServer { handle: Some(handle), dir, config, clock }
    }

    /// The address it listens on.
    pub fn addr(&self) -> String {
        self.handle.as_ref().expect("running").addr().to_string()
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        ConnectOptions::new(self.addr()).name("test").connect().await.expect("connect")
    }

    /// The manual clock (panics on a wall-clock server).
    pub fn clock(&self) -> &ManualClock {
        self.clock.as_ref().expect("server started with a manual clock")
    }

    /// Runs the maintenance tick now (schedules, lease deadlines, TTLs) instead of waiting for the ticker.
    pub fn tick(&self) {
        self.handle.as_ref().expect("running").store().tick().expect("tick");
    }

    /// Shuts down cleanly and starts again on the same data directory (and clock). The port changes.
    pub async fn restart(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await.expect("clean shutdown");
        }
        self.handle = Some(launch(&self.config, self.clock.clone()).await);
    }

    /// Stops the server cleanly, keeping the data directory for [`TestServer::start_again`].
    pub async fn stop_keep_dir(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await.expect("clean shutdown");
        }
    }

    /// Starts the server again on its data directory after [`TestServer::stop_keep_dir`].
    pub async fn start_again(&mut self) {
        assert!(self.handle.is_none(), "already running");
        self.handle = Some(launch(&self.config, self.clock.clone()).await);
    }

    /// Stops the server cleanly.
    pub async fn stop(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await.expect("clean shutdown");
        }
    }
}

/// With `BROKER_TEST_PG`: that database, in a new schema (tests do not see each other's tasks).
pub fn pg_schema_url() -> Option<String> {
    let base = std::env::var("BROKER_TEST_PG").ok().filter(|url| !url.is_empty())?;
    let schema = format!("t_{:016x}", rand_u64());
    let created = Command::new("psql")
        .args([base.as_str(), "-qc", &format!("CREATE SCHEMA {schema}")])
        .output()
        .expect("run psql");
    assert!(created.status.success(), "CREATE SCHEMA: {}", String::from_utf8_lossy(&created.stderr));
    let joiner = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{joiner}options=-csearch_path%3D{schema}"))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    hasher.finish()
}

async fn launch(config: &Config, clock: Option<ManualClock>) -> ServerHandle {
    let clock: Arc<dyn Clock> = match clock {
        Some(c) => Arc::new(c),
        None => Arc::new(SystemClock),
    };
    broker::server::start(config.clone(), clock).await.expect("server starts")
}

/// Polls `check` every few milliseconds until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The real daemon binary in a child process, killed with SIGKILL when dropped.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
}

impl Daemon {
    /// `broker serve` on 127.0.0.1:0 with `data_dir` and default settings.
    pub fn spawn(data_dir: &std::path::Path) -> Daemon {
        Self::spawn_with(data_dir, &[])
    }

    /// `broker serve` on 127.0.0.1:0 with `data_dir` and `extra` arguments (`--config FILE`, `--fsync ...`).
    pub fn spawn_with(data_dir: &std::path::Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("BROKER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn broker serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read the listening line");
        let addr = line.trim().strip_prefix("broker listening on ").expect("listening line").to_string();
        Daemon { child, addr }
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        ConnectOptions::new(self.addr.clone()).connect().await.expect("connect")
    }

    /// SIGKILL, and wait for the process to end.
    pub fn kill_9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking raw connection speaking frames by hand.
pub struct Raw {
    pub stream: std::net::TcpStream,
}

impl Raw {
    pub fn connect(addr: &str) -> Raw {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { stream }
    }

    pub fn send_bytes(&mut self, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        std::io::Write::write_all(&mut self.stream, &frame).unwrap();
    }

    pub fn send(&mut self, value: &Value) {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, value).unwrap();
        self.send_bytes(&bytes);
    }

    pub fn recv_bytes(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        std::io::Read::read_exact(&mut self.stream, &mut len).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
        std::io::Read::read_exact(&mut self.stream, &mut payload).unwrap();
        payload
    }

    pub fn recv(&mut self) -> Value {
        rmpv::decode::read_value(&mut &self.recv_bytes()[..]).unwrap()
    }

    /// Sends a request and returns (ok, the error code if any, the whole reply).
    pub fn call(&mut self, value: Value) -> (bool, Option<String>, Value) {
        self.send(&value);
        let reply = self.recv();
        let map = reply.as_map().expect("reply is a map").clone();
        let ok = map_get(&map, "ok").and_then(Value::as_bool).expect("ok field");
        let code = map_get(&map, "error")
            .and_then(|e| e.as_map().and_then(|m| map_get(m, "code")).and_then(Value::as_str).map(str::to_string));
        (ok, code, reply)
    }

    pub fn hello(&mut self) {
        let (ok, code, _) = self.call(request(1, "hello", vec![("version", Value::from(1))]));
        assert!(ok, "hello failed: {code:?}");
    }
}

pub fn request(id: u64, op: &str, fields: Vec<(&str, Value)>) -> Value {
    let mut map = vec![(Value::from("id"), Value::from(id)), (Value::from("op"), Value::from(op))];
    map.extend(fields.into_iter().map(|(k, v)| (Value::from(k), v)));
    Value::Map(map)
}

/// A plain HTTP/1.1 request to a daemon's HTTP listener (`headers`: whole lines, each ending in CRLF); returns
/// (status, headers, body).
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\n{host}{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        // A test may send its own Host.
        host = if headers.contains("Host:") { String::new() } else { format!("Host: {addr}\r\n") },
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_string(), body.to_string())
}
