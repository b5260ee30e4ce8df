//! The producer side of task context: a scope whose values are attached to every task enqueued inside it, and the
//! [`Producer`] / [`TaskBuilder`] that attach them.
//!
//! A web app sets the scope once per request (in a middleware: path, method, chosen headers, the current user)
//! and every task its handlers enqueue carries those values; the worker hands them to the task's handler as
//! [`Task::context`](super::Task::context). The worker also runs each handler inside a scope holding the task's own
//! context, so a task that enqueues follow-up tasks passes its context on.
//!
//! The scope is a `tokio::task_local!`: it covers the future given to [`with_context`] and everything that future
//! awaits, but not tasks it `tokio::spawn`s (wrap those in `with_context(current_context(), ...)`).
//!
//! Precedence, lowest first: outer scopes, inner scopes, then values given to the builder ([`TaskBuilder::context`])
//! or already present in a [`TaskSpec`]'s `context`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::task::Context;
use crate::client::{duration_ms, Client, ConnectOptions};
use crate::error::{Error, ErrorKind};
use crate::proto::{Enqueued, EnqueuedChord, ScheduleAdd, ScheduleInfo, TaskInfo, TaskSpec, Value};

tokio::task_local! {
    static SCOPE: Arc<Context>;
}

/// Runs `future` with `context` added to the current scope: every task enqueued through a [`Producer`] while it
/// runs carries these values (inner scopes override outer ones key by key).
pub async fn with_context<F: Future>(context: Context, future: F) -> F::Output {
    let merged = match SCOPE.try_with(|outer| (**outer).clone()) {
        Ok(mut outer) => {
            outer.extend(context);
            outer
        }
        Err(_) => context,
    };
    SCOPE.scope(Arc::new(merged), future).await
}

/// The context of the current scope (empty outside any [`with_context`]).
pub fn current_context() -> Context {
    SCOPE.try_with(|c| (**c).clone()).unwrap_or_default()
}

/// Adds the current scope's values to `spec.context`, keeping the values the spec already has.
pub fn apply_scope(spec: &mut TaskSpec) {
    // Ignoring the error is right: outside any scope there is nothing to add.
    let _ = SCOPE.try_with(|scope| {
        for (key, value) in scope.iter() {
            spec.context.entry(key.clone()).or_insert_with(|| value.clone());
        }
    });
}

/// Encodes any serializable value as a MessagePack [`Value`].
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, Error> {
    rmpv::ext::to_value(value).map_err(|e| Error::new(ErrorKind::Encode, format!("cannot encode value: {e}")))
}

/// The producer's handle: a [`Client`] that attaches the current scope's context to everything it enqueues, and
/// builds tasks from typed arguments. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), broker_client::Error> {
/// use broker_client::{ConnectOptions, Producer};
/// let producer = Producer::connect(ConnectOptions::from_env()).await?;
/// let id = producer.task("add").args((2, 3)).max_retries(5).enqueue().await?.id;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    client: Client,
    default_queue: Option<String>,
}

impl Producer {
    /// A producer over an existing connection.
    pub fn new(client: Client) -> Self {
        Producer { client, default_queue: None }
    }

    /// Connects and returns a producer.
    pub async fn connect(options: ConnectOptions) -> Result<Self, Error> {
        Ok(Producer::new(options.connect().await?))
    }

    /// The queue used by tasks that name none (default: the daemon's `"default"`).
    pub fn default_queue(mut self, queue: impl Into<String>) -> Self {
        self.default_queue = Some(queue.into());
        self
    }

    /// The underlying connection, for `get`, `wait`, `revoke`, `stats` and the rest.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Starts building a task named `name`.
    pub fn task(&self, name: impl Into<String>) -> TaskBuilder {
        TaskBuilder { producer: self.clone(), spec: TaskSpec::new(name), error: None }
    }

    /// Enqueues `spec` with the current scope's context added (the spec's own context values win).
    pub async fn enqueue(&self, mut spec: TaskSpec) -> Result<Enqueued, Error> {
        self.prepare(&mut spec);
        self.client.enqueue(spec).await
    }

    /// Enqueues many tasks with one durable write, each with the current scope's context added.
    pub async fn enqueue_batch(&self, mut specs: Vec<TaskSpec>) -> Result<Vec<Enqueued>, Error> {
        for spec in &mut specs {
            self.prepare(spec);
        }
        self.client.enqueue_batch(specs).await
    }

    /// A group: every task enqueued with one durable write, to run in parallel (Celery's `group`). Returns their
    /// ids in order.
    pub async fn group(&self, tasks: Vec<TaskBuilder>) -> Result<Vec<Enqueued>, Error> {
        let specs = tasks.into_iter().map(TaskBuilder::spec).collect::<Result<Vec<_>, _>>()?;
        self.client.enqueue_batch(specs).await
    }

