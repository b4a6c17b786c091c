//! `agentbox merge`: a task's branch onto a branch, as a merge commit, one squashed commit, its
//! commits rebased, or a fast-forward; and `agentbox apply`: a task's changes into the current
//! checkout, uncommitted.
//!
//! The result is computed by the [`engine`](super::engine) on objects alone; the target moves by a
//! compare-and-swap fast-forward to it ([`target::fast_forward`]). A conflict changes nothing and
//! names the files. The task's own branch is never rewritten: a rebase makes new commits.

use std::path::PathBuf;

use serde::Serialize;

use super::engine::{EMPTY_TREE, Engine, Signature, Store};
use super::hooks::Hooks;
use super::target::{self, Target};
use super::{LandError, TaskWork};
use crate::git::snapshot::LiveObjects;
use crate::task::TaskName;
use crate::workspace::Workspace;

/// How a task's branch lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A merge commit, also when a fast-forward would do: the landing stays visible as one.
    #[default]
    Merge,
    /// One new commit with all of the task's changes.
    Squash,
    /// The task's commits made again on top of the target (its branch stays as it is).
    Rebase,
    /// Only if the target has nothing the task does not.
    FfOnly,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Squash => "squash",
            Self::Rebase => "rebase",
            Self::FfOnly => "ff-only",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// The branch to land on; the task's base branch by default.
    pub into: Option<String>,
    pub mode: Mode,
    /// Run the repository's hooks (in a temporary worktree).
    pub run_hooks: bool,
    /// Let the repository's configured merge drivers run.
    pub merge_drivers: bool,
    /// The message of the merge or squash commit.
    pub message: Option<String>,
}

/// What landing did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Landing {
    pub task: String,
    pub target: String,
    pub mode: Mode,
    /// The target's tip before and after.
    pub from: String,
    pub to: String,
    /// Commits the target gained.
    pub commits: usize,
    /// Checkouts of the target that were brought along.
    pub checkouts: Vec<PathBuf>,
    /// The task's work was already on the target: nothing moved.
    pub already_landed: bool,
}

/// A landing worked out but not done: the commit the target would move to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub commit: gix::ObjectId,
    /// New commits on top of the target.
    pub commits: usize,
    /// Rebased commits: (original, new), for the `post-rewrite` hook.
    pub rewritten: Vec<(gix::ObjectId, gix::ObjectId)>,
}

/// Lands the task's branch; see the module documentation.
pub async fn merge(
    ws: &Workspace,
    task: &TaskName,
    options: &MergeOptions,
) -> Result<Landing, LandError> {
    super::require_git("merge").await?;
    let work = TaskWork::find(ws, task)?;
    let tip = work.finished_tip()?;
    let target = Target::for_task(&ws.repo, &work, options.into.as_deref())?;
    let checkouts = target::clean_checkouts(&ws.repo, &target.branch).await?;
    let landing = |to: gix::ObjectId, commits, already_landed| Landing {
        task: task.to_string(),
        target: target.branch.clone(),
        mode: options.mode,
        from: target.tip.to_string(),
        to: to.to_string(),
        commits,
        checkouts: if already_landed {
            Vec::new()
        } else {
            checkouts.clone()
        },
        already_landed,
    };
    if ws.repo.is_ancestor(tip, target.tip)? {
        return Ok(landing(target.tip, 0, true));
    }
    let mut engine = Engine::new(ws, Store::Repository)?.attributes_from(target.tip);
    if options.merge_drivers {
        engine = engine.with_repository_config(&ws.repo.repo_dir);
    }
    let hooks = if options.run_hooks {
        Some(Hooks::start(ws, options.mode, &work.branch, &target).await?)
    } else {
        None
    };
    if let Some(hooks) = &hooks {
        hooks.before_attempt(task).await?;
    }
    let message = options
        .message
        .clone()
        .unwrap_or(default_message(ws, &engine, options.mode, &work, &target, tip).await?);
    let mut attempt = attempt(&engine, options.mode, &work, &target, tip, &message).await?;
    if attempt.commit == target.tip {
        // Every change of the task is on the target already (a squash or rebase finds nothing new).
        return Ok(landing(target.tip, 0, true));
    }
    if let Some(hooks) = &hooks {
        attempt = hooks.check(&engine, task, attempt, &message).await?;
    }
    let reflog = format!(
        "agentbox merge: task {task} ({}) onto {}",
        options.mode.as_str(),
        target.branch
    );
    target::fast_forward(&ws.repo, task, &target, attempt.commit, &checkouts, &reflog).await?;
    if let Some(hooks) = &hooks {
        hooks.after_landing(&attempt).await;
    }
    Ok(landing(attempt.commit, attempt.commits, false))
}

