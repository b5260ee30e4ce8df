//! Schedules (periodic tasks) over PostgreSQL: the single node's schedules ([`super::super::schedule`]), kept in
//! `broker_schedules` and fired by whichever daemon's tick finds one due.
//!
//! A row holds the schedule's definition as the single node keeps it (a [`Schedule`] in MessagePack, in
//! `schedule`) and, in columns, what changes as it runs: `paused`, `next_ms` (when its next tick is due; NULL while
//! paused) and `last_ms` (the latest tick fired). The columns are what counts: the copies of `paused` and
//! `last_ms` in `schedule` are only as of the last change of the definition.
//!
//! A tick fires in one transaction with its task: the row is taken with `FOR UPDATE SKIP LOCKED`, the task
//! enqueued with the id of the tick (`sched:<name>:<tick ms>`), and `next_ms` moved on. So a tick fires at most
//! once whichever daemons look at it, and is never marked fired without its task. Daemons learn of schedule
//! changes from the table itself, which every tick reads: no notification is needed.
//!
//! Catch-up: there is no single daemon whose restart marks ticks "missed while it was down". A tick found due
//! more than [`SKIP_LATE_MS`] after its time counts as missed: with `catch_up = "skip"` it is skipped (nothing
//! enqueued, `next_ms` moves on); with `"once"` the latest missed tick fires. Ticks that fell while a schedule
//! was paused never fire (resuming sets `next_ms` from the resume on).
//!
//! It must never fire a tick outside the transaction that moves `next_ms` on.

use broker_client::proto::{ScheduleInfo, TaskSpec};

use super::super::schedule::{info, tick_id, Schedule, Timing};
use super::{decode, encode, ms, pg_error, unms, Inner, Tx};
use crate::store::{NewTask, StoreError};

/// How late a due tick may be found and still count as on time (ms): later, it was missed (no daemon ticked, or
/// none could reach the database), and a schedule with `catch_up = "skip"` skips it. Daemons tick every `tick_ms`
/// (50 ms by default), so a tick found this late means they were all down or cut off from the database.
pub(super) const SKIP_LATE_MS: u64 = 5_000;

/// One schedule's row.
struct Row {
    name: String,
    schedule: Schedule,
}

impl Row {
    /// Reads `name, schedule, paused, next_ms, last_ms`: the definition with the columns' state.
    fn read(row: &tokio_postgres::Row) -> Result<Row, StoreError> {
        let name: String = row.get(0);
        let mut schedule: Schedule = decode(&name, row.get(1))?;
        schedule.paused = row.get(2);
        schedule.next_ms = unms(row.get(3));
        schedule.last_ms = unms(row.get(4));
        Ok(Row { name, schedule })
    }

    fn info(&self) -> ScheduleInfo {
        info(&self.name, &self.schedule)
    }
}

const SELECT: &str = "SELECT name, schedule, paused, next_ms, last_ms FROM broker_schedules";

