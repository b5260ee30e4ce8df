//! Random and mutated frames against a live daemon (a property test in the normal suite; `fuzz/` has the
//! coverage-guided target for the decoders). For every frame, one reply: a success or an error with a code from
//! proto.md; no panic, no close, and other connections keep being served. The seed is printed; set
//! `BROKER_FUZZ_SEED` to replay one.

mod common;

use std::time::Duration;

use broker_client::proto::{map_get, ErrorCode, Value};
use common::{request, Raw, TestServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn encode(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value).unwrap();
    bytes
}

/// Well-formed requests of every op, the seeds the mutations start from.
fn corpus() -> Vec<Vec<u8>> {
    let spec = Value::Map(vec![
        (Value::from("task"), Value::from("t")),
        (Value::from("args"), Value::Array(vec![Value::from(1), Value::from("two"), Value::Nil])),
        (Value::from("kwargs"), Value::Map(vec![(Value::from("k"), Value::from(3.5))])),
        (Value::from("context"), Value::Map(vec![(Value::from("user"), Value::from(7))])),
        (Value::from("queue"), Value::from("fuzz")),
        (Value::from("countdown_ms"), Value::from(10)),
    ]);
    let id = || ("task_id", Value::from("0123456789abcdef01234567"));
    let lease_id = || ("lease_id", Value::from(12345u64));
    [
        request(1, "hello", vec![("version", Value::from(1)), ("client", Value::from("fuzz"))]),
        request(2, "enqueue", vec![("task", spec.clone())]),
        request(3, "enqueue_batch", vec![("tasks", Value::Array(vec![spec.clone(), spec]))]),
        request(
            4,
            "lease",
            vec![
                ("queues", Value::Array(vec![Value::from("fuzz")])),
                ("max", Value::from(3)),
                ("wait_ms", Value::from(5)),
            ],
        ),
        request(5, "ack", vec![id(), lease_id(), ("result", Value::from("r"))]),
        request(
            6,
            "fail",
            vec![
                id(),
                lease_id(),
                ("retry", Value::from(true)),
                (
                    "error",
                    Value::Map(vec![
                        (Value::from("type"), Value::from("E")),
                        (Value::from("message"), Value::from("m")),
                    ]),
                ),
            ],
        ),
        request(7, "extend", vec![id(), lease_id()]),
        request(8, "release", vec![id(), lease_id()]),
        request(9, "get", vec![id(), ("wait_ms", Value::from(5))]),
        request(10, "revoke", vec![id()]),
        request(11, "stats", vec![]),
        request(12, "purge", vec![("queue", Value::from("other"))]),
        request(13, "dead_list", vec![("limit", Value::from(5))]),
        request(14, "dead_requeue", vec![("queue", Value::from("fuzz"))]),
    ]
    .iter()
    .map(encode)
    .collect()
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..6) {
            0 if !bytes.is_empty() => {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !bytes.is_empty() => {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            2 => bytes.truncate(rng.random_range(0..=bytes.len())),
            3 => {
                let i = rng.random_range(0..=bytes.len());
                bytes.insert(i, rng.random());
            }
            4 if !bytes.is_empty() => {
                // A marker that claims a huge length or count.
                let i = rng.random_range(0..bytes.len());
                let huge = [0xdd, 0xdf, 0xdb, 0xc6][rng.random_range(0..4)];
                bytes.splice(i..i, [huge, 0xff, 0xff, 0xff, 0xf0]);
            }
            _ => {
                let n = rng.random_range(0..64);
                bytes.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn random_and_mutated_frames_get_coded_replies_and_break_nothing() {
    let seed = std::env::var("BROKER_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("BROKER_FUZZ_SEED={seed}");
    let server = TestServer::start_with(|config| config.max_wait_ms = 20, false).await;
    let addr = server.addr();
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    tokio::task::spawn_blocking(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let seeds = corpus();
        let mut raw = Raw::connect(&addr);
        raw.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        raw.hello();
        let mut sent = 0;
        for round in 0..200 {
            let batch = 50;
            for _ in 0..batch {
                let frame = if rng.random_bool(0.15) {
                    (0..rng.random_range(0..200)).map(|_| rng.random::<u8>()).collect()
                } else {
                    let pick = rng.random_range(0..seeds.len());
                    mutate(&mut rng, &seeds[pick])
                };
                raw.send_bytes(&frame);
                sent += 1;
            }
            for _ in 0..batch {
                let reply = raw.recv();
                let map = reply.as_map().unwrap_or_else(|| panic!("seed {seed}: a reply that is not a map"));
                let ok = map_get(map, "ok").and_then(Value::as_bool).expect("ok");
                if !ok {
                    let code = map_get(map, "error")
                        .and_then(|e| e.as_map().and_then(|m| map_get(m, "code")).and_then(Value::as_str))
                        .unwrap_or_else(|| panic!("seed {seed}: an error without a code: {reply:?}"));
                    assert!(codes.contains(&code), "seed {seed}: unknown code {code}");
                }
            }
            // Another connection is served meanwhile.
            if round % 10 == 0 {
                let mut other = Raw::connect(&addr);
                other.hello();
                let (ok, _, _) = other.call(request(99, "stats", vec![]));
                assert!(ok, "seed {seed}");
            }
        }
        let (ok, _, _) = raw.call(request(1_000_000, "stats", vec![]));
        assert!(ok, "seed {seed}: the fuzzed connection still works after {sent} frames");
    })
    .await
    .unwrap();
    server.client().await.stats().await.unwrap();
    server.stop().await;
}
