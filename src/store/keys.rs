//! Key encodings of the sled trees, in one place. Every key is built and parsed here and nowhere else.
//!
//! - `live`:   task id → record (MessagePack) of a task not yet finished: what a restart rebuilds the queues from.
//! - `done`:   task id → record of a finished task, until its result expires.
//! - `expiry`: expire-at (u64 BE ms) ++ task id → empty. Finished tasks in the order their results expire.
//! - `dead`:   queue ++ 0x00 ++ failed-at (u64 BE ms) ++ task id → empty. The dead set, per queue, oldest first.
//!
//! Big-endian timestamps make sled's byte order the time order, so "everything due by now" is one range scan.
//! Queue names never contain a NUL byte (the protocol layer refuses them), so the `dead` prefix is unambiguous.

/// The `expiry` key of a task whose result expires at `at_ms`.
pub fn expiry(at_ms: u64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// Splits an `expiry` key into its time and task id.
pub fn parse_expiry(key: &[u8]) -> Option<(u64, String)> {
    let (at, id) = key.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*at), String::from_utf8(id.to_vec()).ok()?))
}

/// The `dead` key prefix of a queue.
pub fn dead_prefix(queue: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + 1);
    key.extend_from_slice(queue.as_bytes());
    key.push(0);
    key
}

/// The `dead` key of a task of `queue` that failed at `at_ms`.
pub fn dead(queue: &str, at_ms: u64, id: &str) -> Vec<u8> {
    let mut key = dead_prefix(queue);
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// Splits a `dead` key into its queue and task id.
pub fn parse_dead(key: &[u8]) -> Option<(String, String)> {
    let nul = key.iter().position(|b| *b == 0)?;
    let queue = std::str::from_utf8(&key[..nul]).ok()?;
    let rest = key.get(nul + 1 + 8..)?;
    Some((queue.to_string(), std::str::from_utf8(rest).ok()?.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_time() {
        assert_eq!(parse_expiry(&expiry(42, "abc")), Some((42, "abc".to_string())));
        assert!(expiry(1, "zzz") < expiry(2, "aaa"));
        assert_eq!(parse_dead(&dead("q", 7, "id1")), Some(("q".to_string(), "id1".to_string())));
        assert!(dead("q", 1, "b") < dead("q", 2, "a"));
        assert!(dead("q", 9, "x").starts_with(&dead_prefix("q")));
        assert!(!dead("qq", 9, "x").starts_with(&dead_prefix("q")));
    }
}
