//! `agentbox up`, `exec` and `shell`: commands in a running task's container, with its
//! environment, user and working directory, their exit codes passed through.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{Spawned, TestEnv, on_a_terminal, own_user, sh_line};

#[test]
fn exec_runs_in_the_tasks_container_as_the_task_and_passes_the_exit_code() {
    let env = TestEnv::new("exec_basics");
    let up = env.output(["up", "--env", "FROM_RUN=yes", "lt"]);
    up.expect_code(0);
    assert_eq!(up.stdout.trim(), "lt");
    up.expect_stderr_contains("agentbox exec lt -- <command>");
    let task = env.ls_task("lt").unwrap();
    assert_eq!(task["state"], "running");

    let out = env.output([
        "exec",
        "lt",
        "--",
        "sh",
        "-c",
        "echo \"$FROM_RUN $AGENTBOX_TASK $(id -u):$(id -g) $(pwd)\"; echo to-stderr >&2; exit 7",
    ]);
    out.expect_code(7);
    assert_eq!(
        out.stdout.trim(),
        format!(
            "yes lt {} {}",
            own_user(),
            env.worktree_path("lt").display()
        )
    );
    assert_eq!(out.stderr.trim(), "to-stderr");

    let out = env.output([
        "exec",
        "-e",
        "X=1",
        "-w",
        "/tmp",
        "lt",
        "--",
        "sh",
        "-c",
        "echo $X $(pwd)",
    ]);
    out.expect_code(0);
    assert_eq!(out.stdout.trim(), "1 /tmp");

    let out = env.output(["exec", "lt", "--", "no-such-command"]);
    out.expect_code(127);
    out.expect_stderr_contains("agentbox: command not found in task lt: no-such-command");
    let out = env.output(["exec", "lt", "--", "/etc/passwd"]);
    out.expect_code(126);

    // -i: a pipe reaches the command, and so does its end.
    let mut cmd = env.agentbox(["exec", "-i", "lt", "--", "sh", "-c", "tr a-z A-Z"]);
    cmd.stdin(Stdio::piped());
    let mut exec = Spawned::start(cmd);
    let mut stdin = exec.take_stdin();
    stdin.write_all(b"piped\n").unwrap();
    drop(stdin);
    exec.wait_for_line("PIPED");
    exec.wait().expect_code(0);

    // Work done through exec is the task's: it ends up on its branch when the task stops.
    env.output([
        "exec",
        "lt",
        "--",
        "sh",
        "-c",
        "echo made-by-exec > exec.txt",
    ])
    .expect_code(0);
    env.output(["stop", "lt"]).expect_code(0);
    env.assert_snapshot_holds("lt", "exec.txt", "made-by-exec\n");
    env.assert_torn_down("lt");
}

#[test]
fn shell_opens_the_images_shell_and_says_how_to_start_a_finished_task() {
    let env = TestEnv::new("shell");
    env.output(["run", "-d", "sh1"]).expect_code(0);

    // From a pipe: the shell reads the pipe.
    let mut cmd = env.agentbox(["shell", "sh1"]);
    cmd.stdin(Stdio::piped());
    let mut shell = Spawned::start(cmd);
    let mut stdin = shell.take_stdin();
    stdin
        .write_all(b"echo \"shell $BASH_VERSION\" | cut -c1-7; exit 3\n")
        .unwrap();
    drop(stdin);
    shell.wait_for_line("shell 5");
    shell.wait().expect_code(3);

    // On a terminal: the shell's terminal, with this one's size.
    let inner = env.agentbox(["shell", "sh1"]);
    let mut term = Spawned::start(on_a_terminal(
        &inner,
        &format!("stty rows 30 cols 100; exec {}", sh_line(&inner)),
    ));
    let mut keys = term.take_stdin();
    keys.write_all(b"echo \"in-shell $((6*7)) $(tput cols)\"\r")
        .unwrap();
    keys.flush().unwrap();
    // bash may put its terminal-mode sequences before the output on the line.
    term.wait_for("the shell's answer", |l| l.ends_with("in-shell 42 100"));
    keys.write_all(b"exit 4\r").unwrap();
    keys.flush().unwrap();
    term.wait().expect_code(4);

    // exec -it: this terminal, with its size by the time the command reads what is typed.
    let inner = env.agentbox([
        "exec",
        "-it",
        "sh1",
        "--",
        "sh",
        "-c",
        "read line; echo \"$line $(tput lines)\"",
    ]);
    let mut term = Spawned::start(on_a_terminal(
        &inner,
        &format!("stty rows 33 cols 100; exec {}", sh_line(&inner)),
    ));
    let mut keys = term.take_stdin();
    keys.write_all(b"lines\r").unwrap();
    keys.flush().unwrap();
    term.wait_for_line("lines 33");
    term.wait().expect_code(0);

    env.output(["stop", "sh1"]).expect_code(0);
    let out = env.output(["shell", "sh1"]);
    out.expect_code(125);
    out.expect_stderr_contains("task sh1 is not running (it is exited)");
    out.expect_stderr_contains("hint: `agentbox up sh1` starts it again");
    let out = env.output(["exec", "nobody", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("no task named nobody");
}
