//! Harness for the integration tier: tests that drive the `agentbox` binary against the real Docker
//! engine and real git.
//!
//! Every test builds a [`TestEnv`]: a temporary directory holding a fresh repository (a normal clone or a
//! bare one), a fake HOME, an XDG state dir and a global git config, plus a unique test id. Every `run`
//! made through [`TestEnv::agentbox`] carries the label `agentbox.test=<id>`, and dropping the `TestEnv`
//! removes every container with that label — also when an assertion panicked — before the temporary
//! directory (repository, worktrees, state) goes away.
//!
//! Waiting is done on events only: a process exit, a line of output, a file. Every wait has a generous
//! timeout so that a hanging implementation fails the test instead of hanging the suite.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use serde_json::Value;
use tempfile::TempDir;

/// The default image of `agentbox run`.
pub const IMAGE: &str = "agentbox/base:bookworm";
/// How long any single agentbox invocation may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Identity written into the fake global git config.
pub const USER_NAME: &str = "Agentbox Test";
pub const USER_EMAIL: &str = "test@agentbox.invalid";
/// Label key that marks everything one test created.
pub const TEST_LABEL: &str = "agentbox.test";

const BIN: &str = env!("CARGO_BIN_EXE_agentbox");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Makes sure the default image exists, building it once with `images/build-base.sh`.
pub fn ensure_image() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| build_image_once(IMAGE, "images/build-base.sh"));
}

/// Builds `image` with `script` (relative to the repository) unless it exists. Serialised across
/// test binaries (which cargo may run at the same time) by a lock file per image.
fn build_image_once(image: &str, script: &str) {
    let lock_name = format!(
        "agentbox-test-image-{}.lock",
        image.replace(['/', ':'], "_")
    );
    // In cargo's own scratch directory for integration tests (target/tmp), not in /tmp, where the
    // lock files would stay behind after every run.
    let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(lock_name);
    let lock = File::create(&lock_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", lock_path.display()));
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));
    if image_exists(image) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let status = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(status.success(), "{} failed: {status}", script.display());
    assert!(
        image_exists(image),
        "{} did not build {image}",
        script.display()
    );
}

fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Which kind of repository a [`TestEnv`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A normal clone at `<tmp>/proj`.
    Clone,
    /// A bare repository at `<tmp>/proj.git`.
    Bare,
}

/// One test's world: repository, HOME, state dir, git config and test id.
pub struct TestEnv {
    /// Canonical path of the temporary directory.
    pub root: PathBuf,
    /// The repository: `<root>/proj` or `<root>/proj.git`.
    pub repo: PathBuf,
    pub kind: RepoKind,
    pub home: PathBuf,
    pub state_home: PathBuf,
    pub gitconfig: PathBuf,
    /// Unique id, the value of the `agentbox.test` label.
    pub id: String,
    // Dropped after `Drop::drop` removed the containers.
    _tmp: TempDir,
}

impl TestEnv {
    /// A normal clone with one commit.
    pub fn new(test: &str) -> TestEnv {
        TestEnv::create(test, RepoKind::Clone)
    }

    /// A bare repository (`git clone --bare`) with one commit.
    pub fn new_bare(test: &str) -> TestEnv {
        TestEnv::create(test, RepoKind::Bare)
    }

    fn create(test: &str, kind: RepoKind) -> TestEnv {
        ensure_image();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{test}-{}-{n}", std::process::id());
        let tmp = tempfile::Builder::new()
            .prefix("agentbox-it-")
            .tempdir()
            .expect("create temp dir");
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        let home = root.join("home");
        let state_home = root.join("state");
        fs::create_dir(&home).unwrap();
        fs::create_dir(&state_home).unwrap();
        let gitconfig = root.join("gitconfig");
        fs::write(
            &gitconfig,
            format!(
                "[user]\n\tname = {USER_NAME}\n\temail = {USER_EMAIL}\n[init]\n\tdefaultBranch = main\n"
            ),
        )
        .unwrap();
        let repo = match kind {
            RepoKind::Clone => root.join("proj"),
            RepoKind::Bare => root.join("proj.git"),
        };
        let env = TestEnv {
            root,
            repo,
            kind,
            home,
            state_home,
            gitconfig,
            id,
            _tmp: tmp,
        };
        env.seed();
        env
    }

