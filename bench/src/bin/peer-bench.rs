//! `peer-bench`: one load generator run against broker, beanstalkd and a Redis reliable queue, so that their
//! figures can be compared. Not a test. `scripts/bench-peers` starts the daemons, drives this binary and prints
//! the table; see BENCHMARKS.md for the method.
//!
//! Subcommands:
//! - `load --system broker|beanstalkd|redis --addr ADDR`: every scenario against one running daemon, appending one
//!   record per figure to `--out` (tab-separated: variant, run, system, figure, value);
//! - `disk --dir DIR`: the disk's own rate of append + `fdatasync` (the ceiling of any "fsync every write" policy)
//!   and of append + `sync_file_range` (what sled's flush does on Linux);
//! - `soak --addr ADDR --pid PID --data-dir DIR --tasks N`: push N tasks through a broker (enqueue, lease, ack)
//!   while sampling its resident memory, measure its data directory, wait until every result has expired (the
//!   daemon should run with a short `result_ttl_secs`) and measure the directory again;
//! - `memory --addr ADDR --pid PID --phase fill|reopened`: resident memory per waiting task and per kept result
//!   (100-byte payloads and results), on a fresh daemon; `reopened` measures the kept results again after a
//!   restart of the daemon on the same data directory;
//! - `table FILES...`: medians over the runs, and broker ÷ peer ratios taken run by run, as a plain-text table;
//! - `free-port`, `wait-port ADDR`: helpers for the script.
//!
//! The load is the same for the three systems: `--connections` producer connections (and as many consumer
//! connections in the cycles), 100-byte payloads, the same pipelining depth and the same time per scenario.
//! Each system is driven through its own wire protocol by hand: broker through `broker-client` (the project's
//! own client), beanstalkd through its text protocol (`put`, `reserve-with-timeout`, `delete`) and Redis through
//! RESP (`LPUSH`; `BLMOVE` into a per-consumer processing list; `LREM` from it plus `SET` of a result key).
//! Pipelining on beanstalkd and Redis means writing up to `--depth` requests before reading their replies, which
//! come back in order; on broker the client multiplexes up to `--depth` requests on its connection.
//!
//! Scenarios:
//! - enqueue unpipelined / pipelined / batch (broker `enqueue_batch`, Redis `LPUSH` of `--batch` values;
//!   beanstalkd has no batch);
//! - cycle unpipelined / pipelined: producers enqueue while consumers take up to `--depth` tasks at once and
//!   acknowledge each with a small result; the figure is the tasks acknowledged per second within the run;
//! - latency: one unpipelined enqueue round trip, and enqueue → a waiting consumer holds the task.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use broker_client::proto::{Lease, TaskSpec, Value};
use broker_client::{Client, ConnectOptions};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Bytes of every task's payload.
const PAYLOAD_BYTES: usize = 100;
/// Extra time a scenario may take after its deadline to drain the requests in flight before it is an error.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "Compare broker, beanstalkd and a Redis reliable queue under one load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every scenario against one daemon and append its figures to --out.
    Load(LoadArgs),
    /// Measure the disk's own rate of append + fdatasync, and of append + sync_file_range, in DIR.
    Disk {
        /// A directory on the filesystem to measure (a file is created and removed there).
        #[arg(long)]
        dir: PathBuf,
        /// How long to measure (half for each).
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        #[command(flatten)]
        tag: Tag,
    },
    /// Push --tasks tasks through a broker, then watch its results expire; report memory and data-dir size.
    Soak(SoakArgs),
    /// Print the comparison table from records files written by `load`, `disk` and `soak`.
    Table {
        /// Records files.
        files: Vec<PathBuf>,
    },
    /// Resident memory per waiting task and per kept result, measured on a fresh daemon.
    Memory(MemoryArgs),
    /// Print a TCP port that is free on 127.0.0.1 now.
    FreePort,
    /// Wait until ADDR accepts TCP connections.
    WaitPort {
        /// HOST:PORT.
        addr: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

/// Where a figure belongs: which durability variant, which run, which records file.
#[derive(clap::Args, Clone)]
struct Tag {
    /// The durability variant these figures belong to (e.g. "always", "interval").
    #[arg(long, default_value = "-")]
    variant: String,
    /// The run number.
    #[arg(long, default_value_t = 1)]
    run: u32,
    /// Append records to this file (they are printed on stdout too).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum System {
    Broker,
    Beanstalkd,
    Redis,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Broker => "broker",
            System::Beanstalkd => "beanstalkd",
            System::Redis => "redis",
        }
    }
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Which kind of daemon listens at --addr.
    #[arg(long, value_enum)]
    system: System,
    /// HOST:PORT of the daemon.
    #[arg(long)]
    addr: String,
    /// Producer connections (and consumer connections in the cycles).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection when pipelined.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Tasks per batch request.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seconds per throughput scenario, and at most per latency scenario.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Round trips per latency scenario (fewer if --seconds runs out first).
    #[arg(long, default_value_t = 5000)]
    samples: usize,
    /// Run only the scenarios whose figure name contains this (e.g. enqueue_, cycle_pipelined, p50 for both
    /// latencies, held_).
    #[arg(long)]
    only: Option<String>,
    /// The daemon's process id: the pipelined enqueue then also reports tasks per disk sync (its `fdatasync` and
    /// `fsync` calls, counted with `perf stat` when perf is installed).
    #[arg(long)]
    pid: Option<u32>,
    #[command(flatten)]
    tag: Tag,
}

#[derive(clap::Args, Clone)]
struct SoakArgs {
    /// HOST:PORT of the broker daemon.
    #[arg(long)]
    addr: String,
    /// Its process id (memory is read from /proc/PID/status).
    #[arg(long)]
    pid: u32,
    /// Its data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Tasks to push through (enqueue, lease, ack).
    #[arg(long, default_value_t = 1_000_000)]
    tasks: u64,
    /// Producer and consumer connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// Most tasks enqueued but not yet acknowledged at any time.
    #[arg(long, default_value_t = 10_000)]
    backlog: u64,
    /// Give up pushing tasks after this many seconds.
    #[arg(long, default_value_t = 1800.0)]
    timeout: f64,
    /// Give up waiting for results to expire after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    expiry_timeout: f64,
    #[command(flatten)]
    tag: Tag,
}

