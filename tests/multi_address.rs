//! Clients with several addresses (`a:7420,b:7420`, daemons over one shared store): a connect skips an address
//! that does not answer, a new connect after a daemon stops reaches another, and the worker runtime leaves a
//! daemon whose connection broke, or that answers `store_unavailable`, for the next address.
//!
//! The two daemons here have data directories of their own (no shared store), so the tests only look at where
//! the client goes and at work done on the daemon it reached. `store_unavailable` comes from a fake daemon that
//! says hello and then refuses every lease with it. Every wait polls with a deadline.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker_client::proto::{TaskSpec, Value};
use broker_client::worker::ShutdownHandle;
use broker_client::{Client, ConnectOptions, Error, ErrorKind, Task, TaskFailure, TaskState, Worker};
use common::{eventually, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

/// An address nothing listens on: a port that was free a moment ago.
fn closed_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// A worker running `add` with test-friendly timings, on its own task.
fn spawn_worker(options: ConnectOptions) -> (ShutdownHandle, JoinHandle<Result<(), Error>>) {
    async fn add(task: Task<(i64, i64)>) -> Result<i64, TaskFailure> {
        Ok(task.args.0 + task.args.1)
    }
    let worker = Worker::builder(options.name("multi-address-worker"))
        .poll_wait(Duration::from_millis(100))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .grace_period(Duration::from_secs(5))
        .register("add", add)
        .build();
    let handle = worker.shutdown_handle();
    (handle, tokio::spawn(async move { worker.run_until(std::future::pending()).await }))
}

/// Enqueues `add(a, b)` on `client` and waits for its result there.
async fn add_runs_on(client: &Client, a: i64, b: i64) {
    let mut spec = TaskSpec::new("add");
    spec.args = vec![Value::from(a), Value::from(b)];
    let id = client.enqueue(spec).await.expect("enqueue").id;
    let info = eventually(&format!("task {id} done"), WAIT, || async {
        let info = client.get(&id).await.expect("get");
        info.state.is_terminal().then_some(info)
    })
    .await;
    assert_eq!(info.state, TaskState::Success, "{info:?}");
    assert_eq!(info.result, Some(Value::from(a + b)));
}

#[tokio::test]
async fn a_list_whose_first_address_is_closed_connects_to_the_second() {
    let server = TestServer::start().await;
    let dead = closed_port();
    let options = ConnectOptions::new(format!("tcp://{dead},{}", server.addr())).name("test");
    let client = options.clone().connect().await.expect("connect through the second address");
    assert_eq!(client.addr(), server.addr());
    let mut spec = TaskSpec::new("noop");
    spec.queue = Some("multi".to_string());
    let id = client.enqueue(spec).await.expect("enqueue").id;
    assert_eq!(client.get(&id).await.expect("get").state, TaskState::Pending);

    // The next connect starts past the address that failed: straight to the one that answered.
    let again = options.connect().await.expect("connect again");
    assert_eq!(again.addr(), server.addr());
    server.stop().await;
}

#[tokio::test]
async fn a_single_address_behaves_as_before() {
    let dead = closed_port();
    let error = ConnectOptions::new(dead.clone()).connect().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect);
    assert!(error.to_string().starts_with(&format!("connect to {dead}: ")), "{error}");
    assert!(!error.to_string().contains("any of"), "{error}");
}

#[tokio::test]
async fn after_the_first_daemon_stops_a_new_connection_from_the_same_options_reaches_the_other() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    let (first_addr, second_addr) = (first.addr(), second.addr());
    let options = ConnectOptions::new(format!("{first_addr},{second_addr}")).name("test");
    let client = options.clone().connect().await.expect("connect");
    assert_eq!(client.addr(), first_addr, "the list is tried in order");

    first.stop().await;
    eventually("the old connection to be closed", WAIT, || async { client.is_closed().then_some(()) }).await;
    let client = options.clone().connect().await.expect("connect to the survivor");
    assert_eq!(client.addr(), second_addr);
    let mut spec = TaskSpec::new("noop");
    spec.queue = Some("multi".to_string());
    let id = client.enqueue(spec).await.expect("enqueue").id;
    assert_eq!(client.get(&id).await.expect("get").state, TaskState::Pending);

    // With both gone, the error names every address tried.
    second.stop().await;
    let error = options.connect().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect);
    let message = error.to_string();
    assert!(message.contains(&format!("connect to {first_addr}:")), "{message}");
    assert!(message.contains(&format!("connect to {second_addr}:")), "{message}");
}