    /// A chord: `header` runs in parallel, and `callback` runs once after every member succeeded, with the array
    /// of their results (in order) as its first argument, unless it is [`TaskBuilder::immutable`]. If a member
    /// fails for good, the callback fails with `ChordError` (proto.md, `enqueue_chord`).
    pub async fn chord(&self, header: Vec<TaskBuilder>, callback: TaskBuilder) -> Result<EnqueuedChord, Error> {
        let header = header.into_iter().map(TaskBuilder::spec).collect::<Result<Vec<_>, _>>()?;
        self.client.enqueue_chord(header, callback.spec()?).await
    }

    /// A periodic schedule that enqueues `task` at each tick, kept by the daemon (proto.md, `schedule_add`):
    /// `producer.schedule("nightly", producer.task("cleanup")).cron("30 2 * * *").timezone("Europe/Paris").add()`.
    pub fn schedule(&self, name: impl Into<String>, task: TaskBuilder) -> ScheduleBuilder {
        let request = ScheduleAdd { name: name.into(), ..ScheduleAdd::default() };
        ScheduleBuilder { producer: self.clone(), request, task }
    }

    fn prepare(&self, spec: &mut TaskSpec) {
        apply_scope(spec);
        if spec.queue.is_none() {
            spec.queue.clone_from(&self.default_queue);
        }
    }
}

/// A task being built: typed arguments, context, and the scheduling and retry options of [`TaskSpec`], all with
/// the daemon's defaults unless set. Errors in encoding an argument are reported by [`TaskBuilder::enqueue`].
#[derive(Debug)]
#[must_use = "a task builder does nothing until `.enqueue()` is awaited"]
pub struct TaskBuilder {
    producer: Producer,
    spec: TaskSpec,
    error: Option<Error>,
}

impl TaskBuilder {
    fn record<T>(&mut self, result: Result<T, Error>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    /// The positional arguments: anything that serializes as a sequence (a tuple, a `Vec`, an array).
    pub fn args<A: Serialize>(mut self, args: A) -> Self {
        let encoded = to_value(&args).and_then(|v| match v {
            Value::Array(items) => Ok(items),
            Value::Nil => Ok(Vec::new()),
            other => Err(Error::new(ErrorKind::Encode, format!("args must encode as an array, not {other}"))),
        });
        if let Some(items) = self.record(encoded) {
            self.spec.args = items;
        }
        self
    }

    /// The keyword arguments: anything that serializes as a map with string keys (a struct, a map).
    pub fn kwargs<K: Serialize>(mut self, kwargs: K) -> Self {
        let encoded = to_value(&kwargs).and_then(|v| match v {
            Value::Map(entries) => entries
                .into_iter()
                .map(|(k, v)| match k {
                    Value::String(s) if s.as_str().is_some() => Ok((s.into_str().unwrap_or_default(), v)),
                    other => Err(Error::new(ErrorKind::Encode, format!("kwargs keys must be strings, not {other}"))),
                })
                .collect::<Result<Vec<_>, _>>(),
            other => Err(Error::new(ErrorKind::Encode, format!("kwargs must encode as a map, not {other}"))),
        });
        if let Some(entries) = self.record(encoded) {
            self.spec.kwargs.extend(entries);
        }
        self
    }

    /// One keyword argument.
    pub fn kwarg<V: Serialize>(mut self, key: impl Into<String>, value: V) -> Self {
        if let Some(value) = self.record(to_value(&value)) {
            self.spec.kwargs.insert(key.into(), value);
        }
        self
    }

    /// One context value; it overrides the scope's value for the same key.
    pub fn context<V: Serialize>(mut self, key: impl Into<String>, value: V) -> Self {
        if let Some(value) = self.record(to_value(&value)) {
            self.spec.context.insert(key.into(), value);
        }
        self
    }

    /// The W3C trace context of the caller's current span (its `traceparent` header value, and `tracestate` if
    /// any), carried in the context under `"trace"` as the Python client does, so that the worker (in any
    /// language) continues the trace. Pass what your tracing layer (e.g. OpenTelemetry's propagator) produced.
    pub fn traceparent(self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        let mut carrier = vec![(Value::from("traceparent"), Value::from(traceparent.into()))];
        if let Some(state) = tracestate {
            carrier.push((Value::from("tracestate"), Value::from(state)));
        }
        self.context("trace", Value::Map(carrier))
    }

    /// Context values; they override the scope's values for the same keys.
    pub fn context_map(mut self, context: Context) -> Self {
        self.spec.context.extend(context);
        self
    }

    /// The task's id (default: assigned by the daemon). Enqueuing an id that exists returns the existing task.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.spec.id = Some(id.into());
        self
    }

