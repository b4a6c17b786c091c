//! The Dockerfile form: the image is built through the engine from the base commit's files (never
//! a worktree's), once per content. The build context is the tree of `build.context` at the base
//! commit, less what its `.dockerignore` excludes, sent as a tar; the image is tagged by a hash
//! of everything the build depends on, so sixteen tasks of one commit build once and a task whose
//! Dockerfile or context changed builds anew.

use std::collections::HashMap;

use indexmap::IndexMap;

use super::DevcontainerError;
use crate::git::{Repo, TreeFile};
use crate::runtime::{BuildSpec, Runtime};
use crate::workspace::Workspace;

/// The most a build context may hold; a larger one is an error that names it.
pub const MAX_CONTEXT_BYTES: u64 = 1 << 30;

/// What to build, all of it from `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    pub commit: gix::ObjectId,
    /// The context directory inside the repository (`` is the root).
    pub context: String,
    /// The Dockerfile inside the repository.
    pub dockerfile: String,
    pub args: IndexMap<String, String>,
    pub target: Option<String>,
    /// The devcontainer.json that asked for it, for messages.
    pub shown: String,
}

/// Label on every image agentbox built for a devcontainer: the key it was built for.
pub const BUILD_KEY_LABEL: &str = "agentbox.build-key";

impl BuildPlan {
    /// The image's tag: the repository and a hash of the context's tree, the Dockerfile, the
    /// arguments and the target. Computed from ids alone, without reading the context.
    pub fn tag(&self, repo: &Repo, repo_id: &str) -> Result<String, DevcontainerError> {
        Ok(format!(
            "agentbox-build/{repo_id}:{}",
            &self.key(repo)?[..16]
        ))
    }

    fn key(&self, repo: &Repo) -> Result<String, DevcontainerError> {
        let id_of = |path: &str, what: &str| -> Result<String, DevcontainerError> {
            match repo.entry_at(self.commit, path) {
                Ok(Some((id, _))) => Ok(id.to_string()),
                Ok(None) => Err(DevcontainerError::Build(format!(
                    "{}: {what} {path:?} does not exist at the base commit {}",
                    self.shown,
                    short(self.commit)
                ))),
                Err(e) => Err(DevcontainerError::Build(format!("{}: {e}", self.shown))),
            }
        };
        let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
        let mut feed = |part: &str| {
            hasher.update(part.as_bytes());
            hasher.update(b"\0");
        };
        feed("agentbox devcontainer build 1");
        feed(&id_of(&self.context, "build.context")?);
        feed(&id_of(&self.dockerfile, "build.dockerfile")?);
        feed(&self.dockerfile);
        feed(&self.context);
        for (key, value) in &self.args {
            feed(key);
            feed(value);
        }
        feed(self.target.as_deref().unwrap_or(""));
        let id = hasher
            .try_finalize()
            .map_err(|e| DevcontainerError::Build(e.to_string()))?;
        Ok(id.to_string())
    }

    /// The build context as a tar: the context's files at the base commit, less what its
    /// `.dockerignore` excludes, with the Dockerfile added when it lies outside the context.
    /// Returns the tar and the Dockerfile's path inside it.
    pub fn context_tar(&self, repo: &Repo) -> Result<(Vec<u8>, String), DevcontainerError> {
        let build_error = |e: String| DevcontainerError::Build(format!("{}: {e}", self.shown));
        let files = repo
            .files_under(self.commit, &self.context, MAX_CONTEXT_BYTES)
            .map_err(|e| build_error(format!("build.context {:?}: {e}", self.context)))?;
        let ignore = files
            .iter()
            .find(|f| f.path == ".dockerignore" && !f.symlink)
            .map(|f| DockerIgnore::parse(&String::from_utf8_lossy(&f.data)))
            .unwrap_or_default();
        let inside = self
            .dockerfile
            .strip_prefix(&format!("{}/", self.context))
            .map(str::to_owned)
            .or_else(|| self.context.is_empty().then(|| self.dockerfile.clone()));
        let mut builder = tar::Builder::new(Vec::new());
        for file in &files {
            let keep = Some(&file.path) == inside.as_ref()
                || file.path == ".dockerignore"
                || !ignore.excludes(&file.path);
            if keep {
                append(&mut builder, file).map_err(|e| build_error(e.to_string()))?;
            }
        }
        let dockerfile_in_tar = match inside {
            Some(path) => path,
            None => {
                let data = repo
                    .read_file_at(self.commit, &self.dockerfile, 1 << 20)
                    .map_err(|e| build_error(e.to_string()))?
                    .ok_or_else(|| {
                        build_error(format!(
                            "build.dockerfile {:?} does not exist at the base commit",
                            self.dockerfile
                        ))
                    })?;
                let name = ".agentbox.Dockerfile".to_owned();
                append(
                    &mut builder,
                    &TreeFile {
                        path: name.clone(),
                        executable: false,
                        symlink: false,
                        data,
                    },
                )
                .map_err(|e| build_error(e.to_string()))?;
                name
            }
        };
        if !files
            .iter()
            .any(|f| Some(&f.path) == Some(&dockerfile_in_tar))
            && dockerfile_in_tar != ".agentbox.Dockerfile"
        {
            return Err(build_error(format!(
                "build.dockerfile {:?} does not exist at the base commit {}",
                self.dockerfile,
                short(self.commit)
            )));
        }
        let tar = builder
            .into_inner()
            .map_err(|e| build_error(e.to_string()))?;
        Ok((tar, dockerfile_in_tar))
    }
}

