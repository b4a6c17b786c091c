use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use agentbox::config::{Bytes, Cpus, EnvVar, NetworkSetting, parse_env_file};
use agentbox::git::snapshot::LeftOutKind;
use agentbox::output::sanitize::sanitize_name;
use agentbox::runtime::Output;
use agentbox::supervisor::{self, Interactive, RunEvent, RunOutcome, RunRequest, StopLevel};
use tokio::sync::{mpsc, watch};

use super::detach::{self, Background};
use super::interactive::{Session, Target};
use super::signals::forward_signals;
use super::terminal;
use super::{
    CommandError, Context, EXIT_AGENTBOX_FAILED, default_user, key_value, labels, task_name,
};

/// Run a command in a new task: its own branch, worktree and container
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub options: TaskOptions,
    /// Run in the background: print the task's name once its command runs, and return. `agentbox
    /// attach`, `logs -f` and `wait` follow it. Without a command, the task idles until `agentbox
    /// stop` (as `agentbox up`), for `exec` and agents to run commands in
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Keep the command's stdin open and pass agentbox's to it (as `docker run -i`)
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal (as `docker run -t`); with -i it is this one: raw mode, its
    /// size, Ctrl-C for the command, and the detach keys
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keys that detach from an interactive task and leave it running [default:
    /// $AGENTBOX_DETACH_KEYS, or ctrl-p,ctrl-q]
    #[arg(long, value_name = "KEYS")]
    pub detach_keys: Option<String>,
    /// Print what the task would be (image, mounts, ports, environment with secrets masked,
    /// setup steps) and create nothing
    #[arg(long, conflicts_with_all = ["detach", "interactive", "tty"])]
    pub dry_run: bool,
    /// The command to run; the image's default command when omitted
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// What makes a task, whatever it runs.
#[derive(Debug, clap::Args)]
pub struct TaskOptions {
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
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    pub devcontainer: super::devcontainer::DevcontainerArgs,
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
pub(super) fn env_flag(raw: &str, context: &Context) -> Result<EnvVar, CommandError> {
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
    for file in &args.options.env_files {
        let path = context.env.current_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fail(format!("cannot read env file {}: {e}", path.display())))?;
        vars.extend(parse_env_file(&text, &path, &context.env.vars).map_err(fail)?);
    }
    for raw in &args.options.env {
        vars.push(env_flag(raw, context)?);
    }
    Ok(vars)
}

pub async fn run(context: &Context, args: Args) -> Result<u8, CommandError> {
    let background = detach::in_background();
    if args.tty && !background && !args.detach && !terminal::stdin_is_terminal() {
        return Err(fail("-t needs a terminal on stdin, and agentbox's stdin is not one")
            .with_hint("leave out -t (and keep -i to pass a pipe to the command), or run agentbox from a terminal"));
    }
    if !background {
        if args.detach {
            let idle = !args.interactive && !args.tty && args.command.is_empty();
            return detach::start_in_background(&args.options.task, idle).await;
        }
        if args.interactive {
            // Checked before the supervisor starts: a wrong spelling must not leave a task behind.
            let keys = context.detach_keys(args.detach_keys.as_deref(), EXIT_AGENTBOX_FAILED)?;
            task_name(&args.options.task, EXIT_AGENTBOX_FAILED)?;
            return interactive_run(context, &args, keys).await;
        }
    }
    // Everything is checked before anything is created.
    let task = task_name(&args.options.task, EXIT_AGENTBOX_FAILED)?;
    let env = explicit_env(context, &args)?;
    let labels = labels(&args.options.labels)?;
    let user_given = args.options.user.is_some();
    let user = Some(args.options.user.clone().unwrap_or_else(default_user));
    let from_head = args
        .options
        .base
        .is_none()
        .then(|| format!("task {task} starts"));
    let (ws, config, runtime, dirty_look) = context
        .prepare_runs(
            args.options.worktree_root.as_deref(),
            from_head.as_deref(),
            !background && !args.dry_run,
        )
        .await?;

    let from_config = context.default_request(task, &config, &ws);
    // `run -d` without a command: a long-lived task.
    let idle = args.detach && !args.interactive && !args.tty && args.command.is_empty();
    let interactive = Interactive {
        stdin: args.interactive,
        tty: args.tty,
        size: if background {
            detach::tty_size()
        } else {
            terminal::size()
        },
    };
    // A slot's container was made without a terminal or stdin.
    let poolable = !args.options.no_pool && !args.interactive && !args.tty;
    let image_flag = args.options.image.is_some();
    let mut request = RunRequest {
        image: args.options.image.unwrap_or(from_config.image.clone()),
        base: args.options.base,
        command: (!args.command.is_empty()).then_some(args.command),
        env,
        labels,
        user,
        keep: args.options.keep,
        keep_branch: args.options.keep_branch,
        use_pool: from_config.use_pool && poolable,
        stop_timeout: Duration::from_secs(args.options.stop_timeout),
        interactive,
        idle,
        // The interactive client attaches before the command starts.
        start_gate: (background && args.interactive && !args.detach).then(detach::start_gate),
        ..from_config
    };
    args.options
        .devcontainer
        .apply(
            &ws,
            &*runtime,
            &mut request,
            &config,
            super::devcontainer::Given {
                image: image_flag,
                user: user_given,
            },
            &mut Default::default(),
        )
        .await?;
    args.options
        .limits
        .apply(&mut request, context.env.total_memory)?;
    if args.dry_run {
        let text = super::devcontainer::describe(&ws, &request)?;
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
        return Ok(0);
    }
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
    let printer = if background {
        let say_created = args.interactive && !args.detach;
        tokio::spawn(detach::report_started(events_rx, say_created, refill))
    } else {
        tokio::spawn(print_events(events_rx, refill, dirty_look))
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

/// `run -i`: a background supervisor owns the task (as with `-d`), and this process is its
/// interactive client. The supervisor creates the container and waits; the client attaches and
/// lets the command start, so it misses nothing; detaching ends the client only. When the task
/// ends, the client waits for its teardown and exits with its exit code.
async fn interactive_run(
    context: &Context,
    args: &Args,
    detach_keys: terminal::DetachKeys,
) -> Result<u8, CommandError> {
    let task = &args.options.task;
    let env: Vec<(&str, String)> = terminal::size()
        .filter(|_| args.tty)
        .map(|(rows, cols)| (detach::TTY_SIZE_VAR, format!("{rows}x{cols}")))
        .into_iter()
        .collect();
    let mut supervisor = Background::spawn(task, std::env::args_os().skip(1), &env, true)?;
    let container = match supervisor.next_line().await {
        Some(line) if line.starts_with(detach::CREATED) => {
            line[detach::CREATED.len()..].trim().to_owned()
        }
        _ => return supervisor.failed().await,
    };
    let runtime = context.runtime().await.map_err(fail);
    let attached = match &runtime {
        Ok(runtime) => runtime
            .attach_interactive(&container, &detach_keys.text)
            .await
            .map_err(fail),
        Err(_) => Err(fail("no engine")),
    };
    // The command starts whether or not this client could attach: the task is the supervisor's.
    supervisor.open_gate().await;
    let (runtime, attached) = match (runtime, attached) {
        (Ok(runtime), Ok(attached)) => (runtime, attached),
        (Err(e), _) | (_, Err(e)) => {
            return Err(e.with_hint(format!(
                "task {task} runs in the background; `agentbox attach -it {task}` tries again"
            )));
        }
    };
    match supervisor.next_line().await {
        Some(line) if line == detach::STARTED => {}
        _ => return supervisor.failed().await,
    }
    // SIGINT and SIGTERM that reach this client go to the supervisor, as for `agentbox attach`:
    // without a terminal of its own a Ctrl-C here is one; with one it comes from elsewhere.
    let forwarding = detach::SignalForwarding::start(supervisor.pid());
    let session = Session {
        runtime: &*runtime,
        target: Target::Container(&container),
        output: attached.output,
        input: Some(attached.input),
        tty: args.tty,
        detach: detach_keys.watch_if_terminal(),
        signals_passed_on: forwarding.is_some(),
    };
    let ended = session.run().await?;
    let ws = context.workspace().map_err(fail)?;
    let name = task_name(task, EXIT_AGENTBOX_FAILED)?;
    super::attach::after_session(&ws, &name, ended, forwarding.as_ref()).await
}

async fn print_events(
    mut events: mpsc::Receiver<RunEvent>,
    mut on_started: Option<Box<dyn FnOnce() + Send>>,
    dirty_look: super::DirtyLook,
) {
    // Said before anything of the task: by the time its sandbox exists, the look is done.
    let mut dirty_look = Some(dirty_look);
    while let Some(event) = events.recv().await {
        if let Some(look) = dirty_look.take() {
            look.say().await;
        }
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
            RunEvent::Warning { message } => super::say(&format!("agentbox: warning: {message}")),
            RunEvent::Stopping { immediate: false } => {
                eprintln!(
                    "agentbox: stopping the task gracefully (interrupt again to kill it now)"
                );
            }
            RunEvent::Stopping { immediate: true } => eprintln!("agentbox: killing the task"),
            RunEvent::StartFailed { message } => super::say(&format!("agentbox: {message}")),
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
    // A run that failed before any event still says it.
    if let Some(look) = dirty_look {
        look.say().await;
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
        super::say(&format!("agentbox: warning: {problem}"));
    }
    let (nested, large): (Vec<_>, Vec<_>) = summary
        .left_out
        .iter()
        .partition(|l| l.kind == LeftOutKind::NestedRepository);
    if !large.is_empty() {
        let files: Vec<String> = large
            .iter()
            .map(|l| format!("{} ({})", sanitize_name(&l.path), Bytes(l.size)))
            .collect();
        eprintln!(
            "agentbox: too large for the snapshot commit, so left out of it: {}",
            files.join(", ")
        );
    }
    if !nested.is_empty() {
        let paths: Vec<_> = nested.iter().map(|l| sanitize_name(&l.path)).collect();
        eprintln!(
            "agentbox: repositories inside the worktree are not looked into (their configuration would run on your machine), so left out of the snapshot commit: {}",
            paths.join(", ")
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
