//! A task's life through a real daemon: enqueue, lease, ack, fail and retry, leases lost and released,
//! scheduling, revocation, expiry. Time-dependent cases run on a manual clock and poll for the effect.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use broker_client::proto::{DeadRequeue, ErrorCode, Fail, Lease, TaskError, TaskSpec, TaskState, Value};
use common::{eventually, TestServer};

const WAIT: Duration = Duration::from_secs(10);

fn lease(queues: &[&str], max: u32) -> Lease {
    Lease { queues: queues.iter().map(|q| q.to_string()).collect(), max, wait_ms: 0, lease_ms: None }
}

fn spec(task: &str, args: Vec<Value>) -> TaskSpec {
    TaskSpec { args, ..TaskSpec::new(task) }
}

fn fail_request(id: &str, lease_id: u64, error: TaskError, retry: bool, countdown_ms: Option<u64>) -> Fail {
    Fail { task_id: id.to_string(), lease_id, error, retry, countdown_ms }
}

fn error(kind: &str, message: &str) -> TaskError {
    TaskError { kind: kind.into(), message: message.into(), traceback: Some("line 1".into()) }
}

#[tokio::test]
async fn enqueue_lease_ack_get_carries_args_context_and_result() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut task = spec("add", vec![Value::from(2), Value::from(3)]);
    task.kwargs = BTreeMap::from([("scale".to_string(), Value::from(1.5))]);
    task.context = BTreeMap::from([
        ("path".to_string(), Value::from("/signup")),
        ("user".to_string(), Value::from(42)),
        ("headers".to_string(), Value::Map(vec![(Value::from("X-Request-Id"), Value::from("abc"))])),
    ]);
    let enqueued = client.enqueue(task.clone()).await.unwrap();
    assert!(enqueued.created);
    assert_eq!(enqueued.state, TaskState::Pending);
    assert_eq!(client.get(&enqueued.id).await.unwrap().state, TaskState::Pending);

    let leased = client.lease(&lease(&["default"], 10)).await.unwrap();
    assert_eq!(leased.len(), 1);
    let t = &leased[0];
    assert_eq!((t.id.as_str(), t.task.as_str(), t.attempt), (enqueued.id.as_str(), "add", 1));
    assert_eq!(t.args, task.args);
    assert_eq!(t.kwargs, task.kwargs);
    assert_eq!(t.context, task.context);
    assert_eq!(client.get(&t.id).await.unwrap().state, TaskState::Started);

    client.ack(&t.id, t.lease_id, Value::from(5)).await.unwrap();
    let info = client.get(&t.id).await.unwrap();
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(info.result, Some(Value::from(5)));
    assert_eq!(info.attempts, 1);
    assert_eq!(info.context, task.context);
    assert!(info.finished_at_ms.is_some() && info.result_expires_at_ms.is_some());

    // A second ack of the same lease is refused and does not overwrite the result.
    let again = client.ack(&t.id, t.lease_id, Value::from(99)).await.unwrap_err();
    assert!(again.is(ErrorCode::LeaseLost), "{again}");
    assert_eq!(client.get(&t.id).await.unwrap().result, Some(Value::from(5)));
}

#[tokio::test]
async fn unknown_id_is_not_found_not_pending() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let err = client.get("no-such-task").await.unwrap_err();
    assert!(err.is(ErrorCode::NotFound), "{err}");
    let err = client.revoke("no-such-task").await.unwrap_err();
    assert!(err.is(ErrorCode::NotFound), "{err}");
}

