//! Crashes of the real daemon binary (`kill -9`) around the write-ahead log and its checkpoints: nothing
//! acknowledged is lost, a damaged log tail never stops a start, and segments a checkpoint covered are not
//! replayed over it.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_client::proto::{ErrorCode, Lease, TaskSpec, TaskState, Value};
use common::Daemon;

fn lease(max: u32) -> Lease {
    Lease { queues: vec!["default".into()], max, wait_ms: 0, lease_ms: None }
}

/// Writes a config file into `dir` and returns the `--config` arguments naming it.
fn config(dir: &std::path::Path, toml: &str) -> Vec<String> {
    let path = dir.join("broker.toml");
    std::fs::write(&path, toml).unwrap();
    vec!["--config".into(), path.display().to_string()]
}

fn args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A temporary directory, the data directory in it, and the `--config` arguments of a config file `toml`.
fn setup(toml: &str) -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extra = config(dir.path(), toml);
    (dir, data, extra)
}

/// SIGTERM, and the clean exit it leads to.
fn stop_cleanly(mut daemon: Daemon) {
    let status = std::process::Command::new("kill").args(["-TERM", &daemon.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0), "a clean stop exits 0");
}

/// The log segments in a data directory, oldest first.
fn segments(data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(data.join("wal"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn task(id: String) -> TaskSpec {
    TaskSpec { id: Some(id), args: vec![Value::from("p".repeat(100))], ..TaskSpec::new("job") }
}

/// Producers enqueue with their own ids and a worker leases and acks, while the daemon is killed with SIGKILL,
/// eight times over, with checkpoints every 20 ms (so kills land before, during and after them). Every enqueue
/// that was acknowledged is there after each restart, and every acknowledged ack is `SUCCESS` with its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_a_loop_under_load_loses_nothing_acknowledged() {
    let (_dir, data, extra) = setup("checkpoint_interval_ms = 20\n");
    let enqueued = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    for cycle in 0..8 {
        let daemon = Daemon::spawn_with(&data, &args(&extra));
        let client = daemon.client().await;
        // What earlier cycles acknowledged is all there.
        let earlier = enqueued.lock().unwrap().clone();
        for id in earlier {
            client.get(&id).await.unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged task {id} lost: {e}"));
        }
        let earlier = acked.lock().unwrap().clone();
        for id in earlier {
            let info = client.get(&id).await.unwrap();
            assert_eq!(info.state, TaskState::Success, "cycle {cycle}: acknowledged ack of {id} lost");
            assert_eq!(info.result, Some(Value::from(id.clone())));
        }
        let mut load = Vec::new();
        for producer in 0..2 {
            let (client, enqueued) = (daemon.client().await, enqueued.clone());
            load.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("c{cycle}-p{producer}-{i}");
                    if client.enqueue(task(id.clone())).await.is_err() {
                        return;
                    }
                    enqueued.lock().unwrap().push(id);
                }
            }));
        }
        let (worker, acked_by_worker) = (daemon.client().await, acked.clone());
        load.push(tokio::spawn(async move {
            loop {
                let Ok(tasks) = worker.lease(&lease(16)).await else { return };
                for t in tasks {
                    if worker.ack(&t.id, t.lease_id, Value::from(t.id.clone())).await.is_err() {
                        return;
                    }
                    acked_by_worker.lock().unwrap().push(t.id);
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(150 + 40 * cycle)).await;
        daemon.kill_9();
        for task in load {
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("load stops").unwrap();
        }
    }
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    let enqueued = enqueued.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    assert!(enqueued.len() > 100 && !acked.is_empty(), "{} enqueued, {} acked", enqueued.len(), acked.len());
    for id in &enqueued {
        client.get(id).await.unwrap_or_else(|e| panic!("acknowledged task {id} lost: {e}"));
    }
    for id in &acked {
        assert_eq!(client.get(id).await.unwrap().state, TaskState::Success, "ack of {id} lost");
    }
}

/// Enqueues `n` tasks and acks one; returns the ids and the acked one.
async fn write_some(daemon: &Daemon, n: usize) -> (Vec<String>, String) {
    let client = daemon.client().await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(client.enqueue(task(format!("t{i}"))).await.unwrap().id);
    }
    let t = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    client.ack(&t.id, t.lease_id, Value::from("done")).await.unwrap();
    (ids, t.id)
}

async fn assert_all_there(daemon: &Daemon, ids: &[String], acked: &str) {
    let client = daemon.client().await;
    for id in ids {
        let state = client.get(id).await.unwrap_or_else(|e| panic!("{id} lost: {e}")).state;
        let expected = if id == acked { TaskState::Success } else { TaskState::Pending };
        assert_eq!(state, expected, "{id}");
    }
}

/// With no checkpoint after the writes (the interval is an hour), everything acknowledged is only in the log
/// when the daemon is killed: the restart replays it, checkpoints it into sled and starts a new log.
#[tokio::test]
async fn a_crash_before_any_checkpoint_is_recovered_from_the_log() {
    let (_dir, data, extra) = setup("checkpoint_interval_ms = 3600000\n");
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let (ids, acked) = write_some(&daemon, 300).await;
    daemon.kill_9();
    let logged = segments(&data);
    assert!(
        logged.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum::<u64>() > 300 * 100,
        "the records are in the log: {logged:?}"
    );

    let daemon = Daemon::spawn_with(&data, &args(&extra));
    assert_all_there(&daemon, &ids, &acked).await;
    assert!(segments(&data).iter().all(|s| !logged.contains(s)), "the replayed segments were checkpointed and removed");
    // And from sled alone: the replayed log was checkpointed.
    daemon.kill_9();
    for segment in segments(&data) {
        std::fs::remove_file(segment).unwrap();
    }
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    assert_all_there(&daemon, &ids, &acked).await;
}

/// A write torn by the crash, or garbage after the last record, is cut off at startup (and logged); what was
/// acknowledged before it is all there, and the daemon starts.
#[tokio::test]
async fn a_torn_or_garbage_log_tail_is_cut_off_at_startup() {
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    // A record header promising 200 bytes, followed by 37 of them; then zeros (a preallocated tail); then noise.
    let torn: Vec<u8> = [&200u32.to_le_bytes()[..], &[0xab; 4], &[0x42; 37]].concat();
    for (what, tail) in [("torn", torn), ("zeros", vec![0u8; 4096]), ("garbage", garbage)] {
        let (_dir, data, extra) = setup("checkpoint_interval_ms = 3600000\n");
        let daemon = Daemon::spawn_with(&data, &args(&extra));
        let (ids, acked) = write_some(&daemon, 50).await;
        daemon.kill_9();
        let last = segments(&data).pop().expect("a log segment");
        std::fs::OpenOptions::new().append(true).open(&last).unwrap().write_all(&tail).unwrap();

        let daemon = Daemon::spawn_with(&data, &args(&extra));
        assert_all_there(&daemon, &ids, &acked).await;
        // The daemon works on: new writes, and a restart after them.
        let client = daemon.client().await;
        let after = client.enqueue(TaskSpec::new("after")).await.unwrap().id;
        daemon.kill_9();
        let daemon = Daemon::spawn_with(&data, &args(&extra));
        assert_eq!(daemon.client().await.get(&after).await.unwrap().state, TaskState::Pending, "{what}");
    }
}

/// A crash after a checkpoint reached sled but before it removed the segments it covered leaves those segments
/// behind. Their records are older than sled's: the checkpoint's mark says to skip them, so a task they show
/// pending stays finished.
#[tokio::test]
async fn segments_a_checkpoint_covered_are_not_replayed_over_it() {
    let (_dir, data, extra) = setup("checkpoint_interval_ms = 3600000\n");
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    let id = client.enqueue(TaskSpec::new("job")).await.unwrap().id;
    let segment = segments(&data).pop().unwrap();
    let pending_only = std::fs::read(&segment).unwrap();
    let t = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    client.ack(&id, t.lease_id, Value::from("done")).await.unwrap();
    drop(client);
    // A clean stop checkpoints everything and removes the segments; put the old one back as a crash would leave it.
    stop_cleanly(daemon);
    assert!(!segment.exists(), "the clean stop removed the segment");
    std::fs::write(&segment, pending_only).unwrap();

    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let info = daemon.client().await.get(&id).await.unwrap();
    assert_eq!((info.state, info.result), (TaskState::Success, Some(Value::from("done"))));
}

/// A data directory from before the log (the journal in sled, no `wal/`) opens as it is.
#[tokio::test]
async fn a_data_directory_from_before_the_log_opens() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::spawn(&data);
    let (ids, acked) = write_some(&daemon, 20).await;
    stop_cleanly(daemon);
    std::fs::remove_dir_all(data.join("wal")).unwrap();

    let daemon = Daemon::spawn(&data);
    assert_all_there(&daemon, &ids, &acked).await;
    assert_eq!(segments(&data).len(), 2, "a new log is started, and its next segment prepared");
}

