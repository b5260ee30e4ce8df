//! `broker`: the daemon (`broker serve`) and the command-line client (`enqueue`, `result`, `stat`, ...).
//! A thin edge: it parses arguments, converts JSON to MessagePack values, calls the library or the client
//! crate, and adds context to errors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use broker::clock::SystemClock;
use broker::config::{Config, FsyncPolicy};
use broker::json::{task_json, value_to_json};
use broker_client::proto::{DeadRequeue, ScheduleAdd, SetLimit, Stats, TaskInfo, TaskSpec, Value};
use broker_client::{Client, ConnectOptions};
use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's allocator: the daemon allocates and frees many small objects (task ids, records,
/// frames) across threads, and mimalloc does that faster (see BENCHMARKS.md for the measurement).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "broker", version, about = "A durable task broker for background jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as JSON objects (one per line, for log shippers).
    #[arg(long, env = "BROKER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    log_format: String,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The daemon's address: HOST:PORT, or tcp://:TOKEN@HOST:PORT with a token (else BROKER_TOKEN is used),
    /// tls://HOST:PORT for TLS. Several daemons over one shared store: a comma-separated list, the scheme and token
    /// given once (tcp://:TOKEN@a:7420,b:7420); each is tried in turn until one answers.
    #[arg(long, env = "BROKER_ADDR", default_value = broker_client::proto::DEFAULT_ADDR, global = true)]
    addr: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// A TOML config file (see config.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, overriding the config.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Data directory, overriding the config.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where tasks are kept, overriding the config: a postgres://... URL for several daemons over one
        /// PostgreSQL (README, "Running on several machines"), or "local" for the data directory.
        #[arg(long)]
        store: Option<String>,
        /// Flush policy (always | interval), overriding the config.
        #[arg(long, value_parser = parse_fsync)]
        fsync: Option<FsyncPolicy>,
        /// Serve a non-loopback address without tokens anyway (any client that reaches it is admin).
        #[arg(long)]
        insecure_no_auth: bool,
        /// The HTTP listener's address (/metrics, /healthz, /readyz), overriding the config; "" for none.
        #[arg(long)]
        http: Option<String>,
    },
    /// Enqueue a task and print its id.
    Enqueue {
        /// The task's name.
        task: String,
        /// Positional arguments as a JSON array, e.g. '[2, 3]'.
        args: Option<String>,
        /// Keyword arguments as a JSON object.
        #[arg(long)]
        kwargs: Option<String>,
        /// Context as a JSON object of string keys.
        #[arg(long)]
        context: Option<String>,
        /// The queue.
        #[arg(long, short)]
        queue: Option<String>,
        /// Run no earlier than this many seconds from now.
        #[arg(long)]
        countdown: Option<f64>,
        /// Priority (higher runs first).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Retry budget.
        #[arg(long)]
        max_retries: Option<u32>,
        /// A client-chosen task id (enqueueing it twice returns the first task).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a task's state and result (or error).
    Result {
        /// The task id.
        id: String,
        /// Wait up to this many seconds for the task to finish.
        #[arg(long)]
        wait: Option<f64>,
        /// Print the whole task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow what happens to tasks as it happens (like `celery events`), until interrupted.
    Events {
        /// Only this queue's tasks.
        #[arg(long)]
        queue: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a task's whole record: state, queue, attempts, timeline, arguments, context, result or error.
    Task {
        /// The task id.
        id: String,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a task: it never runs, or its worker learns on its next heartbeat.
    Revoke {
        /// The task id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show queues, counts, workers and totals.
    Stat {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh the screen every --interval seconds until interrupted, like `top`, with rates since the
        /// last refresh.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete every waiting task of a queue.
    Purge {
        /// The queue.
        queue: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect or requeue dead (FAILURE) tasks.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Pause a queue: workers lease nothing from it until it is resumed (enqueues are still taken). Durable.
    Pause {
        /// The queue (it need not exist yet).
        queue: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a paused queue.
    Resume {
        /// The queue.
        queue: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Rate and concurrency limits on a task name or a queue, for every worker together.
    Limit {
        #[command(subcommand)]
        command: LimitCommand,
    },
    /// Periodic tasks kept by the daemon (no separate beat process).
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Add a schedule, or change the one of that name: TASK is enqueued at each tick.
    Add {
        /// The schedule's name.
        name: String,
        /// The task's name.
        task: String,
        /// Positional arguments as a JSON array.
        args: Option<String>,
        /// Keyword arguments as a JSON object.
        #[arg(long)]
        kwargs: Option<String>,
        /// The queue.
        #[arg(long, short)]
        queue: Option<String>,
        /// A cron expression: "*/5 * * * *" (minute hour day month weekday), or six fields with seconds first.
        #[arg(long, conflicts_with = "every", required_unless_present = "every")]
        cron: Option<String>,
        /// The cron expression's IANA time zone (default UTC).
        #[arg(long, requires = "cron")]
        tz: Option<String>,
        /// Or: every this many seconds (at least 1).
        #[arg(long)]
        every: Option<f64>,
        /// Ticks missed while the daemon was down: fire the latest once (default), or skip them.
        #[arg(long, value_parser = ["once", "skip"])]
        catch_up: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the schedules with their next and last ticks.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a schedule (the tasks it enqueued stay).
    Remove {
        /// The schedule.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pause a schedule: its ticks do not fire until it is resumed.
    Pause {
        /// The schedule.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a paused schedule (ticks that fell while it was paused do not fire).
    Resume {
        /// The schedule.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum LimitCommand {
    /// Set the limit of a task name (--task) or a queue (--queue), replacing the one it had.
    Set {
        #[command(flatten)]
        target: LimitTarget,
        /// At most this many starts per second, minute or hour: 10/s, 100/m, 5/h.
        #[arg(long)]
        rate: Option<String>,
        /// At most this many running at once.
        #[arg(long)]
        concurrency: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove the limit of a task name or a queue.
    Clear {
        #[command(flatten)]
        target: LimitTarget,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the limits, with how many of the tasks each covers run now.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct LimitTarget {
    /// A task name.
    #[arg(long)]
    task: Option<String>,
    /// A queue.
    #[arg(long)]
    queue: Option<String>,
}

impl LimitTarget {
    fn request(self, rate: Option<String>, concurrency: Option<u32>) -> SetLimit {
        let (scope, name) = match (self.task, self.queue) {
            (Some(task), _) => ("task", task),
            (None, queue) => ("queue", queue.unwrap_or_default()),
        };
        SetLimit { scope: scope.into(), name, rate, concurrency }
    }
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead tasks.
    List {
        /// Only this queue.
        #[arg(long, short)]
        queue: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put dead tasks back in their queues: the ids given, or all of --queue ("*" for every queue).
    Requeue {
        /// Task ids.
        ids: Vec<String>,
        /// Every dead task of this queue.
        #[arg(long, short)]
        queue: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "interval" => Ok(FsyncPolicy::Interval),
        other => Err(format!("expected `always` or `interval`, got {other:?}")),
    }
}

/// Errors print as a message and its causes, one per line; never as a backtrace, whatever `RUST_BACKTRACE` says
/// (`anyhow`'s `Debug` form, which `fn main() -> Result` uses, appends one when it is set).
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config, listen, data_dir, store, fsync, insecure_no_auth, http } => {
            serve(config, listen, data_dir, store, fsync, insecure_no_auth, http).await
        }
        Command::Enqueue { task, args, kwargs, context, queue, countdown, priority, max_retries, id, client } => {
            let mut spec = TaskSpec::new(task);
            set_arguments(&mut spec, args, kwargs)?;
            if let Some(context) = context {
                spec.context = json_object("--context", &context)?;
            }
            spec.queue = queue;
            spec.priority = priority;
            spec.max_retries = max_retries;
            spec.id = id;
            spec.countdown_ms = countdown.map(|s| (s * 1000.0).max(0.0) as u64);
            let enqueued = connect(&client).await?.enqueue(spec).await.context("enqueue failed")?;
            println!("{}", enqueued.id);
            Ok(())
        }
        Command::Result { id, wait, json, client } => {
            let client = connect(&client).await?;
            let info = match wait {
                Some(secs) => client.wait(&id, Duration::from_secs_f64(secs.max(0.0))).await,
                None => client.get(&id).await,
            }
            .with_context(|| format!("cannot read task {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task_json(&info))?);
            } else {
                print_result(&info);
            }
            Ok(())
        }
        Command::Revoke { id, client } => {
            let state = connect(&client).await?.revoke(&id).await.with_context(|| format!("cannot revoke {id}"))?;
            println!("{state}");
            Ok(())
        }
        Command::Events { queue, json, client } => follow_events(&client, queue, json).await,
        Command::Task { id, json, client } => {
            let info = connect(&client).await?.get(&id).await.with_context(|| format!("cannot read task {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task_json(&info))?);
            } else {
                print_task(&info);
            }
            Ok(())
        }
        Command::Stat { watch: true, interval, client, .. } => watch_stats(&client, interval).await,
        Command::Stat { json, client, .. } => {
            let stats = connect(&client).await?.stats().await.context("cannot read stats")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&stats);
            }
            Ok(())
        }
        Command::Purge { queue, client } => {
            let n = connect(&client).await?.purge(&queue).await.with_context(|| format!("cannot purge {queue}"))?;
            println!("purged {n} tasks from {queue}");
            Ok(())
        }
        Command::Dead { command: DeadCommand::List { queue, limit, json, client } } => {
            let tasks = connect(&client).await?.dead_list(queue.as_deref(), limit).await.context("cannot list")?;
            if json {
                let all: Vec<_> = tasks.iter().map(task_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for t in &tasks {
                    let error = t.error.as_ref().map(|e| format!("{}: {}", e.kind, e.message)).unwrap_or_default();
                    println!("{}  {}  {}  attempts={}  {}", t.id, t.queue, t.task, t.attempts, error);
                }
                println!("{} dead tasks", tasks.len());
            }
            Ok(())
        }
        Command::Dead { command: DeadCommand::Requeue { ids, queue, client } } => {
            if ids.is_empty() && queue.is_none() {
                bail!("give task ids or --queue");
            }
            let n = connect(&client).await?.dead_requeue(DeadRequeue { ids, queue }).await.context("requeue")?;
            println!("requeued {n} tasks");
            Ok(())
        }
        Command::Pause { queue, client } => {
            let was = connect(&client).await?.set_paused(&queue, true).await.context("cannot pause")?;
            println!("{} paused{}", printable(&queue), if was { " (it already was)" } else { "" });
            Ok(())
        }
        Command::Resume { queue, client } => {
            let was = connect(&client).await?.set_paused(&queue, false).await.context("cannot resume")?;
            println!("{} resumed{}", printable(&queue), if was { "" } else { " (it was not paused)" });
            Ok(())
        }
        Command::Limit { command: LimitCommand::Set { target, rate, concurrency, client } } => {
            if rate.is_none() && concurrency.is_none() {
                bail!("give --rate, --concurrency or both (`broker limit clear` removes a limit)");
            }
            let request = target.request(rate, concurrency);
            connect(&client).await?.set_limit(&request).await.context("cannot set the limit")?;
            println!("limit set on {} {}", request.scope, printable(&request.name));
            Ok(())
        }
        Command::Limit { command: LimitCommand::Clear { target, client } } => {
            let request = target.request(None, None);
            connect(&client).await?.set_limit(&request).await.context("cannot clear the limit")?;
            println!("limit removed from {} {}", request.scope, printable(&request.name));
            Ok(())
        }
        Command::Schedule { command } => schedule_command(command).await,
        Command::Limit { command: LimitCommand::List { json, client } } => {
            let limits = connect(&client).await?.limits().await.context("cannot list limits")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&limits)?);
                return Ok(());
            }
            println!("{:<6} {:<32} {:>10} {:>12} {:>8}", "SCOPE", "NAME", "RATE", "CONCURRENCY", "RUNNING");
            for l in &limits {
                let concurrency = l.concurrency.map_or("-".to_string(), |c| c.to_string());
                let rate = l.rate.as_deref().unwrap_or("-");
                println!("{:<6} {:<32} {:>10} {:>12} {:>8}", l.scope, printable(&l.name), rate, concurrency, l.running);
            }
            Ok(())
        }
    }
}

/// The task's arguments from the command line: ARGS a JSON array, --kwargs a JSON object.
fn set_arguments(spec: &mut TaskSpec, args: Option<String>, kwargs: Option<String>) -> Result<()> {
    if let Some(args) = args {
        match json_to_value(&parse_json("ARGS", &args)?) {
            Value::Array(items) => spec.args = items,
            _ => bail!("ARGS must be a JSON array, e.g. '[2, 3]'"),
        }
    }
    if let Some(kwargs) = kwargs {
        spec.kwargs = json_object("--kwargs", &kwargs)?;
    }
    Ok(())
}

async fn schedule_command(command: ScheduleCommand) -> Result<()> {
    match command {
        ScheduleCommand::Add { name, task, args, kwargs, queue, cron, tz, every, catch_up, client } => {
            let mut spec = TaskSpec { queue, ..TaskSpec::new(task) };
            set_arguments(&mut spec, args, kwargs)?;
            let every_ms = every.map(|s| (s * 1000.0).max(0.0) as u64);
            let request = ScheduleAdd { name, task: spec, cron, timezone: tz, every_ms, catch_up };
            let info = connect(&client).await?.schedule_add(&request).await.context("cannot add the schedule")?;
            println!("{}: next tick {}", printable(&info.name), info.next_ms.map_or("-".into(), format_ms));
        }
        ScheduleCommand::List { json, client } => {
            let schedules = connect(&client).await?.schedules().await.context("cannot list schedules")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&schedules)?);
                return Ok(());
            }
            println!("{:<24} {:<24} {:<22} {:<24} {:<24}", "NAME", "TASK", "WHEN", "NEXT", "LAST");
            for s in &schedules {
                let when = match (&s.cron, s.every_ms) {
                    (Some(cron), _) => {
                        format!("{cron}{}", s.timezone.as_ref().map_or(String::new(), |z| format!(" {z}")))
                    }
                    (None, Some(ms)) => format!("every {}s", ms as f64 / 1000.0),
                    _ => "-".into(),
                };
                let next = if s.paused { "paused".into() } else { s.next_ms.map_or("-".into(), format_ms) };
                let last = s.last_ms.map_or("-".into(), format_ms);
                println!(
                    "{:<24} {:<24} {:<22} {:<24} {:<24}",
                    printable(&s.name),
                    printable(&s.task.task),
                    printable(&when),
                    next,
                    last
                );
            }
        }
        ScheduleCommand::Remove { name, client } => {
            let removed = connect(&client).await?.schedule_remove(&name).await.context("cannot remove")?;
            println!("{}", if removed { "removed" } else { "no such schedule" });
        }
        ScheduleCommand::Pause { name, client } => {
            connect(&client).await?.schedule_set_paused(&name, true).await.context("cannot pause")?;
            println!("{} paused", printable(&name));
        }
        ScheduleCommand::Resume { name, client } => {
            connect(&client).await?.schedule_set_paused(&name, false).await.context("cannot resume")?;
            println!("{} resumed", printable(&name));
        }
    }
    Ok(())
}

/// Turns transparent huge pages off for this process. mimalloc asks for them by default; the daemon allocates
/// and frees records all the time, and every fresh 2 MiB page costs a fault that zeroes all of it: with them a
/// third of the daemon's CPU went to `clear_page_erms` under pipelined load, and the full cycle ran about 20%
/// slower (BENCHMARKS.md). A no-op where the kernel has no such setting.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

async fn serve(
    config_path: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    fsync: Option<FsyncPolicy>,
    insecure_no_auth: bool,
    http: Option<String>,
) -> Result<()> {
    // Whatever the daemon creates (the log, sled's files) is its owner's alone: tasks' arguments and context
    // are in there. The data dir itself is made 0700 by the store.
    // SAFETY: umask(2) only sets this process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    // The file, then BROKER_<SETTING> variables, then the flags below.
    let mut config = Config::load(config_path.as_deref(), std::env::vars())?;
    if let Some(listen) = listen {
        config.listen = listen;
    }
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    if store.is_some() {
        config.store = store;
    }
    if let Some(fsync) = fsync {
        config.fsync = fsync;
    }
    config.insecure_no_auth |= insecure_no_auth;
    if http.is_some() {
        config.http_listen = http;
    }
    let server = broker::server::start(config, Arc::new(SystemClock)).await?;
    // Tests and scripts read this line to learn the port when listening on port 0.
    println!("broker listening on {}", server.addr());
    let token = server.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
    server.stopped().await;
    server.shutdown().await.context("shutdown flush failed")?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn connect(args: &ClientArgs) -> Result<Client> {
    let options = ConnectOptions::new(args.addr.clone()).name(format!("broker-cli@{}", std::process::id()));
    let addr = options.addr().to_string(); // without the token a URL may carry
    options.connect().await.with_context(|| {
        format!("cannot reach the daemon at {addr} (set --addr or BROKER_ADDR; a token in the URL or BROKER_TOKEN)")
    })
}

fn parse_json(what: &str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON: {text}"))
}

fn json_object(what: &str, text: &str) -> Result<std::collections::BTreeMap<String, Value>> {
    match parse_json(what, text)? {
        serde_json::Value::Object(map) => Ok(map.iter().map(|(k, v)| (k.clone(), json_to_value(v))).collect()),
        _ => bail!("{what} must be a JSON object"),
    }
}

/// JSON → MessagePack value: integers stay integers, other numbers become floats.
fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(json_to_value).collect()),
        serde_json::Value::Object(map) => {
            Value::Map(map.iter().map(|(k, v)| (Value::from(k.as_str()), json_to_value(v))).collect())
        }
    }
}

fn print_result(info: &TaskInfo) {
    println!("{}", info.state);
    if let Some(result) = &info.result {
        println!("{}", value_to_json(result));
    }
    if let Some(error) = &info.error {
        println!("{}: {}", printable(&error.kind), printable(&error.message));
        if let Some(tb) = &error.traceback {
            println!("{}", printable(tb));
        }
    }
}

/// `broker stat --watch`: the stats redrawn every `interval` seconds, with rates since the last redraw.
async fn watch_stats(args: &ClientArgs, interval: f64) -> Result<()> {
    let client = connect(args).await?;
    let period = Duration::from_secs_f64(interval.max(0.1));
    let mut last: Option<(std::time::Instant, broker_client::proto::Totals)> = None;
    loop {
        let stats = client.stats().await.context("cannot read stats")?;
        // Clear the screen and go home, as `watch` does.
        print!("\x1b[2J\x1b[H");
        print_stats(&stats);
        if let Some((at, before)) = &last {
            let secs = at.elapsed().as_secs_f64().max(0.001);
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
            let t = &stats.totals;
            println!(
                "per second: enqueued {:.1}  succeeded {:.1}  failed {:.1}  (every {interval}s; Ctrl-C to stop)",
                rate(t.enqueued, before.enqueued),
                rate(t.succeeded, before.succeeded),
                rate(t.failed, before.failed)
            );
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        last = Some((std::time::Instant::now(), stats.totals.clone()));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `broker events`: long-polls `events` from now on and prints each event as it comes.
async fn follow_events(args: &ClientArgs, queue: Option<String>, json: bool) -> Result<()> {
    let client = connect(args).await?;
    let mut request = broker_client::proto::Events { after: None, max: 1000, wait_ms: 30_000, queue };
    loop {
        let list = tokio::select! {
            list = client.events(&request) => list.context("cannot read events")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        if list.missed > 0 {
            eprintln!("({} events were missed: the daemon keeps the last 10 000)", list.missed);
        }
        for e in &list.events {
            if json {
                println!("{}", serde_json::to_string(e)?);
            } else {
                let (task, id, queue) = (printable(&e.task), printable(&e.task_id), printable(&e.queue));
                println!("{:>13}  {:<10}  {task}[{id}]  queue={queue}", e.at_ms, e.event);
            }
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        request.after = Some(list.next);
    }
}

/// Text from producers and workers (task and queue names, error messages, tracebacks), safe for a terminal:
/// control characters other than newlines and tabs (escape sequences) are shown as U+FFFD.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        text.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '\u{fffd}' } else { c }).collect()
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// A Unix-ms time as people read it (UTC, to the second).
fn format_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| format!("{ms} (Unix ms)"), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// `broker task ID`: the whole record, for people.
fn print_task(info: &TaskInfo) {
    let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default();
    println!("{}  {}", printable(&info.id), info.state);
    println!("task:      {}", printable(&info.task));
    println!("queue:     {}  (priority {})", printable(&info.queue), info.priority);
    println!("attempts:  {} of {}", info.attempts, u64::from(info.max_retries) + 1);
    let times = [
        ("enqueued", Some(info.created_at_ms)),
        ("due", info.eta_ms),
        ("started", info.started_at_ms),
        ("finished", info.finished_at_ms),
        ("kept until", info.result_expires_at_ms),
    ];
    for (label, at) in times.into_iter().filter_map(|(l, at)| at.map(|at| (l, at))) {
        println!("{:<10} {at} (Unix ms)", format!("{label}:"));
    }
    let json = task_json(info);
    println!("args:      {}", pretty(json["args"].clone()));
    println!("kwargs:    {}", pretty(json["kwargs"].clone()));
    println!("context:   {}", pretty(json["context"].clone()));
    if info.revoked {
        println!("revoked:   yes");
    }
    if let Some(progress) = &info.progress {
        let meta = pretty(value_to_json(&progress.meta));
        println!("progress:  {} {} (at {})", printable(&progress.state), meta, format_ms(progress.at_ms));
    }
    if let Some(result) = &info.result {
        println!("result:    {}", pretty(value_to_json(result)));
    }
    if let Some(error) = &info.error {
        println!("error:     {}: {}", printable(&error.kind), printable(&error.message));
        if let Some(tb) = &error.traceback {
            println!("{}", printable(tb));
        }
    }
}

fn print_stats(stats: &Stats) {
    let uptime = Duration::from_millis(stats.uptime_ms);
    println!(
        "{}  up {}s  fsync={}  connections={}  workers={}  results stored={}",
        stats.server,
        uptime.as_secs(),
        stats.fsync,
        stats.connections,
        stats.workers.len(),
        stats.results_stored
    );
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "QUEUE", "READY", "SCHEDULED", "LEASED", "SUCCEEDED", "FAILED", "DEAD"
    );
    for q in &stats.queues {
        let name = if q.paused { format!("{} (paused)", printable(&q.name)) } else { printable(&q.name).into_owned() };
        println!(
            "{:<24} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
            name, q.ready, q.scheduled, q.leased, q.succeeded, q.failed, q.dead
        );
    }
    if !stats.workers.is_empty() {
        println!();
        println!("{:<32} {:<22} {:>7}", "WORKER", "ADDRESS", "LEASED");
        for w in &stats.workers {
            println!("{:<32} {:<22} {:>7}", printable(&w.client), w.addr, w.leased);
        }
    }
    let t = &stats.totals;
    println!();
    println!(
        "totals since start: enqueued={} succeeded={} failed={} retried={} dead={} lease_lost={} revoked={} expired_results={}",
        t.enqueued, t.succeeded, t.failed, t.retried, t.dead, t.lease_lost, t.revoked, t.expired_results
    );
}
