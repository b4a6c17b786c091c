//! What a dead supervisor may have left in the engine, for `agentbox gc` to find: networks by
//! their labels (as [`Engine::find`] finds containers) and the exit code of a container that ended
//! while nobody was waiting for it.

use std::collections::HashMap;

use bollard::models::ContainerStateStatusEnum;
use bollard::query_parameters::ListNetworksOptions;

use super::{DockerError, Engine, is_not_found};

/// A network found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundNetwork {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
}

impl Engine {
    /// Networks carrying every one of `labels` (`key=value` or `key`).
    pub async fn find_networks(&self, labels: &[String]) -> Result<Vec<FoundNetwork>, DockerError> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("label".to_owned(), labels.to_vec())])),
        };
        let found = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(DockerError::api(
                "listing networks labelled",
                &labels.join(","),
            ))?;
        Ok(found
            .into_iter()
            .map(|n| FoundNetwork {
                id: n.id.unwrap_or_default(),
                name: n.name.unwrap_or_default(),
                labels: n.labels.unwrap_or_default(),
            })
            .collect())
    }

    /// The exit code of a container that ran and ended; `None` while it runs, when it never
    /// started, or when it is gone.
    pub async fn exit_code_if_ended(&self, id: &str) -> Result<Option<i64>, DockerError> {
        let inspect = match self.docker.inspect_container(id, None).await {
            Ok(inspect) => inspect,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(DockerError::api("inspecting container", id)(e)),
        };
        let state = inspect.state.unwrap_or_default();
        Ok(match state.status {
            Some(ContainerStateStatusEnum::EXITED) => state.exit_code,
            _ => None,
        })
    }
}
