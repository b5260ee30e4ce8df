//! The worker runtime: lease tasks, run their handlers, report the outcome, and stop cleanly.
//!
//! A [`Worker`] is built with [`Worker::builder`]: connection options, queues in priority order, a concurrency
//! limit, a lease timeout, a grace period, and one async handler per task name. [`Worker::run`] then serves until
//! SIGINT or SIGTERM; [`Worker::run_until`] until a future resolves (tests, embedding).
//!
//! ```no_run
//! use std::time::Duration;
//! use broker_client::{ConnectOptions, Task, TaskFailure, Worker};
//!
//! async fn add(task: Task<(i64, i64)>) -> Result<i64, TaskFailure> {
//!     Ok(task.args.0 + task.args.1)
//! }
//!
//! # async fn demo() -> Result<(), broker_client::Error> {
//! Worker::builder(ConnectOptions::from_env())
//!     .queues(["high", "default"])
//!     .concurrency(8)
//!     .lease_timeout(Duration::from_secs(30))
//!     .register("add", add)
//!     .build()
//!     .run()
//!     .await
//! # }
//! ```
//!
//! # How it runs
//!
//! One loop owns the connection. It holds at most `concurrency` running tasks plus `prefetch` leased ones
//! waiting for a slot (plus those whose ack is on its way); whenever it holds fewer, it leases the difference, long-polling the daemon for up to
//! `poll_wait`. Each leased task runs on its own tokio task:
//!
//! - a prefetched task waits for a free slot (in about the order they were leased), its lease kept alive by
//!   heartbeats;
//!   on a graceful shutdown it is released unrun (the attempt does not count), and if the worker dies the daemon
//!   puts it back in its queue like any lease of a closed connection;
//! - its args and kwargs are decoded into the handler's types; a task that does not decode fails at once,
//!   **not retried**, with an `InvalidArguments` error naming the task and the field;
//! - a task whose name has no handler fails with `UnknownTask: unknown task NAME`, **retried by the task's own
//!   policy** (so during a rolling deploy a worker that knows it can still pick it up; once the budget is spent
//!   it waits in the dead set, from which `dead_requeue` brings it back);
//! - the handler runs in a tokio task of its own, inside a context scope holding the task's context (so tasks it
//!   enqueues through a [`Producer`] inherit it); a panic is caught as that task's `JoinError` and reported as a
//!   failure of type `Panic` with the panic message, retried by the task's policy, and the worker carries on;
//! - while it runs, the lease is extended every third of its duration (heartbeat). If an extend reports the task
//!   revoked, the handler is aborted and the task is failed, which the daemon records as `REVOKED`; if the lease
//!   was lost (deadline passed, connection gone) the handler is aborted and nothing is reported: the daemon has
//!   already put the task back for another attempt;
//! - `Ok(value)` acks with the value as the result; `Err(failure)` fails with the failure's type and message,
//!   its `retry` flag and its countdown ([`TaskFailure::retry_in`] is Celery's `self.retry(countdown=...)`;
//!   the context is part of the stored task, so every retry sees it unchanged);
//! - the slot is free as soon as the handler returns: the ack (or fail) goes out on the connection, pipelined with
//!   the others, while the next task already runs. An ack that does not arrive is handled as a lost lease: the
//!   daemon runs the task again.
//!
//! # Prefetch
//!
//! Prefetched tasks start without a round trip to the daemon when a slot frees, which matters for short tasks.
//! The trade-off is Celery's `worker_prefetch_multiplier`: a prefetched task waits behind this worker's running
//! tasks while another worker may be idle. For long tasks, set `.prefetch(0)`.
//!
//! # Connection loss
//!
//! Leases belong to a connection: when it closes, the daemon puts every task it held back in its queue. So when
//! the connection breaks (the daemon restarted, the network failed), the worker aborts the handlers still running
//! for that connection (their results could not be recorded any more, and the tasks are already back in the
//! queue), then reconnects with exponential backoff and jitter. A result is only ever acked on the lease that
//! ran it, so a task is never acked twice: an ack after the lease is gone is refused (`lease_lost`) and logged.
//!
//! With several addresses ([`ConnectOptions::new`] with `a:7420,b:7420`: daemons over one shared store), the
//! reconnect starts with the address after the one whose connection broke, and a lease refused with
//! `store_unavailable` (that daemon cannot reach the store) counts as a broken connection: the worker leaves that
//! daemon, in the same way, for the next address. With a single address, `store_unavailable` is retried on the
//! same connection after a backoff, like any other refused lease.
//!
//! # Shutdown
//!
//! On the first SIGINT/SIGTERM (or when `run_until`'s future resolves, or [`ShutdownHandle::graceful`]) the
//! worker stops leasing, releases its prefetched tasks unrun, lets running tasks finish for up to the grace period, then aborts the rest and
//! `release`s their leases (a release does not count as an attempt), and returns. A lease request still waiting
//! at the daemon is not abandoned: whatever it brings back is released unrun. A second signal (or
//! [`ShutdownHandle::now`]) stops at once: handlers are dropped where they are, the connection closes, and the
//! daemon returns the tasks to their queues (as lost leases, the attempt counted).

