//! The life of a task: create, list, logs, diff, commit, stop, services.

use std::collections::{BTreeMap, HashMap};

use rmcp::handler::server::wrapper::Parameters;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CreateTask, Server, ToolError, ToolResult, done, parse_task, respond};
use crate::inspect::{self, PortView, TaskView};
use crate::output::log::LogReader;
use crate::ports::{Owner, PortMapping};
use crate::runtime::{
    ContainerSpec, ExecSpec, Network, NetworkSpec, REPO_LABEL, SERVICE_LABEL, TASK_LABEL,
};

/// The most of a log or a diff one call returns; the rest stays where it is.
const MAX_TEXT: usize = 256 * 1024;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateParams {
    /// The task's name: lowercase letters, digits, '.', '_' and '-' (it names the branch
    /// agentbox/<name>, the worktree and the container). A task that ran before continues on its
    /// branch.
    pub name: String,
    /// Commit, branch or tag the task's branch starts from (default: the repository's HEAD).
    #[serde(default)]
    pub base: Option<String>,
    /// Image to run in (default: `image` of agentbox.toml, else agentbox/base:bookworm).
    #[serde(default)]
    pub image: Option<String>,
    /// Extra environment variables for the task's container.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct TaskParams {
    /// The task's name.
    pub task: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct LogsParams {
    /// The task's name.
    pub task: String,
    /// A run's number (from task_run with background): that run's output instead of the task's
    /// own log.
    #[serde(default)]
    pub run: Option<u64>,
    /// Only the last this many lines (default 200).
    #[serde(default)]
    pub tail_lines: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct DiffParams {
    /// The task's name.
    pub task: String,
    /// A diffstat instead of the patch.
    #[serde(default)]
    pub stat: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CommitParams {
    /// The task's name.
    pub task: String,
    /// The commit message.
    pub message: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ServiceParams {
    /// The task's name.
    pub task: String,
    /// The service's name; the task reaches it by this host name.
    pub name: String,
    /// The service's image.
    pub image: String,
    /// Its command (default: the image's); a single string runs under `sh -c`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Ports to publish on 127.0.0.1: name -> container port.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Its environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A task as the tools describe it.
#[derive(Debug, Serialize)]
struct TaskInfo {
    task: String,
    state: String,
    branch: String,
    base: String,
    worktree: String,
    container_id: Option<String>,
    image: String,
    exit_code: Option<i64>,
    long_lived: bool,
    ports: BTreeMap<String, PortView>,
    snapshot_commit: Option<String>,
    error: Option<String>,
}

impl TaskInfo {
    fn new(view: TaskView, long_lived: bool) -> Self {
        Self {
            task: view.name,
            state: view.state,
            branch: view.branch,
            base: view.base,
            worktree: view.worktree.display().to_string(),
            container_id: view.container_id,
            image: view.image,
            exit_code: view.exit_code,
            long_lived,
            ports: view.ports,
            snapshot_commit: view.snapshot_commit,
            error: view.error,
        }
    }
}

impl Server {
    fn info(&self, task: &crate::task::TaskName) -> Result<TaskInfo, ToolError> {
        let record = self.record(task)?;
        let view = inspect::view(self.ws(), task)?;
        Ok(TaskInfo::new(view, record.idle))
    }
}

fn ports_text(ports: &BTreeMap<String, PortView>) -> String {
    ports
        .iter()
        .filter_map(|(name, p)| Some(format!(" {name}: {}", p.url.as_deref()?)))
        .collect()
}

#[tool_router(router = task_router, vis = "pub(super)")]
impl Server {
    #[tool(
        description = "Create a task and start it: its own branch agentbox/<name>, worktree and container, which stays up (its services too) until task_stop. Returns the branch, the worktree and the ports' URLs."
    )]
    async fn task_create(&self, Parameters(params): Parameters<CreateParams>) -> ToolResult {
        respond(self.create(params).await)
    }

    #[tool(description = "List the repository's tasks with their state, branch and ports.")]
    async fn task_list(&self) -> ToolResult {
        respond(self.list())
    }

    #[tool(
        description = "The end of a task's log (its container's output), or of one background run's output."
    )]
    async fn task_logs(&self, Parameters(params): Parameters<LogsParams>) -> ToolResult {
        respond(self.logs(params).await)
    }

    #[tool(
        description = "What the task changed against its base: its worktree as it is now, committed or not, while it runs; its branch once it has ended."
    )]
    async fn task_diff(&self, Parameters(params): Parameters<DiffParams>) -> ToolResult {
        respond(self.diff(params).await)
    }

    #[tool(
        description = "Commit everything the task's worktree holds now (git add -A; git commit) on its branch agentbox/<task>, inside its container, as the task."
    )]
    async fn task_commit(&self, Parameters(params): Parameters<CommitParams>) -> ToolResult {
        respond(self.commit(params).await)
    }

    #[tool(
        description = "Stop a task and tear it down: its container stops, uncommitted work becomes a snapshot commit on its branch (which stays), the worktree goes."
    )]
    async fn task_stop(&self, Parameters(params): Parameters<TaskParams>) -> ToolResult {
        respond(self.stop(params).await)
    }

    #[tool(
        description = "Start a sidecar service (a database, a cache) for a running task, on a network of the task's own, reachable from the task by its name; its ports are published on 127.0.0.1. It goes with the task."
    )]
    async fn task_add_service(&self, Parameters(params): Parameters<ServiceParams>) -> ToolResult {
        respond(self.add_service(params).await)
    }
}

