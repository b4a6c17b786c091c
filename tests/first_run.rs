//! The first ten minutes: what a new user meets — messages in agentbox's own words with the right
//! exit codes, what a task that changed nothing leaves behind, and the warning about uncommitted
//! changes a task will not see.

mod common;

use std::fs;

use common::*;

#[test]
fn a_missing_or_unexecutable_command_is_said_in_agentboxs_words() {
    let env = TestEnv::new("first-cmd");
    let missing = env.output(["run", "nomake", "--", "make", "lint"]);
    missing.expect_code(127);
    missing.expect_stderr_contains(&format!(
        "agentbox: command not found in image {IMAGE}: make"
    ));
    assert!(!missing.stderr.contains("tini"), "{missing}");

    let not_executable = env.output(["run", "noexec", "--", "./noexec.sh"]);
    not_executable.expect_code(126);
    not_executable.expect_stderr_contains(&format!(
        "agentbox: command cannot be executed in image {IMAGE}: ./noexec.sh"
    ));
}

#[test]
fn an_empty_repository_is_told_to_commit_first_and_nothing_is_left() {
    let env = TestEnv::new("first-empty");
    let empty = env.root.join("empty");
    env.git_in(&env.root, ["init", "-q", "-b", "main", "empty"]);
    let out = output_of(env.agentbox_in(&empty, ["run", "t", "--", "true"]));
    out.expect_code(125);
    out.expect_stderr_contains("has no commits yet; commit something first");
    assert!(
        !env.state_root().exists() || fs::read_dir(env.state_root()).unwrap().count() == 0,
        "no state folder is left: {:?}",
        env.state_files()
    );
}

#[test]
fn a_forgotten_double_dash_gets_a_hint() {
    let env = TestEnv::new("first-dashes");
    let out = env.output(["run", "t", "echo", "hi"]);
    out.expect_code(125);
    out.expect_stderr_contains("hint: a command for the task goes after `--`");
    let global = env.output(["--repo", ".", "run", "t", "echo", "hi"]);
    global.expect_code(125);
}

#[test]
fn ports_of_a_task_without_ports_says_so() {
    let env = TestEnv::new("first-ports");
    env.output(["run", "t", "--keep-branch", "--", "true"])
        .expect_code(0);
    let out = env.output(["ports", "t"]);
    out.expect_code(0);
    out.expect_stderr_contains("task t has no ports");
}

#[test]
fn a_task_that_changed_nothing_leaves_no_branch_unless_asked() {
    let env = TestEnv::new("first-branch");
    let out = env.output(["run", "idle", "--", "sh", "-c", "exit 3"]);
    out.expect_code(3);
    out.expect_stderr_contains("changed nothing, so its branch is gone again");
    assert!(!env.branch_exists("agentbox/idle"));
    // The worktree is moved aside at once and deleted in the background; the empty worktree root
    // goes with it.
    assert!(!env.worktree_path("idle").exists());
    let root = env.root.join(".agentbox-worktrees");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while root.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !root.exists(),
        "the empty worktree root goes with the last worktree"
    );

    env.output(["run", "kept", "--keep-branch", "--", "true"])
        .expect_code(0);
    assert!(env.branch_exists("agentbox/kept"));

    env.output(["run", "worked", "--", "sh", "-c", "echo x > x.txt"])
        .expect_code(0);
    assert!(env.branch_exists("agentbox/worked"));

    // A branch that existed before the run is never deleted by this rule.
    env.output(["run", "worked", "--", "true"]).expect_code(0);
    assert!(env.branch_exists("agentbox/worked"));
}

#[test]
fn uncommitted_changes_of_the_checkout_are_pointed_out_or_refused() {
    let env = TestEnv::new("first-dirty");
    fs::write(env.repo.join("README.md"), "edited but not committed\n").unwrap();
    let head = env.head();
    let out = env.output(["run", "t", "--", "cat", "README.md"]);
    out.expect_code(0);
    out.expect_stderr_contains(&format!(
        "agentbox: your checkout has uncommitted changes; task t starts from main ({}) without them",
        &head[..7]
    ));
    assert_eq!(
        out.stdout_lines(),
        ["hello"],
        "the task sees the committed file"
    );
    assert!(
        out.stderr
            .starts_with("agentbox: your checkout has uncommitted changes"),
        "said before anything of the task\n{out}"
    );

    let explicit = env.output(["run", "t2", "--base", "main", "--", "true"]);
    explicit.expect_code(0);
    assert!(!explicit.stderr.contains("uncommitted"), "{explicit}");

    env.git(["stash", "-q"]);
    env.write_config("refuse_dirty_checkout = true\n");
    env.git(["stash", "pop", "-q"]);
    let refused = env.output(["run", "t3", "--", "true"]);
    refused.expect_code(125);
    refused.expect_stderr_contains("your checkout has uncommitted changes");
    refused.expect_stderr_contains("hint: commit or stash them first");
    assert!(!env.branch_exists("agentbox/t3"));
    assert!(env.ls_task("t3").is_none());
    assert!(!env.worktree_path("t3").exists());
}

#[test]
fn a_finished_tasks_container_goes_in_the_background_and_frees_its_name_at_once() {
    let env = TestEnv::new("first-aside");
    env.output(["run", "again", "--keep-branch", "--", "true"])
        .expect_code(0);
    // At once, while the first run's stopped container may still wait for its purge.
    env.output(["run", "again", "--keep-branch", "--", "true"])
        .expect_code(0);
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "the purges removed both containers: {}",
        env.container_report()
    );
}

#[test]
fn ignored_files_go_in_the_background_and_gc_finishes_a_cut_short_deletion() {
    let env = TestEnv::new("first-trash");
    let script = "mkdir -p node_modules && cd node_modules && \
                  for d in $(seq 1 50); do mkdir p$d && (cd p$d && touch $(seq 1 200)); done && \
                  cd .. && echo '/node_modules/' >> .gitignore && echo kept > kept.txt";
    env.output(["run", "deps", "--", "sh", "-c", script])
        .expect_code(0);
    env.assert_snapshot_holds("deps", "kept.txt", "kept\n");
    assert_eq!(
        env.file_at("agentbox/deps", "node_modules/p1/1"),
        None,
        "ignored files are not committed"
    );
    assert!(!env.worktree_path("deps").exists(), "moved aside at once");

    // A deletion cut short (its manifest left, the directory still there) is finished by gc.
    let trash = env.state_root().join(env.repo_id()).join("trash");
    fs::create_dir_all(&trash).unwrap();
    let leftover = env.root.join("left-over-dir");
    fs::create_dir_all(leftover.join("a/b")).unwrap();
    fs::write(leftover.join("a/b/c"), "x").unwrap();
    let manifest = trash.join("cut-short.json");
    fs::write(
        &manifest,
        serde_json::json!({
            "task": "cut-short",
            "containers": [],
            "networks": [],
            "paths": [leftover],
        })
        .to_string(),
    )
    .unwrap();
    env.output(["gc"]).expect_code(0);
    assert!(!leftover.exists(), "gc finished the deletion");
    assert!(!manifest.exists());
}
