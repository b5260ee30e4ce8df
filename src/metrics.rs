//! The daemon's metrics in the Prometheus text format (served at `/metrics` by [`crate::http`]), through the
//! maintained `prometheus-client` crate. Names and labels follow Prometheus conventions:
//!
//! - `broker_tasks_total{queue,task,outcome}`: tasks enqueued, started (leased), succeeded, failed (each failed attempt), retried,
//!   dead (reached `FAILURE`), revoked, expired, lease_lost;
//! - `broker_queue_tasks{queue,state}`: tasks in each queue by state now (ready, scheduled, leased, dead);
//! - `broker_queue_wait_seconds{queue}`: from ready to leased; `broker_task_run_seconds{queue,task}`: from leased
//!   to its outcome;
//! - `broker_commit_seconds`, `broker_commit_group_size`: each log round's write and sync, and how many tasks it
//!   carried;
//! - `broker_connections`, `broker_workers`, `broker_uptime_seconds`.
//!
//! Over PostgreSQL each daemon counts what went through it (sum the counters over the daemons), the queue gauges
//! are the database's, the wait and run histograms observe this daemon's leases and outcomes, and the log-round
//! histograms stay empty (only the single node has a log).

use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What happened to a task.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Created by an enqueue.
    enqueued,
    /// Leased by a worker (an attempt began).
    started,
    /// Acked.
    succeeded,
    /// An attempt failed (retried or not).
    failed,
    /// A retry was scheduled.
    retried,
    /// It reached `FAILURE` (the dead set).
    dead,
    /// Revoked.
    revoked,
    /// Expired before it ran.
    expired,
    /// A lease ended without an outcome (deadline, disconnect, shutdown).
    lease_lost,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    queue: String,
    task: String,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    queue: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueStateLabels {
    queue: String,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 100 µs to about 14 min.
    Histogram::new(exponential_buckets(0.0001, 3.0, 15))
}

fn group_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 14))
}

/// Every metric the daemon keeps.
pub struct Metrics {
    registry: Registry,
    tasks: Family<TaskLabels, Counter>,
    queue_wait: HistogramFamily<QueueLabels>,
    run_time: HistogramFamily<RunLabels>,
    commit_seconds: Histogram,
    commit_group: Histogram,
    queue_tasks: Family<QueueStateLabels, Gauge>,
    connections: Gauge,
    workers: Gauge,
    uptime: Gauge,
    /// One scrape at a time sets the gauges and encodes.
    scrape: Mutex<()>,
}

/// The metrics of one queue and task name (clones of the registered ones).
#[derive(Debug)]
pub struct Handles {
    outcomes: [Counter; Outcome::ALL.len()],
    queue_wait: Histogram,
    run_time: Histogram,
}

/// How long a task waited (ready to leased) or ran (leased to its outcome), in seconds, observed with the event
/// that ends it.
#[derive(Clone, Copy, Debug)]
pub enum Took {
    Waited(f64),
    Ran(f64),
}

impl Handles {
    /// Counts one task event.
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }

    /// Counts one task event, observing how long the task waited or ran before it.
    pub fn happened(&self, outcome: Outcome, took: Option<Took>) {
        self.count(outcome);
        match took {
            Some(Took::Waited(secs)) => self.queue_wait(secs),
            Some(Took::Ran(secs)) => self.run_time(secs),
            None => {}
        }
    }

    /// A task waited `secs` before it was leased.
    pub fn queue_wait(&self, secs: f64) {
        self.queue_wait.observe(secs);
    }

    /// An attempt ran `secs` before its outcome.
    pub fn run_time(&self, secs: f64) {
        self.run_time.observe(secs);
    }
}

impl Outcome {
    /// Every outcome, in declaration order (`outcome as usize` indexes it).
    pub const ALL: [Outcome; 9] = [
        Outcome::enqueued,
        Outcome::started,
        Outcome::succeeded,
        Outcome::failed,
        Outcome::retried,
        Outcome::dead,
        Outcome::revoked,
        Outcome::expired,
        Outcome::lease_lost,
    ];

    /// The name `events` and the metrics' `outcome` label use.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::enqueued => "enqueued",
            Outcome::started => "started",
            Outcome::succeeded => "succeeded",
            Outcome::failed => "failed",
            Outcome::retried => "retried",
            Outcome::dead => "dead",
            Outcome::revoked => "revoked",
            Outcome::expired => "expired",
            Outcome::lease_lost => "lease_lost",
        }
    }
}

/// The most (queue, task name) pairs with metrics of their own; see [`Series::of`].
const MAX_SERIES: usize = 1000;
/// The queue and task label of the pairs past that.
const OTHER_SERIES: &str = "_other";

