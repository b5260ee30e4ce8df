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
