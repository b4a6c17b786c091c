//! Runs one task from start to end.
//!
//! # Theory of operation
//!
//! [`run`] owns the task for as long as it lives: it claims the task's lock in the state dir (so a
//! second `run` of the same name is refused and a dead run can be recognised), writes the task's record
//! before each step acts, and then
//!
//! 1. makes the task's branch in the repository (if it is new) and the task's own git dirs, then
//!    checks out the worktree *while* the engine checks the images, starts the services and creates
//!    the container: every path the container mounts is known in advance, so the two slow steps
//!    overlap;
//! 2. attaches to the container's output *before* starting it, so no early byte is lost, and pumps the
//!    output into the task's log and to the caller as [`RunEvent::Output`];
//! 3. while the command runs, imports the task's commits into the repository's `agentbox/<task>` as
//!    they appear ([`live_import`]), and watches the stop channel: the first stop request stops the
//!    container gracefully (SIGTERM, grace period, SIGKILL), a second one kills it at once;
//! 4. tears down through [`teardown`](crate::teardown): containers, import, snapshot, removal, ports.
//!    The branch stays; whatever could not be committed keeps the worktree in place.
//!
//! A failure before the command started rolls back everything this run made (containers, network,
//! worktree and git dirs, a branch it created that still points at the base, the ports, the record).

mod live_import;
mod output;
mod plan;
mod pooled;
mod request;

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

pub use request::{
    DEFAULT_IMAGE, DEFAULT_LOG_MAX, DEFAULT_PIDS_LIMIT, IDLE_COMMAND, Interactive, Kept, RunError,
    RunEvent, RunOutcome, RunRequest, RunSummary, StopLevel, StopSignal,
};

use crate::config::EnvVar;
use crate::environment;
use crate::fs_guard::GuardedDir;
use crate::git::{Identity, TaskDirs};
use crate::ports::Owner;
use crate::runtime::{Exit, Runtime, RuntimeError, Sandbox, SandboxPlan, StartError};
use crate::state::TaskClaim;
use crate::task::{TaskName, TaskRecord, TaskState};
use crate::teardown::{self, Ending, Leftovers};
use crate::workspace::Workspace;
use plan::all_port_mappings;
pub(crate) use plan::{own_files, plan, port_names};

