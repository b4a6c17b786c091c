use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use agentbox::batch::Stream;
use agentbox::land::queue::{
    self, Outcome, QueueEvent, QueueOptions, QueueResult, Strategy, Timed,
};
use agentbox::output::json;
use agentbox::output::sanitize::{Colours, sanitize_line, sanitize_name, sanitize_text};
use agentbox::supervisor::{RunRequest, StopLevel};
use agentbox::task::TaskName;
use tokio::sync::{mpsc, watch};

use super::signals::forward_signals;
use super::{
    CommandError, Context, EXIT_ERROR, default_user, failed, file_list, labels, task_name,
};

/// Land tasks one by one, each rebased onto the branch's tip and checked in a box of its own
/// first: the branch only moves (by fast-forward) for a task whose check passed
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tasks, in the order they land
    #[arg(required = true)]
    tasks: Vec<String>,
    /// The check, run under `sh -c` in the box [default: `check` of agentbox.toml]
    #[arg(long, value_name = "CMD")]
    check: Option<String>,
    /// The branch to land on [default: each task's base branch]
    #[arg(long, value_name = "BRANCH")]
    into: Option<String>,
    /// Put each task on top with a merge commit instead of a rebase [default: `queue_strategy`
    /// of agentbox.toml, or rebase]
    #[arg(long, group = "strategy")]
    merge: bool,
    /// Rebase each task's commits onto the branch (the default)
    #[arg(long, group = "strategy")]
    rebase: bool,
    /// Let the merge drivers your git configuration defines run (by default only git's own)
    #[arg(long)]
    merge_drivers: bool,
    /// JSON Lines on stdout: one event per line, the last one the summary
    #[arg(long)]
    json: bool,
    /// With --json, also one `log` event per line of the checks' output
    #[arg(long, requires = "json")]
    log_lines: bool,
    /// Add a label to the checks' containers
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when a check is stopped
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
}

pub async fn queue(context: &Context, args: Args) -> Result<u8, CommandError> {
    let tasks: Vec<TaskName> = args
        .tasks
        .iter()
        .map(|t| task_name(t, EXIT_ERROR))
        .collect::<Result<_, _>>()?;
    let labels = labels(&args.labels).map_err(|e| CommandError {
        exit_code: EXIT_ERROR,
        ..e
    })?;
    let (ws, config, runtime, _) =
        context
            .prepare_runs(None, None, false)
            .await
            .map_err(|e| CommandError {
                exit_code: EXIT_ERROR,
                ..e
            })?;
    let check = match (&args.check, &config.check) {
        (Some(check), _) => vec!["sh".into(), "-c".into(), check.clone()],
        (None, Some(check)) => check.argv(),
        (None, None) => {
            return Err(failed("no check to run before landing").with_hint(
                "pass --check CMD, or set `check = \"...\"` in agentbox.toml (agentbox merge lands without one)",
            ));
        }
    };
    let strategy = if args.merge {
        Strategy::Merge
    } else if args.rebase {
        Strategy::Rebase
    } else {
        config.queue_strategy.unwrap_or_default()
    };
    let placeholder = TaskName::parse("queue").expect("a valid name");
    let base = RunRequest::from_config(placeholder, &config, ws.repo.workdir.as_deref());
    let mut template = RunRequest {
        host_env: context.env.vars.clone(),
        labels,
        user: Some(default_user()),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        ..base
    };
    if template.limits.memory_bytes.is_none() {
        template.limits.memory_bytes = context.env.total_memory.map(|total| total / 2);
    }
    let options = QueueOptions {
        into: args.into,
        strategy,
        check,
        merge_drivers: args.merge_drivers,
    };

    let (stop_tx, stop_rx) = watch::channel(StopLevel::Continue);
    let stop_seen = stop_rx.clone();
    let signals = tokio::spawn(forward_signals(stop_tx));
    let (events_tx, events_rx) = mpsc::channel(1024);
    let renderer = if args.json {
        tokio::spawn(render_json(events_rx, args.log_lines))
    } else {
        tokio::spawn(render_text(events_rx))
    };
    let results = queue::run(
        &ws,
        Arc::clone(&runtime),
        &tasks,
        &template,
        &options,
        events_tx,
        stop_rx,
    )
    .await;
    let _ = renderer.await;
    signals.abort();
    let results = results.map_err(failed)?;
    if !args.json {
        print_summary(&results);
    }
    let code = match *stop_seen.borrow() {
        StopLevel::Graceful(signal) | StopLevel::Immediate(signal) => signal.exit_code() as u8,
        StopLevel::Continue => queue::exit_code(&results) as u8,
    };
    Ok(code)
}

async fn render_json(mut events: mpsc::Receiver<Timed>, log_lines: bool) {
    let mut stdout_open = true;
    while let Some(event) = events.recv().await {
        if !stdout_open || (!log_lines && matches!(event.event, QueueEvent::Log { .. })) {
            continue;
        }
        let mut line = json::to_string(&event).expect("events always serialise");
        line.push('\n');
        let mut out = std::io::stdout().lock();
        stdout_open = out
            .write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .is_ok();
    }
}

