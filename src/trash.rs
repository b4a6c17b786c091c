//! Deleting what a finished task leaves, without making the user wait for it.
//!
//! Once a task's work is safe (imported, snapshot-committed), its worktree and git dirs are renamed
//! out of the way — one `rename` each, however many files `node_modules/` or `target/` hold. A
//! *manifest* in the state dir lists them (and any containers or networks left to remove); a process
//! in the background ([`purge`]) deletes what it lists and then the manifest. A purge cut short is
//! finished by the next one: `agentbox gc` purges every manifest it finds.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::git::TaskDirs;
use crate::runtime::Runtime;
use crate::state::StateDir;

/// What is left to delete of one finished task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub task: String,
    /// Stopped containers, by id.
    pub containers: Vec<String>,
    /// Networks of the task's own, removed after its containers.
    pub networks: Vec<String>,
    /// Directories renamed out of the way.
    pub paths: Vec<PathBuf>,
}

impl Manifest {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.networks.is_empty() && self.paths.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrashError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("trash manifest {} is damaged: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}-{}", std::process::id())
}

/// Renames the task's worktree (beside itself) and its git dirs (into the state dir's trash) out of
/// the way; returns where they went. What is already gone is skipped.
pub fn move_aside(dirs: &TaskDirs, state: &StateDir) -> Result<Vec<PathBuf>, TrashError> {
    let trash = state.trash_dir();
    std::fs::create_dir_all(&trash).map_err(|source| TrashError::Io {
        action: "create",
        path: trash.clone(),
        source,
    })?;
    let id = unique();
    let task = dirs.branch.trim_start_matches("agentbox/");
    let worktree_aside = dirs
        .worktree
        .parent()
        .map(|root| root.join(format!(".agentbox-trash-{task}-{id}")));
    let moves = [
        (&dirs.worktree, worktree_aside),
        (&dirs.git_dir, Some(trash.join(format!("{task}-{id}-git")))),
        (
            &dirs.scratch,
            Some(trash.join(format!("{task}-{id}-scratch"))),
        ),
    ];
    dirs.remove_alias();
    let mut moved = Vec::new();
    for (from, to) in moves {
        let Some(to) = to else { continue };
        match std::fs::rename(from, &to) {
            Ok(()) => moved.push(to),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TrashError::Io {
                    action: "move aside",
                    path: from.clone(),
                    source,
                });
            }
        }
    }
    Ok(moved)
}

/// Writes the manifest into the state dir's trash; returns its path.
pub fn write_manifest(state: &StateDir, manifest: &Manifest) -> Result<PathBuf, TrashError> {
    let trash = state.trash_dir();
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| TrashError::Io {
            action,
            path,
            source,
        }
    };
    std::fs::create_dir_all(&trash).map_err(io("create", &trash))?;
    let path = trash.join(format!("{}-{}.json", manifest.task, unique()));
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(manifest).expect("a manifest always serialises");
    std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("write", &path))?;
    Ok(path)
}

/// Every manifest left in the state dir's trash.
pub fn manifests(state: &StateDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state.trash_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    found.sort();
    found
}

/// Deletes what the manifest at `path` lists — containers, then networks, then directories — and
/// then the manifest. Safe to run twice at once: whatever is gone already is fine.
pub async fn purge(runtime: &dyn Runtime, path: &Path) -> Result<(), TrashError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(TrashError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| TrashError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    let removed = futures::future::join_all(
        manifest
            .containers
            .iter()
            .map(|id| runtime.remove_container(id)),
    )
    .await;
    // A network goes only once its containers are gone; if one could not be removed, the next
    // purge tries again.
    let containers_gone = removed.iter().all(Result::is_ok);
    let mut networks_gone = containers_gone;
    if containers_gone {
        for network in &manifest.networks {
            networks_gone &= runtime.remove_network(network).await.is_ok();
        }
    }
    let paths = manifest.paths.clone();
    tokio::task::spawn_blocking(move || {
        for dir in &paths {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(TrashError::Io {
                        action: "remove",
                        path: dir.clone(),
                        source,
                    });
                }
            }
            // The default worktree root goes with its last worktree (see TaskDirs::remove).
            if let Some(root) = dir.parent()
                && let Some(parent) = root.parent()
                && parent
                    .file_name()
                    .is_some_and(|n| n == crate::git::task_dirs::DEFAULT_WORKTREES_DIR)
                && std::fs::remove_dir(root).is_ok()
            {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    })
    .await
    .expect("removing directories does not panic")?;
    if networks_gone {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TrashError::Io {
                    action: "remove",
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(())
}
