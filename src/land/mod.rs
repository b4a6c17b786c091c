//! From many branches to one: looking at a task's work ([`review`]), landing it on a branch
//! ([`merge`], and `apply` into a checkout), predicting which tasks would conflict
//! ([`conflicts`]) and landing many, each tested in a box of its own first ([`queue`]).
//!
//! # What runs over a task's content
//!
//! Everything a task wrote is hostile input, and landing it means git reads that content on the
//! host. So merges, picks and squashes are computed on objects alone by the [`engine`]: `git
//! merge-tree --write-tree` and `git commit-tree` in a bare git dir agentbox makes for the purpose,
//! with agentbox's configuration and no system or global one. Nothing is checked out, so no filter
//! runs; no hook runs; and since that configuration defines no merge driver, the only drivers any
//! `.gitattributes` can select are git's built-in ones (`text`, `binary`, `union`). Attributes are
//! read from the target's tip, the content the user already accepted, never from the task's own
//! changes. Two opt-ins widen this, both the user's decision: `--merge-drivers` computes the merge
//! with the repository's own configuration (its `merge.<driver>.driver` commands, selected by the
//! target's attributes), and `--run-hooks` runs the repository's hooks in a temporary worktree
//! agentbox owns ([`hooks`]).
//!
//! The target branch moves only by a compare-and-swap fast-forward (`git update-ref <new> <old>`);
//! a checkout of it is brought along only when it is clean ([`target`]).

pub mod conflicts;
pub mod engine;
pub mod hooks;
pub mod merge;
pub mod queue;
pub mod review;
pub mod target;

use std::path::PathBuf;

use crate::git::snapshot::{self, LiveObjects, LiveTree, Staging};
use crate::git::{GitError, TaskDirs};
use crate::state::StateError;
use crate::task::{TaskName, TaskRecord};
use crate::teardown::DEFAULT_MAX_SNAPSHOT_FILE;
use crate::workspace::Workspace;

/// The oldest git whose `merge-tree` does all that landing needs: `--write-tree` (2.38),
/// `--merge-base` and `--stdin` (2.40).
pub const MIN_GIT: (u32, u32) = (2, 40);

