//! The files a batch leaves for each task (`--artifacts`).

use std::path::Path;

use super::{BatchError, TaskResult};
use crate::task::TaskName;
use crate::workspace::Workspace;

/// Writes a task's artifacts into `dir/<task>/`: `log.txt` (its full output), `changes.patch` (its
/// branch against its base, `git apply`-able) and `result.json`.
pub async fn write_artifacts(
    ws: &Workspace,
    dir: &Path,
    result: &TaskResult,
) -> Result<(), BatchError> {
    let task_dir = dir.join(&result.task);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BatchError::Artifacts { path, source }
    };
    std::fs::create_dir_all(&task_dir).map_err(io(&task_dir))?;
    let name = TaskName::parse(&result.task).expect("results carry validated names");
    let log = task_dir.join("log.txt");
    let mut file = std::fs::File::create(&log).map_err(io(&log))?;
    // A task that never started has no log; an empty file says so plainly.
    crate::output::log::LogReader::new(&ws.state.log_path(&name))
        .read_available(&mut file)
        .map_err(|e| io(&log)(std::io::Error::other(e.to_string())))?;
    let patch_path = task_dir.join("changes.patch");
    let patch = match ws.state.read(&name) {
        Ok(Some(record)) if ws.repo.branch_tip(&record.branch).ok().flatten().is_some() => {
            let tip = format!("refs/heads/{}", record.branch);
            let args = [
                "diff",
                "--no-color",
                "--no-ext-diff",
                "--no-textconv",
                "--binary",
                &record.base_commit,
                &tip,
            ];
            ws.repo
                .git()
                .run(&args)
                .await
                .map(|out| out.stdout)
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    std::fs::write(&patch_path, patch).map_err(io(&patch_path))?;
    let result_path = task_dir.join("result.json");
    let json = serde_json::to_vec_pretty(result).expect("a result always serialises");
    std::fs::write(&result_path, json).map_err(io(&result_path))
}
