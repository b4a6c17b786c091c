//! The commands that look after tasks once they exist: list, logs, diff, stop, remove.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::docker::{DockerError, Engine};
use crate::gc::{self, GcAction};
use crate::git::GitError;
use crate::state::StateError;
use crate::supervisor::StopSignal;
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;

/// A container still running when its task is removed (the task was left behind) gets this long
/// between SIGTERM and SIGKILL.
const REMOVAL_GRACE: Duration = Duration::from_secs(10);

/// How often `logs --follow` looks for new output while the task runs.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("no task named {task} in this repository (see `agentbox ls`)")]
    UnknownTask { task: TaskName },
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
    #[error("cleaning up task {task} needs the Docker engine: {source}")]
    EngineNeeded {
        task: TaskName,
        source: Box<DockerError>,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Recovery(#[from] gc::GcError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// A task as `agentbox ls` shows it. Its JSON form is the stable `ls --json` schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskView {
    pub name: String,
    /// The recorded state, or `orphaned` when the record says a supervisor owns the task but none
    /// is alive.
    pub state: String,
    pub branch: String,
    pub base: String,
    pub base_commit: String,
    pub container_id: Option<String>,
    pub worktree: PathBuf,
    pub exit_code: Option<i64>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub image: String,
    pub command: Vec<String>,
    pub snapshot_commit: Option<String>,
    pub error: Option<String>,
    /// The task's ports and its services' (`db.pg`), by name.
    pub ports: BTreeMap<String, PortView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortView {
    pub container: u16,
    pub host: u16,
    pub url: String,
}

fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

impl TaskView {
    fn new(record: TaskRecord, orphaned: bool) -> Self {
        let state = if orphaned {
            "orphaned".to_owned()
        } else {
            record.state.as_str().to_owned()
        };
        Self {
            name: record.name.to_string(),
            state,
            branch: record.branch,
            base: record.base,
            base_commit: record.base_commit,
            container_id: record.container_id,
            worktree: record.worktree,
            exit_code: record.exit_code,
            started_at: rfc3339(record.started_at),
            finished_at: record.finished_at.map(rfc3339),
            image: record.image,
            command: record.command,
            snapshot_commit: record.snapshot_commit,
            error: record.error,
            ports: record
                .ports
                .iter()
                .map(|(name, port)| {
                    let view = PortView {
                        container: port.container,
                        host: port.host,
                        url: port.url(),
                    };
                    (name.clone(), view)
                })
                .collect(),
        }
    }
}

/// A record in an active state whose supervisor is gone was left by a run that died.
/// Also a record whose worktree outlived a teardown that did not finish: `agentbox gc` has work left.
fn is_orphaned(ws: &Workspace, record: &TaskRecord) -> Result<bool, StateError> {
    Ok(crate::gc::is_left_behind(record) && !ws.state.is_supervised(&record.name)?)
}

pub fn list(ws: &Workspace) -> Result<Vec<TaskView>, ManageError> {
    let mut views = Vec::new();
    for record in ws.state.list()? {
        let orphaned = is_orphaned(ws, &record)?;
        views.push(TaskView::new(record, orphaned));
    }
    Ok(views)
}

fn record(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, ManageError> {
    ws.state
        .read(task)?
        .ok_or_else(|| ManageError::UnknownTask { task: task.clone() })
}

/// A task's ports, by name.
pub fn ports(ws: &Workspace, task: &TaskName) -> Result<BTreeMap<String, PortView>, ManageError> {
    let record = record(ws, task)?;
    Ok(TaskView::new(record, false).ports)
}

/// A task's environment as agentbox recorded it: secrets are `None`, agentbox never stored them.
pub fn env(ws: &Workspace, task: &TaskName) -> Result<Vec<(String, Option<String>)>, ManageError> {
    Ok(record(ws, task)?.env)
}

/// Copies the task's log to `out`; with `follow`, keeps copying new output until the task's
/// supervisor is gone.
pub fn copy_log(
    ws: &Workspace,
    task: &TaskName,
    out: &mut dyn Write,
    follow: bool,
) -> Result<(), ManageError> {
    record(ws, task)?;
    let path = ws.state.log_path(task);
    let io_error = |action| {
        let path = path.clone();
        move |source| ManageError::Io {
            action,
            path,
            source,
        }
    };
    let mut log = match File::open(&path) {
        Ok(log) => log,
        // The record exists but the container never produced a log file (setup is still running).
        Err(e) if e.kind() == io::ErrorKind::NotFound && !follow => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => loop {
            if !ws.state.is_supervised(task)? {
                return Ok(());
            }
            std::thread::sleep(FOLLOW_INTERVAL);
            if let Ok(log) = File::open(&path) {
                break log;
            }
        },
        Err(e) => return Err(io_error("open")(e)),
    };
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = log.read(&mut buf).map_err(io_error("read"))?;
        if n > 0 {
            out.write_all(&buf[..n]).map_err(io_error("copy"))?;
            continue;
        }
        if !follow {
            return Ok(());
        }
        out.flush().map_err(io_error("copy"))?;
        // Checked after reaching the end: once the supervisor is gone the log is complete, and one
        // more read picks up what it wrote last.
        if !ws.state.is_supervised(task)? {
            io::copy(&mut log, out).map_err(io_error("read"))?;
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// The task's changes against its base: the branch once it has ended, the worktree while it runs.
pub async fn diff(ws: &Workspace, task: &TaskName, stat: bool) -> Result<Vec<u8>, ManageError> {
    let record = record(ws, task)?;
    let cli = ws.git();
    let diff = if record.worktree.is_dir() {
        cli.diff(Some(&record.worktree), &record.base_commit, None, stat)
            .await?
    } else {
        let tip = format!("refs/heads/{}", record.branch);
        cli.diff(None, &record.base_commit, Some(&tip), stat)
            .await?
    };
    Ok(diff)
}

/// Asks the task's supervisor to stop it (as SIGTERM would) and waits until its teardown is done.
/// With `kill_after`, the command is killed when it has not ended that long after the request,
/// whatever grace period the task was started with; `engine_address` is used only then.
pub async fn stop(
    ws: &Workspace,
    task: &TaskName,
    kill_after: Option<Duration>,
    engine_address: Option<&str>,
) -> Result<(), ManageError> {
    signal(ws, task, StopSignal::Terminate)?;
    let torn_down = until_unsupervised(ws, task);
    tokio::pin!(torn_down);
    if let Some(grace) = kill_after {
        tokio::select! {
            done = &mut torn_down => return done,
            () = tokio::time::sleep(grace) => {
                if let Some(container) = record(ws, task)?.container_id {
                    let engine = Engine::connect(engine_address).await?;
                    engine.kill(&container).await?;
                }
            }
        }
    }
    torn_down.await
}

/// Blocks (off the async threads) until no supervisor holds the task: it ended, or died.
async fn until_unsupervised(ws: &Workspace, task: &TaskName) -> Result<(), ManageError> {
    let state = ws.state.clone();
    let name = task.clone();
    tokio::task::spawn_blocking(move || state.wait_unsupervised(&name))
        .await
        .expect("waiting for a lock does not panic")?;
    Ok(())
}

fn signal_supervisor(
    task: &TaskName,
    pid: u32,
    signal: rustix::process::Signal,
) -> Result<(), ManageError> {
    let signal_error = |source| ManageError::Signal {
        task: task.clone(),
        pid,
        source,
    };
    let raw = i32::try_from(pid)
        .map_err(|_| signal_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let pid = rustix::process::Pid::from_raw(raw)
        .ok_or_else(|| signal_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    rustix::process::kill_process(pid, signal).map_err(|e| signal_error(e.into()))
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// The clean-up steps for a task that had left more than its branch behind.
    pub cleaned_up: Vec<GcAction>,
    /// The commit the deleted branch pointed to, so it can be recovered.
    pub deleted_branch_tip: Option<String>,
}

/// Forgets a task. `engine_address` is used only when the task left more than its branch behind
/// (kept with `--keep`, or orphaned by a dead supervisor): that is cleaned up first, as gc would —
/// containers removed, uncommitted work snapshot-committed, worktree removed, ports released. The
/// branch stays unless `delete_branch`.
pub async fn remove(
    ws: &Workspace,
    engine_address: Option<&str>,
    task: &TaskName,
    delete_branch: bool,
    force: bool,
) -> Result<Removal, ManageError> {
    record(ws, task)?;
    if ws.state.is_supervised(task)? {
        if !force {
            return Err(ManageError::Running { task: task.clone() });
        }
        stop(ws, task, None, None).await?;
    }
    // Held until the record is gone, so no run of the task can start in between.
    let claim = ws
        .state
        .try_claim(task)?
        .ok_or_else(|| ManageError::Running { task: task.clone() })?;
    let record = record(ws, task)?;
    let mut removal = Removal::default();
    // Only a task that ended normally is known to have left nothing but its branch behind.
    if record.state != TaskState::Exited {
        let engine =
            Engine::connect(engine_address)
                .await
                .map_err(|e| ManageError::EngineNeeded {
                    task: task.clone(),
                    source: Box::new(e),
                })?;
        removal.cleaned_up =
            gc::clean_up_for_removal(ws, &engine, &record, &claim, REMOVAL_GRACE).await?;
    }
    if delete_branch && ws.repo.branch_tip(&record.branch)?.is_some() {
        removal.deleted_branch_tip = Some(ws.git().delete_branch(&record.branch).await?);
    }
    ws.state.remove(task, &claim)?;
    Ok(removal)
}

/// Blocks until no supervisor holds the task any more (it ended, or died), then returns its record.
pub async fn wait(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, ManageError> {
    record(ws, task)?;
    until_unsupervised(ws, task).await?;
    record(ws, task)
}

/// Passes a stop signal to the task's supervisor as if it had been sent to its `agentbox run`: the
/// first one asks for a graceful stop, a second one for a kill; the teardown follows either way.
pub fn signal(ws: &Workspace, task: &TaskName, signal: StopSignal) -> Result<(), ManageError> {
    let before = record(ws, task)?;
    if !ws.state.is_supervised(task)? {
        let state = if before.state.is_active() {
            "orphaned"
        } else {
            before.state.as_str()
        };
        return Err(ManageError::NotRunning {
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
    signal_supervisor(task, pid, signal)
}
