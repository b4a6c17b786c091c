use agentbox::control;

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
    let runtime = match args.time {
        Some(_) => Some(context.runtime().await.map_err(failed)?),
        None => None,
    };
    let kill_after = args
        .time
        .map(std::time::Duration::from_secs)
        .zip(runtime.as_deref());
    control::stop(&ws, &task, kill_after)
        .await
        .map_err(failed)?;
    eprintln!("agentbox: task {task} stopped and torn down");
    Ok(0)
}
