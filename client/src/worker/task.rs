//! What a handler sees and returns: the typed [`Task`] view of a leased task, the [`TaskFailure`] it returns when
//! it does not succeed, and the type erasure that turns a typed async function into something the runtime can
//! call by name.
//!
//! Decoding happens here, before the handler is spawned, so a task whose arguments do not fit the handler's types
//! never reaches the handler: it becomes a non-retried failure that names the task and the offending field.

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::proto::{LeasedTask, TaskError, TaskId, Value};

/// The context a task carries: string keys to MessagePack values, copied unchanged from the enqueue to every
/// attempt (retries included).
pub type Context = BTreeMap<String, Value>;

/// The `type` of the error reported when a task's args or kwargs do not fit the handler's types (not retried).
pub const INVALID_ARGUMENTS: &str = "InvalidArguments";
/// The `type` of the error reported for a task name no handler is registered for (retried by the task's policy).
pub const UNKNOWN_TASK: &str = "UnknownTask";
/// The `type` of the error reported when a handler panicked (retried by the task's policy).
pub const PANIC: &str = "Panic";
/// The `type` of the error reported when a handler's return value cannot be encoded (not retried).
pub const INVALID_RESULT: &str = "InvalidResult";
/// The `type` of the failure built by [`TaskFailure::retry_in`] and [`Task::retry`].
pub const RETRY: &str = "Retry";

/// A leased task as its handler sees it: the arguments decoded into the handler's own types, plus who it is and
/// the context it carries.
///
/// `A` is decoded from the positional arguments (an array: use a tuple such as `(i64, i64)`, a `Vec<f64>`, a
/// tuple struct, or `()` for none); `K` from the keyword arguments (a map: a struct with `#[derive(Deserialize)]`,
/// or the default `BTreeMap<String, Value>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Task<A = Vec<Value>, K = BTreeMap<String, Value>> {
    /// The task's id.
    pub id: TaskId,
    /// The task's name (what it was registered under).
    pub name: String,
    /// The queue it was leased from.
    pub queue: String,
    /// 1 on the first delivery, 2 on the second, ... (a retry or a lost lease counts; a release does not).
    pub attempt: u32,
    /// The task's retry budget: it is retried after a failure while `attempt <= max_retries`.
    pub max_retries: u32,
    /// The positional arguments.
    pub args: A,
    /// The keyword arguments.
    pub kwargs: K,
    /// The values the producer attached at enqueue (request path, headers, current user...), unchanged.
    pub context: Context,
}

impl<A, K> Task<A, K> {
    /// A context value decoded as `T`; `None` if the key is absent or holds something else.
    pub fn context_get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.context.get(key).and_then(|v| crate::proto::from_value(v.clone()).ok())
    }

    /// The W3C `traceparent` of the trace the task was enqueued in (the context's `"trace"`, set by the Python
    /// client or by `TaskBuilder::traceparent`), for the handler to continue it in its own tracing.
    pub fn traceparent(&self) -> Option<&str> {
        let carrier = self.context.get("trace")?.as_map()?;
        carrier.iter().find(|(k, _)| k.as_str() == Some("traceparent")).and_then(|(_, v)| v.as_str())
    }

    /// A context value as a string slice; `None` if absent or not a string.
    pub fn context_str(&self, key: &str) -> Option<&str> {
        self.context.get(key).and_then(Value::as_str)
    }

    /// A failure that asks for another attempt after `countdown`, like Celery's `self.retry(countdown=...)`.
    /// Return it as the handler's `Err`. The retry counts against the task's budget; once that is spent the task
    /// fails for good. The context travels with the retry unchanged.
    pub fn retry(&self, countdown: Duration) -> TaskFailure {
        TaskFailure::retry_in(countdown)
    }

    /// Whether a failure now would be final (no retries left).
    pub fn is_last_attempt(&self) -> bool {
        self.attempt > self.max_retries
    }
}

/// Why a task did not succeed, as a handler reports it: an error type and message (shown by `broker get` and in
/// the dead set), whether to retry, and an optional countdown before the retry.
///
/// Any `std::error::Error` converts into one (so `?` works in handlers), with the error's type name as `kind`
/// and its message (and its sources) as `message`; such failures are retried by the task's own policy.
/// `TaskFailure` deliberately does not implement `std::error::Error` itself: that is what lets the blanket
/// conversion exist.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFailure {
    kind: String,
    message: String,
    traceback: Option<String>,
    retry: bool,
    countdown: Option<Duration>,
}

