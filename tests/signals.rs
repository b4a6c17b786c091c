//! Running tasks: signals, `stop`, `rm --force`, orphans, `logs -f`, and what `ls`, `diff` and
//! the state dir show while a task runs.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Leaves uncommitted work, says `ready`, then runs until stopped. The container's init (PID 1)
/// passes SIGTERM on to `sleep`, which ends at once.
const WIP: &str = "echo dirty > wip.txt; echo ready; exec sleep 300";

/// Like [`WIP`], but the shell handles the SIGTERM the init passes on and exits 0.
const WIP_TERM: &str = "echo dirty > wip.txt; trap 'exit 0' TERM; echo ready; sleep 300 & wait";

/// Like [`WIP`], but the shell ignores SIGTERM (and so does every `sleep` it starts, which inherits
/// that): only the kill after the grace period ends it.
const WIP_IGNORING_TERM: &str =
    "echo dirty > wip.txt; trap '' TERM; echo ready; while :; do sleep 1; done";

fn assert_stopped_with_snapshot(env: &TestEnv, task: &str) {
    env.assert_torn_down(task);
    env.assert_snapshot_holds(task, "wip.txt", "dirty\n");
}

#[test]
fn sigint_tears_down_and_exits_130() {
    let env = TestEnv::new("sigint");
    let mut run = env.spawn(["run", "int", "--stop-timeout", "1", "--", "sh", "-c", WIP]);
    run.wait_for_line("ready");
    run.signal(Signal::INT);
    let out = run.wait();
    out.expect_code(130);
    assert_stopped_with_snapshot(&env, "int");
}

#[test]
fn sigterm_tears_down_and_exits_143() {
    let env = TestEnv::new("sigterm");
    let mut run = env.spawn(["run", "term", "--stop-timeout", "1", "--", "sh", "-c", WIP]);
    run.wait_for_line("ready");
    run.signal(Signal::TERM);
    let out = run.wait();
    out.expect_code(143);
    assert_stopped_with_snapshot(&env, "term");
}

#[test]
fn stop_command_ends_running_task_after_teardown() {
    let env = TestEnv::new("stop");
    let mut run = env.spawn(["run", "stp", "--", "sh", "-c", WIP_TERM]);
    run.wait_for_line("ready");

    let stop = env.output(["stop", "stp"]);
    stop.expect_code(0);
    // `stop` returns when the teardown is done.
    assert_stopped_with_snapshot(&env, "stp");

    let out = run.wait();
    out.expect_code(143);
    assert_stopped_with_snapshot(&env, "stp");
}

#[test]
fn stop_time_option_overrides_the_grace_period() {
    let env = TestEnv::new("stop-time");
    // The command ignores SIGTERM, so `stop` ends only once the kill after `--time` came: not
    // before that second, and long before the 60 s the task was started with.
    let mut run = env.spawn([
        "run",
        "grace",
        "--stop-timeout",
        "60",
        "--",
        "sh",
        "-c",
        WIP_IGNORING_TERM,
    ]);
    run.wait_for_line("ready");

    let asked = Instant::now();
    let stop = env.output(["stop", "-t", "1", "grace"]);
    let took = asked.elapsed();
    stop.expect_code(0);
    assert!(
        took >= Duration::from_secs(1),
        "stop -t 1 took {took:?}: the command ignores SIGTERM, so it ended before its 1 s grace \
         period was up\n{stop}"
    );
    assert!(
        took < Duration::from_secs(30),
        "stop -t 1 took {took:?}: the task's 60 s grace period was used\n{stop}"
    );
    run.wait().expect_code(143);
    assert_stopped_with_snapshot(&env, "grace");
}

#[test]
fn rm_refuses_running_task_unless_forced() {
    let env = TestEnv::new("rm-force");
    let mut run = env.spawn(["run", "busy", "--stop-timeout", "1", "--", "sh", "-c", WIP]);
    run.wait_for_line("ready");

    let refused = env.output(["rm", "busy"]);
    refused.expect_code(1);
    refused.expect_stderr_contains("busy");
    assert_eq!(
        env.live_containers().len(),
        1,
        "refused rm leaves the task running"
    );
    assert!(env.worktree_path("busy").join("wip.txt").is_file());

    env.output(["rm", "--force", "busy"]).expect_code(0);
    let out = run.wait();
    out.expect_code(143);
    assert_stopped_with_snapshot(&env, "busy");
    assert!(env.ls_task("busy").is_none(), "rm --force forgets the task");
}