    /// `<root>/seed` gets one commit (README.md, .gitignore, a non-executable script); the repository
    /// under test is cloned from it.
    fn seed(&self) {
        let seed = self.root.join("seed");
        self.git_in(&self.root, ["init", "-q", "-b", "main", "seed"]);
        fs::write(seed.join("README.md"), "hello\n").unwrap();
        fs::write(seed.join(".gitignore"), "ignored.txt\n*.log\n").unwrap();
        let script = seed.join("noexec.sh");
        fs::write(&script, "#!/bin/sh\necho should-not-run\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
        self.git_in(&seed, ["add", "-A"]);
        self.git_in(&seed, ["commit", "-q", "-m", "initial"]);
        let target = self.repo.file_name().unwrap().to_owned();
        let mut args: Vec<OsString> = vec!["clone".into(), "-q".into()];
        if self.kind == RepoKind::Bare {
            args.push("--bare".into());
        }
        args.push("seed".into());
        args.push(target);
        self.git_in(&self.root, args);
    }

    /// Replaces the fake global git config.
    pub fn write_global_config(&self, contents: &str) {
        fs::write(&self.gitconfig, contents).unwrap();
    }

    // ---- the binary -------------------------------------------------------------------------------

    /// `agentbox <args>` with a cleared, hermetic environment, run in the repository. For `run`,
    /// `batch` and `queue`, `--label agentbox.test=<id>` is inserted right after the subcommand.
    pub fn agentbox<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.agentbox_in(&self.repo, args)
    }