impl TaskFailure {
    /// A failure with an error type name (e.g. `"ValueError"`) and a message, retried by the task's policy.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        TaskFailure { kind: kind.into(), message: message.into(), traceback: None, retry: true, countdown: None }
    }

    /// A failure of type `"Error"` with `message`, retried by the task's policy.
    pub fn msg(message: impl Into<String>) -> Self {
        TaskFailure::new("Error", message)
    }

    /// A request for another attempt after `countdown` (type `"Retry"`), like Celery's `self.retry(countdown=...)`.
    pub fn retry_in(countdown: Duration) -> Self {
        TaskFailure::new(RETRY, format!("retry requested in {} ms", countdown.as_millis())).countdown(countdown)
    }

    /// Never retry this failure, whatever the task's budget: the task goes to the dead set at once.
    pub fn no_retry(mut self) -> Self {
        self.retry = false;
        self.countdown = None;
        self
    }

    /// Retry after `countdown` instead of the task's backoff delay (if it is retried at all).
    pub fn countdown(mut self, countdown: Duration) -> Self {
        self.countdown = Some(countdown);
        self
    }

    /// Attaches a traceback or backtrace, stored with the error.
    pub fn traceback(mut self, traceback: impl Into<String>) -> Self {
        self.traceback = Some(traceback.into());
        self
    }

    /// The error's type name.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The error's message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the task may be retried (subject to its budget).
    pub fn is_retryable(&self) -> bool {
        self.retry
    }

    /// The countdown before the retry, if the failure chose one.
    pub fn retry_countdown(&self) -> Option<Duration> {
        self.countdown
    }

    /// The error as stored by the daemon.
    pub fn to_task_error(&self) -> TaskError {
        TaskError { kind: self.kind.clone(), message: self.message.clone(), traceback: self.traceback.clone() }
    }
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskFailure {
    fn from(error: E) -> Self {
        let full = std::any::type_name::<E>();
        // `my_crate::errors::Timeout<T>` → `Timeout`: the short name is what people search logs for.
        let base = full.split('<').next().unwrap_or(full);
        let kind = base.rsplit("::").next().unwrap_or(base);
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        TaskFailure::new(kind, message)
    }
}

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A handler with its types erased: decode a leased task, or say why it cannot be decoded.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    /// Decodes `leased` into the handler's types and returns the future that runs it and encodes its result.
    fn prepare(&self, leased: &LeasedTask) -> Result<BoxFuture<Result<Value, TaskFailure>>, TaskFailure>;
}

/// A typed async function registered as a handler.
pub(crate) struct FnHandler<F, A, K, R> {
    f: F,
    _types: PhantomData<fn(A, K) -> R>,
}

impl<F, A, K, R> FnHandler<F, A, K, R> {
    pub(crate) fn new(f: F) -> Self {
        FnHandler { f, _types: PhantomData }
    }
}

impl<F, Fut, A, K, R> ErasedHandler for FnHandler<F, A, K, R>
where
    F: Fn(Task<A, K>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskFailure>> + Send + 'static,
    A: DeserializeOwned + Send + 'static,
    K: DeserializeOwned + Send + 'static,
    R: Serialize + 'static,
{
    fn prepare(&self, leased: &LeasedTask) -> Result<BoxFuture<Result<Value, TaskFailure>>, TaskFailure> {
        let task = decode_task::<A, K>(leased)?;
        let run = (self.f)(task);
        let name = leased.task.clone();
        Ok(Box::pin(async move {
            let result = run.await?;
            rmpv::ext::to_value(&result).map_err(|e| {
                TaskFailure::new(INVALID_RESULT, format!("task {name}: cannot encode the result: {e}")).no_retry()
            })
        }))
    }
}

/// Decodes a leased task's args and kwargs into the handler's types.
pub(crate) fn decode_task<A: DeserializeOwned, K: DeserializeOwned>(
    leased: &LeasedTask,
) -> Result<Task<A, K>, TaskFailure> {
    let args_value = Value::Array(leased.args.clone());
    let args = match decode::<A>(args_value) {
        Ok(args) => args,
        // `()` (a handler that takes no arguments) decodes from nil, not from an empty array.
        Err(_) if leased.args.is_empty() && decode::<A>(Value::Nil).is_ok() => {
            decode::<A>(Value::Nil).map_err(|(path, msg)| bad_arguments(&leased.task, "args", &path, &msg))?
        }
        Err((path, msg)) => return Err(bad_arguments(&leased.task, "args", &path, &msg)),
    };
    let kwargs_value =
        Value::Map(leased.kwargs.iter().map(|(k, v)| (Value::from(k.as_str()), v.clone())).collect::<Vec<_>>());
    let kwargs = match decode::<K>(kwargs_value) {
        Ok(kwargs) => kwargs,
        Err(_) if leased.kwargs.is_empty() && decode::<K>(Value::Nil).is_ok() => {
            decode::<K>(Value::Nil).map_err(|(path, msg)| bad_arguments(&leased.task, "kwargs", &path, &msg))?
        }
        Err((path, msg)) => return Err(bad_arguments(&leased.task, "kwargs", &path, &msg)),
    };
    Ok(Task {
        id: leased.id.clone(),
        name: leased.task.clone(),
        queue: leased.queue.clone(),
        attempt: leased.attempt,
        max_retries: leased.max_retries,
        args,
        kwargs,
        context: leased.context.clone(),
    })
}

/// Decodes `value` as `T`, returning the path to the offending field and the complaint on failure.
fn decode<T: DeserializeOwned>(value: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let message = message.strip_prefix("error while decoding value: ").unwrap_or(&message).to_string();
        (path, message)
    })
}

