//! A small web app whose request handler enqueues a background task, and the worker that runs it: the task reads
//! the original request's path, method, a header and the current user from its context, although it runs
//! later, elsewhere, with the request long gone.
//!
//! ```text
//! broker serve --data-dir /tmp/broker-demo &                    # the daemon on 127.0.0.1:7420
//! cargo run --example http_app -- --listen 127.0.0.1:3000      # the web app and a worker, in one process
//! curl -X POST -H 'x-user-id: 42' -H 'x-request-id: abc' 'http://127.0.0.1:3000/signup/ada@example.com?plan=pro'
//! ```
//!
//! How the context gets there: the [`capture_request_context`] middleware collects what a task may need from the
//! request (path, base URL, method, query string, chosen headers, the current user) and runs the rest of the
//! request inside [`with_context`]. Every task enqueued through a [`Producer`] in that scope carries those values,
//! with no change to the handlers that enqueue. In the worker, [`send_welcome`] reads them back from
//! `task.context`. They travel unchanged with every retry.
//!
//! The user id comes from an `x-user-id` header here, standing in for whatever your authentication layer
//! decides; put the middleware after authentication and read the user from the request's extensions instead.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use broker_client::worker::{Context, WorkerBuilder};
use broker_client::{with_context, ConnectOptions, Producer, Task, TaskFailure, Value, Worker};

/// The request headers copied into a task's context (never copy credentials such as `authorization` or cookies).
pub const CONTEXT_HEADERS: [&str; 3] = ["user-agent", "x-request-id", "accept-language"];

/// The web app: `POST /signup/{email}` enqueues `send_welcome` for that address.
pub fn app(producer: Producer) -> Router {
    Router::new()
        .route("/signup/{email}", post(signup))
        .layer(middleware::from_fn(capture_request_context))
        .with_state(producer)
}

/// Middleware: runs the request inside a context scope holding what background tasks may need from it.
pub async fn capture_request_context(request: Request, next: Next) -> Response {
    let mut context = Context::new();
    let uri = request.uri();
    context.insert("path".into(), Value::from(uri.path()));
    context.insert("method".into(), Value::from(request.method().as_str()));
    context.insert("query_string".into(), Value::from(uri.query().unwrap_or("")));
    if let Some(host) = request.headers().get("host").and_then(|h| h.to_str().ok()) {
        context.insert("base_url".into(), Value::from(format!("http://{host}")));
    }
    let headers: Vec<(Value, Value)> = CONTEXT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = request.headers().get(*name)?.to_str().ok()?;
            Some((Value::from(*name), Value::from(value)))
        })
        .collect();
    context.insert("headers".into(), Value::Map(headers));
    if let Some(user) = request.headers().get("x-user-id").and_then(|h| h.to_str().ok()) {
        context.insert("user_id".into(), Value::from(user));
    }
    with_context(context, next.run(request)).await
}

/// `POST /signup/{email}`: enqueue the welcome mail and answer at once with the task's id.
async fn signup(State(producer): State<Producer>, Path(email): Path<String>) -> (StatusCode, String) {
    // No context here: the middleware's scope adds it.
    match producer.task("send_welcome").args((email,)).enqueue().await {
        Ok(enqueued) => (StatusCode::ACCEPTED, format!("enqueued {}\n", enqueued.id)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("cannot enqueue: {e}\n")),
    }
}

/// The background task: "sends" the mail and returns what it knew about the request that asked for it.
pub async fn send_welcome(task: Task<(String,)>) -> Result<BTreeMap<String, Value>, TaskFailure> {
    let (email,) = task.args.clone();
    let user_id = task.context_str("user_id").ok_or_else(|| TaskFailure::msg("no user in the context").no_retry())?;
    let header = |name: &str| -> Value {
        match task.context.get("headers") {
            Some(Value::Map(entries)) => {
                entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone()).unwrap_or(Value::Nil)
            }
            _ => Value::Nil,
        }
    };
    let mut seen = BTreeMap::new();
    seen.insert("email".to_string(), Value::from(email));
    seen.insert("user_id".to_string(), Value::from(user_id));
    for key in ["path", "method", "query_string", "base_url"] {
        seen.insert(key.to_string(), task.context.get(key).cloned().unwrap_or(Value::Nil));
    }
    seen.insert("request_id".to_string(), header("x-request-id"));
    println!(
        "send_welcome {}: mail to {} for user {user_id}, asked by {} {}",
        task.id, seen["email"], seen["method"], seen["path"]
    );
    Ok(seen)
}

/// Registers this app's task handlers on a worker.
pub fn register(builder: WorkerBuilder) -> WorkerBuilder {
    builder.register("send_welcome", send_welcome)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let options = match arg("--addr") {
        Some(addr) => ConnectOptions::new(addr),
        None => ConnectOptions::from_env(),
    };
    let listen = arg("--listen").unwrap_or_else(|| "127.0.0.1:3000".to_string());
    let producer = Producer::connect(options.clone().name("http_app")).await?;
    let worker = register(Worker::builder(options.name("http_app-worker")).concurrency(4))
        .grace_period(Duration::from_secs(10))
        .build();
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{listen}; try:");
    println!(
        "  curl -X POST -H 'x-user-id: 42' -H 'x-request-id: abc' 'http://{listen}/signup/ada@example.com?plan=pro'"
    );
    tokio::select! {
        served = axum::serve(listener, app(producer)) => served?,
        // The worker stops on Ctrl-C (finishing its running tasks); the web app stops with it.
        worked = worker.run() => worked?,
    }
    Ok(())
}
