use agentbox::runtime::ExecSpec;

use super::exec::run_in;
use super::terminal;
use super::{CommandError, Context, EXIT_AGENTBOX_FAILED, task_name};

/// The shell a task's image has: bash if there is one, else sh.
const SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi";

/// Open an interactive shell (the image's bash, else sh) in a running task's container
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Keys that detach and leave the shell running [default: $AGENTBOX_DETACH_KEYS, or
    /// ctrl-p,ctrl-q]
    #[arg(long, value_name = "KEYS")]
    detach_keys: Option<String>,
}

pub async fn shell(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_AGENTBOX_FAILED)?;
    // On a terminal, a terminal; from a pipe, the shell reads the pipe.
    let spec = ExecSpec {
        command: vec!["/bin/sh".into(), "-c".into(), SHELL.into()],
        tty: terminal::stdin_is_terminal(),
        stdin: true,
        ..ExecSpec::default()
    };
    run_in(context, &task, spec, args.detach_keys.as_deref()).await
}
