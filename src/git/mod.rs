//! The host repository: finding it, reading refs and identity (gix), and the worktree and commit steps
//! that gix does not offer yet (the git CLI, see [`cli`]).

mod cli;

use std::path::{Path, PathBuf};

pub use cli::{GitCli, WorktreeEntry};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{} is not inside a git repository ({reason}); run agentbox inside one or pass --repo", path.display())]
    NotARepository { path: PathBuf, reason: String },
    #[error("cannot resolve {path}: {source}", path = path.display())]
    Canonicalize {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("base {rev:?} does not name a commit in {}: {reason}", repo.display())]
    BadRevision {
        rev: String,
        repo: PathBuf,
        reason: String,
    },
    #[error("cannot read {what} in {}: {reason}", repo.display())]
    Read {
        what: String,
        repo: PathBuf,
        reason: String,
    },
    #[error("`git {args}` failed in {}: {stderr}", dir.display())]
    Command {
        args: String,
        dir: PathBuf,
        stderr: String,
    },
    #[error("cannot take the worktree lock {}: {source}", path.display())]
    WorktreeLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run git (is it installed and on PATH?): {0}")]
    Spawn(#[source] std::io::Error),
}

/// Author identity for commits made in a task, from the host's git configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub email: String,
}

impl Identity {
    /// Used only when the host configures no identity, so a task's `git commit` and agentbox's
    /// snapshot commit still succeed.
    pub fn fallback() -> Self {
        Self {
            name: "agentbox".into(),
            email: "agentbox@localhost".into(),
        }
    }
}

/// The host repository, normal clone or bare, seen from any of its worktrees.
#[derive(Debug, Clone)]
pub struct Repo {
    /// The git common dir (`proj/.git` or `proj.git`), absolute and canonical: it is bind-mounted at
    /// this same path inside containers.
    pub common_dir: PathBuf,
    /// The main worktree of a normal clone, or the bare repository itself.
    pub repo_dir: PathBuf,
    /// The repository's name: its directory name without `.git`.
    pub name: String,
    /// The checkout agentbox was started in (`None` in a bare repository): the source of files
    /// copied into new worktrees and of `agentbox.toml`.
    pub workdir: Option<PathBuf>,
    /// Opened on the worktree that discovery started from, so `HEAD` means that worktree's HEAD.
    gix: gix::ThreadSafeRepository,
}

