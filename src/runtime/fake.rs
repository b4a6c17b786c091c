//! A container engine in memory, for unit tests of the decisions above the [`Runtime`] seam: the
//! order of steps, rollbacks, recovery. It records every call, can be told to fail at a named step,
//! and runs a closure in place of the task's command (to play the task: write files, commit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    ContainerSpec, EngineVersion, Exit, FoundContainer, FoundNetwork, Output, OutputStream,
    Runtime, RuntimeError, Sandbox, SandboxPlan, StartError,
};

/// What the task's "command" does when the container starts: it gets the container's name.
pub(crate) type Command = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct State {
    calls: Vec<String>,
    fail_on: Option<&'static str>,
    exit: Option<Exit>,
    output: Vec<Output>,
    containers: BTreeMap<String, (String, HashMap<String, String>, bool)>,
    networks: BTreeMap<String, HashMap<String, String>>,
    next_id: u64,
    command: Option<Command>,
    images: BTreeSet<String>,
    /// The newest API version the engine says it speaks; `None` is agentbox's own.
    api: Option<String>,
}

#[derive(Clone, Default)]
pub(crate) struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

impl FakeRuntime {
    /// Makes the step named `step` fail (`create_network`, `create_service`, `create_container`,
    /// `attach`, `start`, `wait`, `remove_container`, …).
    pub(crate) fn fail_on(&self, step: &'static str) {
        self.state.lock().unwrap().fail_on = Some(step);
    }

    pub(crate) fn exit_with(&self, exit: Exit) {
        self.state.lock().unwrap().exit = Some(exit);
    }

    pub(crate) fn output(&self, output: Vec<Output>) {
        self.state.lock().unwrap().output = output;
    }

    /// What the task does while it runs.
    pub(crate) fn command(&self, command: Command) {
        self.state.lock().unwrap().command = Some(command);
    }

    /// Makes `image` present.
    pub(crate) fn has_image(&self, image: &str) {
        self.state.lock().unwrap().images.insert(image.to_owned());
    }

    /// Makes the engine say it speaks API `api` at most.
    pub(crate) fn speaks_api(&self, api: &str) {
        self.state.lock().unwrap().api = Some(api.to_owned());
    }

    pub(crate) fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Names of the containers that exist.
    pub(crate) fn containers(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .containers
            .values()
            .map(|(n, _, _)| n.clone())
            .collect()
    }

    pub(crate) fn networks(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .networks
            .keys()
            .cloned()
            .collect()
    }

    fn call(&self, name: &str, target: &str) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("{name} {target}"));
        if state.fail_on == Some(name) {
            return Err(RuntimeError::Api {
                action: "faking",
                target: format!("{name} {target}"),
                source: "the fake engine was told to fail here".into(),
            });
        }
        Ok(())
    }

    fn add_container(&self, name: &str, labels: &HashMap<String, String>) -> String {
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = format!("fake-{}", state.next_id);
        state
            .containers
            .insert(id.clone(), (name.to_owned(), labels.clone(), false));
        id
    }

    fn set_running(&self, id: &str, running: bool) {
        if let Some(entry) = self.state.lock().unwrap().containers.get_mut(id) {
            entry.2 = running;
        }
    }
}

/// The engine refuses to create a container whose bind source does not exist.
fn bind_sources_exist(container: &ContainerSpec) -> Result<(), RuntimeError> {
    match container
        .mounts
        .iter()
        .find(|mount| !std::path::Path::new(&mount.source).exists())
    {
        Some(missing) => Err(RuntimeError::Api {
            action: "creating container",
            target: container.name.clone(),
            source: format!("bind source path does not exist: {}", missing.source).into(),
        }),
        None => Ok(()),
    }
}

