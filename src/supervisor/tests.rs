//! The supervisor's and the teardown's decisions, driven through the fake engine over a real
//! repository: what a run leaves, what a failed creation rolls back, and how a teardown cut short at
//! any step is finished by recovery without losing anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use indexmap::IndexMap;
use tokio::sync::{mpsc, watch};

use super::{RunError, RunOutcome, RunRequest, StopLevel};
use crate::config::ServiceConfig;
use crate::git::Identity;
use crate::recovery;
use crate::runtime::fake::FakeRuntime;
use crate::task::{TaskName, TaskState};
use crate::teardown::{self, Ending, Leftovers, Step};
use crate::workspace::Workspace;

pub(crate) struct Fixture {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    pub(crate) ws: Workspace,
}

fn git(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A repository with two files in one commit on `main`, and its workspace.
pub(crate) fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().canonicalize().unwrap();
    let repo = root.join("proj");
    std::fs::create_dir_all(repo.join("dir")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"], &[]);
    git(&repo, &["config", "user.name", "t"], &[]);
    git(&repo, &["config", "user.email", "t@t"], &[]);
    std::fs::write(repo.join("a.txt"), "a\n").unwrap();
    std::fs::write(repo.join("dir/b.txt"), "b\n").unwrap();
    git(&repo, &["add", "-A"], &[]);
    git(&repo, &["commit", "-q", "-m", "initial"], &[]);
    let ws = Workspace::open(&repo, &root.join("state")).unwrap();
    Fixture {
        _tmp: tmp,
        repo,
        ws,
    }
}

impl Fixture {
    /// A task with a port and a service.
    pub(crate) fn request(&self, task: &str) -> RunRequest {
        let mut request = RunRequest::new(TaskName::parse(task).unwrap(), "img");
        request.ports = IndexMap::from([("web".to_owned(), 3000)]);
        request.services = IndexMap::from([(
            "db".to_owned(),
            ServiceConfig {
                image: "db-img".into(),
                env: IndexMap::new(),
                ports: IndexMap::new(),
                command: None,
                limits: Default::default(),
            },
        )]);
        request.stop_timeout = Duration::from_secs(1);
        request
    }

    async fn run(&self, fake: &FakeRuntime, request: RunRequest) -> Result<RunOutcome, RunError> {
        let (events, mut received) = mpsc::channel(64);
        let drain = tokio::spawn(async move { while received.recv().await.is_some() {} });
        let (_stop, stop) = watch::channel(StopLevel::Continue);
        let result = super::run(&self.ws, fake, request, events, stop).await;
        let _ = drain.await;
        result
    }

    fn branch_tip(&self, task: &str) -> Option<String> {
        self.ws
            .repo
            .branch_tip(&format!("agentbox/{task}"))
            .unwrap()
            .map(|id| id.to_string())
    }

    fn file_at(&self, rev: &str, path: &str) -> Option<String> {
        let out = Command::new("git")
            .args(["cat-file", "-p", &format!("{rev}:{path}")])
            .current_dir(&self.repo)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn subjects(&self, range: &str) -> Vec<String> {
        git(&self.repo, &["log", "--format=%s", range], &[])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Asserts that nothing of the task is left but (possibly) its branch.
    fn assert_no_trace(&self, fake: &FakeRuntime, task: &str) {
        let name = TaskName::parse(task).unwrap();
        let dirs = self.ws.task_dirs(&name, &self.ws.worktree_path(&name));
        for dir in [&dirs.worktree, &dirs.git_dir, &dirs.scratch] {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert_eq!(
            fake.containers(),
            Vec::<String>::new(),
            "containers are left"
        );
        assert_eq!(fake.networks(), Vec::<String>::new(), "networks are left");
        let owner = crate::ports::Owner {
            repo_id: self.ws.repo_id.clone(),
            task: task.to_owned(),
        };
        assert!(
            self.ws.ports.held_by(&owner).unwrap().is_empty(),
            "ports are still held"
        );
    }
}

/// The task's command, played on the host: a commit in the task's own git dir (`committed.txt`)
/// and a file left uncommitted in the worktree (`wip.txt`).
fn plays_a_task(fx: &Fixture, fake: &FakeRuntime, task: &str) {
    let name = TaskName::parse(task).unwrap();
    let dirs = fx.ws.task_dirs(&name, &fx.ws.worktree_path(&name));
    fake.command(Arc::new(move |_| {
        commit_in_task(
            &dirs.git_dir,
            &dirs.worktree,
            "committed.txt",
            "by the task",
        );
        std::fs::write(dirs.worktree.join("wip.txt"), "uncommitted\n").unwrap();
    }));
}

fn commit_in_task(git_dir: &Path, worktree: &Path, file: &str, message: &str) {
    std::fs::write(worktree.join(file), format!("{message}\n")).unwrap();
    let env = [("GIT_DIR", git_dir), ("GIT_WORK_TREE", worktree)];
    git(worktree, &["add", file], &env);
    git(worktree, &["commit", "-q", "-m", message], &env);
}

#[tokio::test]
async fn a_run_leaves_the_work_on_its_branch_and_nothing_else() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    plays_a_task(&fx, &fake, "t");
    let outcome = fx.run(&fake, fx.request("t")).await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    let tip = fx.branch_tip("t").unwrap();
    assert_eq!(
        outcome.summary.snapshot_commit.as_deref(),
        Some(tip.as_str())
    );
    assert_eq!(
        fx.subjects("main..agentbox/t"),
        [
            "agentbox: snapshot of uncommitted work in task t",
            "by the task"
        ]
    );
    assert_eq!(
        fx.file_at(&tip, "wip.txt").as_deref(),
        Some("uncommitted\n")
    );
    assert_eq!(
        fx.file_at(&tip, ".env.agentbox"),
        None,
        "the env file is never committed"
    );
    fx.assert_no_trace(&fake, "t");
    let record = fx
        .ws
        .state
        .read(&TaskName::parse("t").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(record.state, TaskState::Exited);
    let calls = fake.calls();
    let position = |prefix: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {calls:?}"))
    };
    assert!(
        position("attach") < position("start"),
        "attached before start: {calls:?}"
    );
    assert!(position("create_network") < position("create_service"));
    assert!(position("create_service") < position("create_container"));
}

#[tokio::test]
async fn every_creation_step_failing_rolls_back_fully() {
    for step in [
        "create_network",
        "create_service",
        "create_container",
        "attach",
        "start",
    ] {
        for defer_deletion in [false, true] {
            let fx = fixture();
            let fake = FakeRuntime::default();
            fake.fail_on(step);
            let mut request = fx.request("t");
            request.defer_deletion = defer_deletion;
            let err = fx.run(&fake, request).await.unwrap_err();
            let case = format!("{step}, defer_deletion {defer_deletion}");
            assert!(err.to_string().contains("fake engine"), "{case}: {err}");
            fx.assert_no_trace(&fake, "t");
            assert_eq!(
                fx.branch_tip("t"),
                None,
                "{case}: the new branch is rolled back"
            );
            assert!(
                fx.ws.state.list().unwrap().is_empty(),
                "{case}: no record is left"
            );
            assert!(
                crate::trash::manifests(&fx.ws.state).is_empty(),
                "{case}: nothing is left for a purge"
            );
        }
    }
}

/// A commit on top of `main` with a file whose name is too long for any file system: git can
/// store it, but no checkout of it succeeds.
fn commit_that_cannot_be_checked_out(fx: &Fixture) -> String {
    let blob = git(&fx.repo, &["hash-object", "-w", "a.txt"], &[]);
    let long = "x".repeat(300);
    let listing = format!("100644 blob {blob}\t{long}\n");
    let mut mktree = Command::new("git")
        .args(["mktree"])
        .current_dir(&fx.repo)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut mktree.stdin.take().unwrap(), listing.as_bytes()).unwrap();
    let tree = mktree.wait_with_output().unwrap();
    assert!(tree.status.success());
    let tree = String::from_utf8_lossy(&tree.stdout).trim().to_owned();
    git(
        &fx.repo,
        &["commit-tree", "-m", "too long", "-p", "main", &tree],
        &[],
    )
}

/// A creation step outside the engine, and what makes it fail with real git and real files.
#[derive(Debug, Clone, Copy)]
enum HostStep {
    Checkout,
    Ports,
    Copy,
    EnvFile,
}

impl HostStep {
    /// Sets the failure up; returns the commit the task's branch would start from.
    fn make_fail(self, fx: &Fixture, request: &mut RunRequest) -> String {
        match self {
            Self::Checkout => {
                let commit = commit_that_cannot_be_checked_out(fx);
                request.base = Some(commit.clone());
                return commit;
            }
            Self::Ports => {
                // The only port of the range is another task's.
                let range = crate::config::PortRange {
                    first: 20999,
                    last: 20999,
                };
                let other = crate::ports::Owner {
                    repo_id: fx.ws.repo_id.clone(),
                    task: "other".into(),
                };
                fx.ws
                    .ports
                    .reserve(&other, &["web".to_owned()], range, &Default::default())
                    .unwrap();
                request.port_range = range;
            }
            Self::Copy => {
                request.copy_from = Some(fx.repo.clone());
                request.copy = vec![PathBuf::from("not-there.txt")];
            }
            // A directory of the checkout is where the env file would go.
            Self::EnvFile => request.env_file_name = "dir".into(),
        }
        git(&fx.repo, &["rev-parse", "main"], &[])
    }

    /// What the error says.
    fn says(self) -> &'static str {
        match self {
            Self::Checkout => "File name too long",
            Self::Ports => "no free host port left in range 20999-20999 for task t",
            Self::Copy => "not-there.txt",
            Self::EnvFile => "dir is not a regular file",
        }
    }
}

#[tokio::test]
async fn every_host_creation_step_failing_rolls_back_fully() {
    for step in [
        HostStep::Checkout,
        HostStep::Ports,
        HostStep::Copy,
        HostStep::EnvFile,
    ] {
        for defer_deletion in [false, true] {
            for branch_existed in [false, true] {
                let case = format!(
                    "{step:?}, defer_deletion {defer_deletion}, branch existed {branch_existed}"
                );
                let fx = fixture();
                let fake = FakeRuntime::default();
                let mut request = fx.request("t");
                request.defer_deletion = defer_deletion;
                let start = step.make_fail(&fx, &mut request);
                if branch_existed {
                    git(&fx.repo, &["branch", "agentbox/t", &start], &[]);
                }
                let err = fx.run(&fake, request).await.unwrap_err();
                assert!(err.to_string().contains(step.says()), "{case}: {err}");
                fx.assert_no_trace(&fake, "t");
                assert_eq!(
                    fx.branch_tip("t"),
                    branch_existed.then_some(start),
                    "{case}: only a branch that existed before stays, where it was"
                );
                assert!(
                    fx.ws.state.list().unwrap().is_empty(),
                    "{case}: no record is left"
                );
                assert!(
                    crate::trash::manifests(&fx.ws.state).is_empty(),
                    "{case}: nothing is left for a purge"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_rollback_keeps_a_branch_that_existed_before() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    plays_a_task(&fx, &fake, "t");
    fx.run(&fake, fx.request("t")).await.unwrap();
    let tip = fx.branch_tip("t");
    let fake = FakeRuntime::default();
    fake.fail_on("create_container");
    fx.run(&fake, fx.request("t")).await.unwrap_err();
    assert_eq!(fx.branch_tip("t"), tip, "the branch and its work stay");
    fx.assert_no_trace(&fake, "t");
}

/// Leaves task `t` as a supervisor that died right after the command ended would: containers
/// stopped, a commit in the task's git dir that was never imported, uncommitted work in the
/// worktree, the record in `tearing-down`.
async fn ended_but_not_torn_down(fx: &Fixture, fake: &FakeRuntime) {
    plays_a_task(fx, fake, "t");
    let mut request = fx.request("t");
    request.keep = true;
    fx.run(fake, request).await.unwrap();
    let name = TaskName::parse("t").unwrap();
    let dirs = fx.ws.task_dirs(&name, &fx.ws.worktree_path(&name));
    commit_in_task(
        &dirs.git_dir,
        &dirs.worktree,
        "later.txt",
        "later by the task",
    );
    std::fs::write(dirs.worktree.join("wip2.txt"), "more\n").unwrap();
    let mut record = fx.ws.state.read(&name).unwrap().unwrap();
    record.state = TaskState::TearingDown;
    fx.ws.state.write(&record).unwrap();
    // Its ports are still promised to it.
    let owner = crate::ports::Owner {
        repo_id: fx.ws.repo_id.clone(),
        task: "t".into(),
    };
    let names = ["web".to_owned()];
    let range = crate::config::PortRange::default();
    fx.ws
        .ports
        .reserve(&owner, &names, range, &Default::default())
        .unwrap();
}

fn teardown_options(ending: Ending) -> teardown::Options {
    teardown::Options {
        stop_timeout: Duration::from_secs(1),
        by: "a test",
        keep: false,
        release_ports: true,
        dry_run: false,
        max_file_size: teardown::DEFAULT_MAX_SNAPSHOT_FILE,
        identity: Identity::fallback(),
        ending,
        discard_unsaved: false,
        defer_deletion: false,
        processes_gone: Vec::new(),
    }
}

/// Runs the teardown of `t` and "crashes" (panics, dropping the task's lock as a dying process
/// would) right after step `crash_after`. Returns the steps taken.
async fn tear_down_and_crash(fx: &Fixture, fake: &FakeRuntime, crash_after: usize) -> usize {
    let name = TaskName::parse("t").unwrap();
    let claim = fx.ws.state.try_claim(&name).unwrap().unwrap();
    let mut record = fx.ws.state.read(&name).unwrap().unwrap();
    let leftovers = Leftovers::find(fake, &fx.ws.repo_id, &name, None)
        .await
        .unwrap();
    let options = teardown_options(Ending::Exited);
    let mut taken = 0;
    let mut crash = |_: &Step| {
        taken += 1;
        if taken > crash_after {
            panic!("simulated crash after step {crash_after}");
        }
    };
    let teardown = teardown::tear_down(
        &fx.ws,
        fake,
        &mut record,
        leftovers,
        &options,
        &claim,
        &mut crash,
    );
    let _ = std::panic::AssertUnwindSafe(teardown).catch_unwind().await;
    drop(claim);
    taken
}

#[tokio::test]
async fn a_teardown_cut_short_at_any_step_is_finished_by_recovery_without_loss() {
    // How many steps a whole teardown of this state takes.
    let steps = {
        let fx = fixture();
        let fake = FakeRuntime::default();
        ended_but_not_torn_down(&fx, &fake).await;
        tear_down_and_crash(&fx, &fake, usize::MAX).await
    };
    assert!(
        steps >= 7,
        "two containers, a network, the import, the worktree, the ports, the record: {steps}"
    );
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for crash_after in 0..steps {
        let fx = fixture();
        let fake = FakeRuntime::default();
        ended_but_not_torn_down(&fx, &fake).await;
        tear_down_and_crash(&fx, &fake, crash_after).await;

        let options = recovery::Options {
            dry_run: false,
            stop_timeout: Duration::from_secs(1),
            max_file_size: teardown::DEFAULT_MAX_SNAPSHOT_FILE,
        };
        let mut failed = Vec::new();
        recovery::reconcile(&fx.ws, &fake, &options, &mut |step| {
            if !step.ok {
                failed.push(step.clone());
            }
        })
        .await
        .unwrap();
        assert!(failed.is_empty(), "crash after {crash_after}: {failed:?}");

        fx.assert_no_trace(&fake, "t");
        let tip = fx.branch_tip("t").unwrap();
        for (file, contents) in [
            ("committed.txt", "by the task\n"),
            ("later.txt", "later by the task\n"),
            ("wip.txt", "uncommitted\n"),
            ("wip2.txt", "more\n"),
        ] {
            assert_eq!(
                fx.file_at(&tip, file).as_deref(),
                Some(contents),
                "crash after {crash_after}: {file} on the branch"
            );
        }
        let subjects: BTreeSet<String> = fx.subjects("main..agentbox/t").into_iter().collect();
        assert!(
            subjects.contains("later by the task"),
            "crash after {crash_after}"
        );
        let snapshots = fx
            .subjects("main..agentbox/t")
            .iter()
            .filter(|s| s.starts_with("agentbox: snapshot"))
            .count();
        assert_eq!(
            snapshots, 1,
            "crash after {crash_after}: one snapshot, not two"
        );
        let record = fx
            .ws
            .state
            .read(&TaskName::parse("t").unwrap())
            .unwrap()
            .unwrap();
        assert!(
            !record.state.is_active() && record.state != TaskState::Kept,
            "crash after {crash_after}: {:?}",
            record.state
        );

        // A second recovery finds nothing to do.
        let mut steps_again = 0;
        recovery::reconcile(&fx.ws, &fake, &options, &mut |_| steps_again += 1)
            .await
            .unwrap();
        assert_eq!(
            steps_again, 0,
            "crash after {crash_after}: a second teardown is a no-op"
        );
    }
    std::panic::set_hook(quiet);
}

#[tokio::test]
async fn a_second_teardown_of_a_torn_down_task_does_nothing() {
    for defer_deletion in [false, true] {
        let fx = fixture();
        let fake = FakeRuntime::default();
        plays_a_task(&fx, &fake, "t");
        let mut request = fx.request("t");
        request.defer_deletion = defer_deletion;
        fx.run(&fake, request).await.unwrap();
        let name = TaskName::parse("t").unwrap();
        let before = fx.ws.state.read(&name).unwrap().unwrap();
        let tip = fx.branch_tip("t");
        let calls = fake.calls().len();

        let claim = fx.ws.state.try_claim(&name).unwrap().unwrap();
        let mut record = before.clone();
        let leftovers = Leftovers::find(&fake, &fx.ws.repo_id, &name, None)
            .await
            .unwrap();
        let mut steps = Vec::new();
        let report = teardown::tear_down(
            &fx.ws,
            &fake,
            &mut record,
            leftovers,
            &teardown_options(Ending::Exited),
            &claim,
            &mut |step| steps.push(step.clone()),
        )
        .await;
        let case = format!("defer_deletion {defer_deletion}");
        assert!(steps.is_empty(), "{case}: {steps:?}");
        assert!(
            report.problems.is_empty() && report.notices.is_empty(),
            "{case}"
        );
        assert_eq!(report.snapshot_commit, None, "{case}: no second snapshot");
        assert_eq!(record, before, "{case}: the record is as it was");
        assert_eq!(fx.ws.state.read(&name).unwrap().unwrap(), before, "{case}");
        assert_eq!(fx.branch_tip("t"), tip, "{case}: the branch did not move");
        // Nothing but the look for leftovers (which the fake does not count) reached the engine.
        assert_eq!(fake.calls().len(), calls, "{case}: {:?}", fake.calls());
        fx.assert_no_trace(&fake, "t");
    }
}

#[tokio::test]
async fn a_damaged_record_is_named_and_keeps_no_other_task_from_being_recovered() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    ended_but_not_torn_down(&fx, &fake).await;
    let tasks_dir = fx.ws.state.root().join("tasks");
    // One record lacks a field, one is not JSON at all.
    let mut lacking: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tasks_dir.join("t.json")).unwrap()).unwrap();
    lacking["name"] = "nobase".into();
    lacking.as_object_mut().unwrap().remove("base_commit");
    let nobase = tasks_dir.join("nobase.json");
    std::fs::write(&nobase, serde_json::to_vec(&lacking).unwrap()).unwrap();
    let junk = tasks_dir.join("junk.json");
    std::fs::write(&junk, "{ half a record").unwrap();
    let names_task_and_file = |error: &str, task: &str, file: &Path| {
        assert!(
            error.contains(&format!("task {task} ")) && error.contains(&file.display().to_string()),
            "{error}"
        );
    };

    let listed = crate::inspect::list(&fx.ws).unwrap();
    let names: Vec<&str> = listed.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["t"], "the readable task is listed");
    let damaged: Vec<String> = listed.damaged.iter().map(|e| e.to_string()).collect();
    assert_eq!(damaged.len(), 2, "{damaged:?}");
    names_task_and_file(&damaged[0], "junk", &junk);
    names_task_and_file(&damaged[1], "nobase", &nobase);
    assert!(damaged[1].contains("base_commit"), "{}", damaged[1]);

    let options = recovery::Options {
        dry_run: false,
        stop_timeout: Duration::from_secs(1),
        max_file_size: teardown::DEFAULT_MAX_SNAPSHOT_FILE,
    };
    let summary = recovery::reconcile(&fx.ws, &fake, &options, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(summary.damaged.len(), 2, "{:?}", summary.damaged);
    assert_eq!(summary.failed, 0);
    fx.assert_no_trace(&fake, "t");
    assert_eq!(
        fx.file_at("agentbox/t", "wip2.txt").as_deref(),
        Some("more\n"),
        "the other task was recovered"
    );
    assert!(
        nobase.exists() && junk.exists(),
        "damaged records are left alone"
    );

    let removal = crate::control::remove(
        &fx.ws,
        Some(&fake),
        &TaskName::parse("nobase").unwrap(),
        false,
        false,
    )
    .await
    .unwrap_err();
    names_task_and_file(&removal.to_string(), "nobase", &nobase);
}

#[tokio::test]
async fn a_failed_teardown_step_keeps_the_engines_error_as_its_cause() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    ended_but_not_torn_down(&fx, &fake).await;
    fake.fail_on("remove_container");
    let name = TaskName::parse("t").unwrap();
    let claim = fx.ws.state.try_claim(&name).unwrap().unwrap();
    let record = fx.ws.state.read(&name).unwrap().unwrap();
    let err = recovery::recover_for_run(&fx.ws, &fake, &record, &claim, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fake engine"), "{err}");
    let mut chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source());
    assert!(
        chain.any(|e| e.downcast_ref::<crate::runtime::RuntimeError>().is_some()),
        "the engine's error is in the chain of {err:?}"
    );
}

#[tokio::test]
async fn a_half_removed_worktree_is_never_committed_as_deletions() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    ended_but_not_torn_down(&fx, &fake).await;
    let name = TaskName::parse("t").unwrap();
    let dirs = fx.ws.task_dirs(&name, &fx.ws.worktree_path(&name));
    let mut record = fx.ws.state.read(&name).unwrap().unwrap();
    record.state = TaskState::RemovingWorktree;
    fx.ws.state.write(&record).unwrap();
    std::fs::remove_file(dirs.worktree.join("a.txt")).unwrap();
    std::fs::remove_dir_all(dirs.worktree.join("dir")).unwrap();
    let before = fx.branch_tip("t");

    let options = recovery::Options {
        dry_run: false,
        stop_timeout: Duration::from_secs(1),
        max_file_size: teardown::DEFAULT_MAX_SNAPSHOT_FILE,
    };
    recovery::reconcile(&fx.ws, &fake, &options, &mut |_| {})
        .await
        .unwrap();
    fx.assert_no_trace(&fake, "t");
    let tip = fx.branch_tip("t").unwrap();
    assert_eq!(
        fx.file_at(&tip, "a.txt").as_deref(),
        Some("a\n"),
        "no deletion was committed"
    );
    // The commit the task made is imported, but no snapshot of the half-removed worktree is made.
    assert_ne!(Some(tip.clone()), before);
    assert_eq!(fx.subjects("agentbox/t")[0], "later by the task");
}

