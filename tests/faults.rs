//! `agentbox run` when something is wrong: the engine, the image, the repository, the base, the task
//! name. Each fails with 125, says what is wrong, and leaves nothing behind.

mod common;

use std::fs;

use common::*;

#[test]
fn unreachable_engine_fails_with_125_and_leaves_nothing() {
    let env = TestEnv::new("no-engine");
    let mut cmd = env.agentbox(["run", "nodock", "--", "true"]);
    cmd.env("DOCKER_HOST", "unix:///nonexistent.sock");
    let out = output_of(cmd);
    out.expect_code(125);
    out.expect_stderr_contains("/nonexistent.sock");
    out.expect_stderr_contains("agentbox: ");
    env.assert_nothing_left("nodock");
    assert!(env.ls_json().is_empty(), "ls --json is empty");
}

#[test]
fn missing_image_fails_with_125_and_says_it_could_not_be_pulled() {
    let env = TestEnv::new("no-image");
    let out = env.output([
        "run",
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
    assert!(
        !out.stderr.contains("agentbox image build"),
        "only the default image points at `agentbox image build`\n{out}"
    );
    env.assert_nothing_left("noimg");
}

#[test]
fn outside_a_git_repository_fails_with_125() {
    let env = TestEnv::new("no-repo");
    let empty = env.root.join("empty");
    fs::create_dir(&empty).unwrap();
    let out = output_of(env.agentbox_in(&empty, ["run", "nogit", "--", "true"]));
    out.expect_code(125);
    out.expect_stderr_contains("agentbox: ");
    assert_eq!(
        fs::read_dir(&empty).unwrap().count(),
        0,
        "nothing created in the directory"
    );
    assert!(
        !env.root.join(".agentbox-worktrees").exists(),
        "no worktree root"
    );
    assert_eq!(env.containers(), Vec::<String>::new(), "no container");
    assert_eq!(
        env.task_records(),
        Vec::<std::path::PathBuf>::new(),
        "no record"
    );
}

#[test]
fn unknown_base_ref_fails_with_125_naming_it() {
    let env = TestEnv::new("bad-base");
    let out = env.output(["run", "nobase", "--base", "nosuchref", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("nosuchref");
    env.assert_nothing_left("nobase");
}

#[test]
fn invalid_task_names_are_rejected_before_anything_is_created() {
    let env = TestEnv::new("bad-names");
    let long = "a".repeat(300);
    let just_too_long = "a".repeat(64);
    let names = [
        "../x",
        "a b",
        "-rf",
        "",
        long.as_str(),
        just_too_long.as_str(),
        "Foo",
        "a/b",
        "a..b",
        "x.lock",
        "x.",
        ".hidden",
        "_x",
        "x:y",
        "x~1",
    ];
    for name in names {
        let out = env.output(["run", name, "--", "true"]);
        out.expect_code(125);
        if !name.is_empty() && name.len() <= 64 {
            out.expect_stderr_contains(name);
        }
    }

    assert_eq!(env.task_branches(), Vec::<String>::new(), "no task branch");
    assert_eq!(env.branches(), ["main"]);
    assert_eq!(
        env.worktrees().len(),
        1,
        "only the main worktree: {:?}",
        env.worktrees()
    );
    assert!(
        !env.root.join(".agentbox-worktrees").exists(),
        "no worktree root"
    );
    assert!(!env.root.join("x").exists(), "`../x` escaped nowhere");
    assert_eq!(env.containers(), Vec::<String>::new(), "no container");
    assert_eq!(
        env.task_records(),
        Vec::<std::path::PathBuf>::new(),
        "no record"
    );
    assert!(env.ls_json().is_empty(), "ls --json is empty");
}
