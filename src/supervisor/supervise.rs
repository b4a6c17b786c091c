//! A created task from its start to the end of its command: output, start gate, live import,
//! stop requests.

use tokio::sync::watch;

use super::{
    Launch, RunError, RunEvent, RunOutcome, Running, SetupFailure, StopLevel, StopSignal,
    Supervised, live_import, output,
};
use crate::runtime::{Exit, RuntimeError, Sandbox, StartError};
use crate::task::TaskState;

impl Supervised<'_> {
    pub(super) async fn supervise(
        mut self,
        sandbox: Sandbox,
        launch: Launch,
    ) -> Result<RunOutcome, RunError> {
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
            // What is left in a slot's container after its command is its idle process. Once
            // none of its processes is left the work is safe; but a published port stays the
            // engine's until it is done with the container, and the teardown gives the task's
            // ports back to the next task.
            if !self.record.ports.is_empty() {
                let _ = self.runtime.kill(&container_id).await;
            } else if self.runtime.kill_processes(&container_id).await.is_ok() {
                self.processes_gone.push(container_id.clone());
            }
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
}
