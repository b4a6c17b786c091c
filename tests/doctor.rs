//! `agentbox doctor`, and the things a person expects of a CLI of this kind: completions, man
//! pages, and the instructions file for coding agents.

mod common;

use common::{TestEnv, output_of};

#[test]
fn doctor_passes_on_this_machine() {
    let env = TestEnv::new("doctor_ok");
    let out = env.output(["doctor"]);
    out.expect_code(0);
    for check in ["socket", "engine", "git", "image", "state dir", "ports"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l[6..].starts_with(check)),
            "check {check} is ok\n{out}"
        );
    }
    assert!(out.stdout.contains("API 1."), "{out}");
    let json = env.output(["doctor", "--json"]);
    json.expect_code(0);
    for line in json.stdout.lines() {
        let check: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(check["status"], "ok", "{line}");
    }
}

#[test]
fn doctor_names_the_fix_when_the_engine_is_nowhere() {
    let env = TestEnv::new("doctor_nowhere");
    let mut cmd = env.agentbox(["doctor"]);
    cmd.env("DOCKER_HOST", "unix:///nonexistent/agentbox-doctor.sock");
    let out = output_of(cmd);
    out.expect_code(1);
    let engine = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("FAIL  engine"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        engine.contains("unix:///nonexistent/agentbox-doctor.sock"),
        "{out}"
    );
    assert!(engine.contains("fix: DOCKER_HOST="), "{out}");
    assert!(out.stdout.contains("skip  image"), "{out}");
    out.expect_stderr_contains("failed");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let env = TestEnv::new("completions");
    for shell in ["bash", "zsh", "fish"] {
        let out = env.output(["completions", shell]);
        out.expect_code(0);
        assert!(out.stdout.contains("agentbox"), "{out}");
        assert!(
            out.stdout.contains("exec"),
            "subcommands are completed\n{out}"
        );
    }
    env.output(["completions", "tcsh"]).expect_code(2);
    let man = env.output(["man"]);
    man.expect_code(0);
    assert!(man.stdout.contains(".TH agentbox 1"), "{man}");
    let dir = env.root.join("man1");
    env.output(["man".as_ref(), "--dir".as_ref(), dir.as_os_str()])
        .expect_code(0);
    let page = std::fs::read_to_string(dir.join("agentbox-exec.1")).unwrap();
    assert!(page.contains(r"\-\-workdir"), "{page}");
}

#[test]
fn agent_setup_writes_the_instructions_once() {
    let env = TestEnv::new("agent_setup");
    std::fs::write(env.repo.join("CLAUDE.md"), "# House rules\n").unwrap();
    for _ in 0..2 {
        env.output(["agent-setup", "--file", "CLAUDE.md"])
            .expect_code(0);
    }
    let text = std::fs::read_to_string(env.repo.join("CLAUDE.md")).unwrap();
    assert!(text.starts_with("# House rules\n"), "{text}");
    assert_eq!(text.matches("agentbox:begin").count(), 1, "{text}");
    assert!(text.contains("task_create"), "{text}");
    let printed = env.output(["agent-setup", "--print"]);
    printed.expect_code(0);
    assert!(printed.stdout.contains("agentbox up <task>"), "{printed}");
    assert!(!env.repo.join("AGENTS.md").exists());
}
