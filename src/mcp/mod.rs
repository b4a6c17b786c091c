//! The MCP server: agentbox's tasks as tools for a coding agent (Claude Code, Cursor, Codex, any
//! MCP client), over stdio, through the official Rust SDK (`rmcp`).
//!
//! # Theory of operation
//!
//! One [`Server`] serves one repository. Each tool call is handled on a tokio task of its own, so
//! calls on several tasks (or several calls on one) go on at once; every tool takes the task's name
//! and looks at the task's record, so a task started by the CLI is as usable as one the server
//! made. The tools fall in three groups, one file each:
//!
//! - `tasks`: the life of a task — `task_create` starts a long-lived task (an idle container, its
//!   services with it) under a supervisor process of its own (the [`Launcher`], which the CLI gives:
//!   the same `agentbox up` a person would run), so the task outlives the server; `task_stop` is
//!   `agentbox stop`; `task_commit` commits inside the container, as the task's user, so the task's
//!   own git dir stays the one source of its branch; `task_diff`, `task_list`, `task_logs`,
//!   `task_add_service`.
//! - `run`: `task_run` executes a shell command in the task's container, and returns its exit
//!   code and the tail of its output; the whole output goes to a run log in the state dir.
//! - `files`: read, write, edit, list and delete files in the task's worktree from the host side,
//!   through [`GuardedDir`](crate::fs_guard::GuardedDir): a path with `..`, an absolute path, a
//!   symlink anywhere on the way or at the end (which the task may have planted) are refused.
//!
//! Every result is structured JSON with a short text beside it; every failure is a tool error
//! (not a protocol error) whose text is what the CLI would say, hint included. The server writes
//! nothing to stdout but protocol messages (the SDK owns it); its own notes go to the caller's
//! stderr through [`Server::with_notes`].

mod files;
mod run;
mod tasks;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool_handler};
use serde::Serialize;

use crate::runtime::Runtime;
use crate::task::{TaskName, TaskRecord};
use crate::workspace::Workspace;

pub use run::RunStatus;

/// How long a `task_run` may take when the call does not say.
pub const DEFAULT_RUN_TIMEOUT_SECS: u64 = 600;

/// The server could not talk to its client.
#[derive(Debug, thiserror::Error)]
#[error("the MCP connection failed: {0}")]
pub struct McpError(String);

/// What `task_create` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTask {
    pub task: TaskName,
    /// Commit, branch or tag to start from; `None`: the repository's HEAD.
    pub base: Option<String>,
    /// `None`: `image` of `agentbox.toml`, else the default image.
    pub image: Option<String>,
    pub env: Vec<(String, String)>,
}

/// Starts long-lived tasks under supervisors of their own (the CLI runs `agentbox up`).
#[async_trait::async_trait]
pub trait Launcher: Send + Sync {
    /// Returns once the task runs; the error is what its supervisor said.
    async fn up(&self, request: &CreateTask) -> Result<(), String>;
}

/// The MCP server of one repository.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
    tool_router: ToolRouter<Server>,
}

struct Inner {
    ws: Workspace,
    runtime: Arc<dyn Runtime>,
    launcher: Arc<dyn Launcher>,
    /// Runs started in the background, by task and run number.
    runs: Mutex<BTreeMap<(TaskName, u64), RunStatus>>,
    notes: Box<dyn Fn(&str) + Send + Sync>,
}

impl Server {
    pub fn new(ws: Workspace, runtime: Arc<dyn Runtime>, launcher: Arc<dyn Launcher>) -> Self {
        Self {
            inner: Arc::new(Inner {
                ws,
                runtime,
                launcher,
                runs: Mutex::new(BTreeMap::new()),
                notes: Box::new(|_| {}),
            }),
            tool_router: Self::task_router() + Self::run_router() + Self::file_router(),
        }
    }

    /// Where the server's own notes go (one line each: a task created, a run cancelled).
    pub fn with_notes(mut self, notes: impl Fn(&str) + Send + Sync + 'static) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("set before the server is shared");
        inner.notes = Box::new(notes);
        self
    }

