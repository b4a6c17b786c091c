//! Runs one task from start to end.
//!
//! # Theory of operation
//!
//! [`run`] owns the task for as long as it lives: it claims the task's lock in the state dir (so a
//! second `run` of the same name is refused and a dead run can be recognised), writes the task's record
//! before each step acts, and then
//!
//! 1. makes the task's branch in the repository (if it is new) and the task's own git dirs, then
//!    checks out the worktree *while* the engine checks the images, starts the services and creates
//!    the container: every path the container mounts is known in advance, so the two slow steps
//!    overlap;
//! 2. attaches to the container's output *before* starting it, so no early byte is lost, and pumps the
//!    output into the task's log and to the caller as [`RunEvent::Output`];
//! 3. while the command runs, imports the task's commits into the repository's `agentbox/<task>` as
//!    they appear ([`live_import`]), and watches the stop channel: the first stop request stops the
//!    container gracefully (SIGTERM, grace period, SIGKILL), a second one kills it at once;
//! 4. tears down through [`teardown`](crate::teardown): containers, import, snapshot, removal, ports.
//!    The branch stays; whatever could not be committed keeps the worktree in place.
//!
//! A failure before the command started rolls back everything this run made (containers, network,
//! worktree and git dirs, a branch it created that still points at the base, the ports, the record).

mod create;
mod finish;
mod live_import;
mod output;
mod plan;
mod pooled;
mod request;
mod supervise;

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

pub use request::{
    DEFAULT_IMAGE, DEFAULT_LOG_MAX, DEFAULT_PIDS_LIMIT, IDLE_COMMAND, Interactive, Kept, RunError,
    RunEvent, RunOutcome, RunRequest, RunSummary, StopLevel, StopSignal,
};

use crate::config::{EnvVar, NetworkSetting};
use crate::environment;
use crate::git::{Identity, TaskDirs};
use crate::ports::Owner;
use crate::runtime::{Runtime, Sandbox};
use crate::state::TaskClaim;
use crate::task::{SandboxLimits, TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;
use plan::all_port_mappings;
pub use plan::{DescribedMount, Description, describe};
pub(crate) use plan::{own_files, plan, port_names};

const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// Runs the task to its end. See the module documentation for the order of steps.
pub async fn run(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: RunRequest,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
) -> Result<RunOutcome, RunError> {
    let task = request.task.clone();
    // Checked before anything is written, so that a bad base leaves no trace.
    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let base_id = ws.repo.resolve_commit(&base)?;

    let state = ws.state.clone();
    let claim_task = task.clone();
    let claim = tokio::task::spawn_blocking(move || state.try_claim(&claim_task))
        .await
        .expect("claiming a task does not panic")?
        .ok_or_else(|| RunError::AlreadyRunning { task: task.clone() })?;
    let previous = ws.state.read(&task)?;
    if let Some(previous) = &previous {
        // A run that died left the task half-way: finish its teardown (the work goes to the
        // branch), then continue on the branch.
        crate::recovery::recover_for_run(ws, runtime, previous, &claim, request.stop_timeout)
            .await?;
        if !previous.state.can_start() {
            return Err(RunError::KeptBefore {
                task,
                worktree: previous.worktree.clone(),
            });
        }
    }

    let branch = task.branch();
    let existing_tip = ws.repo.branch_tip(&branch)?;
    let base_commit = match existing_tip {
        Some(tip) => ws.repo.merge_base(base_id, tip)?.unwrap_or(base_id),
        None => base_id,
    };
    let worktree = ws.worktree_path(&task);
    let dirs = ws.task_dirs(&task, &worktree);
    for path in [&dirs.worktree, &dirs.git_dir, &dirs.scratch] {
        if path.exists() {
            return Err(RunError::WorktreeExists {
                task,
                path: path.clone(),
            });
        }
    }
    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);

    // A ready slot of the pool, when there is one for this kind of task: its sandbox exists and
    // idles, and only needs to become this task's.
    let slot = if request.use_pool && crate::pool::unpoolable(&request).is_none() {
        let (pool_ws, key) = (ws.clone(), crate::pool::key(&request));
        tokio::task::spawn_blocking(move || crate::pool::claim_ready(&pool_ws, &key))
            .await
            .expect("looking at the pool does not panic")
            .unwrap_or(None)
    } else {
        None
    };
    let (dirs, worktree) = match &slot {
        Some((slot, _)) => {
            let dirs = TaskDirs {
                worktree: slot.worktree.clone(),
                ..ws.pooled_task_dirs(&task, &slot.id)
            };
            let worktree = dirs.worktree.clone();
            (dirs, worktree)
        }
        None => (dirs, worktree),
    };

    // Ports are the first thing reserved (or, from a slot, taken over); from here on every
    // failure releases them.
    let owner = Owner {
        repo_id: ws.repo_id.clone(),
        task: task.to_string(),
    };
    let preferred: BTreeMap<String, u16> = previous
        .iter()
        .flat_map(|p| p.ports.iter().map(|(name, m)| (name.clone(), m.host)))
        .filter(|(_, port)| request.port_range.contains(*port))
        .collect();
    let wanted = port_names(&request);
    let (ledger, range, reserve_owner) = (ws.ports.clone(), request.port_range, owner.clone());
    let slot_owner = slot
        .as_ref()
        .map(|(slot, _)| crate::pool::pool_owner(ws, &slot.id));
    let host_ports = tokio::task::spawn_blocking(move || match slot_owner {
        Some(slot_owner) => ledger.transfer(&slot_owner, &reserve_owner),
        None => ledger.reserve(&reserve_owner, &wanted, range, &preferred),
    })
    .await
    .expect("reserving ports does not panic")?;
    let (plan, env) = match plan(ws, &request, &dirs, &identity, &host_ports) {
        Ok(planned) => planned,
        Err(e) => {
            let _ = ws.ports.release_off_runtime(&owner).await;
            return Err(e.into());
        }
    };

    let record = TaskRecord {
        name: task.clone(),
        state: TaskState::Creating,
        branch: branch.clone(),
        base: base.clone(),
        base_commit: base_commit.to_string(),
        image: request.image.clone(),
        command: plan.task.command.clone().unwrap_or_default(),
        worktree: worktree.clone(),
        container_name: plan.task.name.clone(),
        container_id: None,
        created_branch: existing_tip.is_none(),
        supervisor_pid: std::process::id(),
        exit_code: None,
        started_at: SystemTime::now(),
        finished_at: None,
        snapshot_commit: None,
        error: None,
        ports: all_port_mappings(&request, &host_ports),
        env: environment::masked(&env),
        own_files: own_files(&request),
        left_out: Vec::new(),
        oom_killed: false,
        memory_limit: request.limits.memory_bytes,
        pool_slot: slot.as_ref().map(|(slot, _)| slot.id.clone()),
        tty: request.interactive.tty,
        stdin: request.interactive.stdin,
        idle: request.idle,
        sandbox: Some(SandboxLimits {
            limits: request.limits,
            no_network: request.network == NetworkSetting::None,
        }),
    };
    if let Err(e) = ws.state.save(&record).await {
        let _ = ws.ports.release_off_runtime(&owner).await;
        return Err(e.into());
    }

    let mut run = Supervised {
        ws,
        runtime,
        request,
        record,
        dirs,
        identity,
        owner,
        env,
        events,
        stop,
        claim: std::sync::Arc::new(claim),
        start: existing_tip.unwrap_or(base_id),
        processes_gone: Vec::new(),
    };
    match slot {
        Some((slot, claim)) => match run.adopt(&slot, claim).await {
            Ok(sandbox) => run.supervise(sandbox, Launch::Exec).await,
            Err(failure) => Err(run.roll_back(failure).await),
        },
        None => match run.create(&plan).await {
            Ok(sandbox) => run.supervise(sandbox, Launch::Start).await,
            Err(failure) => Err(run.roll_back(failure).await),
        },
    }
}

