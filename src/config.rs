//! The daemon's settings: defaults, the TOML file (`--config`), and command-line overrides, in that order.
//! `config.example.toml` at the repository root lists every setting; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// When a write is flushed to disk before its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Every reply that changes state waits for a flush that covers it; concurrent writers share one flush.
    Always,
    /// Flush every `fsync_interval_ms`; replies do not wait. A power loss may lose that much.
    Interval,
}

impl FsyncPolicy {
    /// The policy's config name.
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Interval => "interval",
        }
    }
}

/// Every setting of the daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// `always` or `interval`.
    pub fsync: FsyncPolicy,
    /// The period of the log's `fdatasync` under `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// How often sled is brought up to date from the log (a checkpoint) while tasks change.
    pub checkpoint_interval_ms: u64,
    /// A checkpoint also starts once the log segment in use holds this many bytes.
    pub checkpoint_log_bytes: u64,
    /// The largest frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// The most connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// The lease duration of a task that names none.
    pub default_lease_ms: u64,
    /// The longest lease (and extension) a worker may ask for.
    pub max_lease_ms: u64,
    /// How long a result is kept after its task finishes, when the task names no TTL.
    pub result_ttl_secs: u64,
    /// How long a dead (FAILURE) task is kept for inspection and requeue.
    pub dead_ttl_secs: u64,
    /// The most tasks one `lease` may return.
    pub max_lease_batch: u32,
    /// The most tasks one `enqueue_batch` may carry.
    pub max_enqueue_batch: usize,
    /// The longest `wait_ms` of a `lease` or `get`.
    pub max_wait_ms: u64,
    /// How often schedules, lease deadlines and result TTLs are checked.
    pub tick_ms: u64,
    /// After this many lost leases (deadline passed or worker gone) a task fails for good instead of returning.
    pub max_lease_losses: u32,
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// The data directory is rewritten to give freed space back once sled's files are larger than this and
    /// four times the journal in them.
    pub shrink_min_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7420".parse().expect("valid default address"),
            data_dir: PathBuf::from("broker-data"),
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            checkpoint_interval_ms: 1000,
            checkpoint_log_bytes: 64 * 1024 * 1024,
            max_frame_bytes: broker_client::proto::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            default_lease_ms: 30_000,
            max_lease_ms: 24 * 3600 * 1000,
            result_ttl_secs: 24 * 3600,
            dead_ttl_secs: 7 * 24 * 3600,
            max_lease_batch: 1000,
            max_enqueue_batch: 10_000,
            max_wait_ms: 300_000,
            tick_ms: 50,
            max_lease_losses: 10,
            cache_capacity_bytes: 32 * 1024 * 1024,
            shrink_min_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these settings.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
}

impl Config {
    /// Reads a TOML file; settings it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let parsed = Config::from_file(&path).unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }
}
