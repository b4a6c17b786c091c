//! `agentbox run -it` and `attach -it` on a real pseudo-terminal (util-linux's `script`): the
//! program inside reads what is typed, sees the terminal's size (and its changes), gets Ctrl-C;
//! the caller's terminal is restored afterwards — after the program's end, the detach keys, and
//! every signal sent to agentbox itself; the detach keys leave the task running and `attach -it`
//! joins it again.

mod common;

use std::io::Write;
use std::process::{ChildStdin, Command};
use std::time::Duration;

use common::{Signal, Spawned, TestEnv, on_a_terminal, sh_line, touch};

/// Types `text` into the terminal.
fn type_in(stdin: &mut std::process::ChildStdin, text: &[u8]) {
    stdin.write_all(text).unwrap();
    stdin.flush().unwrap();
}

/// A program that says `ready`, then echoes every line typed as `echo <line>`.
const ECHO: &str = "echo ready; while read line; do echo \"echo $line\"; done";

/// `inner` on a fresh terminal, in its foreground with the signals' default actions, as a person
/// runs it: a shell says agentbox's pid (`agentbox-pid N`) and becomes it; around it, another
/// says afterwards whether the terminal's settings are what they were before
/// (`terminal-restored`, or `terminal-left-raw`). Returns the terminal, its keyboard and the pid.
fn watched(inner: &Command) -> (Spawned, ChildStdin, rustix::process::Pid) {
    let shell = format!(
        "before=$(stty -g); sh -c 'echo \"agentbox-pid $$\"; exec \"$@\"' agentbox {agentbox}; code=$?; \
         if [ \"$(stty -g)\" = \"$before\" ]; then echo terminal-restored; else echo terminal-left-raw; fi; \
         exit $code",
        agentbox = sh_line(inner),
    );
    let mut term = Spawned::start(on_a_terminal(inner, &shell));
    let keys = term.take_stdin();
    let line = term.wait_for("agentbox's pid", |l| l.starts_with("agentbox-pid "));
    let pid: i32 = line["agentbox-pid ".len()..].trim().parse().unwrap();
    (term, keys, rustix::process::Pid::from_raw(pid).unwrap())
}

/// Waits for the end of a [`watched`] agentbox: its terminal as it was, and its exit code.
#[track_caller]
fn expect_restored(mut term: Spawned, code: i32) -> common::Out {
    term.wait_for("the terminal's settings as before", |l| {
        l.ends_with("terminal-restored")
    });
    let out = term.wait();
    out.expect_code(code);
    out
}

/// Joins the running interactive task `task` again from a new terminal; returns once what is
/// typed there reaches the program (so the terminal is raw).
fn attach_it(env: &TestEnv, task: &str, word: &str) -> (Spawned, ChildStdin, rustix::process::Pid) {
    let (mut term, mut keys, pid) = watched(&env.agentbox(["attach", "-it", task]));
    type_in(&mut keys, format!("{word}\r").as_bytes());
    term.wait_for_line(&format!("echo {word}"));
    (term, keys, pid)
}

#[test]
fn detaching_and_sighup_or_sigquit_to_agentbox_restore_the_terminal_and_leave_the_task_running() {
    let env = TestEnv::new("it_leave");
    let inner = env.agentbox([
        "run",
        "-it",
        "--stop-timeout",
        "2",
        "lv",
        "--",
        "sh",
        "-c",
        ECHO,
    ]);
    let (mut term, mut keys, _) = watched(&inner);
    term.wait_for_line("ready");
    type_in(&mut keys, b"one\r");
    term.wait_for_line("echo one");
    type_in(&mut keys, b"\x10\x11");
    term.wait_for("the detach message", |l| {
        l.contains("agentbox: detached from task lv")
    });
    expect_restored(term, 0);
    assert_eq!(env.ls_task("lv").unwrap()["state"], "running");

    // A signal sent to agentbox, not typed: raw mode keeps the terminal from sending any.
    for (signal, code, word) in [(Signal::HUP, 129, "two"), (Signal::QUIT, 131, "three")] {
        let (mut term, _keys, pid) = attach_it(&env, "lv", word);
        rustix::process::kill_process(pid, signal).unwrap();
        term.wait_for("the note that the task goes on", |l| {
            l.contains("agentbox: left task lv running")
        });
        expect_restored(term, code);
        assert_eq!(
            env.ls_task("lv").unwrap()["state"],
            "running",
            "after {signal:?}"
        );
    }

    // SIGINT, as without a terminal, goes on to the supervisor: the task stops, its work is kept,
    // and the client exits 130 after the teardown.
    let (term, _keys, pid) = attach_it(&env, "lv", "four");
    rustix::process::kill_process(pid, Signal::INT).unwrap();
    expect_restored(term, 130);
    assert_eq!(env.ls_task("lv").unwrap()["state"], "exited");
    env.assert_torn_down("lv");
    let logs = env.output(["logs", "lv"]);
    assert!(
        ["one", "two", "three", "four"]
            .iter()
            .all(|w| logs.stdout.contains(&format!("echo {w}"))),
        "{logs}"
    );
}

