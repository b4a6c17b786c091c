//! Deleting what a finished task leaves, without making the user wait for it.
//!
//! Once a task's work is safe (imported, snapshot-committed), its worktree and git dirs are renamed
//! out of the way — one `rename` each, however many files `node_modules/` or `target/` hold. A
//! *manifest* in the state dir lists them (and any containers or networks left to remove), written
//! before the first rename and locked until the last, so that whatever was moved is listed however
//! the teardown ends; a process in the background ([`purge`]) deletes what it lists and then the
//! manifest. A purge cut short is finished by the next one: `agentbox gc` purges every manifest it
//! finds.

use std::fs::{File, TryLockError};
use std::io::{self, Read, Write};
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

/// The name a stopped container of a finished task takes until the purge removes it (the `i`th of
/// those the teardown sets aside), so that its own name is free for a new run of the task.
pub fn aside_name(name: &str, i: usize) -> String {
    format!("{name}-trash-{}-{i}", unique())
}

/// A manifest in place whose renames may still be under way. It holds the manifest's lock until
/// they are done, so that a purge at the same time (`gc` from another shell) leaves the manifest
/// alone instead of finding nothing yet at the places it lists and dropping it.
#[derive(Debug)]
struct Pending {
    path: PathBuf,
    moves: Vec<(PathBuf, PathBuf)>,
    _lock: File,
}

impl Pending {
    fn carry_out(self) -> Result<PathBuf, TrashError> {
        for (from, to) in &self.moves {
            match std::fs::rename(from, to) {
                Ok(()) => {}
                // Gone already: nothing to delete there.
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
        Ok(self.path)
    }
}

/// Renames the task's worktree (beside itself) and its git dirs (into the state dir's trash) out of
/// the way, adding where they went to `manifest`, and returns the manifest's path (`None` when
/// there was nothing to list). The manifest is written *before* the first rename: a teardown that
/// dies in between leaves a manifest that lists a place nothing was moved to yet (the purge skips
/// it; the record, which says `removing-worktree`, has the directory removed where it is), never a
/// renamed directory that nothing lists.
pub fn move_aside(
    dirs: &TaskDirs,
    state: &StateDir,
    manifest: Manifest,
) -> Result<Option<PathBuf>, TrashError> {
    match intend(dirs, state, manifest)? {
        Some(pending) => pending.carry_out().map(Some),
        None => Ok(None),
    }
}

/// The first half of [`move_aside`]: the manifest with the places the directories that exist go
/// to, in place and locked.
fn intend(
    dirs: &TaskDirs,
    state: &StateDir,
    mut manifest: Manifest,
) -> Result<Option<Pending>, TrashError> {
    let trash = state.trash_dir();
    let id = unique();
    let task = dirs.branch.trim_start_matches("agentbox/");
    let worktree_aside = dirs
        .worktree
        .parent()
        .map(|root| root.join(format!(".agentbox-trash-{task}-{id}")));
    let moves: Vec<(PathBuf, PathBuf)> = [
        (&dirs.worktree, worktree_aside),
        (&dirs.git_dir, Some(trash.join(format!("{task}-{id}-git")))),
        (
            &dirs.scratch,
            Some(trash.join(format!("{task}-{id}-scratch"))),
        ),
    ]
    .into_iter()
    .filter_map(|(from, to)| Some((from.clone(), to?)))
    .filter(|(from, _)| std::fs::symlink_metadata(from).is_ok())
    .collect();
    dirs.remove_alias();
    manifest
        .paths
        .extend(moves.iter().map(|(_, to)| to.clone()));
    if manifest.is_empty() {
        return Ok(None);
    }
    let (path, lock) = write_locked(state, &manifest)?;
    Ok(Some(Pending {
        path,
        moves,
        _lock: lock,
    }))
}

/// Writes the manifest into the state dir's trash; returns its path.
pub fn write_manifest(state: &StateDir, manifest: &Manifest) -> Result<PathBuf, TrashError> {
    write_locked(state, manifest).map(|(path, _)| path)
}

/// Writes the manifest under a temporary name and renames it into place, so that a purge never
/// reads half of one; returns its path and the open file, locked.
fn write_locked(state: &StateDir, manifest: &Manifest) -> Result<(PathBuf, File), TrashError> {
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
    let tmp = path.with_extension(PENDING_EXTENSION);
    let bytes = serde_json::to_vec_pretty(manifest).expect("a manifest always serialises");
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("write", &tmp))?;
    file.lock().map_err(io("lock", &tmp))?;
    file.write_all(&bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("write", &path))?;
    Ok((path, file))
}

/// A manifest not yet renamed into place. One left behind was being written when its writer died,
/// before anything it lists was moved.
const PENDING_EXTENSION: &str = "json.tmp";

/// Every manifest left in the state dir's trash, and every one whose writer died before it was in
/// place.
pub fn manifests(state: &StateDir) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state.trash_dir()) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".json") || n.ends_with(PENDING_EXTENSION))
        })
        .collect();
    found.sort();
    found
}

