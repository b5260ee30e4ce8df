//! Periodic tasks kept by the daemon: no separate beat process to run twice or not at all.
//!
//! A schedule (a cron expression in a time zone, or every N milliseconds) lives in the control file with the
//! task it enqueues. Each tick enqueues one task whose id names the schedule and the tick,
//! `sched:<name>:<tick ms>`, so enqueueing a tick twice finds the first task instead of making a second: a tick is
//! enqueued at most once however often it is tried.
//!
//! The last tick fired is written to the control file only once the tick's task is durable in the log, so the
//! file never says a tick fired that a crash could then lose. After a restart the daemon takes the later of that
//! and the newest `sched:` task it still has, and each schedule's catch-up policy decides what happens to the
//! ticks that came due while it was down: `once` (the default) fires the latest of them, `skip` none. While the
//! daemon runs, a tick that comes due fires at the next maintenance tick; if the daemon was held up past several
//! ticks of one schedule, only the latest fires (Celery beat coalesces the same way).

use std::collections::BTreeMap;
use std::str::FromStr;

use broker_client::proto::{ScheduleInfo, TaskSpec};
use chrono::TimeZone;
use serde::{Deserialize, Serialize};

use super::{NewTask, Store, StoreError};

/// Where a tick's task id starts.
pub const TICK_PREFIX: &str = "sched:";
/// The longest schedule name (its ticks' ids must fit in 200 bytes).
pub const MAX_NAME: usize = 150;
/// The shortest `every_ms`.
pub const MIN_EVERY_MS: u64 = 1000;
/// The longest `every_ms` (about ten years): beyond it, tick times would overflow.
pub const MAX_EVERY_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// One schedule as the control file keeps it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Schedule {
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub every_ms: Option<u64>,
    /// `"once"` or `"skip"`.
    pub catch_up: String,
    pub paused: bool,
    pub task: TaskSpec,
    /// The latest tick fired and durable.
    pub last_ms: Option<u64>,
    /// No tick at or before this time fires (set when the schedule is made, changed or resumed).
    pub not_before_ms: u64,
    /// Where `every_ms` ticks count from.
    pub anchor_ms: u64,
    /// When its next tick is due (in memory only; `None` while paused).
    #[serde(skip)]
    pub next_ms: Option<u64>,
    /// Ticks fired whose task is not durable yet, with the log round that makes it so (in memory only).
    #[serde(skip)]
    pub unconfirmed: Vec<(u64, u64)>,
}

/// When a schedule's ticks fall.
pub(crate) enum Timing {
    Cron(Box<croner::Cron>, chrono_tz::Tz),
    Every { every: u64, anchor: u64 },
}

impl Timing {
    /// A schedule's timing, or why its `cron`, `timezone` or `every_ms` cannot be read.
    pub(crate) fn of(schedule: &Schedule) -> Result<Timing, StoreError> {
        let invalid = |m: String| StoreError::Invalid(m);
        match (&schedule.cron, schedule.every_ms) {
            (Some(cron), None) => {
                let parsed = croner::Cron::from_str(cron).map_err(|e| invalid(format!("cron `{cron}`: {e}")))?;
                let zone = schedule.timezone.as_deref().unwrap_or("UTC");
                let tz = chrono_tz::Tz::from_str(zone)
                    .map_err(|_| invalid(format!("time zone `{zone}`: use an IANA name such as Europe/Paris")))?;
                Ok(Timing::Cron(Box::new(parsed), tz))
            }
            (None, Some(every)) if (MIN_EVERY_MS..=MAX_EVERY_MS).contains(&every) => {
                if schedule.timezone.is_some() {
                    return Err(invalid("`timezone` goes with `cron`, not `every_ms`".into()));
                }
                Ok(Timing::Every { every, anchor: schedule.anchor_ms })
            }
            (None, Some(_)) => Err(invalid(format!("`every_ms` must be {MIN_EVERY_MS} to {MAX_EVERY_MS}"))),
            _ => Err(invalid("give `cron` or `every_ms`, one of them".into())),
        }
    }

