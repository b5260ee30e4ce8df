//! The `TaskStore` seam: the broker's operations, whatever keeps the tasks.
//!
//! [`cmd`](crate::cmd) turns a request into one call of this trait. Two stores implement it:
//! - [`Store`], the single node's (memory, the write-ahead log and sled). Its calls finish at once
//!   ([`Op::Now`]): the reply then waits for the log round that makes the change durable, as before the seam.
//! - [`PgStore`](crate::store::pg::PgStore), many stateless daemons over one PostgreSQL. Its calls are
//!   statements ([`Op::Later`]): the reply goes out when the transaction committed (on the primary and, with
//!   synchronous standbys, on one of them).
//!
//! Every op of the protocol goes through it, and so does every page and form of the dashboard (and `/metrics`):
//! both are served over either store.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::collections::BTreeMap;

use broker_client::proto::{
    DeadRequeue, Enqueued, Fail, LimitInfo, Progress, ScheduleInfo, TaskInfo, TaskState, Totals, Value,
};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::store::control::Limit;
use crate::store::flow::Scope;
use crate::store::schedule::NewSchedule;
use crate::store::{ConnId, FailOutcome, Grant, NewTask, Running, Store, StoreError, StoreStats, TaskEvent};

/// A store call that finishes later (a statement on a shared store).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// What a store call gives: its outcome now, or a future of it.
pub enum Op<T> {
    /// Done (the single node: in memory; durable with the log round the reply waits for).
    Now(Result<T, StoreError>),
    /// Done when the future is (the shared store: committed when it resolves).
    Later(StoreFuture<T>),
}

impl<T: Send + 'static> Op<T> {
    /// The outcome, waiting for it if it is not there yet.
    pub async fn resolve(self) -> Result<T, StoreError> {
        match self {
            Op::Now(result) => result,
            Op::Later(future) => future.await,
        }
    }

    /// Maps the value, now or once it is there.
    pub fn map<U: Send + 'static>(self, f: impl FnOnce(T) -> U + Send + 'static) -> Op<U> {
        match self {
            Op::Now(result) => Op::Now(result.map(f)),
            Op::Later(future) => Op::Later(Box::pin(async move { future.await.map(f) })),
        }
    }

    /// Follows the value with a step that may fail, now or once it is there.
    pub fn and_then<U: Send + 'static>(self, f: impl FnOnce(T) -> Result<U, StoreError> + Send + 'static) -> Op<U> {
        match self {
            Op::Now(result) => Op::Now(result.and_then(f)),
            Op::Later(future) => Op::Later(Box::pin(async move { future.await.and_then(f) })),
        }
    }
}

