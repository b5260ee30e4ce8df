//! Workflows kept by the daemon: chains and chords (Celery's canvas), each step taken in the same commit as the
//! change that causes it.
//!
//! - **Chain**: a task carries the specs of the tasks after it (`TaskSpec::chain`, their ids fixed at enqueue).
//!   When it succeeds, the daemon enqueues the first link, its result prepended to the link's args (unless the
//!   link is `immutable`), carrying the rest, under the same lock hold as the ack: one log round has both.
//! - **Chord**: the members are ordinary tasks that name their callback; the callback is stored at once, waiting
//!   in no queue. Each member's success sets its bit on the callback's record, in the commit of its ack. When the
//!   last bit is set, the callback gets the array of the members' results (read from memory or disk outside the
//!   state lock) and joins its queue. A crash between the last ack and the release loses nothing: the bits are
//!   on disk, and the release happens after the restart.
//! - **Failure**: a task that ends `FAILURE` or `REVOKED` ends its chain's later links the same way, with its
//!   error (`failed_by_parent`; not in the dead set: they never ran), as Celery marks the rest of a failed chain.
//!   A chord member that ends so fails the callback with a `ChordError` naming it. Requeueing the failed task from
//!   the dead set resumes its chain: links that were failed by it are replaced when it succeeds.

use std::sync::Arc;

use broker_client::proto::{Enqueued, TaskError, TaskSpec, TaskState, Value};

use super::record::{Extra, TaskRecord};
use super::{expired_error, Id, NewTask, Outcome, State, Store, StoreError};

/// What a chord callback is stored with: its members' ids, in order.
pub(super) type Members = Vec<String>;

impl Store {
    /// Stores one validated task, or finds the one its id or unique key names. A chord's callback
    /// (`members`) is stored waiting, in no queue. Returns the reply entry and whether a task became ready.
    pub(super) fn insert(
        &self,
        st: &mut State,
        mut spec: NewTask,
        now: u64,
        members: Option<Members>,
    ) -> (Enqueued, bool) {
        let existing = |id: &str, state| Enqueued { id: id.to_string(), created: false, state, chain: Vec::new() };
        if let Some(id) = &spec.id {
            if let Some(state) = st.state_of(id) {
                return (existing(id, state), false);
            }
        }
        if let Some((id, state)) = spec.unique_key.as_deref().and_then(|key| st.unique_holder(key, now)) {
            return (existing(&id, state), false);
        }
        let id: Id = spec.id.take().unwrap_or_else(|| self.new_id(st)).into();
        // A chain's links get their ids now, so the producer can follow each.
        for link in &mut spec.chain {
            if link.id.is_none() {
                // A new sequence number per id: ids made in one millisecond then differ in their counter too.
                st.take_seq(now);
                link.id = Some(self.new_id(st));
            }
        }
        let chain_ids: Vec<String> = spec.chain.iter().filter_map(|link| link.id.clone()).collect();
        let eta_ms = spec.eta_ms.or(spec.countdown_ms.map(|c| now.saturating_add(c))).filter(|eta| *eta > now);
        let waiting = members.is_some();
        let extra = Extra {
            unique_key: spec.unique_key.take(),
            unique_until_ms: spec.unique_for_ms.map(|w| now.saturating_add(w)),
            chain: std::mem::take(&mut spec.chain),
            members: members.unwrap_or_default(),
            waiting,
            immutable: waiting && spec.immutable,
            countdown_ms: spec.countdown_ms.filter(|_| waiting),
            ..Extra::default()
        };
        let seq = st.take_seq(now);
        let mut record = super::new_record(&mut spec, id.clone(), seq, now, &self.options);
        if eta_ms.is_some() && !waiting {
            record.state = TaskState::Scheduled;
        }
        // A waiting callback's `eta_ms` holds until its release; its countdown counts from the release.
        record.eta_ms = if waiting { spec.eta_ms } else { eta_ms };
        record.extra = (extra != Extra::default()).then(|| Box::new(extra));
        st.hold_unique(&record, now);
        st.totals.enqueued += 1;
        self.happened(st, &record.id, &record.queue, &record.task, Outcome::enqueued, now);
        let created = |state| Enqueued { id: id.to_string(), created: true, state, chain: chain_ids.clone() };
        if waiting {
            st.index_links(&record);
            st.touch(&id);
            st.live.insert(id.clone(), Arc::new(record));
            return (created(TaskState::Pending), false);
        }
        if record.expires_at_ms.is_some_and(|e| e <= now) {
            // Expired on arrival: keep it findable, never run it.
            self.finish_revoked(st, record, now, Some(expired_error()));
            return (created(TaskState::Revoked), false);
        }
        let ready = eta_ms.is_none();
        match eta_ms {
            Some(eta) => {
                st.scheduled.insert((eta, id.clone()), record.queue.clone());
                st.queue(&record.queue).scheduled += 1;
            }
            None => {
                st.queue(&record.queue).ready.insert(record.ready_key(), id.clone());
            }
        }
        let reply = created(record.state);
        st.index_links(&record);
        st.touch(&id);
        st.live.insert(id, Arc::new(record));
        (reply, ready)
    }