/// Works out the commit `target` would move to for the task's `tip` in `mode`, writing its objects
/// (nothing else). A conflict is an error naming the files.
pub async fn attempt(
    engine: &Engine,
    mode: Mode,
    work: &TaskWork,
    target: &Target,
    tip: gix::ObjectId,
    message: &str,
) -> Result<Attempt, LandError> {
    let (ours, theirs) = (target.tip.to_string(), tip.to_string());
    let conflict = |files| LandError::Conflict {
        task: work.task.clone(),
        target: target.branch.clone(),
        files,
    };
    match mode {
        Mode::FfOnly => {
            let descends = engine
                .git()
                .run_unchecked(&["merge-base", "--is-ancestor", &ours, &theirs], None)
                .await?;
            if descends.code != Some(0) {
                return Err(LandError::NotFastForward {
                    task: work.task.clone(),
                    target: target.branch.clone(),
                });
            }
            let commits = count(engine, &format!("{ours}..{theirs}")).await?;
            Ok(Attempt {
                commit: tip,
                commits,
                rewritten: Vec::new(),
            })
        }
        Mode::Merge | Mode::Squash => {
            let merged = engine.merge(&ours, &theirs).await?;
            if !merged.conflicts.is_empty() {
                return Err(conflict(merged.conflicts));
            }
            if mode == Mode::Squash && merged.tree == engine.tree_of(&ours).await? {
                return Ok(Attempt {
                    commit: target.tip,
                    commits: 0,
                    rewritten: Vec::new(),
                });
            }
            let parents = if mode == Mode::Merge {
                vec![target.tip, tip]
            } else {
                vec![target.tip]
            };
            let commit = engine.commit(&merged.tree, &parents, message, None).await?;
            Ok(Attempt {
                commit,
                commits: 1,
                rewritten: Vec::new(),
            })
        }
        Mode::Rebase => rebase(engine, work, target, tip).await,
    }
}

/// The task's commits that the target lacks (not merges, not those whose change is already
/// there), made again one by one on top of the target, with their authors and messages; a commit
/// that no longer changes anything is dropped, as `git rebase` does.
async fn rebase(
    engine: &Engine,
    work: &TaskWork,
    target: &Target,
    tip: gix::ObjectId,
) -> Result<Attempt, LandError> {
    let range = format!("{}...{tip}", target.tip);
    let listed = engine
        .git()
        .run(&[
            "rev-list",
            "--reverse",
            "--topo-order",
            "--no-merges",
            "--right-only",
            "--cherry-pick",
            &range,
        ])
        .await?;
    let mut onto = target.tip;
    let mut onto_tree = engine.tree_of(&onto.to_string()).await?;
    let mut rewritten = Vec::new();
    for line in listed.text().lines() {
        let original: gix::ObjectId = line.parse().map_err(|_| {
            LandError::Git(crate::git::GitError::Read {
                what: format!("the commits of {}", work.branch),
                repo: PathBuf::new(),
                reason: format!("rev-list printed {line:?}"),
            })
        })?;
        let info = read_commit(engine, &original).await?;
        let parent = info.parent.clone().unwrap_or_else(|| EMPTY_TREE.to_owned());
        let picked = engine
            .pick(&onto.to_string(), &original.to_string(), &parent)
            .await?;
        if !picked.conflicts.is_empty() {
            return Err(LandError::Conflict {
                task: work.task.clone(),
                target: target.branch.clone(),
                files: picked.conflicts,
            });
        }
        let was_empty = engine.tree_of(&parent).await.ok() == Some(info.tree);
        if picked.tree == onto_tree && !was_empty {
            continue;
        }
        let commit = engine
            .commit(&picked.tree, &[onto], &info.message, Some(&info.author))
            .await?;
        rewritten.push((original, commit));
        onto = commit;
        onto_tree = picked.tree;
    }
    Ok(Attempt {
        commit: onto,
        commits: rewritten.len(),
        rewritten,
    })
}

/// What a rebase keeps of a commit.
struct CommitInfo {
    tree: gix::ObjectId,
    parent: Option<String>,
    author: Signature,
    message: String,
}

async fn read_commit(engine: &Engine, id: &gix::ObjectId) -> Result<CommitInfo, LandError> {
    let out = engine
        .git()
        .run(&["cat-file", "commit", &id.to_string()])
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (headers, message) = text.split_once("\n\n").unwrap_or((&text, ""));
    let bad = |what: &str| {
        LandError::Git(crate::git::GitError::Read {
            what: format!("commit {id}"),
            repo: PathBuf::new(),
            reason: what.to_owned(),
        })
    };
    let mut tree = None;
    let mut parent = None;
    let mut author = None;
    for line in headers.lines() {
        if let Some(t) = line.strip_prefix("tree ") {
            tree = super::engine::parse_id(t.as_bytes());
        } else if let Some(p) = line.strip_prefix("parent ") {
            parent.get_or_insert_with(|| p.to_owned());
        } else if let Some(a) = line.strip_prefix("author ") {
            author = parse_signature(a);
        }
    }
    Ok(CommitInfo {
        tree: tree.ok_or_else(|| bad("no tree"))?,
        parent,
        author: author.ok_or_else(|| bad("no author"))?,
        message: message.to_owned(),
    })
}

