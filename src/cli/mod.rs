//! The command line: parse arguments, call the library, render its results and map its errors to
//! exit codes. Every subcommand lives in a file of its own.

mod agent_setup;
mod apply;
mod attach;
mod batch;
mod completions;
mod conflicts;
mod detach;
mod devcontainer;
mod diff;
mod doctor;
mod env;
mod exec;
mod gc;
mod image;
mod interactive;
mod logs;
mod ls;
mod man;
mod mcp;
mod merge;
mod pool;
mod ports;
mod purge;
mod queue;
mod review;
mod rm;
mod run;
mod shell;
mod signals;
mod stop;
mod terminal;
mod up;
mod wait;

use std::error::Error;
use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentbox::Workspace;
use agentbox::config::ProjectConfig;
use agentbox::docker::{DEFAULT_ADDRESS, DockerEngine};
use agentbox::output::sanitize::{Colours, sanitize_name, sanitize_text};
use agentbox::runtime::Runtime;
use agentbox::task::TaskName;
use clap::{Parser, Subcommand};

/// `docker run`'s code for "the runtime itself failed", used for every failure of agentbox's own
/// in the commands that otherwise exit with a task's or command's code (`run`, `up`, `exec`,
/// `shell`).
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
    Up(up::Args),
    Exec(exec::Args),
    Shell(shell::Args),
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
    Review(review::Args),
    Merge(merge::Args),
    Apply(apply::Args),
    Conflicts(conflicts::Args),
    Queue(queue::Args),
    Image(image::Args),
    Pool(pool::Args),
    #[command(hide = true)]
    Purge(purge::Args),
    Mcp(mcp::Args),
    AgentSetup(agent_setup::Args),
    Doctor(doctor::Args),
    Completions(completions::Args),
    Man(man::Args),
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
    /// The machine's memory, for the default memory limit of a task.
    total_memory: Option<u64>,
    /// `AGENTBOX_DETACH_KEYS`: the keys that detach from an interactive task.
    detach_keys: Option<String>,
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
            total_memory: total_memory(),
            detach_keys: non_empty("AGENTBOX_DETACH_KEYS").and_then(|v| v.into_string().ok()),
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        }
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo).
fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An error on its way to the user: the error with its chain of causes (each names what is
/// involved), a hint where there is one, and the exit code.
#[derive(Debug)]
pub struct CommandError {
    error: Box<dyn Error + Send + Sync>,
    hint: Option<String>,
    pub exit_code: u8,
}

impl CommandError {
    fn new(error: impl Into<Box<dyn Error + Send + Sync>>, exit_code: u8) -> Self {
        Self {
            error: error.into(),
            hint: None,
            exit_code,
        }
    }

    fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// `agentbox: error: <message>`, then each cause the message does not already say, then the
    /// hint.
    pub fn render(&self) -> String {
        let mut said = self.error.to_string();
        let mut out = format!("agentbox: error: {said}\n");
        let mut source = self.error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !said.contains(&text) {
                out.push_str(&format!("  caused by: {text}\n"));
                said.push_str(&text);
            }
            source = cause.source();
        }
        if let Some(hint) = &self.hint {
            out.push_str(&format!("  hint: {hint}\n"));
        }
        out
    }

    /// Writes the error to stderr, shown safely: a message can quote what a task chose (a file
    /// name of a conflict, git's or a hook's words about the task's files).
    pub fn report(&self) {
        write_shown(&self.render());
    }
}

/// The warning that tasks starting from `HEAD` miss the checkout's uncommitted changes, when they
/// would.
async fn dirty_look(repo: agentbox::git::Repo, tasks: String) -> Option<String> {
    if !repo.checkout_is_dirty().await.unwrap_or(false) {
        return None;
    }
    let head = repo.head_name();
    let id = repo
        .resolve_commit(&head)
        .map(|id| id.to_hex_with_len(7).to_string())
        .unwrap_or_default();
    Some(format!(
        "your checkout has uncommitted changes; {tasks} from {head} ({id}) without them"
    ))
}

