//! MessagePack values and tasks as JSON, for people: the CLI's `--json` output and the dashboard.

use broker_client::proto::{TaskInfo, Value};

/// MessagePack value → JSON, for printing: binary becomes an array of bytes, map keys become strings.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        Value::Integer(i) => {
            i.as_i64().map(serde_json::Value::from).or(i.as_u64().map(serde_json::Value::from)).unwrap_or_default()
        }
        Value::F32(f) => serde_json::Value::from(*f as f64),
        Value::F64(f) => serde_json::Value::from(*f),
        Value::String(s) => serde_json::Value::from(s.as_str().unwrap_or("<invalid utf-8>")),
        Value::Binary(b) => serde_json::Value::from(b.clone()),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(value_to_json).collect()),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().map(str::to_string).unwrap_or_else(|| k.to_string()), value_to_json(v)))
                .collect(),
        ),
        Value::Ext(kind, data) => serde_json::json!({"ext": kind, "data": data}),
    }
}

/// A task as JSON: `broker result --json`, the dashboard.
pub fn task_json(info: &TaskInfo) -> serde_json::Value {
    let mut json = serde_json::json!({
        "id": info.id,
        "queue": info.queue,
        "task": info.task,
        "state": info.state.as_str(),
        "attempts": info.attempts,
        "max_retries": info.max_retries,
        "priority": info.priority,
        "args": info.args.iter().map(value_to_json).collect::<Vec<_>>(),
        "kwargs": info.kwargs.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect::<serde_json::Map<_, _>>(),
        "context": info.context.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect::<serde_json::Map<_, _>>(),
        "created_at_ms": info.created_at_ms,
        "eta_ms": info.eta_ms,
        "started_at_ms": info.started_at_ms,
        "finished_at_ms": info.finished_at_ms,
        "result_expires_at_ms": info.result_expires_at_ms,
        "revoked": info.revoked,
    });
    json["result"] = info.result.as_ref().map(value_to_json).unwrap_or(serde_json::Value::Null);
    json["error"] = serde_json::to_value(&info.error).unwrap_or_default();
    json
}
