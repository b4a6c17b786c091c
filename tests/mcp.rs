//! `agentbox mcp` driven by a client nobody here wrote: the official Python SDK (PyPI `mcp`, the
//! version `.ci/run` pins) over stdio, in `tests/mcp/client.py`. The conversation creates two tasks
//! and drives them at once, writes and edits files, runs `git status` and a failing command, reads
//! the diff, commits, tries path traversals (all refused), cancels a long run, adds a service, and
//! stops; this side checks what ended up in the repository.
//!
//! Two more conversations: the file tools in a worktree a hostile task prepared (`hostile.py`), and
//! services for tasks with limits and without a network (`services.py`).
//!
//! The Python comes from the venv `.ci/run` makes (`target/mcp-venv`, or `mcp-venv` in
//! `CARGO_TARGET_DIR`, or `AGENTBOX_TEST_PYTHON`).
//! Without it the test says so and passes, except in CI (`CI=true`), where it fails.

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use common::{TOOLS_IMAGE, TestEnv, docker_lines, ensure_tools_image, output_of};

/// The Python with the `mcp` SDK, or why there is none.
fn python() -> Result<PathBuf, String> {
    if let Some(python) = std::env::var_os("AGENTBOX_TEST_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mcp-venv/bin/python");
    if venv.exists() {
        return Ok(venv);
    }
    // The same venv in a target dir of its own (CARGO_TARGET_DIR), beside cargo's `tmp`.
    if let Some(target) = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).parent() {
        let python = target.join("mcp-venv/bin/python");
        if python.exists() {
            return Ok(python);
        }
    }
    Err(format!(
        "no Python with the mcp SDK at {} (bash .ci/run makes it: python3 -m venv target/mcp-venv && target/mcp-venv/bin/pip install mcp==2.3.0), nor AGENTBOX_TEST_PYTHON",
        venv.display()
    ))
}

/// Runs `tests/mcp/<script>` with `args`, then `--` and the server's command line, in the
/// repository with the test's environment; `None` (the test passes) when there is no Python with
/// the SDK outside CI.
fn converse(env: &TestEnv, script: &str, args: &[&OsStr]) -> Option<common::Out> {
    let python = match python() {
        Ok(python) => python,
        Err(why) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the MCP conversation: {why}");
            return None;
        }
        Err(why) => panic!("{why}"),
    };
    let server = env.agentbox(["mcp"]);
    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp")
        .join(script);
    let mut cmd = Command::new(&python);
    cmd.arg(&client)
        .arg(server.get_program())
        .arg(&env.repo)
        .args(args)
        .arg("--")
        .args(server.get_args())
        .current_dir(&env.repo)
        .env_clear();
    for (key, value) in server.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    // The scripts import client.py; no __pycache__ in the source tree.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    Some(output_of(cmd))
}

/// The JSON line a conversation ends with.
fn summary_of(out: &common::Out) -> serde_json::Value {
    out.expect_code(0);
    let summary: serde_json::Value = serde_json::from_str(
        out.stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no summary line\n{out}")),
    )
    .unwrap_or_else(|e| panic!("the summary is not JSON ({e})\n{out}"));
    assert_eq!(summary["ok"], true, "{out}");
    summary
}

#[test]
fn an_mcp_client_drives_two_tasks_through_agentbox() {
    ensure_tools_image();
    let env = TestEnv::new("mcp");
    let outside = env.root.join("outside.txt");
    std::fs::write(&outside, "SECRET outside every worktree\n").unwrap();
    let Some(out) = converse(
        &env,
        "client.py",
        &[outside.as_os_str(), OsStr::new(TOOLS_IMAGE)],
    ) else {
        return;
    };
    let summary = summary_of(&out);
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

/// What a directory holds, all the way down: path -> contents (`None` for a directory).
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<String, Option<Vec<u8>>> {
    let mut found = std::collections::BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                found.insert(name, None);
                pending.push(path);
            } else {
                found.insert(name, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    found
}

#[test]
fn the_file_tools_never_leave_the_worktree_whatever_the_task_planted() {
    let env = TestEnv::new("mcp_hostile");
    let outside = env.root.join("outside");
    std::fs::create_dir_all(outside.join("deeper")).unwrap();
    std::fs::write(outside.join("outside-secret.txt"), "SECRET\n").unwrap();
    std::fs::write(outside.join("deeper/outside-inner.txt"), "SECRET too\n").unwrap();
    let before = tree(&outside);
    let Some(out) = converse(&env, "hostile.py", &[outside.as_os_str()]) else {
        return;
    };
    summary_of(&out);
    assert_eq!(
        tree(&outside),
        before,
        "nothing outside the worktree was read into, changed, made or removed\n{out}"
    );
    env.assert_torn_down("hostile");
}

#[test]
fn a_service_added_through_mcp_gets_the_tasks_limits_and_a_task_without_network_none() {
    ensure_tools_image();
    let env = TestEnv::new("mcp_services");
    env.output([
        "up",
        "--memory",
        "300m",
        "--cpus",
        "0.5",
        "--pids-limit",
        "200",
        "limited",
    ])
    .expect_code(0);
    env.output(["up", "--network", "none", "offline"])
        .expect_code(0);
    let Some(out) = converse(&env, "services.py", &[OsStr::new(TOOLS_IMAGE)]) else {
        return;
    };
    summary_of(&out);
    let of = |task: &str, service: Option<&str>| -> Vec<String> {
        let mut filters = vec![
            "ps".to_owned(),
            "-aq".to_owned(),
            "--no-trunc".to_owned(),
            "--filter".to_owned(),
            format!("label=agentbox.test={}", env.id),
            "--filter".to_owned(),
            format!("label=agentbox.task={task}"),
        ];
        if let Some(service) = service {
            filters.extend([
                "--filter".to_owned(),
                format!("label=agentbox.service={service}"),
            ]);
        }
        let args: Vec<&str> = filters.iter().map(String::as_str).collect();
        docker_lines(&args)
    };
    let service = of("limited", Some("db"));
    assert_eq!(service.len(), 1, "{}", env.container_report());
    let task = of("limited", None)
        .into_iter()
        .find(|id| !service.contains(id))
        .expect("the task's own container");
    let (service, task) = (env.inspect(&service[0]), env.inspect(&task));
    for key in ["Memory", "MemorySwap", "NanoCpus", "PidsLimit"] {
        assert_eq!(
            service["HostConfig"][key], task["HostConfig"][key],
            "{key}: the service's as the task's"
        );
    }
    let host = &service["HostConfig"];
    assert_eq!(host["Memory"], 300 << 20, "{host}");
    assert_eq!(host["NanoCpus"], 500_000_000, "{host}");
    assert_eq!(host["PidsLimit"], 200, "{host}");

    assert!(
        of("offline", Some("db")).is_empty(),
        "no service for a task without a network: {}",
        env.container_report()
    );
    let networks = env.networks();
    assert!(
        !networks.iter().any(|n| n.ends_with("-offline")),
        "no network made for it: {networks:?}"
    );
    for task in ["limited", "offline"] {
        env.output(["stop", task]).expect_code(0);
    }
    // No container left: the service went with its task.
    for task in ["limited", "offline"] {
        env.assert_torn_down(task);
    }
}
