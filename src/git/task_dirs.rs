//! A task's git dirs: the one its container uses, and the one agentbox keeps for itself.
//!
//! - The **task git dir** (`<state>/git/<task>`) is a complete git dir of the task's own: its HEAD,
//!   index, refs (its branch `agentbox/<task>`, the repository's branches and tags as of the start,
//!   whatever else it creates), stash, logs and new objects. The repository's objects are borrowed
//!   through `objects/info/alternates` from a read-only mount. It is mounted into the task's
//!   container at its own path, with its `config` and `objects/info` read-only and `objects` a mount
//!   of its own (so neither can be renamed away and replaced), and the worktree's `.git` file points
//!   at it. Everything in it is the task's to write, so to the host it is data: agentbox reads refs
//!   and objects from it, never runs git with it.
//! - The **scratch git dir** (`<state>/scratch/<task>`) is never mounted anywhere. Its configuration
//!   and its indexes are agentbox's; host-side git that looks at the worktree (the snapshot, a live
//!   diff) runs with it, and the import serves the task's objects from it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::command::{Git, GuardedPaths};
use super::{GitError, Repo};
use crate::fs_guard::GuardedDir;
use crate::runtime::Mount;

/// The largest ref file or `packed-refs` agentbox reads from a task's git dir.
const REF_FILE_LIMIT: u64 = 64 << 20;

/// The directory beside a repository that holds its task worktrees by default.
pub const DEFAULT_WORKTREES_DIR: &str = ".agentbox-worktrees";

/// Most refs agentbox reads from a task's git dir.
pub const MAX_TASK_REFS: usize = 10_000;

/// Where one task's worktree and git dirs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDirs {
    pub worktree: PathBuf,
    /// Mounted into the task's container; the task writes it.
    pub git_dir: PathBuf,
    /// agentbox's own; never mounted.
    pub scratch: PathBuf,
    /// `agentbox/<task>`
    pub branch: String,
    /// A link at the task's usual worktree path, when its worktree is elsewhere (a task that took
    /// a pool slot keeps the slot's paths, where its container sees them).
    pub alias: Option<PathBuf>,
}

/// What the worktree was checked out at, and the index of that checkout (with its file stats, so
/// that a snapshot need not read every file again).
const START_COMMIT: &str = "start";
const START_INDEX: &str = "index.start";

impl TaskDirs {
    pub fn branch_ref(&self) -> String {
        format!("refs/heads/{}", self.branch)
    }

