//! `agentbox.toml` (committed with the project), env files and env templates: everything a task's
//! environment is made of, parsed and checked before anything is created.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;

/// The file agentbox reads at the repository root.
pub const CONFIG_FILE: &str = "agentbox.toml";
/// The env file written into every task's worktree unless `env_file_name` says otherwise.
pub const DEFAULT_ENV_FILE_NAME: &str = ".env.agentbox";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}:{line}: {message}", path.display())]
    EnvFileLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{what} {value:?}: {message}")]
    Template {
        what: String,
        value: String,
        message: String,
    },
}

/// A command: a string runs under `sh -c`, an array runs as it is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CommandSpec {
    Shell(String),
    Exec(Vec<String>),
}

impl CommandSpec {
    pub fn argv(&self) -> Vec<String> {
        match self {
            Self::Shell(line) => vec!["sh".into(), "-c".into(), line.clone()],
            Self::Exec(argv) => argv.clone(),
        }
    }
}

/// One sidecar container per task, e.g. a database.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub image: String,
    #[serde(default)]
    pub env: IndexMap<String, String>,
    /// name = container port, published on 127.0.0.1 like the task's own ports.
    #[serde(default)]
    pub ports: IndexMap<String, u16>,
    pub command: Option<CommandSpec>,
    /// What the service may use; what it does not set, it shares the task's values of.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// An inclusive range of host ports, written `"20000-29999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            first: 20000,
            last: 29999,
        }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "port range {s:?} must look like \"20000-29999\" (two ports, the first not above the second)"
            )
        };
        let (first, last) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[limits]`: what one task (and each of its services) may use. Docker's spellings and units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `"1.5"` or `1.5`: CPUs the task may use.
    pub cpus: Option<Cpus>,
    /// `"2g"`, `"512m"`: memory (and memory plus swap) the task may use.
    pub memory: Option<Bytes>,
    /// Processes and threads the task may run at once; `-1` or `0` is no limit.
    pub pids: Option<i64>,
}

impl LimitsConfig {
    /// `limits` with what this sets put over it.
    pub fn over(&self, mut limits: crate::runtime::Limits) -> crate::runtime::Limits {
        if let Some(cpus) = self.cpus {
            limits.nano_cpus = Some(cpus.0);
        }
        if let Some(memory) = self.memory {
            limits.memory_bytes = Some(memory.0);
        }
        if let Some(pids) = self.pids {
            limits.pids = u64::try_from(pids).ok().filter(|p| *p > 0);
        }
        limits
    }
}

/// A size in bytes written with docker's units (`512m`, `2g`, `1.5GiB`, or a bare number of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl std::str::FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{s:?} is not a size: write a number with an optional unit b, k, m, g or t (\"512m\", \"2g\")"
            )
        };
        let text = s.trim().to_ascii_lowercase();
        let digits_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits_end);
        let number: f64 = number.parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let unit = unit.strip_suffix('b').unwrap_or(unit);
        let unit = unit.strip_suffix('i').unwrap_or(unit);
        let multiplier: u64 = match unit {
            "" => 1,
            "k" => 1 << 10,
            "m" => 1 << 20,
            "g" => 1 << 30,
            "t" => 1 << 40,
            _ => return Err(bad()),
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(Self(bytes as u64))
    }
}

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, name) in units {
            if self.0 >= size {
                let value = self.0 as f64 / size as f64;
                return if value.fract() == 0.0 {
                    write!(f, "{value:.0} {name}")
                } else {
                    write!(f, "{value:.1} {name}")
                };
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self(n)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A number of CPUs (`1.5`), kept as billionths as the engine wants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus(pub u64);

impl std::str::FromStr for Cpus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a number of CPUs (write \"1.5\")"))?;
        if !(value > 0.0 && value <= 1024.0) {
            return Err(format!("{s:?} CPUs: write a number above 0"));
        }
        Ok(Self((value * 1e9).round() as u64))
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(text) => text,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `network` of `agentbox.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkSetting {
    /// A network of the task's own (with its services), with outbound access (the default).
    Bridge,
    /// No network at all: loopback only.
    None,
    /// Refused: it would put the task on the host's network, beside every other task.
    Host,
}

