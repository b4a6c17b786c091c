//! The steps gix does not offer yet (worktree add/remove, staging with ignore rules, committing with
//! hooks disabled), done by the git CLI with a pinned environment: C locale, no terminal prompts, no
//! stdin, and none of the `GIT_*` variables that would point git at another repository.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::{GitError, Identity};

/// Variables that would redirect git away from the repository we name, for instance when agentbox is
/// itself started from a git hook.
const REDIRECTING_VARS: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
];

/// How often a step that lost a race for one of git's lock files is tried again.
const LOCK_RETRIES: u32 = 8;

#[derive(Debug, Clone)]
pub struct GitCli {
    repo_dir: PathBuf,
    /// Held while worktrees are added, removed, listed or pruned: git itself races there (one
    /// `worktree add` reading another's half-written metadata fails with "failed to read
    /// .../commondir"), so agentbox's processes take turns.
    worktree_lock: Option<PathBuf>,
}

/// Output of a git command that succeeded.
struct Output {
    stdout: Vec<u8>,
}

impl GitCli {
    pub fn new(repo_dir: PathBuf) -> Self {
        Self {
            repo_dir,
            worktree_lock: None,
        }
    }

    /// Serialises worktree administration through the lock file at `path` (outside every path a
    /// container can reach, so no task can hold it).
    pub fn with_worktree_lock(mut self, path: PathBuf) -> Self {
        self.worktree_lock = Some(path);
        self
    }

