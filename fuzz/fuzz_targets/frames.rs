//! Arbitrary bytes as a connection's input: the daemon's framing (with its shared budget), the frame check, the
//! envelope and the task-spec walkers must never panic, whatever arrives, split however it arrives.
#![no_main]

use std::sync::Arc;

use broker::framing::{Budget, Request, RequestCodec};
use broker::store::record::{map_entries, Payload};
use broker_client::codec::{check_msgpack, value_len, MAX_DEPTH};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let budget: Arc<Budget> = Budget::new(1 << 20);
    let mut codec = RequestCodec::new(1 << 16, budget.clone());
    // The first byte decides how the input is split into reads.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            if let Request::Message(payload) = frame {
                inspect(&payload);
            }
        }
    }
    drop(codec);
    assert_eq!(budget.used(), 0, "a closed connection gives its budget back");
    inspect(data);
});

fn inspect(payload: &[u8]) {
    if check_msgpack(payload, MAX_DEPTH).is_err() {
        return;
    }
    let _ = value_len(payload, MAX_DEPTH);
    if let Some(Ok(entries)) = map_entries(payload) {
        for (_, value) in entries {
            let _ = Payload::of_spec(value);
        }
    }
    let _ = Payload::of_spec(payload);
}
