//! The command line: parse arguments, call the library, render its results and map its errors to
//! exit codes. Every subcommand lives in a file of its own.

mod attach;
mod batch;
mod detach;
mod diff;
mod env;
mod gc;
mod logs;
mod ls;
mod ports;
mod rm;
mod run;
mod signals;
mod stop;
mod wait;

use std::ffi::OsString;
use std::fmt::Display;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use agentbox::Workspace;
use agentbox::config::ProjectConfig;
use agentbox::docker::Engine;
use agentbox::task::TaskName;
use clap::{Parser, Subcommand};

/// `docker run`'s code for "the runtime itself failed", used for every failure of agentbox's own.
pub const EXIT_AGENTBOX_FAILED: u8 = 125;
/// Failure of a subcommand other than `run`.
const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// Run coding agents (or any command) in parallel, each in its own git worktree and container.
#[derive(Debug, Parser)]
#[command(name = "agentbox", version, about, long_about = None)]
pub struct Cli {
    /// The repository to work on (a normal clone, a bare repository, or one of their worktrees);
    /// found from the current directory by default.
    #[arg(long, global = true, value_name = "PATH")]
    repo: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::Args),
    Batch(batch::Args),
    Ls(ls::Args),
    Logs(logs::Args),
    Diff(diff::Args),
    Ports(ports::Args),
    Env(env::Args),
    Stop(stop::Args),
    Rm(rm::Args),
    Wait(wait::Args),
    Attach(attach::Args),
    Gc(gc::Args),
}

/// What the CLI takes from its process environment, read once here so the library never does.
pub struct Env {
    docker_host: Option<String>,
    state_home: PathBuf,
    current_dir: PathBuf,
    /// For `${env:NAME}` templates, bare `--env NAME` and bare names in env files.
    vars: std::collections::BTreeMap<String, String>,
    /// `NO_COLOR` is set (to anything): no colours, whatever the terminal.
    no_color: bool,
}

impl Env {
    pub fn from_process() -> Self {
        let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let state_home = non_empty("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| non_empty("HOME").map(|home| Path::new(&home).join(".local/state")))
            .unwrap_or_else(|| std::env::temp_dir().join("agentbox-state"));
        Self {
            docker_host: non_empty("DOCKER_HOST").and_then(|v| v.into_string().ok()),
            state_home,
            current_dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            no_color: std::env::var_os("NO_COLOR").is_some(),
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

/// An error on its way to the user: the message (which names what is involved and, where there is
/// one, the fix) and the exit code.
#[derive(Debug)]
pub struct CommandError {
    message: String,
    pub exit_code: u8,
}

impl CommandError {
    fn new(error: impl Display, exit_code: u8) -> Self {
        // Library messages already include their causes, so the top message is complete.
        Self {
            message: error.to_string(),
            exit_code,
        }
    }

    pub fn report(&self) {
        let _ = writeln!(io::stderr().lock(), "agentbox: error: {}", self.message);
    }
}

/// Failures of everything but `run`.
fn failed(error: impl Display) -> CommandError {
    CommandError::new(error, EXIT_ERROR)
}

/// The exit code for a command line clap rejected: `run` follows `docker run` (125), the rest use
/// the usual 2; help and version are not errors.
pub fn usage_exit_code(error: &clap::Error, args: &[OsString]) -> u8 {
    if !error.use_stderr() {
        return 0;
    }
    let subcommand = args
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'));
    if subcommand.is_some_and(|s| s == "run") {
        EXIT_AGENTBOX_FAILED
    } else {
        EXIT_USAGE
    }
}

pub async fn dispatch(cli: Cli, env: Env) -> Result<u8, CommandError> {
    let context = Context {
        repo: cli.repo,
        env,
    };
    match cli.command {
        Command::Run(args) => run::run(&context, args).await,
        Command::Batch(args) => batch::batch(&context, args).await,
        Command::Ls(args) => ls::ls(&context, args),
        Command::Logs(args) => logs::logs(&context, args),
        Command::Diff(args) => diff::diff(&context, args).await,
        Command::Ports(args) => ports::ports(&context, args),
        Command::Env(args) => env::env(&context, args),
        Command::Stop(args) => stop::stop(&context, args).await,
        Command::Rm(args) => rm::rm(&context, args).await,
        Command::Wait(args) => wait::wait(&context, args).await,
        Command::Attach(args) => attach::attach(&context, args).await,
        Command::Gc(args) => gc::gc(&context, args).await,
    }
}

struct Context {
    repo: Option<PathBuf>,
    env: Env,
}

impl Context {
    fn start_dir(&self) -> PathBuf {
        match &self.repo {
            Some(repo) => self.env.current_dir.join(repo),
            None => self.env.current_dir.clone(),
        }
    }

    fn workspace(&self) -> Result<Workspace, agentbox::git::GitError> {
        Workspace::open(&self.start_dir(), &self.env.state_home)
    }

    /// What `run` and `batch` do before any task starts: open the repository with its
    /// `agentbox.toml` applied (a `--worktree-root` flag wins over the file), connect to the engine,
    /// and clean up after tasks that dead supervisors left behind. Fails with exit code 125.
    async fn prepare_runs(
        &self,
        worktree_root: Option<&Path>,
    ) -> Result<(Workspace, ProjectConfig, Engine), CommandError> {
        let fail = |e: &dyn Display| CommandError::new(e, EXIT_AGENTBOX_FAILED);
        let mut ws = self.workspace().map_err(|e| fail(&e))?;
        let config = ws.load_config().map_err(|e| fail(&e))?;
        if let Some(root) = worktree_root {
            ws.set_worktree_root(root, &self.env.current_dir);
        } else if let Some(root) = &config.worktree_root {
            let project_root = ws.project_root().to_owned();
            ws.set_worktree_root(root, &project_root);
        }
        let engine = Engine::connect(self.env.docker_host.as_deref())
            .await
            .map_err(|e| fail(&e))?;
        gc::recover_left_behind(&ws, &engine).await;
        Ok((ws, config, engine))
    }
}

/// The `--label K=V` flags.
fn labels(raw: &[String]) -> Result<Vec<(String, String)>, CommandError> {
    raw.iter()
        .map(|label| key_value(label, "--label"))
        .collect()
}

/// `K=V` of a `--label` or `--env` flag.
fn key_value(raw: &str, what: &str) -> Result<(String, String), CommandError> {
    match raw.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(CommandError::new(
            format!("{what} {raw:?} must have the form KEY=VALUE"),
            EXIT_AGENTBOX_FAILED,
        )),
    }
}

/// Tasks run as agentbox's own uid:gid, so the worktree never fills with files the user cannot
/// change.
fn default_user() -> String {
    format!(
        "{}:{}",
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    )
}

fn task_name(name: &str, exit_code: u8) -> Result<TaskName, CommandError> {
    TaskName::parse(name).map_err(|e| CommandError::new(e, exit_code))
}

/// Writes data to stdout; a reader that went away (`agentbox ls | head`) ends the command cleanly.
fn write_stdout(bytes: &[u8]) -> Result<bool, CommandError> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(failed(format!("cannot write to stdout: {e}"))),
    }
}