mod context;
mod task;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub use context::{apply_scope, current_context, to_value, with_context, Producer, ScheduleBuilder, TaskBuilder};
pub use task::{Context, Task, TaskFailure, INVALID_ARGUMENTS, INVALID_RESULT, PANIC, RETRY, UNKNOWN_TASK};

use crate::client::{duration_ms, Client, ConnectOptions};
use crate::error::{Error, ErrorKind};
use crate::proto::{ErrorCode, Fail, Lease, LeasedTask, TaskState, DEFAULT_QUEUE};
use task::{ErasedHandler, FnHandler};

/// The most tasks one `lease` asks for (the daemon's default `max_lease_batch` is 1000).
const MAX_LEASE_BATCH: usize = 1000;
/// The shortest heartbeat interval, whatever the lease.
const MIN_HEARTBEAT: Duration = Duration::from_millis(10);
/// How long, after the grace period, aborted tasks get to release their leases.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// A signal this soon after the first is taken as a duplicate delivery, not as a second signal.
const SECOND_SIGNAL_AFTER: Duration = Duration::from_millis(250);
/// How often the loop checks that an idle connection is still open while every slot is busy.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// Builds a [`Worker`]. Every setting but the handlers has a default.
#[must_use]
pub struct WorkerBuilder {
    inner: Inner,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("addr", &self.inner.connect.addr())
            .field("queues", &self.inner.queues)
            .field("concurrency", &self.inner.concurrency)
            .field("handlers", &self.inner.handlers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    /// The queues to serve, highest priority first (default `["default"]`): a task is taken from the first queue
    /// that has one ready.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.inner.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// How many tasks run at once (default 4, at least 1).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.inner.concurrency = tasks.max(1);
        self
    }

    /// How many leased tasks the worker may hold beyond the running ones (default: as many as `concurrency`;
    /// 0 leases only for free slots). See [Prefetch](self#prefetch) for the trade-off.
    pub fn prefetch(mut self, tasks: usize) -> Self {
        self.inner.prefetch = Some(tasks);
        self
    }

    /// The lease duration the worker asks for, overriding each task's own (default: the task's, which defaults
    /// to the daemon's `default_lease_ms`). Heartbeats extend it every third of this while a handler runs, so it
    /// bounds how long a dead worker's task waits before another worker gets it, not how long a task may run.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.inner.lease_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// How long running tasks may take to finish after a graceful shutdown starts (default 30 s). Tasks still
    /// running then are aborted and released.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.inner.grace_period = grace;
        self
    }

    /// How long one lease request waits at the daemon when no task is ready (default 1 s). An idle worker's
    /// graceful shutdown takes up to this long, because the worker waits for the outstanding request's answer
    /// to release whatever it brings.
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.inner.poll_wait = wait;
        self
    }

    /// The reconnect backoff: the first retry after `min`, doubling up to `max` (defaults 100 ms and 5 s), with
    /// jitter.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.inner.reconnect_min = min.max(Duration::from_millis(1));
        self.inner.reconnect_max = max.max(self.inner.reconnect_min);
        self
    }

    /// The longest a task named `name` may run (Celery's `time_limit`): past it the handler is stopped (dropped
    /// at its next `.await`) and the task fails with `TimeLimitExceeded`, not retried. A handler that must clean
    /// up can race its own work against a shorter `tokio::time::timeout` (Celery's `soft_time_limit`).
    pub fn time_limit(mut self, name: impl Into<String>, limit: Duration) -> Self {
        self.inner.time_limits.insert(name.into(), limit);
        self
    }

    /// The time limit of tasks with none of their own ([`WorkerBuilder::time_limit`]); default none.
    pub fn default_time_limit(mut self, limit: Duration) -> Self {
        self.inner.default_time_limit = Some(limit);
        self
    }

    /// Registers `handler` for tasks named `name` (a later registration for the same name replaces it).
    ///
    /// A handler is an async function from a [`Task<A, K>`] to `Result<R, TaskFailure>`: `A` is decoded from the
    /// task's positional args, `K` from its kwargs, and `R` is encoded as the task's result.
    pub fn register<F, Fut, A, K, R>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Task<A, K>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskFailure>> + Send + 'static,
        A: DeserializeOwned + Send + 'static,
        K: DeserializeOwned + Send + 'static,
        R: Serialize + 'static,
    {
        self.inner.handlers.insert(name.into(), Arc::new(FnHandler::new(handler)));
        self
    }

    /// The worker.
    pub fn build(self) -> Worker {
        let mut inner = self.inner;
        if inner.queues.is_empty() {
            inner.queues = vec![DEFAULT_QUEUE.to_string()];
        }
        Worker {
            inner: Arc::new(inner),
            shutdown: ShutdownHandle { graceful: CancellationToken::new(), now: CancellationToken::new() },
        }
    }
}

