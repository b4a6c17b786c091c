//! The Docker engine, through its API (bollard): images, task containers, their output and exit.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, NetworkCreateRequest, NetworkingConfig,
    PortBinding,
};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, KillContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures::{Stream, StreamExt, TryStreamExt};

mod leftovers;
pub use leftovers::FoundNetwork;

/// The engine address used when the caller names none (`DOCKER_HOST` unset).
pub const DEFAULT_ADDRESS: &str = "unix:///var/run/docker.sock";

/// How long one API request may take. Generous: a pull or a stop with a long grace period is one
/// request.
const REQUEST_TIMEOUT_SECS: u64 = 600;

/// Capabilities a coding task never needs; the rest of Docker's default set stays so that a task
/// running as root can still install packages.
const DROPPED_CAPABILITIES: &[&str] = &[
    "NET_RAW",
    "MKNOD",
    "AUDIT_WRITE",
    "SYS_CHROOT",
    "SETFCAP",
    "SETPCAP",
];

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine at {address}: {reason} (is it running? DOCKER_HOST selects another engine)"
    )]
    Unreachable { address: String, reason: String },
    #[error(
        "image {image} is not present locally and could not be pulled: {reason}; build agentbox's default image with images/build-base.sh, or pass --image with a local image"
    )]
    ImageMissing { image: String, reason: String },
    #[error(
        "container name {name} is already in use; remove the container or pick another task name"
    )]
    NameInUse { name: String },
    #[error("service container {service} could not start: {message}")]
    ServiceStart { service: String, message: String },
    #[error("{action} {target} failed: {source}")]
    Api {
        action: &'static str,
        target: String,
        source: Box<BollardError>,
    },
}

impl DockerError {
    fn api<'a>(action: &'static str, target: &'a str) -> impl FnOnce(BollardError) -> Self + 'a {
        move |source| Self::Api {
            action,
            target: target.to_owned(),
            source: Box::new(source),
        }
    }
}

/// Why a created container could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command does not exist in the image (`docker run` exits 127 for this).
    #[error("command not found in container {container}: {message}")]
    NotFound { container: String, message: String },
    /// The command exists but cannot be executed (`docker run` exits 126).
    #[error("command cannot be executed in container {container}: {message}")]
    NotExecutable { container: String, message: String },
    #[error(transparent)]
    Engine(#[from] DockerError),
}

/// Everything needed to create a task's container; all of it is known before the worktree exists,
/// so creation overlaps with the checkout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `None` runs the image's default command.
    pub command: Option<Vec<String>>,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// `host:container[:ro]` bind mounts.
    pub binds: Vec<String>,
    pub working_dir: String,
    /// `uid:gid`, or `None` for the image's user.
    pub user: Option<String>,
    /// Replaces the image's entrypoint (a setup wrapper does this).
    pub entrypoint: Option<Vec<String>>,
    /// `(container port, host port)` pairs, published on 127.0.0.1 only.
    pub ports: Vec<(u16, u16)>,
    /// A network to join instead of the default bridge, with the host names others reach it by.
    pub network: Option<String>,
    pub network_aliases: Vec<String>,
}

/// What an image runs when a container does not say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// One chunk of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
}

/// A container found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Engine {
    docker: Docker,
    address: String,
}

impl Engine {
    /// Connects and agrees on an API version with the engine (Debian's 20.10 speaks 1.41; newer
    /// engines more), which also proves the engine answers before anything else is created.
    pub async fn connect(address: Option<&str>) -> Result<Self, DockerError> {
        let address = address.unwrap_or(DEFAULT_ADDRESS).to_owned();
        let unreachable = |reason: String| DockerError::Unreachable {
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
        Ok(Self { docker, address })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Makes sure `image` is present, pulling it when a registry can be reached, and returns what it
    /// runs by default.
    pub async fn ensure_image(&self, image: &str) -> Result<ImageDefaults, DockerError> {
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
            .map_err(|e| DockerError::ImageMissing {
                image: image.to_owned(),
                reason: e.to_string(),
            })?;
        self.image_defaults(image)
            .await?
            .ok_or_else(|| DockerError::ImageMissing {
                image: image.to_owned(),
                reason: "the pull finished but the image is not there".into(),
            })
    }

    async fn image_defaults(&self, image: &str) -> Result<Option<ImageDefaults>, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => {
                let config = inspect.config.unwrap_or_default();
                Ok(Some(ImageDefaults {
                    entrypoint: config.entrypoint.unwrap_or_default(),
                    cmd: config.cmd.unwrap_or_default(),
                }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DockerError::api("inspecting image", image)(e)),
        }
    }

    /// Creates a bridge network for one task and its services.
    pub async fn create_network(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), DockerError> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Err(DockerError::NameInUse {
                name: name.to_owned(),
            }),
            Err(e) => Err(DockerError::api("creating network", name)(e)),
        }
    }

