//! A worker for the demo tasks: `add` returns the sum of its numeric args, `fail` always fails (not retried), and
//! `sleep` waits its one argument in seconds (to watch a graceful shutdown).
//!
//! ```text
//! cargo run --example worker -- --addr 127.0.0.1:7420 [--queues default] [--concurrency 4]
//! ```
//!
//! The daemon's address comes from `--addr HOST:PORT`, else `BROKER_ADDR`, else `127.0.0.1:7420`. Ctrl-C stops
//! leasing and lets running tasks finish (up to 30 s); a second Ctrl-C stops at once.

use std::time::Duration;

use broker_client::{ConnectOptions, Task, TaskFailure, Worker};
use serde::{Deserialize, Serialize};

/// A number as it arrives in args: integers stay integers.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

/// `add(*numbers)`: an integer sum if every argument is an integer, else a float sum.
async fn add(task: Task<Vec<Number>>) -> Result<Number, TaskFailure> {
    let mut int_sum: i64 = 0;
    let mut float_sum = 0.0;
    let mut all_ints = true;
    for n in &task.args {
        match *n {
            Number::Int(i) => {
                float_sum += i as f64;
                match int_sum.checked_add(i) {
                    Some(s) => int_sum = s,
                    None => all_ints = false,
                }
            }
            Number::Float(f) => {
                float_sum += f;
                all_ints = false;
            }
        }
    }
    Ok(if all_ints { Number::Int(int_sum) } else { Number::Float(float_sum) })
}

/// `fail(...)`: always fails, and says so once: retrying cannot help.
async fn fail(task: Task) -> Result<(), TaskFailure> {
    Err(TaskFailure::new("IntentionalFailure", format!("task {} failed on purpose", task.id)).no_retry())
}

/// `sleep(seconds)`: a long task.
async fn sleep(task: Task<(f64,)>) -> Result<f64, TaskFailure> {
    let seconds = task.args.0.clamp(0.0, 3600.0);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    Ok(seconds)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let options = match arg("--addr") {
        Some(addr) => ConnectOptions::new(addr),
        None => ConnectOptions::from_env(),
    };
    let queues: Vec<String> =
        arg("--queues").unwrap_or_else(|| "default".to_string()).split(',').map(str::to_string).collect();
    let concurrency = arg("--concurrency").map(|c| c.parse()).transpose()?.unwrap_or(4);
    println!("worker: serving {queues:?} on {} with concurrency {concurrency}", options.addr());
    Worker::builder(options.name(format!("example-worker@{}", std::process::id())))
        .queues(queues)
        .concurrency(concurrency)
        .register("add", add)
        .register("fail", fail)
        .register("sleep", sleep)
        .build()
        .run()
        .await?;
    Ok(())
}