#[derive(Debug, thiserror::Error)]
pub enum LandError {
    #[error(
        "agentbox {command} needs git {}.{} or newer (for `git merge-tree --write-tree` with --stdin and --merge-base); the git on PATH is {}.{}",
        MIN_GIT.0, MIN_GIT.1, have.0, have.1
    )]
    GitTooOld {
        command: &'static str,
        have: (u32, u32),
    },
    #[error(
        "no task named {task} and no branch agentbox/{task} in this repository (see `agentbox ls`)"
    )]
    UnknownTask { task: TaskName },
    #[error(
        "task {task} has no branch agentbox/{task} (it changed nothing, or the branch was deleted)"
    )]
    NoBranch { task: TaskName },
    #[error(
        "task {task} is still running and its branch moves as it works; wait for it (`agentbox wait {task}`) or stop it (`agentbox stop {task}`) first"
    )]
    Running { task: TaskName },
    #[error(
        "the supervisor of task {task} died before its work was all on its branch; `agentbox gc` brings it there first"
    )]
    Orphaned { task: TaskName },
    #[error(
        "task {task} started from {base}, which is not a branch of this repository; name the branch to land on with --into BRANCH"
    )]
    NoTargetBranch { task: TaskName, base: String },
    #[error("there is no branch {branch} in {}", repo.display())]
    NoSuchBranch { branch: String, repo: PathBuf },
    #[error(
        "landing task {task} on {target} conflicts in {}; nothing was changed",
        files.join(", ")
    )]
    Conflict {
        task: TaskName,
        target: String,
        files: Vec<String>,
    },
    #[error(
        "cannot fast-forward {target} to agentbox/{task}: {target} has commits the task does not; land it with a merge (the default), --rebase or --squash"
    )]
    NotFastForward { task: TaskName, target: String },
    #[error(
        "branch {target} is checked out in {} with uncommitted changes; commit or stash them there first (or land on another branch with --into); nothing was changed",
        worktree.display()
    )]
    DirtyTarget { target: String, worktree: PathBuf },
    #[error("cannot bring the checkout {} along to the new {target}: {reason}; nothing was changed", worktree.display())]
    CheckoutInTheWay {
        target: String,
        worktree: PathBuf,
        reason: String,
    },
    #[error(
        "branch {target} moved while agentbox was landing task {task} (it was at {expected}); nothing was changed, try again"
    )]
    TargetMoved {
        task: TaskName,
        target: String,
        expected: String,
    },
    #[error(
        "the {hook} hook refused to land task {task} (exit code {code}){}; nothing was changed",
        hook_output(output)
    )]
    HookRefused {
        task: TaskName,
        hook: String,
        code: i32,
        output: String,
    },
    #[error(
        "{} is a bare repository: apply needs a checkout to put the changes into; run it in one of its worktrees",
        repo.display()
    )]
    NoCheckout { repo: PathBuf },
    #[error("applying task {task} to the checkout {} would overwrite changes there: {reason}; nothing was changed", worktree.display())]
    ApplyInTheWay {
        task: TaskName,
        worktree: PathBuf,
        reason: String,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    State(#[from] StateError),
}

fn hook_output(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// Fails unless the git on `PATH` is at least [`MIN_GIT`].
pub async fn require_git(command: &'static str) -> Result<(), LandError> {
    let have = crate::git::command::version().await?;
    if have < MIN_GIT {
        return Err(LandError::GitTooOld { command, have });
    }
    Ok(())
}

/// A task as the land commands see it: its record (when agentbox still has one) and its branch.
#[derive(Debug, Clone)]
pub struct TaskWork {
    pub task: TaskName,
    pub branch: String,
    pub record: Option<TaskRecord>,
    /// The branch's tip; `None` when the task has no branch.
    pub tip: Option<gix::ObjectId>,
    /// Whether a supervisor runs the task now.
    pub supervised: bool,
}

impl TaskWork {
    /// Looks the task up: its record, or at least its branch.
    pub fn find(ws: &Workspace, task: &TaskName) -> Result<Self, LandError> {
        let record = ws.state.read(task)?;
        let branch = task.branch();
        let tip = ws.repo.branch_tip(&branch)?;
        if record.is_none() && tip.is_none() {
            return Err(LandError::UnknownTask { task: task.clone() });
        }
        let supervised = record.is_some() && ws.state.is_supervised(task)?;
        Ok(Self {
            task: task.clone(),
            branch,
            record,
            tip,
            supervised,
        })
    }

    /// The task's state as `ls` names it (`branch` when agentbox forgot the task).
    pub fn state(&self) -> String {
        match &self.record {
            Some(r) if r.state.is_active() && !self.supervised => "orphaned".into(),
            Some(r) => r.state.as_str().into(),
            None => "branch".into(),
        }
    }

    /// The tip of a task that has ended, for landing: a running task's branch still moves.
    pub fn finished_tip(&self) -> Result<gix::ObjectId, LandError> {
        if self.supervised {
            return Err(LandError::Running {
                task: self.task.clone(),
            });
        }
        if self.record.as_ref().is_some_and(|r| r.state.is_active()) {
            return Err(LandError::Orphaned {
                task: self.task.clone(),
            });
        }
        self.tip.ok_or_else(|| LandError::NoBranch {
            task: self.task.clone(),
        })
    }

    /// The task's worktree with its git dirs, while they exist (the task runs, or was kept).
    pub fn live_dirs(&self, ws: &Workspace) -> Option<TaskDirs> {
        let record = self.record.as_ref()?;
        let dirs = ws.dirs_of(record);
        (dirs.worktree.is_dir() && dirs.start_commit().is_some()).then_some(dirs)
    }

    /// The worktree as it is now, committed or not; `None` when there is no worktree any more.
    pub async fn live_tree(
        &self,
        ws: &Workspace,
        into: LiveObjects,
    ) -> Result<Option<LiveTree>, LandError> {
        let (Some(dirs), Some(record)) = (self.live_dirs(ws), &self.record) else {
            return Ok(None);
        };
        let staging = Staging {
            own_files: &record.own_files,
            max_file_size: DEFAULT_MAX_SNAPSHOT_FILE,
        };
        match snapshot::live_tree(&ws.repo, &dirs, &staging, into).await {
            Ok(live) => Ok(Some(live)),
            // The task ended meanwhile and its teardown took the worktree: its branch has it all.
            Err(_) if !dirs.worktree.is_dir() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The commit the task started from (its fork point), when agentbox knows it.
    pub fn base_commit(&self) -> Option<gix::ObjectId> {
        self.record.as_ref()?.base_commit.parse().ok()
    }
}

/// `abc1234`: a commit as people read it.
pub fn short(id: &gix::ObjectId) -> String {
    id.to_hex_with_len(7).to_string()
}