#[test]
fn sigterm_to_agentbox_restores_the_terminal_and_stops_the_task_as_without_one() {
    let env = TestEnv::new("it_term");
    let inner = env.agentbox([
        "run",
        "-it",
        "--stop-timeout",
        "2",
        "tm",
        "--",
        "sh",
        "-c",
        ECHO,
    ]);
    let (mut term, mut keys, pid) = watched(&inner);
    term.wait_for_line("ready");
    type_in(&mut keys, b"one\r");
    term.wait_for_line("echo one");
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    expect_restored(term, 143);
    assert_eq!(env.ls_task("tm").unwrap()["state"], "exited");
    env.assert_torn_down("tm");
}

#[test]
fn sigint_to_exec_it_restores_the_terminal_and_leaves_the_command_running() {
    let env = TestEnv::new("exec_it_int");
    env.output(["up", "ex"]).expect_code(0);
    // The command says it is still there when the file `go-on` appears in the worktree.
    let program =
        "echo ready; while [ ! -e go-on ]; do sleep 0.05; done; echo still-here > went-on";
    let inner = env.agentbox(["exec", "-it", "ex", "--", "sh", "-c", program]);
    let (mut term, _keys, pid) = watched(&inner);
    term.wait_for_line("ready");
    rustix::process::kill_process(pid, Signal::INT).unwrap();
    expect_restored(term, 130);
    let worktree = env.worktree_path("ex");
    touch(&worktree.join("go-on"));
    let went_on = env.output([
        "exec",
        "ex",
        "--",
        "sh",
        "-c",
        "while [ ! -e went-on ]; do sleep 0.05; done; cat went-on",
    ]);
    went_on.expect_code(0);
    assert_eq!(went_on.stdout.trim(), "still-here", "{went_on}");
    env.output(["stop", "ex"]).expect_code(0);
}

