//! The task's containers and networks: found by their labels, stopped, removed.

use super::{Problem, Run, StepKind};
use crate::runtime::{FoundContainer, FoundNetwork, REPO_LABEL, Runtime, TASK_LABEL};
use crate::task::{TaskName, TaskRecord};

/// What exists of a task in the engine.
#[derive(Debug, Default, Clone)]
pub struct Leftovers {
    pub containers: Vec<FoundContainer>,
    pub networks: Vec<FoundNetwork>,
    /// Named volumes made for the task (a compose file's), by name.
    pub volumes: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.networks.is_empty() && self.volumes.is_empty()
    }

    /// The task's containers and networks, by their labels: the task's, and the pool slot's it
    /// was made from.
    pub async fn find(
        runtime: &dyn Runtime,
        repo_id: &str,
        task: &TaskName,
        pool_slot: Option<&str>,
    ) -> Result<Self, crate::runtime::RuntimeError> {
        let mut found = Self::find_labelled(
            runtime,
            &[
                format!("{REPO_LABEL}={repo_id}"),
                format!("{TASK_LABEL}={task}"),
            ],
        )
        .await?;
        if let Some(slot) = pool_slot {
            let pooled = Self::find_labelled(
                runtime,
                &[
                    format!("{REPO_LABEL}={repo_id}"),
                    format!("{}={slot}", crate::pool::POOL_LABEL),
                ],
            )
            .await?;
            found.containers.extend(pooled.containers);
            found.networks.extend(pooled.networks);
            found.volumes.extend(pooled.volumes);
        }
        Ok(found)
    }

    async fn find_labelled(
        runtime: &dyn Runtime,
        labels: &[String],
    ) -> Result<Self, crate::runtime::RuntimeError> {
        let (containers, networks, volumes) = tokio::join!(
            runtime.find_containers(labels),
            runtime.find_networks(labels),
            runtime.find_volumes(labels)
        );
        Ok(Self {
            containers: containers?,
            networks: networks?,
            volumes: volumes?,
        })
    }
}

pub(super) type StepResult = (StepKind, String, Result<Option<String>, Problem>);

/// Removes the task's containers (or, keeping, leaves them stopped) and then its network; returns
/// the steps for the caller to report.
pub(super) async fn removal(
    runtime: &dyn Runtime,
    leftovers: &Leftovers,
    keep: bool,
    dry_run: bool,
) -> Vec<StepResult> {
    let mut steps = Vec::new();
    if keep {
        return steps;
    }
    let removed = futures::future::join_all(leftovers.containers.iter().map(|c| async move {
        let result = if dry_run {
            Ok(None)
        } else {
            runtime
                .remove_container(&c.id)
                .await
                .map(|()| None)
                .map_err(Problem::of)
        };
        (StepKind::RemoveContainer, c.name.clone(), result)
    }))
    .await;
    let containers_gone = removed.iter().all(|(_, _, r)| r.is_ok());
    steps.extend(removed);
    if containers_gone {
        for network in &leftovers.networks {
            let result = if dry_run {
                Ok(None)
            } else {
                runtime
                    .remove_network(&network.id)
                    .await
                    .map(|()| None)
                    .map_err(Problem::of)
            };
            steps.push((StepKind::RemoveNetwork, network.name.clone(), result));
        }
        for volume in &leftovers.volumes {
            let result = if dry_run {
                Ok(None)
            } else {
                runtime
                    .remove_volume(volume)
                    .await
                    .map(|()| None)
                    .map_err(Problem::of)
            };
            steps.push((StepKind::RemoveVolume, volume.clone(), result));
        }
    }
    steps
}

impl Run<'_> {
    /// Stops the task's containers that still run, and learns how the task's command ended when it
    /// ended while nobody waited for it. Returns whether none runs any more.
    pub(super) async fn stop_running(
        &mut self,
        record: &TaskRecord,
        containers: &[FoundContainer],
    ) -> bool {
        let dry_run = self.options.dry_run;
        let mut all_stopped = true;
        for container in containers {
            if container.running && !self.options.processes_gone.contains(&container.id) {
                let result = if dry_run {
                    Ok(None)
                } else {
                    self.runtime
                        .stop(&container.id, self.options.stop_timeout)
                        .await
                        .map(|()| None)
                        .map_err(Problem::of)
                };
                all_stopped &= self.step(StepKind::StopContainer, &container.name, result);
            } else if !dry_run
                && record.exit_code.is_none()
                && (record.container_name == container.name
                    || record.container_id.as_deref() == Some(&container.id))
            {
                // The command ended while nobody waited for it: its exit is the task's result. A
                // failure to read it loses only that number.
                self.out.exit = self
                    .runtime
                    .exit_if_ended(&container.id)
                    .await
                    .ok()
                    .flatten();
            }
        }
        all_stopped
    }
}

/// Gives the task's stopped containers names of the trash's, so that a new run of the task can
/// take their names at once while [`crate::trash::purge`] removes them later; one that cannot be
/// renamed is removed here (one that is gone already counts as removed). Returns the steps of
/// those removals.
pub(super) async fn set_aside(runtime: &dyn Runtime, leftovers: &Leftovers) -> Vec<StepResult> {
    let renamed = futures::future::join_all(leftovers.containers.iter().enumerate().map(
        |(i, c)| async move {
            let aside = crate::trash::aside_name(&c.name, i);
            match runtime.rename_container(&c.id, &aside).await {
                Ok(()) => None,
                Err(_) => {
                    let result = runtime
                        .remove_container(&c.id)
                        .await
                        .map(|()| None)
                        .map_err(Problem::of);
                    Some((StepKind::RemoveContainer, c.name.clone(), result))
                }
            }
        },
    ))
    .await;
    renamed.into_iter().flatten().collect()
}
