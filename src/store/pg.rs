//! The PostgreSQL store: many stateless daemons over one database ([`TaskStore`] over SQL).
//!
//! Every task is one row of `broker_tasks`: the columns an operation reads or changes (state, the lease and its
//! fencing token, attempts, times, result, error) and, in `spec`, the task as it was enqueued (a [`TaskRecord`]
//! encoded as the single node encodes it). Each operation is one statement, or one short transaction, so a reply
//! goes out once its change committed (on the primary and, with synchronous standbys, on one of them).
//!
//! - **Leases** take rows with `FOR UPDATE SKIP LOCKED`, highest priority first, then in enqueue order (`seq`);
//!   each lease gets a new random `lease_id`, which the row holds and which fences stale workers: an `ack`,
//!   `fail`, `extend` or `release` names it and changes nothing if the row holds another.
//! - **Waiting** (`lease` and `get` with `wait_ms`): a daemon listens on the channels `broker_ready` and
//!   `broker_finished`, which the statements that make a task ready or finish it notify in their transaction;
//!   its waiting requests look again when one arrives, whichever daemon made the change.
//! - **Maintenance** (lapsed leases, due retries and countdowns, expired tasks and results) runs on every daemon's
//!   tick as conditional updates: a row one daemon changed no longer matches another's, so nothing is done twice.
//!
//! - **Unique keys** are rows of `broker_unique`, locked while an enqueue claims them.
//! - **Chains and chords**: a link not enqueued yet and a chord's callback are rows in the state `HELD` (in no
//!   queue), stored with the task that leads to them; the ack that makes the next step (or the failure that ends
//!   them) takes it in its own transaction.
//!
//! - **Events and metrics**: what happens to tasks in a transaction is counted in this daemon's `/metrics` once it
//!   commits, and, while some daemon's clients follow `events`, published in it (`broker_events`): every daemon
//!   hears every daemon's events in commit order.
//!
//! - **Schedules** are rows of `broker_schedules`; every daemon's tick fires the due ones, each tick once, its task
//!   enqueued in the transaction that records it ([`schedules`]).
//!
//! - **The dashboard and `/metrics`** read through the same operations: queue counts are the database's; what a
//!   daemon counted (totals, `/metrics` counters) and the workers it shows, with what each runs, are its own.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_client::proto::{
    DeadRequeue, Enqueued, Fail, Progress, QueueStats, ScheduleInfo, TaskError, TaskInfo, TaskSpec, TaskState, Value,
    DEFAULT_QUEUE,
};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls, Row};
use tokio_util::sync::CancellationToken;

use super::control::Limit;
use super::events::{EventRing, TaskEvent};
use super::record::{Extra, TaskRecord};
use super::schedule::NewSchedule;
use super::{
    check_client_ids, expired_error, new_record, ConnId, FailOutcome, Grant, NewTask, Running, Store, StoreError,
};
use super::{StoreOptions, StoreStats};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Op, StoreFuture, TaskStore};
use crate::metrics::{Metrics, Outcome as MetricOutcome, Series, Took};

mod schedules;

/// The schema, one migration per version; applied in order, each once, under an advisory lock (daemons may
/// start together).
const MIGRATIONS: &[&str] = &[
    // 1: tasks.
    "CREATE TABLE broker_tasks (
        id text PRIMARY KEY,
        queue text NOT NULL,
        task text NOT NULL,
        state text NOT NULL,
        priority integer NOT NULL,
        seq bigserial NOT NULL,
        due_ms bigint NOT NULL,
        lease_id bigint,
        deadline_ms bigint,
        lease_ms bigint NOT NULL,
        cur_lease_ms bigint,
        attempts integer NOT NULL DEFAULT 0,
        max_retries bigint NOT NULL,
        lease_losses integer NOT NULL DEFAULT 0,
        created_at_ms bigint NOT NULL,
        eta_ms bigint,
        started_at_ms bigint,
        finished_at_ms bigint,
        expires_at_ms bigint,
        result_ttl_ms bigint NOT NULL,
        result_expires_at_ms bigint,
        revoked boolean NOT NULL DEFAULT false,
        result bytea,
        error bytea,
        progress bytea,
        spec bytea NOT NULL
    );
    CREATE INDEX broker_tasks_waiting ON broker_tasks (queue, priority DESC, seq)
        WHERE state IN ('PENDING', 'SCHEDULED', 'RETRY');
    CREATE INDEX broker_tasks_due ON broker_tasks (due_ms) WHERE state IN ('SCHEDULED', 'RETRY');
    CREATE INDEX broker_tasks_leased ON broker_tasks (deadline_ms) WHERE state = 'STARTED';
    CREATE INDEX broker_tasks_results ON broker_tasks (result_expires_at_ms) WHERE result_expires_at_ms IS NOT NULL;
    CREATE INDEX broker_tasks_dead ON broker_tasks (queue, finished_at_ms) WHERE state = 'FAILURE';
    CREATE INDEX broker_tasks_expiring ON broker_tasks (expires_at_ms)
        WHERE expires_at_ms IS NOT NULL AND state IN ('PENDING', 'SCHEDULED', 'RETRY');",
    // 2: flow control (pause, rate and concurrency limits), as the single node's control file holds it.
    "CREATE TABLE broker_paused (queue text PRIMARY KEY);
    CREATE TABLE broker_limits (
        scope text NOT NULL,
        name text NOT NULL,
        rate text,
        concurrency integer,
        per_ms double precision,
        burst double precision,
        tokens double precision NOT NULL DEFAULT 0,
        refilled_ms bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, name)
    );
    CREATE INDEX broker_tasks_running_task ON broker_tasks (task) WHERE state = 'STARTED';
    CREATE INDEX broker_tasks_running_queue ON broker_tasks (queue) WHERE state = 'STARTED';",
    // 3: unique keys; chains and chords (a link not enqueued yet and a chord's callback are rows in the state
    // 'HELD', in no queue).
    "CREATE TABLE broker_unique (key text PRIMARY KEY, task_id text NOT NULL, until_ms bigint);
    ALTER TABLE broker_tasks ADD COLUMN links text[], ADD COLUMN chord_id text, ADD COLUMN pending integer,
        ADD COLUMN by_parent boolean NOT NULL DEFAULT false;",
    // 4: schedules (`schedule` is the definition; the columns its state: see the `schedules` module).
    "CREATE TABLE broker_schedules (
        name text PRIMARY KEY,
        schedule bytea NOT NULL,
        paused boolean NOT NULL DEFAULT false,
        next_ms bigint,
        last_ms bigint
    );
    CREATE INDEX broker_schedules_due ON broker_schedules (next_ms) WHERE NOT paused;",
];

/// A transaction on a pooled connection whose statements are prepared once per connection: a statement sent
/// as text would cost a round trip to prepare at every use.
pub struct Sql<'a> {
    tx: &'a deadpool_postgres::Transaction<'a>,
    /// What happened to tasks in this transaction: counted in `/metrics` once it commits, and published to the
    /// daemons' `events` (in it, so only if it commits) while someone follows them.
    happened: Mutex<Vec<Happened>>,
    /// Leases taken and ended in this transaction: this daemon's map of its connections' leases follows them
    /// once it commits (and not at all if it rolls back).
    leases: Mutex<Vec<LeaseChange>>,
}

/// A lease taken by a connection of this daemon, or a lease ended.
enum LeaseChange {
    Taken(ConnId, String, u64),
    Ended(String, u64),
}

/// Something that happened to a task: when, the task, its queue and name, what, and how long it waited or ran.
type Happened = (u64, String, String, String, MetricOutcome, Option<Took>);

/// Since when a task ran (`true`) or waited (ms), for the histograms of `/metrics`.
type Since = Option<(bool, u64)>;

/// The most bytes of events one notification carries (PostgreSQL takes up to 8000).
const EVENTS_PAYLOAD: usize = 7000;
/// How often, at most, a daemon whose clients follow events tells the others to keep publishing them.
const EVENTS_ANNOUNCE_MS: u64 = 10_000;

/// A statement's parameters.
type Params<'p> = &'p [&'p (dyn tokio_postgres::types::ToSql + Sync)];

impl<'a> Sql<'a> {
    fn new(tx: &'a deadpool_postgres::Transaction<'a>) -> Sql<'a> {
        Sql { tx, happened: Mutex::new(Vec::new()), leases: Mutex::new(Vec::new()) }
    }

    /// A lease was taken by connection `conn`.
    fn taken(&self, conn: ConnId, id: &str, lease_id: u64) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).push(LeaseChange::Taken(conn, id.to_string(), lease_id));
    }

    /// A lease ended (whichever connection held it).
    fn ended(&self, id: &str, lease_id: u64) {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).push(LeaseChange::Ended(id.to_string(), lease_id));
    }

    /// The leases connection `conn` took in this transaction that have not ended in it.
    fn taken_by(&self, conn: ConnId) -> Vec<(String, u64)> {
        let mut held = Held::default();
        for change in self.leases.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            match change {
                LeaseChange::Taken(by, id, lease_id) if *by == conn => held.add(conn, id, *lease_id),
                LeaseChange::Taken(..) => {}
                LeaseChange::Ended(id, lease_id) => held.remove(id, *lease_id),
            }
        }
        held.of_conn(conn)
    }

    /// What this transaction did that the daemon follows once it commits.
    fn take_effects(&self) -> (Vec<Happened>, Vec<LeaseChange>) {
        let leases = std::mem::take(&mut *self.leases.lock().unwrap_or_else(|p| p.into_inner()));
        let happened = std::mem::take(&mut *self.happened.lock().unwrap_or_else(|p| p.into_inner()));
        (happened, leases)
    }

    async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.tx.prepare_cached(sql).await?;
        self.tx.query(&statement, params).await
    }

    async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.tx.prepare_cached(sql).await?;
        self.tx.query_opt(&statement, params).await
    }

    async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let statement = self.tx.prepare_cached(sql).await?;
        self.tx.query_one(&statement, params).await
    }

    async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let statement = self.tx.prepare_cached(sql).await?;
        self.tx.execute(&statement, params).await
    }
}

/// The transaction ops run in.
type Tx<'a> = Sql<'a>;
/// Told whether the group a request's statements ran in committed; sends the request its outcome.
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Where a request's outcome goes.
type Outcome<T> = tokio::sync::oneshot::Sender<Result<T, StoreError>>;
/// One request's work in the daemon's line: its statements, run in the group's transaction. Gives whether they
/// failed in the engine (the group then rolls back) and what to do once the group ended.
type Work = Box<dyn for<'a> FnOnce(&'a Tx<'a>, &'a Inner) -> BoxFuture<'a, (bool, Finish)> + Send>;

/// A request in the daemon's line. Enqueues and acks that follow each other in a group become one multi-row
/// statement each (a pipelining producer's or worker's requests, or many clients' at once).
enum Job {
    Enqueue(Vec<NewTask>, Outcome<Vec<Enqueued>>),
    Ack { id: String, lease_id: u64, result: Value, outcome: Outcome<()> },
    Other(Work),
}

/// What to do with a request's outcome once its group ended: a group that did not commit turns a success into
/// `store_unavailable` (the request's own engine error stays). Also says whether the outcome is an engine error.
fn finish<T: Send + 'static>(outcome: Outcome<T>, result: Result<T, StoreError>) -> (bool, Finish) {
    let failed = matches!(result, Err(StoreError::Unavailable(_) | StoreError::Shared(_)));
    if let (true, Err(e)) = (failed, &result) {
        tracing::warn!(error = %e, "a request failed in the store; its group commit rolls back");
    }
    let finish: Finish = Box::new(move |committed| {
        let result = match committed {
            Ok(()) => result,
            Err(_) if failed => result,
            Err(why) => Err(StoreError::Unavailable(why)),
        };
        let _ = outcome.send(result);
    });
    (failed, finish)
}

/// The same engine error for each of several requests (the first gets it as it was).
fn each_error(e: StoreError, count: usize) -> impl Iterator<Item = StoreError> {
    let text = e.to_string();
    let unavailable = matches!(e, StoreError::Unavailable(_));
    std::iter::once(e).chain((1..count).map(move |_| {
        if unavailable {
            StoreError::Unavailable(text.clone())
        } else {
            StoreError::Shared(text.clone())
        }
    }))
}
/// The most requests one group commit carries.
const MAX_GROUP: usize = 512;

/// How a new row is placed, besides its spec.
enum Shape {
    /// A task.
    Task,
    /// A chord's member: its callback's id, and its place in the header.
    Member(String, u32),
    /// A chord's callback, held (in no queue) until its members (their ids, in order) succeeded.
    Callback(Vec<String>),
}

/// A row to insert: the task's record and its state's name (`HELD` for a link or callback waiting in no queue),
/// when it is due, when it finished (expired on arrival), and what the columns beside the spec hold.
struct NewRow {
    record: TaskRecord,
    state: &'static str,
    due: u64,
    finished: Option<u64>,
    chord_id: Option<String>,
    /// A chord callback's members not succeeded yet.
    pending: i32,
    links: Option<Vec<String>>,
    /// Its place among the tasks asked for (a link's row is none).
    reply: Option<usize>,
    /// The record and its error, encoded ([`NewRow::encoded`]).
    spec: Vec<u8>,
    error: Option<Vec<u8>>,
}

impl NewRow {
    fn new(mut record: TaskRecord, now: u64, held: bool) -> NewRow {
        record.result_ttl_ms = record.result_ttl_ms.min(MAX_TTL_MS);
        NewRow {
            state: if held { HELD } else { record.state.as_str() },
            record,
            due: now,
            finished: None,
            chord_id: None,
            pending: 0,
            links: None,
            reply: None,
            spec: Vec::new(),
            error: None,
        }
    }

    /// With the record and its error encoded.
    fn encoded(mut self) -> Result<NewRow, StoreError> {
        let mut spec = Vec::with_capacity(128 + self.record.payload.len());
        self.record
            .encode(&mut spec)
            .map_err(|e| StoreError::Corrupt { id: self.record.id.to_string(), message: e.to_string() })?;
        self.spec = spec;
        self.error = self.record.error.as_deref().map(encode).transpose()?;
        Ok(self)
    }
}

/// A new lease id: 60 bits from PostgreSQL's strong random source (`gen_random_uuid`), as the single node's are
/// random: quoting another worker's lease must not be a matter of counting, and a task's new lease differs from its
/// earlier ones (which is all fencing needs) but with odds of 2^-60.
const LEASE_ID: &str = "('x' || substr(translate(gen_random_uuid()::text, '-', ''), 1, 12)
    || substr(translate(gen_random_uuid()::text, '-', ''), 1, 3))::bit(60)::bigint";

/// The state of a chain's link not enqueued yet, or of a chord's callback whose members have not all succeeded:
/// stored, in no queue (`get` shows it `PENDING`).
const HELD: &str = "HELD";
/// The states a task waits in (leasable once due).
const WAITING: &str = "('PENDING', 'SCHEDULED', 'RETRY')";
/// The columns [`PgStore::record_of`] reads.
const COLUMNS: &str = "id, state, attempts, lease_losses, eta_ms, started_at_ms, finished_at_ms, \
    result_expires_at_ms, revoked, result, error, progress, spec";
/// Longest any one statement (or transaction) may take before the request fails with `store_unavailable`: a
/// primary that vanished, or synchronous standbys that stopped confirming, must not hold requests for ever.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many expired results one tick removes at most.
const EXPIRY_BATCH: i64 = 10_000;
/// The longest result TTL kept (a century): times are `bigint` milliseconds, and a TTL near `u64::MAX` would
/// overflow the sums that compute expiry.
const MAX_TTL_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// The advisory lock key migrations run under.
const MIGRATION_LOCK: i64 = 0x6272_6f6b_6572;

