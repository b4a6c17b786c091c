//! What a task left uncommitted, as one commit on its branch (the snapshot), or as a tree to compare
//! against (a running task's live diff).
//!
//! Both run git over the worktree through the scratch git dir ([`Git::guarded`]): agentbox's
//! configuration and an index of agentbox's own, started from the index of the checkout (so only
//! files whose stat changed are read again) and moved to the branch's current tip with
//! `read-tree --reset` (which keeps the stats of entries the tip did not change). `git add -A` then records the worktree as it is, minus agentbox's own files and
//! minus files too large to keep (a 3 GB sparse file is not read: its size says enough) and minus
//! repositories the task made inside its worktree (git would run a git in them, which obeys their
//! configuration). Those are *left out*, and the caller keeps the worktree so that nothing is lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::command::{Git, GuardedPaths};
use super::{GitError, Identity, Repo, TaskDirs};

/// A path the snapshot did not take; the worktree is kept instead, so that nothing is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOut {
    /// Relative to the worktree.
    pub path: String,
    pub size: u64,
    #[serde(default)]
    pub kind: LeftOutKind,
}

/// Why a path was left out of a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeftOutKind {
    /// A file larger than the limit.
    #[default]
    TooLarge,
    /// A repository of the task's own inside the worktree (or a path through a symlink where one
    /// was). Looking into it would make git start another git there, which obeys that
    /// repository's configuration: the task's filters and drivers, on the host.
    NestedRepository,
}

/// What a snapshot made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot commit, `None` when there was nothing to keep.
    pub commit: Option<String>,
    pub left_out: Vec<LeftOut>,
}

/// What to stage and how.
#[derive(Debug, Clone)]
pub struct Staging<'a> {
    /// Paths agentbox itself put into the worktree: never staged.
    pub own_files: &'a [String],
    /// Files larger than this are left out.
    pub max_file_size: u64,
}

/// The first line of every snapshot commit's message.
pub fn snapshot_subject(task: &str) -> String {
    format!("agentbox: snapshot of uncommitted work in task {task}")
}

/// Commits whatever the worktree holds beyond the branch's tip (which the import brought up to
/// date) as one commit on the branch, with hooks and signing off. Safe to repeat: a second run
/// finds nothing new and reports the snapshot the first one made.
pub async fn snapshot(
    repo: &Repo,
    dirs: &TaskDirs,
    task: &str,
    body: &str,
    identity: &Identity,
    staging: &Staging<'_>,
) -> Result<Snapshot, GitError> {
    let index = dirs.scratch.join("index.snapshot");
    let objects = repo.objects_dir();
    let git = Git::guarded(&GuardedPaths {
        git_dir: &dirs.scratch,
        work_tree: &dirs.worktree,
        index: &index,
        objects: &objects,
        alternates: &[],
    });
    let (tip, tree, left_out) = stage(repo, dirs, &git, &index, staging).await?;
    let tip_hex = tip.to_string();
    let (tip_tree, subject) = repo.tree_and_subject(tip)?;
    if tree.parse::<gix::ObjectId>().ok() == Some(tip_tree) {
        // Nothing new; a tip that is already a snapshot of this worktree was made by an earlier,
        // interrupted teardown.
        let earlier = subject == snapshot_subject(task) && Some(tip) != dirs.start_commit();
        return Ok(Snapshot {
            commit: earlier.then_some(tip_hex),
            left_out,
        });
    }
    let message = format!("{}\n\n{body}", snapshot_subject(task));
    let commit = git
        .clone()
        .with_env("GIT_AUTHOR_NAME", &identity.name)
        .with_env("GIT_AUTHOR_EMAIL", &identity.email)
        .with_env("GIT_COMMITTER_NAME", &identity.name)
        .with_env("GIT_COMMITTER_EMAIL", &identity.email)
        .run(&[
            "commit-tree",
            "--no-gpg-sign",
            &tree,
            "-p",
            &tip_hex,
            "-m",
            &message,
        ])
        .await?
        .text();
    repo.git()
        .run(&[
            "update-ref",
            "--create-reflog",
            "-m",
            &snapshot_subject(task),
            &dirs.branch_ref(),
            &commit,
            &tip_hex,
        ])
        .await?;
    Ok(Snapshot {
        commit: Some(commit),
        left_out,
    })
}

/// Where the objects of a live tree go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveObjects {
    /// The scratch git dir's `diff-objects`, which borrows the repository's objects: nothing of
    /// the repository changes (a diff, a conflict prediction).
    Scratch,
    /// The repository's own object directory, as a snapshot's: for work that will be kept there.
    Repository,
}

/// The worktree of a task as it is now, committed or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTree {
    /// The tip of the task's branch the tree was staged on top of.
    pub tip: gix::ObjectId,
    pub tree: gix::ObjectId,
    /// Where the tree's new objects are (it borrows the repository's objects).
    pub objects: PathBuf,
    /// Files too large to take, left out of the tree.
    pub left_out: Vec<LeftOut>,
}

