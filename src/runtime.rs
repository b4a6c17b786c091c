//! The seam between agentbox and a container engine: what a task needs of one, and nothing more.
//!
//! Everything above this trait (the supervisor, the teardown, recovery, batch, the subcommands) is
//! written against [`Runtime`]; `src/docker/` is the one implementation, and the only module that
//! names the engine's client library. The engine is chosen once, where the CLI starts. Unit tests
//! drive the supervisor's and the teardown's decisions through a fake implementation
//! (`runtime::fake`), while the integration tests run against the real engine.
//!
//! A task's *sandbox* is its container plus whatever runs beside it: sidecar services and the network
//! that joins them. An engine creates it from a [`SandboxPlan`] in which every path, port and name is
//! already known, so creation can overlap with the checkout of the task's worktree.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::BoxStream;

/// Label carrying the id of the repository a container or network belongs to.
pub const REPO_LABEL: &str = "agentbox.repo";
/// Label carrying the task's name.
pub const TASK_LABEL: &str = "agentbox.task";
/// Label carrying the name of a sidecar service.
pub const SERVICE_LABEL: &str = "agentbox.service";
/// Label of the network the tasks of a repository without services share (value `isolated`).
pub const SHARED_LABEL: &str = "agentbox.shared";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "cannot reach the container engine at {address}: {reason} (is it running? DOCKER_HOST selects another engine)"
    )]
    Unreachable { address: String, reason: String },
    #[error("image {image} is not present locally and could not be pulled: {reason}")]
    ImageMissing { image: String, reason: String },
    #[error(
        "container or network name {name} is already in use; remove it or pick another task name"
    )]
    NameInUse { name: String },
    #[error(
        "the engine has no free address range for network {network}: each network takes one (the engine's default pools hold about 30); remove networks you do not need (`agentbox gc` removes agentbox's), run fewer tasks with services at once (`batch --parallel`), or give the engine more with `default-address-pools` in /etc/docker/daemon.json"
    )]
    NoAddressPool { network: String },
    #[error("service container {service} could not start: {message}")]
    ServiceStart { service: String, message: String },
    #[error("service {service} {state}: {message}")]
    ServiceNotReady {
        service: String,
        state: String,
        message: String,
    },
    #[error(transparent)]
    Untranslatable(#[from] host_paths::Untranslatable),
    #[error("{action} {target} failed: {source}")]
    Api {
        action: &'static str,
        target: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a created container could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command does not exist in the image (`docker run` exits 127 for this).
    #[error("command not found: {command}")]
    NotFound { command: String },
    /// The command exists but cannot be executed (`docker run` exits 126).
    #[error("command cannot be executed: {command}")]
    NotExecutable { command: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl StartError {
    /// As an engine error: for a container whose own command is agentbox's (a pool slot's idle
    /// one), a command that cannot start is the engine's problem, not the task's.
    pub fn into_runtime_error(self, action: &'static str, container: &str) -> RuntimeError {
        match self {
            Self::Runtime(e) => e,
            other => RuntimeError::Api {
                action,
                target: container.to_owned(),
                source: other.to_string().into(),
            },
        }
    }
}

/// Resource limits of one container. `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPUs in billionths (`--cpus 1.5` is 1_500_000_000).
    pub nano_cpus: Option<u64>,
    pub pids: Option<u64>,
}

/// How a container is connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// A named network, with the host names others on it reach the container by.
    Named { name: String, aliases: Vec<String> },
    /// No network at all: a loopback interface only.
    None,
    /// The network of another container of the sandbox, named by its spec's name (compose's
    /// `network_mode: service:<name>`).
    Container(String),
    /// The engine's default.
    #[default]
    Default,
}

/// Everything needed to create one container; all of it is known before the worktree exists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    /// Replaces the image's entrypoint (the setup wrapper does this).
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Bind mounts.
    pub mounts: Vec<Mount>,
    pub working_dir: String,
    /// `uid:gid`, or `None` for the image's user.
    pub user: Option<String>,
    /// `(container port, host port)` pairs, published on 127.0.0.1 only.
    pub ports: Vec<(u16, u16)>,
    pub network: Network,
    pub limits: Limits,
    /// Allocate a pseudo-terminal (`docker run -t`): the output is then one stream, and a client
    /// attached with [`Runtime::attach_interactive`] is its terminal.
    pub tty: bool,
    /// Keep stdin open for attached clients (`docker run -i`). Without a terminal, stdin is closed
    /// when the first client that attached it closes its side (so a pipe's end reaches the
    /// command); with one it stays open, so clients can detach and attach again.
    pub stdin: bool,
    /// The terminal's size `(rows, cols)` from the start, on engines that take it at creation;
    /// others get it through [`Runtime::resize`] right after the start.
    pub console_size: Option<(u16, u16)>,
    /// Beyond agentbox's defaults (which drop capabilities and forbid new privileges).
    pub privileges: Privileges,
    /// Named volumes of the sandbox mounted into this container.
    pub volumes: Vec<VolumeMount>,
    pub healthcheck: Option<Healthcheck>,
    /// Containers of the sandbox (by spec name) that must be started, healthy or done first.
    pub depends_on: Vec<(String, Readiness)>,
}