/// Waits for the exclusive lock at `path`, made when missing; held until the file is dropped.
fn lock_exclusive(path: &std::path::Path) -> Result<std::fs::File, DevcontainerError> {
    let fail = |e: std::io::Error| {
        DevcontainerError::Build(format!("cannot lock {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(fail)?;
    file.lock().map_err(fail)?;
    Ok(file)
}

fn short(id: gix::ObjectId) -> String {
    id.to_string()[..12].to_owned()
}

fn append(builder: &mut tar::Builder<Vec<u8>>, file: &TreeFile) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    if file.symlink {
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        let target = String::from_utf8_lossy(&file.data).into_owned();
        builder.append_link(&mut header, &file.path, target)
    } else {
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(file.data.len() as u64);
        header.set_mode(if file.executable { 0o755 } else { 0o644 });
        builder.append_data(&mut header, &file.path, file.data.as_slice())
    }
}

/// `.dockerignore`: patterns matched against paths relative to the context, `*` and `?` within
/// one path component, `**` across any number of them, a leading `!` taking a path back in; a
/// directory that matches excludes what is inside it; the last matching pattern decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerIgnore {
    patterns: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Self {
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                let (negated, pattern) = match line.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, line),
                };
                let parts = pattern
                    .trim_start_matches("./")
                    .trim_matches('/')
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .map(str::to_owned)
                    .collect();
                (negated, parts)
            })
            .collect();
        Self { patterns }
    }

    pub fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for (negated, pattern) in &self.patterns {
            // A pattern that matches a parent directory matches everything under it.
            let matches = (1..=parts.len()).any(|n| matches_parts(pattern, &parts[..n]));
            if matches {
                excluded = !negated;
            }
        }
        excluded
    }
}

fn matches_parts(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| matches_parts(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, path_rest)) => glob(first, name) && matches_parts(rest, path_rest),
            None => false,
        },
    }
}

/// `*` and `?` within one name, `[...]` classes, `\` escapes.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some(('[', rest)) => {
                let Some(end) = rest.iter().position(|c| *c == ']') else {
                    return n.first() == Some(&'[') && go(rest, &n[1..]);
                };
                let (class, after) = (&rest[..end], &rest[end + 1..]);
                let Some(c) = n.first() else { return false };
                let (negate, class) = match class.split_first() {
                    Some(('^' | '!', tail)) => (true, tail),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= (class[i]..=class[i + 2]).contains(c);
                        i += 3;
                    } else {
                        hit |= class[i] == *c;
                        i += 1;
                    }
                }
                hit != negate && go(after, &n[1..])
            }
            Some(('\\', rest)) if !rest.is_empty() => {
                n.first() == Some(&rest[0]) && go(&rest[1..], &n[1..])
            }
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Makes sure the plan's image exists, building it when no earlier task did: one build per
/// content at a time (a lock in the state dir), the others wait and find it. Each line of the
/// build's output goes to `progress`. Returns the tag.
pub async fn ensure_image(
    ws: &Workspace,
    runtime: &dyn Runtime,
    plan: &BuildPlan,
    labels: &[(String, String)],
    progress: &(dyn for<'line> Fn(&'line str) + Sync),
) -> Result<String, DevcontainerError> {
    let tag = plan.tag(&ws.repo, &ws.repo_id)?;
    if runtime.image_present(&tag).await? {
        return Ok(tag);
    }
    let lock_path = ws.state.root().join("builds").join(format!(
        "{}.lock",
        tag.rsplit(':').next().unwrap_or("build")
    ));
    let lock = tokio::task::spawn_blocking(move || lock_exclusive(&lock_path))
        .await
        .expect("taking a lock does not panic")?;
    // Whoever held the lock may have built it.
    if runtime.image_present(&tag).await? {
        drop(lock);
        return Ok(tag);
    }
    let (repo, build) = (ws.repo.clone(), plan.clone());
    let (context, dockerfile) = tokio::task::spawn_blocking(move || build.context_tar(&repo))
        .await
        .expect("reading the build context does not panic")?;
    progress(&format!(
        "building image {tag} from {} ({} of context)",
        plan.dockerfile,
        crate::config::Bytes(context.len() as u64)
    ));
    let mut all_labels: HashMap<String, String> = labels.iter().cloned().collect();
    all_labels.insert(BUILD_KEY_LABEL.to_owned(), plan.key(&ws.repo)?);
    all_labels.insert(crate::runtime::REPO_LABEL.to_owned(), ws.repo_id.clone());
    let spec = BuildSpec {
        tag: tag.clone(),
        context,
        dockerfile,
        args: plan.args.clone().into_iter().collect(),
        target: plan.target.clone(),
        labels: all_labels,
    };
    let result = runtime.build_image(&spec, progress).await;
    drop(lock);
    result.map_err(|e| {
        DevcontainerError::Build(format!(
            "{}: building {} failed: {e}",
            plan.shown, plan.dockerfile
        ))
    })?;
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_excludes_like_docker() {
        let ignore = DockerIgnore::parse(
            "# comment\nnode_modules\n**/*.log\n!keep.log\ntarget/\n./secret*\n",
        );
        assert!(ignore.excludes("node_modules"));
        assert!(ignore.excludes("node_modules/a/b.js"));
        assert!(ignore.excludes("a/b/c.log"));
        assert!(ignore.excludes("c.log"));
        assert!(!ignore.excludes("keep.log"));
        assert!(ignore.excludes("target/debug/x"));
        assert!(ignore.excludes("secret.txt"));
        assert!(!ignore.excludes("src/secret.txt"));
        assert!(!ignore.excludes("src/main.rs"));
        assert!(glob("[a-c]x", "bx") && !glob("[!a-c]x", "bx"));
    }
}