    /// Like [`TestEnv::agentbox`], run in `dir`.
    pub fn agentbox_in<I, S>(&self, dir: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let subcommand = args
            .iter()
            .take_while(|a| a.as_os_str() != "--")
            .position(|a| {
                ["run", "batch", "queue", "fill", "up", "mcp"]
                    .iter()
                    .any(|s| a.as_os_str() == *s)
            });
        if let Some(pos) = subcommand {
            args.insert(pos + 1, "--label".into());
            args.insert(pos + 2, format!("{TEST_LABEL}={}", self.id).into());
        }
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(dir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &self.home)
            .env("XDG_STATE_HOME", &self.state_home)
            .env("GIT_CONFIG_GLOBAL", &self.gitconfig)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null());
        if let Some(host) = std::env::var_os("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", host);
        }
        cmd
    }

    /// Runs `agentbox <args>` in the repository to completion.
    pub fn output<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        output_of(self.agentbox(args))
    }

    /// Starts `agentbox <args>` in the repository with stdout and stderr piped.
    pub fn spawn<I, S>(&self, args: I) -> Spawned
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Spawned::start(self.agentbox(args))
    }

    // ---- paths ------------------------------------------------------------------------------------

    /// The git common dir: `<root>/proj/.git` or `<root>/proj.git`.
    pub fn common_dir(&self) -> PathBuf {
        match self.kind {
            RepoKind::Clone => self.repo.join(".git"),
            RepoKind::Bare => self.repo.clone(),
        }
    }

    /// Default worktree root: `<root>/.agentbox-worktrees/proj`.
    pub fn worktree_root(&self) -> PathBuf {
        self.root.join(".agentbox-worktrees").join("proj")
    }

    /// Default worktree of a task.
    pub fn worktree_path(&self, task: &str) -> PathBuf {
        self.worktree_root().join(task)
    }

    // ---- git --------------------------------------------------------------------------------------

    fn git_command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C")
            .arg(dir)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", &self.home)
            .env("GIT_CONFIG_GLOBAL", &self.gitconfig)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        cmd
    }

    /// `git -C <dir> <args>`; panics unless it succeeds; returns stdout without the final newline.
    pub fn git_in<I, S>(&self, dir: &Path, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.git_command(dir);
        cmd.args(args);
        let shown = format!("{cmd:?}");
        let out = cmd.output().expect("run git");
        assert!(
            out.status.success(),
            "{shown} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        trim_newline(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `git -C <repo> <args>`; panics unless it succeeds.
    pub fn git<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.git_in(&self.repo, args)
    }

    /// `git -C <repo> <args>`; `None` when git fails.
    pub fn git_try<I, S>(&self, args: I) -> Option<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.git_raw(args).map(trim_newline)
    }

    /// `git -C <repo> <args>`; its whole stdout, `None` when git fails.
    pub fn git_raw<I, S>(&self, args: I) -> Option<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .git_command(&self.repo)
            .args(args)
            .output()
            .expect("run git");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The commit a revision names, if it exists.
    pub fn rev(&self, rev: &str) -> Option<String> {
        self.git_try([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{rev}^{{commit}}"),
        ])
    }

    /// The commit of the repository's HEAD.
    pub fn head(&self) -> String {
        self.rev("HEAD").expect("repository has a HEAD commit")
    }

    /// Whether `refs/heads/<branch>` exists.
    pub fn branch_exists(&self, branch: &str) -> bool {
        self.git_try([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}"),
        ])
        .is_some()
    }

    /// Local branches (short names).
    pub fn branches(&self) -> Vec<String> {
        lines(&self.git(["for-each-ref", "--format=%(refname:short)", "refs/heads/"]))
    }

    /// Local branches under `agentbox/`.
    pub fn task_branches(&self) -> Vec<String> {
        self.branches()
            .into_iter()
            .filter(|b| b.starts_with("agentbox/"))
            .collect()
    }

    /// Subjects of the commits in a range or from a revision, newest first.
    pub fn subjects(&self, range: &str) -> Vec<String> {
        lines(&self.git(["log", "--format=%s", range]))
    }

    /// `git log -1 --format=<format> <rev>`.
    pub fn show_format(&self, rev: &str, format: &str) -> String {
        self.git(["log", "-1", &format!("--format={format}"), rev])
    }

    /// Contents of `path` at `rev`, if it exists there.
    pub fn file_at(&self, rev: &str, path: &str) -> Option<String> {
        self.git_raw(["cat-file", "-p", &format!("{rev}:{path}")])
    }

    /// Paths a commit changed relative to its first parent, sorted.
    pub fn changed_files(&self, commit: &str) -> Vec<String> {
        let mut files =
            lines(&self.git(["diff-tree", "--no-commit-id", "--name-only", "-r", commit]));
        files.sort();
        files
    }

    /// `git worktree list --porcelain`, parsed.
    pub fn worktrees(&self) -> Vec<Worktree> {
        parse_worktrees(&self.git(["worktree", "list", "--porcelain"]))
    }

    /// The entry of `git worktree list` for `path`, if any.
    pub fn worktree_entry(&self, path: &Path) -> Option<Worktree> {
        self.worktrees().into_iter().find(|w| w.path == path)
    }

    // ---- docker -----------------------------------------------------------------------------------

    /// Ids of all containers (any state) labelled with this test's id, once the background purges
    /// of the tasks that ended are done (a finished task's stopped container goes with them).
    pub fn containers(&self) -> Vec<String> {
        self.wait_for_purges();
        self.labelled_containers()
    }

    fn labelled_containers(&self) -> Vec<String> {
        docker_lines(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
        ])
    }

    /// Ids of the containers of this test that have not ended: running, or started so recently that
    /// the engine still lists them as created (a container's process can print before the engine
    /// records it as running, so "running" alone would race with the output a test waits for).
    pub fn live_containers(&self) -> Vec<String> {
        docker_lines(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
            "--filter",
            "status=created",
            "--filter",
            "status=running",
        ])
    }

    /// `<id> <status> <name>` of every container of this test, for failure messages.
    pub fn container_report(&self) -> String {
        docker_lines(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
            "--format",
            "{{.ID}} {{.Status}} {{.Names}} {{.Labels}}",
        ])
        .join("\n")
    }

    /// `docker inspect <id>`.
    pub fn inspect(&self, id: &str) -> Value {
        let out = Command::new("docker")
            .args(["inspect", id])
            .stdin(Stdio::null())
            .output()
            .expect("run docker inspect");
        assert!(out.status.success(), "docker inspect {id} failed");
        let mut v: Value = serde_json::from_slice(&out.stdout).expect("docker inspect json");
        v[0].take()
    }

    // ---- state ------------------------------------------------------------------------------------

    /// `$XDG_STATE_HOME/agentbox`.
    pub fn state_root(&self) -> PathBuf {
        self.state_home.join("agentbox")
    }

    /// Waits (within [`TIMEOUT`]) until no trash manifest is left in the state dir: the purges
    /// that ended tasks started in the background are done. One that stays (a purge that failed)
    /// is for the caller's assertions to report.
    pub fn wait_for_purges(&self) {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline
            && self
                .files_in_state_subdir("trash")
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "json"))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every task record, `$XDG_STATE_HOME/agentbox/*/tasks/*.json`.
    pub fn task_records(&self) -> Vec<PathBuf> {
        self.files_in_state_subdir("tasks")
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect()
    }

    /// Every entry of `$XDG_STATE_HOME/agentbox/*/logs/`: one directory of segment files per task.
    pub fn log_files(&self) -> Vec<PathBuf> {
        self.files_in_state_subdir("logs")
    }

    /// Every task git dir, `$XDG_STATE_HOME/agentbox/*/git/<task>`.
    pub fn task_git_dirs(&self) -> Vec<PathBuf> {
        self.files_in_state_subdir("git")
    }

    /// Every scratch git dir, `$XDG_STATE_HOME/agentbox/*/scratch/<task>`.
    pub fn scratch_dirs(&self) -> Vec<PathBuf> {
        self.files_in_state_subdir("scratch")
    }

    /// The git dir of a task (mounted into its container; the worktree's `.git` file points at it):
    /// `$XDG_STATE_HOME/agentbox/<repo-id>/git/<task>`.
    pub fn task_git_dir(&self, task: &str) -> PathBuf {
        self.state_root()
            .join(self.repo_id())
            .join("git")
            .join(task)
    }

    /// agentbox's own scratch git dir of a task (never mounted):
    /// `$XDG_STATE_HOME/agentbox/<repo-id>/scratch/<task>`.
    pub fn scratch_dir(&self, task: &str) -> PathBuf {
        self.state_root()
            .join(self.repo_id())
            .join("scratch")
            .join(task)
    }

    /// The log directory of a task: `$XDG_STATE_HOME/agentbox/<repo-id>/logs/<task>/`, holding
    /// segment files `000000`, `000001`, … (and `omitted`).
    pub fn task_log_dir(&self, task: &str) -> PathBuf {
        self.state_root()
            .join(self.repo_id())
            .join("logs")
            .join(task)
    }

    /// Whether any task git dir or scratch dir of `task` is left in the state dir.
    fn has_git_dirs_of(&self, task: &str) -> bool {
        self.task_git_dirs()
            .iter()
            .chain(self.scratch_dirs().iter())
            .any(|p| p.file_name().is_some_and(|n| n == task))
    }

    fn files_in_state_subdir(&self, sub: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(repos) = fs::read_dir(self.state_root()) else {
            return found;
        };
        for repo in repos {
            let dir = repo.unwrap().path().join(sub);
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries {
                    found.push(e.unwrap().path());
                }
            }
        }
        found.sort();
        found
    }

    /// `agentbox ls --json`, one value per line; panics unless it exits 0 and every line is JSON.
    pub fn ls_json(&self) -> Vec<Value> {
        let out = self.output(["ls", "--json"]);
        out.expect_code(0);
        out.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("ls --json line is not JSON ({e}): {l}\n{out}"))
            })
            .collect()
    }

    /// The `ls --json` object of a task.
    pub fn ls_task(&self, task: &str) -> Option<Value> {
        self.ls_json().into_iter().find(|v| v["name"] == task)
    }

    // ---- composite checks -------------------------------------------------------------------------

    /// Asserts that a task left no trace: no branch, no worktree (on disk or in git's list), no task
    /// git dir or scratch dir, no container of this test, no state record, no entry in `ls --json`.
    pub fn assert_nothing_left(&self, task: &str) {
        let branch = format!("agentbox/{task}");
        assert!(
            !self.branch_exists(&branch),
            "branch {branch} must not exist"
        );
        let wt = self.worktree_path(task);
        assert!(!wt.exists(), "worktree {} must not exist", wt.display());
        // A bare repository lists itself as its main (bare) entry.
        assert_eq!(
            self.worktrees().len(),
            1,
            "git worktree list must show only the main worktree: {:?}",
            self.worktrees()
        );
        assert!(
            !self.has_git_dirs_of(task),
            "no git dir of {task} may be left: {:?} {:?}",
            self.task_git_dirs(),
            self.scratch_dirs()
        );
        assert_eq!(
            self.containers(),
            Vec::<String>::new(),
            "no container may be left"
        );
        assert_eq!(
            self.task_records(),
            Vec::<PathBuf>::new(),
            "no state record may be left"
        );
        assert!(
            self.ls_task(task).is_none(),
            "ls --json must not list {task}"
        );
    }

    /// Asserts that a task was torn down: no container left, worktree, task git dir and scratch dir
    /// gone from disk (and the worktree never in `git worktree list`). The branch is the caller's to
    /// check: a task that changed nothing leaves none (unless run with `--keep-branch`), one that
    /// did leaves its work there ([`TestEnv::assert_snapshot_holds`], [`TestEnv::subjects`]).
    pub fn assert_torn_down(&self, task: &str) {
        let wt = self.worktree_path(task);
        assert!(!wt.exists(), "worktree {} must be removed", wt.display());
        assert!(
            self.worktree_entry(&wt).is_none(),
            "git worktree list must not show {}: {:?}",
            wt.display(),
            self.worktrees()
        );
        assert!(
            !self.has_git_dirs_of(task),
            "the git dir and scratch dir of {task} must be removed: {:?} {:?}",
            self.task_git_dirs(),
            self.scratch_dirs()
        );
        assert_eq!(
            self.containers(),
            Vec::<String>::new(),
            "container must be removed"
        );
    }

    /// Asserts that a task that changed nothing left no branch, and that its run said so.
    #[track_caller]
    pub fn assert_branch_gone_unchanged(&self, task: &str, out: &Out) {
        let branch = format!("agentbox/{task}");
        assert!(
            !self.branch_exists(&branch),
            "a task that changed nothing leaves no branch {branch}\n{out}"
        );
        assert!(
            out.stderr.lines().any(|l| {
                l.starts_with(&format!("agentbox: task {task} exited "))
                    && l.ends_with(
                        " and changed nothing, so its branch is gone again (--keep-branch keeps it)",
                    )
            }),
            "the run says that the branch of {task} is gone\n{out}"
        );
    }

    /// Asserts that the tip of `agentbox/<task>` is a snapshot commit whose `file` holds `contents`.
    pub fn assert_snapshot_holds(&self, task: &str, file: &str, contents: &str) {
        let branch = format!("agentbox/{task}");
        let subject = self.show_format(&branch, "%s");
        assert!(
            subject.starts_with("agentbox: snapshot"),
            "tip of {branch} must be a snapshot commit, is {subject:?}"
        );
        assert_eq!(
            self.file_at(&branch, file).as_deref(),
            Some(contents),
            "{file} in the snapshot on {branch}"
        );
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Containers first: they hold bind mounts of paths inside the temp dir.
        let ids = self.labelled_containers();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v"])
                .args(&ids)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Then the per-task networks, which the containers were attached to.
        self.remove_networks();
        // Then the volumes (compose tasks' named volumes, a state volume), free once no container
        // holds them.
        let volumes = docker_lines(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
        ]);
        if !volumes.is_empty() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f"])
                .args(&volumes)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Then images the test's tasks built (a devcontainer's Dockerfile).
        let images = docker_lines(&[
            "images",
            "-q",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
        ]);
        if !images.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f"])
                .args(&images)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Then the TempDir field removes repository, worktrees and state.
    }
}

