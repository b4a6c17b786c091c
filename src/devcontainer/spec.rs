//! The keys of `devcontainer.json` agentbox reads, as the file spells them. Every key of the
//! specification is listed: the ones agentbox cannot honour are refused where the file is resolved
//! ([`super::resolve`]), the ones that only concern an editor are accepted and named in the README.
//! A key that is not in the specification is an error that names it.

use indexmap::IndexMap;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DevContainerFile {
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    pub name: Option<String>,

    // The image form.
    pub image: Option<String>,
    // The Dockerfile form.
    pub build: Option<BuildSection>,
    /// Accepted for the older spelling of `build.dockerfile`.
    pub docker_file: Option<String>,
    /// Accepted for the older spelling of `build.context`.
    pub context: Option<String>,
    // The compose form.
    pub docker_compose_file: Option<OneOrMany<String>>,
    pub service: Option<String>,
    pub run_services: Option<Vec<String>>,

    pub workspace_folder: Option<String>,
    pub workspace_mount: Option<String>,
    #[serde(default)]
    pub forward_ports: Vec<PortEntry>,
    pub app_port: Option<OneOrMany<PortEntry>>,
    #[serde(default)]
    pub container_env: IndexMap<String, String>,
    /// `null` unsets a variable.
    #[serde(default)]
    pub remote_env: IndexMap<String, Option<String>>,
    pub container_user: Option<String>,
    pub remote_user: Option<String>,
    #[serde(default)]
    pub mounts: Vec<MountEntry>,
    #[serde(default)]
    pub run_args: Vec<String>,
    pub init: Option<bool>,
    pub privileged: Option<bool>,
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub security_opt: Vec<String>,
    pub override_command: Option<bool>,
    pub shutdown_action: Option<String>,

    pub initialize_command: Option<LifecycleCommand>,
    pub on_create_command: Option<LifecycleCommand>,
    pub update_content_command: Option<LifecycleCommand>,
    pub post_create_command: Option<LifecycleCommand>,
    pub post_start_command: Option<LifecycleCommand>,
    pub post_attach_command: Option<LifecycleCommand>,
    pub wait_for: Option<String>,

    pub features: Option<serde_json::Value>,
    pub override_feature_install_order: Option<Vec<String>>,
    pub customizations: Option<IndexMap<String, serde_json::Value>>,

    // Only an editor's concerns: accepted, and without effect on a task.
    pub host_requirements: Option<serde_json::Value>,
    pub ports_attributes: Option<serde_json::Value>,
    pub other_ports_attributes: Option<serde_json::Value>,
    #[serde(rename = "updateRemoteUserUID")]
    pub update_remote_user_uid: Option<bool>,
    pub user_env_probe: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildSection {
    pub dockerfile: Option<String>,
    pub context: Option<String>,
    #[serde(default)]
    pub args: IndexMap<String, String>,
    pub target: Option<String>,
    pub cache_from: Option<OneOrMany<String>>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            Self::One(one) => vec![one.clone()],
            Self::Many(many) => many.clone(),
        }
    }
}

/// `3000`, `"3000"`, `"db:5432"` (a port of a compose service) or `"8080:3000"` (`appPort`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortEntry {
    Number(u32),
    Text(String),
}

/// `"source=x,target=/y,type=bind"` or the same as an object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum MountEntry {
    Text(String),
    Object(MountObject),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountObject {
    pub source: Option<String>,
    pub target: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub readonly: bool,
}

/// A string runs under `/bin/sh -c`, an array runs as it is, an object's entries run at the same
/// time (and all must succeed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum LifecycleCommand {
    Shell(String),
    Exec(Vec<String>),
    Parallel(IndexMap<String, ShellOrExec>),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ShellOrExec {
    Shell(String),
    Exec(Vec<String>),
}

impl ShellOrExec {
    /// The command as one line for `/bin/sh -c`.
    pub fn shell_line(&self) -> String {
        match self {
            Self::Shell(line) => line.clone(),
            Self::Exec(argv) => shell_words::join(argv),
        }
    }
}

impl LifecycleCommand {
    /// The command as one line for `/bin/sh -c`: the parallel form starts each entry in the
    /// background and fails when any of them failed.
    pub fn shell_line(&self) -> String {
        match self {
            Self::Shell(line) => line.clone(),
            Self::Exec(argv) => shell_words::join(argv),
            Self::Parallel(entries) => {
                let mut script = String::from("agentbox_pids=''\n");
                for command in entries.values() {
                    script.push_str(&format!(
                        "( {}\n) &\nagentbox_pids=\"$agentbox_pids $!\"\n",
                        command.shell_line(),
                    ));
                }
                script.push_str(
                    "agentbox_rc=0\nfor p in $agentbox_pids; do wait \"$p\" || agentbox_rc=$?; done\nexit \"$agentbox_rc\"\n",
                );
                script
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_forms_become_shell_lines() {
        assert_eq!(
            LifecycleCommand::Exec(vec!["npm".into(), "run".into(), "it's".into()]).shell_line(),
            "npm run 'it'\\''s'"
        );
        let parallel: LifecycleCommand =
            serde_json::from_str(r#"{"a": "exit 3", "b": ["true"]}"#).unwrap();
        let line = parallel.shell_line();
        let run = |line: &str| {
            std::process::Command::new("sh")
                .args(["-c", line])
                .status()
                .unwrap()
                .code()
        };
        assert_eq!(run(&line), Some(3), "one failing entry fails the step");
        let fine: LifecycleCommand =
            serde_json::from_str(r#"{"a": "true", "b": "exit 0"}"#).unwrap();
        assert_eq!(run(&fine.shell_line()), Some(0));
    }
}
