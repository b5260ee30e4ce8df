//! Several daemons over one PostgreSQL (`--store postgres://...`): a real primary with two synchronous standbys
//! (`scripts/pg-cluster`), real daemons over it. Enqueue, lease, ack and read through different daemons; waits
//! that wake across daemons; fencing of stale workers; a daemon killed with a lease; a failover of the primary;
//! schedules fired by whichever daemon ticks, each tick once; each daemon's dashboard and `/metrics`.
//!
//! Skipped, with the script's message, only where PostgreSQL 15 is missing and cannot be installed.

mod common;

use std::time::{Duration, Instant};

use broker_client::proto::{
    DeadRequeue, ErrorCode, Events, Fail, Lease, ScheduleAdd, TaskError, TaskSpec, TaskState, Value,
};
use broker_client::{Client, ConnectOptions};
use common::pg::PgCluster;
use common::{eventually, http_request, Daemon, TestServer};

const WAIT: Duration = Duration::from_secs(20);

/// The cluster, or `None` (the test is skipped, saying why) where PostgreSQL cannot be had.
fn cluster() -> Option<PgCluster> {
    match PgCluster::start() {
        Ok(cluster) => Some(cluster),
        Err(why) => {
            eprintln!("SKIPPED: PostgreSQL is not available here: {why}");
            None
        }
    }
}

/// A daemon in this process over the cluster's store.
async fn daemon(url: &str) -> TestServer {
    let url = url.to_string();
    TestServer::start_with(move |config| config.store = Some(url), false).await
}

/// A daemon over the cluster's store with an HTTP listener (the dashboard and `/metrics`), and its address.
async fn daemon_with_http(url: &str) -> (TestServer, std::net::SocketAddr) {
    let url = url.to_string();
    let server = TestServer::start_with(
        move |config| {
            config.store = Some(url);
            config.http_listen = Some("127.0.0.1:0".into());
        },
        false,
    )
    .await;
    let http = server.handle.as_ref().unwrap().http_addr().expect("an HTTP listener");
    (server, http)
}

fn lease(queue: &str, max: u32, wait_ms: u64, lease_ms: Option<u64>) -> Lease {
    Lease { queues: vec![queue.to_string()], max, wait_ms, lease_ms }
}

fn spec(task: &str, queue: &str, args: Vec<Value>) -> TaskSpec {
    TaskSpec { args, queue: Some(queue.to_string()), ..TaskSpec::new(task) }
}

