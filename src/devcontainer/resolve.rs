//! A parsed `devcontainer.json` made into what one task needs: the image (or how to build it),
//! its environment, mounts, ports, user, privileges and lifecycle steps, with every variable
//! replaced and every refusal decided before anything is created.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use super::spec::{DevContainerFile, MountEntry, MountObject, PortEntry};
use super::vars::{Variables, uses_container_env};
use super::{DevcontainerError, Loaded, normal_path};
use crate::config::{Bytes, Cpus, EnvVar, LimitsConfig, NetworkSetting};
use crate::runtime::{Mount, Privileges};

/// How the task's image is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    /// `image`: used as it is.
    Image(String),
    /// `build`: built from the base commit's files (see [`super::build`]).
    Build(super::build::BuildPlan),
    /// `dockerComposeFile`: the compose files are read by [`super::compose`].
    Compose,
}

/// What the task needs from its `devcontainer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `<base>:<path>`, for messages.
    pub shown: String,
    pub form: Form,
    /// Where the worktree is mounted too, and where commands start; `None`: only at its own path.
    pub workspace_folder: Option<String>,
    /// `containerEnv` and `remoteEnv`, in that order.
    pub env: Vec<EnvVar>,
    /// `remoteEnv` values that name `${containerEnv:...}`: exported by the container's shell.
    pub shell_env: Vec<(String, String)>,
    /// `remoteUser`, else `containerUser`.
    pub user: Option<String>,
    pub mounts: Vec<Mount>,
    /// Container ports from `forwardPorts` and `appPort`, each given a host port of the task's own.
    pub ports: Vec<u16>,
    /// The lifecycle commands run in the container, in the specification's order.
    pub setup: Vec<String>,
    /// `initializeCommand`: run on the host, in the worktree.
    pub host_setup: Vec<String>,
    pub privileges: Privileges,
    pub limits: LimitsConfig,
    pub labels: Vec<(String, String)>,
    pub network: Option<NetworkSetting>,
    /// What agentbox did differently from the file and says once.
    pub notes: Vec<String>,
    /// `customizations.agentbox`: agentbox's own keys, under `agentbox.toml`'s.
    pub agentbox: AgentboxKeys,
}

/// The keys of `agentbox.toml` that `customizations.agentbox` may hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentboxKeys {
    #[serde(default)]
    pub setup: Vec<String>,
    #[serde(default)]
    pub env: IndexMap<String, String>,
    #[serde(default)]
    pub ports: IndexMap<String, u16>,
    #[serde(default)]
    pub copy: Vec<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub network: Option<NetworkSetting>,
}

/// What the resolution depends on besides the file.
#[derive(Debug, Clone)]
pub struct ResolveContext<'a> {
    /// The task's worktree on the host (`${localWorkspaceFolder}`).
    pub worktree: &'a Path,
    pub host_env: &'a BTreeMap<String, String>,
    /// Stable per repository and task (`${devcontainerId}`).
    pub devcontainer_id: String,
    /// `--allow-privileged` was given.
    pub allow_privileged: bool,
    /// Host directories no task may have mounted: the repository's git dir, the other tasks'
    /// worktrees and git dirs, agentbox's state.
    pub protected: Vec<PathBuf>,
}

/// Run arguments that would undo the sandbox, with the reason given for each.
const REFUSED_RUN_ARGS: [(&str, &str); 12] = [
    ("--network", "network"),
    ("--net", "network"),
    (
        "--pid",
        "a host PID namespace would show the task every process of the host",
    ),
    (
        "--ipc",
        "a shared IPC namespace would let the task reach other processes' memory",
    ),
    (
        "--uts",
        "the host's UTS namespace is not the task's to change",
    ),
    ("--userns", "the host's user namespace is not the task's"),
    (
        "--device",
        "a host device gives the task the hardware behind it",
    ),
    ("--volume", "use `mounts`, which agentbox checks"),
    ("-v", "use `mounts`, which agentbox checks"),
    ("--mount", "use `mounts`, which agentbox checks"),
    ("--name", "agentbox names each task's container itself"),
    ("--rm", "agentbox removes each task's container itself"),
];

