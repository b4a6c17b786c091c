//! `agentbox mcp`: the MCP server on stdio. The server is the library's (`agentbox::mcp`); this file
//! gives it the repository, the engine, and the way to start long-lived tasks: `agentbox up` under
//! a background supervisor, as a person would.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use agentbox::mcp::{CreateTask, Launcher, Server};

use super::detach::{Background, STARTED};
use super::{CommandError, Context, failed, labels};

/// Serve this repository's tasks as MCP tools on stdin/stdout, for Claude Code, Cursor, Codex or
/// any MCP client (`claude mcp add agentbox -- agentbox mcp`)
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A label for the containers of every task the server creates
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
}

pub async fn mcp(context: &Context, args: Args) -> Result<u8, CommandError> {
    labels(&args.labels).map_err(|e| failed(e.render()))?;
    let ws = context.workspace().map_err(failed)?;
    let runtime = context.runtime().await.map_err(failed)?;
    let launcher = UpLauncher {
        repo: context.start_dir(),
        labels: args.labels,
    };
    let server = Server::new(ws, runtime, Arc::new(launcher))
        .with_notes(|line| eprintln!("agentbox mcp: {line}"));
    eprintln!("agentbox mcp: serving on stdio");
    server.serve_stdio().await.map_err(failed)?;
    Ok(0)
}

/// Starts tasks with `agentbox up` under a supervisor of their own, which outlives the server.
struct UpLauncher {
    repo: PathBuf,
    labels: Vec<String>,
}

#[async_trait::async_trait]
impl Launcher for UpLauncher {
    async fn up(&self, request: &CreateTask) -> Result<(), String> {
        let task = request.task.to_string();
        let mut args: Vec<OsString> = vec!["up".into(), "--repo".into(), self.repo.clone().into()];
        for label in &self.labels {
            args.extend(["--label".into(), label.into()]);
        }
        if let Some(base) = &request.base {
            args.extend(["--base".into(), base.into()]);
        }
        if let Some(image) = &request.image {
            args.extend(["--image".into(), image.into()]);
        }
        for (key, value) in &request.env {
            args.extend(["--env".into(), format!("{key}={value}").into()]);
        }
        // The task's name last, after `--`-free options: a name is never an option.
        args.push(task.clone().into());
        let mut supervisor = Background::spawn(&task, args, &[], false)
            .map_err(|e| e.render())?
            .without_signal_forwarding();
        match supervisor.next_line().await {
            Some(line) if line == STARTED => Ok(()),
            _ => {
                let (status, said) = supervisor.ending().await.map_err(|e| e.render())?;
                let said = String::from_utf8_lossy(&said);
                let said = said
                    .lines()
                    .map(|l| l.strip_prefix("agentbox: error: ").unwrap_or(l))
                    .collect::<Vec<_>>()
                    .join("\n");
                if said.trim().is_empty() {
                    Err(format!(
                        "the supervisor of task {task} ended ({status}) before the task started"
                    ))
                } else {
                    Err(said.trim().to_owned())
                }
            }
        }
    }
}
