//! Keeping the task's work: the import of its branch, the snapshot of what it left uncommitted,
//! and only then the removal of its worktree and git dirs.

use super::{Ending, Problem, Run, StepKind};
use crate::git::import::{self, Imported};
use crate::git::snapshot::{self, Staging};
use crate::git::{GitError, TaskDirs};
use crate::runtime::Exit;
use crate::task::{TaskRecord, TaskState};

impl Run<'_> {
    /// Imports the task's commits, commits what the worktree holds uncommitted, and removes the
    /// worktree and the git dirs unless something there must be kept. Returns whether all went
    /// well.
    pub(super) async fn keep_work(&mut self, record: &mut TaskRecord, dirs: &TaskDirs) -> bool {
        let mut all_ok = true;
        // A refused import keeps the task's git dir (and the worktree) for the user to look at;
        // it is reported, but the teardown goes on to keep the worktree's files safe.
        let imported = self.import(dirs).await;
        let mut keep_dirs = self.options.keep || (!imported && !self.options.discard_unsaved);
        if record.state.can_snapshot() && !self.options.keep {
            all_ok &= self.snapshot(record, dirs).await;
            if !self.out.left_out.is_empty() && !self.options.discard_unsaved {
                keep_dirs = true;
            }
        }
        let exists = dirs.worktree.exists() || dirs.git_dir.exists() || dirs.scratch.exists();
        if !keep_dirs && all_ok && exists {
            all_ok &= self.remove(record, dirs).await;
        } else if keep_dirs && dirs.worktree.exists() {
            self.out.kept_worktree = Some(dirs.worktree.clone());
        }
        all_ok
    }

    /// Brings the task's branch into the repository. Returns whether that worked (or there was no
    /// git dir to import from).
    async fn import(&mut self, dirs: &TaskDirs) -> bool {
        if !dirs.git_dir.exists() {
            return true;
        }
        if self.options.dry_run {
            let pending = dirs.read_task_tip().ok().flatten().is_some_and(|tip| {
                self.ws.repo.branch_tip(&dirs.branch).ok().flatten() != Some(tip)
            });
            if pending {
                self.step(StepKind::ImportBranch, &dirs.branch, Ok(None));
            }
            return true;
        }
        let imported = async {
            let branch = import::import(&self.ws.repo, dirs, self.task.as_str()).await?;
            let rest = import::import_the_rest(&self.ws.repo, dirs, self.task.as_str()).await?;
            Ok::<_, GitError>((branch, rest))
        };
        match imported.await {
            Ok((Imported::Unchanged, rest)) if rest.is_empty() => true,
            Ok((imported, rest)) => {
                self.out.import = Some(imported);
                self.out.kept_refs = rest;
                self.step(StepKind::ImportBranch, &dirs.branch, Ok(None))
            }
            Err(e) => {
                let why = if self.options.discard_unsaved {
                    format!(
                        "{e}; the commits the task made since the last import are discarded with {}",
                        dirs.git_dir.display()
                    )
                } else {
                    format!(
                        "{e}; the commits the task made since the last import stay in {} and its worktree stays at {}",
                        dirs.git_dir.display(),
                        dirs.worktree.display()
                    )
                };
                self.notice(
                    StepKind::ImportBranch,
                    &dirs.branch,
                    Problem::because(why, e),
                );
                false
            }
        }
    }

    /// Commits what the worktree holds uncommitted. Returns whether that worked (or there was no
    /// worktree, or no finished checkout, to commit from).
    async fn snapshot(&mut self, record: &TaskRecord, dirs: &TaskDirs) -> bool {
        if !dirs.worktree.is_dir() || dirs.start_commit().is_none() || self.options.dry_run {
            return true;
        }
        let ended = match (record.exit_code, self.out.exit) {
            (Some(code), _) | (None, Some(Exit { code, .. })) => format!("exited {code}"),
            (None, None) => "ended".to_owned(),
        };
        let body = match self.options.ending {
            Ending::Exited => format!(
                "Task {} {ended} and left these changes uncommitted; agentbox committed them so that nothing it wrote is lost.",
                self.task
            ),
            _ => format!(
                "The supervisor of task {} died and left these changes uncommitted; {} committed them so that nothing the task wrote is lost.",
                self.task, self.options.by
            ),
        };
        let staging = Staging {
            own_files: &record.own_files,
            max_file_size: self.options.max_file_size,
        };
        match snapshot::snapshot(
            &self.ws.repo,
            dirs,
            self.task.as_str(),
            &body,
            &self.options.identity,
            &staging,
        )
        .await
        {
            Ok(snapshot) => {
                self.out.snapshot_commit = snapshot.commit;
                self.out.left_out = snapshot.left_out;
                true
            }
            Err(e) => {
                let why = format!(
                    "cannot commit the uncommitted work in worktree {} of task {}: {e}; the worktree stays",
                    dirs.worktree.display(),
                    self.task
                );
                self.step(
                    StepKind::RemoveWorktree,
                    dirs.worktree.display().to_string(),
                    Err(Problem::because(why, e)),
                );
                false
            }
        }
    }

    /// Marks the record `removing-worktree`, then removes the worktree and the git dirs.
    async fn remove(&mut self, record: &mut TaskRecord, dirs: &TaskDirs) -> bool {
        let target = dirs.worktree.display().to_string();
        if self.options.dry_run {
            return self.step(StepKind::RemoveWorktree, target, Ok(None));
        }
        let snapshot = self.out.snapshot_commit.clone();
        if record.state.is_active() {
            record.state = TaskState::RemovingWorktree;
        }
        record.snapshot_commit = snapshot.clone().or(record.snapshot_commit.take());
        if !self.save(record).await {
            return false;
        }
        let (owned, state, defer) = (
            dirs.clone(),
            self.ws.state.clone(),
            self.options.defer_deletion,
        );
        let manifest = crate::trash::Manifest {
            task: self.task.to_string(),
            containers: std::mem::take(&mut self.deferred_containers),
            ..Default::default()
        };
        let removed = tokio::task::spawn_blocking(move || {
            if defer {
                crate::trash::move_aside(&owned, &state, manifest).map_err(Problem::of)
            } else {
                owned.remove().map(|()| None).map_err(Problem::of)
            }
        })
        .await
        .expect("removing a directory does not panic");
        let result = match removed {
            Ok(trash) => {
                self.out.trash = trash;
                Ok(snapshot.clone())
            }
            Err(e) => Err(match &snapshot {
                Some(commit) => Problem {
                    message: format!("{e} (its work is safe in commit {commit})"),
                    ..e
                },
                None => e,
            }),
        };
        self.step(StepKind::RemoveWorktree, target, result)
    }
}