    async fn lock_worktrees(&self) -> Result<Option<std::fs::File>, GitError> {
        let Some(path) = self.worktree_lock.clone() else {
            return Ok(None);
        };
        let shown = path.clone();
        let lock = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            file.lock()?;
            Ok::<_, std::io::Error>(file)
        })
        .await
        .expect("taking a file lock does not panic");
        lock.map(Some).map_err(|source| GitError::WorktreeLock {
            path: shown,
            source,
        })
    }

    fn command(dir: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(dir).args(args);
        for var in REDIRECTING_VARS {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal is for agentbox to handle, and must not
            // kill the git that is committing a snapshot.
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    /// Runs git in `dir`, retrying with backoff when another git process held a lock file it needed
    /// (many tasks start in one repository at once).
    async fn run_in(&self, dir: &Path, args: &[&str]) -> Result<Output, GitError> {
        let mut delay = Duration::from_millis(20);
        for attempt in 0.. {
            let out = Self::command(dir, args)
                .output()
                .await
                .map_err(GitError::Spawn)?;
            if out.status.success() {
                return Ok(Output { stdout: out.stdout });
            }
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if attempt < LOCK_RETRIES && is_lock_contention(&stderr) {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(Duration::from_millis(500));
                continue;
            }
            return Err(GitError::Command {
                args: args.join(" "),
                dir: dir.to_owned(),
                stderr,
            });
        }
        unreachable!("the retry loop returns")
    }

    async fn run(&self, args: &[&str]) -> Result<Output, GitError> {
        self.run_in(&self.repo_dir, args).await
    }

    /// Checks out `branch` in a new worktree at `path`, creating the branch at `base` when given, and
    /// locks the worktree so that a `git worktree prune` run anywhere (for instance inside another
    /// task's container, where this path does not exist) cannot drop its metadata.
    ///
    /// Only the metadata is written while holding the worktree lock; the files are checked out
    /// after it is released, so tasks of a large repository still check out side by side.
    pub async fn add_worktree(
        &self,
        path: &Path,
        branch: &str,
        create_at: Option<&str>,
        lock_reason: &str,
    ) -> Result<(), GitError> {
        let shown = path.to_string_lossy();
        let mut args = vec![
            "worktree",
            "add",
            "--quiet",
            "--no-checkout",
            "--lock",
            "--reason",
            lock_reason,
        ];
        match create_at {
            Some(base) => args.extend(["-b", branch, &shown, base]),
            None => args.extend([&shown, branch]),
        }
        {
            let _turn = self.lock_worktrees().await?;
            self.run(&args).await?;
        }
        // The index of a `--no-checkout` worktree is empty; resetting it to HEAD writes every file.
        self.run_in(path, &["reset", "--hard", "--quiet"])
            .await
            .map(drop)
    }

    /// Removes a worktree (locked or not) and its metadata. Only call this after
    /// [`snapshot`](Self::snapshot): whatever is left uncommitted here is gone.
    pub async fn remove_worktree(&self, path: &Path) -> Result<(), GitError> {
        let _turn = self.lock_worktrees().await?;
        let path = path.to_string_lossy();
        self.run(&["worktree", "remove", "--force", "--force", &path])
            .await
            .map(drop)
    }

    /// Commits everything uncommitted in `worktree` (tracked changes and untracked files, minus what
    /// `.gitignore` excludes) as one commit, with hooks disabled so nothing of the task's runs on the
    /// host. Returns the new commit, or `None` when there was nothing to keep.
    ///
    /// `exclude` names paths agentbox itself put in the worktree (the env file, copied files): they
    /// are never part of a snapshot.
    pub async fn snapshot(
        &self,
        worktree: &Path,
        message: &str,
        identity: &Identity,
        exclude: &[String],
    ) -> Result<Option<String>, GitError> {
        let excludes: Vec<String> = exclude
            .iter()
            .map(|path| format!(":(exclude,literal){path}"))
            .collect();
        let mut status = vec!["status", "--porcelain", "--untracked-files=all", "--", "."];
        status.extend(excludes.iter().map(String::as_str));
        let status = self.run_in(worktree, &status).await?;
        if status.stdout.is_empty() {
            return Ok(None);
        }
        self.run_in(worktree, &["add", "--all"]).await?;
        if !exclude.is_empty() {
            // Unstage agentbox's own files again: back to HEAD's version if tracked, out of the
            // index if not. (`git add` with exclude pathspecs refuses ignored paths.)
            let mut reset = vec!["reset", "--quiet", "--"];
            reset.extend(exclude.iter().map(String::as_str));
            self.run_in(worktree, &reset).await?;
        }
        let name = format!("user.name={}", identity.name);
        let email = format!("user.email={}", identity.email);
        self.run_in(
            worktree,
            &[
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                &name,
                "-c",
                &email,
                "commit",
                "--quiet",
                "--no-verify",
                "--no-gpg-sign",
                "-m",
                message,
            ],
        )
        .await?;
        let head = self.run_in(worktree, &["rev-parse", "HEAD"]).await?;
        Ok(Some(
            String::from_utf8_lossy(&head.stdout).trim().to_owned(),
        ))
    }

    /// Deletes `branch` only if it still points at `expected`: a rollback must never drop commits made
    /// in the meantime.
    pub async fn delete_branch_if_at(&self, branch: &str, expected: &str) -> Result<(), GitError> {
        let full = format!("refs/heads/{branch}");
        self.run(&["update-ref", "-d", &full, expected])
            .await
            .map(drop)
    }

    /// Deletes `branch` whatever it holds; returns the commit it pointed to so the caller can say how
    /// to get it back.
    pub async fn delete_branch(&self, branch: &str) -> Result<String, GitError> {
        let full = format!("refs/heads/{branch}");
        let tip = self.run(&["rev-parse", "--verify", &full]).await?;
        let tip = String::from_utf8_lossy(&tip.stdout).trim().to_owned();
        self.run(&["update-ref", "-d", &full, &tip]).await?;
        Ok(tip)
    }

    /// Paths that differ between two commits.
    pub async fn changed_files(&self, from: &str, to: &str) -> Result<usize, GitError> {
        let out = self
            .run(&["diff", "--name-only", "-z", "--no-renames", from, to])
            .await?;
        Ok(out
            .stdout
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .count())
    }

    /// `git diff` of `to` (a commit, or the worktree at `dir` when `None`) against `from`.
    pub async fn diff(
        &self,
        dir: Option<&Path>,
        from: &str,
        to: Option<&str>,
        stat: bool,
    ) -> Result<Vec<u8>, GitError> {
        let mut args = vec!["diff", "--no-color", "--no-ext-diff"];
        if stat {
            args.push("--stat");
        }
        args.push(from);
        args.extend(to);
        let out = match dir {
            Some(dir) => self.run_in(dir, &args).await?,
            None => self.run(&args).await?,
        };
        Ok(out.stdout)
    }
}

fn is_lock_contention(stderr: &str) -> bool {
    stderr.contains(".lock': File exists")
        || stderr.contains("cannot lock ref")
        || stderr.contains("Unable to create") && stderr.contains(".lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_lock_contention() {
        assert!(is_lock_contention(
            "fatal: Unable to create '/r/.git/index.lock': File exists."
        ));
        assert!(is_lock_contention(
            "error: cannot lock ref 'refs/heads/agentbox/a': Unable to create lock"
        ));
        assert!(!is_lock_contention("fatal: invalid reference: nosuch"));
    }
}

/// One entry of `git worktree list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorktreeEntry {
    pub path: PathBuf,
    /// The full ref checked out (`refs/heads/agentbox/t`); `None` when detached or bare.
    pub branch: Option<String>,
    /// The lock reason (empty when locked without one); `None` when not locked.
    pub locked: Option<String>,
    /// Whether git considers the entry stale: its directory is gone.
    pub prunable: bool,
}

