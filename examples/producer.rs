//! Enqueues an `add(2, 3)` and a `fail()` and prints their results, waiting up to 10 s for each.
//!
//! ```text
//! cargo run --example worker &             # in another terminal, or in the background
//! cargo run --example producer -- --addr 127.0.0.1:7420
//! ```
//!
//! The daemon's address comes from `--addr HOST:PORT`, else `BROKER_ADDR`, else `127.0.0.1:7420`. Exits non-zero
//! if a task did not end as expected (no worker running, for instance).

use std::time::Duration;

use broker_client::proto::TaskInfo;
use broker_client::{ConnectOptions, Producer, TaskState};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn show(label: &str, info: &TaskInfo) {
    match info.state {
        TaskState::Success => {
            println!("{label} -> {} {}", info.state, info.result.clone().unwrap_or(broker_client::Value::Nil))
        }
        TaskState::Failure | TaskState::Retry => {
            let error = info.error.clone().unwrap_or_default();
            println!("{label} -> {} {}: {}", info.state, error.kind, error.message)
        }
        state => println!("{label} -> still {state} after the timeout (is a worker running?)"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match arg("--addr") {
        Some(addr) => ConnectOptions::new(addr),
        None => ConnectOptions::from_env(),
    };
    let timeout = Duration::from_secs(10);
    let producer = Producer::connect(options.name("example-producer")).await?;

    let add = producer.task("add").args((2, 3)).enqueue().await?;
    let fail = producer.task("fail").args(("oops",)).enqueue().await?;
    println!("enqueued add {} and fail {}", add.id, fail.id);

    let add_info = producer.client().wait(&add.id, timeout).await?;
    let fail_info = producer.client().wait(&fail.id, timeout).await?;
    show("add(2, 3)", &add_info);
    show("fail(\"oops\")", &fail_info);

    let ok = add_info.state == TaskState::Success && fail_info.state == TaskState::Failure;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
