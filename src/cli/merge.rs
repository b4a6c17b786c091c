use agentbox::control;
use agentbox::land::LandError;
use agentbox::land::merge::{self, MergeOptions, Mode};

use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Land a task's branch on a branch (default: the one it started from), without touching your
/// working tree unless that branch is checked out there and clean
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// The branch to land on [default: the task's base branch]
    #[arg(long, value_name = "BRANCH")]
    into: Option<String>,
    /// One new commit with all of the task's changes instead of a merge commit
    #[arg(long, group = "mode")]
    squash: bool,
    /// The task's commits made again on top of the branch (its own branch stays as it is)
    #[arg(long, group = "mode")]
    rebase: bool,
    /// Only a fast-forward; refused when the branch has commits the task does not
    #[arg(long, group = "mode")]
    ff_only: bool,
    /// Afterwards, remove the task and its branch, as `agentbox rm --delete-branch`
    #[arg(long)]
    delete: bool,
    /// Run the repository's hooks (pre-merge-commit, pre-commit, commit-msg, ...) in a temporary
    /// worktree; they run your project's tools over the task's files
    #[arg(long)]
    run_hooks: bool,
    /// Let the merge drivers your git configuration defines run for the files the branch's
    /// .gitattributes give them (by default only git's built-in ones)
    #[arg(long)]
    merge_drivers: bool,
    /// The message of the merge or squash commit
    #[arg(long, short, value_name = "MSG")]
    message: Option<String>,
}

pub async fn merge(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let mode = match (args.squash, args.rebase, args.ff_only) {
        (true, _, _) => Mode::Squash,
        (_, true, _) => Mode::Rebase,
        (_, _, true) => Mode::FfOnly,
        _ => Mode::Merge,
    };
    let options = MergeOptions {
        into: args.into,
        mode,
        run_hooks: args.run_hooks,
        merge_drivers: args.merge_drivers,
        message: args.message,
    };
    let landing = merge::merge(&ws, &task, &options)
        .await
        .map_err(|e| with_hint(&task, e))?;
    let (from, to) = (short_hex(&landing.from), short_hex(&landing.to));
    if landing.already_landed {
        eprintln!(
            "agentbox: task {task} is on {} already; nothing to do",
            landing.target
        );
    } else {
        let what = match mode {
            Mode::Merge => "a merge commit".to_owned(),
            Mode::Squash => "one squashed commit".to_owned(),
            Mode::Rebase => plural(landing.commits, "rebased commit"),
            Mode::FfOnly => format!("a fast-forward of {}", plural(landing.commits, "commit")),
        };
        eprintln!(
            "agentbox: landed task {task} on {}: {from}..{to} ({what})",
            landing.target
        );
        for checkout in &landing.checkouts {
            eprintln!(
                "agentbox: updated the checkout of {} in {}",
                landing.target,
                checkout.display()
            );
        }
    }
    if args.delete {
        let removal = control::remove(&ws, None, &task, true, false).await;
        let (deleted, removed) = match removal {
            Ok(removal) => (removal.deleted_refs, true),
            // Forgotten by agentbox (`rm` kept the branch): the branch and its earlier tips go.
            Err(control::ControlError::Inspect(agentbox::inspect::InspectError::UnknownTask {
                ..
            })) => {
                let deleted = control::delete_refs(&ws, &task, &task.branch())
                    .await
                    .map_err(failed)?;
                (deleted, false)
            }
            Err(e) => {
                return Err(failed(e).with_hint(format!(
                    "the task landed; `agentbox rm --delete-branch {task}` removes it once that is fixed"
                )));
            }
        };
        for (name, tip) in &deleted {
            eprintln!(
                "agentbox: deleted {name} (was {tip}; `git update-ref {name} {tip}` restores it)"
            );
        }
        if removed {
            eprintln!("agentbox: removed task {task}");
        }
    }
    Ok(0)
}

fn with_hint(task: &agentbox::TaskName, error: LandError) -> CommandError {
    let hint = match &error {
        LandError::Conflict { target, .. } => Some(format!(
            "let the task resolve it: run it again (`agentbox run {task} -- ...` continues on its branch), where `git merge {target}` shows the same conflict"
        )),
        LandError::NotFastForward { .. } => Some(format!(
            "`agentbox merge --rebase {task}` puts its commits on top instead"
        )),
        _ => None,
    };
    let command = failed(error);
    match hint {
        Some(hint) => command.with_hint(hint),
        None => command,
    }
}

fn short_hex(hex: &str) -> String {
    hex.get(..7).unwrap_or(hex).to_owned()
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}
