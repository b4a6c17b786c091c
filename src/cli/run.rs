use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use agentbox::config::{Bytes, Cpus, EnvVar, NetworkSetting, parse_env_file};
use agentbox::runtime::Output;
use agentbox::supervisor::{self, RunEvent, RunOutcome, RunRequest, StopLevel};
use tokio::sync::{mpsc, watch};

use super::detach;
use super::signals::forward_signals;
use super::{
    CommandError, Context, EXIT_AGENTBOX_FAILED, default_user, key_value, labels, task_name,
};

/// Run a command in a new task: its own branch, worktree and container
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The task's name: lowercase letters, digits, '.', '_' and '-' (it names the branch
    /// agentbox/<task>, the worktree and the container)
    #[arg(allow_hyphen_values = true)]
    task: String,
    /// Image to run the task in [default: `image` of agentbox.toml, or agentbox/base:bookworm]
    #[arg(long)]
    image: Option<String>,
    /// Commit, branch or tag to start the task's branch from [default: HEAD]
    #[arg(long, value_name = "REF")]
    base: Option<String>,
    /// Set an environment variable in the container (K=V, or K to pass agentbox's own value)
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file (`docker run --env-file` format)
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<PathBuf>,
    /// Add a label to the container
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Leave the worktree and the stopped container for inspection instead of tearing down
    #[arg(long)]
    keep: bool,
    /// Keep the task's branch even if the task changed nothing (a new branch the task left at its
    /// base is deleted by default)
    #[arg(long)]
    keep_branch: bool,
    /// Make the task's sandbox from scratch even when the warm pool (`[pool]` of agentbox.toml)
    /// has one ready
    #[arg(long)]
    no_pool: bool,
    /// Directory for task worktrees [default: `worktree_root` of agentbox.toml, or
    /// <repo's parent>/.agentbox-worktrees/<repo name>]
    #[arg(long, value_name = "DIR")]
    worktree_root: Option<PathBuf>,
    /// Run as UID:GID inside the container [default: agentbox's own uid:gid]
    #[arg(long, value_name = "UID:GID")]
    user: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when the task is stopped
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    stop_timeout: u64,
    /// Run in the background: print the task's name once its command runs, and return. `agentbox
    /// attach`, `logs -f` and `wait` follow it
    #[arg(short = 'd', long)]
    detach: bool,
    #[command(flatten)]
    limits: LimitArgs,
    /// The command to run; the image's default command when omitted
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Limits of the task's container (and of its services that set none of their own).
#[derive(Debug, Default, clap::Args)]
pub struct LimitArgs {
    /// CPUs the task may use, as `docker run --cpus` [default: `[limits] cpus` of agentbox.toml, or
    /// no limit]
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    cpus: Option<Cpus>,
    /// Memory the task may use (512m, 2g), as `docker run --memory`; past it the task is killed
    /// (exit 137) [default: `[limits] memory` of agentbox.toml, or half of the machine's memory]
    #[arg(long, short = 'm', value_name = "SIZE", value_parser = parse_bytes)]
    memory: Option<Bytes>,
    /// Processes and threads the task may run at once; -1 for no limit [default: `[limits] pids`
    /// of agentbox.toml, or 4096]
    #[arg(long = "pids-limit", value_name = "N", allow_negative_numbers = true)]
    pids_limit: Option<i64>,
    /// The task's network: `bridge`, a network of its own with outbound access (its services are on
    /// it too), or `none`, no network at all [default: `network` of agentbox.toml, or bridge]
    #[arg(long, value_name = "MODE", value_parser = parse_network)]
    network: Option<NetworkSetting>,
}

fn parse_cpus(text: &str) -> Result<Cpus, String> {
    text.parse()
}

fn parse_bytes(text: &str) -> Result<Bytes, String> {
    text.parse()
}

fn parse_network(text: &str) -> Result<NetworkSetting, String> {
    match text {
        "bridge" => Ok(NetworkSetting::Bridge),
        "none" => Ok(NetworkSetting::None),
        "host" => Err("host is refused: a task on the host's network could reach every other task and every service of the machine".into()),
        other => Err(format!("{other:?} is not a network mode (bridge or none)")),
    }
}

