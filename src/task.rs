//! Task names, task records and the states a task moves through.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::git::snapshot::LeftOut;
use crate::ports::PortMapping;

/// Longest task name accepted: short enough to fit in a container name next to the repo id, a branch
/// name and a single path component on every filesystem.
pub const MAX_TASK_NAME_LEN: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("task name is empty")]
    Empty,
    #[error("task name {name:?} is {len} characters long; the limit is {MAX_TASK_NAME_LEN}")]
    TooLong { name: String, len: usize },
    #[error(
        "task name {name:?} must start with a lowercase letter or digit and contain only lowercase letters, digits, '.', '_' and '-'"
    )]
    Characters { name: String },
    #[error("task name {name:?} must not end in '.' or '.lock' or contain '..'")]
    GitReserved { name: String },
}

/// A validated task name: safe as a git branch component, a Docker container name and a directory
/// name, so every later step can use it without quoting or checking again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskName(String);

impl TaskName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_TASK_NAME_LEN {
            return Err(NameError::TooLong {
                name: name.to_owned(),
                len: name.len(),
            });
        }
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !first_ok || !rest_ok {
            return Err(NameError::Characters {
                name: name.to_owned(),
            });
        }
        if name.ends_with('.') || name.ends_with(".lock") || name.contains("..") {
            return Err(NameError::GitReserved {
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The branch that holds every commit of this task.
    pub fn branch(&self) -> String {
        format!("agentbox/{}", self.0)
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TaskName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<TaskName> for String {
    fn from(value: TaskName) -> Self {
        value.0
    }
}

/// Where a task is in its life. Each state is written to the task's record *before* the step it names
/// acts, so that whoever finds a record left by a dead supervisor knows what may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskState {
    /// Branch, worktree and container are being made.
    Creating,
    /// The container has been started.
    Running,
    /// A stop was requested; the container is being stopped.
    Stopping,
    /// The command ended; the snapshot and removals are in progress.
    TearingDown,
    /// The snapshot is committed (or there was nothing to keep); the worktree is being removed. A
    /// half-removed worktree holds no work: whoever finishes the job must not commit its missing
    /// files as deletions.
    RemovingWorktree,
    /// Torn down after the command ended (whatever its exit code).
    Exited,
    /// agentbox itself failed; whatever it made has been rolled back.
    Failed,
    /// Ended with `--keep`: the worktree and the stopped container are still there.
    Kept,
    /// Its supervisor died; `agentbox gc` (or the next `run` of the task) stopped and removed its
    /// containers, snapshot-committed and removed its worktree. `error` says what happened.
    Recovered,
}

impl TaskState {
    /// Whether a new run of the task may start from a record in this state (once whatever an earlier
    /// run left behind is recovered). A kept task waits for `agentbox rm`.
    pub fn can_start(self) -> bool {
        self != Self::Kept
    }

    /// Whether the worktree may still be committed as a snapshot: not before its checkout is known
    /// to be complete (`creating`: a half checkout would commit the missing files as deletions), and
    /// not once its removal has begun.
    pub fn can_snapshot(self) -> bool {
        !matches!(self, Self::Creating | Self::RemovingWorktree)
    }

    /// Whether a supervisor owns the task in this state; a record in such a state without a live
    /// supervisor was left by a run that died.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Creating
                | Self::Running
                | Self::Stopping
                | Self::TearingDown
                | Self::RemovingWorktree
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::TearingDown => "tearing-down",
            Self::RemovingWorktree => "removing-worktree",
            Self::Exited => "exited",
            Self::Failed => "failed",
            Self::Kept => "kept",
            Self::Recovered => "recovered",
        }
    }
}

/// What agentbox remembers about one task: one file per task in the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub name: TaskName,
    pub state: TaskState,
    pub branch: String,
    /// The base as the user named it (`HEAD`, `main`, a commit id).
    pub base: String,
    /// The commit the task's changes are measured against.
    pub base_commit: String,
    pub image: String,
    pub command: Vec<String>,
    pub worktree: PathBuf,
    pub container_name: String,
    pub container_id: Option<String>,
    /// Whether this run created the branch; a rollback deletes only a branch it created.
    pub created_branch: bool,
    pub supervisor_pid: u32,
    pub exit_code: Option<i64>,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// The snapshot commit that kept uncommitted work, if there was any.
    pub snapshot_commit: Option<String>,
    /// Why agentbox failed, for a record in the `failed` state; what happened to its supervisor,
    /// for one in the `recovered` state.
    pub error: Option<String>,
    /// The task's ports and its services' (`db.pg`), by name.
    #[serde(default)]
    pub ports: BTreeMap<String, PortMapping>,
    /// The task's environment with secrets (values from the host's environment or env files)
    /// replaced by `None`: agentbox never stores them.
    #[serde(default)]
    pub env: Vec<(String, Option<String>)>,
    /// Files agentbox itself put into the worktree (the env file, copied files): a snapshot never
    /// commits them.
    #[serde(default)]
    pub own_files: Vec<String>,
    /// Files too large for the snapshot; while there are any, the worktree is kept.
    #[serde(default)]
    pub left_out: Vec<LeftOut>,
    /// The out-of-memory killer ended the command.
    #[serde(default)]
    pub oom_killed: bool,
    /// The task's memory limit in bytes, if it had one.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// The pool slot the task was made from: its containers carry that slot's label.
    #[serde(default)]
    pub pool_slot: Option<String>,
    /// The command has a terminal (`run -t`): `attach -it` can be its terminal again.
    #[serde(default)]
    pub tty: bool,
    /// The command's stdin is open for attached clients (`run -i`).
    #[serde(default)]
    pub stdin: bool,
    /// A long-lived task (`up`, `run -d` without a command): its container idles until `stop`.
    #[serde(default)]
    pub idle: bool,
    /// What the task's container was given, for what joins the task later (a service added
    /// through MCP). `None` in a record an older agentbox wrote.
    #[serde(default)]
    pub sandbox: Option<SandboxLimits>,
}

