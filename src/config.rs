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

/// What a client's token lets it do ([`Role::allows`]; proto.md "Tokens and roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Enqueue, and read or wait for results: a web app.
    Producer,
    /// A producer that also leases and settles tasks.
    Worker,
    /// Everything, including revoke, stats, purge and the dead set: operators and the CLI.
    Admin,
}

impl Role {
    /// The role's wire and config name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// Whether a connection with this role may send `op`.
    pub fn allows(self, op: &str) -> bool {
        use broker_client::proto::op;
        match self {
            Role::Admin => true,
            Role::Worker => {
                // Workers declare their tasks' limits and periodic tasks (`@app.task(rate_limit=...)`,
                // `@app.periodic_task(...)`), which Celery keeps in the worker's and beat's code.
                Role::Producer.allows(op)
                    || [
                        op::LEASE,
                        op::ACK,
                        op::FAIL,
                        op::EXTEND,
                        op::RELEASE,
                        op::PROGRESS,
                        op::SET_LIMIT,
                        op::SCHEDULE_ADD,
                    ]
                    .contains(&op)
            }
            Role::Producer => [op::HELLO, op::ENQUEUE, op::ENQUEUE_BATCH, op::ENQUEUE_CHORD, op::GET].contains(&op),
        }
    }
}

/// A client credential (`[[tokens]]` in the config).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs (the token itself is never logged).
    #[serde(default)]
    pub name: String,
    /// The secret a client sends in `hello`.
    pub token: String,
    /// What it may do.
    pub role: Role,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// The HTTP listener's address when `http_listen` is not set.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7421";

