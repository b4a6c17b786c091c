//! Runs one task from start to end.
//!
//! # Theory of operation
//!
//! [`run`] owns the task for as long as it lives: it claims the task's lock in the state dir (so a
//! second `run` of the same name is refused and a dead run can be recognised), writes the task's record
//! before each step acts, and then
//!
//! 1. creates the branch and checks out the worktree *while* it makes sure the image exists and creates
//!    the container: every path the container mounts is known in advance, so the two slow steps
//!    overlap;
//! 2. attaches to the container's output *before* starting it, so no early byte is lost, and pumps the
//!    output into the task's log file and to the caller as [`RunEvent::Output`];
//! 3. waits for the exit while watching the stop channel: the first stop request stops the container
//!    gracefully (SIGTERM, grace period, SIGKILL), a second one kills it at once;
//! 4. tears down: removes the container while it commits whatever the task left uncommitted to the
//!    task's branch (one snapshot commit, hooks disabled) and then removes the worktree. The branch
//!    stays. If the snapshot fails, the worktree stays too: work is never thrown away.
//!
//! A failure before the command started rolls back everything this run made (container, worktree, a
//! branch it created and that still points at the base, the record).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::docker::{ContainerSpec, DockerError, Engine, Output, StartError};
use crate::git::{GitError, Identity};
use crate::state::StateError;
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;

/// Everything `agentbox run` was asked to do, resolved by the caller.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub task: TaskName,
    pub image: String,
    /// The base as the user wrote it; `None` means the HEAD of the worktree agentbox was started in.
    pub base: Option<String>,
    /// `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub labels: Vec<(String, String)>,
    /// `uid:gid` to run as; `None` runs as the image's user.
    pub user: Option<String>,
    /// Leave the worktree and the stopped container for inspection instead of tearing down.
    pub keep: bool,
    /// How long the command gets between SIGTERM and SIGKILL when it is stopped.
    pub stop_timeout: Duration,
}

impl RunRequest {
    /// A request with the defaults `agentbox run` uses: the base's HEAD, the image's command, no
    /// extra environment or labels, the image's user, teardown at the end, a 10 s grace period.
    pub fn new(task: TaskName, image: impl Into<String>) -> Self {
        Self {
            task,
            image: image.into(),
            base: None,
            command: None,
            env: Vec::new(),
            labels: Vec::new(),
            user: None,
            keep: false,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Which signal asked the task to stop; it decides agentbox's exit code (130 or 143).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    /// The exit code a shell reports for a process ended by this signal.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }
}

/// What the caller wants done with the running task; sent through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopLevel {
    /// Let the command run to its end.
    Continue,
    /// SIGTERM, the grace period, then SIGKILL.
    Graceful(StopSignal),
    /// SIGKILL now (a second Ctrl-C). The snapshot still happens.
    Immediate(StopSignal),
}

/// What happens during a run, in order, for the caller to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// Branch, worktree and container exist; the command has not started yet.
    Created {
        container_id: String,
        worktree: PathBuf,
    },
    /// The container has started in the worktree.
    Started {
        container_id: String,
        worktree: PathBuf,
    },
    Output(Output),
    /// A stop is in progress; `immediate` when the container is being killed.
    Stopping {
        immediate: bool,
    },
    /// The command could not be started at all.
    StartFailed {
        message: String,
    },
    /// The command has ended and all its output has been delivered; the teardown starts.
    Exited {
        exit_code: i64,
    },
}