    /// Makes the task git dir and the scratch git dir, and the worktree directory with its `.git`
    /// file, for a branch that starts at `start` (or continues there). Nothing of them may exist.
    /// `exclude` names the files agentbox puts into the worktree (git inside ignores them).
    pub fn create(
        &self,
        repo: &Repo,
        start: gix::ObjectId,
        exclude: &[String],
    ) -> Result<(), GitError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| GitError::Io {
                action,
                path,
                source,
            }
        };
        let host_objects = repo.objects_dir();
        let t = &self.git_dir;
        for dir in [
            t.join("objects/info"),
            t.join("objects/pack"),
            t.join("refs/tags"),
            t.join("info"),
        ] {
            fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        let branch_file = t.join(self.branch_ref());
        if let Some(parent) = branch_file.parent() {
            fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let start_hex = start.to_string();
        let files: Vec<(PathBuf, String)> = vec![
            (t.join("HEAD"), format!("ref: {}\n", self.branch_ref())),
            (t.join("config"), task_config(repo)),
            (
                t.join("objects/info/alternates"),
                format!("{}\n", host_objects.display()),
            ),
            (branch_file, format!("{start_hex}\n")),
            (
                t.join("packed-refs"),
                packed_refs(&repo.refs_for_tasks(&self.branch_ref())?),
            ),
            (t.join("info/exclude"), excludes(exclude)),
        ];
        for (path, contents) in &files {
            write_new(path, contents.as_bytes()).map_err(io("write", path))?;
        }

        let s = &self.scratch;
        for dir in [
            s.join("objects/info"),
            s.join("diff-objects/info"),
            s.join("refs"),
            s.join("info"),
        ] {
            fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        let files: Vec<(PathBuf, String)> = vec![
            (s.join("HEAD"), format!("ref: {}\n", self.branch_ref())),
            (s.join("config"), SCRATCH_CONFIG.to_owned()),
            // The import serves the task's objects from here; the repository's are there for the
            // negotiation with the repository that fetches them.
            (
                s.join("objects/info/alternates"),
                format!(
                    "{}\n{}\n",
                    t.join("objects").display(),
                    host_objects.display()
                ),
            ),
            (
                s.join("diff-objects/info/alternates"),
                format!("{}\n", host_objects.display()),
            ),
            (s.join(START_COMMIT), format!("{start_hex}\n")),
            (s.join("info/exclude"), excludes(exclude)),
        ];
        for (path, contents) in &files {
            write_new(path, contents.as_bytes()).map_err(io("write", path))?;
        }

        // The worktree root goes with its last worktree, and the purge of a task that just ended
        // may remove it between the two steps here: then it is made again.
        let mut attempts = 0;
        loop {
            if let Some(root) = self.worktree.parent() {
                fs::create_dir_all(root).map_err(io("create", root))?;
            }
            match fs::create_dir(&self.worktree) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 10 => {
                    attempts += 1;
                }
                Err(e) => return Err(io("create", &self.worktree)(e)),
            }
        }
        let dot_git = self.worktree.join(".git");
        write_new(&dot_git, format!("gitdir: {}\n", t.display()).as_bytes())
            .map_err(io("write", &dot_git))
    }

    /// Checks out the branch into the worktree (the task git dir is still agentbox's alone: no task
    /// has run), with `workers` processes, and keeps the index of that checkout for later snapshots.
    pub async fn checkout(&self, repo: &Repo, workers: usize) -> Result<(), GitError> {
        let index = self.git_dir.join("index");
        let objects = self.git_dir.join("objects");
        let host_objects = repo.objects_dir();
        let alternates = [host_objects.as_path()];
        let git = Git::guarded(&GuardedPaths {
            git_dir: &self.git_dir,
            work_tree: &self.worktree,
            index: &index,
            objects: &objects,
            alternates: &alternates,
        })
        .with_config(format!("checkout.workers={workers}"));
        git.run(&["reset", "--hard", "--quiet"]).await?;
        let start_index = self.scratch.join(START_INDEX);
        fs::copy(&index, &start_index).map_err(|source| GitError::Io {
            action: "copy the index to",
            path: start_index,
            source,
        })?;
        Ok(())
    }

    /// Makes the dirs of a pool slot (no task has run in them) the dirs of a task's branch starting
    /// at `to`: the checkout moves from the slot's commit `from` to `to` writing only the files
    /// that differ, the git dir's branch and HEAD become `branch`'s, and its copy of the
    /// repository's refs is brought up to date. The dirs keep their paths (see [`crate::pool`]).
    pub async fn retarget(
        &self,
        repo: &Repo,
        branch: &str,
        from: gix::ObjectId,
        to: gix::ObjectId,
    ) -> Result<(), GitError> {
        let index = self.git_dir.join("index");
        if from != to {
            let objects = self.git_dir.join("objects");
            let host_objects = repo.objects_dir();
            let alternates = [host_objects.as_path()];
            let git = Git::guarded(&GuardedPaths {
                git_dir: &self.git_dir,
                work_tree: &self.worktree,
                index: &index,
                objects: &objects,
                alternates: &alternates,
            });
            git.run(&["read-tree", "-m", "-u", &from.to_string(), &to.to_string()])
                .await?;
            let start_index = self.scratch.join(START_INDEX);
            fs::copy(&index, &start_index).map_err(|source| GitError::Io {
                action: "copy the index to",
                path: start_index,
                source,
            })?;
        }
        let branch_ref = format!("refs/heads/{branch}");
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| GitError::Io {
                action,
                path,
                source,
            }
        };
        let refs = repo.refs_for_tasks(&branch_ref)?;
        let t = &self.git_dir;
        let new_ref = t.join(&branch_ref);
        if let Some(parent) = new_ref.parent() {
            fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let head = format!("ref: {branch_ref}\n");
        let files = [
            (new_ref, format!("{to}\n")),
            (t.join("HEAD"), head.clone()),
            (t.join("packed-refs"), packed_refs(&refs)),
            (self.scratch.join(START_COMMIT), format!("{to}\n")),
            (self.scratch.join("HEAD"), head),
        ];
        for (path, contents) in &files {
            fs::write(path, contents).map_err(io("write", path))?;
        }
        let old_ref = t.join(self.branch_ref());
        let _ = fs::remove_file(&old_ref);
        if let Some(parent) = old_ref.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// Moves the worktree and the git dirs to `to`'s paths.
    /// Makes the alias: a relative link to the worktree, beside it.
    pub fn link_alias(&self) -> Result<(), GitError> {
        let (Some(alias), Some(target)) = (&self.alias, self.worktree.file_name()) else {
            return Ok(());
        };
        std::os::unix::fs::symlink(target, alias).map_err(|source| GitError::Io {
            action: "link",
            path: alias.clone(),
            source,
        })
    }

    /// Removes the alias, if it is a link (anything else at its path is not agentbox's).
    pub fn remove_alias(&self) {
        if let Some(alias) = &self.alias
            && fs::symlink_metadata(alias).is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = fs::remove_file(alias);
        }
    }

    /// The commit the worktree was checked out at; `None` when the checkout never finished.
    pub fn start_commit(&self) -> Option<gix::ObjectId> {
        let text = fs::read_to_string(self.scratch.join(START_COMMIT)).ok()?;
        let index_there = self.scratch.join(START_INDEX).is_file();
        index_there.then(|| text.trim().parse().ok()).flatten()
    }

    pub fn start_index(&self) -> PathBuf {
        self.scratch.join(START_INDEX)
    }

    /// The bind mounts that give the task its worktree and its git dir, and the repository's objects
    /// read-only (with any object directories the repository itself borrows from).
    pub fn mounts(&self, repo: &Repo) -> Vec<Mount> {
        let t = &self.git_dir;
        let mut mounts = vec![
            Mount::same_path(&self.worktree, false),
            Mount::same_path(t, false),
            Mount::same_path(&t.join("config"), true),
            Mount::same_path(&t.join("objects"), false),
            Mount::same_path(&t.join("objects/info"), true),
            Mount::same_path(&repo.objects_dir(), true),
        ];
        mounts.extend(
            host_alternates(&repo.objects_dir())
                .into_iter()
                .map(|dir| Mount::same_path(&dir, true)),
        );
        mounts
    }

    /// The commit the task's branch points to in its own git dir, read as data: no symlink is
    /// followed, a FIFO is not opened for long, a symbolic ref or anything but a commit id is
    /// refused. `None` when the task deleted its branch.
    pub fn read_task_tip(&self) -> Result<Option<gix::ObjectId>, GitError> {
        let dir = GuardedDir::open(&self.git_dir)?;
        let loose = dir.read_file(Path::new(&self.branch_ref()), REF_FILE_LIMIT)?;
        if let Some(bytes) = loose {
            return parse_id(&bytes).map(Some).ok_or_else(|| {
                self.tampered(format!("{} does not hold a commit id", self.branch_ref()))
            });
        }
        let Some(packed) = dir.read_file(Path::new("packed-refs"), REF_FILE_LIMIT)? else {
            return Ok(None);
        };
        let wanted = self.branch_ref();
        for line in packed.split(|&b| b == b'\n') {
            let Some((id, name)) = split_once(line, b' ') else {
                continue;
            };
            if name == wanted.as_bytes() {
                return parse_id(id)
                    .map(Some)
                    .ok_or_else(|| self.tampered(format!("packed-refs names {wanted} badly")));
            }
        }
        Ok(None)
    }

    /// Every branch and the stash of the task's git dir (loose and packed), read as data without
    /// following anything; at most [`MAX_TASK_REFS`].
    pub fn read_task_refs(&self) -> Result<Vec<(String, gix::ObjectId)>, GitError> {
        let root = GuardedDir::open(&self.git_dir)?;
        let mut refs: std::collections::BTreeMap<String, gix::ObjectId> = Default::default();
        if let Some(packed) = root.read_file(Path::new("packed-refs"), REF_FILE_LIMIT)? {
            for line in packed.split(|&b| b == b'\n') {
                let Some((id, name)) = split_once(line, b' ') else {
                    continue;
                };
                if let (Some(id), Ok(name)) = (parse_id(id), std::str::from_utf8(name)) {
                    refs.insert(name.to_owned(), id);
                }
            }
        }
        let mut pending = vec![(
            "refs/heads".to_owned(),
            root.dir(Path::new("refs/heads"), false)?,
        )];
        if let Some(stash) = root.read_file(Path::new("refs/stash"), REF_FILE_LIMIT)?
            && let Some(id) = parse_id(&stash)
        {
            refs.insert("refs/stash".to_owned(), id);
        }
        while let Some((prefix, dir)) = pending.pop() {
            for (name, kind) in dir.entries()? {
                let Some(name) = name.to_str() else { continue };
                let full = format!("{prefix}/{name}");
                if refs.len() > MAX_TASK_REFS {
                    return Err(self.tampered(format!("it holds more than {MAX_TASK_REFS} refs")));
                }
                if kind == crate::fs_guard::FileType::Directory {
                    pending.push((full, dir.dir(Path::new(name), false)?));
                } else if kind == crate::fs_guard::FileType::RegularFile
                    && !name.ends_with(".lock")
                    && let Some(id) = dir
                        .read_file(Path::new(name), REF_FILE_LIMIT)?
                        .and_then(|bytes| parse_id(&bytes))
                {
                    refs.insert(full, id);
                }
            }
        }
        Ok(refs
            .into_iter()
            .filter(|(name, _)| name.starts_with("refs/heads/") || name == "refs/stash")
            .collect())
    }

    pub(super) fn tampered(&self, what: String) -> GitError {
        GitError::Tampered {
            task: self.branch.trim_start_matches("agentbox/").to_owned(),
            git_dir: self.git_dir.clone(),
            what,
        }
    }

    /// Removes the worktree, then the task git dir, then the scratch git dir. Nothing in them is
    /// followed (`remove_dir_all` does not follow symlinks). Whatever is already gone is fine.
    pub fn remove(&self) -> Result<(), GitError> {
        self.remove_alias();
        for dir in [&self.worktree, &self.git_dir, &self.scratch] {
            match fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(GitError::Io {
                        action: "remove",
                        path: dir.clone(),
                        source,
                    });
                }
            }
        }
        // The default worktree root (`.agentbox-worktrees/<repo>`) goes with its last worktree, and
        // `.agentbox-worktrees` with its last repository; a root the user chose stays. Removing a
        // directory that is not empty fails, which is the point.
        if let Some(root) = self.worktree.parent()
            && let Some(parent) = root.parent()
            && parent
                .file_name()
                .is_some_and(|n| n == DEFAULT_WORKTREES_DIR)
            && fs::remove_dir(root).is_ok()
        {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }
}

