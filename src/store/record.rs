//! A task as stored: the spec with its defaults filled in, plus its life so far; and its encoding.
//!
//! A task's arguments (`args`, `kwargs`, `context`) are kept as the MessagePack bytes the request carried
//! ([`Payload`]): the daemon checks their shape once, then copies them into the log, sled and lease replies
//! without decoding and re-encoding them. Only `get` and `dead_list` decode them, for their replies.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use broker_client::codec::{value_len, value_len_utf8, MAX_DEPTH};
use broker_client::proto::{TaskError, TaskId, TaskInfo, TaskState, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Order within a queue: higher priority first, then FIFO.
pub type ReadyKey = (Reverse<i32>, u64);

/// One task. Stored (in the log and in sled) as a MessagePack array of its fields in this order, `payload` as
/// its three values `args`, `kwargs` and `context` ([`TaskRecord::encode`]). New fields go at the end: a shorter
/// array from an older version decodes with their defaults.
#[derive(Debug, Clone, Default)]
pub struct TaskRecord {
    pub id: super::Id,
    pub queue: String,
    pub task: String,
    pub payload: Payload,
    pub priority: i32,
    pub max_retries: u32,
    pub retry_delay_ms: u64,
    pub retry_backoff: bool,
    pub retry_delay_max_ms: u64,
    pub lease_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub result_ttl_ms: u64,
    pub state: TaskState,
    /// How many times it was leased.
    pub attempts: u32,
    /// How many of those leases ended without an outcome (deadline passed, worker gone).
    pub lease_losses: u32,
    /// Position in its queue (FIFO within a priority); renewed each time the task becomes ready.
    pub seq: u64,
    pub created_at_ms: u64,
    pub eta_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Boxed (as `error` is): most records in memory are waiting tasks, which have neither, and a box keeps
    /// them 100 bytes smaller. On disk a box is the value itself.
    pub result: Option<Box<Value>>,
    pub error: Option<Box<TaskError>>,
    pub result_expires_at_ms: Option<u64>,
    pub revoked: bool,
    /// What few tasks use (unique keys, progress, workflows), boxed so the many that do not pay one pointer.
    /// Stored as a 27th field, a map, only when present.
    pub extra: Option<Box<Extra>>,
}

/// The rarely used parts of a task's record. A map on disk (fields by name), so fields can be added.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Extra {
    /// The unique key it holds ([`TaskSpec::unique_key`](broker_client::proto::TaskSpec)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Until when the key holds; `None`: until the task finishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_until_ms: Option<u64>,
    /// The latest progress its worker reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<broker_client::proto::Progress>,
    /// The rest of its chain: enqueued one by one as each link succeeds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<broker_client::proto::TaskSpec>,
    /// For a chord's member: the callback's id, and the member's place in the header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chord: Option<(String, u32)>,
    /// For a chord's callback: the members' ids in order. It waits (in no queue) until they all finish.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// It never ran: a task it depended on failed, and it finished with that task's error.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub failed_by_parent: bool,
    /// A chord's callback still waiting for its members (in no queue).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// A chord's callback that does not take the members' results.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub immutable: bool,
    /// For a chord's callback: one bit per member (in header order), set when it succeeded, in the commit of its
    /// `ack`. The callback is released when all are set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub succeeded: Vec<u8>,
    /// For a chord's callback: its `countdown_ms`, counted from its release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub countdown_ms: Option<u64>,
}

impl Extra {
    /// Notes that member `index` of this chord callback succeeded; returns whether every member has.
    pub fn member_succeeded(&mut self, index: usize) -> bool {
        let bytes = self.members.len().div_ceil(8);
        if self.succeeded.len() < bytes {
            self.succeeded.resize(bytes, 0);
        }
        if let Some(byte) = self.succeeded.get_mut(index / 8) {
            *byte |= 1 << (index % 8);
        }
        self.all_succeeded()
    }

    /// Whether every member of this chord callback succeeded.
    pub fn all_succeeded(&self) -> bool {
        (0..self.members.len()).all(|i| self.succeeded.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
    }
}

impl TaskRecord {
    /// Its [`Extra`], made if it has none.
    pub fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// About how many bytes the result or error takes in a reply.
    pub fn result_len(&self) -> usize {
        let result = self.result.as_ref().map_or(0, |value| {
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, value).map_or(0, |()| buf.len())
        });
        let error = self
            .error
            .as_ref()
            .map_or(0, |e| e.kind.len() + e.message.len() + e.traceback.as_ref().map_or(0, String::len));
        result + error
    }