/// `Name <email> 1700000000 +0100`.
fn parse_signature(line: &str) -> Option<Signature> {
    let (name, rest) = line.split_once(" <")?;
    let (email, date) = rest.split_once("> ")?;
    Some(Signature {
        name: name.to_owned(),
        email: email.to_owned(),
        date: Some(date.trim().to_owned()),
    })
}

async fn count(engine: &Engine, range: &str) -> Result<usize, LandError> {
    let out = engine.git().run(&["rev-list", "--count", range]).await?;
    Ok(out.text().parse().unwrap_or(0))
}

/// The message of a merge or squash commit: git's own wording for a merge; for a squash, the
/// subjects of the task's commits.
async fn default_message(
    ws: &Workspace,
    engine: &Engine,
    mode: Mode,
    work: &TaskWork,
    target: &Target,
    tip: gix::ObjectId,
) -> Result<String, LandError> {
    match mode {
        Mode::Merge => Ok(format!(
            "Merge branch '{}' into {}\n",
            work.branch, target.branch
        )),
        Mode::Squash => {
            let base = match work.base_commit() {
                Some(base) if ws.repo.is_ancestor(base, tip)? => base,
                _ => ws.repo.merge_base(target.tip, tip)?.unwrap_or(target.tip),
            };
            let subjects = engine
                .git()
                .run(&[
                    "log",
                    "--reverse",
                    "--format=* %s",
                    &format!("{base}..{tip}"),
                ])
                .await?;
            Ok(format!(
                "Squashed task {} (branch {})\n\n{}\n",
                work.task,
                work.branch,
                subjects.text()
            ))
        }
        Mode::Rebase | Mode::FfOnly => Ok(String::new()),
    }
}

/// What `apply` put into the checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub task: String,
    pub checkout: PathBuf,
    /// Files changed (now staged) in the checkout.
    pub files: Vec<String>,
    /// Taken from the running (or kept) task's worktree, uncommitted work included.
    pub live: bool,
}

/// Puts the task's changes (against the point where it and the checkout's `HEAD` parted) into the
/// checkout agentbox runs in, staged and uncommitted, as `git merge --squash` would: all or
/// nothing, and a conflict names the files.
pub async fn apply(ws: &Workspace, task: &TaskName) -> Result<Applied, LandError> {
    super::require_git("apply").await?;
    let Some(checkout) = ws.repo.workdir.clone() else {
        return Err(LandError::NoCheckout {
            repo: ws.repo.repo_dir.clone(),
        });
    };
    let work = TaskWork::find(ws, task)?;
    let head = ws.repo.resolve_commit("HEAD")?;
    let engine = Engine::new(ws, Store::Repository)?.attributes_from(head);
    let (theirs, live) = match work.live_tree(ws, LiveObjects::Repository).await? {
        Some(live) => {
            let message = format!("agentbox: live state of task {task}");
            let commit = engine
                .commit(&live.tree, &[live.tip], &message, None)
                .await?;
            (commit, true)
        }
        None => (
            work.tip
                .ok_or_else(|| LandError::NoBranch { task: task.clone() })?,
            false,
        ),
    };
    let merged = engine.merge(&head.to_string(), &theirs.to_string()).await?;
    if !merged.conflicts.is_empty() {
        return Err(LandError::Conflict {
            task: task.clone(),
            target: format!("the checkout {}", checkout.display()),
            files: merged.conflicts,
        });
    }
    let (head_hex, tree_hex) = (head.to_string(), merged.tree.to_string());
    let changed = engine
        .git()
        .run(&[
            "diff",
            "--name-only",
            "-z",
            "--no-renames",
            &head_hex,
            &tree_hex,
        ])
        .await?;
    let files: Vec<String> = changed
        .stdout
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    if !files.is_empty() {
        crate::git::Git::host(&checkout)
            .with_attr_source(&head_hex)
            .run(&["read-tree", "-m", "-u", &head_hex, &tree_hex])
            .await
            .map_err(|e| LandError::ApplyInTheWay {
                task: task.clone(),
                worktree: checkout.clone(),
                reason: target::git_reason(e),
            })?;
    }
    Ok(Applied {
        task: task.to_string(),
        checkout,
        files,
        live,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_keep_the_authors_date() {
        let s = parse_signature("A U Thor <a@example.com> 1700000000 +0100").unwrap();
        assert_eq!(s.name, "A U Thor");
        assert_eq!(s.email, "a@example.com");
        assert_eq!(s.date.as_deref(), Some("1700000000 +0100"));
        assert!(parse_signature("garbage").is_none());
    }
}