    /// The first tick after `t`.
    pub(crate) fn next_after(&self, t: u64) -> Option<u64> {
        match self {
            Timing::Every { every, anchor } if t < *anchor => Some(*anchor),
            Timing::Every { every, anchor } => anchor.checked_add(((t - anchor) / every + 1).checked_mul(*every)?),
            Timing::Cron(cron, tz) => {
                // From the whole second: croner keeps the milliseconds of the time it starts from, and a cron
                // tick falls on a whole second (its id must not depend on when it was looked for).
                let at = tz.timestamp_millis_opt(i64::try_from(t / 1000 * 1000).ok()?).single()?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// The latest tick at or before `t`.
    pub(crate) fn latest_until(&self, t: u64) -> Option<u64> {
        match self {
            Timing::Every { anchor, .. } if t < *anchor => None,
            Timing::Every { every, anchor } => Some(anchor + (t - anchor) / every * every), // at most t
            Timing::Cron(cron, tz) => {
                let at = tz.timestamp_millis_opt(i64::try_from(t / 1000 * 1000).ok()?).single()?;
                let previous = cron.find_previous_occurrence(&at, true).ok()?;
                u64::try_from(previous.timestamp_millis()).ok()
            }
        }
    }

    /// A schedule due at `next`, run at `now`: the tick that fires (the latest one due: ticks missed while the
    /// daemon was held up coalesce into it) and the next one after it.
    pub(crate) fn fire(&self, next: u64, now: u64) -> (u64, Option<u64>) {
        let tick = self.latest_until(now).filter(|t| *t >= next).unwrap_or(next);
        (tick, self.next_after(tick.max(now)))
    }
}

/// A schedule as `schedule_add` asks for it.
#[derive(Debug, Clone, Default)]
pub struct NewSchedule {
    pub name: String,
    pub task: TaskSpec,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub every_ms: Option<u64>,
    pub catch_up: Option<String>,
}

impl NewSchedule {
    /// Checks the request (its name, its task, its catch-up policy, its timing) and makes the schedule it asks
    /// for, taking effect from `now`; every store adds schedules through this.
    pub(crate) fn check(self, now: u64) -> Result<(String, Schedule, Timing), StoreError> {
        let new = self;
        if new.name.is_empty() || new.name.len() > MAX_NAME || new.name.contains('\0') {
            return Err(StoreError::Invalid(format!("`name` must be 1 to {MAX_NAME} bytes with no NUL")));
        }
        if new.task.id.is_some() || new.task.chain.iter().any(|link| link.id.is_some()) {
            // Every tick would reuse them: from the second tick on, the chain would find its links done.
            return Err(StoreError::Invalid(
                "a schedule's task (and its chain's links) has no `id`: each tick gets its own".into(),
            ));
        }
        let catch_up = new.catch_up.unwrap_or_else(|| "once".into());
        if catch_up != "once" && catch_up != "skip" {
            return Err(StoreError::Invalid(format!("`catch_up` must be \"once\" or \"skip\" (got {catch_up:?})")));
        }
        Store::validate(&NewTask::from(new.task.clone()))?;
        let schedule = Schedule {
            cron: new.cron,
            timezone: new.timezone,
            every_ms: new.every_ms,
            catch_up,
            task: new.task,
            not_before_ms: now,
            anchor_ms: now,
            ..Schedule::default()
        };
        let timing = Timing::of(&schedule)?;
        Ok((new.name, schedule, timing))
    }
}

impl Schedule {
    /// Whether `other` defines the same schedule (timing, catch-up and task), whatever their state.
    pub(crate) fn same_definition(&self, other: &Schedule) -> bool {
        (&self.cron, &self.timezone, self.every_ms, &self.catch_up, &self.task)
            == (&other.cron, &other.timezone, other.every_ms, &other.catch_up, &other.task)
    }

    /// This new definition replacing `old`'s, from `now` on (`timing` is this one's): it keeps the last tick fired
    /// and whether it is paused.
    pub(crate) fn replace(&mut self, old: &Schedule, timing: &Timing, now: u64) {
        self.last_ms = old.last_ms;
        self.paused = old.paused;
        self.unconfirmed = old.unconfirmed.clone();
        self.next_ms = if self.paused { None } else { timing.next_after(now) };
    }

    /// Pauses or resumes it at `now`: resumed, ticks that fell while it was paused never fire.
    pub(crate) fn set_paused(&mut self, paused: bool, now: u64) -> Result<(), StoreError> {
        self.paused = paused;
        self.next_ms = None;
        if !paused {
            self.not_before_ms = now;
            self.next_ms = Timing::of(self)?.next_after(now);
        }
        Ok(())
    }
}

/// A schedule as `schedules` lists it.
pub(crate) fn info(name: &str, schedule: &Schedule) -> ScheduleInfo {
    ScheduleInfo {
        name: name.to_string(),
        task: schedule.task.clone(),
        cron: schedule.cron.clone(),
        timezone: schedule.timezone.clone(),
        every_ms: schedule.every_ms,
        catch_up: schedule.catch_up.clone(),
        paused: schedule.paused,
        next_ms: schedule.next_ms,
        last_ms: schedule.last_ms,
    }
}

/// The id of a tick's task.
pub fn tick_id(name: &str, tick: u64) -> String {
    format!("{TICK_PREFIX}{name}:{tick}")
}

impl Store {
    /// Adds a schedule, or changes the one of that name. The same definition again changes nothing (workers
    /// declare their periodic tasks at each start); a different one takes effect from now on.
    pub fn add_schedule(&self, new: NewSchedule) -> Result<ScheduleInfo, StoreError> {
        let now = self.now_ms();
        let (name, mut schedule, timing) = new.check(now)?;
        let mut control = self.control();
        match control.schedules.get(&name) {
            Some(old) if old.same_definition(&schedule) => return Ok(info(&name, old)),
            Some(old) => schedule.replace(old, &timing, now),
            None => schedule.next_ms = timing.next_after(now),
        }
        control.update(&self.control_path, |c| {
            c.schedules.insert(name.clone(), schedule);
        })?;
        Ok(info(&name, &control.schedules[&name]))
    }

    /// Removes a schedule; returns whether there was one. Tasks it enqueued stay.
    pub fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let mut control = self.control();
        if !control.schedules.contains_key(name) {
            return Ok(false);
        }
        control.update(&self.control_path, |c| {
            c.schedules.remove(name);
        })?;
        Ok(true)
    }

    /// Pauses or resumes a schedule. Ticks that fall while it is paused never fire.
    pub fn set_schedule_paused(&self, name: &str, paused: bool) -> Result<ScheduleInfo, StoreError> {
        let now = self.now_ms();
        let mut control = self.control();
        let Some(old) = control.schedules.get(name) else {
            return Err(StoreError::NoSchedule(name.to_string()));
        };
        if old.paused == paused {
            return Ok(info(name, old));
        }
        let mut schedule = old.clone();
        schedule.set_paused(paused, now)?;
        control.update(&self.control_path, |c| {
            c.schedules.insert(name.to_string(), schedule);
        })?;
        Ok(info(name, &control.schedules[name]))
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> Vec<ScheduleInfo> {
        self.control().schedules.iter().map(|(name, s)| info(name, s)).collect()
    }

    /// At open: each schedule's next tick, from the latest tick known to have fired (the control file's, or a
    /// `sched:` task still stored) and its catch-up policy.
    pub(super) fn plan_schedules(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut fired: BTreeMap<String, u64> = BTreeMap::new();
        {
            let st = self.lock();
            let ids = st.live.keys().chain(st.done.keys());
            for id in ids.filter(|id| id.starts_with(TICK_PREFIX)) {
                if let Some((name, tick)) = id[TICK_PREFIX.len()..].rsplit_once(':') {
                    // A tick in the future is no tick fired (the clock went back, or a forged id).
                    if let Some(tick) = tick.parse::<u64>().ok().filter(|tick| *tick <= now) {
                        let latest = fired.entry(name.to_string()).or_default();
                        *latest = (*latest).max(tick);
                    }
                }
            }
        }
        let mut control = self.control();
        for (name, schedule) in control.schedules.iter_mut() {
            if schedule.paused {
                continue;
            }
            let timing = match Timing::of(schedule) {
                Ok(timing) => timing,
                Err(e) => {
                    tracing::error!(schedule = %name, error = %e, "schedule cannot be read; it will not fire");
                    continue;
                }
            };
            let last = schedule.last_ms.into_iter().chain(fired.get(name).copied()).max();
            let done_until = last.unwrap_or(0).max(schedule.not_before_ms);
            let missed = timing.latest_until(now).filter(|tick| *tick > done_until);
            schedule.next_ms = match missed {
                Some(tick) if schedule.catch_up == "once" => Some(tick),
                _ => timing.next_after(now.max(done_until)),
            };
            if let Some(tick) = missed {
                tracing::info!(schedule = %name, missed_tick_ms = tick, catch_up = %schedule.catch_up, "ticks came due while the daemon was down");
            }
        }
        Ok(())
    }

    /// Part of the maintenance tick: records the ticks whose task is now durable (the control file is written
    /// then), and enqueues the task of every schedule that is due.
    pub(super) fn run_schedules(&self) -> Result<(), StoreError> {
        let now = self.now_ms();
        let durable = self.core.progress.borrow().durable;
        let mut control = self.control();
        let confirmed = control.schedules.values().any(|s| s.unconfirmed.iter().any(|(_, round)| *round <= durable));
        if confirmed {
            control.update(&self.control_path, |c| {
                for schedule in c.schedules.values_mut() {
                    let (done, waiting) = schedule.unconfirmed.iter().partition(|(_, round)| *round <= durable);
                    let done: Vec<(u64, u64)> = done;
                    schedule.unconfirmed = waiting;
                    if let Some(tick) = done.iter().map(|(tick, _)| *tick).max() {
                        schedule.last_ms = schedule.last_ms.max(Some(tick));
                    }
                }
            })?;
        }
        let due: Vec<String> = control
            .schedules
            .iter()
            .filter(|(_, s)| !s.paused && s.next_ms.is_some_and(|next| next <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let schedule = control.schedules.get_mut(&name).expect("listed");
            let timing = Timing::of(schedule)?;
            let (tick, next) = timing.fire(schedule.next_ms.expect("due"), now);
            let spec = TaskSpec { id: Some(tick_id(&name, tick)), ..schedule.task.clone() };
            schedule.next_ms = next;
            match self.enqueue_checked(vec![NewTask::from(spec)]) {
                Ok(_) => {
                    let round = self.durable_round();
                    schedule.unconfirmed.push((tick, round));
                    tracing::debug!(schedule = %name, tick_ms = tick, "schedule fired");
                }
                // A full queue, say: this tick is skipped, and said so.
                Err(e) => tracing::warn!(schedule = %name, tick_ms = tick, error = %e, "schedule could not enqueue"),
            }
        }
        Ok(())
    }
}