    /// The names of the tools, in order.
    pub fn tool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tool_router
            .list_all()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Serves MCP on stdin and stdout until the client goes away.
    pub async fn serve_stdio(self) -> Result<(), McpError> {
        use rmcp::ServiceExt;
        let running = match self.serve(rmcp::transport::stdio()).await {
            Ok(running) => running,
            // A client that went away before it said anything: nothing to serve.
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => return Ok(()),
            Err(e) => return Err(McpError(e.to_string())),
        };
        running
            .waiting()
            .await
            .map(drop)
            .map_err(|e| McpError(e.to_string()))
    }

    fn ws(&self) -> &Workspace {
        &self.inner.ws
    }

    fn runtime(&self) -> &dyn Runtime {
        &*self.inner.runtime
    }

    fn note(&self, line: &str) {
        (self.inner.notes)(line);
    }
}

/// What agentbox tells an agent that connects.
const INSTRUCTIONS: &str = "agentbox runs each task in its own container on its own git branch \
(agentbox/<task>) in a worktree of its own. Start with task_create (or use a task from task_list); \
then read and change files with file_read, file_write, file_edit, file_list and file_delete, run \
commands (tests, builds, git) with task_run, look at your changes with task_diff, record them with \
task_commit, and end with task_stop, which keeps everything on the branch (uncommitted work as a \
snapshot commit). Paths are relative to the task's worktree.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(rmcp::model::Implementation::new(
                "agentbox",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS)
    }
}

/// A tool's failure: the text the CLI would print, and a hint when there is one.
#[derive(Debug)]
pub struct ToolError {
    message: String,
    hint: Option<String>,
}

impl ToolError {
    fn new(error: impl std::fmt::Display) -> Self {
        Self {
            message: error.to_string(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn into_result(self) -> CallToolResult {
        let mut text = format!("error: {}", self.message);
        if let Some(hint) = &self.hint {
            text.push_str(&format!("\nhint: {hint}"));
        }
        let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
        result.structured_content = Some(serde_json::json!({
            "error": self.message,
            "hint": self.hint,
        }));
        result
    }
}

impl<E: std::error::Error> From<E> for ToolError {
    fn from(error: E) -> Self {
        Self::new(error)
    }
}

type ToolResult = Result<CallToolResult, rmcp::ErrorData>;

/// A result: `value` as the structured content, `text` as the short text beside it.
fn done(text: impl Into<String>, value: impl Serialize) -> ToolResult {
    let value = serde_json::to_value(value).map_err(|e| {
        rmcp::ErrorData::internal_error(format!("cannot serialise a result: {e}"), None)
    })?;
    let mut result = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    result.structured_content = Some(value);
    Ok(result)
}

/// Turns a tool body's outcome into the call's result: a failure is a tool error the agent reads.
fn respond(outcome: Result<CallToolResult, ToolError>) -> ToolResult {
    Ok(outcome.unwrap_or_else(ToolError::into_result))
}

fn parse_task(name: &str) -> Result<TaskName, ToolError> {
    TaskName::parse(name).map_err(ToolError::from)
}

impl Server {
    fn record(&self, task: &TaskName) -> Result<TaskRecord, ToolError> {
        // The same words as the CLI for a task that does not exist.
        crate::inspect::view(self.ws(), task)?;
        self.ws()
            .state
            .read(task)?
            .ok_or_else(|| ToolError::new(format!("no task named {task}")))
    }

    /// The record of a task whose container runs; otherwise what it is and how to start it.
    fn running(&self, task: &TaskName) -> Result<TaskRecord, ToolError> {
        crate::control::running(self.ws(), task).map_err(|e| {
            let hint = match &e {
                crate::control::ControlError::NotRunning { .. } => Some(format!(
                    "task_create with name {task} starts it again on its branch agentbox/{task}"
                )),
                _ => None,
            };
            let error = ToolError::new(e);
            match hint {
                Some(hint) => error.hint(hint),
                None => error,
            }
        })
    }
}