const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// Runs the task to its end. See the module documentation for the order of steps.
pub async fn run(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: RunRequest,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
) -> Result<RunOutcome, RunError> {
    let task = request.task.clone();
    // Checked before anything is written, so that a bad base leaves no trace.
    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let base_id = ws.repo.resolve_commit(&base)?;

    let state = ws.state.clone();
    let claim_task = task.clone();
    let claim = tokio::task::spawn_blocking(move || state.try_claim(&claim_task))
        .await
        .expect("claiming a task does not panic")?
        .ok_or_else(|| RunError::AlreadyRunning { task: task.clone() })?;
    let previous = ws.state.read(&task)?;
    if let Some(previous) = &previous {
        // A run that died left the task half-way: finish its teardown (the work goes to the
        // branch), then continue on the branch.
        crate::recovery::recover_for_run(ws, runtime, previous, &claim, request.stop_timeout)
            .await?;
        if !previous.state.can_start() {
            return Err(RunError::KeptBefore {
                task,
                worktree: previous.worktree.clone(),
            });
        }
    }

    let branch = task.branch();
    let existing_tip = ws.repo.branch_tip(&branch)?;
    let base_commit = match existing_tip {
        Some(tip) => ws.repo.merge_base(base_id, tip)?.unwrap_or(base_id),
        None => base_id,
    };
    let worktree = ws.worktree_path(&task);
    let dirs = ws.task_dirs(&task, &worktree);
    for path in [&dirs.worktree, &dirs.git_dir, &dirs.scratch] {
        if path.exists() {
            return Err(RunError::WorktreeExists {
                task,
                path: path.clone(),
            });
        }
    }
    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);

    // A ready slot of the pool, when there is one for this kind of task: its sandbox exists and
    // idles, and only needs to become this task's.
    let slot = if request.use_pool && crate::pool::unpoolable(&request).is_none() {
        let (pool_ws, key) = (ws.clone(), crate::pool::key(&request));
        tokio::task::spawn_blocking(move || crate::pool::claim_ready(&pool_ws, &key))
            .await
            .expect("looking at the pool does not panic")
            .unwrap_or(None)
    } else {
        None
    };
    let (dirs, worktree) = match &slot {
        Some((slot, _)) => {
            let dirs = TaskDirs {
                worktree: slot.worktree.clone(),
                ..ws.pooled_task_dirs(&task, &slot.id)
            };
            let worktree = dirs.worktree.clone();
            (dirs, worktree)
        }
        None => (dirs, worktree),
    };

    // Ports are the first thing reserved (or, from a slot, taken over); from here on every
    // failure releases them.
    let owner = Owner {
        repo_id: ws.repo_id.clone(),
        task: task.to_string(),
    };
    let preferred: BTreeMap<String, u16> = previous
        .iter()
        .flat_map(|p| p.ports.iter().map(|(name, m)| (name.clone(), m.host)))
        .filter(|(_, port)| request.port_range.contains(*port))
        .collect();
    let wanted = port_names(&request);
    let (ledger, range, reserve_owner) = (ws.ports.clone(), request.port_range, owner.clone());
    let slot_owner = slot
        .as_ref()
        .map(|(slot, _)| crate::pool::pool_owner(ws, &slot.id));
    let host_ports = tokio::task::spawn_blocking(move || match slot_owner {
        Some(slot_owner) => ledger.transfer(&slot_owner, &reserve_owner),
        None => ledger.reserve(&reserve_owner, &wanted, range, &preferred),
    })
    .await
    .expect("reserving ports does not panic")?;
    let (plan, env) = match plan(ws, &request, &dirs, &identity, &host_ports) {
        Ok(planned) => planned,
        Err(e) => {
            let _ = ws.ports.release_off_runtime(&owner).await;
            return Err(e.into());
        }
    };

    let record = TaskRecord {
        name: task.clone(),
        state: TaskState::Creating,
        branch: branch.clone(),
        base: base.clone(),
        base_commit: base_commit.to_string(),
        image: request.image.clone(),
        command: plan.task.command.clone().unwrap_or_default(),
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
        own_files: own_files(&request),
        left_out: Vec::new(),
        oom_killed: false,
        memory_limit: request.limits.memory_bytes,
        pool_slot: slot.as_ref().map(|(slot, _)| slot.id.clone()),
        tty: request.interactive.tty,
        stdin: request.interactive.stdin,
        idle: request.idle,
    };
    if let Err(e) = ws.state.save(&record).await {
        let _ = ws.ports.release_off_runtime(&owner).await;
        return Err(e.into());
    }

    let mut run = Supervised {
        ws,
        runtime,
        request,
        record,
        dirs,
        identity,
        owner,
        env,
        events,
        stop,
        claim: std::sync::Arc::new(claim),
        start: existing_tip.unwrap_or(base_id),
    };
    match slot {
        Some((slot, claim)) => match run.adopt(&slot, claim).await {
            Ok(sandbox) => run.supervise(sandbox, Launch::Exec).await,
            Err(failure) => Err(run.roll_back(failure).await),
        },
        None => match run.create(&plan).await {
            Ok(sandbox) => run.supervise(sandbox, Launch::Start).await,
            Err(failure) => Err(run.roll_back(failure).await),
        },
    }
}

/// The task's command while it runs.
enum Running {
    /// The container's own command.
    Container(String),
    /// A command run in the container with `exec`; `ended` fires when its output has ended.
    Exec {
        container: String,
        execution: String,
        ended: tokio::sync::oneshot::Receiver<()>,
    },
}

impl Running {
    fn container(&self) -> &str {
        match self {
            Self::Container(id) | Self::Exec { container: id, .. } => id,
        }
    }
}

/// How the task's command starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// The container's own command: attach, then start the container.
    Start,
    /// In a container that already runs idle (a pool slot's): `exec`.
    Exec,
}

