//! The Docker engine through its API (bollard): the one implementation of [`Runtime`], and the only
//! module that names bollard.

mod containers;
mod host_paths;

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerStateStatusEnum, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions,
    ListNetworksOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::{StreamExt, TryStreamExt};

use crate::runtime::{
    Attached, ContainerSpec, EngineVersion, ExecSpec, Execution, Exit, FoundContainer,
    FoundNetwork, ImageDefaults, NetworkSpec, OutputStream, REPO_LABEL, Runtime, RuntimeError,
    SHARED_LABEL, Sandbox, SandboxPlan, StartError, wrap_with_setup,
};

/// The kernel's list of the processes of container `id` (its full id): its cgroup's
/// `cgroup.procs`, where the engine's cgroupfs or systemd driver puts it under cgroup v1 or v2.
/// `None` where none is found (agentbox in a container of its own, another layout).
fn process_list_of(id: &str) -> Option<std::path::PathBuf> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    [
        format!("/sys/fs/cgroup/pids/docker/{id}"),
        format!("/sys/fs/cgroup/pids/system.slice/docker-{id}.scope"),
        format!("/sys/fs/cgroup/system.slice/docker-{id}.scope"),
        format!("/sys/fs/cgroup/docker/{id}"),
    ]
    .into_iter()
    .map(|dir| std::path::Path::new(&dir).join("cgroup.procs"))
    .find(|procs| procs.is_file())
}

/// The engine address used when the caller names none (`DOCKER_HOST` unset).
pub const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";

/// How long one API request may take. Generous: a pull or a stop with a long grace period is one
/// request.
const REQUEST_TIMEOUT_SECS: u64 = 600;

/// The Docker engine, connected and with an API version agreed on.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    address: String,
    host_paths: crate::runtime::host_paths::HostPaths,
    /// Held while a shared network is looked for and made: a batch starts its tasks at once, and
    /// each one making a network of its own would use up the engine's address pools.
    shared_network_turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

fn api<'a>(
    action: &'static str,
    target: &'a str,
) -> impl FnOnce(BollardError) -> RuntimeError + 'a {
    move |source| RuntimeError::Api {
        action,
        target: target.to_owned(),
        source: Box::new(source),
    }
}

fn is_status(e: &BollardError, codes: &[u16]) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if codes.contains(status_code))
}