/// The task git dir's configuration: read-only to the task, so nothing it says can change how git
/// behaves there beyond what git's defaults and these lines allow.
fn task_config(repo: &Repo) -> String {
    let mut config = String::from(
        "# written by agentbox; read-only inside the task's container\n\
         [core]\n\
         \trepositoryformatversion = 0\n\
         \tfilemode = true\n\
         \tbare = false\n\
         \tlogallrefupdates = true\n\
         [gc]\n\
         \twriteCommitGraph = false\n\
         [fetch]\n\
         \twriteCommitGraph = false\n",
    );
    // The repository's own line-ending and case rules, so that the task sees its files as the
    // user does; nothing else of its configuration (remotes, credentials, tools) is passed on.
    for (key, value) in repo.portable_settings() {
        config.push_str(&format!("[core]\n\t{key} = {value}\n"));
    }
    config
}

const SCRATCH_CONFIG: &str = "# written by agentbox; never mounted into a container\n\
    [core]\n\
    \trepositoryformatversion = 0\n\
    \tbare = true\n\
    \tcommitGraph = false\n\
    \tmultiPackIndex = false\n\
    \tlogallrefupdates = false\n\
    [pack]\n\
    \tuseBitmaps = false\n\
    [uploadpack]\n\
    \tallowAnySHA1InWant = true\n\
    [gc]\n\
    \tauto = 0\n";

