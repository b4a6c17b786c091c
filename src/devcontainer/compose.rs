//! The compose form: `dockerComposeFile`, `service`, `runServices`. The compose files are parsed
//! here (YAML, with `serde_norway`) and their services made on the engine by agentbox itself —
//! compose v2 is not assumed — one isolated copy per task: its own network, containers and named
//! volumes, labelled like every agentbox container and removed at teardown. What would collide
//! between tasks (fixed host ports, container names) is remapped or dropped, and said once. A key
//! agentbox does not support is an error that names it and the file.

use std::collections::BTreeMap;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Deserialize;

use super::spec::OneOrMany;
use super::{DevcontainerError, Loaded, join_inside};
use crate::config::EnvVar;
use crate::runtime::{Healthcheck, Readiness};

#[derive(Debug, Clone, Default, Deserialize)]
struct ComposeFile {
    #[serde(default)]
    services: IndexMap<String, Service>,
    #[serde(default)]
    volumes: IndexMap<String, Option<VolumeDeclaration>>,
    /// Everything else: `version` and `name` (each task is a project of its own) and `x-`
    /// extensions are fine, anything more is refused by name.
    #[serde(flatten)]
    other: IndexMap<String, serde_norway::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeDeclaration {
    driver: Option<String>,
    #[serde(default, rename = "labels")]
    _labels: serde_norway::Value,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Service {
    image: Option<String>,
    build: Option<BuildEntry>,
    environment: Option<Environment>,
    env_file: Option<OneOrMany<String>>,
    command: Option<CommandEntry>,
    entrypoint: Option<CommandEntry>,
    #[serde(default)]
    volumes: Vec<VolumeEntry>,
    working_dir: Option<String>,
    user: Option<String>,
    #[serde(default)]
    ports: Vec<PortEntry>,
    #[serde(default)]
    expose: Vec<serde_norway::Value>,
    depends_on: Option<DependsOn>,
    healthcheck: Option<HealthcheckEntry>,
    network_mode: Option<String>,
    container_name: Option<String>,
    restart: Option<String>,
    init: Option<bool>,
    labels: Option<serde_norway::Value>,
    #[serde(flatten)]
    other: IndexMap<String, serde_norway::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum BuildEntry {
    Context(String),
    Full(BuildObject),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildObject {
    context: Option<String>,
    dockerfile: Option<String>,
    args: Option<Environment>,
    target: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Environment {
    Map(IndexMap<String, Option<Scalar>>),
    List(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Number(serde_norway::Number),
    Bool(bool),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Number(n) => n.to_string(),
            Self::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum CommandEntry {
    Shell(String),
    Exec(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum VolumeEntry {
    Short(String),
    Long(VolumeObject),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeObject {
    #[serde(rename = "type")]
    kind: String,
    source: Option<String>,
    target: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PortEntry {
    Number(u32),
    Text(String),
    Long(PortObject),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortObject {
    target: u32,
    published: Option<serde_norway::Value>,
    protocol: Option<String>,
    #[serde(rename = "host_ip")]
    _host_ip: Option<String>,
    #[serde(rename = "mode")]
    _mode: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum DependsOn {
    List(Vec<String>),
    Map(IndexMap<String, DependsOnEntry>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DependsOnEntry {
    condition: Option<String>,
    #[serde(rename = "restart")]
    _restart: Option<bool>,
    #[serde(rename = "required")]
    _required: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthcheckEntry {
    test: Option<CommandEntry>,
    interval: Option<String>,
    timeout: Option<String>,
    retries: Option<u32>,
    start_period: Option<String>,
    #[serde(rename = "start_interval")]
    _start_interval: Option<String>,
    #[serde(default)]
    disable: bool,
}

/// Where a service's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceImage {
    Image(String),
    Build(super::build::BuildPlan),
}

/// A bind mount of a service, before the task's worktree is known to the engine: a path inside
/// the task's worktree (`Worktree("")` is the worktree itself), or a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindSource {
    Worktree(String),
    /// This many directories above the repository (the templates' `../..`): only the worktree
    /// is mounted, at its place below the target.
    Above(usize),
    Host(String),
}

/// One service of the compose form, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeService {
    pub name: String,
    pub image: ServiceImage,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<EnvVar>,
    /// Container ports, published on 127.0.0.1 with host ports of the task's own.
    pub ports: Vec<u16>,
    pub binds: Vec<(BindSource, String, bool)>,
    /// `(volume, target, read only)`: named volumes of this task's copy.
    pub volumes: Vec<(String, String, bool)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub healthcheck: Option<Healthcheck>,
    pub depends_on: Vec<(String, Readiness)>,
    /// `network_mode: service:<name>`.
    pub network_of: Option<String>,
}

/// The compose form of a devcontainer.json, resolved: the task's own service and the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposePlan {
    /// The service the task runs in (`service`); its command is the task's.
    pub main: ComposeService,
    /// The services started with it (`runServices`, and what they depend on), in file order.
    pub others: Vec<ComposeService>,
    /// The named volumes the services use.
    pub volumes: Vec<String>,
    pub notes: Vec<String>,
}

/// Reads and resolves the compose files of `loaded` (their paths relative to devcontainer.json).
pub fn resolve(
    repo: &crate::git::Repo,
    loaded: &Loaded,
    host_env: &BTreeMap<String, String>,
) -> Result<ComposePlan, DevcontainerError> {
    let file = &loaded.file;
    let invalid = |message: String| DevcontainerError::Invalid {
        file: loaded.shown.clone(),
        line: None,
        message,
    };
    let paths = file
        .docker_compose_file
        .as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default();
    if paths.is_empty() {
        return Err(invalid("dockerComposeFile names no file".into()));
    }
    let main_name = file.service.clone().ok_or_else(|| {
        invalid("the compose form needs \"service\": the service the task runs in".into())
    })?;
    let mut services: IndexMap<String, (Service, String)> = IndexMap::new();
    let mut declared_volumes: IndexMap<String, String> = IndexMap::new();
    let mut notes = Vec::new();
    for path in &paths {
        let path = loaded.in_repository(path, "dockerComposeFile")?;
        let shown = format!("{}:{path}", base_of(loaded));
        let text = loaded.read_sibling(repo, &path)?;
        let text = interpolate(&text, host_env).map_err(|m| DevcontainerError::Invalid {
            file: shown.clone(),
            line: None,
            message: m,
        })?;
        let compose: ComposeFile =
            serde_norway::from_str(&text).map_err(|e| DevcontainerError::Syntax {
                file: shown.clone(),
                line: e.location().map_or(1, |l| l.line()),
                column: e.location().map_or(1, |l| l.column()),
                message: e.to_string(),
            })?;
        check_keys(&compose.other, &text, &shown, "", &["version", "name"])?;
        let dir = path
            .rsplit_once('/')
            .map_or(String::new(), |(d, _)| d.to_owned());
        for (name, declaration) in compose.volumes {
            if let Some(driver) = declaration.as_ref().and_then(|d| d.driver.as_deref())
                && driver != "local"
            {
                return Err(DevcontainerError::Invalid {
                    file: shown.clone(),
                    line: super::line_of(&text, &name),
                    message: format!(
                        "volume {name}: driver {driver:?} is not supported (only local)"
                    ),
                });
            }
            declared_volumes.insert(name, shown.clone());
        }
        for (name, service) in compose.services {
            check_keys(
                &service.other,
                &text,
                &shown,
                &format!("services.{name}."),
                &[],
            )?;
            crate::config::check_service_name(&name).map_err(|m| DevcontainerError::Invalid {
                file: shown.clone(),
                line: super::line_of(&text, &name),
                message: format!("services.{name}: {m}"),
            })?;
            // A later file's service replaces the earlier one's keys it sets.
            let merged = match services.shift_remove(&name) {
                Some((earlier, _)) => merge(earlier, service),
                None => service,
            };
            services.insert(name, (merged, format!("{shown}\u{0}{dir}")));
        }
    }
    if !services.contains_key(&main_name) {
        return Err(invalid(format!(
            "service {main_name:?} is not in {}",
            paths.join(", ")
        )));
    }
    // The services that run: `runServices` (default: all), the task's own, and what they need.
    let wanted: Vec<String> = match &file.run_services {
        Some(list) => list.clone(),
        None => services.keys().cloned().collect(),
    };
    let mut running: Vec<String> = Vec::new();
    let mut queue: Vec<String> = std::iter::once(main_name.clone()).chain(wanted).collect();
    while let Some(name) = queue.pop() {
        if running.contains(&name) {
            continue;
        }
        let (service, _) = services.get(&name).ok_or_else(|| {
            invalid(format!(
                "runServices or depends_on names {name:?}, which no compose file has"
            ))
        })?;
        queue.extend(dependencies(service).into_iter().map(|(d, _)| d));
        if let Some(of) = service
            .network_mode
            .as_deref()
            .and_then(|m| m.strip_prefix("service:"))
        {
            queue.push(of.to_owned());
        }
        running.push(name);
    }

    let mut resolved = Vec::new();
    let mut volumes_used = Vec::new();
    let mut said_names = false;
    let mut said_ports = false;
    for (name, (service, origin)) in &services {
        if !running.contains(name) {
            continue;
        }
        let (shown, dir) = origin.split_once('\u{0}').unwrap_or((origin, ""));
        let fail = |message: String| DevcontainerError::Invalid {
            file: shown.to_owned(),
            line: None,
            message: format!("services.{name}: {message}"),
        };
        if service.container_name.is_some() && !said_names {
            notes.push(format!(
                "{shown}: container_name is dropped: each task's containers are named after the task, so that tasks do not collide"
            ));
            said_names = true;
        }
        let image = match (&service.image, &service.build) {
            (_, Some(build)) => {
                let (context, dockerfile, args, target) = match build {
                    BuildEntry::Context(context) => (context.clone(), None, None, None),
                    BuildEntry::Full(b) => (
                        b.context.clone().unwrap_or_else(|| ".".into()),
                        b.dockerfile.clone(),
                        b.args.clone(),
                        b.target.clone(),
                    ),
                };
                let context = join_inside(dir, &context).ok_or_else(|| {
                    fail(format!(
                        "build context {context:?} leads outside the repository"
                    ))
                })?;
                let dockerfile = dockerfile.unwrap_or_else(|| "Dockerfile".into());
                let dockerfile = join_inside(&context, &dockerfile).ok_or_else(|| {
                    fail(format!(
                        "build dockerfile {dockerfile:?} leads outside the repository"
                    ))
                })?;
                ServiceImage::Build(super::build::BuildPlan {
                    commit: loaded.commit,
                    context,
                    dockerfile,
                    args: args
                        .map(|a| pairs(&a))
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                    target,
                    shown: shown.to_owned(),
                })
            }
            (Some(image), None) => ServiceImage::Image(image.clone()),
            (None, None) => return Err(fail("names neither image nor build".into())),
        };
        let mut env = Vec::new();
        for file in service
            .env_file
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
        {
            let path = join_inside(dir, &file)
                .ok_or_else(|| fail(format!("env_file {file:?} leads outside the repository")))?;
            let text = loaded.read_sibling(repo, &path)?;
            let shown_path = std::path::PathBuf::from(format!("{}:{path}", base_of(loaded)));
            env.extend(
                crate::config::parse_env_file(&text, &shown_path, host_env)
                    .map_err(|e| DevcontainerError::Build(e.to_string()))?,
            );
        }
        for (key, value) in service.environment.as_ref().map(pairs).unwrap_or_default() {
            env.retain(|v: &EnvVar| v.key != key);
            env.push(EnvVar {
                key,
                value,
                secret: false,
            });
        }
        let mut ports = Vec::new();
        for port in &service.ports {
            let (container, fixed) = compose_port(port).map_err(&fail)?;
            if fixed && !said_ports {
                notes.push(format!(
                    "{shown}: fixed host ports are remapped: every task gets host ports of its own (see `agentbox ports <task>`)"
                ));
                said_ports = true;
            }
            if !ports.contains(&container) {
                ports.push(container);
            }
        }
        let mut binds = Vec::new();
        let mut volumes = Vec::new();
        for entry in &service.volumes {
            let (kind, source, target, read_only) = match entry {
                VolumeEntry::Short(text) => short_volume(text),
                VolumeEntry::Long(v) => (
                    v.kind.clone(),
                    v.source.clone().unwrap_or_default(),
                    v.target.clone(),
                    v.read_only,
                ),
            };
            match kind.as_str() {
                "volume" => {
                    if !declared_volumes.contains_key(&source) {
                        return Err(fail(format!(
                            "volume {source:?} is not declared under the top-level volumes"
                        )));
                    }
                    if !volumes_used.contains(&source) {
                        volumes_used.push(source.clone());
                    }
                    volumes.push((source, target, read_only));
                }
                "bind" => {
                    let source = if source.starts_with('/') {
                        BindSource::Host(source)
                    } else {
                        match join_inside(dir, &source) {
                            Some(inside) => BindSource::Worktree(inside),
                            None => {
                                let above = levels_above(dir, &source).ok_or_else(|| {
                                    fail(format!(
                                        "the bind source {source:?} leads outside the repository, to files that are not the task's"
                                    ))
                                })?;
                                notes.push(format!(
                                    "{shown}: services.{name} binds {source}, above the repository; only this task's worktree is mounted there"
                                ));
                                BindSource::Above(above)
                            }
                        }
                    };
                    binds.push((source, target, read_only));
                }
                other => {
                    return Err(fail(format!(
                        "volume type {other:?} is not supported (bind and volume are)"
                    )));
                }
            }
        }
        let network_of = match service.network_mode.as_deref() {
            None | Some("bridge") | Some("default") => None,
            Some(mode) => match mode.strip_prefix("service:") {
                Some(of) => Some(of.to_owned()),
                None => {
                    return Err(fail(format!(
                        "network_mode {mode:?} is refused: a task's services share a network of the task's own (service:<name> joins another service's)"
                    )));
                }
            },
        };
        resolved.push(ComposeService {
            name: name.clone(),
            image,
            command: service.command.as_ref().map(argv),
            entrypoint: service.entrypoint.as_ref().map(argv),
            env,
            ports,
            binds,
            volumes,
            working_dir: service.working_dir.clone(),
            user: service.user.clone(),
            healthcheck: service
                .healthcheck
                .as_ref()
                .map(|h| healthcheck(h).map_err(&fail))
                .transpose()?
                .flatten(),
            depends_on: dependencies(service),
            network_of,
        });
    }
    let main_index = resolved
        .iter()
        .position(|s| s.name == main_name)
        .expect("the task's service runs");
    let main = resolved.remove(main_index);
    Ok(ComposePlan {
        main,
        others: resolved,
        volumes: volumes_used,
        notes,
    })
}

/// How many directories above the repository root `dir/relative` is, when it is made of `..`
/// alone (`../..` from `.devcontainer` is one); `None` for anything else outside.
fn levels_above(dir: &str, relative: &str) -> Option<usize> {
    let mut depth = dir.split('/').filter(|p| !p.is_empty()).count() as isize;
    for part in relative.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part != ".." {
            return None;
        }
        depth -= 1;
    }
    usize::try_from(-depth).ok().filter(|n| *n > 0)
}

fn base_of(loaded: &Loaded) -> String {
    loaded
        .shown
        .rsplit_once(':')
        .map(|(base, _)| base.to_owned())
        .unwrap_or_default()
}

/// Keys in `other` that are neither allowed nor `x-` extensions are errors naming key and file.
fn check_keys(
    other: &IndexMap<String, serde_norway::Value>,
    text: &str,
    shown: &str,
    prefix: &str,
    allowed: &[&str],
) -> Result<(), DevcontainerError> {
    match other
        .keys()
        .find(|k| !k.starts_with("x-") && !allowed.contains(&k.as_str()))
    {
        Some(key) => Err(DevcontainerError::Invalid {
            file: shown.to_owned(),
            line: text
                .lines()
                .position(|l| l.trim_start().starts_with(&format!("{key}:")))
                .map(|i| i + 1),
            message: format!(
                "{prefix}{key} is not supported by agentbox (see the README for the compose keys it implements); remove it or move the setting into agentbox.toml"
            ),
        }),
        None => Ok(()),
    }
}

fn merge(mut earlier: Service, later: Service) -> Service {
    macro_rules! over {
        ($($field:ident),*) => { $( if later.$field.is_some() { earlier.$field = later.$field; } )* };
    }
    over!(
        image,
        build,
        environment,
        env_file,
        command,
        entrypoint,
        working_dir,
        user,
        depends_on,
        healthcheck,
        network_mode,
        container_name,
        restart,
        init,
        labels
    );
    earlier.volumes.extend(later.volumes);
    earlier.ports.extend(later.ports);
    earlier.expose.extend(later.expose);
    earlier.other.extend(later.other);
    earlier
}

fn pairs(environment: &Environment) -> Vec<(String, String)> {
    match environment {
        Environment::Map(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), v.as_ref().map(Scalar::text).unwrap_or_default()))
            .collect(),
        Environment::List(list) => list
            .iter()
            .map(|entry| match entry.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (entry.clone(), String::new()),
            })
            .collect(),
    }
}

fn argv(command: &CommandEntry) -> Vec<String> {
    match command {
        // Compose splits a string command like a shell would, without running one.
        CommandEntry::Shell(line) => shell_words::split(line)
            .unwrap_or_else(|_| vec!["/bin/sh".into(), "-c".into(), line.clone()]),
        CommandEntry::Exec(argv) => argv.clone(),
    }
}

fn dependencies(service: &Service) -> Vec<(String, Readiness)> {
    match &service.depends_on {
        None => Vec::new(),
        Some(DependsOn::List(list)) => list
            .iter()
            .map(|d| (d.clone(), Readiness::Started))
            .collect(),
        Some(DependsOn::Map(map)) => map
            .iter()
            .map(|(d, entry)| {
                let readiness = match entry.condition.as_deref() {
                    Some("service_healthy") => Readiness::Healthy,
                    Some("service_completed_successfully") => Readiness::CompletedSuccessfully,
                    _ => Readiness::Started,
                };
                (d.clone(), readiness)
            })
            .collect(),
    }
}

/// `"8080:80"`, `"127.0.0.1:8080:80/tcp"`, `"80"`, `80` or the long form: the container port, and
/// whether a fixed host port was asked for.
fn compose_port(port: &PortEntry) -> Result<(u16, bool), String> {
    let (text, fixed) = match port {
        PortEntry::Number(n) => (n.to_string(), false),
        PortEntry::Text(text) => (text.clone(), text.contains(':')),
        PortEntry::Long(object) => {
            if object.protocol.as_deref().is_some_and(|p| p != "tcp") {
                return Err(format!(
                    "port {}: only tcp ports are published",
                    object.target
                ));
            }
            (object.target.to_string(), object.published.is_some())
        }
    };
    let text = text.strip_suffix("/tcp").unwrap_or(&text);
    let container = text.rsplit(':').next().unwrap_or(text);
    if container.contains('-') {
        return Err(format!(
            "port range {text:?} is not supported; name each port"
        ));
    }
    match container.parse::<u16>() {
        Ok(port) if port > 0 => Ok((port, fixed)),
        _ => Err(format!("{text:?} is not a port")),
    }
}

/// `src:dst[:ro]`, `dst` alone (an anonymous volume: refused by the caller as undeclared).
fn short_volume(text: &str) -> (String, String, String, bool) {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => ("", *target, ""),
        [source, target] => (*source, *target, ""),
        [source, target, mode, ..] => (*source, *target, *mode),
        [] => ("", "", ""),
    };
    let kind = if source.starts_with('.') || source.starts_with('/') || source.starts_with('~') {
        "bind"
    } else {
        "volume"
    };
    let read_only = mode.split(',').any(|m| m == "ro");
    (
        kind.to_owned(),
        source.to_owned(),
        target.to_owned(),
        read_only,
    )
}

fn healthcheck(entry: &HealthcheckEntry) -> Result<Option<Healthcheck>, String> {
    if entry.disable {
        return Ok(None);
    }
    let test = match &entry.test {
        Some(CommandEntry::Shell(line)) => vec!["CMD-SHELL".to_owned(), line.clone()],
        Some(CommandEntry::Exec(argv)) if argv.first().is_some_and(|a| a == "NONE") => {
            return Ok(None);
        }
        Some(CommandEntry::Exec(argv)) => argv.clone(),
        None => return Err("a healthcheck needs a test".into()),
    };
    let duration = |text: &Option<String>, default: u64| -> Result<Duration, String> {
        match text {
            None => Ok(Duration::from_secs(default)),
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| format!("healthcheck duration {text:?}: {e}")),
        }
    };
    Ok(Some(Healthcheck {
        test,
        interval: duration(&entry.interval, 30)?,
        timeout: duration(&entry.timeout, 30)?,
        retries: entry.retries.unwrap_or(3),
        start_period: duration(&entry.start_period, 0)?,
    }))
}

/// Compose's variable interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR`, and
/// `$$` for a literal `$`, from the host's environment.
fn interpolate(text: &str, host_env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek().map(|(_, c)| *c) {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => {
                let rest = &text[i + 2..];
                let end = rest.find('}').ok_or_else(|| {
                    format!(
                        "\"${{\" without \"}}\" in {:?}",
                        &text[i..(i + 40).min(text.len())]
                    )
                })?;
                let inner = &rest[..end];
                let (name, default, empty_too) = if let Some((n, d)) = inner.split_once(":-") {
                    (n, Some(d), true)
                } else if let Some((n, d)) = inner.split_once('-') {
                    (n, Some(d), false)
                } else {
                    (inner, None, false)
                };
                let value = host_env.get(name).filter(|v| !(empty_too && v.is_empty()));
                out.push_str(value.map(String::as_str).or(default).unwrap_or(""));
                // `{`, the name and `}`.
                for _ in 0..end + 2 {
                    chars.next();
                }
            }
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let rest = &text[i + 1..];
                let len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                out.push_str(host_env.get(&rest[..len]).map_or("", String::as_str));
                for _ in 0..len {
                    chars.next();
                }
            }
            _ => out.push('$'),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compose_syntax_is_understood() {
        let env = BTreeMap::from([("DB".to_owned(), "pg".to_owned())]);
        assert_eq!(
            interpolate("a ${DB} ${NO:-x} $$HOME $DB", &env).unwrap(),
            "a pg x $HOME pg"
        );
        assert_eq!(
            compose_port(&PortEntry::Text("127.0.0.1:5432:5432".into())).unwrap(),
            (5432, true)
        );
        assert_eq!(compose_port(&PortEntry::Number(80)).unwrap(), (80, false));
        assert_eq!(levels_above(".devcontainer", "../.."), Some(1));
        assert_eq!(levels_above(".devcontainer", "../../other"), None);
        assert_eq!(
            short_volume("../..:/workspaces:cached"),
            ("bind".into(), "../..".into(), "/workspaces".into(), false)
        );
        assert_eq!(
            short_volume("pgdata:/var/lib/postgresql/data:ro"),
            (
                "volume".into(),
                "pgdata".into(),
                "/var/lib/postgresql/data".into(),
                true
            )
        );
        let check: HealthcheckEntry =
            serde_norway::from_str("test: pg_isready\ninterval: 1s\ntimeout: 500ms\nretries: 5\n")
                .unwrap();
        let check = healthcheck(&check).unwrap().unwrap();
        assert_eq!(check.test, ["CMD-SHELL", "pg_isready"]);
        assert_eq!(check.timeout, Duration::from_millis(500));
    }
}

/// What a compose task adds to its request: its other services and volumes, made concrete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComposeTask {
    pub services: Vec<PlannedService>,
    /// Named volumes (by their compose names); each task gets its own.
    pub volumes: Vec<String>,
    /// `(volume, target, read only)` of the task's own container.
    pub task_volumes: Vec<(String, String, bool)>,
    pub task_depends_on: Vec<(String, Readiness)>,
    /// The service whose network the task's container joins.
    pub task_network_of: Option<String>,
}

/// A service of a compose task, ready for the engine but for its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedService {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<EnvVar>,
    pub ports: Vec<u16>,
    pub mounts: Vec<crate::runtime::Mount>,
    pub volumes: Vec<(String, String, bool)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub healthcheck: Option<Healthcheck>,
    pub depends_on: Vec<(String, Readiness)>,
    pub network_of: Option<String>,
}

/// The ledger's name of a service's port: `db.p5432`.
pub fn port_name(service: &str, port: u16) -> String {
    format!("{service}.p{port}")
}