impl GitCli {
    /// Every worktree of the repository, the main one first.
    pub async fn list_worktrees(&self) -> Result<Vec<WorktreeEntry>, GitError> {
        let _turn = self.lock_worktrees().await?;
        let out = self.run(&["worktree", "list", "--porcelain", "-z"]).await?;
        Ok(parse_worktree_list(&out.stdout))
    }

    /// Drops the metadata of worktrees whose directory is gone: the entries [`list_worktrees`]
    /// marks `prunable` and not `locked` (the lock is what keeps a live task's entry safe from
    /// this, wherever it runs).
    ///
    /// [`list_worktrees`]: Self::list_worktrees
    pub async fn prune_worktrees(&self) -> Result<(), GitError> {
        let _turn = self.lock_worktrees().await?;
        self.run(&["worktree", "prune"]).await.map(drop)
    }
}

/// Parses `git worktree list --porcelain -z`: attributes separated by NUL, entries by an empty one.
fn parse_worktree_list(raw: &[u8]) -> Vec<WorktreeEntry> {
    let mut entries = Vec::new();
    let mut current: Option<WorktreeEntry> = None;
    for field in raw.split(|&b| b == 0) {
        let field = String::from_utf8_lossy(field);
        if field.is_empty() {
            entries.extend(current.take());
            continue;
        }
        let (key, value) = field.split_once(' ').unwrap_or((&field, ""));
        match (key, current.as_mut()) {
            ("worktree", _) => {
                entries.extend(current.take());
                current = Some(WorktreeEntry {
                    path: PathBuf::from(value),
                    branch: None,
                    locked: None,
                    prunable: false,
                });
            }
            ("branch", Some(entry)) => entry.branch = Some(value.to_owned()),
            ("locked", Some(entry)) => entry.locked = Some(value.to_owned()),
            ("prunable", Some(entry)) => entry.prunable = true,
            _ => {}
        }
    }
    entries.extend(current);
    entries
}

#[cfg(test)]
mod worktree_list_tests {
    use super::*;

    #[test]
    fn parses_worktree_list_porcelain_z() {
        let raw = b"worktree /r\0HEAD 1111\0branch refs/heads/main\0\0\
                    worktree /w/a b\0HEAD 2222\0branch refs/heads/agentbox/a\0\
                    locked agentbox task a is running\0\0\
                    worktree /w/gone\0HEAD 3333\0detached\0locked\0\
                    prunable gitdir file points to non-existent location\0\0";
        let entries = parse_worktree_list(raw);
        assert_eq!(entries.len(), 3, "{entries:?}");
        assert_eq!(entries[0].path, PathBuf::from("/r"));
        assert_eq!(entries[0].locked, None);
        assert_eq!(entries[1].path, PathBuf::from("/w/a b"));
        assert_eq!(entries[1].branch.as_deref(), Some("refs/heads/agentbox/a"));
        assert_eq!(
            entries[1].locked.as_deref(),
            Some("agentbox task a is running")
        );
        assert!(!entries[1].prunable);
        assert_eq!(entries[2].branch, None);
        assert_eq!(entries[2].locked.as_deref(), Some(""));
        assert!(entries[2].prunable);
    }
}
