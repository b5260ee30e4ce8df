//! `broker-bench`: throughput and latency of a broker daemon, printed as a table. Not a test.
//!
//! Without `--addr` it starts the real daemon in-process on 127.0.0.1:0 with a fresh temporary data directory
//! and the `--fsync` policy asked for; with `--addr` it loads an already-running daemon (whose data grows).
//!
//! ```text
//! cargo run --release --bin broker-bench -- --fsync always
//! ```
//!
//! Scenarios (each with `--connections` producer connections and, for cycles, as many consumer connections):
//! - enqueue, unpipelined: each connection waits for every reply before the next request;
//! - enqueue, pipelined: each connection keeps `--depth` requests in flight;
//! - enqueue, batch: each connection sends `enqueue_batch` of `--batch` tasks, unpipelined;
//! - cycle: producers enqueue while consumers lease (up to `--depth` at a time) and ack with a small result;
//!   unpipelined (one lease of 1, one ack at a time) and pipelined;
//! - latency: p50/p99/p999 of one unpipelined enqueue round trip on an otherwise idle daemon.
//!
//! Every task carries a 100-byte payload argument.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use broker::clock::SystemClock;
use broker::config::{Config, FsyncPolicy};
use broker_client::proto::{Lease, TaskSpec, Value};
use broker_client::{Client, ConnectOptions};
use clap::Parser;
use futures_util::stream::{FuturesUnordered, StreamExt};

#[derive(Parser, Clone)]
#[command(about = "Measure a broker daemon's throughput and latency")]
struct Args {
    /// A running daemon to load; without it, one is started in-process on a temporary directory.
    #[arg(long)]
    addr: Option<String>,
    /// The fsync policy of the in-process daemon.
    #[arg(long, default_value = "always")]
    fsync: String,
    /// Producer connections (and consumer connections for cycles).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection when pipelined.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Tasks per enqueue_batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seconds per throughput scenario.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Round trips for the latency scenario.
    #[arg(long, default_value_t = 5000)]
    samples: usize,
    /// Run only scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
}

fn payload() -> Vec<Value> {
    vec![Value::from("x".repeat(100))]
}

