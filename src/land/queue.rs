//! `agentbox queue` (the refinery): tasks land one after another, each only after its check passed
//! on exactly what the target would become.
//!
//! # Theory of operation
//!
//! For each task, in the order given:
//!
//! 1. its branch is rebased (or merged) onto the target's current tip by the
//!    [`engine`](super::engine) — objects only, no checkout — and the attempt is kept as
//!    `refs/agentbox/<task>/queue`. A conflict stops this task (with the files named) and the queue
//!    goes on with the next one;
//! 2. the check runs in a fresh box of the task's own image: an ordinary agentbox task
//!    (`<task>-queue-<n>`, through the [`supervisor`](crate::supervisor), with the project's
//!    setup, services and limits) whose branch starts at the attempt. Like every task it can write
//!    only its own branch, so it cannot move the target; its branch and record are removed again
//!    afterwards;
//! 3. if the check passed, the target is fast-forwarded to the attempt with a compare-and-swap
//!    (`git update-ref <target> <attempt> <tip>`), its clean checkout brought along; if the target
//!    moved meanwhile, or the check failed, nothing lands and the attempt stays for a look.
//!
//! The target only ever moves forward, and only by agentbox; the tasks' own branches are never
//! touched. A stop request (Ctrl-C) stops the running check (nothing of it lands) and the tasks
//! still waiting are not tried.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use super::engine::{Engine, Store};
use super::merge::{self, Attempt, Mode};
use super::target::{self, Target};
use super::{LandError, TaskWork, short};
use crate::batch::Stream;
use crate::output::lines::LineSplitter;
use crate::runtime::{Output, Runtime};
use crate::supervisor::{self, RunEvent, RunRequest, StopLevel};
use crate::task::TaskName;
use crate::workspace::Workspace;

/// How a task's branch is put on top of the target for its check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Its commits made again on the target's tip (the default): the target stays linear.
    #[default]
    Rebase,
    /// A merge commit of the target's tip and the branch.
    Merge,
}

impl Strategy {
    fn mode(self) -> Mode {
        match self {
            Self::Rebase => Mode::Rebase,
            Self::Merge => Mode::Merge,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// The branch to land on; each task's base branch by default.
    pub into: Option<String>,
    pub strategy: Strategy,
    /// The check, run in the box (`sh -c` for a string).
    pub check: Vec<String>,
    /// Let the repository's configured merge drivers run.
    pub merge_drivers: bool,
}

/// How one task of a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Its check passed and the target moved to the attempt.
    Landed,
    /// Its work was on the target already.
    AlreadyLanded,
    /// It conflicts with the target; no attempt was made.
    Conflict,
    /// Its check failed; the attempt is kept.
    CheckFailed,
    /// Its check passed but the target moved meanwhile; the attempt is kept.
    TargetMoved,
    /// A stop request ended its check, or came before its turn.
    Stopped,
    /// agentbox could not try it (a running task, a dirty checkout of the target, …).
    Error,
}

/// The result of one task: the payload of its `done` event and an entry of `summary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueResult {
    pub task: String,
    pub outcome: Outcome,
    pub target: Option<String>,
    /// The target's tip before and after (the same unless it landed).
    pub from: Option<String>,
    pub to: Option<String>,
    /// `refs/agentbox/<task>/queue`, while it holds a kept attempt.
    pub attempt_ref: Option<String>,
    pub attempt_commit: Option<String>,
    /// Conflicting files.
    pub files: Vec<String>,
    pub check_exit_code: Option<i64>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// What happens in a queue, in order; one JSON object per line with `event` naming the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum QueueEvent {
    /// The attempt is made (and kept as `attempt_ref`); its check comes next.
    Attempt {
        task: String,
        target: String,
        target_commit: String,
        strategy: Strategy,
        attempt_ref: String,
        attempt_commit: String,
        commits: usize,
    },
    /// The task conflicts with the target; the queue goes on with the next task.
    Conflict {
        task: String,
        target: String,
        files: Vec<String>,
    },
    /// The check's box is created.
    CheckStarted {
        task: String,
        check_task: String,
        image: String,
        command: Vec<String>,
    },
    /// One line of the check's output (only with `--log-lines` in JSON).
    Log {
        task: String,
        stream: Stream,
        line: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
    },
    CheckFinished {
        task: String,
        exit_code: i64,
    },
    Landed {
        task: String,
        target: String,
        from: String,
        to: String,
    },
    /// The task's turn is over.
    Done {
        task: String,
        result: QueueResult,
    },
    Summary {
        exit_code: i64,
        landed: Vec<String>,
        tasks: Vec<QueueResult>,
    },
}

