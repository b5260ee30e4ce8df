//! Flow control kept by the daemon for every worker at once: paused queues, rate limits and concurrency limits.
//!
//! These are settings, not tasks: they live in the control file ([`super::control`]), written whole (and synced)
//! at each change, and are applied by [`Store::lease`] under the state lock. With no limit set, leasing takes
//! the head of each queue as before; with one, it walks the queue in order and passes over the tasks a limit
//! holds back (at most [`MAX_SKIP`] per queue and lease), so tasks of other names behind them still run.
//!
//! A rate is a token bucket refilled continuously at the rate, holding at most a tenth of a second's worth (and at
//! least one task): over any span of time `t`, at most `rate × t + burst` tasks start. Tokens are counted with the
//! store's clock, so tests drive them with a manual clock. A task leased and then released or lost took its
//! token: a rate limits starts, as Celery's does.

use std::collections::BTreeMap;

use super::{Map, Set, State, Store, StoreError};
use crate::store::control::Limit;

/// How many held-back tasks one lease passes over in a queue before it stops looking there.
pub const MAX_SKIP: usize = 10_000;

/// A parsed rate: tasks per second.
pub fn parse_rate(text: &str) -> Result<f64, StoreError> {
    let invalid = || {
        StoreError::Invalid(format!(
            "rate `{text}`: write N/s, N/m or N/h (a number of tasks per second, minute or hour)"
        ))
    };
    let (count, per) = match text.trim().split_once('/') {
        Some((count, unit)) => {
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1.0,
                "m" | "min" | "minute" => 60.0,
                "h" | "hour" => 3600.0,
                _ => return Err(invalid()),
            };
            (count.trim(), per)
        }
        None => (text.trim(), 1.0),
    };
    let count: f64 = count.parse().map_err(|_| invalid())?;
    if !count.is_finite() || count <= 0.0 {
        return Err(invalid());
    }
    Ok(count / per)
}

/// A token bucket.
#[derive(Debug, Clone)]
struct Bucket {
    per_ms: f64,
    burst: f64,
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn new(per_second: f64, now: u64) -> Bucket {
        let burst = (per_second / 10.0).max(1.0);
        // Starts full: the first tasks after a restart or a change run at once.
        Bucket { per_ms: per_second / 1000.0, burst, tokens: burst, at_ms: now }
    }

    fn refill(&mut self, now: u64) {
        if now > self.at_ms {
            self.tokens = (self.tokens + (now - self.at_ms) as f64 * self.per_ms).min(self.burst);
            self.at_ms = now;
        }
    }

    fn has(&mut self, now: u64) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// When it will hold a token again (now, if it does).
    fn refilled_at(&self, now: u64) -> u64 {
        if self.tokens >= 1.0 {
            return now;
        }
        now.saturating_add(((1.0 - self.tokens) / self.per_ms).ceil() as u64)
    }
}

/// One limit as leasing applies it.
#[derive(Debug, Clone, Default)]
struct Gate {
    bucket: Option<Bucket>,
    concurrency: Option<u32>,
    /// Leases held now of the tasks it covers (counted while it has a concurrency limit).
    running: u32,
}

impl Gate {
    fn new(limit: &Limit, now: u64) -> Result<Gate, StoreError> {
        let bucket = limit.rate.as_deref().map(parse_rate).transpose()?.map(|rate| Bucket::new(rate, now));
        Ok(Gate { bucket, concurrency: limit.concurrency, running: 0 })
    }

    /// `None` if a task may start now; else until when it may not: the bucket's refill, or `u64::MAX` while
    /// the concurrency is reached (a slot freed wakes waiting leases then).
    fn held_until(&mut self, now: u64) -> Option<u64> {
        if self.concurrency.is_some_and(|n| self.running >= n) {
            return Some(u64::MAX);
        }
        let bucket = self.bucket.as_mut()?;
        (!bucket.has(now)).then(|| bucket.refilled_at(now))
    }

    fn take(&mut self) {
        if let Some(bucket) = &mut self.bucket {
            bucket.tokens -= 1.0;
        }
        self.running += 1;
    }

    fn give_back(&mut self) {
        self.running = self.running.saturating_sub(1);
    }
}

