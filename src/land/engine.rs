//! Merges, picks and commits computed on objects alone, in a bare git dir agentbox makes for one
//! operation (`<state>/land/<pid>-<n>`) and removes when the operation is done.
//!
//! That git dir holds nothing but agentbox's configuration: no merge, diff or filter driver is
//! configured, so whatever a `.gitattributes` says selects one of git's built-in behaviours at
//! most; no system or global configuration is read ([`Git::isolated`]); hooks are off; nothing is
//! ever checked out. Attributes come from the tree set with [`Engine::attributes_from`] (the
//! target's tip) and from nowhere else.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::LandError;
use crate::git::{Git, GitError, Identity};
use crate::workspace::Workspace;

/// git's empty tree, which every repository has without storing it.
pub const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

const ENGINE_CONFIG: &str = "# written by agentbox for one merge; never mounted into a container\n\
    [core]\n\
    \trepositoryformatversion = 0\n\
    \tbare = true\n\
    \tcommitGraph = false\n\
    \tlogallrefupdates = false\n\
    [gc]\n\
    \tauto = 0\n";

/// Where the objects the engine writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The repository's object directory: for results that will land.
    Repository,
    /// A directory of the engine's own, gone with it: for predictions and reviews.
    Scratch,
}

/// The merge of two commits: the tree it gives and the files that conflict (none: a clean merge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub tree: gix::ObjectId,
    pub conflicts: Vec<String>,
}

/// Who and when, as `git commit-tree` takes it from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    pub email: String,
    /// git's internal form, `<seconds> <offset>`; `None` is now.
    pub date: Option<String>,
}

/// One operation's git dir; see the module documentation.
#[derive(Debug)]
pub struct Engine {
    dir: PathBuf,
    objects: PathBuf,
    alternates: Vec<PathBuf>,
    attr_source: Option<String>,
    committer: Identity,
    /// Run with the repository's configuration instead (`--merge-drivers`).
    repository_config: Option<PathBuf>,
}