/// A look at the checkout still going on beside a run (see [`Context::prepare_runs`]).
pub(crate) struct DirtyLook(Option<tokio::task::JoinHandle<Option<String>>>);

impl DirtyLook {
    /// Says the look's warning, if it has one, once the look is done.
    async fn say(self) {
        if let Some(look) = self.0
            && let Ok(Some(message)) = look.await
        {
            say(&format!("agentbox: {message}"));
        }
    }
}

/// Writes `line` and a newline to stderr, shown safely: agentbox's words that may quote what a
/// task chose (an error about its files, its refs, its output).
fn say(line: &str) {
    write_shown(&format!("{line}\n"));
}

/// Writes `text` to stderr with its control sequences shown, not obeyed.
fn write_shown(text: &str) {
    let shown = sanitize_text(text.as_bytes(), Colours::Show);
    let _ = io::stderr().lock().write_all(shown.as_bytes());
}

/// Failures of everything but `run`.
fn failed(error: impl Into<Box<dyn Error + Send + Sync>>) -> CommandError {
    CommandError::new(error, EXIT_ERROR)
}

/// The subcommand of a command line: the first argument that is neither an option nor the value of
/// the global `--repo`.
fn subcommand_of(args: &[OsString]) -> Option<String> {
    let mut rest = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(arg) = rest.next() {
        if arg == "--repo" {
            rest.next();
        } else if !arg.starts_with('-') {
            return Some(arg.into_owned());
        }
    }
    None
}

