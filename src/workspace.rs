//! A repository together with agentbox's place for its tasks: the state dir and the worktree root.

use std::path::{Path, PathBuf};

use crate::git::{GitError, Repo};
use crate::state::{StateDir, repo_id};
use crate::task::TaskName;

#[derive(Debug, Clone)]
pub struct Workspace {
    pub repo: Repo,
    pub state: StateDir,
    /// The identifier used in container names, labels and the state dir's path.
    pub repo_id: String,
    worktree_root: PathBuf,
}

impl Workspace {
    /// Discovers the repository from `start`. `state_home` is `$XDG_STATE_HOME` (or its default);
    /// `worktree_root` overrides where task worktrees go.
    pub fn open(
        start: &Path,
        state_home: &Path,
        worktree_root: Option<&Path>,
    ) -> Result<Self, GitError> {
        let repo = Repo::discover(start)?;
        let repo_id = repo_id(&repo.name, &repo.common_dir);
        let state = StateDir::new(state_home, &repo_id);
        let worktree_root = match worktree_root {
            Some(root) if root.is_absolute() => root.to_owned(),
            Some(root) => std::path::absolute(root).unwrap_or_else(|_| root.to_owned()),
            None => default_worktree_root(&repo),
        };
        Ok(Self {
            repo,
            state,
            repo_id,
            worktree_root,
        })
    }

    /// Where the task's worktree goes: beside the repository, never inside the user's own working
    /// tree (where it would show up as untracked files).
    pub fn worktree_path(&self, task: &TaskName) -> PathBuf {
        self.worktree_root.join(task.as_str())
    }

    pub fn container_name(&self, task: &TaskName) -> String {
        format!("agentbox-{}-{task}", self.repo_id)
    }
}

/// `<dir containing the repo>/.agentbox-worktrees/<repo name>`: next to a bare `project.git` with its
/// worktrees, or next to a normal clone, and separate per repository.
fn default_worktree_root(repo: &Repo) -> PathBuf {
    let parent = repo.repo_dir.parent().unwrap_or(&repo.repo_dir);
    parent.join(".agentbox-worktrees").join(&repo.name)
}
