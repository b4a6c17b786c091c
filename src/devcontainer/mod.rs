//! The repository's own `devcontainer.json`, made into a task's environment.
//!
//! The file (and the Dockerfile, build context and compose files it names) is read from the
//! task's **base commit**, never from a worktree: a task cannot change the environment that the
//! next task of the repository gets. Everything a task could reach the host with — a command run
//! on the host (`initializeCommand`), a bind mount of a host path, privileges — is honoured only
//! when the file at the base is the one the user's own checkout has at `HEAD` ([`Loaded::trusted`]);
//! a configuration that arrived on some branch gets the sandbox and nothing more.
//!
//! [`load`] finds and parses the file, [`resolve`](resolve::resolve) turns it into what a task
//! needs (image or build, environment, mounts, ports, lifecycle steps), [`build`] builds a
//! Dockerfile form's image once per content, and [`Resolved::apply`] puts it all into a
//! [`RunRequest`](crate::RunRequest).

pub mod build;
pub mod compose;
pub mod resolve;
pub mod spec;
mod vars;

use std::path::{Component, Path, PathBuf};

pub use resolve::{Form, ResolveContext, Resolved};
pub use spec::DevContainerFile;

use crate::git::{GitError, Repo};

/// Where agentbox looks when it is not told: the first that exists at the base commit.
pub const DISCOVERED: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];

/// The largest configuration file (devcontainer.json, a compose file, a Dockerfile) agentbox reads.
const MAX_CONFIG_FILE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DevcontainerError {
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error(
        "{file}: no such file at {base} (the devcontainer configuration is read from the task's base commit)"
    )]
    Missing { file: String, base: String },
    #[error("cannot read {file} at {base}: {source}")]
    Read {
        file: String,
        base: String,
        source: Box<GitError>,
    },
    #[error("{0}")]
    Build(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}

/// Which file to use, as the user chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// `--devcontainer PATH` or `devcontainer = "PATH"`: a path inside the repository.
    Named(String),
    /// Look for the usual places.
    Discover,
}

/// A parsed `devcontainer.json` and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: DevContainerFile,
    /// Its path inside the repository, `/`-separated.
    pub path: String,
    /// How errors name it: `<base>:<path>`.
    pub shown: String,
    /// The commit it was read from.
    pub commit: gix::ObjectId,
    /// The file and the compose files it names are the user's own at the base (the same as at the
    /// checkout's `HEAD`): what they ask of the host may be done.
    pub trusted: bool,
}

impl Loaded {
    /// The directory of the file inside the repository (`.devcontainer`, or `` at the root).
    pub fn dir(&self) -> String {
        match self.path.rsplit_once('/') {
            Some((dir, _)) => dir.to_owned(),
            None => String::new(),
        }
    }

    /// `relative` (as the file wrote it, relative to its own directory) as a path inside the
    /// repository; refused when it leaves the repository.
    pub fn in_repository(&self, relative: &str, key: &str) -> Result<String, DevcontainerError> {
        join_inside(&self.dir(), relative).ok_or_else(|| DevcontainerError::Invalid {
            file: self.shown.clone(),
            line: None,
            message: format!(
                "{key} {relative:?} leads outside the repository; agentbox reads it from the base commit, so it must be a path inside the repository"
            ),
        })
    }

    /// Reads another file of the configuration (a Dockerfile, a compose file) at the same commit.
    pub fn read_sibling(&self, repo: &Repo, path: &str) -> Result<String, DevcontainerError> {
        read_text(repo, self.commit, path, &self.base_name())?.ok_or_else(|| {
            DevcontainerError::Missing {
                file: path.to_owned(),
                base: self.base_name(),
            }
        })
    }

