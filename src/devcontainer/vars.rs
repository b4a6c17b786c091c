//! The variables of `devcontainer.json`: `${localWorkspaceFolder}`,
//! `${localWorkspaceFolderBasename}`, `${containerWorkspaceFolder}`,
//! `${containerWorkspaceFolderBasename}`, `${localEnv:VAR}`, `${localEnv:VAR:default}`,
//! `${containerEnv:VAR}` and `${devcontainerId}`.

use std::collections::BTreeMap;

/// What the variables stand for in one task.
#[derive(Debug, Clone)]
pub struct Variables<'a> {
    /// The task's worktree on the host.
    pub local_workspace_folder: String,
    /// Where the worktree is inside the container; `None` while `workspaceFolder` itself is
    /// being resolved.
    pub container_workspace_folder: Option<String>,
    pub host_env: &'a BTreeMap<String, String>,
    pub devcontainer_id: String,
}

/// A value with the variables replaced, and whether anything of the host's environment went into
/// it (then it is a secret, like `${env:NAME}` of `agentbox.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    pub value: String,
    pub from_host_env: bool,
}

impl Variables<'_> {
    /// Replaces the variables in `text`. `${containerEnv:VAR}` becomes `${VAR}`, for the
    /// container's shell to expand (it is only known there); elsewhere than in a shell line the
    /// caller refuses it. An unknown variable is an error that names it.
    pub fn expand(&self, text: &str) -> Result<Expanded, String> {
        let mut out = String::with_capacity(text.len());
        let mut from_host_env = false;
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("{text:?}: \"${{\" without a closing \"}}\""))?;
            let name = &after[..end];
            out.push_str(&self.value_of(name, &mut from_host_env)?);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Expanded {
            value: out,
            from_host_env,
        })
    }

    fn value_of(&self, name: &str, from_host_env: &mut bool) -> Result<String, String> {
        let basename = |path: &str| {
            std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let container = || {
            self.container_workspace_folder
                .clone()
                .ok_or_else(|| format!("${{{name}}} cannot be used in workspaceFolder itself"))
        };
        Ok(match name {
            "localWorkspaceFolder" => self.local_workspace_folder.clone(),
            "localWorkspaceFolderBasename" => basename(&self.local_workspace_folder),
            "containerWorkspaceFolder" => container()?,
            "containerWorkspaceFolderBasename" => basename(&container()?),
            "devcontainerId" => self.devcontainer_id.clone(),
            _ => {
                if let Some(spec) = name
                    .strip_prefix("localEnv:")
                    .or_else(|| name.strip_prefix("env:"))
                {
                    let (var, default) = match spec.split_once(':') {
                        Some((var, default)) => (var, Some(default)),
                        None => (spec, None),
                    };
                    match self.host_env.get(var) {
                        Some(value) => {
                            *from_host_env = true;
                            value.clone()
                        }
                        None => default.unwrap_or_default().to_owned(),
                    }
                } else if let Some(var) = name.strip_prefix("containerEnv:") {
                    let var = var.split_once(':').map_or(var, |(var, _)| var);
                    if !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || var.is_empty()
                    {
                        return Err(format!("${{containerEnv:{var}}}: not a variable name"));
                    }
                    format!("${{{var}}}")
                } else {
                    return Err(format!(
                        "unknown variable ${{{name}}} (known: localWorkspaceFolder, localWorkspaceFolderBasename, containerWorkspaceFolder, containerWorkspaceFolderBasename, localEnv:VAR, containerEnv:VAR, devcontainerId)"
                    ));
                }
            }
        })
    }
}

/// Whether `text` names `${containerEnv:...}`, which only the container's shell can expand.
pub fn uses_container_env(text: &str) -> bool {
    text.contains("${containerEnv:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_is_replaced_and_host_values_are_secrets() {
        let env = BTreeMap::from([("HOME".to_owned(), "/home/u".to_owned())]);
        let vars = Variables {
            local_workspace_folder: "/src/.agentbox-worktrees/app/t1".into(),
            container_workspace_folder: Some("/workspaces/app".into()),
            host_env: &env,
            devcontainer_id: "abc".into(),
        };
        let plain = vars
            .expand("${localWorkspaceFolderBasename}@${containerWorkspaceFolder}/${devcontainerId}")
            .unwrap();
        assert_eq!(plain.value, "t1@/workspaces/app/abc");
        assert!(!plain.from_host_env);
        let secret = vars.expand("${localEnv:HOME}/.ssh").unwrap();
        assert_eq!(secret.value, "/home/u/.ssh");
        assert!(secret.from_host_env);
        assert_eq!(
            vars.expand("${localEnv:NOPE:fallback}").unwrap().value,
            "fallback"
        );
        assert_eq!(
            vars.expand("${containerEnv:PATH}:/x").unwrap().value,
            "${PATH}:/x"
        );
        assert!(vars.expand("${whatever}").unwrap_err().contains("whatever"));
        assert!(vars.expand("${localEnv:HOME").is_err());
    }
}
