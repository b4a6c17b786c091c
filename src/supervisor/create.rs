//! Creation of a task: its branch, git dirs and worktree while the engine makes its sandbox, and
//! the rollback of all of it when a step fails.

use super::{DEFAULT_IMAGE, RunError, RunEvent, RunRequest, SetupFailure, Supervised, ZERO_ID};
use crate::config::EnvVar;
use crate::environment;
use crate::fs_guard::GuardedDir;
use crate::git::TaskDirs;
use crate::runtime::{Output, RuntimeError, Sandbox, SandboxPlan};

impl Supervised<'_> {
    /// Makes the branch and the git dirs, then checks out and fills the worktree while the engine
    /// creates the sandbox.
    pub(super) async fn create(&mut self, plan: &SandboxPlan) -> Result<Sandbox, SetupFailure> {
        let fail = |error: RunError| SetupFailure {
            error,
            sandbox: Sandbox::default(),
        };
        let (repo, dirs, start, own) = (
            self.ws.repo.clone(),
            self.dirs.clone(),
            self.start,
            self.record.own_files.clone(),
        );
        tokio::task::spawn_blocking(move || dirs.create(&repo, start, &own))
            .await
            .expect("creating directories does not panic")
            .map_err(|e| fail(e.into()))?;

        let checkout = async {
            if self.record.created_branch {
                let message = format!("agentbox: task {} starts", self.task());
                self.ws
                    .repo
                    .git()
                    .run(&[
                        "update-ref",
                        "--create-reflog",
                        "-m",
                        &message,
                        &self.dirs.branch_ref(),
                        &self.record.base_commit,
                        ZERO_ID,
                    ])
                    .await?;
            }
            self.dirs
                .checkout(&self.ws.repo, self.request.checkout_workers)
                .await?;
            let (dirs, request, env) = (self.dirs.clone(), self.request.clone(), self.env.clone());
            tokio::task::spawn_blocking(move || fill_worktree(&dirs, &request, &env))
                .await
                .expect("filling the worktree does not panic")?;
            for command in &self.request.host_setup {
                self.run_on_host(command).await?;
            }
            Ok(())
        };
        let (checkout, sandbox) = if mounts_from_inside(plan, &self.dirs.worktree) {
            // The engine refuses a bind source that does not exist yet, and only the checkout
            // makes the worktree's directories.
            let checkout = checkout.await;
            match checkout {
                Ok(()) => (Ok(()), self.runtime.create_sandbox(plan).await),
                Err(e) => (Err(e), Ok(Sandbox::default())),
            }
        } else {
            tokio::join!(checkout, self.runtime.create_sandbox(plan))
        };
        match (checkout, sandbox) {
            (Ok(()), Ok(sandbox)) => Ok(sandbox),
            (checkout, sandbox) => {
                let (engine_error, sandbox) = match sandbox {
                    Ok(sandbox) => (None, sandbox),
                    Err((e, sandbox)) => (Some(e), sandbox),
                };
                // The engine's error first: it is the one a missing image or a dead engine causes.
                let error = match (engine_error, checkout) {
                    (Some(e), _) => self.engine_error(e),
                    (None, Err(e)) => e,
                    (None, Ok(())) => unreachable!("one side failed"),
                };
                Err(SetupFailure { error, sandbox })
            }
        }
    }

    /// Runs one of the user's own host commands (a devcontainer's `initializeCommand`) in the
    /// worktree, its output shown like the task's.
    async fn run_on_host(&self, command: &str) -> Result<(), RunError> {
        let heading = format!("agentbox: initializeCommand (on the host): {command}\n");
        self.emit(RunEvent::Output(Output::Stderr(heading.into())))
            .await;
        let output = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .current_dir(&self.dirs.worktree)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| RunError::Io {
                action: "run initializeCommand in",
                path: self.dirs.worktree.clone(),
                source,
            })?;
        for (bytes, stderr) in [(output.stdout, false), (output.stderr, true)] {
            if !bytes.is_empty() {
                let bytes = bytes::Bytes::from(bytes);
                let chunk = if stderr {
                    Output::Stderr(bytes)
                } else {
                    Output::Stdout(bytes)
                };
                self.emit(RunEvent::Output(chunk)).await;
            }
        }
        if output.status.success() {
            Ok(())
        } else {
            Err(RunError::HostSetup {
                command: command.to_owned(),
                code: output.status.code(),
            })
        }
    }

    fn engine_error(&self, e: RuntimeError) -> RunError {
        match e {
            RuntimeError::ImageMissing { image, reason } if image == DEFAULT_IMAGE => {
                RunError::DefaultImageMissing { image, reason }
            }
            other => other.into(),
        }
    }

    /// Undoes a failed creation. Nothing has run in the worktree yet, so there is no work to keep; a
    /// branch this run created is deleted only if it still points at the base.
    pub(super) async fn roll_back(&mut self, failure: SetupFailure) -> RunError {
        let SetupFailure { error, sandbox } = failure;
        let mut problems: Vec<String> = self
            .runtime
            .remove_sandbox(&sandbox)
            .await
            .into_iter()
            .map(|e| e.to_string())
            .collect();
        if let Some(slot) = self.record.pool_slot.clone() {
            // A slot half made into this task: whatever of it is left goes too.
            let placeholder = crate::pool::Slot::placeholder(self.ws, &slot);
            if let Err(e) = crate::pool::remove_slot(self.ws, self.runtime, &placeholder).await {
                problems.push(e.to_string());
            }
        }
        let dirs = self.dirs.clone();
        let removed = tokio::task::spawn_blocking(move || dirs.remove())
            .await
            .expect("removing directories does not panic");
        problems.extend(removed.err().map(|e| e.to_string()));
        if self.record.created_branch {
            // A failure here is not a problem: the branch may never have been created, and one that
            // moved holds work.
            let _ = self
                .ws
                .repo
                .git()
                .run(&[
                    "update-ref",
                    "-d",
                    &self.dirs.branch_ref(),
                    &self.record.base_commit,
                ])
                .await;
        }
        let (ports, owner, state, task, claim) = (
            self.ws.ports.clone(),
            self.owner.clone(),
            self.ws.state.clone(),
            self.task().clone(),
            std::sync::Arc::clone(&self.claim),
        );
        let released = tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            if let Err(e) = ports.release(&owner) {
                problems.push(e.to_string());
            }
            if let Err(e) = state.remove(&task, &claim) {
                problems.push(e.to_string());
            }
            problems
        })
        .await
        .expect("releasing ports does not panic");
        problems.extend(released);
        if problems.is_empty() {
            error
        } else {
            RunError::Setup {
                source: Box::new(error),
                rollback: problems,
            }
        }
    }
}

