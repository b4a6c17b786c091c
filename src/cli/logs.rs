use std::io;

use agentbox::inspect;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Print a task's log (its stdout and stderr, as they came)
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Keep printing new output until the task ends
    #[arg(short, long)]
    follow: bool,
}

pub fn logs(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let mut stdout = io::stdout().lock();
    match inspect::copy_log(&ws, &task, &mut stdout, args.follow) {
        Ok(()) => Ok(0),
        Err(e) if e.is_broken_pipe() => Ok(0),
        Err(e) => Err(failed(e)),
    }
}