/// The contents of `agentbox.toml`. Every key is optional; an unknown key is an error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub image: Option<String>,
    /// The devcontainer.json to take the task's environment from (a path in the repository, read
    /// at the task's base commit); without `image` or this, `.devcontainer/devcontainer.json` or
    /// `.devcontainer.json` is used when there is one.
    pub devcontainer: Option<String>,
    /// Where task worktrees go, relative to the repository root.
    pub worktree_root: Option<PathBuf>,
    /// Untracked or ignored files copied from the source checkout into each new worktree.
    #[serde(default)]
    pub copy: Vec<String>,
    /// Shell commands run inside the task's container, in order, before the task's command.
    #[serde(default)]
    pub setup: Vec<String>,
    /// name = container port; each gets a host port of its own per task.
    #[serde(default)]
    pub ports: IndexMap<String, u16>,
    pub port_range: Option<PortRange>,
    /// Templated values; see [`Template`].
    #[serde(default)]
    pub env: IndexMap<String, String>,
    /// The env file written into the worktree.
    pub env_file_name: Option<String>,
    #[serde(default)]
    pub services: IndexMap<String, ServiceConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub network: Option<NetworkSetting>,
    /// The most a task's log keeps (the first and the last half of it).
    pub log_max: Option<Bytes>,
    /// Files larger than this are not put into a snapshot commit (the worktree is kept instead).
    pub snapshot_max_file_size: Option<Bytes>,
    /// `run` and `batch` refuse to start when the checkout has uncommitted changes (which a task,
    /// starting from the base commit, would not see), instead of saying so.
    #[serde(default)]
    pub refuse_dirty_checkout: bool,
    /// What `agentbox queue` runs in a task's box before it lands (`cargo test`); a string runs
    /// under `sh -c`.
    pub check: Option<CommandSpec>,
    /// How `agentbox queue` puts a task on top of the target: `rebase` (the default) or `merge`.
    pub queue_strategy: Option<crate::land::queue::Strategy>,
    #[serde(default)]
    pub pool: PoolConfig,
}

/// `[pool]`: sandboxes made ahead of time (see `agentbox pool`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Ready slots kept for the repository's default task (its image, its base); 0: no pool.
    #[serde(default)]
    pub size: usize,
}

impl ProjectConfig {
    /// Parses and checks `text`, which came from `path` (named in every error).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config: Self =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_owned()))?;
        check_ports(&config.ports).map_err(|m| invalid(format!("[ports] {m}")))?;
        for (service, spec) in &config.services {
            check_service_name(service)
                .map_err(|m| invalid(format!("[services.{service}] {m}")))?;
            check_ports(&spec.ports)
                .map_err(|m| invalid(format!("[services.{service}.ports] {m}")))?;
        }
        match config.network {
            Some(NetworkSetting::Host) => {
                return Err(invalid(
                    "network = \"host\" is refused: a task on the host's network could reach every other task and every service of the machine; use \"bridge\" (the default) or \"none\"".into(),
                ));
            }
            Some(NetworkSetting::None) if !config.services.is_empty() => {
                return Err(invalid(
                    "network = \"none\" leaves no way to reach the [services]; remove one or the other".into(),
                ));
            }
            _ => {}
        }
        for key in config.env.keys() {
            check_env_key(key).map_err(|m| invalid(format!("[env] {m}")))?;
        }
        for copy in &config.copy {
            relative_inside(copy).map_err(|m| invalid(format!("copy: {m}")))?;
        }
        if let Some(name) = &config.env_file_name {
            let single = Path::new(name).components().count() == 1;
            if !single || relative_inside(name).is_err() || name == ".git" {
                return Err(invalid(format!(
                    "env_file_name {name:?} must be a plain file name (and not .git)"
                )));
            }
        }
        Ok(config)
    }

    /// Reads `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// A port table: valid names, no port 0, no container port under two names.
pub fn check_ports(ports: &IndexMap<String, u16>) -> Result<(), String> {
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (name, port) in ports {
        check_port_name(name)?;
        if *port == 0 {
            return Err(format!(
                "{name} = 0: name the port the program listens on (1-65535)"
            ));
        }
        if let Some(first) = seen.insert(*port, name) {
            return Err(format!(
                "{first} and {name} both name container port {port}; one name per port"
            ));
        }
    }
    Ok(())
}

/// Port names become `AGENTBOX_PORT_<NAME>` and `${port.<name>}`.
fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "port name {name:?} must start with a lowercase letter and contain only lowercase letters, digits and '_'"
        ))
    }
}

/// Service names are the host names the task reaches them by, and part of container names.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name {name:?} must be a host name: a lowercase letter, then lowercase letters, digits and '-', at most 32"
        ))
    }
}

pub fn check_env_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.contains('=') || key.chars().any(char::is_whitespace) {
        Err(format!(
            "variable name {key:?} must be non-empty, without '=' or whitespace"
        ))
    } else {
        Ok(())
    }
}

/// Checks that `path` stays inside the directory it is relative to, and returns it cleaned.
pub fn relative_inside(path: &str) -> Result<PathBuf, String> {
    let mut clean = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(format!("path {path:?} escapes the repository"));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(format!("path {path:?} names the repository itself"));
    }
    Ok(clean)
}

/// One variable of a task's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
    /// Came from the host's environment (or an env file): never written to agentbox's state, logs
    /// or listings.
    pub secret: bool,
}