pub fn resolve(loaded: &Loaded, context: &ResolveContext) -> Result<Resolved, DevcontainerError> {
    let file = &loaded.file;
    let invalid = |message: String| DevcontainerError::Invalid {
        file: loaded.shown.clone(),
        line: None,
        message,
    };
    refuse_unsupported(loaded)?;

    let worktree = context.worktree.display().to_string();
    let mut vars = Variables {
        local_workspace_folder: worktree.clone(),
        container_workspace_folder: None,
        host_env: context.host_env,
        devcontainer_id: context.devcontainer_id.clone(),
    };
    let expand = |vars: &Variables, key: &str, text: &str| {
        vars.expand(text)
            .map_err(|m| invalid(format!("{key}: {m}")))
    };
    let plain = |vars: &Variables, key: &str, text: &str| -> Result<String, DevcontainerError> {
        if uses_container_env(text) {
            return Err(invalid(format!(
                "{key}: ${{containerEnv:...}} is known only inside the container; it can be used in remoteEnv and the lifecycle commands"
            )));
        }
        Ok(expand(vars, key, text)?.value)
    };

    let mut notes = Vec::new();
    let workspace_folder = match &file.workspace_folder {
        Some(folder) => {
            let folder = plain(&vars, "workspaceFolder", folder)?;
            if !folder.starts_with('/') {
                return Err(invalid(format!(
                    "workspaceFolder {folder:?} must be an absolute path inside the container"
                )));
            }
            Some(normal_path(Path::new(&folder)).display().to_string())
        }
        None => None,
    };
    vars.container_workspace_folder = Some(workspace_folder.clone().unwrap_or(worktree.clone()));

    let mut mounts = Vec::new();
    let mut workspace_folder = workspace_folder;
    if let Some(mount) = &file.workspace_mount {
        let mount = parse_mount_text(&plain(&vars, "workspaceMount", mount)?)
            .map_err(|m| invalid(format!("workspaceMount: {m}")))?;
        let source = mount.source.clone().unwrap_or_default();
        let target = workspace_target(&source, &mount.target, context.worktree).ok_or_else(|| {
            invalid(format!(
                "workspaceMount: its source {source:?} must be the task's worktree (${{localWorkspaceFolder}}) or a directory above it"
            ))
        })?;
        if Path::new(&source) != context.worktree {
            notes.push(format!(
                "{}: workspaceMount binds {source}; only this task's worktree is mounted (at {target}), not what is beside it",
                loaded.shown
            ));
        }
        if workspace_folder.is_none() {
            workspace_folder = Some(target.clone());
        }
        if workspace_folder.as_deref() != Some(target.as_str()) {
            mounts.push(Mount {
                source: worktree.clone(),
                target,
                read_only: false,
            });
        }
    }

    let mut env = Vec::new();
    let mut shell_env = Vec::new();
    for (key, value) in &file.container_env {
        crate::config::check_env_key(key).map_err(|m| invalid(format!("containerEnv: {m}")))?;
        let expanded = if uses_container_env(value) {
            return Err(invalid(format!(
                "containerEnv {key}: ${{containerEnv:...}} names the container's own variables; use remoteEnv for that"
            )));
        } else {
            expand(&vars, &format!("containerEnv {key}"), value)?
        };
        env.push(EnvVar {
            key: key.clone(),
            value: expanded.value,
            secret: expanded.from_host_env,
        });
    }
    for (key, value) in &file.remote_env {
        crate::config::check_env_key(key).map_err(|m| invalid(format!("remoteEnv: {m}")))?;
        let Some(value) = value else {
            env.retain(|v| &v.key != key);
            continue;
        };
        let expanded = expand(&vars, &format!("remoteEnv {key}"), value)?;
        if uses_container_env(value) {
            shell_env.push((key.clone(), expanded.value));
        } else {
            env.push(EnvVar {
                key: key.clone(),
                value: expanded.value,
                secret: expanded.from_host_env,
            });
        }
    }

    for (index, entry) in file.mounts.iter().enumerate() {
        let key = format!("mounts[{index}]");
        let object = match entry {
            MountEntry::Text(text) => parse_mount_text(&plain(&vars, &key, text)?)
                .map_err(|m| invalid(format!("{key}: {m}")))?,
            MountEntry::Object(object) => MountObject {
                source: object
                    .source
                    .as_deref()
                    .map(|s| plain(&vars, &key, s))
                    .transpose()?,
                target: plain(&vars, &key, &object.target)?,
                ..object.clone()
            },
        };
        mounts.push(checked_mount(loaded, context, &key, &object, &mut notes)?);
    }

    let mut ports = Vec::new();
    for entry in file
        .forward_ports
        .iter()
        .chain(file.app_port.iter().flat_map(|a| a.to_vec_ref()))
    {
        let port =
            container_port(entry).map_err(|m| invalid(format!("forwardPorts/appPort: {m}")))?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }

    let mut privileges = Privileges {
        privileged: file.privileged.unwrap_or(false),
        cap_add: file.cap_add.clone(),
        security_opt: file.security_opt.clone(),
    };
    let mut limits = LimitsConfig::default();
    let mut labels = Vec::new();
    let mut network = None;
    run_args(
        &file.run_args,
        &mut RunArgTargets {
            env: &mut env,
            labels: &mut labels,
            limits: &mut limits,
            privileges: &mut privileges,
            network: &mut network,
        },
    )
    .map_err(|m| invalid(format!("runArgs: {m}")))?;
    if !privileges.is_empty() && !context.allow_privileged {
        return Err(invalid(format!(
            "asks for privileges ({}); agentbox grants them only with --allow-privileged, since they let a task reach past its sandbox",
            privileges.describe()
        )));
    }
    if !privileges.is_empty() && !loaded.trusted {
        return Err(invalid(format!(
            "asks for privileges ({}), and the file at the base commit is not the one at your checkout's HEAD; privileges are granted only to your own configuration",
            privileges.describe()
        )));
    }

    let lifecycle = [
        ("onCreateCommand", &file.on_create_command),
        ("updateContentCommand", &file.update_content_command),
        ("postCreateCommand", &file.post_create_command),
        ("postStartCommand", &file.post_start_command),
        ("postAttachCommand", &file.post_attach_command),
    ];
    let mut setup = Vec::new();
    for (key, command) in lifecycle {
        if let Some(command) = command {
            setup.push(expand(&vars, key, &command.shell_line())?.value);
        }
    }
    let mut host_setup = Vec::new();
    if let Some(command) = &file.initialize_command {
        if !loaded.trusted {
            return Err(invalid(
                "initializeCommand runs on your host, and the file at the task's base commit is not the one at your checkout's HEAD; start the task from your own HEAD, or commit the configuration there".into(),
            ));
        }
        host_setup.push(plain(&vars, "initializeCommand", &command.shell_line())?);
    }

    let user = file
        .remote_user
        .as_deref()
        .or(file.container_user.as_deref())
        .map(|u| plain(&vars, "remoteUser", u))
        .transpose()?;
    let form = form(loaded, &vars, &plain)?;
    let agentbox =
        agentbox_keys(file).map_err(|m| invalid(format!("customizations.agentbox: {m}")))?;
    Ok(Resolved {
        agentbox,
        shown: loaded.shown.clone(),
        form,
        workspace_folder,
        env,
        shell_env,
        user,
        mounts,
        ports,
        setup,
        host_setup,
        privileges,
        limits,
        labels,
        network,
        notes,
    })
}

