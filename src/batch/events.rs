//! What a batch says as it goes: one stream of events, every line of output whole and tagged
//! with its task, and the result of each task.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::git::snapshot::LeftOut;
use crate::output::lines::{Line, LineSplitter};
use crate::ports::PortMapping;
use crate::runtime::Output;
use crate::supervisor::{self, RunEvent};
use crate::task::TaskName;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How one task of a batch ended. The same object is the `result.json` artifact, the payload of a
/// `torn_down` event and an entry of the `summary` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskResult {
    pub task: String,
    /// The command's exit code; 125 when agentbox failed, 130/143 when a stop request ended the
    /// task or kept it from starting.
    pub exit_code: i64,
    pub duration_ms: u64,
    /// The task's branch; `None` when it does not exist (the task failed or was stopped before
    /// agentbox made it, and a rollback leaves no branch behind).
    pub branch: Option<String>,
    pub commits_ahead: usize,
    pub files_changed: usize,
    pub snapshot_commit: Option<String>,
    /// Whether the command ran at all.
    pub started: bool,
    /// Set when agentbox itself failed for this task.
    pub error: Option<String>,
    /// Files too large for the snapshot; the worktree was kept for them.
    pub left_out: Vec<LeftOut>,
    /// The out-of-memory killer ended the command.
    pub oom_killed: bool,
}

/// What happens in a batch, in order per task. Serialised as one JSON object per line with an
/// `event` field naming the kind; this is the stable `--json` schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BatchEvent {
    /// Branch, worktree and container exist.
    Created {
        task: String,
        branch: String,
        worktree: PathBuf,
        container_id: String,
        ports: BTreeMap<String, PortMapping>,
        /// The sandbox was a warm pool slot's.
        from_pool: bool,
    },
    Started {
        task: String,
    },
    /// One whole line of output (without its newline); a last line without one is delivered when
    /// the command exits. A line longer than 1 MiB comes in pieces, all but the last `continued`.
    Log {
        task: String,
        stream: Stream,
        line: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
    },
    Exited {
        task: String,
        exit_code: i64,
    },
    /// The teardown is complete (or agentbox failed for this task): the task's final result.
    TornDown {
        task: String,
        result: TaskResult,
    },
    /// A task that finished conflicts with one that finished before it: landing both would need
    /// the conflict in `files` resolved.
    Conflict {
        task: String,
        /// The task that finished earlier.
        other: String,
        files: Vec<String>,
    },
    /// The batch is over.
    Summary {
        exit_code: i64,
        tasks: Vec<TaskResult>,
    },
}

/// A [`BatchEvent`] with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(flatten)]
    pub event: BatchEvent,
}

impl Timed {
    pub(super) fn now(event: BatchEvent) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        }
    }
}

/// The batch's exit code: 0 when every task exited 0; otherwise the code of the first task, in
/// file order, that did not.
pub fn exit_code(results: &[TaskResult]) -> i64 {
    results
        .iter()
        .map(|r| r.exit_code)
        .find(|code| *code != 0)
        .unwrap_or(0)
}

/// Turns one task's run events into batch events, cutting output into whole lines (each byte
/// looked at once, at most 1 MiB held per stream). Returns whether the command started.
pub(super) async fn forward(
    name: TaskName,
    mut run_events: mpsc::Receiver<RunEvent>,
    events: mpsc::Sender<Timed>,
) -> bool {
    let task = name.to_string();
    let mut started = false;
    let mut stdout = LineSplitter::default();
    let mut stderr = LineSplitter::default();
    let mut lines = Vec::new();
    let send = |event| events.send(Timed::now(event));
    while let Some(event) = run_events.recv().await {
        let batch_event = match event {
            RunEvent::Created {
                container_id,
                worktree,
                ports,
                from_pool,
            } => BatchEvent::Created {
                task: task.clone(),
                branch: name.branch(),
                worktree,
                container_id,
                ports,
                from_pool,
            },
            RunEvent::Started { .. } => {
                started = true;
                BatchEvent::Started { task: task.clone() }
            }
            RunEvent::Output(output) => {
                let (stream, splitter, bytes) = match &output {
                    Output::Stdout(b) => (Stream::Stdout, &mut stdout, b),
                    Output::Stderr(b) => (Stream::Stderr, &mut stderr, b),
                    Output::NotStarted { .. } => continue,
                };
                splitter.push_into(bytes, &mut lines);
                for line in lines.drain(..) {
                    let _ = send(log_event(&task, stream, line)).await;
                }
                continue;
            }
            RunEvent::Exited { exit_code } => {
                for (stream, splitter) in
                    [(Stream::Stdout, &mut stdout), (Stream::Stderr, &mut stderr)]
                {
                    if let Some(rest) = splitter.finish() {
                        let _ = send(log_event(&task, stream, rest)).await;
                    }
                }
                BatchEvent::Exited {
                    task: task.clone(),
                    exit_code,
                }
            }
            RunEvent::StartFailed { message } | RunEvent::Warning { message } => BatchEvent::Log {
                task: task.clone(),
                stream: Stream::Stderr,
                line: format!("agentbox: {message}"),
                continued: false,
            },
            RunEvent::OutOfMemory { limit } => BatchEvent::Log {
                task: task.clone(),
                stream: Stream::Stderr,
                line: format!(
                    "agentbox: {}",
                    supervisor::out_of_memory_message(&name, limit)
                ),
                continued: false,
            },
            RunEvent::Stopping { .. } => continue,
        };
        let _ = send(batch_event).await;
    }
    started
}

fn log_event(task: &str, stream: Stream, line: Line) -> BatchEvent {
    BatchEvent::Log {
        task: task.to_owned(),
        stream,
        line: String::from_utf8_lossy(&line.bytes).into_owned(),
        continued: line.continued,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_the_first_failure_in_file_order() {
        let result = |task: &str, exit_code| TaskResult {
            task: task.into(),
            exit_code,
            duration_ms: 0,
            branch: None,
            commits_ahead: 0,
            files_changed: 0,
            snapshot_commit: None,
            started: true,
            error: None,
            left_out: Vec::new(),
            oom_killed: false,
        };
        assert_eq!(exit_code(&[result("a", 0), result("b", 0)]), 0);
        assert_eq!(
            exit_code(&[result("a", 0), result("b", 3), result("c", 1)]),
            3
        );
        assert_eq!(exit_code(&[]), 0);
    }
}
