//! The worker runtime against a real daemon: slots, heartbeats, redelivery, failures, retries with context,
//! revocation, shutdown, reconnection, and request context carried from an HTTP app into a task.
//!
//! Handlers that must stay running wait on a [`Gate`] the test opens; every wait for an outcome polls with a
//! deadline. Nothing here measures time.

mod common;

#[allow(dead_code)]
#[path = "../examples/http_app.rs"]
mod http_app;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use broker::clock::SystemClock;
use broker_client::proto::{TaskInfo, TaskSpec, Value};
use broker_client::worker::{ShutdownHandle, WorkerBuilder, INVALID_ARGUMENTS, PANIC, UNKNOWN_TASK};
use broker_client::{Client, ConnectOptions, Error, Producer, Task, TaskFailure, TaskState, Worker};
use common::{eventually, TestServer};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

/// A barrier handlers wait at until the test opens it.
#[derive(Clone)]
struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    fn new() -> Gate {
        Gate(Arc::new(watch::channel(false).0))
    }

    fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// A worker for `server` with test-friendly timings: short long-polls and reconnect delays.
fn worker(server: &TestServer) -> WorkerBuilder {
    Worker::builder(ConnectOptions::new(server.addr()).name("test-worker"))
        .poll_wait(Duration::from_millis(100))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .grace_period(Duration::from_secs(10))
}

/// Runs a worker on its own task; returns its shutdown handle and the task.
fn spawn(worker: Worker) -> (ShutdownHandle, JoinHandle<Result<(), Error>>) {
    let handle = worker.shutdown_handle();
    let task = tokio::spawn(async move { worker.run_until(std::future::pending()).await });
    (handle, task)
}

fn spec(name: &str, args: Vec<Value>) -> TaskSpec {
    let mut spec = TaskSpec::new(name);
    spec.args = args;
    spec
}

async fn enqueue(client: &Client, spec: TaskSpec) -> String {
    client.enqueue(spec).await.expect("enqueue").id
}

/// Waits until the task is in `state`.
async fn state_is(client: &Client, id: &str, state: TaskState) -> TaskInfo {
    eventually(&format!("task {id} in state {state}"), WAIT, || async move {
        client.get(id).await.ok().filter(|info| info.state == state)
    })
    .await
}

/// Waits until the task is terminal.
async fn finished(client: &Client, id: &str) -> TaskInfo {
    let info = client.wait(id, WAIT).await.expect("get");
    assert!(info.state.is_terminal(), "task {id} did not finish: {info:?}");
    info
}

/// Waits until `counter` reaches `n`.
/// A handler that counts its starts and never finishes.
fn stuck(
    started: &Arc<AtomicUsize>,
) -> impl Fn(Task<()>) -> std::future::Pending<Result<(), TaskFailure>> + Send + Sync + 'static {
    let started = started.clone();
    move |_task| {
        started.fetch_add(1, Ordering::SeqCst);
        std::future::pending()
    }
}

async fn count_is(counter: &AtomicUsize, n: usize) {
    eventually(&format!("counter at {n}"), WAIT, || async { (counter.load(Ordering::SeqCst) == n).then_some(()) }).await
}

#[tokio::test]
async fn runs_handlers_and_acks_their_results() {
    let server = TestServer::start().await;
    let client = server.client().await;
    async fn add(task: Task<(i64, i64)>) -> Result<i64, TaskFailure> {
        Ok(task.args.0 + task.args.1)
    }
    let (stop, run) = spawn(worker(&server).register("add", add).build());
    let id = enqueue(&client, spec("add", vec![2.into(), 3.into()])).await;
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.result, Some(Value::from(5)));
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_prefetch_leases_no_more_tasks_than_free_slots() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (gate, running, most) = (Gate::new(), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = gated(&gate, &running, &most);
    let (stop, run) = spawn(worker(&server).concurrency(2).prefetch(0).register("block", handler).build());
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(enqueue(&client, spec("block", vec![])).await);
    }
    count_is(&running, 2).await;
    // Two slots, two leases: the other four stay ready in the queue, not held by the worker.
    let stats = client.stats().await.unwrap();
    let queue = stats.queues.iter().find(|q| q.name == "default").unwrap();
    assert_eq!((queue.leased, queue.ready), (2, 4));
    gate.open();
    for id in &ids {
        assert_eq!(finished(&client, id).await.state, TaskState::Success);
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
    stop.graceful();
    run.await.unwrap().unwrap();
}

/// What a gated handler returns.
type Gated = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), TaskFailure>> + Send>>;

