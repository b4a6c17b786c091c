//! The one teardown of a task, used by the supervisor when the command ends, by recovery (`gc`, and
//! `run` after a crash) when a supervisor died, and by `rm`.
//!
//! # Theory of operation
//!
//! In this order, because no step may lose what the next one keeps:
//!
//! 1. **Stop**: the task's containers (found by their labels) that still run are stopped (SIGTERM, the
//!    grace period, SIGKILL), so that nothing writes into the worktree any more. If one cannot be
//!    stopped, nothing below touches the worktree.
//! 2. **Containers and network** are removed (with `keep` they stay, stopped) *while* steps 3-5
//!    keep the work: nothing of the task runs any more. With deferred deletion, the stopped
//!    containers of a task without a network of its own are only renamed out of the way and left to
//!    the purge with the directories, so that their removal does not keep the result waiting.
//! 3. **Import**: the task's branch is brought from its own git dir into the repository
//!    ([`git::import`](crate::git::import)), validated, never losing a tip.
//! 4. **Snapshot**: whatever the worktree holds uncommitted becomes one commit on the branch. Not for
//!    a task that never finished its creation (its checkout may be half done), nor once the removal
//!    has begun (a half-removed worktree would be committed as deletions).
//! 5. **Removal**: the record says `removing-worktree` first; then the worktree, the task's git dir
//!    and agentbox's scratch dir go. They stay (and the task is `kept`) when `keep` was asked for,
//!    when files were too large for the snapshot, when the import refused the task's git dir, or when
//!    the snapshot failed: work is never thrown away.
//! 6. **Ports** are released once no container of the task can listen on them.
//! 7. **Record**: the final state, with what happened.
//!
//! Every step is idempotent and recorded before or as it acts, so a teardown cut short at any point
//! is finished by the next one (recovery), and a teardown of a torn-down task does nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::git::Identity;
use crate::git::import::Imported;
use crate::git::snapshot::LeftOut;
use crate::ports::Owner;
use crate::runtime::{Exit, Runtime};
use crate::state::TaskClaim;
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;

mod containers;
mod work;

pub use containers::Leftovers;
use containers::{removal, set_aside};

/// Files larger than this are not put into a snapshot unless configured otherwise.
pub const DEFAULT_MAX_SNAPSHOT_FILE: u64 = 100 << 20;

/// The kinds of step a teardown takes. Their kebab-case names are part of the `gc --json` schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// A container still ran: SIGTERM, the grace period, SIGKILL.
    StopContainer,
    RemoveContainer,
    RemoveNetwork,
    RemoveVolume,
    /// The task's branch was brought into the repository.
    ImportBranch,
    /// The worktree's uncommitted work is snapshot-committed to the task's branch, then the
    /// worktree and the task's git dirs are removed.
    RemoveWorktree,
    ReleasePorts,
    /// The record's new state.
    MarkRecord,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StopContainer => "stop-container",
            Self::RemoveContainer => "remove-container",
            Self::RemoveNetwork => "remove-network",
            Self::RemoveVolume => "remove-volume",
            Self::ImportBranch => "import-branch",
            Self::RemoveWorktree => "remove-worktree",
            Self::ReleasePorts => "release-ports",
            Self::MarkRecord => "mark-record",
        }
    }
}

/// One step taken (or, with `dry_run`, that would be taken). Its JSON form is one line of
/// `gc --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub action: StepKind,
    pub task: TaskName,
    /// What the step acts on: a container or network name, a branch, a worktree path, `name=port`
    /// pairs, the record's new state.
    pub target: String,
    pub dry_run: bool,
    /// `false` when the step failed; `error` then says why and what was kept.
    pub ok: bool,
    pub error: Option<String>,
    /// The commit that keeps the worktree's uncommitted work.
    pub snapshot_commit: Option<String>,
}

