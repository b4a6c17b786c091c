//! The warm pool: sandboxes made ahead of time, so that a task's command runs moments after
//! `agentbox run` starts.
//!
//! # Theory of operation
//!
//! A *slot* is everything a cold start makes except what depends on the task's name: a worktree
//! checked out at the base tip, a task git dir and a scratch dir for it, host ports, the services
//! and, started and idle (`sleep`), the container with all its mounts. Slots are kept per *key* —
//! what decides how the container is made: image, user, limits, network, ports, services — and the
//! base they were checked out at. Each slot has a record (`<state>/pool/<id>.json`) and a lock; the
//! process making a slot holds the lock until the slot is `ready`, and whoever takes or removes a
//! slot takes the lock first, so a slot is never taken twice and a dead maker is recognised (`gc`).
//!
//! Taking a slot (from the supervisor) moves its checkout to the task's start commit (only the
//! files that differ are written), gives its git dir the task's branch, hands its ports to the
//! task, and the task's command then runs in the idle container with the task's environment
//! (`exec`). The task keeps the slot's directories, where its container sees them (a container's
//! mounts are fixed when it is made, and a path must mean the same inside and outside), and its
//! usual worktree path becomes a link to them. From there on it is an ordinary task: its record
//! names the slot, so the teardown and `gc` find the slot's paths and containers.
//!
//! A slot never serves two tasks: the container of a task goes with the task. The caller refills
//! the pool in the background. An idle pool costs nothing but memory: nothing polls it.

mod slot;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use slot::{collect_dead, fill, remove_slot, status};

use crate::runtime::ImageDefaults;
use crate::supervisor::RunRequest;

/// Label carrying the id of the pool slot a container or network was made for.
pub const POOL_LABEL: &str = "agentbox.pool";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pool slot record {} is damaged: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "tasks of this repository cannot come from the pool: {why}; they start cold (remove [pool] from agentbox.toml to say so once)"
    )]
    NotPoolable { why: String },
    #[error("making pool slot {slot}: {source}")]
    Making {
        slot: String,
        source: Box<crate::supervisor::RunError>,
    },
    #[error(transparent)]
    Git(#[from] crate::git::GitError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error(transparent)]
    Ports(#[from] crate::ports::PortError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Where a slot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// Being made; its maker holds the lock.
    Creating,
    /// Made, idle, waiting for a task.
    Ready,
    /// A task took it and is turning it into its own.
    Taken,
}

/// What agentbox knows of one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub id: String,
    pub state: SlotState,
    /// What decides how the container is made (see [`key`]).
    pub key: String,
    pub image: String,
    /// The base the slot was made for, as named (`main`), and the commit it is checked out at.
    pub base: String,
    pub base_commit: String,
    pub worktree: PathBuf,
    pub git_dir: PathBuf,
    pub scratch: PathBuf,
    /// The idle container, by id.
    pub container: Option<String>,
    pub container_name: String,
    /// Host ports reserved for the slot, by ledger name.
    pub ports: BTreeMap<String, u16>,
    /// What the image runs by default: the task's command is run as the container would have.
    pub image_defaults: ImageDefaults,
    pub created_at: SystemTime,
}

impl Slot {
    /// A record for slot `id` as far as its names and paths go, to remove what is left of it.
    pub fn placeholder(ws: &crate::workspace::Workspace, id: &str) -> Self {
        let dirs = ws.slot_dirs(id);
        Self {
            id: id.to_owned(),
            state: SlotState::Taken,
            key: String::new(),
            image: String::new(),
            base: String::new(),
            base_commit: String::new(),
            worktree: dirs.worktree,
            git_dir: dirs.git_dir,
            scratch: dirs.scratch,
            container: None,
            container_name: String::new(),
            ports: BTreeMap::new(),
            image_defaults: ImageDefaults::default(),
            created_at: SystemTime::now(),
        }
    }
}

/// The inputs that decide how a task's sandbox is made, as one string: a slot serves a request
/// whose key is the slot's. Everything else (the command, the environment, setup, copy, the base)
/// is given to the slot when it is taken.
pub fn key(request: &RunRequest) -> String {
    #[derive(Serialize)]
    struct Key<'a> {
        image: &'a str,
        user: &'a Option<String>,
        memory: Option<u64>,
        cpus: Option<u64>,
        pids: Option<u64>,
        network: String,
        ports: Vec<(&'a String, &'a u16)>,
        port_range: String,
        services: String,
        env_file: &'a str,
        labels: &'a [(String, String)],
    }
    let key = Key {
        image: &request.image,
        user: &request.user,
        memory: request.limits.memory_bytes,
        cpus: request.limits.nano_cpus,
        pids: request.limits.pids,
        network: format!("{:?}", request.network),
        ports: request.ports.iter().collect(),
        port_range: format!("{:?}", request.port_range),
        services: format!("{:?}", request.services),
        env_file: &request.env_file_name,
        labels: &request.labels,
    };
    serde_json::to_string(&key).expect("a key always serialises")
}

/// Why a request cannot be served from the pool, if it cannot: the services' environment would
/// have to name the task before it exists.
pub fn unpoolable(request: &RunRequest) -> Option<String> {
    let devcontainer = request.compose.is_some()
        || !request.mounts.is_empty()
        || request.workspace_folder.is_some()
        || !request.host_setup.is_empty()
        || !request.shell_env.is_empty()
        || !request.privileges.is_empty();
    if devcontainer {
        return Some(
            "its devcontainer.json asks for mounts, a workspace folder, host steps or services that a slot made ahead does not have".into(),
        );
    }
    for (service, spec) in &request.services {
        for (key, value) in &spec.env {
            if value.contains("${task}") || value.contains("${branch}") {
                return Some(format!(
                    "[services.{service}.env] {key} names the task (${{task}} or ${{branch}}), which a slot made ahead does not know"
                ));
            }
        }
    }
    None
}

pub(crate) use slot::{SlotClaim, claim_ready, forget, pool_owner};

/// Where a refill in the background (`agentbox pool fill` started by a run) leaves what it said:
/// nobody watches it, and a pool that stays empty should say why.
pub fn refill_log(ws: &crate::workspace::Workspace) -> PathBuf {
    ws.state.root().join("pool").join("refill.log")
}

/// The dirs of a slot, from its record.
pub(crate) fn slot_dirs_of(slot: &Slot) -> crate::git::TaskDirs {
    crate::git::TaskDirs {
        worktree: slot.worktree.clone(),
        git_dir: slot.git_dir.clone(),
        scratch: slot.scratch.clone(),
        branch: format!("agentbox-pool/{}", slot.id),
        alias: None,
    }
}