/// A gated handler that counts the tasks running now and the most at once.
fn gated(
    gate: &Gate,
    running: &Arc<AtomicUsize>,
    most: &Arc<AtomicUsize>,
) -> impl Fn(Task<()>) -> Gated + Send + Sync + 'static {
    let (g, r, m) = (gate.clone(), running.clone(), most.clone());
    move |_task: Task<()>| -> Gated {
        let (gate, running, most) = (g.clone(), r.clone(), m.clone());
        Box::pin(async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            gate.wait().await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

/// (leased, ready) of the default queue.
async fn leased_and_ready(client: &Client) -> (u64, u64) {
    let stats = client.stats().await.unwrap();
    stats.queues.iter().find(|q| q.name == "default").map_or((0, 0), |q| (q.leased, q.ready))
}

#[tokio::test]
async fn prefetch_holds_at_most_its_bound_beyond_the_running_tasks() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (gate, running, most) = (Gate::new(), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = gated(&gate, &running, &most);
    let (stop, run) = spawn(worker(&server).concurrency(2).prefetch(3).register("block", handler).build());
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(enqueue(&client, spec("block", vec![])).await);
    }
    count_is(&running, 2).await;
    // Two running and three prefetched; the other five stay in the queue for other workers, however many
    // long polls the worker makes meanwhile.
    eventually("2 running + 3 prefetched", WAIT, || async {
        (leased_and_ready(&client).await == (5, 5)).then_some(())
    })
    .await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(leased_and_ready(&client).await, (5, 5));
        assert_eq!(running.load(Ordering::SeqCst), 2);
    }
    gate.open();
    for id in &ids {
        assert_eq!(finished(&client, id).await.state, TaskState::Success);
    }
    assert_eq!(most.load(Ordering::SeqCst), 2, "prefetched tasks never run beyond the concurrency");
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_graceful_shutdown_releases_prefetched_tasks_without_counting_an_attempt() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (gate, running, most) = (Gate::new(), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = gated(&gate, &running, &most);
    let (stop, run) = spawn(worker(&server).concurrency(1).prefetch(2).register("block", handler).build());
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&client, spec("block", vec![])).await);
    }
    count_is(&running, 1).await;
    eventually("1 running + 2 prefetched", WAIT, || async { (leased_and_ready(&client).await.0 == 3).then_some(()) })
        .await;
    stop.graceful();
    // The prefetched two go back at once, while the running one is still running.
    eventually("prefetched released", WAIT, || async { (leased_and_ready(&client).await == (1, 4)).then_some(()) })
        .await;
    gate.open();
    run.await.unwrap().unwrap();
    let mut states = Vec::new();
    for id in &ids {
        let info = client.get(id).await.unwrap();
        states.push((info.state, info.attempts));
    }
    let done = states.iter().filter(|s| **s == (TaskState::Success, 1)).count();
    let waiting = states.iter().filter(|s| **s == (TaskState::Pending, 0)).count();
    assert_eq!((done, waiting), (1, 4), "{states:?}");
    assert_eq!(client.stats().await.unwrap().totals.lease_lost, 0);
}

#[tokio::test]
async fn a_dead_workers_prefetched_tasks_go_back_to_the_queue() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let running = Arc::new(AtomicUsize::new(0));
    let handler = stuck(&running);
    let (stop, run) = spawn(worker(&server).concurrency(1).prefetch(2).register("stuck", handler).build());
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(enqueue(&client, spec("stuck", vec![])).await);
    }
    count_is(&running, 1).await;
    eventually("1 running + 2 prefetched", WAIT, || async {
        (leased_and_ready(&client).await == (3, 0)).then_some(())
    })
    .await;
    stop.now(); // the connection closes with leases held, as when the process dies
    run.await.unwrap().unwrap();
    for id in &ids {
        // Back in the queue, none lost. A lease lost with its connection counts as an attempt; a prefetched task
        // may also have been released in the moment before the stop (`now` starts a graceful stop too).
        let attempts = state_is(&client, id, TaskState::Pending).await.attempts;
        assert!(attempts <= 1, "{id}: {attempts} attempts");
    }
}