/// What a finished task left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub task: TaskName,
    pub branch: String,
    pub base: String,
    pub commits_ahead: usize,
    pub files_changed: usize,
    pub snapshot_commit: Option<String>,
    /// Set when `keep` left the worktree and the stopped container in place.
    pub kept: Option<Kept>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub worktree: PathBuf,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The command's exit code (126/127 when it could not be started).
    pub exit_code: i64,
    /// Set when a stop request ended the task.
    pub stopped_by: Option<StopSignal>,
    pub summary: RunSummary,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "task {task} is already running (see `agentbox ls`; stop it with `agentbox stop {task}`)"
    )]
    AlreadyRunning { task: TaskName },
    #[error(
        "task {task} was left {state} by a run that died; clean it up with `agentbox rm {task}` (its work is kept on branch agentbox/{task})"
    )]
    LeftBehind { task: TaskName, state: &'static str },
    #[error(
        "task {task} was kept for inspection at {}; remove it with `agentbox rm {task}` before running it again",
        worktree.display()
    )]
    KeptBefore { task: TaskName, worktree: PathBuf },
    #[error(
        "worktree path {} for task {task} already exists; move it away or pick another task name",
        path.display()
    )]
    WorktreeExists { task: TaskName, path: PathBuf },
    #[error("task {task} was interrupted before its command started; nothing was kept")]
    InterruptedBeforeStart { task: TaskName, signal: StopSignal },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source}{}", rollback_note(rollback))]
    Setup {
        source: Box<RunError>,
        /// What could not be rolled back.
        rollback: Vec<String>,
    },
    #[error(
        "teardown of task {task} is incomplete: {}; its work is kept in worktree {} and on branch agentbox/{task}",
        problems.join("; "), worktree.display()
    )]
    Teardown {
        task: TaskName,
        worktree: PathBuf,
        problems: Vec<String>,
        exit_code: Option<i64>,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    State(#[from] StateError),
}

fn rollback_note(rollback: &[String]) -> String {
    if rollback.is_empty() {
        String::new()
    } else {
        format!(
            " (and the rollback left something behind: {})",
            rollback.join("; ")
        )
    }
}

/// Runs the task to its end. See the module documentation for the order of steps.
pub async fn run(
    ws: &Workspace,
    engine: &Engine,
    request: RunRequest,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
) -> Result<RunOutcome, RunError> {
    let task = request.task.clone();
    let _claim = ws
        .state
        .try_claim(&task)?
        .ok_or_else(|| RunError::AlreadyRunning { task: task.clone() })?;
    if let Some(previous) = ws.state.read(&task)? {
        if previous.state.is_active() {
            return Err(RunError::LeftBehind {
                task,
                state: previous.state.as_str(),
            });
        }
        if previous.state == TaskState::Kept {
            return Err(RunError::KeptBefore {
                task,
                worktree: previous.worktree,
            });
        }
    }

    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let base_id = ws.repo.resolve_commit(&base)?;
    let branch = task.branch();
    let existing_tip = ws.repo.branch_tip(&branch)?;
    let base_commit = match existing_tip {
        Some(tip) => ws.repo.merge_base(base_id, tip)?.unwrap_or(base_id),
        None => base_id,
    }
    .to_string();
    let worktree = ws.worktree_path(&task);
    if worktree.exists() {
        return Err(RunError::WorktreeExists {
            task,
            path: worktree,
        });
    }

    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);
    let spec = container_spec(ws, &request, &worktree, &identity);
    let record = TaskRecord {
        name: task.clone(),
        state: TaskState::Creating,
        branch: branch.clone(),
        base: base.clone(),
        base_commit: base_commit.clone(),
        image: request.image.clone(),
        command: request.command.clone().unwrap_or_default(),
        worktree: worktree.clone(),
        container_name: spec.name.clone(),
        container_id: None,
        created_branch: existing_tip.is_none(),
        supervisor_pid: std::process::id(),
        exit_code: None,
        started_at: SystemTime::now(),
        finished_at: None,
        snapshot_commit: None,
        error: None,
    };
    ws.state.write(&record)?;

    let mut run = Supervised {
        ws,
        engine,
        request,
        record,
        identity,
        events,
        stop,
    };
    match run.create(spec).await {
        Ok(container_id) => run.supervise(container_id).await,
        Err(error) => Err(run.roll_back(error).await),
    }
}

