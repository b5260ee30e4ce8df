//! Chains and chords kept by the daemon: the next step is taken in the commit of the change that causes it,
//! failures end the steps that depended on it, and a kill -9 at any point neither loses nor repeats a step.

mod common;

use broker_client::proto::{DeadRequeue, Fail, Lease, LeasedTask, TaskSpec, TaskState, Value};
use broker_client::{Client, ConnectOptions};
use common::{Daemon, TestServer};

fn spec(task: &str, args: Vec<Value>) -> TaskSpec {
    TaskSpec { args, max_retries: Some(0), ..TaskSpec::new(task) }
}

async fn lease_one(client: &Client) -> Option<LeasedTask> {
    let lease = Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    client.lease(&lease).await.unwrap().pop()
}

async fn run_one(client: &Client, result: Value) -> LeasedTask {
    let task = lease_one(client).await.expect("a task to run");
    client.ack(&task.id, task.lease_id, result).await.unwrap();
    task
}

#[tokio::test]
async fn a_chain_passes_each_result_on_and_an_immutable_link_takes_none() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let head = TaskSpec {
        chain: vec![spec("double", vec![]), TaskSpec { immutable: true, ..spec("notify", vec!["done".into()]) }],
        ..spec("add", vec![2.into(), 3.into()])
    };
    let enqueued = client.enqueue(head).await.unwrap();
    assert_eq!(enqueued.chain.len(), 2, "the links' ids come back");
    let (double, notify) = (enqueued.chain[0].clone(), enqueued.chain[1].clone());
    assert_eq!(client.get(&enqueued.id).await.unwrap().chain, enqueued.chain);
    // A link not enqueued yet reads PENDING, with its own arguments (the result before it not added yet).
    let pending = client.get(&double).await.unwrap();
    assert_eq!((pending.state, pending.task.as_str(), pending.attempts), (TaskState::Pending, "double", 0));
    let waiting = {
        let client = server.client().await;
        let notify = notify.clone();
        tokio::spawn(async move { client.wait(&notify, std::time::Duration::from_secs(10)).await.unwrap() })
    };
    let add = run_one(&client, 5.into()).await;
    assert_eq!(add.id, enqueued.id);
    let task = run_one(&client, 10.into()).await;
    assert_eq!((task.id.as_str(), task.args.as_slice()), (double.as_str(), &[Value::from(5)][..]));
    let task = run_one(&client, Value::Nil).await;
    assert_eq!((task.id.as_str(), task.args.as_slice()), (notify.as_str(), &[Value::from("done")][..]));
    assert_eq!(client.get(&notify).await.unwrap().state, TaskState::Success);
    assert_eq!(waiting.await.unwrap().state, TaskState::Success, "a get waiting on the last link from the start");
    assert!(lease_one(&client).await.is_none());
    // A link with a chain of its own is refused.
    let nested =
        TaskSpec { chain: vec![TaskSpec { chain: vec![spec("x", vec![])], ..spec("y", vec![]) }], ..spec("z", vec![]) };
    assert!(client.enqueue(nested).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn a_failed_link_fails_the_rest_of_its_chain_and_a_requeue_resumes_it() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let head = TaskSpec { chain: vec![spec("b", vec![]), spec("c", vec![])], ..spec("a", vec![]) };
    let enqueued = client.enqueue(head).await.unwrap();
    let a = lease_one(&client).await.unwrap();
    let error = broker_client::proto::TaskError { kind: "ValueError".into(), message: "bad".into(), traceback: None };
    client
        .fail(&Fail { task_id: a.id.clone(), lease_id: a.lease_id, error, retry: true, countdown_ms: None })
        .await
        .unwrap();
    for link in &enqueued.chain {
        let info = client.get(link).await.unwrap();
        assert_eq!(info.state, TaskState::Failure);
        assert_eq!(info.error.as_ref().map(|e| e.kind.as_str()), Some("ValueError"), "the head's error");
        assert_eq!(info.attempts, 0, "it never ran");
    }
    // Only the task that ran is in the dead set.
    let dead = client.dead_list(None, 100).await.unwrap();
    assert_eq!(dead.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [enqueued.id.as_str()]);
    // Requeued and succeeding, the head resumes its chain.
    client
        .dead_requeue(broker_client::proto::DeadRequeue { ids: vec![enqueued.id.clone()], queue: None })
        .await
        .unwrap();
    run_one(&client, 1.into()).await;
    let b = run_one(&client, 2.into()).await;
    assert_eq!(b.id, enqueued.chain[0]);
    let c = run_one(&client, 3.into()).await;
    assert_eq!((c.id.as_str(), c.args.as_slice()), (enqueued.chain[1].as_str(), &[Value::from(2)][..]));
    // A revoked head revokes its links.
    let head = TaskSpec { chain: vec![spec("later", vec![])], ..spec("first", vec![]) };
    let enqueued = client.enqueue(head).await.unwrap();
    client.revoke(&enqueued.id).await.unwrap();
    assert_eq!(client.get(&enqueued.chain[0]).await.unwrap().state, TaskState::Revoked);
    server.stop().await;
}