/// Parses an env file with the rules of `docker run --env-file`: one `KEY=VALUE` per line, taken
/// literally (no quotes removed, no variables expanded, trailing spaces kept); leading whitespace
/// ignored; blank lines and lines starting with `#` skipped; a bare `KEY` takes agentbox's own value
/// of KEY and is skipped when that is unset.
pub fn parse_env_file(
    text: &str,
    path: &Path,
    host_env: &BTreeMap<String, String>,
) -> Result<Vec<EnvVar>, ConfigError> {
    let mut vars = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let error = |message: String| ConfigError::EnvFileLine {
            path: path.to_owned(),
            line: index + 1,
            message,
        };
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (line, None),
        };
        if key.is_empty() {
            return Err(error(format!("no variable name before '=' in {raw:?}")));
        }
        if key.chars().any(char::is_whitespace) {
            return Err(error(format!("variable name {key:?} contains whitespace")));
        }
        let value = match value {
            Some(value) => value.to_owned(),
            None => match host_env.get(key) {
                Some(value) => value.clone(),
                None => continue,
            },
        };
        vars.push(EnvVar {
            key: key.to_owned(),
            value,
            secret: true,
        });
    }
    Ok(vars)
}

/// What `${…}` placeholders in `[env]` values can refer to.
#[derive(Debug, Clone)]
pub struct TemplateContext<'a> {
    pub task: &'a str,
    pub branch: &'a str,
    /// Host ports by name (`web`, or `db.pg` for a service's port).
    pub ports: &'a BTreeMap<String, u16>,
    pub host_env: Option<&'a BTreeMap<String, String>>,
}