/// Every setting of the daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The HTTP listener (`/metrics`, `/healthz`, `/readyz`): an address, `""` for none. Unset, it is
    /// `127.0.0.1:7421` if that is free (a warning otherwise); set, it must bind.
    pub http_listen: Option<String>,
    /// Where sled keeps its files.
    pub data_dir: PathBuf,
    /// Where tasks are kept: unset (or `"local"`) for the single node's store in `data_dir`; a
    /// `postgres://...` URL (libpq's form, several hosts allowed) for many daemons over one PostgreSQL.
    pub store: Option<String>,
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
    /// Connections accepted beyond `max_connections` for admin clients only (an operator can always get in).
    pub admin_reserved_connections: usize,
    /// The most requests one connection may have in flight (read, reply not written yet); beyond it the daemon
    /// stops reading that socket until replies go out.
    pub max_in_flight: usize,
    /// The kernel's queue of connections not accepted yet (`listen(2)` backlog).
    pub listen_backlog: u32,
    /// A connection that has not completed `hello` this long after it opened is closed.
    pub hello_timeout_ms: u64,
    /// A frame that has begun to arrive must be complete within this long, or the connection is closed.
    pub frame_timeout_ms: u64,
    /// A reply write (one batch of replies) that does not complete within this long (a client that does not
    /// read) closes the connection.
    pub write_timeout_ms: u64,
    /// A greeted connection with no request, nothing in flight and no lease held for this long is closed;
    /// 0: never.
    pub idle_timeout_secs: u64,
    /// The bytes that frames larger than 16 KiB may hold while incomplete, across all connections; a frame
    /// beyond it is skipped and answered `busy`.
    pub max_unfinished_bytes: usize,
    /// The most tasks waiting (ready and scheduled) in one queue; an enqueue beyond it is refused `queue_full`.
    /// 0: no limit.
    pub max_queue_length: u64,
    /// The largest result an `ack` may store, in bytes; a larger one fails the task (`result_too_large`).
    pub max_result_bytes: usize,
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
    /// Client tokens and their roles. With none, every client is `admin` and the daemon listens only on a
    /// loopback address (unless `insecure_no_auth`).
    pub tokens: Vec<TokenConfig>,
    /// Serve a non-loopback address without tokens anyway.
    pub insecure_no_auth: bool,
    /// The certificate chain (PEM) of the TLS listener; with `tls_key`, `listen` speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7420".parse().expect("valid default address"),
            http_listen: None,
            data_dir: PathBuf::from("broker-data"),
            store: None,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            checkpoint_interval_ms: 1000,
            checkpoint_log_bytes: 64 * 1024 * 1024,
            max_frame_bytes: broker_client::proto::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            max_in_flight: 1024,
            admin_reserved_connections: 8,
            listen_backlog: 1024,
            hello_timeout_ms: 5_000,
            frame_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            idle_timeout_secs: 0,
            max_unfinished_bytes: 256 * 1024 * 1024,
            max_queue_length: 0,
            max_result_bytes: 16 * 1024 * 1024,
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
            tokens: Vec::new(),
            insecure_no_auth: false,
            tls_cert: None,
            tls_key: None,
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
    /// The role of `token`, compared with every configured token in constant time (no early exit, so the time
    /// taken does not say which token, or how much of one, matched).
    pub fn role_of(&self, token: &str) -> Option<Role> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        for configured in &self.tokens {
            let matches: bool = configured.token.as_bytes().ct_eq(token.as_bytes()).into();
            if matches && found.is_none() {
                found = Some(configured.role);
            }
        }
        found
    }

    /// The HTTP listener's address, if there is to be one.
    pub fn http_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.http_listen.as_deref() {
            None => Ok(Some(DEFAULT_HTTP.parse().expect("valid default address"))),
            Some("") => Ok(None),
            Some(text) => text.parse().map(Some).map_err(|e| format!("http_listen {text:?}: {e}")),
        }
    }

    /// Refuses settings the daemon must not start with: an empty token, or a non-loopback address without tokens
    /// (any client reaching it could read and change every task) unless `insecure_no_auth`.
    pub fn check_security(&self) -> Result<(), String> {
        if let Some(t) = self.tokens.iter().find(|t| t.token.is_empty()) {
            return Err(format!("token {:?} is empty: give every [[tokens]] entry a long random `token`", t.name));
        }
        if let Some(addr) = self.http_addr()? {
            if self.tokens.is_empty() && !addr.ip().is_loopback() && !self.insecure_no_auth {
                return Err(format!(
                    "refusing to serve HTTP on {addr} without tokens: /metrics would be open to anyone who reaches \
                     it. Add tokens (its requests then need an admin token), serve it on a loopback address, or \
                     pass --insecure-no-auth to insist"
                ));
            }
        }
        if self.tokens.is_empty() && !self.listen.ip().is_loopback() && !self.insecure_no_auth {
            return Err(format!(
                "refusing to listen on {} without tokens: any client that reaches it could read and change every \
                 task. Add tokens to the config (a [[tokens]] entry with `token` and `role` = \"producer\", \"worker\" \
                 or \"admin\"; see config.example.toml), listen on a loopback address, or pass --insecure-no-auth \
                 to insist",
                self.listen
            ));
        }
        Ok(())
    }

    /// Reads a TOML file; settings it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Self::load(Some(path), std::iter::empty())
    }

    /// The settings from the file at `path` (if any), then from `BROKER_<SETTING>` variables in `env` (e.g.
    /// `BROKER_FSYNC=interval`, `BROKER_MAX_CONNECTIONS=500`), which win. A value reads as TOML (a number, a
    /// boolean, a quoted string), else as a plain string. `tokens` is read from the file only; variables that
    /// name no setting (`BROKER_ADDR`, `BROKER_LOG`, ...) are left alone.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?,
                path.to_path_buf(),
            ),
            None => (String::new(), PathBuf::from("(environment)")),
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: origin.clone(), source })?;
        for (name, value) in env {
            let Some(key) = name.strip_prefix("BROKER_").map(str::to_ascii_lowercase) else { continue };
            if !SETTINGS.contains(&key.as_str()) {
                continue;
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v"));
            table.insert(key, parsed.unwrap_or(toml::Value::String(value)));
        }
        Config::deserialize(table).map_err(|source| ConfigError::Parse { path: origin, source })
    }
}

