//! Looking at tasks without changing them: the list, ports, environment, log and diff.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::git::GitError;
use crate::git::snapshot::{self, LeftOut, Staging};
use crate::output::log::{LogError, LogReader};
use crate::state::StateError;
use crate::task::{TaskName, TaskRecord};
use crate::teardown::DEFAULT_MAX_SNAPSHOT_FILE;
use crate::workspace::Workspace;

/// How often `logs --follow` looks for new output while the task runs.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no task named {task} in this repository (see `agentbox ls`)")]
    UnknownTask { task: TaskName },
    #[error("cannot copy the log of task {task}: {source}")]
    Log { task: TaskName, source: LogError },
    #[error("cannot write the log of task {task}: {source}")]
    Output { task: TaskName, source: io::Error },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl InspectError {
    /// The reader went away (`agentbox logs t | head`): not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Output { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
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
    /// The task's ports and its services' (`db.pg`), by name; URLs only while the task holds them.
    pub ports: BTreeMap<String, PortView>,
    /// Files too large for the snapshot, kept in the worktree.
    pub left_out: Vec<LeftOut>,
    pub oom_killed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortView {
    pub container: u16,
    pub host: u16,
    /// `None` once the task released the port (it may belong to another task by now).
    pub url: Option<String>,
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
        // A task's ports are its own from the reservation to the teardown.
        let holds_ports = record.state.is_active() || orphaned;
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
                        url: holds_ports.then(|| port.url()),
                    };
                    (name.clone(), view)
                })
                .collect(),
            left_out: record.left_out,
            oom_killed: record.oom_killed,
        }
    }
}

/// A record in an active state whose supervisor is gone was left by a run that died; so was one
/// whose worktree outlived a teardown that did not finish: `agentbox gc` has work left.
fn is_orphaned(ws: &Workspace, record: &TaskRecord) -> Result<bool, StateError> {
    Ok(crate::recovery::is_left_behind(ws, record) && !ws.state.is_supervised(&record.name)?)
}

/// The tasks `agentbox ls` shows, and the records it cannot show.
#[derive(Debug)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
    /// One error per record that could not be read, naming its task and file.
    pub damaged: Vec<StateError>,
}

pub fn list(ws: &Workspace) -> Result<TaskList, InspectError> {
    let listing = ws.state.list_all()?;
    let mut tasks = Vec::new();
    for record in listing.records {
        let orphaned = is_orphaned(ws, &record)?;
        tasks.push(TaskView::new(record, orphaned));
    }
    Ok(TaskList {
        tasks,
        damaged: listing.damaged,
    })
}

pub(crate) fn record(ws: &Workspace, task: &TaskName) -> Result<TaskRecord, InspectError> {
    ws.state
        .read(task)?
        .ok_or_else(|| InspectError::UnknownTask { task: task.clone() })
}

/// A task as `ls` shows it.
pub fn view(ws: &Workspace, task: &TaskName) -> Result<TaskView, InspectError> {
    let record = record(ws, task)?;
    let orphaned = is_orphaned(ws, &record)?;
    Ok(TaskView::new(record, orphaned))
}

/// A task's environment as agentbox recorded it: secrets are `None`, agentbox never stored them.
pub fn env(ws: &Workspace, task: &TaskName) -> Result<Vec<(String, Option<String>)>, InspectError> {
    Ok(record(ws, task)?.env)
}

/// Copies the task's log to `out`; with `follow`, keeps copying new output until the task's
/// supervisor is gone. Blocking: call it from a thread of its own.
pub fn copy_log(
    ws: &Workspace,
    task: &TaskName,
    out: &mut dyn Write,
    follow: bool,
) -> Result<(), InspectError> {
    record(ws, task)?;
    let mut reader = LogReader::new(&ws.state.log_path(task));
    let log_error = |source| InspectError::Log {
        task: task.clone(),
        source,
    };
    let out_error = |source| InspectError::Output {
        task: task.clone(),
        source,
    };
    loop {
        // Checked before reading: once the supervisor is gone the log is complete, and the read
        // that follows picks up what it wrote last.
        let done = !follow || !ws.state.is_supervised(task)?;
        match reader.read_available(out) {
            Ok(_) => {}
            Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => {
                return Err(out_error(source));
            }
            Err(e) => return Err(log_error(e)),
        }
        out.flush().map_err(out_error)?;
        if done {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// The task's changes against its base: its branch once it has ended, its worktree as it is now
/// (committed or not) while it runs.
pub async fn diff(ws: &Workspace, task: &TaskName, stat: bool) -> Result<Vec<u8>, InspectError> {
    let record = record(ws, task)?;
    let dirs = ws.dirs_of(&record);
    if dirs.worktree.is_dir() && dirs.start_commit().is_some() {
        let staging = Staging {
            own_files: &record.own_files,
            max_file_size: DEFAULT_MAX_SNAPSHOT_FILE,
        };
        let patch =
            snapshot::live_diff(&ws.repo, &dirs, &record.base_commit, stat, &staging).await?;
        return Ok(patch);
    }
    let tip = format!("refs/heads/{}", record.branch);
    let mut args = vec!["diff", "--no-color", "--no-ext-diff", "--no-textconv"];
    if stat {
        args.push("--stat");
    }
    args.extend([record.base_commit.as_str(), tip.as_str()]);
    Ok(ws.repo.git().run(&args).await?.stdout)
}
