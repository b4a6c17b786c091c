//! `task_run`: a shell command in a task's container, with a time limit, in the background if
//! asked, stopped when the client cancels the call.
//!
//! Stopping a command that runs in a container needs a way to find its processes there: the engine
//! gives no signal to an exec'd command (and its host pid means nothing on a remote engine). Each
//! run gets a token in its environment (`AGENTBOX_RUN`), which every process it starts inherits;
//! to stop it, a second command in the container sends SIGTERM, and after a grace period SIGKILL,
//! to every process whose environment holds the token (read from `/proc/<pid>/environ`, which the
//! task's user may read for its own processes). That needs only `sh`, `tr` and `grep` in the
//! image. A process that clears its environment escapes; the container's teardown ends it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::{RoleServer, tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DEFAULT_RUN_TIMEOUT_SECS, Server, ToolError, ToolResult, done, parse_task, respond};
use crate::output::log::LogWriter;
use crate::runtime::{ExecSpec, Output, Runtime, StartError};
use crate::task::TaskName;

/// The tail of each stream a result shows.
const TAIL_BYTES: usize = 16 * 1024;
/// The most one run's log keeps.
const RUN_LOG_MAX: u64 = 16 << 20;
/// Between SIGTERM and SIGKILL for a run that is stopped.
const KILL_GRACE_SECS: u64 = 2;
/// How long the output may go on after the kill before the run is given up on.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(15);

/// Sends SIGTERM, then SIGKILL, to the processes whose environment holds the token `$1`.
const KILL_SCRIPT: &str = r#"t="$1"; sig=TERM
for round in 1 2; do
  found=
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    if tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qx "AGENTBOX_RUN=$t"; then
      kill -s $sig "$p" 2>/dev/null && found=1
    fi
  done
  [ -z "$found" ] && exit 0
  [ $round = 1 ] && sleep "$2"
  sig=KILL
done"#;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunParams {
    /// The task's name.
    pub task: String,
    /// A shell command line, run with `/bin/sh -c` in the task's worktree, as the task's user,
    /// with its environment.
    pub command: String,
    /// Seconds after which the command is stopped (default 600; no limit for a background run
    /// unless given).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Return at once with the run's number; the output goes to its log (task_logs with `run`).
    #[serde(default)]
    pub background: bool,
    /// Directory to run in, relative to the worktree (default: the worktree).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Extra environment variables for the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStatus {
    pub run: u64,
    /// `running`, `exited`, `timed-out` or `cancelled`.
    pub state: String,
    pub exit_code: Option<i64>,
}

/// How a run ended.
#[derive(Debug, Serialize)]
struct RunResult {
    task: TaskName,
    run: u64,
    exit_code: Option<i64>,
    timed_out: bool,
    cancelled: bool,
    /// The end of its stdout and stderr; `*_bytes` say how much there was in all.
    stdout: String,
    stderr: String,
    stdout_bytes: u64,
    stderr_bytes: u64,
    /// Where the whole output is.
    log: String,
}

/// What the caller can do to a run while it goes on.
enum Stop {
    Timeout,
    Cancelled,
}

#[tool_router(router = run_router, vis = "pub(super)")]
impl Server {
    #[tool(
        description = "Run a shell command in a task's container (in its worktree, as the task, with its environment): tests, builds, git. Returns the exit code and the end of stdout and stderr; the whole output stays in the run's log. With background, returns at once with the run's number."
    )]
    async fn task_run(
        &self,
        Parameters(params): Parameters<RunParams>,
        context: RequestContext<RoleServer>,
    ) -> ToolResult {
        respond(self.run(params, context).await)
    }
}