/// The handles of each (queue, task name) pair seen, made once and looked up by `&str` (a store keeps them under
/// its own lock).
#[derive(Debug, Default)]
pub struct Series {
    handles: std::collections::HashMap<String, std::collections::HashMap<String, Handles>>,
    count: usize,
}

impl Series {
    /// The metrics of a queue and task name. Past `MAX_SERIES` pairs, new ones are counted under
    /// `queue="_other", task="_other"`: producers choose the names, and each pair is a series kept for ever.
    pub fn of<'s>(&'s mut self, metrics: &Metrics, queue: &str, task: &str) -> &'s Handles {
        let (queue, task) = if self.handles.get(queue).is_some_and(|tasks| tasks.contains_key(task)) {
            (queue, task)
        } else if self.count < MAX_SERIES {
            let handles = metrics.handles(queue, task);
            self.handles.entry(queue.to_string()).or_default().insert(task.to_string(), handles);
            self.count += 1;
            (queue, task)
        } else {
            if !self.handles.contains_key(OTHER_SERIES) {
                let handles = metrics.handles(OTHER_SERIES, OTHER_SERIES);
                self.handles.entry(OTHER_SERIES.to_string()).or_default().insert(OTHER_SERIES.to_string(), handles);
            }
            (OTHER_SERIES, OTHER_SERIES)
        };
        &self.handles[queue][task]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let tasks = Family::<TaskLabels, Counter>::default();
        registry.register("broker_tasks", "Tasks by queue, task name and what happened to them", tasks.clone());
        let queue_wait: HistogramFamily<QueueLabels> = Family::new_with_constructor(seconds);
        registry.register("broker_queue_wait_seconds", "Time from ready to leased", queue_wait.clone());
        let run_time: HistogramFamily<RunLabels> = Family::new_with_constructor(seconds);
        registry.register("broker_task_run_seconds", "Time from leased to the attempt's outcome", run_time.clone());
        let commit_seconds = seconds();
        registry.register("broker_commit_seconds", "Each log round's write and sync", commit_seconds.clone());
        let commit_group = group_sizes();
        registry.register("broker_commit_group_size", "Tasks written by each log round", commit_group.clone());
        let queue_tasks = Family::<QueueStateLabels, Gauge>::default();
        registry.register("broker_queue_tasks", "Tasks in each queue by state, now", queue_tasks.clone());
        let connections = Gauge::default();
        registry.register("broker_connections", "Open client connections", connections.clone());
        let workers = Gauge::default();
        registry.register("broker_workers", "Connections that have leased (workers)", workers.clone());
        let uptime = Gauge::default();
        registry.register("broker_uptime_seconds", "Seconds since the daemon started", uptime.clone());
        Metrics {
            registry,
            tasks,
            queue_wait,
            run_time,
            commit_seconds,
            commit_group,
            queue_tasks,
            connections,
            workers,
            uptime,
            scrape: Mutex::new(()),
        }
    }

    /// The metrics of one queue and task name, for the store to keep (under its own lock) and use without
    /// building labels, which are owned strings, at every event.
    pub fn handles(&self, queue: &str, task: &str) -> Handles {
        let counter = |outcome| {
            self.tasks.get_or_create(&TaskLabels { queue: queue.to_string(), task: task.to_string(), outcome }).clone()
        };
        Handles {
            outcomes: Outcome::ALL.map(counter),
            queue_wait: self.queue_wait.get_or_create(&QueueLabels { queue: queue.to_string() }).clone(),
            run_time: self
                .run_time
                .get_or_create(&RunLabels { queue: queue.to_string(), task: task.to_string() })
                .clone(),
        }
    }

    /// A log round took `secs` to write (and sync) `tasks` records.
    pub fn commit(&self, secs: f64, tasks: usize) {
        self.commit_seconds.observe(secs);
        self.commit_group.observe(tasks as f64);
    }

    /// The text exposition, with the gauges set from `now` first.
    pub fn encode(&self, now: &Snapshot) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.queue_tasks.clear();
        for (queue, counts) in &now.queues {
            for (state, count) in
                [("ready", counts[0]), ("scheduled", counts[1]), ("leased", counts[2]), ("dead", counts[3])]
            {
                let labels = QueueStateLabels { queue: queue.clone(), state };
                self.queue_tasks.get_or_create(&labels).set(count as i64);
            }
        }
        self.connections.set(now.connections as i64);
        self.workers.set(now.workers as i64);
        self.uptime.set(now.uptime_secs as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the gauges show, taken at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per queue: ready, scheduled, leased, dead.
    pub queues: Vec<(String, [u64; 4])>,
    /// Open connections.
    pub connections: u64,
    /// Connections that have leased.
    pub workers: u64,
    /// Seconds since start.
    pub uptime_secs: u64,
}
