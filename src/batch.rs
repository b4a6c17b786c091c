//! Many tasks at once: a task file, a concurrency limit, and one stream of events (with every line
//! of output whole and tagged with its task) for the caller to render as text or JSON Lines.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use std::sync::Arc;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::{CommandSpec, EnvVar, LimitsConfig};
use crate::git::snapshot::LeftOut;
use crate::output::lines::{Line, LineSplitter};
use crate::ports::PortMapping;
use crate::runtime::{Output, Runtime};
use crate::supervisor::{self, RunEvent, RunOutcome, RunRequest, StopLevel};
use crate::task::TaskName;
use crate::workspace::Workspace;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot read task file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: task {index}{}: {message}", path.display(), name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default())]
    Task {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        name: Option<String>,
        message: String,
    },
    #[error("cannot write artifacts to {}: {source}", path.display())]
    Artifacts {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One `[[task]]` of a task file. Every key but `name` is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    name: String,
    command: Option<CommandSpec>,
    base: Option<String>,
    image: Option<String>,
    #[serde(default)]
    env: IndexMap<String, String>,
    #[serde(default)]
    limits: LimitsConfig,
}

/// A task of a batch, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTask {
    pub name: TaskName,
    pub command: Option<Vec<String>>,
    pub base: Option<String>,
    pub image: Option<String>,
    pub env: Vec<EnvVar>,
    pub limits: LimitsConfig,
}

impl BatchTask {
    /// Applies this task's keys over `request` (which holds `agentbox.toml` and the flags).
    pub fn apply(&self, mut request: RunRequest) -> RunRequest {
        request.task = self.name.clone();
        if self.command.is_some() {
            request.command = self.command.clone();
        }
        if self.base.is_some() {
            request.base = self.base.clone();
        }
        if let Some(image) = &self.image {
            request.image = image.clone();
        }
        request.env.extend(self.env.iter().cloned());
        request.apply_limits(&self.limits);
        request
    }
}

/// Parses a task file; every problem is reported with the file and the task, before anything runs.
pub fn parse_task_file(text: &str, path: &Path) -> Result<Vec<BatchTask>, BatchError> {
    let invalid = |message: String| BatchError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_owned()))?;
    let entries = match table.remove("task") {
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            return Err(invalid(
                "`task` must be an array of tables: write [[task]]".into(),
            ));
        }
        None => {
            return Err(invalid(
                "no tasks: add at least one [[task]] with a name".into(),
            ));
        }
    };
    if let Some(key) = table.keys().next() {
        return Err(invalid(format!(
            "unknown key `{key}` (only [[task]] tables belong here)"
        )));
    }
    let mut tasks = Vec::with_capacity(entries.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (position, entry) in entries.into_iter().enumerate() {
        let index = position + 1;
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        let task_error = |message: String| BatchError::Task {
            path: path.to_owned(),
            index,
            name: name.clone(),
            message,
        };
        let entry: TaskEntry = entry
            .try_into()
            .map_err(|e: toml::de::Error| task_error(e.message().to_owned()))?;
        let task = TaskName::parse(&entry.name).map_err(|e| task_error(e.to_string()))?;
        if let Some(first) = seen.insert(entry.name.clone(), index) {
            return Err(task_error(format!(
                "the name is already used by task {first}"
            )));
        }
        let env = entry
            .env
            .iter()
            .map(|(key, value)| EnvVar {
                key: key.clone(),
                value: value.clone(),
                secret: false,
            })
            .collect();
        tasks.push(BatchTask {
            name: task,
            command: entry.command.map(|c| c.argv()),
            base: entry.base,
            image: entry.image,
            env,
            limits: entry.limits,
        });
    }
    Ok(tasks)
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// How one task of a batch ended. The same object is the `result.json` artifact, the payload of a
/// `torn_down` event and an entry of the `summary` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskResult {
    pub task: String,
    /// The command's exit code; 125 when agentbox failed, 130/143 when a stop request ended the
    /// task or kept it from starting.
    pub exit_code: i64,
    pub duration_ms: u64,
    /// The task's branch; `None` when it does not exist (the task failed or was stopped before
    /// agentbox made it, and a rollback leaves no branch behind).
    pub branch: Option<String>,
    pub commits_ahead: usize,
    pub files_changed: usize,
    pub snapshot_commit: Option<String>,
    /// Whether the command ran at all.
    pub started: bool,
    /// Set when agentbox itself failed for this task.
    pub error: Option<String>,
    /// Files too large for the snapshot; the worktree was kept for them.
    pub left_out: Vec<LeftOut>,
    /// The out-of-memory killer ended the command.
    pub oom_killed: bool,
}