/// The container for a task: the worktree and the git common dir at their host paths (so the
/// worktree's absolute `gitdir:` link resolves inside, with any git version), the common dir's
/// `config` and `hooks/` read-only (a task must not plant anything that later runs on the host).
fn container_spec(
    ws: &Workspace,
    request: &RunRequest,
    worktree: &std::path::Path,
    identity: &Identity,
) -> ContainerSpec {
    let common = ws.repo.common_dir.display().to_string();
    let wt = worktree.display().to_string();
    let binds = vec![
        format!("{wt}:{wt}"),
        format!("{common}:{common}"),
        format!("{common}/config:{common}/config:ro"),
        format!("{common}/hooks:{common}/hooks:ro"),
    ];

    // Ours first, then the user's: a user's --env overrides any of these.
    let mut env = BTreeMap::from([
        ("AGENTBOX_TASK".to_owned(), request.task.to_string()),
        ("AGENTBOX_BRANCH".to_owned(), request.task.branch()),
        ("GIT_AUTHOR_NAME".to_owned(), identity.name.clone()),
        ("GIT_AUTHOR_EMAIL".to_owned(), identity.email.clone()),
        ("GIT_COMMITTER_NAME".to_owned(), identity.name.clone()),
        ("GIT_COMMITTER_EMAIL".to_owned(), identity.email.clone()),
        // The container's uid may own nothing in the image, and git refuses repositories owned by
        // someone else unless told otherwise.
        ("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()),
        ("GIT_CONFIG_KEY_0".to_owned(), "safe.directory".to_owned()),
        ("GIT_CONFIG_VALUE_0".to_owned(), "*".to_owned()),
    ]);
    env.extend(request.env.iter().cloned());

    let mut labels: std::collections::HashMap<String, String> =
        request.labels.iter().cloned().collect();
    labels.extend([
        ("agentbox.task".to_owned(), request.task.to_string()),
        ("agentbox.repo".to_owned(), ws.repo_id.clone()),
        ("agentbox.branch".to_owned(), request.task.branch()),
        ("agentbox.worktree".to_owned(), wt.clone()),
    ]);

    ContainerSpec {
        name: ws.container_name(&request.task),
        image: request.image.clone(),
        command: request.command.clone(),
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        labels,
        binds,
        working_dir: wt,
        user: request.user.clone(),
    }
}

struct Supervised<'a> {
    ws: &'a Workspace,
    engine: &'a Engine,
    request: RunRequest,
    record: TaskRecord,
    identity: Identity,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
}

/// What of a task exists, for a rollback to undo.
#[derive(Default)]
struct Made {
    container: Option<String>,
    worktree: bool,
}

