//! Everything a run will create, worked out before anything exists: host port names, the
//! environment, the containers' specs and mounts, the files agentbox puts into the worktree.

use std::collections::{BTreeMap, HashMap};

use indexmap::IndexMap;

use super::RunRequest;
use crate::config::{ConfigError, EnvVar, NetworkSetting, TemplateContext};
use crate::environment;
use crate::git::{Identity, TaskDirs};
use crate::ports::PortMapping;
use crate::runtime::{
    ContainerSpec, Network, NetworkSpec, REPO_LABEL, SERVICE_LABEL, SHARED_LABEL, SandboxPlan,
    TASK_LABEL,
};
use crate::workspace::Workspace;

/// Paths agentbox itself puts into the worktree; a snapshot never commits them.
/// The env file comes first ([`crate::control::exec_env`] finds it there).
pub(crate) fn own_files(request: &RunRequest) -> Vec<String> {
    std::iter::once(request.env_file_name.clone())
        .chain(request.copy.iter().map(|p| p.display().to_string()))
        .collect()
}

/// Ledger names of every port the task needs: its own (`web`) and its services' (`db.pg`).
pub(crate) fn port_names(request: &RunRequest) -> Vec<String> {
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

/// Everything the engine will create, and the environment as agentbox may record it.
pub(crate) fn plan(
    ws: &Workspace,
    request: &RunRequest,
    dirs: &TaskDirs,
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

    let worktree = dirs.worktree.display().to_string();
    let mut labels: HashMap<String, String> = request.labels.iter().cloned().collect();
    labels.extend([
        (TASK_LABEL.to_owned(), task.to_string()),
        (REPO_LABEL.to_owned(), ws.repo_id.clone()),
        ("agentbox.branch".to_owned(), branch.clone()),
        ("agentbox.worktree".to_owned(), worktree.clone()),
    ]);
    let container_name = ws.container_name(task);
    // A task with services gets a network of its own: its services reach it by name, and no other
    // task reaches them. One without shares the repository's network on which containers cannot
    // reach each other: creating and removing a network per task would cost more than its start.
    let network = (request.network == NetworkSetting::Bridge).then(|| {
        if request.services.is_empty() {
            let mut shared_labels: HashMap<String, String> =
                request.labels.iter().cloned().collect();
            shared_labels.insert(REPO_LABEL.to_owned(), ws.repo_id.clone());
            shared_labels.insert(SHARED_LABEL.to_owned(), "isolated".to_owned());
            NetworkSpec {
                name: ws.shared_network_name(),
                labels: shared_labels,
                shared_isolated: true,
            }
        } else {
            NetworkSpec {
                name: container_name.clone(),
                labels: labels.clone(),
                shared_isolated: false,
            }
        }
    });
    let attach = |aliases: Vec<String>| match &network {
        Some(network) => Network::Named {
            name: network.name.clone(),
            aliases,
        },
        None => Network::None,
    };

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
        service_labels.insert(SERVICE_LABEL.to_owned(), service.clone());
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
            network: attach(vec![service.clone()]),
            limits: spec.limits.over(request.limits),
            ..ContainerSpec::default()
        });
    }

    let command = if request.idle {
        Some(super::IDLE_COMMAND.iter().map(|s| s.to_string()).collect())
    } else {
        request.command.clone()
    };
    let task_spec = ContainerSpec {
        name: container_name,
        image: request.image.clone(),
        command,
        env: environment::docker_env(&env),
        labels,
        mounts: dirs.mounts(&ws.repo),
        working_dir: worktree,
        user: request.user.clone(),
        ports: task_ports.values().map(|m| (m.container, m.host)).collect(),
        network: attach(Vec::new()),
        limits: request.limits,
        tty: request.interactive.tty,
        stdin: request.interactive.stdin,
        console_size: request.interactive.size.filter(|_| request.interactive.tty),
        ..ContainerSpec::default()
    };
    let sandbox = SandboxPlan {
        network,
        services,
        task: task_spec,
        setup: request.setup.clone(),
    };
    Ok((sandbox, env))
}
