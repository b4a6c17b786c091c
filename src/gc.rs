//! Crash recovery: reconciles agentbox's records with what really exists, and finishes what a dead
//! supervisor started.
//!
//! # Theory of operation
//!
//! A supervisor that dies (SIGKILL, a crash, a power cut) leaves its task half-way: the record says
//! `running` (or another active state), the container may still run, the worktree holds the task's
//! uncommitted work, host ports are still promised to it. Its task lock is gone, though: the kernel
//! dropped it with the process. The lock is how a dead task is told from a live one, and nothing
//! here touches a task whose lock is held.
//!
//! [`reconcile`] (`agentbox gc`) looks at everything that belongs to this repository: the task
//! records, the containers and networks labelled `agentbox.repo=<repo-id>`, and the worktrees git
//! lists on a branch `agentbox/<task>` at a path agentbox gave them (the record's, the default
//! worktree root's, or one locked with agentbox's lock reason). For each task that has something
//! left it takes the task's lock itself, so no `run` of that task can start meanwhile, looks again
//! (the first look may be stale by then) and, in this order, because no step may lose what the next
//! one keeps:
//!
//! 1. stops (SIGTERM, grace period, SIGKILL) and removes the task's containers, so that nothing
//!    writes into the worktree any more — if that fails, the worktree is not touched;
//! 2. removes the task's networks;
//! 3. commits whatever the worktree holds uncommitted to the task's branch (one snapshot commit,
//!    hooks disabled) and removes the worktree — if the snapshot fails, the worktree stays;
//! 4. releases the task's host ports;
//! 5. marks the record `recovered`, with the exit code when the command had ended by itself.
//!
//! Then it prunes git's metadata of worktrees whose directory is gone. It never deletes a branch. A
//! step that fails is reported, and the record keeps its state so that the next run of gc tries
//! again; a second gc after a successful one finds nothing to do. Tasks kept with `--keep` are left
//! alone: keeping them was asked for.
//!
//! A task that died while being created (`creating`: its command never started) is rolled back
//! instead: nothing has run in its worktree, whose checkout may be only half done, so the worktree
//! is removed without a snapshot (a snapshot of a half checkout would commit the deletion of every
//! file not checked out yet), and the record is marked `failed`.
//!
//! [`recover_left_behind`] does the same for one task at the start of `agentbox run`, so that a run
//! after a crash continues on the task's branch instead of refusing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::docker::{DockerError, Engine, FoundContainer, FoundNetwork};
use crate::git::{GitError, Identity, WorktreeEntry};
use crate::ports::{Owner, PortLedger};
use crate::state::{StateError, TaskClaim};
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;

const REPO_LABEL: &str = "agentbox.repo";
const TASK_LABEL: &str = "agentbox.task";

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(
        "recovery of task {task} is incomplete: {}; nothing was discarded, and `agentbox gc` tries again once that is fixed",
        problems.join("; ")
    )]
    Incomplete {
        task: TaskName,
        problems: Vec<String>,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// How [`reconcile`] works.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Only report what would be done.
    pub dry_run: bool,
    /// How long a container that still runs gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
}

/// The kinds of step gc takes. Their kebab-case names are part of the `gc --json` schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// A container still ran without a supervisor: SIGTERM, the grace period, SIGKILL.
    StopContainer,
    RemoveContainer,
    RemoveNetwork,
    /// The worktree's uncommitted work is snapshot-committed to the task's branch, then the
    /// worktree is removed.
    RemoveWorktree,
    ReleasePorts,
    /// The record's new state (`recovered`; `failed` for a task rolled back).
    MarkRecord,
    /// git's metadata of a worktree whose directory is gone.
    PruneWorktree,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StopContainer => "stop-container",
            Self::RemoveContainer => "remove-container",
            Self::RemoveNetwork => "remove-network",
            Self::RemoveWorktree => "remove-worktree",
            Self::ReleasePorts => "release-ports",
            Self::MarkRecord => "mark-record",
            Self::PruneWorktree => "prune-worktree",
        }
    }
}

/// One step gc took (or, with `dry_run`, would take). Its JSON form is one line of `gc --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GcAction {
    pub action: ActionKind,
    /// The task the step belongs to; `None` for a worktree no task owns.
    pub task: Option<TaskName>,
    /// What the step acts on: a container or network name, a worktree path, `name=port` pairs,
    /// the record's new state.
    pub target: String,
    pub dry_run: bool,
    /// `false` when the step failed; `error` then says why and what was kept.
    pub ok: bool,
    pub error: Option<String>,
    /// The commit that keeps a removed worktree's uncommitted work.
    pub snapshot_commit: Option<String>,
}