/// Reports a command line clap rejected and returns the exit code: `run` follows `docker run`
/// (125), the rest use the usual 2; help and version are not errors.
pub fn usage_error(error: &clap::Error, args: &[OsString]) -> u8 {
    let _ = error.print();
    if !error.use_stderr() {
        return 0;
    }
    let subcommand = subcommand_of(args);
    if error.kind() == clap::error::ErrorKind::UnknownArgument
        && matches!(subcommand.as_deref(), Some("run" | "exec"))
    {
        eprintln!(
            "  hint: a command for the task goes after `--`: agentbox {} <task> -- <command>...",
            subcommand.as_deref().unwrap_or("run")
        );
    }
    if matches!(subcommand.as_deref(), Some("run" | "up" | "exec" | "shell")) {
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
        Command::Up(args) => up::up(&context, args).await,
        Command::Exec(args) => exec::exec(&context, args).await,
        Command::Shell(args) => shell::shell(&context, args).await,
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
        Command::Review(args) => review::review(&context, args).await,
        Command::Merge(args) => merge::merge(&context, args).await,
        Command::Apply(args) => apply::apply(&context, args).await,
        Command::Conflicts(args) => conflicts::conflicts(&context, args).await,
        Command::Queue(args) => queue::queue(&context, args).await,
        Command::Image(args) => image::image(args).await,
        Command::Pool(args) => pool::pool(&context, args).await,
        Command::Purge(args) => purge::purge(&context, args).await,
        Command::Mcp(args) => mcp::mcp(&context, args).await,
        Command::AgentSetup(args) => agent_setup::agent_setup(&context, args),
        Command::Doctor(args) => doctor::doctor(&context, args).await,
        Command::Completions(args) => completions::completions(args),
        Command::Man(args) => man::man(args),
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

    /// A task's request as `agentbox.toml` and agentbox's defaults make it, before any flag: the
    /// caller's environment, its uid:gid, half the machine's memory unless `[limits]` says
    /// otherwise, the pool when `[pool]` asks for one.
    fn default_request(
        &self,
        task: TaskName,
        config: &ProjectConfig,
        ws: &Workspace,
    ) -> agentbox::RunRequest {
        let mut request =
            agentbox::RunRequest::from_config(task, config, ws.repo.workdir.as_deref());
        request.host_env = self.env.vars.clone();
        request.user = Some(default_user());
        if request.limits.memory_bytes.is_none() {
            request.limits.memory_bytes = self.env.total_memory.map(|total| total / 2);
        }
        request.use_pool = config.pool.size > 0;
        request
    }

    /// The detach keys: the flag, else `AGENTBOX_DETACH_KEYS`, else docker's.
    fn detach_keys(
        &self,
        flag: Option<&str>,
        exit_code: u8,
    ) -> Result<terminal::DetachKeys, CommandError> {
        let text = flag
            .or(self.env.detach_keys.as_deref())
            .unwrap_or(terminal::DEFAULT_DETACH_KEYS);
        terminal::DetachKeys::parse(text).map_err(|e| CommandError::new(e, exit_code))
    }

    /// The container engine: the one place where it is chosen.
    async fn runtime(&self) -> Result<Arc<dyn Runtime>, agentbox::runtime::RuntimeError> {
        let engine = DockerEngine::connect(self.env.docker_host.as_deref()).await?;
        Ok(Arc::new(engine))
    }

    /// Where [`runtime`](Self::runtime) looks for the engine, and where it would without
    /// `DOCKER_HOST`.
    fn engine_address(&self) -> (String, String) {
        let address = self.env.docker_host.as_deref().unwrap_or(DEFAULT_ADDRESS);
        (address.to_owned(), DEFAULT_ADDRESS.to_owned())
    }

    /// What `run` and `batch` do before any task starts: open the repository with its
    /// `agentbox.toml` applied (a `--worktree-root` flag wins over the file), say (or refuse, if
    /// `agentbox.toml` asks) when tasks starting from `HEAD` would miss uncommitted changes of the
    /// checkout, connect to the engine, and clean up after tasks that dead supervisors left
    /// behind. Fails with exit code 125.
    async fn prepare_runs(
        &self,
        worktree_root: Option<&Path>,
        from_head: Option<&str>,
        defer_look: bool,
    ) -> Result<(Workspace, ProjectConfig, Arc<dyn Runtime>, DirtyLook), CommandError> {
        let fail = |e: Box<dyn Error + Send + Sync>| CommandError::new(e, EXIT_AGENTBOX_FAILED);
        let mut ws = self.workspace().map_err(|e| fail(e.into()))?;
        let config = ws.load_config().map_err(|e| fail(e.into()))?;
        if let Some(root) = worktree_root {
            ws.set_worktree_root(root, &self.env.current_dir);
        } else if let Some(root) = &config.worktree_root {
            let project_root = ws.project_root().to_owned();
            ws.set_worktree_root(root, &project_root);
        }
        let look = from_head.map(|tasks| dirty_look(ws.repo.clone(), tasks.to_owned()));
        // `git status` of a large checkout takes longer than anything else here: unless its answer
        // can stop the run, it goes on beside the task's creation, and the caller says it later.
        if defer_look && !config.refuse_dirty_checkout {
            let deferred = DirtyLook(look.map(tokio::spawn));
            let runtime = self.runtime().await.map_err(|e| fail(e.into()))?;
            gc::recover_left_behind(&ws, &*runtime).await;
            return Ok((ws, config, runtime, deferred));
        }
        // The look at the checkout overlaps with the engine's handshake and the cleanup after
        // dead supervisors.
        let dirty = async {
            match look {
                Some(look) => look.await,
                None => None,
            }
        };
        let connected = async {
            let runtime = self.runtime().await?;
            gc::recover_left_behind(&ws, &*runtime).await;
            Ok::<_, agentbox::runtime::RuntimeError>(runtime)
        };
        let (dirty, runtime) = tokio::join!(dirty, connected);
        if let Some(message) = dirty {
            if config.refuse_dirty_checkout {
                return Err(CommandError::new(message, EXIT_AGENTBOX_FAILED).with_hint(
                    "commit or stash them first (refuse_dirty_checkout in agentbox.toml asks for a clean checkout)",
                ));
            }
            say(&format!("agentbox: {message}"));
        }
        let runtime = runtime.map_err(|e| fail(e.into()))?;
        Ok((ws, config, runtime, DirtyLook(None)))
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

/// File names a task chose, as agentbox's text lists them: `a.txt, b.txt`, each shown safely.
fn file_list(files: &[String]) -> String {
    files
        .iter()
        .map(|f| sanitize_name(f))
        .collect::<Vec<_>>()
        .join(", ")
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