    /// Stores a chord: every member, and the callback waiting for them, in one commit. A callback id that exists
    /// returns the chord as it is (a retried request).
    pub fn enqueue_chord(
        &self,
        header: Vec<NewTask>,
        mut callback: NewTask,
    ) -> Result<(Vec<Enqueued>, Enqueued), StoreError> {
        check_chord(&header, &callback)?;
        let now = self.now_ms();
        let mut st = self.lock();
        if let Some(id) = &callback.id {
            if let Some(state) = st.state_of(id) {
                let members: Vec<String> =
                    st.record(id).and_then(|r| r.extra.as_ref()).map_or_else(Vec::new, |e| e.members.clone());
                let header = members
                    .iter()
                    .map(|m| {
                        let state = st.state_of(m).unwrap_or(TaskState::Pending);
                        Enqueued { id: m.clone(), created: false, state, chain: Vec::new() }
                    })
                    .collect();
                return Ok((header, Enqueued { id: id.clone(), created: false, state, chain: Vec::new() }));
            }
        }
        if let Some(taken) = header.iter().filter_map(|m| m.id.as_deref()).find(|id| st.state_of(id).is_some()) {
            return Err(StoreError::Invalid(format!("header: a task with id {taken:?} exists already")));
        }
        if self.options.max_queue_length > 0 {
            Self::check_room(&st, &header, self.options.max_queue_length)?;
        }
        let callback_id = callback.id.get_or_insert_with(|| self.new_id(&mut st)).clone();
        let mut out = Vec::with_capacity(header.len());
        let mut members = Vec::with_capacity(header.len());
        for (i, mut member) in header.into_iter().enumerate() {
            let id = member.id.get_or_insert_with(|| self.new_id(&mut st)).clone();
            let (enqueued, _) = self.insert(&mut st, member, now, None);
            if let Some(record) = st.live.get_mut(id.as_str()) {
                Arc::make_mut(record).extra_mut().chord = Some((callback_id.clone(), i as u32));
            }
            members.push(id);
            out.push(enqueued);
        }
        let (callback, _) = self.insert(&mut st, callback, now, Some(members));
        // A member that expired on arrival will never succeed.
        if let Some(expired) = out.iter().find(|e| e.state.is_terminal()) {
            let error = TaskError {
                kind: "ChordError".into(),
                message: format!("chord member {} ended {}: it expired before it started", expired.id, expired.state),
                traceback: None,
            };
            self.fail_callback(&mut st, &callback.id, error, now);
        }
        drop(st);
        self.ready_notify.notify_waiters();
        self.finished_notify.notify_waiters();
        Ok((out, callback))
    }

    /// After a task reached a terminal state: the next step of its chain, or of its chord.
    pub(super) fn follow_up(&self, st: &mut State, done: &TaskRecord, now: u64) {
        let Some(extra) = done.extra.as_deref() else { return };
        if !extra.chain.is_empty() {
            if done.state == TaskState::Success {
                self.next_link(st, done, &extra.chain, now);
            } else {
                self.fail_links(st, done, &extra.chain, now);
            }
        }
        if let Some((callback, index)) = &extra.chord {
            if done.state == TaskState::Success {
                // Noted on the callback itself, in the same commit as the member's ack: the count survives a
                // restart and does not depend on the members' results still being stored.
                let Some(record) = st.live.get_mut(callback.as_str()) else { return };
                if !record.extra.as_ref().is_some_and(|e| e.waiting) {
                    return;
                }
                let all = Arc::make_mut(record).extra_mut().member_succeeded(*index as usize);
                let callback = Id::from(callback.as_str());
                st.touch(&callback);
                if all {
                    st.chords_ready.push(callback);
                }
            } else {
                let error = TaskError {
                    kind: "ChordError".into(),
                    message: format!("chord member {} ended {}{}", done.id, done.state, error_suffix(done)),
                    traceback: None,
                };
                self.fail_callback(st, callback, error, now);
            }
        }
    }

