//! What a run is asked to do, what it reports while it runs, and how it ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indexmap::IndexMap;

use crate::config::{
    ConfigError, DEFAULT_ENV_FILE_NAME, EnvVar, PortRange, ProjectConfig, ServiceConfig,
    relative_inside,
};
use crate::docker::{DockerError, Output};
use crate::environment::PortMapping;
use crate::git::GitError;
use crate::ports::PortError;
use crate::state::StateError;
use crate::task::TaskName;

/// The image a task runs in unless told otherwise; `images/build-base.sh` builds it.
pub const DEFAULT_IMAGE: &str = "agentbox/base:bookworm";

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
}

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
            stop_timeout: Duration::from_secs(10),
            copy: Vec::new(),
            copy_from: None,
            setup: Vec::new(),
            ports: IndexMap::new(),
            port_range: PortRange::default(),
            services: IndexMap::new(),
        }
    }

    /// A request as `agentbox.toml` describes it, before command-line flags override it.
    /// `copy_from` is the checkout the `copy` paths are taken from.
    pub fn from_config(task: TaskName, config: &ProjectConfig, copy_from: Option<&Path>) -> Self {
        let image = config
            .image
            .clone()
            .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
        Self {
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
            ..Self::new(task, image)
        }
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
    /// Set when `keep` left the worktree and the stopped container in place.
    pub kept: Option<Kept>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub worktree: PathBuf,
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The command's exit code (126/127 when it could not be started).
    pub exit_code: i64,
    /// Set when a stop request ended the task.
    pub stopped_by: Option<StopSignal>,
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
        "teardown of task {task} is incomplete: {}; its work is kept in worktree {} and on branch agentbox/{task}",
        problems.join("; "), worktree.display()
    )]
    Teardown {
        task: TaskName,
        worktree: PathBuf,
        problems: Vec<String>,
        exit_code: Option<i64>,
    },
    #[error("copy path {} leads outside the repository; agentbox copies only files inside it", path.display())]
    CopyEscapes { path: PathBuf },
    #[error(
        "agentbox.toml asks to copy {} but there is no checkout to copy it from (a bare repository); run agentbox from a worktree",
        path.display()
    )]
    CopyWithoutCheckout { path: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ports(#[from] PortError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Recovery(#[from] crate::gc::GcError),
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
