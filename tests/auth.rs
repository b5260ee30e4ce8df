//! Tokens and roles: `hello` must carry a known token when the daemon has tokens, and each role may send only
//! its ops (proto.md "Tokens and roles").

mod common;

use std::process::Command;

use broker::config::{Role, TokenConfig};
use broker_client::proto::{ErrorCode, Lease, TaskSpec, Value};
use broker_client::{Client, ConnectOptions};
use common::TestServer;

const PRODUCER: &str = "producer-token-0123456789abcdef";
const WORKER: &str = "worker-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";

async fn with_tokens() -> TestServer {
    TestServer::start_with(
        |config| {
            config.tokens =
                [("web", PRODUCER, Role::Producer), ("w", WORKER, Role::Worker), ("ops", ADMIN, Role::Admin)]
                    .into_iter()
                    .map(|(name, token, role)| TokenConfig { name: name.into(), token: token.into(), role })
                    .collect()
        },
        false,
    )
    .await
}

async fn connect(server: &TestServer, token: &str) -> Client {
    ConnectOptions::new(format!("tcp://:{token}@{}", server.addr())).connect().await.expect("connect")
}

#[tokio::test]
async fn hello_needs_a_known_token() {
    let server = with_tokens().await;
    let addr = server.addr();
    let none = ConnectOptions::new(addr.clone()).connect().await.unwrap_err();
    assert!(none.is(ErrorCode::Unauthorized), "{none}");
    let wrong = ConnectOptions::new(addr.clone()).token("admin-token-0123456789abcdeX").connect().await.unwrap_err();
    assert!(wrong.is(ErrorCode::Unauthorized), "{wrong}");
    assert!(!wrong.to_string().contains("admin-token"), "the error shows the token: {wrong}");
    let admin = connect(&server, ADMIN).await;
    assert_eq!(admin.server().role, "admin");
    admin.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn each_role_may_send_only_its_ops() {
    let server = with_tokens().await;
    let producer = connect(&server, PRODUCER).await;
    let worker = ConnectOptions::new(server.addr()).token(WORKER).connect().await.unwrap();
    let admin = connect(&server, ADMIN).await;
    assert_eq!((producer.server().role.as_str(), worker.server().role.as_str()), ("producer", "worker"));

    let id = producer.enqueue(TaskSpec::new("t")).await.unwrap().id;
    producer.get(&id).await.unwrap();
    let lease = Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let forbidden = |e: broker_client::Error| assert!(e.is(ErrorCode::Forbidden), "{e}");
    forbidden(producer.lease(&lease).await.unwrap_err());
    forbidden(producer.stats().await.unwrap_err());
    forbidden(producer.revoke(&id).await.unwrap_err());
    forbidden(producer.purge("default").await.unwrap_err());

    let task = worker.lease(&lease).await.unwrap().pop().expect("the task");
    worker.ack(&task.id, task.lease_id, Value::from(1)).await.unwrap();
    forbidden(worker.stats().await.unwrap_err());
    forbidden(worker.purge("default").await.unwrap_err());
    forbidden(worker.revoke(&id).await.unwrap_err());
    // A refused op changed nothing, and the connection goes on.
    assert_eq!(producer.get(&id).await.unwrap().result, Some(Value::from(1)));

    admin.stats().await.unwrap();
    admin.purge("default").await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn without_tokens_every_client_is_admin() {
    let server = TestServer::start().await;
    let client = server.client().await;
    assert_eq!(client.server().role, "admin");
    client.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_non_loopback_address_without_tokens_is_refused() {
    // Refused before binding anything.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let err = broker::server::start(config, std::sync::Arc::new(broker::clock::SystemClock)).await.err().unwrap();
    let message = err.to_string();
    assert!(message.contains("without tokens") && message.contains("--insecure-no-auth"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_takes_the_token_from_the_url_or_broker_token_and_never_prints_it() {
    let server = with_tokens().await;
    let addr = server.addr();
    let run = move |addr: String, env_token: Option<&'static str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_broker"));
        command.args(["stat", "--json", "--addr", &addr]).env_remove("BROKER_TOKEN");
        if let Some(token) = env_token {
            command.env("BROKER_TOKEN", token);
        }
        command.output().expect("run broker")
    };
    let (a1, a2, a3) = (addr.clone(), addr.clone(), addr.clone());
    let (by_url, by_env, refused) = tokio::task::spawn_blocking(move || {
        (run(format!("tcp://:{ADMIN}@{a1}"), None), run(a2, Some(ADMIN)), run(format!("tcp://:{PRODUCER}@{a3}"), None))
    })
    .await
    .unwrap();
    assert!(by_url.status.success(), "{}", String::from_utf8_lossy(&by_url.stderr));
    assert!(by_env.status.success(), "{}", String::from_utf8_lossy(&by_env.stderr));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("forbidden") && !stderr.contains(PRODUCER), "{stderr}");
    server.stop().await;
}