/// What happens in a batch, in order per task. Serialised as one JSON object per line with an
/// `event` field naming the kind; this is the stable `--json` schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum BatchEvent {
    /// Branch, worktree and container exist.
    Created {
        task: String,
        branch: String,
        worktree: PathBuf,
        container_id: String,
        ports: BTreeMap<String, PortMapping>,
        /// The sandbox was a warm pool slot's.
        from_pool: bool,
    },
    Started {
        task: String,
    },
    /// One whole line of output (without its newline); a last line without one is delivered when
    /// the command exits. A line longer than 1 MiB comes in pieces, all but the last `continued`.
    Log {
        task: String,
        stream: Stream,
        line: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
    },
    Exited {
        task: String,
        exit_code: i64,
    },
    /// The teardown is complete (or agentbox failed for this task): the task's final result.
    TornDown {
        task: String,
        result: TaskResult,
    },
    /// A task that finished conflicts with one that finished before it: landing both would need
    /// the conflict in `files` resolved.
    Conflict {
        task: String,
        /// The task that finished earlier.
        other: String,
        files: Vec<String>,
    },
    /// The batch is over.
    Summary {
        exit_code: i64,
        tasks: Vec<TaskResult>,
    },
}

/// A [`BatchEvent`] with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timed {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(flatten)]
    pub event: BatchEvent,
}

impl Timed {
    fn now(event: BatchEvent) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        }
    }
}

/// The batch's exit code: 0 when every task exited 0; otherwise the code of the first task, in
/// file order, that did not.
pub fn exit_code(results: &[TaskResult]) -> i64 {
    results
        .iter()
        .map(|r| r.exit_code)
        .find(|code| *code != 0)
        .unwrap_or(0)
}

/// Deletes (or starts deleting) what a task's teardown moved aside: the trash manifest's path.
pub type Purger = Arc<dyn Fn(&Path) + Send + Sync>;

/// Runs every request, at most `parallel` at once, each on a task of its own (so one task's slow
/// step never holds up another's), and returns their results in the order given. Events stream to
/// `events` as they happen; a stop request stops the running tasks (each is torn down, its work
/// kept) and keeps the waiting ones from starting.
pub async fn run(
    ws: &Workspace,
    runtime: Arc<dyn Runtime>,
    requests: Vec<RunRequest>,
    parallel: usize,
    events: mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
    purge: Option<Purger>,
) -> Vec<TaskResult> {
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut running = tokio::task::JoinSet::new();
    for (position, request) in requests.into_iter().enumerate() {
        let (ws, runtime, events, stop, slots, purge) = (
            ws.clone(),
            Arc::clone(&runtime),
            events.clone(),
            stop.clone(),
            Arc::clone(&slots),
            purge.clone(),
        );
        // Slots are handed out in file order: a task starts only after every task before it.
        let slot = slots
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        running.spawn(async move {
            let _slot = slot;
            (
                position,
                run_one(&ws, &*runtime, request, events, stop, purge).await,
            )
        });
    }
    let mut results: Vec<(usize, TaskResult)> = Vec::new();
    // Best effort: a git too old to predict conflicts, or a prediction that fails, says nothing.
    let mut conflicts = crate::land::conflicts::Watch::new(ws).await;
    while let Some(joined) = running.join_next().await {
        let (position, result) = joined.expect("a batch task does not panic");
        if let Some(watch) = conflicts.as_mut()
            && let Some(branch) = &result.branch
            && let Ok(Some(tip)) = ws.repo.branch_tip(branch)
            && let Ok(found) = watch.finished(&result.task, tip).await
        {
            for (other, files) in found {
                let conflict = BatchEvent::Conflict {
                    task: result.task.clone(),
                    other,
                    files,
                };
                let _ = events.send(Timed::now(conflict)).await;
            }
        }
        results.push((position, result));
    }
    results.sort_by_key(|(position, _)| *position);
    let results: Vec<TaskResult> = results.into_iter().map(|(_, r)| r).collect();
    let summary = BatchEvent::Summary {
        exit_code: exit_code(&results),
        tasks: results.clone(),
    };
    let _ = events.send(Timed::now(summary)).await;
    results
}