impl Server {
    async fn create(&self, params: CreateParams) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.name)?;
        // An agent that asks again for a task that runs gets it as it is.
        if crate::control::running(self.ws(), &task).is_ok() {
            let info = self.info(&task)?;
            let text = format!(
                "task {task} is already up on branch {}; worktree {}{}",
                info.branch,
                info.worktree,
                ports_text(&info.ports)
            );
            return done(text, info).map_err(|e| ToolError::new(e.message));
        }
        let request = CreateTask {
            task: task.clone(),
            base: params.base,
            image: params.image,
            env: params.env.into_iter().collect(),
        };
        self.inner
            .launcher
            .up(&request)
            .await
            .map_err(ToolError::new)?;
        self.note(&format!("task {task} created"));
        let info = self.info(&task)?;
        let text = format!(
            "task {task} is up on branch {}; worktree {}{}",
            info.branch,
            info.worktree,
            ports_text(&info.ports)
        );
        done(text, info).map_err(|e| ToolError::new(e.message))
    }

    fn list(&self) -> Result<rmcp::model::CallToolResult, ToolError> {
        let mut tasks = Vec::new();
        let mut text = String::new();
        let listed = inspect::list(self.ws())?;
        for view in listed.tasks {
            let task = parse_task(&view.name)?;
            let long_lived = self.record(&task).map(|r| r.idle).unwrap_or(false);
            text.push_str(&format!("{} {} {}\n", view.name, view.state, view.branch));
            tasks.push(TaskInfo::new(view, long_lived));
        }
        if tasks.is_empty() {
            text = "no tasks".into();
        }
        for damaged in &listed.damaged {
            text.push_str(&format!("\nerror: {damaged}"));
        }
        done(text, serde_json::json!({ "tasks": tasks })).map_err(|e| ToolError::new(e.message))
    }

    async fn logs(&self, params: LogsParams) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        self.record(&task)?;
        let dir = match params.run {
            Some(run) => self.ws().state.runs_path(&task).join(run.to_string()),
            None => self.ws().state.log_path(&task),
        };
        let tail = params.tail_lines.unwrap_or(200);
        let status = params.run.and_then(|run| self.run_status(&task, run));
        let text = tokio::task::spawn_blocking(move || -> Result<String, ToolError> {
            // Only the end is kept while the log streams by: a log may hold 100 MiB.
            let mut end = LastBytes::new(MAX_TEXT);
            let mut reader = LogReader::new(&dir);
            reader.read_available(&mut end).map_err(ToolError::from)?;
            let bytes: Vec<u8> = end.0.into_iter().collect();
            Ok(tail_lines(&String::from_utf8_lossy(&bytes), tail, MAX_TEXT))
        })
        .await
        .map_err(ToolError::new)??;
        let short = if text.is_empty() {
            "(no output)".to_owned()
        } else {
            text.clone()
        };
        done(
            short,
            serde_json::json!({ "task": task, "run": params.run, "log": text, "status": status }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn diff(&self, params: DiffParams) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        let patch = inspect::diff(self.ws(), &task, params.stat).await?;
        let truncated = patch.len() > MAX_TEXT;
        let mut text = String::from_utf8_lossy(&patch[..patch.len().min(MAX_TEXT)]).into_owned();
        if truncated {
            text.push_str(&format!(
                "\n[... {} more bytes: `agentbox diff {task}` shows it all]",
                patch.len() - MAX_TEXT
            ));
        }
        let short = if text.is_empty() {
            format!("task {task} changed nothing")
        } else {
            text.clone()
        };
        done(
            short,
            serde_json::json!({ "task": task, "diff": text, "truncated": truncated }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn commit(&self, params: CommitParams) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        if params.message.trim().is_empty() {
            return Err(ToolError::new("the commit message is empty"));
        }
        let record = self.running(&task)?;
        let container = record.container_id.clone().unwrap_or_default();
        // The message travels in the environment, never through a shell's quoting.
        let script = "git add -A && if git diff --cached --quiet; then echo 'nothing to commit' >&2; exit 3; fi \
                      && git commit -q -m \"$AGENTBOX_COMMIT_MESSAGE\" && git rev-parse HEAD";
        let spec = ExecSpec {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: crate::control::exec_env(&record)
                .into_iter()
                .chain([format!("AGENTBOX_COMMIT_MESSAGE={}", params.message)])
                .collect(),
            ..ExecSpec::default()
        };
        let outcome = super::run::collect(self.runtime(), &container, &spec).await?;
        match outcome.exit_code {
            0 => {
                let commit = outcome.stdout.trim().to_owned();
                let short_id = commit.get(..12).unwrap_or(&commit).to_owned();
                self.note(&format!("task {task}: commit {short_id}"));
                done(
                    format!("committed {short_id} on {}", record.branch),
                    serde_json::json!({ "task": task, "commit": commit, "branch": record.branch }),
                )
                .map_err(|e| ToolError::new(e.message))
            }
            3 if outcome.stderr.contains("nothing to commit") => Err(ToolError::new(format!(
                "nothing to commit in task {task}: its worktree is as its last commit"
            ))),
            code => Err(ToolError::new(format!(
                "git commit in task {task} failed with exit code {code}: {}",
                outcome.stderr.trim()
            ))),
        }
    }

    async fn stop(&self, params: TaskParams) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        crate::control::stop(self.ws(), &task, None).await?;
        self.note(&format!("task {task} stopped"));
        let info = self.info(&task)?;
        let text = match &info.snapshot_commit {
            Some(commit) => format!(
                "task {task} stopped and torn down; branch {} keeps its work (snapshot commit {commit})",
                info.branch
            ),
            None => format!(
                "task {task} stopped and torn down; branch {} keeps its work",
                info.branch
            ),
        };
        done(text, info).map_err(|e| ToolError::new(e.message))
    }

    async fn add_service(
        &self,
        params: ServiceParams,
    ) -> Result<rmcp::model::CallToolResult, ToolError> {
        let task = parse_task(&params.task)?;
        let service = params.name.clone();
        let valid = !service.is_empty()
            && service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !service.starts_with('-');
        if !valid {
            return Err(ToolError::new(format!(
                "service name {service:?} must be lowercase letters, digits and '-'"
            )));
        }
        let record = self.running(&task)?;
        // A service is part of the task's sandbox: it gets what a service of agentbox.toml gets,
        // the task's limits, and cannot be where the task has no network to reach it by.
        let sandbox = record.sandbox.ok_or_else(|| {
            ToolError::new(format!(
                "task {task} was started by an older agentbox, which did not record its limits and network; a service would run without them"
            ))
            .hint(format!(
                "task_stop and task_create with name {task} start it again on its branch"
            ))
        })?;
        if sandbox.no_network {
            return Err(ToolError::new(format!(
                "task {task} has no network (--network none), so a service would be out of its reach; nothing was started"
            ))
            .hint("a task started with network bridge (the default) can have services"));
        }
        let container = record.container_id.clone().unwrap_or_default();
        let ws = self.ws();
        let runtime = self.runtime();
        let own = [
            format!("{REPO_LABEL}={}", ws.repo_id),
            format!("{TASK_LABEL}={task}"),
        ];
        // What agentbox and its caller put on the task's container goes on the service too, so
        // that whatever finds the task's containers (teardown, gc, a test's guard) finds it.
        let found = runtime.find_containers(&own).await?;
        let task_labels: HashMap<String, String> = found
            .iter()
            .find(|c| {
                c.id == container || container.starts_with(&c.id) || c.id.starts_with(&container)
            })
            .map(|c| c.labels.clone())
            .ok_or_else(|| ToolError::new(format!("the container of task {task} is gone")))?;
        if found
            .iter()
            .any(|c| c.labels.get(SERVICE_LABEL) == Some(&service))
        {
            return Err(ToolError::new(format!(
                "task {task} already has a service named {service}"
            )));
        }

        // A task without services shares the repository's network, where containers cannot
        // reach each other; a service needs a network of the task's own.
        let network = ws.container_name(&task);
        let networks = runtime.find_networks(&own).await?;
        if !networks.iter().any(|n| n.name == network) {
            let spec = NetworkSpec {
                name: network.clone(),
                labels: task_labels.clone(),
                shared_isolated: false,
            };
            runtime.create_network(&spec).await?;
            runtime.connect_network(&network, &container, &[]).await?;
        }

        let owner = Owner {
            repo_id: ws.repo_id.clone(),
            task: task.to_string(),
        };
        let names: Vec<String> = params
            .ports
            .keys()
            .map(|name| format!("{service}.{name}"))
            .collect();
        let range = ws.load_config()?.port_range.unwrap_or_default();
        let (ledger, reserve_owner, wanted) = (ws.ports.clone(), owner.clone(), names.clone());
        let host_ports = tokio::task::spawn_blocking(move || {
            ledger.reserve(&reserve_owner, &wanted, range, &BTreeMap::new())
        })
        .await
        .map_err(ToolError::new)??;
        let mut labels = task_labels;
        labels.insert(SERVICE_LABEL.to_owned(), service.clone());
        let command = params.command.map(|command| match command.as_slice() {
            [one] => vec!["/bin/sh".to_owned(), "-c".to_owned(), one.clone()],
            _ => command,
        });
        let spec = ContainerSpec {
            name: format!("{network}-{service}"),
            image: params.image.clone(),
            command,
            env: params.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            ports: params
                .ports
                .iter()
                .map(|(name, port)| (*port, host_ports[&format!("{service}.{name}")]))
                .collect(),
            network: Network::Named {
                name: network.clone(),
                aliases: vec![service.clone()],
            },
            limits: sandbox.limits,
            ..ContainerSpec::default()
        };
        let started = async {
            let id = runtime.create_container(&spec).await?;
            runtime.start(&id).await.map_err(|e| {
                ToolError::new(format!(
                    "service {service} of task {task} could not start: {e}"
                ))
            })?;
            Ok::<_, ToolError>(id)
        }
        .await;
        if let Err(e) = started {
            // The service's ports go back; the task's own stay its.
            let ledger = ws.ports.clone();
            let _ = tokio::task::spawn_blocking(move || ledger.release_names(&owner, &names)).await;
            return Err(e);
        }
        let ports: BTreeMap<String, PortView> = params
            .ports
            .iter()
            .map(|(name, port)| {
                let mapping = PortMapping {
                    container: *port,
                    host: host_ports[&format!("{service}.{name}")],
                };
                let view = PortView {
                    container: mapping.container,
                    host: mapping.host,
                    url: Some(mapping.url()),
                };
                (name.clone(), view)
            })
            .collect();
        self.note(&format!("task {task}: service {service} started"));
        let mut text =
            format!("service {service} runs beside task {task}; the task reaches it as {service}");
        for (name, view) in &ports {
            text.push_str(&format!(
                "; {name} ({}) is {}",
                view.container,
                view.url.as_deref().unwrap_or_default()
            ));
        }
        done(
            text,
            serde_json::json!({ "task": task, "service": service, "host": service, "ports": ports }),
        )
        .map_err(|e| ToolError::new(e.message))
    }
}

/// A writer that keeps the last bytes written to it.
struct LastBytes(std::collections::VecDeque<u8>, usize);

impl LastBytes {
    fn new(cap: usize) -> Self {
        Self(std::collections::VecDeque::with_capacity(cap), cap)
    }
}

impl std::io::Write for LastBytes {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let kept = &bytes[bytes.len().saturating_sub(self.1)..];
        let excess = (self.0.len() + kept.len()).saturating_sub(self.1);
        self.0.drain(..excess);
        self.0.extend(kept);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The last `lines` lines of `text`, at most `max` bytes of them (cut at a character boundary).
pub(super) fn tail_lines(text: &str, lines: usize, max: usize) -> String {
    let mut start = text.len();
    let mut seen = 0;
    let body = text.strip_suffix('\n').unwrap_or(text);
    for (index, byte) in body.bytes().enumerate().rev() {
        if byte == b'\n' {
            seen += 1;
            if seen == lines {
                start = index + 1;
                break;
            }
        }
        start = index;
    }
    if lines == 0 {
        start = text.len();
    }
    let mut tail = &text[start..];
    if tail.len() > max {
        let mut cut = tail.len() - max;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = &tail[cut..];
    }
    tail.to_owned()
}

#[cfg(test)]
mod tests {
    use super::tail_lines;

    #[test]
    fn only_the_end_of_a_long_log_is_held() {
        use std::io::Write;
        let mut end = super::LastBytes::new(4);
        end.write_all(b"abcdef").unwrap();
        end.write_all(b"gh").unwrap();
        assert_eq!(end.0.iter().copied().collect::<Vec<u8>>(), b"efgh");
    }

    #[test]
    fn tails_keep_the_last_lines_within_the_bound() {
        assert_eq!(tail_lines("a\nb\nc\n", 2, 100), "b\nc\n");
        assert_eq!(tail_lines("a\nb\nc", 2, 100), "b\nc");
        assert_eq!(tail_lines("a\nb\n", 5, 100), "a\nb\n");
        assert_eq!(tail_lines("a\nb\n", 0, 100), "");
        assert_eq!(tail_lines("héllo\n", 1, 5), "llo\n");
    }
}