/// The worktree as it is now (committed or not) as a tree, without touching the task's git dir,
/// its worktree or (with [`LiveObjects::Scratch`]) the repository. Git runs with agentbox's
/// scratch git dir, never the task's.
pub async fn live_tree(
    repo: &Repo,
    dirs: &TaskDirs,
    staging: &Staging<'_>,
    into: LiveObjects,
) -> Result<LiveTree, GitError> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let index = dirs
        .scratch
        .join(format!("index.live-{}-{call}", std::process::id()));
    let host_objects = repo.objects_dir();
    let (objects, alternates) = match into {
        LiveObjects::Scratch => (
            dirs.scratch.join("diff-objects"),
            vec![host_objects.as_path()],
        ),
        LiveObjects::Repository => (host_objects.clone(), Vec::new()),
    };
    let git = Git::guarded(&GuardedPaths {
        git_dir: &dirs.scratch,
        work_tree: &dirs.worktree,
        index: &index,
        objects: &objects,
        alternates: &alternates,
    });
    let staged = stage(repo, dirs, &git, &index, staging).await;
    let _ = std::fs::remove_file(&index);
    let (tip, tree, left_out) = staged?;
    let tree = tree.parse().map_err(|_| GitError::Read {
        what: format!("the live tree of {}", dirs.branch),
        repo: repo.repo_dir.clone(),
        reason: format!("`git write-tree` printed {tree:?}"),
    })?;
    Ok(LiveTree {
        tip,
        tree,
        objects,
        left_out,
    })
}

/// The diff of the worktree as it is now (committed or not) against `base`, without touching the
/// repository: the objects this writes go into the scratch git dir.
pub async fn live_diff(
    repo: &Repo,
    dirs: &TaskDirs,
    base: &str,
    stat: bool,
    staging: &Staging<'_>,
) -> Result<Vec<u8>, GitError> {
    let live = live_tree(repo, dirs, staging, LiveObjects::Scratch).await?;
    let host_objects = repo.objects_dir();
    let alternates = [host_objects.as_path()];
    let git = Git::isolated(&dirs.scratch, &live.objects, &alternates);
    let mut args = vec!["diff", "--no-color", "--no-ext-diff", "--no-textconv"];
    if stat {
        args.push("--stat");
    }
    let tree = live.tree.to_string();
    args.extend([base, tree.as_str()]);
    Ok(git.run(&args).await?.stdout)
}