    fn compose_files_same_at_head(
        &self,
        repo: &Repo,
        base: &str,
    ) -> Result<bool, DevcontainerError> {
        let paths = self
            .file
            .docker_compose_file
            .as_ref()
            .map(spec::OneOrMany::to_vec)
            .unwrap_or_default();
        for path in &paths {
            let path = self.in_repository(path, "dockerComposeFile")?;
            let same = read_text(repo, self.commit, &path, base)?
                .is_some_and(|text| same_at_head(repo, &path, &text));
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn base_name(&self) -> String {
        self.shown
            .rsplit_once(':')
            .map(|(base, _)| base.to_owned())
            .unwrap_or_default()
    }
}

/// Whether the user's own checkout has `text` at `path` in `HEAD`.
fn same_at_head(repo: &Repo, path: &str, text: &str) -> bool {
    repo.read_head_file(path)
        .ok()
        .flatten()
        .is_some_and(|head| head == text.as_bytes())
}

/// Finds and parses the devcontainer configuration at `commit` (named `base` in messages).
/// `None` when [`Choice::Discover`] finds none.
pub fn load(
    repo: &Repo,
    commit: gix::ObjectId,
    base: &str,
    choice: &Choice,
) -> Result<Option<Loaded>, DevcontainerError> {
    let candidates: Vec<String> = match choice {
        Choice::Named(path) => {
            let inside =
                join_inside("", path).ok_or_else(|| DevcontainerError::Invalid {
                    file: path.clone(),
                    line: None,
                    message: "the devcontainer configuration must be a path inside the repository (it is read from the task's base commit)".into(),
                })?;
            vec![inside]
        }
        Choice::Discover => DISCOVERED.iter().map(|p| (*p).to_owned()).collect(),
    };
    for path in &candidates {
        let Some(text) = read_text(repo, commit, path, base)? else {
            continue;
        };
        let shown = format!("{base}:{path}");
        let file = parse(&text, &shown)?;
        let mut loaded = Loaded {
            file,
            path: path.clone(),
            shown,
            commit,
            trusted: same_at_head(repo, path, &text),
        };
        // The compose files say what is bind-mounted from the host as much as the file does.
        if loaded.trusted {
            loaded.trusted = loaded.compose_files_same_at_head(repo, base)?;
        }
        return Ok(Some(loaded));
    }
    match choice {
        Choice::Named(path) => Err(DevcontainerError::Missing {
            file: path.clone(),
            base: base.to_owned(),
        }),
        Choice::Discover => Ok(None),
    }
}

/// How a devcontainer task is to be prepared, besides its request.
#[derive(Debug, Clone)]
pub struct PrepareOptions<'a> {
    pub choice: Choice,
    /// `--allow-privileged`.
    pub allow_privileged: bool,
    /// `--user` was given: it wins over the file's `remoteUser`/`containerUser`.
    pub user_given: bool,
    /// `agentbox.toml`, whose keys win over the file's.
    pub config: &'a crate::config::ProjectConfig,
}

/// Finds the task's devcontainer.json at its base commit and, when there is one, makes `request`
/// the task it describes: its image (built once per content when it is a Dockerfile), its
/// environment, mounts, ports, user, privileges and lifecycle steps. `agentbox.toml` wins where
/// both say something; command-line flags are applied afterwards by the caller. Build output goes
/// to `progress`. Returns what was resolved (its `notes` are for the user), or `None` when there
/// is no file to use. Creates nothing but, at most, an image.
pub async fn prepare(
    ws: &crate::Workspace,
    runtime: &dyn crate::runtime::Runtime,
    request: &mut crate::RunRequest,
    options: &PrepareOptions<'_>,
    progress: &(dyn for<'line> Fn(&'line str) + Sync),
) -> Result<Option<Resolved>, DevcontainerError> {
    let base = request.base.clone().unwrap_or_else(|| ws.repo.head_name());
    let commit = ws
        .repo
        .resolve_commit(&base)
        .map_err(|source| DevcontainerError::Read {
            file: "devcontainer.json".into(),
            base: base.clone(),
            source: Box::new(source),
        })?;
    let Some(loaded) = load(&ws.repo, commit, &base, &options.choice)? else {
        return Ok(None);
    };
    let worktree = ws.worktree_path(&request.task);
    let state_home = ws
        .state
        .root()
        .parent()
        .unwrap_or(ws.state.root())
        .to_owned();
    let context = ResolveContext {
        worktree: &worktree,
        host_env: &request.host_env,
        devcontainer_id: devcontainer_id(&ws.repo_id, request.task.as_str()),
        allow_privileged: options.allow_privileged,
        protected: vec![
            ws.repo.common_dir.clone(),
            worktree.parent().unwrap_or(&worktree).to_owned(),
            state_home,
        ],
    };
    let mut resolved = resolve::resolve(&loaded, &context)?;
    let image = match &resolved.form {
        Form::Image(image) => image.clone(),
        Form::Build(plan) => {
            build::ensure_image(ws, runtime, plan, &request.labels, progress).await?
        }
        Form::Compose => {
            let plan = compose::resolve(&ws.repo, &loaded, &request.host_env)?;
            resolved.notes.extend(plan.notes.iter().cloned());
            let task =
                compose_task(ws, runtime, request, &loaded, &context, plan, progress).await?;
            let image = task.0.clone();
            resolved.apply(request, image.clone(), options);
            task.1.apply(request, options, &mut resolved);
            check_worktree_sources(ws, request, &loaded, &worktree)?;
            return Ok(Some(resolved));
        }
    };
    resolved.apply(request, image, options);
    check_worktree_sources(ws, request, &loaded, &worktree)?;
    Ok(Some(resolved))
}

