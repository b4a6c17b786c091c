//! Acting on tasks that exist: stop, wait, signal, remove.

use std::io;
use std::time::Duration;

use crate::git::GitError;
use crate::inspect::{self, InspectError};
use crate::recovery::{self, RecoveryError};
use crate::runtime::{Runtime, RuntimeError};
use crate::state::StateError;
use crate::supervisor::StopSignal;
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::teardown::Step;
use crate::workspace::Workspace;

/// A container still running when its task is removed (the task was left behind) gets this long
/// between SIGTERM and SIGKILL.
const REMOVAL_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("task {task} is not running (it is {state})")]
    NotRunning { task: TaskName, state: String },
    #[error("task {task} is running; stop it first with `agentbox stop {task}`, or pass --force")]
    Running { task: TaskName },
    #[error("cannot signal the supervisor of task {task} (pid {pid}): {source}")]
    Signal {
        task: TaskName,
        pid: u32,
        source: io::Error,
    },
    #[error(
        "task {task} left containers or a worktree behind; removing it needs the container engine"
    )]
    RuntimeNeeded { task: TaskName },
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    State(#[from] StateError),
}

fn record(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, ControlError> {
    Ok(inspect::record(ws, task)?)
}

/// The record of a task whose command runs now, for commands run in its container and clients
/// attached to it; a task that is not running is an error that says what it is.
pub fn running(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, ControlError> {
    let record = record(ws, task)?;
    let supervised = ws.state.is_supervised(task)?;
    let state = match (supervised, record.state) {
        (true, TaskState::Running) if record.container_id.is_some() => return Ok(record),
        (true, state) => state.as_str(),
        (false, state) if state.is_active() => "orphaned",
        (false, state) => state.as_str(),
    };
    Err(ControlError::NotRunning {
        task: task.clone(),
        state: state.to_owned(),
    })
}

/// Asks the task's supervisor to stop it (as SIGTERM would) and waits until its teardown is done.
/// With `kill_after`, the command is killed through `runtime` when it has not ended that long after
/// the request, whatever grace period the task was started with.
pub async fn stop(
    ws: &Workspace,
    task: &TaskName,
    kill_after: Option<(Duration, &dyn Runtime)>,
) -> Result<(), ControlError> {
    signal(ws, task, StopSignal::Terminate)?;
    let torn_down = until_unsupervised(ws, task);
    tokio::pin!(torn_down);
    if let Some((grace, runtime)) = kill_after {
        tokio::select! {
            done = &mut torn_down => return done,
            () = tokio::time::sleep(grace) => {
                if let Some(container) = record(ws, task)?.container_id {
                    runtime.kill(&container).await?;
                }
            }
        }
    }
    torn_down.await
}

/// Blocks (off the async threads) until no supervisor holds the task: it ended, or died.
async fn until_unsupervised(ws: &Workspace, task: &TaskName) -> Result<(), ControlError> {
    let state = ws.state.clone();
    let name = task.clone();
    tokio::task::spawn_blocking(move || state.wait_unsupervised(&name))
        .await
        .expect("waiting for a lock does not panic")?;
    Ok(())
}

/// Blocks until no supervisor holds the task any more (it ended, or died), then returns its record.
pub async fn wait(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, ControlError> {
    record(ws, task)?;
    until_unsupervised(ws, task).await?;
    record(ws, task)
}

/// The most of a task's env file read back for [`exec_env`].
const ENV_FILE_MAX: u64 = 1 << 20;

/// What a command run later in the task's container (`exec`, `shell`, MCP's `task_run`) must be
/// given besides the container's own environment, as `K=V`. A task that took a pool slot got its
/// environment with its command, not with its container (the container was made before the task
/// existed), so its later commands get it from the task's env file, which holds all of it. The
/// file is read without following a link and bounded; the task may have changed it, which changes
/// only what its own commands see. Empty for every other task.
pub fn exec_env(record: &TaskRecord) -> Vec<String> {
    let Some(env_file) = record.pool_slot.as_ref().and(record.own_files.first()) else {
        return Vec::new();
    };
    let text = crate::fs_guard::GuardedDir::open(&record.worktree)
        .and_then(|worktree| worktree.read_file(std::path::Path::new(env_file), ENV_FILE_MAX))
        .ok()
        .flatten()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let path = record.worktree.join(env_file);
    crate::config::parse_env_file(&text, &path, &Default::default())
        .map(|vars| {
            vars.iter()
                .map(|v| format!("{}={}", v.key, v.value))
                .collect()
        })
        .unwrap_or_default()
}

/// Passes a stop signal to the task's supervisor as if it had been sent to its `agentbox run`: the
/// first one asks for a graceful stop, a second one for a kill; the teardown follows either way.
pub fn signal(ws: &Workspace, task: &TaskName, signal: StopSignal) -> Result<(), ControlError> {
    let before = record(ws, task)?;
    if !ws.state.is_supervised(task)? {
        let state = if before.state.is_active() {
            "orphaned"
        } else {
            before.state.as_str()
        };
        return Err(ControlError::NotRunning {
            task: task.clone(),
            state: state.to_owned(),
        });
    }
    // Read after the lock check, so the pid is the live supervisor's.
    let pid = record(ws, task)?.supervisor_pid;
    let signal = match signal {
        StopSignal::Interrupt => rustix::process::Signal::INT,
        StopSignal::Terminate => rustix::process::Signal::TERM,
    };
    let signal_error = |source| ControlError::Signal {
        task: task.clone(),
        pid,
        source,
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| signal_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    rustix::process::kill_process(pid, signal).map_err(|e| signal_error(e.into()))
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// The clean-up steps for a task that had left more than its branch behind.
    pub cleaned_up: Vec<Step>,
    /// Refs deleted with `delete_branch`, and the commits they pointed to, so they can be restored.
    pub deleted_refs: Vec<(String, String)>,
}

/// Deletes `branch` (the task's) and the refs under `refs/agentbox/<task>/` that keep earlier tips
/// of it, each only from the commit it was seen at. Returns them with those commits, so they can be
/// restored. For [`remove`], and for a task agentbox has forgotten while its branch stayed.
pub async fn delete_refs(
    ws: &Workspace,
    task: &TaskName,
    branch: &str,
) -> Result<Vec<(String, String)>, ControlError> {
    let mut refs = vec![format!("refs/heads/{branch}")];
    refs.extend(ws.repo.ref_names(&format!("refs/agentbox/{task}/"))?);
    let mut deleted = Vec::new();
    for name in refs {
        let tip = match ws
            .repo
            .git()
            .run(&["rev-parse", "--verify", "--quiet", &name])
            .await
        {
            Ok(out) => out.text(),
            Err(_) => continue,
        };
        ws.repo
            .git()
            .run(&["update-ref", "-d", &name, &tip])
            .await?;
        deleted.push((name, tip));
    }
    Ok(deleted)
}

/// Whether removing the task needs the container engine: only a task that ended normally is known
/// to have left nothing but its branch behind.
pub fn removal_needs_runtime(ws: &Workspace, task: &TaskName) -> Result<bool, ControlError> {
    let record = record(ws, task)?;
    Ok(record.state != TaskState::Exited || ws.state.is_supervised(task)?)
}

/// Forgets a task. `runtime` is used only when the task left more than its branch behind (kept, or
/// orphaned by a dead supervisor): that is cleaned up first, as gc would — containers removed,
/// commits imported, uncommitted work snapshot-committed, worktree removed, ports released. The
/// branch stays unless `delete_branch`, which also deletes the refs that kept earlier tips of it.
pub async fn remove(
    ws: &Workspace,
    runtime: Option<&dyn Runtime>,
    task: &TaskName,
    delete_branch: bool,
    force: bool,
) -> Result<Removal, ControlError> {
    record(ws, task)?;
    if ws.state.is_supervised(task)? {
        if !force {
            return Err(ControlError::Running { task: task.clone() });
        }
        stop(ws, task, None).await?;
    }
    // Held until the record is gone, so no run of the task can start in between.
    let (state, name) = (ws.state.clone(), task.clone());
    let claim = tokio::task::spawn_blocking(move || state.try_claim(&name))
        .await
        .expect("claiming a task does not panic")?
        .ok_or_else(|| ControlError::Running { task: task.clone() })?;
    let record = record(ws, task)?;
    let mut removal = Removal::default();
    if record.state != TaskState::Exited {
        let runtime = runtime.ok_or_else(|| ControlError::RuntimeNeeded { task: task.clone() })?;
        removal.cleaned_up =
            recovery::clean_up_for_removal(ws, runtime, &record, &claim, REMOVAL_GRACE).await?;
    }
    if delete_branch {
        removal.deleted_refs = delete_refs(ws, task, &record.branch).await?;
    }
    // The task's logs go with it: directory removals, off the async runtime.
    let (state, name) = (ws.state.clone(), task.clone());
    tokio::task::spawn_blocking(move || state.remove(&name, &claim))
        .await
        .expect("removing a task's files does not panic")?;
    Ok(removal)
}
