use std::time::Duration;

use agentbox::recovery::{self, Options};
use agentbox::runtime::Runtime;
use agentbox::teardown::{DEFAULT_MAX_SNAPSHOT_FILE, Step, StepKind};

use super::{CommandError, Context, failed, write_stdout};

/// Clean up after tasks whose supervisor died: stop and remove their containers, import and commit
/// their work to their branches, remove their worktrees. Running and kept tasks are left alone
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
    let runtime = context.runtime().await.map_err(failed)?;
    let options = Options {
        dry_run: args.dry_run,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        max_file_size: DEFAULT_MAX_SNAPSHOT_FILE,
    };
    let mut stdout_open = true;
    let mut report = |action: &Step| {
        if args.json {
            let mut line = serde_json::to_string(action).expect("a gc action always serialises");
            line.push('\n');
            // A reader that went away stops the JSON, not the clean-up.
            stdout_open = stdout_open && write_stdout(line.as_bytes()).unwrap_or(false);
        } else if action.error.is_none() {
            eprintln!("agentbox: {}", describe(action));
        }
        if let Some(error) = &action.error {
            super::say(&format!("agentbox: error: {error}"));
        }
    };
    let summary = recovery::reconcile(&ws, &*runtime, &options, &mut report)
        .await
        .map_err(failed)?;
    if !args.json {
        for network in &summary.shared_networks_removed {
            eprintln!("agentbox: removed network {network}, which no task uses any more");
        }
        if summary.steps == 0
            && summary.shared_networks_removed.is_empty()
            && summary.damaged.is_empty()
        {
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
                "agentbox: left alone, kept (`agentbox rm <task>` removes them): {}",
                join(&summary.kept)
            );
        }
    }
    // Named on stderr even with --json: a damaged record is not a step.
    for damaged in &summary.damaged {
        super::say(&format!("agentbox: error: {damaged}"));
    }
    if summary.failed > 0 {
        return Err(failed(format!(
            "{} of {} clean-up steps failed (see above); nothing was discarded: what could not be cleaned up is kept (`agentbox ls` says why and `agentbox rm` removes it) or left for the next `agentbox gc`",
            summary.failed, summary.steps
        )));
    }
    if !summary.damaged.is_empty() {
        return Err(failed(format!(
            "{} task record{} could not be read (see above); those tasks were left alone, the others cleaned up",
            summary.damaged.len(),
            if summary.damaged.len() == 1 { "" } else { "s" }
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
pub(super) fn describe(action: &Step) -> String {
    let target = &action.target;
    let (done, planned) = match action.action {
        StepKind::StopContainer => ("stopped", "would stop"),
        StepKind::RemoveContainer
        | StepKind::RemoveNetwork
        | StepKind::RemoveVolume
        | StepKind::RemoveWorktree => ("removed", "would remove"),
        StepKind::ImportBranch => ("imported", "would import"),
        StepKind::ReleasePorts => ("released", "would release"),
        StepKind::MarkRecord => ("marked", "would mark"),
    };
    let verb = if action.dry_run { planned } else { done };
    let mut line = match action.action {
        StepKind::StopContainer | StepKind::RemoveContainer => {
            format!("{verb} container {target}")
        }
        StepKind::RemoveNetwork => format!("{verb} network {target}"),
        StepKind::RemoveVolume => format!("{verb} volume {target}"),
        StepKind::ImportBranch => format!("{verb} the task's commits into branch {target}"),
        StepKind::RemoveWorktree if action.dry_run => {
            format!("{verb} worktree {target}, committing its uncommitted work first")
        }
        StepKind::RemoveWorktree => format!("{verb} worktree {target}"),
        StepKind::ReleasePorts => format!("{verb} ports {target}"),
        StepKind::MarkRecord => format!("{verb} as {target}"),
    };
    if let Some(commit) = &action.snapshot_commit {
        line.push_str(&format!(
            "; snapshot commit {commit} keeps its uncommitted work"
        ));
    }
    format!("task {}: {line}", action.task)
}

/// The cheap gc that `run` and `batch` do first: only when a record shows a task left behind by a
/// dead supervisor does it reconcile. Its failures are reported, never fatal: the run itself does
/// not depend on them.
pub(super) async fn recover_left_behind(ws: &agentbox::Workspace, runtime: &dyn Runtime) {
    match recovery::anything_left_behind(ws) {
        Ok(false) => return,
        Ok(true) => {}
        Err(e) => {
            super::say(&format!(
                "agentbox: warning: cannot look for tasks left behind: {e}"
            ));
            return;
        }
    }
    let options = Options {
        dry_run: false,
        stop_timeout: Duration::from_secs(10),
        max_file_size: DEFAULT_MAX_SNAPSHOT_FILE,
    };
    let mut report = |action: &Step| match &action.error {
        None => super::say(&format!("agentbox: recovered: {}", describe(action))),
        Some(error) => super::say(&format!("agentbox: warning: {error}")),
    };
    match recovery::reconcile(ws, runtime, &options, &mut report).await {
        Ok(summary) => {
            for damaged in &summary.damaged {
                super::say(&format!("agentbox: warning: {damaged}"));
            }
        }
        Err(e) => super::say(&format!(
            "agentbox: warning: cleaning up tasks left behind failed: {e}"
        )),
    }
}
