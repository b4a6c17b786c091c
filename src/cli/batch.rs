use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use agentbox::batch::{self, BatchEvent, Stream, TaskResult, Timed};
use agentbox::output::json;
use agentbox::output::sanitize::{Colours, sanitize_line, sanitize_text};
use agentbox::supervisor::{RunRequest, StopLevel};
use anstyle::{AnsiColor, Style};
use tokio::sync::{mpsc, watch};

use super::signals::forward_signals;
use super::{CommandError, Context, EXIT_AGENTBOX_FAILED, file_list, labels};

/// Run the tasks of a task file in parallel, their output multiplexed
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The task file: one [[task]] table per task (name, and optionally command, base, image, env)
    file: PathBuf,
    /// How many tasks run at once [default: the number of cores]
    #[arg(long, short = 'p', value_name = "N")]
    parallel: Option<usize>,
    /// JSON Lines on stdout: one event per line, the last one the summary
    #[arg(long)]
    json: bool,
    /// With --json, also one `log` event per line of output
    #[arg(long, requires = "json")]
    log_lines: bool,
    /// Write each task's log, patch and result into DIR/<task>/
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Add a label to every container
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL when a task is stopped
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// Keep the branches of tasks that changed nothing (deleted by default)
    #[arg(long)]
    keep_branch: bool,
    #[command(flatten)]
    devcontainer: super::devcontainer::DevcontainerArgs,
}

fn fail(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommandError {
    CommandError::new(error, EXIT_AGENTBOX_FAILED)
}

pub async fn batch(context: &Context, args: Args) -> Result<u8, CommandError> {
    let path = context.env.current_dir.join(&args.file);
    let text = std::fs::read_to_string(&path).map_err(|source| {
        fail(batch::BatchError::Read {
            path: path.clone(),
            source,
        })
    })?;
    let tasks = batch::parse_task_file(&text, &path).map_err(fail)?;
    let labels = labels(&args.labels)?;
    let from_head = tasks
        .iter()
        .any(|t| t.base.is_none())
        .then_some("tasks without a base start");
    let (ws, config, runtime, _) = context.prepare_runs(None, from_head, false).await?;
    let mut requests: Vec<RunRequest> = tasks
        .iter()
        .map(|task| {
            let request = RunRequest {
                labels: labels.clone(),
                stop_timeout: Duration::from_secs(args.stop_timeout),
                keep_branch: args.keep_branch,
                // Each teardown returns once the work is safe; directories go in the background.
                defer_deletion: true,
                ..context.default_request(task.name.clone(), &config, &ws)
            };
            task.apply(request)
        })
        .collect();
    // One after the other: the first task of a Dockerfile builds its image, the others find it.
    // What agentbox did differently from the files is said once for the batch.
    let mut said = std::collections::BTreeSet::new();
    for (request, task) in requests.iter_mut().zip(&tasks) {
        args.devcontainer
            .apply(
                &ws,
                &*runtime,
                request,
                &config,
                super::devcontainer::Given {
                    image: task.image.is_some(),
                    user: false,
                },
                &mut said,
            )
            .await?;
    }
    let pooled = requests.iter().any(|r| r.use_pool);
    let parallel = args
        .parallel
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));

    let (stop_tx, stop_rx) = watch::channel(StopLevel::Continue);
    let stop_seen = stop_rx.clone();
    let signals = tokio::spawn(forward_signals(stop_tx));
    // Few events wait for the renderer: one can hold a 1 MiB piece of a line, and a renderer held
    // up (a slow pipe, a terminal) must slow the tasks' output down, not fill the memory.
    let (events_tx, events_rx) = mpsc::channel(4);
    let names: Vec<String> = tasks.iter().map(|t| t.name.to_string()).collect();
    let renderer = if args.json {
        tokio::spawn(render_json(events_rx, args.log_lines))
    } else {
        let colors = !context.env.no_color && std::io::stdout().is_terminal();
        let status = std::io::stderr().is_terminal();
        let stdout_terminal = std::io::stdout().is_terminal();
        tokio::spawn(render_text(
            events_rx,
            Palette::new(&names, colors),
            status,
            stdout_terminal,
        ))
    };
    let purger: batch::Purger = std::sync::Arc::new(super::purge::in_background);
    let results = batch::run(
        &ws,
        runtime,
        requests,
        parallel,
        events_tx,
        stop_rx,
        Some(purger),
    )
    .await;
    let _ = renderer.await;
    signals.abort();
    if pooled {
        // The slots the batch took are replaced in the background.
        super::pool::refill_in_background(
            &context.start_dir(),
            &labels,
            &agentbox::pool::refill_log(&ws),
        );
    }

    if let Some(dir) = &args.artifacts {
        let dir = context.env.current_dir.join(dir);
        for result in &results {
            batch::write_artifacts(&ws, &dir, result)
                .await
                .map_err(fail)?;
        }
        let summary = dir.join("summary.json");
        let json = serde_json::to_vec_pretty(&results).expect("results always serialise");
        std::fs::write(&summary, json)
            .map_err(|e| fail(format!("cannot write {}: {e}", summary.display())))?;
    }
    if !args.json {
        print_summary(&results);
    }
    let code = match *stop_seen.borrow() {
        StopLevel::Graceful(signal) | StopLevel::Immediate(signal) => i64::from(signal.exit_code()),
        StopLevel::Continue => batch::exit_code(&results),
    };
    Ok(u8::try_from(code).unwrap_or(EXIT_AGENTBOX_FAILED))
}