/// The broker's operations on tasks (proto.md §7), as the daemon's request handling calls them.
///
/// A call takes its place when it is made, not when its [`Op::Later`] future is first polled: calls made one
/// after another take effect in that order, whenever their futures complete. That is how a connection's
/// requests take effect in the order it sent them (proto.md §4) while many are in flight.
pub trait TaskStore: Send + Sync + 'static {
    /// Stores new tasks (or finds existing ones by id); all are validated before any is stored.
    fn enqueue(&self, specs: Vec<NewTask>) -> Op<Vec<Enqueued>>;
    /// Stores a chord: its members, and its callback waiting for them (proto.md, `enqueue_chord`).
    fn enqueue_chord(&self, header: Vec<NewTask>, callback: NewTask) -> Op<(Vec<Enqueued>, Enqueued)>;
    /// Leases up to `max` ready tasks from `queues`, in queue order, for connection `conn`; and whether the
    /// reply must wait for a flush (the single node: a task not on disk yet).
    fn lease(&self, conn: ConnId, queues: &[String], max: usize, lease_ms: Option<u64>) -> Op<(Vec<Grant>, bool)>;
    /// Completes a leased task with its result.
    fn ack(&self, id: &str, lease_id: u64, result: Value) -> Op<()>;
    /// Fails a leased task: it retries while retries are left and `retry`, else dies.
    fn fail(&self, request: Fail) -> Op<FailOutcome>;
    /// Pushes a lease's deadline; says whether the task was revoked.
    fn extend(&self, id: &str, lease_id: u64, lease_ms: Option<u64>) -> Op<(u64, bool)>;
    /// Stores a running task's progress report; says whether the task was revoked.
    fn progress(&self, id: &str, lease_id: u64, progress: Progress) -> Op<bool>;
    /// Gives a leased task back unrun.
    fn release(&self, id: &str, lease_id: u64) -> Op<()>;
    /// Ends every lease a closed connection held; how many.
    fn release_connection(&self, conn: ConnId, shutting_down: bool) -> Op<usize>;
    /// Whether the connection holds leases now.
    fn holds_leases(&self, conn: ConnId) -> bool;
    /// A task's state and its `TaskInfo`, encoded.
    fn get_encoded(&self, id: &str) -> Op<(TaskState, Vec<u8>)>;
    /// A task's `TaskInfo` (the dashboard's task page): [`TaskStore::get_encoded`], decoded.
    fn get_info(&self, id: &str) -> Op<TaskInfo> {
        let id = id.to_string();
        self.get_encoded(&id).and_then(move |(_, bytes)| {
            rmp_serde::from_slice(&bytes).map_err(|e| StoreError::Corrupt { id, message: e.to_string() })
        })
    }
    /// Whether the task is in the dead set: `FAILURE` after running (not a task failed by the one it depended
    /// on, which `dead_requeue` skips).
    fn in_dead_set(&self, id: &str) -> Op<bool>;
    /// Deletes a finished task (its result or error) now rather than at its TTL: `NotFound` if there is none,
    /// `Invalid` if it has not finished (revoke it first). A unique key it held is free from then on; a chord
    /// whose callback still waits for it (it succeeded) fails when the other members are done, as when its
    /// result expires first.
    fn delete_finished(&self, id: &str) -> Op<()>;
    /// What each of this daemon's connections runs now (the dashboard's workers): (task id, task name, started
    /// at), oldest first, at most `limit` per connection.
    fn running_by_conn(&self, limit: usize) -> Op<Vec<(ConnId, Vec<Running>)>>;
    /// Revokes a task; its state afterwards.
    fn revoke(&self, id: &str) -> Op<TaskState>;
    /// Deletes every waiting task of `queue`; how many.
    fn purge(&self, queue: &str) -> Op<u64>;
    /// The dead set, oldest first.
    fn dead_list(&self, queue: Option<&str>, limit: usize) -> Op<Vec<TaskInfo>>;
    /// Puts dead tasks back in their queues; how many.
    fn dead_requeue(&self, request: &DeadRequeue) -> Op<u64>;
    /// Counts for `stats`.
    fn stats(&self) -> Op<StoreStats>;
    /// The totals of `stats` alone (counted by this daemon since it started, kept in memory): the dashboard's
    /// graph samples them every 2 s without asking the store to count its queues.
    fn totals(&self) -> Totals;
    /// Rung when tasks may have become ready (waiting leases look again).
    fn ready_notify(&self) -> &Notify;
    /// Rung when tasks may have finished (waiting gets look again).
    fn finished_notify(&self) -> &Notify;
    /// The store's clock (Unix ms).
    fn now_ms(&self) -> u64;
    /// This daemon's metrics (`/metrics`): what happened through it, since it started.
    fn metrics(&self) -> &Metrics;
    /// Task events after `after` (from now when `None`), at most `max`, of `queue` only if given: (events, the
    /// cursor to ask from next, how many were dropped before they could be read). Asking keeps events recorded
    /// for a while (proto.md, `events`).
    fn events(&self, after: Option<u64>, max: usize, queue: Option<&str>, wait_ms: u64) -> (Vec<TaskEvent>, u64, u64);
    /// Rung when an event is recorded.
    fn events_notify(&self) -> &Notify;
    /// Done once the events of this daemon's changes answered so far can be read (`events` reads its own
    /// writes); `None` when they can be now (the single node records them as they happen).
    fn events_settled(&self) -> Option<StoreFuture<()>> {
        None
    }
    /// What `stats` shows as the durability policy.
    fn durability(&self) -> String;
    /// Pauses or resumes a queue; whether it was paused. (The single node's syncs its control file: the daemon
    /// calls it off the runtime's threads.)
    fn set_paused(&self, queue: &str, paused: bool) -> Op<bool>;
    /// Sets, or with neither a rate nor a concurrency removes, the limit on a task name or a queue (same caveat).
    fn set_limit(&self, scope: Scope, name: &str, limit: Limit) -> Op<()>;
    /// The limits set, with how many tasks each covers run now.
    fn limits(&self) -> Op<Vec<LimitInfo>>;
    /// Adds a schedule, or changes the one of that name (the same definition again changes nothing; a different
    /// one takes effect from now on). (The single node's syncs its control file: see `set_paused`.)
    fn schedule_add(&self, new: NewSchedule) -> Op<ScheduleInfo>;
    /// Removes a schedule; whether there was one (same caveat).
    fn schedule_remove(&self, name: &str) -> Op<bool>;
    /// Pauses or resumes a schedule; ticks that fall while it is paused never fire (same caveat).
    fn schedule_set_paused(&self, name: &str, paused: bool) -> Op<ScheduleInfo>;
    /// Every schedule, by name.
    fn schedules(&self) -> Op<Vec<ScheduleInfo>>;
}

