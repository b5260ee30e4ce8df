//! Group commit: one write-out and one disk flush cover every change made before they started.
//!
//! Under `fsync = "always"` a caller that changed state asks for a [`Durable`] ticket and awaits it before it
//! replies. The flusher task takes every ticket queued so far, runs one persist (write the noted changes to sled,
//! then fsync) on the blocking pool, and resolves them all; tickets that arrive while that runs wait for the next
//! round, which starts as soon as the current one ends. Under load many writers share each flush; alone, a writer
//! waits for one. Between tickets, and under `fsync = "interval"` (where tickets resolve at once), the flusher
//! persists every `fsync_interval_ms`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::FsyncPolicy;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Writes out and flushes what needs it.
pub type Persist = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Hands out flush tickets and runs the flusher task.
pub struct Flusher {
    policy: FsyncPolicy,
    requests: Mutex<Option<mpsc::UnboundedSender<Waiter>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    /// Starts the flusher task.
    pub fn start(persist: Persist, policy: FsyncPolicy, interval: Duration) -> Flusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                tokio::select! {
                    n = rx.recv_many(&mut batch, usize::MAX) => if n == 0 { break },
                    _ = tokio::time::sleep(interval) => {}
                }
                let persist = persist.clone();
                let result = match tokio::task::spawn_blocking(move || persist()).await {
                    Ok(result) => result,
                    Err(e) => Err(format!("flush task failed: {e}")),
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "write-out or disk flush failed");
                }
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Flusher { policy, requests: Mutex::new(Some(tx)), task: Mutex::new(Some(task)) }
    }

    /// Stops the flusher task (after answering the tickets already queued) and waits for it. Later tickets fail
    /// under `always`.
    pub async fn stop(&self) {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).take();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// A ticket that resolves once every change made before this call is on disk (at once under `interval`).
    pub fn request(&self) -> Durable {
        if self.policy == FsyncPolicy::Interval {
            return Durable { waiter: None };
        }
        let (waiter, rx) = oneshot::channel();
        match &*self.requests.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) if tx.send(waiter).is_ok() => Durable { waiter: Some(rx) },
            _ => Durable { waiter: Some(closed()) },
        }
    }
}

fn closed() -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(Err("flusher stopped".to_string()));
    rx
}

/// Resolves when the changes before it are durable; an `Err` means the flush failed and the caller must not
/// report success.
pub struct Durable {
    waiter: Option<oneshot::Receiver<Result<(), String>>>,
}

impl Future for Durable {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.waiter {
            None => Poll::Ready(Ok(())),
            Some(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or_else(|_| Err("flusher stopped".to_string()))),
        }
    }
}