#[tokio::test]
async fn fail_retries_with_backoff_then_dies_and_can_be_requeued() {
    let server = TestServer::start_manual().await;
    let clock = server.clock();
    let client = server.client().await;
    let mut task = spec("flaky", vec![]);
    task.max_retries = Some(2);
    task.retry_delay_ms = Some(1000);
    task.context = BTreeMap::from([("user".to_string(), Value::from("ann"))]);
    let id = client.enqueue(task).await.unwrap().id;

    // Attempt 1 fails: retry after 1 s. Attempt 2 fails: retry after 2 s (doubling). Attempt 3 fails: dead.
    for (attempt, delay_ms) in [(1u32, 1000u64), (2, 2000)] {
        let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().expect("a task");
        assert_eq!(t.attempt, attempt);
        assert_eq!(t.context.get("user"), Some(&Value::from("ann")), "context travels with every retry");
        let now = server.clock().now_ms_for_test();
        let failed =
            client.fail(&fail_request(&id, t.lease_id, error("ValueError", "boom"), true, None)).await.unwrap();
        assert_eq!(failed.state, TaskState::Retry);
        assert_eq!(failed.retry_at_ms, Some(now + delay_ms));
        assert_eq!(client.get(&id).await.unwrap().state, TaskState::Retry);
        assert!(client.lease(&lease(&["default"], 1)).await.unwrap().is_empty(), "not before the backoff");
        clock.advance(Duration::from_millis(delay_ms - 1));
        server.tick();
        assert!(client.lease(&lease(&["default"], 1)).await.unwrap().is_empty(), "not 1 ms early");
        clock.advance(Duration::from_millis(1));
        eventually("retry becomes ready", WAIT, || async {
            (server.client().await.get(&id).await.unwrap().state == TaskState::Retry
                && client.stats().await.unwrap().queues[0].ready == 1)
                .then_some(())
        })
        .await;
    }
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().expect("third attempt");
    assert_eq!(t.attempt, 3);
    let failed = client.fail(&fail_request(&id, t.lease_id, error("ValueError", "boom"), true, None)).await.unwrap();
    assert_eq!(failed.state, TaskState::Failure);
    let info = client.get(&id).await.unwrap();
    assert_eq!(info.state, TaskState::Failure);
    let err = info.error.unwrap();
    assert_eq!((err.kind.as_str(), err.message.as_str()), ("ValueError", "boom"));
    assert_eq!(err.traceback.as_deref(), Some("line 1"));

    let dead = client.dead_list(Some("default"), 10).await.unwrap();
    assert_eq!(dead.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), vec![id.as_str()]);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.queues[0].dead, 1);
    assert_eq!(stats.queues[0].failed, 3);

    assert_eq!(client.dead_requeue(DeadRequeue { ids: vec![id.clone()], queue: None }).await.unwrap(), 1);
    assert!(client.dead_list(None, 10).await.unwrap().is_empty());
    let info = client.get(&id).await.unwrap();
    assert_eq!((info.state, info.attempts), (TaskState::Pending, 0));
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().expect("requeued task");
    assert_eq!(t.attempt, 1);
    assert_eq!(t.context.get("user"), Some(&Value::from("ann")));
}

#[tokio::test]
async fn fail_without_retry_and_with_countdown() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let a = client.enqueue(spec("bad_args", vec![])).await.unwrap().id;
    let b = client.enqueue(spec("later", vec![])).await.unwrap().id;
    let leased = client.lease(&lease(&["default"], 2)).await.unwrap();
    assert_eq!(leased.len(), 2);
    let failed =
        client.fail(&fail_request(&a, leased[0].lease_id, error("TypeError", "bad"), false, None)).await.unwrap();
    assert_eq!(failed.state, TaskState::Failure, "retry=false never retries");
    let now = server.clock().now_ms_for_test();
    let failed =
        client.fail(&fail_request(&b, leased[1].lease_id, error("Retry", "again"), true, Some(60_000))).await.unwrap();
    assert_eq!(failed.retry_at_ms, Some(now + 60_000), "countdown overrides the backoff");
}

#[tokio::test]
async fn expired_lease_returns_the_task_and_the_late_ack_is_refused() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let mut task = spec("slow", vec![]);
    task.lease_ms = Some(5_000);
    let id = client.enqueue(task).await.unwrap().id;
    let first = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    assert_eq!(first.lease_ms, 5_000);

    // A heartbeat pushes the deadline out.
    server.clock().advance(Duration::from_millis(4_000));
    let extended = client.extend(&id, first.lease_id, None).await.unwrap();
    assert_eq!(extended.deadline_ms, server.clock().now_ms_for_test() + 5_000);
    assert!(!extended.revoked);
    server.clock().advance(Duration::from_millis(4_000));
    server.tick();
    assert_eq!(client.get(&id).await.unwrap().state, TaskState::Started, "extended lease still held");

    server.clock().advance(Duration::from_millis(1_001));
    let second = eventually("redelivery after the deadline", WAIT, || async {
        client.lease(&lease(&["default"], 1)).await.unwrap().pop()
    })
    .await;
    assert_eq!(second.id, id);
    assert_eq!(second.attempt, 2, "the lost attempt counts");
    let late = client.ack(&id, first.lease_id, Value::from("late")).await.unwrap_err();
    assert!(late.is(ErrorCode::LeaseLost), "{late}");
    let late = client.extend(&id, first.lease_id, None).await.unwrap_err();
    assert!(late.is(ErrorCode::LeaseLost), "{late}");
    client.ack(&id, second.lease_id, Value::from("ok")).await.unwrap();
    assert_eq!(client.get(&id).await.unwrap().result, Some(Value::from("ok")));
    assert_eq!(client.stats().await.unwrap().totals.lease_lost, 1);
}