#[test]
fn second_run_of_running_task_is_refused_and_first_finishes() {
    let env = TestEnv::new("already-running");
    let base = env.head();
    let script = format!(
        "echo ready; {}; echo first > first.txt; git add first.txt; git commit -qm first-done",
        wait_for_file("go")
    );
    let mut first = env.spawn(["run", "dup", "--", "sh", "-c", &script]);
    first.wait_for_line("ready");

    let second = env.output(["run", "dup", "--", "sh", "-c", "echo second > second.txt"]);
    second.expect_code(125);
    second.expect_stderr_contains("already running");

    // The first run is untouched.
    let wt = env.worktree_path("dup");
    assert_eq!(env.live_containers().len(), 1, "the first task still runs");
    assert!(
        wt.join("README.md").is_file(),
        "its worktree is still there"
    );
    assert!(
        !wt.join("second.txt").exists(),
        "the second command never ran"
    );
    assert_eq!(
        env.ls_task("dup").expect("ls lists dup")["state"],
        "running"
    );

    touch(&wt.join("go"));
    let out = first.wait();
    out.expect_code(0);
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/dup")),
        ["first-done"]
    );
    env.assert_torn_down("dup");
}

#[test]
fn running_task_shows_in_ls_and_diff_and_has_its_own_git_dir() {
    let env = TestEnv::new("while-running");
    let base = env.head();
    let script = format!(
        "echo made > committed.txt && git add committed.txt && git commit -qm in-task || exit 9; \
         echo live >> README.md; echo ready; {}",
        wait_for_file("go")
    );
    let mut run = env.spawn(["run", "live", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");

    let running = env.live_containers();
    assert_eq!(running.len(), 1, "{}", env.container_report());
    let rec = env.ls_task("live").expect("ls lists live");
    assert_eq!(rec["state"], "running");
    assert_eq!(rec["exit_code"], serde_json::Value::Null);
    assert_eq!(rec["finished_at"], serde_json::Value::Null);
    assert_eq!(rec["base_commit"], base.as_str());
    let id = rec["container_id"]
        .as_str()
        .expect("container_id while running");
    assert!(
        !id.is_empty() && running[0].starts_with(id),
        "container_id {id} is the running container {}",
        running[0]
    );

    let diff = env.output(["diff", "live"]);
    diff.expect_code(0);
    for needle in ["README.md", "+live", "committed.txt", "+made"] {
        assert!(
            diff.stdout.contains(needle),
            "diff of a running task shows its worktree (committed or not) against the base: \
             {needle:?}\n{diff}"
        );
    }

    // The worktree and the task's own git dir exist while it runs; the worktree is no linked
    // worktree of the repository.
    let wt = env.worktree_path("live");
    let git_dir = env.task_git_dir("live");
    assert!(wt.join("README.md").is_file(), "{}", wt.display());
    assert!(git_dir.join("HEAD").is_file(), "{}", git_dir.display());
    assert!(env.scratch_dir("live").is_dir());
    assert_eq!(
        std::fs::read_to_string(wt.join(".git")).unwrap(),
        format!("gitdir: {}\n", git_dir.display())
    );
    assert!(
        env.worktree_entry(&wt).is_none(),
        "git worktree list must not show {}: {:?}",
        wt.display(),
        env.worktrees()
    );

    touch(&wt.join("go"));
    run.wait().expect_code(0);
    env.assert_snapshot_holds("live", "README.md", "hello\nlive\n");
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/live")),
        [
            "agentbox: snapshot of uncommitted work in task live",
            "in-task"
        ]
    );
    env.assert_torn_down("live");
}

#[test]
fn logs_follow_streams_until_task_ends() {
    let env = TestEnv::new("logs-follow");
    let script = format!("echo before; {}; echo after", wait_for_file("go"));
    let mut run = env.spawn(["run", "lf", "--", "sh", "-c", &script]);
    run.wait_for_line("before");

    let mut follow = env.spawn(["logs", "-f", "lf"]);
    follow.wait_for_line("before");
    touch(&env.worktree_path("lf").join("go"));
    follow.wait_for_line("after");
    // Returns by itself once the task ended.
    follow.wait().expect_code(0);
    run.wait().expect_code(0);
}

#[test]
fn task_whose_supervisor_died_is_orphaned_and_rm_cleans_up() {
    let env = TestEnv::new("orphan");
    let mut run = env.spawn(["run", "orph", "--", "sh", "-c", WIP]);
    run.wait_for_line("ready");
    run.signal(Signal::KILL);
    let out = run.wait();
    assert_eq!(out.code(), None, "killed by SIGKILL\n{out}");

    let rec = env.ls_task("orph").expect("ls still lists orph");
    assert_eq!(rec["state"], "orphaned");

    let rm = env.output(["rm", "orph"]);
    rm.expect_code(0);
    assert_stopped_with_snapshot(&env, "orph");
    assert!(env.ls_task("orph").is_none(), "rm forgets the orphan\n{rm}");
    assert_eq!(env.task_records(), Vec::<std::path::PathBuf>::new());
}
