//! Group commit: one disk flush covers every write that was made before it started.
//!
//! Under `fsync = "always"` a caller that has written asks for a [`Durable`] ticket and awaits it before it
//! replies. The flusher task takes every ticket queued so far, runs one `sled::Db::flush` on the blocking pool,
//! and resolves them all; tickets that arrive while that flush runs wait for the next one, which starts as soon
//! as the current one ends. Under load many writers share each flush; alone, a writer waits for one flush.
//! Under `fsync = "interval"` sled flushes on its own timer and tickets resolve at once.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::FsyncPolicy;

type Waiter = oneshot::Sender<Result<(), String>>;

/// Hands out flush tickets.
pub struct Flusher {
    policy: FsyncPolicy,
    requests: Mutex<Option<mpsc::UnboundedSender<Waiter>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    /// Starts the flusher task for `db` (none under `interval`).
    pub fn start(db: sled::Db, policy: FsyncPolicy) -> Flusher {
        if policy == FsyncPolicy::Interval {
            return Flusher { policy, requests: Mutex::new(None), task: Mutex::new(None) };
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, usize::MAX).await > 0 {
                let db = db.clone();
                let result = match tokio::task::spawn_blocking(move || db.flush()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("flush failed: {e}")),
                    Err(e) => Err(format!("flush task failed: {e}")),
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "disk flush failed");
                }
                for waiter in batch.drain(..) {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        Flusher { policy, requests: Mutex::new(Some(tx)), task: Mutex::new(Some(task)) }
    }

    /// Stops the flusher task (after answering the tickets already queued) and waits for it, so that it no
    /// longer holds the database open. Later tickets fail.
    pub async fn stop(&self) {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).take();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// A ticket that resolves once every write made before this call is on disk.
    pub fn request(&self) -> Durable {
        match &*self.requests.lock().unwrap_or_else(|p| p.into_inner()) {
            None if self.policy == FsyncPolicy::Interval => Durable { waiter: None },
            None => Durable { waiter: Some(closed()) },
            Some(tx) => {
                let (waiter, rx) = oneshot::channel();
                if tx.send(waiter).is_err() {
                    return Durable { waiter: Some(closed()) };
                }
                Durable { waiter: Some(rx) }
            }
        }
    }
}

fn closed() -> oneshot::Receiver<Result<(), String>> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(Err("flusher stopped".to_string()));
    rx
}

/// Resolves when the writes before it are durable; an `Err` means the flush failed and the caller must not
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
