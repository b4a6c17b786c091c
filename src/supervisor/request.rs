//! What a run is asked to do, what it reports while it runs, and how it ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;

use crate::config::{
    ConfigError, DEFAULT_ENV_FILE_NAME, EnvVar, NetworkSetting, PortRange, ProjectConfig,
    ServiceConfig, relative_inside,
};
use crate::copy::CopyError;
use crate::fs_guard::GuardError;
use crate::git::GitError;
use crate::ports::{PortError, PortMapping};
use crate::runtime::{Limits, Output, RuntimeError};
use crate::state::StateError;
use crate::task::TaskName;
use crate::teardown::DEFAULT_MAX_SNAPSHOT_FILE;

/// The image a task runs in unless told otherwise; `images/build-base.sh` builds it.
pub const DEFAULT_IMAGE: &str = "agentbox/base:bookworm";

/// Processes and threads a task may run at once unless told otherwise: plenty for builds and test
/// runners, few enough that a fork bomb ends at the limit instead of taking the machine.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// The most a task's log keeps unless told otherwise.
pub const DEFAULT_LOG_MAX: u64 = 100 << 20;

/// Everything `agentbox run` was asked to do: `agentbox.toml` and the command line, resolved.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub task: TaskName,
    pub image: String,
    /// The base as the user wrote it; `None` means the HEAD of the worktree agentbox was started in.
    pub base: Option<String>,
    /// `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    /// Variables from env files and `--env`, already parsed; they override `env_templates`.
    pub env: Vec<EnvVar>,
    /// `[env]` of `agentbox.toml`, expanded once the host ports are known.
    pub env_templates: IndexMap<String, String>,
    /// The host's environment, for `${env:NAME}` (values taken from it are secrets).
    pub host_env: BTreeMap<String, String>,
    /// Name of the env file written into the worktree.
    pub env_file_name: String,
    pub labels: Vec<(String, String)>,
    /// `uid:gid` to run as; `None` runs as the image's user.
    pub user: Option<String>,
    /// Leave the worktree and the stopped container for inspection instead of tearing down.
    pub keep: bool,
    /// Keep the task's branch even when the task changed nothing (by default a branch this run
    /// created and the task left at its base is deleted).
    pub keep_branch: bool,
    /// How long the command gets between SIGTERM and SIGKILL when it is stopped.
    pub stop_timeout: Duration,
    /// Paths (relative, checked not to escape) copied from the source checkout into the worktree.
    pub copy: Vec<PathBuf>,
    /// Where `copy` paths come from: the checkout agentbox was started in.
    pub copy_from: Option<PathBuf>,
    /// Shell commands run in the task's container before its command.
    pub setup: Vec<String>,
    /// name -> container port, in the order of `agentbox.toml` (the first one is `PORT`).
    pub ports: IndexMap<String, u16>,
    pub port_range: PortRange,
    pub services: IndexMap<String, ServiceConfig>,
    /// For the task's container and each service that does not set its own.
    pub limits: Limits,
    /// `None`: no network at all.
    pub network: NetworkSetting,
    /// The most the task's log keeps.
    pub log_max: u64,
    /// Files larger than this are left out of the snapshot (and the worktree kept).
    pub max_snapshot_file: u64,
    /// Processes checking out the worktree at once.
    pub checkout_workers: usize,
    /// Return as soon as the work is safe, leaving the deletion of the stopped containers and the
    /// directories to a purge (see [`crate::trash`]; the caller starts it from
    /// [`RunSummary::trash`]).
    pub defer_deletion: bool,
    /// Take a ready sandbox from the pool when there is one for this kind of task.
    pub use_pool: bool,
    /// How a client talks to the command: a terminal, stdin, or neither.
    pub interactive: Interactive,
    /// Run no command: the container idles (its services with it) until the task is stopped,
    /// for `exec` and agents to run commands in. Overrides `command`.
    pub idle: bool,
    /// When set, the command starts only once this says `true` (or its sender is gone): an
    /// interactive client attaches to the created container first, so it misses no output.
    pub start_gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// Bind mounts of the task's container besides its worktree and git dirs (a devcontainer's
    /// `mounts`), checked by whoever added them.
    pub mounts: Vec<crate::runtime::Mount>,
    /// Where the worktree is mounted as well, and where the command starts (a devcontainer's
    /// `workspaceFolder`); `None`: at its own path only.
    pub workspace_folder: Option<String>,
    /// Shell commands run on the host, in the worktree, once it is checked out and before the
    /// container starts (a devcontainer's `initializeCommand`). Only the user's own configuration
    /// may set them.
    pub host_setup: Vec<String>,
    /// Variables from the repository's devcontainer.json, under `env_templates`.
    pub devcontainer_env: Vec<EnvVar>,
    /// Variables the container's shell sets, with `${VAR}` of the container's own environment.
    pub shell_env: Vec<(String, String)>,
    /// What the task's container may do beyond agentbox's defaults.
    pub privileges: crate::runtime::Privileges,
    /// The services and volumes of a devcontainer's compose files.
    pub compose: Option<crate::devcontainer::compose::ComposeTask>,
}