/// Stages the worktree into `index` and writes its tree. Returns the tip it started from, the tree
/// and what was left out.
async fn stage(
    repo: &Repo,
    dirs: &TaskDirs,
    git: &Git,
    index: &Path,
    staging: &Staging<'_>,
) -> Result<(gix::ObjectId, String, Vec<LeftOut>), GitError> {
    if !dirs.worktree.is_dir() {
        return Err(GitError::Io {
            action: "find the worktree",
            path: dirs.worktree.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let start = dirs.start_commit();
    let tip = match (repo.branch_tip(&dirs.branch)?, start) {
        (Some(tip), _) => tip,
        (None, Some(start)) => start,
        (None, None) => {
            return Err(GitError::Read {
                what: format!("branch {}", dirs.branch),
                repo: repo.repo_dir.clone(),
                reason: "it does not exist and the worktree's checkout never finished".into(),
            });
        }
    };
    let tip_hex = tip.to_string();
    if start.is_some() {
        std::fs::copy(dirs.start_index(), index).map_err(|source| GitError::Io {
            action: "copy the index to",
            path: index.to_owned(),
            source,
        })?;
    }
    // The index becomes the tip's tree; entries the tip did not change keep the stats of the
    // checkout, so `git add` reads only the files whose stats changed since.
    if start != Some(tip) {
        git.run(&["read-tree", "--reset", &tip_hex]).await?;
    }

    let changes = large_changes(git, &dirs.worktree, staging.max_file_size).await?;
    let (mut left_out, untracked_dirs) = (changes.left_out, changes.untracked_dirs);
    let (worktree, index_path) = (dirs.worktree.clone(), index.to_owned());
    let (nested, has_gitlinks) = tokio::task::spawn_blocking(move || {
        let mut candidates = gitlinks(&index_path)?;
        let has_gitlinks = !candidates.is_empty();
        candidates.extend(untracked_dirs);
        Ok::<_, GitError>((nested_repositories(&worktree, candidates), has_gitlinks))
    })
    .await
    .expect("looking for nested repositories does not panic")?;
    left_out.extend(nested);
    // Nothing untracked and nothing changed against the index, which is the tip's tree: the
    // worktree is the tip, and `git add` and `write-tree` would only say so. (A submodule's
    // entry is one git lists neither way, so with one the long way is taken.)
    if changes.none_listed && !has_gitlinks {
        let (tree, _) = repo.tree_and_subject(tip)?;
        return Ok((tip, tree.to_string(), left_out));
    }

    let excludes: Vec<String> = left_out
        .iter()
        .map(|l| format!(":(top,exclude,literal){}", l.path))
        .collect();
    let mut add = vec!["add", "--all", "--", ":(top)"];
    add.extend(excludes.iter().map(String::as_str));
    git.run(&add).await?;
    let index_path = index.to_owned();
    let own = staging.own_files.to_vec();
    let own_staged = tokio::task::spawn_blocking(move || {
        index_stats(&index_path).map(|entries| own.iter().any(|f| entries.contains_key(f)))
    })
    .await
    .expect("reading an index does not panic")?;
    if own_staged {
        // agentbox's own files go back to what the branch has (usually: nothing), even if the task
        // made them tracked files. (Naming ignored paths in `git add`, even to exclude them, is an
        // error, so they are put back after.)
        let mut reset = vec!["reset", "--quiet", tip_hex.as_str(), "--"];
        reset.extend(staging.own_files.iter().map(String::as_str));
        git.run(&reset).await?;
    }
    let tree = git.run(&["write-tree"]).await?.text();
    Ok((tip, tree, left_out))
}

/// The files `git add -A` would take that are larger than `limit`: untracked ones git does not
/// ignore, and tracked ones whose stat changed. git lists them (without descending into ignored
/// directories, so 50,000 files under `node_modules/` cost nothing); their sizes come from `lstat`,
/// and none is read. Also returns the untracked directories git lists as a whole (`dir/`): git
/// does that for a repository inside the worktree. Submodules are not looked into (git would
/// start a git inside them).
async fn large_changes(git: &Git, worktree: &Path, limit: u64) -> Result<Changes, GitError> {
    let (others, modified) = tokio::join!(
        git.run(&["ls-files", "-z", "--others", "--exclude-standard"]),
        git.run(&["diff-files", "-z", "--name-only", "--ignore-submodules=all"])
    );
    let (others, modified) = (others?, modified?);
    let none_listed = others.stdout.is_empty() && modified.stdout.is_empty();
    let worktree = worktree.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        let mut untracked_dirs = Vec::new();
        let mut left_out: Vec<LeftOut> = others
            .stdout
            .split(|&b| b == 0)
            .chain(modified.stdout.split(|&b| b == 0))
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let path = String::from_utf8_lossy(p).into_owned();
                if let Some(dir) = path.strip_suffix('/') {
                    untracked_dirs.push(dir.to_owned());
                    return None;
                }
                let meta = std::fs::symlink_metadata(worktree.join(&path)).ok()?;
                (meta.is_file() && meta.len() > limit).then_some(LeftOut {
                    path,
                    size: meta.len(),
                    kind: LeftOutKind::TooLarge,
                })
            })
            .collect();
        left_out.sort_by(|a, b| a.path.cmp(&b.path));
        left_out.dedup();
        Changes {
            left_out,
            untracked_dirs,
            none_listed,
        }
    })
    .await
    .expect("looking at file sizes does not panic");
    Ok(found)
}

/// What [`large_changes`] found.
struct Changes {
    left_out: Vec<LeftOut>,
    untracked_dirs: Vec<String>,
    /// git listed no untracked file and no tracked file changed.
    none_listed: bool,
}

/// Paths of the submodule entries (gitlinks) of an index.
fn gitlinks(index: &Path) -> Result<Vec<String>, GitError> {
    let file = read_index(index)?;
    Ok(file
        .entries()
        .iter()
        .filter(|entry| entry.mode == gix::index::entry::Mode::COMMIT)
        .map(|entry| entry.path(&file).to_string())
        .collect())
}

/// Which of `candidates` (gitlinks, untracked directories) are repositories in the worktree that
/// git would look into by starting another git there, or lie behind a symlink: left out, with
/// everything below them.
fn nested_repositories(worktree: &Path, candidates: Vec<String>) -> Vec<LeftOut> {
    let mut nested: Vec<LeftOut> = candidates
        .into_iter()
        .filter(|path| {
            let mut at = worktree.to_owned();
            for part in Path::new(path).components() {
                at.push(part);
                match std::fs::symlink_metadata(&at) {
                    Ok(meta) if meta.file_type().is_symlink() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            std::fs::symlink_metadata(at.join(".git")).is_ok()
        })
        .map(|path| LeftOut {
            path,
            size: 0,
            kind: LeftOutKind::NestedRepository,
        })
        .collect();
    nested.sort_by(|a, b| a.path.cmp(&b.path));
    nested.dedup();
    nested
}

fn read_index(index: &Path) -> Result<gix::index::File, GitError> {
    gix::index::File::at(
        index,
        gix::hash::Kind::Sha1,
        true,
        gix::index::decode::Options::default(),
    )
    .map_err(|e| GitError::Io {
        action: "read the index",
        path: index.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Path -> (size, mtime seconds, mtime nanoseconds) of every entry of an index agentbox wrote.
fn index_stats(index: &Path) -> Result<HashMap<String, (u32, u32, u32)>, GitError> {
    let file = read_index(index)?;
    Ok(file
        .entries()
        .iter()
        .map(|entry| {
            let path = entry.path(&file).to_string();
            let stat = entry.stat;
            (path, (stat.size, stat.mtime.secs, stat.mtime.nsecs))
        })
        .collect())
}