#[tokio::test]
async fn closing_a_connection_releases_its_leases_at_once() {
    let server = TestServer::start().await;
    let producer = server.client().await;
    let id = producer.enqueue(spec("job", vec![])).await.unwrap().id;
    {
        let worker = server.client().await;
        let t = worker.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
        assert_eq!(t.id, id);
        assert_eq!(producer.stats().await.unwrap().workers.len(), 1);
    } // worker dropped: its connection closes
    let again = eventually("released task is leasable", WAIT, || async {
        producer.lease(&lease(&["default"], 1)).await.unwrap().pop()
    })
    .await;
    assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
}

#[tokio::test]
async fn release_gives_the_task_back_without_counting() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(spec("job", vec![])).await.unwrap().id;
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    client.release(&id, t.lease_id).await.unwrap();
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    assert_eq!(t.attempt, 1);
}

#[tokio::test]
async fn priority_first_then_fifo_and_queue_order() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut ids = Vec::new();
    for (name, priority) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)] {
        let mut t = spec(name, vec![]);
        t.priority = priority;
        ids.push(client.enqueue(t).await.unwrap().id);
    }
    let mut other = spec("x", vec![]);
    other.queue = Some("other".into());
    client.enqueue(other).await.unwrap();
    let leased = client.lease(&lease(&["default", "other"], 10)).await.unwrap();
    let names: Vec<_> = leased.iter().map(|t| t.task.as_str()).collect();
    assert_eq!(names, vec!["b", "d", "a", "c", "e", "x"]);
    let leased = client.lease(&lease(&["other", "default"], 10)).await.unwrap();
    assert!(leased.is_empty());
}

#[tokio::test]
async fn countdown_and_eta_wait_in_the_broker() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let now = server.clock().now_ms_for_test();
    let mut a = spec("countdown", vec![]);
    a.countdown_ms = Some(10_000);
    let mut b = spec("eta", vec![]);
    b.eta_ms = Some(now + 20_000);
    let a = client.enqueue(a).await.unwrap();
    let b = client.enqueue(b).await.unwrap();
    assert_eq!((a.state, b.state), (TaskState::Scheduled, TaskState::Scheduled));
    assert_eq!(client.get(&b.id).await.unwrap().eta_ms, Some(now + 20_000));
    assert!(client.lease(&lease(&["default"], 10)).await.unwrap().is_empty());
    assert_eq!(client.stats().await.unwrap().queues[0].scheduled, 2);

    server.clock().advance(Duration::from_secs(10));
    let first = eventually("countdown task due", WAIT, || async {
        client.lease(&lease(&["default"], 10)).await.unwrap().pop()
    })
    .await;
    assert_eq!(first.id, a.id);
    assert_eq!(client.get(&b.id).await.unwrap().state, TaskState::Scheduled);
    server.clock().advance(Duration::from_secs(10));
    let second =
        eventually("eta task due", WAIT, || async { client.lease(&lease(&["default"], 10)).await.unwrap().pop() })
            .await;
    assert_eq!(second.id, b.id);
}

#[tokio::test]
async fn enqueue_with_an_existing_id_returns_the_existing_task() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut t = spec("once", vec![Value::from(1)]);
    t.id = Some("order-17-email".into());
    let first = client.enqueue(t.clone()).await.unwrap();
    assert!(first.created);
    assert_eq!(first.id, "order-17-email");
    t.args = vec![Value::from(2)];
    let second = client.enqueue(t.clone()).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.id, first.id);
    let leased = client.lease(&lease(&["default"], 10)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].args, vec![Value::from(1)], "the first task is kept");
    client.ack(&first.id, leased[0].lease_id, Value::Nil).await.unwrap();
    let third = client.enqueue(t).await.unwrap();
    assert_eq!((third.created, third.state), (false, TaskState::Success));
}