impl TaskStore for Store {
    fn enqueue(&self, specs: Vec<NewTask>) -> Op<Vec<Enqueued>> {
        Op::Now(Store::enqueue(self, specs))
    }

    fn enqueue_chord(&self, header: Vec<NewTask>, callback: NewTask) -> Op<(Vec<Enqueued>, Enqueued)> {
        Op::Now(Store::enqueue_chord(self, header, callback))
    }

    fn lease(&self, conn: ConnId, queues: &[String], max: usize, lease_ms: Option<u64>) -> Op<(Vec<Grant>, bool)> {
        Op::Now(Ok(Store::lease(self, conn, queues, max, lease_ms)))
    }

    fn ack(&self, id: &str, lease_id: u64, result: Value) -> Op<()> {
        Op::Now(Store::ack(self, id, lease_id, result))
    }

    fn fail(&self, r: Fail) -> Op<FailOutcome> {
        Op::Now(Store::fail(self, &r.task_id, r.lease_id, r.error, r.retry, r.countdown_ms))
    }

    fn extend(&self, id: &str, lease_id: u64, lease_ms: Option<u64>) -> Op<(u64, bool)> {
        Op::Now(Store::extend(self, id, lease_id, lease_ms))
    }

    fn progress(&self, id: &str, lease_id: u64, progress: Progress) -> Op<bool> {
        Op::Now(Store::progress(self, id, lease_id, progress))
    }

    fn release(&self, id: &str, lease_id: u64) -> Op<()> {
        Op::Now(Store::release(self, id, lease_id))
    }

    fn release_connection(&self, conn: ConnId, shutting_down: bool) -> Op<usize> {
        Op::Now(Ok(Store::release_connection(self, conn, shutting_down)))
    }

    fn holds_leases(&self, conn: ConnId) -> bool {
        Store::holds_leases(self, conn)
    }

    fn get_encoded(&self, id: &str) -> Op<(TaskState, Vec<u8>)> {
        Op::Now(Store::get_encoded(self, id))
    }

    fn in_dead_set(&self, id: &str) -> Op<bool> {
        Op::Now(Ok(Store::in_dead_set(self, id)))
    }

    fn delete_finished(&self, id: &str) -> Op<()> {
        Op::Now(Store::delete_finished(self, id))
    }

    fn running_by_conn(&self, limit: usize) -> Op<Vec<(ConnId, Vec<Running>)>> {
        Op::Now(Ok(Store::running_by_conn(self, limit)))
    }