/// Expands `${task}`, `${branch}`, `${port.<name>}` and `${env:NAME}` in `value`; `$$` is a literal
/// `$`. Returns the value and whether it used the host's environment (then it is a secret).
pub fn expand(
    value: &str,
    what: &str,
    context: &TemplateContext,
) -> Result<(String, bool), ConfigError> {
    let error = |message: String| ConfigError::Template {
        what: what.to_owned(),
        value: value.to_owned(),
        message,
    };
    let mut out = String::with_capacity(value.len());
    let mut secret = false;
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let close = inner
            .find('}')
            .ok_or_else(|| error("unclosed \"${\"".into()))?;
        let name = &inner[..close];
        rest = &inner[close + 1..];
        if name == "task" {
            out.push_str(context.task);
        } else if name == "branch" {
            out.push_str(context.branch);
        } else if let Some(port) = name.strip_prefix("port.") {
            let host_port = context.ports.get(port).ok_or_else(|| {
                error(format!(
                    "no port named {port:?} (declare it under [ports] or a service's ports)"
                ))
            })?;
            out.push_str(&host_port.to_string());
        } else if let Some(var) = name.strip_prefix("env:") {
            let host_env = context
                .host_env
                .ok_or_else(|| error("${env:…} is not available here".into()))?;
            let value = host_env
                .get(var)
                .ok_or_else(|| error(format!("{var} is not set in agentbox's environment")))?;
            out.push_str(value);
            secret = true;
        } else {
            return Err(error(format!(
                "unknown placeholder \"${{{name}}}\" (known: ${{task}}, ${{branch}}, ${{port.<name>}}, ${{env:NAME}})"
            )));
        }
    }
    out.push_str(rest);
    Ok((out, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("/repo/agentbox.toml")
    }

    #[test]
    fn parses_every_documented_key_in_file_order() {
        let config = ProjectConfig::parse(
            r#"
image = "agentbox/base:bookworm"
worktree_root = "../.agentbox-worktrees"
copy = [".env", "config/local.yml"]
setup = ["npm ci"]
port_range = "30000-30099"
env_file_name = ".env.task"
check = "cargo test"
queue_strategy = "merge"

[ports]
web = 3000
api = 8080

[env]
DATABASE_URL = "postgres://app:app@db:5432/app_${task}"

[services.db]
image = "postgres:16"
env = { POSTGRES_PASSWORD = "app" }
ports = { pg = 5432 }
command = ["postgres", "-c", "fsync=off"]
"#,
            path(),
        )
        .unwrap();
        assert_eq!(config.ports.keys().collect::<Vec<_>>(), ["web", "api"]);
        assert_eq!(
            config.port_range,
            Some(PortRange {
                first: 30000,
                last: 30099
            })
        );
        assert_eq!(config.services["db"].ports["pg"], 5432);
        assert_eq!(
            config.services["db"].command.as_ref().unwrap().argv(),
            ["postgres", "-c", "fsync=off"]
        );
        assert_eq!(config.copy, [".env", "config/local.yml"]);
        assert_eq!(
            config.check.as_ref().unwrap().argv(),
            ["sh", "-c", "cargo test"]
        );
        assert_eq!(
            config.queue_strategy,
            Some(crate::land::queue::Strategy::Merge)
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_file() {
        let err = ProjectConfig::parse("imagee = \"x\"\n", path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/repo/agentbox.toml"), "{err}");
        assert!(err.contains("imagee"), "{err}");
        let err = ProjectConfig::parse("[services.db]\nimage = \"x\"\nport = 1\n", path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn refuses_paths_that_escape_and_bad_names() {
        for text in [
            "copy = [\"../secret\"]",
            "copy = [\"/etc/passwd\"]",
            "copy = [\"a/../../b\"]",
            "[ports]\n\"Web\" = 1",
            "[services.\"a b\"]\nimage = \"x\"",
            "env_file_name = \"dir/x\"",
            "env_file_name = \".git\"",
            "[ports]\nweb = 0",
            "[ports]\nweb = 3000\nalso = 3000",
            "network = \"host\"",
            "network = \"none\"\n[services.db]\nimage = \"x\"",
            "[limits]\nmemory = \"lots\"",
            "[limits]\ncpus = 0",
            "port_range = \"3-1\"",
            "queue_strategy = \"squash\"",
        ] {
            assert!(
                ProjectConfig::parse(text, path()).is_err(),
                "{text} should be refused"
            );
        }
        assert_eq!(relative_inside("./a/b").unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn sizes_and_cpus_take_dockers_units() {
        assert_eq!("512m".parse::<Bytes>(), Ok(Bytes(512 << 20)));
        assert_eq!("2g".parse::<Bytes>(), Ok(Bytes(2 << 30)));
        assert_eq!("2GiB".parse::<Bytes>(), Ok(Bytes(2 << 30)));
        assert_eq!("1.5G".parse::<Bytes>(), Ok(Bytes(3 << 29)));
        assert_eq!("100".parse::<Bytes>(), Ok(Bytes(100)));
        assert!("2x".parse::<Bytes>().is_err());
        assert_eq!(Bytes(2 << 30).to_string(), "2 GiB");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
        assert_eq!("1.5".parse::<Cpus>(), Ok(Cpus(1_500_000_000)));
        let config = ProjectConfig::parse(
            "network = \"none\"\nlog_max = \"10m\"\n[limits]\ncpus = 2\nmemory = \"1g\"\npids = 100\n",
            path(),
        )
        .unwrap();
        assert_eq!(config.limits.cpus, Some(Cpus(2_000_000_000)));
        assert_eq!(config.limits.memory, Some(Bytes(1 << 30)));
        assert_eq!(config.limits.pids, Some(100));
        assert_eq!(config.network, Some(NetworkSetting::None));
        assert_eq!(config.log_max, Some(Bytes(10 << 20)));
    }

    #[test]
    fn env_files_follow_docker_rules() {
        let host = BTreeMap::from([("FROM_HOST".to_owned(), "h".to_owned())]);
        let text =
            "# comment\n\n  A=1\nB= spaced \"quoted\" \nC=\nFROM_HOST\nUNSET_ON_HOST\nD=x=y\n";
        let vars = parse_env_file(text, Path::new("e.env"), &host).unwrap();
        let pairs: Vec<_> = vars
            .iter()
            .map(|v| (v.key.as_str(), v.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("A", "1"),
                ("B", " spaced \"quoted\" "),
                ("C", ""),
                ("FROM_HOST", "h"),
                ("D", "x=y")
            ]
        );
        let err = parse_env_file("A=1\nBAD KEY=2\n", Path::new("e.env"), &host).unwrap_err();
        assert_eq!(
            err.to_string(),
            "e.env:2: variable name \"BAD KEY\" contains whitespace"
        );
        let err = parse_env_file("=x\n", Path::new("e.env"), &host).unwrap_err();
        assert!(
            err.to_string().starts_with("e.env:1: no variable name"),
            "{err}"
        );
    }

    #[test]
    fn templates_expand_and_mark_host_values_secret() {
        let ports = BTreeMap::from([("web".to_owned(), 20001), ("db.pg".to_owned(), 20002)]);
        let host = BTreeMap::from([("TOKEN".to_owned(), "s3cret".to_owned())]);
        let context = TemplateContext {
            task: "t1",
            branch: "agentbox/t1",
            ports: &ports,
            host_env: Some(&host),
        };
        assert_eq!(
            expand(
                "http://127.0.0.1:${port.web}/${task} $$HOME $x",
                "U",
                &context
            )
            .unwrap(),
            ("http://127.0.0.1:20001/t1 $HOME $x".to_owned(), false)
        );
        assert_eq!(
            expand("${port.db.pg}:${env:TOKEN}", "U", &context).unwrap(),
            ("20002:s3cret".to_owned(), true)
        );
        for bad in ["${nope}", "${port.api}", "${env:MISSING}", "${task"] {
            assert!(expand(bad, "U", &context).is_err(), "{bad} should fail");
        }
    }
}