#[tokio::test]
async fn heartbeats_keep_a_long_task_leased_past_the_lease_timeout() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // The workload runs for several lease timeouts; only heartbeats keep the lease alive that long.
    let handler = |_task: Task<()>| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok("done")
    };
    let (stop, run) =
        spawn(worker(&server).lease_timeout(Duration::from_millis(400)).register("long", handler).build());
    let id = enqueue(&client, spec("long", vec![])).await;
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.attempts, 1, "the lease was never lost");
    assert_eq!(client.stats().await.unwrap().totals.lease_lost, 0);
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_killed_workers_task_is_redelivered_and_completed_by_another() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let handler = move |task: Task<()>| {
        let started = counter.clone();
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            if task.attempt == 1 {
                std::future::pending::<()>().await;
            }
            Ok(format!("attempt {}", task.attempt))
        }
    };
    let (_, first) = spawn(worker(&server).register("job", handler.clone()).build());
    let id = enqueue(&client, spec("job", vec![])).await;
    count_is(&started, 1).await;
    first.abort(); // the process dies: its connection closes and the daemon takes the lease back
    let _ = first.await;

    let (stop, second) = spawn(worker(&server).register("job", handler).build());
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.attempts, 2);
    assert_eq!(info.result, Some(Value::from("attempt 2")));
    stop.graceful();
    second.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panicking_handler_fails_its_task_and_the_worker_carries_on() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let handler = |task: Task<(bool,)>| async move {
        if task.args.0 {
            panic!("boom: the handler fell over");
        }
        Ok(true)
    };
    let (stop, run) = spawn(worker(&server).concurrency(1).register("maybe_panic", handler).build());
    let mut panics = spec("maybe_panic", vec![true.into()]);
    panics.max_retries = Some(0);
    let id = enqueue(&client, panics).await;
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Failure);
    let error = info.error.unwrap();
    assert_eq!(error.kind, PANIC);
    assert!(error.message.contains("boom: the handler fell over"), "{}", error.message);

    let id = enqueue(&client, spec("maybe_panic", vec![false.into()])).await;
    assert_eq!(finished(&client, &id).await.state, TaskState::Success);
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[derive(Debug, Deserialize)]
struct Options {
    #[allow(dead_code)]
    verbose: bool,
}