/// The limits of a task's container and whether it has a network at all: a container added to
/// the task gets the same limits, and none can join a task without a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLimits {
    #[serde(flatten)]
    pub limits: crate::runtime::Limits,
    /// `--network none`: loopback only.
    pub no_network: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "fix-auth",
            "a",
            "0",
            "task_1.v2",
            &"a".repeat(MAX_TASK_NAME_LEN),
        ] {
            assert_eq!(TaskName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_names_unsafe_for_git_docker_or_paths() {
        assert_eq!(TaskName::parse(""), Err(NameError::Empty));
        for name in ["../x", "a b", "-rf", "Foo", ".hidden", "a/b", "é", "x\n"] {
            assert!(
                matches!(TaskName::parse(name), Err(NameError::Characters { .. })),
                "{name:?} should be refused for its characters"
            );
        }
        for name in ["a..b", "x.lock", "y."] {
            assert!(
                matches!(TaskName::parse(name), Err(NameError::GitReserved { .. })),
                "{name:?} should be refused as a git-reserved form"
            );
        }
        let long = "a".repeat(300);
        assert_eq!(
            TaskName::parse(&long),
            Err(NameError::TooLong {
                name: long,
                len: 300
            })
        );
    }

    #[test]
    fn branch_is_namespaced() {
        assert_eq!(TaskName::parse("t1").unwrap().branch(), "agentbox/t1");
    }

    #[test]
    fn transitions_are_methods_of_the_state() {
        assert!(!TaskState::Kept.can_start());
        assert!(TaskState::Recovered.can_start());
        assert!(!TaskState::Creating.can_snapshot());
        assert!(!TaskState::RemovingWorktree.can_snapshot());
        assert!(TaskState::Running.can_snapshot());
    }

    #[test]
    fn only_supervised_states_are_active() {
        assert!(TaskState::Running.is_active());
        assert!(TaskState::TearingDown.is_active());
        assert!(!TaskState::Exited.is_active());
        assert!(!TaskState::Kept.is_active());
    }
}