#[derive(clap::Args, Clone)]
struct MemoryArgs {
    /// HOST:PORT of the broker daemon.
    #[arg(long)]
    addr: String,
    /// Its process id (memory is read from /proc/PID/status).
    #[arg(long)]
    pid: u32,
    /// `fill`: on a fresh daemon, enqueue --tasks tasks and measure, then run them all and measure the kept
    /// results. `reopened`: on the same data directory after a restart, measure the kept results again.
    #[arg(long, value_enum)]
    phase: MemoryPhase,
    /// How many tasks.
    #[arg(long, default_value_t = 200_000)]
    tasks: u64,
    /// `reopened` only: the resident memory (KiB) of the fresh daemon before `fill`, as `fill` recorded it.
    #[arg(long)]
    baseline_kib: Option<u64>,
    #[command(flatten)]
    tag: Tag,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MemoryPhase {
    Fill,
    Reopened,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Load(args) => load(&args).await,
        Command::Disk { dir, seconds, tag } => {
            let rec = Recorder::new(&tag, "disk");
            for (figure, sync) in [("fdatasync_per_s", Sync::Fdatasync), ("sync_file_range_per_s", Sync::SyncFileRange)]
            {
                let dir = dir.clone();
                let run = Duration::from_secs_f64(seconds / 2.0);
                rec.record(figure, tokio::task::spawn_blocking(move || disk_sync_rate(&dir, sync, run)).await??)?;
            }
            Ok(())
        }
        Command::Soak(args) => soak(&args).await,
        Command::Memory(args) => memory(&args).await,
        Command::Table { files } => {
            print!("{}", table(&read_records(&files)?));
            Ok(())
        }
        Command::FreePort => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", listener.local_addr()?.port());
            Ok(())
        }
        Command::WaitPort { addr, timeout } => {
            let deadline = Instant::now() + Duration::from_secs_f64(timeout);
            loop {
                if TcpStream::connect(&addr).await.is_ok() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    bail!("{addr} did not accept connections within {timeout} s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Records: one figure per line, appended by each subcommand, read back by `table`.

/// One measured figure.
#[derive(Debug, Clone)]
struct Record {
    variant: String,
    run: u32,
    system: String,
    figure: String,
    value: f64,
}

/// Writes the records of one subcommand: to stdout for the person watching, and to `--out` for the table.
struct Recorder {
    tag: Tag,
    system: String,
}

impl Recorder {
    fn new(tag: &Tag, system: &str) -> Self {
        Recorder { tag: tag.clone(), system: system.to_string() }
    }

    fn record(&self, figure: &str, value: f64) -> Result<()> {
        let line = format!("{}\t{}\t{}\t{}\t{}\n", self.tag.variant, self.tag.run, self.system, figure, value);
        print!("{line}");
        if let Some(path) = &self.tag.out {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?;
            file.write_all(line.as_bytes())?;
        }
        Ok(())
    }
}

fn read_records(files: &[PathBuf]) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split('\t').collect();
            let parsed = match fields.as_slice() {
                [variant, run, system, figure, value] => {
                    run.parse().ok().zip(value.parse().ok()).map(|(run, value)| Record {
                        variant: variant.to_string(),
                        run,
                        system: system.to_string(),
                        figure: figure.to_string(),
                        value,
                    })
                }
                _ => None,
            };
            records.push(parsed.with_context(|| format!("{}:{}: not a record: {line}", path.display(), n + 1))?);
        }
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------------------------------
// Payloads and task ids.

/// A 100-byte payload that starts with a task id unique per connection and sequence number, so that a Redis
/// consumer can name the result key and remove exactly this element from its processing list.
fn payload(conn: usize, seq: u64) -> Vec<u8> {
    let mut p = format!("{conn:03}:{seq:012}:").into_bytes();
    p.resize(PAYLOAD_BYTES, b'x');
    p
}

/// The task id carried in a payload.
fn payload_id(payload: &[u8]) -> &[u8] {
    &payload[..payload.len().min(16)]
}

fn broker_task(queue: &str, conn: usize, seq: u64) -> TaskSpec {
    let body = String::from_utf8(payload(conn, seq)).expect("ascii payload");
    TaskSpec { queue: Some(queue.to_string()), args: vec![Value::from(body)], ..TaskSpec::new("bench") }
}

// ---------------------------------------------------------------------------------------------------------------
// The raw wire of beanstalkd and Redis: a socket, a read buffer and a write buffer.

/// One connection speaking a line-oriented protocol; requests are buffered in `out` until [`Wire::flush`].
struct Wire {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl Wire {
    async fn connect(addr: &str) -> Result<Wire> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Wire { reader: BufReader::with_capacity(64 * 1024, read), writer: write, out: Vec::new(), line: Vec::new() })
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await.context("write")?;
            self.out.clear();
        }
        Ok(())
    }

    /// True when a whole reply line is already buffered, so reading it costs no system call.
    fn has_buffered_line(&self) -> bool {
        self.reader.buffer().contains(&b'\n')
    }

    /// Reads one line into `self.line`, without its CRLF.
    async fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line).await.context("read")?;
        if n == 0 || !self.line.ends_with(b"\r\n") {
            bail!("connection closed by the server");
        }
        self.line.truncate(self.line.len() - 2);
        Ok(())
    }

    /// Reads `len` bytes of data followed by CRLF.
    async fn read_data(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut data = vec![0; len + 2];
        self.reader.read_exact(&mut data).await.context("read")?;
        data.truncate(len);
        Ok(data)
    }

    fn line_str(&self) -> String {
        String::from_utf8_lossy(&self.line).into_owned()
    }
}

/// A task taken by a consumer: what it needs to acknowledge it.
struct Held {
    /// beanstalkd's job id.
    job: u64,
    /// The payload (Redis removes the element by value).
    body: Vec<u8>,
}

/// beanstalkd and Redis, spoken by hand.
#[derive(Clone, Copy)]
enum Raw {
    Beanstalkd,
    Redis,
}

impl Raw {
    /// Prepares a producer connection (beanstalkd: `use` the tube).
    async fn setup_producer(self, wire: &mut Wire, queue: &str) -> Result<()> {
        if let Raw::Beanstalkd = self {
            wire.out.extend_from_slice(format!("use {queue}\r\n").as_bytes());
            wire.flush().await?;
            wire.read_line().await?;
            if !wire.line.starts_with(b"USING") {
                bail!("beanstalkd use: {}", wire.line_str());
            }
        }
        Ok(())
    }