/// A teardown step that failed: what it says (naming the task and what is involved, as shown to the
/// user), and the error underneath it, kept for its chain of causes.
#[derive(Debug, Clone)]
pub struct Problem {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The error itself, not the `Arc` around it, so that callers can downcast to it.
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Problem {
    /// A problem that is its own cause.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// `message` says what `source` means for the task (and includes its text).
    pub fn because(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The error says it all.
    pub fn of(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::because(source.to_string(), source)
    }
}

/// The problems of one teardown as one error: their messages joined, the first of them (and its
/// chain) as the cause.
#[derive(Debug, Clone)]
pub struct Problems(pub Vec<Problem>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .first()
            .map(|p| p as &(dyn std::error::Error + 'static))
    }
}

/// How the task ends up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The supervisor saw the command end.
    Exited,
    /// Someone else finished what a dead supervisor started.
    Recovered,
    /// The task never got past its creation: rolled back.
    RolledBack,
}

/// How to tear down.
#[derive(Debug, Clone)]
pub struct Options {
    pub stop_timeout: Duration,
    /// Who tears down, for the record's note ("agentbox gc").
    pub by: &'static str,
    /// Leave the worktree and the stopped containers (`run --keep`).
    pub keep: bool,
    /// Give the host ports back (not when a new run of the task is about to take them again).
    pub release_ports: bool,
    pub dry_run: bool,
    pub max_file_size: u64,
    pub identity: Identity,
    pub ending: Ending,
    /// Remove the worktree and the task's git dir even when files were too large for the snapshot
    /// or the import refused the git dir (`agentbox rm`: the user has seen the message and decided).
    pub discard_unsaved: bool,
    /// Leave the deletion of the worktree and the git dirs, and of the stopped containers of a task
    /// without a network of its own, to [`crate::trash::purge`]: they are renamed out of the way
    /// and listed in a manifest ([`Report::trash`]), and the teardown returns as soon as the work
    /// is safe, however many files they hold.
    pub defer_deletion: bool,
    /// Containers whose processes the caller killed and saw gone, which the engine may still show
    /// running: they are not stopped again.
    pub processes_gone: Vec<String>,
}

/// What a teardown did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub steps: Vec<Step>,
    pub snapshot_commit: Option<String>,
    pub import: Option<Imported>,
    /// Refs made to keep what the task held beyond its branch (`refs/agentbox/<task>/stash`).
    pub kept_refs: Vec<String>,
    pub left_out: Vec<LeftOut>,
    /// Where the work stays when the worktree was kept (asked for, or to keep work safe).
    pub kept_worktree: Option<PathBuf>,
    /// The exit of the task's own container, when it ended while nobody waited for it.
    pub exit: Option<Exit>,
    /// What went wrong and stopped the teardown short; nothing was discarded because of it, and the
    /// next teardown tries again.
    pub problems: Vec<Problem>,
    /// What went wrong without stopping the teardown (an import refused: its git dir is kept).
    pub notices: Vec<Problem>,
    /// With [`Options::defer_deletion`]: the manifest of what is left to delete.
    pub trash: Option<PathBuf>,
}

/// Tears the task of `record` down (see the module documentation), calling `report` with each step
/// as it is taken. The caller proves with `claim` that it holds the task's lock.
pub async fn tear_down(
    ws: &Workspace,
    runtime: &dyn Runtime,
    record: &mut TaskRecord,
    leftovers: Leftovers,
    options: &Options,
    _claim: &TaskClaim,
    report: &mut (dyn FnMut(&Step) + Send),
) -> Report {
    let mut run = Run {
        ws,
        runtime,
        options,
        report,
        out: Report::default(),
        task: record.name.clone(),
        deferred_containers: Vec::new(),
    };
    run.all(record, leftovers).await;
    run.out
}

struct Run<'a> {
    ws: &'a Workspace,
    runtime: &'a dyn Runtime,
    options: &'a Options,
    report: &'a mut (dyn FnMut(&Step) + Send),
    out: Report,
    task: TaskName,
    /// The stopped containers left to the purge, listed in the manifest of what the teardown
    /// moves aside.
    deferred_containers: Vec<String>,
}