async fn run_one(
    ws: &Workspace,
    runtime: &dyn Runtime,
    request: RunRequest,
    events: mpsc::Sender<Timed>,
    stop: watch::Receiver<StopLevel>,
    purge: Option<Purger>,
) -> TaskResult {
    let task = request.task.to_string();
    let branch = request.task.branch();
    let began = Instant::now();
    let result = |exit_code, started, error| TaskResult {
        task: task.clone(),
        exit_code,
        duration_ms: 0,
        branch: None,
        commits_ahead: 0,
        files_changed: 0,
        snapshot_commit: None,
        started,
        error,
        left_out: Vec::new(),
        oom_killed: false,
    };
    // Copied out: a borrow held across the run below would block the sender of a stop request.
    let level = *stop.borrow();
    let mut result = match level {
        StopLevel::Graceful(signal) | StopLevel::Immediate(signal) => result(
            i64::from(signal.exit_code()),
            false,
            Some("not started: the batch was interrupted".into()),
        ),
        StopLevel::Continue => {
            let (run_events, run_events_rx) = mpsc::channel(256);
            let forward =
                tokio::spawn(forward(request.task.clone(), run_events_rx, events.clone()));
            let outcome = supervisor::run(ws, runtime, request, run_events, stop.clone()).await;
            let started = forward.await.unwrap_or(false);
            match outcome {
                Ok(outcome) => {
                    if let (Some(purge), Some(trash)) = (&purge, &outcome.summary.trash) {
                        purge(trash);
                    }
                    from_outcome(&task, outcome, started)
                }
                Err(supervisor::RunError::InterruptedBeforeStart { signal, .. }) => result(
                    i64::from(signal.exit_code()),
                    false,
                    Some("not started: the batch was interrupted".into()),
                ),
                // The command ran and ended; only cleaning up after it failed. Its exit code
                // still counts, as with `run`.
                Err(
                    e @ supervisor::RunError::Teardown {
                        exit_code: Some(code),
                        ..
                    },
                ) => result(code, started, Some(e.to_string())),
                Err(e) => result(125, started, Some(e.to_string())),
            }
        }
    };
    if result.branch.is_none() && ws.repo.branch_tip(&branch).ok().flatten().is_some() {
        // A task that failed after its branch existed (say, in its teardown): the work is there.
        result.branch = Some(branch);
    }
    result.duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
    let torn_down = BatchEvent::TornDown {
        task: task.clone(),
        result: result.clone(),
    };
    let _ = events.send(Timed::now(torn_down)).await;
    result
}

fn from_outcome(task: &str, outcome: RunOutcome, started: bool) -> TaskResult {
    let summary = outcome.summary;
    TaskResult {
        task: task.to_owned(),
        exit_code: outcome
            .stopped_by
            .map(|s| i64::from(s.exit_code()))
            .unwrap_or(outcome.exit_code),
        duration_ms: 0,
        branch: (!summary.branch_deleted).then_some(summary.branch),
        commits_ahead: summary.commits_ahead,
        files_changed: summary.files_changed,
        snapshot_commit: summary.snapshot_commit,
        started,
        error: (!summary.problems.is_empty()).then(|| summary.problems.join("; ")),
        left_out: summary.left_out,
        oom_killed: outcome.oom_killed,
    }
}