    /// The task as `get` shows it.
    pub fn info(&self) -> TaskInfo {
        let (args, kwargs, context) = self.payload.decode();
        TaskInfo { args, kwargs, context, ..self.info_without_payload() }
    }

    /// [`TaskRecord::info`] encoded as MessagePack (a map with field names), its `args`, `kwargs` and `context`
    /// copied as the bytes they arrived as: no tree of values is built, whatever the arguments hold (an array of
    /// millions of nils costs its bytes, not a value each).
    pub fn info_bytes(&self) -> Result<Vec<u8>, String> {
        let head = rmp_serde::to_vec_named(&self.info_without_payload()).map_err(|e| e.to_string())?;
        let entries = map_entries(&head).ok_or("not a map")??;
        let (args, kwargs, context) = self.payload.parts();
        let mut out = Vec::with_capacity(head.len() + self.payload.bytes().len());
        rmp::encode::write_map_len(&mut out, entries.len() as u32).map_err(|e| e.to_string())?;
        for (key, value) in entries {
            out.extend_from_slice(key);
            out.extend_from_slice(match key_str(key) {
                Some("args") => args,
                Some("kwargs") => kwargs,
                Some("context") => context,
                _ => value,
            });
        }
        Ok(out)
    }

    /// The task as `get` shows it, with empty arguments.
    fn info_without_payload(&self) -> TaskInfo {
        TaskInfo {
            id: self.id.to_string(),
            queue: self.queue.clone(),
            task: self.task.clone(),
            state: self.state,
            attempts: self.attempts,
            max_retries: self.max_retries,
            priority: self.priority,
            args: Vec::new(),
            kwargs: BTreeMap::new(),
            context: BTreeMap::new(),
            // A nil result reads back from disk as absent; a succeeded task always shows one.
            result: match (&self.result, self.state) {
                (None, TaskState::Success) => Some(Value::Nil),
                (result, _) => result.as_deref().cloned(),
            },
            error: self.error.as_deref().cloned(),
            created_at_ms: self.created_at_ms,
            eta_ms: self.eta_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            result_expires_at_ms: self.result_expires_at_ms,
            revoked: self.revoked,
            progress: self.extra.as_ref().and_then(|e| e.progress.clone()),
            chain: self
                .extra
                .as_ref()
                .map_or_else(Vec::new, |e| e.chain.iter().filter_map(|link| link.id.clone()).collect()),
            chord: self.extra.as_ref().and_then(|e| e.chord.as_ref().map(|(id, _)| id.clone())),
            members: self.extra.as_ref().map_or_else(Vec::new, |e| e.members.clone()),
        }
    }

    /// Its place in its queue's ready order.
    pub fn ready_key(&self) -> ReadyKey {
        (Reverse(self.priority), self.seq)
    }

    /// The delay before the retry after failed attempt number `attempts`.
    pub fn backoff_ms(&self) -> u64 {
        if !self.retry_backoff {
            return self.retry_delay_ms;
        }
        let exponent = self.attempts.saturating_sub(1).min(32);
        self.retry_delay_ms.saturating_mul(1u64 << exponent).min(self.retry_delay_max_ms)
    }
}

/// The record as serde's derive saw it before payloads were kept as bytes. Its array form is the same bytes as
/// [`TaskRecord::encode`] writes (a test checks it); data directories from before records were arrays hold it
/// as a map with field names, which [`TaskRecord::decode`] reads through this type.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Legacy {
    id: TaskId,
    queue: String,
    task: String,
    args: Vec<Value>,
    kwargs: BTreeMap<String, Value>,
    context: BTreeMap<String, Value>,
    priority: i32,
    max_retries: u32,
    retry_delay_ms: u64,
    retry_backoff: bool,
    retry_delay_max_ms: u64,
    lease_ms: u64,
    expires_at_ms: Option<u64>,
    result_ttl_ms: u64,
    state: TaskState,
    attempts: u32,
    lease_losses: u32,
    seq: u64,
    created_at_ms: u64,
    eta_ms: Option<u64>,
    started_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    result: Option<Value>,
    error: Option<TaskError>,
    result_expires_at_ms: Option<u64>,
    revoked: bool,
}