fn code(e: broker_client::Error) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_serve_one_store_and_wake_each_other() {
    let Some(pg) = cluster() else { return };
    let url = pg.multi_host_url();
    let (a, b, c) = (daemon(&url).await, daemon(&url).await, daemon(&url).await);
    let (ca, cb, cc) = (a.client().await, b.client().await, c.client().await);

    // Enqueue through A, lease through B, ack through C, read through A.
    let mut task = spec("add", "q1", vec![Value::from(2), Value::from(3)]);
    task.context.insert("user".into(), Value::from("ada"));
    let enqueued = ca.enqueue(task.clone()).await.unwrap();
    assert!(enqueued.created);
    assert_eq!(enqueued.state, TaskState::Pending);
    let leased = cb.lease(&lease("q1", 10, 0, None)).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!((leased[0].id.as_str(), leased[0].attempt), (enqueued.id.as_str(), 1));
    assert_eq!(leased[0].args, task.args);
    assert_eq!(leased[0].context, task.context);
    assert_eq!(ca.get(&enqueued.id).await.unwrap().state, TaskState::Started);
    cc.ack(&leased[0].id, leased[0].lease_id, Value::from(5)).await.unwrap();
    let info = ca.get(&enqueued.id).await.unwrap();
    assert_eq!((info.state, info.result.clone(), info.attempts), (TaskState::Success, Some(Value::from(5)), 1));
    assert_eq!(info.context, task.context);
    // Enqueue by id is idempotent across daemons.
    let again = cb.enqueue(TaskSpec { id: Some(enqueued.id.clone()), ..task.clone() }).await.unwrap();
    assert_eq!((again.created, again.state), (false, TaskState::Success));

    // A lease waiting on B wakes when A enqueues (NOTIFY), well before its wait ends.
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let tasks = cb.lease(&lease("q2", 1, 15_000, None)).await.unwrap();
        (tasks, started.elapsed(), cb)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = ca.enqueue(spec("mul", "q2", vec![Value::from(4)])).await.unwrap();
    let (tasks, took, cb) = tokio::time::timeout(WAIT, waiting).await.expect("the waiting lease ends").unwrap();
    assert_eq!(tasks.len(), 1, "the waiting lease on B got the task enqueued through A");
    assert_eq!(tasks[0].id, second.id);
    assert!(took < Duration::from_secs(10), "woken by the enqueue, not by its wait ending: {took:?}");

    // A get waiting on C wakes when B acks.
    let id = second.id.clone();
    let waiter = tokio::spawn(async move { cc.wait(&id, Duration::from_secs(15)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cb.ack(&tasks[0].id, tasks[0].lease_id, Value::from(8)).await.unwrap();
    let info = tokio::time::timeout(WAIT, waiter).await.expect("the waiting get ends").unwrap();
    assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::from(8))));

    // Stats see the store, not the daemon: one queue's tasks through any daemon.
    let stats = ca.stats().await.unwrap();
    assert_eq!(stats.fsync, "postgres");
    assert!(stats.results_stored >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_is_fenced_and_a_killed_daemons_lease_comes_back_once() {
    let Some(pg) = cluster() else { return };
    let url = pg.multi_host_url();
    let dir = tempfile::tempdir().unwrap();
    // A daemon in a process of its own, to kill -9 while its worker holds a lease.
    let doomed = Daemon::spawn_with(dir.path(), &["--store", &url]);
    let survivor = daemon(&url).await;
    let producer = survivor.client().await;
    let enqueued = producer.enqueue(spec("slow", "fence", vec![])).await.unwrap();

    let worker = doomed.client().await;
    let first = worker.lease(&lease("fence", 1, 0, Some(1_000))).await.unwrap();
    assert_eq!(first.len(), 1);
    doomed.kill_9();

    // Its lease lapses; any daemon's tick puts the task back, and a second worker gets it with a new lease.
    let second_worker = survivor.client().await;
    let second = eventually("the task to come back after its lease lapsed", WAIT, || async {
        let tasks = second_worker.lease(&lease("fence", 1, 0, Some(30_000))).await.unwrap();
        (!tasks.is_empty()).then_some(tasks)
    })
    .await;
    assert_eq!(second[0].id, enqueued.id);
    assert_eq!(second[0].attempt, 2);
    assert_ne!(second[0].lease_id, first[0].lease_id);

    // The first worker's ack (its daemon came back, say) names the old lease: refused, nothing recorded.
    let stale = producer.ack(&first[0].id, first[0].lease_id, Value::from("stale")).await.unwrap_err();
    assert_eq!(code(stale), Some(ErrorCode::LeaseLost));
    assert_eq!(producer.get(&enqueued.id).await.unwrap().state, TaskState::Started);
    second_worker.ack(&second[0].id, second[0].lease_id, Value::from("fresh")).await.unwrap();
    let late = producer.ack(&first[0].id, first[0].lease_id, Value::from("late")).await.unwrap_err();
    assert_eq!(code(late), Some(ErrorCode::LeaseLost));
    let info = producer.get(&enqueued.id).await.unwrap();
    assert_eq!((info.state, info.result, info.attempts), (TaskState::Success, Some(Value::from("fresh")), 2));
    let rows = pg.psql(0, "SELECT count(*) FROM broker_tasks WHERE queue = 'fence'").unwrap();
    assert_eq!(rows.trim(), "1", "exactly one task, with one result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_dead_set_revoke_purge_and_ordering() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let server = daemon(&url).await;
    let client = server.client().await;

    // A failure retries after its countdown, then dies; the dead set lists it; requeue brings it back.
    let task = TaskSpec { max_retries: Some(1), ..spec("flaky", "r", vec![]) };
    let id = client.enqueue(task).await.unwrap().id;
    let error = TaskError { kind: "ValueError".into(), message: "no".into(), traceback: None };
    let fail =
        |lease_id, retry| Fail { task_id: id.clone(), lease_id, error: error.clone(), retry, countdown_ms: Some(50) };
    let t = client.lease(&lease("r", 1, 0, None)).await.unwrap().remove(0);
    let failed = client.fail(&fail(t.lease_id, true)).await.unwrap();
    assert_eq!(failed.state, TaskState::Retry);
    assert_eq!(client.get(&id).await.unwrap().state, TaskState::Retry);
    let t = eventually("the retry to come due", WAIT, || async {
        client.lease(&lease("r", 1, 0, None)).await.unwrap().pop()
    })
    .await;
    assert_eq!(t.attempt, 2);
    let failed = client.fail(&fail(t.lease_id, true)).await.unwrap();
    assert_eq!(failed.state, TaskState::Failure, "no retries left");
    let info = client.get(&id).await.unwrap();
    assert_eq!((info.state, info.error.as_ref().map(|e| e.kind.as_str())), (TaskState::Failure, Some("ValueError")));
    let dead = client.dead_list(Some("r"), 10).await.unwrap();
    assert_eq!(dead.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    let requeued = client.dead_requeue(DeadRequeue { ids: vec![id.clone()], queue: None }).await.unwrap();
    assert_eq!(requeued, 1);
    assert_eq!(client.get(&id).await.unwrap().state, TaskState::Pending);
    assert!(client.dead_list(Some("r"), 10).await.unwrap().is_empty());

    // Revoke: a waiting task is finished at once; a running one is marked, and its ack refused with `revoked`.
    let waiting = client.enqueue(spec("w", "v", vec![])).await.unwrap().id;
    assert_eq!(client.revoke(&waiting).await.unwrap(), TaskState::Revoked);
    let running = client.enqueue(spec("w", "v", vec![])).await.unwrap().id;
    let t = client.lease(&lease("v", 1, 0, None)).await.unwrap().remove(0);
    assert_eq!(t.id, running);
    assert_eq!(client.revoke(&running).await.unwrap(), TaskState::Started);
    assert!(client.extend(&t.id, t.lease_id, None).await.unwrap().revoked);
    let refused = client.ack(&t.id, t.lease_id, Value::Nil).await.unwrap_err();
    assert_eq!(code(refused), Some(ErrorCode::Revoked));
    assert_eq!(client.get(&running).await.unwrap().state, TaskState::Revoked);
    let unknown = client.get("no-such-task").await.unwrap_err();
    assert_eq!(code(unknown), Some(ErrorCode::NotFound));

    // Release gives the task back unrun; purge removes what waits; priority before order.
    client.enqueue(TaskSpec { priority: 0, ..spec("low", "p", vec![]) }).await.unwrap();
    let high = client.enqueue(TaskSpec { priority: 9, ..spec("high", "p", vec![]) }).await.unwrap().id;
    let t = client.lease(&lease("p", 1, 0, None)).await.unwrap().remove(0);
    assert_eq!(t.id, high, "the higher priority first");
    client.release(&t.id, t.lease_id).await.unwrap();
    assert_eq!(client.get(&high).await.unwrap().attempts, 0, "a release does not count the attempt");
    assert_eq!(client.purge("p").await.unwrap(), 2);
    assert!(client.lease(&lease("p", 5, 0, None)).await.unwrap().is_empty());

    // Pipelined requests on one connection take effect in the order sent, though each is a statement of its own:
    // a get sent right behind the enqueue of its task finds it, and enqueues keep their order in the queue.
    let (enqueued, got) = tokio::join!(
        client.enqueue(TaskSpec { id: Some("in-order".into()), ..spec("o", "o", vec![]) }),
        client.get("in-order")
    );
    assert!(enqueued.unwrap().created);
    assert_eq!(got.unwrap().state, TaskState::Pending);
    let sent = futures_util::future::join_all((0..40).map(|i| client.enqueue(spec("o", "o", vec![Value::from(i)]))));
    let ids: Vec<String> = sent.await.into_iter().map(|e| e.unwrap().id).collect();
    let leased = client.lease(&lease("o", 41, 0, None)).await.unwrap();
    let order: Vec<&str> = leased.iter().skip(1).map(|t| t.id.as_str()).collect();
    assert_eq!(order, ids.iter().map(String::as_str).collect::<Vec<_>>(), "FIFO as sent");

    // Pipelined enqueues and acks share multi-row statements: the same id twice creates one task, and a stale ack
    // among good ones is refused alone.
    let twice = TaskSpec { id: Some("twice".into()), ..spec("t", "m", vec![]) };
    let (first, second) = tokio::join!(client.enqueue(twice.clone()), client.enqueue(twice));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!((first.created, second.created), (true, false));
    assert_eq!((first.state, second.state), (TaskState::Pending, TaskState::Pending));
    for i in 0..4 {
        client.enqueue(spec("t", "m", vec![Value::from(i)])).await.unwrap();
    }
    let leased = client.lease(&lease("m", 5, 0, None)).await.unwrap();
    assert_eq!(leased.len(), 5);
    let acks = futures_util::future::join_all(leased.iter().enumerate().map(|(i, t)| {
        let lease_id = if i == 2 { t.lease_id + 1_000_000 } else { t.lease_id };
        client.ack(&t.id, lease_id, Value::from(i as i64))
    }))
    .await;
    for (i, ack) in acks.into_iter().enumerate() {
        match i {
            2 => assert_eq!(code(ack.unwrap_err()), Some(ErrorCode::LeaseLost)),
            _ => ack.unwrap(),
        }
    }
    for (i, t) in leased.iter().enumerate() {
        let info = client.get(&t.id).await.unwrap();
        let expected =
            if i == 2 { (TaskState::Started, None) } else { (TaskState::Success, Some(Value::from(i as i64))) };
        assert_eq!((info.state, info.result), expected, "task {i}");
    }

    // A schedule's task may carry a chain, as on the single node.
    let chained = TaskSpec { chain: vec![TaskSpec::new("next")], ..TaskSpec::new("t") };
    let schedule = ScheduleAdd { name: "s".into(), task: chained, every_ms: Some(60_000), ..Default::default() };
    assert_eq!(client.schedule_add(&schedule).await.unwrap().task.chain.len(), 1);
    assert!(client.schedule_remove("s").await.unwrap());
    assert_eq!(client.stats().await.unwrap().fsync, "postgres");
}

/// Enqueues through `client` until one succeeds; how long that took.
async fn until_answered(client: &Client, queue: &str) -> Duration {
    let started = Instant::now();
    loop {
        match client.enqueue(spec("probe", queue, vec![])).await {
            Ok(_) => return started.elapsed(),
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(60), "no answer 60 s after the failover: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_keeps_every_acknowledged_enqueue_and_result() {
    let Some(pg) = cluster() else { return };
    let url = pg.multi_host_url();
    let (a, b) = (daemon(&url).await, daemon(&url).await);
    let producer = ConnectOptions::new(a.addr()).connect().await.unwrap();
    let worker = ConnectOptions::new(b.addr()).connect().await.unwrap();

    // Acknowledged work: 200 enqueues, half of them run to a result.
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(producer.enqueue(spec("job", "f", vec![Value::from(i)])).await.unwrap().id);
    }
    let mut done = Vec::new();
    while done.len() < 100 {
        for t in worker.lease(&lease("f", 50, 0, None)).await.unwrap() {
            if done.len() < 100 {
                worker.ack(&t.id, t.lease_id, Value::from(t.args[0].as_i64().unwrap() * 2)).await.unwrap();
                done.push(t.id);
            } else {
                worker.release(&t.id, t.lease_id).await.unwrap();
            }
        }
    }

    // The primary crashes; a synchronous standby is promoted (it holds every acknowledged commit).
    let crashed = Instant::now();
    pg.stop_primary();
    // Meanwhile a request fails with a coded error, not a hang or a closed connection.
    let during = producer.enqueue(spec("during", "f", vec![])).await;
    if let Err(e) = &during {
        assert_eq!(e.code(), Some(ErrorCode::StoreUnavailable), "{e}");
    }
    let promoted = pg.promote_most_advanced();
    let promote_took = crashed.elapsed();
    let answered = until_answered(&producer, "f-probe").await;
    let worker_answered = until_answered(&worker, "f-probe").await;
    eprintln!(
        "failover: standby{promoted} promoted {promote_took:?} after the crash; daemons answered {answered:?} and \
         {worker_answered:?} after that"
    );
    assert!(answered < Duration::from_secs(15), "daemon A answered {answered:?} after the promotion");

    for (i, id) in ids.iter().enumerate() {
        let info = producer.get(id).await.unwrap();
        if done.contains(id) {
            assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::from(i as i64 * 2))), "{id}");
        } else {
            assert!(matches!(info.state, TaskState::Pending), "{id}: {:?}", info.state);
        }
    }
    // And the rest can still run, through the other daemon.
    let mut left = 0;
    while let Some(t) = worker.lease(&lease("f", 1, 0, None)).await.unwrap().pop() {
        worker.ack(&t.id, t.lease_id, Value::Nil).await.unwrap();
        left += 1;
    }
    assert!(left >= 100, "the 100 waiting tasks (and the one enqueued during the failover, if it took) ran: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_limits_hold_across_daemons() {
    let Some(pg) = cluster() else { return };
    let url = pg.multi_host_url();
    let (a, b) = (daemon(&url).await, daemon(&url).await);
    let (ca, cb) = (a.client().await, b.client().await);

    // Paused through A: B leases nothing from the queue; resumed through B: A leases.
    ca.enqueue(spec("p", "paused", vec![])).await.unwrap();
    assert!(!ca.set_paused("paused", true).await.unwrap());
    assert!(cb.lease(&lease("paused", 5, 0, None)).await.unwrap().is_empty());
    let stats = cb.stats().await.unwrap();
    assert!(stats.queues.iter().any(|q| q.name == "paused" && q.paused && q.ready == 1), "{:?}", stats.queues);
    assert!(cb.set_paused("paused", false).await.unwrap(), "it was paused");
    assert_eq!(ca.lease(&lease("paused", 5, 0, None)).await.unwrap().len(), 1);

    // At most 2 of task `heavy` run at once, whichever daemon leases them.
    let limit = |concurrency, rate: Option<&str>| broker_client::proto::SetLimit {
        scope: "task".into(),
        name: "heavy".into(),
        rate: rate.map(str::to_string),
        concurrency,
    };
    ca.set_limit(&limit(Some(2), None)).await.unwrap();
    for _ in 0..5 {
        ca.enqueue(spec("heavy", "lim", vec![])).await.unwrap();
        ca.enqueue(spec("light", "lim", vec![])).await.unwrap();
    }
    let first = ca.lease(&lease("lim", 10, 0, None)).await.unwrap();
    let heavy = |tasks: &[broker_client::proto::LeasedTask]| tasks.iter().filter(|t| t.task == "heavy").count();
    assert_eq!((heavy(&first), first.len()), (2, 7), "2 heavy (the limit) and the 5 light ones");
    assert!(cb.lease(&lease("lim", 10, 0, None)).await.unwrap().is_empty(), "B is held back too");
    let limits = cb.limits().await.unwrap();
    assert_eq!(limits.len(), 1);
    assert_eq!((limits[0].name.as_str(), limits[0].running, limits[0].concurrency), ("heavy", 2, Some(2)));
    let done = first.iter().find(|t| t.task == "heavy").unwrap();
    ca.ack(&done.id, done.lease_id, Value::Nil).await.unwrap();
    let next = cb.lease(&lease("lim", 10, 0, None)).await.unwrap();
    assert_eq!(heavy(&next), 1, "a slot freed through A lets one start through B");

    // A rate of 1/h (a bucket of one) lets one start, then none, across daemons.
    ca.set_limit(&broker_client::proto::SetLimit { name: "rated".into(), ..limit(None, Some("1/h")) }).await.unwrap();
    for _ in 0..3 {
        ca.enqueue(spec("rated", "rate", vec![])).await.unwrap();
    }
    assert_eq!(ca.lease(&lease("rate", 3, 0, None)).await.unwrap().len(), 1);
    assert!(cb.lease(&lease("rate", 3, 0, None)).await.unwrap().is_empty());
    // Declared again (a worker restarting): the same limit keeps its bucket.
    cb.set_limit(&broker_client::proto::SetLimit { name: "rated".into(), ..limit(None, Some("1/h")) }).await.unwrap();
    assert!(cb.lease(&lease("rate", 3, 0, None)).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_keys_chains_and_chords_hold_across_daemons() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let (a, b) = (daemon(&url).await, daemon(&url).await);
    let (ca, cb) = (a.client().await, b.client().await);

    // One unique key enqueued 20 times at once through two daemons: one task, which every answer names.
    let unique = TaskSpec { unique_key: Some("report:7".into()), ..spec("report", "u", vec![]) };
    let tries = (0..20).map(|i| {
        let client = if i % 2 == 0 { &ca } else { &cb };
        client.enqueue(unique.clone())
    });
    let answers: Vec<_> = futures_util::future::join_all(tries).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers.iter().filter(|e| e.created).count(), 1, "{answers:?}");
    assert!(answers.iter().all(|e| e.id == answers[0].id && e.state == TaskState::Pending));
    // Held until the task finishes: then the key makes a new task.
    let t = cb.lease(&lease("u", 5, 0, None)).await.unwrap();
    assert_eq!(t.len(), 1);
    let running = ca.enqueue(unique.clone()).await.unwrap();
    assert_eq!((running.created, running.state), (false, TaskState::Started), "held while it runs");
    ca.ack(&t[0].id, t[0].lease_id, Value::Nil).await.unwrap();
    let next = cb.enqueue(unique.clone()).await.unwrap();
    assert!(next.created && next.id != answers[0].id);

    // A chord whose members are acked through both daemons at once: its callback is released once, with the
    // results in header order.
    let header: Vec<TaskSpec> = (0..6).map(|i| spec("part", "parts", vec![Value::from(i)])).collect();
    let chord = ca.enqueue_chord(header, spec("whole", "wholes", vec![])).await.unwrap();
    assert_eq!(cb.get(&chord.callback.id).await.unwrap().state, TaskState::Pending);
    let parts = cb.lease(&lease("parts", 6, 0, None)).await.unwrap();
    assert_eq!(parts.len(), 6);
    let acks = parts.iter().enumerate().map(|(i, t)| {
        let client = if i % 2 == 0 { &ca } else { &cb };
        client.ack(&t.id, t.lease_id, Value::from(t.args[0].as_i64().unwrap() * 10))
    });
    for ack in futures_util::future::join_all(acks).await {
        ack.unwrap();
    }
    let whole = ca.lease(&lease("wholes", 5, 5_000, None)).await.unwrap();
    assert_eq!(whole.len(), 1, "released once");
    assert_eq!(whole[0].id, chord.callback.id);
    let results: Vec<Value> = (0..6).map(|i| Value::from(i * 10)).collect();
    assert_eq!(whole[0].args, vec![Value::Array(results)]);

    // A chain: the head's result goes to the next link (leased through the other daemon); a link that fails
    // ends the links after it with its error, and only it is in the dead set.
    let head = TaskSpec {
        chain: vec![
            TaskSpec { max_retries: Some(0), ..spec("second", "chain", vec![]) },
            spec("third", "chain", vec![]),
        ],
        ..spec("first", "chain", vec![])
    };
    let enqueued = ca.enqueue(head).await.unwrap();
    assert_eq!(enqueued.chain.len(), 2);
    assert_eq!(cb.get(&enqueued.chain[1]).await.unwrap().state, TaskState::Pending, "a held link");
    let t = cb.lease(&lease("chain", 5, 0, None)).await.unwrap();
    assert_eq!(t.len(), 1, "only the head is in the queue");
    cb.ack(&t[0].id, t[0].lease_id, Value::from("one")).await.unwrap();
    let t = ca.lease(&lease("chain", 5, 5_000, None)).await.unwrap();
    assert_eq!(
        (t.len(), t[0].id.as_str(), t[0].args.clone()),
        (1, enqueued.chain[0].as_str(), vec![Value::from("one")])
    );
    let error = TaskError { kind: "KeyError".into(), message: "gone".into(), traceback: None };
    let fail = Fail { task_id: t[0].id.clone(), lease_id: t[0].lease_id, error, retry: true, countdown_ms: None };
    assert_eq!(cb.fail(&fail).await.unwrap().state, TaskState::Failure);
    let third = ca.get(&enqueued.chain[1]).await.unwrap();
    assert_eq!((third.state, third.error.map(|e| e.kind)), (TaskState::Failure, Some("KeyError".to_string())));
    let dead = cb.dead_list(Some("chain"), 10).await.unwrap();
    assert_eq!(dead.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [enqueued.chain[0].as_str()]);
    assert!(ca.lease(&lease("chain", 5, 0, None)).await.unwrap().is_empty(), "the failed link never runs");

    // A link not enqueued yet is not revoked (as on the single node: it is no task yet); the chain goes on.
    let head = TaskSpec { id: Some("h".into()), chain: vec![spec("l1", "c2", vec![])], ..spec("h", "c2", vec![]) };
    let enqueued = ca.enqueue(head.clone()).await.unwrap();
    assert_eq!(cb.revoke(&enqueued.chain[0]).await.unwrap(), TaskState::Pending);
    // Enqueued again by its id (a retry): found, with no new links.
    let again = cb.enqueue(head).await.unwrap();
    assert_eq!((again.created, again.chain.len()), (false, 0));
    let held = pg.psql(0, "SELECT count(*) FROM broker_tasks WHERE state = 'HELD' AND queue = 'c2'").unwrap();
    assert_eq!(held.trim(), "1", "one link, not one per enqueue");
    let t = ca.lease(&lease("c2", 5, 0, None)).await.unwrap();
    ca.ack(&t[0].id, t[0].lease_id, Value::Nil).await.unwrap();
    let t = cb.lease(&lease("c2", 5, 5_000, None)).await.unwrap();
    assert_eq!(t[0].id, enqueued.chain[0]);
    cb.ack(&t[0].id, t[0].lease_id, Value::Nil).await.unwrap();
    // A purged head takes its links with it.
    let head = TaskSpec { chain: vec![spec("l1", "c3", vec![])], ..spec("h", "c3", vec![]) };
    let enqueued = ca.enqueue(head).await.unwrap();
    assert_eq!(cb.purge("c3").await.unwrap(), 1);
    assert_eq!(code(ca.get(&enqueued.chain[0]).await.unwrap_err()), Some(ErrorCode::NotFound));

    // A unique task requeued from the dead set holds its key again.
    let unique = TaskSpec { unique_key: Some("once".into()), max_retries: Some(0), ..spec("u", "u2", vec![]) };
    let first = ca.enqueue(unique.clone()).await.unwrap();
    let t = cb.lease(&lease("u2", 1, 0, None)).await.unwrap().remove(0);
    let error = TaskError { kind: "E".into(), message: "no".into(), traceback: None };
    let fail = Fail { task_id: t.id.clone(), lease_id: t.lease_id, error, retry: false, countdown_ms: None };
    assert_eq!(cb.fail(&fail).await.unwrap().state, TaskState::Failure);
    // The ticks free the key of the dead task.
    eventually("the key freed", WAIT, || async {
        let rows = pg.psql(0, "SELECT count(*) FROM broker_unique WHERE key = 'once'").unwrap();
        (rows.trim() == "0").then_some(())
    })
    .await;
    let requeue = DeadRequeue { ids: vec![first.id.clone()], queue: None };
    assert_eq!(ca.dead_requeue(requeue).await.unwrap(), 1);
    let found = cb.enqueue(unique).await.unwrap();
    assert_eq!((found.created, found.id.as_str()), (false, first.id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_every_daemon_reach_a_follower_in_order() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let (a, b) = (daemon(&url).await, daemon(&url).await);
    let (ca, cb) = (a.client().await, b.client().await);
    let follow = |after, wait_ms| Events { after, max: 100, wait_ms, queue: Some("ev".into()) };
    // B's client follows; A hears of it (a notification) and publishes its changes' events from then on.
    let mut cursor = cb.events(&follow(None, 0)).await.unwrap().next;
    eventually("A to publish events", WAIT, || {
        let (ca, cb) = (&ca, &cb);
        async move {
            let probe = ca.enqueue(spec("probe", "ev", vec![])).await.unwrap().id;
            let seen = cb.events(&follow(None, 0)).await.unwrap().next;
            let list = cb.events(&follow(Some(seen.saturating_sub(50)), 300)).await.unwrap();
            list.events.iter().any(|e| e.task_id == probe).then_some(())
        }
    })
    .await;
    // Past the probes.
    cursor = loop {
        let list = cb.events(&follow(Some(cursor), 0)).await.unwrap();
        if list.events.is_empty() {
            break list.next;
        }
        cursor = list.next;
    };
    // Enqueued through A, leased through B, acked through A: B's follower sees the three, in that order.
    let id = ca.enqueue(spec("watched", "ev", vec![])).await.unwrap().id;
    let t = loop {
        let mut leased = cb.lease(&lease("ev", 1, 1000, None)).await.unwrap();
        let t = leased.pop().expect("a task");
        if t.id == id {
            break t;
        }
        cb.ack(&t.id, t.lease_id, Value::Nil).await.unwrap();
    };
    ca.ack(&t.id, t.lease_id, Value::from(1)).await.unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.len() < 3 && Instant::now() < deadline {
        let list = cb.events(&follow(Some(cursor), 1000)).await.unwrap();
        cursor = list.next;
        seen.extend(list.events.into_iter().filter(|e| e.task_id == id).map(|e| e.event));
    }
    assert_eq!(seen, ["enqueued", "started", "succeeded"]);
}

/// The ticks (ms) of schedule `name` whose tasks are stored, in order.
fn ticks_stored(pg: &PgCluster, name: &str) -> Vec<u64> {
    let rows = pg.psql(0, &format!("SELECT id FROM broker_tasks WHERE id LIKE 'sched:{name}:%' ORDER BY id")).unwrap();
    let mut ticks: Vec<u64> = rows.lines().map(|id| id.rsplit_once(':').unwrap().1.parse().unwrap()).collect();
    ticks.sort_unstable();
    ticks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_each_tick_once_whichever_daemon_ticks() {
    let Some(pg) = cluster() else { return };
    let url = pg.multi_host_url();
    let (a, b) = (daemon(&url).await, daemon(&url).await);
    let (ca, cb) = (a.client().await, b.client().await);

    // Added through A; the same definition again through B changes nothing.
    let beat = ScheduleAdd {
        name: "beat".into(),
        task: spec("ping", "beat", vec![Value::from(1)]),
        every_ms: Some(1000),
        ..Default::default()
    };
    let added = ca.schedule_add(&beat).await.unwrap();
    let first = added.next_ms.expect("a next tick");
    assert_eq!((added.last_ms, added.catch_up.as_str(), added.paused), (None, "once", false));
    assert_eq!(cb.schedule_add(&beat).await.unwrap(), added);

    // Both daemons tick every 50 ms; each tick of the schedule is enqueued once, none lost.
    let listed = eventually("three ticks fired", WAIT, || async {
        let info = cb.schedules().await.unwrap().pop().unwrap();
        (info.last_ms >= Some(first + 2000)).then_some(info)
    })
    .await;
    assert_eq!(listed.name, "beat");
    let paused = cb.schedule_set_paused("beat", true).await.unwrap();
    assert!(paused.paused && paused.next_ms.is_none(), "{paused:?}");
    let ticks = ticks_stored(&pg, "beat");
    let expected: Vec<u64> = (0..ticks.len() as u64).map(|i| first + i * 1000).collect();
    assert_eq!(ticks, expected, "every tick from the first, 1000 ms apart, each once");
    assert!(ticks.len() >= 3);
    assert_eq!(paused.last_ms, ticks.last().copied(), "last_ms is the latest tick stored");
    let (sa, sb) = (ca.stats().await.unwrap(), cb.stats().await.unwrap());
    assert_eq!(sa.totals.enqueued + sb.totals.enqueued, ticks.len() as u64, "each tick's task created once");
    let task = ca.get(&format!("sched:beat:{first}")).await.unwrap();
    assert_eq!((task.task.as_str(), task.queue.as_str(), task.args.clone()), ("ping", "beat", vec![Value::from(1)]));

    // Paused through B: no daemon fires it (two periods pass; neither daemon's ticks add a task).
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(ticks_stored(&pg, "beat"), ticks, "no tick while paused");
    // Resumed through A: ticks that fell while it was paused never fire; the next one after the resume does.
    let resumed = ca.schedule_set_paused("beat", false).await.unwrap();
    let next = resumed.next_ms.expect("a next tick");
    assert!(!resumed.paused && next > *ticks.last().unwrap() + 2000, "{resumed:?}");
    eventually("the tick after the resume", WAIT, || async { ticks_stored(&pg, "beat").contains(&next).then_some(()) })
        .await;
    let after = ticks_stored(&pg, "beat");
    assert_eq!(after[..ticks.len()], ticks[..]);
    assert!(after[ticks.len()..].iter().all(|t| *t >= next), "nothing from the pause: {after:?}");

    // A different definition takes effect from now, keeping last_ms; removing it stops it.
    let changed = ca.schedule_add(&ScheduleAdd { every_ms: Some(60_000), ..beat.clone() }).await.unwrap();
    assert_eq!(changed.every_ms, Some(60_000));
    assert!(changed.last_ms >= Some(next) && changed.next_ms > changed.last_ms.map(|t| t + 50_000), "{changed:?}");
    assert!(cb.schedule_remove("beat").await.unwrap());
    assert!(!ca.schedule_remove("beat").await.unwrap());
    assert!(ca.schedules().await.unwrap().is_empty());
    let unknown = cb.schedule_set_paused("beat", true).await.unwrap_err();
    assert_eq!(code(unknown), Some(ErrorCode::NotFound));

    // Refused as the single node refuses them.
    let bad_cron = ScheduleAdd { cron: Some("not cron".into()), every_ms: None, ..beat.clone() };
    assert_eq!(code(ca.schedule_add(&bad_cron).await.unwrap_err()), Some(ErrorCode::BadRequest));
    let with_id = ScheduleAdd { task: TaskSpec { id: Some("fixed".into()), ..beat.task.clone() }, ..beat.clone() };
    assert_eq!(code(cb.schedule_add(&with_id).await.unwrap_err()), Some(ErrorCode::BadRequest));
    assert!(ca.schedules().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_no_daemon_fired_in_time_fires_once_or_is_skipped() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let server = daemon(&url).await;
    let client = server.client().await;

    // A daily cron tick ten minutes ago, due since then as if no daemon had run: `once` fires it, `skip` not.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let tick = (now / 60_000 - 10) * 60_000;
    let cron = format!("{} {} * * *", tick / 60_000 % 60, tick / 3_600_000 % 24);
    for (name, catch_up) in [("late-once", "once"), ("late-skip", "skip")] {
        let schedule = ScheduleAdd {
            name: name.into(),
            task: spec("daily", "late", vec![]),
            cron: Some(cron.clone()),
            catch_up: Some(catch_up.into()),
            ..Default::default()
        };
        let added = client.schedule_add(&schedule).await.unwrap();
        assert_eq!(added.next_ms, Some(tick + 86_400_000), "{added:?}");
    }
    pg.psql(0, &format!("UPDATE broker_schedules SET next_ms = {tick}")).unwrap();
    let listed = eventually("both late ticks handled", WAIT, || async {
        let listed = client.schedules().await.unwrap();
        listed.iter().all(|s| s.next_ms == Some(tick + 86_400_000)).then_some(listed)
    })
    .await;
    let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["late-once", "late-skip"]);
    assert_eq!((listed[0].last_ms, listed[1].last_ms), (Some(tick), None));
    assert_eq!(ticks_stored(&pg, "late-once"), [tick]);
    assert!(ticks_stored(&pg, "late-skip").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_into_a_full_queue_is_skipped_and_the_other_schedules_fire() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let server = TestServer::start_with(
        move |config| {
            config.store = Some(url);
            config.max_queue_length = 1;
        },
        false,
    )
    .await;
    let client = server.client().await;
    client.enqueue(spec("waiting", "full", vec![])).await.unwrap();
    let mut first_ticks = Vec::new();
    for (name, queue) in [("into-full", "full"), ("into-room", "room")] {
        let every = ScheduleAdd {
            name: name.into(),
            task: spec("ping", queue, vec![]),
            every_ms: Some(1000),
            ..Default::default()
        };
        first_ticks.push(client.schedule_add(&every).await.unwrap().next_ms.unwrap());
    }
    // The full queue's tick is refused alone (its savepoint rolled back), and its schedule moves on without
    // recording it; the other one's fires (once: its queue is full after that).
    let listed = eventually("the first tick of each schedule handled", WAIT, || async {
        let listed = client.schedules().await.unwrap();
        let past_first = listed.iter().zip(&first_ticks).all(|(s, first)| s.next_ms > Some(*first));
        past_first.then_some(listed)
    })
    .await;
    let room = &listed[1];
    assert_eq!((room.name.as_str(), room.last_ms), ("into-room", Some(first_ticks[1])), "{room:?}");
    assert_eq!(ticks_stored(&pg, "into-room").len(), 1);
    let full = listed.iter().find(|s| s.name == "into-full").unwrap();
    assert_eq!(full.last_ms, None, "{full:?}");
    assert!(full.next_ms.is_some());
    assert!(ticks_stored(&pg, "into-full").is_empty());
    assert_eq!(client.stats().await.unwrap().queues.iter().find(|q| q.name == "full").map(|q| q.ready), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_daemons_dashboard_shows_the_database_and_its_own_work() {
    let Some(pg) = cluster() else { return };
    let url = pg.primary_url();
    let ((a, http_a), (b, http_b)) = (daemon_with_http(&url).await, daemon_with_http(&url).await);
    let (ca, cb) = (a.client().await, b.client().await);

    // Through A: one task succeeds, one dies. Through B: one waits, and one runs (B's worker holds it).
    let done = ca.enqueue(spec("report", "dash", vec![])).await.unwrap().id;
    let t = ca.lease(&lease("dash", 1, 0, None)).await.unwrap().remove(0);
    assert_eq!(t.id, done);
    ca.ack(&t.id, t.lease_id, Value::from(1)).await.unwrap();
    let dead = ca.enqueue(spec("report", "dash", vec![])).await.unwrap().id;
    let t = ca.lease(&lease("dash", 1, 0, None)).await.unwrap().remove(0);
    let error = TaskError { kind: "ValueError".into(), message: "no such report".into(), traceback: None };
    let fail = Fail { task_id: dead.clone(), lease_id: t.lease_id, error, retry: false, countdown_ms: None };
    assert_eq!(ca.fail(&fail).await.unwrap().state, TaskState::Failure);
    cb.enqueue(spec("report", "dash", vec![])).await.unwrap();
    let running = cb.enqueue(spec("long", "busy", vec![])).await.unwrap().id;
    assert_eq!(cb.lease(&lease("busy", 1, 0, None)).await.unwrap().remove(0).id, running);

    let get = |http, path: &str| {
        let (status, _, body) = http_request(http, "GET", path, "", "");
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    };
    let dead_id = dead.clone();
    let (page_a, page_b) = tokio::task::spawn_blocking(move || {
        // The dead set is the database's: B shows what died through A, and requeues it.
        assert!(get(http_b, "/dead").contains(&format!(r#"data-id="{dead_id}""#)));
        assert!(get(http_b, &format!("/task/{dead_id}")).contains(r#"class="requeue""#));
        let form = "Content-Type: application/x-www-form-urlencoded\r\n";
        let (status, _, _) = http_request(http_b, "POST", "/dead/requeue", form, &format!("id={dead_id}"));
        assert_eq!(status, 303);
        assert!(!get(http_a, "/dead").contains(&dead_id));
        (get(http_a, "/"), get(http_b, "/"))
    })
    .await
    .unwrap();
    // Committed before B's redirect.
    assert_eq!(ca.get(&dead).await.unwrap().state, TaskState::Pending);
    // Each daemon shows its own workers: B's runs the task it leased; A's worker runs nothing now.
    let worker = |page: &str| page.split(r#"<tr class="worker">"#).nth(1).map(str::to_string).unwrap_or_default();
    assert!(worker(&page_b).contains(&format!("/task/{running}")), "{page_b}");
    assert!(worker(&page_a).contains("idle") && !page_a.contains(&format!("/task/{running}")), "{page_a}");

    // /metrics: what went through each daemon is its own; the queue gauges are the database's.
    let (metrics_a, metrics_b) =
        tokio::task::spawn_blocking(move || (get(http_a, "/metrics"), get(http_b, "/metrics"))).await.unwrap();
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    for (text, succeeded, enqueued) in [(&metrics_a, 1, 2), (&metrics_b, 0, 1)] {
        let line = format!(r#"broker_tasks_total{{queue="dash",task="report",outcome="succeeded"}} {succeeded}"#);
        assert!(has(text, &line), "no {line:?} in:\n{text}");
        let line = format!(r#"broker_tasks_total{{queue="dash",task="report",outcome="enqueued"}} {enqueued}"#);
        assert!(has(text, &line), "no {line:?} in:\n{text}");
        for line in [
            r#"broker_queue_tasks{queue="dash",state="ready"} 2"#,
            r#"broker_queue_tasks{queue="dash",state="dead"} 0"#,
            r#"broker_queue_tasks{queue="busy",state="leased"} 1"#,
        ] {
            assert!(has(text, line), "no {line:?} in:\n{text}");
        }
    }
    assert!(has(&metrics_a, r#"broker_tasks_total{queue="dash",task="report",outcome="dead"} 1"#));
    a.stop().await;
    b.stop().await;
}
