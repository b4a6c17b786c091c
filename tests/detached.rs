//! Detached tasks: `run -d`, `wait`, `attach`, and `logs -f` on a task whose supervisor runs in the
//! background.

mod common;

use std::path::Path;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_agentbox");

/// Leaves uncommitted work, says `ready`, then runs until stopped.
const WIP: &str = "echo wip > wip.txt; echo ready; exec sleep 300";

/// The pid of a task's supervisor, from its record.
fn supervisor_pid(env: &TestEnv, task: &str) -> i32 {
    let record = env
        .task_records()
        .into_iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n == format!("{task}.json").as_str())
        })
        .unwrap_or_else(|| panic!("no record of task {task}"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    record["supervisor_pid"]
        .as_i64()
        .expect("supervisor_pid in the record") as i32
}

/// Kills the background supervisor of a task if the test ends (or fails) while it still runs. It
/// must be declared after the `TestEnv`, so that it runs first and the env's guard then removes
/// the containers.
struct Background {
    pid: i32,
}

impl Background {
    fn of(env: &TestEnv, task: &str) -> Background {
        Background {
            pid: supervisor_pid(env, task),
        }
    }

    fn is_alive(&self) -> bool {
        // Only a process running agentbox's binary counts: the pid may be reused once it is gone.
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|exe| exe == Path::new(BIN))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.is_alive()
            && let Some(pid) = rustix::process::Pid::from_raw(self.pid)
        {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

#[test]
fn run_detached_returns_while_the_task_runs_and_wait_exits_with_its_code() {
    let env = TestEnv::new("detach-wait");
    let script = format!("echo first; {}; echo last; exit 7", wait_for_file("go"));
    let out = env.output(["run", "-d", "det", "--", "sh", "-c", &script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["det"],
        "the task's name on stdout\n{out}"
    );
    let background = Background::of(&env, "det");
    assert!(
        background.is_alive(),
        "the supervisor runs in the background"
    );
    assert_eq!(env.ls_task("det").unwrap()["state"], "running");
    assert_eq!(env.live_containers().len(), 1, "{}", env.container_report());

    let mut follow = env.spawn(["logs", "-f", "det"]);
    follow.wait_for_line("first");
    let waiting = env.spawn(["wait", "det"]);
    touch(&env.worktree_path("det").join("go"));
    follow.wait_for_line("last");
    follow.wait().expect_code(0);
    waiting.wait().expect_code(7);
    // `wait` returns once the teardown is done.
    env.assert_torn_down("det");
    let rec = env.ls_task("det").unwrap();
    assert_eq!(rec["state"], "exited");
    assert_eq!(rec["exit_code"], 7);
    assert!(!background.is_alive(), "the supervisor has ended");

    // A task that has ended: its code at once. An unknown task: an error.
    env.output(["wait", "det"]).expect_code(7);
    env.output(["wait", "nosuch"])
        .expect_code(1)
        .expect_stderr_contains("nosuch");
}

#[test]
fn attach_passes_ctrl_c_to_the_task_and_exits_130_after_teardown() {
    let env = TestEnv::new("detach-attach");
    let out = env.output([
        "run",
        "-d",
        "att",
        "--stop-timeout",
        "5",
        "--",
        "sh",
        "-c",
        WIP,
    ]);
    out.expect_code(0);
    let _background = Background::of(&env, "att");

    let mut attach = env.spawn(["attach", "att"]);
    attach.wait_for_line("ready");
    attach.signal(Signal::INT);
    let out = attach.wait();
    out.expect_code(130);
    env.assert_torn_down("att");
    env.assert_snapshot_holds("att", "wip.txt", "wip\n");
    assert_eq!(env.ls_task("att").unwrap()["state"], "exited");
}

#[test]
fn attach_to_a_task_that_ends_exits_with_its_code() {
    let env = TestEnv::new("detach-attach-end");
    let script = format!("echo hello; {}; exit 3", wait_for_file("go"));
    env.output(["run", "-d", "ends", "--", "sh", "-c", &script])
        .expect_code(0);
    let _background = Background::of(&env, "ends");
    let mut attach = env.spawn(["attach", "ends"]);
    attach.wait_for_line("hello");
    touch(&env.worktree_path("ends").join("go"));
    attach.wait().expect_code(3);
    env.assert_torn_down("ends");
}

#[test]
fn detached_supervisor_has_its_own_process_group_and_survives_sighup() {
    let env = TestEnv::new("detach-hup");
    let script = format!("echo up; {}; echo bye", wait_for_file("go"));
    env.output(["run", "-d", "hup", "--", "sh", "-c", &script])
        .expect_code(0);
    let background = Background::of(&env, "hup");
    let pid = rustix::process::Pid::from_raw(background.pid).unwrap();
    assert_eq!(
        rustix::process::getpgid(Some(pid)).unwrap(),
        pid,
        "the supervisor leads its own process group, away from the terminal's Ctrl-C"
    );
    // What a closing terminal sends.
    rustix::process::kill_process(pid, Signal::HUP).unwrap();
    let mut follow = env.spawn(["logs", "-f", "hup"]);
    follow.wait_for_line("up");
    assert!(background.is_alive(), "SIGHUP does not end the supervisor");
    assert_eq!(env.ls_task("hup").unwrap()["state"], "running");
    touch(&env.worktree_path("hup").join("go"));
    follow.wait_for_line("bye");
    follow.wait().expect_code(0);
    env.output(["wait", "hup"]).expect_code(0);
    env.assert_torn_down("hup");
}

#[test]
fn run_detached_reports_a_failure_before_the_start_and_wait_a_failed_command() {
    let env = TestEnv::new("detach-fail");
    let out = env.output([
        "run",
        "-d",
        "noimg",
        "--image",
        "agentbox-test/missing:none",
        "--",
        "true",
    ]);
    out.expect_code(125);
    out.expect_stderr_contains(
        "image agentbox-test/missing:none is not present locally and could not be pulled",
    );
    assert_eq!(out.stdout_lines(), Vec::<String>::new(), "{out}");
    env.assert_nothing_left("noimg");

    // The container's init starts and then finds no command: the task started, and ended 127.
    let out = env.output(["run", "-d", "nocmd", "--", "agentbox-no-such-command"]);
    out.expect_code(0);
    let _background = Background::of(&env, "nocmd");
    env.output(["wait", "nocmd"]).expect_code(127);
    env.assert_torn_down("nocmd");
}
