//! `agentbox mcp` driven by a client nobody here wrote: the official Python SDK (PyPI `mcp`, the
//! version `.ci/run` pins) over stdio, in `tests/mcp/client.py`. The conversation creates two tasks
//! and drives them at once, writes and edits files, runs `git status` and a failing command, reads
//! the diff, commits, tries path traversals (all refused), cancels a long run, adds a service, and
//! stops; this side checks what ended up in the repository.
//!
//! The Python comes from the venv `.ci/run` makes (`target/mcp-venv`, or `AGENTBOX_TEST_PYTHON`).
//! Without it the test says so and passes, except in CI (`CI=true`), where it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{TOOLS_IMAGE, TestEnv, ensure_tools_image, output_of};

/// The Python with the `mcp` SDK, or why there is none.
fn python() -> Result<PathBuf, String> {
    if let Some(python) = std::env::var_os("AGENTBOX_TEST_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-venv/bin/python");
    if venv.exists() {
        return Ok(venv);
    }
    Err(format!(
        "no Python with the mcp SDK at {} (bash .ci/run makes it: python3 -m venv target/mcp-venv && target/mcp-venv/bin/pip install mcp==2.3.0), nor AGENTBOX_TEST_PYTHON",
        venv.display()
    ))
}

#[test]
fn an_mcp_client_drives_two_tasks_through_agentbox() {
    let python = match python() {
        Ok(python) => python,
        Err(why) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the MCP conversation: {why}");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    ensure_tools_image();
    let env = TestEnv::new("mcp");
    let outside = env.root.join("outside.txt");
    std::fs::write(&outside, "SECRET outside every worktree\n").unwrap();

    let server = env.agentbox(["mcp"]);
    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&client)
        .arg(server.get_program())
        .arg(&env.repo)
        .arg(&outside)
        .arg(TOOLS_IMAGE)
        .arg("--")
        .args(server.get_args())
        .current_dir(&env.repo)
        .env_clear();
    for (key, value) in server.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    let out = output_of(cmd);
    out.expect_code(0);
    let summary: serde_json::Value = serde_json::from_str(
        out.stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no summary line\n{out}")),
    )
    .unwrap_or_else(|e| panic!("the summary is not JSON ({e})\n{out}"));
    assert_eq!(summary["ok"], true, "{out}");
    assert!(
        out.stderr.contains("agentbox mcp: task mcp-a created"),
        "the server's notes go to stderr\n{out}"
    );

    // The commit the agent made, and the snapshot of what it left uncommitted, are on the branch.
    let commit = summary["commit"].as_str().unwrap();
    let snapshot = summary["snapshot"].as_str().unwrap();
    assert_eq!(
        env.rev("agentbox/mcp-a").as_deref(),
        Some(snapshot),
        "the snapshot is the tip\n{out}"
    );
    assert_eq!(env.show_format(commit, "%s"), "add hello");
    assert_eq!(env.rev(&format!("{snapshot}^")).as_deref(), Some(commit));
    assert_eq!(
        env.file_at("agentbox/mcp-a", "src/hello.txt").as_deref(),
        Some("hello\nagentbox\nbye\n")
    );
    env.assert_snapshot_holds("mcp-a", "notes.txt", "uncommitted\n");
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "SECRET outside every worktree\n"
    );
    for task in ["mcp-a", "mcp-b"] {
        env.assert_torn_down(task);
        let listed = env.ls_json();
        let found = listed.iter().find(|v| v["name"] == task);
        assert_eq!(
            found.map(|v| v["state"].clone()),
            Some("exited".into()),
            "{listed:?}"
        );
    }
    let networks = env.networks();
    assert!(
        !networks.iter().any(|n| n.ends_with("-mcp-b")),
        "the network made for the service went with its task: {networks:?}"
    );
}

#[test]
fn the_server_speaks_only_protocol_on_stdout() {
    // Without a client: stdin closed at once. The server ends cleanly and has printed nothing.
    let env = TestEnv::new("mcp_quiet");
    let out = env.output(["mcp"]);
    out.expect_code(0);
    assert_eq!(out.stdout, "", "{out}");
}