    /// Enqueues a succeeded task's next link, with the task's result as its first argument.
    fn next_link(&self, st: &mut State, done: &TaskRecord, chain: &[TaskSpec], now: u64) {
        let mut next = chain[0].clone();
        next.chain = chain[1..].to_vec();
        if !next.immutable {
            next.args.insert(0, done.result.as_deref().cloned().unwrap_or(Value::Nil));
        }
        let id = next.id.clone().unwrap_or_default();
        // A link this task's earlier failure ended goes: the chain resumes (the task was requeued). Only such a
        // finished link: one that exists otherwise is the chain's step taken already.
        if st.done.get(id.as_str()).is_some_and(|meta| meta.by_parent) {
            st.delete(&Id::from(id.as_str()));
        }
        st.links.remove(id.as_str());
        let (_, ready) = self.insert(st, NewTask::from(next), now, None);
        st.readied |= ready;
    }

    /// Ends every later link of a chain whose task failed or was revoked, with its state and error.
    fn fail_links(&self, st: &mut State, done: &TaskRecord, chain: &[TaskSpec], now: u64) {
        for link in chain {
            let Some(id) = link.id.as_deref() else { continue };
            st.links.remove(id);
            if st.state_of(id).is_some() {
                continue;
            }
            let error = match &done.error {
                Some(error) => (**error).clone(),
                None => TaskError {
                    kind: "Revoked".into(),
                    message: format!("task {} of its chain was revoked", done.id),
                    traceback: None,
                },
            };
            let mut spec = link.clone();
            spec.chain.clear();
            let (enqueued, _) = self.insert(st, NewTask::from(spec), now, None);
            if enqueued.id != id || !enqueued.created {
                continue;
            }
            let Some(mut record) = st.take_live(&enqueued.id) else { continue };
            self.unqueue(st, &record);
            record.state = done.state;
            record.revoked = done.state == TaskState::Revoked;
            record.error = Some(Box::new(error));
            record.extra_mut().failed_by_parent = true;
            let ttl = record.result_ttl_ms;
            self.finish(st, record, now, ttl);
        }
    }

    /// Fails a chord's waiting callback (a member failed).
    pub(super) fn fail_callback(&self, st: &mut State, callback: &str, error: TaskError, now: u64) {
        let waiting = st.live.get(callback).is_some_and(|r| r.extra.as_ref().is_some_and(|e| e.waiting));
        if !waiting {
            return;
        }
        let Some(mut record) = st.take_live(callback) else { return };
        record.state = TaskState::Failure;
        record.error = Some(Box::new(error));
        let extra = record.extra_mut();
        extra.waiting = false;
        extra.failed_by_parent = true;
        let ttl = record.result_ttl_ms;
        self.finish(st, record, now, ttl);
    }

