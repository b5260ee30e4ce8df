//! What survives a restart: a clean one in-process, and `kill -9` of the real `broker serve` binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use broker_client::proto::{ErrorCode, Lease, TaskSpec, TaskState, Value};
use broker_client::{Client, ConnectOptions};
use common::TestServer;

fn lease(max: u32) -> Lease {
    Lease { queues: vec!["default".into()], max, wait_ms: 0, lease_ms: None }
}

#[tokio::test]
async fn a_clean_restart_keeps_queues_results_schedules_and_dead_tasks() {
    let mut server = TestServer::start_manual().await;
    let client = server.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut t = TaskSpec::new("job");
        t.args = vec![Value::from(i)];
        t.priority = if i == 4 { 9 } else { 0 };
        ids.push(client.enqueue(t).await.unwrap().id);
    }
    let mut scheduled = TaskSpec::new("later");
    scheduled.countdown_ms = Some(60_000);
    let scheduled = client.enqueue(scheduled).await.unwrap().id;
    // Lease the first two (priority 9 first, then #0): ack one, leave the other held across the restart.
    let leased = client.lease(&lease(2)).await.unwrap();
    assert_eq!(leased[0].id, ids[4]);
    client.ack(&leased[0].id, leased[0].lease_id, Value::from("kept")).await.unwrap();
    let held = leased[1].clone();
    // One dead task.
    let mut doomed = TaskSpec::new("doomed");
    doomed.max_retries = Some(0);
    doomed.priority = 100;
    let doomed = client.enqueue(doomed).await.unwrap().id;
    let t = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    assert_eq!(t.id, doomed);
    client
        .fail(&broker_client::proto::Fail {
            task_id: doomed.clone(),
            lease_id: t.lease_id,
            error: broker_client::proto::TaskError { kind: "E".into(), message: "m".into(), traceback: None },
            retry: true,
            countdown_ms: None,
        })
        .await
        .unwrap();
    drop(client);

    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.get(&ids[4]).await.unwrap().result, Some(Value::from("kept")));
    assert_eq!(client.get(&scheduled).await.unwrap().state, TaskState::Scheduled);
    assert_eq!(client.dead_list(None, 10).await.unwrap()[0].id, doomed);
    // The task leased when the daemon stopped was released at shutdown: it is back, behind the waiting tasks of
    // its priority (as any lost lease), with its attempt counted.
    let info = client.get(&held.id).await.unwrap();
    assert_eq!(info.state, TaskState::Pending);
    let order: Vec<_> = client.lease(&lease(10)).await.unwrap().into_iter().map(|t| (t.id, t.attempt)).collect();
    assert_eq!(
        order,
        vec![(ids[1].clone(), 1), (ids[2].clone(), 1), (ids[3].clone(), 1), (ids[0].clone(), 2)],
        "FIFO order survives the restart"
    );
    let stats = client.stats().await.unwrap();
    assert_eq!((stats.queues[0].scheduled, stats.queues[0].dead), (1, 1));
    server.clock().advance(Duration::from_secs(60));
    server.tick();
    assert_eq!(client.lease(&lease(1)).await.unwrap()[0].id, scheduled, "the schedule survives");
}