impl LimitArgs {
    /// Applies the flags over what `agentbox.toml` said; the memory limit falls back to half of
    /// the machine's memory when neither says anything.
    pub fn apply(
        &self,
        request: &mut RunRequest,
        total_memory: Option<u64>,
    ) -> Result<(), CommandError> {
        if request.limits.memory_bytes.is_none() {
            request.limits.memory_bytes = total_memory.map(|total| total / 2);
        }
        if let Some(cpus) = self.cpus {
            request.limits.nano_cpus = Some(cpus.0);
        }
        if let Some(memory) = self.memory {
            request.limits.memory_bytes = Some(memory.0);
        }
        if let Some(pids) = self.pids_limit {
            request.limits.pids = u64::try_from(pids).ok().filter(|p| *p > 0);
        }
        if let Some(network) = self.network {
            if network == NetworkSetting::None && !request.services.is_empty() {
                return Err(fail(
                    "--network none leaves no way to reach the [services] of agentbox.toml",
                ));
            }
            request.network = network;
        }
        Ok(())
    }
}

fn fail(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommandError {
    CommandError::new(error, EXIT_AGENTBOX_FAILED)
}

/// `--env K=V` is plain; a bare `--env K` passes agentbox's own value of K, which is a secret.
fn env_flag(raw: &str, context: &Context) -> Result<EnvVar, CommandError> {
    if raw.contains('=') {
        let (key, value) = key_value(raw, "--env")?;
        return Ok(EnvVar {
            key,
            value,
            secret: false,
        });
    }
    match context.env.vars.get(raw) {
        Some(value) if !raw.is_empty() => Ok(EnvVar {
            key: raw.to_owned(),
            value: value.clone(),
            secret: true,
        }),
        _ => Err(fail(format!(
            "--env {raw:?}: not set in agentbox's environment; write {raw}=VALUE"
        ))),
    }
}

/// Env files first, `--env` flags last: a flag overrides a file.
fn explicit_env(context: &Context, args: &Args) -> Result<Vec<EnvVar>, CommandError> {
    let mut vars = Vec::new();
    for file in &args.env_files {
        let path = context.env.current_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fail(format!("cannot read env file {}: {e}", path.display())))?;
        vars.extend(parse_env_file(&text, &path, &context.env.vars).map_err(fail)?);
    }
    for raw in &args.env {
        vars.push(env_flag(raw, context)?);
    }
    Ok(vars)
}

pub async fn run(context: &Context, args: Args) -> Result<u8, CommandError> {
    if args.detach && !detach::in_background() {
        return detach::start_in_background(&args.task).await;
    }
    // Everything is checked before anything is created.
    let task = task_name(&args.task, EXIT_AGENTBOX_FAILED)?;
    let env = explicit_env(context, &args)?;
    let labels = labels(&args.labels)?;
    let user = Some(args.user.unwrap_or_else(default_user));
    let from_head = args.base.is_none().then(|| format!("task {task} starts"));
    let (ws, config, runtime) = context
        .prepare_runs(args.worktree_root.as_deref(), from_head.as_deref())
        .await?;

    let from_config = context.default_request(task, &config, &ws);
    let mut request = RunRequest {
        image: args.image.unwrap_or(from_config.image.clone()),
        base: args.base,
        command: (!args.command.is_empty()).then_some(args.command),
        env,
        labels,
        user,
        keep: args.keep,
        keep_branch: args.keep_branch,
        use_pool: from_config.use_pool && !args.no_pool,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        ..from_config
    };
    args.limits.apply(&mut request, context.env.total_memory)?;
    // The teardown returns once the work is safe; the directories go in the background.
    request.defer_deletion = true;
    let (stop_tx, stop_rx) = watch::channel(StopLevel::Continue);
    let signals = tokio::spawn(forward_signals(stop_tx));
    let (events_tx, events_rx) = mpsc::channel(256);
    // With a pool, once the command runs (the slot it took, if any, is gone from the pool), the pool
    // is brought back to its size in the background.
    let refill: Option<Box<dyn FnOnce() + Send>> = request.use_pool.then(|| {
        let (start_dir, labels) = (context.start_dir(), request.labels.clone());
        let log = agentbox::pool::refill_log(&ws);
        Box::new(move || super::pool::refill_in_background(&start_dir, &labels, &log)) as _
    });
    let printer = if detach::in_background() {
        tokio::spawn(detach::report_started(events_rx, refill))
    } else {
        tokio::spawn(print_events(events_rx, refill))
    };

    let result = supervisor::run(&ws, &*runtime, request, events_tx, stop_rx).await;
    let _ = printer.await;
    signals.abort();
    if let Ok(outcome) = &result
        && let Some(trash) = &outcome.summary.trash
    {
        super::purge::in_background(trash);
    }
    match result {
        Ok(outcome) => Ok(report(&outcome)),
        Err(supervisor::RunError::InterruptedBeforeStart { signal, task }) => {
            eprintln!("agentbox: task {task} was interrupted before its command started");
            Ok(signal.exit_code() as u8)
        }
        // The command ran and ended; only cleaning up after it failed. Its exit code still counts.
        Err(
            e @ supervisor::RunError::Teardown {
                exit_code: Some(code),
                ..
            },
        ) => {
            CommandError::new(e, EXIT_AGENTBOX_FAILED).report();
            Ok(u8::try_from(code).unwrap_or(EXIT_AGENTBOX_FAILED))
        }
        Err(e) => Err(fail(e)),
    }
}

