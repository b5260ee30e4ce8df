//! What survives a restart: a clean one in-process, and `kill -9` of the real `broker serve` binary.

mod common;

use std::process::Command;
use std::time::Duration;

use broker_client::proto::{ErrorCode, Lease, TaskSpec, TaskState, Value};
use common::{eventually, Daemon, TestServer};

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

/// A data directory of the older layout (one sled tree per kind: `live`, `done`, `expiry`, `dead`, a key per task)
/// is moved into the journal at startup, including the crash state that layout could be left in: a task in both
/// `live` and `done`, where the copy with the higher `seq` is the truth (the finished one on a tie). The old
/// layout is made by hand in sled from the records a daemon wrote.
#[tokio::test]
async fn an_older_data_directory_is_moved_into_the_journal() {
    use broker::store::disk::{decode, entries, Entry};
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
        // The records as the daemon wrote them...
        let mut records = std::collections::HashMap::<String, TaskRecord>::new();
        let current = server.dir.path().join("sled-1");
        for chunk in sled::open(&current).unwrap().open_tree("journal").unwrap().iter() {
            let (key, bytes) = chunk.unwrap();
            for entry in entries(u64::from_be_bytes(key.as_ref().try_into().unwrap()), &bytes).unwrap() {
                if let Entry::Put { id, body, .. } = entry {
                    records.insert(id.to_string(), decode(id, body).unwrap());
                }
            }
        }
        // ... into the old layout: sled's files at the top of the data directory, one tree per kind.
        std::fs::remove_dir_all(&current).unwrap();
        std::fs::remove_file(server.dir.path().join("CURRENT")).unwrap();
        let db = sled::open(server.dir.path()).unwrap();
        let live = db.open_tree("live").unwrap();
        let done = db.open_tree("done").unwrap();
        // Records were maps with field names then; today's array form lists the same fields in this order.
        const FIELDS: [&str; 26] = [
            "id",
            "queue",
            "task",
            "args",
            "kwargs",
            "context",
            "priority",
            "max_retries",
            "retry_delay_ms",
            "retry_backoff",
            "retry_delay_max_ms",
            "lease_ms",
            "expires_at_ms",
            "result_ttl_ms",
            "state",
            "attempts",
            "lease_losses",
            "seq",
            "created_at_ms",
            "eta_ms",
            "started_at_ms",
            "finished_at_ms",
            "result",
            "error",
            "result_expires_at_ms",
            "revoked",
        ];
        let named = |r: &TaskRecord| {
            let mut array = Vec::new();
            r.encode(&mut array).unwrap();
            let Value::Array(values) = rmp_serde::from_slice::<Value>(&array).unwrap() else { panic!("not an array") };
            assert_eq!(values.len(), FIELDS.len());
            rmp_serde::to_vec(&Value::Map(FIELDS.iter().map(|f| Value::from(*f)).zip(values).collect())).unwrap()
        };
        // An interrupted finish: the finished record is also still in `live` (same seq).
        let record = &records[&finished];
        assert_eq!(record.state, TaskState::Success);
        done.insert(finished.as_bytes(), named(record)).unwrap();
        let mut stale = record.clone();
        stale.state = TaskState::Pending;
        stale.result = None;
        live.insert(finished.as_bytes(), named(&stale)).unwrap();
        // An interrupted requeue: an older, dead copy of the live task is still in `done` (lower seq).
        let record = &records[&requeued];
        live.insert(requeued.as_bytes(), named(record)).unwrap();
        let mut old = record.clone();
        old.seq -= 1;
        old.state = TaskState::Failure;
        done.insert(requeued.as_bytes(), named(&old)).unwrap();
        db.open_tree("expiry").unwrap().insert(b"stale index key", &[]).unwrap();
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
    drop(client);
    server.stop_keep_dir().await;

    {
        let db = sled::open(server.dir.path()).unwrap();
        let names: Vec<_> = db.tree_names().into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).collect();
        for old in ["live", "done", "expiry", "dead"] {
            assert!(!names.contains(&old.to_string()), "old tree {old} still there: {names:?}");
        }
    }
    // The move is done once: a second start sees the same. Its first rewrite (forced here by a zero threshold)
    // moves the database out of the top of the data directory into `sled-1`.
    server.config.shrink_min_bytes = 0;
    server.start_again().await;
    let client = server.client().await;
    let root = server.dir.path().to_path_buf();
    // The rewrite points `CURRENT` at `sled-1`, then removes the old files: wait for both.
    let gone = |root: &std::path::Path| ["conf", "db", "blobs"].iter().all(|file| !root.join(file).exists());
    eventually("the first rewrite and the removal of the old files", Duration::from_secs(10), || async {
        let current = std::fs::read_to_string(root.join("CURRENT")).ok()?;
        (current.trim() == "sled-1" && gone(&root)).then_some(())
    })
    .await;
    assert_eq!(client.get(&finished).await.unwrap().state, TaskState::Success);
    assert_eq!(client.get(&requeued).await.unwrap().state, TaskState::Pending, "its lease ended with the daemon");
    drop(client);
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.get(&finished).await.unwrap().result, Some(Value::from("done")));
}

