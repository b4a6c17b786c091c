use super::run::{self, TaskOptions};
use super::{CommandError, Context};

/// Start a long-lived task: its container idles (its services with it) until `agentbox stop`, for
/// `exec`, `shell` and agents to run commands in. The same as `run -d <task>` without a command
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    options: TaskOptions,
}

pub async fn up(context: &Context, args: Args) -> Result<u8, CommandError> {
    let args = run::Args {
        options: args.options,
        detach: true,
        interactive: false,
        tty: false,
        detach_keys: None,
        dry_run: false,
        command: Vec::new(),
    };
    run::run(context, args).await
}