/// What the compose form's own service gives the task, besides [`compose::ComposeTask`].
struct MainService {
    task: compose::ComposeTask,
    env: Vec<crate::config::EnvVar>,
    mounts: Vec<crate::runtime::Mount>,
    ports: Vec<u16>,
    user: Option<String>,
    working_dir: Option<String>,
    notes: Vec<String>,
}

impl MainService {
    fn apply(
        self,
        request: &mut crate::RunRequest,
        options: &PrepareOptions,
        resolved: &mut Resolved,
    ) {
        let mut env = self.env;
        env.append(&mut request.devcontainer_env);
        request.devcontainer_env = env;
        request.mounts.extend(self.mounts);
        for port in self.ports {
            if !request.ports.values().any(|p| *p == port) {
                request.ports.insert(format!("port_{port}"), port);
            }
        }
        if !options.user_given && resolved.user.is_none() && self.user.is_some() {
            request.user = self.user;
        }
        if request.workspace_folder.is_none() {
            request.workspace_folder = self.working_dir;
        }
        request.compose = Some(self.task);
        resolved.notes.extend(self.notes);
    }
}

/// Builds or finds every service's image and makes the services' mounts concrete. Returns the
/// task's own image and what the task gets.
async fn compose_task(
    ws: &crate::Workspace,
    runtime: &dyn crate::runtime::Runtime,
    request: &crate::RunRequest,
    loaded: &Loaded,
    context: &ResolveContext<'_>,
    plan: compose::ComposePlan,
    progress: &(dyn for<'line> Fn(&'line str) + Sync),
) -> Result<(String, MainService), DevcontainerError> {
    let mut notes = Vec::new();
    let image_of = async |image: &compose::ServiceImage| match image {
        compose::ServiceImage::Image(image) => Ok::<_, DevcontainerError>(image.clone()),
        compose::ServiceImage::Build(build) => {
            build::ensure_image(ws, runtime, build, &request.labels, progress).await
        }
    };
    let mut mounts_of = |service: &compose::ComposeService| -> Result<Vec<crate::runtime::Mount>, DevcontainerError> {
        service
            .binds
            .iter()
            .map(|(source, target, read_only)| match source {
                compose::BindSource::Worktree(inside) => {
                    Ok(crate::runtime::Mount {
                        source: context.worktree.join(inside).display().to_string(),
                        target: target.clone(),
                        read_only: *read_only,
                    })
                }
                compose::BindSource::Above(levels) => {
                    let components: Vec<_> = context.worktree.components().collect();
                    let below: std::path::PathBuf = components
                        [components.len().saturating_sub(*levels)..]
                        .iter()
                        .collect();
                    Ok(crate::runtime::Mount {
                        source: context.worktree.display().to_string(),
                        target: std::path::Path::new(target).join(below).display().to_string(),
                        read_only: *read_only,
                    })
                }
                compose::BindSource::Host(path) => resolve::checked_mount(
                    loaded,
                    context,
                    &format!("services.{}.volumes", service.name),
                    &spec::MountObject {
                        source: Some(path.clone()),
                        target: target.clone(),
                        kind: "bind".into(),
                        readonly: *read_only,
                    },
                    &mut notes,
                ),
            })
            .collect()
    };
    let main = plan.main;
    let main_image = image_of(&main.image).await?;
    let main_mounts = mounts_of(&main)?;
    let mut services = Vec::new();
    for service in &plan.others {
        let image = image_of(&service.image).await?;
        services.push(compose::PlannedService {
            name: service.name.clone(),
            image,
            command: service.command.clone(),
            entrypoint: service.entrypoint.clone(),
            env: service.env.clone(),
            ports: service.ports.clone(),
            mounts: mounts_of(service)?,
            volumes: service.volumes.clone(),
            working_dir: service.working_dir.clone(),
            user: service.user.clone(),
            healthcheck: service.healthcheck.clone(),
            depends_on: service
                .depends_on
                .iter()
                .filter(|(d, _)| *d != main.name)
                .cloned()
                .collect(),
            network_of: service.network_of.clone(),
        });
    }
    Ok((
        main_image,
        MainService {
            task: compose::ComposeTask {
                services,
                volumes: plan.volumes,
                task_volumes: main.volumes.clone(),
                task_depends_on: main.depends_on.clone(),
                task_network_of: main.network_of.clone(),
            },
            env: main.env.clone(),
            mounts: main_mounts,
            ports: main.ports.clone(),
            user: main.user.clone(),
            working_dir: main.working_dir.clone(),
            notes,
        },
    ))
}