/// Old journal chunks whose records are mostly gone are compacted: their current records are copied forward
/// and the chunks removed. Nothing current is lost, nothing deleted comes back, and a restart reads the same.
#[tokio::test]
async fn compaction_keeps_every_current_record_and_nothing_deleted() {
    let mut server = TestServer::start_with(|c| c.checkpoint_interval_ms = 10, true).await;
    let client = server.client().await;
    let payload = Value::from("p".repeat(1000));
    // Three queues interleaved in the same chunks; two are purged, so each chunk keeps a third of its bytes.
    let mut kept = Vec::new();
    for round in 0..30 {
        let batch: Vec<TaskSpec> = (0..210)
            .map(|i| {
                let mut t = TaskSpec::new("job");
                t.queue = Some(["a", "b", "c"][i % 3].to_string());
                t.args = vec![payload.clone(), Value::from(round * 210 + i)];
                t
            })
            .collect();
        let enqueued = client.enqueue_batch(batch).await.unwrap();
        kept.extend(enqueued.iter().skip(2).step_by(3).map(|e| e.id.clone()));
    }
    let gone = client.enqueue(TaskSpec { queue: Some("a".into()), ..TaskSpec::new("job") }).await.unwrap().id;
    let store = server.handle.as_ref().unwrap().store().clone();
    // Checkpoints bring the journal in sled up to date in the background.
    let before = eventually("the checkpoints that write the tasks", Duration::from_secs(30), || async {
        Some(store.journal_size().0).filter(|bytes| *bytes > 6_000_000)
    })
    .await;
    assert_eq!(client.purge("a").await.unwrap() + client.purge("b").await.unwrap(), 4201);
    // Each checkpoint compacts a bounded part, until the journal is at most about twice what is current in it;
    // enqueues give the log records, which start checkpoints.
    let compacted = |(bytes, current): (u64, u64)| bytes <= 2 * current + (512 << 10) && bytes + (1 << 20) < before;
    let (bytes, current) = eventually("compaction", Duration::from_secs(30), || async {
        client.enqueue(TaskSpec { queue: Some("tick".into()), ..TaskSpec::new("tick") }).await.unwrap();
        Some(store.journal_size()).filter(|size| compacted(*size))
    })
    .await;
    assert!(current > 2_000_000, "journal {bytes} bytes for {current} current");
    // A clean stop writes the last changes; the account then is what recovery must count.
    drop(client);
    server.stop_keep_dir().await;
    let (_, current) = store.journal_size();
    drop(store);
    server.start_again().await;
    let client = server.client().await;
    assert_eq!(server.handle.as_ref().unwrap().store().journal_size().1, current, "recovery counts the same");
    let stats = client.stats().await.unwrap();
    let ready = |q: &str| stats.queues.iter().find(|s| s.name == q).map_or(0, |s| s.ready);
    assert_eq!((ready("a"), ready("b"), ready("c")), (0, 0, 2100));
    for id in kept.iter().step_by(97) {
        let info = client.get(id).await.unwrap();
        assert_eq!((info.queue.as_str(), &info.args[0]), ("c", &payload));
    }
    assert!(client.get(&gone).await.unwrap_err().is(ErrorCode::NotFound));
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .unwrap()
        .flatten()
        .map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map_or(0, |m| m.len()) })
        .sum()
}

