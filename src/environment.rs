//! A task's environment: agentbox's own variables, the templated `[env]` of `agentbox.toml`, env
//! files and `--env` flags, resolved once the task's host ports are known. It reaches the container
//! as its environment and as an env file in the worktree; secrets never reach agentbox's records.

use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;

use crate::config::{ConfigError, EnvVar, TemplateContext, expand};
use crate::fs_guard::{GuardError, GuardedDir};
use crate::git::Identity;
use crate::ports::PortMapping;

/// Everything the environment is made of, in increasing precedence.
pub struct EnvSources<'a> {
    pub task: &'a str,
    pub branch: &'a str,
    pub identity: &'a Identity,
    /// The task's own ports in the order `agentbox.toml` lists them (the first is `PORT`).
    pub task_ports: &'a IndexMap<String, PortMapping>,
    /// Host ports by template name: `web`, `db.pg`.
    pub host_ports: &'a BTreeMap<String, u16>,
    /// Values from the repository's devcontainer.json: over agentbox's own, under `[env]`.
    pub devcontainer: &'a [EnvVar],
    pub templates: &'a IndexMap<String, String>,
    pub explicit: &'a [EnvVar],
    pub host_env: &'a BTreeMap<String, String>,
}

/// Resolves the task's variables; later sources override earlier ones with the same name.
pub fn resolve(sources: &EnvSources) -> Result<Vec<EnvVar>, ConfigError> {
    let plain = |key: &str, value: String| EnvVar {
        key: key.to_owned(),
        value,
        secret: false,
    };
    let mut vars = vec![
        plain("AGENTBOX_TASK", sources.task.to_owned()),
        plain("AGENTBOX_BRANCH", sources.branch.to_owned()),
        plain("GIT_AUTHOR_NAME", sources.identity.name.clone()),
        plain("GIT_AUTHOR_EMAIL", sources.identity.email.clone()),
        plain("GIT_COMMITTER_NAME", sources.identity.name.clone()),
        plain("GIT_COMMITTER_EMAIL", sources.identity.email.clone()),
        // The container's uid may own nothing in the image, and git refuses repositories owned by
        // someone else unless told otherwise.
        plain("GIT_CONFIG_COUNT", "1".into()),
        plain("GIT_CONFIG_KEY_0", "safe.directory".into()),
        plain("GIT_CONFIG_VALUE_0", "*".into()),
    ];
    if let Some((_, first)) = sources.task_ports.first() {
        vars.push(plain("PORT", first.container.to_string()));
    }
    for (name, port) in sources.task_ports {
        let upper = name.to_ascii_uppercase();
        vars.push(plain(
            &format!("AGENTBOX_PORT_{upper}"),
            port.container.to_string(),
        ));
        vars.push(plain(
            &format!("AGENTBOX_HOST_PORT_{upper}"),
            port.host.to_string(),
        ));
    }
    let context = TemplateContext {
        task: sources.task,
        branch: sources.branch,
        ports: sources.host_ports,
        host_env: Some(sources.host_env),
    };
    vars.extend(sources.devcontainer.iter().cloned());
    for (key, template) in sources.templates {
        let (value, secret) = expand(template, &format!("[env] {key}"), &context)?;
        vars.push(EnvVar {
            key: key.clone(),
            value,
            secret,
        });
    }
    vars.extend(sources.explicit.iter().cloned());
    Ok(dedup_last_wins(vars))
}

/// Expands a service's `env` table (the same placeholders as `[env]`).
pub fn resolve_service(
    service: &str,
    templates: &IndexMap<String, String>,
    context: &TemplateContext,
) -> Result<Vec<EnvVar>, ConfigError> {
    templates
        .iter()
        .map(|(key, template)| {
            let (value, secret) = expand(
                template,
                &format!("[services.{service}.env] {key}"),
                context,
            )?;
            Ok(EnvVar {
                key: key.clone(),
                value,
                secret,
            })
        })
        .collect()
}

fn dedup_last_wins(vars: Vec<EnvVar>) -> Vec<EnvVar> {
    let mut by_key: IndexMap<String, EnvVar> = IndexMap::new();
    for var in vars {
        by_key.shift_remove(&var.key);
        by_key.insert(var.key.clone(), var);
    }
    by_key.into_values().collect()
}