#[tokio::test]
async fn batch_enqueue_stores_all_in_order() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let tasks: Vec<_> = (0..50).map(|i| spec("n", vec![Value::from(i)])).collect();
    let done = client.enqueue_batch(tasks).await.unwrap();
    assert_eq!(done.len(), 50);
    assert!(done.iter().all(|e| e.created));
    let leased = client.lease(&lease(&["default"], 100)).await.unwrap();
    let order: Vec<_> = leased.iter().map(|t| t.args[0].as_i64().unwrap()).collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn revoke_waiting_and_running_tasks() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let waiting = client.enqueue(spec("w", vec![])).await.unwrap().id;
    assert_eq!(client.revoke(&waiting).await.unwrap(), TaskState::Revoked);
    assert!(client.lease(&lease(&["default"], 10)).await.unwrap().is_empty(), "a revoked task never runs");
    assert_eq!(client.get(&waiting).await.unwrap().state, TaskState::Revoked);

    let running = client.enqueue(spec("r", vec![])).await.unwrap().id;
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    assert_eq!(client.revoke(&running).await.unwrap(), TaskState::Started);
    assert!(client.get(&running).await.unwrap().revoked);
    assert!(client.extend(&running, t.lease_id, None).await.unwrap().revoked, "the worker learns on extend");
    let err = client.ack(&running, t.lease_id, Value::from(1)).await.unwrap_err();
    assert!(err.is(ErrorCode::Revoked), "{err}");
    let info = client.get(&running).await.unwrap();
    assert_eq!((info.state, info.result), (TaskState::Revoked, None));
}

#[tokio::test]
async fn expires_drops_a_task_not_started_in_time() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let mut t = spec("stale", vec![]);
    t.expires_in_ms = Some(1_000);
    let id = client.enqueue(t).await.unwrap().id;
    server.clock().advance(Duration::from_millis(1_000));
    assert!(client.lease(&lease(&["default"], 1)).await.unwrap().is_empty());
    let info = client.get(&id).await.unwrap();
    assert_eq!(info.state, TaskState::Revoked);
    assert_eq!(info.error.unwrap().kind, "Expired");
}

#[tokio::test]
async fn results_are_removed_after_their_ttl() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let mut t = spec("short", vec![]);
    t.result_ttl_ms = Some(60_000);
    let short = client.enqueue(t).await.unwrap().id;
    let long = client.enqueue(spec("long", vec![])).await.unwrap().id;
    for t in client.lease(&lease(&["default"], 2)).await.unwrap() {
        client.ack(&t.id, t.lease_id, Value::from("done")).await.unwrap();
    }
    assert_eq!(client.stats().await.unwrap().results_stored, 2);
    server.clock().advance(Duration::from_millis(59_999));
    server.tick();
    assert_eq!(client.get(&short).await.unwrap().state, TaskState::Success, "kept until its TTL");
    server.clock().advance(Duration::from_millis(1));
    eventually("short result removed", WAIT, || async {
        client.get(&short).await.err().filter(|e| e.is(ErrorCode::NotFound))
    })
    .await;
    assert_eq!(client.get(&long).await.unwrap().state, TaskState::Success, "default TTL is 24 h");
    server.clock().advance(Duration::from_secs(24 * 3600));
    eventually("long result removed", WAIT, || async {
        client.get(&long).await.err().filter(|e| e.is(ErrorCode::NotFound))
    })
    .await;
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.results_stored, stats.totals.expired_results), (0, 2));
}

#[tokio::test]
async fn long_poll_lease_wakes_on_enqueue() {
    let server = TestServer::start().await;
    let worker = server.client().await;
    let producer = server.client().await;
    let waiting = tokio::spawn(async move {
        worker.lease(&Lease { queues: vec!["default".into()], max: 1, wait_ms: 60_000, lease_ms: None }).await.unwrap()
    });
    // The lease is parked in the daemon; enqueue once the worker is known to be waiting.
    eventually("worker registered", WAIT, || async {
        (producer.stats().await.unwrap().workers.len() == 1).then_some(())
    })
    .await;
    let id = producer.enqueue(spec("wake", vec![])).await.unwrap().id;
    let leased = tokio::time::timeout(WAIT, waiting).await.expect("woken well before its 60 s wait").unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id, id);
}