async fn render_json(mut events: mpsc::Receiver<Timed>, log_lines: bool) {
    let mut stdout_open = true;
    while let Some(event) = events.recv().await {
        if !stdout_open || (!log_lines && matches!(event.event, BatchEvent::Log { .. })) {
            continue;
        }
        let mut out = std::io::stdout().lock();
        // Straight to stdout, not through a string: an event can carry a 1 MiB piece of a line.
        // A reader that went away must not stop the tasks: keep draining, stop writing.
        stdout_open = json::to_writer(&mut out, &event)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
            .is_ok();
    }
}

/// One colour per task, cycling, or none.
struct Palette {
    width: usize,
    colors: Option<Vec<(String, Style)>>,
}

impl Palette {
    const CYCLE: [AnsiColor; 6] = [
        AnsiColor::Cyan,
        AnsiColor::Yellow,
        AnsiColor::Green,
        AnsiColor::Magenta,
        AnsiColor::Blue,
        AnsiColor::Red,
    ];

    fn new(names: &[String], enabled: bool) -> Self {
        let colors = enabled.then(|| {
            names
                .iter()
                .zip(Self::CYCLE.iter().cycle())
                .map(|(name, color)| (name.clone(), Style::new().fg_color(Some((*color).into()))))
                .collect()
        });
        Self {
            width: names.iter().map(String::len).max().unwrap_or(0),
            colors,
        }
    }

    fn prefix(&self, task: &str) -> String {
        let padded = format!("{task:<width$} | ", width = self.width);
        let style = self.colors.as_ref().and_then(|colors| {
            colors
                .iter()
                .find(|(name, _)| name == task)
                .map(|(_, s)| *s)
        });
        match style {
            Some(style) => format!("{style}{padded}{style:#}"),
            None => padded,
        }
    }
}

/// Counts for the live status line.
#[derive(Default)]
struct Progress {
    running: usize,
    done: usize,
    failed: usize,
}

impl Progress {
    fn line(&self) -> String {
        format!(
            "agentbox: {} running, {} done, {} failed",
            self.running, self.done, self.failed
        )
    }
}

/// Writes every line whole, prefixed with its task; on a terminal, keeps a status line at the
/// bottom of stderr (cleared before each line and drawn again after it).
async fn render_text(
    mut events: mpsc::Receiver<Timed>,
    palette: Palette,
    status: bool,
    stdout_terminal: bool,
) {
    let mut progress = Progress::default();
    while let Some(timed) = events.recv().await {
        let (to_stderr, text) = match timed.event {
            // Shown on a terminal, a task's line must not move the cursor or rewrite the status
            // line; elsewhere it is passed on as it came.
            BatchEvent::Log {
                task, stream, line, ..
            } => {
                let to_terminal = if stream == Stream::Stderr {
                    status
                } else {
                    stdout_terminal
                };
                let line = if to_terminal {
                    sanitize_line(line.as_bytes()).into_owned()
                } else {
                    line
                };
                (
                    stream == Stream::Stderr,
                    format!("{}{line}", palette.prefix(&task)),
                )
            }
            BatchEvent::Started { task } => {
                progress.running += 1;
                (true, format!("{}agentbox: started", palette.prefix(&task)))
            }
            BatchEvent::Exited { task, exit_code } => (
                true,
                format!(
                    "{}agentbox: exited with code {exit_code}",
                    palette.prefix(&task)
                ),
            ),
            BatchEvent::TornDown { task, result } => {
                if result.started {
                    progress.running = progress.running.saturating_sub(1);
                }
                if result.exit_code == 0 {
                    progress.done += 1;
                } else {
                    progress.failed += 1;
                }
                let message = match &result.error {
                    Some(error) => format!(
                        "agentbox: error: {}",
                        sanitize_text(error.as_bytes(), Colours::Show)
                    ),
                    None => match &result.branch {
                        Some(branch) => format!("agentbox: torn down; work is on {branch}"),
                        None => "agentbox: torn down".to_owned(),
                    },
                };
                (true, format!("{}{message}", palette.prefix(&task)))
            }
            BatchEvent::Conflict { task, other, files } => (
                true,
                format!(
                    "{}agentbox: warning: conflicts with task {other} (finished earlier) in {}",
                    palette.prefix(&task),
                    file_list(&files)
                ),
            ),
            BatchEvent::Created { .. } | BatchEvent::Summary { .. } => continue,
        };
        let mut stderr = std::io::stderr().lock();
        if status {
            let _ = write!(stderr, "\r\x1b[K");
        }
        if to_stderr {
            let _ = writeln!(stderr, "{text}");
        } else {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{text}").and_then(|()| stdout.flush());
        }
        if status {
            let _ = write!(stderr, "{}", progress.line());
        }
        let _ = stderr.flush();
    }
    if status {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

fn print_summary(results: &[TaskResult]) {
    let header = ["TASK", "EXIT", "DURATION", "COMMITS", "FILES", "BRANCH"].map(String::from);
    let rows: Vec<[String; 6]> = results
        .iter()
        .map(|r| {
            [
                r.task.clone(),
                r.exit_code.to_string(),
                format!("{:.1}s", r.duration_ms as f64 / 1000.0),
                r.commits_ahead.to_string(),
                r.files_changed.to_string(),
                r.branch.clone().unwrap_or_else(|| "-".into()),
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
}