async fn print_events(
    mut events: mpsc::Receiver<RunEvent>,
    mut on_started: Option<Box<dyn FnOnce() + Send>>,
) {
    while let Some(event) = events.recv().await {
        match event {
            RunEvent::Output(Output::Stdout(bytes)) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&bytes).and_then(|()| out.flush());
            }
            RunEvent::Output(Output::Stderr(bytes)) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&bytes).and_then(|()| err.flush());
            }
            RunEvent::Output(Output::NotStarted { .. }) => {}
            RunEvent::Warning { message } => eprintln!("agentbox: warning: {message}"),
            RunEvent::Stopping { immediate: false } => {
                eprintln!(
                    "agentbox: stopping the task gracefully (interrupt again to kill it now)"
                );
            }
            RunEvent::Stopping { immediate: true } => eprintln!("agentbox: killing the task"),
            RunEvent::StartFailed { message } => eprintln!("agentbox: {message}"),
            RunEvent::Created {
                ports, from_pool, ..
            } => {
                if from_pool {
                    eprintln!("agentbox: the task's sandbox comes from the pool");
                }
                for (name, port) in &ports {
                    eprintln!(
                        "agentbox: port {name} ({}) is {}",
                        port.container,
                        port.url()
                    );
                }
            }
            RunEvent::Started { .. } => {
                if let Some(hook) = on_started.take() {
                    hook();
                }
            }
            RunEvent::Exited { .. } | RunEvent::OutOfMemory { .. } => {}
        }
    }
}

/// Prints the one-line summary and returns agentbox's exit code.
fn report(outcome: &RunOutcome) -> u8 {
    let summary = &outcome.summary;
    let task = &summary.task;
    if let Some(commit) = &summary.snapshot_commit {
        eprintln!("agentbox: snapshot commit {commit} keeps uncommitted work of task {task}");
    }
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    if summary.branch_deleted {
        eprintln!(
            "agentbox: task {task} exited {} and changed nothing, so its branch is gone again (--keep-branch keeps it)",
            outcome.exit_code
        );
        return match outcome.stopped_by {
            Some(signal) => signal.exit_code() as u8,
            None => u8::try_from(outcome.exit_code).unwrap_or(EXIT_AGENTBOX_FAILED),
        };
    }
    eprintln!(
        "agentbox: task {task} exited {}; branch {}: {} ahead of {}, {} changed",
        outcome.exit_code,
        summary.branch,
        plural(summary.commits_ahead, "commit"),
        summary.base,
        plural(summary.files_changed, "file"),
    );
    if outcome.oom_killed {
        let limit = outcome.summary.memory_limit;
        eprintln!(
            "agentbox: {}",
            supervisor::out_of_memory_message(task, limit)
        );
    }
    for problem in &summary.problems {
        eprintln!("agentbox: warning: {problem}");
    }
    if !summary.left_out.is_empty() {
        let files: Vec<String> = summary
            .left_out
            .iter()
            .map(|l| format!("{} ({})", l.path, agentbox::config::Bytes(l.size)))
            .collect();
        eprintln!(
            "agentbox: too large for the snapshot commit, so left out of it: {}",
            files.join(", ")
        );
    }
    if let Some(kept) = &summary.kept {
        if kept.asked {
            eprintln!(
                "agentbox: kept worktree {} and stopped container {}; `agentbox rm {task}` removes them",
                kept.worktree.display(),
                kept.container
            );
        } else {
            eprintln!(
                "agentbox: kept worktree {} so that nothing is lost; copy out what you need, then `agentbox rm {task}` removes it",
                kept.worktree.display()
            );
        }
    }
    match outcome.stopped_by {
        Some(signal) => signal.exit_code() as u8,
        None => u8::try_from(outcome.exit_code).unwrap_or(EXIT_AGENTBOX_FAILED),
    }
}