impl Run<'_> {
    /// Whether the task's stopped containers are left to the purge ([`Options::defer_deletion`]):
    /// not when they are kept, and not when the task has a network of its own, which can go only
    /// after them and whose name a new run of the task needs at once (a network cannot be renamed).
    fn defers_containers(&self, leftovers: &Leftovers) -> bool {
        self.options.defer_deletion
            && !self.options.keep
            && !self.options.dry_run
            && leftovers.networks.is_empty()
            && leftovers.volumes.is_empty()
            && !leftovers.containers.is_empty()
    }

    fn step(
        &mut self,
        action: StepKind,
        target: impl Into<String>,
        result: Result<Option<String>, Problem>,
    ) -> bool {
        if let Err(error) = &result {
            self.out.problems.push(error.clone());
        }
        self.report_step(action, target, result)
    }

    /// A step that failed without stopping the teardown.
    fn notice(&mut self, action: StepKind, target: impl Into<String>, error: Problem) {
        self.out.notices.push(error.clone());
        self.report_step(action, target, Err(error));
    }

    fn report_step(
        &mut self,
        action: StepKind,
        target: impl Into<String>,
        result: Result<Option<String>, Problem>,
    ) -> bool {
        let ok = result.is_ok();
        let (snapshot_commit, error) = match result {
            Ok(commit) => (commit, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let step = Step {
            action,
            task: self.task.clone(),
            target: target.into(),
            dry_run: self.options.dry_run,
            ok,
            error,
            snapshot_commit,
        };
        (self.report)(&step);
        self.out.steps.push(step);
        ok
    }

    async fn save(&mut self, record: &TaskRecord) -> bool {
        if self.options.dry_run {
            return true;
        }
        match self.ws.state.save(record).await {
            Ok(()) => true,
            Err(e) => {
                self.step(
                    StepKind::MarkRecord,
                    record.state.as_str(),
                    Err(Problem::of(e)),
                );
                false
            }
        }
    }

    async fn all(&mut self, record: &mut TaskRecord, leftovers: Leftovers) {
        let died = record
            .state
            .is_active()
            .then_some((record.supervisor_pid, record.state));
        if died.is_some() && self.options.ending != Ending::Exited {
            // While the lock is held here, this process is the task's supervisor. Saying so keeps
            // `stop` and `attach` from signalling the dead supervisor's pid, which may belong to
            // another process by now.
            record.supervisor_pid = std::process::id();
            if !self.save(record).await {
                return;
            }
        }

        let stopped = self.stop_running(record, &leftovers.containers).await;
        let dirs = self.ws.dirs_of(record);
        if !stopped {
            if dirs.worktree.exists() {
                let why = format!(
                    "a container of task {} could not be stopped, so worktree {} stays as it is (it may still write to it)",
                    self.task,
                    dirs.worktree.display()
                );
                self.step(
                    StepKind::RemoveWorktree,
                    dirs.worktree.display().to_string(),
                    Err(Problem::new(why)),
                );
            }
            return;
        }
        // Nothing of the task runs any more: its containers and network are removed (or, deferred,
        // set aside for the purge) while its work is imported and committed.
        let defer = self.defers_containers(&leftovers);
        if defer {
            self.deferred_containers = leftovers.containers.iter().map(|c| c.id.clone()).collect();
        }
        let (runtime, keep, dry_run) = (self.runtime, self.options.keep, self.options.dry_run);
        let containers = async {
            if defer {
                set_aside(runtime, &leftovers).await
            } else {
                removal(runtime, &leftovers, keep, dry_run).await
            }
        };
        let keep_work = self.keep_work(record, &dirs);
        let (removed, mut all_ok) = tokio::join!(containers, keep_work);
        for (action, target, result) in removed {
            all_ok &= self.step(action, target, result);
        }
        if defer && self.out.trash.is_none() {
            // No directory was moved aside (kept, or gone already): the containers get a
            // manifest of their own; failing that, they are removed here and now.
            let manifest = crate::trash::Manifest {
                task: self.task.to_string(),
                containers: std::mem::take(&mut self.deferred_containers),
                ..Default::default()
            };
            match crate::trash::write_manifest(&self.ws.state, &manifest) {
                Ok(path) => self.out.trash = Some(path),
                Err(_) => {
                    for (action, target, result) in removal(runtime, &leftovers, false, false).await
                    {
                        all_ok &= self.step(action, target, result);
                    }
                }
            }
        }
        // A port is free again only once no container of the task can listen on it (a kept
        // container is stopped).
        if self.options.release_ports {
            all_ok &= self.release_ports().await;
        }
        if all_ok {
            self.mark(record, died).await;
        }
    }

    async fn release_ports(&mut self) -> bool {
        let ledger = self.ws.ports.clone();
        let owner = Owner {
            repo_id: self.ws.repo_id.clone(),
            task: self.task.to_string(),
        };
        let dry_run = self.options.dry_run;
        let released = tokio::task::spawn_blocking(move || {
            let held = ledger.held_by(&owner)?;
            if !held.is_empty() && !dry_run {
                ledger.release(&owner)?;
            }
            Ok::<_, crate::ports::PortError>(held)
        })
        .await
        .expect("releasing ports does not panic");
        match released {
            Ok(held) if held.is_empty() => true,
            Ok(held) => {
                let target = held
                    .iter()
                    .map(|(name, port)| format!("{name}={port}"))
                    .collect::<Vec<_>>()
                    .join(",");
                self.step(StepKind::ReleasePorts, target, Ok(None))
            }
            Err(e) => self.step(StepKind::ReleasePorts, "", Err(Problem::of(e))),
        }
    }

    /// Writes the record's final state.
    async fn mark(&mut self, record: &mut TaskRecord, died: Option<(u32, TaskState)>) {
        let kept = self.out.kept_worktree.is_some() || self.options.keep;
        let new_state = match (self.options.ending, died) {
            (Ending::RolledBack, _) => TaskState::Failed,
            _ if kept => TaskState::Kept,
            (Ending::Exited, _) => TaskState::Exited,
            (Ending::Recovered, Some((_, TaskState::Creating))) => TaskState::Failed,
            (Ending::Recovered, Some(_)) => TaskState::Recovered,
            // Not active: an earlier teardown stopped half-way. The record keeps its state and
            // learns where the work went.
            (Ending::Recovered, None) => record.state,
        };
        let by = self.options.by;
        if let Some((pid, state)) = died
            && self.options.ending == Ending::Recovered
        {
            record.supervisor_pid = pid;
            record.error = Some(if state == TaskState::Creating {
                format!(
                    "the supervisor (pid {pid}) died while creating the task; {by} rolled back what it had made (the branch stays)"
                )
            } else {
                format!(
                    "the supervisor (pid {pid}) died while the task was {}; {by} stopped what was left and kept its work on branch {}",
                    state.as_str(),
                    record.branch
                )
            });
        }
        if let Some(exit) = self.out.exit {
            record.exit_code = record.exit_code.or(Some(exit.code));
            record.oom_killed |= exit.oom_killed;
        }
        if self.out.snapshot_commit.is_some() {
            record.snapshot_commit = self.out.snapshot_commit.clone();
        }
        record.left_out = self.out.left_out.clone();
        if !self.out.notices.is_empty() {
            let notices: Vec<String> = self.out.notices.iter().map(Problem::to_string).collect();
            record.error = Some(notices.join("; "));
        }
        let changed = new_state != record.state || died.is_some() || !self.out.steps.is_empty();
        if !changed {
            return;
        }
        record.state = new_state;
        if died.is_some() || record.finished_at.is_none() {
            record.finished_at = Some(SystemTime::now());
        }
        let result = if self.options.dry_run {
            Ok(None)
        } else {
            self.ws
                .state
                .save(record)
                .await
                .map(|()| None)
                .map_err(Problem::of)
        };
        self.step(StepKind::MarkRecord, new_state.as_str(), result);
    }
}