pub fn docker_lines(args: &[&str]) -> Vec<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&String::from_utf8_lossy(&out.stdout))
}

/// One entry of `git worktree list --porcelain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worktree {
    pub path: PathBuf,
    pub head: Option<String>,
    /// Full ref, e.g. `refs/heads/agentbox/t`.
    pub branch: Option<String>,
    pub bare: bool,
    pub locked: bool,
}

fn parse_worktrees(porcelain: &str) -> Vec<Worktree> {
    let mut all = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut wt: Option<Worktree> = None;
        for line in block.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match (key, wt.as_mut()) {
                ("worktree", _) => {
                    wt = Some(Worktree {
                        path: PathBuf::from(value),
                        head: None,
                        branch: None,
                        bare: false,
                        locked: false,
                    })
                }
                ("HEAD", Some(w)) => w.head = Some(value.to_owned()),
                ("branch", Some(w)) => w.branch = Some(value.to_owned()),
                ("bare", Some(w)) => w.bare = true,
                ("locked", Some(w)) => w.locked = true,
                _ => {}
            }
        }
        all.extend(wt);
    }
    all
}

// ---- processes --------------------------------------------------------------------------------------

/// What a finished process left: exit status, stdout, stderr.
pub struct Out {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics, showing everything, unless the process exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Out {
        assert_eq!(self.code(), Some(code), "unexpected exit status\n{self}");
        self
    }