#[tokio::test]
async fn bad_args_fail_at_once_without_retry_naming_task_and_field() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = move |task: Task<(i64, i64), Options>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move { Ok(task.args.0 + task.args.1) }
    };
    let (stop, run) = spawn(worker(&server).register("add", handler).build());

    let mut bad = spec("add", vec!["two".into(), 3.into()]); // max_retries stays at the default 3
    bad.kwargs.insert("verbose".into(), true.into());
    let id = enqueue(&client, bad).await;
    let info = finished(&client, &id).await;
    assert_eq!((info.state, info.attempts), (TaskState::Failure, 1));
    let error = info.error.unwrap();
    assert_eq!(error.kind, INVALID_ARGUMENTS);
    assert!(error.message.starts_with("task add: bad args[0]: invalid type: string"), "{}", error.message);

    let id = enqueue(&client, spec("add", vec![1.into(), 2.into()])).await; // no kwargs: `verbose` is missing
    let info = finished(&client, &id).await;
    assert_eq!((info.state, info.attempts), (TaskState::Failure, 1));
    let message = info.error.unwrap().message;
    assert!(message.contains("task add: bad kwargs: missing field `verbose`"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unknown_task_fails_with_a_clear_error() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let (stop, run) = spawn(worker(&server).build());
    let mut unknown = spec("no_such_task", vec![]);
    unknown.max_retries = Some(1);
    unknown.retry_delay_ms = Some(1);
    let id = enqueue(&client, unknown).await;
    let info = finished(&client, &id).await;
    // Retried by the task's own policy (another worker may know it), then dead.
    assert_eq!((info.state, info.attempts), (TaskState::Failure, 2));
    let error = info.error.unwrap();
    assert_eq!((error.kind.as_str(), error.message.as_str()), (UNKNOWN_TASK, "unknown task no_such_task"));
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_retry_with_countdown_carries_the_context_unchanged() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let handler = move |task: Task<(String,)>| {
        record.lock().unwrap().push((task.attempt, task.context.clone()));
        async move {
            if task.attempt == 1 {
                return Err(task.retry(Duration::from_millis(50)));
            }
            let user: String = task.context_get("user_id").unwrap_or_default();
            Ok(format!("{} for {user}", task.args.0))
        }
    };
    let (stop, run) = spawn(worker(&server).register("report", handler).build());

    let mut request = broker_client::worker::Context::new();
    request.insert("user_id".into(), Value::from("u-42"));
    request.insert("path".into(), Value::from("/reports"));
    let id = broker_client::with_context(request.clone(), async {
        // A retry delay of a minute: only the handler's own countdown can bring the retry back in time.
        producer.task("report").args(("monthly",)).retry_delay(Duration::from_secs(60)).enqueue().await.unwrap().id
    })
    .await;
    let info = finished(producer.client(), &id).await;
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.attempts, 2);
    assert_eq!(info.result, Some(Value::from("monthly for u-42")));
    assert_eq!(info.context, request);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, vec![(1, request.clone()), (2, request)]);
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn tasks_enqueued_by_a_handler_inherit_its_context() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    let inner = producer.clone();
    let parent = move |_task: Task<()>| {
        let producer = inner.clone();
        async move { Ok(producer.task("child").enqueue().await.map_err(|e| TaskFailure::msg(e.to_string()))?.id) }
    };
    let child = |task: Task<()>| async move { Ok(task.context) };
    let (stop, run) = spawn(worker(&server).register("parent", parent).register("child", child).build());
    let id = producer.task("parent").context("request_id", "r-1").enqueue().await.unwrap().id;
    let parent_info = finished(producer.client(), &id).await;
    let child_id = parent_info.result.unwrap().as_str().unwrap().to_string();
    let child_info = finished(producer.client(), &child_id).await;
    assert_eq!(child_info.context.get("request_id"), Some(&Value::from("r-1")));
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_revoked_task_is_stopped_while_it_runs() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let handler = |_task: Task<()>| async {
        std::future::pending::<()>().await;
        Ok(())
    };
    let (stop, run) =
        spawn(worker(&server).lease_timeout(Duration::from_millis(300)).register("forever", handler).build());
    let id = enqueue(&client, spec("forever", vec![])).await;
    state_is(&client, &id, TaskState::Started).await;
    assert_eq!(client.revoke(&id).await.unwrap(), TaskState::Started);
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Revoked);
    // The slot is free again.
    let id = enqueue(&client, spec("nope", vec![])).await;
    state_is(&client, &id, TaskState::Retry).await;
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_running_tasks_and_loses_nothing() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let gate = Gate::new();
    let running = Arc::new(AtomicUsize::new(0));
    let (g, r) = (gate.clone(), running.clone());
    let handler = move |task: Task<()>| {
        let (gate, running) = (g.clone(), r.clone());
        async move {
            running.fetch_add(1, Ordering::SeqCst);
            gate.wait().await;
            Ok(task.id)
        }
    };
    let worker = worker(&server).concurrency(2).register("job", handler).build();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(async move {
        let _ = rx.await;
    }));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&client, spec("job", vec![])).await);
    }
    count_is(&running, 2).await;
    tx.send(()).unwrap();
    // Stopped leasing: it keeps its two running tasks and takes no more, even as they finish.
    gate.open();
    run.await.unwrap().unwrap();
    let mut states = Vec::new();
    for id in &ids {
        let info = client.get(id).await.unwrap();
        states.push((info.state, info.attempts));
    }
    let done = states.iter().filter(|s| **s == (TaskState::Success, 1)).count();
    let waiting = states.iter().filter(|s| **s == (TaskState::Pending, 0)).count();
    assert_eq!((done, waiting), (2, 3), "{states:?}");
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.totals.lease_lost, 0);
}

#[tokio::test]
async fn tasks_still_running_after_the_grace_period_are_released() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let running = Arc::new(AtomicUsize::new(0));
    let handler = stuck(&running);
    let worker = worker(&server).grace_period(Duration::from_millis(100)).register("stuck", handler).build();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(async move {
        let _ = rx.await;
    }));
    let id = enqueue(&client, spec("stuck", vec![])).await;
    count_is(&running, 1).await;
    tx.send(()).unwrap();
    run.await.unwrap().unwrap();
    // Released, not lost: back in the queue with the attempt not counted.
    let info = client.get(&id).await.unwrap();
    assert_eq!((info.state, info.attempts), (TaskState::Pending, 0));
}