#[tokio::test]
async fn an_out_of_memory_exit_is_recorded_and_the_work_kept() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    plays_a_task(&fx, &fake, "t");
    fake.exit_with(crate::runtime::Exit {
        code: 137,
        oom_killed: true,
    });
    let mut request = fx.request("t");
    request.limits.memory_bytes = Some(64 << 20);
    let outcome = fx.run(&fake, request).await.unwrap();
    assert_eq!(outcome.exit_code, 137);
    assert!(outcome.oom_killed);
    let tip = fx.branch_tip("t").unwrap();
    assert_eq!(
        fx.file_at(&tip, "wip.txt").as_deref(),
        Some("uncommitted\n")
    );
    let record = fx
        .ws
        .state
        .read(&TaskName::parse("t").unwrap())
        .unwrap()
        .unwrap();
    assert!(record.oom_killed);
    assert_eq!(
        super::out_of_memory_message(&record.name, record.memory_limit),
        "task t was killed: out of memory (limit 64 MiB)"
    );
}

#[tokio::test]
async fn a_command_the_image_lacks_is_reported_in_agentboxs_words() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    fake.output(vec![crate::runtime::Output::NotStarted {
        not_found: true,
        command: "make".into(),
    }]);
    fake.exit_with(crate::runtime::Exit {
        code: 127,
        oom_killed: false,
    });
    let (events, mut received) = mpsc::channel(64);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(event) = received.recv().await {
            all.push(event);
        }
        all
    });
    let (_stop, stop) = watch::channel(StopLevel::Continue);
    let outcome = super::run(&fx.ws, &fake, fx.request("t"), events, stop)
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, 127);
    let events = collect.await.unwrap();
    assert!(
        events.contains(&super::RunEvent::StartFailed {
            message: "command not found in image img: make".into()
        }),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, super::RunEvent::Output(_))),
        "the engine's own words are not passed on: {events:?}"
    );
}