impl Server {
    async fn run(
        &self,
        params: RunParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        let record = self.running(&task)?;
        let container = record.container_id.clone().unwrap_or_default();
        let working_dir = match params.workdir.as_deref().map(str::trim) {
            None | Some("" | ".") => None,
            Some(dir) => {
                let relative = crate::config::relative_inside(dir).map_err(|_| {
                    ToolError::new(format!(
                        "workdir {dir:?} must be a relative path inside the worktree, without '..'"
                    ))
                })?;
                Some(record.worktree.join(relative).display().to_string())
            }
        };
        let run = self.next_run(&task);
        let token = format!(
            "{}-{}-{run}-{}",
            std::process::id(),
            task,
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let mut env = crate::control::exec_env(&record);
        env.extend(params.env.iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("AGENTBOX_RUN={token}"));
        let spec = ExecSpec {
            command: vec!["/bin/sh".into(), "-c".into(), params.command.clone()],
            env,
            working_dir,
            ..ExecSpec::default()
        };
        let log_dir = self.ws().state.runs_path(&task).join(run.to_string());
        let log = LogWriter::create(&log_dir, RUN_LOG_MAX).map_err(ToolError::from)?;
        let execution = match self.runtime().exec(&container, &spec).await {
            Ok(execution) => execution,
            Err(e) => {
                self.set_status(&task, run, "exited", None);
                return Err(match e {
                    StartError::NotFound { .. } | StartError::NotExecutable { .. } => {
                        ToolError::new(format!(
                            "task {task}'s image has no /bin/sh to run commands with"
                        ))
                    }
                    StartError::Runtime(e) => ToolError::new(e),
                });
            }
        };
        self.note(&format!("task {task}: run {run}: {}", params.command));
        let timeout = params
            .timeout_secs
            .or((!params.background).then_some(DEFAULT_RUN_TIMEOUT_SECS))
            .map(Duration::from_secs);
        let pump = Pump {
            runtime: self.inner.runtime.clone(),
            container: container.clone(),
            token,
            log,
        };
        if params.background {
            let server = self.clone();
            let task_for_run = task.clone();
            tokio::spawn(async move {
                let never = std::future::pending::<()>();
                let result = pump.run(execution, timeout, never).await;
                let state = result.state();
                server.set_status(&task_for_run, run, state, result.exit_code);
                server.note(&format!("task {task_for_run}: run {run} {state}"));
            });
            let status = RunStatus {
                run,
                state: "running".into(),
                exit_code: None,
            };
            return done(
                format!(
                    "run {run} started in task {task}; task_logs with run {run} shows its output"
                ),
                serde_json::json!({ "task": task, "run": run, "status": status }),
            )
            .map_err(|e| ToolError::new(e.message));
        }
        let outcome = pump.run(execution, timeout, context.ct.cancelled()).await;
        let state = outcome.state();
        self.set_status(&task, run, state, outcome.exit_code);
        if outcome.cancelled {
            self.note(&format!("task {task}: run {run} cancelled by the client"));
        }
        let result = RunResult {
            task: task.clone(),
            run,
            exit_code: outcome.exit_code,
            timed_out: outcome.timed_out,
            cancelled: outcome.cancelled,
            stdout: String::from_utf8_lossy(&outcome.stdout.bytes()).into_owned(),
            stderr: String::from_utf8_lossy(&outcome.stderr.bytes()).into_owned(),
            stdout_bytes: outcome.stdout.total,
            stderr_bytes: outcome.stderr.total,
            log: format!("task_logs with task {task} and run {run}"),
        };
        let mut text = match (result.exit_code, result.timed_out, result.cancelled) {
            (_, true, _) => format!(
                "stopped after {}s (timeout)",
                timeout.map(|t| t.as_secs()).unwrap_or_default()
            ),
            (_, _, true) => "cancelled".to_owned(),
            (Some(code), _, _) => format!("exit code {code}"),
            (None, _, _) => "ended; its exit code is unknown".to_owned(),
        };
        for (name, tail) in [("stdout", &result.stdout), ("stderr", &result.stderr)] {
            if !tail.is_empty() {
                text.push_str(&format!(
                    "\n--- {name} (end) ---\n{}",
                    super::tasks::tail_lines(tail, 40, 4096)
                ));
            }
        }
        done(text, result).map_err(|e| ToolError::new(e.message))
    }

    /// The next run number of a task, recorded as running.
    fn next_run(&self, task: &TaskName) -> u64 {
        let on_disk = std::fs::read_dir(self.ws().state.runs_path(task))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let mut runs = self
            .inner
            .runs
            .lock()
            .expect("the run table is never poisoned");
        let in_memory = runs
            .keys()
            .filter(|(t, _)| t == task)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let run = on_disk.max(in_memory) + 1;
        runs.insert(
            (task.clone(), run),
            RunStatus {
                run,
                state: "running".into(),
                exit_code: None,
            },
        );
        run
    }

    fn set_status(&self, task: &TaskName, run: u64, state: &str, exit_code: Option<i64>) {
        let mut runs = self
            .inner
            .runs
            .lock()
            .expect("the run table is never poisoned");
        runs.insert(
            (task.clone(), run),
            RunStatus {
                run,
                state: state.into(),
                exit_code,
            },
        );
    }

    pub(super) fn run_status(&self, task: &TaskName, run: u64) -> Option<RunStatus> {
        let runs = self
            .inner
            .runs
            .lock()
            .expect("the run table is never poisoned");
        runs.get(&(task.clone(), run)).cloned()
    }
}

/// The last bytes of a stream, and how many there were in all.
#[derive(Debug, Default)]
struct Tail {
    kept: VecDeque<u8>,
    total: u64,
}

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        let excess = (self.kept.len() + bytes.len()).saturating_sub(TAIL_BYTES);
        self.kept.drain(..excess);
        self.kept.extend(bytes);
    }

    fn bytes(&self) -> Vec<u8> {
        self.kept.iter().copied().collect()
    }
}