/// What [`reconcile`] did besides its actions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcSummary {
    pub actions: usize,
    pub failed: usize,
    /// Tasks left alone because their supervisor is alive.
    pub live: Vec<TaskName>,
    /// Tasks left alone because they were kept with `--keep` (`agentbox rm` removes them).
    pub kept: Vec<TaskName>,
}

/// Whether a record shows a task left half-way by an earlier run, assuming that no supervisor
/// holds it: an active state (its supervisor died), or a worktree still on disk after a teardown
/// that did not finish. A task kept with `--keep` is left as asked, not left behind.
pub fn is_left_behind(record: &TaskRecord) -> bool {
    record.state != TaskState::Kept && (record.state.is_active() || record.worktree.is_dir())
}

/// Whether any task of the repository was left behind by a dead supervisor. Reads only the records
/// and their locks (no engine, no git), so `run` and `batch` can ask it every time and call
/// [`reconcile`] only when there is something to do.
pub fn anything_left_behind(ws: &Workspace) -> Result<bool, GcError> {
    for record in ws.state.list()? {
        if is_left_behind(&record) && !ws.state.is_supervised(&record.name)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Cleans up after every task of the repository whose supervisor is gone (see the module
/// documentation), calling `report` with each step as it is taken. Failed steps are reported, not
/// returned: an error means the leftovers could not even be listed.
pub async fn reconcile(
    ws: &Workspace,
    engine: &Engine,
    options: &GcOptions,
    report: &mut dyn FnMut(&GcAction),
) -> Result<GcSummary, GcError> {
    let records: BTreeMap<TaskName, TaskRecord> = ws
        .state
        .list()?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let found = inventory(ws, engine, &records, None).await?;
    let tasks: BTreeSet<&TaskName> = records.keys().chain(found.keys()).collect();

    let mut sink = Sink {
        report,
        dry_run: options.dry_run,
        summary: GcSummary::default(),
        problems: Vec::new(),
    };
    for task in tasks {
        let record = records.get(task);
        let has_leftovers = found.get(task).is_some_and(|l| !l.is_empty());
        if !has_leftovers && !record.is_some_and(|r| r.state.is_active()) {
            continue;
        }
        if record.is_some_and(|r| r.state == TaskState::Kept) {
            sink.summary.kept.push(task.clone());
            continue;
        }
        let Some(claim) = ws.state.try_claim(task)? else {
            sink.summary.live.push(task.clone());
            continue;
        };
        // Holding the lock, look again: a run may have started and ended since the first look.
        let record = ws.state.read(task)?;
        if record.as_ref().is_some_and(|r| r.state == TaskState::Kept) {
            sink.summary.kept.push(task.clone());
            continue;
        }
        let one: BTreeMap<TaskName, TaskRecord> =
            record.iter().map(|r| (r.name.clone(), r.clone())).collect();
        let leftovers = inventory(ws, engine, &one, Some(task))
            .await?
            .remove(task)
            .unwrap_or_default();
        let recovery = Recovery {
            ws,
            engine,
            ports: Some(&ws.ports),
            stop_timeout: options.stop_timeout,
            by: "agentbox gc",
            _claim: &claim,
        };
        recovery.run(task, record, leftovers, &mut sink).await;
    }
    prune(ws, &records, &mut sink).await?;
    Ok(sink.summary)
}

/// Recovers a task that an earlier run left behind (see [`is_left_behind`]) so that a new run of
/// it can start: stops and removes its containers and networks, snapshot-commits and removes its
/// worktree, and marks its record `recovered`; the branch stays, so the new run continues on it.
/// Its host ports stay reserved for it, so the new run gets the same ones. Returns the steps taken,
/// or `None` when `record` shows nothing left behind.
///
/// The caller proves with `claim` that it holds the task's lock: it is about to run the task.
pub async fn recover_left_behind(
    ws: &Workspace,
    engine: &Engine,
    record: &TaskRecord,
    claim: &TaskClaim,
    stop_timeout: Duration,
) -> Result<Option<Vec<GcAction>>, GcError> {
    if !is_left_behind(record) {
        return Ok(None);
    }
    let recovery = Recovery {
        ws,
        engine,
        ports: None,
        stop_timeout,
        by: "agentbox run",
        _claim: claim,
    };
    recovery.one(record).await.map(Some)
}

/// Cleans up whatever a task left besides its branch — kept with `--keep`, or left behind by a
/// dead supervisor — before `agentbox rm` forgets it: the same steps as gc, ports released too.
pub async fn clean_up_for_removal(
    ws: &Workspace,
    engine: &Engine,
    record: &TaskRecord,
    claim: &TaskClaim,
    stop_timeout: Duration,
) -> Result<Vec<GcAction>, GcError> {
    let recovery = Recovery {
        ws,
        engine,
        ports: Some(&ws.ports),
        stop_timeout,
        by: "agentbox rm",
        _claim: claim,
    };
    recovery.one(record).await
}

/// What of one task exists outside its record.
#[derive(Debug, Default)]
struct Leftovers {
    containers: Vec<FoundContainer>,
    networks: Vec<FoundNetwork>,
    worktrees: Vec<WorktreeEntry>,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.networks.is_empty() && self.worktrees.is_empty()
    }
}

/// This repository's containers, networks and task worktrees, by task; only `only`'s when given.
async fn inventory(
    ws: &Workspace,
    engine: &Engine,
    records: &BTreeMap<TaskName, TaskRecord>,
    only: Option<&TaskName>,
) -> Result<BTreeMap<TaskName, Leftovers>, GcError> {
    let mut labels = vec![format!("{REPO_LABEL}={}", ws.repo_id)];
    labels.extend(only.map(|task| format!("{TASK_LABEL}={task}")));
    let cli = ws.git();
    let (containers, networks, worktrees) = tokio::join!(
        engine.find(&labels),
        engine.find_networks(&labels),
        cli.list_worktrees()
    );
    let mut found: BTreeMap<TaskName, Leftovers> = BTreeMap::new();
    // Something labelled for this repository without a valid task label was not made by agentbox's
    // run, which always sets both; it is left alone.
    for container in containers? {
        if let Some(task) = task_label(&container.labels) {
            found.entry(task).or_default().containers.push(container);
        }
    }
    for network in networks? {
        if let Some(task) = task_label(&network.labels) {
            found.entry(task).or_default().networks.push(network);
        }
    }
    for entry in worktrees? {
        if let Some(task) = owner_of(ws, records, &entry)
            && only.is_none_or(|only| *only == task)
        {
            found.entry(task).or_default().worktrees.push(entry);
        }
    }
    Ok(found)
}

fn task_label(labels: &HashMap<String, String>) -> Option<TaskName> {
    labels
        .get(TASK_LABEL)
        .and_then(|task| TaskName::parse(task).ok())
}

/// The task a worktree belongs to, if agentbox made it: a task's branch is checked out in it, and
/// it is where that task's record or the default worktree root puts it, or it carries the lock
/// `run` gives a task's worktree. A worktree the user made on a task's branch elsewhere is theirs.
fn owner_of(
    ws: &Workspace,
    records: &BTreeMap<TaskName, TaskRecord>,
    entry: &WorktreeEntry,
) -> Option<TaskName> {
    let name = entry
        .branch
        .as_deref()?
        .strip_prefix("refs/heads/agentbox/")?;
    let task = TaskName::parse(name).ok()?;
    let recorded = records.get(&task).is_some_and(|r| r.worktree == entry.path);
    let default = ws.worktree_path(&task) == entry.path;
    let locked_by_run = entry.locked.as_deref() == Some(lock_reason(&task).as_str());
    (recorded || default || locked_by_run).then_some(task)
}

/// The reason `run` locks a task's worktree with (see the supervisor's `create`).
fn lock_reason(task: &TaskName) -> String {
    format!("agentbox task {task} is running")
}

/// Hands each step to the caller and keeps count.
struct Sink<'a> {
    report: &'a mut dyn FnMut(&GcAction),
    dry_run: bool,
    summary: GcSummary,
    problems: Vec<String>,
}

impl Sink<'_> {
    /// Reports a step with its result (`Ok` holds the snapshot commit, if there is one); returns
    /// whether it succeeded.
    fn step(
        &mut self,
        action: ActionKind,
        task: Option<&TaskName>,
        target: impl Into<String>,
        result: Result<Option<String>, String>,
    ) -> bool {
        let ok = result.is_ok();
        let (snapshot_commit, error) = match result {
            Ok(commit) => (commit, None),
            Err(e) => (None, Some(e)),
        };
        let action = GcAction {
            action,
            task: task.cloned(),
            target: target.into(),
            dry_run: self.dry_run,
            ok,
            error,
            snapshot_commit,
        };
        self.summary.actions += 1;
        if let Some(error) = &action.error {
            self.summary.failed += 1;
            self.problems.push(error.clone());
        }
        (self.report)(&action);
        ok
    }
}