#[tokio::test]
async fn a_chord_runs_its_callback_once_after_every_member_with_the_results_in_order() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let header: Vec<TaskSpec> = (0..3).map(|i| spec("square", vec![i.into()])).collect();
    let callback = TaskSpec { chain: vec![spec("report", vec![])], ..spec("sum", vec!["extra".into()]) };
    let chord = client.enqueue_chord(header, callback).await.unwrap();
    let info = client.get(&chord.callback.id).await.unwrap();
    assert_eq!((info.state, info.members.len()), (TaskState::Pending, 3));
    assert_eq!(client.get(&chord.header[1].id).await.unwrap().chord.as_deref(), Some(chord.callback.id.as_str()));
    // Members finish out of order; the callback waits in no queue until the last.
    let lease = Lease { queues: vec!["default".into()], max: 10, wait_ms: 0, lease_ms: None };
    let mut members = client.lease(&lease).await.unwrap();
    assert_eq!(members.len(), 3, "the callback is not leasable yet");
    members.reverse();
    for member in &members {
        assert!(lease_one(&client).await.is_none());
        let i = member.args[0].as_i64().unwrap();
        client.ack(&member.id, member.lease_id, (i * i).into()).await.unwrap();
    }
    let callback = lease_one(&client).await.expect("the callback, released");
    assert_eq!(callback.id, chord.callback.id);
    let results = Value::Array(vec![0.into(), 1.into(), 4.into()]);
    assert_eq!(callback.args, [results, "extra".into()]);
    client.ack(&callback.id, callback.lease_id, 5.into()).await.unwrap();
    // The callback's own chain goes on.
    let report = run_one(&client, Value::Nil).await;
    assert_eq!(report.args, [Value::from(5)]);
    server.stop().await;
}