/// The settings and handlers: built by [`WorkerBuilder`], then shared by the loop and every running task.
struct Inner {
    connect: ConnectOptions,
    queues: Vec<String>,
    concurrency: usize,
    /// `None`: as many as `concurrency`.
    prefetch: Option<usize>,
    lease_timeout: Option<Duration>,
    grace_period: Duration,
    poll_wait: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    time_limits: HashMap<String, Duration>,
    default_time_limit: Option<Duration>,
}

/// Asks a running [`Worker`] to stop, from anywhere. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    graceful: CancellationToken,
    now: CancellationToken,
}

impl ShutdownHandle {
    /// Stops leasing, lets running tasks finish within the grace period, releases the rest, returns.
    pub fn graceful(&self) {
        self.graceful.cancel();
    }

    /// Stops at once: running handlers are dropped and the connection closes (the daemon requeues their tasks).
    pub fn now(&self) {
        self.graceful.cancel();
        self.now.cancel();
    }
}

/// A configured worker; see the [module documentation](self) for what it does.
pub struct Worker {
    inner: Arc<Inner>,
    shutdown: ShutdownHandle,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("addr", &self.inner.connect.addr())
            .field("queues", &self.inner.queues)
            .field("concurrency", &self.inner.concurrency)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts building a worker that connects with `connect`.
    pub fn builder(connect: ConnectOptions) -> WorkerBuilder {
        WorkerBuilder {
            inner: Inner {
                connect,
                queues: vec![DEFAULT_QUEUE.to_string()],
                concurrency: 4,
                prefetch: None,
                lease_timeout: None,
                grace_period: Duration::from_secs(30),
                poll_wait: Duration::from_secs(1),
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(5),
                handlers: HashMap::new(),
                time_limits: HashMap::new(),
                default_time_limit: None,
            },
        }
    }

    /// A handle that stops this worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until SIGINT or SIGTERM, then shuts down gracefully; a second signal stops at once (a duplicate
    /// delivery within 250 ms of the first does not count as a second signal).
    ///
    /// Returns an error only for a problem no retry can fix (the daemon refused the lease request as invalid, or
    /// the signal handlers could not be installed); connection failures are retried forever.
    pub async fn run(self) -> Result<(), Error> {
        let mut signals = Signals::install()?;
        let handle = self.shutdown.clone();
        let listener = tokio::spawn(async move {
            signals.recv().await;
            let first = tokio::time::Instant::now();
            tracing::info!("signal received: finishing running tasks (signal again to stop at once)");
            handle.graceful();
            // One signal can arrive twice (sent to the process and to its group, as `timeout` does): only a
            // second signal a moment later means "stop now".
            loop {
                signals.recv().await;
                if first.elapsed() >= SECOND_SIGNAL_AFTER {
                    break;
                }
            }
            tracing::warn!("second signal: stopping now");
            handle.now();
        });
        let result = self.serve().await;
        listener.abort();
        result
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let handle = self.shutdown.clone();
        let serve = self.serve();
        tokio::pin!(serve, shutdown);
        tokio::select! {
            result = &mut serve => return result,
            _ = &mut shutdown => handle.graceful(),
        }
        serve.await
    }