fn task(queue: &str) -> TaskSpec {
    TaskSpec { queue: Some(queue.to_string()), args: payload(), ..TaskSpec::new("bench") }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _dir;
    let _server;
    let addr = match &args.addr {
        Some(addr) => addr.clone(),
        None => {
            let dir = tempfile::tempdir().context("temp dir")?;
            let fsync = match args.fsync.as_str() {
                "always" => FsyncPolicy::Always,
                "interval" => FsyncPolicy::Interval,
                other => anyhow::bail!("--fsync must be always or interval, not {other}"),
            };
            let config = Config {
                listen: "127.0.0.1:0".parse()?,
                data_dir: dir.path().to_path_buf(),
                fsync,
                ..Config::default()
            };
            let server = broker::server::start(config, Arc::new(SystemClock)).await?;
            let addr = server.addr().to_string();
            _dir = dir;
            _server = server;
            addr
        }
    };
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "broker-bench: daemon {addr}, fsync={}, {} connections, depth {}, {:.1}s per scenario, 100-byte payloads",
        if args.addr.is_some() { "(as configured)" } else { args.fsync.as_str() },
        args.connections,
        args.depth,
        args.seconds
    );
    println!("{:<36} {:>14}", "scenario", "result");
    let wanted = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));

    let scenarios: [(&str, usize, Mode); 3] = [
        ("enqueue unpipelined", 1, Mode::Single),
        ("enqueue pipelined", args.depth, Mode::Single),
        ("enqueue batch", 1, Mode::Batch),
    ];
    for (i, (name, depth, mode)) in scenarios.into_iter().enumerate() {
        if wanted(name) {
            let queue = format!("enq{i}");
            let rate = enqueue_rate(&addr, &args, &queue, depth, mode, duration).await?;
            println!("{name:<36} {:>10.0} /s", rate);
        }
    }
    for (i, (name, depth)) in [("cycle unpipelined", 1), ("cycle pipelined", args.depth)].into_iter().enumerate() {
        if wanted(name) {
            let rate = cycle_rate(&addr, &args, &format!("cyc{i}"), depth, duration).await?;
            println!("{name:<36} {:>10.0} /s", rate);
        }
    }
    if wanted("latency") {
        let client = connect(&addr).await?;
        let mut samples = Vec::with_capacity(args.samples);
        for _ in 0..args.samples {
            let start = Instant::now();
            client.enqueue(task("lat")).await?;
            samples.push(start.elapsed());
        }
        samples.sort();
        for (label, q) in [("p50", 0.50), ("p99", 0.99), ("p999", 0.999)] {
            let d = samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
            println!("{:<36} {:>10.0} µs", format!("enqueue latency {label}"), d.as_secs_f64() * 1e6);
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Mode {
    Single,
    Batch,
}

async fn connect(addr: &str) -> Result<Client> {
    ConnectOptions::new(addr).name("broker-bench").connect().await.with_context(|| format!("connect to {addr}"))
}

/// Tasks enqueued per second over all connections.
async fn enqueue_rate(addr: &str, args: &Args, queue: &str, depth: usize, mode: Mode, run: Duration) -> Result<f64> {
    let mut handles = Vec::new();
    let start = Instant::now();
    for _ in 0..args.connections {
        let client = connect(addr).await?;
        let queue = queue.to_string();
        let batch = args.batch;
        handles.push(tokio::spawn(async move {
            let deadline = Instant::now() + run;
            let mut done = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < depth && Instant::now() < deadline {
                    let client = client.clone();
                    let queue = queue.clone();
                    in_flight.push(async move {
                        match mode {
                            Mode::Single => client.enqueue(task(&queue)).await.map(|_| 1u64),
                            Mode::Batch => client
                                .enqueue_batch((0..batch).map(|_| task(&queue)).collect())
                                .await
                                .map(|v| v.len() as u64),
                        }
                    });
                }
                match in_flight.next().await {
                    Some(result) => done += result?,
                    None => break,
                }
            }
            Ok::<u64, broker_client::Error>(done)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Tasks enqueued, leased and acked per second, producers and consumers running at once.
async fn cycle_rate(addr: &str, args: &Args, queue: &str, depth: usize, run: Duration) -> Result<f64> {
    let producers = {
        let mut handles = Vec::new();
        for _ in 0..args.connections {
            let client = connect(addr).await?;
            let queue = queue.to_string();
            handles.push(tokio::spawn(async move {
                let deadline = Instant::now() + run;
                let mut in_flight = FuturesUnordered::new();
                loop {
                    while in_flight.len() < depth && Instant::now() < deadline {
                        let client = client.clone();
                        let queue = queue.clone();
                        in_flight.push(async move { client.enqueue(task(&queue)).await });
                    }
                    match in_flight.next().await {
                        Some(result) => {
                            result?;
                        }
                        None => break,
                    }
                }
                Ok::<(), broker_client::Error>(())
            }));
        }
        handles
    };
    let start = Instant::now();
    let mut consumers = Vec::new();
    for _ in 0..args.connections {
        let client = connect(addr).await?;
        let queue = queue.to_string();
        consumers.push(tokio::spawn(async move {
            let deadline = Instant::now() + run;
            let mut acked = 0u64;
            let lease = Lease { queues: vec![queue], max: depth as u32, wait_ms: 100, lease_ms: None };
            while Instant::now() < deadline {
                let tasks = client.lease(&lease).await?;
                let mut acks = FuturesUnordered::new();
                for t in tasks {
                    let client = client.clone();
                    acks.push(async move { client.ack(&t.id, t.lease_id, Value::from("ok")).await });
                    if depth == 1 {
                        if let Some(r) = acks.next().await {
                            r?;
                            acked += 1;
                        }
                    }
                }
                while let Some(r) = acks.next().await {
                    r?;
                    acked += 1;
                }
            }
            Ok::<u64, broker_client::Error>(acked)
        }));
    }
    let mut total = 0;
    for h in consumers {
        total += h.await??;
    }
    let elapsed = start.elapsed();
    for h in producers {
        h.await??;
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}
