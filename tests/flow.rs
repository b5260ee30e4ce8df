//! Flow control kept by the daemon for every worker at once: paused queues, rate limits, concurrency limits. Rate
//! cases run on a manual clock, so the token counts are exact; one case checks a global rate with several
//! workers on the wall clock.

mod common;

use std::time::{Duration, Instant};

use broker_client::proto::{ErrorCode, Lease, SetLimit, TaskSpec};
use broker_client::Client;
use common::TestServer;

fn lease(queue: &str, max: u32, wait_ms: u64) -> Lease {
    Lease { queues: vec![queue.into()], max, wait_ms, lease_ms: None }
}

async fn enqueue(client: &Client, queue: &str, task: &str, n: usize) {
    for _ in 0..n {
        client.enqueue(TaskSpec { queue: Some(queue.into()), ..TaskSpec::new(task) }).await.unwrap();
    }
}

fn limit(scope: &str, name: &str, rate: Option<&str>, concurrency: Option<u32>) -> SetLimit {
    SetLimit { scope: scope.into(), name: name.into(), rate: rate.map(Into::into), concurrency }
}

#[tokio::test]
async fn a_paused_queue_keeps_its_tasks_through_a_restart_and_a_waiting_lease_gets_them_on_resume() {
    let mut server = TestServer::start().await;
    let client = server.client().await;
    enqueue(&client, "mail", "send", 2).await;
    assert!(!client.set_paused("mail", true).await.unwrap(), "was not paused");
    assert!(client.set_paused("mail", true).await.unwrap(), "pausing twice says it was paused");
    assert!(client.lease(&lease("mail", 10, 0)).await.unwrap().is_empty(), "a paused queue gives nothing");
    // Enqueues are still taken.
    enqueue(&client, "mail", "send", 1).await;
    // A queue with no task can be paused ahead of time too.
    client.set_paused("later", true).await.unwrap();

    server.restart().await;
    let client = server.client().await;
    let stats = client.stats().await.unwrap();
    let mail = stats.queues.iter().find(|q| q.name == "mail").expect("mail in stats");
    assert!(mail.paused && mail.ready == 3, "{mail:?}");
    assert!(stats.queues.iter().any(|q| q.name == "later" && q.paused));
    assert!(client.lease(&lease("mail", 10, 0)).await.unwrap().is_empty(), "still paused after the restart");

    // A worker long-polls the paused queue; the resume hands it the tasks at once.
    let worker = server.client().await;
    let started = Instant::now();
    let waiting = tokio::spawn(async move { worker.lease(&lease("mail", 10, 10_000)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(client.set_paused("mail", false).await.unwrap());
    let got = waiting.await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(started.elapsed() < Duration::from_secs(5), "the waiting lease was not woken by the resume");
    assert!(!client.stats().await.unwrap().queues.iter().find(|q| q.name == "mail").unwrap().paused);
    // Bad names are refused with a code.
    let err = client.set_paused("*", true).await.unwrap_err();
    assert!(err.is(ErrorCode::BadRequest), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_rate_limit_holds_a_task_name_back_and_lets_others_past_it() {
    let mut server = TestServer::start_manual().await;
    let client = server.client().await;
    client.set_limit(&limit("task", "slow", Some("10/s"), None)).await.unwrap();
    enqueue(&client, "default", "slow", 30).await;
    enqueue(&client, "default", "fast", 5).await;
    // One token (the burst) for `slow`; the five `fast` behind the held-back ones are leased too.
    let first = client.lease(&lease("default", 100, 0)).await.unwrap();
    let names: Vec<&str> = first.iter().map(|t| t.task.as_str()).collect();
    assert_eq!(names, ["slow", "fast", "fast", "fast", "fast", "fast"]);
    assert!(client.lease(&lease("default", 100, 0)).await.unwrap().is_empty(), "no token left");
    // 500 ms later the bucket holds one token (its burst), not five: a rate spaces starts.
    server.clock().advance(Duration::from_millis(500));
    assert_eq!(client.lease(&lease("default", 100, 0)).await.unwrap().len(), 1);
    let mut started = 0;
    for _ in 0..10 {
        server.clock().advance(Duration::from_millis(100));
        started += client.lease(&lease("default", 100, 0)).await.unwrap().len();
    }
    assert_eq!(started, 10, "10/s over one second");

    // Limits are durable.
    server.restart().await;
    let client = server.client().await;
    let limits = client.limits().await.unwrap();
    assert_eq!(limits.len(), 1);
    assert_eq!((limits[0].scope.as_str(), limits[0].name.as_str()), ("task", "slow"));
    assert_eq!(limits[0].rate.as_deref(), Some("10/s"));
    // Removing it lets the rest through at once (the restart returned the twelve leased ones too).
    client.set_limit(&limit("task", "slow", None, None)).await.unwrap();
    assert!(client.limits().await.unwrap().is_empty());
    assert_eq!(client.lease(&lease("default", 100, 0)).await.unwrap().len(), 35);
    for bad in
        [limit("task", "x", Some("ten/s"), None), limit("task", "x", None, Some(0)), limit("pool", "x", None, Some(1))]
    {
        let err = client.set_limit(&bad).await.unwrap_err();
        assert!(err.is(ErrorCode::BadRequest), "{bad:?}: {err:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_concurrency_limit_counts_leases_across_workers_and_frees_a_slot_at_each_outcome() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    enqueue(&admin, "default", "report", 6).await;
    let (a, b) = (server.client().await, server.client().await);
    // Set while one already runs: that one counts.
    let running = a.lease(&lease("default", 1, 0)).await.unwrap();
    admin.set_limit(&limit("task", "report", None, Some(2))).await.unwrap();
    let more = b.lease(&lease("default", 10, 0)).await.unwrap();
    assert_eq!(more.len(), 1, "two at most, across workers");
    assert!(a.lease(&lease("default", 10, 0)).await.unwrap().is_empty());
    assert_eq!(admin.limits().await.unwrap()[0].running, 2);
    // An ack frees a slot; a waiting lease gets the next task.
    let waiter = server.client().await;
    let waiting = tokio::spawn(async move {
        let got = waiter.lease(&lease("default", 10, 10_000)).await.unwrap();
        (waiter, got)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.ack(&running[0].id, running[0].lease_id, 1.into()).await.unwrap();
    let (_waiter, got) = waiting.await.unwrap();
    assert_eq!(got.len(), 1);
    // A worker that goes away frees its slots too.
    drop(b);
    common::eventually("the closed worker's slot", Duration::from_secs(5), || async {
        (admin.limits().await.unwrap()[0].running == 1).then_some(())
    })
    .await;
    assert_eq!(a.lease(&lease("default", 10, 0)).await.unwrap().len(), 1);

    // A queue limit covers every task name of the queue.
    enqueue(&admin, "q", "one", 2).await;
    enqueue(&admin, "q", "two", 2).await;
    admin.set_limit(&limit("queue", "q", None, Some(3))).await.unwrap();
    assert_eq!(a.lease(&lease("q", 10, 0)).await.unwrap().len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_is_global_across_several_workers() {
    let server = TestServer::start().await;
    let admin = server.client().await;
    admin.set_limit(&limit("task", "api_call", Some("20/s"), None)).await.unwrap();
    let tasks: Vec<TaskSpec> = (0..200).map(|_| TaskSpec::new("api_call")).collect();
    admin.enqueue_batch(tasks).await.unwrap();
    let started = Instant::now();
    let run_for = Duration::from_millis(1500);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let client = server.client().await;
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            while started.elapsed() < run_for {
                for task in client.lease(&lease("default", 10, 100)).await.unwrap() {
                    client.ack(&task.id, task.lease_id, 0.into()).await.unwrap();
                    done += 1;
                }
            }
            done
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // At most rate × time + the burst of 2 (a tenth of a second's worth): three workers do not triple it.
    let most = (20.0 * elapsed).floor() as usize + 2;
    assert!(total <= most, "{total} tasks started in {elapsed:.2} s under 20/s (at most {most})");
    assert!(total >= 15, "only {total} tasks in {elapsed:.2} s: the limit starves the workers");
    server.stop().await;
}

#[tokio::test]
async fn the_same_limit_again_keeps_its_bucket() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    client.set_limit(&limit("task", "t", Some("1/m"), None)).await.unwrap();
    enqueue(&client, "default", "t", 3).await;
    assert_eq!(client.lease(&lease("default", 5, 0)).await.unwrap().len(), 1);
    // A worker restarting declares it again: no new burst.
    client.set_limit(&limit("task", "t", Some("1/m"), None)).await.unwrap();
    assert!(client.lease(&lease("default", 5, 0)).await.unwrap().is_empty());
    // A different one starts afresh.
    client.set_limit(&limit("task", "t", Some("2/m"), None)).await.unwrap();
    assert_eq!(client.lease(&lease("default", 5, 0)).await.unwrap().len(), 1);
    server.stop().await;
}
