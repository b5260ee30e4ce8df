//! `broker-client`: everything a program needs to talk to the broker daemon.
//!
//! - [`proto`]: the wire protocol's message types, shared with the daemon so the two cannot drift;
//! - [`codec`]: the length-prefixed framing;
//! - [`Client`]: an async, pipelining connection with typed calls for producers (`enqueue`, `get`, `wait`,
//!   `revoke`), workers (`lease`, `ack`, `fail`, `extend`, `release`) and operators (`stats`, `purge`, dead set).
//!
//! ```no_run
//! # async fn demo() -> Result<(), broker_client::Error> {
//! use broker_client::{Client, proto::{TaskSpec, Value}};
//! let client = Client::connect("127.0.0.1:7420").await?;
//! let mut spec = TaskSpec::new("add");
//! spec.args = vec![Value::from(2), Value::from(3)];
//! let id = client.enqueue(spec).await?.id;
//! let info = client.wait(&id, std::time::Duration::from_secs(10)).await?;
//! println!("{} {:?}", info.state, info.result);
//! # Ok(()) }
//! ```

pub mod client;
pub mod codec;
pub mod error;
pub mod proto;
pub mod worker;

pub use client::{Client, ConnectOptions};
pub use error::{Error, ErrorKind};
pub use proto::{TaskSpec, TaskState, Value};
pub use worker::{with_context, Producer, Task, TaskFailure, Worker};