    /// The loop, abandoned as a whole (aborting every task it spawned) on an immediate stop.
    async fn serve(self) -> Result<(), Error> {
        let now = self.shutdown.now.clone();
        tokio::select! {
            result = self.serve_gracefully() => result,
            _ = now.cancelled() => {
                tracing::warn!("stopped at once; the daemon puts running tasks back in their queues as the connection closes");
                Ok(())
            }
        }
    }

    async fn serve_gracefully(self) -> Result<(), Error> {
        let inner = self.inner;
        let graceful = self.shutdown.graceful;
        let slots = Arc::new(Semaphore::new(inner.concurrency.min(Semaphore::MAX_PERMITS / 2)));
        // Clamped so that the two together stay within what a semaphore can count.
        let prefetch = inner.prefetch.unwrap_or(inner.concurrency).min(Semaphore::MAX_PERMITS / 2);
        // Leases held and not yet done (running or waiting for a slot): leasing waits for room here.
        let held = Arc::new(Semaphore::new(inner.concurrency.min(Semaphore::MAX_PERMITS / 2) + prefetch));
        // Every running task lives here, so dropping the set (an immediate stop) aborts them all.
        let mut running: JoinSet<()> = JoinSet::new();
        let grace_over = CancellationToken::new();
        let mut backoff = Backoff::new(inner.reconnect_min, inner.reconnect_max);
        let mut fatal = None;
        // A lease request that was waiting at the daemon when the shutdown started; it releases what it gets.
        let mut draining = None;
        tracing::info!(
            addr = inner.connect.addr(),
            queues = ?inner.queues,
            concurrency = inner.concurrency,
            prefetch,
            handlers = inner.handlers.len(),
            "worker starting"
        );

        let mut reconnecting = false;
        'connection: while !graceful.is_cancelled() {
            if reconnecting {
                // Back off before reconnecting too: a daemon that accepts and then drops connections must not
                // make the worker spin. The backoff resets only once a lease succeeds.
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = graceful.cancelled() => break,
                }
            }
            reconnecting = true;
            let Some(client) = connect(&inner.connect, &graceful, &mut backoff).await else { break };
            // Cancelled when this connection is found dead: its tasks' leases are gone with it.
            let connection_lost = CancellationToken::new();
            loop {
                while running.try_join_next().is_some() {}
                let first = tokio::select! {
                    permit = held.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    _ = graceful.cancelled() => break 'connection,
                    _ = closed(&client) => {
                        tracing::warn!(addr = client.addr(), "connection to the daemon lost; reconnecting");
                        connection_lost.cancel();
                        inner.connect.move_past(client.addr());
                        continue 'connection;
                    }
                };
                let mut permits = first;
                let extra = held.available_permits().min(MAX_LEASE_BATCH.saturating_sub(1));
                if extra > 0 {
                    if let Ok(more) = held.clone().try_acquire_many_owned(extra as u32) {
                        permits.merge(more);
                    }
                }
                let request = Lease {
                    queues: inner.queues.clone(),
                    max: permits.num_permits() as u32,
                    wait_ms: duration_ms(inner.poll_wait),
                    lease_ms: inner.lease_timeout.map(duration_ms),
                };
                let leasing = client.clone();
                let mut reply = Box::pin(async move { leasing.lease(&request).await });
                let result = tokio::select! {
                    result = &mut reply => result,
                    _ = graceful.cancelled() => {
                        // Do not abandon the request: the daemon may be handing us tasks right now.
                        let releasing = client.clone();
                        draining = Some(AbortOnDrop(tokio::spawn(async move {
                            if let Ok(tasks) = reply.await {
                                for task in tasks {
                                    release(&releasing, &task).await;
                                }
                            }
                        })));
                        break 'connection;
                    }
                };
                match result {
                    Ok(tasks) => {
                        backoff.reset();
                        for task in tasks {
                            let Some(permit) = permits.split(1) else {
                                // Cannot happen (the daemon returns at most `max`), but never run unbounded.
                                release(&client, &task).await;
                                continue;
                            };
                            running.spawn(run_task(
                                inner.clone(),
                                client.clone(),
                                task,
                                Permits { _held: permit, slots: slots.clone() },
                                Stops {
                                    connection_lost: connection_lost.clone(),
                                    stopping: graceful.clone(),
                                    grace_over: grace_over.clone(),
                                },
                            ));
                        }
                    }
                    Err(e) if e.is(ErrorCode::BadRequest) => {
                        tracing::error!(error = %e, "the daemon refused the lease request; stopping");
                        fatal = Some(e);
                        break 'connection;
                    }
                    Err(e) if e.kind() == ErrorKind::Closed || e.is(ErrorCode::ShuttingDown) || client.is_closed() => {
                        tracing::warn!(addr = client.addr(), error = %e, "connection to the daemon lost; reconnecting");
                        connection_lost.cancel();
                        inner.connect.move_past(client.addr());
                        continue 'connection;
                    }
                    Err(e) if e.is(ErrorCode::StoreUnavailable) && inner.connect.addrs().len() > 1 => {
                        // Another daemon of the list may reach the store: leave this one as if its connection
                        // broke (the leases it holds go back with it), and reconnect after the backoff.
                        tracing::warn!(addr = client.addr(), error = %e, "the daemon cannot reach its store; trying the next address");
                        connection_lost.cancel();
                        inner.connect.move_past(client.addr());
                        continue 'connection;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, ?delay, "lease failed; retrying");
                        drop(permits);
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = graceful.cancelled() => break 'connection,
                        }
                    }
                }
            }
        }

        // Graceful shutdown: no more leases; let running tasks finish within the grace period.
        while running.try_join_next().is_some() {}
        let in_flight = running.len();
        if in_flight > 0 {
            tracing::info!(in_flight, grace = ?inner.grace_period, "stopping: waiting for running tasks");
        }
        let finished =
            tokio::time::timeout(inner.grace_period, async { while running.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(still_running = running.len(), "grace period over: aborting and releasing the rest");
            grace_over.cancel();
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, async { while running.join_next().await.is_some() {} }).await;
        }
        if let Some(mut draining) = draining {
            let _ = tokio::time::timeout(inner.poll_wait + RELEASE_TIMEOUT, &mut draining.0).await;
        }
        tracing::info!("worker stopped");
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Connects, retrying with backoff until it works or a shutdown starts.
async fn connect(options: &ConnectOptions, graceful: &CancellationToken, backoff: &mut Backoff) -> Option<Client> {
    loop {
        let attempt = tokio::select! {
            attempt = options.clone().connect() => attempt,
            _ = graceful.cancelled() => return None,
        };
        match attempt {
            Ok(client) => {
                tracing::info!(addr = client.addr(), server = %client.server().server, "connected");
                return Some(client);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(addr = options.addr(), error = %e, ?delay, "cannot connect; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = graceful.cancelled() => return None,
                }
            }
        }
    }
}