#[derive(Debug, Default)]
struct Outcome {
    exit_code: Option<i64>,
    timed_out: bool,
    cancelled: bool,
    stdout: Tail,
    stderr: Tail,
}

impl Outcome {
    fn state(&self) -> &'static str {
        if self.timed_out {
            "timed-out"
        } else if self.cancelled {
            "cancelled"
        } else {
            "exited"
        }
    }
}

/// Moves a run's output into its log and the tails, and stops it when asked.
struct Pump {
    runtime: std::sync::Arc<dyn Runtime>,
    container: String,
    token: String,
    log: LogWriter,
}

impl Pump {
    async fn run(
        mut self,
        execution: crate::runtime::Execution,
        timeout: Option<Duration>,
        cancelled: impl std::future::Future<Output = ()>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut output = execution.output;
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        tokio::pin!(cancelled);
        let mut stop = None;
        let mut drain_deadline = None;
        loop {
            let give_up = async {
                match drain_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(Output::Stdout(bytes))) => {
                        let _ = self.log.write(&bytes);
                        outcome.stdout.push(&bytes);
                    }
                    Some(Ok(Output::Stderr(bytes))) => {
                        let _ = self.log.write(&bytes);
                        outcome.stderr.push(&bytes);
                    }
                    Some(Ok(Output::NotStarted { command, .. })) => {
                        let message = format!("/bin/sh could not be run: {command}\n");
                        let _ = self.log.write(message.as_bytes());
                        outcome.stderr.push(message.as_bytes());
                    }
                    Some(Err(e)) => {
                        let message = format!("agentbox: reading the output failed: {e}\n");
                        outcome.stderr.push(message.as_bytes());
                        break;
                    }
                    None => break,
                },
                () = &mut deadline, if stop.is_none() => stop = Some(Stop::Timeout),
                () = &mut cancelled, if stop.is_none() => stop = Some(Stop::Cancelled),
                () = give_up => break,
            }
            if let Some(reason) = stop.as_ref().filter(|_| drain_deadline.is_none()) {
                match reason {
                    Stop::Timeout => outcome.timed_out = true,
                    Stop::Cancelled => outcome.cancelled = true,
                }
                self.kill().await;
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_KILL);
            }
        }
        let _ = self.log.finish();
        outcome.exit_code = self.runtime.exec_exit(&execution.id).await.ok();
        outcome
    }

    /// Stops the run's processes inside the container (see the module documentation).
    async fn kill(&self) {
        let spec = ExecSpec {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                KILL_SCRIPT.into(),
                "agentbox-kill".into(),
                self.token.clone(),
                KILL_GRACE_SECS.to_string(),
            ],
            ..ExecSpec::default()
        };
        if let Ok(mut killer) = self.runtime.exec(&self.container, &spec).await {
            while killer.output.next().await.is_some() {}
        }
    }
}

/// What a short command printed, all of it (up to a bound), and its exit code.
pub(super) struct Collected {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a short command in a container to its end and collects its output.
pub(super) async fn collect(
    runtime: &dyn Runtime,
    container: &str,
    spec: &ExecSpec,
) -> Result<Collected, ToolError> {
    const MAX: usize = 1 << 20;
    let mut execution = runtime
        .exec(container, spec)
        .await
        .map_err(ToolError::new)?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(item) = execution.output.next().await {
        match item? {
            Output::Stdout(bytes) if stdout.len() < MAX => stdout.extend_from_slice(&bytes),
            Output::Stderr(bytes) if stderr.len() < MAX => stderr.extend_from_slice(&bytes),
            Output::NotStarted { command, .. } => {
                return Err(ToolError::new(format!(
                    "cannot run {command} in the container"
                )));
            }
            _ => {}
        }
    }
    let exit_code = runtime.exec_exit(&execution.id).await?;
    Ok(Collected {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}