/// Under `fsync = "interval"` replies do not wait for the disk; what the documentation promises is that a
/// `kill -9` loses at most the changes of the last `fsync_interval_ms`. Changes older than that are all there.
#[tokio::test]
async fn interval_loses_at_most_the_last_interval_to_a_kill_9() {
    let (_dir, data, extra) = setup("fsync = \"interval\"\nfsync_interval_ms = 50\ncheckpoint_interval_ms = 3600000\n");
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let (ids, acked) = write_some(&daemon, 200).await;
    tokio::time::sleep(Duration::from_millis(3 * 50)).await;
    daemon.kill_9();
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    assert_all_there(&daemon, &ids, &acked).await;
}

/// A log write that fails (here: the next segment is `/dev/full`, so the write after the rotation gets ENOSPC)
/// stops the log. Replies that must be durable then report `internal` ("not durable") instead of success, but
/// what they changed is in memory, and checkpoints go on writing everything to sled: after a kill -9, the task
/// acknowledged before the failure and the one refused after it are both there.
#[tokio::test]
async fn a_failed_log_write_refuses_durable_replies_and_checkpoints_go_on() {
    let (_dir, data, extra) = setup("checkpoint_interval_ms = 50\n");
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    let next = segments(&data).pop().expect("the prepared next segment");
    std::fs::remove_file(&next).unwrap();
    std::os::unix::fs::symlink("/dev/full", &next).unwrap();
    let before = client.enqueue(task("before".into())).await.unwrap().id;
    // The writer moves to the next segment once the checkpoint interval passed (the checkpoint that follows
    // prepares the one after it): wait for that file.
    let after_next = next.with_file_name(format!(
        "{:016x}.log",
        u64::from_str_radix(next.file_stem().unwrap().to_str().unwrap(), 16).unwrap() + 1
    ));
    common::eventually("the rotation to the broken segment", Duration::from_secs(10), || async {
        after_next.exists().then_some(())
    })
    .await;
    let err = client.enqueue(task("after".into())).await.unwrap_err();
    assert!(err.is(ErrorCode::Internal) && err.to_string().contains("not durable"), "{err}");
    let err = client.enqueue(task("later".into())).await.unwrap_err();
    assert!(err.is(ErrorCode::Internal), "the log stays stopped: {err}");
    // The failed segment is dropped once a checkpoint has put everything into sled.
    common::eventually("a checkpoint past the failed segment", Duration::from_secs(10), || async {
        (!next.exists()).then_some(())
    })
    .await;
    daemon.kill_9();
    // The disk is mended: the broken file (which the log may have recycled under another name) goes.
    for entry in std::fs::read_dir(data.join("wal")).unwrap().flatten() {
        if entry.file_type().unwrap().is_symlink() {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }

    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    assert_eq!(client.get(&before).await.unwrap().state, TaskState::Pending);
    assert_eq!(client.get("after").await.unwrap().state, TaskState::Pending, "applied in memory, checkpointed");
    // The restarted daemon logs again.
    client.enqueue(task("restarted".into())).await.unwrap();
}

/// A log round whose write a crash tore (its commit record missing) comes back not at all, never in part: an ack
/// and the next link of its chain, logged in one round, are both there after a restart or neither is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_round_is_dropped_whole() {
    let (_dir, data, extra) = setup("checkpoint_interval_ms = 3600000\n");
    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    let head = TaskSpec { chain: vec![TaskSpec::new("next")], ..TaskSpec::new("head") };
    let enqueued = client.enqueue(head).await.unwrap();
    let leased = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    // The segment in use: the newest with records (the next one is prepared ahead, holding only its header).
    let in_use = || segments(&data).into_iter().rev().find(|p| std::fs::metadata(p).unwrap().len() > 8).unwrap();
    let before = std::fs::metadata(in_use()).unwrap().len();
    client.ack(&leased.id, leased.lease_id, Value::from(1)).await.unwrap();
    daemon.kill_9();
    // The ack's round: the head's record, the link's record, then the commit record. Cut the commit record off
    // (its 8-byte header and 4-byte tombstone), as a crash in the middle of the write would.
    let last = in_use();
    let after = std::fs::metadata(&last).unwrap().len();
    assert!(after > before + 12, "the ack's round was logged");
    std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(after - 12).unwrap();

    let daemon = Daemon::spawn_with(&data, &args(&extra));
    let client = daemon.client().await;
    // The head is as it was before the ack (leased when the daemon stopped: back in its queue), and its link was
    // never made: the chain is whole, one step back.
    assert_eq!(client.get(&enqueued.id).await.unwrap().state, TaskState::Pending);
    // A link made by the ack would have the head's result as its first argument; one still to come has none.
    let link = client.get(&enqueued.chain[0]).await.unwrap();
    assert_eq!((link.state, link.args.len()), (TaskState::Pending, 0), "the link is still to come");
    let again = client.lease(&lease(1)).await.unwrap().pop().unwrap();
    client.ack(&again.id, again.lease_id, Value::from(2)).await.unwrap();
    let link = client.lease(&lease(1)).await.unwrap().pop().expect("the link, made by the new ack");
    assert_eq!(link.args, [Value::from(2)]);
    daemon.kill_9();
}
