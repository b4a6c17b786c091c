//! Runs one task from start to end.
//!
//! # Theory of operation
//!
//! [`run`] owns the task for as long as it lives: it claims the task's lock in the state dir (so a
//! second `run` of the same name is refused and a dead run can be recognised), writes the task's record
//! before each step acts, and then
//!
//! 1. creates the branch and checks out the worktree *while* it makes sure the image exists and creates
//!    the container: every path the container mounts is known in advance, so the two slow steps
//!    overlap;
//! 2. attaches to the container's output *before* starting it, so no early byte is lost, and pumps the
//!    output into the task's log file and to the caller as [`RunEvent::Output`];
//! 3. waits for the exit while watching the stop channel: the first stop request stops the container
//!    gracefully (SIGTERM, grace period, SIGKILL), a second one kills it at once;
//! 4. tears down: removes the container while it commits whatever the task left uncommitted to the
//!    task's branch (one snapshot commit, hooks disabled) and then removes the worktree. The branch
//!    stays. If the snapshot fails, the worktree stays too: work is never thrown away.
//!
//! A failure before the command started rolls back everything this run made (container, worktree, a
//! branch it created and that still points at the base, the record).

mod plan;
mod request;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};

pub use request::{
    DEFAULT_IMAGE, Kept, RunError, RunEvent, RunOutcome, RunRequest, RunSummary, StopLevel,
    StopSignal,
};

use crate::config::EnvVar;
use crate::docker::{DockerError, Engine, Output, StartError};
use crate::environment;
use crate::git::Identity;
use crate::ports::Owner;
use crate::sandbox::{Sandbox, SandboxPlan};
use crate::state::{StateError, TaskClaim};
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::workspace::Workspace;
use plan::{all_port_mappings, copy_into, own_files, plan, port_names};

/// Runs the task to its end. See the module documentation for the order of steps.
pub async fn run(
    ws: &Workspace,
    engine: &Engine,
    request: RunRequest,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
) -> Result<RunOutcome, RunError> {
    let task = request.task.clone();
    let claim = ws
        .state
        .try_claim(&task)?
        .ok_or_else(|| RunError::AlreadyRunning { task: task.clone() })?;
    let previous = ws.state.read(&task)?;
    if let Some(previous) = &previous {
        // A run that died left the task half-way: finish its teardown (the work goes to the
        // branch), then continue on the branch.
        crate::gc::recover_left_behind(ws, engine, previous, &claim, request.stop_timeout).await?;
        if previous.state == TaskState::Kept {
            return Err(RunError::KeptBefore {
                task,
                worktree: previous.worktree.clone(),
            });
        }
    }

    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let base_id = ws.repo.resolve_commit(&base)?;
    let branch = task.branch();
    let existing_tip = ws.repo.branch_tip(&branch)?;
    let base_commit = match existing_tip {
        Some(tip) => ws.repo.merge_base(base_id, tip)?.unwrap_or(base_id),
        None => base_id,
    }
    .to_string();
    let worktree = ws.worktree_path(&task);
    if worktree.exists() {
        return Err(RunError::WorktreeExists {
            task,
            path: worktree,
        });
    }
    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);

    // Ports are the first thing reserved; from here on every failure releases them.
    let owner = Owner {
        repo_id: ws.repo_id.clone(),
        task: task.to_string(),
    };
    let preferred: BTreeMap<String, u16> = previous
        .iter()
        .flat_map(|p| p.ports.iter().map(|(name, m)| (name.clone(), m.host)))
        .collect();
    let wanted = port_names(&request);
    let ledger = ws.ports.clone();
    let range = request.port_range;
    let reserve_owner = owner.clone();
    let host_ports = tokio::task::spawn_blocking(move || {
        ledger.reserve(&reserve_owner, &wanted, range, &preferred)
    })
    .await
    .expect("reserving ports does not panic")?;
    let planned = plan(ws, &request, &worktree, &identity, &host_ports);
    let (plan, env) = match planned {
        Ok(planned) => planned,
        Err(e) => {
            let _ = ws.ports.release(&owner);
            return Err(e.into());
        }
    };

    let record = TaskRecord {
        name: task.clone(),
        state: TaskState::Creating,
        branch: branch.clone(),
        base: base.clone(),
        base_commit: base_commit.clone(),
        image: request.image.clone(),
        command: request.command.clone().unwrap_or_default(),
        worktree: worktree.clone(),
        container_name: plan.task.name.clone(),
        container_id: None,
        created_branch: existing_tip.is_none(),
        supervisor_pid: std::process::id(),
        exit_code: None,
        started_at: SystemTime::now(),
        finished_at: None,
        snapshot_commit: None,
        error: None,
        ports: all_port_mappings(&request, &host_ports),
        env: environment::masked(&env),
        services: plan.services.iter().map(|s| s.name.clone()).collect(),
        network: plan.network.clone(),
        own_files: own_files(&request),
    };
    if let Err(e) = ws.state.write(&record) {
        let _ = ws.ports.release(&owner);
        return Err(e.into());
    }

    let mut run = Supervised {
        ws,
        engine,
        request,
        record,
        identity,
        owner,
        env,
        events,
        stop,
        claim,
    };
    match run.create(plan).await {
        Ok(sandbox) => run.supervise(sandbox).await,
        Err(failure) => Err(run.roll_back(failure).await),
    }
}

