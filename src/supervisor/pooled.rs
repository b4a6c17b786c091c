//! A task made from a pool slot: the slot's idle sandbox becomes the task's, and the command runs in
//! it with `exec` (see [`crate::pool`]).

use super::create::fill_worktree;
use super::{IDLE_COMMAND, RunError, SetupFailure, Supervised, ZERO_ID};
use crate::pool::{self, Slot, SlotClaim};
use crate::runtime::{ExecSpec, REPO_LABEL, SERVICE_LABEL, Sandbox, wrap_with_setup};

/// Where the command's pid is kept inside the container, for a graceful stop.
const PID_FILE: &str = "/tmp/.agentbox-command.pid";

impl Supervised<'_> {
    /// Turns the slot into this task's sandbox: the checkout moves to the task's start (changed
    /// files only) while the task's branch is made, the task's usual worktree path becomes a link
    /// to the slot's worktree, the env file and the copies go in, the container takes the task's
    /// name. The slot is forgotten: from here on it is the task's.
    pub(super) async fn adopt(
        &mut self,
        slot: &Slot,
        claim: SlotClaim,
    ) -> Result<Sandbox, SetupFailure> {
        let sandbox = Sandbox {
            container: slot.container.clone(),
            image_defaults: slot.image_defaults.clone(),
            ..Sandbox::default()
        };
        let fail = |error: RunError, sandbox: &Sandbox| SetupFailure {
            error,
            sandbox: sandbox.clone(),
        };
        let from: gix::ObjectId = match slot.base_commit.parse() {
            Ok(id) => id,
            Err(_) => {
                let error = RunError::Pool(pool::PoolError::NotPoolable {
                    why: format!("slot {} names no commit", slot.id),
                });
                return Err(fail(error, &sandbox));
            }
        };
        let slot_dirs = pool::slot_dirs_of(slot);
        let branch = async {
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
            Ok::<_, RunError>(())
        };
        let prepared = async {
            slot_dirs
                .retarget(&self.ws.repo, &self.dirs.branch, from, self.start)
                .await?;
            let (dirs, request, env) = (self.dirs.clone(), self.request.clone(), self.env.clone());
            tokio::task::spawn_blocking(move || {
                dirs.link_alias()?;
                fill_worktree(&dirs, &request, &env)
            })
            .await
            .expect("moving directories does not panic")
        };
        // The container takes the task's name, as a cold start would give it; a name still taken
        // (a leftover of an earlier run) leaves it the slot's name, which the record then says.
        let renamed = async {
            let Some(container) = &slot.container else {
                return false;
            };
            let task_container = &self.record.container_name;
            let renamed = self
                .runtime
                .rename_container(container, task_container)
                .await
                .is_ok();
            // Its services too, as a cold start names them (`<container>-<service>`); a name
            // is only a name, so a failure is not one.
            let labels = [
                format!("{REPO_LABEL}={}", self.ws.repo_id),
                format!("{}={}", pool::POOL_LABEL, slot.id),
                SERVICE_LABEL.to_owned(),
            ];
            for service in self
                .runtime
                .find_containers(&labels)
                .await
                .unwrap_or_default()
            {
                if let Some(name) = service.labels.get(SERVICE_LABEL) {
                    let _ = self
                        .runtime
                        .rename_container(&service.id, &format!("{task_container}-{name}"))
                        .await;
                }
            }
            renamed
        };
        let (branch, prepared, renamed) = tokio::join!(branch, prepared, renamed);
        if !renamed {
            self.record.container_name = slot.container_name.clone();
        }
        pool::forget(self.ws, &slot.id);
        drop(claim);
        branch.and(prepared).map_err(|e| fail(e, &sandbox))?;
        Ok(sandbox)
    }

    /// The command as the container would have run it, under a shell that notes its pid (for a
    /// graceful stop) and replaces itself with it.
    pub(super) fn exec_spec(&self, sandbox: &Sandbox) -> ExecSpec {
        let defaults = &sandbox.image_defaults;
        let mut command = vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            // A command the image lacks is said as the container's init says it for a cold
            // start, so that the same recognition turns it into agentbox's message (and 127).
            format!(
                "command -v \"$1\" >/dev/null 2>&1 || {{ echo \"[FATAL tini (0)] exec $1 failed: No such file or directory\" >&2; exit 127; }}; echo $$ > {PID_FILE}; exec \"$@\""
            ),
            "sh".to_owned(),
        ];
        // A long-lived task idles in the slot's container as it would in its own.
        let own = if self.request.idle {
            Some(IDLE_COMMAND.iter().map(|s| s.to_string()).collect())
        } else {
            self.request.command.clone()
        };
        if self.request.setup.is_empty() {
            command.extend(defaults.entrypoint.iter().cloned());
            command.extend(own.unwrap_or_else(|| defaults.cmd.clone()));
        } else {
            let (entrypoint, cmd) =
                wrap_with_setup(&self.request.setup, &self.request.shell_env, own, defaults);
            command.extend(entrypoint);
            command.extend(cmd);
        }
        ExecSpec {
            command,
            env: crate::environment::docker_env(&self.env),
            working_dir: None,
            user: self.request.user.clone(),
            tty: false,
            stdin: false,
        }
    }

    /// Whether the OOM killer killed anything in the container: the memory cgroup counts it
    /// (`oom_kill` in cgroup v2's `memory.events`, v1's `memory.oom_control`). Read-only to the task;
    /// at worst a task that replaced `cat` gets a wrong message about itself.
    pub(super) async fn was_oom_killed(&self, container: &str) -> bool {
        const MAX: usize = 4096;
        let spec = ExecSpec {
            command: vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                "cat /sys/fs/cgroup/memory.events 2>/dev/null || cat /sys/fs/cgroup/memory/memory.oom_control".to_owned(),
            ],
            ..ExecSpec::default()
        };
        let Ok(mut execution) = self.runtime.exec(container, &spec).await else {
            return false;
        };
        let mut said = Vec::new();
        while let Some(Ok(item)) = futures::StreamExt::next(&mut execution.output).await {
            if let crate::runtime::Output::Stdout(bytes) = item
                && said.len() < MAX
            {
                said.extend_from_slice(&bytes[..bytes.len().min(MAX - said.len())]);
            }
        }
        String::from_utf8_lossy(&said).lines().any(|line| {
            line.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    }

    /// Asks the command to end (SIGTERM), as the container's own would be asked by a stop.
    pub(super) fn graceful_exec_stop(&self) -> ExecSpec {
        ExecSpec {
            command: vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                format!("kill -TERM \"$(cat {PID_FILE})\" 2>/dev/null"),
            ],
            user: self.request.user.clone(),
            ..ExecSpec::default()
        }
    }
}