#[tokio::test]
async fn get_waits_for_the_result() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(spec("job", vec![])).await.unwrap().id;
    let waiter = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.wait(&id, Duration::from_secs(60)).await.unwrap() })
    };
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    client.ack(&id, t.lease_id, Value::from("hi")).await.unwrap();
    let info = tokio::time::timeout(WAIT, waiter).await.expect("woken by the ack").unwrap();
    assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::from("hi"))));
    // A wait that times out returns the task as it is.
    let pending = client.enqueue(spec("job", vec![])).await.unwrap().id;
    let info = client.wait(&pending, Duration::from_millis(20)).await.unwrap();
    assert_eq!(info.state, TaskState::Pending);
}

#[tokio::test]
async fn pipelined_requests_are_not_held_up_by_a_blocking_lease() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // One connection: a long-poll lease on an empty queue is in flight...
    let parked = {
        let client = client.clone();
        tokio::spawn(async move {
            client.lease(&Lease { queues: vec!["empty".into()], max: 1, wait_ms: 60_000, lease_ms: None }).await
        })
    };
    eventually("lease parked", WAIT, || async { (client.stats().await.unwrap().workers.len() == 1).then_some(()) })
        .await;
    // ...while 200 enqueues and gets are pipelined behind it on the same connection.
    let enqueues = (0..200).map(|i| {
        let client = client.clone();
        async move { client.enqueue(spec("p", vec![Value::from(i)])).await }
    });
    let done = futures_util_join_all(enqueues).await;
    assert_eq!(done.len(), 200);
    for e in &done {
        assert_eq!(client.get(&e.id).await.unwrap().state, TaskState::Pending);
    }
    assert!(!parked.is_finished(), "the blocking lease is still waiting");
    let mut t = spec("wake", vec![]);
    t.queue = Some("empty".into());
    client.enqueue(t).await.unwrap();
    let leased = tokio::time::timeout(WAIT, parked).await.unwrap().unwrap().unwrap();
    assert_eq!(leased[0].task, "wake");
}

async fn futures_util_join_all<F, T, E>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Debug + Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap().unwrap());
    }
    out
}

#[tokio::test]
async fn purge_deletes_waiting_tasks_only() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let running = client.enqueue(spec("r", vec![])).await.unwrap().id;
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    let waiting = client.enqueue(spec("w", vec![])).await.unwrap().id;
    let mut later = spec("s", vec![]);
    later.countdown_ms = Some(3_600_000);
    client.enqueue(later).await.unwrap();
    assert_eq!(client.purge("default").await.unwrap(), 2);
    assert!(client.get(&waiting).await.unwrap_err().is(ErrorCode::NotFound));
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.queues[0].ready, stats.queues[0].scheduled, stats.queues[0].leased), (0, 0, 1));
    client.ack(&running, t.lease_id, Value::Nil).await.unwrap();
}

#[tokio::test]
async fn stats_count_per_queue() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for q in ["emails", "emails", "reports"] {
        let mut t = spec("t", vec![]);
        t.queue = Some(q.into());
        client.enqueue(t).await.unwrap();
    }
    let t = client.lease(&lease(&["emails"], 1)).await.unwrap().pop().unwrap();
    client.ack(&t.id, t.lease_id, Value::Nil).await.unwrap();
    let stats = client.stats().await.unwrap();
    let emails = stats.queues.iter().find(|q| q.name == "emails").unwrap();
    assert_eq!((emails.ready, emails.leased, emails.succeeded), (1, 0, 1));
    let reports = stats.queues.iter().find(|q| q.name == "reports").unwrap();
    assert_eq!(reports.ready, 1);
    assert_eq!(stats.totals.enqueued, 3);
    assert_eq!(stats.connections, 1);
    // The durability policy: the log's fsync on the single node; commits on the PostgreSQL store.
    let policy = if server.config.store.is_some() { "postgres" } else { "always" };
    assert_eq!(stats.fsync, policy);
}

/// Reads the manual clock through the public trait.
trait NowForTest {
    fn now_ms_for_test(&self) -> u64;
}