/// The task's command while it runs.
enum Running {
    /// The container's own command.
    Container(String),
    /// A command run in the container with `exec`; `ended` fires when its output has ended.
    Exec {
        container: String,
        execution: String,
        ended: tokio::sync::oneshot::Receiver<()>,
    },
}

impl Running {
    fn container(&self) -> &str {
        match self {
            Self::Container(id) | Self::Exec { container: id, .. } => id,
        }
    }
}

/// How the task's command starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// The container's own command: attach, then start the container.
    Start,
    /// In a container that already runs idle (a pool slot's): `exec`.
    Exec,
}

struct Supervised<'a> {
    ws: &'a Workspace,
    runtime: &'a dyn Runtime,
    request: RunRequest,
    record: TaskRecord,
    dirs: TaskDirs,
    identity: Identity,
    owner: Owner,
    /// The full environment, secrets included; it is written only to the worktree's env file.
    env: Vec<EnvVar>,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
    /// Held for as long as the task runs: it is what "supervised" means to everyone else.
    claim: std::sync::Arc<TaskClaim>,
    /// The commit the worktree is checked out at.
    start: gix::ObjectId,
    /// Containers whose processes were killed and seen gone (a pool slot's, once its command
    /// ended), for the teardown not to stop them again.
    processes_gone: Vec<String>,
}

/// A creation step that failed, with what existed at that point for the rollback to undo.
struct SetupFailure {
    error: RunError,
    sandbox: Sandbox,
}

impl Supervised<'_> {
    fn task(&self) -> &TaskName {
        &self.record.name
    }

    async fn save(&mut self, state: TaskState) -> Result<(), RunError> {
        self.record.state = state;
        self.ws.state.save(&self.record).await.map_err(Into::into)
    }

    async fn emit(&self, event: RunEvent) {
        // A caller that stopped listening does not stop the task.
        let _ = self.events.send(event).await;
    }
}

/// What agentbox says when the out-of-memory killer ended a task.
pub fn out_of_memory_message(task: &TaskName, limit: Option<u64>) -> String {
    match limit {
        Some(limit) => format!(
            "task {task} was killed: out of memory (limit {})",
            crate::config::Bytes(limit)
        ),
        None => format!("task {task} was killed: out of memory"),
    }
}

#[cfg(test)]
pub(crate) mod tests;