#[test]
fn run_it_is_the_programs_terminal_resized_interrupted_and_restored() {
    let env = TestEnv::new("run_it");
    // The program: reads lines and reports the terminal's size for each, until Ctrl-C, which it
    // catches and ends with 5.
    let program = "trap 'echo caught-int; exit 5' INT; echo ready; \
                   while read line; do echo \"got $line size $(stty size) cols $(tput cols)\"; done";
    let inner = env.agentbox(["run", "-it", "it1", "--", "sh", "-c", program]);
    let trigger = env.root.join("resize-now");
    // The terminal starts at 24x80; agentbox runs as a job of this shell (its stdin the terminal,
    // in the terminal's foreground process group, so it hears SIGWINCH), and the shell resizes the
    // terminal when the test asks; at the end it compares the terminal's settings with the ones
    // it started with.
    let shell = format!(
        "stty rows 24 cols 80; before=$(stty -g); exec 3<&0; \
         {agentbox} <&3 & pid=$!; \
         while [ ! -e {trigger} ]; do sleep 0.05; done; stty rows 50 cols 132 <&3; \
         wait $pid; code=$?; \
         if [ \"$(stty -g <&3)\" = \"$before\" ]; then echo terminal-restored; else echo terminal-left-raw; fi; \
         exit $code",
        agentbox = sh_line(&inner),
        trigger = trigger.display(),
    );
    let mut term = Spawned::start(on_a_terminal(&inner, &shell));
    let mut keys = term.take_stdin();
    term.wait_for_line("ready");
    type_in(&mut keys, b"first\r");
    let line = term.wait_for("the first report", |l| l.starts_with("got first"));
    assert_eq!(
        line, "got first size 24 80 cols 80",
        "the size from the start"
    );

    touch(&trigger);
    // The resize travels as a signal to agentbox and a request to the engine; lines typed meanwhile
    // may still see the old size.
    let mut resized = false;
    for round in 0..100 {
        type_in(&mut keys, format!("r{round}\r").as_bytes());
        let line = term.wait_for("a report", |l| l.starts_with("got r"));
        if line.ends_with("size 50 132 cols 132") {
            resized = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(resized, "the program never saw the new size");

    // Ctrl-C is a byte for the program's terminal, not a signal for agentbox.
    type_in(&mut keys, b"\x03");
    // The program's terminal echoes it as ^C.
    term.wait_for("the trap's line", |l| l.ends_with("caught-int"));
    term.wait_for_line("terminal-restored");
    let out = term.wait();
    out.expect_code(5);
    assert_eq!(env.ls_task("it1").unwrap()["exit_code"], 5);
    // The log still has the output.
    let logs = env.output(["logs", "it1"]);
    assert!(logs.stdout.contains("got first size 24 80"), "{logs}");
    env.assert_torn_down("it1");
}

#[test]
fn the_detach_keys_leave_the_task_running_and_attach_it_joins_it_again() {
    let env = TestEnv::new("detach_it");
    let program = "echo ready; while read line; do echo \"echo $line\"; done; echo bye";
    let inner = env.agentbox(["run", "-it", "dt", "--", "sh", "-c", program]);
    let mut term = Spawned::start(on_a_terminal(&inner, &format!("exec {}", sh_line(&inner))));
    let mut keys = term.take_stdin();
    term.wait_for_line("ready");
    type_in(&mut keys, b"one\r");
    term.wait_for_line("echo one");
    type_in(&mut keys, b"\x10\x11");
    term.wait_for("the detach message", |l| {
        l.starts_with("agentbox: detached from task dt")
    });
    term.wait().expect_code(0);
    assert_eq!(env.ls_task("dt").unwrap()["state"], "running");

    // A second client: the same terminal again; what it types reaches the same program.
    let inner = env.agentbox(["attach", "-it", "dt"]);
    let mut term = Spawned::start(on_a_terminal(&inner, &format!("exec {}", sh_line(&inner))));
    let mut keys = term.take_stdin();
    type_in(&mut keys, b"two\r");
    term.wait_for_line("echo two");
    // Ctrl-D: the end of the program's input; it ends, and attach with it.
    type_in(&mut keys, b"\x04");
    term.wait_for_line("bye");
    term.wait().expect_code(0);
    let task = env.ls_task("dt").unwrap();
    assert_eq!(task["state"], "exited");
    let logs = env.output(["logs", "dt"]);
    assert!(
        logs.stdout.contains("echo one") && logs.stdout.contains("echo two"),
        "{logs}"
    );
}

#[test]
fn detach_keys_can_be_chosen() {
    let env = TestEnv::new("detach_keys");
    let inner = env.agentbox([
        "run",
        "-it",
        "--detach-keys",
        "ctrl-x,d",
        "dk",
        "--",
        "sh",
        "-c",
        "echo ready; while read line; do echo \"echo $line\"; done",
    ]);
    let mut term = Spawned::start(on_a_terminal(&inner, &format!("exec {}", sh_line(&inner))));
    let mut keys = term.take_stdin();
    term.wait_for_line("ready");
    // ctrl-p,ctrl-q are ordinary keys now; a ctrl-x that is not followed by d goes through too.
    type_in(&mut keys, b"a\x10\x11\x18b\r");
    term.wait_for("the echo", |l| l.starts_with("echo a"));
    type_in(&mut keys, b"\x18d");
    term.wait_for("the detach message", |l| {
        l.starts_with("agentbox: detached from task dk")
    });
    term.wait().expect_code(0);
    env.output(["stop", "dk"]).expect_code(0);
    let bad = env.output(["run", "-i", "--detach-keys", "alt-x", "dk2", "--", "true"]);
    bad.expect_code(125);
    bad.expect_stderr_contains("detach key \"alt-x\"");
}

#[test]
fn run_i_passes_a_pipe_and_its_end() {
    let env = TestEnv::new("run_i_pipe");
    let mut cmd = env.agentbox([
        "run",
        "-i",
        "pipe",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z; echo done",
    ]);
    cmd.stdin(std::process::Stdio::piped());
    let mut run = Spawned::start(cmd);
    let mut stdin = run.take_stdin();
    type_in(&mut stdin, b"hello\n");
    drop(stdin);
    run.wait_for_line("HELLO");
    run.wait_for_line("done");
    run.wait().expect_code(0);
}

#[test]
fn t_without_a_terminal_is_a_clear_error() {
    let env = TestEnv::new("t_no_tty");
    let out = env.output(["run", "-t", "nott", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("-t needs a terminal on stdin");
    assert!(env.ls_task("nott").is_none(), "nothing was made");
    env.output(["up", "up1"]).expect_code(0);
    let out = env.output(["exec", "-t", "up1", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("-t needs a terminal on stdin");
    // attach fails as its other refusals do (1), before it looks at the task.
    for args in [["attach", "-t", "up1"], ["attach", "-it", "up1"]] {
        let out = env.output(args);
        out.expect_code(1);
        out.expect_stderr_contains("-t needs a terminal on stdin");
        out.expect_stderr_contains("attach -i up1");
    }
    assert_eq!(env.ls_task("up1").unwrap()["state"], "running");
    env.output(["stop", "up1"]).expect_code(0);
}
