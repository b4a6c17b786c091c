//! An interactive session: the caller's terminal (or stdin) joined to a task's container or to a
//! command running in it, as `docker run -it`, `docker attach` and `docker exec -it` do.
//!
//! What the user types goes to the program, except the detach keys, which end the session and
//! leave the program running. With a terminal, the caller's is switched to raw mode for the
//! session (so Ctrl-C is a byte for the program, not a signal for agentbox), the program's
//! terminal gets the caller's size at once and on every SIGWINCH, and the output arrives as one
//! stream. The terminal is restored on every way out: the end of the output, detaching, an error,
//! a signal, a panic.
//!
//! A signal that reaches agentbox itself (`kill`, a closed terminal: Ctrl-C in raw mode is a byte
//! for the program, not a signal) is handled as it is without a terminal, except that agentbox
//! never dies of it with the terminal raw. SIGINT and SIGTERM go on to the task's supervisor when
//! there is one (`run`, `attach`: the caller passes them on, the session goes on until the task
//! has stopped); without one (`exec`) they end the session and leave the program running, as
//! their default action does without a terminal. SIGHUP and SIGQUIT end the session and leave the
//! task running: without a terminal they end agentbox alone too, the supervisor living in a
//! process group of its own that ignores SIGHUP.

use std::io::{self, Write};
use std::pin::Pin;

use agentbox::runtime::{Output, OutputStream, Runtime};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

use super::terminal::{self, DetachWatch, RawMode};
use super::{CommandError, failed};

/// What the session is joined to: the terminal to resize.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Container(&'a str),
    Exec(&'a str),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The output ended: the program (or the container) is done.
    Finished,
    /// The user typed the detach keys; the program goes on.
    Detached,
    /// A signal ended the session (with a terminal); the exit code a shell reports for it. The
    /// program goes on.
    Signalled(u8),
    /// The engine could not execute the command (`exec`): 127 when it does not exist, else 126.
    NotStarted { not_found: bool, command: String },
}

pub struct Session<'a> {
    pub runtime: &'a dyn Runtime,
    pub target: Target<'a>,
    pub output: OutputStream,
    /// The program's stdin, when the caller's goes to it.
    pub input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    /// The program has a terminal: raw mode here, resizes there.
    pub tty: bool,
    /// Watches stdin for the detach keys; only a session with stdin can detach.
    pub detach: Option<DetachWatch>,
    /// The caller passes SIGINT and SIGTERM on to the task's supervisor (and listens for them
    /// before the session starts): they do not end the session.
    pub signals_passed_on: bool,
}

impl Session<'_> {
    pub async fn run(self) -> Result<Ended, CommandError> {
        let Session {
            runtime,
            target,
            mut output,
            input,
            tty,
            detach,
            signals_passed_on,
        } = self;
        // Listened for before the terminal is raw: from then on none may end agentbox unheard.
        let listen = |kind: SignalKind, wanted: bool| {
            if wanted { signal(kind).ok() } else { None }
        };
        let mut winch = listen(SignalKind::window_change(), tty);
        let mut hangup = listen(SignalKind::hangup(), tty);
        let mut quit = listen(SignalKind::quit(), tty);
        let mut interrupt = listen(SignalKind::interrupt(), tty && !signals_passed_on);
        let mut terminate = listen(SignalKind::terminate(), tty && !signals_passed_on);
        let raw = if tty {
            Some(
                RawMode::enable()
                    .map_err(|e| failed(format!("cannot switch the terminal to raw mode: {e}")))?,
            )
        } else {
            None
        };
        let resize = |size: Option<(u16, u16)>| async move {
            let Some((rows, cols)) = size else { return };
            let _ = match target {
                Target::Container(id) => runtime.resize(id, rows, cols).await,
                Target::Exec(id) => runtime.resize_exec(id, rows, cols).await,
            };
        };
        if tty {
            resize(terminal::size()).await;
        }

        let (detached_tx, mut detached) = tokio::sync::oneshot::channel();
        let mut typing = input.map(|input| tokio::spawn(forward_stdin(input, detach, detached_tx)));
        let mut stdin_open = typing.is_some();

        let ended = loop {
            tokio::select! {
                item = output.next() => match item {
                    Some(Ok(Output::Stdout(bytes))) => write_all(&mut io::stdout(), &bytes),
                    Some(Ok(Output::Stderr(bytes))) => write_all(&mut io::stderr(), &bytes),
                    Some(Ok(Output::NotStarted { not_found, command })) => {
                        break Ended::NotStarted { not_found, command };
                    }
                    Some(Err(e)) => {
                        drop(raw);
                        return Err(failed(e));
                    }
                    None => break Ended::Finished,
                },
                said = &mut detached, if stdin_open => match said {
                    Ok(()) => break Ended::Detached,
                    // Stdin ended; the program's output goes on until it ends.
                    Err(_) => stdin_open = false,
                },
                Some(()) = recv(&mut winch) => resize(terminal::size()).await,
                Some(()) = recv(&mut hangup) => break Ended::Signalled(129),
                Some(()) = recv(&mut interrupt) => break Ended::Signalled(130),
                Some(()) = recv(&mut quit) => break Ended::Signalled(131),
                Some(()) = recv(&mut terminate) => break Ended::Signalled(143),
            }
        };
        if let Some(typing) = typing.take() {
            typing.abort();
        }
        drop(raw);
        Ok(ended)
    }
}

fn write_all(out: &mut dyn Write, bytes: &[u8]) {
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Copies stdin to the program until it ends (then the program's stdin is closed) or the detach
/// keys are typed (then `detached` hears of it).
async fn forward_stdin(
    mut input: Pin<Box<dyn AsyncWrite + Send>>,
    mut watch: Option<DetachWatch>,
    detached: tokio::sync::oneshot::Sender<()>,
) {
    let mut stdin = tokio::io::stdin();
    let mut buffer = vec![0u8; 4096];
    let mut forward = Vec::with_capacity(4096);
    loop {
        let n = match stdin.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        forward.clear();
        let detach = match watch.as_mut() {
            Some(watch) => watch.feed(&buffer[..n], &mut forward),
            None => {
                forward.extend_from_slice(&buffer[..n]);
                false
            }
        };
        if !forward.is_empty()
            && (input.write_all(&forward).await.is_err() || input.flush().await.is_err())
        {
            return;
        }
        if detach {
            let _ = detached.send(());
            return;
        }
    }
    let _ = input.shutdown().await;
}