/// Resolves once `client`'s connection has closed.
async fn closed(client: &Client) {
    while !client.is_closed() {
        tokio::time::sleep(CONNECTION_CHECK).await;
    }
}

/// Gives a task back unrun (the attempt does not count). Failures are logged: the lease ends on its own anyway.
async fn release(client: &Client, task: &LeasedTask) {
    match client.release(&task.id, task.lease_id).await {
        Ok(()) => tracing::debug!(task = %task.id, "released"),
        Err(e) => tracing::debug!(task = %task.id, error = %e, "release failed; the lease will end on its own"),
    }
}

/// Aborts a tokio task when dropped, so a handler never outlives the task runner that owns it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a handler's run ended, as far as the runtime is concerned.
enum Outcome {
    Finished(Result<crate::proto::Value, TaskFailure>),
    Panicked(String),
    Revoked,
    TimedOut(Duration),
}

/// A leased task's room in the worker: its place among the leases held, and the slots it runs in.
struct Permits {
    /// Held from the lease until the handler returns (dropped with the struct).
    _held: OwnedSemaphorePermit,
    slots: Arc<Semaphore>,
}

/// What stops a task early.
struct Stops {
    /// The connection its lease belongs to is gone.
    connection_lost: CancellationToken,
    /// A graceful shutdown started: a task still waiting for a slot is released unrun.
    stopping: CancellationToken,
    /// The grace period is over: a running task is aborted and released.
    grace_over: CancellationToken,
}

