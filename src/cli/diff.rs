use std::io::IsTerminal;

use agentbox::inspect;
use agentbox::output::sanitize::{Colours, sanitize_text};

use super::{CommandError, Context, EXIT_ERROR, failed, task_name, write_stdout};

/// Show what a task changed against its base
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// A diffstat instead of the patch
    #[arg(long)]
    stat: bool,
}

pub async fn diff(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let patch = inspect::diff(&ws, &task, args.stat).await.map_err(failed)?;
    // The patch holds the task's file contents as they are: on a terminal their control
    // characters are shown, not obeyed; into a pipe or file it goes exact, to be applied.
    if std::io::stdout().is_terminal() {
        write_stdout(sanitize_text(&patch, Colours::Show).as_bytes())?;
    } else {
        write_stdout(&patch)?;
    }
    Ok(0)
}
