//! Many tasks at once: a task file, a concurrency limit, and one stream of events (with every line
//! of output whole and tagged with its task) for the caller to render as text or JSON Lines.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::runtime::Runtime;
use crate::supervisor::{self, RunOutcome, RunRequest, StopLevel};
use crate::workspace::Workspace;

mod artifacts;
mod events;
mod task_file;

pub use artifacts::write_artifacts;
use events::forward;
pub use events::{BatchEvent, Stream, TaskResult, Timed, exit_code};
pub use task_file::{BatchTask, parse_task_file};

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read task file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: task {index}{}: {message}", path.display(), name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default())]
    Task {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        name: Option<String>,
        message: String,
    },
    #[error("cannot write artifacts to {}: {source}", path.display())]
    Artifacts {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Deletes (or starts deleting) what a task's teardown moved aside: the trash manifest's path.
pub type Purger = Arc<dyn Fn(&Path) + Send + Sync>;

/// Runs every request, at most `parallel` at once, each on a task of its own (so one task's slow
/// step never holds up another's), and returns their results in the order given. Events stream to
/// `events` as they happen; a stop request stops the running tasks (each is torn down, its work
/// kept) and keeps the waiting ones from starting.
pub async fn run(
    ws: &Workspace,
    runtime: Arc<dyn Runtime>,
    requests: Vec<RunRequest>,
    parallel: usize,
    events: mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
    purge: Option<Purger>,
) -> Vec<TaskResult> {
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut running = tokio::task::JoinSet::new();
    for (position, request) in requests.into_iter().enumerate() {
        let (ws, runtime, events, stop, slots, purge) = (
            ws.clone(),
            Arc::clone(&runtime),
            events.clone(),
            stop.clone(),
            Arc::clone(&slots),
            purge.clone(),
        );
        // Slots are handed out in file order: a task starts only after every task before it.
        let slot = slots
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        running.spawn(async move {
            let _slot = slot;
            (
                position,
                run_one(&ws, &*runtime, request, events, stop, purge).await,
            )
        });
    }
    let mut results: Vec<(usize, TaskResult)> = Vec::new();
    // Best effort: a git too old to predict conflicts, or a prediction that fails, says nothing.
    let mut conflicts = crate::land::conflicts::Watch::new(ws).await;
    while let Some(joined) = running.join_next().await {
        let (position, result) = joined.expect("a batch task does not panic");
        if let Some(watch) = conflicts.as_mut()
            && let Some(branch) = &result.branch
            && let Ok(Some(tip)) = ws.repo.branch_tip(branch)
            && let Ok(found) = watch.finished(&result.task, tip).await
        {
            for (other, files) in found {
                let conflict = BatchEvent::Conflict {
                    task: result.task.clone(),
                    other,
                    files,
                };
                let _ = events.send(Timed::now(conflict)).await;
            }
        }
        results.push((position, result));
    }
    results.sort_by_key(|(position, _)| *position);
    let results: Vec<TaskResult> = results.into_iter().map(|(_, r)| r).collect();
    let summary = BatchEvent::Summary {
        exit_code: exit_code(&results),
        tasks: results.clone(),
    };
    let _ = events.send(Timed::now(summary)).await;
    results
}

async fn run_one(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: RunRequest,
    events: mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
    purge: Option<Purger>,
) -> TaskResult {
    let task = request.task.to_string();
    let branch = request.task.branch();
    let began = Instant::now();
    let result = |exit_code, started, error| TaskResult {
        task: task.clone(),
        exit_code,
        duration_ms: 0,
        branch: None,
        commits_ahead: 0,
        files_changed: 0,
        snapshot_commit: None,
        started,
        error,
        left_out: Vec::new(),
        oom_killed: false,
    };
    // Copied out: a borrow held across the run below would block the sender of a stop request.
    let level = *stop.borrow();
    let mut result = match level {
        StopLevel::Graceful(signal) | StopLevel::Immediate(signal) => result(
            i64::from(signal.exit_code()),
            false,
            Some("not started: the batch was interrupted".into()),
        ),
        StopLevel::Continue => {
            let (run_events, run_events_rx) = mpsc::channel(256);
            let forward =
                tokio::spawn(forward(request.task.clone(), run_events_rx, events.clone()));
            let outcome = supervisor::run(ws, runtime, request, run_events, stop.clone()).await;
            let started = forward.await.unwrap_or(false);
            match outcome {
                Ok(outcome) => {
                    if let (Some(purge), Some(trash)) = (&purge, &outcome.summary.trash) {
                        purge(trash);
                    }
                    from_outcome(&task, outcome, started)
                }
                Err(supervisor::RunError::InterruptedBeforeStart { signal, .. }) => result(
                    i64::from(signal.exit_code()),
                    false,
                    Some("not started: the batch was interrupted".into()),
                ),
                // The command ran and ended; only cleaning up after it failed. Its exit code
                // still counts, as with `run`.
                Err(
                    e @ supervisor::RunError::Teardown {
                        exit_code: Some(code),
                        ..
                    },
                ) => result(code, started, Some(e.to_string())),
                Err(e) => result(125, started, Some(e.to_string())),
            }
        }
    };
    if result.branch.is_none() && ws.repo.branch_tip(&branch).ok().flatten().is_some() {
        // A task that failed after its branch existed (say, in its teardown): the work is there.
        result.branch = Some(branch);
    }
    result.duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
    let torn_down = BatchEvent::TornDown {
        task: task.clone(),
        result: result.clone(),
    };
    let _ = events.send(Timed::now(torn_down)).await;
    result
}

fn from_outcome(task: &str, outcome: RunOutcome, started: bool) -> TaskResult {
    let summary = outcome.summary;
    TaskResult {
        task: task.to_owned(),
        exit_code: outcome
            .stopped_by
            .map(|s| i64::from(s.exit_code()))
            .unwrap_or(outcome.exit_code),
        duration_ms: 0,
        branch: (!summary.branch_deleted).then_some(summary.branch),
        commits_ahead: summary.commits_ahead,
        files_changed: summary.files_changed,
        snapshot_commit: summary.snapshot_commit,
        started,
        error: (!summary.problems.is_empty()).then(|| summary.problems.join("; ")),
        left_out: summary.left_out,
        oom_killed: outcome.oom_killed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_teardown_keeps_the_commands_exit_code() {
        let fx = crate::supervisor::tests::fixture();
        let fake = crate::runtime::fake::FakeRuntime::default();
        fake.exit_with(crate::runtime::Exit {
            code: 3,
            oom_killed: false,
        });
        fake.fail_on("remove_container");
        let (events, mut received) = mpsc::channel(64);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let (_stop, stop) = watch::channel(StopLevel::Continue);
        let results = run(
            &fx.ws,
            Arc::new(fake),
            vec![fx.request("t")],
            1,
            events,
            stop,
            None,
        )
        .await;
        drain.await.unwrap();
        assert_eq!(results[0].exit_code, 3, "{:?}", results[0]);
        let error = results[0].error.as_deref().unwrap_or_default();
        assert!(error.contains("fake engine"), "{error}");
        assert_eq!(results[0].branch.as_deref(), Some("agentbox/t"));
        assert_eq!(exit_code(&results), 3);
    }
}