#[tokio::test]
async fn the_worker_reconnects_to_the_next_address_when_its_daemon_stops() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    let options = ConnectOptions::new(format!("{},{}", first.addr(), second.addr()));
    let (stop, run) = spawn_worker(options);
    let on_first = first.client().await;
    add_runs_on(&on_first, 1, 2).await;
    drop(on_first);

    first.stop().await;
    let on_second = second.client().await;
    add_runs_on(&on_second, 20, 22).await;
    stop.graceful();
    run.await.unwrap().unwrap();
    second.stop().await;
}

/// A daemon that says hello and refuses every other request with `store_unavailable`, as a daemon whose shared
/// store is down does. Counts the connections and the lease requests it gets.
struct StorelessDaemon {
    addr: String,
    connections: Arc<AtomicUsize>,
    leases: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl StorelessDaemon {
    async fn start() -> StorelessDaemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let leases = Arc::new(AtomicUsize::new(0));
        let (counted, leased) = (connections.clone(), leases.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(Self::serve(stream, leased.clone()));
            }
        });
        StorelessDaemon { addr, connections, leases, accept }
    }

    async fn serve(mut stream: tokio::net::TcpStream, leases: Arc<AtomicUsize>) {
        let text = |s: &str| Value::from(s);
        loop {
            let Ok(len) = stream.read_u32().await else { return };
            let mut frame = vec![0; len as usize];
            if stream.read_exact(&mut frame).await.is_err() {
                return;
            }
            let request = rmpv::decode::read_value(&mut frame.as_slice()).expect("a msgpack request");
            let field = |name: &str| {
                request.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name))).map(|(_, v)| v.clone())
            };
            let id = field("id").unwrap_or(Value::Nil);
            let op = field("op").and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let reply = if op == "hello" {
                let body = Value::Map(vec![
                    (text("version"), Value::from(1)),
                    (text("server"), text("storeless 0")),
                    (text("max_frame"), Value::from(16 * 1024 * 1024)),
                    (text("role"), text("admin")),
                ]);
                Value::Map(vec![(text("id"), id), (text("ok"), Value::from(true)), (text("body"), body)])
            } else {
                if op == "lease" {
                    leases.fetch_add(1, Ordering::SeqCst);
                }
                let error = Value::Map(vec![
                    (text("code"), text("store_unavailable")),
                    (text("message"), text("the shared store cannot be reached")),
                ]);
                Value::Map(vec![(text("id"), id), (text("ok"), Value::from(false)), (text("error"), error)])
            };
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &reply).unwrap();
            if stream.write_u32(bytes.len() as u32).await.is_err() || stream.write_all(&bytes).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for StorelessDaemon {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[tokio::test]
async fn the_worker_leaves_a_daemon_that_answers_store_unavailable_for_the_next_address() {
    let storeless = StorelessDaemon::start().await;
    let server = TestServer::start().await;
    let (stop, run) = spawn_worker(ConnectOptions::new(format!("{},{}", storeless.addr, server.addr())));
    let client = server.client().await;
    add_runs_on(&client, 2, 3).await;
    assert!(storeless.leases.load(Ordering::SeqCst) >= 1, "the worker went to the first address first");
    stop.graceful();
    run.await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn with_a_single_address_store_unavailable_is_retried_on_the_same_connection() {
    let storeless = StorelessDaemon::start().await;
    let (stop, run) = spawn_worker(ConnectOptions::new(storeless.addr.clone()));
    eventually("several refused leases", WAIT, || async {
        (storeless.leases.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    assert_eq!(storeless.connections.load(Ordering::SeqCst), 1, "no reconnect");
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_cli_takes_a_list_in_addr() {
    let server = TestServer::start().await;
    let (dead, other_dead) = (closed_port(), closed_port());
    let cli = |addr: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["enqueue", "noop", "--queue", "multi", "--addr", &addr])
            .env_remove("BROKER_TOKEN")
            .output()
            .await
            .unwrap()
    };
    let output = cli(format!("tcp://{dead},{}", server.addr())).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let id = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert_eq!(server.client().await.get(&id).await.expect("get").state, TaskState::Pending);

    let output = cli(format!("{dead},{other_dead}")).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("connect to {dead}:")) && stderr.contains(&format!("connect to {other_dead}:")),
        "{stderr}"
    );
    server.stop().await;
}
