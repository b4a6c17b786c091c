use agentbox::manage;

use super::gc::describe;
use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Forget a finished task; its branch stays unless --delete-branch
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Also delete the task's branch agentbox/<task> (its commit id is printed so it can be restored)
    #[arg(long)]
    delete_branch: bool,
    /// Stop the task first if it is still running
    #[arg(short, long)]
    force: bool,
}

pub async fn rm(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let removal = manage::remove(
        &ws,
        context.env.docker_host.as_deref(),
        &task,
        args.delete_branch,
        args.force,
    )
    .await
    .map_err(failed)?;
    for step in &removal.cleaned_up {
        eprintln!("agentbox: {}", describe(step));
    }
    if let Some(tip) = &removal.deleted_branch_tip {
        eprintln!(
            "agentbox: deleted branch agentbox/{task} (was {tip}; `git branch agentbox/{task} {tip}` restores it)"
        );
    }
    eprintln!("agentbox: removed task {task}");
    Ok(0)
}
