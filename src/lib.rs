//! The broker daemon as a library: the binary `broker` is a thin CLI over it, and the integration tests start
//! the same server in-process.
//!
//! A request flows one way: socket → frame ([`broker_client::codec`]) → op ([`cmd`]) → one store call
//! ([`store`]) → reply frame. Only [`store`] touches sled.

pub mod clock;
pub mod cmd;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod framing;
pub mod http;
pub mod json;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tls;
