use std::io::{self, Write};

use agentbox::Workspace;
use agentbox::control::{self, ControlError};
use agentbox::inspect;
use agentbox::supervisor::StopSignal;
use agentbox::task::TaskName;
use tokio::signal::unix::{SignalKind, signal};

use super::detach::SignalForwarding;
use super::interactive::{Ended, Session, Target};
use super::wait::ended;
use super::{CommandError, Context, EXIT_ERROR, failed, task_name};

/// Follow a task's output until it ends, passing Ctrl-C on to it; exits with its exit code. With
/// -i (and -t), join its stdin (and terminal) again, as `docker attach`
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// Pass stdin to the task's command (a task started with -i)
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Be the terminal of the task's command (a task started with -it): raw mode, its size,
    /// Ctrl-C for the command
    #[arg(short = 't', long)]
    tty: bool,
    /// Keys that detach again and leave the task running [default: $AGENTBOX_DETACH_KEYS, or
    /// ctrl-p,ctrl-q]
    #[arg(long, value_name = "KEYS")]
    detach_keys: Option<String>,
}

pub async fn attach(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    if args.interactive || args.tty {
        return attach_interactive(context, &ws, &task, &args).await;
    }
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
        pass_on(&ws, &task, received, first.is_none());
        first.get_or_insert(received);
    };
    followed?;
    if let Some(signal) = first {
        return Ok(signal.exit_code() as u8);
    }
    finished(&ws, &task)
}

/// Passes a signal on to the task's supervisor and says what it does.
fn pass_on(ws: &Workspace, task: &TaskName, received: StopSignal, first: bool) {
    match control::signal(ws, task, received) {
        Ok(()) if first => {
            eprintln!("agentbox: stopping task {task} gracefully (interrupt again to kill it now)")
        }
        Ok(()) => eprintln!("agentbox: killing task {task}"),
        // It ended meanwhile; the follower returns by itself.
        Err(ControlError::NotRunning { .. }) => {}
        Err(e) => super::say(&format!("agentbox: error: {e}")),
    }
}

fn finished(ws: &Workspace, task: &TaskName) -> Result<u8, CommandError> {
    let record = ws
        .state
        .read(task)
        .map_err(failed)?
        .ok_or_else(|| failed(format!("task {task} was removed while attached to it")))?;
    ended(&record)
}

/// `attach -i`/`-it`: the same client as `run -it`, joined to the running container.
async fn attach_interactive(
    context: &Context,
    ws: &Workspace,
    task: &TaskName,
    args: &Args,
) -> Result<u8, CommandError> {
    // First: whatever the task is, a terminal cannot be joined from here.
    if args.tty && !super::terminal::stdin_is_terminal() {
        return Err(
            failed("-t needs a terminal on stdin, and agentbox's stdin is not one")
                .with_hint(format!("`agentbox attach -i {task}` passes a pipe to the task's stdin; or run agentbox from a terminal")),
        );
    }
    let keys = context.detach_keys(args.detach_keys.as_deref(), EXIT_ERROR)?;
    let record = control::running(ws, task).map_err(failed)?;
    if args.tty && !record.tty {
        return Err(failed(format!(
            "task {task} has no terminal (it was started without -t)"
        ))
        .with_hint(format!(
            "`agentbox attach -i {task}` passes stdin; `agentbox attach {task}` follows its output"
        )));
    }
    if !record.stdin {
        return Err(failed(format!(
            "task {task} does not read stdin (it was started without -i)"
        ))
        .with_hint(format!(
            "`agentbox attach {task}` follows its output; `agentbox shell {task}` opens a shell in it"
        )));
    }
    let container = record.container_id.clone().unwrap_or_default();
    let runtime = context.runtime().await.map_err(failed)?;
    let attached = runtime
        .attach_interactive(&container, &keys.text)
        .await
        .map_err(failed)?;
    // SIGINT and SIGTERM that reach this client go to the supervisor, as for a plain `attach`:
    // without a terminal of its own a Ctrl-C here is one; with one it comes from elsewhere.
    let forwarding = SignalForwarding::start(Some(record.supervisor_pid));
    let session = Session {
        runtime: &*runtime,
        target: Target::Container(&container),
        output: attached.output,
        input: Some(attached.input),
        tty: args.tty,
        detach: keys.watch_if_terminal(),
        signals_passed_on: forwarding.is_some(),
    };
    let ended = session.run().await?;
    after_session(ws, task, ended, forwarding.as_ref()).await
}

/// What an interactive client does when its session is over: a detached one says how to come
/// back; one whose task ended waits for the teardown and returns the task's exit code, or, when it
/// passed a signal on to the task, that signal's (as a plain `attach` does).
pub(super) async fn after_session(
    ws: &Workspace,
    task: &TaskName,
    ended: Ended,
    forwarding: Option<&SignalForwarding>,
) -> Result<u8, CommandError> {
    let passed_on = || forwarding.and_then(SignalForwarding::exit_code);
    match ended {
        Ended::Detached => {
            eprintln!(
                "agentbox: detached from task {task}; it goes on (`agentbox attach -it {task}` joins it again, `agentbox stop {task}` ends it)"
            );
            Ok(0)
        }
        Ended::Signalled(code) => {
            // The terminal may be gone (SIGHUP): a failed write is no reason to panic.
            let _ = writeln!(
                io::stderr(),
                "agentbox: left task {task} running (`agentbox attach -it {task}` joins it again)"
            );
            Ok(code)
        }
        Ended::NotStarted { not_found, command } => {
            let what = if not_found {
                "not found"
            } else {
                "cannot be executed"
            };
            eprintln!("agentbox: command {what} in task {task}: {command}");
            control::wait(ws, task).await.map_err(failed)?;
            match passed_on() {
                Some(code) => Ok(code),
                None => finished(ws, task),
            }
        }
        Ended::Finished => {
            let record = control::wait(ws, task).await.map_err(failed)?;
            if let Some(commit) = &record.snapshot_commit {
                eprintln!(
                    "agentbox: snapshot commit {commit} keeps uncommitted work of task {task}"
                );
            }
            let kept = ws.repo.branch_tip(&record.branch).ok().flatten().is_some();
            match record.exit_code {
                Some(code) if kept => eprintln!(
                    "agentbox: task {task} exited {code}; its work is on branch {}",
                    record.branch
                ),
                Some(code) => eprintln!("agentbox: task {task} exited {code} and changed nothing"),
                None => {}
            }
            match passed_on() {
                Some(code) => Ok(code),
                None => finished(ws, task),
            }
        }
    }
}