/// A URL with its password hidden, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// What went wrong talking to PostgreSQL: the engine unreachable, shutting down, read-only (a standby, or a
/// primary being demoted) are `Unavailable` (the client may retry elsewhere); anything else is an error.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        let text = e.to_string();
        // A value that does not convert is a bug here, not the engine's state.
        if text.starts_with("error serializing") || text.starts_with("error deserializing") {
            return StoreError::Shared(text);
        }
        // No reply from the server: the connection broke or could not be made.
        return StoreError::Unavailable(text);
    };
    let code = db.code().code();
    let unavailable = code.starts_with("08") // connection exception
        || code.starts_with("57") // operator intervention: shutdown, cannot connect now, statement cancelled
        || code == "25006" // read-only transaction (a standby)
        || code == "53300" // too many connections
        || code == "55P03" // lock not available
        || code == "40001" // serialization failure
        || code == "40P01"; // deadlock detected: retry
    if unavailable {
        StoreError::Unavailable(format!("{}: {}", code, db.message()))
    } else {
        StoreError::Shared(format!("{}: {}", code, db.message()))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn state_of(name: &str) -> Result<TaskState, String> {
    if name == HELD {
        return Ok(TaskState::Pending);
    }
    TaskState::try_from(name.to_string())
}

fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn opt_ms(value: Option<u64>) -> Option<i64> {
    value.map(ms)
}

fn unms(value: Option<i64>) -> Option<u64> {
    value.map(|v| u64::try_from(v).unwrap_or(0))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    broker_client::proto::encode(value).map_err(|e| StoreError::Shared(format!("cannot encode: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() })
}

/// The leases this daemon's connections hold, so a closed connection's can be given back at once (the others'
/// deadlines pass; any daemon's tick puts those back).
#[derive(Default)]
struct Held {
    by_conn: HashMap<ConnId, HashSet<String>>,
    by_id: HashMap<String, (ConnId, u64)>,
}

impl Held {
    fn add(&mut self, conn: ConnId, id: &str, lease_id: u64) {
        if let Some((old, _)) = self.by_id.insert(id.to_string(), (conn, lease_id)) {
            if old != conn {
                self.forget(old, id);
            }
        }
        self.by_conn.entry(conn).or_default().insert(id.to_string());
    }

    fn forget(&mut self, conn: ConnId, id: &str) {
        if let Some(ids) = self.by_conn.get_mut(&conn) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
    }

    /// The lease ended: only if it is the one held (a stale worker's request must not drop the current one).
    fn remove(&mut self, id: &str, lease_id: u64) {
        if let Some(&(conn, held)) = self.by_id.get(id) {
            if held == lease_id {
                self.by_id.remove(id);
                self.forget(conn, id);
            }
        }
    }

    /// The leases connection `conn` holds.
    fn of_conn(&self, conn: ConnId) -> Vec<(String, u64)> {
        let ids = self.by_conn.get(&conn).into_iter().flatten();
        ids.filter_map(|id| self.by_id.get(id).map(|(_, lease_id)| (id.clone(), *lease_id))).collect()
    }
}

/// Counts since this daemon started (`stats` totals; per queue, succeeded and failed).
#[derive(Default)]
struct Counts {
    totals: broker_client::proto::Totals,
    per_queue: HashMap<String, (u64, u64)>,
}

/// What the store's operations share with their futures.
struct Inner {
    pool: Pool,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    ready: Notify,
    finished: Notify,
    held: Mutex<Held>,
    counts: Mutex<Counts>,
    /// Makes this daemon's task ids unique among its own (random bits tell daemons apart).
    next_id: AtomicU64,
    /// The database's clock minus this machine's (ms), measured at each tick: every daemon then reads one clock,
    /// so a daemon whose clock runs ahead cannot take back another's leases before their deadline.
    offset_ms: std::sync::atomic::AtomicI64,
    /// This daemon's metrics, and the handles of each queue and task name seen.
    metrics: Metrics,
    series: Mutex<Series>,
    /// The task events every daemon published (in commit order, `broker_events`), for `events`.
    events: Mutex<EventRing>,
    events_notify: Notify,
    /// Until when some daemon's clients follow events: every daemon publishes its changes' events until then.
    events_wanted_ms: AtomicU64,
    /// Until when this daemon last told the others its clients follow events.
    events_announced_ms: AtomicU64,
    /// Tells this daemon's event notifications from others' (random).
    events_nonce: u64,
    /// The number of this daemon's latest event notification, sent; committed; received back.
    events_sent: AtomicU64,
    events_committed: AtomicU64,
    events_received: AtomicU64,
    /// Whether any limit is set (leases then take the slower, counting path). Read at each tick and whenever a
    /// daemon changes a limit (`broker_flow`).
    limited: std::sync::atomic::AtomicBool,
}

/// Many daemons over one PostgreSQL.
pub struct PgStore {
    inner: Arc<Inner>,
    /// The daemon's line of requests: one writer runs them in order, in group commits ([`write`]).
    line: tokio::sync::mpsc::UnboundedSender<Job>,
    stop: CancellationToken,
}

impl PgStore {
    /// Connects (several hosts may be named; the read-write one is used), creates or migrates the schema, and
    /// starts listening for other daemons' changes.
    pub async fn open(url: &str, config: &Config, clock: Arc<dyn Clock>) -> Result<PgStore, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("store URL {}: {e}", redact(url))))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(2));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("broker");
        }
        // Writes go to the primary: a host list finds it (and finds the new one after a failover).
        if pg.get_hosts().len() > 1 {
            pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        // The pool's connections give a statement up on the server too when a request gives up on it.
        let mut pooled = pg.clone();
        if pooled.get_options().is_none() {
            pooled.options(format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis()));
        }
        let manager = Manager::from_config(pooled, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(32)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(3)))
            .wait_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Invalid(format!("store URL {}: {e}", redact(url))))?;
        let inner = Arc::new(Inner {
            pool,
            options: StoreOptions::from(config),
            clock,
            ready: Notify::new(),
            finished: Notify::new(),
            held: Mutex::new(Held::default()),
            counts: Mutex::new(Counts::default()),
            next_id: AtomicU64::new(rand::random::<u16>().into()),
            offset_ms: std::sync::atomic::AtomicI64::new(0),
            limited: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::new(),
            series: Mutex::new(Series::default()),
            events: Mutex::new(EventRing::default()),
            events_notify: Notify::new(),
            events_wanted_ms: AtomicU64::new(0),
            events_announced_ms: AtomicU64::new(0),
            events_nonce: rand::random(),
            events_sent: AtomicU64::new(0),
            events_committed: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
        });
        inner.migrate().await?;
        inner.measure_clock().await?;
        inner.read_limited().await?;
        let stop = CancellationToken::new();
        tokio::spawn(listen(pg, inner.clone(), stop.clone()));
        let (line, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(write(inner.clone(), requests, stop.clone()));
        tracing::info!(store = %redact(url), "PostgreSQL store ready");
        Ok(PgStore { inner, line, stop })
    }

    /// Stops listening. Nothing is buffered: every acknowledged change committed already.
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Periodic work: lapsed leases go back (or die), due tasks become ready, expired tasks and results go.
    pub async fn tick(&self) -> Result<(), StoreError> {
        self.inner.tick().await
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The daemon's writer: takes the requests in the order they were made and runs them in groups, each group one
/// transaction (its requests' statements one after another, then one commit, which PostgreSQL makes durable on
/// the primary and a synchronous standby). The single node's group commit, over SQL: what one commit costs is
/// shared by every request that arrived while the one before it ran, and a connection's requests take effect in
/// the order it sent them (a later group commits after an earlier one).
async fn write(inner: Arc<Inner>, mut requests: tokio::sync::mpsc::UnboundedReceiver<Job>, stop: CancellationToken) {
    loop {
        let first = tokio::select! {
            job = requests.recv() => match job {
                Some(job) => job,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // A group that does not end in time (no primary, or standbys that stopped confirming) is dropped: its
        // requests get `store_unavailable`, and the next group tries again.
        if tokio::time::timeout(STATEMENT_TIMEOUT, inner.run_group(group)).await.is_err() {
            tracing::warn!("a group commit took more than {} s; its requests failed", STATEMENT_TIMEOUT.as_secs());
        }
    }
}

/// Listens on `broker_ready` and `broker_finished` on a connection of its own (to the primary), reconnecting
/// when it breaks; wakes the waiting requests at each notification, and after each reconnect (what changed while
/// it was away was not heard).
async fn listen(pg: tokio_postgres::Config, inner: Arc<Inner>, stop: CancellationToken) {
    use futures_util::StreamExt;
    while !stop.is_cancelled() {
        let (client, mut connection) = match pg.connect(NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other daemons' changes; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let driver = {
            let inner = inner.clone();
            async move {
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(n)) if n.channel() == "broker_ready" => {
                            inner.ready.notify_waiters()
                        }
                        Ok(AsyncMessage::Notification(n)) if n.channel() == "broker_flow" => {
                            let inner = inner.clone();
                            tokio::spawn(async move {
                                if let Err(e) = inner.read_limited().await {
                                    tracing::warn!(error = %e, "cannot read the limits");
                                }
                                inner.ready.notify_waiters();
                            });
                        }
                        Ok(AsyncMessage::Notification(n)) if n.channel() == "broker_events" => {
                            inner.received_events(n.payload())
                        }
                        Ok(AsyncMessage::Notification(n)) if n.channel() == "broker_events_wanted" => {
                            let until = n.payload().parse().unwrap_or(0);
                            inner.events_wanted_ms.fetch_max(until, Ordering::Relaxed);
                        }
                        Ok(AsyncMessage::Notification(_)) => inner.finished.notify_waiters(),
                        Ok(_) => {}
                        Err(e) => return tracing::warn!(error = %e, "the listening connection broke"),
                    }
                }
            }
        };
        let subscribe = async {
            if let Err(e) = client
                .batch_execute(
                    "LISTEN broker_ready; LISTEN broker_finished; LISTEN broker_flow; LISTEN broker_events;
                     LISTEN broker_events_wanted",
                )
                .await
            {
                tracing::warn!(error = %e, "LISTEN failed");
                return;
            }
            inner.ready.notify_waiters();
            inner.finished.notify_waiters();
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = driver => {}
            _ = subscribe => {}
            _ = stop.cancelled() => return,
        }
        drop(client);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

impl Inner {
    /// Something happened to a task in transaction `tx` (see [`Sql`]).
    fn happened(&self, tx: &Tx<'_>, id: &str, queue: &str, task: &str, outcome: MetricOutcome) {
        self.happened_after(tx, id, queue, task, outcome, None);
    }

    /// [`Inner::happened`], with how long the task waited (since `Took::Waited`'s ms) or ran.
    fn happened_after(&self, tx: &Tx<'_>, id: &str, queue: &str, task: &str, outcome: MetricOutcome, since: Since) {
        let now = self.now();
        let took = since.map(|(ran, at)| {
            let secs = now.saturating_sub(at) as f64 / 1000.0;
            if ran {
                Took::Ran(secs)
            } else {
                Took::Waited(secs)
            }
        });
        // The task's id is for events only: not copied while nobody follows them.
        let id = if now < self.events_wanted_ms.load(Ordering::Relaxed) { id.to_string() } else { String::new() };
        let event = (now, id, queue.to_string(), task.to_string(), outcome, took);
        tx.happened.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    /// Publishes what happened in a transaction, in it, while some daemon's clients follow events: every
    /// daemon (this one too) hears it when the transaction commits, in commit order. Gives the number of its
    /// last notification (0: none), which this daemon waits to hear back before it answers `events`
    /// ([`TaskStore::events_settled`]).
    async fn publish(&self, tx: &Tx<'_>, happened: &[Happened]) -> Result<u64, StoreError> {
        if happened.is_empty() || self.now() >= self.events_wanted_ms.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut chunks = Vec::new();
        let mut chunk = String::new();
        for (at, id, queue, task, outcome, _) in happened.iter().filter(|h| !h.1.is_empty()) {
            let event = serde_json::to_string(&(at, id, queue, task, outcome.as_str()))
                .map_err(|e| StoreError::Shared(format!("cannot encode an event: {e}")))?;
            if event.len() + 2 > EVENTS_PAYLOAD {
                // Names escaped past what one notification carries: this event is not shown.
                continue;
            }
            if chunk.len() + event.len() + 2 > EVENTS_PAYLOAD {
                chunk.push(']');
                chunks.push(std::mem::take(&mut chunk));
            }
            chunk.push(if chunk.is_empty() { '[' } else { ',' });
            chunk.push_str(&event);
        }
        if !chunk.is_empty() {
            chunk.push(']');
            chunks.push(chunk);
        }
        let mut last = 0;
        for chunk in chunks {
            last = self.events_sent.fetch_add(1, Ordering::Relaxed) + 1;
            let payload = format!(r#"{{"d":{},"n":{last},"e":{chunk}}}"#, self.events_nonce);
            tx.execute("SELECT pg_notify('broker_events', $1)", &[&payload]).await.map_err(pg_error)?;
        }
        Ok(last)
    }

    /// A transaction committed: what happened in it is counted (`stats` totals, `/metrics`), and the map of this
    /// daemon's connections' leases follows the leases it took and ended.
    fn committed(&self, happened: &[Happened], leases: Vec<LeaseChange>, published: u64) {
        self.events_committed.fetch_max(published, Ordering::Relaxed);
        if !leases.is_empty() {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            for change in leases {
                match change {
                    LeaseChange::Taken(conn, id, lease_id) => held.add(conn, &id, lease_id),
                    LeaseChange::Ended(id, lease_id) => held.remove(&id, lease_id),
                }
            }
        }
        if happened.is_empty() {
            return;
        }
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (_, _, queue, task, outcome, took) in happened {
            series.of(&self.metrics, queue, task).happened(*outcome, *took);
            let totals = &mut counts.totals;
            match outcome {
                MetricOutcome::enqueued => totals.enqueued += 1,
                MetricOutcome::succeeded => totals.succeeded += 1,
                MetricOutcome::failed => totals.failed += 1,
                MetricOutcome::retried => totals.retried += 1,
                MetricOutcome::dead => totals.dead += 1,
                MetricOutcome::lease_lost => totals.lease_lost += 1,
                MetricOutcome::revoked | MetricOutcome::expired => totals.revoked += 1,
                MetricOutcome::started => {}
            }
            match outcome {
                MetricOutcome::succeeded => counts.per_queue.entry(queue.clone()).or_default().0 += 1,
                MetricOutcome::failed => counts.per_queue.entry(queue.clone()).or_default().1 += 1,
                _ => {}
            }
        }
    }

    /// Events another daemon (or this one) published, in the order their transactions committed.
    fn received_events(&self, payload: &str) {
        /// A notification: the daemon's nonce, its number, the events.
        #[derive(serde::Deserialize)]
        struct Published {
            d: u64,
            n: u64,
            e: Vec<(u64, String, String, String, String)>,
        }
        let Ok(published) = serde_json::from_str::<Published>(payload) else {
            return tracing::warn!("a task events notification does not read");
        };
        let mut ring = self.events.lock().unwrap_or_else(|p| p.into_inner());
        for (at, id, queue, task, outcome) in published.e {
            if let Some(outcome) = MetricOutcome::ALL.into_iter().find(|o| o.as_str() == outcome) {
                ring.push(at, id.as_str().into(), queue, task, outcome);
            }
        }
        drop(ring);
        if published.d == self.events_nonce {
            self.events_received.fetch_max(published.n, Ordering::Relaxed);
        }
        self.events_notify.notify_waiters();
    }

    fn now(&self) -> u64 {
        self.clock.now_ms().saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Reads whether any limit is set; while one is, waiting leases look again at each tick (a bucket refills,
    /// a slot frees, without a notification).
    async fn read_limited(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT EXISTS (SELECT 1 FROM broker_limits)", &[]).await.map_err(pg_error)?;
        let limited: bool = row.get(0);
        self.limited.store(limited, Ordering::Relaxed);
        if limited {
            self.ready.notify_waiters();
        }
        Ok(())
    }

    /// Measures the database's clock against this machine's (half the round trip's error at most).
    async fn measure_clock(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let before = self.clock.now_ms();
        let row = client
            .query_one("SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint", &[])
            .await
            .map_err(pg_error)?;
        let after = self.clock.now_ms();
        let theirs: i64 = row.get(0);
        let ours = ms(before / 2 + after / 2);
        self.offset_ms.store(theirs.saturating_sub(ours), Ordering::Relaxed);
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Runs one group of requests in one transaction (see [`write`]). A request whose statements fail in the
    /// engine rolls the group back: it gets its error, the others `store_unavailable`, as do the requests of a
    /// group that could not start or commit (a request dropped unrun reads as that too).
    async fn run_group(&self, group: Vec<Job>) {
        let mut client = match self.client().await {
            Ok(client) => client,
            Err(e) => return tracing::warn!(error = %e, requests = group.len(), "no connection for a group commit"),
        };
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => return tracing::warn!(error = %e, requests = group.len(), "cannot begin a group commit"),
        };
        let sql = Sql::new(&tx);
        let mut finishes = Vec::with_capacity(group.len());
        let mut broke = false;
        let mut jobs = group.into_iter().peekable();
        while let Some(job) = jobs.next() {
            if broke {
                // Dropped unrun: its requester hears the store is unavailable.
                continue;
            }
            match job {
                Job::Other(work) => {
                    let (failed, finish) = work(&sql, self).await;
                    broke |= failed;
                    finishes.push(finish);
                }
                Job::Enqueue(specs, outcome) => {
                    let mut run = vec![(specs, outcome)];
                    while let Some(Job::Enqueue(..)) = jobs.peek() {
                        if let Some(Job::Enqueue(specs, outcome)) = jobs.next() {
                            run.push((specs, outcome));
                        }
                    }
                    // Requests whose requester gave up waiting are dropped unrun.
                    run.retain(|(_, outcome)| !outcome.is_closed());
                    if run.is_empty() {
                        continue;
                    }
                    // A request that would take a queue past max_queue_length is refused alone.
                    let specs: Vec<&[NewTask]> = run.iter().map(|(specs, _)| specs.as_slice()).collect();
                    let refused = match self.admit(&sql, &specs).await {
                        Ok(refused) => refused,
                        Err(e) => {
                            broke = true;
                            let outcomes: Vec<_> = run.into_iter().map(|(_, outcome)| outcome).collect();
                            for (e, outcome) in each_error(e, outcomes.len()).zip(outcomes) {
                                finishes.push(finish(outcome, Err::<Vec<Enqueued>, _>(e)).1);
                            }
                            continue;
                        }
                    };
                    let mut admitted = Vec::with_capacity(run.len());
                    for ((specs, outcome), refusal) in run.into_iter().zip(refused) {
                        match refusal {
                            Some(e) => finishes.push(finish(outcome, Err::<Vec<Enqueued>, _>(e)).1),
                            None => admitted.push((specs, outcome)),
                        }
                    }
                    if admitted.is_empty() {
                        continue;
                    }
                    let sizes: Vec<usize> = admitted.iter().map(|(specs, _)| specs.len()).collect();
                    let (specs, outcomes): (Vec<Vec<NewTask>>, Vec<_>) = admitted.into_iter().unzip();
                    match self.enqueue(&sql, specs.into_iter().flatten().collect()).await {
                        Ok(mut done) => {
                            for (size, outcome) in sizes.into_iter().zip(outcomes) {
                                let rest = done.split_off(size.min(done.len()));
                                finishes.push(finish(outcome, Ok(std::mem::replace(&mut done, rest))).1);
                            }
                        }
                        Err(e) => {
                            broke = true;
                            for (e, outcome) in each_error(e, outcomes.len()).zip(outcomes) {
                                finishes.push(finish(outcome, Err::<Vec<Enqueued>, _>(e)).1);
                            }
                        }
                    }
                }
                Job::Ack { id, lease_id, result, outcome } => {
                    let mut acks = vec![(id, lease_id, result)];
                    let mut outcomes = vec![outcome];
                    while let Some(Job::Ack { .. }) = jobs.peek() {
                        if let Some(Job::Ack { id, lease_id, result, outcome }) = jobs.next() {
                            acks.push((id, lease_id, result));
                            outcomes.push(outcome);
                        }
                    }
                    let (acks, outcomes): (Vec<_>, Vec<_>) =
                        acks.into_iter().zip(outcomes).filter(|(_, outcome)| !outcome.is_closed()).unzip();
                    if acks.is_empty() {
                        continue;
                    }
                    match self.ack_many(&sql, acks).await {
                        Ok(results) => {
                            for (result, outcome) in results.into_iter().zip(outcomes) {
                                finishes.push(finish(outcome, result).1);
                            }
                        }
                        Err(e) => {
                            broke = true;
                            for (e, outcome) in each_error(e, outcomes.len()).zip(outcomes) {
                                finishes.push(finish(outcome, Err::<(), _>(e)).1);
                            }
                        }
                    }
                }
            }
        }
        let (happened, leases) = sql.take_effects();
        let mut published = 0;
        if !broke {
            match self.publish(&sql, &happened).await {
                Ok(last) => published = last,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish task events; the group commit rolls back");
                    broke = true;
                }
            }
        }
        drop(sql);
        let committed = if broke {
            let _ = tx.rollback().await;
            Err("the request's group commit rolled back (another request in it failed); retry".to_string())
        } else {
            tx.commit().await.map_err(|e| pg_error(e).to_string())
        };
        if committed.is_ok() {
            self.committed(&happened, leases, published);
        }
        for finish in finishes {
            finish(committed.clone());
        }
    }

    /// With `max_queue_length`: which of these enqueue requests, taken in order, would take a queue past it
    /// (`queue_full`, nothing of that request stored); the others count against the room left. Counted in the
    /// group's transaction: daemons enqueuing into one queue at once may pass the limit by what they add together.
    async fn admit(&self, client: &Tx<'_>, run: &[&[NewTask]]) -> Result<Vec<Option<StoreError>>, StoreError> {
        let limit = self.options.max_queue_length;
        if limit == 0 {
            return Ok(run.iter().map(|_| None).collect());
        }
        let queue_of = |spec: &NewTask| spec.queue.clone().unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        let mut queues: Vec<String> = run.iter().flat_map(|specs| specs.iter().map(queue_of)).collect();
        queues.sort_unstable();
        queues.dedup();
        let mut waiting: HashMap<String, u64> = HashMap::new();
        for row in client
            .query(
                &format!(
                    "SELECT queue, count(*) FROM broker_tasks WHERE queue = ANY($1) AND state IN {WAITING}
                     GROUP BY queue"
                ),
                &[&queues],
            )
            .await
            .map_err(pg_error)?
        {
            waiting.insert(row.get(0), row.get::<_, i64>(1).max(0) as u64);
        }
        let mut refused = Vec::with_capacity(run.len());
        for specs in run {
            let mut adding: HashMap<String, u64> = HashMap::new();
            for spec in specs.iter() {
                *adding.entry(queue_of(spec)).or_default() += 1;
            }
            let full = adding.iter().find_map(|(queue, n)| {
                let now = waiting.get(queue).copied().unwrap_or(0);
                (now + n > limit).then(|| StoreError::QueueFull { queue: queue.clone(), waiting: now, limit })
            });
            if full.is_none() {
                for (queue, n) in adding {
                    *waiting.entry(queue).or_default() += n;
                }
            }
            refused.push(full);
        }
        Ok(refused)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg_error)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS broker_schema (version integer NOT NULL)")
            .await
            .map_err(pg_error)?;
        let row = tx.query_one("SELECT coalesce(max(version), 0) FROM broker_schema", &[]).await.map_err(pg_error)?;
        let version: i32 = row.get(0);
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Invalid(format!(
                "the database's schema is version {version}, newer than this daemon's {}: upgrade the daemon",
                MIGRATIONS.len()
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(migration).await.map_err(pg_error)?;
            tx.execute("INSERT INTO broker_schema (version) VALUES ($1)", &[&(i as i32 + 1)])
                .await
                .map_err(pg_error)?;
            tracing::info!(version = i + 1, "store schema migrated");
        }
        tx.commit().await.map_err(pg_error)
    }

    fn new_id(&self, now: u64) -> String {
        let counter = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:012x}{:04x}{:08x}", now & 0xffff_ffff_ffff, counter & 0xffff, rand::random::<u32>())
    }

    /// A task's record from its row ([`COLUMNS`]): the spec as enqueued, with what changed since.
    fn record_of(row: &Row) -> Result<TaskRecord, StoreError> {
        let id: &str = row.get("id");
        let mut record = TaskRecord::decode(row.get("spec"))
            .map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() })?;
        let state: &str = row.get("state");
        record.state = state_of(state).map_err(|message| StoreError::Corrupt { id: id.to_string(), message })?;
        record.attempts = u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0);
        record.lease_losses = u32::try_from(row.get::<_, i32>("lease_losses")).unwrap_or(0);
        record.eta_ms = unms(row.get("eta_ms"));
        record.started_at_ms = unms(row.get("started_at_ms"));
        record.finished_at_ms = unms(row.get("finished_at_ms"));
        record.result_expires_at_ms = unms(row.get("result_expires_at_ms"));
        record.revoked = row.get("revoked");
        record.result = row.get::<_, Option<&[u8]>>("result").map(|b| decode(id, b)).transpose()?.map(Box::new);
        record.error = row.get::<_, Option<&[u8]>>("error").map(|b| decode(id, b)).transpose()?.map(Box::new);
        if let Some(progress) = row.get::<_, Option<&[u8]>>("progress") {
            record.extra_mut().progress = Some(decode(id, progress)?);
        }
        Ok(record)
    }

    /// Stores new tasks, or finds those their ids (or unique keys) name: see [`PgStore::insert`].
    async fn enqueue(&self, tx: &Tx<'_>, specs: Vec<NewTask>) -> Result<Vec<Enqueued>, StoreError> {
        self.insert(tx, specs.into_iter().map(|spec| (spec, Shape::Task)).collect()).await
    }

    /// Stores new tasks in one statement, in the order given (their `seq`, FIFO), or finds the ones their ids
    /// name, or the task holding their unique key. A task with a chain gets its links' ids now, and each link a
    /// row in the state `HELD` (in no queue) until the task before it succeeds; a chord's callback is held so
    /// until its members succeeded ([`Shape`]).
    async fn insert(&self, tx: &Tx<'_>, mut items: Vec<(NewTask, Shape)>) -> Result<Vec<Enqueued>, StoreError> {
        let now = self.now();
        for (spec, _) in &mut items {
            spec.id.get_or_insert_with(|| self.new_id(now));
            // A chain's links get their ids now, so the producer can follow each.
            for link in &mut spec.chain {
                link.id.get_or_insert_with(|| self.new_id(now));
            }
        }
        let mut found = self.claim_unique(tx, &items, now).await?;
        let mut rows: Vec<NewRow> = Vec::with_capacity(items.len());
        let mut chains: Vec<Vec<String>> = Vec::with_capacity(items.len());
        for (i, (mut spec, shape)) in items.into_iter().enumerate() {
            let chain_ids: Vec<String> = spec.chain.iter().filter_map(|link| link.id.clone()).collect();
            chains.push(chain_ids.clone());
            if found[i].is_some() {
                continue;
            }
            let id = spec.id.take().unwrap_or_default();
            let links = std::mem::take(&mut spec.chain);
            let (chord_id, members) = match shape {
                Shape::Task => (None, None),
                Shape::Member(callback, index) => (Some((callback, index)), None),
                Shape::Callback(members) => (None, Some(members)),
            };
            let held = members.is_some();
            let pending = members.as_ref().map_or(0, |m| i32::try_from(m.len()).unwrap_or(i32::MAX));
            let eta = spec.eta_ms.or(spec.countdown_ms.map(|c| now.saturating_add(c))).filter(|eta| *eta > now);
            let extra = Extra {
                unique_key: spec.unique_key.take(),
                unique_until_ms: spec.unique_for_ms.map(|w| now.saturating_add(w)),
                chain: links.clone(),
                chord: chord_id.clone(),
                members: members.unwrap_or_default(),
                waiting: held,
                immutable: held && spec.immutable,
                countdown_ms: spec.countdown_ms.filter(|_| held),
                ..Extra::default()
            };
            let mut record = new_record(&mut spec, id.as_str().into(), 0, now, &self.options);
            // A held callback's `eta_ms` holds until its release; its countdown counts from the release.
            record.eta_ms = if held { spec.eta_ms } else { eta };
            let mut row = NewRow::new(record, now, held);
            if eta.is_some() && !held {
                row.record.state = TaskState::Scheduled;
                row.state = TaskState::Scheduled.as_str();
                row.due = eta.unwrap_or(now);
            }
            let expired = !held && row.record.expires_at_ms.is_some_and(|e| e <= now);
            if expired {
                // Expired on arrival: kept findable, never run (as the single node does).
                row.record.state = TaskState::Revoked;
                row.state = TaskState::Revoked.as_str();
                row.record.revoked = true;
                row.record.error = Some(Box::new(expired_error()));
                row.finished = Some(now);
                row.due = now;
            }
            row.record.extra = (extra != Extra::default()).then(|| Box::new(extra));
            row.chord_id = chord_id.map(|(callback, _)| callback);
            row.pending = pending;
            row.links = (!chain_ids.is_empty()).then(|| chain_ids.clone());
            row.reply = Some(i);
            rows.push(row.encoded()?);
            // Each link, held until the task before it succeeds (its chain is the one above's: `links`).
            for link in links {
                let mut link = NewTask::from(TaskSpec { chain: Vec::new(), ..link });
                let id = link.id.take().unwrap_or_default();
                let record = new_record(&mut link, id.as_str().into(), 0, now, &self.options);
                rows.push(NewRow::new(record, now, true).encoded()?);
            }
        }
        // One statement for them all, rows inserted in the order given (their `seq`, FIFO); waiting daemons hear
        // of new tasks from the insert itself (one notification per transaction).
        let insert = "WITH new AS (INSERT INTO broker_tasks (id, queue, task, state, priority, due_ms, lease_ms, \
            max_retries, created_at_ms, eta_ms, expires_at_ms, result_ttl_ms, revoked, error, finished_at_ms, \
            result_expires_at_ms, spec, chord_id, pending) \
            SELECT id, queue, task, state, priority, due_ms, lease_ms, max_retries, $9::bigint, eta_ms, \
                expires_at_ms, result_ttl_ms, revoked, error, finished_at_ms, result_expires_at_ms, spec, chord_id, \
                nullif(pending, 0) \
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], $6::bigint[], $7::bigint[], \
                $8::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::boolean[], $14::bytea[], \
                $15::bigint[], $16::bigint[], $17::bytea[], $18::text[], $19::integer[]) \
                WITH ORDINALITY AS r(id, queue, task, state, priority, due_ms, lease_ms, max_retries, eta_ms, \
                expires_at_ms, result_ttl_ms, revoked, error, finished_at_ms, result_expires_at_ms, spec, chord_id, \
                pending, ord) \
            ORDER BY ord \
            ON CONFLICT (id) DO NOTHING RETURNING id) \
            SELECT id, pg_notify('broker_ready', '') FROM new";
        let column = |f: &dyn Fn(&NewRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
        let optional = |f: &dyn Fn(&NewRow) -> Option<i64>| rows.iter().map(f).collect::<Vec<Option<i64>>>();
        let ids: Vec<&str> = rows.iter().map(|r| &*r.record.id).collect();
        let queues: Vec<&str> = rows.iter().map(|r| r.record.queue.as_str()).collect();
        let tasks: Vec<&str> = rows.iter().map(|r| r.record.task.as_str()).collect();
        let states: Vec<&str> = rows.iter().map(|r| r.state).collect();
        let priorities: Vec<i32> = rows.iter().map(|r| r.record.priority).collect();
        let due = column(&|r| ms(r.due));
        let lease_ms = column(&|r| ms(r.record.lease_ms));
        let retries = column(&|r| i64::from(r.record.max_retries));
        let eta = optional(&|r| opt_ms(r.record.eta_ms));
        let expires = optional(&|r| opt_ms(r.record.expires_at_ms));
        let ttl = column(&|r| ms(r.record.result_ttl_ms));
        let revoked: Vec<bool> = rows.iter().map(|r| r.record.revoked).collect();
        let errors: Vec<Option<&[u8]>> = rows.iter().map(|r| r.error.as_deref()).collect();
        let finished = optional(&|r| opt_ms(r.finished));
        let result_expires = optional(&|r| r.finished.map(|f| ms(f.saturating_add(r.record.result_ttl_ms))));
        let specs: Vec<&[u8]> = rows.iter().map(|r| r.spec.as_slice()).collect();
        let chord_ids: Vec<Option<&str>> = rows.iter().map(|r| r.chord_id.as_deref()).collect();
        let pending: Vec<i32> = rows.iter().map(|r| r.pending).collect();
        let params: Params<'_> = &[
            &ids,
            &queues,
            &tasks,
            &states,
            &priorities,
            &due,
            &lease_ms,
            &retries,
            &ms(now),
            &eta,
            &expires,
            &ttl,
            &revoked,
            &errors,
            &finished,
            &result_expires,
            &specs,
            &chord_ids,
            &pending,
        ];
        let inserted: HashSet<String> =
            tx.query(insert, params).await.map_err(pg_error)?.iter().map(|row| row.get(0)).collect();
        let mut links_of_found: Vec<&str> = Vec::new();
        let mut expired_carriers = Vec::new();
        for row in rows.iter().filter(|r| r.reply.is_some()) {
            let Some(links) = &row.links else { continue };
            if inserted.contains(&*row.record.id) {
                // The links of a task go with it (each row's own, not rows of rectangular arrays).
                tx.execute("UPDATE broker_tasks SET links = $2 WHERE id = $1", &[&&*row.record.id, links])
                    .await
                    .map_err(pg_error)?;
                if row.finished.is_some() {
                    expired_carriers.push(row.record.id.to_string());
                }
            } else {
                // Found, not made (a retried enqueue, or another daemon's of the same id at once): the link rows
                // this statement inserted for it go again.
                links_of_found.extend(links.iter().map(String::as_str).filter(|id| inserted.contains(*id)));
            }
        }
        if !links_of_found.is_empty() {
            tx.execute("DELETE FROM broker_tasks WHERE id = ANY($1) AND state = 'HELD'", &[&links_of_found])
                .await
                .map_err(pg_error)?;
        }
        // A task with a chain that expired on arrival ends its links.
        if !expired_carriers.is_empty() {
            self.after_failure(tx, expired_carriers).await?;
        }
        // Those not inserted exist already (or came twice): their state now.
        let existing: Vec<&str> = rows
            .iter()
            .filter(|r| r.reply.is_some())
            .map(|r| &*r.record.id)
            .filter(|id| !inserted.contains(*id))
            .collect();
        let mut states_now = HashMap::new();
        if !existing.is_empty() {
            for row in tx
                .query("SELECT id, state FROM broker_tasks WHERE id = ANY($1)", &[&existing])
                .await
                .map_err(pg_error)?
            {
                let (id, state): (String, &str) = (row.get(0), row.get(1));
                let state = state_of(state).map_err(|message| StoreError::Corrupt { id: id.clone(), message })?;
                states_now.insert(id, state);
            }
        }
        let mut created = 0;
        let mut claimed = HashSet::new();
        for row in &rows {
            let Some(i) = row.reply else { continue };
            // The first of the same id in this statement created it; any other found it.
            let new = inserted.contains(&*row.record.id) && claimed.insert(&*row.record.id);
            let state = if new {
                created += 1;
                let record = &row.record;
                self.happened(tx, &record.id, &record.queue, &record.task, MetricOutcome::enqueued);
                if row.finished.is_some() {
                    self.happened(tx, &record.id, &record.queue, &record.task, MetricOutcome::expired);
                }
                row.record.state
            } else {
                states_now.get(&*row.record.id).copied().unwrap_or(row.record.state)
            };
            let chain = if new { std::mem::take(&mut chains[i]) } else { Vec::new() };
            found[i] = Some(Enqueued { id: row.record.id.to_string(), created: new, state, chain });
        }
        if created > 0 {
            self.ready.notify_waiters();
        }
        found
            .into_iter()
            .map(|e| e.ok_or_else(|| StoreError::Shared("a task of the enqueue was neither stored nor found".into())))
            .collect()
    }

    /// The unique keys of `items`: for each task with one that another task holds now, that task (its answer:
    /// it is not stored); the others claim their key, for their own id. The keys' rows are locked (in order) until
    /// the group commits, so daemons enqueuing under one key at once take turns. A task whose own id exists
    /// already is found by its id, and claims nothing.
    async fn claim_unique(
        &self,
        tx: &Tx<'_>,
        items: &[(NewTask, Shape)],
        now: u64,
    ) -> Result<Vec<Option<Enqueued>>, StoreError> {
        let mut found: Vec<Option<Enqueued>> = items.iter().map(|_| None).collect();
        let mut keys: Vec<&str> = items.iter().filter_map(|(spec, _)| spec.unique_key.as_deref()).collect();
        if keys.is_empty() {
            return Ok(found);
        }
        keys.sort_unstable();
        keys.dedup();
        let ids: Vec<&str> = items.iter().filter_map(|(spec, _)| spec.id.as_deref()).collect();
        let taken: HashSet<String> = tx
            .query("SELECT id FROM broker_tasks WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(pg_error)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        // The key's row, made if missing, then locked; a tick may delete a lapsed one in between (then again).
        let mut holders: HashMap<String, (String, Option<i64>)> = HashMap::new();
        for _ in 0..3 {
            tx.execute(
                "INSERT INTO broker_unique (key, task_id) SELECT k, '' FROM unnest($1::text[]) AS k ORDER BY k
                 ON CONFLICT (key) DO NOTHING",
                &[&keys],
            )
            .await
            .map_err(pg_error)?;
            let rows = tx
                .query(
                    "SELECT key, task_id, until_ms FROM broker_unique WHERE key = ANY($1) ORDER BY key FOR UPDATE",
                    &[&keys],
                )
                .await
                .map_err(pg_error)?;
            holders = rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2)))).collect();
            if holders.len() == keys.len() {
                break;
            }
        }
        let holder_ids: Vec<&str> = holders.values().map(|(id, _)| id.as_str()).filter(|id| !id.is_empty()).collect();
        let mut states: HashMap<String, TaskState> = HashMap::new();
        for row in
            tx.query("SELECT id, state FROM broker_tasks WHERE id = ANY($1)", &[&holder_ids]).await.map_err(pg_error)?
        {
            let (id, state): (String, &str) = (row.get(0), row.get(1));
            let state = state_of(state).map_err(|message| StoreError::Corrupt { id: id.clone(), message })?;
            states.insert(id, state);
        }
        let mut claims: Vec<(&str, &str, Option<i64>)> = Vec::new();
        for (i, (spec, _)) in items.iter().enumerate() {
            let (Some(key), Some(id)) = (spec.unique_key.as_deref(), spec.id.as_deref()) else { continue };
            if taken.contains(id) {
                continue;
            }
            if let Some((holder, until)) = holders.get(key) {
                let state = states.get(holder).copied();
                let holds = state.is_some_and(|state| match until {
                    Some(until) => *until > ms(now),
                    None => !state.is_terminal(),
                });
                if let (true, Some(state)) = (holds, state) {
                    found[i] = Some(Enqueued { id: holder.clone(), created: false, state, chain: Vec::new() });
                    continue;
                }
            }
            let until = spec.unique_for_ms.map(|w| ms(now.saturating_add(w)));
            holders.insert(key.to_string(), (id.to_string(), until));
            // Held by a task of this very statement from now on.
            states.insert(id.to_string(), TaskState::Pending);
            claims.push((key, id, until));
        }
        if !claims.is_empty() {
            let keys: Vec<&str> = claims.iter().map(|c| c.0).collect();
            let ids: Vec<&str> = claims.iter().map(|c| c.1).collect();
            let until: Vec<Option<i64>> = claims.iter().map(|c| c.2).collect();
            tx.execute(
                "UPDATE broker_unique u SET task_id = c.id, until_ms = c.until
                 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS c(key, id, until) WHERE u.key = c.key",
                &[&keys, &ids, &until],
            )
            .await
            .map_err(pg_error)?;
        }
        Ok(found)
    }

    /// Stores a chord: its members, and its callback held until they all succeeded, in one transaction. A
    /// callback id that exists returns the chord as it is (a retried request).
    async fn enqueue_chord(
        &self,
        tx: &Tx<'_>,
        header: Vec<NewTask>,
        mut callback: NewTask,
    ) -> Result<(Vec<Enqueued>, Enqueued), StoreError> {
        if let Some(id) = callback.id.as_deref() {
            // The same chord sent twice at once (a retry through another daemon): one stores it, the other
            // waits for it here and then finds it.
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&id]).await.map_err(pg_error)?;
            let row =
                tx.query_opt("SELECT state, spec FROM broker_tasks WHERE id = $1", &[&id]).await.map_err(pg_error)?;
            if let Some(row) = row {
                let state =
                    state_of(row.get(0)).map_err(|message| StoreError::Corrupt { id: id.to_string(), message })?;
                let record = TaskRecord::decode(row.get(1))
                    .map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() })?;
                let members = record.extra.map(|e| e.members).unwrap_or_default();
                let mut states = HashMap::new();
                for row in tx
                    .query("SELECT id, state FROM broker_tasks WHERE id = ANY($1)", &[&members])
                    .await
                    .map_err(pg_error)?
                {
                    states.insert(row.get::<_, String>(0), state_of(row.get(1)).unwrap_or(TaskState::Pending));
                }
                let header = members
                    .into_iter()
                    .map(|m| {
                        let state = states.get(&m).copied().unwrap_or(TaskState::Pending);
                        Enqueued { id: m, created: false, state, chain: Vec::new() }
                    })
                    .collect();
                let callback = Enqueued { id: id.to_string(), created: false, state, chain: Vec::new() };
                return Ok((header, callback));
            }
        }
        let given: Vec<&str> = header.iter().filter_map(|m| m.id.as_deref()).collect();
        if let Some(row) =
            tx.query_opt("SELECT id FROM broker_tasks WHERE id = ANY($1) LIMIT 1", &[&given]).await.map_err(pg_error)?
        {
            let taken: &str = row.get(0);
            return Err(StoreError::Invalid(format!("header: a task with id {taken:?} exists already")));
        }
        if let Some(full) = self.admit(tx, &[&header]).await?.pop().flatten() {
            return Err(full);
        }
        let now = self.now();
        let callback_id = callback.id.get_or_insert_with(|| self.new_id(now)).clone();
        let mut items = Vec::with_capacity(header.len() + 1);
        let mut members = Vec::with_capacity(header.len());
        for (i, mut member) in header.into_iter().enumerate() {
            members.push(member.id.get_or_insert_with(|| self.new_id(now)).clone());
            items.push((member, Shape::Member(callback_id.clone(), i as u32)));
        }
        items.push((callback, Shape::Callback(members)));
        let mut out = self.insert(tx, items).await?;
        let callback = out.pop().ok_or_else(|| StoreError::Shared("the chord's callback was not stored".into()))?;
        // A member's id taken meanwhile (another request stored a task of that id at the same moment): the chord
        // would wait for a task that is not its member. Nothing of it is kept (the group rolls back).
        if let Some(taken) = out.iter().chain([&callback]).find(|e| !e.created) {
            return Err(StoreError::Shared(format!("a task with id {:?} was stored meanwhile; retry", taken.id)));
        }
        // A member that expired on arrival will never succeed.
        if let Some(expired) = out.iter().find(|e| e.state.is_terminal()) {
            let error = TaskError {
                kind: "ChordError".into(),
                message: format!("chord member {} ended {}: it expired before it started", expired.id, expired.state),
                traceback: None,
            };
            if self.fail_callback(tx, &callback.id, &error).await? {
                self.after_failure(tx, vec![callback.id.clone()]).await?;
            }
        }
        Ok((out, callback))
    }

    /// After a task with a chain or in a chord succeeded: its chain's next link joins its queue, with the task's
    /// result as its first argument (unless `immutable`), in the transaction of the ack. Gives the chord callback
    /// that counts it, if any ([`Inner::count_members`]).
    async fn after_success(&self, tx: &Tx<'_>, id: &str, result: &Value) -> Result<Option<String>, StoreError> {
        let row = tx.query_one("SELECT spec FROM broker_tasks WHERE id = $1", &[&id]).await.map_err(pg_error)?;
        let record =
            TaskRecord::decode(row.get(0)).map_err(|e| StoreError::Shared(format!("corrupt record {id:?}: {e}")))?;
        let Some(mut extra) = record.extra else { return Ok(None) };
        if let Some(first) = extra.chain.first() {
            let mut next = first.clone();
            next.chain = extra.chain[1..].to_vec();
            if !next.immutable {
                next.args.insert(0, result.clone());
            }
            // The links wait as held rows, or were ended by this task's earlier failure (it was requeued since):
            // the chain resumes. A link that exists otherwise is the chain's step taken already.
            let links: Vec<&str> = extra.chain.iter().filter_map(|link| link.id.as_deref()).collect();
            tx.execute("DELETE FROM broker_tasks WHERE id = ANY($1) AND (state = 'HELD' OR by_parent)", &[&links])
                .await
                .map_err(pg_error)?;
            self.insert(tx, vec![(NewTask::from(next), Shape::Task)]).await?;
            // Handed on: a succeeded task keeps no chain (as on the single node).
            extra.chain.clear();
            let record = TaskRecord { extra: (*extra != Extra::default()).then_some(extra.clone()), ..record };
            let mut spec = Vec::with_capacity(128 + record.payload.len());
            record.encode(&mut spec).map_err(|e| StoreError::Shared(format!("cannot encode {id:?}: {e}")))?;
            tx.execute("UPDATE broker_tasks SET spec = $2, links = NULL WHERE id = $1", &[&id, &spec])
                .await
                .map_err(pg_error)?;
        }
        Ok(extra.chord.map(|(callback, _)| callback))
    }

    /// Members of chord `callback` succeeded (`count` of them): the callback counts them, and joins its queue once
    /// every member has. Its row is locked until the group commits, so members acked through several daemons at
    /// once count one after another; a group counts its callbacks in id order, so two groups never wait for each
    /// other's.
    async fn count_members(&self, tx: &Tx<'_>, callback: &str, count: i32) -> Result<(), StoreError> {
        let left = tx
            .query_opt(
                "UPDATE broker_tasks SET pending = pending - $2 WHERE id = $1 AND state = 'HELD' RETURNING pending",
                &[&callback, &count],
            )
            .await
            .map_err(pg_error)?;
        if left.and_then(|row| row.get::<_, Option<i32>>(0)) == Some(0) {
            self.release_chord(tx, callback).await?;
        }
        Ok(())
    }

    /// Releases a chord callback whose members all succeeded: it gets their results, in header order, as its
    /// first argument (unless `immutable`) and joins its queue. If one's result is no longer stored, the
    /// callback fails with `ChordError` instead.
    async fn release_chord(&self, tx: &Tx<'_>, callback: &str) -> Result<(), StoreError> {
        let row = tx.query_one("SELECT spec FROM broker_tasks WHERE id = $1", &[&callback]).await.map_err(pg_error)?;
        let mut record = TaskRecord::decode(row.get(0))
            .map_err(|e| StoreError::Shared(format!("corrupt record {callback:?}: {e}")))?;
        let members = record.extra.as_ref().map(|e| e.members.clone()).unwrap_or_default();
        let mut results: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        for row in tx
            .query("SELECT id, result FROM broker_tasks WHERE id = ANY($1) AND state = 'SUCCESS'", &[&members])
            .await
            .map_err(pg_error)?
        {
            results.insert(row.get(0), row.get(1));
        }
        let mut values = Vec::with_capacity(members.len());
        for member in &members {
            match results.get(member) {
                Some(result) => {
                    let value = result.as_deref().map(|b| decode(member, b)).transpose();
                    values.push(value.map_err(|e| StoreError::Shared(e.to_string()))?.unwrap_or(Value::Nil));
                }
                None => {
                    let error = TaskError {
                        kind: "ChordError".into(),
                        message: format!("the result of chord member {member} is no longer stored (its TTL passed)"),
                        traceback: None,
                    };
                    if self.fail_callback(tx, callback, &error).await? {
                        self.after_failure(tx, vec![callback.to_string()]).await?;
                    }
                    return Ok(());
                }
            }
        }
        let now = self.now();
        let at = super::canvas::release_callback(&mut record, values, now);
        record.state = if at > now { TaskState::Scheduled } else { TaskState::Pending };
        record.eta_ms = (at > now).then_some(at);
        let mut spec = Vec::with_capacity(128 + record.payload.len());
        record.encode(&mut spec).map_err(|e| StoreError::Shared(format!("cannot encode {callback:?}: {e}")))?;
        tx.execute(
            "UPDATE broker_tasks SET state = $2, spec = $3, due_ms = $4, eta_ms = $5, pending = NULL,
                seq = nextval(pg_get_serial_sequence('broker_tasks', 'seq')) WHERE id = $1",
            &[&callback, &record.state.as_str(), &spec, &ms(at), &opt_ms(record.eta_ms)],
        )
        .await
        .map_err(pg_error)?;
        tx.execute("SELECT pg_notify('broker_ready', '')", &[]).await.map_err(pg_error)?;
        self.ready.notify_waiters();
        Ok(())
    }

    /// After tasks ended `FAILURE` or `REVOKED` (those of `ids` with a chain or in a chord): their chains' held
    /// links end the same way, with their error (`by_parent`: not in the dead set, they never ran), and their
    /// chords' callbacks fail with a `ChordError` naming them (and so on, for a callback's own chain).
    async fn after_failure(&self, tx: &Tx<'_>, mut ids: Vec<String>) -> Result<(), StoreError> {
        let now = self.now();
        while !ids.is_empty() {
            let rows = tx
                .query(
                    "SELECT id, state, error, spec FROM broker_tasks
                     WHERE id = ANY($1) AND (links IS NOT NULL OR chord_id IS NOT NULL)",
                    &[&ids],
                )
                .await
                .map_err(pg_error)?;
            ids = Vec::new();
            for row in rows {
                let (id, state, error): (&str, &str, Option<&[u8]>) = (row.get(0), row.get(1), row.get(2));
                let record = TaskRecord::decode(row.get(3))
                    .map_err(|e| StoreError::Shared(format!("corrupt record {id:?}: {e}")))?;
                let Some(extra) = record.extra else { continue };
                let error: Option<TaskError> =
                    error.map(|b| decode(id, b)).transpose().map_err(|e| StoreError::Shared(e.to_string()))?;
                if !extra.chain.is_empty() {
                    let links: Vec<&str> = extra.chain.iter().filter_map(|link| link.id.as_deref()).collect();
                    let theirs = error.clone().unwrap_or_else(|| TaskError {
                        kind: "Revoked".into(),
                        message: format!("task {id} of its chain was revoked"),
                        traceback: None,
                    });
                    tx.execute(
                        "UPDATE broker_tasks SET state = $2, revoked = ($2 = 'REVOKED'), error = $3, by_parent = true,
                            finished_at_ms = $4, result_expires_at_ms = $4 + result_ttl_ms
                         WHERE id = ANY($1) AND state = 'HELD'",
                        &[&links, &state, &encode(&theirs)?, &ms(now)],
                    )
                    .await
                    .map_err(pg_error)?;
                }
                if let Some((callback, _)) = &extra.chord {
                    let suffix = error.as_ref().map_or_else(String::new, |e| format!(": {}: {}", e.kind, e.message));
                    let error = TaskError {
                        kind: "ChordError".into(),
                        message: format!("chord member {id} ended {state}{suffix}"),
                        traceback: None,
                    };
                    if self.fail_callback(tx, callback, &error).await? {
                        ids.push(callback.clone());
                    }
                }
            }
        }
        tx.execute("SELECT pg_notify('broker_finished', '')", &[]).await.map_err(pg_error)?;
        self.finished.notify_waiters();
        Ok(())
    }

    /// Fails a chord's held callback (a member failed); whether it was held.
    async fn fail_callback(&self, tx: &Tx<'_>, callback: &str, error: &TaskError) -> Result<bool, StoreError> {
        let failed = tx
            .execute(
                "UPDATE broker_tasks SET state = 'FAILURE', error = $2, by_parent = true, pending = NULL,
                    finished_at_ms = $3, result_expires_at_ms = $3 + result_ttl_ms
                 WHERE id = $1 AND state = 'HELD'",
                &[&callback, &encode(error)?, &ms(self.now())],
            )
            .await
            .map_err(pg_error)?;
        Ok(failed > 0)
    }

    async fn lease(
        &self,
        tx: &Tx<'_>,
        conn: ConnId,
        queues: Vec<String>,
        max: usize,
        lease_ms: Option<u64>,
    ) -> Result<Vec<Grant>, StoreError> {
        let now = self.now();
        let mut grants: Vec<Grant> = Vec::new();
        // Several queues, in order, in the one transaction: a failure half-way leaves no task leased unreturned.
        // One reply budget for them all (the reply carries at least one task).
        for queue in &queues {
            let left = max.saturating_sub(grants.len());
            let used: usize = grants.iter().map(|g| g.payload.len() + 160).sum();
            if left == 0 || (used > 0 && used >= self.options.max_reply_bytes) {
                break;
            }
            let budget = if used == 0 { self.options.max_reply_bytes } else { self.options.max_reply_bytes - used };
            grants.extend(self.lease_from(tx, queue, left, lease_ms, now, budget).await?);
        }
        for grant in &grants {
            tx.taken(conn, &grant.id, grant.lease_id);
        }
        Ok(grants)
    }

    /// Leases up to `max` ready tasks of one queue: highest priority first, then in enqueue order.
    async fn lease_from(
        &self,
        client: &Tx<'_>,
        queue: &str,
        max: usize,
        lease_ms: Option<u64>,
        now: u64,
        budget: usize,
    ) -> Result<Vec<Grant>, StoreError> {
        // A reply stops adding tasks once their records reach max_reply_bytes (it always carries one), so it stays
        // deliverable; the rows locked past that are free again when the group commits.
        let statement = format!(
            "WITH picked AS (
                    SELECT id, octet_length(spec) AS size, priority, seq FROM broker_tasks
                    WHERE queue = $1 AND state IN {WAITING} AND due_ms <= $2
                      AND (expires_at_ms IS NULL OR expires_at_ms > $2)
                      AND NOT EXISTS (SELECT 1 FROM broker_paused WHERE queue = $1)
                    ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED),
                 sized AS (SELECT id, sum(size) OVER (ORDER BY priority DESC, seq ROWS UNBOUNDED PRECEDING) - size
                    AS before FROM picked)
                 UPDATE broker_tasks t SET state = 'STARTED', lease_id = {LEASE_ID},
                    cur_lease_ms = least(coalesce($4, t.lease_ms), $5),
                    deadline_ms = $2 + least(coalesce($4, t.lease_ms), $5),
                    attempts = t.attempts + 1, started_at_ms = $2, progress = NULL
                 FROM sized WHERE t.id = sized.id AND sized.before < $6
                 RETURNING t.id, t.lease_id, t.attempts, t.max_retries, t.deadline_ms, t.cur_lease_ms, t.priority,
                    t.seq, t.spec, t.due_ms"
        );
        let budget = ms(budget as u64);
        let rows = if self.limited.load(Ordering::Relaxed) {
            match self.pick_limited(client, queue, max, now, budget).await? {
                Some(ids) if !ids.is_empty() => {
                    let statement = format!(
                        "UPDATE broker_tasks t SET state = 'STARTED', lease_id = {LEASE_ID},
                            cur_lease_ms = least(coalesce($3, t.lease_ms), $4),
                            deadline_ms = $2 + least(coalesce($3, t.lease_ms), $4),
                            attempts = t.attempts + 1, started_at_ms = $2, progress = NULL
                         WHERE t.id = ANY($1)
                         RETURNING t.id, t.lease_id, t.attempts, t.max_retries, t.deadline_ms, t.cur_lease_ms,
                            t.priority, t.seq, t.spec, t.due_ms"
                    );
                    let params: Params<'_> = &[&ids, &ms(now), &opt_ms(lease_ms), &ms(self.options.max_lease_ms)];
                    client.query(&statement, params).await.map_err(pg_error)?
                }
                Some(_) => Vec::new(),
                None => {
                    let params: Params<'_> =
                        &[&queue, &ms(now), &(max as i64), &opt_ms(lease_ms), &ms(self.options.max_lease_ms), &budget];
                    client.query(&statement, params).await.map_err(pg_error)?
                }
            }
        } else {
            let params: Params<'_> =
                &[&queue, &ms(now), &(max as i64), &opt_ms(lease_ms), &ms(self.options.max_lease_ms), &budget];
            client.query(&statement, params).await.map_err(pg_error)?
        };
        let mut taken = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get("id");
            // The rows are leased already: an error now must roll the group back (`Shared`), or they would stay
            // leased with nobody told.
            let record = TaskRecord::decode(row.get("spec"))
                .map_err(|e| StoreError::Shared(format!("corrupt record {id:?}: {e}")))?;
            let priority: i32 = row.get("priority");
            let seq: i64 = row.get("seq");
            let grant = Grant {
                lease_id: u64::try_from(row.get::<_, i64>("lease_id")).unwrap_or(0),
                queue: queue.to_string(),
                task: record.task,
                payload: record.payload,
                attempt: u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0),
                max_retries: u32::try_from(row.get::<_, i64>("max_retries")).unwrap_or(0),
                deadline_ms: u64::try_from(row.get::<_, i64>("deadline_ms")).unwrap_or(0),
                lease_ms: u64::try_from(row.get::<_, i64>("cur_lease_ms")).unwrap_or(0),
                id,
            };
            // It waited since it was due (enqueued, made due, or given back).
            let waited = Some((false, u64::try_from(row.get::<_, i64>("due_ms")).unwrap_or(now)));
            self.happened_after(client, &grant.id, queue, &grant.task, MetricOutcome::started, waited);
            taken.push(((std::cmp::Reverse(priority), seq), grant));
        }
        // RETURNING keeps no order: priority, then enqueue order, as the lease picked them.
        taken.sort_by_key(|(key, _)| *key);
        Ok(taken.into_iter().map(|(_, grant)| grant).collect())
    }

    /// With limits set: the tasks of `queue` a lease may start now (in order, passing over task names whose
    /// limit holds them back), their buckets charged; `None` if no limit covers this queue or the tasks looked at
    /// (the plain lease then runs). The limits' rows are locked (queue first, then task names in order), so
    /// leases through every daemon count against the same buckets and running counts.
    async fn pick_limited(
        &self,
        client: &Tx<'_>,
        queue: &str,
        max: usize,
        now: u64,
        budget: i64,
    ) -> Result<Option<Vec<String>>, StoreError> {
        if client
            .query_opt("SELECT 1 FROM broker_paused WHERE queue = $1", &[&queue])
            .await
            .map_err(pg_error)?
            .is_some()
        {
            return Ok(Some(Vec::new()));
        }
        // A limit row another daemon's lease holds is passed over: no room this round (its group commits soon, and
        // waiting leases look again at each tick while limits exist). Waiting for it could deadlock two groups.
        const LIMIT: &str = "SELECT name, concurrency, per_ms, burst, tokens, refilled_ms FROM broker_limits
            WHERE scope = $1 AND name = ANY($2) ORDER BY name FOR UPDATE SKIP LOCKED";
        const ANY_LIMIT: &str = "SELECT name FROM broker_limits WHERE scope = $1 AND name = ANY($2)";
        let queue_names = vec![queue.to_string()];
        let queue_limit = client.query(LIMIT, &[&"queue", &queue_names]).await.map_err(pg_error)?;
        if queue_limit.is_empty()
            && !client.query(ANY_LIMIT, &[&"queue", &queue_names]).await.map_err(pg_error)?.is_empty()
        {
            return Ok(Some(Vec::new()));
        }
        let candidates = client
            .query(
                &format!(
                    "SELECT id, task, octet_length(spec) FROM broker_tasks
                     WHERE queue = $1 AND state IN {WAITING} AND due_ms <= $2
                       AND (expires_at_ms IS NULL OR expires_at_ms > $2)
                     ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED"
                ),
                &[&queue, &ms(now), &(max.saturating_mul(4).saturating_add(16) as i64)],
            )
            .await
            .map_err(pg_error)?;
        let mut names: Vec<String> = candidates.iter().map(|row| row.get::<_, String>(1)).collect();
        names.sort_unstable();
        names.dedup();
        let task_limits = client.query(LIMIT, &[&"task", &names]).await.map_err(pg_error)?;
        // Names whose limit row another lease holds: none of them this round.
        let mut busy: HashSet<String> =
            client.query(ANY_LIMIT, &[&"task", &names]).await.map_err(pg_error)?.iter().map(|r| r.get(0)).collect();
        for row in &task_limits {
            busy.remove(row.get::<_, &str>(0));
        }
        if queue_limit.is_empty() && task_limits.is_empty() && busy.is_empty() {
            return Ok(None);
        }
        /// A limit's room now: starts its bucket allows, and its concurrency less what runs.
        struct Room {
            left: u64,
            tokens: Option<f64>,
        }
        let room = |row: &Row, running: i64| {
            let concurrency: Option<i32> = row.get(1);
            let per_ms: Option<f64> = row.get(2);
            let (burst, tokens, at): (Option<f64>, f64, i64) = (row.get(3), row.get(4), row.get(5));
            let tokens = per_ms
                .map(|per_ms| (tokens + (ms(now) - at).max(0) as f64 * per_ms).min(burst.unwrap_or(1.0).max(1.0)));
            let by_rate = tokens.map_or(u64::MAX, |t| t.max(0.0).floor() as u64);
            let by_slots = concurrency.map_or(u64::MAX, |c| (i64::from(c) - running).max(0) as u64);
            Room { left: by_rate.min(by_slots), tokens }
        };
        let running_in = |column: &'static str, name: String| async move {
            let sql = format!("SELECT count(*) FROM broker_tasks WHERE state = 'STARTED' AND {column} = $1");
            let row = client.query_one(&sql, &[&name]).await.map_err(pg_error)?;
            Ok::<i64, StoreError>(row.get(0))
        };
        let mut queue_room = match queue_limit.first() {
            Some(row) => Some(room(row, running_in("queue", queue.to_string()).await?)),
            None => None,
        };
        let mut rooms = HashMap::new();
        for row in &task_limits {
            let name: String = row.get(0);
            let running = running_in("task", name.clone()).await?;
            rooms.insert(name, room(row, running));
        }
        let mut chosen = Vec::new();
        let mut used: HashMap<String, u64> = HashMap::new();
        let mut bytes = 0;
        for row in &candidates {
            if chosen.len() >= max || queue_room.as_ref().is_some_and(|r| r.left == 0) || bytes as i64 >= budget {
                break;
            }
            let (id, task): (String, String) = (row.get(0), row.get(1));
            if busy.contains(&task) {
                continue;
            }
            if let Some(room) = rooms.get_mut(&task) {
                if room.left == 0 {
                    continue;
                }
                room.left -= 1;
                *used.entry(task).or_default() += 1;
            }
            if let Some(room) = &mut queue_room {
                room.left -= 1;
            }
            bytes += row.get::<_, i32>(2).max(0) as usize;
            chosen.push(id);
        }
        // Charge the buckets (the rows are locked): what they held at `now`, less the starts taken.
        let charge = "UPDATE broker_limits SET tokens = $3, refilled_ms = $4 WHERE scope = $1 AND name = $2";
        if let Some(tokens) = queue_room.as_ref().and_then(|r| r.tokens) {
            let left = tokens - chosen.len() as f64;
            client.execute(charge, &[&"queue", &queue, &left, &ms(now)]).await.map_err(pg_error)?;
        }
        for (name, room) in &rooms {
            if let Some(tokens) = room.tokens {
                let left = tokens - used.get(name).copied().unwrap_or(0) as f64;
                client.execute(charge, &[&"task", name, &left, &ms(now)]).await.map_err(pg_error)?;
            }
        }
        Ok(Some(chosen))
    }

    async fn set_paused(&self, client: &Tx<'_>, queue: &str, paused: bool) -> Result<bool, StoreError> {
        super::validate_queue(queue)?;
        let changed = if paused {
            client.execute("INSERT INTO broker_paused (queue) VALUES ($1) ON CONFLICT DO NOTHING", &[&queue]).await
        } else {
            client.execute("DELETE FROM broker_paused WHERE queue = $1", &[&queue]).await
        }
        .map_err(pg_error)?;
        if !paused && changed > 0 {
            client.execute("SELECT pg_notify('broker_ready', '')", &[]).await.map_err(pg_error)?;
        }
        // Was paused: a pause that changed nothing, or a resume that did.
        Ok((changed > 0) != paused)
    }

    async fn set_limit(&self, client: &Tx<'_>, scope: &str, name: &str, limit: Limit) -> Result<(), StoreError> {
        match scope {
            "task" => super::validate_name("name", name)?,
            _ => super::validate_queue(name)?,
        }
        if limit.concurrency == Some(0) {
            return Err(StoreError::Invalid("`concurrency` must be at least 1 (pause the queue to stop it)".into()));
        }
        let per_second = limit.rate.as_deref().map(super::flow::parse_rate).transpose()?;
        if limit.rate.is_none() && limit.concurrency.is_none() {
            client
                .execute("DELETE FROM broker_limits WHERE scope = $1 AND name = $2", &[&scope, &name])
                .await
                .map_err(pg_error)?;
        } else {
            let concurrency = limit.concurrency.map(|c| i32::try_from(c).unwrap_or(i32::MAX));
            let per_ms = per_second.map(|r| r / 1000.0);
            let burst = per_second.map(|r| (r / 10.0).max(1.0));
            // The same limit again (workers declare theirs at every start) keeps its bucket: a restart must not
            // allow another burst. A new one starts full.
            client
                .execute(
                    "INSERT INTO broker_limits (scope, name, rate, concurrency, per_ms, burst, tokens, refilled_ms)
                     VALUES ($1, $2, $3::text, $4::integer, $5::float8, $6::float8, coalesce($6::float8, 0), $7)
                     ON CONFLICT (scope, name) DO UPDATE SET rate = $3::text, concurrency = $4::integer,
                        per_ms = $5::float8, burst = $6::float8, tokens = coalesce($6::float8, 0), refilled_ms = $7
                     WHERE broker_limits.rate IS DISTINCT FROM $3::text
                        OR broker_limits.concurrency IS DISTINCT FROM $4::integer",
                    &[&scope, &name, &limit.rate, &concurrency, &per_ms, &burst, &ms(self.now())],
                )
                .await
                .map_err(pg_error)?;
        }
        client.execute("SELECT pg_notify('broker_flow', '')", &[]).await.map_err(pg_error)?;
        self.limited.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn limits(&self, client: &Tx<'_>) -> Result<Vec<broker_client::proto::LimitInfo>, StoreError> {
        let rows = client
            .query(
                "SELECT l.scope, l.name, l.rate, l.concurrency, (SELECT count(*) FROM broker_tasks t
                    WHERE t.state = 'STARTED' AND CASE WHEN l.scope = 'task' THEN t.task ELSE t.queue END = l.name)
                 FROM broker_limits l ORDER BY l.scope = 'queue', l.name",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .iter()
            .map(|row| broker_client::proto::LimitInfo {
                scope: row.get(0),
                name: row.get(1),
                rate: row.get(2),
                concurrency: row.get::<_, Option<i32>>(3).map(|c| c.max(0) as u32),
                running: row.get::<_, i64>(4).max(0) as u32,
            })
            .collect())
    }

    /// Why an outcome for a lease changed nothing: the task was revoked while it ran (it is finished `REVOKED`
    /// now, and the outcome dropped), or the lease is not held.
    async fn refused(&self, client: &Tx<'_>, id: &str, lease_id: u64) -> Result<StoreError, StoreError> {
        let now = self.now();
        let revoked = client
            .query_opt(
                "WITH done AS (
                    UPDATE broker_tasks SET state = 'REVOKED', lease_id = NULL, deadline_ms = NULL,
                        finished_at_ms = $3, result_expires_at_ms = $3 + result_ttl_ms
                    WHERE id = $1 AND lease_id = $2 AND state = 'STARTED' AND revoked RETURNING id, queue, task)
                 SELECT queue, task, pg_notify('broker_finished', '') FROM done",
                &[&id, &(lease_id as i64), &ms(now)],
            )
            .await
            .map_err(pg_error)?;
        client.ended(id, lease_id);
        if let Some(row) = revoked {
            self.happened(client, id, row.get(0), row.get(1), MetricOutcome::revoked);
            self.after_failure(client, vec![id.to_string()]).await?;
            self.finished.notify_waiters();
            return Ok(StoreError::Revoked(id.to_string()));
        }
        Ok(StoreError::LeaseLost { id: id.to_string(), lease_id })
    }

    /// Acks, in one statement; each one's outcome (a lease not held, or a task revoked while it ran, are that
    /// ack's refusal).
    async fn ack_many(
        &self,
        client: &Tx<'_>,
        acks: Vec<(String, u64, Value)>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let now = self.now();
        let mut ids = Vec::with_capacity(acks.len());
        let mut lease_ids = Vec::with_capacity(acks.len());
        let mut results = Vec::with_capacity(acks.len());
        let mut seen = HashSet::new();
        for (id, lease_id, result) in &acks {
            // The same ack twice: the first one's result is stored, the next is refused (after it).
            if seen.insert((id.as_str(), *lease_id)) {
                ids.push(id.as_str());
                lease_ids.push(*lease_id as i64);
                results.push(encode(result)?);
            }
        }
        let statement =
            "WITH a AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS a(id, lease_id, result)),
            done AS (UPDATE broker_tasks t SET state = 'SUCCESS', result = a.result, error = NULL, lease_id = NULL,
                    deadline_ms = NULL, finished_at_ms = $4::bigint, result_expires_at_ms = $4::bigint + t.result_ttl_ms
                FROM a WHERE t.id = a.id AND t.lease_id = a.lease_id AND t.state = 'STARTED' AND NOT t.revoked
                RETURNING t.id, a.lease_id, t.queue, t.links IS NOT NULL OR t.chord_id IS NOT NULL AS follows, t.task,
                    t.started_at_ms)
            SELECT id, lease_id, queue, follows, task, started_at_ms, pg_notify('broker_finished', '') FROM done";
        let rows = client.query(statement, &[&ids, &lease_ids, &results, &ms(now)]).await.map_err(pg_error)?;
        type Done<'r> = (String, bool, &'r str, Option<i64>);
        let mut done: HashMap<(String, i64), Done<'_>> = rows
            .iter()
            .map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3), row.get(4), row.get(5))))
            .collect();
        let mut outcomes = Vec::with_capacity(acks.len());
        // Chord callbacks and how many of their members these acks are, counted in id order.
        let mut members: std::collections::BTreeMap<String, i32> = std::collections::BTreeMap::new();
        for (id, lease_id, result) in &acks {
            // A task acked twice in one statement is updated once: the first ack has it, the next is refused.
            match done.remove(&(id.clone(), *lease_id as i64)) {
                Some((queue, follows, task, started)) => {
                    let ran = started.map(|at| (true, u64::try_from(at).unwrap_or(0)));
                    self.happened_after(client, id, &queue, task, MetricOutcome::succeeded, ran);
                    if follows {
                        if let Some(callback) = self.after_success(client, id, result).await? {
                            *members.entry(callback).or_default() += 1;
                        }
                    }
                    client.ended(id, *lease_id);
                    outcomes.push(Ok(()));
                }
                None => outcomes.push(Err(self.refused(client, id, *lease_id).await?)),
            }
        }
        for (callback, count) in members {
            self.count_members(client, &callback, count).await?;
        }
        if !rows.is_empty() {
            self.finished.notify_waiters();
        }
        Ok(outcomes)
    }

    async fn fail(&self, tx: &Tx<'_>, request: Fail) -> Result<FailOutcome, StoreError> {
        let Fail { task_id: id, lease_id, error, retry, countdown_ms } = request;
        let id = id.as_str();
        let now = self.now();
        let error_bytes = encode(&error)?;
        let row = tx
            .query_opt(
                "SELECT attempts, queue, spec, started_at_ms FROM broker_tasks
                 WHERE id = $1 AND lease_id = $2 AND state = 'STARTED' AND NOT revoked FOR UPDATE",
                &[&id, &(lease_id as i64)],
            )
            .await
            .map_err(pg_error)?;
        let Some(row) = row else { return Err(self.refused(tx, id, lease_id).await?) };
        let mut record = TaskRecord::decode(row.get("spec"))
            .map_err(|e| StoreError::Corrupt { id: id.to_string(), message: e.to_string() })?;
        record.attempts = u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0);
        let queue: String = row.get("queue");
        let follows = record.extra.as_ref().is_some_and(|e| !e.chain.is_empty() || e.chord.is_some());
        let outcome = if retry && record.attempts <= record.max_retries {
            let retry_at = now.saturating_add(countdown_ms.unwrap_or_else(|| record.backoff_ms()));
            tx.execute(
                "UPDATE broker_tasks SET state = 'RETRY', error = $2, lease_id = NULL, deadline_ms = NULL,
                    due_ms = $3, eta_ms = $3 WHERE id = $1",
                &[&id, &error_bytes, &ms(retry_at)],
            )
            .await
            .map_err(pg_error)?;
            if retry_at <= now {
                tx.execute("SELECT pg_notify('broker_ready', '')", &[]).await.map_err(pg_error)?;
            }
            FailOutcome { state: TaskState::Retry, retry_at_ms: Some(retry_at) }
        } else {
            let ttl = self.options.dead_ttl_ms.max(record.result_ttl_ms).min(MAX_TTL_MS);
            tx.execute(
                "UPDATE broker_tasks SET state = 'FAILURE', error = $2, lease_id = NULL, deadline_ms = NULL,
                    finished_at_ms = $3, result_expires_at_ms = $4 WHERE id = $1",
                &[&id, &error_bytes, &ms(now), &ms(now.saturating_add(ttl))],
            )
            .await
            .map_err(pg_error)?;
            tx.execute("SELECT pg_notify('broker_finished', '')", &[]).await.map_err(pg_error)?;
            if follows {
                self.after_failure(tx, vec![id.to_string()]).await?;
            }
            FailOutcome { state: TaskState::Failure, retry_at_ms: None }
        };
        tx.ended(id, lease_id);
        let ran = row.get::<_, Option<i64>>("started_at_ms").map(|at| (true, u64::try_from(at).unwrap_or(0)));
        self.happened_after(tx, id, &queue, &record.task, MetricOutcome::failed, ran);
        let then = if outcome.state == TaskState::Retry { MetricOutcome::retried } else { MetricOutcome::dead };
        self.happened(tx, id, &queue, &record.task, then);
        if outcome.state == TaskState::Retry {
            self.ready.notify_waiters();
        } else {
            self.finished.notify_waiters();
        }
        Ok(outcome)
    }

    async fn extend(
        &self,
        client: &Tx<'_>,
        id: &str,
        lease_id: u64,
        lease_ms: Option<u64>,
    ) -> Result<(u64, bool), StoreError> {
        let now = self.now();
        let row = client
            .query_opt(
                "UPDATE broker_tasks SET cur_lease_ms = least(coalesce($3, cur_lease_ms), $4),
                    deadline_ms = $5 + least(coalesce($3, cur_lease_ms), $4)
                 WHERE id = $1 AND lease_id = $2 AND state = 'STARTED' RETURNING deadline_ms, revoked",
                &[&id, &(lease_id as i64), &opt_ms(lease_ms), &ms(self.options.max_lease_ms), &ms(now)],
            )
            .await
            .map_err(pg_error)?;
        let row = row.ok_or_else(|| StoreError::LeaseLost { id: id.to_string(), lease_id })?;
        Ok((u64::try_from(row.get::<_, i64>(0)).unwrap_or(0), row.get(1)))
    }

    async fn progress(&self, client: &Tx<'_>, id: &str, lease_id: u64, progress: Progress) -> Result<bool, StoreError> {
        super::validate_name("state", &progress.state)?;
        let progress = encode(&progress)?;
        let row = client
            .query_opt(
                "UPDATE broker_tasks SET progress = $3
                 WHERE id = $1 AND lease_id = $2 AND state = 'STARTED' RETURNING revoked",
                &[&id, &(lease_id as i64), &progress],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.ok_or_else(|| StoreError::LeaseLost { id: id.to_string(), lease_id })?.get(0))
    }

    async fn release(&self, client: &Tx<'_>, id: &str, lease_id: u64) -> Result<(), StoreError> {
        let now = self.now();
        // The attempt does not count; a revoked task is finished instead.
        let row = client
            .query_opt(
                "WITH done AS (
                    UPDATE broker_tasks SET lease_id = NULL, deadline_ms = NULL, started_at_ms = NULL,
                        state = CASE WHEN revoked THEN 'REVOKED' ELSE 'PENDING' END,
                        attempts = CASE WHEN revoked THEN attempts ELSE greatest(attempts - 1, 0) END,
                        due_ms = $3::bigint,
                        finished_at_ms = CASE WHEN revoked THEN $3::bigint END,
                        result_expires_at_ms = CASE WHEN revoked THEN $3::bigint + result_ttl_ms END
                    WHERE id = $1 AND lease_id = $2 AND state = 'STARTED' RETURNING state, queue, task)
                 SELECT state, queue, task, pg_notify(CASE WHEN state = 'REVOKED' THEN 'broker_finished' ELSE 'broker_ready' END, '')
                 FROM done",
                &[&id, &(lease_id as i64), &ms(now)],
            )
            .await
            .map_err(pg_error)?;
        client.ended(id, lease_id);
        let row = row.ok_or_else(|| StoreError::LeaseLost { id: id.to_string(), lease_id })?;
        if row.get::<_, &str>(0) == "REVOKED" {
            self.happened(client, id, row.get(1), row.get(2), MetricOutcome::revoked);
            self.after_failure(client, vec![id.to_string()]).await?;
        }
        self.ready.notify_waiters();
        self.finished.notify_waiters();
        Ok(())
    }

    /// Ends leases without an outcome (`pairs` of task and lease, or every lapsed one when `None`): each task
    /// goes back to its queue with the attempt counted, or is finished `REVOKED` if it was revoked, or dies once
    /// it lost `max_lease_losses` leases. `count`: whether the loss counts towards that (not at shutdown).
    async fn lose_leases(
        &self,
        client: &Tx<'_>,
        pairs: Option<Vec<(String, u64)>>,
        why: &str,
        count: bool,
    ) -> Result<u64, StoreError> {
        let now = self.now();
        let max_losses = i32::try_from(self.options.max_lease_losses).unwrap_or(i32::MAX);
        let lost = encode(&TaskError {
            kind: "LeaseLost".into(),
            message: format!("lease lost {max_losses} times ({why}); giving up"),
            traceback: None,
        })?;
        let set = format!(
            "lease_losses = t.lease_losses + $2,
             state = CASE WHEN t.revoked THEN 'REVOKED' WHEN t.lease_losses + $2 >= $3 THEN 'FAILURE'
                ELSE 'PENDING' END,
             error = CASE WHEN NOT t.revoked AND t.lease_losses + $2 >= $3 THEN $4 ELSE t.error END,
             finished_at_ms = CASE WHEN t.revoked OR t.lease_losses + $2 >= $3 THEN $1::bigint END,
             result_expires_at_ms = CASE WHEN t.revoked THEN $1::bigint + t.result_ttl_ms
                WHEN t.lease_losses + $2 >= $3 THEN $1::bigint + greatest(t.result_ttl_ms, {dead_ttl}) END,
             lease_id = NULL, deadline_ms = NULL, started_at_ms = NULL, due_ms = $1",
            dead_ttl = ms(self.options.dead_ttl_ms.min(MAX_TTL_MS))
        );
        let counted = i32::from(count);
        let rows = match pairs {
            None => {
                client
                    .query(
                        &format!(
                            "WITH old AS (SELECT id, lease_id FROM broker_tasks
                                WHERE state = 'STARTED' AND deadline_ms < $1 FOR UPDATE SKIP LOCKED),
                             lost AS (UPDATE broker_tasks t SET {set} FROM old WHERE t.id = old.id
                                RETURNING t.id, old.lease_id, t.state, t.queue, t.task)
                             SELECT id, lease_id, state, queue, task FROM lost"
                        ),
                        &[&ms(now), &counted, &max_losses, &lost],
                    )
                    .await
            }
            Some(pairs) => {
                let (ids, lease_ids): (Vec<String>, Vec<i64>) =
                    pairs.into_iter().map(|(id, lease_id)| (id, lease_id as i64)).unzip();
                client
                    .query(
                        &format!(
                            "WITH lost AS (UPDATE broker_tasks t SET {set}
                                FROM unnest($5::text[], $6::bigint[]) AS l(id, lease_id)
                                WHERE t.id = l.id AND t.lease_id = l.lease_id AND t.state = 'STARTED'
                                RETURNING t.id, l.lease_id, t.state, t.queue, t.task)
                             SELECT id, lease_id, state, queue, task FROM lost"
                        ),
                        &[&ms(now), &counted, &max_losses, &lost, &ids, &lease_ids],
                    )
                    .await
            }
        }
        .map_err(pg_error)?;
        if rows.is_empty() {
            return Ok(0);
        }
        for row in &rows {
            let (id, state, queue, task): (&str, &str, &str, &str) = (row.get(0), row.get(2), row.get(3), row.get(4));
            self.happened(client, id, queue, task, MetricOutcome::lease_lost);
            match state {
                "FAILURE" => self.happened(client, id, queue, task, MetricOutcome::dead),
                "REVOKED" => self.happened(client, id, queue, task, MetricOutcome::revoked),
                _ => {}
            }
        }
        let ended: Vec<String> =
            rows.iter().filter(|row| row.get::<_, &str>(2) != "PENDING").map(|row| row.get(0)).collect();
        let finished = !ended.is_empty();
        if finished {
            self.after_failure(client, ended).await?;
        }
        for row in &rows {
            client.ended(row.get(0), u64::try_from(row.get::<_, i64>(1)).unwrap_or(0));
        }
        client
            .execute(
                if finished {
                    "SELECT pg_notify('broker_ready', ''), pg_notify('broker_finished', '')"
                } else {
                    "SELECT pg_notify('broker_ready', '')"
                },
                &[],
            )
            .await
            .map_err(pg_error)?;
        self.ready.notify_waiters();
        self.finished.notify_waiters();
        Ok(rows.len() as u64)
    }

    async fn release_connection(&self, tx: &Tx<'_>, conn: ConnId, shutting_down: bool) -> Result<usize, StoreError> {
        // Those it held when this transaction began, and those it took in it (earlier in the group).
        let mut pairs = self.held.lock().unwrap_or_else(|p| p.into_inner()).of_conn(conn);
        pairs.extend(tx.taken_by(conn));
        if pairs.is_empty() {
            return Ok(0);
        }
        let why = if shutting_down { "daemon shutting down" } else { "worker disconnected" };
        Ok(self.lose_leases(tx, Some(pairs), why, !shutting_down).await? as usize)
    }

    async fn get(&self, client: &Tx<'_>, id: &str) -> Result<TaskRecord, StoreError> {
        let statement = format!("SELECT {COLUMNS} FROM broker_tasks WHERE id = $1");
        let row = client.query_opt(&statement, &[&id]).await.map_err(pg_error)?;
        Self::record_of(&row.ok_or_else(|| StoreError::NotFound(id.to_string()))?)
    }

    async fn in_dead_set(&self, client: &Tx<'_>, id: &str) -> Result<bool, StoreError> {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM broker_tasks WHERE id = $1 AND state = 'FAILURE' AND NOT by_parent)",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// Deletes a finished task, as the single node does: with the unique key it held (a key held for a time
    /// after the task finished is free from then on, as it is once no task holds it); a chord still waiting for
    /// it (it succeeded) fails when its other members are done, as when its result expires first.
    async fn delete_finished(&self, client: &Tx<'_>, id: &str) -> Result<(), StoreError> {
        // Every part of the statement sees the table as it was before it: the last column is the task's state
        // then, which says why nothing was deleted.
        let row = client
            .query_one(
                "WITH gone AS (
                    DELETE FROM broker_tasks WHERE id = $1 AND state IN ('SUCCESS', 'FAILURE', 'REVOKED') RETURNING id),
                 keys AS (DELETE FROM broker_unique WHERE task_id IN (SELECT id FROM gone))
                 SELECT (SELECT count(*) FROM gone), (SELECT state FROM broker_tasks WHERE id = $1)",
                &[&id],
            )
            .await
            .map_err(pg_error)?;
        let (deleted, state): (i64, Option<&str>) = (row.get(0), row.get(1));
        match state {
            _ if deleted > 0 => Ok(()),
            None => Err(StoreError::NotFound(id.to_string())),
            Some(_) => Err(StoreError::Invalid(format!("task {id:?} has not finished: revoke it first"))),
        }
    }

    /// What this daemon's connections run now: the tasks of the leases it handed them ([`Held`]) that still
    /// hold them. Other daemons' workers are theirs to show.
    async fn running_by_conn(&self, client: &Tx<'_>, limit: usize) -> Result<Vec<(ConnId, Vec<Running>)>, StoreError> {
        let leases: HashMap<String, (ConnId, u64)> = self.held.lock().unwrap_or_else(|p| p.into_inner()).by_id.clone();
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = leases.keys().map(String::as_str).collect();
        let lease_ids: Vec<i64> = ids.iter().map(|id| leases[*id].1 as i64).collect();
        let rows = client
            .query(
                "SELECT t.id, t.task, t.started_at_ms FROM broker_tasks t
                 JOIN unnest($1::text[], $2::bigint[]) AS l(id, lease_id) ON t.id = l.id AND t.lease_id = l.lease_id
                 WHERE t.state = 'STARTED'",
                &[&ids, &lease_ids],
            )
            .await
            .map_err(pg_error)?;
        let mut by_conn: HashMap<ConnId, Vec<Running>> = HashMap::new();
        for row in rows {
            let (id, task, started): (String, String, Option<i64>) = (row.get(0), row.get(1), row.get(2));
            let Some(&(conn, _)) = leases.get(&id) else { continue };
            by_conn.entry(conn).or_default().push((id, task, unms(started).unwrap_or(0)));
        }
        Ok(by_conn
            .into_iter()
            .map(|(conn, mut running)| {
                running.sort_by_key(|(_, _, started)| *started);
                running.truncate(limit);
                (conn, running)
            })
            .collect())
    }

    async fn revoke(&self, client: &Tx<'_>, id: &str) -> Result<TaskState, StoreError> {
        let now = self.now();
        let row = client
            .query_one(
                &format!(
                    "WITH waiting AS (
                        UPDATE broker_tasks SET state = 'REVOKED', revoked = true, finished_at_ms = $2::bigint,
                            result_expires_at_ms = $2::bigint + result_ttl_ms
                        WHERE id = $1 AND (state IN {WAITING} OR (state = '{HELD}' AND pending IS NOT NULL))
                        RETURNING id, queue, task),
                     running AS (
                        UPDATE broker_tasks SET revoked = true WHERE id = $1 AND state = 'STARTED' RETURNING id)
                     SELECT (SELECT count(*) FROM waiting), (SELECT count(*) FROM running),
                        (SELECT state FROM broker_tasks WHERE id = $1),
                        (SELECT pg_notify('broker_finished', '') FROM waiting),
                        (SELECT queue FROM waiting), (SELECT task FROM waiting)"
                ),
                &[&id, &ms(now)],
            )
            .await
            .map_err(pg_error)?;
        let (waiting, running): (i64, i64) = (row.get(0), row.get(1));
        if waiting > 0 {
            self.happened(client, id, row.get(4), row.get(5), MetricOutcome::revoked);
            self.after_failure(client, vec![id.to_string()]).await?;
            self.finished.notify_waiters();
            return Ok(TaskState::Revoked);
        }
        if running > 0 {
            return Ok(TaskState::Started);
        }
        let state: Option<&str> = row.get(2);
        let state = state.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        state_of(state).map_err(|message| StoreError::Corrupt { id: id.to_string(), message })
    }

    async fn purge(&self, client: &Tx<'_>, queue: &str) -> Result<u64, StoreError> {
        let rows = client
            .query(
                &format!(
                    "DELETE FROM broker_tasks WHERE queue = $1 AND state IN {WAITING} RETURNING id, chord_id, links"
                ),
                &[&queue],
            )
            .await
            .map_err(pg_error)?;
        // A purged task's links not enqueued yet go with it.
        let links: Vec<String> = rows.iter().filter_map(|row| row.get::<_, Option<Vec<String>>>(2)).flatten().collect();
        if !links.is_empty() {
            client
                .execute("DELETE FROM broker_tasks WHERE id = ANY($1) AND state = 'HELD'", &[&links])
                .await
                .map_err(pg_error)?;
        }
        // A purged member will never succeed: its chord fails now rather than wait for ever.
        let mut failed = Vec::new();
        for row in &rows {
            let (id, callback): (&str, Option<String>) = (row.get(0), row.get(1));
            let Some(callback) = callback else { continue };
            let error = TaskError {
                kind: "ChordError".into(),
                message: format!("chord member {id} was purged"),
                traceback: None,
            };
            if self.fail_callback(client, &callback, &error).await? {
                failed.push(callback);
            }
        }
        if !failed.is_empty() {
            self.after_failure(client, failed).await?;
        }
        Ok(rows.len() as u64)
    }

    async fn dead_list(
        &self,
        client: &Tx<'_>,
        queue: Option<String>,
        limit: usize,
    ) -> Result<Vec<TaskInfo>, StoreError> {
        let rows = client
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM broker_tasks
                     WHERE state = 'FAILURE' AND NOT by_parent AND ($1::text IS NULL OR queue = $1)
                     ORDER BY finished_at_ms, id LIMIT $2"
                ),
                &[&queue, &(limit as i64)],
            )
            .await
            .map_err(pg_error)?;
        rows.iter().map(|row| Self::record_of(row).map(|record| record.info())).collect()
    }

    async fn dead_requeue(&self, client: &Tx<'_>, request: DeadRequeue) -> Result<u64, StoreError> {
        let now = self.now();
        let rows = client
            .query(
                "WITH back AS (
                    UPDATE broker_tasks SET state = 'PENDING', attempts = 0, lease_losses = 0, error = NULL,
                        finished_at_ms = NULL, result_expires_at_ms = NULL, eta_ms = NULL, due_ms = $3
                    WHERE state = 'FAILURE' AND NOT by_parent AND (id = ANY($1) OR $2 = '*' OR queue = $2)
                    RETURNING id, spec)
                 SELECT id, spec, pg_notify('broker_ready', '') FROM back",
                &[&request.ids, &request.queue, &ms(now)],
            )
            .await
            .map_err(pg_error)?;
        // A task back in its queue holds its unique key again (as the single node's does), if it still holds.
        let mut claims: Vec<(String, &str, Option<i64>)> = Vec::new();
        for row in &rows {
            let id: &str = row.get(0);
            let record = TaskRecord::decode(row.get(1))
                .map_err(|e| StoreError::Shared(format!("corrupt record {id:?}: {e}")))?;
            let Some(extra) = record.extra else { continue };
            let Some(key) = extra.unique_key else { continue };
            if extra.unique_until_ms.is_none_or(|until| until > now) {
                claims.push((key, id, opt_ms(extra.unique_until_ms)));
            }
        }
        claims.sort();
        for (key, id, until) in &claims {
            client
                .execute(
                    "INSERT INTO broker_unique (key, task_id, until_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO UPDATE SET task_id = excluded.task_id, until_ms = excluded.until_ms",
                    &[key, id, until],
                )
                .await
                .map_err(pg_error)?;
        }
        if !rows.is_empty() {
            self.ready.notify_waiters();
        }
        Ok(rows.len() as u64)
    }

    async fn stats(&self, client: &Tx<'_>) -> Result<StoreStats, StoreError> {
        let now = self.now();
        let rows = client
            .query(
                "SELECT queue, CASE WHEN by_parent THEN 'BY_PARENT' ELSE state END, due_ms <= $1 AS due, count(*)
                 FROM broker_tasks GROUP BY 1, 2, 3 ORDER BY 1",
                &[&ms(now)],
            )
            .await
            .map_err(pg_error)?;
        let paused = client.query("SELECT queue FROM broker_paused", &[]).await.map_err(pg_error)?;
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut queues: Vec<QueueStats> = Vec::new();
        let mut results_stored = 0;
        for row in rows {
            let (queue, state, due, count): (String, &str, bool, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let count = count as u64;
            if queues.last().is_none_or(|q| q.name != queue) {
                let (succeeded, failed) = counts.per_queue.get(&queue).copied().unwrap_or_default();
                queues.push(QueueStats { name: queue, succeeded, failed, ..QueueStats::default() });
            }
            let q = queues.last_mut().expect("just pushed");
            match state {
                "PENDING" => q.ready += count,
                "SCHEDULED" | "RETRY" if due => q.ready += count,
                "SCHEDULED" | "RETRY" => q.scheduled += count,
                "STARTED" => q.leased += count,
                HELD => {}
                "FAILURE" => {
                    q.dead += count;
                    results_stored += count;
                }
                _ => results_stored += count,
            }
        }
        for row in &paused {
            let queue: String = row.get(0);
            match queues.iter_mut().find(|q| q.name == queue) {
                Some(q) => q.paused = true,
                None => queues.push(QueueStats { name: queue, paused: true, ..QueueStats::default() }),
            }
        }
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let leases_by_conn = held.by_conn.iter().map(|(conn, ids)| (*conn, ids.len() as u64)).collect();
        Ok(StoreStats { queues, totals: counts.totals.clone(), results_stored, leases_by_conn })
    }

    /// Periodic work, each step on its own (one failing does not hold up the others); the first error, if any.
    async fn tick(&self) -> Result<(), StoreError> {
        let steps = [
            self.measure_clock().await,
            self.read_limited().await,
            self.in_transaction(|tx, inner| Box::pin(inner.lose_leases(tx, None, "lease expired", true)))
                .await
                .map(drop),
            self.in_transaction(|tx, inner| Box::pin(inner.due(tx))).await,
            self.in_transaction(|tx, inner| Box::pin(inner.expire(tx))).await,
            self.in_transaction(|tx, inner| Box::pin(inner.fire_schedules(tx))).await,
        ];
        steps.into_iter().collect()
    }

    /// Runs `work` in a transaction of its own (maintenance, outside the daemon's line of requests).
    async fn in_transaction<T>(
        &self,
        work: impl for<'a> FnOnce(&'a Tx<'a>, &'a Inner) -> BoxFuture<'a, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_error)?;
        let sql = Sql::new(&tx);
        let value = work(&sql, self).await?;
        let (happened, leases) = sql.take_effects();
        let published = self.publish(&sql, &happened).await?;
        drop(sql);
        tx.commit().await.map_err(pg_error)?;
        self.committed(&happened, leases, published);
        Ok(value)
    }

    /// Countdowns and retry delays that came due: ready (and waiting leases hear of it).
    async fn due(&self, client: &Tx<'_>) -> Result<(), StoreError> {
        let due = client
            .query(
                "WITH due AS (UPDATE broker_tasks SET state = 'PENDING' WHERE id IN (SELECT id FROM broker_tasks
                    WHERE state IN ('SCHEDULED', 'RETRY') AND due_ms <= $1 FOR UPDATE SKIP LOCKED) RETURNING id)
                 SELECT pg_notify('broker_ready', '') FROM (SELECT 1 FROM due LIMIT 1) AS first",
                &[&ms(self.now())],
            )
            .await
            .map_err(pg_error)?;
        if !due.is_empty() {
            self.ready.notify_waiters();
        }
        Ok(())
    }

    /// Tasks that expired before they ran end `REVOKED`; results past their TTL go (a batch per tick).
    async fn expire(&self, client: &Tx<'_>) -> Result<(), StoreError> {
        let now = self.now();
        let expired = encode(&expired_error())?;
        let expired = client
            .query(
                &format!(
                    "WITH gone AS (UPDATE broker_tasks SET state = 'REVOKED', revoked = true, error = $2,
                        finished_at_ms = $1, result_expires_at_ms = $1 + result_ttl_ms
                     WHERE id IN (SELECT id FROM broker_tasks WHERE state IN {WAITING} AND expires_at_ms <= $1
                        FOR UPDATE SKIP LOCKED) RETURNING id, queue, task)
                     SELECT id, queue, task FROM gone"
                ),
                &[&ms(now), &expired],
            )
            .await
            .map_err(pg_error)?;
        for row in &expired {
            self.happened(client, row.get(0), row.get(1), row.get(2), MetricOutcome::expired);
        }
        let gone: Vec<String> = expired.iter().map(|row| row.get(0)).collect();
        let expired = gone.len() as u64;
        if expired > 0 {
            // Notifies (`broker_finished`).
            self.after_failure(client, gone).await?;
        }
        let removed = client
            .execute(
                "DELETE FROM broker_tasks WHERE id IN (SELECT id FROM broker_tasks
                    WHERE result_expires_at_ms <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&ms(now), &EXPIRY_BATCH],
            )
            .await
            .map_err(pg_error)?;
        // Unique keys no task holds any more: their time passed, or the task holding them until it finished did.
        // A key an enqueue is claiming now is locked, and skipped; one claimed by another task since it was looked
        // at is kept.
        client
            .execute(
                "WITH free AS (SELECT u.key, u.task_id FROM broker_unique u LEFT JOIN broker_tasks t ON t.id = u.task_id
                    WHERE u.until_ms <= $1 OR (u.until_ms IS NULL
                        AND (t.id IS NULL OR t.state IN ('SUCCESS', 'FAILURE', 'REVOKED')))
                    LIMIT $2),
                 taken AS (SELECT u.key FROM broker_unique u JOIN free ON u.key = free.key AND u.task_id = free.task_id
                    FOR UPDATE OF u SKIP LOCKED)
                 DELETE FROM broker_unique WHERE key IN (SELECT key FROM taken)",
                &[&ms(now), &EXPIRY_BATCH],
            )
            .await
            .map_err(pg_error)?;
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).totals.expired_results += removed;
        Ok(())
    }
}