#[tokio::test]
async fn a_deferred_deletion_leaves_a_manifest_that_the_purge_finishes() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    plays_a_task(&fx, &fake, "t");
    let mut request = fx.request("t");
    request.defer_deletion = true;
    let outcome = fx.run(&fake, request).await.unwrap();
    let manifest = outcome
        .summary
        .trash
        .expect("the directories were moved aside");
    // The task's paths are free at once; what was moved aside waits for the purge.
    fx.assert_no_trace(&fake, "t");
    let listed: crate::trash::Manifest =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(listed.paths.len(), 3, "{listed:?}");
    assert!(listed.paths.iter().all(|p| p.exists()));
    crate::trash::purge(&fake, &manifest).await.unwrap();
    assert!(listed.paths.iter().all(|p| !p.exists()));
    assert!(!manifest.exists());
    assert_eq!(
        fx.file_at("agentbox/t", "wip.txt").as_deref(),
        Some("uncommitted\n"),
        "the work was safe before anything was deleted"
    );
}

#[tokio::test]
async fn a_deferred_teardown_leaves_the_stopped_container_to_the_purge_under_another_name() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    plays_a_task(&fx, &fake, "t");
    let mut request = fx.request("t");
    // No services: no network of the task's own, which would have to go after the container.
    request.services.clear();
    request.defer_deletion = true;
    let outcome = fx.run(&fake, request).await.unwrap();
    let manifest = outcome.summary.trash.expect("there is something to purge");
    let listed: crate::trash::Manifest =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(listed.containers.len(), 1, "{listed:?}");
    assert_eq!(listed.paths.len(), 3, "{listed:?}");
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.starts_with("remove_container")),
        "the result does not wait for the removal: {:?}",
        fake.calls()
    );
    let task_container = fx.ws.container_name(&TaskName::parse("t").unwrap());
    let left = fake.containers();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(
        left[0], task_container,
        "the name is free for the next run of t"
    );
    assert_eq!(
        fx.file_at("agentbox/t", "wip.txt").as_deref(),
        Some("uncommitted\n"),
        "the work is safe"
    );

    crate::trash::purge(&fake, &manifest).await.unwrap();
    assert_eq!(fake.containers(), Vec::<String>::new());
    assert!(listed.paths.iter().all(|p| !p.exists()));
    assert!(!manifest.exists());
}

