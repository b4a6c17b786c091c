//! `agentbox conflicts`: which tasks would conflict with each other, and with the branch they
//! would land on, and in which files — predicted without touching any worktree, branch or the
//! repository's objects.
//!
//! A task is taken as it is: a running (or kept) one at its live state, uncommitted work included
//! (its worktree staged through agentbox's scratch git dir into a tree, made a commit on top of its
//! branch's tip), a finished one at its branch. Every pair, and every task against its target's
//! tip, is merged by one `git merge-tree --write-tree --stdin` in the [`engine`](super::engine),
//! whose objects go to a scratch directory that is removed afterwards.

use serde::Serialize;

use super::engine::{Engine, Store};
use super::target::Target;
use super::{LandError, TaskWork};
use crate::git::snapshot::LiveObjects;
use crate::task::TaskName;
use crate::workspace::Workspace;

/// Two things that would conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// `tasks`: two tasks; `target`: a task and the branch it would land on.
    pub kind: ConflictKind,
    pub task: String,
    /// The other task, or the target branch.
    pub other: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictKind {
    Tasks,
    Target,
}

/// One task as it was compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    pub task: String,
    /// `live`: its worktree as it is now; `branch`: its branch.
    pub at: &'static str,
    pub commit: String,
    /// The branch it was compared against, if any.
    pub target: Option<String>,
}

/// What `conflicts` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prediction {
    pub tasks: Vec<Side>,
    /// Task pairs merged.
    pub pairs: usize,
    /// Tasks merged with their target.
    pub targets: usize,
    pub conflicts: Vec<Conflict>,
}

/// Predicts the conflicts among `tasks` (every task of the repository that has work when empty)
/// and of each with `into` (or its own base branch).
pub async fn predict(
    ws: &Workspace,
    tasks: &[TaskName],
    into: Option<&str>,
) -> Result<Prediction, LandError> {
    super::require_git("conflicts").await?;
    let named = !tasks.is_empty();
    let names: Vec<TaskName> = if named {
        tasks.to_vec()
    } else {
        ws.state.list()?.into_iter().map(|r| r.name).collect()
    };
    let mut works = Vec::new();
    for name in &names {
        let work = TaskWork::find(ws, name)?;
        if work.tip.is_none() && work.live_dirs(ws).is_none() {
            if named {
                return Err(LandError::NoBranch { task: name.clone() });
            }
            continue;
        }
        works.push(work);
    }
    let mut engine = Engine::new(ws, Store::Scratch)?;
    let lives =
        futures::future::join_all(works.iter().map(|w| w.live_tree(ws, LiveObjects::Scratch)))
            .await;
    let mut sides = Vec::new();
    let mut targets: Vec<Option<Target>> = Vec::new();
    for (work, live) in works.iter().zip(lives) {
        let (commit, at) = match live? {
            Some(live) => {
                engine.borrow_objects(live.objects.clone());
                let message = format!("agentbox: live state of task {}", work.task);
                let commit = engine
                    .commit(&live.tree, &[live.tip], &message, None)
                    .await?;
                (commit, "live")
            }
            None => match work.tip {
                Some(tip) => (tip, "branch"),
                None => continue,
            },
        };
        let target = Target::for_task(&ws.repo, work, into).ok();
        sides.push(Side {
            task: work.task.to_string(),
            at,
            commit: commit.to_string(),
            target: target.as_ref().map(|t| t.branch.clone()),
        });
        targets.push(target);
    }
    // The attributes of the one branch everything lands on, when there is one.
    if let Some(only) = common_target(targets.iter().flatten()) {
        engine = engine.attributes_from(only.tip);
    }

    let mut merges: Vec<(String, String)> = Vec::new();
    let mut what: Vec<(ConflictKind, usize, Option<usize>)> = Vec::new();
    for i in 0..sides.len() {
        for j in i + 1..sides.len() {
            merges.push((sides[i].commit.clone(), sides[j].commit.clone()));
            what.push((ConflictKind::Tasks, i, Some(j)));
        }
    }
    let pairs = merges.len();
    for (i, target) in targets.iter().enumerate() {
        if let Some(target) = target {
            merges.push((target.tip.to_string(), sides[i].commit.clone()));
            what.push((ConflictKind::Target, i, None));
        }
    }
    let merged = engine.merge_many(&merges).await?;
    let mut conflicts = Vec::new();
    for ((kind, i, j), merged) in what.into_iter().zip(merged) {
        if merged.conflicts.is_empty() {
            continue;
        }
        let other = match (kind, j) {
            (ConflictKind::Tasks, Some(j)) => sides[j].task.clone(),
            _ => sides[i].target.clone().unwrap_or_default(),
        };
        let mut files = merged.conflicts;
        files.sort();
        conflicts.push(Conflict {
            kind,
            task: sides[i].task.clone(),
            other,
            files,
        });
    }
    Ok(Prediction {
        pairs,
        targets: merges.len() - pairs,
        tasks: sides,
        conflicts,
    })
}

/// The branch all of `targets` land on, when they all land on the same one (in whatever order the
/// tasks come: `main, dev, main` have none).
fn common_target<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Option<&'a Target> {
    let mut targets = targets.into_iter();
    let first = targets.next()?;
    targets.all(|t| t.branch == first.branch).then_some(first)
}

/// Conflict checks as tasks finish, for `batch`: each finished task's branch against those of the
/// tasks that finished before it.
#[derive(Debug)]
pub struct Watch {
    engine: Engine,
    finished: Vec<(String, String)>,
}

impl Watch {
    /// `None` when the git on `PATH` is too old to predict conflicts.
    pub async fn new(ws: &Workspace) -> Option<Self> {
        super::require_git("batch").await.ok()?;
        let engine = Engine::new(ws, Store::Scratch).ok()?;
        Some(Self {
            engine,
            finished: Vec::new(),
        })
    }

    /// Compares the branch tip of `task` with those that finished earlier, and remembers it.
    /// Returns the earlier tasks it conflicts with and the files, in the order they finished.
    pub async fn finished(
        &mut self,
        task: &str,
        tip: gix::ObjectId,
    ) -> Result<Vec<(String, Vec<String>)>, LandError> {
        let tip = tip.to_string();
        let merges: Vec<(String, String)> = self
            .finished
            .iter()
            .map(|(_, earlier)| (earlier.clone(), tip.clone()))
            .collect();
        let merged = self.engine.merge_many(&merges).await?;
        let found = self
            .finished
            .iter()
            .zip(merged)
            .filter(|(_, m)| !m.conflicts.is_empty())
            .map(|((earlier, _), m)| (earlier.clone(), m.conflicts))
            .collect();
        self.finished.push((task.to_owned(), tip));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(branch: &str) -> Target {
        Target {
            branch: branch.to_owned(),
            tip: gix::ObjectId::null(gix::hash::Kind::Sha1),
        }
    }

    #[test]
    fn attributes_come_from_a_target_only_when_every_task_lands_on_it() {
        let branches =
            |names: &[&str]| -> Vec<Target> { names.iter().map(|b| target(b)).collect() };
        let common =
            |names: &[&str]| common_target(branches(names).iter()).map(|t| t.branch.clone());
        assert_eq!(common(&["main", "main", "main"]).as_deref(), Some("main"));
        assert_eq!(common(&["dev"]).as_deref(), Some("dev"));
        assert_eq!(common(&[]), None);
        // Tasks on different branches, the same ones apart: no one branch's attributes.
        assert_eq!(common(&["main", "dev", "main"]), None);
        assert_eq!(common(&["main", "main", "dev"]), None);
    }
}