/// sled never gives freed space back, so once results expire the daemon rewrites its database into a new
/// directory and removes the old one: the data directory shrinks, and what was kept is still there.
#[tokio::test]
async fn the_data_directory_shrinks_back_after_results_expire() {
    let mut server = TestServer::start_with(
        |c| {
            c.shrink_min_bytes = 1 << 20;
            c.checkpoint_interval_ms = 10;
        },
        true,
    )
    .await;
    let client = server.client().await;
    let kept = client.enqueue(TaskSpec { queue: Some("keep".into()), ..TaskSpec::new("job") }).await.unwrap().id;
    let payload = Value::from("r".repeat(2000));
    for _ in 0..20 {
        let batch = (0..100)
            .map(|_| TaskSpec { args: vec![payload.clone()], result_ttl_ms: Some(60_000), ..TaskSpec::new("job") })
            .collect();
        client.enqueue_batch(batch).await.unwrap();
        for t in client.lease(&lease(100)).await.unwrap() {
            client.ack(&t.id, t.lease_id, payload.clone()).await.unwrap();
        }
    }
    assert_eq!(client.stats().await.unwrap().results_stored, 2000);
    let sled_dir = server.dir.path().join("sled-1");
    eventually("checkpoints that write the results to sled", Duration::from_secs(30), || async {
        Some(dir_bytes(&sled_dir)).filter(|bytes| *bytes > 8 << 20)
    })
    .await;
    // The whole data directory, as after the rewrite (sled's directory alone, taken as soon as it passed 8 MiB,
    // could be caught before the checkpoints were done and compare with less than the directory held).
    let before = dir_bytes(server.dir.path());

    server.clock().advance(Duration::from_secs(61));
    server.tick();
    assert_eq!(client.stats().await.unwrap().results_stored, 0);
    // A checkpoint removes the expired records' chunks; the next check shrinks (the daemon checks every 10 s;
    // the test checks itself until it is due).
    let store = server.handle.as_ref().unwrap().store().clone();
    eventually("a rewrite", Duration::from_secs(30), || async { store.shrink_if_bloated().unwrap().then_some(()) })
        .await;
    drop(store);
    let after = dir_bytes(server.dir.path());
    assert!(after < before / 4, "data dir went from {before} to {after} bytes");

    drop(client);
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.get(&kept).await.unwrap().state, TaskState::Pending);
    assert_eq!(client.stats().await.unwrap().results_stored, 0);
    let current = std::fs::read_to_string(server.dir.path().join("CURRENT")).unwrap();
    assert_eq!(current.trim(), "sled-2");
    let dirs: Vec<_> = std::fs::read_dir(server.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sled-"))
        .collect();
    assert_eq!(dirs, vec!["sled-2".to_string()], "the old database is gone");
}

/// A checkpoint can write a finished task to sled before the log round that carries its finish has run. The
/// record must stay in memory until the log has it too: otherwise the round finds nothing and logs a tombstone,
/// and a crash before the next checkpoint replays that tombstone over the acknowledged result.
#[tokio::test]
async fn a_checkpoint_ahead_of_the_log_never_makes_it_log_a_finished_task_as_deleted() {
    use broker::store::disk::{decode, entries, Entry};
    use broker::store::wal;

    let server = TestServer::start_with(
        |c| {
            c.fsync_interval_ms = 3_600_000;
            c.checkpoint_interval_ms = 3_600_000;
        },
        true,
    )
    .await;
    let client = server.client().await;
    let id = client.enqueue(TaskSpec::new("job")).await.unwrap().id;
    let t = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    let store = server.handle.as_ref().unwrap().store().clone();
    // The ack is noted for the log, but no round runs until a ticket asks for one.
    store.ack(&id, t.lease_id, Value::from("done")).unwrap();
    store.write_to_sled().unwrap();
    store.durable().await.unwrap();

    let dir = server.dir.path().join("wal");
    let mut last = None;
    for number in wal::segments(&dir).unwrap() {
        let segment = wal::read(&dir, number).unwrap();
        for payload in segment.payloads() {
            for entry in entries(number, payload).unwrap() {
                match entry {
                    Entry::Put { id: i, body, .. } if i == id => last = Some(Some(decode(i, body).unwrap().state)),
                    Entry::Delete { id: i } if i == id => last = Some(None),
                    _ => {}
                }
            }
        }
    }
    assert_eq!(last, Some(Some(TaskState::Success)), "the log's last word on the task");
}