#[tokio::test]
async fn a_deferred_teardown_removes_a_container_it_cannot_rename() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let mut request = fx.request("t");
    request.services.clear();
    request.defer_deletion = true;
    fake.fail_on("rename_container");
    let outcome = fx.run(&fake, request).await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        fake.containers(),
        Vec::<String>::new(),
        "a container that keeps its name would be in the way of the next run"
    );
}

#[tokio::test]
async fn an_interactive_run_starts_only_once_its_client_opened_the_gate() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let mut request = fx.request("it");
    request.interactive = super::Interactive {
        stdin: true,
        tty: true,
        size: Some((33, 101)),
    };
    let (open, gate) = watch::channel(false);
    request.start_gate = Some(gate);
    let (events, mut received) = mpsc::channel(64);
    let (_stop, stop) = watch::channel(StopLevel::Continue);
    let opener = {
        let fake = fake.clone();
        tokio::spawn(async move {
            // The client attaches once the container exists, then lets the command start.
            while let Some(event) = received.recv().await {
                if let super::RunEvent::Created { .. } = event {
                    assert!(
                        !fake.calls().iter().any(|c| c.starts_with("start ")),
                        "nothing starts before the gate opens: {:?}",
                        fake.calls()
                    );
                    open.send(true).unwrap();
                }
            }
        })
    };
    let outcome = super::run(&fx.ws, &fake, request, events, stop)
        .await
        .unwrap();
    opener.await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    let calls = fake.calls();
    let start = calls.iter().position(|c| c.starts_with("start ")).unwrap();
    let resize = calls.iter().position(|c| c.starts_with("resize ")).unwrap();
    assert!(
        resize > start,
        "the size is passed after the start: {calls:?}"
    );
    assert!(calls[resize].ends_with(" 33x101"), "{calls:?}");
    let record = fx
        .ws
        .state
        .read(&TaskName::parse("it").unwrap())
        .unwrap()
        .unwrap();
    assert!(record.tty && record.stdin && !record.idle);
}