impl Engine {
    pub fn new(ws: &Workspace, store: Store) -> Result<Self, LandError> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = ws
            .state
            .root()
            .join("land")
            .join(format!("{}-{n}", std::process::id()));
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| LandError::Io {
                action,
                path,
                source,
            }
        };
        // Left over by a process of the same pid that died: nobody uses it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        for sub in ["objects/info", "objects/pack", "refs"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io("create", &path))?;
        }
        for (name, contents) in [
            ("HEAD", "ref: refs/heads/none\n"),
            ("config", ENGINE_CONFIG),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, contents).map_err(io("write", &path))?;
        }
        let repo_objects = ws.repo.objects_dir();
        let (objects, alternates) = match store {
            Store::Repository => (repo_objects, Vec::new()),
            Store::Scratch => (dir.join("objects"), vec![repo_objects]),
        };
        Ok(Self {
            dir,
            objects,
            alternates,
            attr_source: None,
            committer: ws.repo.identity().unwrap_or_else(Identity::fallback),
            repository_config: None,
        })
    }

    /// Reads `.gitattributes` from `tree` (the target's tip).
    pub fn attributes_from(mut self, tree: gix::ObjectId) -> Self {
        self.attr_source = Some(tree.to_string());
        self
    }

    /// Also reads objects from `dir` (a running task's live tree).
    pub fn borrow_objects(&mut self, dir: PathBuf) {
        if !self.alternates.contains(&dir) {
            self.alternates.push(dir);
        }
    }

    /// Computes merges with the repository's own configuration, so its `merge.<name>.driver`
    /// commands run for the files the target's attributes give them (`--merge-drivers`). Objects
    /// then go to the repository.
    pub fn with_repository_config(mut self, repo_dir: &Path) -> Self {
        self.repository_config = Some(repo_dir.to_owned());
        self
    }

    /// git for this engine.
    pub fn git(&self) -> Git {
        let git = match &self.repository_config {
            Some(repo_dir) => Git::host(repo_dir),
            None => {
                let alternates: Vec<&Path> = self.alternates.iter().map(PathBuf::as_path).collect();
                Git::isolated(&self.dir, &self.objects, &alternates)
            }
        };
        match &self.attr_source {
            Some(tree) => git.with_attr_source(tree),
            None => git,
        }
    }

    /// Merges `theirs` into `ours` (commits; their merge base is found).
    pub async fn merge(&self, ours: &str, theirs: &str) -> Result<Merged, LandError> {
        self.merge_tree(&[ours, theirs]).await
    }

    /// Applies what `commit` changed against `parent` onto `onto`: a cherry-pick, as a tree.
    pub async fn pick(&self, onto: &str, commit: &str, parent: &str) -> Result<Merged, LandError> {
        let base = format!("--merge-base={parent}");
        self.merge_tree(&[&base, onto, commit]).await
    }

    async fn merge_tree(&self, args: &[&str]) -> Result<Merged, LandError> {
        let mut all = vec![
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            "-z",
            "--allow-unrelated-histories",
        ];
        all.extend(args);
        let out = self.git().run_unchecked(&all, None).await?;
        if !matches!(out.code, Some(0 | 1)) {
            return Err(self.failed(&all, out.stderr));
        }
        let mut fields = out.stdout.split(|&b| b == 0);
        let tree = parse_id(fields.next().unwrap_or_default())
            .ok_or_else(|| self.failed(&all, "no tree in the output".into()))?;
        let mut conflicts: Vec<String> = fields
            .filter(|f| !f.is_empty())
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        conflicts.dedup();
        Ok(Merged { tree, conflicts })
    }

    /// Many merges in one `git merge-tree --stdin`: each pair is `(ours, theirs)`, commits.
    pub async fn merge_many(&self, pairs: &[(String, String)]) -> Result<Vec<Merged>, LandError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = String::new();
        for (ours, theirs) in pairs {
            input.push_str(&format!("{ours} {theirs}\n"));
        }
        let args = [
            "merge-tree",
            "--write-tree",
            "--name-only",
            "--no-messages",
            "--stdin",
            "--allow-unrelated-histories",
        ];
        let out = self
            .git()
            .run_unchecked(&args, Some(input.as_bytes()))
            .await?;
        if out.code != Some(0) {
            return Err(self.failed(&args, out.stderr));
        }
        let merged = parse_batch(&out.stdout)
            .ok_or_else(|| self.failed(&args, "output not understood".into()))?;
        if merged.len() != pairs.len() {
            return Err(self.failed(
                &args,
                format!("{} results for {} merges", merged.len(), pairs.len()),
            ));
        }
        Ok(merged)
    }

    /// Writes a commit of `tree` with `parents`; the committer is the user (as configured for the
    /// repository), the author too unless given.
    pub async fn commit(
        &self,
        tree: &gix::ObjectId,
        parents: &[gix::ObjectId],
        message: &str,
        author: Option<&Signature>,
    ) -> Result<gix::ObjectId, LandError> {
        let tree = tree.to_string();
        let parents: Vec<String> = parents.iter().map(ToString::to_string).collect();
        let mut args = vec!["commit-tree", "--no-gpg-sign", tree.as_str()];
        for parent in &parents {
            args.extend(["-p", parent.as_str()]);
        }
        args.extend(["-F", "-"]);
        let committer = &self.committer;
        let mut git = self
            .git()
            .with_env("GIT_COMMITTER_NAME", &committer.name)
            .with_env("GIT_COMMITTER_EMAIL", &committer.email);
        git = match author {
            Some(author) => {
                let git = git
                    .with_env("GIT_AUTHOR_NAME", &author.name)
                    .with_env("GIT_AUTHOR_EMAIL", &author.email);
                match &author.date {
                    Some(date) => git.with_env("GIT_AUTHOR_DATE", format!("@{date}")),
                    None => git,
                }
            }
            None => git
                .with_env("GIT_AUTHOR_NAME", &committer.name)
                .with_env("GIT_AUTHOR_EMAIL", &committer.email),
        };
        let out = git.run_with_input(&args, Some(message.as_bytes())).await?;
        parse_id(out.text().as_bytes())
            .ok_or_else(|| self.failed(&args, format!("printed {:?}", out.text())))
    }

    /// The tree of a commit.
    pub async fn tree_of(&self, commit: &str) -> Result<gix::ObjectId, LandError> {
        let spec = format!("{commit}^{{tree}}");
        let out = self
            .git()
            .run(&["rev-parse", "--verify", "--quiet", &spec])
            .await?;
        parse_id(out.text().as_bytes())
            .ok_or_else(|| self.failed(&["rev-parse", &spec], "no tree".into()))
    }

    fn failed(&self, args: &[&str], stderr: String) -> LandError {
        LandError::Git(GitError::Command {
            args: args.join(" "),
            dir: self.dir.clone(),
            stderr,
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn parse_id(bytes: &[u8]) -> Option<gix::ObjectId> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    (text.len() == 40).then(|| text.parse().ok()).flatten()
}

/// The output of `merge-tree --stdin --name-only --no-messages`: per merge, its status (`1` clean,
/// `0` conflicted), its tree and the conflicted files, each ended by NUL, and a NUL ending the merge.
fn parse_batch(stdout: &[u8]) -> Option<Vec<Merged>> {
    let mut fields = stdout.split(|&b| b == 0).peekable();
    let mut merged = Vec::new();
    while let Some(status) = fields.next() {
        if status.is_empty() && fields.peek().is_none() {
            break;
        }
        let clean = match status {
            b"1" => true,
            b"0" => false,
            _ => return None,
        };
        let tree = parse_id(fields.next()?)?;
        let mut conflicts = Vec::new();
        for field in fields.by_ref() {
            if field.is_empty() {
                break;
            }
            conflicts.push(String::from_utf8_lossy(field).into_owned());
        }
        if clean != conflicts.is_empty() {
            return None;
        }
        merged.push(Merged { tree, conflicts });
    }
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_output_is_read_per_merge() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let out = format!("0\0{a}\0x.txt\0dir/y.txt\0\01\0{b}\0\0");
        let merged = parse_batch(out.as_bytes()).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].conflicts, ["x.txt", "dir/y.txt"]);
        assert_eq!(merged[0].tree.to_string(), a);
        assert!(merged[1].conflicts.is_empty());
        assert_eq!(parse_batch(b"").unwrap(), Vec::new());
        assert!(parse_batch(b"2\0x\0\0").is_none());
    }
}
