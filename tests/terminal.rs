//! What `agentbox batch` shows on a terminal (a pseudo-terminal from util-linux's `script`): one
//! colour per task and a live status line — and neither when `NO_COLOR` is set or output is not a
//! terminal.

mod common;

use std::process::Command;

use common::{TestEnv, output_of};

const TASKS: &str = "[[task]]\nname = \"aa\"\ncommand = \"echo from-aa\"\n\n[[task]]\nname = \"bb\"\ncommand = \"echo from-bb\"\n";

/// `agentbox batch <file>` under a pseudo-terminal, with the harness's environment (plus `extra`).
fn batch_on_a_terminal(env: &TestEnv, extra: &[(&str, &str)]) -> String {
    let tasks = env.root.join("tasks.toml");
    std::fs::write(&tasks, TASKS).unwrap();
    let inner = env.agentbox(["batch".as_ref(), tasks.as_os_str()]);
    let line = std::iter::once(inner.get_program())
        .chain(inner.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script
        .args(["-qec", &line, "/dev/null"])
        .current_dir(&env.repo)
        .env_clear();
    for (key, value) in inner.get_envs() {
        if let Some(value) = value {
            script.env(key, value);
        }
    }
    script.envs(extra.iter().copied());
    let out = output_of(script);
    out.expect_code(0);
    out.stdout
}

#[test]
fn a_terminal_gets_colours_per_task_and_a_status_line() {
    let env = TestEnv::new("tty_colours");
    let shown = batch_on_a_terminal(&env, &[]);
    // Two tasks, two different colours, each reset after the prefix.
    assert!(shown.contains("\x1b[36maa | \x1b[0mfrom-aa"), "{shown:?}");
    assert!(shown.contains("\x1b[33mbb | \x1b[0mfrom-bb"), "{shown:?}");
    assert!(
        shown.contains("agentbox: 0 running, 2 done, 0 failed"),
        "{shown:?}"
    );
    // The status line is cleared before every other line, and for good at the end.
    assert!(shown.contains("\r\x1b[K"), "{shown:?}");
}

#[test]
fn no_color_and_pipes_get_plain_text() {
    let env = TestEnv::new("tty_plain");
    let shown = batch_on_a_terminal(&env, &[("NO_COLOR", "1")]);
    assert!(shown.contains("aa | from-aa"), "{shown:?}");
    assert!(
        !shown.contains("\x1b[3"),
        "NO_COLOR must switch colours off: {shown:?}"
    );

    let piped = env.output(["batch".as_ref(), env.root.join("tasks.toml").as_os_str()]);
    piped.expect_code(0);
    assert!(!piped.stdout.contains('\x1b'), "{piped}");
    assert!(
        !piped.stderr.contains('\x1b'),
        "no status line off a terminal: {piped}"
    );
}
