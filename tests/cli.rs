//! The `broker` command line against a real daemon: what a user sees when a command fails.

mod common;

use std::process::Command;

use common::TestServer;

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_command_prints_its_message_and_causes_never_a_backtrace() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["result", "no-such-task", "--addr", &addr])
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "1")
            .output()
            .expect("run broker")
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("no-such-task"), "the message names the task: {stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains(" at "), "a backtrace was printed: {stderr}");
    assert!(stderr.lines().count() <= 4, "more than a message and its causes: {stderr}");
    server.stop().await;
}

#[test]
fn an_unreachable_daemon_is_named_with_the_cause() {
    // A port nothing listens on: bind one, then drop it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["stat", "--addr", &format!("127.0.0.1:{port}")])
        .env("RUST_BACKTRACE", "full")
        .output()
        .expect("run broker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("caused by:") || stderr.contains("refused"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn the_daemon_logs_json_lines_and_reads_settings_from_the_environment() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0", "--http", "", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("BROKER_LOG", "info")
        .env("BROKER_FSYNC", "interval")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listening = None;
    for line in lines.by_ref().take(20) {
        let line = line.unwrap();
        let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if json["fields"]["message"] == "listening" {
            listening = Some(json);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let listening = listening.expect("a `listening` line");
    assert_eq!(listening["fields"]["fsync"], "interval", "BROKER_FSYNC was not read: {listening}");
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_task_prints_the_whole_record_and_stat_watch_refreshes() {
    use broker_client::proto::{TaskSpec, Value};
    let server = TestServer::start().await;
    let client = server.client().await;
    let spec = TaskSpec {
        args: vec![Value::from("report-42")],
        kwargs: [("format".to_string(), Value::from("pdf"))].into(),
        ..TaskSpec::new("reports.export")
    };
    let id = client.enqueue(spec).await.unwrap().id;
    let addr = server.addr();
    let (task, watch) = tokio::task::spawn_blocking(move || {
        let task = Command::new(env!("CARGO_BIN_EXE_broker")).args(["task", &id, "--addr", &addr]).output().unwrap();
        let mut watch = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["stat", "--watch", "--interval", "0.2", "--addr", &addr])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let _ = watch.kill();
        (task, watch.wait_with_output().unwrap())
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&task.stdout);
    assert!(task.status.success(), "{}", String::from_utf8_lossy(&task.stderr));
    for part in ["PENDING", "reports.export", "report-42", "\"format\": \"pdf\"", "attempts:  0 of 4"] {
        assert!(text.contains(part), "no {part:?} in:\n{text}");
    }
    let frames = String::from_utf8_lossy(&watch.stdout).matches("QUEUE").count();
    assert!(frames >= 2, "{frames} refreshes in 1.5 s at 0.2 s");
    assert!(String::from_utf8_lossy(&watch.stdout).contains("per second:"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_sequences_from_producers_never_reach_the_terminal() {
    use broker_client::proto::TaskSpec;
    let server = TestServer::start().await;
    let client = server.client().await;
    let id = client.enqueue(TaskSpec::new("\u{1b}]0;owned\u{7}\u{1b}[2Jtask")).await.unwrap().id;
    let addr = server.addr();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_broker")).args(["task", &id, "--addr", &addr]).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{text:?}");
    assert!(text.contains("task"), "{text}");
    server.stop().await;
}

/// Runs `broker ARGS --addr ADDR`: whether it succeeded, and what it printed (stdout, then stderr).
fn broker_at(addr: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_broker")).args(args).args(["--addr", addr]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_limits_from_the_command_line() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let run = move |args: &[&str]| broker_at(&addr, args);
    let steps = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for args in [
            &["pause", "mail"][..],
            &["stat"],
            &["limit", "set", "--task", "send", "--rate", "100/m", "--concurrency", "4"],
            &["limit", "list"],
            &["limit", "clear", "--task", "send"],
            &["limit", "list"],
            &["resume", "mail"],
            &["stat"],
            &["limit", "set", "--queue", "mail"],
            &["limit", "set", "--task", "send", "--rate", "fast"],
        ] {
            seen.push(run(args));
        }
        seen
    })
    .await
    .unwrap();
    assert!(steps[..8].iter().all(|(ok, _)| *ok), "{steps:?}");
    assert!(steps[1].1.contains("mail (paused)"), "{}", steps[1].1);
    assert!(steps[3].1.contains("send") && steps[3].1.contains("100/m"), "{}", steps[3].1);
    assert!(!steps[5].1.contains("send"), "{}", steps[5].1);
    assert!(!steps[7].1.contains("paused"), "{}", steps[7].1);
    // Nothing to set, and a rate that does not parse: a message, not a panic.
    assert!(!steps[8].0 && steps[8].1.contains("--rate"), "{}", steps[8].1);
    assert!(!steps[9].0 && steps[9].1.contains("N/s"), "{}", steps[9].1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_from_the_command_line() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let run = move |args: &[&str]| broker_at(&addr, args);
    let steps = tokio::task::spawn_blocking(move || {
        [
            &["schedule", "add", "nightly", "cleanup", "[1]", "--cron", "30 2 * * *", "--tz", "Europe/Paris"][..],
            &["schedule", "add", "beat", "ping", "--every", "60", "--catch-up", "skip"],
            &["schedule", "pause", "beat"],
            &["schedule", "list"],
            &["schedule", "remove", "beat"],
            &["schedule", "list", "--json"],
            &["schedule", "add", "bad", "t", "--cron", "not cron"],
            &["schedule", "add", "none", "t"],
        ]
        .map(run)
    })
    .await
    .unwrap();
    assert!(steps[..6].iter().all(|(ok, _)| *ok), "{steps:?}");
    assert!(steps[0].1.contains("next tick") && steps[0].1.contains("UTC"), "{}", steps[0].1);
    assert!(steps[3].1.contains("30 2 * * * Europe/Paris") && steps[3].1.contains("paused"), "{}", steps[3].1);
    assert!(steps[5].1.contains("nightly") && !steps[5].1.contains("\"beat\""), "{}", steps[5].1);
    assert!(!steps[6].0 && steps[6].1.contains("cron"), "{}", steps[6].1);
    assert!(!steps[7].0, "{}", steps[7].1);
    server.stop().await;
}