fn agentbox_keys(file: &DevContainerFile) -> Result<AgentboxKeys, String> {
    let Some(value) = file.customizations.as_ref().and_then(|c| c.get("agentbox")) else {
        return Ok(AgentboxKeys::default());
    };
    let keys: AgentboxKeys = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    crate::config::check_ports(&keys.ports)?;
    for key in keys.env.keys() {
        crate::config::check_env_key(key)?;
    }
    for copy in &keys.copy {
        crate::config::relative_inside(copy)?;
    }
    if keys.network == Some(NetworkSetting::Host) {
        return Err("network \"host\" is refused, as in agentbox.toml".into());
    }
    Ok(keys)
}

type Plain<'a> = dyn Fn(&Variables, &str, &str) -> Result<String, DevcontainerError> + 'a;

fn form(loaded: &Loaded, vars: &Variables, plain: &Plain) -> Result<Form, DevcontainerError> {
    let file = &loaded.file;
    let invalid = |message: String| DevcontainerError::Invalid {
        file: loaded.shown.clone(),
        line: None,
        message,
    };
    let dockerfile = file
        .build
        .as_ref()
        .and_then(|b| b.dockerfile.clone())
        .or_else(|| file.docker_file.clone());
    match (&file.image, dockerfile, &file.docker_compose_file) {
        (Some(image), None, None) => Ok(Form::Image(plain(vars, "image", image)?)),
        (None, Some(dockerfile), None) => {
            let build = file.build.clone().unwrap_or_default();
            if !build.options.is_empty() {
                return Err(invalid(
                    "build.options passes flags to the docker CLI, which agentbox does not use; set what you need in the Dockerfile".into(),
                ));
            }
            let context = build
                .context
                .clone()
                .or_else(|| file.context.clone())
                .unwrap_or_else(|| ".".to_owned());
            let mut args = IndexMap::new();
            for (key, value) in &build.args {
                args.insert(key.clone(), plain(vars, &format!("build.args {key}"), value)?);
            }
            Ok(Form::Build(super::build::BuildPlan {
                commit: loaded.commit,
                context: loaded.in_repository(&context, "build.context")?,
                dockerfile: loaded.in_repository(&dockerfile, "build.dockerfile")?,
                args,
                target: build
                    .target
                    .as_deref()
                    .map(|t| plain(vars, "build.target", t))
                    .transpose()?,
                shown: loaded.shown.clone(),
            }))
        }
        (None, None, Some(_)) => Ok(Form::Compose),
        (None, None, None) => Err(invalid(
            "names no image: set \"image\", \"build\": {\"dockerfile\": ...} or \"dockerComposeFile\"".into(),
        )),
        _ => Err(invalid(
            "sets more than one of image, build.dockerfile and dockerComposeFile; keep one".into(),
        )),
    }
}