impl Supervised<'_> {
    fn task(&self) -> &TaskName {
        &self.record.name
    }

    fn save(&mut self, state: TaskState) -> Result<(), StateError> {
        self.record.state = state;
        self.ws.state.write(&self.record)
    }

    async fn emit(&self, event: RunEvent) {
        // A caller that stopped listening does not stop the task.
        let _ = self.events.send(event).await;
    }

    /// Checks out the worktree while the image is checked and the container created.
    async fn create(&mut self, spec: ContainerSpec) -> Result<String, SetupFailure> {
        let hooks = self.ws.repo.common_dir.join("hooks");
        // Docker would create a missing bind source itself, as root; make it ours first.
        std::fs::create_dir_all(&hooks).map_err(|source| SetupFailure {
            error: RunError::Io {
                action: "create the hooks directory",
                path: hooks,
                source,
            },
            made: Made::default(),
        })?;
        let cli = self.ws.repo.cli();
        let reason = format!("agentbox task {} is running", self.task());
        let create_at = self
            .record
            .created_branch
            .then_some(self.record.base_commit.as_str());
        let checkout = cli.add_worktree(
            &self.record.worktree,
            &self.record.branch,
            create_at,
            &reason,
        );
        let container = async {
            self.engine.ensure_image(&spec.image).await?;
            self.engine.create_container(&spec).await
        };
        let (checkout, container) = tokio::join!(checkout, container);
        let made = Made {
            container: container.as_ref().ok().cloned(),
            worktree: checkout.is_ok(),
        };
        let error = match (checkout, container) {
            (Ok(()), Ok(id)) => return Ok(id),
            (_, Err(e)) => RunError::from(e),
            (Err(e), Ok(_)) => RunError::from(e),
        };
        Err(SetupFailure { error, made })
    }

    /// Undoes a failed setup. Nothing has run in the worktree yet, so there is no work to keep; a
    /// branch this run created is deleted only if it still points at the base.
    async fn roll_back(&mut self, failure: SetupFailure) -> RunError {
        let SetupFailure { error, made } = failure;
        let mut problems = Vec::new();
        let cli = self.ws.repo.cli();
        let container = async {
            match &made.container {
                Some(id) => self.engine.remove(id).await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        };
        let worktree = async {
            if made.worktree {
                cli.remove_worktree(&self.record.worktree)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if self.record.created_branch {
                // Ignored failure: the branch may never have been created.
                let _ = cli
                    .delete_branch_if_at(&self.record.branch, &self.record.base_commit)
                    .await;
            }
            Ok::<_, String>(())
        };
        let (container, worktree) = tokio::join!(container, worktree);
        problems.extend(container.err());
        problems.extend(worktree.err());
        if let Err(e) = self.ws.state.remove(self.task()) {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            error
        } else {
            RunError::Setup {
                source: Box::new(error),
                rollback: problems,
            }
        }
    }

    async fn supervise(mut self, container_id: String) -> Result<RunOutcome, RunError> {
        let stop_requested = *self.stop.borrow_and_update();
        if let StopLevel::Graceful(signal) | StopLevel::Immediate(signal) = stop_requested {
            let made = Made {
                container: Some(container_id),
                worktree: true,
            };
            let task = self.task().clone();
            let error = RunError::InterruptedBeforeStart { task, signal };
            return Err(self.roll_back(SetupFailure { error, made }).await);
        }

        let log_path = self.ws.state.log_path(self.task());
        let log = match File::create(&log_path) {
            Ok(log) => log,
            Err(source) => {
                let made = Made {
                    container: Some(container_id),
                    worktree: true,
                };
                let error = RunError::Io {
                    action: "create log file",
                    path: log_path,
                    source,
                };
                return Err(self.roll_back(SetupFailure { error, made }).await);
            }
        };
        let output = match self.engine.attach(&container_id).await {
            Ok(output) => output,
            Err(e) => {
                let made = Made {
                    container: Some(container_id),
                    worktree: true,
                };
                let error = RunError::from(e);
                return Err(self.roll_back(SetupFailure { error, made }).await);
            }
        };
        let pump = tokio::spawn(pump_output(output, log, self.events.clone()));
        self.emit(RunEvent::Created {
            container_id: container_id.clone(),
            worktree: self.record.worktree.clone(),
        })
        .await;

        self.record.container_id = Some(container_id.clone());
        self.save(TaskState::Running)?;
        let mut exit_code = match self.engine.start(&container_id).await {
            Ok(()) => {
                self.emit(RunEvent::Started {
                    container_id: container_id.clone(),
                    worktree: self.record.worktree.clone(),
                })
                .await;
                None
            }
            Err(StartError::NotFound { message, .. }) => {
                self.emit(RunEvent::StartFailed { message }).await;
                Some(127)
            }
            Err(StartError::NotExecutable { message, .. }) => {
                self.emit(RunEvent::StartFailed { message }).await;
                Some(126)
            }
            Err(StartError::Engine(e)) => {
                pump.abort();
                let made = Made {
                    container: Some(container_id),
                    worktree: true,
                };
                let error = RunError::from(e);
                return Err(self.roll_back(SetupFailure { error, made }).await);
            }
        };

        let mut stopped_by = None;
        let mut wait_error = None;
        if exit_code.is_none() {
            match self.wait_or_stop(&container_id, &mut stopped_by).await {
                Ok(code) => exit_code = Some(code),
                Err(e) => wait_error = Some(e.to_string()),
            }
        }
        // The output stream ends when the container stops; drain it so the log is complete.
        if wait_error.is_none() {
            let _ = pump.await;
        } else {
            pump.abort();
        }

        self.record.exit_code = exit_code;
        if let Some(exit_code) = exit_code {
            self.emit(RunEvent::Exited { exit_code }).await;
        }
        self.save(TaskState::TearingDown)?;
        let outcome = self.tear_down(&container_id, wait_error).await;
        let (state, result) = match outcome {
            Ok(summary) if summary.kept.is_some() => (TaskState::Kept, Ok(summary)),
            Ok(summary) => (TaskState::Exited, Ok(summary)),
            Err(e) => (TaskState::Failed, Err(e)),
        };
        self.record.finished_at = Some(SystemTime::now());
        if let Err(e) = &result {
            self.record.error = Some(e.to_string());
        }
        self.save(state)?;
        let summary = result?;
        Ok(RunOutcome {
            exit_code: exit_code.unwrap_or(125),
            stopped_by,
            summary,
        })
    }

    /// Waits for the exit, acting on stop requests meanwhile. A graceful stop runs in the background
    /// so that a second request can still escalate to a kill while the grace period runs.
    async fn wait_or_stop(
        &mut self,
        container_id: &str,
        stopped_by: &mut Option<StopSignal>,
    ) -> Result<i64, DockerError> {
        let wait = self.engine.wait(container_id);
        tokio::pin!(wait);
        let mut listening = true;
        loop {
            tokio::select! {
                code = &mut wait => return code,
                changed = self.stop.changed(), if listening => {
                    if changed.is_err() {
                        listening = false;
                        continue;
                    }
                    let level = *self.stop.borrow_and_update();
                    let engine = self.engine.clone();
                    let id = container_id.to_owned();
                    match level {
                        StopLevel::Continue => {}
                        StopLevel::Graceful(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping);
                            self.emit(RunEvent::Stopping { immediate: false }).await;
                            let grace = self.request.stop_timeout;
                            tokio::spawn(async move { engine.stop(&id, grace).await });
                        }
                        StopLevel::Immediate(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping);
                            self.emit(RunEvent::Stopping { immediate: true }).await;
                            tokio::spawn(async move { engine.kill(&id).await });
                        }
                    }
                }
            }
        }
    }

    /// Removes the container while the worktree's leftovers are committed and the worktree removed.
    async fn tear_down(
        &mut self,
        container_id: &str,
        wait_error: Option<String>,
    ) -> Result<RunSummary, RunError> {
        let mut problems: Vec<String> = wait_error.into_iter().collect();
        let mut kept = None;
        if self.request.keep {
            // Stopped, not removed: the user asked to inspect it.
            if let Err(e) = self
                .engine
                .stop(container_id, self.request.stop_timeout)
                .await
            {
                problems.push(e.to_string());
            }
            kept = Some(Kept {
                worktree: self.record.worktree.clone(),
                container: self.record.container_name.clone(),
            });
        } else {
            let cli = self.ws.repo.cli();
            let message = snapshot_message(self.task(), self.record.exit_code);
            let keep_work = async {
                let snapshot = cli
                    .snapshot(&self.record.worktree, &message, &self.identity)
                    .await?;
                cli.remove_worktree(&self.record.worktree).await?;
                Ok::<_, GitError>(snapshot)
            };
            let (removed, kept_work) = tokio::join!(self.engine.remove(container_id), keep_work);
            if let Err(e) = removed {
                problems.push(e.to_string());
            }
            match kept_work {
                Ok(snapshot) => self.record.snapshot_commit = snapshot,
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(RunError::Teardown {
                task: self.task().clone(),
                worktree: self.record.worktree.clone(),
                problems,
                exit_code: self.record.exit_code,
            });
        }

        let (commits_ahead, files_changed) = match self.ws.repo.branch_tip(&self.record.branch)? {
            Some(tip) => {
                let base: gix::ObjectId = self
                    .record
                    .base_commit
                    .parse()
                    .expect("base_commit was written from an object id");
                let ahead = self.ws.repo.commits_ahead(base, tip)?;
                let files = self
                    .ws
                    .repo
                    .cli()
                    .changed_files(&self.record.base_commit, &tip.to_string())
                    .await?;
                (ahead, files)
            }
            None => (0, 0),
        };
        Ok(RunSummary {
            task: self.task().clone(),
            branch: self.record.branch.clone(),
            base: self.record.base.clone(),
            commits_ahead,
            files_changed,
            snapshot_commit: self.record.snapshot_commit.clone(),
            kept,
        })
    }
}

struct SetupFailure {
    error: RunError,
    made: Made,
}

fn snapshot_message(task: &TaskName, exit_code: Option<i64>) -> String {
    let ended = match exit_code {
        Some(code) => format!("exited {code}"),
        None => "ended".to_owned(),
    };
    format!(
        "agentbox: snapshot of uncommitted work in task {task}\n\n\
         Task {task} {ended} and left these changes uncommitted; agentbox committed them so that \
         nothing it wrote is lost."
    )
}

/// Copies the container's output into the log file and to the caller, in the order it arrives.
async fn pump_output(
    output: impl futures::Stream<Item = Result<Output, DockerError>>,
    mut log: File,
    events: mpsc::Sender<RunEvent>,
) {
    let mut caller_listening = true;
    futures::pin_mut!(output);
    while let Some(chunk) = output.next().await {
        let Ok(chunk) = chunk else { break };
        let bytes = match &chunk {
            Output::Stdout(b) | Output::Stderr(b) => b,
        };
        // A full disk must not stop the task; its output still reaches the caller.
        let _ = log.write_all(bytes);
        if caller_listening && events.send(RunEvent::Output(chunk)).await.is_err() {
            caller_listening = false;
        }
    }
    let _ = log.flush();
}
