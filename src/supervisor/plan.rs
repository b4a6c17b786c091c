//! Everything a run will create, worked out before anything exists: host port names, the
//! environment, the containers' specs, the files agentbox puts into the worktree.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use super::{RunError, RunRequest};
use crate::config::{ConfigError, EnvVar, TemplateContext};
use crate::docker::ContainerSpec;
use crate::environment::{self, PortMapping};
use crate::git::Identity;
use crate::sandbox::SandboxPlan;
use crate::workspace::Workspace;

/// Paths agentbox itself puts into the worktree; a snapshot never commits them.
pub(super) fn own_files(request: &RunRequest) -> Vec<String> {
    std::iter::once(request.env_file_name.clone())
        .chain(request.copy.iter().map(|p| p.display().to_string()))
        .collect()
}

/// Ledger names of every port the task needs: its own (`web`) and its services' (`db.pg`).
pub(super) fn port_names(request: &RunRequest) -> Vec<String> {
    let own = request.ports.keys().cloned();
    let services = request
        .services
        .iter()
        .flat_map(|(service, spec)| spec.ports.keys().map(move |p| format!("{service}.{p}")));
    own.chain(services).collect()
}

pub(super) fn all_port_mappings(
    request: &RunRequest,
    host_ports: &BTreeMap<String, u16>,
) -> BTreeMap<String, PortMapping> {
    let own = request
        .ports
        .iter()
        .map(|(name, port)| (name.clone(), *port));
    let services = request.services.iter().flat_map(|(service, spec)| {
        spec.ports
            .iter()
            .map(move |(name, port)| (format!("{service}.{name}"), *port))
    });
    own.chain(services)
        .map(|(name, container)| {
            let host = host_ports[&name];
            (name, PortMapping { container, host })
        })
        .collect()
}

/// Everything the Docker side will create, and the environment as agentbox may record it.
pub(super) fn plan(
    ws: &Workspace,
    request: &RunRequest,
    worktree: &Path,
    identity: &Identity,
    host_ports: &BTreeMap<String, u16>,
) -> Result<(SandboxPlan, Vec<EnvVar>), ConfigError> {
    let task = &request.task;
    let branch = task.branch();
    let task_ports: IndexMap<String, PortMapping> = request
        .ports
        .iter()
        .map(|(name, container)| {
            let host = host_ports[name];
            (
                name.clone(),
                PortMapping {
                    container: *container,
                    host,
                },
            )
        })
        .collect();
    let env = environment::resolve(&environment::EnvSources {
        task: task.as_str(),
        branch: &branch,
        identity,
        task_ports: &task_ports,
        host_ports,
        templates: &request.env_templates,
        explicit: &request.env,
        host_env: &request.host_env,
    })?;

    let common = ws.repo.common_dir.display().to_string();
    let wt = worktree.display().to_string();
    let mut labels: HashMap<String, String> = request.labels.iter().cloned().collect();
    labels.extend([
        ("agentbox.task".to_owned(), task.to_string()),
        ("agentbox.repo".to_owned(), ws.repo_id.clone()),
        ("agentbox.branch".to_owned(), branch.clone()),
        ("agentbox.worktree".to_owned(), wt.clone()),
    ]);
    let container_name = ws.container_name(task);
    let network = (!request.services.is_empty()).then(|| container_name.clone());

    let context = TemplateContext {
        task: task.as_str(),
        branch: &branch,
        ports: host_ports,
        host_env: Some(&request.host_env),
    };
    let mut services = Vec::new();
    for (service, spec) in &request.services {
        let service_env = environment::resolve_service(service, &spec.env, &context)?;
        let mut service_labels = labels.clone();
        service_labels.insert("agentbox.service".to_owned(), service.clone());
        services.push(ContainerSpec {
            name: format!("{container_name}-{service}"),
            image: spec.image.clone(),
            command: spec.command.as_ref().map(|c| c.argv()),
            env: environment::docker_env(&service_env),
            labels: service_labels,
            ports: spec
                .ports
                .iter()
                .map(|(name, port)| (*port, host_ports[&format!("{service}.{name}")]))
                .collect(),
            network: network.clone(),
            network_aliases: vec![service.clone()],
            ..ContainerSpec::default()
        });
    }

    // The worktree and the git common dir at their host paths, so the worktree's absolute
    // `gitdir:` link resolves inside with any git version; the common dir's `config` and `hooks/`
    // read-only, so a task cannot plant anything that later runs on the host.
    let binds = vec![
        format!("{wt}:{wt}"),
        format!("{common}:{common}"),
        format!("{common}/config:{common}/config:ro"),
        format!("{common}/hooks:{common}/hooks:ro"),
    ];
    let task_spec = ContainerSpec {
        name: container_name,
        image: request.image.clone(),
        command: request.command.clone(),
        env: environment::docker_env(&env),
        labels: labels.clone(),
        binds,
        working_dir: wt,
        user: request.user.clone(),
        ports: task_ports.values().map(|m| (m.container, m.host)).collect(),
        network: network.clone(),
        ..ContainerSpec::default()
    };
    let sandbox = SandboxPlan {
        network,
        network_labels: labels,
        services,
        task: task_spec,
        setup: request.setup.clone(),
    };
    Ok((sandbox, env))
}

/// Copies `paths` (relative, already checked not to contain `..`) from the source checkout into the
/// new worktree. A path that leads outside the checkout through a symlink is refused as well.
pub(super) fn copy_into(
    source_root: &Path,
    worktree: &Path,
    paths: &[PathBuf],
) -> Result<(), RunError> {
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| RunError::Io {
            action,
            path,
            source,
        }
    };
    let root = source_root
        .canonicalize()
        .map_err(io("resolve", source_root))?;
    for relative in paths {
        let source = root.join(relative);
        let resolved = source.canonicalize().map_err(io("copy", &source))?;
        if !resolved.starts_with(&root) {
            return Err(RunError::CopyEscapes {
                path: relative.clone(),
            });
        }
        let target = worktree.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        copy_recursively(&resolved, &target).map_err(io("copy", &source))?;
    }
    Ok(())
}

fn copy_recursively(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_recursively(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(drop)
    }
}
