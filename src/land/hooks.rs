//! `--run-hooks`: the repository's own hooks, run around a landing as git would run them around
//! the same merge, squash or rebase — in a temporary worktree of the repository that agentbox
//! makes at the target's tip (its index and files the result to be committed) and removes again.
//!
//! | mode | may refuse (before the target moves) | told afterwards |
//! |---|---|---|
//! | merge | `pre-merge-commit`, `prepare-commit-msg`, `commit-msg` | `post-merge` |
//! | squash | `pre-commit`, `prepare-commit-msg`, `commit-msg` | `post-commit` |
//! | rebase | `pre-rebase` | `post-rewrite` |
//! | ff-only | — | `post-merge` |
//!
//! Hooks are the repository's code and usually run the project's tools over the files, which are
//! the task's: asking for them says the task's work is trusted like a colleague's branch. So the
//! worktree is checked out with the repository's configuration (filters included).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::LandError;
use super::engine::Engine;
use super::merge::{Attempt, Mode};
use super::target::Target;
use crate::git::Git;
use crate::task::TaskName;
use crate::workspace::Workspace;

/// The hook that may refuse the commit of `mode`, before its message is asked for.
pub fn before_commit(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Merge => Some("pre-merge-commit"),
        Mode::Squash => Some("pre-commit"),
        Mode::Rebase | Mode::FfOnly => None,
    }
}

/// The hook told once the target moved.
pub fn after_landing(mode: Mode) -> &'static str {
    match mode {
        Mode::Merge | Mode::FfOnly => "post-merge",
        Mode::Squash => "post-commit",
        Mode::Rebase => "post-rewrite",
    }
}

/// A temporary worktree to run hooks in, removed when dropped.
#[derive(Debug)]
pub struct Hooks {
    mode: Mode,
    task_branch: String,
    target: Target,
    repo_dir: PathBuf,
    worktree: PathBuf,
}