impl Inner {
    /// Writes a schedule's row: its definition and its state.
    async fn store_schedule(&self, tx: &Tx<'_>, name: &str, schedule: &Schedule) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO broker_schedules (name, schedule, paused, next_ms, last_ms) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET schedule = $2, paused = $3, next_ms = $4, last_ms = $5",
            &[&name, &encode(schedule)?, &schedule.paused, &schedule.next_ms.map(ms), &schedule.last_ms.map(ms)],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Adds a schedule checked already ([`NewSchedule::check`]), or changes the one of that name, as the single
    /// node does.
    pub(super) async fn schedule_add(
        &self,
        tx: &Tx<'_>,
        name: String,
        mut schedule: Schedule,
        timing: Timing,
    ) -> Result<ScheduleInfo, StoreError> {
        let now = self.now();
        let old = tx
            .query_opt(&format!("{SELECT} WHERE name = $1 FOR UPDATE"), &[&name])
            .await
            .map_err(pg_error)?
            .map(|row| Row::read(&row))
            .transpose()?;
        match old {
            Some(old) if old.schedule.same_definition(&schedule) => return Ok(old.info()),
            Some(old) => schedule.replace(&old.schedule, &timing, now),
            None => schedule.next_ms = timing.next_after(now),
        }
        self.store_schedule(tx, &name, &schedule).await?;
        Ok(info(&name, &schedule))
    }

    pub(super) async fn schedule_remove(&self, tx: &Tx<'_>, name: &str) -> Result<bool, StoreError> {
        let removed = tx.execute("DELETE FROM broker_schedules WHERE name = $1", &[&name]).await.map_err(pg_error)?;
        Ok(removed > 0)
    }

    pub(super) async fn schedule_set_paused(
        &self,
        tx: &Tx<'_>,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleInfo, StoreError> {
        let now = self.now();
        let Some(row) =
            tx.query_opt(&format!("{SELECT} WHERE name = $1 FOR UPDATE"), &[&name]).await.map_err(pg_error)?
        else {
            return Err(StoreError::NoSchedule(name.to_string()));
        };
        let mut row = Row::read(&row)?;
        if row.schedule.paused == paused {
            return Ok(row.info());
        }
        row.schedule.set_paused(paused, now)?;
        self.store_schedule(tx, name, &row.schedule).await?;
        Ok(row.info())
    }

    pub(super) async fn schedules(&self, tx: &Tx<'_>) -> Result<Vec<ScheduleInfo>, StoreError> {
        // By name in byte order, as the single node lists them (whatever the database's collation).
        let rows = tx.query(&format!("{SELECT} ORDER BY name COLLATE \"C\""), &[]).await.map_err(pg_error)?;
        rows.iter().map(|row| Row::read(row).map(|row| row.info())).collect()
    }

    /// Part of the tick: fires every schedule due, each tick once (see the module's doc). Another daemon's tick
    /// (or a change in a daemon's line) holding a row passes it over: it is being fired, or changed, now.
    pub(super) async fn fire_schedules(&self, tx: &Tx<'_>) -> Result<(), StoreError> {
        let now = self.now();
        let due = tx
            .query(
                &format!("{SELECT} WHERE NOT paused AND next_ms <= $1 ORDER BY next_ms FOR UPDATE SKIP LOCKED"),
                &[&ms(now)],
            )
            .await
            .map_err(pg_error)?;
        for row in &due {
            let name: String = row.get(0);
            match Row::read(row) {
                Ok(row) => self.fire(tx, row, now).await?,
                Err(e) => self.stop(tx, &name, e).await?,
            }
        }
        Ok(())
    }

    /// Fires one due schedule (or skips its tick) and moves its `next_ms` on.
    async fn fire(&self, tx: &Tx<'_>, row: Row, now: u64) -> Result<(), StoreError> {
        let Row { name, schedule } = row;
        let timing = match Timing::of(&schedule) {
            Ok(timing) => timing,
            Err(e) => return self.stop(tx, &name, e).await,
        };
        let (tick, next) = timing.fire(schedule.next_ms.unwrap_or(now), now);
        let mut fired = None;
        if schedule.catch_up == "skip" && now.saturating_sub(tick) > SKIP_LATE_MS {
            tracing::info!(schedule = %name, missed_tick_ms = tick, late_ms = now - tick, catch_up = "skip",
                "a tick came due while no daemon could fire it; skipped");
        } else {
            let spec = TaskSpec { id: Some(tick_id(&name, tick)), ..schedule.task.clone() };
            match self.enqueue_tick(tx, NewTask::from(spec)).await {
                Ok(()) => {
                    fired = Some(tick);
                    tracing::debug!(schedule = %name, tick_ms = tick, "schedule fired");
                }
                // The engine failed (a deadlock, a timeout): the tick's transaction rolls back, and a later tick
                // tries again (the tick's task id makes that safe).
                Err(e @ (StoreError::Unavailable(_) | StoreError::Shared(_))) => return Err(e),
                // A full queue, say: this tick is skipped, and said so (as the single node does).
                Err(e) => tracing::warn!(schedule = %name, tick_ms = tick, error = %e, "schedule could not enqueue"),
            }
        }
        tx.execute(
            "UPDATE broker_schedules SET next_ms = $2, last_ms = coalesce($3, last_ms) WHERE name = $1",
            &[&name, &next.map(ms), &fired.map(ms)],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// A schedule that cannot be read fires no more (its `next_ms` is cleared, not looked at again each tick)
    /// until it is added again; said so.
    async fn stop(&self, tx: &Tx<'_>, name: &str, e: StoreError) -> Result<(), StoreError> {
        tracing::error!(schedule = %name, error = %e, "schedule cannot be read; it will not fire");
        let no_tick: Option<i64> = None;
        tx.execute("UPDATE broker_schedules SET next_ms = $2 WHERE name = $1", &[&name, &no_tick])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Enqueues a tick's task in the tick's transaction (an existing task of that id is found, not made again),
    /// within a savepoint: a tick that cannot enqueue is undone alone, and the other schedules still fire.
    async fn enqueue_tick(&self, tx: &Tx<'_>, task: NewTask) -> Result<(), StoreError> {
        tx.tx.batch_execute("SAVEPOINT broker_tick").await.map_err(pg_error)?;
        let tried = async {
            if let Some(Some(full)) = self.admit(tx, &[std::slice::from_ref(&task)]).await?.pop() {
                return Err(full);
            }
            self.enqueue(tx, vec![task]).await.map(drop)
        };
        let outcome = tried.await;
        let end = if outcome.is_ok() { "RELEASE SAVEPOINT broker_tick" } else { "ROLLBACK TO SAVEPOINT broker_tick" };
        tx.tx.batch_execute(end).await.map_err(pg_error)?;
        outcome
    }
}