/// Runs one leased task from decoding to ack or fail: it waits for a slot (if prefetched), runs, frees the slot,
/// then reports the outcome.
async fn run_task(inner: Arc<Inner>, client: Client, leased: LeasedTask, permits: Permits, stops: Stops) {
    let Some(handler) = inner.handlers.get(&leased.task).cloned() else {
        drop(permits);
        let failure = TaskFailure::new(UNKNOWN_TASK, format!("unknown task {}", leased.task));
        tracing::warn!(task = %leased.id, name = %leased.task, "no handler registered for this task name");
        report_failure(&client, &leased, &failure).await;
        return;
    };
    let every = Duration::from_millis(leased.lease_ms / 3).max(MIN_HEARTBEAT);
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Stops { connection_lost, stopping, grace_over } = stops;
    // Prefetched: wait for a slot, keeping the lease alive. One acquire for the whole wait, so the task keeps its
    // place in the semaphore's queue across heartbeats.
    let acquire = permits.slots.clone().acquire_owned();
    tokio::pin!(acquire);
    let slot = loop {
        tokio::select! {
            biased;
            _ = stopping.cancelled() => {
                drop(permits);
                release(&client, &leased).await;
                return;
            }
            _ = connection_lost.cancelled() => return,
            permit = &mut acquire => break permit.expect("the semaphore is never closed"),
            _ = heartbeat.tick() => match client.extend(&leased.id, leased.lease_id, None).await {
                Ok(extended) if extended.revoked => {
                    drop(permits);
                    tracing::info!(task = %leased.id, "revoked while waiting for a slot");
                    let failure = TaskFailure::new("Revoked", "revoked before it ran").no_retry();
                    report_failure(&client, &leased, &failure).await;
                    return;
                }
                Ok(_) => {}
                Err(e) if e.is(ErrorCode::LeaseLost) || e.kind() == ErrorKind::Closed => {
                    tracing::warn!(task = %leased.id, error = %e, "lease lost while waiting for a slot");
                    return;
                }
                Err(e) => tracing::warn!(task = %leased.id, error = %e, "heartbeat failed; will retry"),
            },
        }
    };
    // The handler is called (its synchronous part runs) only once the task has a slot.
    let run = match handler.prepare(&leased) {
        Ok(run) => run,
        Err(failure) => {
            drop(slot);
            drop(permits);
            tracing::warn!(task = %leased.id, name = %leased.task, error = %failure, "bad arguments");
            report_failure(&client, &leased, &failure).await;
            return;
        }
    };
    tracing::debug!(task = %leased.id, name = %leased.task, attempt = leased.attempt, "running");
    let reporter = Reporter { client: client.clone(), task_id: leased.id.clone(), lease_id: leased.lease_id };
    let mut handle = AbortOnDrop(tokio::spawn(REPORTER.scope(reporter, with_context(leased.context.clone(), run))));
    let limit = inner.time_limits.get(&leased.task).copied().or(inner.default_time_limit);
    let deadline = tokio::time::sleep(limit.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            _ = &mut deadline, if limit.is_some() => {
                handle.0.abort();
                break Outcome::TimedOut(limit.expect("checked"));
            },
            joined = &mut handle.0 => break match joined {
                Ok(result) => Outcome::Finished(result),
                Err(e) if e.is_panic() => Outcome::Panicked(panic_message(e.into_panic())),
                Err(_) => Outcome::Panicked("the handler was cancelled".to_string()),
            },
            _ = heartbeat.tick() => match client.extend(&leased.id, leased.lease_id, None).await {
                Ok(extended) if extended.revoked => {
                    handle.0.abort();
                    break Outcome::Revoked;
                }
                Ok(_) => {}
                Err(e) if e.is(ErrorCode::LeaseLost) || e.kind() == ErrorKind::Closed => {
                    // The daemon has already returned the task to its queue: stop, report nothing.
                    tracing::warn!(task = %leased.id, error = %e, "lease lost while running; abandoning the task");
                    return;
                }
                Err(e) => tracing::warn!(task = %leased.id, error = %e, "heartbeat failed; will retry"),
            },
            _ = connection_lost.cancelled() => {
                tracing::warn!(task = %leased.id, "connection lost while running; abandoning the task");
                return;
            }
            _ = grace_over.cancelled() => {
                handle.0.abort();
                release(&client, &leased).await;
                return;
            }
        }
    };
    // The slot is free for the next task while the outcome goes out.
    drop(slot);
    drop(permits);
    match outcome {
        Outcome::Finished(Ok(result)) => match client.ack(&leased.id, leased.lease_id, result).await {
            Ok(()) => tracing::debug!(task = %leased.id, "acked"),
            Err(e) if e.is(ErrorCode::Revoked) => {
                tracing::info!(task = %leased.id, "revoked while running; result discarded")
            }
            Err(e) if e.kind() == ErrorKind::Encode => {
                // The result itself cannot be sent (too large, too deeply nested): running again would not help.
                let failure = TaskFailure::new("ResultNotStorable", e.to_string()).no_retry();
                report_failure(&client, &leased, &failure).await;
            }
            Err(e) => tracing::warn!(task = %leased.id, error = %e, "ack refused; the task will run again"),
        },
        Outcome::Finished(Err(failure)) => report_failure(&client, &leased, &failure).await,
        Outcome::Panicked(message) => {
            tracing::warn!(task = %leased.id, name = %leased.task, %message, "handler panicked");
            report_failure(&client, &leased, &TaskFailure::new(PANIC, message)).await;
        }
        Outcome::Revoked => {
            tracing::info!(task = %leased.id, "revoked while running; handler aborted");
            let failure = TaskFailure::new("Revoked", "revoked while running").no_retry();
            report_failure(&client, &leased, &failure).await;
        }
        Outcome::TimedOut(limit) => {
            tracing::warn!(task = %leased.id, name = %leased.task, ?limit, "time limit exceeded; handler stopped");
            let message = format!("task {} ran past its time limit of {limit:?}", leased.task);
            report_failure(&client, &leased, &TaskFailure::new(TIME_LIMIT_EXCEEDED, message).no_retry()).await;
        }
    }
}