    /// Panics, showing everything, unless stderr contains `needle`.
    #[track_caller]
    pub fn expect_stderr_contains(&self, needle: &str) -> &Out {
        assert!(
            self.stderr.contains(needle),
            "stderr must contain {needle:?}\n{self}"
        );
        self
    }

    /// Non-empty lines of stdout.
    pub fn stdout_lines(&self) -> Vec<String> {
        lines(&self.stdout)
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => format!("{}", self.status),
        };
        write!(
            f,
            "command: {}\nstatus: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}\n---",
            self.what, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion (stdout and stderr captured) within [`TIMEOUT`].
pub fn output_of(cmd: Command) -> Out {
    Spawned::start(cmd).wait()
}

/// A running process whose stdout is read line by line in the background. Dropping it kills the
/// process if it was not waited for.
pub struct Spawned {
    what: String,
    child: Option<Child>,
    pid: u32,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
}

impl Spawned {
    pub fn start(mut cmd: Command) -> Spawned {
        let what = format!("{cmd:?}");
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let pid = child.id();
        let stdout_pipe = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let seen = Arc::clone(&stdout);
        let stdout_reader = thread::spawn(move || {
            let mut reader = BufReader::new(stdout_pipe);
            loop {
                let mut buf = Vec::new();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        seen.lock().unwrap().push_str(&line);
                        let _ = tx.send(trim_newline(line));
                    }
                }
            }
        });
        let stderr_reader = thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        });
        Spawned {
            what,
            child: Some(child),
            pid,
            lines,
            stdout,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the process prints `expected` as a whole line on stdout. Panics (showing what the
    /// process printed) if it ends first or nothing comes within [`TIMEOUT`].
    #[track_caller]
    pub fn wait_for_line(&mut self, expected: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == expected => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let out = self.finish();
                    panic!("process ended before printing {expected:?}\n{out}");
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.signal(Signal::KILL);
                    let out = self.finish();
                    panic!("no line {expected:?} within {TIMEOUT:?}\n{out}");
                }
            }
        }
    }

    /// The next whole line the process prints on stdout. Panics if it ends first or nothing comes
    /// within [`TIMEOUT`].
    #[track_caller]
    pub fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => line,
            Err(e) => {
                self.signal(Signal::KILL);
                let out = self.finish();
                panic!("no further line ({e:?})\n{out}");
            }
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: Signal) {
        if self.child.is_none() {
            return;
        }
        let pid = rustix::process::Pid::from_raw(self.pid as i32).expect("valid pid");
        rustix::process::kill_process(pid, signal)
            .unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.pid));
    }

    /// Waits for the process to end (at most [`TIMEOUT`], then it is killed and the test fails).
    pub fn wait(mut self) -> Out {
        self.finish()
    }

    fn finish(&mut self) -> Out {
        let mut child = self.child.take().expect("process not waited for yet");
        let (tx, rx) = mpsc::channel();
        let waiter = thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            status
        });
        if rx.recv_timeout(TIMEOUT).is_err() {
            // Not reaped yet, so the pid is still ours.
            if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            let _ = waiter.join();
            panic!(
                "{} did not end within {TIMEOUT:?}; stdout so far:\n{}",
                self.what,
                self.stdout.lock().unwrap()
            );
        }
        let status = waiter.join().unwrap().expect("wait for process");
        // The pipes close when the process (and anything that inherited them) is gone.
        if let Some(h) = self.stdout_reader.take() {
            let _ = h.join();
        }
        let stderr = self
            .stderr_reader
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Out {
            what: self.what.clone(),
            status,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr,
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- small helpers ----------------------------------------------------------------------------------

fn trim_newline(mut s: String) -> String {
    while s.ends_with('\n') || s.ends_with('\r') {
        s.pop();
    }
    s
}

/// Non-empty lines of a string.
pub fn lines(s: &str) -> Vec<String> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Creates (or truncates) a file, e.g. the release file a task command waits for.
pub fn touch(path: &Path) {
    File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

/// Names and permissions of the entries of a directory, for before/after comparisons.
pub fn dir_listing(dir: &Path) -> BTreeMap<String, (u32, u64)> {
    let mut listing = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            listing.insert(
                e.file_name().to_string_lossy().into_owned(),
                (meta.permissions().mode(), meta.len()),
            );
        }
    }
    listing
}