/// Turns one task's run events into batch events, cutting output into whole lines (each byte
/// looked at once, at most 1 MiB held per stream). Returns whether the command started.
async fn forward(
    name: TaskName,
    mut run_events: mpsc::Receiver<RunEvent>,
    events: mpsc::Sender<Timed>,
) -> bool {
    let task = name.to_string();
    let mut started = false;
    let mut stdout = LineSplitter::default();
    let mut stderr = LineSplitter::default();
    let mut lines = Vec::new();
    let send = |event| events.send(Timed::now(event));
    while let Some(event) = run_events.recv().await {
        let batch_event = match event {
            RunEvent::Created {
                container_id,
                worktree,
                ports,
                from_pool,
            } => BatchEvent::Created {
                task: task.clone(),
                branch: name.branch(),
                worktree,
                container_id,
                ports,
                from_pool,
            },
            RunEvent::Started { .. } => {
                started = true;
                BatchEvent::Started { task: task.clone() }
            }
            RunEvent::Output(output) => {
                let (stream, splitter, bytes) = match &output {
                    Output::Stdout(b) => (Stream::Stdout, &mut stdout, b),
                    Output::Stderr(b) => (Stream::Stderr, &mut stderr, b),
                    Output::NotStarted { .. } => continue,
                };
                splitter.push_into(bytes, &mut lines);
                for line in lines.drain(..) {
                    let _ = send(log_event(&task, stream, line)).await;
                }
                continue;
            }
            RunEvent::Exited { exit_code } => {
                for (stream, splitter) in
                    [(Stream::Stdout, &mut stdout), (Stream::Stderr, &mut stderr)]
                {
                    if let Some(rest) = splitter.finish() {
                        let _ = send(log_event(&task, stream, rest)).await;
                    }
                }
                BatchEvent::Exited {
                    task: task.clone(),
                    exit_code,
                }
            }
            RunEvent::StartFailed { message } | RunEvent::Warning { message } => BatchEvent::Log {
                task: task.clone(),
                stream: Stream::Stderr,
                line: format!("agentbox: {message}"),
                continued: false,
            },
            RunEvent::OutOfMemory { limit } => BatchEvent::Log {
                task: task.clone(),
                stream: Stream::Stderr,
                line: format!(
                    "agentbox: {}",
                    supervisor::out_of_memory_message(&name, limit)
                ),
                continued: false,
            },
            RunEvent::Stopping { .. } => continue,
        };
        let _ = send(batch_event).await;
    }
    started
}

fn log_event(task: &str, stream: Stream, line: Line) -> BatchEvent {
    BatchEvent::Log {
        task: task.to_owned(),
        stream,
        line: String::from_utf8_lossy(&line.bytes).into_owned(),
        continued: line.continued,
    }
}

