//! After the command: the teardown, then what the run leaves (the branch, or none when it did
//! nothing) and its summary.

use std::time::SystemTime;

use super::{Kept, RunError, RunOutcome, RunSummary, StopSignal, Supervised};
use crate::runtime::Exit;
use crate::task::TaskState;
use crate::teardown::{self, Ending, Leftovers};

impl Supervised<'_> {
    pub(super) async fn tear_down(
        mut self,
        wait_error: Option<String>,
        stopped_by: Option<StopSignal>,
        exit: Option<Exit>,
    ) -> Result<RunOutcome, RunError> {
        let leftovers = Leftovers::find(
            self.runtime,
            &self.ws.repo_id,
            self.task(),
            self.record.pool_slot.as_deref(),
        )
        .await
        .unwrap_or_default();
        let options = teardown::Options {
            stop_timeout: self.request.stop_timeout,
            by: "agentbox run",
            keep: self.request.keep,
            release_ports: true,
            dry_run: false,
            max_file_size: self.request.max_snapshot_file,
            identity: self.identity.clone(),
            ending: Ending::Exited,
            discard_unsaved: false,
            defer_deletion: self.request.defer_deletion,
            processes_gone: std::mem::take(&mut self.processes_gone),
        };
        let report = teardown::tear_down(
            self.ws,
            self.runtime,
            &mut self.record,
            leftovers,
            &options,
            &self.claim,
            &mut |_| {},
        )
        .await;
        let mut problems: Vec<String> = wait_error.into_iter().collect();
        problems.extend(report.problems.iter().map(ToString::to_string));
        problems.extend(report.notices.iter().map(ToString::to_string));
        let finished = !self.record.state.is_active();
        if !finished {
            self.record.finished_at = Some(SystemTime::now());
            self.record.error = Some(problems.join("; "));
            self.save(TaskState::Failed).await?;
            return Err(RunError::Teardown {
                task: self.task().clone(),
                worktree: self.record.worktree.clone(),
                problems,
                exit_code: self.record.exit_code,
            });
        }

        let branch_deleted = self.delete_branch_if_unchanged(&report).await;
        let (commits_ahead, files_changed) = self.changes().await?;
        let kept = report.kept_worktree.map(|worktree| Kept {
            worktree,
            container: self.record.container_name.clone(),
            asked: self.request.keep,
        });
        Ok(RunOutcome {
            exit_code: exit.map_or(125, |e| e.code),
            stopped_by,
            oom_killed: self.record.oom_killed,
            summary: RunSummary {
                task: self.task().clone(),
                branch: self.record.branch.clone(),
                base: self.record.base.clone(),
                commits_ahead,
                files_changed,
                snapshot_commit: self.record.snapshot_commit.clone(),
                kept,
                left_out: report.left_out,
                problems,
                memory_limit: self.request.limits.memory_bytes,
                branch_deleted,
                trash: report.trash,
                from_pool: self.record.pool_slot.is_some(),
            },
        })
    }

    /// A task that changed nothing leaves no branch behind: the branch this run created is deleted
    /// when it still points at the base and nothing else of the task was kept. Returns whether it
    /// was.
    async fn delete_branch_if_unchanged(&self, report: &teardown::Report) -> bool {
        let unchanged = self.record.created_branch
            && !self.request.keep_branch
            && report.kept_worktree.is_none()
            && report.kept_refs.is_empty()
            && self.record.snapshot_commit.is_none()
            && self
                .ws
                .repo
                .branch_tip(&self.record.branch)
                .ok()
                .flatten()
                .map(|t| t.to_string())
                == Some(self.record.base_commit.clone());
        if !unchanged {
            return false;
        }
        self.ws
            .repo
            .git()
            .run(&[
                "update-ref",
                "-d",
                &self.dirs.branch_ref(),
                &self.record.base_commit,
            ])
            .await
            .is_ok()
    }

    /// Commits on the branch beyond the base, and files they change.
    async fn changes(&self) -> Result<(usize, usize), RunError> {
        let Some(tip) = self.ws.repo.branch_tip(&self.record.branch)? else {
            return Ok((0, 0));
        };
        let base: gix::ObjectId =
            self.record
                .base_commit
                .parse()
                .map_err(|_| crate::state::StateError::Damaged {
                    task: self.task().clone(),
                    what: format!(
                        "base_commit {:?} is not a commit id",
                        self.record.base_commit
                    ),
                })?;
        let ahead = self.ws.repo.commits_ahead(base, tip)?;
        // No commits of its own, no changed files: spare the git process.
        if ahead == 0 {
            return Ok((0, 0));
        }
        let out = self
            .ws
            .repo
            .git()
            .run(&[
                "diff",
                "--name-only",
                "-z",
                "--no-renames",
                &self.record.base_commit,
                &tip.to_string(),
            ])
            .await?;
        let files = out
            .stdout
            .split(|&b| b == 0)
            .filter(|p| !p.is_empty())
            .count();
        Ok((ahead, files))
    }
}