fn packed_refs(refs: &[(String, gix::ObjectId)]) -> String {
    let mut text = String::from("# pack-refs with: sorted \n");
    for (name, id) in refs {
        text.push_str(&format!("{id} {name}\n"));
    }
    text
}

fn excludes(paths: &[String]) -> String {
    let mut text = String::from("# files agentbox put into this worktree\n");
    for path in paths {
        text.push_str(&format!("/{path}\n"));
    }
    text
}

fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(contents)
}

/// The object directories the repository's own `objects/info/alternates` names.
fn host_alternates(objects: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string(objects.join("info/alternates")) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| objects.join(l).canonicalize().ok())
        .collect()
}

fn parse_id(bytes: &[u8]) -> Option<gix::ObjectId> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 40 {
        return None;
    }
    text.parse().ok()
}

fn split_once(line: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = line.iter().position(|&b| b == separator)?;
    Some((&line[..at], &line[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_strictly() {
        let id = "a".repeat(40);
        assert!(parse_id(format!("{id}\n").as_bytes()).is_some());
        assert!(parse_id(b"ref: refs/heads/main\n").is_none());
        assert!(parse_id(format!("{id}{id}").as_bytes()).is_none());
        assert!(parse_id(b"").is_none());
    }

    #[test]
    fn packed_refs_are_sorted_lines() {
        let one: gix::ObjectId = "1".repeat(40).parse().unwrap();
        let text = packed_refs(&[("refs/heads/main".into(), one)]);
        assert_eq!(
            text,
            format!("# pack-refs with: sorted \n{one} refs/heads/main\n")
        );
    }
}