impl NowForTest for broker::clock::ManualClock {
    fn now_ms_for_test(&self) -> u64 {
        broker::clock::Clock::now_ms(self)
    }
}

#[tokio::test]
async fn a_revoked_task_given_back_is_never_run_again() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let released = client.enqueue(spec("released", vec![])).await.unwrap().id;
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    client.revoke(&released).await.unwrap();
    client.release(&released, t.lease_id).await.unwrap();
    assert_eq!(client.get(&released).await.unwrap().state, TaskState::Revoked);

    let dropped = client.enqueue(spec("dropped", vec![])).await.unwrap().id;
    {
        let worker = server.client().await;
        worker.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
        client.revoke(&dropped).await.unwrap();
    } // the worker's connection closes with the lease
    eventually("revoked task finished on disconnect", WAIT, || async {
        (client.get(&dropped).await.unwrap().state == TaskState::Revoked).then_some(())
    })
    .await;
    assert!(client.lease(&lease(&["default"], 10)).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_waiting_get_sees_a_purge_at_once() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(spec("doomed", vec![])).await.unwrap().id;
    let waiter = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.wait(&id, Duration::from_secs(60)).await })
    };
    // Let the wait park in the daemon: it is parked once a get on the same connection has been answered after it.
    client.stats().await.unwrap();
    assert_eq!(client.purge("default").await.unwrap(), 1);
    let result = tokio::time::timeout(WAIT, waiter).await.expect("woken by the purge").unwrap();
    assert!(result.unwrap_err().is(ErrorCode::NotFound));
}

#[tokio::test]
async fn a_due_schedule_joins_the_back_of_its_priority() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let mut a = spec("a", vec![]);
    a.countdown_ms = Some(10_000);
    client.enqueue(a).await.unwrap();
    client.enqueue(spec("b", vec![])).await.unwrap();
    server.clock().advance(Duration::from_secs(10));
    server.tick();
    client.enqueue(spec("c", vec![])).await.unwrap();
    let order: Vec<_> = client.lease(&lease(&["default"], 10)).await.unwrap().into_iter().map(|t| t.task).collect();
    assert_eq!(order, vec!["b", "a", "c"], "a became ready after b was enqueued and before c");
}

#[tokio::test]
async fn a_nil_result_reads_back_as_nil() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(spec("nothing", vec![])).await.unwrap().id;
    let t = client.lease(&lease(&["default"], 1)).await.unwrap().pop().unwrap();
    // Under fsync=always the ack's reply waits for the write-out, so this get reads the record back from sled.
    client.ack(&id, t.lease_id, Value::Nil).await.unwrap();
    let info = client.get(&id).await.unwrap();
    assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::Nil)));
}

#[tokio::test]
async fn the_client_refuses_a_request_the_daemon_could_not_answer() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 1024, false).await;
    let client = server.client().await;
    let err = client.enqueue(spec("big", vec![Value::from("x".repeat(4096))])).await.unwrap_err();
    assert_eq!(err.kind(), broker_client::ErrorKind::Encode, "{err}");
    assert!(err.to_string().contains("max_frame"), "{err}");
    let mut deep = Value::Nil;
    for _ in 0..200 {
        deep = Value::Array(vec![deep]);
    }
    let err = client.enqueue(spec("deep", vec![deep])).await.unwrap_err();
    assert_eq!(err.kind(), broker_client::ErrorKind::Encode, "{err}");
    // Nothing was sent, and the connection is fine.
    client.enqueue(spec("small", vec![])).await.unwrap();
    assert_eq!(client.stats().await.unwrap().totals.enqueued, 1);
}

/// Under fsync=always a lease reply waits for a flush only when a task it hands out is not on disk yet (so a
/// worker never runs a task a crash could un-enqueue); a task that waited in its queue past a flush goes out at
/// once. The store is driven directly here, with no periodic flush, so nothing is flushed behind the test's back.
#[tokio::test]
async fn a_lease_waits_for_a_flush_only_for_tasks_not_yet_on_disk() {
    let server = TestServer::start_with(|c| c.fsync_interval_ms = 3_600_000, true).await;
    let store = server.handle.as_ref().unwrap().store().clone();
    let queues = vec!["default".to_string()];
    let conn = 1 << 40;

    server.client().await.enqueue(TaskSpec::new("flushed")).await.unwrap();
    let (tasks, unflushed) = store.lease(conn, &queues, 10, None);
    assert_eq!((tasks.len(), unflushed), (1, false), "acknowledged enqueue: on disk");

    store.enqueue(vec![TaskSpec::new("in memory").into()]).unwrap();
    let (tasks, unflushed) = store.lease(conn, &queues, 10, None);
    assert_eq!((tasks.len(), unflushed), (1, true), "not flushed yet: the reply must wait");

    store.enqueue(vec![TaskSpec::new("then flushed").into()]).unwrap();
    store.durable().await.unwrap();
    let (tasks, unflushed) = store.lease(conn, &queues, 10, None);
    assert_eq!((tasks.len(), unflushed), (1, false));
}