/// Keys whose meaning agentbox cannot give, each refused with the way out.
fn refuse_unsupported(loaded: &Loaded) -> Result<(), DevcontainerError> {
    let file: &DevContainerFile = &loaded.file;
    let refuse = |message: String| DevcontainerError::Invalid {
        file: loaded.shown.clone(),
        line: None,
        message,
    };
    if file
        .features
        .as_ref()
        .is_some_and(|f| f.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(refuse(
            "features are fetched from a registry, which agentbox does not assume; build an image with them once (for example with the devcontainers CLI on a machine with registry access: `devcontainer build --image-name my/dev:1`), load it here, and point \"image\" at it".into(),
        ));
    }
    if file.build.as_ref().is_some_and(|b| b.cache_from.is_some()) {
        return Err(refuse(
            "build.cacheFrom needs a registry; remove it (agentbox caches builds by content)"
                .into(),
        ));
    }
    if let Some(action) = &file.shutdown_action
        && !["none", "stopContainer", "stopCompose"].contains(&action.as_str())
    {
        return Err(refuse(format!(
            "shutdownAction {action:?} is not one of none, stopContainer, stopCompose"
        )));
    }
    Ok(())
}

/// `source=..,target=..,type=bind[,readonly]` (docker's `--mount` syntax).
fn parse_mount_text(text: &str) -> Result<MountObject, String> {
    let mut source = None;
    let mut target = None;
    let mut kind = None;
    let mut readonly = false;
    for part in text.split(',') {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (part.trim(), None),
        };
        match (key, value) {
            ("source" | "src", Some(v)) => source = Some(v.to_owned()),
            ("target" | "dst" | "destination", Some(v)) => target = Some(v.to_owned()),
            ("type", Some(v)) => kind = Some(v.to_owned()),
            ("readonly" | "ro", None) => readonly = true,
            ("readonly" | "ro", Some(v)) => readonly = v == "true" || v == "1",
            ("consistency", Some(_)) => {}
            _ => {
                return Err(format!(
                    "{text:?}: {key:?} is not a mount option agentbox knows (source, target, type, readonly)"
                ));
            }
        }
    }
    Ok(MountObject {
        source,
        target: target.ok_or_else(|| format!("{text:?} has no target"))?,
        kind: kind.unwrap_or_else(|| "volume".to_owned()),
        readonly,
    })
}