/// Paused queues and the limits in force, in the store's state.
#[derive(Debug, Default)]
pub(super) struct Flow {
    paused: Set<String>,
    tasks: Map<String, Gate>,
    queues: Map<String, Gate>,
    /// The earliest time a rate limit that held a task back refills: the tick then wakes waiting leases (a
    /// concurrency limit wakes them when a slot frees, see `freed`).
    pub(super) wake_at: Option<u64>,
    /// A lease ended under a concurrency limit: waiting leases look again at once.
    pub(super) freed: bool,
}

impl Flow {
    /// Whether any limit is set (leasing then takes the slow path).
    pub(super) fn limited(&self) -> bool {
        !self.tasks.is_empty() || !self.queues.is_empty()
    }

    pub(super) fn paused(&self, queue: &str) -> bool {
        !self.paused.is_empty() && self.paused.contains(queue)
    }

    /// Whether the queue's own limit lets one more task of it start now.
    pub(super) fn queue_open(&mut self, queue: &str, now: u64) -> bool {
        let held = self.queues.get_mut(queue).and_then(|gate| gate.held_until(now));
        self.note_held(held)
    }

    /// Whether a task named `task` may start now (the queue's limit already checked).
    pub(super) fn task_open(&mut self, task: &str, now: u64) -> bool {
        let held = self.tasks.get_mut(task).and_then(|gate| gate.held_until(now));
        self.note_held(held)
    }

    /// Notes until when a limit holds tasks back; returns whether none does.
    fn note_held(&mut self, held: Option<u64>) -> bool {
        match held {
            None => true,
            Some(u64::MAX) => false,
            Some(at) => {
                self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
                false
            }
        }
    }

    /// A task of `queue` named `task` starts: it takes a token and a slot from each limit on it.
    pub(super) fn start(&mut self, queue: &str, task: &str) {
        for gate in [self.queues.get_mut(queue), self.tasks.get_mut(task)].into_iter().flatten() {
            gate.take();
        }
    }

    /// A lease of a task of `queue` named `task` ended: its slots are free again.
    pub(super) fn end(&mut self, queue: &str, task: &str) {
        for gate in [self.queues.get_mut(queue), self.tasks.get_mut(task)].into_iter().flatten() {
            gate.give_back();
            self.freed |= gate.concurrency.is_some();
        }
    }

    fn set_paused(&mut self, queue: &str, paused: bool) {
        if paused {
            self.paused.insert(queue.to_string());
        } else {
            self.paused.remove(queue);
        }
    }
}

/// Which limits a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The tasks of one name, whatever their queue.
    Task,
    /// Every task of one queue.
    Queue,
}

impl Store {
    /// Applies the control file's pauses and limits to the state (at open).
    pub(super) fn apply_control(&self) -> Result<(), StoreError> {
        let control = self.control();
        let now = self.now_ms();
        let mut st = self.lock();
        for queue in &control.paused {
            st.flow.set_paused(queue, true);
            st.queue(queue);
        }
        for (name, limit) in &control.task_limits {
            st.flow.tasks.insert(name.clone(), Gate::new(limit, now)?);
        }
        for (name, limit) in &control.queue_limits {
            st.flow.queues.insert(name.clone(), Gate::new(limit, now)?);
        }
        Ok(())
    }

    /// Pauses or resumes a queue: while paused, leases take nothing from it (tasks are still accepted). Durable
    /// when it returns. Returns whether the queue was paused before.
    pub fn set_paused(&self, queue: &str, paused: bool) -> Result<bool, StoreError> {
        super::validate_queue(queue)?;
        let mut control = self.control();
        let was = control.paused.contains(queue);
        if was != paused {
            control.update(&self.control_path, |c| {
                if paused {
                    c.paused.insert(queue.to_string());
                } else {
                    c.paused.remove(queue);
                }
            })?;
        }
        {
            let mut st = self.lock();
            st.flow.set_paused(queue, paused);
            st.queue(queue);
        }
        drop(control);
        if !paused {
            self.ready_notify.notify_waiters();
        }
        Ok(was)
    }

