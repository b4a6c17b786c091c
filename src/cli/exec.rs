use agentbox::control::{self, ControlError};
use agentbox::runtime::{ExecSpec, StartError};
use agentbox::task::TaskName;

use super::interactive::{Ended, Session, Target};
use super::run::env_flag;
use super::terminal;
use super::{CommandError, Context, EXIT_AGENTBOX_FAILED, task_name};

/// Run a command in a running task's container, with the task's environment, user and working
/// directory; exits with the command's exit code
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Pass stdin to the command
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the command a terminal: this one (raw mode, its size, Ctrl-C for the command)
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable for the command (K=V, or K to pass agentbox's own value)
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the container [default: the task's worktree]
    #[arg(long = "workdir", short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// Keys that detach and leave the command running [default: $AGENTBOX_DETACH_KEYS, or
    /// ctrl-p,ctrl-q]
    #[arg(long, value_name = "KEYS")]
    detach_keys: Option<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn fail(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommandError {
    CommandError::new(error, EXIT_AGENTBOX_FAILED)
}

pub async fn exec(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_AGENTBOX_FAILED)?;
    let mut env = Vec::new();
    for raw in &args.env {
        let var = env_flag(raw, context)?;
        env.push(format!("{}={}", var.key, var.value));
    }
    let spec = ExecSpec {
        command: args.command,
        env,
        working_dir: args.workdir,
        user: None,
        tty: args.tty,
        stdin: args.interactive,
    };
    run_in(context, &task, spec, args.detach_keys.as_deref()).await
}

/// Runs `spec` in the running container of `task` as an interactive session (or a plain one) and
/// returns the command's exit code.
pub(super) async fn run_in(
    context: &Context,
    task: &TaskName,
    spec: ExecSpec,
    detach_keys: Option<&str>,
) -> Result<u8, CommandError> {
    if spec.tty && !terminal::stdin_is_terminal() {
        return Err(
            fail("-t needs a terminal on stdin, and agentbox's stdin is not one")
                .with_hint("leave out -t (and keep -i to pass a pipe to the command), or run agentbox from a terminal"),
        );
    }
    let keys = context.detach_keys(detach_keys, EXIT_AGENTBOX_FAILED)?;
    let ws = context.workspace().map_err(fail)?;
    let record = control::running(&ws, task).map_err(|e| not_running(e, task))?;
    let spec = ExecSpec {
        env: control::exec_env(&record)
            .into_iter()
            .chain(spec.env)
            .collect(),
        ..spec
    };
    let container = record.container_id.unwrap_or_default();
    let runtime = context.runtime().await.map_err(fail)?;
    let execution = match runtime.exec(&container, &spec).await {
        Ok(execution) => execution,
        Err(StartError::NotFound { command }) => {
            eprintln!("agentbox: command not found in task {task}: {command}");
            return Ok(127);
        }
        Err(StartError::NotExecutable { command }) => {
            eprintln!("agentbox: command cannot be executed in task {task}: {command}");
            return Ok(126);
        }
        Err(StartError::Runtime(e)) => return Err(fail(e)),
    };
    let session = Session {
        runtime: &*runtime,
        target: Target::Exec(&execution.id),
        output: execution.output,
        input: execution.input,
        tty: spec.tty,
        detach: keys.watch_if_terminal(),
        // No supervisor runs an exec'd command: a signal ends the session, the command goes on.
        signals_passed_on: false,
    };
    match session.run().await? {
        Ended::Detached => {
            eprintln!("agentbox: detached; the command goes on in task {task}");
            Ok(0)
        }
        Ended::Signalled(code) => Ok(code),
        Ended::NotStarted { not_found, command } => {
            let (what, code) = if not_found {
                ("not found", 127)
            } else {
                ("cannot be executed", 126)
            };
            eprintln!("agentbox: command {what} in task {task}: {command}");
            Ok(code)
        }
        Ended::Finished => {
            let code = runtime.exec_exit(&execution.id).await.map_err(fail)?;
            Ok(u8::try_from(code).unwrap_or(EXIT_AGENTBOX_FAILED))
        }
    }
}

/// A task that does not run says what it is and how to start it again.
fn not_running(e: ControlError, task: &TaskName) -> CommandError {
    let hint = match &e {
        ControlError::NotRunning { state, .. } if state == "orphaned" => {
            format!(
                "its supervisor died; `agentbox gc` cleans up, then `agentbox up {task}` starts it again"
            )
        }
        ControlError::NotRunning { .. } => format!(
            "`agentbox up {task}` starts it again (on its branch agentbox/{task}) and keeps it running for exec and shell"
        ),
        _ => String::new(),
    };
    let error = fail(e);
    if hint.is_empty() {
        error
    } else {
        error.with_hint(hint)
    }
}