    /// Removes a network; one that is already gone is not an error.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DockerError::api("removing network", name)(e)),
        }
    }

    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<String, DockerError> {
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let port_key = |container: u16| format!("{container}/tcp");
        let port_bindings = spec
            .ports
            .iter()
            .map(|(container, host)| {
                let binding = PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(host.to_string()),
                };
                (port_key(*container), Some(vec![binding]))
            })
            .collect();
        let networking_config = spec.network.as_ref().map(|network| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network.clone(),
                EndpointSettings {
                    aliases: Some(spec.network_aliases.clone()),
                    ..Default::default()
                },
            )])),
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: spec.command.clone(),
            entrypoint: spec.entrypoint.clone(),
            exposed_ports: Some(spec.ports.iter().map(|(c, _)| port_key(*c)).collect()),
            networking_config,
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            working_dir: Some(spec.working_dir.clone()),
            user: spec.user.clone(),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                binds: Some(spec.binds.clone()),
                port_bindings: Some(port_bindings),
                network_mode: spec.network.clone(),
                // An init as PID 1 forwards SIGTERM to the command and reaps its children, so a
                // graceful stop works even for a shell that would ignore signals as PID 1.
                init: Some(true),
                cap_drop: Some(DROPPED_CAPABILITIES.iter().map(|c| c.to_string()).collect()),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match self.docker.create_container(Some(options), body).await {
            Ok(created) => Ok(created.id),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Err(DockerError::NameInUse {
                name: spec.name.clone(),
            }),
            Err(e) if is_not_found(&e) => Err(DockerError::ImageMissing {
                image: spec.image.clone(),
                reason: e.to_string(),
            }),
            Err(e) => Err(DockerError::api("creating container", &spec.name)(e)),
        }
    }

    /// Attaches to the container's stdout and stderr. Attach before starting so that not one byte of
    /// early output is lost; the stream ends when the container stops.
    pub async fn attach(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<Output, DockerError>> + Send + 'static + use<>, DockerError>
    {
        let options = AttachContainerOptions {
            stream: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let attached = self
            .docker
            .attach_container(id, Some(options))
            .await
            .map_err(DockerError::api("attaching to container", id))?;
        let id = id.to_owned();
        Ok(attached.output.filter_map(move |chunk| {
            let item = match chunk {
                Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                    Some(Ok(Output::Stdout(message)))
                }
                Ok(LogOutput::StdErr { message }) => Some(Ok(Output::Stderr(message))),
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(DockerError::api("reading output of container", &id)(e))),
            };
            std::future::ready(item)
        }))
    }

    pub async fn start(&self, id: &str) -> Result<(), StartError> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. })
                if start_failure_code(&message) == Some(127) =>
            {
                Err(StartError::NotFound {
                    container: id.to_owned(),
                    message,
                })
            }
            Err(BollardError::DockerResponseServerError { message, .. })
                if start_failure_code(&message) == Some(126) =>
            {
                Err(StartError::NotExecutable {
                    container: id.to_owned(),
                    message,
                })
            }
            Err(e) => Err(DockerError::api("starting container", id)(e).into()),
        }
    }

    /// Waits until the container is not running and returns its exit code. Asked after the start,
    /// with condition `not-running`, it cannot miss an exit that already happened.
    pub async fn wait(&self, id: &str) -> Result<i64, DockerError> {
        let options = WaitContainerOptions {
            condition: "not-running".into(),
        };
        let mut waits = self.docker.wait_container(id, Some(options));
        match waits.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard reports a non-zero exit as an error; for us it is an ordinary result.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(DockerError::api("waiting for container", id)(e)),
            None => Err(DockerError::Api {
                action: "waiting for container",
                target: id.to_owned(),
                source: Box::new(BollardError::DockerStreamError {
                    error: "the engine closed the wait without an exit code".into(),
                }),
            }),
        }
    }

    /// Sends SIGTERM, then SIGKILL after `grace` (the engine does both).
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), DockerError> {
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        match self.docker.stop_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 304: already stopped; 404: already gone. Either way it is not running.
            Err(BollardError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api("stopping container", id)(e)),
        }
    }

    pub async fn kill(&self, id: &str) -> Result<(), DockerError> {
        let options = KillContainerOptions {
            signal: "KILL".into(),
        };
        match self.docker.kill_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: not running any more; 404: gone.
            Err(BollardError::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api("killing container", id)(e)),
        }
    }

    /// Removes the container, killing it first if it still runs. A container that is already gone
    /// is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409: removal already in progress, by us or another agentbox.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api("removing container", id)(e)),
        }
    }

    /// Containers (running or not) carrying every one of `labels` (`key=value` or `key`).
    pub async fn find(&self, labels: &[String]) -> Result<Vec<FoundContainer>, DockerError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), labels.to_vec())])),
            ..Default::default()
        };
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(DockerError::api(
                "listing containers labelled",
                &labels.join(","),
            ))?;
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
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
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

/// The exit code `docker run` reports when the runtime could not start the command: 127 when it does
/// not exist, 126 when it exists but cannot be executed.
fn start_failure_code(message: &str) -> Option<i64> {
    let lower = message.to_ascii_lowercase();
    if lower.contains("executable file not found") || lower.contains("no such file or directory") {
        Some(127)
    } else if lower.contains("permission denied") || lower.contains("exec format error") {
        Some(126)
    } else {
        None
    }
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

    #[test]
    fn maps_runtime_start_failures_to_docker_run_codes() {
        assert_eq!(
            start_failure_code(
                r#"OCI runtime create failed: exec: "nope": executable file not found in $PATH: unknown"#
            ),
            Some(127)
        );
        assert_eq!(
            start_failure_code(r#"exec: "/x.sh": permission denied: unknown"#),
            Some(126)
        );
        assert_eq!(start_failure_code("cgroup setup failed"), None);
    }
}