impl Repo {
    pub fn discover(start: &Path) -> Result<Self, GitError> {
        let repo = gix::discover(start).map_err(|e| GitError::NotARepository {
            path: start.to_owned(),
            reason: e.to_string(),
        })?;
        let canonical = |path: &Path| {
            path.canonicalize()
                .map_err(|source| GitError::Canonicalize {
                    path: path.to_owned(),
                    source,
                })
        };
        let common_dir = canonical(repo.common_dir())?;
        let workdir = repo.workdir().map(canonical).transpose()?;
        let repo_dir = if common_dir.file_name().is_some_and(|n| n == ".git") {
            common_dir.parent().unwrap_or(&common_dir).to_owned()
        } else {
            common_dir.clone()
        };
        let dir_name = repo_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "repo".into());
        let name = dir_name
            .strip_suffix(".git")
            .unwrap_or(&dir_name)
            .to_owned();
        Ok(Self {
            common_dir,
            repo_dir,
            name,
            workdir,
            gix: repo.into_sync(),
        })
    }

    /// The git CLI without worktree serialisation; [`Workspace::git`](crate::Workspace::git) adds it.
    pub(crate) fn cli(&self) -> GitCli {
        GitCli::new(self.repo_dir.clone())
    }

    fn local(&self) -> gix::Repository {
        self.gix.to_thread_local()
    }

    fn read_error(&self, what: &str, reason: impl ToString) -> GitError {
        GitError::Read {
            what: what.to_owned(),
            repo: self.repo_dir.clone(),
            reason: reason.to_string(),
        }
    }

    /// Resolves `rev` (as the user wrote it: `HEAD`, a branch, a tag, a commit id) to a commit.
    pub fn resolve_commit(&self, rev: &str) -> Result<gix::ObjectId, GitError> {
        let repo = self.local();
        let bad = |reason: String| GitError::BadRevision {
            rev: rev.to_owned(),
            repo: self.repo_dir.clone(),
            reason,
        };
        let id = repo.rev_parse_single(rev).map_err(|e| bad(e.to_string()))?;
        let commit = id
            .object()
            .and_then(|o| o.peel_to_commit())
            .map_err(|e| bad(e.to_string()))?;
        Ok(commit.id)
    }

    /// The branch checked out where discovery started (`main`), or `HEAD` when it is detached: how
    /// the default base is named to the user.
    pub fn head_name(&self) -> String {
        let repo = self.local();
        match repo.head_name() {
            Ok(Some(name)) => name.shorten().to_string(),
            _ => "HEAD".to_owned(),
        }
    }

    /// The contents of `path` in the tree of HEAD, or `None` if there is no such file.
    pub fn read_head_file(&self, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let repo = self.local();
        let spec = format!("HEAD:{path}");
        let Ok(id) = repo.rev_parse_single(spec.as_str()) else {
            return Ok(None);
        };
        let object = id.object().map_err(|e| self.read_error(&spec, e))?;
        Ok(Some(object.detach().data))
    }

    /// The commit a local branch points to, or `None` if there is no such branch.
    pub fn branch_tip(&self, branch: &str) -> Result<Option<gix::ObjectId>, GitError> {
        let repo = self.local();
        let full = format!("refs/heads/{branch}");
        let reference = repo
            .try_find_reference(full.as_str())
            .map_err(|e| self.read_error(&full, e))?;
        match reference {
            None => Ok(None),
            Some(mut r) => r
                .peel_to_id()
                .map(|id| Some(id.detach()))
                .map_err(|e| self.read_error(&full, e)),
        }
    }

    pub fn merge_base(
        &self,
        one: gix::ObjectId,
        two: gix::ObjectId,
    ) -> Result<Option<gix::ObjectId>, GitError> {
        let repo = self.local();
        repo.merge_base(one, two)
            .map(|id| id.map(gix::Id::detach))
            .map_err(|e| self.read_error("merge base", e))
    }

    /// How many commits `tip` has that `base` does not.
    pub fn commits_ahead(
        &self,
        base: gix::ObjectId,
        tip: gix::ObjectId,
    ) -> Result<usize, GitError> {
        let repo = self.local();
        let walk = repo
            .rev_walk([tip])
            .with_hidden([base])
            .all()
            .map_err(|e| self.read_error("history", e))?;
        let mut count = 0;
        for info in walk {
            info.map_err(|e| self.read_error("history", e))?;
            count += 1;
        }
        Ok(count)
    }

    /// The host's configured author identity, if it has one.
    pub fn identity(&self) -> Option<Identity> {
        let repo = self.local();
        let signature = repo.author()?.ok()?;
        Some(Identity {
            name: signature.name.to_string(),
            email: signature.email.to_string(),
        })
    }

    /// Where a linked worktree's administrative files live inside the common dir.
    pub fn worktree_admin_dir(&self, worktree_name: &str) -> PathBuf {
        self.common_dir.join("worktrees").join(worktree_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn seeded(tmp: &Path) -> PathBuf {
        let dir = tmp.join("proj");
        std::fs::create_dir(&dir).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        git(&dir, &["commit", "-q", "--allow-empty", "-m", "one"]);
        git(&dir, &["commit", "-q", "--allow-empty", "-m", "two"]);
        dir
    }

    #[test]
    fn discovers_normal_clone_from_a_subdirectory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = seeded(tmp.path());
        std::fs::create_dir(dir.join("sub")).unwrap();
        let repo = Repo::discover(&dir.join("sub")).unwrap();
        let dir = dir.canonicalize().unwrap();
        assert_eq!(repo.repo_dir, dir);
        assert_eq!(repo.common_dir, dir.join(".git"));
        assert_eq!(repo.name, "proj");
    }

    #[test]
    fn discovers_bare_repo_and_names_it_without_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = seeded(tmp.path());
        git(
            tmp.path(),
            &["clone", "-q", "--bare", dir.to_str().unwrap(), "proj.git"],
        );
        let repo = Repo::discover(&tmp.path().join("proj.git")).unwrap();
        assert_eq!(repo.name, "proj");
        assert_eq!(repo.repo_dir, repo.common_dir);
    }

    #[test]
    fn resolves_revisions_and_counts_history() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = seeded(tmp.path());
        let repo = Repo::discover(&dir).unwrap();
        let head = repo.resolve_commit("HEAD").unwrap();
        let first = repo.resolve_commit("HEAD~1").unwrap();
        assert_eq!(repo.branch_tip("main").unwrap(), Some(head));
        assert_eq!(repo.head_name(), "main");
        assert_eq!(repo.branch_tip("nope").unwrap(), None);
        assert_eq!(repo.commits_ahead(first, head).unwrap(), 1);
        assert_eq!(repo.merge_base(first, head).unwrap(), Some(first));
        let err = repo.resolve_commit("nosuchref").unwrap_err();
        assert!(err.to_string().contains("\"nosuchref\""), "{err}");
    }

    #[test]
    fn outside_a_repository_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Repo::discover(tmp.path()).unwrap_err();
        assert!(
            err.to_string().contains("not inside a git repository"),
            "{err}"
        );
    }
}
