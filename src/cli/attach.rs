use std::io;

use agentbox::Workspace;
use agentbox::control::{self, ControlError};
use agentbox::inspect;
use agentbox::supervisor::StopSignal;
use tokio::signal::unix::{SignalKind, signal};

use super::wait::ended;
use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Follow a task's output until it ends, passing Ctrl-C on to it; exits with its exit code
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
}

pub async fn attach(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Err(failed("cannot listen for Ctrl-C to pass it on to the task"));
    };

    // The log is followed on a thread of its own, with a workspace of its own (gix's repository
    // handle stays on the thread that opened it).
    let (start, state_home, follow_task) = (
        context.start_dir(),
        context.env.state_home.clone(),
        task.clone(),
    );
    let mut follower = tokio::task::spawn_blocking(move || {
        let ws = Workspace::open(&start, &state_home).map_err(failed)?;
        let mut stdout = io::stdout().lock();
        match inspect::copy_log(&ws, &follow_task, &mut stdout, true) {
            Ok(()) => Ok(()),
            Err(e) if e.is_broken_pipe() => Ok(()),
            Err(e) => Err(failed(e)),
        }
    });
    // Whatever reaches attach goes to the supervisor, as if sent to its `agentbox run`: the first
    // signal stops the task gracefully, a second one kills it. attach returns once the teardown is
    // done, when the supervisor lets go of the task and the log follower ends.
    let mut first = None;
    let followed = loop {
        let received = tokio::select! {
            followed = &mut follower => break followed.expect("following a log does not panic"),
            _ = interrupt.recv() => StopSignal::Interrupt,
            _ = terminate.recv() => StopSignal::Terminate,
        };
        match control::signal(&ws, &task, received) {
            Ok(()) if first.is_none() => eprintln!(
                "agentbox: stopping task {task} gracefully (interrupt again to kill it now)"
            ),
            Ok(()) => eprintln!("agentbox: killing task {task}"),
            // It ended meanwhile; the follower returns by itself.
            Err(ControlError::NotRunning { .. }) => {}
            Err(e) => eprintln!("agentbox: error: {e}"),
        }
        first.get_or_insert(received);
    };
    followed?;
    if let Some(signal) = first {
        return Ok(signal.exit_code() as u8);
    }
    let record = ws
        .state
        .read(&task)
        .map_err(failed)?
        .ok_or_else(|| failed(format!("task {task} was removed while attached to it")))?;
    ended(&record)
}
