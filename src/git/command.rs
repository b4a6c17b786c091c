//! The git CLI, for the steps gix does not offer (checkout, staging with ignore rules, fetching with
//! fsck, ref updates with reflogs), with a pinned environment: C locale, no terminal prompts, no
//! stdin, none of the `GIT_*` variables that would point git at another repository, no hooks and no
//! fsmonitor.
//!
//! Two kinds of invocation:
//!
//! - [`Git::host`] runs in the host repository, which no task can write to: its own configuration
//!   applies (the user's choices), except that hooks and fsmonitor are switched off for every command.
//! - [`Git::guarded`] runs over a task's worktree, whose every byte the task chose. It names the git
//!   dir, the work tree, the index and the object directory explicitly (the worktree's own `.git` is
//!   never consulted), reads no system or global configuration (so no attribute-selected filter or
//!   diff driver from there can run), and gives up after a time limit.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::GitError;

/// Variables that would redirect git away from the repository we name, for instance when agentbox is
/// itself started from a git hook.
const REDIRECTING_VARS: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_EXTERNAL_DIFF",
    "GIT_DIFF_OPTS",
    "GIT_PAGER",
    "GIT_EDITOR",
    "GIT_SSH_COMMAND",
    "GIT_ASKPASS",
];

/// Configuration every command gets: nothing of the repository's or the task's runs on the host.
const ALWAYS: &[&str] = &[
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "gc.auto=0",
    "maintenance.auto=false",
];

/// How often a step that lost a race for one of git's lock files is tried again.
const LOCK_RETRIES: u32 = 8;

/// How long a command over a task's files may take before it is killed: long enough for a large
/// worktree, short enough that a task cannot hang its own teardown.
pub const GUARDED_TIMEOUT: Duration = Duration::from_secs(600);

/// One way of running git: where, with which environment and configuration.
#[derive(Debug, Clone)]
pub struct Git {
    dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    config: Vec<String>,
    timeout: Option<Duration>,
}

/// Output of a git command that succeeded.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
}

/// Output of a git command whose exit code is an answer (`merge-tree` exits 1 on conflicts).
#[derive(Debug)]
pub struct Finished {
    /// The exit code; `None` when git was killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    /// stdout as text without its trailing newline.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim_end().to_owned()
    }
}

/// The paths a guarded command works with.
#[derive(Debug, Clone)]
pub struct GuardedPaths<'a> {
    /// A git dir agentbox made and no task can reach (its configuration is agentbox's).
    pub git_dir: &'a Path,
    /// The task's worktree.
    pub work_tree: &'a Path,
    pub index: &'a Path,
    /// Where new objects go.
    pub objects: &'a Path,
    /// Where else objects are read from.
    pub alternates: &'a [&'a Path],
}

impl Git {
    /// Commands in the host repository at `repo_dir`.
    pub fn host(repo_dir: &Path) -> Self {
        Self {
            dir: repo_dir.to_owned(),
            env: Vec::new(),
            config: ALWAYS.iter().map(|c| (*c).to_owned()).collect(),
            timeout: None,
        }
    }

    /// Commands over a task's worktree; see the module documentation.
    pub fn guarded(paths: &GuardedPaths) -> Self {
        let alternates = std::env::join_paths(paths.alternates).unwrap_or_default();
        let env = vec![
            ("GIT_DIR".into(), paths.git_dir.as_os_str().to_owned()),
            (
                "GIT_WORK_TREE".into(),
                paths.work_tree.as_os_str().to_owned(),
            ),
            ("GIT_INDEX_FILE".into(), paths.index.as_os_str().to_owned()),
            (
                "GIT_OBJECT_DIRECTORY".into(),
                paths.objects.as_os_str().to_owned(),
            ),
            ("GIT_ALTERNATE_OBJECT_DIRECTORIES".into(), alternates),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_ATTR_NOSYSTEM".into(), "1".into()),
            ("GIT_NO_REPLACE_OBJECTS".into(), "1".into()),
        ];
        let mut config: Vec<String> = ALWAYS.iter().map(|c| (*c).to_owned()).collect();
        config.extend(
            [
                "core.attributesFile=/dev/null",
                "core.commitGraph=false",
                "core.symlinks=true",
                "core.quotePath=false",
            ]
            .map(str::to_owned),
        );
        Self {
            dir: paths.work_tree.to_owned(),
            env,
            config,
            timeout: Some(GUARDED_TIMEOUT),
        }
    }

    /// Commands that read data a task wrote (its objects) through a git dir agentbox made: no
    /// system or global configuration, a time limit.
    pub fn untrusted_data(repo_dir: &Path) -> Self {
        let mut git = Self::host(repo_dir);
        git.env.extend([
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_NO_REPLACE_OBJECTS".into(), "1".into()),
        ]);
        git.config.push("core.commitGraph=false".into());
        git.timeout = Some(GUARDED_TIMEOUT);
        git
    }

