use agentbox::inspect;
use agentbox::output::json;

use super::{CommandError, Context, EXIT_ERROR, failed, write_stdout};

/// List the tasks of this repository
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per task and line (name, state, branch, base, base_commit, container_id,
    /// worktree, exit_code, started_at, finished_at, image, command, snapshot_commit, error)
    #[arg(long)]
    json: bool,
}

pub fn ls(context: &Context, args: Args) -> Result<u8, CommandError> {
    let ws = context.workspace().map_err(failed)?;
    let inspect::TaskList { tasks, damaged } = inspect::list(&ws).map_err(failed)?;
    let mut out = String::new();
    if args.json {
        for task in &tasks {
            out.push_str(&json::to_string(task).expect("a task view always serialises"));
            out.push('\n');
        }
    } else {
        let rows: Vec<[String; 6]> = tasks
            .iter()
            .map(|t| {
                let urls: Vec<String> = t
                    .ports
                    .iter()
                    .filter_map(|(name, port)| Some(format!("{name}={}", port.url.as_ref()?)))
                    .collect();
                [
                    t.name.clone(),
                    t.state.clone(),
                    t.branch.clone(),
                    t.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    t.started_at.clone(),
                    urls.join(" "),
                ]
            })
            .collect();
        let header = ["NAME", "STATE", "BRANCH", "EXIT", "STARTED", "PORTS"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
    }
    write_stdout(out.as_bytes())?;
    // The tasks that could be read are listed all the same; each one that could not is named.
    for error in &damaged {
        super::say(&format!("agentbox: error: {error}"));
    }
    Ok(if damaged.is_empty() { 0 } else { EXIT_ERROR })
}