/// The real daemon binary, killed with SIGKILL at the end.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn spawn(data_dir: &std::path::Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
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

    async fn client(&self) -> Client {
        ConnectOptions::new(self.addr.clone()).connect().await.expect("connect")
    }

    fn kill_9(mut self) {
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

#[tokio::test]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(dir.path());
    let client = daemon.client().await;
    // Many concurrent enqueues (they share group-commit flushes), a batch, a result, a held lease.
    let mut handles = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let mut t = TaskSpec::new("job");
            t.args = vec![Value::from(i)];
            client.enqueue(t).await.unwrap().id
        }));
    }
    let mut acknowledged = Vec::new();
    for h in handles {
        acknowledged.push(h.await.unwrap());
    }
    let batch = client.enqueue_batch((0..50).map(|_| TaskSpec::new("batch")).collect()).await.unwrap();
    acknowledged.extend(batch.into_iter().map(|e| e.id));
    let t = client.lease(&lease(2)).await.unwrap();
    client.ack(&t[0].id, t[0].lease_id, Value::from("survives")).await.unwrap();
    let held = t[1].id.clone();
    let mut revoked = TaskSpec::new("revoked");
    revoked.priority = -5;
    let revoked = client.enqueue(revoked).await.unwrap().id;
    client.revoke(&revoked).await.unwrap();
    drop(client);
    daemon.kill_9();

    let daemon = Daemon::spawn(dir.path());
    let client = daemon.client().await;
    assert_eq!(client.get(&t[0].id).await.unwrap().result, Some(Value::from("survives")));
    assert_eq!(client.get(&held).await.unwrap().state, TaskState::Pending, "the held lease came back");
    assert_eq!(client.get(&revoked).await.unwrap().state, TaskState::Revoked);
    for id in &acknowledged {
        let info = client.get(id).await.unwrap_or_else(|e| panic!("task {id} lost after kill -9: {e}"));
        assert!(matches!(info.state, TaskState::Pending | TaskState::Success), "{id}: {}", info.state);
    }
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.queues[0].ready, acknowledged.len() as u64 - 1, "every unfinished task is ready again");
    let missing = client.get("never-enqueued").await.unwrap_err();
    assert!(missing.is(ErrorCode::NotFound));
    daemon.kill_9();
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::spawn(dir.path());
    let client = daemon.client().await;
    let id = client.enqueue(TaskSpec::new("job")).await.unwrap().id;
    let status = Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = daemon.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    drop(daemon);
    let daemon = Daemon::spawn(dir.path());
    assert_eq!(daemon.client().await.get(&id).await.unwrap().state, TaskState::Pending);
}

/// A crash between the two steps of moving a task between sled's `live` and `done` trees leaves it in both.
/// Recovery must keep the right copy: the finished one when a finish was interrupted, the live one (higher
/// `seq`) when a requeue was. The state is made by hand in sled between two runs of the daemon.
#[tokio::test]
async fn recovery_keeps_the_right_copy_of_a_task_left_in_both_trees() {
    use broker::store::record::TaskRecord;

    let mut server = TestServer::start_manual().await;
    let client = server.client().await;
    let finished = client.enqueue(TaskSpec::new("finished")).await.unwrap().id;
    let t = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    client.ack(&finished, t.lease_id, Value::from("done")).await.unwrap();
    let requeued = client.enqueue(TaskSpec::new("requeued")).await.unwrap().id;
    drop(client);
    server.stop_keep_dir().await;

    {
        let db = sled::open(server.dir.path()).unwrap();
        let live = db.open_tree("live").unwrap();
        let done = db.open_tree("done").unwrap();
        // An interrupted finish: the finished record is also still in `live` (same seq).
        let done_copy = done.get(finished.as_bytes()).unwrap().expect("finished task in done");
        let mut stale: TaskRecord = rmp_serde::from_slice(&done_copy).unwrap();
        stale.state = TaskState::Pending;
        stale.result = None;
        live.insert(finished.as_bytes(), rmp_serde::to_vec_named(&stale).unwrap()).unwrap();
        // An interrupted requeue: an older, dead copy of the live task is still in `done` (lower seq).
        let live_copy = live.get(requeued.as_bytes()).unwrap().expect("waiting task in live");
        let mut old: TaskRecord = rmp_serde::from_slice(&live_copy).unwrap();
        old.seq -= 1;
        old.state = TaskState::Failure;
        done.insert(requeued.as_bytes(), rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        db.flush().unwrap();
    }

    server.start_again().await;
    let client = server.client().await;
    let info = client.get(&finished).await.unwrap();
    assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::from("done"))));
    assert_eq!(client.get(&requeued).await.unwrap().state, TaskState::Pending);
    let leased: Vec<_> = client.lease(&lease(10)).await.unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(leased, vec![requeued.clone()], "the finished task is not run again");
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.results_stored, 1);
    assert_eq!(stats.queues[0].dead, 0);

    // The repairs were written: a second restart sees the same.
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.get(&finished).await.unwrap().state, TaskState::Success);
    assert_eq!(client.get(&requeued).await.unwrap().state, TaskState::Pending);
}