/// Bounds a statement's time: past [`STATEMENT_TIMEOUT`], the store is unavailable for this request.
fn later<T: Send + 'static>(
    future: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Op<T> {
    Op::Later(Box::pin(async move {
        match tokio::time::timeout(STATEMENT_TIMEOUT, future).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer from PostgreSQL within {} s",
                STATEMENT_TIMEOUT.as_secs()
            ))),
        }
    }))
}

impl PgStore {
    /// Puts a request in the daemon's line now (its place is where the call is made, so a connection's requests
    /// keep their order); its outcome once its group committed.
    fn submit<T: Send + 'static>(
        &self,
        work: impl for<'a> FnOnce(&'a Tx<'a>, &'a Inner) -> BoxFuture<'a, Result<T, StoreError>> + Send + 'static,
    ) -> Op<T> {
        self.line_up(|outcome| {
            Job::Other(Box::new(move |tx, inner| {
                Box::pin(async move {
                    // Its requester gave up waiting (the store was slow): do nothing it would not hear of.
                    if outcome.is_closed() {
                        let nothing: Finish = Box::new(|_| {});
                        return (false, nothing);
                    }
                    finish(outcome, work(tx, inner).await)
                })
            }))
        })
    }

    /// Puts the job `make` builds around the request's outcome in the line; its outcome once its group ended.
    fn line_up<T: Send + 'static>(&self, make: impl FnOnce(Outcome<T>) -> Job) -> Op<T> {
        let (outcome, receive) = tokio::sync::oneshot::channel();
        if self.line.send(make(outcome)).is_err() {
            return Op::Now(Err(StoreError::Unavailable("the store is closed".into())));
        }
        later(async move {
            receive.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the request's group commit failed".into())))
        })
    }
}