/// Writes a task's artifacts into `dir/<task>/`: `log.txt` (its full output), `changes.patch` (its
/// branch against its base, `git apply`-able) and `result.json`.
pub async fn write_artifacts(
    ws: &Workspace,
    dir: &Path,
    result: &TaskResult,
) -> Result<(), BatchError> {
    let task_dir = dir.join(&result.task);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BatchError::Artifacts { path, source }
    };
    std::fs::create_dir_all(&task_dir).map_err(io(&task_dir))?;
    let name = TaskName::parse(&result.task).expect("results carry validated names");
    let log = task_dir.join("log.txt");
    let mut file = std::fs::File::create(&log).map_err(io(&log))?;
    // A task that never started has no log; an empty file says so plainly.
    crate::output::log::LogReader::new(&ws.state.log_path(&name))
        .read_available(&mut file)
        .map_err(|e| io(&log)(std::io::Error::other(e.to_string())))?;
    let patch_path = task_dir.join("changes.patch");
    let patch = match ws.state.read(&name) {
        Ok(Some(record)) if ws.repo.branch_tip(&record.branch).ok().flatten().is_some() => {
            let tip = format!("refs/heads/{}", record.branch);
            let args = [
                "diff",
                "--no-color",
                "--no-ext-diff",
                "--no-textconv",
                "--binary",
                &record.base_commit,
                &tip,
            ];
            ws.repo
                .git()
                .run(&args)
                .await
                .map(|out| out.stdout)
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    std::fs::write(&patch_path, patch).map_err(io(&patch_path))?;
    let result_path = task_dir.join("result.json");
    let json = serde_json::to_vec_pretty(result).expect("a result always serialises");
    std::fs::write(&result_path, json).map_err(io(&result_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("tasks.toml")
    }

    #[test]
    fn parses_tasks_with_optional_keys() {
        let tasks = parse_task_file(
            r#"
[[task]]
name = "fix-auth"
command = "make test"
base = "main"
image = "img"
env = { LEVEL = "2" }

[[task]]
name = "lint"
command = ["cargo", "clippy"]
"#,
            path(),
        )
        .unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            tasks[0].command.as_deref().unwrap(),
            ["sh", "-c", "make test"]
        );
        assert_eq!(tasks[0].env[0].key, "LEVEL");
        assert_eq!(tasks[1].command.as_deref().unwrap(), ["cargo", "clippy"]);
        assert_eq!(tasks[1].base, None);
    }

    #[test]
    fn errors_name_the_file_and_the_task() {
        let unknown =
            parse_task_file("[[task]]\nname = \"a\"\ncomand = \"x\"\n", path()).unwrap_err();
        assert!(
            unknown
                .to_string()
                .starts_with("tasks.toml: task 1 (\"a\"): unknown field `comand`"),
            "{unknown}"
        );
        let dup = parse_task_file("[[task]]\nname = \"a\"\n[[task]]\nname = \"a\"\n", path())
            .unwrap_err();
        assert_eq!(
            dup.to_string(),
            "tasks.toml: task 2 (\"a\"): the name is already used by task 1"
        );
        let bad = parse_task_file("[[task]]\nname = \"../x\"\n", path()).unwrap_err();
        assert!(
            bad.to_string()
                .starts_with("tasks.toml: task 1 (\"../x\"): task name"),
            "{bad}"
        );
        let empty = parse_task_file("", path()).unwrap_err();
        assert!(empty.to_string().contains("no tasks"), "{empty}");
        let stray = parse_task_file("parallel = 3\n[[task]]\nname = \"a\"\n", path()).unwrap_err();
        assert!(
            stray.to_string().contains("unknown key `parallel`"),
            "{stray}"
        );
    }

    #[tokio::test]
    async fn a_failed_teardown_keeps_the_commands_exit_code() {
        let fx = crate::supervisor::tests::fixture();
        let fake = crate::runtime::fake::FakeRuntime::default();
        fake.exit_with(crate::runtime::Exit {
            code: 3,
            oom_killed: false,
        });
        fake.fail_on("remove_container");
        let (events, mut received) = mpsc::channel(64);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let (_stop, stop) = watch::channel(StopLevel::Continue);
        let results = run(
            &fx.ws,
            Arc::new(fake),
            vec![fx.request("t")],
            1,
            events,
            stop,
            None,
        )
        .await;
        drain.await.unwrap();
        assert_eq!(results[0].exit_code, 3, "{:?}", results[0]);
        let error = results[0].error.as_deref().unwrap_or_default();
        assert!(error.contains("fake engine"), "{error}");
        assert_eq!(results[0].branch.as_deref(), Some("agentbox/t"));
        assert_eq!(exit_code(&results), 3);
    }

    #[test]
    fn exit_code_is_the_first_failure_in_file_order() {
        let result = |task: &str, exit_code| TaskResult {
            task: task.into(),
            exit_code,
            duration_ms: 0,
            branch: None,
            commits_ahead: 0,
            files_changed: 0,
            snapshot_commit: None,
            started: true,
            error: None,
            left_out: Vec::new(),
            oom_killed: false,
        };
        assert_eq!(exit_code(&[result("a", 0), result("b", 0)]), 0);
        assert_eq!(
            exit_code(&[result("a", 0), result("b", 3), result("c", 1)]),
            3
        );
        assert_eq!(exit_code(&[]), 0);
    }
}