/// A named volume of the sandbox in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub volume: String,
    pub target: String,
    pub read_only: bool,
}

/// How the engine tells whether a container is healthy (compose's `healthcheck`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["CMD", ...]` or `["CMD-SHELL", "..."]`.
    pub test: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
}

impl Healthcheck {
    /// No healthcheck, not even the image's: for a task's container, which nothing waits on, and
    /// which may run while the host still writes its worktree (a pool slot being moved to a
    /// task's start) — an image's check running then would race those writes.
    pub fn disabled() -> Self {
        Self {
            test: vec!["NONE".to_owned()],
            interval: Duration::ZERO,
            timeout: Duration::ZERO,
            retries: 0,
            start_period: Duration::ZERO,
        }
    }

    /// How long a container may take to become healthy before agentbox gives up on it.
    pub fn patience(&self) -> Duration {
        let per_try = self.interval + self.timeout;
        (self.start_period + per_try * (self.retries + 1)).max(Duration::from_secs(5))
    }
}

/// What another container waits for (compose's `depends_on` conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Started,
    Healthy,
    CompletedSuccessfully,
}

/// A named volume made for one sandbox and removed with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// What a container may do beyond agentbox's defaults; granted only when the user asked for it
/// (`--allow-privileged`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Privileges {
    /// Every capability and device: `docker run --privileged`.
    pub privileged: bool,
    /// Capabilities given back (`SYS_PTRACE`).
    pub cap_add: Vec<String>,
    /// `docker run --security-opt` values.
    pub security_opt: Vec<String>,
}

impl Privileges {
    pub fn is_empty(&self) -> bool {
        !self.privileged && self.cap_add.is_empty() && self.security_opt.is_empty()
    }

    /// `privileged, capAdd SYS_PTRACE`
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.privileged {
            parts.push("privileged".to_owned());
        }
        if !self.cap_add.is_empty() {
            parts.push(format!("capAdd {}", self.cap_add.join(" ")));
        }
        if !self.security_opt.is_empty() {
            parts.push(format!("securityOpt {}", self.security_opt.join(" ")));
        }
        parts.join(", ")
    }
}

/// An image to build from a tar of its context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildSpec {
    pub tag: String,
    /// The build context as a tar.
    pub context: Vec<u8>,
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    pub args: Vec<(String, String)>,
    pub target: Option<String>,
    pub labels: HashMap<String, String>,
}

/// A host path bound into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Mount {
    /// A host path at the same path inside the container.
    pub fn same_path(path: &std::path::Path, read_only: bool) -> Self {
        let path = path.display().to_string();
        Self {
            source: path.clone(),
            target: path,
            read_only,
        }
    }
}

/// What an image runs when a container does not say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A network a task's sandbox is on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkSpec {
    pub name: String,
    pub labels: HashMap<String, String>,
    /// Shared by the tasks of a repository that have no services: created once and kept, with
    /// traffic between its containers switched off, so that no task reaches another. A network that
    /// is not shared is the task's own (its services are on it) and goes with the sandbox.
    pub shared_isolated: bool,
}

