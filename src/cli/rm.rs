use agentbox::control;

use super::gc::describe;
use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Forget a finished task; its branch stays unless --delete-branch
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Also delete the task's branch agentbox/<task> and the refs keeping its earlier tips (their
    /// commit ids are printed so they can be restored)
    #[arg(long)]
    delete_branch: bool,
    /// Stop the task first if it is still running
    #[arg(short, long)]
    force: bool,
}

pub async fn rm(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let runtime = if control::removal_needs_runtime(&ws, &task).map_err(failed)? {
        Some(context.runtime().await.map_err(|e| {
            failed(e).with_hint(format!(
                "task {task} left containers or a worktree behind, and cleaning them up needs the engine"
            ))
        })?)
    } else {
        None
    };
    let removal = control::remove(
        &ws,
        runtime.as_deref(),
        &task,
        args.delete_branch,
        args.force,
    )
    .await
    .map_err(failed)?;
    for step in &removal.cleaned_up {
        eprintln!("agentbox: {}", describe(step));
    }
    for (name, tip) in &removal.deleted_refs {
        eprintln!(
            "agentbox: deleted {name} (was {tip}; `git update-ref {name} {tip}` restores it)"
        );
    }
    eprintln!("agentbox: removed task {task}");
    Ok(0)
}