fn matches(labels: &HashMap<String, String>, wanted: &[String]) -> bool {
    wanted.iter().all(|w| match w.split_once('=') {
        Some((key, value)) => labels.get(key).is_some_and(|v| v == value),
        // A key alone asks only that the label be there, as the engine's filter does.
        None => labels.contains_key(w.as_str()),
    })
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn describe(&self) -> String {
        "the fake engine".into()
    }

    async fn create_sandbox(&self, plan: &SandboxPlan) -> Result<Sandbox, (RuntimeError, Sandbox)> {
        let mut made = Sandbox::default();
        if let Some(network) = &plan.network {
            self.call("create_network", &network.name)
                .map_err(|e| (e, made.clone()))?;
            self.state
                .lock()
                .unwrap()
                .networks
                .insert(network.name.clone(), network.labels.clone());
            made.network = Some(network.name.clone());
        }
        for service in &plan.services {
            self.call("create_service", &service.name)
                .and_then(|()| bind_sources_exist(service))
                .map_err(|e| (e, made.clone()))?;
            let id = self.add_container(&service.name, &service.labels);
            self.set_running(&id, true);
            made.services.push(id);
        }
        self.call("create_container", &plan.task.name)
            .and_then(|()| bind_sources_exist(&plan.task))
            .map_err(|e| (e, made.clone()))?;
        made.container = Some(self.add_container(&plan.task.name, &plan.task.labels));
        Ok(made)
    }

    async fn attach(&self, container: &str) -> Result<OutputStream, RuntimeError> {
        self.call("attach", container)?;
        let output: Vec<Result<Output, RuntimeError>> = self
            .state
            .lock()
            .unwrap()
            .output
            .iter()
            .cloned()
            .map(Ok)
            .collect();
        Ok(Box::pin(futures::stream::iter(output)))
    }

    async fn start(&self, container: &str) -> Result<(), StartError> {
        self.call("start", container)?;
        self.set_running(container, true);
        let command = self.state.lock().unwrap().command.clone();
        if let Some(command) = command {
            command(container);
        }
        Ok(())
    }

    async fn wait(&self, container: &str) -> Result<Exit, RuntimeError> {
        self.call("wait", container)?;
        self.set_running(container, false);
        Ok(self.state.lock().unwrap().exit.unwrap_or(Exit {
            code: 0,
            oom_killed: false,
        }))
    }

    async fn stop(&self, container: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.call("stop", container)?;
        self.set_running(container, false);
        Ok(())
    }

    async fn kill(&self, container: &str) -> Result<(), RuntimeError> {
        self.call("kill", container)?;
        self.set_running(container, false);
        Ok(())
    }

    async fn remove_container(&self, container: &str) -> Result<(), RuntimeError> {
        self.call("remove_container", container)?;
        self.state.lock().unwrap().containers.remove(container);
        Ok(())
    }

    async fn rename_container(&self, container: &str, name: &str) -> Result<(), RuntimeError> {
        self.call("rename_container", container)?;
        if let Some(entry) = self.state.lock().unwrap().containers.get_mut(container) {
            entry.0 = name.to_owned();
        }
        Ok(())
    }

    async fn remove_network(&self, network: &str) -> Result<(), RuntimeError> {
        self.call("remove_network", network)?;
        let mut state = self.state.lock().unwrap();
        let found = state.networks.keys().find(|n| *n == network).cloned();
        if let Some(name) = found {
            state.networks.remove(&name);
        }
        Ok(())
    }

    async fn find_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<FoundContainer>, RuntimeError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .containers
            .iter()
            .filter(|(_, (_, l, _))| matches(l, labels))
            .map(|(id, (name, l, running))| FoundContainer {
                id: id.clone(),
                name: name.clone(),
                running: *running,
                labels: l.clone(),
            })
            .collect())
    }

    async fn find_networks(&self, labels: &[String]) -> Result<Vec<FoundNetwork>, RuntimeError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .networks
            .iter()
            .filter(|(_, l)| matches(l, labels))
            .map(|(name, l)| FoundNetwork {
                id: name.clone(),
                name: name.clone(),
                labels: l.clone(),
            })
            .collect())
    }

    async fn exec(
        &self,
        container: &str,
        spec: &super::ExecSpec,
    ) -> Result<super::Execution, StartError> {
        self.call("exec", &format!("{container} {}", spec.command.join(" ")))?;
        let command = self.state.lock().unwrap().command.clone();
        if let Some(command) = command {
            command(container);
        }
        Ok(super::Execution {
            id: format!("exec-{container}"),
            output: Box::pin(futures::stream::empty()),
            input: None,
        })
    }

    async fn exec_exit(&self, execution: &str) -> Result<i64, RuntimeError> {
        self.call("exec_exit", execution)?;
        Ok(self.state.lock().unwrap().exit.map_or(0, |e| e.code))
    }

    async fn resize_exec(
        &self,
        execution: &str,
        _rows: u16,
        _cols: u16,
    ) -> Result<(), RuntimeError> {
        self.call("resize_exec", execution)
    }

    async fn attach_interactive(
        &self,
        container: &str,
        _detach_keys: &str,
    ) -> Result<super::Attached, RuntimeError> {
        self.call("attach_interactive", container)?;
        Ok(super::Attached {
            output: Box::pin(futures::stream::empty()),
            input: Box::pin(tokio::io::sink()),
        })
    }

    async fn resize(&self, container: &str, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        self.call("resize", &format!("{container} {rows}x{cols}"))
    }

    async fn create_network(&self, spec: &super::NetworkSpec) -> Result<String, RuntimeError> {
        self.call("create_network", &spec.name)?;
        self.state
            .lock()
            .unwrap()
            .networks
            .insert(spec.name.clone(), spec.labels.clone());
        Ok(spec.name.clone())
    }

    async fn connect_network(
        &self,
        network: &str,
        container: &str,
        _aliases: &[String],
    ) -> Result<(), RuntimeError> {
        self.call("connect_network", &format!("{network} {container}"))
    }

    async fn create_container(&self, spec: &super::ContainerSpec) -> Result<String, RuntimeError> {
        self.call("create_container", &spec.name)?;
        Ok(self.add_container(&spec.name, &spec.labels))
    }

    async fn remove_volume(&self, volume: &str) -> Result<(), RuntimeError> {
        self.call("remove_volume", volume)
    }

    async fn find_volumes(&self, _labels: &[String]) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }

    async fn build_image(
        &self,
        spec: &super::BuildSpec,
        progress: &(dyn for<'line> Fn(&'line str) + Sync),
    ) -> Result<(), RuntimeError> {
        self.call("build_image", &spec.tag)?;
        progress("built");
        Ok(())
    }

    async fn exit_if_ended(&self, container: &str) -> Result<Option<Exit>, RuntimeError> {
        let state = self.state.lock().unwrap();
        let ended = state.containers.get(container).is_some_and(|c| !c.2);
        Ok(ended.then(|| {
            state.exit.unwrap_or(Exit {
                code: 0,
                oom_killed: false,
            })
        }))
    }

    async fn version(&self) -> Result<EngineVersion, RuntimeError> {
        self.call("version", "")?;
        let api = (self.state.lock().unwrap().api.clone()).unwrap_or_else(|| "1.41".into());
        Ok(EngineVersion {
            engine: "0.0-fake".into(),
            agreed: api.clone(),
            api,
        })
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.call("image_present", image)?;
        Ok(self.state.lock().unwrap().images.contains(image))
    }
}