#[tokio::test]
async fn a_failed_member_fails_the_callback_and_the_others_still_run() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let header: Vec<TaskSpec> = (0..3).map(|i| spec("fetch", vec![i.into()])).collect();
    let chord = client.enqueue_chord(header, spec("merge", vec![])).await.unwrap();
    let first = lease_one(&client).await.unwrap();
    let error = broker_client::proto::TaskError { kind: "IOError".into(), message: "down".into(), traceback: None };
    let fail = Fail { task_id: first.id.clone(), lease_id: first.lease_id, error, retry: false, countdown_ms: None };
    client.fail(&fail).await.unwrap();
    let callback = client.get(&chord.callback.id).await.unwrap();
    assert_eq!(callback.state, TaskState::Failure);
    let error = callback.error.unwrap();
    assert_eq!(error.kind, "ChordError");
    assert!(error.message.contains(&first.id) && error.message.contains("IOError"), "{}", error.message);
    run_one(&client, 1.into()).await;
    run_one(&client, 2.into()).await;
    assert!(lease_one(&client).await.is_none(), "the callback never runs");
    // A retried request (the callback's id exists) returns the chord as it is.
    let header: Vec<TaskSpec> = (0..2).map(|i| spec("fetch", vec![i.into()])).collect();
    let callback = TaskSpec { id: Some("merge-1".into()), ..spec("merge", vec![]) };
    let made = client.enqueue_chord(header.clone(), callback.clone()).await.unwrap();
    let again = client.enqueue_chord(header, callback).await.unwrap();
    assert!(made.callback.created && !again.callback.created);
    assert_eq!(
        made.header.iter().map(|e| &e.id).collect::<Vec<_>>(),
        again.header.iter().map(|e| &e.id).collect::<Vec<_>>()
    );
    assert!(client.enqueue_chord(Vec::new(), spec("merge", vec![])).await.is_err(), "an empty header");
    server.stop().await;
}

#[test]
fn kill_9_in_the_middle_of_a_chain_and_of_a_chord_loses_no_step() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let connect = |addr: String| async move { ConnectOptions::new(addr).connect().await.unwrap() };
    let mut daemon = Daemon::spawn(dir.path());
    let (chain_ids, callback_id) = runtime.block_on(async {
        let client = connect(daemon.addr.clone()).await;
        let head = TaskSpec { chain: vec![spec("b", vec![])], ..spec("a", vec![]) };
        let chain = client.enqueue(head).await.unwrap();
        // The head's ack is the last thing the daemon says before it dies.
        run_one(&client, "from a".into()).await;
        (chain.chain, chain.id)
    });
    daemon.kill_9();
    daemon = Daemon::spawn(dir.path());
    let callback = runtime.block_on(async {
        let client = connect(daemon.addr.clone()).await;
        let b = run_one(&client, Value::Nil).await;
        assert_eq!((b.id.as_str(), b.args.as_slice()), (chain_ids[0].as_str(), &[Value::from("from a")][..]));
        assert_ne!(b.id, callback_id);
        let header: Vec<TaskSpec> = (0..2).map(|i| spec("part", vec![i.into()])).collect();
        let chord = client.enqueue_chord(header, spec("whole", vec![])).await.unwrap();
        run_one(&client, "p0".into()).await;
        chord.callback.id
    });
    daemon.kill_9();
    daemon = Daemon::spawn(dir.path());
    runtime.block_on(async {
        let client = connect(daemon.addr.clone()).await;
        // The last member's ack, then straight to kill -9: the callback's release comes after the restart.
        run_one(&client, "p1".into()).await;
    });
    daemon.kill_9();
    daemon = Daemon::spawn(dir.path());
    runtime.block_on(async {
        let client = connect(daemon.addr.clone()).await;
        let task = common::eventually("the callback released", std::time::Duration::from_secs(5), || async {
            lease_one(&client).await
        })
        .await;
        assert_eq!(task.id, callback);
        assert_eq!(task.args, [Value::Array(vec!["p0".into(), "p1".into()])]);
        client.ack(&task.id, task.lease_id, Value::Nil).await.unwrap();
        assert!(lease_one(&client).await.is_none(), "no step ran twice");
    });
    daemon.kill_9();
}