/// What to create for a task, all known before anything exists.
#[derive(Debug, Clone, Default)]
pub struct SandboxPlan {
    /// The task's own network, created first and removed last.
    pub network: Option<NetworkSpec>,
    /// Made before any container, removed after them.
    pub volumes: Vec<VolumeSpec>,
    /// Started before the task's container is created.
    pub services: Vec<ContainerSpec>,
    pub task: ContainerSpec,
    /// Shell commands run in the task's container before its command.
    pub setup: Vec<String>,
    /// Variables the container's shell sets before the setup and the command (`KEY`, a value
    /// in which `${VAR}` names the container's own variables).
    pub shell_env: Vec<(String, String)>,
}

/// What exists of a task's sandbox (complete, or as far as a failed creation got).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub network: Option<String>,
    pub volumes: Vec<String>,
    pub services: Vec<String>,
    pub container: Option<String>,
    /// What the task's image runs by default.
    pub image_defaults: ImageDefaults,
}

impl Sandbox {
    pub fn is_empty(&self) -> bool {
        self.network.is_none()
            && self.services.is_empty()
            && self.container.is_none()
            && self.volumes.is_empty()
    }
}

/// One chunk of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
    /// The container started but its command could not be executed; the engine's own message is
    /// replaced by this. Nothing else comes after it.
    NotStarted {
        /// `true` when the command does not exist (127), `false` when it cannot be executed (126).
        not_found: bool,
        command: String,
    },
}

pub type OutputStream = BoxStream<'static, Result<Output, RuntimeError>>;

/// A command to run in a container that runs (`docker exec`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub command: Vec<String>,
    /// `KEY=VALUE`, on top of the container's environment.
    pub env: Vec<String>,
    /// `None`: the container's working directory.
    pub working_dir: Option<String>,
    /// `None`: the container's user.
    pub user: Option<String>,
    /// Allocate a pseudo-terminal (output then comes as one stream, on stdout).
    pub tty: bool,
    /// Keep stdin open, for [`Execution::input`].
    pub stdin: bool,
}

/// A command running in a container.
pub struct Execution {
    /// For [`Runtime::exec_exit`] and [`Runtime::resize_exec`].
    pub id: String,
    /// Its output until it ends.
    pub output: OutputStream,
    /// Its stdin, when [`ExecSpec::stdin`] asked for it.
    pub input: Option<std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>>,
}

/// A client attached to a container's terminal (or stdin) and output.
pub struct Attached {
    /// The container's output until it stops, or until the engine ends the attachment because it
    /// read the detach keys.
    pub output: OutputStream,
    /// The container's stdin.
    pub input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution").field("id", &self.id).finish()
    }
}

/// How a container's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i64,
    /// The kernel's out-of-memory killer ended it (the exit code is then 137).
    pub oom_killed: bool,
}

/// A container found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub labels: HashMap<String, String>,
}

/// A network found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundNetwork {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
}

