//! The branch work lands on: which one, where it is checked out, and how it moves — only forward,
//! only from the tip agentbox saw (`git update-ref <branch> <new> <old>`), and with a clean checkout
//! of it brought along.

use std::path::{Path, PathBuf};

use super::{LandError, TaskWork};
use crate::git::{Git, Repo};

/// A local branch and the tip it had when agentbox looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Short name: `main`.
    pub branch: String,
    pub tip: gix::ObjectId,
}

impl Target {
    pub fn full_ref(&self) -> String {
        format!("refs/heads/{}", self.branch)
    }

    /// `--into BRANCH`, else the branch the task started from.
    pub fn for_task(repo: &Repo, work: &TaskWork, into: Option<&str>) -> Result<Self, LandError> {
        let branch = match (into, &work.record) {
            (Some(branch), _) => branch.strip_prefix("refs/heads/").unwrap_or(branch),
            (None, Some(record)) => {
                let base = record
                    .base
                    .strip_prefix("refs/heads/")
                    .unwrap_or(&record.base);
                if repo.branch_tip(base)?.is_none() {
                    return Err(LandError::NoTargetBranch {
                        task: work.task.clone(),
                        base: record.base.clone(),
                    });
                }
                base
            }
            // agentbox forgot the task: its branch lands where the user is.
            (None, None) => {
                let head = repo.head_name();
                if repo.branch_tip(&head)?.is_none() {
                    return Err(LandError::NoTargetBranch {
                        task: work.task.clone(),
                        base: head,
                    });
                }
                return Self::named(repo, &head);
            }
        };
        Self::named(repo, branch)
    }

    /// The local branch `branch` as it is now.
    pub fn named(repo: &Repo, branch: &str) -> Result<Self, LandError> {
        let tip = repo
            .branch_tip(branch)?
            .ok_or_else(|| LandError::NoSuchBranch {
                branch: branch.to_owned(),
                repo: repo.repo_dir.clone(),
            })?;
        Ok(Self {
            branch: branch.to_owned(),
            tip,
        })
    }
}

/// The worktrees (of the repository, not of tasks) that have `branch` checked out.
pub async fn checkouts_of(repo: &Repo, branch: &str) -> Result<Vec<PathBuf>, LandError> {
    let out = repo
        .git()
        .run(&["worktree", "list", "--porcelain", "-z"])
        .await?;
    let wanted = format!("refs/heads/{branch}");
    let mut found = Vec::new();
    let (mut path, mut on_branch, mut usable) = (None, false, true);
    for field in out.stdout.split(|&b| b == 0) {
        let field = String::from_utf8_lossy(field);
        if field.is_empty() {
            if let (Some(path), true, true) = (path.take(), on_branch, usable) {
                found.push(path);
            }
            (on_branch, usable) = (false, true);
        } else if let Some(p) = field.strip_prefix("worktree ") {
            path = Some(PathBuf::from(p));
        } else if let Some(b) = field.strip_prefix("branch ") {
            on_branch = b == wanted;
        } else if field == "bare" || field.starts_with("prunable") {
            usable = false;
        }
    }
    Ok(found)
}

/// The checkouts of the target, refusing when one of them has uncommitted changes to tracked files
/// (an untracked file in the way is found when the checkout is brought along, before anything
/// moves).
pub async fn clean_checkouts(repo: &Repo, branch: &str) -> Result<Vec<PathBuf>, LandError> {
    let checkouts = checkouts_of(repo, branch).await?;
    for worktree in &checkouts {
        let status = Git::host(worktree)
            .run(&[
                "status",
                "--porcelain",
                "-z",
                "--untracked-files=no",
                "--ignore-submodules=all",
            ])
            .await?;
        if !status.stdout.is_empty() {
            return Err(LandError::DirtyTarget {
                target: branch.to_owned(),
                worktree: worktree.clone(),
            });
        }
    }
    Ok(checkouts)
}

/// Moves `target` from its tip to `new` (a descendant of it), bringing its checkouts along first;
/// if the branch moved meanwhile, the checkouts are put back and nothing changed.
pub async fn fast_forward(
    repo: &Repo,
    task: &crate::task::TaskName,
    target: &Target,
    new: gix::ObjectId,
    checkouts: &[PathBuf],
    message: &str,
) -> Result<(), LandError> {
    let (old, new_hex) = (target.tip.to_string(), new.to_string());
    let mut updated: Vec<&Path> = Vec::new();
    for worktree in checkouts {
        if let Err(e) = move_checkout(worktree, &old, &old, &new_hex).await {
            put_back(&updated, &old, &new_hex).await;
            return Err(LandError::CheckoutInTheWay {
                target: target.branch.clone(),
                worktree: worktree.clone(),
                reason: git_reason(e),
            });
        }
        updated.push(worktree);
    }
    let moved = repo
        .git()
        .run(&[
            "update-ref",
            "--create-reflog",
            "-m",
            message,
            &target.full_ref(),
            &new_hex,
            &old,
        ])
        .await;
    if moved.is_err() {
        put_back(&updated, &old, &new_hex).await;
        return Err(LandError::TargetMoved {
            task: task.clone(),
            target: target.branch.clone(),
            expected: super::short(&target.tip),
        });
    }
    Ok(())
}

/// A two-tree `read-tree -m -u`: the checkout's index and files go from `from` to `to`, refusing
/// (before it writes anything) when a file it would change has local changes or an untracked file
/// is in the way. Attributes come from `attributes` (the tip the user accepted before), so that
/// nothing the landed work says selects a filter for its own checkout.
async fn move_checkout(
    worktree: &Path,
    attributes: &str,
    from: &str,
    to: &str,
) -> Result<(), crate::git::GitError> {
    Git::host(worktree)
        .with_attr_source(attributes)
        .run(&["read-tree", "-m", "-u", from, to])
        .await
        .map(drop)
}

async fn put_back(worktrees: &[&Path], old: &str, new: &str) {
    for worktree in worktrees {
        let _ = move_checkout(worktree, old, new, old).await;
    }
}

/// What git said, without its `fatal:`/`error:` prefixes.
pub(crate) fn git_reason(error: crate::git::GitError) -> String {
    match error {
        crate::git::GitError::Command { stderr, .. } => stderr
            .lines()
            .map(|l| {
                l.trim_start_matches("fatal: ")
                    .trim_start_matches("error: ")
                    .trim()
            })
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}