/// Writes the env file and copies the `copy` entries into the fresh worktree, never through a
/// symlink that the checkout (of a branch the task may have committed to before) put there.
pub(super) fn fill_worktree(
    dirs: &TaskDirs,
    request: &RunRequest,
    env: &[EnvVar],
) -> Result<(), RunError> {
    let task = request.task.clone();
    let worktree = GuardedDir::open(&dirs.worktree).map_err(|source| RunError::Worktree {
        task: task.clone(),
        source,
    })?;
    if let Some(source) = &request.copy_from {
        crate::copy::copy_into(source, &worktree, &request.copy)?;
    } else if let Some(first) = request.copy.first() {
        return Err(RunError::CopyWithoutCheckout {
            path: first.clone(),
        });
    }
    // The env file holds secrets: it lives only in the worktree (mode 0600, ignored by git) for as
    // long as the task does.
    environment::write_env_file(&worktree, &request.env_file_name, env)
        .map_err(|source| RunError::Worktree { task, source })
}

/// Whether a container of the plan bind-mounts a path below the worktree (not the worktree itself,
/// which exists before the checkout starts).
fn mounts_from_inside(plan: &SandboxPlan, worktree: &std::path::Path) -> bool {
    std::iter::once(&plan.task)
        .chain(&plan.services)
        .flat_map(|container| &container.mounts)
        .any(|mount| {
            let source = std::path::Path::new(&mount.source);
            source != worktree && source.starts_with(worktree)
        })
}