impl From<Legacy> for TaskRecord {
    fn from(old: Legacy) -> Self {
        TaskRecord {
            payload: Payload::from_values(&old.args, &old.kwargs, &old.context),
            id: old.id.into(),
            queue: old.queue,
            task: old.task,
            priority: old.priority,
            max_retries: old.max_retries,
            retry_delay_ms: old.retry_delay_ms,
            retry_backoff: old.retry_backoff,
            retry_delay_max_ms: old.retry_delay_max_ms,
            lease_ms: old.lease_ms,
            expires_at_ms: old.expires_at_ms,
            result_ttl_ms: old.result_ttl_ms,
            state: old.state,
            attempts: old.attempts,
            lease_losses: old.lease_losses,
            seq: old.seq,
            created_at_ms: old.created_at_ms,
            eta_ms: old.eta_ms,
            started_at_ms: old.started_at_ms,
            finished_at_ms: old.finished_at_ms,
            result: old.result.map(Box::new),
            error: old.error.map(Box::new),
            result_expires_at_ms: old.result_expires_at_ms,
            revoked: old.revoked,
            extra: None,
        }
    }
}

/// The number of fields in a stored record without [`Extra`].
const FIELDS: u32 = 26;

/// Why a stored record could not be read.
pub type DecodeError = String;

fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<(), DecodeError> {
    rmp_serde::encode::write(out, value).map_err(|e| e.to_string())
}

/// Reads the next value of `rest` as a `T`.
fn take<T: DeserializeOwned>(rest: &mut &[u8], field: &str) -> Result<T, DecodeError> {
    let len = value_len(rest, MAX_DEPTH).map_err(|e| format!("field `{field}`: {e}"))?;
    let value = rmp_serde::from_slice(&rest[..len]).map_err(|e| format!("field `{field}`: {e}"))?;
    *rest = &rest[len..];
    Ok(value)
}