/// agentbox's lines on stderr; the checks' output as it came, each line prefixed with its task.
async fn render_text(mut events: mpsc::Receiver<Timed>) {
    let terminal = (
        std::io::stdout().is_terminal(),
        std::io::stderr().is_terminal(),
    );
    while let Some(timed) = events.recv().await {
        let line = match timed.event {
            QueueEvent::Attempt {
                task,
                target,
                target_commit,
                strategy,
                attempt_commit,
                commits,
                ..
            } => {
                let how = match strategy {
                    Strategy::Rebase => format!(
                        "rebased {commits} commit{} onto",
                        if commits == 1 { "" } else { "s" }
                    ),
                    Strategy::Merge => "merged with".to_owned(),
                };
                format!(
                    "agentbox: {task}: {how} {} as {}",
                    queue::describe(&target, &target_commit),
                    short(&attempt_commit)
                )
            }
            QueueEvent::Conflict {
                task,
                target,
                files,
            } => format!(
                "agentbox: {task}: conflicts with {} in {}; not landed",
                sanitize_name(&target),
                file_list(&files)
            ),
            QueueEvent::CheckStarted {
                task,
                check_task,
                image,
                command,
            } => format!(
                "agentbox: {task}: checking it in a box of {image} (task {check_task}): {}",
                shown(&command)
            ),
            QueueEvent::Log {
                task, stream, line, ..
            } => {
                let to_terminal = if stream == Stream::Stderr {
                    terminal.1
                } else {
                    terminal.0
                };
                let line = if to_terminal {
                    sanitize_line(line.as_bytes()).into_owned()
                } else {
                    line
                };
                let text = format!("{task} | {line}\n");
                if stream == Stream::Stdout {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                } else {
                    let _ = std::io::stderr().lock().write_all(text.as_bytes());
                }
                continue;
            }
            QueueEvent::CheckFinished { task, exit_code } => match exit_code {
                0 => format!("agentbox: {task}: the check passed"),
                code => format!("agentbox: {task}: the check failed with exit code {code}"),
            },
            QueueEvent::Landed {
                task,
                target,
                from,
                to,
            } => format!(
                "agentbox: {task}: landed on {target}: {}..{}",
                short(&from),
                short(&to)
            ),
            QueueEvent::Done { task, result } => match (&result.outcome, &result.error) {
                (Outcome::AlreadyLanded, _) => {
                    format!(
                        "agentbox: {task}: on {} already",
                        result.target.unwrap_or_default()
                    )
                }
                (Outcome::CheckFailed | Outcome::TargetMoved, _) => format!(
                    "agentbox: {task}: not landed; the attempt is kept as {}",
                    result.attempt_ref.unwrap_or_default()
                ),
                (_, Some(error)) => format!(
                    "agentbox: {task}: not landed: {}",
                    sanitize_text(error.as_bytes(), Colours::Show)
                ),
                _ => continue,
            },
            QueueEvent::Summary { .. } => continue,
        };
        eprintln!("{line}");
    }
}

fn shown(command: &[String]) -> String {
    match command {
        [sh, c, line] if sh == "sh" && c == "-c" => line.clone(),
        _ => shell_words::join(command),
    }
}

fn short(hex: &str) -> &str {
    hex.get(..7).unwrap_or(hex)
}

fn print_summary(results: &[QueueResult]) {
    let header = ["TASK", "RESULT", "TARGET", "DETAIL"].map(String::from);
    let rows: Vec<[String; 4]> = results
        .iter()
        .map(|r| {
            let detail = match r.outcome {
                Outcome::Landed => format!(
                    "{}..{}",
                    short(r.from.as_deref().unwrap_or_default()),
                    short(r.to.as_deref().unwrap_or_default())
                ),
                Outcome::Conflict => file_list(&r.files),
                Outcome::CheckFailed => format!(
                    "exit code {}; attempt kept as {}",
                    r.check_exit_code.unwrap_or_default(),
                    r.attempt_ref.as_deref().unwrap_or("-")
                ),
                Outcome::TargetMoved => format!(
                    "the branch moved during the check; attempt kept as {}",
                    r.attempt_ref.as_deref().unwrap_or("-")
                ),
                Outcome::AlreadyLanded => String::new(),
                Outcome::Stopped | Outcome::Error => {
                    sanitize_name(r.error.as_deref().unwrap_or_default()).into_owned()
                }
            };
            let outcome = serde_json::to_value(r.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            [
                r.task.clone(),
                outcome,
                r.target.clone().unwrap_or_else(|| "-".into()),
                detail,
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let _ = super::write_stdout(out.as_bytes());
    let landed = results
        .iter()
        .filter(|r| r.outcome == Outcome::Landed)
        .count();
    eprintln!(
        "agentbox: {landed} of {} task{} landed",
        results.len(),
        if results.len() == 1 { "" } else { "s" }
    );
}
