//! Bringing a task's branch from its own git dir into the repository's `agentbox/<task>`.
//!
//! The repository fetches the task's tip from the scratch git dir, whose alternates lend it the
//! task's objects: `git fetch` with fsck checks every object it receives and that the history is
//! complete, exactly as it would for a push from a stranger, and `git upload-pack` runs with the
//! scratch dir's configuration (agentbox's), never the task's. Before that, the task's object
//! directory is looked over: anything but directories and regular files (a symlink to a host file,
//! a FIFO that would hang the reader), or more than the limits, and the import is refused.
//!
//! No commit is ever lost: a branch that moved forward is fast-forwarded; one the task rewrote is
//! replaced in one transaction that also keeps the old tip as
//! `refs/agentbox/<task>/previous/<n>` (and in the branch's reflog).

use std::path::Path;

use super::command::Git;
use super::{GitError, Repo, TaskDirs};

/// Most entries agentbox walks in a task's object directory before refusing to import it.
pub const MAX_OBJECT_FILES: usize = 200_000;
/// Most bytes a task's object directory may hold for agentbox to import from it.
pub const MAX_OBJECT_BYTES: u64 = 8 << 30;

const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// What an import did to the repository's branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// The branch already pointed at the task's tip (or the task has no branch any more).
    Unchanged,
    Created {
        tip: String,
    },
    FastForward {
        from: String,
        to: String,
    },
    /// The task rewrote its history; the old tip is kept under `kept_as`.
    Rewritten {
        from: String,
        to: String,
        kept_as: String,
    },
}

/// Imports the task's branch; see the module documentation.
pub async fn import(repo: &Repo, dirs: &TaskDirs, task: &str) -> Result<Imported, GitError> {
    let Some(tip) = dirs.read_task_tip()? else {
        return Ok(Imported::Unchanged);
    };
    let branch_ref = dirs.branch_ref();
    let current = repo.branch_tip(&dirs.branch)?;
    if current == Some(tip) {
        return Ok(Imported::Unchanged);
    }
    if !repo.has_object(tip) {
        fetch(repo, dirs, std::iter::once(tip)).await?;
    }
    let tip_hex = tip.to_string();
    match repo.object_kind(tip) {
        Some(gix::object::Kind::Commit) => {}
        Some(kind) => {
            return Err(dirs.tampered(format!("its branch points at a {kind}, not a commit")));
        }
        None => {
            return Err(dirs.tampered(format!(
                "its branch points at {tip_hex}, which the import did not bring"
            )));
        }
    }
    let message = format!("agentbox: import of task {task}");
    let git = repo.git();
    let outcome = match current {
        None => {
            git.run(&[
                "update-ref",
                "--create-reflog",
                "-m",
                &message,
                &branch_ref,
                &tip_hex,
                ZERO_ID,
            ])
            .await?;
            Imported::Created { tip: tip_hex }
        }
        Some(from) if repo.is_ancestor(from, tip)? => {
            let from = from.to_string();
            git.run(&[
                "update-ref",
                "--create-reflog",
                "-m",
                &message,
                &branch_ref,
                &tip_hex,
                &from,
            ])
            .await?;
            Imported::FastForward { from, to: tip_hex }
        }
        Some(from) => {
            let from = from.to_string();
            let kept_as = next_previous_ref(repo, task)?;
            // One transaction: both refs change, or neither.
            let transaction =
                format!("create {kept_as} {from}\nupdate {branch_ref} {tip_hex} {from}\n");
            let message =
                format!("agentbox: task {task} rewrote its branch; the old tip is {kept_as}");
            git.run_with_input(
                &["update-ref", "--create-reflog", "-m", &message, "--stdin"],
                Some(transaction.as_bytes()),
            )
            .await?;
            Imported::Rewritten {
                from,
                to: tip_hex,
                kept_as,
            }
        }
    };
    Ok(outcome)
}