/// `KEY=VALUE` strings for the engine.
pub fn docker_env(vars: &[EnvVar]) -> Vec<String> {
    vars.iter()
        .map(|v| format!("{}={}", v.key, v.value))
        .collect()
}

/// What agentbox may remember and show: secrets replaced by `None`.
pub fn masked(vars: &[EnvVar]) -> Vec<(String, Option<String>)> {
    vars.iter()
        .map(|v| (v.key.clone(), (!v.secret).then(|| v.value.clone())))
        .collect()
}

/// Writes the env file (mode 0600: it may hold secrets) in `--env-file` format at `name` in the
/// worktree, never through a symlink the task may have committed there. Values with a newline cannot
/// be expressed in that format and are left out of the file (they still reach the container's
/// environment).
pub fn write_env_file(
    worktree: &GuardedDir,
    name: &str,
    vars: &[EnvVar],
) -> Result<(), GuardError> {
    let mut text = String::from("# written by agentbox for this task; not committed\n");
    for var in vars.iter().filter(|v| !v.value.contains('\n')) {
        text.push_str(&format!("{}={}\n", var.key, var.value));
    }
    worktree.write_file(Path::new(name), text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_in_precedence_order_and_masks_secrets() {
        let identity = Identity::fallback();
        let task_ports = IndexMap::from([
            (
                "web".to_owned(),
                PortMapping {
                    container: 3000,
                    host: 20001,
                },
            ),
            (
                "api".to_owned(),
                PortMapping {
                    container: 8080,
                    host: 20002,
                },
            ),
        ]);
        let host_ports = BTreeMap::from([("web".to_owned(), 20001), ("api".to_owned(), 20002)]);
        let templates = IndexMap::from([
            (
                "PUBLIC_URL".to_owned(),
                "http://127.0.0.1:${port.web}".to_owned(),
            ),
            ("TOKEN".to_owned(), "${env:HOST_TOKEN}".to_owned()),
            ("OVERRIDDEN".to_owned(), "from-config".to_owned()),
        ]);
        let explicit = [EnvVar {
            key: "OVERRIDDEN".into(),
            value: "from-flag".into(),
            secret: false,
        }];
        let host_env = BTreeMap::from([("HOST_TOKEN".to_owned(), "s3cret".to_owned())]);
        let vars = resolve(&EnvSources {
            devcontainer: &[],
            task: "t1",
            branch: "agentbox/t1",
            identity: &identity,
            task_ports: &task_ports,
            host_ports: &host_ports,
            templates: &templates,
            explicit: &explicit,
            host_env: &host_env,
        })
        .unwrap();
        let get = |k: &str| vars.iter().find(|v| v.key == k).map(|v| v.value.as_str());
        assert_eq!(get("PORT"), Some("3000"));
        assert_eq!(get("AGENTBOX_PORT_API"), Some("8080"));
        assert_eq!(get("AGENTBOX_HOST_PORT_API"), Some("20002"));
        assert_eq!(get("PUBLIC_URL"), Some("http://127.0.0.1:20001"));
        assert_eq!(get("OVERRIDDEN"), Some("from-flag"));
        assert_eq!(vars.iter().filter(|v| v.key == "OVERRIDDEN").count(), 1);
        let masked = masked(&vars);
        assert!(masked.contains(&("TOKEN".to_owned(), None)));
        assert!(!format!("{masked:?}").contains("s3cret"));
    }

    #[test]
    fn env_file_is_private_and_never_written_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let vars = [EnvVar {
            key: "A".into(),
            value: "1".into(),
            secret: true,
        }];
        let worktree = GuardedDir::open(dir.path()).unwrap();
        write_env_file(&worktree, ".env.agentbox", &vars).unwrap();
        let file = dir.path().join(".env.agentbox");
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(std::fs::read_to_string(&file).unwrap().contains("\nA=1\n"));
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(outside.path().join("stolen"), &file).unwrap();
        let err = write_env_file(&worktree, ".env.agentbox", &vars).unwrap_err();
        assert!(matches!(err, GuardError::Symlink { .. }), "{err}");
        assert!(!outside.path().join("stolen").exists());
    }
}