/// Recovers one task whose lock is held (`_claim`).
struct Recovery<'a> {
    ws: &'a Workspace,
    engine: &'a Engine,
    /// `None` keeps the task's host ports reserved (a new run of it is about to take them again).
    ports: Option<&'a PortLedger>,
    stop_timeout: Duration,
    /// Who recovers, for the record's note.
    by: &'static str,
    _claim: &'a TaskClaim,
}

impl Recovery<'_> {
    /// Recovers the one task of `record`, returning the steps taken, or the problems when a step
    /// failed.
    async fn one(&self, record: &TaskRecord) -> Result<Vec<GcAction>, GcError> {
        let task = &record.name;
        let one = BTreeMap::from([(task.clone(), record.clone())]);
        let leftovers = inventory(self.ws, self.engine, &one, Some(task))
            .await?
            .remove(task)
            .unwrap_or_default();
        let mut actions = Vec::new();
        let mut collect = |action: &GcAction| actions.push(action.clone());
        let mut sink = Sink {
            report: &mut collect,
            dry_run: false,
            summary: GcSummary::default(),
            problems: Vec::new(),
        };
        self.run(task, Some(record.clone()), leftovers, &mut sink)
            .await;
        let problems = sink.problems;
        if problems.is_empty() {
            Ok(actions)
        } else {
            Err(GcError::Incomplete {
                task: task.clone(),
                problems,
            })
        }
    }

    async fn run(
        &self,
        task: &TaskName,
        mut record: Option<TaskRecord>,
        leftovers: Leftovers,
        sink: &mut Sink<'_>,
    ) {
        let dry_run = sink.dry_run;
        let died = record.as_ref().map(|r| (r.supervisor_pid, r.state));
        // While the lock is held here, this process is the task's supervisor. Saying so keeps `stop`
        // and `attach` from signalling the dead supervisor's pid, which may belong to another
        // process by now.
        if !dry_run && let Some(r) = record.as_mut().filter(|r| r.state.is_active()) {
            r.supervisor_pid = std::process::id();
            if let Err(e) = self.ws.state.write(r) {
                let target = r.state.as_str();
                sink.step(
                    ActionKind::MarkRecord,
                    Some(task),
                    target,
                    Err(e.to_string()),
                );
                return;
            }
        }

        let (containers_gone, exit_code) = self
            .remove_containers(task, record.as_ref(), &leftovers.containers, sink)
            .await;
        let mut all_ok = containers_gone;
        for network in &leftovers.networks {
            let result = if dry_run || !containers_gone {
                Ok(None)
            } else {
                self.engine
                    .remove_network(&network.id)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            };
            if containers_gone {
                all_ok &= sink.step(ActionKind::RemoveNetwork, Some(task), &network.name, result);
            }
        }
        let mut snapshot = None;
        for worktree in &leftovers.worktrees {
            let result = if containers_gone {
                self.remove_worktree(task, record.as_ref(), worktree, dry_run)
                    .await
            } else {
                Err(format!(
                    "a container of task {task} could not be removed, so worktree {} stays as it is (a running container may still write to it)",
                    worktree.path.display()
                ))
            };
            if let Ok(Some(commit)) = &result {
                snapshot = Some(commit.clone());
            }
            let target = worktree.path.display().to_string();
            all_ok &= sink.step(ActionKind::RemoveWorktree, Some(task), target, result);
        }
        // A port is free again only once no container of the task can still listen on it.
        if containers_gone && let Some(ledger) = self.ports {
            all_ok &= release_ports(ledger, &self.ws.repo_id, task, dry_run, sink);
        }

        let (Some(mut record), Some((pid, state))) = (record, died) else {
            return;
        };
        if !all_ok {
            return;
        }
        if state.is_active() {
            let by = self.by;
            let (new_state, note) = if state == TaskState::Creating {
                let note = format!(
                    "the supervisor (pid {pid}) died while creating the task; {by} rolled back what it had made (the branch stays)"
                );
                (TaskState::Failed, note)
            } else {
                let note = format!(
                    "the supervisor (pid {pid}) died while the task was {}; {by} stopped what was left and kept its work on branch {}",
                    state.as_str(),
                    record.branch
                );
                (TaskState::Recovered, note)
            };
            record.state = new_state;
            record.supervisor_pid = pid;
            record.exit_code = record.exit_code.or(exit_code);
            record.snapshot_commit = snapshot.or(record.snapshot_commit);
            record.finished_at = Some(SystemTime::now());
            record.error = Some(note);
            let result = if dry_run {
                Ok(None)
            } else {
                self.ws
                    .state
                    .write(&record)
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            };
            sink.step(
                ActionKind::MarkRecord,
                Some(task),
                new_state.as_str(),
                result,
            );
        } else if snapshot.is_some() && record.snapshot_commit.is_none() && !dry_run {
            // A teardown that stopped half-way: the record keeps its state and its error, and
            // learns where the work went.
            record.snapshot_commit = snapshot;
            if let Err(e) = self.ws.state.write(&record) {
                sink.step(
                    ActionKind::MarkRecord,
                    Some(task),
                    record.state.as_str(),
                    Err(e.to_string()),
                );
            }
        }
    }

    /// Stops and removes the task's containers. Returns whether none is left, and the exit code of
    /// the task's own container when its command had ended by itself.
    async fn remove_containers(
        &self,
        task: &TaskName,
        record: Option<&TaskRecord>,
        containers: &[FoundContainer],
        sink: &mut Sink<'_>,
    ) -> (bool, Option<i64>) {
        let dry_run = sink.dry_run;
        let mut all_gone = true;
        let mut exit_code = None;
        for container in containers {
            let name = &container.name;
            if container.running {
                let result = if dry_run {
                    Ok(None)
                } else {
                    self.engine
                        .stop(&container.id, self.stop_timeout)
                        .await
                        .map(|()| None)
                        .map_err(|e| e.to_string())
                };
                if !sink.step(ActionKind::StopContainer, Some(task), name, result) {
                    all_gone = false;
                    continue;
                }
            } else if !dry_run
                && record.is_some_and(|r| {
                    r.container_name == *name || r.container_id.as_deref() == Some(&container.id)
                })
            {
                // The command ended while nobody waited for it: its exit code is the task's
                // result. A failure to read it loses only that number.
                exit_code = self
                    .engine
                    .exit_code_if_ended(&container.id)
                    .await
                    .ok()
                    .flatten();
            }
            let result = if dry_run {
                Ok(None)
            } else {
                self.engine
                    .remove(&container.id)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string())
            };
            all_gone &= sink.step(ActionKind::RemoveContainer, Some(task), name, result);
        }
        (all_gone, exit_code)
    }

    /// Snapshot-commits the worktree's uncommitted work and removes it; returns the snapshot commit.
    /// A worktree whose snapshot fails stays.
    async fn remove_worktree(
        &self,
        task: &TaskName,
        record: Option<&TaskRecord>,
        worktree: &WorktreeEntry,
        dry_run: bool,
    ) -> Result<Option<String>, String> {
        let path = &worktree.path;
        let cli = self.ws.git();
        let remove = || async {
            if dry_run {
                return Ok(());
            }
            cli.remove_worktree(path).await.map_err(|e| e.to_string())
        };
        let nothing_to_keep = record
            .is_some_and(|r| matches!(r.state, TaskState::Creating | TaskState::RemovingWorktree));
        if !path.exists() || nothing_to_keep {
            // Only git's metadata is left; or nothing has run in it yet and its checkout may be
            // half done; or its work was committed and its removal half done: there is no work to
            // keep, and a snapshot would commit the missing files as deletions.
            return remove().await.map(|()| None);
        }
        if let Err(why) = check_linked(&self.ws.repo.common_dir, path) {
            return Err(format!(
                "worktree {} of task {task} is damaged ({why}), so agentbox cannot commit what it holds; copy out what you need, then remove it with `git worktree remove --force --force {}`",
                path.display(),
                path.display()
            ));
        }
        if dry_run {
            return Ok(None);
        }
        let identity = self.ws.repo.identity().unwrap_or_else(Identity::fallback);
        let own_files = record.map(|r| r.own_files.clone()).unwrap_or_default();
        let message = format!(
            "agentbox: snapshot of uncommitted work in task {task}\n\n\
             The supervisor of task {task} died and left these changes uncommitted; {} committed \
             them so that nothing the task wrote is lost.",
            self.by
        );
        let commit = cli
            .snapshot(path, &message, &identity, &own_files)
            .await
            .map_err(|e| {
                format!(
                    "cannot commit the uncommitted work in worktree {} of task {task}: {e}; the worktree stays",
                    path.display()
                )
            })?;
        remove().await.map_err(|e| match &commit {
            Some(commit) => format!("{e} (its work is safe in commit {commit})"),
            None => e,
        })?;
        Ok(commit)
    }
}

