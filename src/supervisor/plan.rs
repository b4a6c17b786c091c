//! Everything a run will create, worked out before anything exists: host port names, the
//! environment, the containers' specs and mounts, the files agentbox puts into the worktree.

use std::collections::{BTreeMap, HashMap};

use indexmap::IndexMap;

use super::RunRequest;
use crate::config::{ConfigError, EnvVar, NetworkSetting, TemplateContext};
use crate::devcontainer::compose;
use crate::environment;
use crate::git::{Identity, TaskDirs};
use crate::ports::PortMapping;
use crate::runtime::{
    ContainerSpec, Healthcheck, Mount, Network, NetworkSpec, REPO_LABEL, SERVICE_LABEL,
    SHARED_LABEL, SandboxPlan, TASK_LABEL, VolumeMount, VolumeSpec,
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
    own.chain(services)
        .chain(compose_ports(request).map(|(name, _)| name))
        .collect()
}

/// Ledger names and container ports of a compose task's services.
fn compose_ports(request: &RunRequest) -> impl Iterator<Item = (String, u16)> + '_ {
    request.compose.iter().flat_map(|compose| {
        compose.services.iter().flat_map(|service| {
            service
                .ports
                .iter()
                .map(|port| (compose::port_name(&service.name, *port), *port))
        })
    })
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
        .chain(compose_ports(request))
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
        devcontainer: &request.devcontainer_env,
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
        if request.services.is_empty() && request.compose.is_none() {
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

    let mut volumes = Vec::new();
    if let Some(compose) = &request.compose {
        let volume_name = |volume: &str| format!("{container_name}-{volume}");
        let spec_name = |service: &str| format!("{container_name}-{service}");
        for volume in &compose.volumes {
            volumes.push(VolumeSpec {
                name: volume_name(volume),
                labels: labels.clone(),
            });
        }
        let mounts_of = |list: &[(String, String, bool)]| -> Vec<VolumeMount> {
            list.iter()
                .map(|(volume, target, read_only)| VolumeMount {
                    volume: volume_name(volume),
                    target: target.clone(),
                    read_only: *read_only,
                })
                .collect()
        };
        for service in &compose.services {
            let mut service_labels = labels.clone();
            service_labels.insert(SERVICE_LABEL.to_owned(), service.name.clone());
            services.push(ContainerSpec {
                name: spec_name(&service.name),
                image: service.image.clone(),
                command: service.command.clone(),
                entrypoint: service.entrypoint.clone(),
                env: environment::docker_env(&service.env),
                labels: service_labels,
                mounts: service.mounts.clone(),
                volumes: mounts_of(&service.volumes),
                working_dir: service.working_dir.clone().unwrap_or_default(),
                user: service.user.clone(),
                ports: service
                    .ports
                    .iter()
                    .map(|port| (*port, host_ports[&compose::port_name(&service.name, *port)]))
                    .collect(),
                network: match &service.network_of {
                    Some(of) => Network::Container(spec_name(of)),
                    None => attach(vec![service.name.clone()]),
                },
                limits: request.limits,
                healthcheck: service.healthcheck.clone(),
                depends_on: service
                    .depends_on
                    .iter()
                    .map(|(d, r)| (spec_name(d), *r))
                    .collect(),
                ..ContainerSpec::default()
            });
        }
        // A container on another's network publishes its ports there.
        for index in 0..services.len() {
            if let Network::Container(owner) = services[index].network.clone() {
                let ports = std::mem::take(&mut services[index].ports);
                if let Some(owner) = services.iter_mut().find(|s| s.name == owner) {
                    owner.ports.extend(ports);
                }
            }
        }
    }

    let command = if request.idle {
        Some(super::IDLE_COMMAND.iter().map(|s| s.to_string()).collect())
    } else {
        request.command.clone()
    };
    let mut mounts = dirs.mounts(&ws.repo);
    // Git inside works at the configured folder too: the worktree's `.git` file names the task's
    // git dir by its absolute path, which is mounted at that same path.
    let working_dir = match &request.workspace_folder {
        Some(folder) if *folder != worktree => {
            mounts.push(Mount {
                source: worktree.clone(),
                target: folder.clone(),
                read_only: false,
            });
            folder.clone()
        }
        _ => worktree,
    };
    // Two mounts at one place are refused by the engine; the one agentbox made first stays.
    for mount in &request.mounts {
        if !mounts.iter().any(|m| m.target == mount.target) {
            mounts.push(mount.clone());
        }
    }
    let mut task_ports: Vec<(u16, u16)> =
        task_ports.values().map(|m| (m.container, m.host)).collect();
    let mut task_network = attach(Vec::new());
    let mut task_volumes = Vec::new();
    let mut task_depends_on = Vec::new();
    if let Some(compose) = &request.compose {
        task_volumes = compose
            .task_volumes
            .iter()
            .map(|(volume, target, read_only)| VolumeMount {
                volume: format!("{container_name}-{volume}"),
                target: target.clone(),
                read_only: *read_only,
            })
            .collect();
        task_depends_on = compose
            .task_depends_on
            .iter()
            .map(|(d, r)| (format!("{container_name}-{d}"), *r))
            .collect();
        if let Some(of) = &compose.task_network_of {
            let owner = format!("{container_name}-{of}");
            if let Some(owner_spec) = services.iter_mut().find(|s| s.name == owner) {
                owner_spec.ports.append(&mut task_ports);
            }
            task_network = Network::Container(owner);
        }
    }
    let task_spec = ContainerSpec {
        name: container_name,
        image: request.image.clone(),
        command,
        env: environment::docker_env(&env),
        labels,
        mounts,
        working_dir,
        user: request.user.clone(),
        ports: task_ports,
        network: task_network,
        volumes: task_volumes,
        depends_on: task_depends_on,
        limits: request.limits,
        tty: request.interactive.tty,
        stdin: request.interactive.stdin,
        console_size: request.interactive.size.filter(|_| request.interactive.tty),
        privileges: request.privileges.clone(),
        healthcheck: Some(Healthcheck::disabled()),
        ..ContainerSpec::default()
    };
    let sandbox = SandboxPlan {
        network,
        volumes,
        services,
        task: task_spec,
        setup: request.setup.clone(),
        shell_env: request.shell_env.clone(),
    };
    Ok((sandbox, env))
}