impl Hooks {
    /// Makes the worktree, detached at the target's tip, nothing checked out yet.
    pub async fn start(
        ws: &Workspace,
        mode: Mode,
        task_branch: &str,
        target: &Target,
    ) -> Result<Self, LandError> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let worktree = ws
            .state
            .root()
            .join("land")
            .join(format!("hooks-{}-{n}", std::process::id()));
        if let Some(parent) = worktree.parent() {
            std::fs::create_dir_all(parent).map_err(|source| LandError::Io {
                action: "create",
                path: parent.to_owned(),
                source,
            })?;
        }
        let path = worktree.display().to_string();
        ws.repo
            .git()
            .run(&[
                "worktree",
                "add",
                "--detach",
                "--no-checkout",
                &path,
                &target.tip.to_string(),
            ])
            .await?;
        Ok(Self {
            mode,
            task_branch: task_branch.to_owned(),
            target: target.clone(),
            repo_dir: ws.repo.repo_dir.clone(),
            worktree,
        })
    }

    fn git(&self) -> Git {
        Git::host(&self.worktree).with_repository_hooks()
    }

    /// Runs `hook` with `args` (and `stdin` from a file); a missing hook is fine.
    async fn run(
        &self,
        task: &TaskName,
        hook: &str,
        args: &[&str],
        stdin: Option<&Path>,
    ) -> Result<(), LandError> {
        let to_stdin = stdin.map(|p| format!("--to-stdin={}", p.display()));
        let mut all = vec!["hook", "run", "--ignore-missing"];
        all.extend(to_stdin.as_deref());
        all.push(hook);
        if !args.is_empty() {
            all.push("--");
            all.extend(args);
        }
        let out = self.git().run_unchecked(&all, None).await?;
        if out.code == Some(0) {
            return Ok(());
        }
        let mut output = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.stderr.is_empty() {
            if !output.is_empty() {
                output.push('\n');
            }
            output.push_str(&out.stderr);
        }
        Err(LandError::HookRefused {
            task: task.clone(),
            hook: hook.to_owned(),
            code: out.code.unwrap_or(-1),
            output,
        })
    }

    /// Before the landing is worked out: `pre-rebase <target> <task branch>` for a rebase.
    pub async fn before_attempt(&self, task: &TaskName) -> Result<(), LandError> {
        if self.mode == Mode::Rebase {
            self.run(
                task,
                "pre-rebase",
                &[&self.target.branch, &self.task_branch],
                None,
            )
            .await?;
        }
        Ok(())
    }

    /// Checks the result out into the worktree (`HEAD` stays at the target's tip) and runs the
    /// hooks that may refuse it or change its message; a changed message makes the commit again.
    pub async fn check(
        &self,
        engine: &Engine,
        task: &TaskName,
        attempt: Attempt,
        message: &str,
    ) -> Result<Attempt, LandError> {
        let commit = attempt.commit.to_string();
        self.git()
            .run(&["read-tree", "--reset", "-u", &commit])
            .await?;
        let Some(hook) = before_commit(self.mode) else {
            return Ok(attempt);
        };
        self.run(task, hook, &[], None).await?;
        let message_file = self.worktree.with_extension("msg");
        let io = |source| LandError::Io {
            action: "write",
            path: message_file.clone(),
            source,
        };
        std::fs::write(&message_file, message).map_err(io)?;
        let file = message_file.display().to_string();
        let source = if self.mode == Mode::Merge {
            "merge"
        } else {
            "squash"
        };
        let ran = async {
            self.run(task, "prepare-commit-msg", &[&file, source], None)
                .await?;
            self.run(task, "commit-msg", &[&file], None).await
        }
        .await;
        let edited = std::fs::read_to_string(&message_file).unwrap_or_default();
        let _ = std::fs::remove_file(&message_file);
        ran?;
        if edited == message {
            return Ok(attempt);
        }
        let parents = engine
            .git()
            .run(&["rev-list", "--parents", "-n", "1", &commit])
            .await?
            .text();
        let parents: Vec<gix::ObjectId> = parents
            .split_whitespace()
            .skip(1)
            .filter_map(|p| p.parse().ok())
            .collect();
        let tree = engine.tree_of(&commit).await?;
        let commit = engine.commit(&tree, &parents, &edited, None).await?;
        Ok(Attempt { commit, ..attempt })
    }

    /// Once the target moved: the worktree goes to the new tip and the `post-*` hook is told (its
    /// exit code changes nothing, as with git).
    pub async fn after_landing(&self, attempt: &Attempt) {
        let commit = attempt.commit.to_string();
        let git = self.git();
        let _ = git.run(&["read-tree", "--reset", "-u", &commit]).await;
        let _ = git
            .run(&["update-ref", "--no-deref", "HEAD", &commit])
            .await;
        let placeholder = TaskName::parse("hooks").expect("a valid name");
        let hook = after_landing(self.mode);
        let _ = match self.mode {
            Mode::Merge | Mode::FfOnly => self.run(&placeholder, hook, &["0"], None).await,
            Mode::Squash => self.run(&placeholder, hook, &[], None).await,
            Mode::Rebase => {
                let map = self.worktree.with_extension("rewritten");
                let lines: String = attempt
                    .rewritten
                    .iter()
                    .map(|(old, new)| format!("{old} {new}\n"))
                    .collect();
                if std::fs::write(&map, lines).is_ok() {
                    let ran = self.run(&placeholder, hook, &["rebase"], Some(&map)).await;
                    let _ = std::fs::remove_file(&map);
                    ran
                } else {
                    Ok(())
                }
            }
        };
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        // Synchronous: a drop cannot wait for a future, and this is one short git process.
        let _ = std::process::Command::new("git")
            .arg("-C")
            .arg(&self.repo_dir)
            .args([
                "-c",
                "core.hooksPath=/dev/null",
                "worktree",
                "remove",
                "--force",
            ])
            .arg(&self.worktree)
            .env("LC_ALL", "C")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.worktree);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_has_its_hooks() {
        assert_eq!(before_commit(Mode::Merge), Some("pre-merge-commit"));
        assert_eq!(before_commit(Mode::Squash), Some("pre-commit"));
        assert_eq!(before_commit(Mode::Rebase), None);
        assert_eq!(after_landing(Mode::Rebase), "post-rewrite");
        assert_eq!(after_landing(Mode::FfOnly), "post-merge");
    }
}