/// A worktree can be snapshot only while its `.git` file links it to this repository: without it,
/// git would find whatever repository encloses the path, or none, and commit there.
fn check_linked(common_dir: &Path, worktree: &Path) -> Result<(), String> {
    let dot_git = worktree.join(".git");
    let link = std::fs::read_to_string(&dot_git)
        .map_err(|e| format!("cannot read {}: {e}", dot_git.display()))?;
    let gitdir = link
        .strip_prefix("gitdir:")
        .map(str::trim)
        .ok_or_else(|| format!("{} holds no gitdir link", dot_git.display()))?;
    if Path::new(gitdir).starts_with(common_dir.join("worktrees")) {
        Ok(())
    } else {
        Err(format!(
            "{} links to {gitdir}, not into {}",
            dot_git.display(),
            common_dir.display()
        ))
    }
}

/// Gives the task's host ports back to the machine-wide ledger. Returns whether that worked.
fn release_ports(
    ledger: &PortLedger,
    repo_id: &str,
    task: &TaskName,
    dry_run: bool,
    sink: &mut Sink<'_>,
) -> bool {
    let owner = Owner {
        repo_id: repo_id.to_owned(),
        task: task.to_string(),
    };
    let held = match ledger.held_by(&owner) {
        Ok(held) if held.is_empty() => return true,
        Ok(held) => held,
        Err(e) => {
            return sink.step(ActionKind::ReleasePorts, Some(task), "", Err(e.to_string()));
        }
    };
    let target = held
        .iter()
        .map(|(name, port)| format!("{name}={port}"))
        .collect::<Vec<_>>()
        .join(",");
    let result = if dry_run {
        Ok(None)
    } else {
        ledger
            .release(&owner)
            .map(|()| None)
            .map_err(|e| e.to_string())
    };
    sink.step(ActionKind::ReleasePorts, Some(task), target, result)
}

