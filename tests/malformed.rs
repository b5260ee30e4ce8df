//! Bad input over raw frames: every case gets its error code, nothing is stored, the connection stays usable
//! (the framing is intact in every case here), and the daemon stays up.

mod common;

use std::io::Write;

use broker_client::proto::{map_get, ErrorCode, Value};
use common::{request, Raw, TestServer};

fn enqueue_request(id: u64, task: &str) -> Value {
    request(id, "enqueue", vec![("task", Value::Map(vec![(Value::from("task"), Value::from(task))]))])
}

fn assert_code(result: (bool, Option<String>, Value), code: ErrorCode) -> Value {
    assert!(!result.0, "expected {code}, got a success: {:?}", result.2);
    assert_eq!(result.1.as_deref(), Some(code.as_str()), "reply: {:?}", result.2);
    result.2
}

fn reply_id(reply: &Value) -> Option<u64> {
    map_get(reply.as_map().unwrap(), "id").and_then(Value::as_u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_input_gets_its_code_and_the_connection_survives() {
    let server = TestServer::start().await;
    let addr = server.addr();
    let client = server.client().await;
    let raw_addr = addr.clone();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&raw_addr);

        // Before hello: any op is refused, and so is a version the daemon does not speak.
        assert_code(raw.call(enqueue_request(1, "x")), ErrorCode::HelloRequired);
        assert_code(raw.call(request(2, "hello", vec![("version", Value::from(99))])), ErrorCode::UnsupportedVersion);
        raw.hello();

        // Not MessagePack at all (0xc1 is never used): bad_frame, id unknown.
        raw.send_bytes(&[0xc1, 0x00, 0x01]);
        let reply = raw.recv();
        assert_eq!(map_get(reply.as_map().unwrap(), "ok").and_then(Value::as_bool), Some(false));
        assert_eq!(reply_id(&reply), None);
        let code = map_get(reply.as_map().unwrap(), "error").unwrap().as_map().unwrap().clone();
        assert_eq!(map_get(&code, "code").and_then(Value::as_str), Some("bad_frame"));

        // Valid MessagePack but truncated inside the frame.
        raw.send_bytes(&[0x82, 0xa2, b'i', b'd']);
        let reply = raw.recv();
        assert_eq!(reply_id(&reply), None);

        // Hostile shapes: nesting 100 000 arrays deep, and an array claiming 4 billion elements.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        raw.send_bytes(&deep);
        let reply = raw.recv();
        assert_eq!(map_get(reply.as_map().unwrap(), "ok").and_then(Value::as_bool), Some(false));
        raw.send_bytes(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let reply = raw.recv();
        assert_eq!(map_get(reply.as_map().unwrap(), "ok").and_then(Value::as_bool), Some(false));
        raw.send_bytes(&[0x81, 0xa2, b'i', b'd', 0x01, 0xdf, 0xff, 0xff, 0xff, 0xff]);
        let reply = raw.recv();
        assert_eq!(map_get(reply.as_map().unwrap(), "ok").and_then(Value::as_bool), Some(false));

        // Not a map.
        assert_code(raw.call(Value::Array(vec![Value::from(1), Value::from("enqueue")])), ErrorCode::BadFrame);
        // Missing id, then id of the wrong type.
        assert_code(raw.call(Value::Map(vec![(Value::from("op"), Value::from("stats"))])), ErrorCode::BadRequest);
        assert_code(
            raw.call(Value::Map(vec![
                (Value::from("id"), Value::from("seven")),
                (Value::from("op"), Value::from("stats")),
            ])),
            ErrorCode::BadRequest,
        );
        // Missing op.
        let reply = assert_code(raw.call(Value::Map(vec![(Value::from("id"), Value::from(3))])), ErrorCode::BadRequest);
        assert_eq!(reply_id(&reply), Some(3), "the id is echoed when it could be read");
        // Unknown op.
        let reply = assert_code(raw.call(request(4, "frobnicate", vec![])), ErrorCode::UnknownOp);
        assert_eq!(reply_id(&reply), Some(4));
        // Missing field: enqueue without task.
        assert_code(raw.call(request(5, "enqueue", vec![])), ErrorCode::BadRequest);
        // Missing nested field: a task spec without its name.
        assert_code(
            raw.call(request(6, "enqueue", vec![("task", Value::Map(vec![(Value::from("queue"), Value::from("q"))]))])),
            ErrorCode::BadRequest,
        );
        // Wrong types: args not an array, priority a string, lease max a string, ack lease_id negative.
        let bad_args = Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("args"), Value::from(1))]);
        assert_code(raw.call(request(7, "enqueue", vec![("task", bad_args)])), ErrorCode::BadRequest);
        let bad_priority =
            Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("priority"), Value::from("high"))]);
        assert_code(raw.call(request(8, "enqueue", vec![("task", bad_priority)])), ErrorCode::BadRequest);
        assert_code(raw.call(request(9, "lease", vec![("max", Value::from("ten"))])), ErrorCode::BadRequest);
        assert_code(
            raw.call(request(
                10,
                "ack",
                vec![("task_id", Value::from("t")), ("lease_id", Value::from(-1)), ("result", Value::Nil)],
            )),
            ErrorCode::BadRequest,
        );
        // Invalid values: empty task name, a queue name with NUL, countdown and eta together, lease max 0.
        let empty = Value::Map(vec![(Value::from("task"), Value::from(""))]);
        assert_code(raw.call(request(11, "enqueue", vec![("task", empty)])), ErrorCode::BadRequest);
        let nul =
            Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("queue"), Value::from("a\0b"))]);
        assert_code(raw.call(request(12, "enqueue", vec![("task", nul)])), ErrorCode::BadRequest);
        let both = Value::Map(vec![
            (Value::from("task"), Value::from("t")),
            (Value::from("countdown_ms"), Value::from(1)),
            (Value::from("eta_ms"), Value::from(1)),
        ]);
        assert_code(raw.call(request(13, "enqueue", vec![("task", both)])), ErrorCode::BadRequest);
        assert_code(raw.call(request(14, "lease", vec![("max", Value::from(0))])), ErrorCode::BadRequest);
        // `*` means "every queue" to the admin ops, so it is no queue's name.
        let star = Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("queue"), Value::from("*"))]);
        assert_code(raw.call(request(14, "enqueue", vec![("task", star)])), ErrorCode::BadRequest);
        // Arguments of the wrong shape, which the daemon checks without decoding them: kwargs with a key that is
        // not a string, a context that is not a map, and a batch whose second task has bad args (none is stored).
        let int_key = Value::Map(vec![
            (Value::from("task"), Value::from("t")),
            (Value::from("kwargs"), Value::Map(vec![(Value::from(1), Value::from(2))])),
        ]);
        let reply = assert_code(raw.call(request(17, "enqueue", vec![("task", int_key)])), ErrorCode::BadRequest);
        assert!(format!("{reply:?}").contains("keys of `kwargs` must be strings"), "{reply:?}");
        let list_context =
            Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("context"), Value::Array(vec![]))]);
        assert_code(raw.call(request(18, "enqueue", vec![("task", list_context)])), ErrorCode::BadRequest);
        let good = Value::Map(vec![(Value::from("task"), Value::from("t"))]);
        let bad = Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("args"), Value::Nil)]);
        let reply = assert_code(
            raw.call(request(19, "enqueue_batch", vec![("tasks", Value::Array(vec![good, bad]))])),
            ErrorCode::BadRequest,
        );
        assert!(format!("{reply:?}").contains("\"task 1: `args` must be an array\""), "{reply:?}");
        // A str in the args that is not UTF-8 (workers' decoders would refuse the whole lease reply), and args
        // named by a bin key (serde would read the name; the arguments would be lost).
        let mut frame = vec![0x83, 0xa2, b'i', b'd', 20, 0xa2, b'o', b'p', 0xa7];
        frame.extend_from_slice(b"enqueue");
        frame.extend_from_slice(&[0xa4, b't', b'a', b's', b'k', 0x82, 0xa4, b't', b'a', b's', b'k', 0xa1, b't']);
        let with_args = |mut frame: Vec<u8>, key: &[u8], args: &[u8]| {
            frame.extend_from_slice(key);
            frame.extend_from_slice(args);
            frame
        };
        raw.send_bytes(&with_args(frame.clone(), &[0xa4, b'a', b'r', b'g', b's'], &[0x91, 0xa1, 0xff]));
        let reply = raw.recv();
        assert!(format!("{reply:?}").contains("not UTF-8"), "{reply:?}");
        assert_eq!(reply_id(&reply), Some(20));
        raw.send_bytes(&with_args(frame, &[0xc4, 0x04, b'a', b'r', b'g', b's'], &[0x91, 0x01]));
        let reply = raw.recv();
        assert!(format!("{reply:?}").contains("bad_request"), "{reply:?}");
        // Ack of a lease never held.
        assert_code(
            raw.call(request(15, "ack", vec![("task_id", Value::from("ghost")), ("lease_id", Value::from(1))])),
            ErrorCode::LeaseLost,
        );

        // The same connection still works.
        let (ok, _, reply) = raw.call(enqueue_request(16, "fine"));
        assert!(ok, "{reply:?}");
        assert_eq!(reply_id(&reply), Some(16));
    })
    .await
    .unwrap();

    // Nothing bad was stored: exactly the one good task.
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.totals.enqueued, 1);
    assert_eq!(stats.queues.iter().map(|q| q.ready).sum::<u64>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_skipped_and_the_connection_stays_usable() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 1024, false).await;
    let addr = server.addr();
    let client = server.client().await;
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        // A real enqueue whose frame is 4 KiB: over the 1 KiB limit.
        let big = Value::Map(vec![
            (Value::from("task"), Value::from("big")),
            (Value::from("args"), Value::Array(vec![Value::from("x".repeat(4096))])),
        ]);
        let (ok, code, reply) = raw.call(request(2, "enqueue", vec![("task", big)]));
        assert!(!ok);
        assert_eq!(code.as_deref(), Some("frame_too_large"), "{reply:?}");
        // The next frame on the same connection is read normally.
        let (ok, _, reply) = raw.call(enqueue_request(3, "small"));
        assert!(ok, "{reply:?}");
    })
    .await
    .unwrap();
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.totals.enqueued, 1, "the oversized task was not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_does_not_affect_others() {
    let server = TestServer::start().await;
    let addr = server.addr();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        // A length prefix promising more than is ever sent, then a hang-up mid-frame.
        raw.stream.write_all(&[0, 0, 0, 50, 0x81]).unwrap();
        drop(raw);
        let mut raw = Raw::connect(&addr);
        // Garbage that is not even a frame header worth reading, then close.
        raw.stream.write_all(&[0xff, 0xff]).unwrap();
        drop(raw);
    })
    .await
    .unwrap();
    let client = server.client().await;
    assert_eq!(client.stats().await.unwrap().server, format!("broker {}", env!("CARGO_PKG_VERSION")));
}