/// Where the worktree goes when `source` (the worktree or a directory above it) is mounted at
/// `target`: the worktree's place under `target`.
fn workspace_target(source: &str, target: &str, worktree: &Path) -> Option<String> {
    let source = normal_path(Path::new(source));
    let below = worktree.strip_prefix(&source).ok()?;
    Some(
        normal_path(&Path::new(target).join(below))
            .display()
            .to_string(),
    )
}

pub(super) fn checked_mount(
    loaded: &Loaded,
    context: &ResolveContext,
    key: &str,
    object: &MountObject,
    notes: &mut Vec<String>,
) -> Result<Mount, DevcontainerError> {
    let invalid = |message: String| DevcontainerError::Invalid {
        file: loaded.shown.clone(),
        line: None,
        message: format!("{key}: {message}"),
    };
    if !object.target.starts_with('/') {
        return Err(invalid(format!(
            "target {:?} must be an absolute path",
            object.target
        )));
    }
    if object.kind != "bind" {
        return Err(invalid(format!(
            "type {:?}: only bind mounts are supported; a named volume would be shared by every task, which is how tasks would reach each other",
            object.kind
        )));
    }
    let source = object
        .source
        .clone()
        .ok_or_else(|| invalid("a bind mount needs a source".into()))?;
    if !source.starts_with('/') {
        return Err(invalid(format!(
            "source {source:?} must be an absolute host path (use ${{localWorkspaceFolder}})"
        )));
    }
    let source_path = normal_path(Path::new(&source));
    // Above the worktree: only the worktree itself, at its place below the target.
    if let Some(target) = workspace_target(&source, &object.target, context.worktree)
        && source_path != context.worktree
    {
        notes.push(format!(
            "{}: {key} binds {source}; only this task's worktree is mounted (at {target}), not the other tasks' worktrees or your files beside it",
            loaded.shown
        ));
        return Ok(Mount {
            source: context.worktree.display().to_string(),
            target,
            read_only: object.readonly,
        });
    }
    if source_path.starts_with(context.worktree) {
        return Ok(Mount {
            source: source_path.display().to_string(),
            target: object.target.clone(),
            read_only: object.readonly,
        });
    }
    if let Some(protected) = context
        .protected
        .iter()
        .find(|p| p.starts_with(&source_path) || source_path.starts_with(p))
    {
        return Err(invalid(format!(
            "source {source} is (or holds) {}, which no task may have mounted: it holds the repository's git dir, other tasks' work, or agentbox's records",
            protected.display()
        )));
    }
    if !loaded.trusted {
        return Err(invalid(format!(
            "binds the host path {source}, and the file at the task's base commit is not the one at your checkout's HEAD; host paths are mounted only for your own configuration"
        )));
    }
    Ok(Mount {
        source: source_path.display().to_string(),
        target: object.target.clone(),
        read_only: object.readonly,
    })
}

