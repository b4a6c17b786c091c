//! The task's output: into its log (on a thread of its own, so a slow disk never stalls the other
//! tasks an async caller drives) and to the caller, in the order it arrives.

use std::path::Path;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::{RunError, RunEvent};
use crate::output::log::LogWriter;
use crate::runtime::{Output, OutputStream};

/// The task's log, written by a thread of its own.
pub(super) struct TaskLog {
    chunks: mpsc::Sender<bytes::Bytes>,
    writer: std::thread::JoinHandle<()>,
}

impl TaskLog {
    pub(super) fn create(dir: &Path, max_bytes: u64) -> Result<Self, RunError> {
        let mut log = LogWriter::create(dir, max_bytes).map_err(|source| RunError::Log {
            path: dir.to_owned(),
            source,
        })?;
        let (chunks, mut received) = mpsc::channel::<bytes::Bytes>(256);
        let writer = std::thread::spawn(move || {
            while let Some(chunk) = received.blocking_recv() {
                // A full disk must not stop the task; its output still reaches the caller.
                let _ = log.write(&chunk);
            }
            let _ = log.finish();
        });
        Ok(Self { chunks, writer })
    }

    async fn write(&self, bytes: bytes::Bytes) {
        let _ = self.chunks.send(bytes).await;
    }

    /// Waits until everything sent is written.
    async fn finish(self) {
        drop(self.chunks);
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }
}

/// Copies the container's output into the log and to the caller. The caller gets none of it before
/// `started` fires (or is dropped). A command the engine could not execute becomes a
/// [`RunEvent::StartFailed`] in agentbox's words.
pub(super) async fn pump(
    output: OutputStream,
    log: TaskLog,
    events: mpsc::Sender<RunEvent>,
    started: tokio::sync::oneshot::Receiver<()>,
    image: String,
    // Dropped when the output has ended: what the end of an exec is known by.
    _done: tokio::sync::oneshot::Sender<()>,
) {
    let mut caller_listening = true;
    let mut started = Some(started);
    let mut output = output;
    while let Some(chunk) = output.next().await {
        let Ok(chunk) = chunk else { break };
        if let Some(gate) = started.take() {
            let _ = gate.await;
        }
        let event = match chunk {
            Output::Stdout(bytes) => {
                log.write(bytes.clone()).await;
                RunEvent::Output(Output::Stdout(bytes))
            }
            Output::Stderr(bytes) => {
                log.write(bytes.clone()).await;
                RunEvent::Output(Output::Stderr(bytes))
            }
            Output::NotStarted { not_found, command } => {
                let what = if not_found {
                    "command not found"
                } else {
                    "command cannot be executed"
                };
                let message = format!("{what} in image {image}: {command}");
                log.write(format!("agentbox: {message}\n").into()).await;
                RunEvent::StartFailed { message }
            }
        };
        if caller_listening && events.send(event).await.is_err() {
            caller_listening = false;
        }
    }
    log.finish().await;
}