/// The `type` of the failure of a task stopped by its time limit.
pub const TIME_LIMIT_EXCEEDED: &str = "TimeLimitExceeded";

/// What a running handler reports its progress through ([`progress`]).
#[derive(Clone)]
struct Reporter {
    client: Client,
    task_id: String,
    lease_id: u64,
}

tokio::task_local! {
    static REPORTER: Reporter;
}

/// Reports the running task's progress, as Celery's `self.update_state(state="PROGRESS", meta={...})`: `get`
/// shows `state` and `meta` (`TaskInfo::progress`) until the next report. Call it from inside a handler (the
/// future the worker runs, not a task it spawns). Returns whether the task was revoked meanwhile: the handler
/// should then stop.
pub async fn progress<M: Serialize>(state: &str, meta: &M) -> Result<bool, Error> {
    let reporter = REPORTER
        .try_with(Reporter::clone)
        .map_err(|_| Error::new(ErrorKind::Encode, "progress() is called from inside a running task's handler"))?;
    let meta = to_value(meta)?;
    reporter.client.progress(&reporter.task_id, reporter.lease_id, state, meta).await
}

/// Sends `fail` for a task and logs what the daemon decided.
async fn report_failure(client: &Client, leased: &LeasedTask, failure: &TaskFailure) {
    let request = Fail {
        task_id: leased.id.clone(),
        lease_id: leased.lease_id,
        error: failure.to_task_error(),
        retry: failure.is_retryable(),
        countdown_ms: failure.retry_countdown().map(duration_ms),
    };
    match client.fail(&request).await {
        Ok(failed) if failed.state == TaskState::Retry => {
            tracing::info!(task = %leased.id, error = %failure, retry_at_ms = ?failed.retry_at_ms, "failed; will retry")
        }
        Ok(_) => tracing::warn!(task = %leased.id, error = %failure, "failed for good"),
        Err(e) if e.is(ErrorCode::Revoked) => tracing::info!(task = %leased.id, "revoked"),
        Err(e) => tracing::warn!(task = %leased.id, error = %e, "fail refused; the task will run again"),
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the handler panicked with a non-string payload".to_string()
    }
}

/// Exponential backoff with jitter, for reconnects and failed leases.
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            ^ u64::from(std::process::id()).rotate_left(32);
        Backoff { min, max, current: min, seed: seed | 1 }
    }

    /// The next delay: the current step, jittered to between half and all of it, and the step doubles.
    fn next_delay(&mut self) -> Duration {
        // xorshift64: good enough to spread a fleet of workers reconnecting at once.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let delay = self.current.mul_f64(fraction);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere), each delivery received once.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, Error> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind| {
                signal(kind).map_err(|e| Error::new(ErrorKind::Connect, format!("cannot install signal handler: {e}")))
            };
            Ok(Signals { interrupt: install(SignalKind::interrupt())?, terminate: install(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