fn container_port(entry: &PortEntry) -> Result<u16, String> {
    let text = match entry {
        PortEntry::Number(n) => n.to_string(),
        PortEntry::Text(text) => text.clone(),
    };
    // `host:container` (appPort) keeps the container side; the host side comes from the ledger.
    let container = text.rsplit_once(':').map_or(text.as_str(), |(_, c)| c);
    if text.contains(':')
        && text
            .split(':')
            .next()
            .is_some_and(|h| h.parse::<u16>().is_err())
    {
        return Err(format!(
            "{text:?} names a port of service {:?}, and this configuration has no services",
            text.split(':').next().unwrap_or_default()
        ));
    }
    match container.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("{text:?} is not a port (1-65535)")),
    }
}

impl PortEntry {
    fn as_ref_entry(&self) -> &PortEntry {
        self
    }
}

trait ToVecRef {
    fn to_vec_ref(&self) -> Vec<&PortEntry>;
}

impl ToVecRef for super::spec::OneOrMany<PortEntry> {
    fn to_vec_ref(&self) -> Vec<&PortEntry> {
        match self {
            Self::One(one) => vec![one.as_ref_entry()],
            Self::Many(many) => many.iter().collect(),
        }
    }
}

struct RunArgTargets<'a> {
    env: &'a mut Vec<EnvVar>,
    labels: &'a mut Vec<(String, String)>,
    limits: &'a mut LimitsConfig,
    privileges: &'a mut Privileges,
    network: &'a mut Option<NetworkSetting>,
}

/// The `docker run` flags agentbox can honour; the rest are refused by name.
fn run_args(args: &[String], into: &mut RunArgTargets) -> Result<(), String> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |flag: &str| {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "--env" | "-e" => {
                let pair = value(flag)?;
                let (key, val) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("{flag} {pair:?}: write KEY=VALUE"))?;
                crate::config::check_env_key(key)?;
                into.env.push(EnvVar {
                    key: key.to_owned(),
                    value: val.to_owned(),
                    secret: false,
                });
            }
            "--label" | "-l" => {
                let pair = value(flag)?;
                let (key, val) = pair.split_once('=').unwrap_or((pair.as_str(), ""));
                if key.starts_with("agentbox.") {
                    return Err(format!(
                        "label {key:?}: agentbox.* labels are agentbox's own"
                    ));
                }
                into.labels.push((key.to_owned(), val.to_owned()));
            }
            "--memory" | "-m" => into.limits.memory = Some(value(flag)?.parse::<Bytes>()?),
            "--cpus" => into.limits.cpus = Some(value(flag)?.parse::<Cpus>()?),
            "--pids-limit" => {
                let text = value(flag)?;
                into.limits.pids = Some(
                    text.parse()
                        .map_err(|_| format!("--pids-limit {text:?} is not a number"))?,
                );
            }
            "--init" => {}
            "--privileged" => into.privileges.privileged = true,
            "--cap-add" => into.privileges.cap_add.push(value(flag)?),
            "--security-opt" => into.privileges.security_opt.push(value(flag)?),
            "--network" | "--net" => match value(flag)?.as_str() {
                "bridge" | "default" => *into.network = Some(NetworkSetting::Bridge),
                "none" => *into.network = Some(NetworkSetting::None),
                other => {
                    return Err(format!(
                        "{flag}={other} is refused: a task gets a network of its own (bridge) or none"
                    ));
                }
            },
            _ => {
                if let Some((_, why)) = REFUSED_RUN_ARGS.iter().find(|(f, _)| *f == flag) {
                    return Err(format!("{flag} is refused: {why}"));
                }
                return Err(format!(
                    "{arg:?} is not a flag agentbox supports (it takes --env, --label, --memory, --cpus, --pids-limit, --init, --network bridge|none, and with --allow-privileged --privileged, --cap-add, --security-opt)"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
