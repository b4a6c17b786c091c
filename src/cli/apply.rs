use agentbox::land::merge;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Put a task's changes into your checkout as staged, uncommitted changes (live while it runs)
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub async fn apply(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let applied = merge::apply(&ws, &task).await.map_err(failed)?;
    if applied.files.is_empty() {
        eprintln!(
            "agentbox: the checkout {} has every change of task {task} already",
            applied.checkout.display()
        );
        return Ok(0);
    }
    let n = applied.files.len();
    let live = if applied.live {
        " (its worktree as it is now)"
    } else {
        ""
    };
    eprintln!(
        "agentbox: applied task {task}{live} to {}: {n} file{} changed, staged and not committed",
        applied.checkout.display(),
        if n == 1 { "" } else { "s" }
    );
    Ok(0)
}