/// Every setting a `BROKER_<SETTING>` environment variable may set (all but `tokens`).
pub const SETTINGS: &[&str] = &[
    "listen",
    "http_listen",
    "data_dir",
    "store",
    "fsync",
    "fsync_interval_ms",
    "checkpoint_interval_ms",
    "checkpoint_log_bytes",
    "max_frame_bytes",
    "max_connections",
    "admin_reserved_connections",
    "max_in_flight",
    "listen_backlog",
    "hello_timeout_ms",
    "frame_timeout_ms",
    "write_timeout_ms",
    "idle_timeout_secs",
    "max_unfinished_bytes",
    "max_queue_length",
    "max_result_bytes",
    "default_lease_ms",
    "max_lease_ms",
    "result_ttl_secs",
    "dead_ttl_secs",
    "max_lease_batch",
    "max_enqueue_batch",
    "max_wait_ms",
    "tick_ms",
    "max_lease_losses",
    "cache_capacity_bytes",
    "shrink_min_bytes",
    "insecure_no_auth",
    "tls_cert",
    "tls_key",
];

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

    #[test]
    fn tokens_parse_and_non_loopback_needs_them() {
        let mut config: Config = toml::from_str(
            "listen = \"0.0.0.0:7420\"\n[[tokens]]\nname = \"web\"\ntoken = \"abc\"\nrole = \"producer\"\n",
        )
        .unwrap();
        assert_eq!(config.role_of("abc"), Some(Role::Producer));
        assert_eq!(config.role_of("abd"), None);
        assert_eq!(config.role_of(""), None);
        assert!(config.check_security().is_ok());
        assert!(!format!("{config:?}").contains("abc"), "Debug shows a token");
        config.tokens.clear();
        assert!(config.check_security().unwrap_err().contains("--insecure-no-auth"));
        config.insecure_no_auth = true;
        assert!(config.check_security().is_ok());
        config.listen = "[::1]:7420".parse().unwrap();
        config.insecure_no_auth = false;
        assert!(config.check_security().is_ok(), "loopback needs no token");
    }

    #[test]
    fn every_setting_but_tokens_can_come_from_the_environment() {
        // The example lists every setting (some commented out): the environment list must name each.
        let example =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")).unwrap();
        let mut listed: Vec<&str> = example
            .lines()
            .map(|l| l.trim_start_matches("# ").trim())
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !["name", "token", "role"].contains(k))
            .collect();
        listed.sort_unstable();
        listed.dedup();
        let mut settings = SETTINGS.to_vec();
        settings.sort_unstable();
        assert_eq!(listed, settings);

        let env = [
            ("BROKER_FSYNC", "interval"),
            ("BROKER_MAX_CONNECTIONS", "500"),
            ("BROKER_LISTEN", "127.0.0.1:9999"),
            ("BROKER_INSECURE_NO_AUTH", "true"),
            ("BROKER_ADDR", "not a setting"),
            ("BROKER_URL", "tcp://elsewhere"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config = Config::load(None, env).unwrap();
        assert_eq!(config.fsync, FsyncPolicy::Interval);
        assert_eq!(config.max_connections, 500);
        assert_eq!(config.listen.port(), 9999);
        assert!(config.insecure_no_auth);
        let bad = Config::load(None, [("BROKER_MAX_CONNECTIONS".to_string(), "many".to_string())]).unwrap_err();
        assert!(bad.to_string().contains("max_connections"), "{bad}");
    }

    #[test]
    fn roles_nest() {
        use broker_client::proto::op;
        for op in op::ALL {
            assert!(Role::Admin.allows(op));
            if Role::Producer.allows(op) {
                assert!(Role::Worker.allows(op), "{op}");
            }
        }
        assert!(!Role::Worker.allows(op::STATS) && !Role::Producer.allows(op::LEASE));
    }
}