    /// Prepares a consumer connection (beanstalkd: watch the tube only).
    async fn setup_consumer(self, wire: &mut Wire, queue: &str) -> Result<()> {
        if let Raw::Beanstalkd = self {
            wire.out.extend_from_slice(format!("watch {queue}\r\nignore default\r\n").as_bytes());
            wire.flush().await?;
            for _ in 0..2 {
                wire.read_line().await?;
                if !wire.line.starts_with(b"WATCHING") {
                    bail!("beanstalkd watch: {}", wire.line_str());
                }
            }
        }
        Ok(())
    }

    /// Buffers one enqueue of `count` tasks (more than one only for Redis: `LPUSH` of many values).
    fn write_put(self, out: &mut Vec<u8>, queue: &str, conn: usize, seq: &mut u64, count: usize) {
        match self {
            Raw::Beanstalkd => {
                // priority 0, no delay, 60 s to run.
                out.extend_from_slice(format!("put 0 0 60 {PAYLOAD_BYTES}\r\n").as_bytes());
                out.extend_from_slice(&payload(conn, *seq));
                out.extend_from_slice(b"\r\n");
                *seq += 1;
            }
            Raw::Redis => {
                let mut args: Vec<Vec<u8>> = vec![b"LPUSH".to_vec(), queue.as_bytes().to_vec()];
                for _ in 0..count {
                    args.push(payload(conn, *seq));
                    *seq += 1;
                }
                resp_command(out, &args);
            }
        }
    }

    /// Reads the reply to one enqueue.
    async fn read_put(self, wire: &mut Wire) -> Result<()> {
        match self {
            Raw::Beanstalkd => {
                wire.read_line().await?;
                if !wire.line.starts_with(b"INSERTED") {
                    bail!("beanstalkd put: {}", wire.line_str());
                }
            }
            Raw::Redis => {
                if let Resp::Error(e) = read_resp(wire).await? {
                    bail!("redis LPUSH: {e}");
                }
            }
        }
        Ok(())
    }

    /// Buffers one blocking take of one task (beanstalkd `reserve-with-timeout`, Redis `BLMOVE`), 1 s at most.
    fn write_take(self, out: &mut Vec<u8>, queue: &str, processing: &str) {
        match self {
            Raw::Beanstalkd => out.extend_from_slice(b"reserve-with-timeout 1\r\n"),
            Raw::Redis => resp_command(
                out,
                &[b"BLMOVE".as_slice(), queue.as_bytes(), processing.as_bytes(), b"RIGHT", b"LEFT", b"1"],
            ),
        }
    }

    /// Reads the reply to a take: the task, or none when the wait timed out.
    async fn read_take(self, wire: &mut Wire) -> Result<Option<Held>> {
        match self {
            Raw::Beanstalkd => {
                wire.read_line().await?;
                if wire.line.starts_with(b"TIMED_OUT") || wire.line.starts_with(b"DEADLINE_SOON") {
                    return Ok(None);
                }
                let line = wire.line_str();
                let mut words = line.split(' ');
                match (words.next(), words.next().map(str::parse), words.next().map(str::parse)) {
                    (Some("RESERVED"), Some(Ok(job)), Some(Ok(len))) => {
                        let body = wire.read_data(len).await?;
                        Ok(Some(Held { job, body }))
                    }
                    _ => bail!("beanstalkd reserve: {line}"),
                }
            }
            Raw::Redis => match read_resp(wire).await? {
                Resp::Bulk(Some(body)) => Ok(Some(Held { job: 0, body })),
                Resp::Bulk(None) | Resp::NilArray => Ok(None),
                other => bail!("redis BLMOVE: {other:?}"),
            },
        }
    }

    /// Buffers the acknowledgement of a held task: beanstalkd `delete`; Redis `LREM` from the processing list
    /// and `SET` of a result key (with a TTL, as broker keeps results for a while).
    fn write_ack(self, out: &mut Vec<u8>, held: &Held, processing: &str) {
        match self {
            Raw::Beanstalkd => out.extend_from_slice(format!("delete {}\r\n", held.job).as_bytes()),
            Raw::Redis => {
                resp_command(out, &[b"LREM".as_slice(), processing.as_bytes(), b"1", &held.body]);
                let mut key = b"result:".to_vec();
                key.extend_from_slice(payload_id(&held.body));
                resp_command(out, &[b"SET".as_slice(), &key, b"ok", b"EX", b"86400"]);
            }
        }
    }

    /// Reads the reply (or replies) to one acknowledgement.
    async fn read_ack(self, wire: &mut Wire) -> Result<()> {
        match self {
            Raw::Beanstalkd => {
                wire.read_line().await?;
                if wire.line.as_slice() != b"DELETED" {
                    bail!("beanstalkd delete: {}", wire.line_str());
                }
            }
            Raw::Redis => {
                let removed = read_resp(wire).await?;
                let set = read_resp(wire).await?;
                if !matches!(removed, Resp::Int(1)) || !matches!(&set, Resp::Simple(s) if s == "OK") {
                    bail!("redis ack: LREM {removed:?}, SET {set:?}");
                }
            }
        }
        Ok(())
    }
}

/// Appends a RESP command (an array of bulk strings).
fn resp_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// The RESP replies this bench meets.
#[derive(Debug)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    NilArray,
}

