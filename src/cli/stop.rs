use agentbox::manage;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Stop a running task gracefully; its normal teardown (snapshot, removal) follows
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Kill the command if it has not ended SECS seconds after the stop request [default: the
    /// grace period the task was started with, `run --stop-timeout`]
    #[arg(long, short = 't', value_name = "SECS")]
    time: Option<u64>,
}

pub async fn stop(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let kill_after = args.time.map(std::time::Duration::from_secs);
    manage::stop(&ws, &task, kill_after, context.env.docker_host.as_deref())
        .await
        .map_err(failed)?;
    eprintln!("agentbox: task {task} stopped and torn down");
    Ok(0)
}
