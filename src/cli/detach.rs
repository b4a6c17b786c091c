//! `agentbox run -d`: the task runs under a supervisor in the background.
//!
//! The CLI starts its own binary again with the same arguments and [`SUPERVISOR_VAR`] set. That
//! child is the task's supervisor, an ordinary `agentbox run` in every other way. It lives in a
//! process group of its own (a Ctrl-C at the terminal is not meant for it), with stdin closed, and
//! ignores SIGHUP, so closing the terminal does not end the task. Its stdout is a pipe to the
//! parent, on which it writes one line, `started`, once the task's command runs, and nothing else,
//! ever: the task's output goes only to its log. Its stderr is an unlinked temporary file, so it can
//! write there for as long as it lives, whether or not anyone reads; when it ends before the task
//! started, the parent reads that file back and reports the failure with the child's exit code.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use agentbox::supervisor::{RunEvent, StopSignal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::{CommandError, EXIT_AGENTBOX_FAILED, write_stdout};

/// Set (to `1`) in the environment of the background supervisor.
const SUPERVISOR_VAR: &str = "AGENTBOX_DETACHED_SUPERVISOR";
/// What the background supervisor tells the parent once the task's command runs.
pub const STARTED: &str = "started";
/// What it says (with the container's id after a space) once the container of an interactive task
/// exists; its command waits for [`GO`] on the supervisor's stdin.
pub const CREATED: &str = "created";
/// What the starter of an interactive task writes to the supervisor's stdin once it is attached.
const GO: &str = "go";
/// The size `ROWSxCOLS` of the terminal of an interactive task, from its starter.
pub const TTY_SIZE_VAR: &str = "AGENTBOX_TTY_SIZE";