    /// The queue (default: the producer's default queue, else `"default"`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.spec.queue = Some(queue.into());
        self
    }

    /// Higher runs first (default 0).
    pub fn priority(mut self, priority: i32) -> Self {
        self.spec.priority = priority;
        self
    }

    /// Run no earlier than `delay` from now.
    pub fn countdown(mut self, delay: Duration) -> Self {
        self.spec.countdown_ms = Some(duration_ms(delay));
        self.spec.eta_ms = None;
        self
    }

    /// Run no earlier than `at`.
    pub fn eta(mut self, at: SystemTime) -> Self {
        self.spec.eta_ms = Some(at.duration_since(UNIX_EPOCH).map(duration_ms).unwrap_or(0));
        self.spec.countdown_ms = None;
        self
    }

    /// How many times a failure is retried (daemon default 3).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.spec.max_retries = Some(retries);
        self
    }

    /// The delay before the first retry (daemon default 1 s), doubled on each retry unless backoff is off.
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.spec.retry_delay_ms = Some(duration_ms(delay));
        self
    }

    /// Whether the retry delay doubles on each retry (default true).
    pub fn retry_backoff(mut self, backoff: bool) -> Self {
        self.spec.retry_backoff = Some(backoff);
        self
    }

    /// How long a lease on this task lasts before it returns to the queue (default: the daemon's setting).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.spec.lease_ms = Some(duration_ms(lease));
        self
    }

    /// Drop the task if it has not started within `ttl` of the enqueue.
    pub fn expires_in(mut self, ttl: Duration) -> Self {
        self.spec.expires_in_ms = Some(duration_ms(ttl));
        self.spec.expires_at_ms = None;
        self
    }

    /// How long the result is kept once the task finishes.
    pub fn result_ttl(mut self, ttl: Duration) -> Self {
        self.spec.result_ttl_ms = Some(duration_ms(ttl));
        self
    }

    /// Runs `next` after this task (a chain, Celery's `a.s() | b.s()`): when this task succeeds, `next` is
    /// enqueued with this task's result as its first argument (unless `next` is [`TaskBuilder::immutable`]),
    /// then its own `then`s. If this task fails for good, the rest of the chain fails with its error.
    pub fn then(mut self, next: TaskBuilder) -> Self {
        match next.spec() {
            Ok(mut link) => {
                // The chain is one list on its first task: the daemon takes one link at a time.
                let rest = std::mem::take(&mut link.chain);
                self.spec.chain.push(link);
                self.spec.chain.extend(rest);
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// As a chain's link or a chord's callback: do not receive the previous result (Celery's `.si()`).
    pub fn immutable(mut self) -> Self {
        self.spec.immutable = true;
        self
    }

    /// The spec as it would be sent now: the builder's values plus the current scope's context.
    pub fn spec(self) -> Result<TaskSpec, Error> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut spec = self.spec;
        self.producer.prepare(&mut spec);
        Ok(spec)
    }

    /// Enqueues the task; returns once it is durable under the daemon's fsync policy.
    pub async fn enqueue(self) -> Result<Enqueued, Error> {
        let producer = self.producer.clone();
        let spec = self.spec()?;
        producer.client.enqueue(spec).await
    }

    /// Enqueues the task and waits up to `timeout` for it to finish; returns the task as it is then.
    pub async fn enqueue_and_wait(self, timeout: Duration) -> Result<TaskInfo, Error> {
        let producer = self.producer.clone();
        let id = self.enqueue().await?.id;
        producer.client.wait(&id, timeout).await
    }
}

/// A periodic schedule being built ([`Producer::schedule`]).
#[derive(Debug)]
#[must_use = "a schedule builder does nothing until `.add()` is awaited"]
pub struct ScheduleBuilder {
    producer: Producer,
    request: ScheduleAdd,
    task: TaskBuilder,
}

impl ScheduleBuilder {
    /// Ticks by a cron expression: five fields (minute hour day-of-month month day-of-week) or six with seconds.
    pub fn cron(mut self, expression: impl Into<String>) -> Self {
        self.request.cron = Some(expression.into());
        self
    }

    /// The IANA time zone the cron expression is read in (default UTC).
    pub fn timezone(mut self, zone: impl Into<String>) -> Self {
        self.request.timezone = Some(zone.into());
        self
    }

    /// Or: a tick every `period` (at least a second).
    pub fn every(mut self, period: Duration) -> Self {
        self.request.every_ms = Some(duration_ms(period));
        self
    }

    /// Ticks missed while the daemon was down are skipped (by default the latest of them fires once).
    pub fn skip_missed(mut self) -> Self {
        self.request.catch_up = Some("skip".into());
        self
    }

    /// Adds the schedule (or changes the one of that name; the same definition again changes nothing).
    pub async fn add(mut self) -> Result<ScheduleInfo, Error> {
        self.request.task = self.task.spec()?;
        self.producer.client.schedule_add(&self.request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect()
    }

    #[tokio::test]
    async fn scopes_nest_and_specs_win() {
        assert!(current_context().is_empty());
        let seen = with_context(ctx(&[("a", "outer"), ("b", "outer")]), async {
            with_context(ctx(&[("b", "inner")]), async {
                let mut spec = TaskSpec::new("t");
                spec.context.insert("a".into(), Value::from("spec"));
                apply_scope(&mut spec);
                spec.context
            })
            .await
        })
        .await;
        assert_eq!(seen, ctx(&[("a", "spec"), ("b", "inner")]));
        assert!(current_context().is_empty());
    }
}
