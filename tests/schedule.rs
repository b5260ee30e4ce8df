//! Periodic schedules kept by the daemon. Timing cases run on a manual clock: a tick is enqueued exactly once,
//! ticks missed while the daemon was held up or down coalesce (or are skipped, per schedule), and a restart
//! neither repeats nor loses one. The kill -9 case runs the real binary on the wall clock.

mod common;

use std::time::Duration;

use broker::clock::Clock;
use broker_client::proto::{ErrorCode, ScheduleAdd, TaskSpec, TaskState};
use broker_client::Client;
use common::{eventually, Daemon, TestServer};

fn every(name: &str, ms: u64, catch_up: Option<&str>) -> ScheduleAdd {
    ScheduleAdd {
        name: name.into(),
        task: TaskSpec { queue: Some("periodic".into()), ..TaskSpec::new("report") },
        every_ms: Some(ms),
        catch_up: catch_up.map(Into::into),
        ..ScheduleAdd::default()
    }
}

/// The ids of the tasks waiting in the `periodic` queue, oldest first.
async fn fired(client: &Client) -> Vec<String> {
    let lease = broker_client::proto::Lease { queues: vec!["periodic".into()], max: 1000, wait_ms: 0, lease_ms: None };
    let tasks = client.lease(&lease).await.unwrap();
    for task in &tasks {
        client.release(&task.id, task.lease_id).await.unwrap();
    }
    tasks.into_iter().map(|t| t.id).collect()
}

fn tick_of(id: &str) -> u64 {
    id.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test]