    fn revoke(&self, id: &str) -> Op<TaskState> {
        Op::Now(Store::revoke(self, id))
    }

    fn purge(&self, queue: &str) -> Op<u64> {
        Op::Now(Ok(Store::purge(self, queue)))
    }

    fn dead_list(&self, queue: Option<&str>, limit: usize) -> Op<Vec<TaskInfo>> {
        Op::Now(Store::dead_list(self, queue, limit))
    }

    fn dead_requeue(&self, request: &DeadRequeue) -> Op<u64> {
        Op::Now(Store::dead_requeue(self, request))
    }

    fn stats(&self) -> Op<StoreStats> {
        Op::Now(Ok(Store::stats(self)))
    }

    fn totals(&self) -> Totals {
        Store::totals(self)
    }

    fn ready_notify(&self) -> &Notify {
        Store::ready_notify(self)
    }

    fn finished_notify(&self) -> &Notify {
        Store::finished_notify(self)
    }

    fn now_ms(&self) -> u64 {
        Store::now_ms(self)
    }

    fn metrics(&self) -> &Metrics {
        Store::metrics(self)
    }

    fn events(&self, after: Option<u64>, max: usize, queue: Option<&str>, wait_ms: u64) -> (Vec<TaskEvent>, u64, u64) {
        Store::events(self, after, max, queue, wait_ms)
    }

    fn events_notify(&self) -> &Notify {
        Store::events_notify(self)
    }

    fn durability(&self) -> String {
        self.fsync_policy().as_str().to_string()
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Op<bool> {
        Op::Now(Store::set_paused(self, queue, paused))
    }

    fn set_limit(&self, scope: Scope, name: &str, limit: Limit) -> Op<()> {
        Op::Now(Store::set_limit(self, scope, name, limit))
    }

    fn limits(&self) -> Op<Vec<LimitInfo>> {
        let (tasks, queues) = Store::limits(self);
        let (running_tasks, running_queues) = self.limited_running();
        let list = |scope: &str, limits: BTreeMap<String, Limit>, running: &BTreeMap<String, u32>| {
            limits
                .into_iter()
                .map(|(name, limit)| LimitInfo {
                    scope: scope.to_string(),
                    running: running.get(&name).copied().unwrap_or(0),
                    name,
                    rate: limit.rate,
                    concurrency: limit.concurrency,
                })
                .collect::<Vec<_>>()
        };
        let mut all = list("task", tasks, &running_tasks);
        all.extend(list("queue", queues, &running_queues));
        Op::Now(Ok(all))
    }

    fn schedule_add(&self, new: NewSchedule) -> Op<ScheduleInfo> {
        Op::Now(self.add_schedule(new))
    }

    fn schedule_remove(&self, name: &str) -> Op<bool> {
        Op::Now(self.remove_schedule(name))
    }

    fn schedule_set_paused(&self, name: &str, paused: bool) -> Op<ScheduleInfo> {
        Op::Now(self.set_schedule_paused(name, paused))
    }

    fn schedules(&self) -> Op<Vec<ScheduleInfo>> {
        Op::Now(Ok(Store::schedules(self)))
    }
}

/// The daemon's store: the single node's, or a shared one.
#[derive(Clone)]
pub enum Engine {
    /// Memory, the write-ahead log and sled, in this process.
    Local(Arc<Store>),
    /// Many daemons over one PostgreSQL.
    Postgres(Arc<crate::store::pg::PgStore>),
}

impl Engine {
    /// The operations.
    pub fn tasks(&self) -> &dyn TaskStore {
        match self {
            Engine::Local(store) => &**store,
            Engine::Postgres(store) => &**store,
        }
    }

    /// The single node's store, if that is what the daemon runs.
    pub fn as_local(&self) -> Option<&Arc<Store>> {
        match self {
            Engine::Local(store) => Some(store),
            Engine::Postgres(_) => None,
        }
    }
}