impl DockerEngine {
    /// Connects and agrees on an API version with the engine (Debian's 20.10 speaks 1.41; newer
    /// engines more), which also proves the engine answers before anything else is created.
    pub async fn connect(address: Option<&str>) -> Result<Self, RuntimeError> {
        let address = address.unwrap_or(DEFAULT_ADDRESS).to_owned();
        let unreachable = |reason: String| RuntimeError::Unreachable {
            address: address.clone(),
            reason,
        };
        let docker = if address.starts_with("unix://") {
            Docker::connect_with_unix(&address, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else if address.starts_with("tcp://") || address.starts_with("http://") {
            Docker::connect_with_http(&address, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        } else {
            Docker::connect_with_host(&address)
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let host_paths = host_paths::discover(&docker).await?;
        Ok(Self {
            docker,
            address,
            host_paths,
            shared_network_turn: Default::default(),
        })
    }

    /// Makes sure `image` is present, pulling it when a registry can be reached, and returns what it
    /// runs by default.
    pub async fn ensure_image(&self, image: &str) -> Result<ImageDefaults, RuntimeError> {
        if let Some(defaults) = self.image_defaults(image).await? {
            return Ok(defaults);
        }
        let (from_image, tag) = split_tag(image);
        let options = CreateImageOptions {
            from_image: Some(from_image.to_owned()),
            tag: Some(tag.to_owned()),
            ..Default::default()
        };
        self.docker
            .create_image(Some(options), None, None)
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(|e| RuntimeError::ImageMissing {
                image: image.to_owned(),
                reason: pull_failure(&e),
            })?;
        self.image_defaults(image)
            .await?
            .ok_or_else(|| RuntimeError::ImageMissing {
                image: image.to_owned(),
                reason: "the pull finished but the image is not there".into(),
            })
    }

    async fn make_volume(&self, spec: &crate::runtime::VolumeSpec) -> Result<(), RuntimeError> {
        let request = bollard::models::VolumeCreateRequest {
            name: Some(spec.name.clone()),
            labels: Some(spec.labels.clone()),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .map(|_| ())
            .map_err(api("creating volume", &spec.name))
    }

    /// Waits until what `spec` depends on is ready: started (nothing to wait for), healthy, or
    /// ended with exit code 0.
    async fn wait_for_dependencies(
        &self,
        spec: &ContainerSpec,
        started: &HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        for (dependency, readiness) in &spec.depends_on {
            let Some(id) = started.get(dependency) else {
                continue;
            };
            match readiness {
                crate::runtime::Readiness::Started => {}
                crate::runtime::Readiness::Healthy => self.wait_healthy(dependency, id).await?,
                crate::runtime::Readiness::CompletedSuccessfully => {
                    let exit = self.wait(id).await?;
                    if exit.code != 0 {
                        return Err(RuntimeError::ServiceNotReady {
                            service: dependency.clone(),
                            state: format!("ended with exit code {}", exit.code),
                            message: format!("{} waits for it to complete successfully", spec.name),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    async fn wait_healthy(&self, service: &str, id: &str) -> Result<(), RuntimeError> {
        use bollard::models::HealthStatusEnum;
        let inspect = self
            .docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(api("inspecting container", id))?;
        let patience = inspect
            .config
            .as_ref()
            .and_then(|c| c.healthcheck.as_ref())
            .map(|h| {
                let d = |n: Option<i64>, default: u64| {
                    Duration::from_nanos(n.filter(|n| *n > 0).map_or(default, |n| n as u64))
                };
                crate::runtime::Healthcheck {
                    test: Vec::new(),
                    interval: d(h.interval, 30_000_000_000),
                    timeout: d(h.timeout, 30_000_000_000),
                    retries: h.retries.unwrap_or(3).max(0) as u32,
                    start_period: d(h.start_period, 0),
                }
                .patience()
            })
            .ok_or_else(|| RuntimeError::ServiceNotReady {
                service: service.to_owned(),
                state: "has no healthcheck".into(),
                message: "condition: service_healthy needs one".into(),
            })?;
        let deadline = tokio::time::Instant::now() + patience;
        let mut delay = Duration::from_millis(50);
        loop {
            let inspect = self
                .docker
                .inspect_container(
                    id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .map_err(api("inspecting container", id))?;
            let state = inspect.state.unwrap_or_default();
            let health = state.health.unwrap_or_default();
            let last_output = || {
                health
                    .log
                    .as_ref()
                    .and_then(|log| log.last())
                    .and_then(|r| r.output.clone())
                    .unwrap_or_default()
                    .trim()
                    .chars()
                    .take(300)
                    .collect::<String>()
            };
            match health.status {
                Some(HealthStatusEnum::HEALTHY) => return Ok(()),
                Some(HealthStatusEnum::UNHEALTHY) => {
                    return Err(RuntimeError::ServiceNotReady {
                        service: service.to_owned(),
                        state: "is unhealthy".into(),
                        message: format!("its healthcheck said: {}", last_output()),
                    });
                }
                _ => {}
            }
            if state.running != Some(true) {
                return Err(RuntimeError::ServiceNotReady {
                    service: service.to_owned(),
                    state: format!(
                        "stopped (exit code {}) before it was healthy",
                        state.exit_code.unwrap_or(-1)
                    ),
                    message: "see `docker logs` of its container, or run the task with --keep"
                        .into(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::ServiceNotReady {
                    service: service.to_owned(),
                    state: format!("never got healthy within {}s", patience.as_secs()),
                    message: format!("its healthcheck said: {}", last_output()),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    async fn image_defaults(&self, image: &str) -> Result<Option<ImageDefaults>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => {
                let config = inspect.config.unwrap_or_default();
                Ok(Some(ImageDefaults {
                    entrypoint: config.entrypoint.unwrap_or_default(),
                    cmd: config.cmd.unwrap_or_default(),
                }))
            }
            Err(e) if is_status(&e, &[404]) => Ok(None),
            Err(e) => Err(api("inspecting image", image)(e)),
        }
    }

    /// The name of the network the repository's tasks share, made if there is none. Each one made
    /// gets a name of its own (the engine accepts two networks of one name, and then refuses to
    /// start a container on either), and they are found by their labels: when two tasks start at
    /// once and each makes one, every task uses the one made first and removes its own spare.
    async fn shared_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError> {
        let labels: Vec<String> = [REPO_LABEL, SHARED_LABEL]
            .iter()
            .filter_map(|key| Some(format!("{key}={}", spec.labels.get(*key)?)))
            .collect();
        // Other processes may still race this one; the earliest network wins among them below.
        let _turn = self.shared_network_turn.lock().await;
        if let Some((name, _)) = self.earliest_network(&labels).await? {
            return Ok(name);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let mine = NetworkSpec {
            name: format!("{}-{:08x}", spec.name, nanos ^ std::process::id()),
            ..spec.clone()
        };
        if let Err(e) = self.make_network(&mine).await {
            // Tasks starting at once each make a network, and together they can use up the
            // engine's address pools; one of them made it, and that is the one everyone joins.
            if matches!(e, RuntimeError::NoAddressPool { .. })
                && let Some((winner, _)) = self.earliest_network(&labels).await?
            {
                return Ok(winner);
            }
            return Err(e);
        }
        let (winner, count) =
            self.earliest_network(&labels)
                .await?
                .ok_or_else(|| RuntimeError::Api {
                    action: "creating network",
                    target: mine.name.clone(),
                    source: "the network is gone right after it was made".into(),
                })?;
        if count > 1 && winner != mine.name {
            let _ = self.docker.remove_network(&mine.name).await;
        }
        Ok(winner)
    }

    /// The name of the earliest-made network carrying `labels`, and how many there are.
    async fn earliest_network(
        &self,
        labels: &[String],
    ) -> Result<Option<(String, usize)>, RuntimeError> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("label".to_owned(), labels.to_vec())])),
        };
        let found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(api("listing networks labelled", &labels.join(",")))?;
        let count = found.len();
        let earliest = found
            .into_iter()
            .filter_map(|n| Some((n.created, n.id?, n.name?)))
            .min();
        Ok(earliest.map(|(_, _, name)| (name, count)))
    }

    /// Makes a network; returns its id.
    async fn make_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError> {
        let options = spec.shared_isolated.then(|| {
            // No traffic between the containers on it: each task reaches the outside, not its
            // neighbours.
            HashMap::from([(
                "com.docker.network.bridge.enable_icc".to_owned(),
                "false".to_owned(),
            )])
        });
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".into()),
            labels: Some(spec.labels.clone()),
            options,
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(created) => Ok(created.id),
            Err(e) if is_status(&e, &[409]) => Err(RuntimeError::NameInUse {
                name: spec.name.clone(),
            }),
            Err(e) if e.to_string().contains("non-overlapping IPv4 address pool") => {
                Err(RuntimeError::NoAddressPool {
                    network: spec.name.clone(),
                })
            }
            Err(e) => Err(api("creating network", &spec.name)(e)),
        }
    }
}

/// A pull that failed because no registry answers says so in plain words; the engine's own text
/// (a DNS error, a timeout) follows for whoever needs it.
fn pull_failure(e: &BollardError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if [
        "no such host",
        "dial tcp",
        "i/o timeout",
        "connection refused",
        "tls handshake",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
    {
        format!("no container registry could be reached ({text})")
    } else {
        text
    }
}

#[async_trait::async_trait]
impl Runtime for DockerEngine {
    fn describe(&self) -> String {
        format!("the Docker engine at {}", self.address)
    }

    async fn create_sandbox(&self, plan: &SandboxPlan) -> Result<Sandbox, (RuntimeError, Sandbox)> {
        let mut made = Sandbox::default();
        let images =
            std::iter::once(&plan.task.image).chain(plan.services.iter().map(|s| &s.image));
        let checked = futures::future::join_all(images.map(|image| self.ensure_image(image))).await;
        let mut checked = checked.into_iter();
        let task_defaults = match checked.next().expect("the task's image is always checked") {
            Ok(defaults) => defaults,
            Err(e) => return Err((e, made)),
        };
        if let Some(Err(e)) = checked.find(Result::is_err) {
            return Err((e, made));
        }

        // A shared network outlives the sandbox; which one of them the task joins is known only
        // once it exists (see `shared_network`).
        let mut shared_id = None;
        if let Some(network) = &plan.network {
            if network.shared_isolated {
                match self.shared_network(network).await {
                    Ok(id) => shared_id = Some(id),
                    Err(e) => return Err((e, made)),
                }
            } else {
                if let Err(e) = self.make_network(network).await {
                    return Err((e, made));
                }
                made.network = Some(network.name.clone());
            }
        }
        for volume in &plan.volumes {
            if let Err(e) = self.make_volume(volume).await {
                return Err((e, made));
            }
            made.volumes.push(volume.name.clone());
        }
        // Services start in the order of what they wait for: each level at once, once the
        // services it depends on are ready.
        let mut started: HashMap<String, String> = HashMap::new();
        let mut pending: Vec<&ContainerSpec> = plan.services.iter().collect();
        while !pending.is_empty() {
            let (ready, waiting): (Vec<&ContainerSpec>, Vec<&ContainerSpec>) = pending
                .into_iter()
                .partition(|spec| spec.depends_on.iter().all(|(d, _)| started.contains_key(d)));
            if ready.is_empty() {
                let names: Vec<&str> = waiting.iter().map(|s| s.name.as_str()).collect();
                let e = RuntimeError::ServiceStart {
                    service: names.join(", "),
                    message: "they depend on each other (or on a service that is not there)".into(),
                };
                return Err((e, made));
            }
            pending = waiting;
            for spec in &ready {
                if let Err(e) = self.wait_for_dependencies(spec, &started).await {
                    return Err((e, made));
                }
            }
            let services = futures::future::join_all(ready.iter().map(|spec| {
                let started = &started;
                async move {
                    let spec = with_container_network(spec, started);
                    let id = self.make_container(&spec).await.map_err(|e| (e, None))?;
                    match self.start(&id).await {
                        Ok(()) => Ok(id),
                        Err(StartError::Runtime(e)) => Err((e, Some(id))),
                        Err(other) => {
                            let e = RuntimeError::ServiceStart {
                                service: spec.name.clone(),
                                message: other.to_string(),
                            };
                            Err((e, Some(id)))
                        }
                    }
                }
            }))
            .await;
            let mut failure = None;
            for (spec, service) in ready.iter().zip(services) {
                match service {
                    Ok(id) => {
                        made.services.push(id.clone());
                        started.insert(spec.name.clone(), id);
                    }
                    Err((e, id)) => {
                        made.services.extend(id);
                        failure.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failure {
                return Err((e, made));
            }
        }
        if let Err(e) = self.wait_for_dependencies(&plan.task, &started).await {
            return Err((e, made));
        }

        let mut task = with_container_network(&plan.task, &started);
        if let (Some(id), crate::runtime::Network::Named { name, .. }) =
            (shared_id, &mut task.network)
        {
            *name = id;
        }
        if !plan.setup.is_empty() || !plan.shell_env.is_empty() {
            let (entrypoint, cmd) = wrap_with_setup(
                &plan.setup,
                &plan.shell_env,
                task.command.take(),
                &task_defaults,
            );
            task.entrypoint = Some(entrypoint);
            task.command = Some(cmd);
        }
        made.image_defaults = task_defaults;
        match self.make_container(&task).await {
            Ok(id) => {
                made.container = Some(id);
                Ok(made)
            }
            Err(e) => Err((e, made)),
        }
    }

    async fn attach(&self, container: &str) -> Result<OutputStream, RuntimeError> {
        let options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(container, Some(options))
            .await
            .map_err(api("attaching to container", container))?;
        Ok(containers::output_stream(
            attached.output,
            container.to_owned(),
        ))
    }

    async fn start(&self, container: &str) -> Result<(), StartError> {
        self.start_container(container).await
    }

    async fn wait(&self, container: &str) -> Result<Exit, RuntimeError> {
        let options = WaitContainerOptions {
            condition: "not-running".into(),
        };
        let mut waits = self.docker.wait_container(container, Some(options));
        let code = match waits.next().await {
            Some(Ok(response)) => response.status_code,
            // bollard reports a non-zero exit as an error; for us it is an ordinary result.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(api("waiting for container", container)(e)),
            None => {
                return Err(RuntimeError::Api {
                    action: "waiting for container",
                    target: container.to_owned(),
                    source: "the engine closed the wait without an exit code".into(),
                });
            }
        };
        // The kernel's OOM killer sends SIGKILL: only a 137 can be one, and only then is the
        // container asked.
        let oom_killed = code == 137
            && match self.docker.inspect_container(container, None).await {
                Ok(inspect) => inspect.state.and_then(|s| s.oom_killed).unwrap_or(false),
                Err(_) => false,
            };
        Ok(Exit { code, oom_killed })
    }

    async fn stop(&self, container: &str, grace: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        match self.docker.stop_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped; 404: already gone. Either way it is not running.
            Err(e) if is_status(&e, &[304, 404]) => Ok(()),
            Err(e) => Err(api("stopping container", container)(e)),
        }
    }

    async fn kill(&self, container: &str) -> Result<(), RuntimeError> {
        let options = KillContainerOptions {
            signal: "KILL".into(),
        };
        match self.docker.kill_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: not running any more; 404: gone.
            Err(e) if is_status(&e, &[404, 409]) => Ok(()),
            Err(e) => Err(api("killing container", container)(e)),
        }
    }

    async fn kill_processes(&self, container: &str) -> Result<(), RuntimeError> {
        let Some(procs) = process_list_of(container) else {
            return self.kill(container).await;
        };
        // The engine answers a kill only once it has also taken the container's network down;
        // the processes are gone well before, and the kernel's list of them says so.
        let engine = self.clone();
        let id = container.to_owned();
        let mut kill = tokio::spawn(async move { engine.kill(&id).await });
        loop {
            tokio::select! {
                killed = &mut kill => {
                    return killed.unwrap_or_else(|e| Err(RuntimeError::Api {
                        action: "killing container",
                        target: container.to_owned(),
                        source: e.into(),
                    }));
                }
                () = tokio::time::sleep(Duration::from_millis(2)) => {
                    // A cgroup that is gone holds no process.
                    let listed = std::fs::read(&procs).unwrap_or_default();
                    if listed.iter().all(u8::is_ascii_whitespace) {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn remove_container(&self, container: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            // 404: gone; 409: removal already in progress, by us or another agentbox.
            Err(e) if is_status(&e, &[404, 409]) => Ok(()),
            Err(e) => Err(api("removing container", container)(e)),
        }
    }

    async fn rename_container(&self, container: &str, name: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::RenameContainerOptions {
            name: name.to_owned(),
        };
        self.docker
            .rename_container(container, options)
            .await
            .map_err(api("renaming container", container))
    }

    async fn remove_network(&self, network: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(network).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, &[404]) => Ok(()),
            Err(e) => Err(api("removing network", network)(e)),
        }
    }

    async fn find_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<FoundContainer>, RuntimeError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), labels.to_vec())])),
            ..Default::default()
        };
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(api("listing containers labelled", &labels.join(",")))?;
        Ok(found
            .into_iter()
            .map(|c| FoundContainer {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                running: c
                    .state
                    .is_some_and(|s| s.to_string().eq_ignore_ascii_case("running")),
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    async fn find_networks(&self, labels: &[String]) -> Result<Vec<FoundNetwork>, RuntimeError> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("label".to_owned(), labels.to_vec())])),
        };
        let found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(api("listing networks labelled", &labels.join(",")))?;
        Ok(found
            .into_iter()
            .map(|n| FoundNetwork {
                id: n.id.unwrap_or_default(),
                name: n.name.unwrap_or_default(),
                labels: n.labels.unwrap_or_default(),
            })
            .collect())
    }

    async fn exec(&self, container: &str, spec: &ExecSpec) -> Result<Execution, StartError> {
        self.exec_in(container, spec).await
    }

    async fn attach_interactive(
        &self,
        container: &str,
        detach_keys: &str,
    ) -> Result<Attached, RuntimeError> {
        let options = AttachContainerOptions {
            stream: true,
            stdin: true,
            stdout: true,
            stderr: true,
            detach_keys: Some(detach_keys.to_owned()),
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(container, Some(options))
            .await
            .map_err(api("attaching to container", container))?;
        Ok(Attached {
            output: containers::output_stream(attached.output, container.to_owned()),
            input: attached.input,
        })
    }

    async fn resize(&self, container: &str, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::ResizeContainerTTYOptions {
            h: i32::from(rows),
            w: i32::from(cols),
        };
        self.docker
            .resize_container_tty(container, options)
            .await
            .map_err(api("resizing the terminal of container", container))
    }

    async fn create_network(&self, spec: &NetworkSpec) -> Result<String, RuntimeError> {
        self.make_network(spec).await
    }

    async fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: &[String],
    ) -> Result<(), RuntimeError> {
        let request = bollard::models::NetworkConnectRequest {
            container: container.to_owned(),
            endpoint_config: Some(bollard::models::EndpointSettings {
                aliases: Some(aliases.to_vec()),
                ..Default::default()
            }),
        };
        self.docker
            .connect_network(network, request)
            .await
            .map_err(api("connecting to network", network))
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.ensure_image(&spec.image).await?;
        self.make_container(spec).await
    }

    async fn remove_volume(&self, volume: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::RemoveVolumeOptionsBuilder::new()
            .force(true)
            .build();
        match self.docker.remove_volume(volume, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, &[404]) => Ok(()),
            Err(e) => Err(api("removing volume", volume)(e)),
        }
    }

    async fn find_volumes(&self, labels: &[String]) -> Result<Vec<String>, RuntimeError> {
        let options = bollard::query_parameters::ListVolumesOptionsBuilder::new()
            .filters(&HashMap::from([("label", labels.to_vec())]))
            .build();
        let found = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(api("listing volumes labelled", &labels.join(",")))?;
        Ok(found
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.name)
            .collect())
    }

    async fn build_image(
        &self,
        spec: &crate::runtime::BuildSpec,
        progress: &(dyn for<'line> Fn(&'line str) + Sync),
    ) -> Result<(), RuntimeError> {
        let args: HashMap<String, String> = spec.args.iter().cloned().collect();
        let mut options = bollard::query_parameters::BuildImageOptionsBuilder::new()
            .dockerfile(&spec.dockerfile)
            .t(&spec.tag)
            .rm(true)
            .forcerm(true)
            .buildargs(&args)
            .labels(&spec.labels);
        if let Some(target) = &spec.target {
            options = options.target(target);
        }
        let body = bollard::body_full(bytes::Bytes::from(spec.context.clone()));
        let mut stream = self.docker.build_image(options.build(), None, Some(body));
        let failed = |message: String| RuntimeError::Api {
            action: "building image",
            target: spec.tag.clone(),
            source: message.into(),
        };
        while let Some(info) = stream.next().await {
            let info = info.map_err(|e| failed(e.to_string()))?;
            if let Some(detail) = info.error_detail {
                return Err(failed(detail.message.unwrap_or_default()));
            }
            for line in info.stream.iter().flat_map(|s| s.lines()) {
                let line = line.trim_end();
                if !line.is_empty() {
                    progress(line);
                }
            }
        }
        match self.image_defaults(&spec.tag).await? {
            Some(_) => Ok(()),
            None => Err(failed("the build ended without an image".into())),
        }
    }

    async fn exec_exit(&self, execution: &str) -> Result<i64, RuntimeError> {
        // The output ends when the command does; the engine may take a moment to say so.
        let mut delay = Duration::from_millis(5);
        for _ in 0..40 {
            let inspect = self
                .docker
                .inspect_exec(execution)
                .await
                .map_err(api("inspecting command", execution))?;
            if inspect.running != Some(true) {
                return Ok(inspect.exit_code.unwrap_or(-1));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
        Err(RuntimeError::Api {
            action: "inspecting command",
            target: execution.to_owned(),
            source: "it still runs after its output ended".into(),
        })
    }

    async fn resize_exec(&self, execution: &str, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        let options = bollard::exec::ResizeExecOptions {
            height: rows,
            width: cols,
        };
        self.docker
            .resize_exec(execution, options)
            .await
            .map_err(api("resizing the terminal of command", execution))
    }

    async fn exit_if_ended(&self, container: &str) -> Result<Option<Exit>, RuntimeError> {
        let inspect = match self.docker.inspect_container(container, None).await {
            Ok(inspect) => inspect,
            Err(e) if is_status(&e, &[404]) => return Ok(None),
            Err(e) => return Err(api("inspecting container", container)(e)),
        };
        let state = inspect.state.unwrap_or_default();
        Ok(match (state.status, state.exit_code) {
            (Some(ContainerStateStatusEnum::EXITED), Some(code)) => Some(Exit {
                code,
                oom_killed: state.oom_killed.unwrap_or(false),
            }),
            _ => None,
        })
    }

    async fn version(&self) -> Result<EngineVersion, RuntimeError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(api("asking the version of", &self.address))?;
        Ok(EngineVersion {
            engine: version.version.unwrap_or_else(|| "?".into()),
            api: version.api_version.unwrap_or_else(|| "?".into()),
            agreed: self.docker.client_version().to_string(),
        })
    }

    fn host_paths(&self) -> crate::runtime::host_paths::HostPaths {
        self.host_paths.clone()
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        Ok(self.image_defaults(image).await?.is_some())
    }
}

impl DockerEngine {
    async fn exec_in(&self, container: &str, spec: &ExecSpec) -> Result<Execution, StartError> {
        let options = bollard::exec::CreateExecOptions {
            attach_stdin: Some(spec.stdin),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(spec.tty),
            env: Some(spec.env.clone()),
            cmd: Some(spec.command.clone()),
            user: spec.user.clone(),
            working_dir: spec.working_dir.clone(),
            ..Default::default()
        };
        let created = self
            .docker
            .create_exec(container, options)
            .await
            .map_err(api("starting a command in container", container))?;
        let start = bollard::exec::StartExecOptions {
            detach: false,
            tty: spec.tty,
            output_capacity: None,
        };
        match self.docker.start_exec(&created.id, Some(start)).await {
            Ok(bollard::exec::StartExecResults::Attached { output, input }) => Ok(Execution {
                id: created.id,
                output: containers::exec_output(containers::output_stream(
                    output,
                    container.to_owned(),
                )),
                input: spec.stdin.then_some(input),
            }),
            Ok(bollard::exec::StartExecResults::Detached) => {
                Err(StartError::Runtime(RuntimeError::Api {
                    action: "starting a command in container",
                    target: container.to_owned(),
                    source: "the engine detached the command".into(),
                }))
            }
            Err(e) => Err(api("starting a command in container", container)(e).into()),
        }
    }
}

/// Splits `name[:tag]` the way the engine does: a colon after the last slash starts the tag.
fn split_tag(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => (&image[..colon], &image[colon + 1..]),
        _ => (image, "latest"),
    }
}

/// `spec` with a `Network::Container` naming a spec of the sandbox turned into that container's id.
fn with_container_network(
    spec: &ContainerSpec,
    started: &HashMap<String, String>,
) -> ContainerSpec {
    let mut spec = spec.clone();
    if let crate::runtime::Network::Container(name) = &spec.network
        && let Some(id) = started.get(name)
    {
        spec.network = crate::runtime::Network::Container(id.clone());
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_tags_like_the_engine() {
        assert_eq!(
            split_tag("agentbox/base:bookworm"),
            ("agentbox/base", "bookworm")
        );
        assert_eq!(split_tag("ubuntu"), ("ubuntu", "latest"));
        assert_eq!(
            split_tag("localhost:5000/img"),
            ("localhost:5000/img", "latest")
        );
        assert_eq!(
            split_tag("localhost:5000/img:1"),
            ("localhost:5000/img", "1")
        );
    }
}
