//! Limits that hold when clients are hostile or careless (found by an outside test): connections that never say
//! hello, frames that never complete, peers that never read, a daemon full of connections. Each case checks that
//! other clients are still served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use broker::config::{Role, TokenConfig};
use broker_client::proto::{ErrorCode, TaskSpec, Value};
use broker_client::ConnectOptions;
use common::{request, Raw, TestServer};

/// Waits (bounded) until the daemon closes `stream`: a read returns end of stream or an error.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue, // replies written before the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("still open after {limit:?}")
            }
            Err(_) => return started.elapsed(),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_without_hello_is_closed_and_does_not_lock_others_out() {
    let server = TestServer::start_with(
        |config| {
            config.max_connections = 20;
            config.hello_timeout_ms = 300;
        },
        false,
    )
    .await;
    let addr = server.addr();
    // Fill every slot with connections that send nothing.
    let mut silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // An admin (every client is one without tokens) still gets in at once, through the reserved slots.
    let started = Instant::now();
    let admin = ConnectOptions::new(addr.clone()).connect().await.unwrap();
    admin.stats().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "the admin waited {:?}", started.elapsed());
    let addr2 = addr.clone();
    tokio::task::spawn_blocking(move || {
        for stream in &mut silent {
            assert!(closed_within(stream, Duration::from_secs(5)) < Duration::from_secs(5));
        }
        // The slots are free again: an ordinary client connects.
        let mut raw = Raw::connect(&addr2);
        raw.hello();
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slots_beyond_max_connections_are_for_admins_only() {
    let server = TestServer::start_with(
        |config| {
            config.max_connections = 2;
            config.admin_reserved_connections = 1;
            config.tokens = vec![
                TokenConfig { name: "web".into(), token: "web-token-0123456789".into(), role: Role::Producer },
                TokenConfig { name: "ops".into(), token: "ops-token-0123456789".into(), role: Role::Admin },
            ];
        },
        false,
    )
    .await;
    let addr = server.addr();
    let web = |addr: &str| ConnectOptions::new(addr.to_string()).token("web-token-0123456789");
    let _a = web(&addr).connect().await.unwrap();
    let _b = web(&addr).connect().await.unwrap();
    // The third producer lands in the admin slot and is refused there.
    let refused = web(&addr).connect().await.unwrap_err();
    assert!(refused.is(ErrorCode::Forbidden), "{refused}");
    server.stop().await;

    let server = TestServer::start_with(
        |config| {
            config.max_connections = 1;
            config.admin_reserved_connections = 1;
            config.tokens =
                vec![TokenConfig { name: "ops".into(), token: "ops-token-0123456789".into(), role: Role::Admin }];
        },
        false,
    )
    .await;
    let addr = server.addr();
    let ops = || ConnectOptions::new(addr.clone()).token("ops-token-0123456789").connect();
    let _first = ops().await.unwrap();
    let second = ops().await.unwrap();
    second.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_large_frames_are_bounded_across_connections_and_timed_out() {
    let server = TestServer::start_with(
        |config| {
            config.max_unfinished_bytes = 1 << 20;
            config.frame_timeout_ms = 500;
        },
        false,
    )
    .await;
    let addr = server.addr();
    tokio::task::spawn_blocking(move || {
        // A holds 700 KiB of the 1 MiB budget with a frame it never finishes.
        let mut holder = Raw::connect(&addr);
        holder.hello();
        let announced = 800 * 1024u32;
        holder.stream.write_all(&announced.to_be_bytes()).unwrap();
        // What arrives is what counts against the budget: all but the last bytes.
        holder.stream.write_all(&vec![0u8; 700 * 1024]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // B's 800 KiB frame does not fit: skipped and answered `busy`; B goes on.
        let mut other = Raw::connect(&addr);
        other.hello();
        let big = request(
            2,
            "enqueue",
            vec![(
                "task",
                Value::Map(vec![
                    (Value::from("task"), Value::from("t")),
                    (Value::from("args"), Value::Array(vec![Value::from("x".repeat(800 * 1024))])),
                ]),
            )],
        );
        let (ok, code, _) = other.call(big.clone());
        assert!(!ok);
        assert_eq!(code.as_deref(), Some(ErrorCode::Busy.as_str()));
        let (ok, _, _) = other.call(request(3, "stats", vec![]));
        assert!(ok, "the connection stays usable");
        // A's frame times out; its budget comes back and B's frame goes through.
        assert!(closed_within(&mut holder.stream, Duration::from_secs(5)) < Duration::from_secs(5));
        let (ok, code, _) = other.call(big);
        assert!(ok, "{code:?}");
    })
    .await
    .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_does_not_read_its_replies_is_dropped_and_others_are_served() {
    let server = TestServer::start_with(|config| config.write_timeout_ms = 300, false).await;
    let client = server.client().await;
    let spec = TaskSpec { args: vec![Value::from("y".repeat(1 << 20))], ..TaskSpec::new("t") };
    let id = client.enqueue(spec).await.unwrap().id;
    let addr = server.addr();
    let lazy = tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        raw.hello();
        // 64 MiB of replies, never read.
        for n in 0..64u64 {
            raw.send(&request(10 + n, "get", vec![("task_id", Value::from(id.as_str()))]));
        }
        raw
    })
    .await
    .unwrap();
    // The daemon's writes to it stall; after write_timeout_ms it gives up. Others are served meanwhile.
    for _ in 0..10 {
        client.stats().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = lazy.stream;
    tokio::task::spawn_blocking(move || {
        // Reading now gets what the socket buffers held, then the end: the daemon gave up on the peer.
        let started = Instant::now();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        assert!(total < 64 << 20, "every reply arrived ({total} bytes): the peer was not dropped");
    })
    .await
    .unwrap();
    client.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn anything_accepted_can_be_delivered() {
    let server = TestServer::start().await;
    let client = server.client().await;
    // Three tasks of 9 MiB: a lease of 10 stops adding once its tasks reach max_frame_bytes (16 MiB), so the
    // reply stays deliverable; the rest come with the next lease.
    let big = Value::from("a".repeat(9 << 20));
    for _ in 0..3 {
        client.enqueue(TaskSpec { args: vec![big.clone()], ..TaskSpec::new("big") }).await.unwrap();
    }
    let lease = broker_client::proto::Lease { queues: vec!["default".into()], max: 10, wait_ms: 0, lease_ms: None };
    let first = client.lease(&lease).await.unwrap();
    assert!((1..3).contains(&first.len()), "{} tasks in one reply", first.len());
    let rest = client.lease(&lease).await.unwrap();
    assert_eq!(first.len() + rest.len(), 3);
    // A task whose arguments and result are both near the maximum: its `get` reply is about twice a request.
    let huge = Value::from("b".repeat((16 << 20) - 4096));
    let id = client.enqueue(TaskSpec { args: vec![huge.clone()], ..TaskSpec::new("huge") }).await.unwrap().id;
    let task = client.lease(&lease).await.unwrap().pop().expect("the huge task");
    assert_eq!(task.id, id);
    client.ack(&id, task.lease_id, huge.clone()).await.unwrap();
    let info = client.get(&id).await.unwrap();
    assert_eq!((info.args.len(), info.result.as_ref()), (1, Some(&huge)));
    // A client name that would make `stats` undeliverable is refused.
    let addr = server.addr();
    tokio::task::spawn_blocking(move || {
        let mut raw = Raw::connect(&addr);
        let name = Value::from("n".repeat(1 << 20));
        let (ok, code, _) = raw.call(request(1, "hello", vec![("version", Value::from(1)), ("client", name)]));
        assert!(!ok);
        assert_eq!(code.as_deref(), Some(ErrorCode::BadRequest.as_str()));
    })
    .await
    .unwrap();
    client.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_full_queue_refuses_enqueues_and_frees_up_as_tasks_leave() {
    let server = TestServer::start_with(|config| config.max_queue_length = 3, false).await;
    let client = server.client().await;
    for _ in 0..3 {
        client.enqueue(TaskSpec::new("t")).await.unwrap();
    }
    let full = client.enqueue(TaskSpec::new("t")).await.unwrap_err();
    assert!(full.is(ErrorCode::QueueFull), "{full}");
    // A batch that does not fit is refused whole; other queues are not affected.
    let batch = vec![TaskSpec { queue: Some("other".into()), ..TaskSpec::new("t") }; 4];
    assert!(client.enqueue_batch(batch).await.unwrap_err().is(ErrorCode::QueueFull));
    assert_eq!(client.stats().await.unwrap().queues.iter().find(|q| q.name == "other").map_or(0, |q| q.ready), 0);
    client.enqueue(TaskSpec { queue: Some("other".into()), ..TaskSpec::new("t") }).await.unwrap();
    // A leased task no longer waits: there is room again.
    let lease = broker_client::proto::Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    client.lease(&lease).await.unwrap();
    client.enqueue(TaskSpec::new("t")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_result_over_the_maximum_fails_the_task() {
    let server = TestServer::start_with(|config| config.max_result_bytes = 1000, false).await;
    let client = server.client().await;
    let id = client.enqueue(TaskSpec::new("t")).await.unwrap().id;
    let lease = broker_client::proto::Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let task = client.lease(&lease).await.unwrap().pop().unwrap();
    let refused = client.ack(&id, task.lease_id, Value::from("r".repeat(2000))).await.unwrap_err();
    assert!(refused.is(ErrorCode::ResultTooLarge), "{refused}");
    let info = client.get(&id).await.unwrap();
    assert_eq!(info.state, broker_client::proto::TaskState::Failure);
    assert_eq!(info.error.map(|e| e.kind).as_deref(), Some("ResultTooLarge"));
    // A result within the limit is stored.
    let id = client.enqueue(TaskSpec::new("t")).await.unwrap().id;
    let task = client.lease(&lease).await.unwrap().pop().unwrap();
    client.ack(&id, task.lease_id, Value::from("ok")).await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idle_timeout_spares_a_silent_worker_that_holds_leases() {
    let server = TestServer::start_with(|config| config.idle_timeout_secs = 1, false).await;
    let producer = server.client().await;
    let id = producer.enqueue(TaskSpec::new("slow")).await.unwrap().id;
    let worker = server.client().await;
    let lease = broker_client::proto::Lease { queues: vec!["default".into()], max: 1, wait_ms: 0, lease_ms: None };
    let task = worker.lease(&lease).await.unwrap().pop().unwrap();
    let idle = server.client().await;
    idle.stats().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The worker's connection is still there and its lease held; the idle one was closed.
    worker.ack(&id, task.lease_id, Value::from("done")).await.unwrap();
    assert!(idle.stats().await.is_err(), "an idle connection without leases outlived idle_timeout_secs");
    server.stop().await;
}

/// The ids of the replies to `requests`, in the order they arrive.
fn reply_order(addr: &str, requests: &[Value]) -> Vec<u64> {
    let mut raw = Raw::connect(addr);
    raw.hello();
    for request in requests {
        raw.send(request);
    }
    (0..requests.len())
        .map(|_| {
            let reply = raw.recv();
            let map = reply.as_map().expect("reply is a map");
            map.iter().find(|(k, _)| k.as_str() == Some("id")).and_then(|(_, v)| v.as_u64()).expect("an id")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_in_flight_a_connection_is_not_read_until_replies_go_out() {
    // Four long-polls that wait on an empty queue, then a stats: the stats is read only once a long-poll ended.
    let mut requests: Vec<Value> = (1..=4u64)
        .map(|n| {
            let fields = vec![("queues", Value::Array(vec![Value::from("empty")])), ("wait_ms", Value::from(400))];
            request(n, "lease", fields)
        })
        .collect();
    requests.push(request(99, "stats", vec![]));
    for (limit, stats_first) in [(4, false), (1024, true)] {
        let server = TestServer::start_with(|config| config.max_in_flight = limit, false).await;
        let addr = server.addr();
        let requests = requests.clone();
        let order = tokio::task::spawn_blocking(move || reply_order(&addr, &requests)).await.unwrap();
        assert_eq!(order.len(), 5);
        // With room, the stats is answered at once; without, only after a long-poll gave its slot back.
        assert_eq!(order[0] == 99, stats_first, "max_in_flight {limit}: replies in the order {order:?}");
        server.stop().await;
    }
}