/// A shell loop that waits (inside the container) until the file `name` exists in the working
/// directory, then deletes it. The test creates the file on the host, in the worktree.
pub fn wait_for_file(name: &str) -> String {
    format!("while [ ! -e {name} ]; do sleep 0.05; done; rm -f {name}")
}

/// Whether `s` is an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            digits(i + 1..i + 3)
                && b.get(i + 3) == Some(&b':')
                && digits(i + 4..i + 6)
                && i + 6 == b.len()
        }
        _ => false,
    }
}

/// The uid:gid of this process, which `agentbox run` uses by default.
pub fn own_user() -> String {
    format!(
        "{}:{}",
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    )
}

// ---- environment: agentbox.toml, ports, services (issue 3) ------------------------------------------

/// The image with servers (busybox httpd, nc, wget) that `images/test/build.sh` builds.
pub const TOOLS_IMAGE: &str = "agentbox-test/tools:latest";

/// Makes sure [`TOOLS_IMAGE`] (and the default image it is built on) exists, running
/// `images/test/build.sh` once.
pub fn ensure_tools_image() {
    static READY: OnceLock<()> = OnceLock::new();
    ensure_image();
    READY.get_or_init(|| build_image_once(TOOLS_IMAGE, "images/test/build.sh"));
}

impl TestEnv {
    /// Writes `agentbox.toml` at the root of the repository and commits it on `main` (for a bare
    /// repository: committed in the seed and fetched, since agentbox reads it from HEAD's tree).
    pub fn write_config(&self, toml: &str) {
        let dir = match self.kind {
            RepoKind::Clone => self.repo.clone(),
            RepoKind::Bare => self.root.join("seed"),
        };
        fs::write(dir.join("agentbox.toml"), toml).unwrap();
        self.git_in(&dir, ["add", "agentbox.toml"]);
        self.git_in(&dir, ["commit", "-q", "-m", "agentbox.toml"]);
        if self.kind == RepoKind::Bare {
            let seed = dir.display().to_string();
            self.git(["fetch", "-q", &seed, "+main:main"]);
        }
    }

