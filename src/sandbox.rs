//! The Docker side of one task: its container and, when `agentbox.toml` declares services, their
//! containers and the per-task network that lets the task reach them by name.

use std::collections::HashMap;

use futures::future::join_all;

use crate::docker::{ContainerSpec, DockerError, Engine, ImageDefaults, StartError};

/// What to create for a task, all known before anything exists.
#[derive(Debug, Clone, Default)]
pub struct SandboxPlan {
    /// The per-task network, when there are services.
    pub network: Option<String>,
    pub network_labels: HashMap<String, String>,
    pub services: Vec<ContainerSpec>,
    pub task: ContainerSpec,
    /// Shell commands run in the task's container before its command.
    pub setup: Vec<String>,
}

/// What exists of a task's sandbox (complete, or as far as a failed creation got).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub network: Option<String>,
    pub services: Vec<String>,
    pub container: Option<String>,
}

impl Sandbox {
    /// Creates the network, starts the services and creates (without starting) the task's
    /// container. On failure the error comes back with what was made, for the rollback.
    pub async fn create(engine: &Engine, plan: SandboxPlan) -> Result<Self, (DockerError, Self)> {
        let mut made = Self::default();
        let images =
            std::iter::once(&plan.task.image).chain(plan.services.iter().map(|s| &s.image));
        let checked = join_all(images.map(|image| engine.ensure_image(image))).await;
        let mut checked = checked.into_iter();
        let task_defaults = match checked.next().expect("the task's image is always checked") {
            Ok(defaults) => defaults,
            Err(e) => return Err((e, made)),
        };
        if let Some(Err(e)) = checked.find(Result::is_err) {
            return Err((e, made));
        }

        if let Some(network) = &plan.network {
            if let Err(e) = engine.create_network(network, &plan.network_labels).await {
                return Err((e, made));
            }
            made.network = Some(network.clone());
        }
        let services = join_all(plan.services.iter().map(|spec| async move {
            let id = engine.create_container(spec).await.map_err(|e| (e, None))?;
            match engine.start(&id).await {
                Ok(()) => Ok(id),
                Err(StartError::Engine(e)) => Err((e, Some(id))),
                Err(other) => {
                    let e = DockerError::ServiceStart {
                        service: spec.name.clone(),
                        message: other.to_string(),
                    };
                    Err((e, Some(id)))
                }
            }
        }))
        .await;
        let mut failure = None;
        for service in services {
            match service {
                Ok(id) => made.services.push(id),
                Err((e, id)) => {
                    made.services.extend(id);
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err((e, made));
        }

        let mut task = plan.task;
        if !plan.setup.is_empty() {
            let (entrypoint, cmd) =
                wrap_with_setup(&plan.setup, task.command.take(), &task_defaults);
            task.entrypoint = Some(entrypoint);
            task.command = Some(cmd);
        }
        match engine.create_container(&task).await {
            Ok(id) => {
                made.container = Some(id);
                Ok(made)
            }
            Err(e) => Err((e, made)),
        }
    }

    /// Removes whatever exists, the task's container and the services at once, then the network.
    /// Returns what could not be removed.
    pub async fn remove(&self, engine: &Engine) -> Vec<String> {
        let containers = self.container.iter().chain(&self.services);
        let removed = join_all(containers.map(|id| engine.remove(id))).await;
        let mut problems: Vec<String> = removed
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if let Some(network) = &self.network
            && let Err(e) = engine.remove_network(network).await
        {
            problems.push(e.to_string());
        }
        problems
    }
}

/// Runs the setup commands in the container's own shell before the task's command, so that their
/// output is streamed and logged exactly like the command's. The command is what the container
/// would have run without setup: the image's entrypoint followed by the given command (or the
/// image's default command).
fn wrap_with_setup(
    setup: &[String],
    command: Option<Vec<String>>,
    image: &ImageDefaults,
) -> (Vec<String>, Vec<String>) {
    let mut script = String::from(
        "agentbox_setup() {\n\
         \x20 printf 'agentbox: setup: %s\\n' \"$2\" >&2\n\
         \x20 /bin/sh -c \"$2\" </dev/null\n\
         \x20 rc=$?\n\
         \x20 if [ \"$rc\" -ne 0 ]; then\n\
         \x20   printf 'agentbox: setup step %s failed with exit code %s: %s\\n' \"$1\" \"$rc\" \"$2\" >&2\n\
         \x20   exit \"$rc\"\n\
         \x20 fi\n\
         }\n",
    );
    for (index, step) in setup.iter().enumerate() {
        script.push_str(&format!(
            "agentbox_setup {} {}\n",
            index + 1,
            shell_quote(step)
        ));
    }
    script.push_str("exec \"$@\"\n");
    let entrypoint = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        script,
        "agentbox-setup".to_owned(),
    ];
    let mut cmd = image.entrypoint.clone();
    cmd.extend(command.unwrap_or_else(|| image.cmd.clone()));
    (entrypoint, cmd)
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_wraps_the_command_the_container_would_have_run() {
        let image = ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
        };
        let setup = vec!["npm ci".to_owned(), "echo 'it''s'".to_owned()];
        let (entrypoint, cmd) = wrap_with_setup(&setup, None, &image);
        assert_eq!(entrypoint[0], "/bin/sh");
        assert!(entrypoint[2].contains("agentbox_setup 1 'npm ci'\n"));
        assert!(entrypoint[2].contains(r"agentbox_setup 2 'echo '\''it'\'''\''s'\'''"));
        assert!(entrypoint[2].ends_with("exec \"$@\"\n"));
        assert_eq!(cmd, ["/entry", "serve"]);
        let (_, cmd) = wrap_with_setup(&setup, Some(vec!["make".into()]), &image);
        assert_eq!(cmd, ["/entry", "make"]);
    }
}