struct Supervised<'a> {
    ws: &'a Workspace,
    runtime: &'a dyn Runtime,
    request: RunRequest,
    record: TaskRecord,
    dirs: TaskDirs,
    identity: Identity,
    owner: Owner,
    /// The full environment, secrets included; it is written only to the worktree's env file.
    env: Vec<EnvVar>,
    events: mpsc::Sender<RunEvent>,
    stop: watch::Receiver<StopLevel>,
    /// Held for as long as the task runs: it is what "supervised" means to everyone else.
    claim: std::sync::Arc<TaskClaim>,
    /// The commit the worktree is checked out at.
    start: gix::ObjectId,
}

/// A creation step that failed, with what existed at that point for the rollback to undo.
struct SetupFailure {
    error: RunError,
    sandbox: Sandbox,
}

impl Supervised<'_> {
    fn task(&self) -> &TaskName {
        &self.record.name
    }

    async fn save(&mut self, state: TaskState) -> Result<(), RunError> {
        self.record.state = state;
        self.ws.state.save(&self.record).await.map_err(Into::into)
    }

    async fn emit(&self, event: RunEvent) {
        // A caller that stopped listening does not stop the task.
        let _ = self.events.send(event).await;
    }

    /// Makes the branch and the git dirs, then checks out and fills the worktree while the engine
    /// creates the sandbox.
    async fn create(&mut self, plan: &SandboxPlan) -> Result<Sandbox, SetupFailure> {
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
                .expect("filling the worktree does not panic")
        };
        let sandbox = self.runtime.create_sandbox(plan);
        let (checkout, sandbox) = tokio::join!(checkout, sandbox);
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
    async fn roll_back(&mut self, failure: SetupFailure) -> RunError {
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

    async fn supervise(mut self, sandbox: Sandbox, launch: Launch) -> Result<RunOutcome, RunError> {
        let container_id = sandbox
            .container
            .clone()
            .expect("a created sandbox has the task's container");
        let fail_setup = |error, sandbox| SetupFailure { error, sandbox };
        let stop_requested = *self.stop.borrow_and_update();
        if let StopLevel::Graceful(signal) | StopLevel::Immediate(signal) = stop_requested {
            let task = self.task().clone();
            let error = RunError::InterruptedBeforeStart { task, signal };
            return Err(self.roll_back(fail_setup(error, sandbox)).await);
        }

        let log = match output::TaskLog::create(
            &self.ws.state.log_path(self.task()),
            self.request.log_max,
        ) {
            Ok(log) => log,
            Err(error) => return Err(self.roll_back(fail_setup(error, sandbox)).await),
        };
        // Attached before the start (a container's output) or with it (an exec's).
        let attached = match launch {
            Launch::Start => self.runtime.attach(&container_id).await.map(Some),
            Launch::Exec => Ok(None),
        };
        let attached = match attached {
            Ok(attached) => attached,
            Err(e) => return Err(self.roll_back(fail_setup(e.into(), sandbox)).await),
        };
        self.emit(RunEvent::Created {
            container_id: container_id.clone(),
            worktree: self.record.worktree.clone(),
            ports: self.record.ports.clone(),
            from_pool: launch == Launch::Exec,
        })
        .await;
        if let Some(gate) = self.request.start_gate.clone()
            && let Err(signal) = self.until_gate_opens(gate).await
        {
            let error = RunError::InterruptedBeforeStart {
                task: self.task().clone(),
                signal,
            };
            return Err(self.roll_back(fail_setup(error, sandbox)).await);
        }

        self.record.container_id = Some(container_id.clone());
        self.save(TaskState::Running).await?;
        let (started, started_gate) = tokio::sync::oneshot::channel();
        let (output_done, output_ended) = tokio::sync::oneshot::channel::<()>();
        let launched = match (launch, attached) {
            (Launch::Start, Some(stream)) => self
                .runtime
                .start(&container_id)
                .await
                .map(|()| (stream, None)),
            (Launch::Start, None) => unreachable!("a container is attached to before its start"),
            (Launch::Exec, _) => {
                let spec = self.exec_spec(&sandbox);
                self.runtime
                    .exec(&container_id, &spec)
                    .await
                    .map(|execution| (execution.output, Some(execution.id)))
            }
        };
        let (stream, execution, started_result) = match launched {
            Ok((stream, execution)) => (stream, execution, Ok(())),
            Err(e) => (
                Box::pin(futures::stream::empty()) as crate::runtime::OutputStream,
                None,
                Err(e),
            ),
        };
        let pump = tokio::spawn(output::pump(
            stream,
            log,
            self.events.clone(),
            started_gate,
            self.request.image.clone(),
            output_done,
        ));
        let mut exit = match started_result {
            Ok(()) => {
                if let (true, Some((rows, cols))) =
                    (self.request.interactive.tty, self.request.interactive.size)
                {
                    // Engines that ignore the size given at creation learn it now, before the
                    // command is likely to ask.
                    let _ = self.runtime.resize(&container_id, rows, cols).await;
                }
                self.emit(RunEvent::Started {
                    container_id: container_id.clone(),
                    worktree: self.record.worktree.clone(),
                })
                .await;
                None
            }
            Err(StartError::NotFound { command }) => {
                let message = format!(
                    "command not found in image {}: {command}",
                    self.request.image
                );
                self.emit(RunEvent::StartFailed { message }).await;
                Some(Exit {
                    code: 127,
                    oom_killed: false,
                })
            }
            Err(StartError::NotExecutable { command }) => {
                let message = format!(
                    "command cannot be executed in image {}: {command}",
                    self.request.image
                );
                self.emit(RunEvent::StartFailed { message }).await;
                Some(Exit {
                    code: 126,
                    oom_killed: false,
                })
            }
            Err(StartError::Runtime(e)) => {
                pump.abort();
                return Err(self.roll_back(fail_setup(e.into(), sandbox)).await);
            }
        };
        let running = match execution {
            Some(execution) => Running::Exec {
                container: container_id.clone(),
                execution,
                ended: output_ended,
            },
            None => Running::Container(container_id.clone()),
        };

        // Output reaches the caller only after `Started` (or `StartFailed`), in that order.
        let _ = started.send(());
        let importer = live_import::LiveImport::start(
            self.ws.clone(),
            self.dirs.clone(),
            self.task().clone(),
            self.events.clone(),
        );
        let mut stopped_by = None;
        let mut wait_error = None;
        let pooled = matches!(running, Running::Exec { .. });
        if exit.is_none() {
            match self.wait_or_stop(running, &mut stopped_by).await {
                Ok(ended) => exit = Some(ended),
                Err(e) => wait_error = Some(e.to_string()),
            }
        }
        if pooled {
            if let Some(exit) = exit.as_mut()
                && exit.code == 137
                && stopped_by.is_none()
                && self.request.limits.memory_bytes.is_some()
            {
                // The container outlives a command of its own that the OOM killer ended, so the
                // engine does not say it; the memory cgroup does.
                exit.oom_killed = self.was_oom_killed(&container_id).await;
            }
            // What is left in a slot's container after its command is its idle process.
            let _ = self.runtime.kill(&container_id).await;
        }
        // The output stream ends when the container stops; drain it so the log is complete.
        if wait_error.is_none() {
            let _ = pump.await;
        } else {
            pump.abort();
        }
        importer.stop().await;

        self.record.exit_code = exit.map(|e| e.code);
        if let Some(exit) = exit {
            if exit.oom_killed {
                self.record.oom_killed = true;
                self.emit(RunEvent::OutOfMemory {
                    limit: self.request.limits.memory_bytes,
                })
                .await;
            }
            self.emit(RunEvent::Exited {
                exit_code: exit.code,
            })
            .await;
        }
        self.save(TaskState::TearingDown).await?;
        self.tear_down(wait_error, stopped_by, exit).await
    }

    /// Waits until the start gate opens (or its sender is gone); a stop request meanwhile is
    /// returned instead.
    async fn until_gate_opens(
        &mut self,
        mut gate: watch::Receiver<bool>,
    ) -> Result<(), StopSignal> {
        let mut listening = true;
        loop {
            if *gate.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                changed = gate.changed() => {
                    if changed.is_err() {
                        // The one who holds the gate is gone: nobody is left to wait for.
                        return Ok(());
                    }
                }
                changed = self.stop.changed(), if listening => {
                    if changed.is_err() {
                        listening = false;
                        continue;
                    }
                    if let StopLevel::Graceful(signal) | StopLevel::Immediate(signal) =
                        *self.stop.borrow_and_update()
                    {
                        return Err(signal);
                    }
                }
            }
        }
    }

    /// Waits for the exit, acting on stop requests meanwhile. A graceful stop runs in the background
    /// so that a second request can still escalate to a kill while the grace period runs; what the
    /// stop and the kill say is reported once the command has ended.
    async fn wait_or_stop(
        &mut self,
        running: Running,
        stopped_by: &mut Option<StopSignal>,
    ) -> Result<Exit, RuntimeError> {
        let runtime = self.runtime;
        let container_id = running.container().to_owned();
        let container_id = container_id.as_str();
        let graceful_exec = self.graceful_exec_stop();
        let grace = self.request.stop_timeout;
        let is_exec = matches!(running, Running::Exec { .. });
        let wait = async move {
            match running {
                Running::Container(id) => runtime.wait(&id).await,
                Running::Exec {
                    execution, ended, ..
                } => {
                    // The output ends when the command does.
                    let _ = ended.await;
                    let code = runtime.exec_exit(&execution).await?;
                    Ok(Exit {
                        code,
                        oom_killed: false,
                    })
                }
            }
        };
        tokio::pin!(wait);
        let mut listening = true;
        let mut stops = futures::stream::FuturesUnordered::new();
        let exit = loop {
            tokio::select! {
                exit = &mut wait => break exit,
                changed = self.stop.changed(), if listening => {
                    if changed.is_err() {
                        listening = false;
                        continue;
                    }
                    let level = *self.stop.borrow_and_update();
                    match level {
                        StopLevel::Continue => {}
                        StopLevel::Graceful(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping).await;
                            self.emit(RunEvent::Stopping { immediate: false }).await;
                            if is_exec {
                                // The command is not the container's own: it is asked itself,
                                // then everything is killed once the grace period is over.
                                let spec = graceful_exec.clone();
                                stops.push(Box::pin(async move {
                                    if let Ok(asked) = runtime.exec(container_id, &spec).await {
                                        let _ = futures::StreamExt::count(asked.output).await;
                                    }
                                    tokio::time::sleep(grace).await;
                                    runtime.kill(container_id).await
                                }) as futures::future::BoxFuture<'_, Result<(), RuntimeError>>);
                            } else {
                                stops.push(Box::pin(runtime.stop(container_id, grace)));
                            }
                        }
                        StopLevel::Immediate(signal) => {
                            stopped_by.get_or_insert(signal);
                            let _ = self.save(TaskState::Stopping).await;
                            self.emit(RunEvent::Stopping { immediate: true }).await;
                            stops.push(Box::pin(runtime.kill(container_id)));
                        }
                    }
                }
                Some(Err(e)) = futures::StreamExt::next(&mut stops), if !stops.is_empty() => {
                    self.emit(RunEvent::Warning { message: format!("stopping task {}: {e}", self.record.name) }).await;
                }
            }
        };
        // A stop still under way ends with the command; one waiting out a grace period is moot.
        drop(stops);
        exit
    }

    async fn tear_down(
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
        problems.extend(report.problems.iter().cloned());
        problems.extend(report.notices.iter().cloned());
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

/// What agentbox says when the out-of-memory killer ended a task.
pub fn out_of_memory_message(task: &TaskName, limit: Option<u64>) -> String {
    match limit {
        Some(limit) => format!(
            "task {task} was killed: out of memory (limit {})",
            crate::config::Bytes(limit)
        ),
        None => format!("task {task} was killed: out of memory"),
    }
}

/// Writes the env file and copies the `copy` entries into the fresh worktree, never through a
/// symlink that the checkout (of a branch the task may have committed to before) put there.
fn fill_worktree(dirs: &TaskDirs, request: &RunRequest, env: &[EnvVar]) -> Result<(), RunError> {
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

#[cfg(test)]
pub(crate) mod tests;