async fn a_schedule_fires_each_tick_once_and_coalesces_ticks_the_daemon_was_late_for() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    let start = server.clock().now_ms();
    let info = client.schedule_add(&every("hourly_report", 10_000, None)).await.unwrap();
    assert_eq!((info.next_ms, info.last_ms, info.catch_up.as_str()), (Some(start + 10_000), None, "once"));
    server.tick();
    assert!(fired(&client).await.is_empty(), "nothing before the first tick");
    server.clock().advance(Duration::from_millis(10_000));
    server.tick();
    server.tick();
    let ids = fired(&client).await;
    assert_eq!(ids, [format!("sched:hourly_report:{}", start + 10_000)]);
    // Three periods at once: one task, for the latest tick.
    server.clock().advance(Duration::from_millis(35_000));
    server.tick();
    let ids = fired(&client).await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(tick_of(&ids[1]), start + 40_000);
    // The tick is recorded once its task is durable.
    let info = eventually("the last tick recorded", Duration::from_secs(5), || async {
        server.tick();
        let info = client.schedules().await.unwrap().pop().unwrap();
        (info.last_ms == Some(start + 40_000)).then_some(info)
    })
    .await;
    assert_eq!(info.next_ms, Some(start + 50_000));
    // The same definition again changes nothing; pause stops it, and ticks while paused never fire.
    assert_eq!(client.schedule_add(&every("hourly_report", 10_000, None)).await.unwrap().next_ms, info.next_ms);
    assert!(client.schedule_set_paused("hourly_report", true).await.unwrap().paused);
    server.clock().advance(Duration::from_millis(30_000));
    server.tick();
    assert_eq!(fired(&client).await.len(), 2);
    let resumed = client.schedule_set_paused("hourly_report", false).await.unwrap();
    assert_eq!(resumed.next_ms, Some(start + 80_000));
    assert!(client.schedule_remove("hourly_report").await.unwrap());
    assert!(!client.schedule_remove("hourly_report").await.unwrap());
    assert!(client.schedules().await.unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn cron_schedules_follow_their_time_zone_and_bad_ones_are_refused() {
    let server = TestServer::start_manual().await;
    let client = server.client().await;
    // The manual clock starts at 2023-11-14 22:13:20 UTC, which is 23:13:20 in Paris.
    let paris = ScheduleAdd {
        name: "nightly".into(),
        task: TaskSpec::new("cleanup"),
        cron: Some("30 2 * * *".into()),
        timezone: Some("Europe/Paris".into()),
        ..ScheduleAdd::default()
    };
    let info = client.schedule_add(&paris).await.unwrap();
    // 02:30 in Paris on the 15th is 01:30 UTC.
    assert_eq!(info.next_ms, Some(1_700_011_800_000));
    let seconds =
        ScheduleAdd { name: "fast".into(), cron: Some("*/15 * * * * *".into()), timezone: None, ..paris.clone() };
    assert_eq!(client.schedule_add(&seconds).await.unwrap().next_ms, Some(1_700_000_010_000)); // :20 → :30
    server.clock().advance(Duration::from_millis(250));
    // Cron ticks fall on whole seconds, whatever the milliseconds of the time they are looked for from.
    let later = ScheduleAdd { name: "fast-later".into(), ..seconds.clone() };
    assert_eq!(client.schedule_add(&later).await.unwrap().next_ms, Some(1_700_000_010_000)); // :20.250 → :30
    let bad = [
        ScheduleAdd { cron: Some("61 * * * *".into()), ..paris.clone() },
        ScheduleAdd { timezone: Some("Mars/Olympus".into()), ..paris.clone() },
        ScheduleAdd { cron: None, ..paris.clone() },
        ScheduleAdd { every_ms: Some(60_000), ..paris.clone() },
        every("tooquick", 10, None),
        every("x", 60_000, Some("twice")),
        ScheduleAdd { task: TaskSpec { id: Some("fixed".into()), ..TaskSpec::new("t") }, ..every("x", 60_000, None) },
        ScheduleAdd { name: "n".repeat(151), ..every("x", 60_000, None) },
    ];
    for request in bad {
        let err = client.schedule_add(&request).await.unwrap_err();
        assert!(err.is(ErrorCode::BadRequest), "{request:?}: {err}");
    }
    let err = client.schedule_set_paused("nope", true).await.unwrap_err();
    assert!(err.is(ErrorCode::NotFound) && err.to_string().contains("no schedule named \"nope\""), "{err}");
    server.stop().await;
}

#[tokio::test]
async fn after_downtime_a_schedule_fires_once_or_skips_and_a_restart_never_repeats_a_tick() {
    let mut server = TestServer::start_manual().await;
    let client = server.client().await;
    let start = server.clock().now_ms();
    client.schedule_add(&every("once", 10_000, None)).await.unwrap();
    client.schedule_add(&every("skip", 10_000, Some("skip"))).await.unwrap();
    server.clock().advance(Duration::from_millis(10_000));
    server.tick();
    assert_eq!(fired(&client).await.len(), 2);
    // Restart at once, before the ticks are recorded in the control file: the tasks themselves say they fired.
    server.restart().await;
    let client = server.client().await;
    server.tick();
    assert_eq!(fired(&client).await.len(), 2, "a restart repeated a tick");
    // Down for an hour: `once` fires one task for the latest missed tick, `skip` none.
    server.stop_keep_dir().await;
    server.clock().advance(Duration::from_millis(3_600_000 + 5_000));
    server.start_again().await;
    let client = server.client().await;
    server.tick();
    let ids = fired(&client).await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(ids[2], format!("sched:once:{}", start + 3_610_000));
    let skip = client.schedules().await.unwrap().into_iter().find(|s| s.name == "skip").unwrap();
    assert_eq!(skip.next_ms, Some(start + 3_620_000));
    assert_eq!(client.get(&ids[2]).await.unwrap().state, TaskState::Pending);
    server.stop().await;
}

#[test]
fn kill_9_across_ticks_neither_repeats_nor_loses_one() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut daemon = Daemon::spawn(dir.path());
    let (anchor, period) = runtime.block_on(async {
        let client = broker_client::ConnectOptions::new(daemon.addr.clone()).connect().await.unwrap();
        let info = client.schedule_add(&every("beat", 1000, None)).await.unwrap();
        (info.next_ms.unwrap() - 1000, 1000)
    });
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    // When the daemon was down: from just before the kill to once the new one listens.
    let mut down = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1700));
        let killed = now_ms();
        daemon.kill_9();
        daemon = Daemon::spawn(dir.path());
        down.push((killed, now_ms()));
    }
    std::thread::sleep(Duration::from_millis(1500));
    runtime.block_on(async {
        let client = broker_client::ConnectOptions::new(daemon.addr.clone()).connect().await.unwrap();
        let last = client.schedules().await.unwrap()[0].next_ms.unwrap() - period;
        let ids = fired(&client).await;
        let ticks: Vec<u64> = ids.iter().map(|id| tick_of(id)).collect();
        // Each tick since the schedule was added, once. A tick missed while the daemon was down is caught up
        // (`once`); only when a restart outlasted a period do its missed ticks coalesce into the latest, so a
        // tick may be missing only if it fell due while the daemon was down.
        let expected: Vec<u64> = (1..).map(|k| anchor + k * period).take_while(|t| *t <= last).collect();
        let mut sorted = ticks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ticks.len(), "a tick fired twice: {ticks:?}");
        assert!(sorted.iter().all(|t| expected.contains(t)), "ticks fired: {ticks:?}, expected {expected:?}");
        for missing in expected.iter().filter(|t| !sorted.contains(t)) {
            let while_down = down.iter().any(|(from, to)| (*from..=*to).contains(missing));
            assert!(while_down, "tick {missing} lost though the daemon was up (down: {down:?}; fired {ticks:?})");
        }
        assert_eq!(sorted.last(), expected.last(), "the latest tick fired");
    });
    daemon.kill_9();
}
