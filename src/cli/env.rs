use agentbox::inspect;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name, write_stdout};

/// Show a task's environment; values from the host's environment or env files are masked
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

/// What a secret shows as: agentbox never stored its value.
const MASK: &str = "********";

pub fn env(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let vars = inspect::env(&ws, &task).map_err(failed)?;
    let mut out = String::new();
    for (key, value) in &vars {
        out.push_str(&format!("{key}={}\n", value.as_deref().unwrap_or(MASK)));
    }
    write_stdout(out.as_bytes())?;
    Ok(0)
}