/// What a task would be: its run worked out as far as it can be without creating anything (no
/// ports are reserved, so host ports are not shown). Secrets' values are `None`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Description {
    pub task: String,
    pub base: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub working_dir: String,
    pub network: String,
    pub limits: String,
    pub privileges: String,
    pub mounts: Vec<DescribedMount>,
    pub ports: Vec<(String, u16)>,
    pub env: Vec<(String, Option<String>)>,
    /// Set by the container's shell, with the container's own variables.
    pub shell_env: Vec<(String, String)>,
    pub host_setup: Vec<String>,
    pub setup: Vec<String>,
    pub services: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DescribedMount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// See [`Description`].
pub fn describe(ws: &Workspace, request: &RunRequest) -> Result<Description, super::RunError> {
    let worktree = ws.worktree_path(&request.task);
    let dirs = ws.task_dirs(&request.task, &worktree);
    let identity = ws.repo.identity().unwrap_or_else(Identity::fallback);
    let host_ports: BTreeMap<String, u16> =
        port_names(request).into_iter().map(|n| (n, 0)).collect();
    let (sandbox, env) = plan(ws, request, &dirs, &identity, &host_ports)?;
    let task = &sandbox.task;
    let limits = &request.limits;
    let limit_text = [
        limits
            .memory_bytes
            .map(|m| format!("memory {}", crate::config::Bytes(m))),
        limits.nano_cpus.map(|c| format!("cpus {}", c as f64 / 1e9)),
        limits.pids.map(|p| format!("pids {p}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    Ok(Description {
        task: request.task.to_string(),
        base: request.base.clone().unwrap_or_else(|| ws.repo.head_name()),
        image: task.image.clone(),
        command: task.command.clone(),
        user: task.user.clone(),
        working_dir: task.working_dir.clone(),
        network: match request.network {
            NetworkSetting::Bridge if request.services.is_empty() => {
                "bridge (the repository's, no task reaches another)".to_owned()
            }
            NetworkSetting::Bridge => "bridge (the task's own, with its services)".to_owned(),
            NetworkSetting::None => "none".to_owned(),
            NetworkSetting::Host => "host".to_owned(),
        },
        limits: if limit_text.is_empty() {
            "none".to_owned()
        } else {
            limit_text
        },
        privileges: request.privileges.describe(),
        mounts: task
            .mounts
            .iter()
            .map(|m| DescribedMount {
                source: m.source.clone(),
                target: m.target.clone(),
                read_only: m.read_only,
            })
            .collect(),
        ports: request
            .ports
            .iter()
            .map(|(name, port)| (name.clone(), *port))
            .chain(request.services.iter().flat_map(|(service, spec)| {
                spec.ports
                    .iter()
                    .map(move |(name, port)| (format!("{service}.{name}"), *port))
            }))
            .collect(),
        env: environment::masked(&env),
        shell_env: request.shell_env.clone(),
        host_setup: request.host_setup.clone(),
        setup: sandbox.setup.clone(),
        services: sandbox
            .services
            .iter()
            .map(|s| (s.name.clone(), s.image.clone()))
            .collect(),
    })
}