    /// Names of the docker networks of this test that agentbox made: labelled with the test id,
    /// named `agentbox-…`.
    pub fn networks(&self) -> Vec<String> {
        docker_lines(&[
            "network",
            "ls",
            "--filter",
            &format!("label={TEST_LABEL}={}", self.id),
            "--format",
            "{{.Name}}",
        ])
        .into_iter()
        .filter(|n| n.starts_with("agentbox-"))
        .collect()
    }

    /// Part of the drop guard: removes this test's networks, by id (two networks may share a
    /// name); never panics.
    fn remove_networks(&self) {
        let Ok(out) = Command::new("docker")
            .args(["network", "ls", "--filter"])
            .arg(format!("label={TEST_LABEL}={}", self.id))
            .args(["--format", "{{.ID}} {{.Name}}"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            return;
        };
        let ids: Vec<String> = lines(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter_map(|l| {
                let (id, name) = l.split_once(' ')?;
                name.starts_with("agentbox-").then(|| id.to_owned())
            })
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["network", "rm"])
                .args(&ids)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// The machine-wide port ledger `$XDG_STATE_HOME/agentbox/ports.json`: host port -> entry.
    /// Missing or empty is an empty ledger.
    pub fn port_ledger(&self) -> BTreeMap<u16, Value> {
        let path = self.state_root().join("ports.json");
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => panic!("cannot read {}: {e}", path.display()),
        };
        if bytes.is_empty() {
            return BTreeMap::new();
        }
        let ledger: BTreeMap<String, Value> = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not a JSON object: {e}", path.display()));
        ledger
            .into_iter()
            .map(|(port, entry)| {
                let port = port
                    .parse()
                    .unwrap_or_else(|_| panic!("ledger key {port:?} is not a port"));
                (port, entry)
            })
            .collect()
    }

    /// Every file under `$XDG_STATE_HOME/agentbox/`, recursively.
    pub fn state_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.state_root(), &mut found);
        found.sort();
        found
    }

    /// The repository's id as agentbox uses it in names: the one directory under
    /// `$XDG_STATE_HOME/agentbox/` (exists once a task was started).
    pub fn repo_id(&self) -> String {
        let dirs: Vec<String> = fs::read_dir(self.state_root())
            .expect("state dir exists once a task ran")
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(dirs.len(), 1, "one repository in the state dir: {dirs:?}");
        dirs.into_iter().next().unwrap()
    }
}