#[tokio::test]
async fn reconnects_after_a_daemon_restart_without_losing_or_double_acking() {
    let mut server = TestServer::start().await;
    let addr = server.addr();
    let acked = Arc::new(AtomicUsize::new(0));
    let counter = acked.clone();
    // `job(true)` hangs on its first attempt, so it is in flight when the daemon goes away.
    let handler = move |task: Task<(bool,)>| {
        let acked = counter.clone();
        async move {
            if task.args.0 && task.attempt == 1 {
                std::future::pending::<()>().await;
            }
            acked.fetch_add(1, Ordering::SeqCst);
            Ok(task.attempt)
        }
    };
    let (stop, run) = spawn(worker(&server).register("job", handler).build());
    let client = server.client().await;
    let id = enqueue(&client, spec("job", vec![true.into()])).await;
    state_is(&client, &id, TaskState::Started).await;
    drop(client);

    // Restart on the same address: the in-flight lease dies with the old daemon, the task goes back to its queue.
    server.handle.take().unwrap().shutdown().await.unwrap();
    server.config.listen = addr.parse().unwrap();
    server.handle = Some(broker::server::start(server.config.clone(), Arc::new(SystemClock)).await.unwrap());

    let client = server.client().await;
    let info = finished(&client, &id).await;
    assert_eq!((info.state, info.attempts), (TaskState::Success, 2));
    assert_eq!(info.result, Some(Value::from(2)));
    let id = enqueue(&client, spec("job", vec![false.into()])).await;
    assert_eq!(finished(&client, &id).await.state, TaskState::Success);
    assert_eq!(acked.load(Ordering::SeqCst), 2);
    stop.graceful();
    run.await.unwrap().unwrap();
}

/// Sends one HTTP/1.1 request over a plain socket and returns the response's status line and body.
async fn http_post(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: app.example\r\nContent-Length: 0\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[tokio::test]
async fn the_http_examples_request_context_arrives_intact_in_the_worker() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let app = tokio::spawn(async move { axum::serve(listener, http_app::app(producer)).await });
    let (stop, run) = spawn(http_app::register(worker(&server)).build());

    let headers = [("X-User-Id", "42"), ("X-Request-Id", "req-7"), ("Authorization", "Bearer secret")];
    let (status, body) = http_post(http_addr, "/signup/ada@example.com?plan=pro", &headers).await;
    assert!(status.contains("202"), "{status}: {body}");
    let id = body.trim().strip_prefix("enqueued ").expect("the task id").to_string();

    let client = server.client().await;
    let info = finished(&client, &id).await;
    assert_eq!(info.state, TaskState::Success, "{info:?}");
    let result: std::collections::BTreeMap<String, Value> =
        broker_client::proto::from_value(info.result.unwrap()).unwrap();
    let get = |k: &str| result.get(k).and_then(Value::as_str).map(str::to_string);
    assert_eq!(get("email").as_deref(), Some("ada@example.com"));
    assert_eq!(get("path").as_deref(), Some("/signup/ada@example.com"));
    assert_eq!(get("method").as_deref(), Some("POST"));
    assert_eq!(get("query_string").as_deref(), Some("plan=pro"));
    assert_eq!(get("base_url").as_deref(), Some("http://app.example"));
    assert_eq!(get("request_id").as_deref(), Some("req-7"));
    assert_eq!(get("user_id").as_deref(), Some("42"));
    // Only the chosen headers travel: never credentials.
    assert!(!format!("{:?}", info.context).contains("secret"));
    stop.graceful();
    run.await.unwrap().unwrap();
    app.abort();
}

#[tokio::test]
async fn stopping_at_once_leaves_running_tasks_to_the_daemon() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let running = Arc::new(AtomicUsize::new(0));
    let handler = stuck(&running);
    let (stop, run) = spawn(worker(&server).register("stuck", handler).build());
    let id = enqueue(&client, spec("stuck", vec![])).await;
    count_is(&running, 1).await;
    stop.now(); // what a second SIGINT/SIGTERM does
    run.await.unwrap().unwrap();
    // The connection closed with the lease held: the daemon put the task back (the attempt counted).
    let info = state_is(&client, &id, TaskState::Pending).await;
    assert_eq!(info.attempts, 1);
}

#[tokio::test]
async fn an_invalid_lease_request_stops_the_worker_with_an_error() {
    let server = TestServer::start().await;
    let worker = worker(&server).queues([""]).build();
    let error = worker.run_until(std::future::pending()).await.unwrap_err();
    assert!(error.is(broker_client::proto::ErrorCode::BadRequest), "{error}");
}