#[tokio::test]
async fn lease_ids_and_task_ids_cannot_be_guessed_from_one_another() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(client.enqueue(TaskSpec::new("t")).await.unwrap().id);
    }
    // 24 hex digits: the millisecond, a counter, then 32 random bits. Neighbours are not a count apart.
    for pair in ids.windows(2) {
        assert_eq!(pair[0].len(), 24);
        assert!(pair[0][..12] <= pair[1][..12], "ids sort by time: {pair:?}");
        let random = |id: &str| u64::from_str_radix(&id[16..], 16).unwrap();
        assert!(random(&pair[0]).abs_diff(random(&pair[1])) > 1_000, "enumerable ids: {pair:?}");
    }
    let leased = client.lease(&lease(&["default"], 50)).await.unwrap();
    assert_eq!(leased.len(), 50);
    for pair in leased.windows(2) {
        assert!(pair[0].lease_id.abs_diff(pair[1].lease_id) > 1_000_000, "consecutive lease ids");
    }
    // Quoting a neighbour's lease id, as a forger would, is refused, and the real holder still acks.
    let (victim, other) = (&leased[0], &leased[1]);
    for forged in [other.lease_id.wrapping_sub(1), other.lease_id.wrapping_add(1), other.lease_id] {
        let err = client.ack(&victim.id, forged, Value::from("forged")).await.unwrap_err();
        assert!(err.is(ErrorCode::LeaseLost), "{err}");
    }
    client.ack(&victim.id, victim.lease_id, Value::from("real")).await.unwrap();
    assert_eq!(client.get(&victim.id).await.unwrap().result, Some(Value::from("real")));
    server.stop().await;
}

#[tokio::test]
async fn events_follow_what_happens_to_tasks_from_a_cursor() {
    use broker_client::proto::Events;
    let server = TestServer::start().await;
    let client = server.client().await;
    // Before anyone asks, nothing is recorded; the first ask gives the cursor.
    client.enqueue(spec("before", vec![])).await.unwrap();
    let start = client.events(&Events { max: 100, ..Events::default() }).await.unwrap();
    assert!(start.events.is_empty());

    // A waiting ask answers when something happens.
    let waiter = {
        let client = client.clone();
        let after = start.next;
        tokio::spawn(async move {
            client.events(&Events { after: Some(after), max: 100, wait_ms: 5_000, queue: None }).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = client.enqueue(spec("watched", vec![])).await.unwrap().id;
    let woke = waiter.await.unwrap().unwrap();
    assert_eq!(woke.events.first().map(|e| (e.task_id.as_str(), e.event.as_str())), Some((id.as_str(), "enqueued")));

    let t = client.lease(&lease(&["default"], 10)).await.unwrap();
    for task in &t {
        client.ack(&task.id, task.lease_id, Value::Nil).await.unwrap();
    }
    let list = client.events(&Events { after: Some(start.next), max: 100, ..Events::default() }).await.unwrap();
    let of_watched: Vec<&str> = list.events.iter().filter(|e| e.task_id == id).map(|e| e.event.as_str()).collect();
    assert_eq!(of_watched, ["enqueued", "started", "succeeded"]);
    assert!(list.events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(list.missed, 0);
    // From the reply's cursor on, nothing new; a queue filter sees only its queue.
    let after = client.events(&Events { after: Some(list.next), max: 100, ..Events::default() }).await.unwrap();
    assert!(after.events.is_empty());
    let other = Events { after: Some(start.next), max: 100, wait_ms: 0, queue: Some("elsewhere".into()) };
    assert!(client.events(&other).await.unwrap().events.is_empty());
    server.stop().await;
}