#[tokio::test]
async fn a_stop_while_the_gate_is_closed_rolls_back() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let mut request = fx.request("gated");
    let (_open, gate) = watch::channel(false);
    request.start_gate = Some(gate);
    let (events, mut received) = mpsc::channel(64);
    let (stop_tx, stop) = watch::channel(StopLevel::Continue);
    let stopper = tokio::spawn(async move {
        while let Some(event) = received.recv().await {
            if let super::RunEvent::Created { .. } = event {
                stop_tx
                    .send(StopLevel::Graceful(super::StopSignal::Interrupt))
                    .unwrap();
            }
        }
    });
    let result = super::run(&fx.ws, &fake, request, events, stop).await;
    stopper.await.unwrap();
    assert!(
        matches!(result, Err(RunError::InterruptedBeforeStart { .. })),
        "{result:?}"
    );
    assert!(!fake.calls().iter().any(|c| c.starts_with("start ")));
    fx.assert_no_trace(&fake, "gated");
}

#[tokio::test]
async fn a_long_lived_task_idles_instead_of_running_a_command() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let mut request = fx.request("idle");
    request.command = Some(vec!["make".into()]);
    request.idle = true;
    fx.run(&fake, request).await.unwrap();
    let record = fx
        .ws
        .state
        .read(&TaskName::parse("idle").unwrap())
        .unwrap()
        .unwrap();
    assert!(record.idle);
    assert_eq!(record.command, super::IDLE_COMMAND);
}