/// What a task needs of a container engine.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    /// How the engine is named in messages ("the Docker engine at unix:///var/run/docker.sock").
    fn describe(&self) -> String;

    /// Makes sure the images exist, creates the network, starts the services and creates (without
    /// starting) the task's container. On failure the error comes back with what was made, for the
    /// rollback.
    async fn create_sandbox(&self, plan: &SandboxPlan) -> Result<Sandbox, (RuntimeError, Sandbox)>;

    /// The container's stdout and stderr, from now until it stops. Attach before starting, so that
    /// not one byte of early output is lost.
    async fn attach(&self, container: &str) -> Result<OutputStream, RuntimeError>;

    async fn start(&self, container: &str) -> Result<(), StartError>;

    /// Waits until the container is not running. Asked after the start, it cannot miss an exit that
    /// already happened.
    async fn wait(&self, container: &str) -> Result<Exit, RuntimeError>;

    /// SIGTERM, then SIGKILL after `grace`. A container that is not running is not an error.
    async fn stop(&self, container: &str, grace: Duration) -> Result<(), RuntimeError>;

    /// SIGKILL now. A container that is not running is not an error.
    async fn kill(&self, container: &str) -> Result<(), RuntimeError>;

    /// SIGKILL now, returning once no process of the container is left; the engine may still be
    /// finishing with the container (its network, its state), which may look running a while yet.
    async fn kill_processes(&self, container: &str) -> Result<(), RuntimeError> {
        self.kill(container).await
    }

    /// Removes a container, killing it first if it still runs; one that is gone is not an error.
    async fn remove_container(&self, container: &str) -> Result<(), RuntimeError>;

    /// Removes a network; one that is gone is not an error.
    async fn remove_network(&self, network: &str) -> Result<(), RuntimeError>;

    /// Gives a container another name (a pool slot's container, the task's that takes it).
    async fn rename_container(&self, container: &str, name: &str) -> Result<(), RuntimeError>;

    /// Containers (running or not) carrying every one of `labels` (`key=value`).
    async fn find_containers(&self, labels: &[String])
    -> Result<Vec<FoundContainer>, RuntimeError>;

    /// Networks carrying every one of `labels` (`key=value`).
    async fn find_networks(&self, labels: &[String]) -> Result<Vec<FoundNetwork>, RuntimeError>;

    /// How the container's command ended; `None` while it runs, when it never started, or when the
    /// container is gone.
    async fn exit_if_ended(&self, container: &str) -> Result<Option<Exit>, RuntimeError>;

    /// Starts a command in a running container, attached to its output (and stdin, if asked).
    async fn exec(&self, container: &str, spec: &ExecSpec) -> Result<Execution, StartError>;

    /// The exit code of an execution whose output has ended.
    async fn exec_exit(&self, execution: &str) -> Result<i64, RuntimeError>;

    /// Tells an execution with a terminal its new size.
    async fn resize_exec(&self, execution: &str, rows: u16, cols: u16) -> Result<(), RuntimeError>;

    /// Attaches a client to the stdin and output of a container created with
    /// [`ContainerSpec::stdin`] (before or after its start). `detach_keys` (docker's notation,
    /// `ctrl-p,ctrl-q`) end the attachment and leave the container running.
    async fn attach_interactive(
        &self,
        container: &str,
        detach_keys: &str,
    ) -> Result<Attached, RuntimeError>;

    /// Tells a running container with a terminal its new size.
    async fn resize(&self, container: &str, rows: u16, cols: u16) -> Result<(), RuntimeError>;

    /// Makes a network (not a shared one); returns its id.
    async fn create_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError>;

    /// Connects a running container to a network, reachable there by `aliases`.
    async fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: &[String],
    ) -> Result<(), RuntimeError>;

    /// Creates a container (its image must be present or pullable) without starting it; returns
    /// its id.
    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;

    /// Builds an image; each line of the build's output goes to `progress`.
    async fn build_image(
        &self,
        spec: &BuildSpec,
        progress: &(dyn for<'line> Fn(&'line str) + Sync),
    ) -> Result<(), RuntimeError>;

    /// Removes whatever exists of a sandbox: its containers at once, then its network. Returns what
    /// could not be removed.
    async fn remove_sandbox(&self, sandbox: &Sandbox) -> Vec<RuntimeError> {
        let containers = sandbox.container.iter().chain(&sandbox.services);
        let removed =
            futures::future::join_all(containers.map(|id| self.remove_container(id))).await;
        let mut problems: Vec<RuntimeError> = removed.into_iter().filter_map(Result::err).collect();
        if let Some(network) = &sandbox.network
            && let Err(e) = self.remove_network(network).await
        {
            problems.push(e);
        }
        for volume in &sandbox.volumes {
            if let Err(e) = self.remove_volume(volume).await {
                problems.push(e);
            }
        }
        problems
    }

    /// Removes a named volume (nothing when it is gone already).
    async fn remove_volume(&self, volume: &str) -> Result<(), RuntimeError>;

    /// Names of the volumes that carry all of these labels (`key=value`).
    async fn find_volumes(&self, labels: &[String]) -> Result<Vec<String>, RuntimeError>;

    /// The engine's own version and API versions.
    async fn version(&self) -> Result<EngineVersion, RuntimeError>;

    /// Whether `image` is present locally (nothing is pulled).
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError>;

    /// Where the engine finds the paths agentbox sees.
    fn host_paths(&self) -> host_paths::HostPaths {
        host_paths::HostPaths::Same
    }
}

