use agentbox::inspect;

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
    write_stdout(&patch)?;
    Ok(0)
}
