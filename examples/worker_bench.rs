//! End-to-end throughput and latency of the worker runtime: one producer connection enqueues, one worker with
//! concurrency 8 runs a no-op handler, the daemon stores every result.
//!
//! ```text
//! cargo build --release --examples --bin broker
//! target/release/broker serve --listen 127.0.0.1:7499 --data-dir /tmp/broker-bench &
//! target/release/examples/worker_bench --addr 127.0.0.1:7499 [--tasks 20000] [--window 256]
//!                                      [--latency-tasks 2000] [--users 8] [--concurrency 8] [--prefetch N]
//! ```
//!
//! Two phases, each on its own queue so they do not mix:
//!
//! 1. **throughput**: enqueue `--tasks` tasks as fast as one connection allows (`--window` requests in flight),
//!    while the worker drains them; tasks/s is tasks over the time from the first enqueue until the daemon counts
//!    the last success. The daemon's own timestamps give the enqueue → result latency of every task under that
//!    saturating load (millisecond resolution).
//! 2. **latency**: `--users` concurrent callers each enqueue one task and wait for its result, again and again,
//!    until `--latency-tasks` have finished; p50/p99 of enqueue → result as the caller sees it.
//!
//! The worker runs in this process, on its own connection; the producer is a separate connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_client::{ConnectOptions, Producer, Task, TaskFailure, TaskState, Worker};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn arg_or(name: &str, default: usize) -> usize {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn noop(_task: Task<()>) -> Result<(), TaskFailure> {
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = match arg("--addr") {
        Some(addr) => ConnectOptions::new(addr),
        None => ConnectOptions::from_env(),
    };
    let tasks = arg_or("--tasks", 20_000);
    let window = arg_or("--window", 256).max(1);
    let latency_tasks = arg_or("--latency-tasks", 2_000);
    let users = arg_or("--users", 8).max(1);
    let concurrency = arg_or("--concurrency", 8);
    // The worker's own default (as many as `concurrency`) unless given.
    let prefetch = arg("--prefetch").and_then(|v| v.parse().ok()).unwrap_or(concurrency);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let run = format!("{}-{}", std::process::id(), now.as_millis());
    let throughput_queue = format!("bench-throughput-{run}");
    let latency_queue = format!("bench-latency-{run}");

    let worker = Worker::builder(options.clone().name("worker_bench-worker"))
        .queues([throughput_queue.clone(), latency_queue.clone()])
        .concurrency(concurrency)
        .prefetch(prefetch)
        .poll_wait(Duration::from_millis(200))
        .register("noop", noop)
        .build();
    let stop = worker.shutdown_handle();
    let worker = tokio::spawn(worker.run_until(std::future::pending()));

    let producer = Producer::connect(options.name("worker_bench-producer")).await?;
    let client = producer.client().clone();
    let before = client.stats().await?.totals.succeeded;

    // Phase 1: throughput.
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(window));
    let mut sends = JoinSet::new();
    let mut ids = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let permit = slots.clone().acquire_owned().await?;
        let id = format!("t-{run}-{i}");
        ids.push(id.clone());
        let task = producer.task("noop").id(id).queue(throughput_queue.clone());
        sends.spawn(async move {
            let result = task.enqueue().await;
            drop(permit);
            result
        });
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    let enqueued_in = started.elapsed();
    loop {
        let done = client.stats().await?.totals.succeeded - before;
        if done >= tasks as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let mut daemon_ms = Vec::with_capacity(tasks);
    for id in &ids {
        let info = client.get(id).await?;
        if info.state != TaskState::Success {
            return Err(format!("task {id} ended {}", info.state).into());
        }
        daemon_ms.push(info.finished_at_ms.unwrap_or(0).saturating_sub(info.created_at_ms) as f64);
    }
    daemon_ms.sort_by(f64::total_cmp);
    println!(
        "throughput: {tasks} tasks in {:.2} s = {:.0} tasks/s end to end (enqueue alone: {:.0} tasks/s, window {window}, worker concurrency {concurrency}, prefetch {prefetch})",
        elapsed.as_secs_f64(),
        tasks as f64 / elapsed.as_secs_f64(),
        tasks as f64 / enqueued_in.as_secs_f64(),
    );
    println!(
        "  enqueue -> result under that load (daemon timestamps, ms resolution): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&daemon_ms, 50.0),
        percentile(&daemon_ms, 99.0),
        daemon_ms.last().copied().unwrap_or(f64::NAN),
    );

    // Phase 2: latency with `users` concurrent callers.
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(latency_tasks)));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = JoinSet::new();
    let started = Instant::now();
    for _ in 0..users {
        let (producer, latencies, next, queue) =
            (producer.clone(), latencies.clone(), next.clone(), latency_queue.clone());
        callers.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < latency_tasks {
                let t0 = Instant::now();
                let info = producer
                    .task("noop")
                    .queue(queue.clone())
                    .enqueue_and_wait(Duration::from_secs(30))
                    .await
                    .map_err(|e| e.to_string())?;
                if info.state != TaskState::Success {
                    return Err(format!("task {} ended {}", info.id, info.state));
                }
                latencies.lock().unwrap_or_else(|p| p.into_inner()).push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(())
        });
    }
    while let Some(done) = callers.join_next().await {
        done??;
    }
    let elapsed = started.elapsed();
    let mut latencies = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    latencies.sort_by(f64::total_cmp);
    println!(
        "latency: {} tasks, {users} concurrent callers each enqueue + wait for the result: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.0} tasks/s)",
        latencies.len(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len() as f64 / elapsed.as_secs_f64(),
    );

    stop.graceful();
    worker.await??;
    Ok(())
}