/// Keeps what the task holds beyond its branch — other branches it made, its stash — as
/// `refs/agentbox/<task>/heads/<name>` and `refs/agentbox/<task>/stash`, so that nothing it wrote
/// is lost when its git dir goes. Refs whose commit the repository already has (the task's copy of
/// `main`, say) are not kept again. Returns the refs made.
pub async fn import_the_rest(
    repo: &Repo,
    dirs: &TaskDirs,
    task: &str,
) -> Result<Vec<String>, GitError> {
    let branch_ref = dirs.branch_ref();
    let wanted: Vec<(String, gix::ObjectId)> = dirs
        .read_task_refs()?
        .into_iter()
        .filter(|(name, id)| *name != branch_ref && !repo.has_object(*id))
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    fetch(repo, dirs, wanted.iter().map(|(_, id)| *id)).await?;
    let mut transaction = String::new();
    let mut made = Vec::new();
    for (name, id) in &wanted {
        let kind = repo
            .git()
            .run(&["cat-file", "-t", &id.to_string()])
            .await?
            .text();
        if kind != "commit" {
            return Err(dirs.tampered(format!("{name} points at a {kind}, not a commit")));
        }
        let kept = match name.strip_prefix("refs/heads/") {
            Some(branch) => format!("refs/agentbox/{task}/heads/{branch}"),
            None => format!("refs/agentbox/{task}/stash"),
        };
        transaction.push_str(&format!("update {kept} {id}\n"));
        made.push(kept);
    }
    let message = format!("agentbox: kept from the git dir of task {task}");
    repo.git()
        .run_with_input(
            &["update-ref", "--create-reflog", "-m", &message, "--stdin"],
            Some(transaction.as_bytes()),
        )
        .await?;
    Ok(made)
}

/// Fetches commits from the task's git dir into the repository, with fsck, after looking over the
/// task's object directory.
async fn fetch(
    repo: &Repo,
    dirs: &TaskDirs,
    ids: impl Iterator<Item = gix::ObjectId>,
) -> Result<(), GitError> {
    let git_dir = dirs.git_dir.clone();
    let scan = tokio::task::spawn_blocking(move || scan_objects(&git_dir.join("objects")))
        .await
        .expect("scanning a directory does not panic");
    if let Err(what) = scan {
        return Err(dirs.tampered(what));
    }
    let scratch = dirs.scratch.display().to_string();
    let ids: Vec<String> = ids.map(|id| id.to_string()).collect();
    let mut args = vec![
        "fetch",
        "--quiet",
        "--no-tags",
        "--no-write-fetch-head",
        "--no-recurse-submodules",
        "--no-auto-gc",
        scratch.as_str(),
    ];
    args.extend(ids.iter().map(String::as_str));
    Git::untrusted_data(&repo.repo_dir)
        .with_config("fetch.fsckObjects=true")
        .with_config("transfer.fsckObjects=true")
        .with_config("protocol.file.allow=always")
        .with_config("fetch.writeCommitGraph=false")
        .run(&args)
        .await
        .map(drop)
}

/// `refs/agentbox/<task>/previous/<n>` with the next free `n`.
fn next_previous_ref(repo: &Repo, task: &str) -> Result<String, GitError> {
    let prefix = format!("refs/agentbox/{task}/previous/");
    let highest = repo
        .ref_names(&prefix)?
        .iter()
        .filter_map(|name| name.strip_prefix(&prefix)?.parse::<u64>().ok())
        .max();
    Ok(format!("{prefix}{}", highest.map_or(1, |n| n + 1)))
}

/// Looks over a task's object directory without following anything in it: only directories and
/// regular files, within the limits. Returns what is wrong.
pub fn scan_objects(objects: &Path) -> Result<(), String> {
    let mut pending = vec![objects.to_owned()];
    let (mut files, mut bytes) = (0usize, 0u64);
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
            files += 1;
            if files > MAX_OBJECT_FILES {
                return Err(format!(
                    "its object directory holds more than {MAX_OBJECT_FILES} entries"
                ));
            }
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                bytes += meta.len();
                if bytes > MAX_OBJECT_BYTES {
                    return Err(format!(
                        "its object directory holds more than {} GiB",
                        MAX_OBJECT_BYTES >> 30
                    ));
                }
            } else {
                let kind = if meta.file_type().is_symlink() {
                    "a symlink"
                } else {
                    "neither a file nor a directory"
                };
                return Err(format!("{} is {kind}", path.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_scan_refuses_symlinks_and_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        std::fs::create_dir_all(objects.join("ab")).unwrap();
        std::fs::write(objects.join("ab/cdef"), b"x").unwrap();
        assert_eq!(scan_objects(&objects), Ok(()));
        std::os::unix::fs::symlink("/etc/passwd", objects.join("ab/link")).unwrap();
        let err = scan_objects(&objects).unwrap_err();
        assert!(err.contains("is a symlink"), "{err}");
        std::fs::remove_file(objects.join("ab/link")).unwrap();
        let fifo = objects.join("pack");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = scan_objects(&objects).unwrap_err();
        assert!(err.contains("neither a file nor a directory"), "{err}");
    }
}