struct Supervised<'a> {
    ws: &'a Workspace,
    engine: &'a Engine,
    request: RunRequest,
    record: TaskRecord,
    identity: Identity,
    owner: Owner,
    /// The full environment, secrets included; it is written only to the worktree's env file.
    env: Vec<EnvVar>,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
    /// Held for as long as the task runs: it is what "supervised" means to everyone else.
    claim: TaskClaim,
}

/// A setup step that failed, with what existed at that point for the rollback to undo.
struct SetupFailure {
    error: RunError,
    sandbox: Sandbox,
    worktree: bool,
}

impl Supervised<'_> {
    fn task(&self) -> &TaskName {
        &self.record.name
    }

    fn save(&mut self, state: TaskState) -> Result<(), StateError> {
        self.record.state = state;
        self.ws.state.write(&self.record)
    }

    async fn emit(&self, event: RunEvent) {
        // A caller that stopped listening does not stop the task.
        let _ = self.events.send(event).await;
    }

    /// Checks out and fills the worktree while the images are checked, the services started and the
    /// task's container created.
    async fn create(&mut self, plan: SandboxPlan) -> Result<Sandbox, SetupFailure> {
        let io_failure = |action, path: PathBuf, source| SetupFailure {
            error: RunError::Io {
                action,
                path,
                source,
            },
            sandbox: Sandbox::default(),
            worktree: false,
        };
        let hooks = self.ws.repo.common_dir.join("hooks");
        // Docker would create a missing bind source itself, as root; make it ours first.
        std::fs::create_dir_all(&hooks)
            .map_err(|e| io_failure("create the hooks directory", hooks, e))?;
        let exclude =
            environment::exclude_from_git(&self.ws.repo.common_dir, &self.request.env_file_name);
        exclude.map_err(|e| {
            let info = self.ws.repo.common_dir.join("info/exclude");
            io_failure("add the env file to", info, e)
        })?;

        let cli = self.ws.git();
        let reason = format!("agentbox task {} is running", self.task());
        let create_at = self
            .record
            .created_branch
            .then_some(self.record.base_commit.as_str());
        let worktree = self.record.worktree.clone();
        let env_file = worktree.join(&self.request.env_file_name);
        let env_vars = &self.env;
        let request = &self.request;
        let checkout = async {
            cli.add_worktree(&worktree, &self.record.branch, create_at, &reason)
                .await
                .map_err(|e| (RunError::from(e), false))?;
            if let Some(source) = &request.copy_from {
                copy_into(source, &worktree, &request.copy).map_err(|e| (e, true))?;
            } else if let Some(first) = request.copy.first() {
                let error = RunError::CopyWithoutCheckout {
                    path: first.clone(),
                };
                return Err((error, true));
            }
            // The env file holds secrets: it lives only in the worktree (mode 0600, ignored by
            // git) for as long as the task does.
            environment::write_env_file(&env_file, env_vars).map_err(|source| {
                let error = RunError::Io {
                    action: "write env file",
                    path: env_file.clone(),
                    source,
                };
                (error, true)
            })
        };
        let sandbox = Sandbox::create(self.engine, plan);
        let (checkout, sandbox) = tokio::join!(checkout, sandbox);
        match (checkout, sandbox) {
            (Ok(()), Ok(sandbox)) => Ok(sandbox),
            (checkout, sandbox) => {
                let worktree_made = match &checkout {
                    Ok(()) => true,
                    Err((_, made)) => *made,
                };
                let (docker_error, sandbox) = match sandbox {
                    Ok(sandbox) => (None, sandbox),
                    Err((e, sandbox)) => (Some(e), sandbox),
                };
                // The engine's error first: it is the one a missing image or a dead engine causes.
                let error = match (docker_error, checkout) {
                    (Some(e), _) => RunError::from(e),
                    (None, Err((e, _))) => e,
                    (None, Ok(())) => unreachable!("one side failed"),
                };
                Err(SetupFailure {
                    error,
                    sandbox,
                    worktree: worktree_made,
                })
            }
        }
    }

    /// Undoes a failed setup. Nothing has run in the worktree yet, so there is no work to keep; a
    /// branch this run created is deleted only if it still points at the base.
    async fn roll_back(&mut self, failure: SetupFailure) -> RunError {
        let SetupFailure {
            error,
            sandbox,
            worktree,
        } = failure;
        let cli = self.ws.git();
        let docker = sandbox.remove(self.engine);
        let git = async {
            // The path did not exist before this run (checked up front), so whatever is there now
            // is this run's, even when `worktree add` failed half-way.
            if worktree || self.record.worktree.exists() {
                cli.remove_worktree(&self.record.worktree)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if self.record.created_branch {
                // Ignored failure: the branch may never have been created.
                let _ = cli
                    .delete_branch_if_at(&self.record.branch, &self.record.base_commit)
                    .await;
            }
            Ok::<_, String>(())
        };
        let (mut problems, git) = tokio::join!(docker, git);
        problems.extend(git.err());
        if let Err(e) = self.ws.ports.release(&self.owner) {
            problems.push(e.to_string());
        }
        if let Err(e) = self.ws.state.remove(self.task(), &self.claim) {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            error
        } else {
            RunError::Setup {
                source: Box::new(error),
                rollback: problems,
            }
        }
    }

    async fn supervise(mut self, sandbox: Sandbox) -> Result<RunOutcome, RunError> {
        let container_id = sandbox
            .container
            .clone()
            .expect("a created sandbox has the task's container");
        let fail_setup = |error, sandbox| SetupFailure {
            error,
            sandbox,
            worktree: true,
        };
        let stop_requested = *self.stop.borrow_and_update();
        if let StopLevel::Graceful(signal) | StopLevel::Immediate(signal) = stop_requested {
            let task = self.task().clone();
            let error = RunError::InterruptedBeforeStart { task, signal };
            return Err(self.roll_back(fail_setup(error, sandbox)).await);
        }

        let log_path = self.ws.state.log_path(self.task());
        let log = match File::create(&log_path) {
            Ok(log) => log,
            Err(source) => {
                let error = RunError::Io {
                    action: "create log file",
                    path: log_path,
                    source,
                };
                return Err(self.roll_back(fail_setup(error, sandbox)).await);
            }
        };
        let output = match self.engine.attach(&container_id).await {
            Ok(output) => output,
            Err(e) => return Err(self.roll_back(fail_setup(e.into(), sandbox)).await),
        };
        let (started, started_gate) = tokio::sync::oneshot::channel();
        let pump = tokio::spawn(pump_output(output, log, self.events.clone(), started_gate));
        self.emit(RunEvent::Created {
            container_id: container_id.clone(),
            worktree: self.record.worktree.clone(),
            ports: self.record.ports.clone(),
        })
        .await;

        self.record.container_id = Some(container_id.clone());
        self.save(TaskState::Running)?;
        let mut exit_code = match self.engine.start(&container_id).await {
            Ok(()) => {
                self.emit(RunEvent::Started {
                    container_id: container_id.clone(),
                    worktree: self.record.worktree.clone(),
                })
                .await;
                None
            }
            Err(StartError::NotFound { message, .. }) => {
                self.emit(RunEvent::StartFailed { message }).await;
                Some(127)
            }
            Err(StartError::NotExecutable { message, .. }) => {
                self.emit(RunEvent::StartFailed { message }).await;
                Some(126)
            }
            Err(StartError::Engine(e)) => {
                pump.abort();
                return Err(self.roll_back(fail_setup(e.into(), sandbox)).await);
            }
        };

        // Output reaches the caller only after `Started` (or `StartFailed`), in that order.
        let _ = started.send(());
        let mut stopped_by = None;
        let mut wait_error = None;
        if exit_code.is_none() {
            match self.wait_or_stop(&container_id, &mut stopped_by).await {
                Ok(code) => exit_code = Some(code),
                Err(e) => wait_error = Some(e.to_string()),
            }
        }
        // The output stream ends when the container stops; drain it so the log is complete.
        if wait_error.is_none() {
            let _ = pump.await;
        } else {
            pump.abort();
        }

        self.record.exit_code = exit_code;
        if let Some(exit_code) = exit_code {
            self.emit(RunEvent::Exited { exit_code }).await;
        }
        self.save(TaskState::TearingDown)?;
        let outcome = self.tear_down(&sandbox, wait_error).await;
        let (state, result) = match outcome {
            Ok(summary) if summary.kept.is_some() => (TaskState::Kept, Ok(summary)),
            Ok(summary) => (TaskState::Exited, Ok(summary)),
            Err(e) => (TaskState::Failed, Err(e)),
        };
        self.record.finished_at = Some(SystemTime::now());
        if let Err(e) = &result {
            self.record.error = Some(e.to_string());
        }
        self.save(state)?;
        let summary = result?;
        Ok(RunOutcome {
            exit_code: exit_code.unwrap_or(125),
            stopped_by,
            summary,
        })
    }

    /// Waits for the exit, acting on stop requests meanwhile. A graceful stop runs in the background
    /// so that a second request can still escalate to a kill while the grace period runs.
    async fn wait_or_stop(
        &mut self,
        container_id: &str,
        stopped_by: &mut Option<StopSignal>,
    ) -> Result<i64, DockerError> {
        let wait = self.engine.wait(container_id);
        tokio::pin!(wait);
        let mut listening = true;
        loop {
            tokio::select! {
                code = &mut wait => return code,
                changed = self.stop.changed(), if listening => {
                    if changed.is_err() {
                        listening = false;
                        continue;
                    }
                    let level = *self.stop.borrow_and_update();
                    let engine = self.engine.clone();
                    let id = container_id.to_owned();
                    match level {
                        StopLevel::Continue => {}
                        StopLevel::Graceful(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping);
                            self.emit(RunEvent::Stopping { immediate: false }).await;
                            let grace = self.request.stop_timeout;
                            tokio::spawn(async move { engine.stop(&id, grace).await });
                        }
                        StopLevel::Immediate(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping);
                            self.emit(RunEvent::Stopping { immediate: true }).await;
                            tokio::spawn(async move { engine.kill(&id).await });
                        }
                    }
                }
            }
        }
    }

    /// Removes the containers and the network while the worktree's leftovers are committed and the
    /// worktree removed; then releases the ports.
    async fn tear_down(
        &mut self,
        sandbox: &Sandbox,
        wait_error: Option<String>,
    ) -> Result<RunSummary, RunError> {
        let mut problems: Vec<String> = wait_error.into_iter().collect();
        let mut kept = None;
        if self.request.keep {
            // Stopped, not removed: the user asked to inspect them.
            let containers = sandbox.container.iter().chain(&sandbox.services);
            let grace = self.request.stop_timeout;
            let stopped =
                futures::future::join_all(containers.map(|id| self.engine.stop(id, grace))).await;
            problems.extend(
                stopped
                    .into_iter()
                    .filter_map(|r| r.err().map(|e| e.to_string())),
            );
            kept = Some(Kept {
                worktree: self.record.worktree.clone(),
                container: self.record.container_name.clone(),
            });
        } else {
            let cli = self.ws.git();
            let message = snapshot_message(self.task(), self.record.exit_code);
            let own_files = self.record.own_files.clone();
            let state = &self.ws.state;
            let record = &self.record;
            let keep_work = async {
                let snapshot = cli
                    .snapshot(&record.worktree, &message, &self.identity, &own_files)
                    .await
                    .map_err(|e| e.to_string())?;
                let removing = TaskRecord {
                    state: TaskState::RemovingWorktree,
                    snapshot_commit: snapshot.clone(),
                    ..record.clone()
                };
                state.write(&removing).map_err(|e| e.to_string())?;
                cli.remove_worktree(&record.worktree)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(snapshot)
            };
            let (removed, kept_work) = tokio::join!(sandbox.remove(self.engine), keep_work);
            problems.extend(removed);
            match kept_work {
                Ok(snapshot) => self.record.snapshot_commit = snapshot,
                Err(e) => problems.push(e),
            }
        }
        if let Err(e) = self.ws.ports.release(&self.owner) {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            return Err(RunError::Teardown {
                task: self.task().clone(),
                worktree: self.record.worktree.clone(),
                problems,
                exit_code: self.record.exit_code,
            });
        }

        let (commits_ahead, files_changed) = match self.ws.repo.branch_tip(&self.record.branch)? {
            Some(tip) => {
                let base: gix::ObjectId = self
                    .record
                    .base_commit
                    .parse()
                    .expect("base_commit was written from an object id");
                let ahead = self.ws.repo.commits_ahead(base, tip)?;
                // No commits of its own, no changed files: spare the git process.
                let files = if ahead == 0 {
                    0
                } else {
                    self.ws
                        .git()
                        .changed_files(&self.record.base_commit, &tip.to_string())
                        .await?
                };
                (ahead, files)
            }
            None => (0, 0),
        };
        Ok(RunSummary {
            task: self.task().clone(),
            branch: self.record.branch.clone(),
            base: self.record.base.clone(),
            commits_ahead,
            files_changed,
            snapshot_commit: self.record.snapshot_commit.clone(),
            kept,
        })
    }
}

