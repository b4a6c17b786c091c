use agentbox::manage;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Stop a running task gracefully; its normal teardown (snapshot, removal) follows
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub async fn stop(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    manage::stop(&ws, &task).await.map_err(failed)?;
    eprintln!("agentbox: task {task} stopped and torn down");
    Ok(0)
}