/// A [`QueueEvent`] with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(flatten)]
    pub event: QueueEvent,
}

async fn emit(events: &mpsc::Sender<Timed>, event: QueueEvent) {
    let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let _ = events.send(Timed { time, event }).await;
}

/// 0 when every task landed (or was on the target already), 1 otherwise.
pub fn exit_code(results: &[QueueResult]) -> i64 {
    let all = results
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Landed | Outcome::AlreadyLanded));
    if all { 0 } else { 1 }
}

/// The ref that keeps a task's last attempt.
pub fn attempt_ref(task: &TaskName) -> String {
    format!("refs/agentbox/{task}/queue")
}

/// Runs the queue; see the module documentation. `template` is the request every check's box
/// starts from (the project's configuration and the command line's flags).
pub async fn run(
    ws: &Workspace,
    runtime: Arc<dyn Runtime>,
    tasks: &[TaskName],
    template: &RunRequest,
    options: &QueueOptions,
    events: mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
) -> Result<Vec<QueueResult>, LandError> {
    super::require_git("queue").await?;
    let mut results = Vec::new();
    for task in tasks {
        let began = Instant::now();
        let mut turn = Turn {
            ws,
            runtime: &*runtime,
            task,
            template,
            options,
            events: &events,
            stop: stop.clone(),
            result: QueueResult {
                task: task.to_string(),
                outcome: Outcome::Error,
                target: None,
                from: None,
                to: None,
                attempt_ref: None,
                attempt_commit: None,
                files: Vec::new(),
                check_exit_code: None,
                error: None,
                duration_ms: 0,
            },
        };
        let stopped = !matches!(*stop.borrow(), StopLevel::Continue);
        if stopped {
            turn.result.outcome = Outcome::Stopped;
            turn.result.error = Some("not tried: the queue was stopped".into());
        } else if let Err(e) = turn.take().await {
            turn.result.outcome = Outcome::Error;
            turn.result.error = Some(e.to_string());
        }
        let mut result = turn.result;
        result.duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        let done = QueueEvent::Done {
            task: task.to_string(),
            result: result.clone(),
        };
        emit(&events, done).await;
        results.push(result);
    }
    let summary = QueueEvent::Summary {
        exit_code: exit_code(&results),
        landed: results
            .iter()
            .filter(|r| r.outcome == Outcome::Landed)
            .map(|r| r.task.clone())
            .collect(),
        tasks: results.clone(),
    };
    emit(&events, summary).await;
    Ok(results)
}

/// One task's turn.
struct Turn<'a> {
    ws: &'a Workspace,
    runtime: &'a dyn Runtime,
    task: &'a TaskName,
    template: &'a RunRequest,
    options: &'a QueueOptions,
    events: &'a mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
    result: QueueResult,
}