/// Drops git's metadata of worktrees whose directory is gone (`git worktree prune`). Locked ones are
/// kept by git; a task's own were handled with the task.
async fn prune(
    ws: &Workspace,
    records: &BTreeMap<TaskName, TaskRecord>,
    sink: &mut Sink<'_>,
) -> Result<(), GcError> {
    let cli = ws.git();
    let stale: Vec<WorktreeEntry> = cli
        .list_worktrees()
        .await?
        .into_iter()
        .filter(|e| e.prunable && e.locked.is_none())
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    let result = if sink.dry_run {
        Ok(None)
    } else {
        cli.prune_worktrees()
            .await
            .map(|()| None)
            .map_err(|e| e.to_string())
    };
    for entry in stale {
        let task = owner_of(ws, records, &entry);
        let target = entry.path.display().to_string();
        sink.step(
            ActionKind::PruneWorktree,
            task.as_ref(),
            target,
            result.clone(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worktree_is_snapshot_only_while_linked_to_the_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let common = tmp.path().join("proj/.git");
        let wt = tmp.path().join("wt");
        std::fs::create_dir_all(&wt).unwrap();
        assert!(check_linked(&common, &wt).is_err(), "no .git file");
        std::fs::write(wt.join(".git"), "gitdir: /elsewhere/.git/worktrees/wt\n").unwrap();
        assert!(check_linked(&common, &wt).is_err(), "linked elsewhere");
        let link = format!("gitdir: {}\n", common.join("worktrees/wt").display());
        std::fs::write(wt.join(".git"), link).unwrap();
        assert_eq!(check_linked(&common, &wt), Ok(()));
    }

    #[test]
    fn action_names_are_the_json_names() {
        for kind in [
            ActionKind::StopContainer,
            ActionKind::RemoveContainer,
            ActionKind::RemoveNetwork,
            ActionKind::RemoveWorktree,
            ActionKind::ReleasePorts,
            ActionKind::MarkRecord,
            ActionKind::PruneWorktree,
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::from(kind.as_str())
            );
        }
    }
}
