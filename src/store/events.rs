//! Task events for `events` (proto.md): the latest ones in a ring, recorded only while someone follows them.

use std::collections::VecDeque;

use super::Id;
use crate::metrics::Outcome;

/// How many task events `events` keeps.
const EVENT_RING: usize = 10_000;
/// Events are recorded for this long after the last `events` request (nobody pays for them otherwise).
pub const EVENT_LINGER_MS: u64 = 60_000;

/// Something that happened to a task, for `events`.
#[derive(Debug, Clone)]
pub struct TaskEvent {
    /// Its number: events are numbered in the order they happened.
    pub seq: u64,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The task.
    pub task_id: Id,
    /// Its queue.
    pub queue: String,
    /// Its name.
    pub task: String,
    /// What happened.
    pub event: Outcome,
}

/// The latest task events, numbered in the order they were recorded.
#[derive(Debug, Default)]
pub struct EventRing {
    events: VecDeque<TaskEvent>,
    seq: u64,
    until_ms: u64,
}

impl EventRing {
    /// Whether events happening at `now` are to be recorded (someone asked lately).
    pub fn wanted(&self, now: u64) -> bool {
        now < self.until_ms
    }

    /// Until when events are recorded.
    pub fn until_ms(&self) -> u64 {
        self.until_ms
    }

    /// Records an event (the oldest goes past [`EVENT_RING`]).
    pub fn push(&mut self, at_ms: u64, task_id: Id, queue: String, task: String, event: Outcome) {
        self.seq += 1;
        self.events.push_back(TaskEvent { seq: self.seq, at_ms, task_id, queue, task, event });
        if self.events.len() > EVENT_RING {
            self.events.pop_front();
        }
    }

    /// The events after `after` (from now when `None`), at most `max`, of `queue` only if given: (events, the
    /// cursor to ask from next, how many events after `after` were dropped from the ring before this call).
    /// Asking at `now` keeps events recorded for the next [`EVENT_LINGER_MS`] (past a wait of `wait_ms`).
    pub fn read(
        &mut self,
        after: Option<u64>,
        max: usize,
        queue: Option<&str>,
        now: u64,
        wait_ms: u64,
    ) -> (Vec<TaskEvent>, u64, u64) {
        let until = now.saturating_add(EVENT_LINGER_MS.max(wait_ms.saturating_add(EVENT_LINGER_MS)));
        self.until_ms = self.until_ms.max(until);
        let after = after.unwrap_or(self.seq).min(self.seq);
        let oldest = self.events.front().map_or(self.seq + 1, |e| e.seq);
        let missed = oldest.saturating_sub(after + 1);
        let mut next = after;
        let mut out = Vec::new();
        for event in self.events.iter().filter(|e| e.seq > after) {
            if out.len() >= max {
                break;
            }
            next = event.seq;
            if queue.is_none_or(|q| q == event.queue) {
                out.push(event.clone());
            }
        }
        (out, next, missed)
    }
}