/// What `run -i`/`-t` ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interactive {
    /// Keep stdin open for attached clients.
    pub stdin: bool,
    /// Give the command a terminal.
    pub tty: bool,
    /// The caller's terminal size `(rows, cols)`, for the command's terminal from its start.
    pub size: Option<(u16, u16)>,
}

/// What a long-lived task runs: nothing, until it is stopped (SIGTERM ends it with exit code 0).
/// Any image with a POSIX shell and `sleep` has it.
pub const IDLE_COMMAND: [&str; 3] = [
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while sleep 1000 & wait $!; do :; done",
];

impl RunRequest {
    /// A request with the defaults `agentbox run` uses: the base's HEAD, the image's command, no
    /// extra environment, ports or services, the image's user, teardown at the end, a 10 s grace.
    pub fn new(task: TaskName, image: impl Into<String>) -> Self {
        Self {
            task,
            image: image.into(),
            base: None,
            command: None,
            env: Vec::new(),
            env_templates: IndexMap::new(),
            host_env: BTreeMap::new(),
            env_file_name: DEFAULT_ENV_FILE_NAME.to_owned(),
            labels: Vec::new(),
            user: None,
            keep: false,
            keep_branch: false,
            stop_timeout: Duration::from_secs(10),
            copy: Vec::new(),
            copy_from: None,
            setup: Vec::new(),
            ports: IndexMap::new(),
            port_range: PortRange::default(),
            services: IndexMap::new(),
            limits: Limits {
                pids: Some(DEFAULT_PIDS_LIMIT),
                ..Limits::default()
            },
            network: NetworkSetting::Bridge,
            log_max: DEFAULT_LOG_MAX,
            max_snapshot_file: DEFAULT_MAX_SNAPSHOT_FILE,
            checkout_workers: 4,
            defer_deletion: false,
            use_pool: false,
            interactive: Interactive::default(),
            idle: false,
            start_gate: None,
            mounts: Vec::new(),
            workspace_folder: None,
            host_setup: Vec::new(),
            devcontainer_env: Vec::new(),
            shell_env: Vec::new(),
            privileges: crate::runtime::Privileges::default(),
            compose: None,
        }
    }

    /// Applies `[limits]` of `agentbox.toml` (or a task file) over the limits the request has.
    pub fn apply_limits(&mut self, limits: &crate::config::LimitsConfig) {
        self.limits = limits.over(self.limits);
    }

    /// A request as `agentbox.toml` describes it, before command-line flags override it.
    /// `copy_from` is the checkout the `copy` paths are taken from.
    pub fn from_config(task: TaskName, config: &ProjectConfig, copy_from: Option<&Path>) -> Self {
        let image = config
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        let mut request = Self {
            env_templates: config.env.clone(),
            env_file_name: config
                .env_file_name
                .clone()
                .unwrap_or_else(|| DEFAULT_ENV_FILE_NAME.to_owned()),
            copy: config
                .copy
                .iter()
                .map(|p| relative_inside(p).expect("ProjectConfig::parse checked copy paths"))
                .collect(),
            copy_from: copy_from.map(Path::to_owned),
            setup: config.setup.clone(),
            ports: config.ports.clone(),
            port_range: config.port_range.unwrap_or_default(),
            services: config.services.clone(),
            network: config.network.unwrap_or(NetworkSetting::Bridge),
            ..Self::new(task, image)
        };
        request.apply_limits(&config.limits);
        if let Some(max) = config.log_max {
            request.log_max = max.0;
        }
        if let Some(max) = config.snapshot_max_file_size {
            request.max_snapshot_file = max.0;
        }
        request
    }
}

/// Which signal asked the task to stop; it decides agentbox's exit code (130 or 143).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    /// The exit code a shell reports for a process ended by this signal.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }
}

/// What the caller wants done with the running task; sent through a `watch` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopLevel {
    /// Let the command run to its end.
    Continue,
    /// SIGTERM, the grace period, then SIGKILL.
    Graceful(StopSignal),
    /// SIGKILL now (a second Ctrl-C). The snapshot still happens.
    Immediate(StopSignal),
}