#[tokio::test]
async fn a_bind_mount_from_inside_the_worktree_waits_for_the_checkout() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let name = TaskName::parse("m").unwrap();
    let inside = fx.ws.worktree_path(&name).join("dir");
    let mut request = fx.request("m");
    request.mounts = vec![crate::runtime::Mount {
        source: inside.display().to_string(),
        target: "/dir".into(),
        read_only: false,
    }];
    // The fake engine, like the real one, refuses a bind source that does not exist yet.
    let outcome = fx.run(&fake, request).await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    fx.assert_no_trace(&fake, "m");
}

/// What the task's "command" found of its worktree when it ran.
fn records_what_the_command_finds(
    fx: &Fixture,
    fake: &FakeRuntime,
    task: &str,
) -> Arc<Mutex<Vec<String>>> {
    let name = TaskName::parse(task).unwrap();
    let worktree = fx.ws.worktree_path(&name);
    let found = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&found);
    fake.command(Arc::new(move |_| {
        let mut seen = seen.lock().unwrap();
        for file in ["a.txt", "dir/b.txt", ".env.agentbox"] {
            if worktree.join(file).is_file() {
                seen.push(file.to_owned());
            }
        }
    }));
    found
}

#[tokio::test]
async fn a_container_starts_only_once_the_worktree_is_ready() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let found = records_what_the_command_finds(&fx, &fake, "early");
    let outcome = fx.run(&fake, fx.request("early")).await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        *found.lock().unwrap(),
        ["a.txt", "dir/b.txt", ".env.agentbox"],
        "the command ran once, in a complete worktree"
    );
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.starts_with("attach_interactive")),
        "no gate: the image's shell and environment may be a task's: {:?}",
        fake.calls()
    );
    fx.assert_no_trace(&fake, "early");
}

#[tokio::test]
async fn a_command_never_runs_when_the_checkout_fails() {
    let fx = fixture();
    let fake = FakeRuntime::default();
    let found = records_what_the_command_finds(&fx, &fake, "broken");
    let mut request = fx.request("broken");
    request.env_file_name = "dir".into();
    let result = fx.run(&fake, request).await;
    assert!(result.is_err(), "{result:?}");
    assert!(found.lock().unwrap().is_empty(), "the command never ran");
    fx.assert_no_trace(&fake, "broken");
}