impl Turn<'_> {
    async fn take(&mut self) -> Result<(), LandError> {
        let (ws, task) = (self.ws, self.task);
        let work = TaskWork::find(ws, task)?;
        let tip = work.finished_tip()?;
        let target = Target::for_task(&ws.repo, &work, self.options.into.as_deref())?;
        self.result.target = Some(target.branch.clone());
        self.result.from = Some(target.tip.to_string());
        self.result.to = Some(target.tip.to_string());
        target::clean_checkouts(&ws.repo, &target.branch).await?;
        if ws.repo.is_ancestor(tip, target.tip)? {
            self.result.outcome = Outcome::AlreadyLanded;
            return Ok(());
        }

        let mut engine = Engine::new(ws, Store::Repository)?.attributes_from(target.tip);
        if self.options.merge_drivers {
            engine = engine.with_repository_config(&ws.repo.repo_dir);
        }
        let mode = self.options.strategy.mode();
        let message = format!("Merge branch '{}' into {}\n", work.branch, target.branch);
        let kept = attempt_ref(task);
        let attempt = match merge::attempt(&engine, mode, &work, &target, tip, &message).await {
            Ok(attempt) => attempt,
            Err(LandError::Conflict { files, .. }) => {
                self.forget_attempt(&kept).await;
                self.result.outcome = Outcome::Conflict;
                self.result.files = files.clone();
                let event = QueueEvent::Conflict {
                    task: task.to_string(),
                    target: target.branch.clone(),
                    files,
                };
                emit(self.events, event).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if attempt.commit == target.tip {
            self.forget_attempt(&kept).await;
            self.result.outcome = Outcome::AlreadyLanded;
            return Ok(());
        }
        self.keep_attempt(&kept, &attempt).await?;
        let event = QueueEvent::Attempt {
            task: task.to_string(),
            target: target.branch.clone(),
            target_commit: target.tip.to_string(),
            strategy: self.options.strategy,
            attempt_ref: kept.clone(),
            attempt_commit: attempt.commit.to_string(),
            commits: attempt.commits,
        };
        emit(self.events, event).await;

        let image = work
            .record
            .as_ref()
            .map_or_else(|| self.template.image.clone(), |r| r.image.clone());
        let Some(code) = self.check(&attempt, image).await? else {
            return Ok(());
        };
        self.result.check_exit_code = Some(code);
        let finished = QueueEvent::CheckFinished {
            task: task.to_string(),
            exit_code: code,
        };
        emit(self.events, finished).await;
        if code != 0 {
            self.result.outcome = Outcome::CheckFailed;
            return Ok(());
        }

        // The check may have taken long: the checkout is looked at again right before it moves.
        let checkouts = target::clean_checkouts(&ws.repo, &target.branch).await?;
        let reflog = format!(
            "agentbox queue: task {task} ({}) onto {}, checked",
            self.options.strategy.mode().as_str(),
            target.branch
        );
        match target::fast_forward(&ws.repo, task, &target, attempt.commit, &checkouts, &reflog)
            .await
        {
            Ok(()) => {}
            Err(e @ LandError::TargetMoved { .. }) => {
                self.result.outcome = Outcome::TargetMoved;
                self.result.error = Some(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.forget_attempt(&kept).await;
        self.result.outcome = Outcome::Landed;
        self.result.to = Some(attempt.commit.to_string());
        let landed = QueueEvent::Landed {
            task: task.to_string(),
            target: target.branch.clone(),
            from: target.tip.to_string(),
            to: attempt.commit.to_string(),
        };
        emit(self.events, landed).await;
        Ok(())
    }

    async fn keep_attempt(&mut self, name: &str, attempt: &Attempt) -> Result<(), LandError> {
        let message = format!("agentbox queue: attempt of task {}", self.task);
        self.ws
            .repo
            .git()
            .run(&[
                "update-ref",
                "--create-reflog",
                "-m",
                &message,
                name,
                &attempt.commit.to_string(),
            ])
            .await?;
        self.result.attempt_ref = Some(name.to_owned());
        self.result.attempt_commit = Some(attempt.commit.to_string());
        Ok(())
    }

    /// Removes an attempt an earlier queue kept: it no longer says anything about this one.
    async fn forget_attempt(&mut self, name: &str) {
        let _ = self.ws.repo.git().run(&["update-ref", "-d", name]).await;
        self.result.attempt_ref = None;
    }

    /// Runs the check in a box whose branch starts at the attempt. Returns its exit code, or
    /// `None` when it did not give one (stopped; agentbox failed: said in the result).
    async fn check(&mut self, attempt: &Attempt, image: String) -> Result<Option<i64>, LandError> {
        let name = self.check_name()?;
        let mut request = self.template.clone();
        request.task = name.clone();
        request.base = Some(attempt.commit.to_string());
        request.command = Some(self.options.check.clone());
        request.image = image.clone();
        request.keep = false;
        request.keep_branch = false;
        request
            .labels
            .push(("agentbox.queue".to_owned(), self.task.to_string()));
        let started = QueueEvent::CheckStarted {
            task: self.task.to_string(),
            check_task: name.to_string(),
            image,
            command: self.options.check.clone(),
        };
        emit(self.events, started).await;
        let (run_events, run_events_rx) = mpsc::channel(256);
        let forward = tokio::spawn(forward(
            self.task.to_string(),
            run_events_rx,
            self.events.clone(),
        ));
        let outcome = supervisor::run(
            self.ws,
            self.runtime,
            request,
            run_events,
            self.stop.clone(),
        )
        .await;
        let _ = forward.await;
        // The box's branch and record go; its output was streamed as events.
        let removed = crate::control::remove(self.ws, Some(self.runtime), &name, true, false).await;
        let code = match outcome {
            Ok(outcome) if outcome.stopped_by.is_some() => {
                self.result.outcome = Outcome::Stopped;
                self.result.error = Some("the check was stopped".into());
                None
            }
            Ok(outcome) => Some(outcome.exit_code),
            Err(supervisor::RunError::InterruptedBeforeStart { .. }) => {
                self.result.outcome = Outcome::Stopped;
                self.result.error = Some("stopped before the check started".into());
                None
            }
            Err(e) => {
                self.result.outcome = Outcome::Error;
                self.result.error = Some(format!("the check's box failed: {e}"));
                None
            }
        };
        if let Err(e) = removed
            && code.is_some()
        {
            self.result.error = Some(format!("cannot remove the check's task {name}: {e}"));
        }
        Ok(code)
    }

    /// `<task>-queue-<n>` with the first `n` that names no task and no branch.
    fn check_name(&self) -> Result<TaskName, LandError> {
        for n in 1.. {
            let suffix = format!("-queue-{n}");
            let keep = crate::task::MAX_TASK_NAME_LEN.saturating_sub(suffix.len());
            let stem: String = self.task.as_str().chars().take(keep).collect();
            let stem = stem.trim_end_matches(['.', '-', '_']);
            let name = TaskName::parse(&format!("{stem}{suffix}"))
                .or_else(|_| TaskName::parse(&format!("queue{suffix}")))
                .expect("queue-<n> is a valid task name");
            if self.ws.state.read(&name)?.is_none()
                && self.ws.repo.branch_tip(&name.branch())?.is_none()
            {
                return Ok(name);
            }
        }
        unreachable!("some n is free")
    }
}

/// The check's output as whole lines, tagged with the queued task.
async fn forward(
    task: String,
    mut run_events: mpsc::Receiver<RunEvent>,
    events: mpsc::Sender<Timed>,
) {
    let mut stdout = LineSplitter::default();
    let mut stderr = LineSplitter::default();
    let mut lines = Vec::new();
    let log = |stream, line: crate::output::lines::Line| QueueEvent::Log {
        task: task.clone(),
        stream,
        line: String::from_utf8_lossy(&line.bytes).into_owned(),
        continued: line.continued,
    };
    while let Some(event) = run_events.recv().await {
        match event {
            RunEvent::Output(output) => {
                let (stream, splitter, bytes) = match &output {
                    Output::Stdout(b) => (Stream::Stdout, &mut stdout, b),
                    Output::Stderr(b) => (Stream::Stderr, &mut stderr, b),
                    Output::NotStarted { .. } => continue,
                };
                splitter.push_into(bytes, &mut lines);
                for line in lines.drain(..) {
                    emit(&events, log(stream, line)).await;
                }
            }
            RunEvent::Exited { .. } => {
                for (stream, splitter) in
                    [(Stream::Stdout, &mut stdout), (Stream::Stderr, &mut stderr)]
                {
                    if let Some(rest) = splitter.finish() {
                        emit(&events, log(stream, rest)).await;
                    }
                }
            }
            RunEvent::StartFailed { message } | RunEvent::Warning { message } => {
                let line = crate::output::lines::Line {
                    bytes: format!("agentbox: {message}").into_bytes(),
                    continued: false,
                };
                emit(&events, log(Stream::Stderr, line)).await;
            }
            _ => {}
        }
    }
}

/// `main (abc1234)`.
pub fn describe(branch: &str, commit: &str) -> String {
    let id: Option<gix::ObjectId> = commit.parse().ok();
    match id {
        Some(id) => format!("{branch} ({})", short(&id)),
        None => branch.to_owned(),
    }
}