impl TaskStore for PgStore {
    fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    fn events(&self, after: Option<u64>, max: usize, queue: Option<&str>, wait_ms: u64) -> (Vec<TaskEvent>, u64, u64) {
        let now = self.inner.now();
        let (read, until) = {
            let mut ring = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
            let read = ring.read(after, max, queue, now, wait_ms);
            (read, ring.until_ms())
        };
        self.inner.events_wanted_ms.fetch_max(until, Ordering::Relaxed);
        // Every daemon publishes its changes' events while it knows someone follows them: tell them, now and
        // then as the reader keeps asking.
        let announced = self.inner.events_announced_ms.load(Ordering::Relaxed);
        if until > announced.saturating_add(EVENTS_ANNOUNCE_MS) {
            self.inner.events_announced_ms.store(until, Ordering::Relaxed);
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let told = match inner.client().await {
                    Ok(client) => client
                        .execute("SELECT pg_notify('broker_events_wanted', $1)", &[&until.to_string()])
                        .await
                        .map_err(pg_error),
                    Err(e) => Err(e),
                };
                if let Err(e) = told {
                    inner.events_announced_ms.store(0, Ordering::Relaxed);
                    tracing::warn!(error = %e, "cannot tell the other daemons to publish task events");
                }
            });
        }
        read
    }

    fn events_notify(&self) -> &Notify {
        &self.inner.events_notify
    }

    fn events_settled(&self) -> Option<StoreFuture<()>> {
        let inner = self.inner.clone();
        let target = inner.events_committed.load(Ordering::Relaxed);
        if inner.events_received.load(Ordering::Relaxed) >= target {
            return None;
        }
        // Its notifications arrive within milliseconds of the commit; a listener that lost its connection
        // re-subscribes, and what was sent meanwhile never comes: the wait is bounded.
        Some(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                let notified = inner.events_notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.events_received.load(Ordering::Relaxed) >= target {
                    return Ok(());
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(deadline) => return Ok(()),
                }
            }
        }))
    }

    fn enqueue(&self, specs: Vec<NewTask>) -> Op<Vec<Enqueued>> {
        let numbered = specs.len() > 1;
        for (i, spec) in specs.iter().enumerate() {
            let checked = check_client_ids(spec).and_then(|()| Store::validate(spec));
            if let Err(e) = checked {
                return Op::Now(Err(match e {
                    StoreError::Invalid(m) if numbered => StoreError::Invalid(format!("task {i}: {m}")),
                    other => other,
                }));
            }
        }
        self.line_up(|outcome| Job::Enqueue(specs, outcome))
    }

    fn enqueue_chord(&self, header: Vec<NewTask>, callback: NewTask) -> Op<(Vec<Enqueued>, Enqueued)> {
        if let Err(e) = super::canvas::check_chord(&header, &callback) {
            return Op::Now(Err(e));
        }
        self.submit(move |tx, inner| Box::pin(inner.enqueue_chord(tx, header, callback)))
    }

    fn lease(&self, conn: ConnId, queues: &[String], max: usize, lease_ms: Option<u64>) -> Op<(Vec<Grant>, bool)> {
        let queues = queues.to_vec();
        self.submit(move |tx, inner| {
            Box::pin(async move { Ok((inner.lease(tx, conn, queues, max, lease_ms).await?, false)) })
        })
    }

    fn ack(&self, id: &str, lease_id: u64, result: Value) -> Op<()> {
        let id = id.to_string();
        self.line_up(|outcome| Job::Ack { id, lease_id, result, outcome })
    }

    fn fail(&self, request: Fail) -> Op<FailOutcome> {
        self.submit(move |tx, inner| Box::pin(inner.fail(tx, request)))
    }

    fn extend(&self, id: &str, lease_id: u64, lease_ms: Option<u64>) -> Op<(u64, bool)> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.extend(tx, &id, lease_id, lease_ms).await }))
    }

    fn progress(&self, id: &str, lease_id: u64, progress: Progress) -> Op<bool> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.progress(tx, &id, lease_id, progress).await }))
    }

    fn release(&self, id: &str, lease_id: u64) -> Op<()> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.release(tx, &id, lease_id).await }))
    }

    fn release_connection(&self, conn: ConnId, shutting_down: bool) -> Op<usize> {
        // Through the line even when nothing is held now: a lease of this connection may still be in it.
        self.submit(move |tx, inner| Box::pin(inner.release_connection(tx, conn, shutting_down)))
    }

    fn holds_leases(&self, conn: ConnId) -> bool {
        self.inner.held.lock().unwrap_or_else(|p| p.into_inner()).by_conn.contains_key(&conn)
    }

    fn get_encoded(&self, id: &str) -> Op<(TaskState, Vec<u8>)> {
        let id = id.to_string();
        self.submit(move |tx, inner| {
            Box::pin(async move {
                let record = inner.get(tx, &id).await?;
                let bytes =
                    record.info_bytes().map_err(|message| StoreError::Corrupt { id: id.to_string(), message })?;
                Ok((record.state, bytes))
            })
        })
    }

    fn in_dead_set(&self, id: &str) -> Op<bool> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.in_dead_set(tx, &id).await }))
    }

    fn delete_finished(&self, id: &str) -> Op<()> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.delete_finished(tx, &id).await }))
    }

    fn running_by_conn(&self, limit: usize) -> Op<Vec<(ConnId, Vec<Running>)>> {
        self.submit(move |tx, inner| Box::pin(inner.running_by_conn(tx, limit)))
    }

    fn revoke(&self, id: &str) -> Op<TaskState> {
        let id = id.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.revoke(tx, &id).await }))
    }

    fn purge(&self, queue: &str) -> Op<u64> {
        let queue = queue.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.purge(tx, &queue).await }))
    }

    fn dead_list(&self, queue: Option<&str>, limit: usize) -> Op<Vec<TaskInfo>> {
        let queue = queue.map(str::to_string);
        self.submit(move |tx, inner| Box::pin(inner.dead_list(tx, queue, limit)))
    }

    fn dead_requeue(&self, request: &DeadRequeue) -> Op<u64> {
        let request = request.clone();
        self.submit(move |tx, inner| Box::pin(inner.dead_requeue(tx, request)))
    }

    fn stats(&self) -> Op<StoreStats> {
        self.submit(move |tx, inner| Box::pin(inner.stats(tx)))
    }

    fn totals(&self) -> broker_client::proto::Totals {
        self.inner.counts.lock().unwrap_or_else(|p| p.into_inner()).totals.clone()
    }

    fn ready_notify(&self) -> &Notify {
        &self.inner.ready
    }

    fn finished_notify(&self) -> &Notify {
        &self.inner.finished
    }

    fn now_ms(&self) -> u64 {
        self.inner.now()
    }

    fn durability(&self) -> String {
        "postgres".to_string()
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Op<bool> {
        let queue = queue.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.set_paused(tx, &queue, paused).await }))
    }

    fn set_limit(&self, scope: super::flow::Scope, name: &str, limit: Limit) -> Op<()> {
        let scope = match scope {
            super::flow::Scope::Task => "task",
            super::flow::Scope::Queue => "queue",
        };
        let name = name.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.set_limit(tx, scope, &name, limit).await }))
    }

    fn limits(&self) -> Op<Vec<broker_client::proto::LimitInfo>> {
        self.submit(move |tx, inner| Box::pin(inner.limits(tx)))
    }

    fn schedule_add(&self, new: NewSchedule) -> Op<ScheduleInfo> {
        let (name, schedule, timing) = match new.check(self.inner.now()) {
            Ok(checked) => checked,
            Err(e) => return Op::Now(Err(e)),
        };
        self.submit(move |tx, inner| Box::pin(inner.schedule_add(tx, name, schedule, timing)))
    }

    fn schedule_remove(&self, name: &str) -> Op<bool> {
        let name = name.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.schedule_remove(tx, &name).await }))
    }

    fn schedule_set_paused(&self, name: &str, paused: bool) -> Op<ScheduleInfo> {
        let name = name.to_string();
        self.submit(move |tx, inner| Box::pin(async move { inner.schedule_set_paused(tx, &name, paused).await }))
    }

    fn schedules(&self) -> Op<Vec<ScheduleInfo>> {
        self.submit(move |tx, inner| Box::pin(inner.schedules(tx)))
    }
}