    /// Releases the chord callbacks whose members all succeeded: each gets the members' results, in order, as
    /// its first argument and joins its queue. Called after an ack and at each tick (after a restart, the
    /// callbacks found complete then).
    pub(super) fn release_chords(&self) -> Result<(), StoreError> {
        let ready = {
            let mut st = self.lock();
            if st.chords_ready.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut st.chords_ready)
        };
        let mut left = ready.into_iter();
        while let Some(callback) = left.next() {
            if let Err(e) = self.release_chord(&callback) {
                // Those not handled yet wait for the next try (the tick's).
                let mut st = self.lock();
                st.chords_ready.push(callback);
                st.chords_ready.extend(left);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Releases one chord callback whose members all succeeded, with their results in header order. If one's
    /// result is no longer stored (its TTL passed, or it was deleted, before the chord completed), the callback
    /// fails with `ChordError` instead.
    fn release_chord(&self, callback: &Id) -> Result<(), StoreError> {
        let members = self
            .with_record(callback, |r| r.extra.as_ref().map(|e| e.members.clone()).unwrap_or_default())?
            .unwrap_or_default();
        // Read outside the state lock: finished members may be on disk only.
        let mut results = Vec::with_capacity(members.len());
        let mut gone = None;
        for member in &members {
            match self.with_record(member, |r| (r.state, r.result.as_deref().cloned()))? {
                Some((TaskState::Success, result)) => results.push(result.unwrap_or(Value::Nil)),
                _ => {
                    gone = Some(member.clone());
                    break;
                }
            }
        }
        let now = self.now_ms();
        let mut st = self.lock();
        if let Some(member) = gone {
            let error = TaskError {
                kind: "ChordError".into(),
                message: format!("the result of chord member {member} is no longer stored (its TTL passed)"),
                traceback: None,
            };
            self.fail_callback(&mut st, callback, error, now);
            drop(st);
            self.finished_notify.notify_waiters();
            return Ok(());
        }
        let waiting = st.live.get(&**callback).is_some_and(|r| r.extra.as_ref().is_some_and(|e| e.waiting));
        if !waiting {
            return Ok(());
        }
        let mut record = st.take_live(callback).expect("live");
        let at = release_callback(&mut record, results, now);
        if at > now {
            record.state = TaskState::Scheduled;
        }
        self.schedule(&mut st, record, at, now);
        drop(st);
        self.ready_notify.notify_waiters();
        Ok(())
    }

    /// At startup, after every record is back: the waiting callbacks whose members all succeeded (the daemon
    /// stopped before it released them) are released at the first tick.
    pub(super) fn recount_chords(&self, st: &mut State) {
        let complete: Vec<Id> = st
            .live
            .iter()
            .filter(|(_, r)| r.extra.as_ref().is_some_and(|e| e.waiting && e.all_succeeded()))
            .map(|(id, _)| id.clone())
            .collect();
        st.chords_ready.extend(complete);
    }
}

/// Checks a chord before anything of it is stored (both stores): its size, each member and the callback as tasks,
/// and the ids within it.
pub(crate) fn check_chord(header: &[NewTask], callback: &NewTask) -> Result<(), StoreError> {
    if header.is_empty() {
        return Err(StoreError::Invalid("a chord needs at least one member in `header`".into()));
    }
    if header.len() > super::MAX_CHORD {
        return Err(StoreError::Invalid(format!("a chord has at most {} members", super::MAX_CHORD)));
    }
    for (i, member) in header.iter().enumerate() {
        let invalid = |m: &str| StoreError::Invalid(format!("header {i}: {m}"));
        super::check_client_ids(member).and_then(|()| Store::validate(member)).map_err(|e| invalid(&e.to_string()))?;
        if !member.chain.is_empty() || member.unique_key.is_some() {
            return Err(invalid("a chord's member has no chain and no unique key"));
        }
        let id = member.id.as_ref();
        if id.is_some() && (header[..i].iter().any(|m| m.id.as_ref() == id) || callback.id.as_ref() == id) {
            return Err(invalid("two tasks of the chord have the same id"));
        }
    }
    super::check_client_ids(callback)
        .and_then(|()| Store::validate(callback))
        .map_err(|e| StoreError::Invalid(format!("callback: {e}")))?;
    if callback.unique_key.is_some() {
        return Err(StoreError::Invalid("callback: a chord's callback has no unique key".into()));
    }
    Ok(())
}

/// A chord callback released (its members all succeeded, with `results`): no longer waiting, given the results as
/// its first argument unless `immutable`; when it is due (its countdown counts from now).
pub(crate) fn release_callback(record: &mut TaskRecord, results: Vec<Value>, now: u64) -> u64 {
    let extra = record.extra_mut();
    extra.waiting = false;
    let countdown = extra.countdown_ms;
    if !extra.immutable {
        let (mut args, kwargs, context) = record.payload.decode();
        args.insert(0, Value::Array(results));
        record.payload = super::Payload::from_values(&args, &kwargs, &context);
    }
    countdown.map(|c| now.saturating_add(c)).or(record.eta_ms).unwrap_or(now).max(now)
}

fn error_suffix(record: &TaskRecord) -> String {
    record.error.as_ref().map_or_else(String::new, |e| format!(": {}: {}", e.kind, e.message))
}
