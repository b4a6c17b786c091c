use agentbox::manage;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name, write_stdout};

/// Show a task's ports and the URLs they are reachable at from the host
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub fn ports(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let ports = manage::ports(&ws, &task).map_err(failed)?;
    let width = ports.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (name, port) in &ports {
        out.push_str(&format!(
            "{name:<width$}  {:>5} -> {}\n",
            port.container, port.url
        ));
    }
    write_stdout(out.as_bytes())?;
    Ok(0)
}