fn snapshot_message(task: &TaskName, exit_code: Option<i64>) -> String {
    let ended = match exit_code {
        Some(code) => format!("exited {code}"),
        None => "ended".to_owned(),
    };
    format!(
        "agentbox: snapshot of uncommitted work in task {task}\n\n\
         Task {task} {ended} and left these changes uncommitted; agentbox committed them so that \
         nothing it wrote is lost."
    )
}

/// Copies the container's output into the log file and to the caller, in the order it arrives. The
/// caller gets none of it before `started` fires (or is dropped).
async fn pump_output(
    output: impl futures::Stream<Item = Result<Output, DockerError>>,
    mut log: File,
    events: mpsc::Sender<RunEvent>,
    started: tokio::sync::oneshot::Receiver<()>,
) {
    let mut caller_listening = true;
    let mut started = Some(started);
    futures::pin_mut!(output);
    while let Some(chunk) = output.next().await {
        let Ok(chunk) = chunk else { break };
        let bytes = match &chunk {
            Output::Stdout(b) | Output::Stderr(b) => b,
        };
        // A full disk must not stop the task; its output still reaches the caller.
        let _ = log.write_all(bytes);
        if let Some(gate) = started.take() {
            let _ = gate.await;
        }
        if caller_listening && events.send(RunEvent::Output(chunk)).await.is_err() {
            caller_listening = false;
        }
    }
    let _ = log.flush();
}
