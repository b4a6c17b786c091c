//! A repository together with agentbox's place for its tasks: the state dir and the worktree root.

use std::path::{Path, PathBuf};

use crate::config::{CONFIG_FILE, ConfigError, ProjectConfig};
use crate::git::{GitError, Repo, TaskDirs};
use crate::ports::PortLedger;
use crate::state::{StateDir, repo_id};
use crate::task::TaskName;

#[derive(Debug, Clone)]
pub struct Workspace {
    pub repo: Repo,
    pub state: StateDir,
    /// The identifier used in container names, labels and the state dir's path.
    pub repo_id: String,
    /// The machine-wide ledger of host ports.
    pub ports: PortLedger,
    worktree_root: PathBuf,
}

impl Workspace {
    /// Discovers the repository from `start`. `state_home` is `$XDG_STATE_HOME` (or its default).
    pub fn open(start: &Path, state_home: &Path) -> Result<Self, GitError> {
        let repo = Repo::discover(start)?;
        let repo_id = repo_id(&repo.name, &repo.common_dir);
        let state = StateDir::new(state_home, &repo_id);
        let worktree_root = default_worktree_root(&repo);
        Ok(Self {
            repo,
            state,
            repo_id,
            ports: PortLedger::new(state_home),
            worktree_root,
        })
    }

    /// Puts task worktrees under `root`; a relative `root` is taken from `relative_to`.
    pub fn set_worktree_root(&mut self, root: &Path, relative_to: &Path) {
        self.worktree_root = lexically_normal(&relative_to.join(root));
    }

    /// The root the project's relative paths (`worktree_root`, `copy`) start from: the checkout
    /// agentbox was started in, or the bare repository.
    pub fn project_root(&self) -> &Path {
        self.repo.workdir.as_deref().unwrap_or(&self.repo.repo_dir)
    }

    /// Reads `agentbox.toml` from the checkout agentbox was started in; in a bare repository, from
    /// the tree of HEAD. No file is an empty configuration.
    pub fn load_config(&self) -> Result<ProjectConfig, ConfigError> {
        match &self.repo.workdir {
            Some(workdir) => ProjectConfig::load(&workdir.join(CONFIG_FILE)),
            None => {
                let shown = self.repo.repo_dir.join(format!("HEAD:{CONFIG_FILE}"));
                let bytes =
                    self.repo
                        .read_head_file(CONFIG_FILE)
                        .map_err(|e| ConfigError::Invalid {
                            path: shown.clone(),
                            message: e.to_string(),
                        })?;
                match bytes {
                    None => Ok(ProjectConfig::default()),
                    Some(bytes) => ProjectConfig::parse(&String::from_utf8_lossy(&bytes), &shown),
                }
            }
        }
    }

    /// The directory the tasks' worktrees go in.
    pub fn worktree_root(&self) -> &Path {
        &self.worktree_root
    }

    /// Where the task's worktree goes: beside the repository, never inside the user's own working
    /// tree (where it would show up as untracked files).
    pub fn worktree_path(&self, task: &TaskName) -> PathBuf {
        self.worktree_root.join(task.as_str())
    }

    /// Where the task's worktree (at `worktree`, as its record says) and its git dirs are.
    pub fn task_dirs(&self, task: &TaskName, worktree: &Path) -> TaskDirs {
        TaskDirs {
            worktree: worktree.to_owned(),
            git_dir: self.state.task_git_dir(task),
            scratch: self.state.scratch_dir(task),
            branch: task.branch(),
            alias: None,
        }
    }

    /// Where a task's directories are, as its record says: a task that took a pool slot keeps the
    /// slot's (see [`Workspace::pooled_task_dirs`]).
    pub fn dirs_of(&self, record: &crate::task::TaskRecord) -> TaskDirs {
        match &record.pool_slot {
            Some(slot) => TaskDirs {
                worktree: record.worktree.clone(),
                ..self.pooled_task_dirs(&record.name, slot)
            },
            None => self.task_dirs(&record.name, &record.worktree),
        }
    }

    /// The directories of pool slot `slot`: a worktree beside the tasks' (`.pool-<id>`, no task
    /// name starts with a dot), its git dir and its scratch dir, on branch `agentbox-pool/<id>`.
    pub fn slot_dirs(&self, slot: &str) -> TaskDirs {
        let name = format!(".pool-{slot}");
        TaskDirs {
            worktree: self.worktree_root.join(&name),
            git_dir: self.state.git_dirs_root().join(&name),
            scratch: self.state.scratch_root().join(&name),
            branch: format!("agentbox-pool/{slot}"),
            alias: None,
        }
    }

    /// The directories of a task that took pool slot `slot`. Its container was made with the
    /// slot's paths mounted at the same paths, so the task keeps them: paths inside and outside the
    /// container stay the same, and so does the `gitdir:` of the worktree's `.git` file. Its usual
    /// worktree path is a link to the slot's worktree.
    pub fn pooled_task_dirs(&self, task: &TaskName, slot: &str) -> TaskDirs {
        TaskDirs {
            branch: task.branch(),
            alias: Some(self.worktree_path(task)),
            ..self.slot_dirs(slot)
        }
    }

    pub fn container_name(&self, task: &TaskName) -> String {
        format!("agentbox-{}-{task}", self.repo_id)
    }

    /// The network the repository's tasks without services share (see [`crate::runtime::NetworkSpec`]).
    pub fn shared_network_name(&self) -> String {
        format!("agentbox-{}--isolated", self.repo_id)
    }
}

/// Resolves `.` and `..` without touching the filesystem: the worktree path is mounted at the same
/// path inside containers, where `..` must not appear.
fn lexically_normal(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// `<dir containing the repo>/.agentbox-worktrees/<repo name>`: next to a bare `project.git` with its
/// worktrees, or next to a normal clone, and separate per repository.
fn default_worktree_root(repo: &Repo) -> PathBuf {
    let parent = repo.repo_dir.parent().unwrap_or(&repo.repo_dir);
    parent
        .join(crate::git::task_dirs::DEFAULT_WORKTREES_DIR)
        .join(&repo.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worktree_roots_are_normalised_for_mounting() {
        assert_eq!(
            lexically_normal(Path::new("/src/proj/../.agentbox-worktrees/./x")),
            PathBuf::from("/src/.agentbox-worktrees/x")
        );
    }
}
