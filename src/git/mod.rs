//! Git for agentbox: the host repository (found and read through gix), each task's own git dir
//! ([`task_dirs`]), bringing a task's commits into the host repository ([`import`]) and committing
//! what a task left uncommitted ([`snapshot`]). The git CLI, with a pinned environment, does what gix
//! does not offer ([`command`]).
//!
//! # Guarded git
//!
//! A task never sees the host repository's git dir: it gets a git dir of its own, made and owned by
//! agentbox outside the repository, that borrows the repository's objects read-only and holds the
//! task's own refs, index and stash. Its configuration is agentbox's and read-only to the task. While
//! the task runs and when it ends, agentbox imports its branch into the repository's
//! `agentbox/<task>` with `git fetch` and fsck, never running git with the task's git dir: every byte
//! the task could write is data to the host, never configuration, hooks or a git dir to obey.

pub mod command;
pub mod import;
pub mod snapshot;
pub mod task_dirs;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use command::Git;
pub use task_dirs::TaskDirs;

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
    #[error("`git {args}` in {} did not finish within {}s and was stopped", dir.display(), limit.as_secs())]
    TimedOut {
        args: String,
        dir: PathBuf,
        limit: Duration,
    },
    #[error("the repository {} has no commits yet; commit something first", repo.display())]
    NoCommits { repo: PathBuf },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Guard(#[from] crate::fs_guard::GuardError),
    #[error(
        "the git dir of task {task} ({}) was tampered with: {what}; agentbox keeps it and the worktree as they are",
        git_dir.display()
    )]
    Tampered {
        task: String,
        git_dir: PathBuf,
        what: String,
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

    /// The git CLI in this repository.
    pub fn git(&self) -> Git {
        Git::host(&self.repo_dir)
    }

    /// The repository's object directory, which every task reads (read-only) through its own git dir.
    pub fn objects_dir(&self) -> PathBuf {
        self.common_dir.join("objects")
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
        let id = match repo.rev_parse_single(rev) {
            Ok(id) => id,
            Err(_) if !self.has_commits() => {
                return Err(GitError::NoCommits {
                    repo: self.repo_dir.clone(),
                });
            }
            Err(e) => return Err(bad(e.to_string())),
        };
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

    /// The contents of the regular file `path` in the tree of `commit`, or `None` if there is no
    /// such file; a symlink, a directory or a file larger than `max` bytes is an error.
    pub fn read_file_at(
        &self,
        commit: gix::ObjectId,
        path: &str,
        max: usize,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let Some((id, mode)) = self.entry_at(commit, path)? else {
            return Ok(None);
        };
        if !mode.is_blob() {
            return Err(
                self.read_error(path, "it is not a regular file (a symlink or a directory)")
            );
        }
        let repo = self.local();
        let header = repo.find_header(id).map_err(|e| self.read_error(path, e))?;
        if header.size() > max as u64 {
            return Err(self.read_error(path, format!("it is larger than {max} bytes")));
        }
        let object = repo.find_object(id).map_err(|e| self.read_error(path, e))?;
        Ok(Some(object.detach().data))
    }

    /// The id and mode of `path` (a file or a directory; `` is the root) in the tree of `commit`.
    pub fn entry_at(
        &self,
        commit: gix::ObjectId,
        path: &str,
    ) -> Result<Option<(gix::ObjectId, gix::object::tree::EntryMode)>, GitError> {
        let repo = self.local();
        let what = format!("{commit}:{path}");
        let tree = repo
            .find_commit(commit)
            .and_then(|c| c.tree())
            .map_err(|e| self.read_error(&what, e))?;
        if path.is_empty() {
            return Ok(Some((tree.id, gix::object::tree::EntryKind::Tree.into())));
        }
        let entry = tree
            .lookup_entry_by_path(path)
            .map_err(|e| self.read_error(&what, e))?;
        Ok(entry.map(|e| (e.object_id(), e.mode())))
    }

    /// Every file and symlink under the directory `dir` of `commit`'s tree, with paths relative to
    /// `dir`, in tree order. Reading stops with an error past `max_bytes` of contents.
    pub fn files_under(
        &self,
        commit: gix::ObjectId,
        dir: &str,
        max_bytes: u64,
    ) -> Result<Vec<TreeFile>, GitError> {
        let what = format!("{commit}:{dir}");
        let Some((id, mode)) = self.entry_at(commit, dir)? else {
            return Err(self.read_error(&what, "no such directory"));
        };
        if !mode.is_tree() {
            return Err(self.read_error(&what, "it is not a directory"));
        }
        let repo = self.local();
        let tree = repo.find_tree(id).map_err(|e| self.read_error(&what, e))?;
        let mut recorder = gix::traverse::tree::Recorder::default();
        tree.traverse()
            .breadthfirst(&mut recorder)
            .map_err(|e| self.read_error(&what, e))?;
        let mut files = Vec::new();
        let mut total = 0u64;
        for entry in recorder.records {
            if entry.mode.is_tree() || entry.mode.is_commit() {
                continue;
            }
            let object = repo
                .find_object(entry.oid)
                .map_err(|e| self.read_error(&what, e))?;
            total += object.data.len() as u64;
            if total > max_bytes {
                return Err(self.read_error(
                    &what,
                    format!("its files are larger than {max_bytes} bytes in all"),
                ));
            }
            files.push(TreeFile {
                path: entry.filepath.to_string(),
                executable: entry.mode.is_executable(),
                symlink: entry.mode.is_link(),
                data: object.detach().data,
            });
        }
        Ok(files)
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

    /// The repository's line-ending and case settings, which a task's git dir repeats so that the
    /// task sees its files as the user does.
    pub fn portable_settings(&self) -> Vec<(&'static str, String)> {
        let repo = self.local();
        let config = repo.config_snapshot();
        [
            "autocrlf",
            "eol",
            "ignorecase",
            "precomposeunicode",
            "safecrlf",
        ]
        .into_iter()
        .filter_map(|key| {
            let value = config.string(format!("core.{key}").as_str())?.to_string();
            let plain = value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            plain.then_some((key, value))
        })
        .collect()
    }

    /// Whether the checkout agentbox was started in has changes to tracked files (staged or not)
    /// that a task, starting from a commit, would not see. `false` in a bare repository.
    pub async fn checkout_is_dirty(&self) -> Result<bool, GitError> {
        let Some(workdir) = &self.workdir else {
            return Ok(false);
        };
        let out = Git::host(workdir)
            .run(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--ignore-submodules=all",
            ])
            .await?;
        Ok(!out.stdout.is_empty())
    }

    /// Whether any branch or tag of the repository names a commit (a fresh `git init` has none).
    pub fn has_commits(&self) -> bool {
        let repo = self.local();
        let Ok(platform) = repo.references() else {
            return false;
        };
        let Ok(mut all) = platform.all() else {
            return false;
        };
        all.any(|r| r.is_ok())
    }

    /// Whether `ancestor` is reachable from `descendant` (a commit is its own ancestor).
    pub fn is_ancestor(
        &self,
        ancestor: gix::ObjectId,
        descendant: gix::ObjectId,
    ) -> Result<bool, GitError> {
        if ancestor == descendant {
            return Ok(true);
        }
        Ok(self.merge_base(ancestor, descendant)? == Some(ancestor))
    }

    /// The tree of a commit and the first line of its message.
    pub fn tree_and_subject(
        &self,
        commit: gix::ObjectId,
    ) -> Result<(gix::ObjectId, String), GitError> {
        let repo = self.local();
        let what = commit.to_string();
        let commit = repo
            .find_commit(commit)
            .map_err(|e| self.read_error(&what, e))?;
        let tree = commit.tree_id().map_err(|e| self.read_error(&what, e))?;
        let message = commit.message_raw_sloppy().to_string();
        let subject = message.lines().next().unwrap_or_default().to_owned();
        Ok((tree.detach(), subject))
    }

    /// Whether the repository holds the object.
    pub fn has_object(&self, id: gix::ObjectId) -> bool {
        self.local().has_object(id)
    }

    /// What kind of object `id` is; `None` when the repository does not have it.
    pub fn object_kind(&self, id: gix::ObjectId) -> Option<gix::object::Kind> {
        self.local()
            .find_header(id)
            .ok()
            .map(|header| header.kind())
    }

    /// The branches, tags and remote-tracking branches a task may read (`git log main` inside),
    /// as `(full name, target)` pairs sorted by name; symbolic refs and `except` are left out.
    pub fn refs_for_tasks(&self, except: &str) -> Result<Vec<(String, gix::ObjectId)>, GitError> {
        let repo = self.local();
        let platform = repo
            .references()
            .map_err(|e| self.read_error("references", e))?;
        let mut refs = Vec::new();
        for prefix in ["refs/heads/", "refs/remotes/", "refs/tags/"] {
            let iter = platform
                .prefixed(prefix)
                .map_err(|e| self.read_error("references", e))?;
            for reference in iter {
                let reference = reference.map_err(|e| self.read_error("references", e))?;
                let name = reference.name().as_bstr().to_string();
                if name == except {
                    continue;
                }
                if let Some(id) = reference.target().try_id() {
                    refs.push((name, id.to_owned()));
                }
            }
        }
        refs.sort();
        Ok(refs)
    }

    /// Names of the refs under `prefix` (`refs/agentbox/<task>/previous/`).
    pub fn ref_names(&self, prefix: &str) -> Result<Vec<String>, GitError> {
        let repo = self.local();
        let platform = repo
            .references()
            .map_err(|e| self.read_error("references", e))?;
        let iter = platform
            .prefixed(prefix)
            .map_err(|e| self.read_error("references", e))?;
        iter.map(|r| {
            r.map(|r| r.name().as_bstr().to_string())
                .map_err(|e| self.read_error("references", e))
        })
        .collect()
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

/// A file of a tree, read by [`Repo::files_under`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Relative to the directory that was read, `/`-separated.
    pub path: String,
    pub executable: bool,
    /// `data` is the link's target.
    pub symlink: bool,
    pub data: Vec<u8>,
}