/// What an engine says of its own version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineVersion {
    /// The engine's release ("20.10.24").
    pub engine: String,
    /// The newest API version the engine speaks ("1.41").
    pub api: String,
    /// The API version agentbox and the engine agreed on.
    pub agreed: String,
}

/// Runs the setup commands in the container's own shell before the task's command, so that their
/// output is streamed and logged exactly like the command's. The command is what the container
/// would have run without setup: the image's entrypoint followed by the given command (or the
/// image's default command). Returns the new entrypoint and command.
pub fn wrap_with_setup(
    setup: &[String],
    shell_env: &[(String, String)],
    command: Option<Vec<String>>,
    image: &ImageDefaults,
) -> (Vec<String>, Vec<String>) {
    let mut script = String::from(
        "agentbox_setup() {\n\
         \x20 printf 'agentbox: setup: %s\\n' \"$2\" >&2\n\
         \x20 /bin/sh -c \"$2\" </dev/null\n\
         \x20 rc=$?\n\
         \x20 if [ \"$rc\" -ne 0 ]; then\n\
         \x20   printf 'agentbox: setup step %s failed with exit code %s: %s\\n' \"$1\" \"$rc\" \"$2\" >&2\n\
         \x20   exit \"$rc\"\n\
         \x20 fi\n\
         }\n",
    );
    for (key, value) in shell_env {
        script.push_str(&format!("export {key}={}\n", shell_value(value)));
    }
    for (index, step) in setup.iter().enumerate() {
        script.push_str(&format!(
            "agentbox_setup {} {}\n",
            index + 1,
            shell_words::quote(step)
        ));
    }
    script.push_str("exec \"$@\"\n");
    let entrypoint = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script,
        "agentbox-setup".to_owned(),
    ];
    let mut cmd = image.entrypoint.clone();
    cmd.extend(command.unwrap_or_else(|| image.cmd.clone()));
    (entrypoint, cmd)
}

/// `value` for the shell: literal but for `${VAR}`, which the shell expands.
fn shell_value(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + end];
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            if start > 0 {
                out.push_str(&shell_words::quote(&rest[..start]));
            }
            out.push_str(&format!("\"${{{name}}}\""));
        } else {
            out.push_str(&shell_words::quote(&rest[..start + end + 1]));
        }
        rest = &rest[start + end + 1..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push_str(&shell_words::quote(rest));
    }
    out
}

#[cfg(test)]
pub(crate) mod fake;
pub mod host_paths;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_wraps_the_command_the_container_would_have_run() {
        let image = ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
        };
        let setup = vec!["npm ci".to_owned(), "echo 'it''s'".to_owned()];
        let (entrypoint, cmd) = wrap_with_setup(&setup, &[], None, &image);
        assert_eq!(entrypoint[0], "/bin/sh");
        assert!(entrypoint[2].contains("agentbox_setup 1 'npm ci'\n"));
        assert!(entrypoint[2].contains("agentbox_setup 2 "));
        assert!(entrypoint[2].ends_with("exec \"$@\"\n"));
        let quoted = entrypoint[2]
            .lines()
            .find(|l| l.starts_with("agentbox_setup 2 "))
            .unwrap()
            .trim_start_matches("agentbox_setup 2 ");
        assert_eq!(shell_words::split(quoted).unwrap(), ["echo 'it''s'"]);
        assert_eq!(cmd, ["/entry", "serve"]);
        let (_, cmd) = wrap_with_setup(&setup, &[], Some(vec!["make".into()]), &image);
        assert_eq!(cmd, ["/entry", "make"]);
    }

    #[test]
    fn shell_env_is_literal_but_for_the_containers_variables() {
        let value = shell_value("${PATH}:/it's/$(x)");
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("PATH=/bin; printf %s {value}")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/bin:/it's/$(x)");
    }
}
