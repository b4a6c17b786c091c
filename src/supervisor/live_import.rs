//! Imports a running task's commits into the repository as they appear, so the work shows on the
//! host's `agentbox/<task>` within moments of each commit.
//!
//! Every half second it looks (two `lstat`s) at the task's branch ref and `packed-refs` in the
//! task's git dir; when either changed it reads the tip and imports it. A failed import is reported
//! once per distinct message and tried again on the next change; the teardown imports once more
//! after the command has ended, and that one decides.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::RunEvent;
use crate::git::{TaskDirs, import};
use crate::task::TaskName;
use crate::workspace::Workspace;

const INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct LiveImport {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl LiveImport {
    pub(super) fn start(
        ws: Workspace,
        dirs: TaskDirs,
        task: TaskName,
        events: mpsc::Sender<RunEvent>,
    ) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = None;
            let mut last_error: Option<String> = None;
            let mut ticks = tokio::time::interval(INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = ticks.tick() => {}
                }
                let now = fingerprint(&dirs);
                if now == seen {
                    continue;
                }
                match import::import(&ws.repo, &dirs, task.as_str()).await {
                    Ok(_) => {
                        seen = now;
                        last_error = None;
                    }
                    Err(e) => {
                        // Tried again on the next change, not on every tick.
                        seen = now;
                        let message = format!("importing the commits of task {task}: {e}");
                        if last_error.as_deref() != Some(message.as_str()) {
                            let _ = events
                                .send(RunEvent::Warning {
                                    message: message.clone(),
                                })
                                .await;
                            last_error = Some(message);
                        }
                    }
                }
            }
        });
        Self { stop, task }
    }

    /// Stops importing; an import under way finishes first.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// What identifies the current state of the branch in the task's git dir, cheaply.
fn fingerprint(dirs: &TaskDirs) -> Option<[(i64, i64, u64, u64); 2]> {
    let stat = |path: std::path::PathBuf| {
        std::fs::symlink_metadata(path)
            .map(|m| (m.mtime(), m.mtime_nsec(), m.ino(), m.size()))
            .unwrap_or_default()
    };
    Some([
        stat(dirs.git_dir.join(dirs.branch_ref())),
        stat(dirs.git_dir.join("packed-refs")),
    ])
}