    /// Sets (or, with neither a rate nor a concurrency, removes) the limit on a task name or a queue. Durable
    /// when it returns. The concurrency count starts from the leases held now.
    pub fn set_limit(&self, scope: Scope, name: &str, limit: Limit) -> Result<(), StoreError> {
        match scope {
            Scope::Task => super::validate_name("name", name)?,
            Scope::Queue => super::validate_queue(name)?,
        }
        if limit.concurrency == Some(0) {
            return Err(StoreError::Invalid("`concurrency` must be at least 1 (pause the queue to stop it)".into()));
        }
        let now = self.now_ms();
        let gate = Gate::new(&limit, now)?;
        let remove = limit.rate.is_none() && limit.concurrency.is_none();
        let mut control = self.control();
        let current = match scope {
            Scope::Task => control.task_limits.get(name),
            Scope::Queue => control.queue_limits.get(name),
        };
        if current == Some(&limit) {
            // Workers declare their tasks' limits at every start: the same limit again keeps its bucket, or each
            // restart would allow another burst.
            return Ok(());
        }
        control.update(&self.control_path, |c| {
            let limits = match scope {
                Scope::Task => &mut c.task_limits,
                Scope::Queue => &mut c.queue_limits,
            };
            if remove {
                limits.remove(name);
            } else {
                limits.insert(name.to_string(), limit);
            }
        })?;
        let mut st = self.lock();
        if remove {
            match scope {
                Scope::Task => st.flow.tasks.remove(name),
                Scope::Queue => st.flow.queues.remove(name),
            };
        } else {
            let mut gate = gate;
            // Count what runs now under it.
            gate.running = st
                .leases
                .iter()
                .filter(|(id, entry)| match scope {
                    Scope::Queue => entry.queue == name,
                    Scope::Task => st.live.get(*id).is_some_and(|r| r.task == name),
                })
                .count() as u32;
            match scope {
                Scope::Task => st.flow.tasks.insert(name.to_string(), gate),
                Scope::Queue => st.flow.queues.insert(name.to_string(), gate),
            };
        }
        drop(st);
        drop(control);
        self.ready_notify.notify_waiters();
        Ok(())
    }

    /// The limits set, by task name and by queue.
    pub fn limits(&self) -> (BTreeMap<String, Limit>, BTreeMap<String, Limit>) {
        let control = self.control();
        (control.task_limits.clone(), control.queue_limits.clone())
    }

    /// How many tasks each limited task name and queue runs now.
    pub fn limited_running(&self) -> (BTreeMap<String, u32>, BTreeMap<String, u32>) {
        let st = self.lock();
        let count = |gates: &Map<String, Gate>| gates.iter().map(|(k, g)| (k.clone(), g.running)).collect();
        (count(&st.flow.tasks), count(&st.flow.queues))
    }
}

/// Takes the next task of `queue` that the limits let start, passing over the ones they hold back, and
/// counts it against them. `cursor` carries where this lease has looked so far, so a lease of many tasks walks
/// the queue once.
pub(super) fn take_limited(
    st: &mut State,
    queue: &str,
    now: u64,
    cursor: &mut Option<super::ReadyKey>,
    skipped: &mut usize,
) -> Option<super::Id> {
    let State { queues, live, flow, .. } = st;
    let q = queues.get_mut(queue)?;
    if !flow.queue_open(queue, now) {
        return None;
    }
    let from = match cursor {
        Some(key) => q.ready.range((std::ops::Bound::Excluded(*key), std::ops::Bound::Unbounded)),
        None => q.ready.range(..),
    };
    let mut found = None;
    for (key, id) in from {
        let Some(record) = live.get(id) else {
            // Not live (cannot happen): the caller drops it from the queue.
            found = Some(*key);
            break;
        };
        if flow.task_open(&record.task, now) {
            flow.start(queue, &record.task);
            found = Some(*key);
            break;
        }
        *cursor = Some(*key);
        *skipped += 1;
        if *skipped >= MAX_SKIP {
            break;
        }
    }
    found.and_then(|key| q.ready.remove(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_celery_writes_them() {
        assert_eq!(parse_rate("10/s").unwrap(), 10.0);
        assert_eq!(parse_rate("120/m").unwrap(), 2.0);
        assert_eq!(parse_rate("36/h").unwrap(), 0.01);
        assert_eq!(parse_rate("5").unwrap(), 5.0);
        for bad in ["", "0/s", "-1/m", "x/s", "10/d", "nan/s", "inf"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_lets_the_rate_through_plus_its_burst() {
        let mut bucket = Bucket::new(10.0, 0);
        let mut started = 0;
        // Ask every millisecond for 2 s.
        for now in 0..2000 {
            while bucket.has(now) {
                bucket.tokens -= 1.0;
                started += 1;
            }
        }
        assert_eq!(started, 20, "10/s over 2 s with a burst of 1");
    }
}