async fn read_resp(wire: &mut Wire) -> Result<Resp> {
    wire.read_line().await?;
    let (kind, rest) = match wire.line.split_first() {
        Some((kind, rest)) => (*kind, String::from_utf8_lossy(rest).into_owned()),
        None => bail!("redis: empty reply line"),
    };
    Ok(match kind {
        b'+' => Resp::Simple(rest),
        b'-' => Resp::Error(rest),
        b':' => Resp::Int(rest.parse().with_context(|| format!("redis integer {rest}"))?),
        b'$' => match rest.parse::<i64>().with_context(|| format!("redis bulk length {rest}"))? {
            len if len < 0 => Resp::Bulk(None),
            len => Resp::Bulk(Some(wire.read_data(len as usize).await?)),
        },
        b'*' if rest == "-1" => Resp::NilArray,
        _ => bail!("redis: unexpected reply {}", wire.line_str()),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The load: producers and consumers for each system.

/// A connection of any of the three systems.
enum Conn {
    Broker(Client),
    Raw(Raw, Wire),
}

impl Conn {
    async fn connect(system: System, addr: &str) -> Result<Conn> {
        Ok(match system {
            System::Broker => Conn::Broker(
                ConnectOptions::new(addr)
                    .name("peer-bench")
                    .connect()
                    .await
                    .with_context(|| format!("connect to {addr}"))?,
            ),
            System::Beanstalkd => Conn::Raw(Raw::Beanstalkd, Wire::connect(addr).await?),
            System::Redis => Conn::Raw(Raw::Redis, Wire::connect(addr).await?),
        })
    }

    async fn producer(system: System, addr: &str, queue: &str) -> Result<Conn> {
        let mut conn = Conn::connect(system, addr).await?;
        if let Conn::Raw(raw, wire) = &mut conn {
            raw.setup_producer(wire, queue).await?;
        }
        Ok(conn)
    }

    async fn consumer(system: System, addr: &str, queue: &str) -> Result<Conn> {
        let mut conn = Conn::connect(system, addr).await?;
        if let Conn::Raw(raw, wire) = &mut conn {
            raw.setup_consumer(wire, queue).await?;
        }
        Ok(conn)
    }
}

/// What one producer connection does: how deep it pipelines, how many tasks per request, when it stops.
#[derive(Clone)]
struct Produce {
    queue: String,
    /// Its number, part of every payload's id.
    conn: usize,
    /// Requests in flight.
    depth: usize,
    /// Tasks per request (1: single enqueue; more: the batch op).
    batch: usize,
    /// Issue no request after this instant.
    deadline: Instant,
    /// Issue no request once this many tasks were sent.
    limit: u64,
    /// If set, issue no request while this many tasks wait to be acknowledged.
    backlog: Option<Arc<Backlog>>,
}

impl Produce {
    /// A producer that runs until `deadline`, with no limit and no backlog cap.
    fn until(queue: &str, conn: usize, depth: usize, batch: usize, deadline: Instant) -> Produce {
        Produce { queue: queue.to_string(), conn, depth, batch, deadline, limit: u64::MAX, backlog: None }
    }

    /// Whether a request of `job.batch` tasks may be sent now (the backlog has room); counts it if so.
    fn take_room(&self) -> bool {
        match &self.backlog {
            None => true,
            Some(b) => {
                let waiting = b.enqueued.load(Ordering::Relaxed).saturating_sub(b.acked.load(Ordering::Relaxed));
                let room = waiting < b.max;
                if room {
                    b.enqueued.fetch_add(self.batch as u64, Ordering::Relaxed);
                }
                room
            }
        }
    }

    /// Whether the producer has more to send (it may still have to wait for room).
    fn more(&self, sent: u64) -> bool {
        sent < self.limit && Instant::now() < self.deadline
    }
}

/// Caps the tasks enqueued but not yet acknowledged. The soak measures memory per task pushed through, not per
/// task waiting in a queue that producers fill faster than consumers empty.
struct Backlog {
    enqueued: AtomicU64,
    acked: Arc<AtomicU64>,
    max: u64,
}

/// Starts one producer per connection, each with the job `job` gives its connection number; each is given
/// DRAIN_GRACE past its deadline to collect its replies. A handle yields the tasks its producer enqueued.
fn spawn_producers(
    conns: Vec<Conn>,
    job: impl Fn(usize) -> Produce,
) -> Vec<tokio::task::JoinHandle<Result<Result<u64>, tokio::time::error::Elapsed>>> {
    conns
        .into_iter()
        .enumerate()
        .map(|(conn_no, conn)| {
            let job = job(conn_no);
            tokio::spawn(tokio::time::timeout_at((job.deadline + DRAIN_GRACE).into(), produce(conn, job)))
        })
        .collect()
}

/// Enqueues until the deadline or the limit, keeping `depth` requests in flight; returns the tasks enqueued.
async fn produce(conn: Conn, job: Produce) -> Result<u64> {
    match conn {
        Conn::Broker(client) => {
            let mut sent = 0u64;
            let mut done = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                while in_flight.len() < job.depth && job.more(sent) && job.take_room() {
                    let client = client.clone();
                    let (queue, conn, batch, first) = (job.queue.clone(), job.conn, job.batch, sent);
                    sent += batch as u64;
                    in_flight.push(async move {
                        if batch == 1 {
                            client.enqueue(broker_task(&queue, conn, first)).await.map(|_| 1u64)
                        } else {
                            let tasks = (first..first + batch as u64).map(|seq| broker_task(&queue, conn, seq));
                            client.enqueue_batch(tasks.collect()).await.map(|v| v.len() as u64)
                        }
                    });
                }
                match in_flight.next().await {
                    Some(result) => done += result.context("broker enqueue")?,
                    None if job.more(sent) => tokio::time::sleep(Duration::from_millis(1)).await,
                    None => return Ok(done),
                }
            }
        }
        Conn::Raw(raw, mut wire) => {
            let mut seq = 0u64;
            let mut outstanding = 0usize;
            let mut done = 0u64;
            loop {
                while outstanding < job.depth && job.more(seq) && job.take_room() {
                    raw.write_put(&mut wire.out, &job.queue, job.conn, &mut seq, job.batch);
                    outstanding += 1;
                }
                wire.flush().await?;
                if outstanding == 0 {
                    if !job.more(seq) {
                        return Ok(done);
                    }
                    // No room in the backlog: wait for consumers.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                // One reply, then every reply already buffered, before the window is refilled.
                loop {
                    raw.read_put(&mut wire).await?;
                    done += job.batch as u64;
                    outstanding -= 1;
                    if outstanding == 0 || !wire.has_buffered_line() {
                        break;
                    }
                }
            }
        }
    }
}

/// Takes up to `depth` tasks at a time and acknowledges each, counting acknowledgements in `acked`, until `stop`
/// says so. The caller bounds it in time (it is cancelled at the scenario's deadline).
async fn consume(conn: Conn, queue: &str, depth: usize, acked: &AtomicU64, stop: impl Fn() -> bool) -> Result<()> {
    match conn {
        Conn::Broker(client) => {
            let lease = Lease { queues: vec![queue.to_string()], max: depth as u32, wait_ms: 200, lease_ms: None };
            while !stop() {
                let tasks = client.lease(&lease).await.context("broker lease")?;
                let mut acks: FuturesUnordered<_> =
                    tasks.iter().map(|t| client.ack(&t.id, t.lease_id, Value::from("ok"))).collect();
                while let Some(r) = acks.next().await {
                    r.context("broker ack")?;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Conn::Raw(raw, mut wire) => {
            // A processing list per consumer, as in the reliable-queue pattern: LREM only scans this worker's.
            let processing = format!("{queue}:processing:{}", rand_suffix());
            while !stop() {
                for _ in 0..depth {
                    raw.write_take(&mut wire.out, queue, &processing);
                }
                wire.flush().await?;
                let mut held = Vec::with_capacity(depth);
                for _ in 0..depth {
                    held.extend(raw.read_take(&mut wire).await?);
                }
                for h in &held {
                    raw.write_ack(&mut wire.out, h, &processing);
                }
                wire.flush().await?;
                for _ in &held {
                    raw.read_ack(&mut wire).await?;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(())
}

/// A suffix that differs between consumers of one process and between runs.
fn rand_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{}-{}", std::process::id(), nanos % 1_000_000_007, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Tasks enqueued per second by `connections` producers over `run`.
/// Tasks enqueued, and the seconds it took.
async fn enqueue_rate(args: &LoadArgs, queue: &str, depth: usize, batch: usize, run: Duration) -> Result<(u64, f64)> {
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(Conn::producer(args.system, &args.addr, queue).await?);
    }
    let start = Instant::now();
    let deadline = start + run;
    let handles = spawn_producers(conns, |conn| Produce::until(queue, conn, depth, batch, deadline));
    let mut total = 0;
    for h in handles {
        total += h.await?.context("producer did not drain in time")??;
    }
    Ok((total, start.elapsed().as_secs_f64()))
}

/// Counts the daemon's `fdatasync` and `fsync` calls while it runs, with `perf stat` on its syscall tracepoints
/// (`perf` from Debian's linux-perf; needs root or a permissive `perf_event_paranoid`). `None` if it cannot.
struct SyncCounter(std::process::Child);

impl SyncCounter {
    fn start(pid: u32) -> Option<SyncCounter> {
        let child = std::process::Command::new("perf")
            .args(["stat", "-x,", "-e", "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync", "-p"])
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        // perf attaches in a few milliseconds; a sync made before that is not counted.
        std::thread::sleep(Duration::from_millis(200));
        Some(SyncCounter(child))
    }

    /// Stops counting; the number of syncs, if perf reported them.
    fn stop(self) -> Option<u64> {
        // SAFETY: signals our own child process.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
        let output = self.0.wait_with_output().ok()?;
        let text = String::from_utf8_lossy(&output.stderr);
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("sys_enter_f"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        (counts.len() == 2).then(|| counts.iter().sum())
    }
}

/// Tasks acknowledged per second while producers enqueue and consumers take and acknowledge, over `run`.
async fn cycle_rate(args: &LoadArgs, queue: &str, depth: usize, run: Duration) -> Result<f64> {
    let mut producers = Vec::new();
    let mut consumers = Vec::new();
    // A comma-separated --addr (several broker daemons over one shared store) spreads the connections over them.
    let addrs: Vec<&str> = args.addr.split(',').collect();
    for i in 0..args.connections {
        let (producer, consumer) = (addrs[i % addrs.len()], addrs[(i + 1) % addrs.len()]);
        producers.push(Conn::producer(args.system, producer, queue).await?);
        consumers.push(Conn::consumer(args.system, consumer, queue).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + run;
    let producers = spawn_producers(producers, |conn| Produce::until(queue, conn, depth, 1, deadline));
    let consumers: Vec<_> = consumers
        .into_iter()
        .map(|conn| {
            let (acked, queue) = (acked.clone(), queue.to_string());
            // Cancelled at the deadline: only acknowledgements completed within the run count.
            tokio::spawn(tokio::time::timeout_at(deadline.into(), async move {
                consume(conn, &queue, depth, &acked, || false).await
            }))
        })
        .collect();
    for c in consumers {
        if let Ok(result) = c.await? {
            result?;
        }
    }
    let total = acked.load(Ordering::Relaxed);
    for p in producers {
        p.await?.context("producer did not drain in time")??;
    }
    Ok(total as f64 / run.as_secs_f64())
}

/// Round trips of one unpipelined enqueue, until `samples` or `run` is reached.
async fn enqueue_latency(args: &LoadArgs, queue: &str, run: Duration) -> Result<Vec<Duration>> {
    let conn = Conn::producer(args.system, &args.addr, queue).await?;
    let deadline = Instant::now() + run;
    let mut samples = Vec::with_capacity(args.samples);
    match conn {
        Conn::Broker(client) => {
            for seq in 0..args.samples as u64 {
                let start = Instant::now();
                client.enqueue(broker_task(queue, 0, seq)).await?;
                samples.push(start.elapsed());
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        Conn::Raw(raw, mut wire) => {
            let mut seq = 0;
            while samples.len() < args.samples {
                let start = Instant::now();
                raw.write_put(&mut wire.out, queue, 0, &mut seq, 1);
                wire.flush().await?;
                raw.read_put(&mut wire).await?;
                samples.push(start.elapsed());
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    Ok(samples)
}

/// Time from sending an enqueue to a consumer, already waiting on another connection, holding the task.
/// One task at a time; the consumer acknowledges each and is waiting again before the next is sent.
async fn held_latency(args: &LoadArgs, queue: &str, run: Duration) -> Result<Vec<Duration>> {
    let producer = Conn::producer(args.system, &args.addr, queue).await?;
    let consumer = Conn::consumer(args.system, &args.addr, queue).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1);
    let queue_name = queue.to_string();
    let consumer = tokio::spawn(async move {
        match consumer {
            Conn::Broker(client) => {
                let lease = Lease { queues: vec![queue_name], max: 1, wait_ms: 1000, lease_ms: None };
                let take = |client: Client, lease: Lease| tokio::spawn(async move { client.lease(&lease).await });
                let mut next = take(client.clone(), lease.clone());
                loop {
                    let tasks = next.await??;
                    let held = Instant::now();
                    // The next lease is on its way before this task is acknowledged and reported.
                    next = take(client.clone(), lease.clone());
                    for t in &tasks {
                        client.ack(&t.id, t.lease_id, Value::from("ok")).await?;
                    }
                    if !tasks.is_empty() && tx.send(held).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Conn::Raw(raw, mut wire) => {
                let processing = format!("{queue_name}:processing:{}", rand_suffix());
                raw.write_take(&mut wire.out, &queue_name, &processing);
                wire.flush().await?;
                loop {
                    let Some(task) = raw.read_take(&mut wire).await? else {
                        raw.write_take(&mut wire.out, &queue_name, &processing);
                        wire.flush().await?;
                        continue;
                    };
                    let held = Instant::now();
                    // Acknowledge and ask for the next in one write; the ack's reply comes first.
                    raw.write_ack(&mut wire.out, &task, &processing);
                    raw.write_take(&mut wire.out, &queue_name, &processing);
                    wire.flush().await?;
                    raw.read_ack(&mut wire).await?;
                    if tx.send(held).await.is_err() {
                        return Ok::<(), anyhow::Error>(());
                    }
                }
            }
        }
    });
    // Let the consumer's first take reach the daemon.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deadline = Instant::now() + run;
    let mut samples = Vec::with_capacity(args.samples);
    let mut producer = producer;
    let mut seq = 0u64;
    while samples.len() < args.samples && Instant::now() < deadline {
        let start = Instant::now();
        match &mut producer {
            Conn::Broker(client) => {
                client.enqueue(broker_task(queue, 0, seq)).await?;
                seq += 1;
            }
            Conn::Raw(raw, wire) => {
                raw.write_put(&mut wire.out, queue, 0, &mut seq, 1);
                wire.flush().await?;
                raw.read_put(wire).await?;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(held)) => samples.push(held.saturating_duration_since(start)),
            Ok(None) => {
                consumer.await??;
                bail!("the consumer stopped");
            }
            Err(_) => bail!("the consumer did not get a task within 5 s"),
        }
    }
    drop(rx);
    consumer.abort();
    Ok(samples)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

async fn load(args: &LoadArgs) -> Result<()> {
    let rec = Recorder::new(&args.tag, args.system.name());
    let run = Duration::from_secs_f64(args.seconds);
    let wanted = |figure: &str| args.only.as_deref().is_none_or(|o| figure.contains(o));
    // Queue names differ per scenario (tasks left over by one do not feed the next) and per run.
    let prefix = format!("pb{}", rand_suffix().replace('-', ""));
    let q = |name: &str| format!("{prefix}-{name}");

    // (figure, queue, depth, tasks per request); beanstalkd has no batch op.
    let enqueues = [
        ("enqueue_unpipelined", "enq1", 1, 1),
        ("enqueue_pipelined", "enq64", args.depth, 1),
        ("enqueue_batch", "batch", 1, args.batch),
    ];
    for (figure, queue, depth, batch) in enqueues {
        if wanted(figure) && (batch == 1 || args.system != System::Beanstalkd) {
            let counter = args.pid.filter(|_| figure == "enqueue_pipelined").and_then(SyncCounter::start);
            let (tasks, secs) = enqueue_rate(args, &q(queue), depth, batch, run).await?;
            rec.record(figure, tasks as f64 / secs)?;
            if let Some(syncs) = counter.and_then(SyncCounter::stop) {
                rec.record("enqueue_pipelined_per_sync", tasks as f64 / syncs.max(1) as f64)?;
            }
        }
    }
    for (figure, queue, depth) in [("cycle_unpipelined", "cyc1", 1), ("cycle_pipelined", "cyc64", args.depth)] {
        if wanted(figure) {
            rec.record(figure, cycle_rate(args, &q(queue), depth, run).await?)?;
        }
    }
    if wanted("enqueue_p50_us") {
        let mut samples = enqueue_latency(args, &q("lat"), run).await?;
        samples.sort();
        rec.record("enqueue_samples", samples.len() as f64)?;
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            rec.record(&format!("enqueue_{label}_us"), percentile(&samples, q))?;
        }
    }
    if wanted("held_p50_us") {
        let mut samples = held_latency(args, &q("held"), run).await?;
        samples.sort();
        rec.record("held_samples", samples.len() as f64)?;
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            rec.record(&format!("held_{label}_us"), percentile(&samples, q))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The disk, and a broker's memory and data directory.

/// How a disk write is made to stick.
#[derive(Clone, Copy)]
enum Sync {
    /// `fdatasync(2)`: the data and the size reach stable storage (the device's write cache is flushed).
    Fdatasync,
    /// `sync_file_range(2)` with WAIT_BEFORE | WRITE | WAIT_AFTER, which is what sled 0.34's flush calls on
    /// Linux: the pages are written to the device, but its write cache is not flushed and the file's size is
    /// not committed, so this is not durable against a power loss.
    SyncFileRange,
}

/// Appends 512 bytes and syncs them, in a loop, for `run`; returns the syncs per second.
fn disk_sync_rate(dir: &Path, sync: Sync, run: Duration) -> Result<f64> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join(format!("peer-bench-fsync-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let block = [b'x'; 512];
    let start = Instant::now();
    let mut syncs = 0u64;
    // Bounded by time and, should the clock misbehave, by count.
    while start.elapsed() < run && syncs < 10_000_000 {
        file.write_all(&block)?;
        match sync {
            Sync::Fdatasync => file.sync_data()?,
            Sync::SyncFileRange => {
                let offset = (syncs * block.len() as u64) as libc::off64_t;
                let flags =
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                // SAFETY: a plain system call on a file descriptor this function owns.
                let ret = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, block.len() as i64, flags) };
                if ret != 0 {
                    return Err(std::io::Error::last_os_error()).context("sync_file_range");
                }
            }
        }
        syncs += 1;
    }
    let rate = syncs as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Disk space a directory tree takes, as `du` counts it (allocated blocks), in bytes.
fn dir_usage(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        total += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(total)
}

const MIB: f64 = 1024.0 * 1024.0;

async fn soak(args: &SoakArgs) -> Result<()> {
    let rec = Recorder::new(&args.tag, "broker");
    let queue = format!("soak{}", rand_suffix().replace('-', ""));
    let connections = args.connections.max(1);
    let rss_start = proc_kib(args.pid, "VmRSS")?;
    rec.record("soak_rss_mib_0pct", rss_start as f64 / 1024.0)?;

    let mut producers = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..connections {
        producers.push(Conn::producer(System::Broker, &args.addr, &queue).await?);
        consumers.push(Conn::consumer(System::Broker, &args.addr, &queue).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let backlog = Arc::new(Backlog { enqueued: AtomicU64::new(0), acked: acked.clone(), max: args.backlog });
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.timeout);
    let per_producer = args.tasks / connections as u64;
    let producers = spawn_producers(producers, |conn| {
        // The first producer also sends the remainder of the division.
        let extra = if conn == 0 { args.tasks % connections as u64 } else { 0 };
        Produce {
            limit: per_producer + extra,
            backlog: Some(backlog.clone()),
            ..Produce::until(&queue, conn, args.depth, 1, deadline)
        }
    });
    let tasks = args.tasks;
    let consumers: Vec<_> = consumers
        .into_iter()
        .map(|conn| {
            let (acked, queue, depth) = (acked.clone(), queue.clone(), args.depth);
            tokio::spawn(tokio::time::timeout_at(deadline.into(), async move {
                let stop = || acked.load(Ordering::Relaxed) >= tasks;
                consume(conn, &queue, depth, &acked, stop).await
            }))
        })
        .collect();

    // Resident memory at each tenth of the way.
    let mut next_tenth = 1;
    while next_tenth <= 10 && Instant::now() < deadline {
        let done = acked.load(Ordering::Relaxed);
        if done * 10 >= tasks * next_tenth {
            rec.record(&format!("soak_rss_mib_{}pct", next_tenth * 10), proc_kib(args.pid, "VmRSS")? as f64 / 1024.0)?;
            next_tenth += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for c in consumers {
        c.await?.context("soak did not finish within --timeout")??;
    }
    for p in producers {
        p.await?.context("producer did not drain in time")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let done = acked.load(Ordering::Relaxed);
    rec.record("soak_tasks", done as f64)?;
    rec.record("soak_backlog", args.backlog as f64)?;
    rec.record("soak_rate", done as f64 / elapsed)?;
    rec.record("soak_hwm_mib", proc_kib(args.pid, "VmHWM")? as f64 / 1024.0)?;
    rec.record("soak_dir_mib_done", dir_usage(&args.data_dir)? as f64 / MIB)?;

    // Wait for every result to expire, as an operator would watch it: `results_stored` in the stats.
    let client = ConnectOptions::new(&args.addr).name("peer-bench").connect().await?;
    let wait_start = Instant::now();
    let expiry_deadline = wait_start + Duration::from_secs_f64(args.expiry_timeout);
    loop {
        let stored = client.stats().await?.results_stored;
        if stored == 0 {
            break;
        }
        if Instant::now() >= expiry_deadline {
            bail!("{stored} results still stored after {} s", args.expiry_timeout);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    rec.record("soak_expiry_wait_s", wait_start.elapsed().as_secs_f64())?;
    rec.record("soak_dir_mib_expired", dir_usage(&args.data_dir)? as f64 / MIB)?;
    // The store may reclaim space lazily: look once more a little later.
    tokio::time::sleep(Duration::from_secs(10)).await;
    rec.record("soak_dir_mib_expired_10s", dir_usage(&args.data_dir)? as f64 / MIB)?;
    rec.record("soak_rss_mib_expired_10s", proc_kib(args.pid, "VmRSS")? as f64 / 1024.0)?;
    Ok(())
}

/// How long the daemon is left alone before its memory is read: longer than a checkpoint interval, so the
/// log's buffers and the checkpoint's notes are gone and only what a task costs for as long as it waits remains.
const SETTLE: Duration = Duration::from_secs(3);

async fn memory(args: &MemoryArgs) -> Result<()> {
    let rec = Recorder::new(&args.tag, "broker");
    let client = ConnectOptions::new(&args.addr).name("peer-bench").connect().await?;
    let per_task = |from_kib: u64, to_kib: u64| (to_kib.saturating_sub(from_kib) * 1024) as f64 / args.tasks as f64;
    if args.phase == MemoryPhase::Reopened {
        let baseline = args.baseline_kib.context("--phase reopened needs --baseline-kib")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.stats().await?.results_stored < args.tasks {
            if Instant::now() >= deadline {
                bail!("the reopened daemon does not report the {} results as stored", args.tasks);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(SETTLE).await;
        rec.record("memory_result_bytes_reopened", per_task(baseline, proc_kib(args.pid, "VmRSS")?))?;
        return Ok(());
    }
    let queue = "memory";
    let rss_fresh = proc_kib(args.pid, "VmRSS")?;
    rec.record("memory_rss_fresh_kib", rss_fresh as f64)?;
    // Enqueue: batches of 100, a few in flight.
    let batches: Vec<Vec<TaskSpec>> = (0..args.tasks)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|seqs| {
            seqs.iter().map(|&seq| TaskSpec { result_ttl_ms: Some(3_600_000), ..broker_task(queue, 0, seq) }).collect()
        })
        .collect();
    let mut in_flight = FuturesUnordered::new();
    for batch in batches {
        if in_flight.len() >= 8 {
            in_flight.next().await.expect("not empty")?;
        }
        in_flight.push(client.enqueue_batch(batch));
    }
    while let Some(done) = in_flight.next().await {
        done?;
    }
    tokio::time::sleep(SETTLE).await;
    rec.record("memory_waiting_bytes", per_task(rss_fresh, proc_kib(args.pid, "VmRSS")?))?;
    // Run them all: lease 100 at a time, ack each with a 100-byte result.
    let mut acked = 0u64;
    while acked < args.tasks {
        let leased =
            client.lease(&Lease { queues: vec![queue.to_string()], max: 100, wait_ms: 1000, lease_ms: None }).await?;
        if leased.is_empty() {
            bail!("only {acked} of {} tasks could be leased", args.tasks);
        }
        let acks: FuturesUnordered<_> = leased
            .iter()
            .map(|t| {
                let result = Value::from(String::from_utf8(payload(1, acked)).expect("ascii payload"));
                client.ack(&t.id, t.lease_id, result)
            })
            .collect();
        for done in acks.collect::<Vec<_>>().await {
            done?;
        }
        acked += leased.len() as u64;
    }
    tokio::time::sleep(SETTLE).await;
    rec.record("memory_result_bytes", per_task(rss_fresh, proc_kib(args.pid, "VmRSS")?))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The table.

/// The load figures, in table order: record name and label.
const FIGURES: &[(&str, &str)] = &[
    ("enqueue_unpipelined", "enqueue, unpipelined (tasks/s)"),
    ("enqueue_pipelined", "enqueue, pipelined (tasks/s)"),
    ("enqueue_batch", "enqueue, batch (tasks/s)"),
    ("enqueue_pipelined_per_sync", "tasks per disk sync, pipelined enqueue"),
    ("cycle_unpipelined", "full cycle, unpipelined (tasks/s)"),
    ("cycle_pipelined", "full cycle, pipelined (tasks/s)"),
    ("enqueue_p50_us", "enqueue round trip p50 (µs)"),
    ("enqueue_p99_us", "enqueue round trip p99 (µs)"),
    ("enqueue_p999_us", "enqueue round trip p999 (µs)"),
    ("held_p50_us", "enqueue → consumer holds p50 (µs)"),
    ("held_p99_us", "enqueue → consumer holds p99 (µs)"),
    ("held_p999_us", "enqueue → consumer holds p999 (µs)"),
    ("enqueue_samples", "round-trip samples (per run)"),
    ("held_samples", "enqueue → held samples (per run)"),
];

const PEERS: [&str; 2] = ["beanstalkd", "redis"];

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

fn number(value: Option<f64>) -> String {
    match value {
        None => "n/a".to_string(),
        Some(v) if v >= 100.0 => {
            let digits = format!("{:.0}", v);
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(v) => format!("{v:.1}"),
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.2}×"))
}

/// The records of one variant: system → figure → run → value.
type BySystem<'a> = BTreeMap<&'a str, BTreeMap<&'a str, BTreeMap<u32, f64>>>;

fn table(records: &[Record]) -> String {
    use std::fmt::Write as _;
    let mut by: BTreeMap<&str, BySystem> = BTreeMap::new();
    for r in records {
        by.entry(&r.variant)
            .or_default()
            .entry(&r.system)
            .or_default()
            .entry(&r.figure)
            .or_default()
            .insert(r.run, r.value);
    }
    let runs_of = |values: Option<&BTreeMap<u32, f64>>| values.map_or(0, |v| v.len());
    let mut out = String::new();
    let variants = [
        ("always", "durable: broker --fsync always | beanstalkd -b DIR -f 0 | redis appendonly, appendfsync always"),
        (
            "interval",
            "relaxed: broker --fsync interval | beanstalkd -b DIR -F | redis appendonly, appendfsync everysec",
        ),
    ];
    for (variant, title) in variants {
        let Some(systems) = by.get(variant) else { continue };
        let runs = systems.get("broker").and_then(|f| f.get("enqueue_pipelined")).map_or(0, |v| v.len());
        let _ = writeln!(out, "{title}  (median of {runs} run(s))");
        let _ = writeln!(
            out,
            "{:<38} {:>12} {:>12} {:>12} {:>16} {:>13}",
            "figure", "broker", "beanstalkd", "redis", "broker/bstalkd", "broker/redis"
        );
        for (figure, label) in FIGURES {
            let values = |system: &str| systems.get(system).and_then(|f| f.get(figure));
            let med = |system: &str| values(system).and_then(|v| median(v.values().copied().collect()));
            if ["broker", "beanstalkd", "redis"].iter().all(|s| runs_of(values(s)) == 0) {
                continue;
            }
            // The ratio of each run, broker against the peer measured in that same run; then their median.
            let pair = |peer: &str| {
                let (Some(b), Some(p)) = (values("broker"), values(peer)) else { return None };
                median(b.iter().filter_map(|(run, bv)| p.get(run).map(|pv| bv / pv)).collect())
            };
            let samples = figure.ends_with("_samples");
            let _ = writeln!(
                out,
                "{:<38} {:>12} {:>12} {:>12} {:>16} {:>13}",
                label,
                number(med("broker")),
                number(med("beanstalkd")),
                number(med("redis")),
                if samples { String::new() } else { ratio(pair(PEERS[0])) },
                if samples { String::new() } else { ratio(pair(PEERS[1])) },
            );
        }
        let disk_rows = [
            ("fdatasync_per_s", "disk: append + fdatasync (/s)", "a real flush, as beanstalkd -f 0 and redis always"),
            ("sync_file_range_per_s", "disk: append + sync_file_range (/s)", "what sled's flush calls on Linux"),
        ];
        for (figure, label, note) in disk_rows {
            if let Some(disk) = systems.get("disk").and_then(|f| f.get(figure)) {
                let _ =
                    writeln!(out, "{label:<38} {:>12}   ({note})", number(median(disk.values().copied().collect())));
            }
        }
        let _ = writeln!(out);
    }
    if let Some(soak) = by.get("soak").and_then(|s| s.get("broker")) {
        let get = |figure: &str| soak.get(figure).and_then(|v| median(v.values().copied().collect()));
        let _ = writeln!(
            out,
            "broker soak: {} tasks enqueued, leased and acked (pipelined, at most {} waiting, result_ttl_secs = 5) at {} \
             tasks/s",
            number(get("soak_tasks")),
            number(get("soak_backlog")),
            number(get("soak_rate"))
        );
        let rss: Vec<String> = (0..=10)
            .filter_map(|tenth| {
                get(&format!("soak_rss_mib_{}pct", tenth * 10)).map(|v| format!("{}%: {v:.0}", tenth * 10))
            })
            .collect();
        let _ = writeln!(out, "  resident memory (MiB) along the way   {}", rss.join(", "));
        let mib = |figure: &str| get(figure).map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} MiB"));
        let _ = writeln!(out, "  peak resident memory (VmHWM)          {}", mib("soak_hwm_mib"));
        let _ = writeln!(out, "  data dir after the last ack           {}", mib("soak_dir_mib_done"));
        let _ = writeln!(
            out,
            "  data dir once results_stored = 0      {}   (waited {} s after the last ack)",
            mib("soak_dir_mib_expired"),
            get("soak_expiry_wait_s").map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"))
        );
        let _ = writeln!(out, "  data dir 10 s later                   {}", mib("soak_dir_mib_expired_10s"));
        let _ = writeln!(out, "  resident memory then                  {}", mib("soak_rss_mib_expired_10s"));
    }
    if let Some(memory) = by.get("memory").and_then(|s| s.get("broker")) {
        let get = |figure: &str| memory.get(figure).and_then(|v| median(v.values().copied().collect()));
        let bytes = |figure: &str| get(figure).map_or_else(|| "n/a".to_string(), |v| format!("{v:.0} B"));
        let _ = writeln!(out, "broker memory (resident, per task; 100-byte args, 100-byte results; a fresh daemon)");
        let _ = writeln!(out, "  a waiting task                        {}", bytes("memory_waiting_bytes"));
        let _ = writeln!(out, "  a kept result, after a restart        {}", bytes("memory_result_bytes_reopened"));
        let _ = writeln!(
            out,
            "  a kept result, right after the run    {}   (also what the allocator kept from the waiting tasks)",
            bytes("memory_result_bytes")
        );
    }
    out
}