#[tokio::test]
async fn requeueing_a_failed_head_resumes_its_chain_after_a_checkpoint_and_its_links_stay_out_of_the_dead_set() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let head = TaskSpec { chain: vec![spec("b", vec![])], ..spec("a", vec![]) };
    let enqueued = client.enqueue(head).await.unwrap();
    let a = lease_one(&client).await.unwrap();
    let error = broker_client::proto::TaskError { kind: "ValueError".into(), message: "bad".into(), traceback: None };
    client
        .fail(&Fail { task_id: a.id.clone(), lease_id: a.lease_id, error, retry: false, countdown_ms: None })
        .await
        .unwrap();
    // The finished records leave memory once sled has them.
    // On the single node, through a checkpoint (the dead head and its failed link written to sled).
    if let Some(store) = server.handle.as_ref().unwrap().local_store() {
        store.write_to_sled().unwrap();
        store.write_to_sled().unwrap();
    }
    // The link was failed by its head: it is not in the dead set and cannot be requeued on its own.
    let link = DeadRequeue { ids: vec![enqueued.chain[0].clone()], queue: None };
    assert_eq!(client.dead_requeue(link).await.unwrap(), 0);
    assert_eq!(client.dead_requeue(DeadRequeue { ids: vec![enqueued.id.clone()], queue: None }).await.unwrap(), 1);
    run_one(&client, "again".into()).await;
    let b = run_one(&client, Value::Nil).await;
    assert_eq!((b.id.as_str(), b.args.as_slice()), (enqueued.chain[0].as_str(), &[Value::from("again")][..]));
    assert!(lease_one(&client).await.is_none(), "b ran once");
    server.stop().await;
}

#[tokio::test]
async fn workflows_refuse_what_would_break_them() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let refused = |spec: TaskSpec| {
        let client = &client;
        async move { client.enqueue(spec).await.unwrap_err() }
    };
    // A link with a unique key (it could find another task), two tasks of a chain with one id, a schedule's id.
    let unique_link = TaskSpec { unique_key: Some("k".into()), ..spec("b", vec![]) };
    refused(TaskSpec { chain: vec![unique_link], ..spec("a", vec![]) }).await;
    let same = TaskSpec { id: Some("x".into()), ..spec("b", vec![]) };
    refused(TaskSpec { chain: vec![same.clone(), same.clone()], ..spec("a", vec![]) }).await;
    refused(TaskSpec { id: Some("x".into()), chain: vec![same], ..spec("a", vec![]) }).await;
    refused(TaskSpec { id: Some("sched:billing:1".into()), ..spec("a", vec![]) }).await;
    refused(TaskSpec { chain: vec![spec("b", vec![]); 1001], ..spec("a", vec![]) }).await;
    // A chord with one member twice, or a member with the callback's id.
    let member = TaskSpec { id: Some("m".into()), ..spec("part", vec![]) };
    assert!(client.enqueue_chord(vec![member.clone(), member.clone()], spec("whole", vec![])).await.is_err());
    let callback = TaskSpec { id: Some("m".into()), ..spec("whole", vec![]) };
    assert!(client.enqueue_chord(vec![member], callback).await.is_err());
    // A purged member fails its chord rather than leave the callback waiting for ever.
    let header = vec![TaskSpec { queue: Some("parts".into()), ..spec("part", vec![]) }];
    let chord = client.enqueue_chord(header, spec("whole", vec![])).await.unwrap();
    assert_eq!(client.purge("parts").await.unwrap(), 1);
    let callback = client.get(&chord.callback.id).await.unwrap();
    assert_eq!((callback.state, callback.error.unwrap().kind.as_str()), (TaskState::Failure, "ChordError"));
    server.stop().await;
}

#[tokio::test]
async fn a_chord_callbacks_countdown_counts_from_its_release() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let callback = TaskSpec { countdown_ms: Some(60_000), ..spec("whole", vec![]) };
    let chord = client.enqueue_chord(vec![spec("part", vec![])], callback).await.unwrap();
    server.clock().advance(std::time::Duration::from_secs(120));
    run_one(&client, 1.into()).await;
    server.tick();
    assert_eq!(client.get(&chord.callback.id).await.unwrap().state, TaskState::Scheduled);
    assert!(lease_one(&client).await.is_none(), "a minute after its release, not after the chord's enqueue");
    server.clock().advance(std::time::Duration::from_secs(60));
    server.tick();
    assert_eq!(lease_one(&client).await.expect("the callback").id, chord.callback.id);
    server.stop().await;
}
