//! The README's examples, run as written on the default image: every `$ ` line of the console
//! blocks after `<!-- readme-intro -->` and `<!-- readme-example -->`, in order, in a fresh
//! repository, must succeed; the task file after `<!-- readme-batch -->` runs with `agentbox batch`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;

/// The commands of the README's opening example and of its worked example.
fn example_commands() -> Vec<String> {
    let mut commands = commands_after("<!-- readme-intro -->");
    commands.extend(commands_after("<!-- readme-example -->"));
    commands
}

/// The `$ ` lines of the console block after `marker`.
fn commands_after(marker: &str) -> Vec<String> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, after) = readme
        .split_once(marker)
        .unwrap_or_else(|| panic!("the README has {marker}"));
    let block = after
        .split_once("```console\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a console block follows the marker");
    block
        .lines()
        .filter_map(|l| l.strip_prefix("$ "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_worked_example_runs_as_written() {
    let env = TestEnv::new("readme");
    let commands = example_commands();
    assert!(commands.len() >= 5, "{commands:?}");

    // `agentbox` on PATH, labelling what it runs for this test's guard.
    let bin = env.root.join("bin");
    fs::create_dir(&bin).unwrap();
    let wrapper = bin.join("agentbox");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$1\" in run|batch) sub=$1; shift; exec '{exe}' \"$sub\" --label {TEST_LABEL}={id} \"$@\";; esac\nexec '{exe}' \"$@\"\n",
            exe = env!("CARGO_BIN_EXE_agentbox"),
            id = env.id
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );

    for line in &commands {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(line)
            .current_dir(&env.repo)
            .env_clear()
            .env("PATH", &path)
            .env("HOME", &env.home)
            .env("XDG_STATE_HOME", &env.state_home)
            .env("GIT_CONFIG_GLOBAL", &env.gitconfig)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null());
        if let Some(host) = std::env::var_os("DOCKER_HOST") {
            cmd.env("DOCKER_HOST", host);
        }
        let out = output_of(cmd);
        out.expect_code(0);
        if line.starts_with("agentbox wait") {
            assert_eq!(out.stdout_lines(), ["lint exited 0"], "{out}");
        }
        if line.starts_with("agentbox logs") {
            assert_eq!(out.stdout_lines(), ["no TODOs"], "{out}");
        }
    }
    assert_eq!(
        env.subjects("main..agentbox/fix-auth"),
        [
            "agentbox: snapshot of uncommitted work in task fix-auth",
            "fix auth"
        ]
    );
    assert_eq!(env.subjects("main..agentbox/hello"), ["say hello"]);
    assert!(env.ls_task("fix-auth").is_none(), "rm forgot it");
    assert!(!env.branch_exists("agentbox/lint"), "lint changed nothing");
    assert_eq!(env.containers(), Vec::<String>::new());
}

/// The README's task file for `agentbox batch`, run as written on the default image.
#[test]
fn the_batch_example_runs_as_written() {
    let env = TestEnv::new("readme-batch");
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, after) = readme
        .split_once("<!-- readme-batch -->")
        .expect("the README marks its batch example");
    let tasks = after
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a toml block follows the marker");
    let file = env.root.join("tasks.toml");
    fs::write(&file, tasks).unwrap();
    let out = env.output(["batch", file.to_str().unwrap()]);
    // lint finds no TODO: grep's exit code 1 is the batch's, as the README says.
    out.expect_code(1);
    assert_eq!(
        env.subjects("main..agentbox/fix-auth"),
        ["fix auth"],
        "{out}"
    );
    assert!(out.stdout.contains("fix-auth  0"), "{out}");
    assert_eq!(env.containers(), Vec::<String>::new());
}
