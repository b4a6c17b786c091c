//! Ctrl-C and SIGTERM, turned into stop requests for running tasks.

use agentbox::supervisor::{StopLevel, StopSignal};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// The first SIGINT or SIGTERM asks for a graceful stop; a second one for an immediate kill. The
/// teardown (and the snapshot) happens either way.
pub async fn forward_signals(stop: watch::Sender<StopLevel>) {
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut first = None;
    loop {
        let received = tokio::select! {
            _ = interrupt.recv() => StopSignal::Interrupt,
            _ = terminate.recv() => StopSignal::Terminate,
        };
        let level = match first {
            None => {
                first = Some(received);
                StopLevel::Graceful(received)
            }
            Some(first) => StopLevel::Immediate(first),
        };
        let _ = stop.send(level);
    }
}