#[tokio::test]
async fn the_producers_traceparent_reaches_the_handler() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    let handler = |task: Task<()>| async move { Ok(task.traceparent().map(str::to_string)) };
    let (stop, run) = spawn(worker(&server).register("traced", handler).build());
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = producer.task("traced").traceparent(parent, None).enqueue().await.unwrap().id;
    let info = finished(producer.client(), &id).await;
    assert_eq!(info.result, Some(Value::from(parent)));
    let untraced = producer.task("traced").enqueue().await.unwrap().id;
    assert_eq!(finished(producer.client(), &untraced).await.result, Some(Value::Nil));
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn chains_and_chords_built_with_the_producer_run_through_workers() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    async fn add(task: Task<Vec<i64>>) -> Result<i64, TaskFailure> {
        Ok(task.args.iter().sum())
    }
    async fn double(task: Task<(i64,)>) -> Result<i64, TaskFailure> {
        Ok(task.args.0 * 2)
    }
    async fn total(task: Task<(Vec<i64>,)>) -> Result<i64, TaskFailure> {
        Ok(task.args.0.iter().sum())
    }
    let built = worker(&server).register("add", add).register("double", double).register("total", total).build();
    let (stop, run) = spawn(built);
    // add(2, 3) | double() | double(): 20; an immutable link ignores the result.
    let chain = producer
        .task("add")
        .args((2, 3))
        .then(producer.task("double"))
        .then(producer.task("double").then(producer.task("add").args((1, 1)).immutable()))
        .enqueue()
        .await
        .unwrap();
    assert_eq!(chain.chain.len(), 3);
    // A link exists once its turn comes.
    let last = &chain.chain[2];
    eventually("the chain's last link", WAIT, || async { producer.client().get(last).await.ok() }).await;
    let second = finished(producer.client(), &chain.chain[1]).await;
    assert_eq!(second.result, Some(Value::from(20)));
    let last = finished(producer.client(), &chain.chain[2]).await;
    assert_eq!(last.result, Some(Value::from(2)));
    // A chord of add(i, i) for 0..4, then total: 0 + 2 + 4 + 6.
    let header = (0..4).map(|i| producer.task("add").args((i, i))).collect();
    let chord = producer.chord(header, producer.task("total")).await.unwrap();
    assert_eq!(finished(producer.client(), &chord.callback.id).await.result, Some(Value::from(12)));
    // A schedule built the same way runs through the same worker.
    let schedule = producer.schedule("doubler", producer.task("double").args((21,))).every(Duration::from_secs(1));
    let info = schedule.add().await.unwrap();
    let tick = format!("sched:doubler:{}", info.next_ms.unwrap());
    eventually("the first tick's task", WAIT, || async { producer.client().get(&tick).await.ok() }).await;
    assert_eq!(finished(producer.client(), &tick).await.result, Some(Value::from(42)));
    let group = producer.group((0..3).map(|i| producer.task("double").args((i,))).collect()).await.unwrap();
    assert_eq!(finished(producer.client(), &group[2].id).await.result, Some(Value::from(4)));
    stop.graceful();
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_task_past_its_time_limit_is_stopped_and_fails_and_a_handler_reports_progress() {
    let server = TestServer::start().await;
    let producer = Producer::new(server.client().await);
    async fn slow(_: Task<()>) -> Result<(), TaskFailure> {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    }
    async fn import(task: Task<(u32,)>) -> Result<u32, TaskFailure> {
        for done in 1..=task.args.0 {
            let meta = std::collections::BTreeMap::from([("current", done), ("total", task.args.0)]);
            broker_client::worker::progress("PROGRESS", &meta).await.map_err(|e| TaskFailure::msg(e.to_string()))?;
        }
        // Hold on until the test has read the last report.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(task.args.0)
    }
    let built = worker(&server)
        .register("slow", slow)
        .register("import", import)
        .time_limit("slow", Duration::from_millis(200))
        .build();
    let (stop, run) = spawn(built);
    let started = std::time::Instant::now();
    let id = producer.task("slow").max_retries(3).enqueue().await.unwrap().id;
    let info = finished(producer.client(), &id).await;
    assert_eq!(info.state, TaskState::Failure, "not retried");
    assert_eq!(info.error.unwrap().kind, broker_client::worker::TIME_LIMIT_EXCEEDED);
    assert!(started.elapsed() < Duration::from_secs(10));
    let id = producer.task("import").args((3,)).enqueue().await.unwrap().id;
    let progress = eventually("the last progress report", WAIT, || async {
        let info = producer.client().get(&id).await.ok()?;
        info.progress.filter(|p| p.meta == Value::Map(vec![("current".into(), 3.into()), ("total".into(), 3.into())]))
    })
    .await;
    assert_eq!(progress.state, "PROGRESS");
    assert_eq!(finished(producer.client(), &id).await.result, Some(Value::from(3)));
    // Outside a handler there is nothing to report on.
    assert!(broker_client::worker::progress("PROGRESS", &()).await.is_err());
    stop.graceful();
    run.await.unwrap().unwrap();
}
