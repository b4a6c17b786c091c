//! Crash recovery: reconciles agentbox's records with what really exists, and finishes what a dead
//! supervisor started.
//!
//! # Theory of operation
//!
//! A supervisor that dies (SIGKILL, a crash, a power cut) leaves its task half-way: the record says
//! `running` (or another active state), the container may still run, the worktree holds the task's
//! uncommitted work, its git dir holds commits not imported yet, host ports are still promised to
//! it. Its task lock is gone, though: the kernel dropped it with the process. The lock is how a dead
//! task is told from a live one, and nothing here touches a task whose lock is held.
//!
//! [`reconcile`] (`agentbox gc`) looks at everything that belongs to this repository: the task
//! records, the containers and networks labelled `agentbox.repo=<repo-id>`, and the task git dirs in
//! the state dir. For each task that has something left it takes the task's lock itself, so no `run`
//! of that task can start meanwhile, looks again (the first look may be stale by then) and runs the
//! one [`teardown`](crate::teardown) on it: containers, network, import, snapshot, removal, ports,
//! record. It never deletes a branch. A step that fails is reported, and the record keeps its state
//! so that the next gc tries again; a second gc after a successful one finds nothing to do. Tasks
//! kept with `--keep` (or kept to keep work safe) are left alone until `agentbox rm`.
//!
//! A task that died while being created (`creating`: its command never started) is rolled back
//! instead of snapshot: nothing has run in its worktree, whose checkout may be only half done.
//!
//! [`recover_for_run`] does the same for one task at the start of `agentbox run`, so that a run after
//! a crash continues on the task's branch instead of refusing; [`clean_up_for_removal`] for `rm`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use crate::git::{GitError, Identity};
use crate::runtime::{REPO_LABEL, Runtime, RuntimeError, SHARED_LABEL, TASK_LABEL};
use crate::state::{StateError, TaskClaim};
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::teardown::{self, Ending, Leftovers, Step};
use crate::workspace::Workspace;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "recovery of task {task} is incomplete: {problems}; nothing was discarded, and `agentbox gc` tries again once that is fixed"
    )]
    Incomplete {
        task: TaskName,
        #[source]
        problems: teardown::Problems,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// How [`reconcile`] works.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only report what would be done.
    pub dry_run: bool,
    /// How long a container that still runs gets between SIGTERM and SIGKILL.
    pub stop_timeout: Duration,
    pub max_file_size: u64,
}

/// What [`reconcile`] did besides its steps.
#[derive(Debug, Default)]
pub struct Summary {
    pub steps: usize,
    pub failed: usize,
    /// Tasks left alone because their supervisor is alive.
    pub live: Vec<TaskName>,
    /// Tasks left alone because they are kept (`agentbox rm` removes them).
    pub kept: Vec<TaskName>,
    /// The networks the repository's tasks share, removed because no task is left to use them.
    pub shared_networks_removed: Vec<String>,
    /// Records that could not be read: their tasks are left alone, whatever they left behind,
    /// until the record is mended or moved away.
    pub damaged: Vec<StateError>,
}

/// Whether a record shows a task left half-way by an earlier run, assuming that no supervisor holds
/// it: an active state (its supervisor died), or a worktree or git dir still on disk after a
/// teardown that did not finish. A kept task is left as it is.
pub fn is_left_behind(ws: &Workspace, record: &TaskRecord) -> bool {
    record.state != TaskState::Kept
        && (record.state.is_active()
            || record.worktree.is_dir()
            || ws.dirs_of(record).git_dir.exists())
}