/// The file in a task's worktree that [`wait_for_release`] waits for and [`TestEnv::release`]
/// creates.
pub const RELEASE: &str = ".agentbox-test-release";

/// A shell loop that waits (inside the container) until the test calls [`TestEnv::release`] for the
/// task, then deletes the file again (so it is not part of the task's work). Nothing of the
/// repository's git dir is mounted into a task, so the signal goes through the task's own worktree.
pub fn wait_for_release() -> String {
    wait_for_file(RELEASE)
}

impl TestEnv {
    /// Releases a task that waits in [`wait_for_release`].
    pub fn release(&self, task: &str) {
        touch(&self.worktree_path(task).join(RELEASE));
    }
}

impl Spawned {
    /// The process's stdin, when the command was given a piped one (once).
    pub fn take_stdin(&mut self) -> std::process::ChildStdin {
        self.child
            .as_mut()
            .and_then(|c| c.stdin.take())
            .expect("the command was started with a piped stdin")
    }

    /// Waits until the process prints a line for which `matches` holds, and returns it. Panics
    /// (showing what the process printed) if it ends first or nothing comes within [`TIMEOUT`].
    #[track_caller]
    pub fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let out = self.finish();
                    panic!("process ended before printing {what}\n{out}");
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.signal(Signal::KILL);
                    let out = self.finish();
                    panic!("no line {what} within {TIMEOUT:?}\n{out}");
                }
            }
        }
    }

    /// The next line within `timeout`, if one comes (and the process has not ended).
    pub fn line_within(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Whether the process was already waited for (e.g. by a [`Spawned::wait_for_line`] that
    /// failed because it ended).
    pub fn is_finished(&self) -> bool {
        self.child.is_none()
    }
}

// ---- concurrency (many tasks in one repository) -----------------------------------------------------

impl TestEnv {
    /// Whether the engine reports the container `id` as running.
    pub fn is_running(&self, id: &str) -> bool {
        self.inspect(id)["State"]["Running"] == true
    }
}

// ---- terminals: a pseudo-terminal from util-linux's `script` ----------------------------------------

/// Quotes a word for `sh`.
pub fn sh_quote(word: &OsStr) -> String {
    format!("'{}'", word.to_string_lossy().replace('\'', r"'\''"))
}

/// The command line of `cmd` (program and arguments), quoted for `sh`.
pub fn sh_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(sh_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `script` running `shell` (an `sh` script) on a fresh pseudo-terminal, with `inner`'s
/// environment and directory; its stdin is piped (what the test types), its stdout is what the
/// terminal shows. `script -e` exits with the script's exit code.
pub fn on_a_terminal(inner: &Command, shell: &str) -> Command {
    let mut script = Command::new("script");
    script
        .args(["-qec", shell, "/dev/null"])
        .env_clear()
        .stdin(Stdio::piped());
    if let Some(dir) = inner.get_current_dir() {
        script.current_dir(dir);
    }
    for (key, value) in inner.get_envs() {
        if let Some(value) = value {
            script.env(key, value);
        }
    }
    script
}
