//! Unique tasks (a key held for a window, or until the task finishes) and progress reports.

mod common;

use std::time::Duration;

use broker_client::proto::{ErrorCode, Lease, TaskSpec, TaskState, Value};
use common::TestServer;

fn unique(task: &str, key: &str, window_ms: Option<u64>) -> TaskSpec {
    TaskSpec { unique_key: Some(key.into()), unique_for_ms: window_ms, ..TaskSpec::new(task) }
}

fn lease_all() -> Lease {
    Lease { queues: vec!["default".into()], max: 100, wait_ms: 0, lease_ms: None }
}

#[tokio::test]
async fn a_unique_key_held_until_the_task_finishes_returns_the_holder_then_lets_go() {
    let mut server = TestServer::start().await;
    let client = server.client().await;
    let first = client.enqueue(unique("sync_user", "sync:42", None)).await.unwrap();
    assert!(first.created);
    let again = client.enqueue(unique("sync_user", "sync:42", None)).await.unwrap();
    assert_eq!((again.id.as_str(), again.created, again.state), (first.id.as_str(), false, TaskState::Pending));
    // Another key is another task; a batch with the key twice makes one.
    let batch = client
        .enqueue_batch(vec![unique("sync_user", "sync:7", None), unique("sync_user", "sync:7", None)])
        .await
        .unwrap();
    assert!(batch[0].created && !batch[1].created && batch[0].id == batch[1].id);
    // The key holds across a restart and while the task runs.
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.enqueue(unique("sync_user", "sync:42", None)).await.unwrap().id, first.id);
    let leased = client.lease(&lease_all()).await.unwrap();
    let task = leased.iter().find(|t| t.id == first.id).unwrap();
    assert_eq!(client.enqueue(unique("sync_user", "sync:42", None)).await.unwrap().state, TaskState::Started);
    // Finished: the key is free, and the next enqueue makes a new task.
    client.ack(&task.id, task.lease_id, Value::Nil).await.unwrap();
    let next = client.enqueue(unique("sync_user", "sync:42", None)).await.unwrap();
    assert!(next.created && next.id != first.id);
    // Bad keys are refused.
    let err = client.enqueue(unique("t", "", None)).await.unwrap_err();
    assert!(err.is(ErrorCode::BadRequest), "{err}");
    let err = client.enqueue(TaskSpec { unique_for_ms: Some(5), ..TaskSpec::new("t") }).await.unwrap_err();
    assert!(err.is(ErrorCode::BadRequest), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn a_unique_window_holds_after_the_task_finished_and_ends_on_time() {
    let mut server = TestServer::start_manual().await;
    let client = server.client().await;
    let first = client.enqueue(unique("digest", "digest:daily", Some(60_000))).await.unwrap();
    let task = client.lease(&lease_all()).await.unwrap().pop().unwrap();
    client.ack(&task.id, task.lease_id, Value::Nil).await.unwrap();
    // Within the window, even though it finished: the finished task comes back.
    let again = client.enqueue(unique("digest", "digest:daily", Some(60_000))).await.unwrap();
    assert_eq!((again.id.as_str(), again.created, again.state), (first.id.as_str(), false, TaskState::Success));
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.enqueue(unique("digest", "digest:daily", Some(60_000))).await.unwrap().id, first.id);
    server.clock().advance(Duration::from_millis(60_001));
    server.tick();
    let later = client.enqueue(unique("digest", "digest:daily", Some(60_000))).await.unwrap();
    assert!(later.created && later.id != first.id, "{later:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_running_task_reports_progress_that_get_shows_and_a_restart_keeps() {
    let mut server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(TaskSpec::new("import")).await.unwrap().id;
    let task = client.lease(&lease_all()).await.unwrap().pop().unwrap();
    assert!(client.get(&id).await.unwrap().progress.is_none());
    let meta = Value::Map(vec![("current".into(), 30.into()), ("total".into(), 100.into())]);
    assert!(!client.progress(&id, task.lease_id, "PROGRESS", meta.clone()).await.unwrap());
    let info = client.get(&id).await.unwrap();
    let progress = info.progress.expect("progress shown");
    assert_eq!((info.state, progress.state.as_str(), &progress.meta), (TaskState::Started, "PROGRESS", &meta));
    assert!(progress.at_ms > 0);
    // A stale lease cannot report; a revoked task learns it from its report.
    let err = client.progress(&id, task.lease_id ^ 1, "PROGRESS", Value::Nil).await.unwrap_err();
    assert!(err.is(ErrorCode::LeaseLost), "{err}");
    client.revoke(&id).await.unwrap();
    assert!(client.progress(&id, task.lease_id, "PROGRESS", Value::Nil).await.unwrap());
    let err = client.progress(&id, task.lease_id, "", Value::Nil).await.unwrap_err();
    assert!(err.is(ErrorCode::BadRequest), "{err}");
    // The last report stays on the record, across a restart.
    server.restart().await;
    let client = server.client().await;
    assert_eq!(client.get(&id).await.unwrap().progress.unwrap().state, "PROGRESS");
    server.stop().await;
}

#[tokio::test]
async fn a_new_attempt_starts_without_the_last_ones_progress() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(TaskSpec::new("import")).await.unwrap().id;
    let task = client.lease(&lease_all()).await.unwrap().pop().unwrap();
    client.progress(&id, task.lease_id, "PROGRESS", Value::from(50)).await.unwrap();
    client.release(&id, task.lease_id).await.unwrap();
    assert!(client.get(&id).await.unwrap().progress.is_some(), "kept while it waits");
    client.lease(&lease_all()).await.unwrap().pop().unwrap();
    assert!(client.get(&id).await.unwrap().progress.is_none(), "cleared when the next attempt starts");
    server.stop().await;
}