/// The manifest at `path` with its lock, held until the purge is done; `None` when there is
/// nothing to purge there: it is gone, its writer is still renaming what it lists (and purges it
/// itself once done), another purge is at it, or it never got into place (then it is deleted: its
/// writer died before it moved anything).
fn open_unlocked(path: &Path) -> Result<Option<(Vec<u8>, File)>, TrashError> {
    let io = |action| {
        let path = path.to_owned();
        move |source| TrashError::Io {
            action,
            path,
            source,
        }
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io("read")(source)),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(source)) => return Err(io("lock")(source)),
    }
    if path.extension().is_some_and(|e| e == "tmp") {
        remove_if_there(path)?;
        return Ok(None);
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io("read"))?;
    Ok(Some((bytes, file)))
}

fn remove_if_there(path: &Path) -> Result<(), TrashError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TrashError::Io {
            action: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Deletes what the manifest at `path` lists — containers, then networks, then directories — and
/// then the manifest. Safe to run twice at once (the second finds the manifest locked and leaves
/// it to the first), and after a purge cut short: whatever is gone already is fine.
pub async fn purge(runtime: &dyn Runtime, path: &Path) -> Result<(), TrashError> {
    let owned = path.to_owned();
    let opened = tokio::task::spawn_blocking(move || open_unlocked(&owned))
        .await
        .expect("reading a manifest does not panic")?;
    let Some((bytes, _lock)) = opened else {
        return Ok(());
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
        remove_if_there(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Manifest, intend, manifests, move_aside, purge};
    use crate::git::TaskDirs;
    use crate::runtime::fake::FakeRuntime;
    use crate::state::StateDir;

    struct World {
        _tmp: tempfile::TempDir,
        state: StateDir,
        dirs: TaskDirs,
    }

    /// A finished task's worktree (in a default worktree root) and git dirs, each holding a file.
    fn world() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let state = StateDir::new(&root.join("state"), "repo-1");
        let dirs = TaskDirs {
            worktree: root.join(".agentbox-worktrees/repo/t"),
            git_dir: state.root().join("git/t"),
            scratch: state.root().join("scratch/t"),
            branch: "agentbox/t".into(),
            alias: None,
        };
        for dir in [&dirs.worktree, &dirs.git_dir, &dirs.scratch] {
            std::fs::create_dir_all(dir.join("node_modules/p")).unwrap();
            std::fs::write(dir.join("node_modules/p/index.js"), "x").unwrap();
        }
        World {
            _tmp: tmp,
            state,
            dirs,
        }
    }

    fn manifest_of(task: &str) -> Manifest {
        Manifest {
            task: task.into(),
            ..Manifest::default()
        }
    }

    fn read(path: &Path) -> Manifest {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn originals(w: &World) -> [&PathBuf; 3] {
        [&w.dirs.worktree, &w.dirs.git_dir, &w.dirs.scratch]
    }

    #[tokio::test]
    async fn what_is_moved_aside_is_listed_and_the_purge_deletes_it() {
        let w = world();
        let manifest = move_aside(&w.dirs, &w.state, manifest_of("t"))
            .unwrap()
            .expect("there was something to move");
        assert!(originals(&w).iter().all(|p| !p.exists()));
        let listed = read(&manifest);
        assert_eq!(listed.paths.len(), 3, "{listed:?}");
        assert!(listed.paths.iter().all(|p| p.is_dir()), "{listed:?}");

        purge(&FakeRuntime::default(), &manifest).await.unwrap();
        assert!(listed.paths.iter().all(|p| !p.exists()));
        assert!(!manifest.exists());
        assert!(
            !w.dirs.worktree.parent().unwrap().exists(),
            "the default worktree root goes with its last worktree"
        );
    }

    #[tokio::test]
    async fn a_teardown_that_dies_between_a_rename_and_the_next_leaves_nothing_unlisted() {
        let w = world();
        let pending = intend(&w.dirs, &w.state, manifest_of("t"))
            .unwrap()
            .unwrap();
        // The intent is in place before anything moves.
        let listed = read(&pending.path);
        assert_eq!(listed.paths.len(), 3, "{listed:?}");
        assert!(listed.paths.iter().all(|p| !p.exists()));
        // The worktree is renamed, and then the process dies: its lock goes with it.
        let (from, to) = pending.moves[0].clone();
        std::fs::rename(&from, &to).unwrap();
        let manifest = pending.path.clone();
        drop(pending);

        // gc purges every manifest it finds.
        for found in manifests(&w.state) {
            purge_until_gone(&found).await;
        }
        assert!(!to.exists(), "the renamed worktree was deleted");
        assert!(!manifest.exists());
        assert!(
            w.dirs.git_dir.is_dir() && w.dirs.scratch.is_dir(),
            "what was not moved yet stays where the task's record (removing-worktree) says"
        );
        assert_eq!(manifests(&w.state), Vec::<PathBuf>::new());
    }

    /// Purges until the manifest is gone. Its lock is an flock on its open file, which a child
    /// that another test of this process is spawning shares between its fork and its exec: a
    /// purge that finds it locked rightly leaves it to the next one.
    async fn purge_until_gone(manifest: &Path) {
        for _ in 0..500 {
            purge(&FakeRuntime::default(), manifest).await.unwrap();
            if !manifest.exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn a_purge_leaves_a_manifest_alone_while_its_renames_are_under_way() {
        let w = world();
        let pending = intend(&w.dirs, &w.state, manifest_of("t"))
            .unwrap()
            .unwrap();
        let manifest = pending.path.clone();
        purge(&FakeRuntime::default(), &manifest).await.unwrap();
        assert!(
            manifest.exists(),
            "nothing is at the listed places yet, and the manifest must stay for when there is"
        );

        pending.carry_out().unwrap();
        purge_until_gone(&manifest).await;
        assert!(!manifest.exists());
        assert!(read_dir_names(&w.state.trash_dir()).is_empty());
        assert!(originals(&w).iter().all(|p| !p.exists()));
    }

    #[tokio::test]
    async fn a_manifest_whose_writer_died_before_it_was_in_place_is_dropped() {
        let w = world();
        let trash = w.state.trash_dir();
        std::fs::create_dir_all(&trash).unwrap();
        // Cut off half-way through its bytes.
        let half = trash.join("t-1-1.json.tmp");
        std::fs::write(&half, "{\"task\": \"t\", \"paths\": [").unwrap();
        assert_eq!(manifests(&w.state), vec![half.clone()]);
        purge(&FakeRuntime::default(), &half).await.unwrap();
        assert!(!half.exists());
        assert!(
            originals(&w).iter().all(|p| p.is_dir()),
            "nothing was moved before the manifest was in place, and nothing else is touched"
        );
    }

    #[tokio::test]
    async fn a_network_stays_until_its_containers_are_gone() {
        let w = world();
        let fake = FakeRuntime::default();
        let manifest = super::write_manifest(
            &w.state,
            &Manifest {
                task: "t".into(),
                containers: vec!["c1".into(), "c2".into()],
                networks: vec!["n1".into()],
                paths: Vec::new(),
            },
        )
        .unwrap();
        fake.fail_on("remove_container");
        purge(&fake, &manifest).await.unwrap();
        assert!(
            !fake.calls().iter().any(|c| c.starts_with("remove_network")),
            "{:?}",
            fake.calls()
        );
        assert!(manifest.exists(), "the next purge tries again");
    }

    fn read_dir_names(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}
