//! Containers: from a [`ContainerSpec`] to the engine's create body, starting them, and their output.

use std::collections::HashMap;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount as EngineMount, MountType,
    NetworkingConfig, PortBinding,
};
use bollard::query_parameters::CreateContainerOptions;
use futures::{Stream, StreamExt};

use super::{DockerEngine, api, is_status};
use crate::runtime::host_paths::HostPaths;
use crate::runtime::{ContainerSpec, Network, Output, OutputStream, RuntimeError, StartError};

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

impl DockerEngine {
    pub(super) async fn make_container(
        &self,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        match self
            .docker
            .create_container(Some(options), create_body(spec, &self.host_paths)?)
            .await
        {
            Ok(created) => Ok(created.id),
            Err(e) if is_status(&e, &[409]) => Err(RuntimeError::NameInUse {
                name: spec.name.clone(),
            }),
            Err(e) if is_status(&e, &[404]) && e.to_string().contains("image") => {
                Err(RuntimeError::ImageMissing {
                    image: spec.image.clone(),
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(api("creating container", &spec.name)(e)),
        }
    }

    pub(super) async fn start_container(&self, id: &str) -> Result<(), StartError> {
        match self.docker.start_container(id, None).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError { message, .. })
                if start_failure_code(&message).is_some() =>
            {
                let command = failed_command(&message).unwrap_or_else(|| message.clone());
                Err(match start_failure_code(&message) {
                    Some(127) => StartError::NotFound { command },
                    _ => StartError::NotExecutable { command },
                })
            }
            Err(e) => Err(api("starting container", id)(e).into()),
        }
    }
}

fn create_body(
    spec: &ContainerSpec,
    host_paths: &HostPaths,
) -> Result<ContainerCreateBody, RuntimeError> {
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
    let (network_mode, networking_config) = match &spec.network {
        Network::Named { name, aliases } => (
            Some(name.clone()),
            Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    name.clone(),
                    EndpointSettings {
                        aliases: Some(aliases.clone()),
                        ..Default::default()
                    },
                )])),
            }),
        ),
        Network::None => (Some("none".to_owned()), None),
        Network::Container(name) => (Some(format!("container:{name}")), None),
        Network::Default => (None, None),
    };
    let binds = spec
        .mounts
        .iter()
        .map(|m| {
            Ok(EngineMount {
                target: Some(m.target.clone()),
                source: Some(host_paths.translate(&m.source)?),
                typ: Some(MountType::BIND),
                read_only: Some(m.read_only),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    let mounts = binds
        .into_iter()
        .chain(spec.volumes.iter().map(|v| EngineMount {
            target: Some(v.target.clone()),
            source: Some(v.volume.clone()),
            typ: Some(MountType::VOLUME),
            read_only: Some(v.read_only),
            ..Default::default()
        }))
        .collect();
    let nanos = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    let healthcheck = spec
        .healthcheck
        .as_ref()
        .map(|h| bollard::models::HealthConfig {
            test: Some(h.test.clone()),
            interval: Some(nanos(h.interval)),
            timeout: Some(nanos(h.timeout)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(nanos(h.start_period)),
            ..Default::default()
        });
    let limit = |value: Option<u64>| value.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: spec.command.clone(),
        entrypoint: spec.entrypoint.clone(),
        exposed_ports: Some(spec.ports.iter().map(|(c, _)| port_key(*c)).collect()),
        healthcheck,
        networking_config,
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        working_dir: Some(spec.working_dir.clone()),
        user: spec.user.clone(),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(spec.stdin),
        tty: Some(spec.tty),
        open_stdin: Some(spec.stdin),
        // Without a terminal, the end of the first client's stdin is the command's (a pipe's end
        // reaches it); with one, stdin stays open so that clients can detach and attach again.
        stdin_once: Some(spec.stdin && !spec.tty),
        host_config: Some(HostConfig {
            console_size: spec
                .console_size
                .map(|(rows, cols)| vec![usize::from(rows), usize::from(cols)]),
            mounts: Some(mounts),
            port_bindings: Some(port_bindings),
            network_mode,
            // An init as PID 1 forwards SIGTERM to the command and reaps its children, so a
            // graceful stop works even for a shell that would ignore signals as PID 1.
            init: Some(true),
            privileged: Some(spec.privileges.privileged),
            cap_drop: Some(
                DROPPED_CAPABILITIES
                    .iter()
                    .filter(|c| {
                        !spec.privileges.privileged
                            && !spec.privileges.cap_add.iter().any(|a| {
                                a.eq_ignore_ascii_case(c)
                                    || a.eq_ignore_ascii_case(&format!("CAP_{c}"))
                            })
                    })
                    .map(|c| c.to_string())
                    .collect(),
            ),
            cap_add: (!spec.privileges.cap_add.is_empty()).then(|| spec.privileges.cap_add.clone()),
            security_opt: Some(
                std::iter::once("no-new-privileges:true".to_owned())
                    .filter(|_| !spec.privileges.privileged)
                    .chain(spec.privileges.security_opt.iter().cloned())
                    .collect(),
            ),
            memory: limit(spec.limits.memory_bytes),
            // No swap beyond the memory limit: a task over its limit is stopped, not slowed down
            // until the machine is.
            memory_swap: limit(spec.limits.memory_bytes),
            nano_cpus: limit(spec.limits.nano_cpus),
            pids_limit: limit(spec.limits.pids),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The container's output as agentbox's [`Output`]. The init agentbox runs as PID 1 reports a command
/// it could not execute as the first line of stderr (`[FATAL tini (7)] exec make failed: No such
/// file or directory`); that line becomes [`Output::NotStarted`], so the user reads agentbox's words
/// instead of the init's. Stderr that could still be that line is held (at most one line of 4 KiB)
/// until it is whole, since the engine may deliver it in pieces.
pub(super) fn output_stream(
    output: impl Stream<Item = Result<LogOutput, BollardError>> + Send + 'static,
    container: String,
) -> OutputStream {
    struct State<S> {
        inner: std::pin::Pin<Box<S>>,
        /// Stderr held while it may still be the init's report; `None` once it cannot be.
        held: Option<Vec<u8>>,
        ready: std::collections::VecDeque<Result<Output, RuntimeError>>,
        container: String,
    }
    const PREFIX: &[u8] = b"[FATAL tini (";
    const MAX_HELD: usize = 4096;
    let state = State {
        inner: Box::pin(output),
        held: Some(Vec::new()),
        ready: Default::default(),
        container,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.ready.pop_front() {
                return Some((item, state));
            }
            let chunk = state.inner.next().await;
            match chunk {
                None => {
                    // The end: what was held is the init's report, or ordinary stderr.
                    let held = state.held.take().filter(|h| !h.is_empty())?;
                    let item =
                        init_exec_failure(&held).unwrap_or_else(|| Output::Stderr(held.into()));
                    return Some((Ok(item), state));
                }
                Some(Err(e)) => {
                    let e = api("reading output of container", &state.container)(e);
                    state.ready.push_back(Err(e));
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                // With a terminal, everything is one stream: the init's report can only be its
                // very first line.
                Some(Ok(LogOutput::Console { message }))
                    if state.held.as_ref().is_some_and(Vec::is_empty)
                        && message.starts_with(PREFIX)
                        && init_exec_failure(&message).is_some() =>
                {
                    state.held = None;
                    let report = init_exec_failure(&message).expect("checked just now");
                    state.ready.push_back(Ok(report));
                }
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    if let Some(held) = state.held.take().filter(|h| !h.is_empty()) {
                        state.ready.push_back(Ok(Output::Stderr(held.into())));
                    }
                    state.ready.push_back(Ok(Output::Stdout(message)));
                }
                Some(Ok(LogOutput::StdErr { message })) => match state.held.as_mut() {
                    None => state.ready.push_back(Ok(Output::Stderr(message))),
                    Some(held) => {
                        held.extend_from_slice(&message);
                        let could_be = held.len() <= MAX_HELD
                            && held[..held.len().min(PREFIX.len())]
                                == PREFIX[..held.len().min(PREFIX.len())];
                        let whole = held.contains(&b'\n');
                        if !could_be || whole {
                            let held = state.held.take().expect("held is there");
                            let item = if could_be {
                                init_exec_failure(&held)
                                    .unwrap_or_else(|| Output::Stderr(held.into()))
                            } else {
                                Output::Stderr(held.into())
                            };
                            state.ready.push_back(Ok(item));
                        }
                    }
                },
            }
        }
    })
    .boxed()
}

/// The output of a command run in a container (`exec`), where the engine reports a command it could
/// not execute as the first output (`OCI runtime exec failed: exec failed: ... exec: "make":
/// executable file not found in $PATH: unknown`): that becomes [`Output::NotStarted`].
pub(super) fn exec_output(output: OutputStream) -> OutputStream {
    let mut first = true;
    output
        .map(move |item| {
            if !std::mem::take(&mut first) {
                return item;
            }
            match item {
                Ok(Output::Stdout(bytes) | Output::Stderr(bytes))
                    if bytes.starts_with(b"OCI runtime exec failed") =>
                {
                    let message = String::from_utf8_lossy(&bytes).into_owned();
                    let command =
                        failed_command(&message).unwrap_or_else(|| message.trim().to_owned());
                    Ok(Output::NotStarted {
                        not_found: start_failure_code(&message) != Some(126),
                        command,
                    })
                }
                other => other,
            }
        })
        .boxed()
}

/// Recognises the init's report of a command it could not execute.
fn init_exec_failure(message: &[u8]) -> Option<Output> {
    let text = std::str::from_utf8(message).ok()?;
    let rest = text.strip_prefix("[FATAL tini (")?;
    let rest = &rest[rest.find(")] exec ")? + ")] exec ".len()..];
    let (command, reason) = rest.trim_end().rsplit_once(" failed: ")?;
    let not_found = match reason {
        "No such file or directory" => true,
        "Permission denied" | "Exec format error" | "Is a directory" => false,
        _ => return None,
    };
    Some(Output::NotStarted {
        not_found,
        command: command.to_owned(),
    })
}

/// The exit code `docker run` reports when the runtime could not start the command: 127 when it does
/// not exist, 126 when it exists but cannot be executed.
fn start_failure_code(message: &str) -> Option<i64> {
    let lower = message.to_ascii_lowercase();
    if lower.contains("executable file not found")
        || lower.contains("no such file or directory")
        || lower.contains("not a directory")
    {
        Some(127)
    } else if lower.contains("permission denied") || lower.contains("exec format error") {
        Some(126)
    } else {
        None
    }
}

/// The command named in the runtime's `exec: "make": executable file not found` message.
fn failed_command(message: &str) -> Option<String> {
    let start = message.find("exec: \"")? + "exec: \"".len();
    let end = message[start..].find('"')?;
    Some(message[start..start + end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_runtime_start_failures_to_docker_run_codes() {
        let not_found = r#"OCI runtime create failed: exec: "nope": executable file not found in $PATH: unknown"#;
        assert_eq!(start_failure_code(not_found), Some(127));
        assert_eq!(failed_command(not_found).as_deref(), Some("nope"));
        assert_eq!(
            start_failure_code(r#"exec: "/x.sh": permission denied: unknown"#),
            Some(126)
        );
        assert_eq!(start_failure_code("cgroup setup failed"), None);
    }

    #[test]
    fn recognises_the_init_failing_to_exec_the_command() {
        assert_eq!(
            init_exec_failure(b"[FATAL tini (7)] exec make failed: No such file or directory\n"),
            Some(Output::NotStarted {
                not_found: true,
                command: "make".into()
            })
        );
        assert_eq!(
            init_exec_failure(b"[FATAL tini (7)] exec /etc/passwd failed: Permission denied\n"),
            Some(Output::NotStarted {
                not_found: false,
                command: "/etc/passwd".into()
            })
        );
        assert_eq!(
            init_exec_failure(b"make: *** No rule to make target\n"),
            None
        );
    }

    #[test]
    fn limits_and_mounts_reach_the_engine() {
        let spec = ContainerSpec {
            name: "c".into(),
            image: "i".into(),
            mounts: vec![crate::runtime::Mount {
                source: "/a:b".into(),
                target: "/a:b".into(),
                read_only: true,
            }],
            limits: crate::runtime::Limits {
                memory_bytes: Some(1 << 30),
                nano_cpus: Some(1_500_000_000),
                pids: Some(4096),
            },
            network: Network::None,
            ..ContainerSpec::default()
        };
        let body = create_body(&spec, &HostPaths::Same).unwrap();
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(1 << 30));
        assert_eq!(host.memory_swap, Some(1 << 30));
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(4096));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        let mount = &host.mounts.unwrap()[0];
        assert_eq!(mount.source.as_deref(), Some("/a:b"));
        assert_eq!(mount.read_only, Some(true));
    }

    #[test]
    fn inside_a_container_a_bind_source_is_the_hosts_path_and_its_target_agentboxs() {
        let spec = ContainerSpec {
            mounts: vec![crate::runtime::Mount::same_path(
                std::path::Path::new("/workspaces/wt/t"),
                false,
            )],
            ..ContainerSpec::default()
        };
        let paths = HostPaths::Through {
            container: "devbox".into(),
            mounts: vec![crate::runtime::host_paths::MountedDir {
                inside: "/workspaces".into(),
                host: "/home/u/src".into(),
            }],
        };
        let mounts = create_body(&spec, &paths)
            .unwrap()
            .host_config
            .unwrap()
            .mounts
            .unwrap();
        assert_eq!(mounts[0].source.as_deref(), Some("/home/u/src/wt/t"));
        assert_eq!(mounts[0].target.as_deref(), Some("/workspaces/wt/t"));
        let outside = ContainerSpec {
            mounts: vec![crate::runtime::Mount::same_path(
                std::path::Path::new("/root/.local/state/x"),
                false,
            )],
            ..ContainerSpec::default()
        };
        let refused = create_body(&outside, &paths).unwrap_err();
        assert!(
            matches!(refused, RuntimeError::Untranslatable(_)),
            "{refused}"
        );
    }
}

#[cfg(test)]
mod exec_tests {
    use super::*;

    #[test]
    fn the_engines_report_of_a_command_it_could_not_run_becomes_not_started() {
        let report = b"OCI runtime exec failed: exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown\r\n";
        let stream: OutputStream =
            futures::stream::iter(vec![Ok(Output::Stdout(bytes::Bytes::from_static(report)))])
                .boxed();
        let items: Vec<Output> = futures::executor::block_on(
            exec_output(stream).map(Result::unwrap).collect::<Vec<_>>(),
        );
        assert_eq!(
            items,
            [Output::NotStarted {
                not_found: true,
                command: "nope".into()
            }]
        );
        let denied = b"OCI runtime exec failed: exec failed: exec: \"/etc/passwd\": permission denied: unknown";
        let stream: OutputStream = futures::stream::iter(vec![
            Ok(Output::Stdout(bytes::Bytes::from_static(denied))),
            Ok(Output::Stdout(bytes::Bytes::from_static(
                b"OCI runtime exec failed later",
            ))),
        ])
        .boxed();
        let items: Vec<Output> = futures::executor::block_on(
            exec_output(stream).map(Result::unwrap).collect::<Vec<_>>(),
        );
        assert!(matches!(
            &items[0],
            Output::NotStarted {
                not_found: false,
                ..
            }
        ));
        assert!(
            matches!(&items[1], Output::Stdout(_)),
            "only the first chunk"
        );
    }
}

#[cfg(test)]
mod terminal_tests {
    use super::*;

    #[test]
    fn a_terminal_keeps_stdin_open_across_clients_and_a_pipe_does_not() {
        let tty = ContainerSpec {
            tty: true,
            stdin: true,
            console_size: Some((40, 120)),
            ..ContainerSpec::default()
        };
        let body = create_body(&tty, &HostPaths::Same).unwrap();
        assert_eq!(body.tty, Some(true));
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(false));
        assert_eq!(body.host_config.unwrap().console_size, Some(vec![40, 120]));
        let piped = ContainerSpec {
            stdin: true,
            ..ContainerSpec::default()
        };
        let body = create_body(&piped, &HostPaths::Same).unwrap();
        assert_eq!(body.stdin_once, Some(true));
        assert_eq!(
            create_body(&ContainerSpec::default(), &HostPaths::Same)
                .unwrap()
                .open_stdin,
            Some(false)
        );
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    fn collect(chunks: Vec<LogOutput>) -> Vec<Output> {
        let stream = futures::stream::iter(chunks.into_iter().map(Ok));
        let output = output_stream(stream, "c".into());
        futures::executor::block_on(output.map(Result::unwrap).collect::<Vec<_>>())
    }

    fn err(text: &str) -> LogOutput {
        LogOutput::StdErr {
            message: text.as_bytes().to_vec().into(),
        }
    }

    #[test]
    fn the_inits_report_is_recognised_even_in_pieces() {
        let pieces = vec![
            err("[FATAL tini (7)] "),
            err("exec make failed: No such "),
            err("file or directory\n"),
        ];
        assert_eq!(
            collect(pieces),
            [Output::NotStarted {
                not_found: true,
                command: "make".into()
            }]
        );
    }

    #[test]
    fn with_a_terminal_the_inits_report_is_the_first_line_of_the_one_stream() {
        let console = |text: &str| LogOutput::Console {
            message: text.as_bytes().to_vec().into(),
        };
        assert_eq!(
            collect(vec![console(
                "[FATAL tini (7)] exec nope failed: No such file or directory\r\n"
            )]),
            [Output::NotStarted {
                not_found: true,
                command: "nope".into()
            }]
        );
        let later = "[FATAL tini (7)] exec nope failed: No such file or directory\r\n";
        assert_eq!(
            collect(vec![console("$ "), console(later)]),
            [
                Output::Stdout(b"$ ".to_vec().into()),
                Output::Stdout(later.as_bytes().to_vec().into()),
            ],
            "a program may print the same words later"
        );
    }

    #[test]
    fn ordinary_stderr_passes_unchanged_and_in_order() {
        let chunks = vec![
            err("[FAT"),
            LogOutput::StdOut {
                message: b"out\n".to_vec().into(),
            },
            err("warning: x\n"),
        ];
        assert_eq!(
            collect(chunks),
            [
                Output::Stderr(b"[FAT".to_vec().into()),
                Output::Stdout(b"out\n".to_vec().into()),
                Output::Stderr(b"warning: x\n".to_vec().into()),
            ]
        );
        assert_eq!(
            collect(vec![err("plain error\n")]),
            [Output::Stderr(b"plain error\n".to_vec().into())]
        );
    }
}
