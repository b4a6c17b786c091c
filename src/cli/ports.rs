use agentbox::inspect;

use super::{CommandError, Context, EXIT_ERROR, failed, task_name, write_stdout};

/// Show a task's ports and the URLs they are reachable at from the host
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub fn ports(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let view = inspect::view(&ws, &task).map_err(failed)?;
    if view.ports.is_empty() {
        eprintln!(
            "agentbox: task {task} has no ports; declare them under [ports] in agentbox.toml"
        );
        return Ok(0);
    }
    let width = view.ports.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (name, port) in &view.ports {
        let url = port
            .url
            .clone()
            .unwrap_or_else(|| format!("(released: task {task} is {})", view.state));
        out.push_str(&format!("{name:<width$}  {:>5} -> {url}\n", port.container));
    }
    write_stdout(out.as_bytes())?;
    Ok(0)
}