fn fail(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommandError {
    CommandError::new(error, EXIT_AGENTBOX_FAILED)
}

/// Whether this process is the background supervisor of a detached task.
pub fn in_background() -> bool {
    std::env::var_os(SUPERVISOR_VAR).is_some_and(|v| v == "1")
}

/// Starts this same command line again as a background supervisor and returns once the task's
/// command runs, printing the task's name; or, when the supervisor ends first, with its error and
/// exit code.
pub async fn start_in_background(task: &str, idle: bool) -> Result<u8, CommandError> {
    let mut supervisor = Background::spawn(task, std::env::args_os().skip(1), &[], false)?;
    match supervisor.next_line().await {
        Some(line) if line == STARTED => {
            write_stdout(format!("{task}\n").as_bytes())?;
            if idle {
                eprintln!(
                    "agentbox: task {task} is up; `agentbox exec {task} -- <command>` and `agentbox shell {task}` work in it, `agentbox stop {task}` ends it"
                );
            } else {
                eprintln!(
                    "agentbox: task {task} runs in the background; `agentbox attach {task}` follows it, `agentbox wait {task}` waits for its end"
                );
            }
            Ok(0)
        }
        _ => supervisor.failed().await,
    }
}

/// A background supervisor as its starter sees it: the lines it says, its stdin (the start gate of
/// an interactive task), and what it wrote to stderr when it ends before the task starts.
pub struct Background {
    task: String,
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    errors: File,
    gate: Option<tokio::process::ChildStdin>,
    /// Pass SIGINT and SIGTERM on to the supervisor while waiting for its lines (a person at a
    /// terminal); off for the MCP server, whose own signals must keep their default.
    forward_signals: bool,
}

impl Background {
    /// Starts agentbox's own binary with `args` as the supervisor of `task`. With `gate`, its stdin
    /// is a pipe: the task's command starts once [`Background::open_gate`] is called (or this
    /// process is gone).
    pub fn spawn(
        task: &str,
        args: impl IntoIterator<Item = std::ffi::OsString>,
        env: &[(&str, String)],
        gate: bool,
    ) -> Result<Self, CommandError> {
        let exe = std::env::current_exe().map_err(|e| {
            fail(format!(
                "cannot find agentbox's own binary to supervise task {task} in the background: {e}"
            ))
        })?;
        let errors = unlinked_file()?;
        let child_errors = errors.try_clone().map_err(|e| {
            fail(format!(
                "cannot pass a file to the supervisor of task {task}: {e}"
            ))
        })?;
        let mut child = tokio::process::Command::new(&exe)
            .args(args)
            .env(SUPERVISOR_VAR, "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(if gate { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::from(child_errors))
            .process_group(0)
            // It is meant to outlive this process.
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                fail(format!(
                    "cannot start {} to supervise task {task} in the background: {e}",
                    exe.display()
                ))
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let gate = child.stdin.take();
        Ok(Self {
            task: task.to_owned(),
            child,
            lines: BufReader::new(stdout).lines(),
            errors,
            gate,
            forward_signals: true,
        })
    }

    /// Leaves SIGINT and SIGTERM alone while waiting for the supervisor.
    pub fn without_signal_forwarding(mut self) -> Self {
        self.forward_signals = false;
        self
    }

    /// The supervisor's next line, or `None` when it ended without one. Until then a Ctrl-C at the
    /// terminal is meant for it; the supervisor, in its own process group, would not see it
    /// otherwise. It then rolls back and exits 130.
    pub async fn next_line(&mut self) -> Option<String> {
        if !self.forward_signals {
            return self.lines.next_line().await.ok().flatten();
        }
        let (mut interrupt, mut terminate) = (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        );
        let line = loop {
            let received = tokio::select! {
                line = self.lines.next_line() => break line,
                Some(()) = recv(&mut interrupt) => rustix::process::Signal::INT,
                Some(()) = recv(&mut terminate) => rustix::process::Signal::TERM,
            };
            if let Some(pid) = self
                .child
                .id()
                .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
            {
                let _ = rustix::process::kill_process(pid, received);
            }
        };
        line.ok().flatten()
    }

    /// How a supervisor that ended before its task started ended, and what it wrote to stderr.
    pub async fn ending(mut self) -> Result<(std::process::ExitStatus, Vec<u8>), CommandError> {
        let task = self.task.clone();
        drop(self.gate.take());
        let status = self.child.wait().await.map_err(|e| {
            fail(format!(
                "cannot learn how the supervisor of task {task} ended: {e}"
            ))
        })?;
        let mut said = Vec::new();
        let _ = self
            .errors
            .rewind()
            .and_then(|()| self.errors.read_to_end(&mut said));
        Ok((status, said))
    }

    /// The supervisor's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Lets the task's command start.
    pub async fn open_gate(&mut self) {
        if let Some(mut gate) = self.gate.take() {
            use tokio::io::AsyncWriteExt;
            let _ = gate.write_all(format!("{GO}\n").as_bytes()).await;
            let _ = gate.flush().await;
            // Kept open until this process ends: the supervisor's stdin says nothing else.
            self.gate = Some(gate);
        }
    }

    /// Waits for a supervisor that ended (or is ending) before its task started, shows what it
    /// said, and returns its exit code.
    pub async fn failed(self) -> Result<u8, CommandError> {
        let task = self.task.clone();
        let (status, said) = self.ending().await?;
        let mut stderr = io::stderr().lock();
        let _ = stderr.write_all(&said).and_then(|()| stderr.flush());
        match (status.code(), status.signal()) {
            (Some(code), _) => Ok(u8::try_from(code).unwrap_or(EXIT_AGENTBOX_FAILED)),
            (None, signal) => Err(fail(format!(
                "the background supervisor of task {task} was killed (signal {}) before the task started",
                signal.unwrap_or_default()
            ))),
        }
    }
}

/// The next delivery of a signal, or never when it could not be listened for.
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// A file nobody else can open: created, then unlinked at once. It disappears with the last
/// process that holds it.
fn unlinked_file() -> Result<File, CommandError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let path = std::env::temp_dir().join(format!("agentbox-detach-{}-{nanos}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| fail(format!("cannot create {}: {e}", path.display())))?;
    std::fs::remove_file(&path)
        .map_err(|e| fail(format!("cannot remove {}: {e}", path.display())))?;
    Ok(file)
}

/// The background supervisor's event printer. The task's output goes to its log only; the parent
/// hears `started` once the command runs; everything else goes to stderr, the parent's to report if
/// the task never starts.
pub async fn report_started(
    mut events: mpsc::Receiver<RunEvent>,
    say_created: bool,
    mut on_started: Option<Box<dyn FnOnce() + Send>>,
) {
    // The terminal the task was started from may close at any time; that must not end the task.
    // tokio keeps its handler installed for the life of the process, so SIGHUP stays ignored.
    let _hangup = signal(SignalKind::hangup());
    while let Some(event) = events.recv().await {
        match event {
            RunEvent::Created { container_id, .. } if say_created => {
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{CREATED} {container_id}").and_then(|()| out.flush());
            }
            RunEvent::Started { .. } => {
                if let Some(hook) = on_started.take() {
                    hook();
                }
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{STARTED}").and_then(|()| out.flush());
            }
            RunEvent::StartFailed { message } => super::say(&format!(
                "agentbox: the command could not be started: {message}"
            )),
            _ => {}
        }
    }
}

/// The start gate of an interactive task's supervisor: opens when its starter says so on stdin, or
/// when stdin ends (the starter is gone: nobody is left to wait for).
pub fn start_gate() -> tokio::sync::watch::Receiver<bool> {
    let (open, gate) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let _ = lines.next_line().await;
        let _ = open.send(true);
        // Held, so the gate never reads as abandoned.
        std::future::pending::<()>().await;
    });
    gate
}

/// The terminal size the starter of an interactive task passed on.
pub fn tty_size() -> Option<(u16, u16)> {
    let text = std::env::var(TTY_SIZE_VAR).ok()?;
    let (rows, cols) = text.split_once('x')?;
    Some((rows.parse().ok()?, cols.parse().ok()?))
}

/// SIGINT and SIGTERM passed on to a task's supervisor, as if sent to its `agentbox run`: the first
/// stops the task gracefully, a second kills it. For as long as it lives.
pub struct SignalForwarding {
    first: std::sync::Arc<std::sync::OnceLock<StopSignal>>,
    task: tokio::task::JoinHandle<()>,
}

impl SignalForwarding {
    /// Listens from now on (not from the first poll of a task: a signal in between would find
    /// nobody listening, and the caller may switch the terminal to raw mode right after); `None`
    /// when there is no supervisor or the signals cannot be listened for.
    pub fn start(pid: Option<u32>) -> Option<Self> {
        let pid = pid.and_then(|pid| rustix::process::Pid::from_raw(pid as i32))?;
        let mut interrupt = signal(SignalKind::interrupt()).ok()?;
        let mut terminate = signal(SignalKind::terminate()).ok()?;
        let first = std::sync::Arc::new(std::sync::OnceLock::new());
        let seen = first.clone();
        let task = tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = interrupt.recv() => StopSignal::Interrupt,
                    _ = terminate.recv() => StopSignal::Terminate,
                };
                let _ = seen.set(received);
                let raw = match received {
                    StopSignal::Interrupt => rustix::process::Signal::INT,
                    StopSignal::Terminate => rustix::process::Signal::TERM,
                };
                let _ = rustix::process::kill_process(pid, raw);
            }
        });
        Some(Self { first, task })
    }

    /// The exit code of the first signal passed on (130, 143), if one was.
    pub fn exit_code(&self) -> Option<u8> {
        self.first.get().map(|signal| signal.exit_code() as u8)
    }
}

impl Drop for SignalForwarding {
    fn drop(&mut self) {
        self.task.abort();
    }
}