fn bad_arguments(task: &str, part: &str, path: &str, message: &str) -> TaskFailure {
    let field = match path {
        "." | "" => part.to_string(),
        p if p.starts_with('[') => format!("{part}{p}"),
        p => format!("{part}.{p}"),
    };
    TaskFailure::new(INVALID_ARGUMENTS, format!("task {task}: bad {field}: {message}")).no_retry()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn leased(args: Vec<Value>, kwargs: BTreeMap<String, Value>) -> LeasedTask {
        LeasedTask {
            id: "t1".into(),
            lease_id: 1,
            queue: "default".into(),
            task: "add".into(),
            args,
            kwargs,
            context: BTreeMap::new(),
            attempt: 1,
            max_retries: 3,
            deadline_ms: 0,
            lease_ms: 1000,
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Opts {
        user: User,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct User {
        id: i64,
    }

    #[test]
    fn decodes_tuples_vectors_and_unit() {
        let t = decode_task::<(i64, i64), BTreeMap<String, Value>>(&leased(vec![2.into(), 3.into()], BTreeMap::new()));
        assert_eq!(t.unwrap().args, (2, 3));
        let t = decode_task::<Vec<f64>, ()>(&leased(vec![1.5.into(), 2.into()], BTreeMap::new())).unwrap();
        assert_eq!(t.args, vec![1.5, 2.0]);
        let t = decode_task::<(), ()>(&leased(vec![], BTreeMap::new())).unwrap();
        assert_eq!(t.args, ());
    }

    #[test]
    fn bad_arguments_name_the_task_and_the_field() {
        let e = decode_task::<(i64, i64), ()>(&leased(vec!["x".into(), 3.into()], BTreeMap::new())).unwrap_err();
        assert_eq!(e.kind(), INVALID_ARGUMENTS);
        assert!(!e.is_retryable());
        assert!(e.message().starts_with("task add: bad args[0]: invalid type: string"), "{}", e.message());

        let e = decode_task::<(i64, i64), ()>(&leased(vec![1.into()], BTreeMap::new())).unwrap_err();
        assert!(e.message().starts_with("task add: bad args: invalid length 1"), "{}", e.message());

        let mut kwargs = BTreeMap::new();
        kwargs.insert("user".to_string(), Value::Map(vec![(Value::from("id"), Value::from("z"))]));
        let e = decode_task::<(), Opts>(&leased(vec![], kwargs)).unwrap_err();
        assert!(e.message().starts_with("task add: bad kwargs.user.id: invalid type"), "{}", e.message());
    }

    #[test]
    fn errors_convert_with_their_type_name() {
        let e: TaskFailure = "x".parse::<i32>().unwrap_err().into();
        assert_eq!(e.kind(), "ParseIntError");
        assert!(e.is_retryable());
        let r = TaskFailure::retry_in(Duration::from_millis(250));
        assert_eq!(r.kind(), RETRY);
        assert_eq!(r.retry_countdown(), Some(Duration::from_millis(250)));
    }
}