impl TaskRecord {
    /// Appends the record's encoding (see the type's documentation).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let fields = if self.extra.is_some() { FIELDS + 1 } else { FIELDS };
        rmp::encode::write_array_len(out, fields).map_err(|e| e.to_string())?;
        put(out, &self.id)?;
        put(out, &self.queue)?;
        put(out, &self.task)?;
        out.extend_from_slice(self.payload.bytes());
        put(out, &self.priority)?;
        put(out, &self.max_retries)?;
        put(out, &self.retry_delay_ms)?;
        put(out, &self.retry_backoff)?;
        put(out, &self.retry_delay_max_ms)?;
        put(out, &self.lease_ms)?;
        put(out, &self.expires_at_ms)?;
        put(out, &self.result_ttl_ms)?;
        put(out, &self.state)?;
        put(out, &self.attempts)?;
        put(out, &self.lease_losses)?;
        put(out, &self.seq)?;
        put(out, &self.created_at_ms)?;
        put(out, &self.eta_ms)?;
        put(out, &self.started_at_ms)?;
        put(out, &self.finished_at_ms)?;
        put(out, &self.result)?;
        put(out, &self.error)?;
        put(out, &self.result_expires_at_ms)?;
        put(out, &self.revoked)?;
        if let Some(extra) = &self.extra {
            rmp_serde::encode::write_named(out, extra).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Reads a record [`TaskRecord::encode`] wrote (or an older version did: missing trailing fields take their
    /// defaults, extra ones from a newer version are ignored).
    pub fn decode(bytes: &[u8]) -> Result<TaskRecord, DecodeError> {
        if matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
            return rmp_serde::from_slice::<Legacy>(bytes).map(TaskRecord::from).map_err(|e| e.to_string());
        }
        let mut rest = bytes;
        let fields = rmp::decode::read_array_len(&mut rest).map_err(|e| format!("not a record: {e}"))?;
        if fields < 6 {
            return Err(format!("a record of {fields} fields"));
        }
        let mut left = fields;
        let mut record = TaskRecord {
            id: take(&mut rest, "id")?,
            queue: take(&mut rest, "queue")?,
            task: take(&mut rest, "task")?,
            payload: {
                let payload = Payload::take(&mut rest)?;
                left -= 6;
                payload
            },
            ..TaskRecord::default()
        };
        macro_rules! fields {
            ($($name:ident),*) => {$(
                if left > 0 {
                    record.$name = take(&mut rest, stringify!($name))?;
                    left -= 1;
                }
            )*};
        }
        fields!(
            priority,
            max_retries,
            retry_delay_ms,
            retry_backoff,
            retry_delay_max_ms,
            lease_ms,
            expires_at_ms,
            result_ttl_ms,
            state,
            attempts,
            lease_losses,
            seq,
            created_at_ms,
            eta_ms,
            started_at_ms,
            finished_at_ms,
            result,
            error,
            result_expires_at_ms,
            revoked,
            extra
        );
        Ok(record)
    }
}

/// A task's `args` (an array), `kwargs` and `context` (maps with string keys), as the MessagePack bytes of the
/// three values back to back, exactly as the request carried them.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Box<[u8]>);

/// No arguments: an empty array and two empty maps.
const EMPTY: [u8; 3] = [0x90, 0x80, 0x80];

impl Default for Payload {
    fn default() -> Self {
        Payload(Box::new(EMPTY))
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (args, kwargs, context) = self.decode();
        f.debug_struct("Payload").field("args", &args).field("kwargs", &kwargs).field("context", &context).finish()
    }
}

/// Whether `value` (one whole MessagePack value) is an array.
fn is_array(value: &[u8]) -> bool {
    matches!(value.first(), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// Checks that `value` (one whole, well-formed MessagePack value) is a map whose keys are all strings.
fn check_string_map(value: &[u8], field: &str) -> Result<(), String> {
    let entries = map_entries(value).ok_or_else(|| format!("`{field}` must be a map"))??;
    if entries.iter().any(|(key, _)| key_str(key).is_none()) {
        return Err(format!("the keys of `{field}` must be strings"));
    }
    Ok(())
}

/// One map entry: its key's bytes and its value's.
pub type Entry<'a> = (&'a [u8], &'a [u8]);

/// The entries of the MessagePack map `map` starts with; `None` if it is no map, an error if an entry is
/// malformed.
pub fn map_entries(map: &[u8]) -> Option<Result<Vec<Entry<'_>>, String>> {
    let mut rest = map;
    let count = rmp::decode::read_map_len(&mut rest).ok()?;
    let mut entries = Vec::with_capacity(count.min(64) as usize);
    fn split(rest: &[u8]) -> Result<(&[u8], &[u8]), String> {
        value_len(rest, MAX_DEPTH).map(|len| rest.split_at(len))
    }
    for _ in 0..count {
        let (key, after_key) = match split(rest) {
            Ok(parts) => parts,
            Err(e) => return Some(Err(e)),
        };
        let (value, after_value) = match split(after_key) {
            Ok(parts) => parts,
            Err(e) => return Some(Err(e)),
        };
        entries.push((key, value));
        rest = after_value;
    }
    Some(Ok(entries))
}

/// A map key's text, if it is a `str`.
pub fn key_str(key: &[u8]) -> Option<&str> {
    rmp::decode::read_str_from_slice(key).ok().map(|(text, _)| text)
}

impl Payload {
    /// The three values' bytes, back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// How many bytes the three values take.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: even no arguments take three bytes. (For `len`'s sake.)
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes of `args`, `kwargs` and `context`.
    pub fn parts(&self) -> (&[u8], &[u8], &[u8]) {
        // Checked when the payload was made, so the walk cannot fail; an empty value stands in if it ever did.
        let split = |rest: &[u8]| value_len(rest, MAX_DEPTH).unwrap_or(rest.len());
        let bytes = self.bytes();
        let a = split(bytes);
        let k = a + split(&bytes[a..]);
        (&bytes[..a], &bytes[a..k], &bytes[k..])
    }

    /// A payload from the three values' bytes, checking their shape: `args` an array, `kwargs` and `context`
    /// maps with string keys. `None` stands for an absent field (empty).
    pub fn from_parts(args: Option<&[u8]>, kwargs: Option<&[u8]>, context: Option<&[u8]>) -> Result<Payload, String> {
        let mut out = Vec::with_capacity(
            args.map_or(1, <[u8]>::len) + kwargs.map_or(1, <[u8]>::len) + context.map_or(1, <[u8]>::len),
        );
        for (value, field) in [(args, "args"), (kwargs, "kwargs"), (context, "context")] {
            if let Some(value) = value {
                value_len_utf8(value, MAX_DEPTH).map_err(|e| format!("`{field}`: {e}"))?;
            }
        }
        match args {
            Some(args) if is_array(args) => out.extend_from_slice(args),
            Some(_) => return Err("`args` must be an array".into()),
            None => out.push(EMPTY[0]),
        }
        for (value, field) in [(kwargs, "kwargs"), (context, "context")] {
            match value {
                Some(value) => {
                    check_string_map(value, field)?;
                    out.extend_from_slice(value);
                }
                None => out.push(EMPTY[1]),
            }
        }
        Ok(Payload(out.into_boxed_slice()))
    }

    /// The payload of a task spec: `spec` holds the bytes of its map (one well-formed MessagePack value).
    pub fn of_spec(spec: &[u8]) -> Result<Payload, String> {
        let entries = map_entries(spec).ok_or_else(|| "a task must be a map".to_string())??;
        let mut found: [Option<&[u8]>; 3] = [None; 3];
        for (key, value) in entries {
            let slot = match key_str(key) {
                Some("args") => 0,
                Some("kwargs") => 1,
                Some("context") => 2,
                Some(_) => continue,
                None => return Err("the keys of a task must be strings".into()),
            };
            if found[slot].replace(value).is_some() {
                return Err(format!("duplicate field `{}`", ["args", "kwargs", "context"][slot]));
            }
        }
        let [args, kwargs, context] = found;
        Payload::from_parts(args, kwargs, context)
    }

    /// A payload from decoded values (tests, and callers holding values).
    pub fn from_values(args: &[Value], kwargs: &BTreeMap<String, Value>, context: &BTreeMap<String, Value>) -> Payload {
        let mut out = Vec::new();
        rmp_serde::encode::write(&mut out, args).expect("values encode into a Vec");
        rmp_serde::encode::write(&mut out, kwargs).expect("values encode into a Vec");
        rmp_serde::encode::write(&mut out, context).expect("values encode into a Vec");
        Payload(out.into_boxed_slice())
    }

    /// Reads a payload (three values) from the front of `rest`, checking its shape.
    fn take(rest: &mut &[u8]) -> Result<Payload, DecodeError> {
        let a = value_len(rest, MAX_DEPTH).map_err(|e| format!("field `args`: {e}"))?;
        let k = a + value_len(&rest[a..], MAX_DEPTH).map_err(|e| format!("field `kwargs`: {e}"))?;
        let c = k + value_len(&rest[k..], MAX_DEPTH).map_err(|e| format!("field `context`: {e}"))?;
        let payload = Payload::from_parts(Some(&rest[..a]), Some(&rest[a..k]), Some(&rest[k..c]))?;
        *rest = &rest[c..];
        Ok(payload)
    }

    /// The three values, decoded. A value that does not decode (never seen: the shape is checked when the
    /// payload is made) reads as empty.
    pub fn decode(&self) -> (Vec<Value>, BTreeMap<String, Value>, BTreeMap<String, Value>) {
        let (args, kwargs, context) = self.parts();
        (
            rmp_serde::from_slice(args).unwrap_or_default(),
            rmp_serde::from_slice(kwargs).unwrap_or_default(),
            rmp_serde::from_slice(context).unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old() -> Legacy {
        Legacy {
            id: "t1".into(),
            queue: "q".into(),
            task: "add".into(),
            args: vec![Value::from(1), Value::from("two")],
            kwargs: BTreeMap::from([("k".to_string(), Value::from(3.5))]),
            context: BTreeMap::from([("path".to_string(), Value::from("/x"))]),
            priority: -2,
            max_retries: 5,
            retry_delay_ms: 10,
            retry_backoff: false,
            retry_delay_max_ms: 99,
            lease_ms: 30_000,
            expires_at_ms: Some(7),
            result_ttl_ms: 1000,
            state: TaskState::Failure,
            attempts: 2,
            lease_losses: 1,
            seq: 12,
            created_at_ms: 100,
            eta_ms: None,
            started_at_ms: Some(101),
            finished_at_ms: Some(102),
            result: None,
            error: Some(TaskError { kind: "ValueError".into(), message: "bad".into(), ..TaskError::default() }),
            result_expires_at_ms: Some(1102),
            revoked: true,
        }
    }

    #[test]
    fn records_from_before_payloads_decode_and_encode_to_the_same_bytes() {
        let old = old();
        let bytes = rmp_serde::to_vec(&old).unwrap();
        let record = TaskRecord::decode(&bytes).unwrap();
        assert_eq!(&*record.id, "t1");
        assert_eq!(record.payload.decode(), (old.args.clone(), old.kwargs.clone(), old.context.clone()));
        assert_eq!((record.priority, record.state, record.attempts), (-2, TaskState::Failure, 2));
        assert_eq!(record.error.as_deref().map(|e| e.kind.as_str()), Some("ValueError"));
        assert_eq!((record.started_at_ms, record.eta_ms, record.revoked), (Some(101), None, true));
        let mut again = Vec::new();
        record.encode(&mut again).unwrap();
        assert_eq!(again, bytes, "the encoding did not change");
        let named = TaskRecord::decode(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert_eq!((&*named.id, named.payload, named.lease_losses), ("t1", record.payload, 1));
    }

    #[test]
    fn a_shorter_record_takes_defaults_and_a_bad_one_is_an_error() {
        let mut short = Vec::new();
        rmp::encode::write_array_len(&mut short, 7).unwrap();
        for value in ["id", "q", "t"] {
            rmp_serde::encode::write(&mut short, value).unwrap();
        }
        short.extend_from_slice(&EMPTY);
        rmp_serde::encode::write(&mut short, &4i32).unwrap();
        let record = TaskRecord::decode(&short).unwrap();
        assert_eq!((&*record.id, record.priority, record.max_retries), ("id", 4, 0));
        assert!(TaskRecord::decode(&short[..short.len() - 1]).is_err());
        assert!(TaskRecord::decode(&[0xc0]).is_err());
    }

    #[test]
    fn a_spec_payload_keeps_its_bytes_and_checks_its_shape() {
        let spec = |fields: Vec<(&str, Value)>| {
            let map = Value::Map(fields.into_iter().map(|(k, v)| (Value::from(k), v)).collect());
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &map).unwrap();
            out
        };
        let args = Value::Array(vec![Value::from(1), Value::from("x")]);
        let kwargs = Value::Map(vec![(Value::from("b"), Value::from(2)), (Value::from("a"), Value::Nil)]);
        let payload =
            Payload::of_spec(&spec(vec![("task", "t".into()), ("args", args.clone()), ("kwargs", kwargs)])).unwrap();
        let (a, k, c) = payload.parts();
        assert_eq!(rmpv::decode::read_value(&mut &a[..]).unwrap(), args);
        // Key order is kept as sent.
        assert_eq!(k, [0x82, 0xa1, b'b', 0x02, 0xa1, b'a', 0xc0]);
        assert_eq!(c, [0x80]);
        assert_eq!(Payload::of_spec(&spec(vec![("task", "t".into())])).unwrap(), Payload::default());
        let refused = |fields| Payload::of_spec(&spec(fields)).unwrap_err();
        assert!(refused(vec![("args", Value::from(1))]).contains("`args` must be an array"));
        assert!(refused(vec![("kwargs", Value::Array(vec![]))]).contains("`kwargs` must be a map"));
        let int_key = Value::Map(vec![(Value::from(1), Value::from(2))]);
        assert!(refused(vec![("context", int_key)]).contains("keys of `context` must be strings"));
        assert!(refused(vec![("args", Value::Array(vec![])), ("args", Value::Array(vec![]))]).contains("duplicate"));
        // {"args": ["\xff"]}: a str that is not UTF-8.
        let bad_utf8 = [0x81, 0xa4, b'a', b'r', b'g', b's', 0x91, 0xa1, 0xff];
        assert!(Payload::of_spec(&bad_utf8).unwrap_err().contains("not UTF-8"));
        let bin_key = Value::Map(vec![(Value::Binary(b"args".to_vec()), Value::Array(vec![]))]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &bin_key).unwrap();
        assert!(Payload::of_spec(&bytes).unwrap_err().contains("keys of a task must be strings"));
    }
}