/// The daemon keeps a task's arguments as the bytes the producer sent and hands the worker those bytes: an
/// integer in a wider encoding than needed and map keys out of order arrive as they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_reach_the_worker_as_the_bytes_the_producer_sent() {
    let server = TestServer::start().await;
    let addr = server.addr().to_string();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        // args [5 as a uint16, bin [0xff, 0x00]]; kwargs {"b": 1, "a": 2}; context {"user": "ann"}.
        let args: &[u8] = &[0x92, 0xcd, 0x00, 0x05, 0xc4, 0x02, 0xff, 0x00];
        let kwargs: &[u8] = &[0x82, 0xa1, b'b', 0x01, 0xa1, b'a', 0x02];
        let context: &[u8] = &[0x81, 0xa4, b'u', b's', b'e', b'r', 0xa3, b'a', b'n', b'n'];
        let mut frame = vec![0x83, 0xa2, b'i', b'd', 0x02, 0xa2, b'o', b'p', 0xa7];
        frame.extend_from_slice(b"enqueue");
        frame.extend_from_slice(&[0xa4, b't', b'a', b's', b'k', 0x84, 0xa4, b't', b'a', b's', b'k', 0xa1, b't']);
        for (name, value) in [("args", args), ("kwargs", kwargs), ("context", context)] {
            rmp::encode::write_str(&mut frame, name).unwrap();
            frame.extend_from_slice(value);
        }
        raw.send_bytes(&frame);
        let reply = raw.recv();
        assert_eq!(map_get(reply.as_map().unwrap(), "ok").and_then(Value::as_bool), Some(true), "{reply:?}");
        raw.send(&request(3, "lease", vec![("queues", Value::Array(vec![Value::from("default")]))]));
        let leased = raw.recv_bytes();
        let find = |needle: &[u8]| leased.windows(needle.len()).any(|w| w == needle);
        for (name, value) in [("args", args), ("kwargs", kwargs), ("context", context)] {
            let mut field = Vec::new();
            rmp::encode::write_str(&mut field, name).unwrap();
            field.extend_from_slice(value);
            assert!(find(&field), "{name} not sent as enqueued: {:?}", rmpv::decode::read_value(&mut &leased[..]));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_op_must_be_str_once_each_and_batch_errors_name_the_task() {
    let server = TestServer::start().await;
    let addr = server.addr();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        let bin = |s: &str| Value::Binary(s.as_bytes().to_vec());
        let stats_with = |map: Vec<(Value, Value)>| Value::Map(map);
        // A key sent as bin.
        let reply = raw.call(stats_with(vec![(Value::from("id"), Value::from(2)), (bin("op"), Value::from("stats"))]));
        assert_code(reply, ErrorCode::BadRequest);
        // `op` sent as bin.
        let reply = raw.call(stats_with(vec![(Value::from("id"), Value::from(3)), (Value::from("op"), bin("stats"))]));
        assert_code(reply, ErrorCode::BadRequest);
        // A repeated key, `op` or another.
        for key in ["op", "task_id"] {
            let mut map = vec![
                (Value::from("id"), Value::from(4)),
                (Value::from("op"), Value::from("get")),
                (Value::from("task_id"), Value::from("x")),
            ];
            map.push((Value::from(key), map.iter().find(|(k, _)| k.as_str() == Some(key)).unwrap().1.clone()));
            let reply = assert_code(raw.call(Value::Map(map)), ErrorCode::BadRequest);
            assert!(format!("{reply:?}").contains("more than once"), "{reply:?}");
        }
        // `args` as bin is not an array.
        let spec = Value::Map(vec![(Value::from("task"), Value::from("t")), (Value::from("args"), bin("abc"))]);
        assert_code(raw.call(request(5, "enqueue", vec![("task", spec)])), ErrorCode::BadRequest);
        // A batch spec that does not decode is named by its index, like the ones the store refuses.
        let good = Value::Map(vec![(Value::from("task"), Value::from("t"))]);
        let bad = Value::Map(vec![(Value::from("task"), Value::from(42))]);
        let reply = assert_code(
            raw.call(request(6, "enqueue_batch", vec![("tasks", Value::Array(vec![good, bad]))])),
            ErrorCode::BadRequest,
        );
        assert!(format!("{reply:?}").contains("task 1: "), "{reply:?}");
        let (ok, _, _) = raw.call(request(7, "stats", vec![]));
        assert!(ok, "the connection stays usable");
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn stats_lists_workers_oldest_first() {
    let server = TestServer::start().await;
    let lease = broker_client::proto::Lease { queues: vec!["none".into()], max: 1, wait_ms: 0, lease_ms: None };
    let mut workers = Vec::new();
    for i in 0..6 {
        let client = broker_client::ConnectOptions::new(server.addr()).name(format!("w{i}")).connect().await.unwrap();
        client.lease(&lease).await.unwrap();
        workers.push(client);
    }
    let stats = workers[0].stats().await.unwrap();
    let names: Vec<&str> = stats.workers.iter().map(|w| w.client.as_str()).collect();
    assert_eq!(names, ["w0", "w1", "w2", "w3", "w4", "w5"]);
    server.stop().await;
}