/// Whether any task of the repository was left behind by a dead supervisor. Reads only the records
/// and their locks (no engine, no git), so `run` and `batch` can ask it every time and call
/// [`reconcile`] only when there is something to do.
pub fn anything_left_behind(ws: &Workspace) -> Result<bool, StateError> {
    // A damaged record says nothing either way; `reconcile` reports it.
    for record in ws.state.list_all()?.records {
        if is_left_behind(ws, &record) && !ws.state.is_supervised(&record.name)? {
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
    runtime: &dyn Runtime,
    options: &Options,
    report: &mut (dyn FnMut(&Step) + Send),
) -> Result<Summary, RecoveryError> {
    let listing = ws.state.list_all()?;
    let mut summary = Summary {
        damaged: listing.damaged,
        ..Summary::default()
    };
    let records: BTreeMap<TaskName, TaskRecord> = listing
        .records
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    // Deletions a background purge did not finish.
    if !options.dry_run {
        for manifest in crate::trash::manifests(&ws.state) {
            let _ = crate::trash::purge(runtime, &manifest).await;
        }
    }
    let labelled = labelled_tasks(ws, runtime).await?;
    let with_dirs = tasks_with_git_dirs(ws);
    // A task whose record is damaged is not guessed at: what it left stays where it is.
    let damaged: BTreeSet<TaskName> = summary
        .damaged
        .iter()
        .filter_map(|e| e.task().cloned())
        .collect();
    let tasks: BTreeSet<&TaskName> = records
        .keys()
        .chain(labelled.iter())
        .chain(with_dirs.iter())
        .filter(|task| !damaged.contains(*task))
        .collect();

    for task in tasks {
        let leftover = labelled.contains(task) || with_dirs.contains(task);
        let record = records.get(task);
        if !leftover && !record.is_some_and(|r| is_left_behind(ws, r)) {
            continue;
        }
        if record.is_some_and(|r| r.state == TaskState::Kept) {
            summary.kept.push(task.clone());
            continue;
        }
        let (state, name) = (ws.state.clone(), task.clone());
        let claimed = tokio::task::spawn_blocking(move || state.try_claim(&name))
            .await
            .expect("claiming a task does not panic")?;
        let Some(claim) = claimed else {
            summary.live.push(task.clone());
            continue;
        };
        // Holding the lock, look again: a run may have started and ended since the first look.
        let mut record = match ws.state.read(task) {
            Ok(Some(record)) if record.state == TaskState::Kept => {
                summary.kept.push(task.clone());
                continue;
            }
            Ok(Some(record)) => record,
            Ok(None) => record_for_leftovers(ws, task),
            Err(e) => {
                summary.damaged.push(e);
                continue;
            }
        };
        let leftovers =
            Leftovers::find(runtime, &ws.repo_id, task, record.pool_slot.as_deref()).await?;
        let teardown_options = teardown::Options {
            stop_timeout: options.stop_timeout,
            by: "agentbox gc",
            keep: false,
            release_ports: true,
            dry_run: options.dry_run,
            max_file_size: options.max_file_size,
            identity: ws.repo.identity().unwrap_or_else(Identity::fallback),
            ending: Ending::Recovered,
            discard_unsaved: false,
            defer_deletion: false,
            processes_gone: Vec::new(),
        };
        let mut count = |step: &Step| {
            summary.steps += 1;
            if !step.ok {
                summary.failed += 1;
            }
            report(step);
        };
        teardown::tear_down(
            ws,
            runtime,
            &mut record,
            leftovers,
            &teardown_options,
            &claim,
            &mut count,
        )
        .await;
    }
    if !options.dry_run && summary.damaged.is_empty() {
        // Pool slots whose maker or taker died; ready slots stay, they are the pool. Not while a
        // record cannot be read: the slot it names would look dead.
        let owned = ws.state.list_all()?;
        if owned.damaged.is_empty() {
            let owned: BTreeSet<String> = owned
                .records
                .into_iter()
                .filter_map(|r| r.pool_slot)
                .collect();
            let _ = crate::pool::collect_dead(ws, runtime, &owned).await;
        }
    }
    if summary.live.is_empty() && !options.dry_run {
        summary.shared_networks_removed = remove_shared_networks(ws, runtime).await;
    }
    Ok(summary)
}

/// Removes the networks the repository's tasks without services share, when no container is on
/// them any more (the engine refuses otherwise, which is fine: a task still uses it).
async fn remove_shared_networks(ws: &Workspace, runtime: &dyn Runtime) -> Vec<String> {
    let labels = [
        format!("{REPO_LABEL}={}", ws.repo_id),
        format!("{SHARED_LABEL}=isolated"),
    ];
    let mut removed = Vec::new();
    for network in runtime.find_networks(&labels).await.unwrap_or_default() {
        if runtime.remove_network(&network.id).await.is_ok() {
            removed.push(network.name);
        }
    }
    removed
}

/// Recovers a task that an earlier run left behind (see [`is_left_behind`]) so that a new run of it
/// can start: the same teardown as gc, except that its host ports stay reserved for it, so the new
/// run gets the same ones. The caller proves with `claim` that it holds the task's lock.
pub async fn recover_for_run(
    ws: &Workspace,
    runtime: &dyn Runtime,
    record: &TaskRecord,
    claim: &TaskClaim,
    stop_timeout: Duration,
) -> Result<Vec<Step>, RecoveryError> {
    if !is_left_behind(ws, record) {
        return Ok(Vec::new());
    }
    let how = OneRecovery {
        stop_timeout,
        by: "agentbox run",
        release_ports: false,
        discard_unsaved: false,
    };
    recover_one(ws, runtime, record, claim, &how).await
}

/// Cleans up whatever a task left besides its branch — kept, or left behind by a dead supervisor —
/// before `agentbox rm` forgets it: the same teardown as gc, ports released too.
pub async fn clean_up_for_removal(
    ws: &Workspace,
    runtime: &dyn Runtime,
    record: &TaskRecord,
    claim: &TaskClaim,
    stop_timeout: Duration,
) -> Result<Vec<Step>, RecoveryError> {
    let how = OneRecovery {
        stop_timeout,
        by: "agentbox rm",
        release_ports: true,
        discard_unsaved: true,
    };
    recover_one(ws, runtime, record, claim, &how).await
}

/// How one task is recovered, by whom.
struct OneRecovery {
    stop_timeout: Duration,
    by: &'static str,
    release_ports: bool,
    discard_unsaved: bool,
}

async fn recover_one(
    ws: &Workspace,
    runtime: &dyn Runtime,
    record: &TaskRecord,
    claim: &TaskClaim,
    how: &OneRecovery,
) -> Result<Vec<Step>, RecoveryError> {
    let leftovers = Leftovers::find(
        runtime,
        &ws.repo_id,
        &record.name,
        record.pool_slot.as_deref(),
    )
    .await?;
    let mut record = record.clone();
    if record.state == TaskState::Kept {
        // Kept on purpose until now: tear it down as if its run had just ended.
        record.state = TaskState::TearingDown;
    }
    let options = teardown::Options {
        stop_timeout: how.stop_timeout,
        by: how.by,
        keep: false,
        release_ports: how.release_ports,
        dry_run: false,
        max_file_size: crate::teardown::DEFAULT_MAX_SNAPSHOT_FILE,
        identity: ws.repo.identity().unwrap_or_else(Identity::fallback),
        ending: Ending::Recovered,
        discard_unsaved: how.discard_unsaved,
        defer_deletion: false,
        processes_gone: Vec::new(),
    };
    let report = teardown::tear_down(
        ws,
        runtime,
        &mut record,
        leftovers,
        &options,
        claim,
        &mut |_| {},
    )
    .await;
    if report.problems.is_empty() {
        Ok(report.steps)
    } else {
        Err(RecoveryError::Incomplete {
            task: record.name.clone(),
            problems: teardown::Problems(report.problems),
        })
    }
}

/// Tasks that own a container or a network of this repository.
async fn labelled_tasks(
    ws: &Workspace,
    runtime: &dyn Runtime,
) -> Result<BTreeSet<TaskName>, RecoveryError> {
    let labels = [format!("{REPO_LABEL}={}", ws.repo_id)];
    let (containers, networks) = tokio::join!(
        runtime.find_containers(&labels),
        runtime.find_networks(&labels)
    );
    // Something labelled for this repository without a valid task label was not made by agentbox's
    // run, which always sets both; it is left alone.
    let from_containers = containers?.into_iter().map(|c| c.labels);
    let from_networks = networks?.into_iter().map(|n| n.labels);
    Ok(from_containers
        .chain(from_networks)
        .filter_map(|labels| TaskName::parse(labels.get(TASK_LABEL)?).ok())
        .collect())
}

/// Tasks whose own git dir is still in the state dir.
fn tasks_with_git_dirs(ws: &Workspace) -> BTreeSet<TaskName> {
    let Ok(entries) = std::fs::read_dir(ws.state.git_dirs_root()) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| TaskName::parse(e.file_name().to_str()?).ok())
        .collect()
}

/// A record for leftovers whose record is gone: at the default worktree path, as if its supervisor
/// died while it ran, so the teardown keeps its work.
fn record_for_leftovers(ws: &Workspace, task: &TaskName) -> TaskRecord {
    let worktree = ws.worktree_path(task);
    let dirs = ws.task_dirs(task, &worktree);
    let start = dirs
        .start_commit()
        .map(|id| id.to_string())
        .or_else(|| {
            ws.repo
                .branch_tip(&task.branch())
                .ok()
                .flatten()
                .map(|id| id.to_string())
        })
        .unwrap_or_default();
    TaskRecord {
        name: task.clone(),
        state: TaskState::Running,
        branch: task.branch(),
        base: start.clone(),
        base_commit: start,
        image: String::new(),
        command: Vec::new(),
        worktree,
        container_name: ws.container_name(task),
        container_id: None,
        created_branch: false,
        supervisor_pid: 0,
        exit_code: None,
        started_at: SystemTime::now(),
        finished_at: None,
        snapshot_commit: None,
        error: None,
        ports: BTreeMap::new(),
        env: Vec::new(),
        own_files: vec![crate::config::DEFAULT_ENV_FILE_NAME.to_owned()],
        left_out: Vec::new(),
        oom_killed: false,
        memory_limit: None,
        pool_slot: None,
        tty: false,
        stdin: false,
        idle: false,
        sandbox: None,
    }
}