/// What happens during a run, in order, for the caller to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// Branch, worktree and containers exist; the command has not started yet.
    Created {
        container_id: String,
        worktree: PathBuf,
        /// The task's and its services' ports, by name.
        ports: BTreeMap<String, PortMapping>,
        /// The sandbox was made ahead of time (a pool slot).
        from_pool: bool,
    },
    /// The container has started in the worktree.
    Started {
        container_id: String,
        worktree: PathBuf,
    },
    Output(Output),
    /// A stop is in progress; `immediate` when the container is being killed.
    Stopping {
        immediate: bool,
    },
    /// The command could not be started at all.
    StartFailed {
        message: String,
    },
    /// Something the user should know that does not stop the task (an import that failed and will
    /// be tried again).
    Warning {
        message: String,
    },
    /// The out-of-memory killer ended the command.
    OutOfMemory {
        limit: Option<u64>,
    },
    /// The command has ended and all its output has been delivered; the teardown starts.
    Exited {
        exit_code: i64,
    },
}

/// What a finished task left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub task: TaskName,
    pub branch: String,
    pub base: String,
    pub commits_ahead: usize,
    pub files_changed: usize,
    pub snapshot_commit: Option<String>,
    /// Set when the worktree stays: asked for with `keep`, or to keep work the snapshot could not
    /// take (`left_out`) or the import refused.
    pub kept: Option<Kept>,
    /// Files too large for the snapshot.
    pub left_out: Vec<crate::git::snapshot::LeftOut>,
    /// What went wrong in the teardown without losing anything (an import refused).
    pub problems: Vec<String>,
    /// The task's memory limit, for the message when it ran out.
    pub memory_limit: Option<u64>,
    /// The task changed nothing, so the branch this run made for it was deleted again.
    pub branch_deleted: bool,
    /// What is left to delete, for [`crate::trash::purge`].
    pub trash: Option<PathBuf>,
    /// The task was made from a pool slot (the caller may want to refill the pool).
    pub from_pool: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub worktree: PathBuf,
    pub container: String,
    /// Whether `keep` asked for it (else agentbox kept it to keep work safe).
    pub asked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The command's exit code (126/127 when it could not be started).
    pub exit_code: i64,
    /// Set when a stop request ended the task.
    pub stopped_by: Option<StopSignal>,
    /// The out-of-memory killer ended the command.
    pub oom_killed: bool,
    pub summary: RunSummary,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "task {task} is already running (see `agentbox ls`; stop it with `agentbox stop {task}`)"
    )]
    AlreadyRunning { task: TaskName },
    #[error(
        "task {task} was kept for inspection at {}; remove it with `agentbox rm {task}` before running it again",
        worktree.display()
    )]
    KeptBefore { task: TaskName, worktree: PathBuf },
    #[error(
        "worktree path {} for task {task} already exists; move it away or pick another task name",
        path.display()
    )]
    WorktreeExists { task: TaskName, path: PathBuf },
    #[error(
        "image {image} is not present locally and could not be pulled ({reason}); build it with `agentbox image build` (a few minutes; debootstrap, needs root or sudo), or pass --image with a local image"
    )]
    DefaultImageMissing { image: String, reason: String },
    #[error("cannot write the log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        source: crate::output::log::LogError,
    },
    #[error("task {task} was interrupted before its command started; nothing was kept")]
    InterruptedBeforeStart { task: TaskName, signal: StopSignal },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source}{}", rollback_note(rollback))]
    Setup {
        source: Box<RunError>,
        /// What could not be rolled back.
        rollback: Vec<String>,
    },
    #[error(
        "teardown of task {task} is incomplete: {}; {}",
        problems.join("; "), kept_where(worktree, task)
    )]
    Teardown {
        task: TaskName,
        worktree: PathBuf,
        problems: Vec<String>,
        /// The command's own exit code: the caller still exits with it.
        exit_code: Option<i64>,
    },
    #[error(
        "agentbox.toml asks to copy {} but there is no checkout to copy it from (a bare repository); run agentbox from a worktree",
        path.display()
    )]
    CopyWithoutCheckout { path: PathBuf },
    #[error(
        "initializeCommand {command:?} failed on the host ({}); nothing of the task was kept",
        code.map(|c| format!("exit code {c}")).unwrap_or_else(|| "killed by a signal".into())
    )]
    HostSetup { command: String, code: Option<i32> },
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("cannot prepare the worktree of task {task}: {source}")]
    Worktree { task: TaskName, source: GuardError },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ports(#[from] PortError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Recovery(#[from] crate::recovery::RecoveryError),
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
}

/// Where a task's work is after a teardown that did not finish.
fn kept_where(worktree: &std::path::Path, task: &TaskName) -> String {
    if worktree.exists() {
        format!(
            "its work is kept in worktree {} and on branch agentbox/{task}",
            worktree.display()
        )
    } else {
        format!("its commits are on branch agentbox/{task}")
    }
}

fn rollback_note(rollback: &[String]) -> String {
    if rollback.is_empty() {
        String::new()
    } else {
        format!(
            " (and the rollback left something behind: {})",
            rollback.join("; ")
        )
    }
}
