use agentbox::control;
use agentbox::{TaskRecord, TaskState};

use super::{CommandError, Context, EXIT_AGENTBOX_FAILED, EXIT_ERROR, failed, task_name};

/// Wait until a task has ended and exit with its exit code
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub async fn wait(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let record = control::wait(&ws, &task).await.map_err(failed)?;
    ended(&record)
}

/// The exit code of a task that has ended, as its `agentbox run` exited: the command's own, or 125
/// (with the reason) when agentbox failed or the task's supervisor died.
pub(super) fn ended(record: &TaskRecord) -> Result<u8, CommandError> {
    let task = &record.name;
    let agentbox_failed = |message: String| Err(CommandError::new(message, EXIT_AGENTBOX_FAILED));
    if record.oom_killed {
        let limit = record.memory_limit;
        eprintln!(
            "agentbox: {}",
            agentbox::supervisor::out_of_memory_message(task, limit)
        );
    }
    match (record.state, record.exit_code) {
        (TaskState::Exited | TaskState::Kept | TaskState::Recovered, Some(code)) => {
            Ok(u8::try_from(code).unwrap_or(EXIT_AGENTBOX_FAILED))
        }
        (TaskState::Recovered, None) => agentbox_failed(format!(
            "the supervisor of task {task} died before the task ended, so its exit code is unknown; its work is on branch {}",
            record.branch
        )),
        (TaskState::Failed, _) => agentbox_failed(format!(
            "task {task} failed: {}",
            record.error.as_deref().unwrap_or("no reason was recorded")
        )),
        (state, _) if state.is_active() => agentbox_failed(format!(
            "the supervisor of task {task} died; `agentbox gc` stops what is left and keeps its work on branch {}",
            record.branch
        )),
        (state, _) => agentbox_failed(format!(
            "task {task} is {} but no exit code was recorded",
            state.as_str()
        )),
    }
}