    /// Commands that work on objects alone (merges computed with `merge-tree`, commits made with
    /// `commit-tree`, logs and diffs between commits), through a bare git dir agentbox made: its
    /// configuration is agentbox's (so no merge, diff or filter driver is configured for any
    /// attribute to select), no system or global configuration is read, no attributes file but the
    /// tree named with [`with_attr_source`](Self::with_attr_source), and no work tree or index is
    /// involved. New objects go to `objects`; `alternates` are read.
    pub fn isolated(git_dir: &Path, objects: &Path, alternates: &[&Path]) -> Self {
        let alternates = std::env::join_paths(alternates).unwrap_or_default();
        let env = vec![
            ("GIT_DIR".into(), git_dir.as_os_str().to_owned()),
            (
                "GIT_OBJECT_DIRECTORY".into(),
                objects.as_os_str().to_owned(),
            ),
            ("GIT_ALTERNATE_OBJECT_DIRECTORIES".into(), alternates),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
            ("GIT_ATTR_NOSYSTEM".into(), "1".into()),
            ("GIT_NO_REPLACE_OBJECTS".into(), "1".into()),
        ];
        let mut config: Vec<String> = ALWAYS.iter().map(|c| (*c).to_owned()).collect();
        config.extend(
            [
                "core.attributesFile=/dev/null",
                "core.commitGraph=false",
                "core.quotePath=false",
            ]
            .map(str::to_owned),
        );
        Self {
            dir: git_dir.to_owned(),
            env,
            config,
            timeout: Some(GUARDED_TIMEOUT),
        }
    }

    /// Reads `.gitattributes` from `tree` (a commit or tree) instead of an index or a work tree
    /// (`GIT_ATTR_SOURCE`, git 2.41 and newer; older gits read none from a bare git dir).
    pub fn with_attr_source(self, tree: &str) -> Self {
        self.with_env("GIT_ATTR_SOURCE", tree)
    }

    /// Runs the repository's own hooks (`core.hooksPath` as configured, else `hooks/`): only where
    /// the user asked for them.
    pub fn with_repository_hooks(mut self) -> Self {
        self.config.retain(|c| c != "core.hooksPath=/dev/null");
        self
    }

    /// Adds `key=value` configuration for every command.
    pub fn with_config(mut self, entry: impl Into<String>) -> Self {
        self.config.push(entry.into());
        self
    }

    /// Adds an environment variable for every command.
    pub fn with_env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(&self.dir);
        for entry in &self.config {
            cmd.arg("-c").arg(entry);
        }
        cmd.args(args);
        for var in REDIRECTING_VARS {
            cmd.env_remove(var);
        }
        cmd.env("LC_ALL", "C")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_OPTIONAL_LOCKS", "0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at the terminal is for agentbox to handle, and must not
            // kill the git that is committing a snapshot.
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    /// Runs git, retrying with backoff when another git process held a lock file it needed (many
    /// tasks update refs of one repository at once).
    pub async fn run(&self, args: &[&str]) -> Result<Output, GitError> {
        self.run_with_input(args, None).await
    }

    /// Like [`run`](Self::run), writing `input` to git's stdin.
    pub async fn run_with_input(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Output, GitError> {
        let mut delay = Duration::from_millis(20);
        for attempt in 0.. {
            let out = self.run_once(args, input).await?;
            if out.status.success() {
                return Ok(Output { stdout: out.stdout });
            }
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if attempt < LOCK_RETRIES && is_lock_contention(&stderr) {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(Duration::from_millis(500));
                continue;
            }
            return Err(GitError::Command {
                args: args.join(" "),
                dir: self.dir.clone(),
                stderr,
            });
        }
        unreachable!("the retry loop returns")
    }

    /// Runs git once and returns its exit code with its output, whatever the code: for commands
    /// whose failure is an answer.
    pub async fn run_unchecked(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Finished, GitError> {
        let out = self.run_once(args, input).await?;
        Ok(Finished {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    async fn run_once(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<std::process::Output, GitError> {
        let mut cmd = self.command(args);
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(GitError::Spawn)?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            // A git that exits early closes its stdin; its exit status tells what went wrong.
            let _ = stdin.write_all(input).await;
            drop(stdin);
        }
        let waited = child.wait_with_output();
        match self.timeout {
            None => waited.await.map_err(GitError::Spawn),
            Some(limit) => match tokio::time::timeout(limit, waited).await {
                Ok(out) => out.map_err(GitError::Spawn),
                // Dropping the future kills the process (kill_on_drop).
                Err(_) => Err(GitError::TimedOut {
                    args: args.join(" "),
                    dir: self.dir.clone(),
                    limit,
                }),
            },
        }
    }
}

/// The version of the git on `PATH`, as `(major, minor)`.
pub async fn version() -> Result<(u32, u32), GitError> {
    let out = Command::new("git")
        .arg("version")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(GitError::Spawn)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| GitError::Command {
        args: "version".into(),
        dir: PathBuf::from("."),
        stderr: format!("cannot read a version in {:?}", text.trim()),
    })
}

/// `git version 2.47.3` -> `(2, 47)`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let number = text.trim().strip_prefix("git version ")?;
    let mut parts = number.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Another git process held a lock file. (A ref that moved under a compare-and-swap update also
/// says "cannot lock ref", but that is an answer, not contention.)
fn is_lock_contention(stderr: &str) -> bool {
    stderr.contains(".lock") && stderr.contains("File exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_git_versions() {
        assert_eq!(parse_version("git version 2.47.3\n"), Some((2, 47)));
        assert_eq!(parse_version("git version 2.39.2.windows.1"), Some((2, 39)));
        assert_eq!(parse_version("git version 3.0"), Some((3, 0)));
        assert_eq!(parse_version("hub version 2.14"), None);
    }

    #[test]
    fn recognises_lock_contention() {
        assert!(is_lock_contention(
            "fatal: Unable to create '/r/.git/index.lock': File exists."
        ));
        assert!(is_lock_contention(
            "error: cannot lock ref 'refs/heads/agentbox/a': Unable to create '/r/.git/refs/heads/agentbox/a.lock': File exists."
        ));
        assert!(!is_lock_contention(
            "fatal: cannot lock ref 'refs/heads/a': is at 1111 but expected 2222"
        ));
        assert!(!is_lock_contention("fatal: invalid reference: nosuch"));
    }
}