/// A bind source inside the task's worktree is a path the worktree is checked out with: from the
/// base commit, or from the task's branch when the task continues it, where an earlier run of the
/// task may have committed a symlink that the engine would follow on the host. Each must be a file
/// or a directory at both (a symlinked parent directory is not found in the tree either).
fn check_worktree_sources(
    ws: &crate::Workspace,
    request: &crate::RunRequest,
    loaded: &Loaded,
    worktree: &Path,
) -> Result<(), DevcontainerError> {
    let branch_tip = ws
        .repo
        .branch_tip(&request.task.branch())
        .map_err(|source| DevcontainerError::Read {
            file: request.task.branch(),
            base: "the task's branch".into(),
            source: Box::new(source),
        })?;
    let commits: Vec<gix::ObjectId> = std::iter::once(loaded.commit).chain(branch_tip).collect();
    let service_mounts = request
        .compose
        .iter()
        .flat_map(|c| c.services.iter().flat_map(|s| &s.mounts));
    for mount in request.mounts.iter().chain(service_mounts) {
        let Ok(inside) = Path::new(&mount.source).strip_prefix(worktree) else {
            continue;
        };
        let Some(inside) = inside.to_str().filter(|i| !i.is_empty()) else {
            continue;
        };
        for commit in &commits {
            let plain =
                matches!(ws.repo.entry_at(*commit, inside), Ok(Some((_, mode))) if !mode.is_link());
            if !plain {
                return Err(DevcontainerError::Invalid {
                    file: loaded.shown.clone(),
                    line: None,
                    message: format!(
                        "the bind source {inside:?} in the task's worktree must be a file or directory of the repository at {} (not a symlink, which would mount what it points to on the host)",
                        if *commit == loaded.commit {
                            "the base commit".to_owned()
                        } else {
                            format!("the tip of {}", request.task.branch())
                        }
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `${devcontainerId}`: the same for every run of one task of one repository.
fn devcontainer_id(repo_id: &str, task: &str) -> String {
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(repo_id.as_bytes());
    hasher.update(b"\0");
    hasher.update(task.as_bytes());
    hasher
        .try_finalize()
        .map(|id| id.to_string()[..16].to_owned())
        .unwrap_or_default()
}

impl Resolved {
    /// Puts what the file says into `request`, under what `agentbox.toml` says.
    pub fn apply(&self, request: &mut crate::RunRequest, image: String, options: &PrepareOptions) {
        let config = options.config;
        if config.image.is_none() {
            request.image = image;
        }
        request.devcontainer_env = self.env.clone();
        request.shell_env = self.shell_env.clone();
        if !options.user_given && self.user.is_some() {
            request.user = self.user.clone();
        }
        request.mounts.extend(self.mounts.iter().cloned());
        request.workspace_folder = self.workspace_folder.clone();
        for port in &self.ports {
            if !request.ports.values().any(|p| p == port) {
                request.ports.insert(format!("port_{port}"), *port);
            }
        }
        let keys = &self.agentbox;
        request.setup = self
            .setup
            .iter()
            .chain(&keys.setup)
            .cloned()
            .chain(request.setup.drain(..))
            .collect();
        for (key, template) in &keys.env {
            if !request.env_templates.contains_key(key) {
                request.env_templates.insert(key.clone(), template.clone());
            }
        }
        for (name, port) in &keys.ports {
            if !request.ports.contains_key(name) && !request.ports.values().any(|p| p == port) {
                request.ports.insert(name.clone(), *port);
            }
        }
        if config.copy.is_empty() {
            request.copy = keys
                .copy
                .iter()
                .filter_map(|c| crate::config::relative_inside(c).ok())
                .collect();
        }
        request.host_setup = self.host_setup.clone();
        request.privileges = self.privileges.clone();
        // The file's limits, then agentbox.toml's again over them.
        request.apply_limits(&keys.limits);
        request.apply_limits(&self.limits);
        request.apply_limits(&config.limits);
        if config.network.is_none()
            && let Some(network) = self.network.or(keys.network)
        {
            request.network = network;
        }
        request.labels.extend(self.labels.iter().cloned());
    }
}

/// Parses `devcontainer.json` text (JSON with comments and trailing commas).
pub fn parse(text: &str, shown: &str) -> Result<DevContainerFile, DevcontainerError> {
    let options = jsonc_parser::ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        ..Default::default()
    };
    jsonc_parser::parse_to_serde_value::<DevContainerFile>(text, &options).map_err(|e| {
        let message = e.kind().to_string();
        // The parser places errors of the data (not of the syntax) at the start of the file;
        // an unknown key is found by its name instead.
        if let Some(key) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            let line = line_of(text, key);
            return DevcontainerError::Syntax {
                file: shown.to_owned(),
                line: line.unwrap_or(1),
                column: line
                    .and_then(|l| text.lines().nth(l - 1))
                    .and_then(|l| l.find(&format!("\"{key}\"")))
                    .map_or(1, |c| c + 1),
                message: format!(
                    "unknown key {key:?}: not a devcontainer.json property agentbox knows (see the README's list)"
                ),
            };
        }
        DevcontainerError::Syntax {
            file: shown.to_owned(),
            line: e.line_display(),
            column: e.column_display(),
            message,
        }
    })
}

/// The line of the first mention of `"key"` in `text`, for errors about a key.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let quoted = format!("\"{key}\"");
    text.lines()
        .position(|l| l.contains(&quoted))
        .map(|i| i + 1)
}

fn read_text(
    repo: &Repo,
    commit: gix::ObjectId,
    path: &str,
    base: &str,
) -> Result<Option<String>, DevcontainerError> {
    let bytes = repo
        .read_file_at(commit, path, MAX_CONFIG_FILE)
        .map_err(|source| DevcontainerError::Read {
            file: path.to_owned(),
            base: base.to_owned(),
            source: Box::new(source),
        })?;
    bytes
        .map(|bytes| {
            String::from_utf8(bytes).map_err(|_| DevcontainerError::Invalid {
                file: format!("{base}:{path}"),
                line: None,
                message: "is not UTF-8 text".into(),
            })
        })
        .transpose()
}

/// `dir/relative` with `.` and `..` resolved, `None` when it leaves the repository or is absolute.
pub fn join_inside(dir: &str, relative: &str) -> Option<String> {
    if Path::new(relative).is_absolute() {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    for component in Path::new(dir).join(relative).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// A host path with `.` and `..` resolved lexically.
pub(crate) fn normal_path(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_container_agentbox_ships_is_a_file_agentbox_reads() {
        let text = include_str!("../../devcontainer/devcontainer.json");
        let file = parse(text, "devcontainer/devcontainer.json").unwrap();
        assert_eq!(file.image.as_deref(), Some("agentbox/devcontainer:latest"));
        assert!(
            file.workspace_mount
                .unwrap()
                .contains("target=${localWorkspaceFolder}")
        );
    }

    #[test]
    fn comments_and_trailing_commas_are_fine_and_errors_name_the_place() {
        let file = parse(
            "// the app\n{\n  \"image\": \"x\", /* inline */\n  \"forwardPorts\": [3000,],\n}\n",
            "main:.devcontainer/devcontainer.json",
        )
        .unwrap();
        assert_eq!(file.image.as_deref(), Some("x"));

        let error = parse("{\n  \"image\": \"x\"\n  \"init\": true\n}", "main:d.json")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("main:d.json:2:") && error.contains("comma"),
            "{error}"
        );

        let error = parse("{\n  \"image\": \"x\",\n  \"imagee\": 1\n}", "main:d.json")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("main:d.json:3:") && error.contains("imagee"),
            "{error}"
        );
    }

    #[test]
    fn paths_stay_inside_the_repository() {
        assert_eq!(
            join_inside(".devcontainer", "../Dockerfile").as_deref(),
            Some("Dockerfile")
        );
        assert_eq!(join_inside(".devcontainer", "..").as_deref(), Some(""));
        assert_eq!(join_inside(".devcontainer", "../.."), None);
        assert_eq!(join_inside("", "/etc/passwd"), None);
    }
}
