use std::time::Duration;

use agentbox::docker::Engine;
use agentbox::gc::{self, ActionKind, GcAction, GcOptions};

use super::{CommandError, Context, failed, write_stdout};

/// Clean up after tasks whose supervisor died: stop and remove their containers, commit their
/// uncommitted work to their branches, remove their worktrees. Running tasks are left alone
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show what would be done; change nothing
    #[arg(long)]
    dry_run: bool,
    /// One JSON object per step on stdout (action, task, target, dry_run, ok, error,
    /// snapshot_commit)
    #[arg(long)]
    json: bool,
    /// Seconds a container that still runs gets between SIGTERM and SIGKILL
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
}

pub async fn gc(context: &Context, args: Args) -> Result<u8, CommandError> {
    let ws = context.workspace().map_err(failed)?;
    let engine = Engine::connect(context.env.docker_host.as_deref())
        .await
        .map_err(failed)?;
    let options = GcOptions {
        dry_run: args.dry_run,
        stop_timeout: Duration::from_secs(args.stop_timeout),
    };
    let mut stdout_open = true;
    let mut report = |action: &GcAction| {
        if args.json {
            let mut line = serde_json::to_string(action).expect("a gc action always serialises");
            line.push('\n');
            // A reader that went away stops the JSON, not the clean-up.
            stdout_open = stdout_open && write_stdout(line.as_bytes()).unwrap_or(false);
        } else if action.error.is_none() {
            eprintln!("agentbox: {}", describe(action));
        }
        if let Some(error) = &action.error {
            eprintln!("agentbox: error: {error}");
        }
    };
    let summary = gc::reconcile(&ws, &engine, &options, &mut report)
        .await
        .map_err(failed)?;
    if !args.json {
        if summary.actions == 0 {
            eprintln!("agentbox: nothing to clean up");
        }
        if !summary.live.is_empty() {
            eprintln!(
                "agentbox: left alone, still running: {}",
                join(&summary.live)
            );
        }
        if !summary.kept.is_empty() {
            eprintln!(
                "agentbox: left alone, kept with --keep (`agentbox rm <task>` removes them): {}",
                join(&summary.kept)
            );
        }
    }
    if summary.failed > 0 {
        return Err(failed(format!(
            "{} of {} clean-up steps failed (see above); nothing was discarded, and `agentbox gc` tries again",
            summary.failed, summary.actions
        )));
    }
    Ok(0)
}

fn join(tasks: &[agentbox::TaskName]) -> String {
    tasks
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One human line for a step that went well (or would be taken, with --dry-run).
pub(super) fn describe(action: &GcAction) -> String {
    let target = &action.target;
    let (done, planned) = match action.action {
        ActionKind::StopContainer => ("stopped", "would stop"),
        ActionKind::RemoveContainer | ActionKind::RemoveNetwork | ActionKind::RemoveWorktree => {
            ("removed", "would remove")
        }
        ActionKind::ReleasePorts => ("released", "would release"),
        ActionKind::MarkRecord => ("marked", "would mark"),
        ActionKind::PruneWorktree => ("pruned", "would prune"),
    };
    let verb = if action.dry_run { planned } else { done };
    let mut line = match action.action {
        ActionKind::StopContainer | ActionKind::RemoveContainer => {
            format!("{verb} container {target}")
        }
        ActionKind::RemoveNetwork => format!("{verb} network {target}"),
        ActionKind::RemoveWorktree if action.dry_run => {
            format!("{verb} worktree {target}, committing its uncommitted work first")
        }
        ActionKind::RemoveWorktree => format!("{verb} worktree {target}"),
        ActionKind::ReleasePorts => format!("{verb} ports {target}"),
        ActionKind::MarkRecord => format!("{verb} as {target}"),
        ActionKind::PruneWorktree => {
            format!("{verb} git's metadata of missing worktree {target}")
        }
    };
    if let Some(commit) = &action.snapshot_commit {
        line.push_str(&format!(
            "; snapshot commit {commit} keeps its uncommitted work"
        ));
    }
    match &action.task {
        Some(task) => format!("task {task}: {line}"),
        None => line,
    }
}

/// The cheap gc that `run` and `batch` do first: only when a record shows a task left behind by a
/// dead supervisor does it reconcile. Its failures are reported, never fatal: the run itself does
/// not depend on them.
pub(super) async fn recover_left_behind(ws: &agentbox::Workspace, engine: &Engine) {
    match gc::anything_left_behind(ws) {
        Ok(false) => return,
        Ok(true) => {}
        Err(e) => {
            eprintln!("agentbox: warning: cannot look for tasks left behind: {e}");
            return;
        }
    }
    let options = GcOptions {
        dry_run: false,
        stop_timeout: Duration::from_secs(10),
    };
    let mut report = |action: &GcAction| match &action.error {
        None => eprintln!("agentbox: recovered: {}", describe(action)),
        Some(error) => eprintln!("agentbox: warning: {error}"),
    };
    if let Err(e) = gc::reconcile(ws, engine, &options, &mut report).await {
        eprintln!("agentbox: warning: cleaning up tasks left behind failed: {e}");
    }
}
