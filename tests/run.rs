//! `agentbox run` against a real engine: where commits go, what the container may touch, what the
//! teardown keeps, exit codes, output, options.

mod common;

use std::fs;

use common::*;

// ---- commits ------------------------------------------------------------------------------------

fn commit_in_container_lands_on_task_branch(env: &TestEnv) {
    let base = env.head();
    let out = env.output([
        "run",
        "work",
        "--",
        "sh",
        "-c",
        "echo hi > a.txt && git add a.txt && git commit -q -m 'task commit'",
    ]);
    out.expect_code(0);

    assert!(
        env.branch_exists("agentbox/work"),
        "branch agentbox/work\n{out}"
    );
    assert_eq!(
        env.show_format("agentbox/work", "%s%n%P%n%an <%ae>%n%cn <%ce>"),
        format!("task commit\n{base}\n{USER_NAME} <{USER_EMAIL}>\n{USER_NAME} <{USER_EMAIL}>"),
        "the tip of agentbox/work is the task's own commit (no extra snapshot commit on a clean \
         worktree), on top of the base, with the host's git identity"
    );
    assert_eq!(
        env.file_at("agentbox/work", "a.txt").as_deref(),
        Some("hi\n")
    );
    assert_eq!(env.head(), base, "the repository's HEAD must not move");
    assert!(
        !out.stderr.contains("snapshot commit"),
        "no snapshot when the task left nothing uncommitted\n{out}"
    );
    out.expect_stderr_contains("agentbox: task work exited 0");
    env.assert_torn_down("work");
}

#[test]
fn commit_in_container_lands_on_task_branch_of_clone() {
    let env = TestEnv::new("commit-clone");
    commit_in_container_lands_on_task_branch(&env);
}

#[test]
fn commit_in_container_lands_on_task_branch_of_bare_repo() {
    let env = TestEnv::new_bare("commit-bare");
    commit_in_container_lands_on_task_branch(&env);
}

// ---- teardown and snapshot --------------------------------------------------------------------------

fn uncommitted_work_becomes_one_snapshot_commit(env: &TestEnv) {
    let base = env.head();
    let out = env.output([
        "run",
        "snap",
        "--",
        "sh",
        "-c",
        "echo more >> README.md && echo new > new.txt && mkdir sub && echo deep > sub/deep.txt \
         && echo junk > ignored.txt && echo junk > build.log",
    ]);
    out.expect_code(0);

    let tip = env.rev("agentbox/snap").expect("branch agentbox/snap");
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/snap")).len(),
        1,
        "exactly one commit on top of the base"
    );
    assert!(
        env.show_format(&tip, "%s")
            .starts_with("agentbox: snapshot"),
        "message starts with 'agentbox: snapshot': {:?}",
        env.show_format(&tip, "%B")
    );
    assert_eq!(env.show_format(&tip, "%P"), base);
    assert_eq!(
        env.changed_files(&tip),
        ["README.md", "new.txt", "sub/deep.txt"],
        "modified tracked and new untracked files, not the ignored ones"
    );
    assert_eq!(
        env.file_at(&tip, "README.md").as_deref(),
        Some("hello\nmore\n")
    );
    assert_eq!(env.file_at(&tip, "new.txt").as_deref(), Some("new\n"));
    assert_eq!(env.file_at(&tip, "ignored.txt"), None);
    assert_eq!(env.file_at(&tip, "build.log"), None);

    // The summary names the snapshot commit.
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("agentbox: snapshot commit "))
        .unwrap_or_else(|| panic!("no 'agentbox: snapshot commit' line\n{out}"));
    let sha = line["agentbox: snapshot commit ".len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default();
    assert!(
        sha.len() >= 7 && tip.starts_with(sha),
        "snapshot line names {sha:?}, branch tip is {tip}\n{out}"
    );
    assert!(
        line.contains("snap"),
        "snapshot line names the task: {line}"
    );

    env.assert_torn_down("snap");
    assert_eq!(env.head(), base, "the repository's HEAD must not move");
}

#[test]
fn uncommitted_work_becomes_one_snapshot_commit_in_clone() {
    let env = TestEnv::new("snapshot-clone");
    uncommitted_work_becomes_one_snapshot_commit(&env);
}

#[test]
fn uncommitted_work_becomes_one_snapshot_commit_in_bare_repo() {
    let env = TestEnv::new_bare("snapshot-bare");
    uncommitted_work_becomes_one_snapshot_commit(&env);
}

#[test]
fn snapshot_commit_runs_no_repository_hooks() {
    let env = TestEnv::new("snapshot-hooks");
    let marker = env.root.join("hook-ran");
    for hook in ["pre-commit", "commit-msg", "post-commit"] {
        let path = env.common_dir().join("hooks").join(hook);
        fs::write(
            &path,
            format!("#!/bin/sh\necho {hook} >> '{}'\nexit 1\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = env.output(["run", "hooks", "--", "sh", "-c", "echo wip > wip.txt"]);
    out.expect_code(0);
    env.assert_snapshot_holds("hooks", "wip.txt", "wip\n");
    assert!(
        !marker.exists(),
        "a host hook ran during the snapshot: {}",
        fs::read_to_string(&marker).unwrap_or_default()
    );
    env.assert_torn_down("hooks");
}

#[test]
fn second_run_continues_on_existing_branch() {
    let env = TestEnv::new("continue");
    let base = env.head();
    env.output([
        "run",
        "again",
        "--",
        "sh",
        "-c",
        "echo one > one.txt && git add one.txt && git commit -qm first",
    ])
    .expect_code(0);
    let first = env.rev("agentbox/again").expect("branch after first run");

    let out = env.output([
        "run",
        "again",
        "--",
        "sh",
        "-c",
        "test \"$(cat one.txt)\" = one && echo two > two.txt && git add two.txt && git commit -qm second",
    ]);
    out.expect_code(0);
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/again")),
        ["second", "first"]
    );
    assert_eq!(env.show_format("agentbox/again", "%P"), first);
    env.assert_torn_down("again");
}

#[test]
fn keep_leaves_worktree_and_stopped_container_until_rm() {
    let env = TestEnv::new("keep");
    let wt = env.worktree_path("kept");
    let out = env.output([
        "run",
        "kept",
        "--keep",
        "--",
        "sh",
        "-c",
        "echo kept > kept.txt",
    ]);
    out.expect_code(0);

    // Worktree stays, with the work, and so does the task's git dir that its `.git` file names; the
    // worktree is not a linked worktree of the repository.
    assert_eq!(
        fs::read_to_string(wt.join("kept.txt")).ok().as_deref(),
        Some("kept\n"),
        "kept worktree {}\n{out}",
        wt.display()
    );
    let git_dir = env.task_git_dir("kept");
    let scratch = env.scratch_dir("kept");
    assert_eq!(
        fs::read_to_string(wt.join(".git")).unwrap(),
        format!("gitdir: {}\n", git_dir.display()),
        "the worktree's .git file points at the task's own git dir"
    );
    assert!(git_dir.join("HEAD").is_file(), "{}", git_dir.display());
    assert!(scratch.is_dir(), "{}", scratch.display());
    assert!(
        env.worktree_entry(&wt).is_none(),
        "git worktree list must not show a task's worktree: {:?}",
        env.worktrees()
    );

    // One stopped container with the documented name, labels and mounts.
    let ids = env.containers();
    assert_eq!(ids.len(), 1, "one kept container");
    let c = env.inspect(&ids[0]);
    assert_eq!(c["State"]["Status"], "exited", "container is stopped");
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["agentbox.task"], "kept");
    assert_eq!(labels["agentbox.branch"], "agentbox/kept");
    assert_eq!(labels[TEST_LABEL], env.id.as_str());
    let repo_id = labels["agentbox.repo"]
        .as_str()
        .expect("agentbox.repo label");
    let hex = repo_id.strip_prefix("proj-").unwrap_or_default();
    assert!(
        hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "repo id is proj-<8 hex digits>: {repo_id}"
    );
    assert_eq!(c["Name"], format!("/agentbox-{repo_id}-kept").as_str());
    assert_eq!(c["Config"]["WorkingDir"], wt.to_str().unwrap());
    assert_eq!(c["Config"]["Image"], IMAGE);
    assert_eq!(c["Config"]["User"], own_user().as_str());
    // Limits by default, and a network agentbox made for the repository (not the engine's default
    // bridge), labelled like the container.
    assert_eq!(c["HostConfig"]["PidsLimit"], 4096, "default pids limit");
    assert!(
        c["HostConfig"]["Memory"].as_i64().is_some_and(|m| m > 0),
        "a default memory limit: {}",
        c["HostConfig"]["Memory"]
    );
    let network = c["HostConfig"]["NetworkMode"].as_str().unwrap_or_default();
    assert!(
        network.starts_with(&format!("agentbox-{repo_id}-")),
        "an agentbox network of the repository: {network}"
    );
    assert!(
        env.networks().iter().any(|n| n == network),
        "{network} is labelled with the test's labels: {:?}",
        env.networks()
    );
    let mounts = c["Mounts"].as_array().expect("mounts");
    let mount = |path: &std::path::Path| {
        mounts
            .iter()
            .find(|m| m["Destination"] == path.to_str().unwrap())
            .unwrap_or_else(|| panic!("no mount at {}: {mounts:?}", path.display()))
    };
    // The worktree and the task's git dir read-write, the git dir's config and objects/info
    // read-only, the repository's objects read-only; nothing else of the repository.
    let objects = env.common_dir().join("objects");
    let expected = [
        (wt.clone(), true),
        (git_dir.clone(), true),
        (git_dir.join("config"), false),
        (git_dir.join("objects"), true),
        (git_dir.join("objects/info"), false),
        (objects.clone(), false),
    ];
    let mut destinations: Vec<&str> = mounts
        .iter()
        .map(|m| m["Destination"].as_str().unwrap())
        .collect();
    destinations.sort();
    let mut wanted: Vec<&str> = expected.iter().map(|(p, _)| p.to_str().unwrap()).collect();
    wanted.sort();
    assert_eq!(destinations, wanted, "exactly these mounts: {mounts:?}");
    for (path, rw) in expected {
        let m = mount(&path);
        assert_eq!(
            m["Source"],
            path.to_str().unwrap(),
            "mounted at its host path"
        );
        assert_eq!(m["RW"], rw, "read-write of {}", path.display());
    }

    // State: record and log in the repo's state dir, ls says kept.
    let state = env.state_root().join(repo_id);
    assert!(state.join("tasks/kept.json").is_file(), "state record");
    assert!(state.join("logs/kept").is_dir(), "log directory");
    let rec = env.ls_task("kept").expect("ls lists kept");
    assert_eq!(rec["state"], "kept");

    // rm cleans up both, keeps the branch and the work.
    let rm = env.output(["rm", "kept"]);
    rm.expect_code(0);
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "rm removes the container\n{rm}"
    );
    assert!(!wt.exists(), "rm removes the worktree");
    assert!(!git_dir.exists(), "rm removes the task's git dir");
    assert!(!scratch.exists(), "rm removes the scratch dir");
    assert!(env.ls_task("kept").is_none(), "rm forgets the task");
    assert!(!state.join("tasks/kept.json").exists());
    assert!(env.branch_exists("agentbox/kept"), "branch stays");
    assert_eq!(
        env.file_at("agentbox/kept", "kept.txt").as_deref(),
        Some("kept\n"),
        "the kept worktree's uncommitted work must end up on the branch, never be discarded"
    );
}

// ---- exit codes -------------------------------------------------------------------------------------

#[test]
fn exit_code_of_command_is_propagated() {
    let env = TestEnv::new("exit-code");
    let out = env.output(["run", "three", "--", "sh", "-c", "exit 3"]);
    out.expect_code(3);
    out.expect_stderr_contains("agentbox: task three exited 3");
    let rec = env.ls_task("three").expect("ls lists three");
    assert_eq!(rec["exit_code"], 3);
    env.assert_torn_down("three");
    env.assert_branch_gone_unchanged("three", &out);
}

#[test]
fn missing_command_exits_127() {
    let env = TestEnv::new("exit-127");
    env.output(["run", "nocmd", "--", "agentbox-no-such-command"])
        .expect_code(127);
    env.assert_torn_down("nocmd");
    env.output(["run", "nofile", "--", "./no-such-script.sh"])
        .expect_code(127);
    env.assert_torn_down("nofile");
}

#[test]
fn non_executable_command_exits_126() {
    let env = TestEnv::new("exit-126");
    // noexec.sh is committed with mode 644.
    let out = env.output(["run", "noexec", "--", "./noexec.sh"]);
    out.expect_code(126);
    assert!(!out.stdout.contains("should-not-run"), "{out}");
    env.assert_torn_down("noexec");
}

/// A task's container starts while its worktree is checked out, and waits behind a gate (its
/// stdin, read by the image's shell) until the worktree is ready. An image without `/bin/sh`
/// cannot wait that way: its container starts after the checkout, and the task works the same.
#[test]
fn an_image_without_a_shell_runs_its_command_after_the_checkout() {
    ensure_tools_image();
    let env = TestEnv::new("no-shell");
    let image = format!("agentbox-test/no-shell:{}", env.id);
    build_test_image(
        &env,
        &image,
        &format!("FROM scratch\nCOPY --from={TOOLS_IMAGE} /usr/local/bin/busybox /busybox\n"),
    );

    copies_the_readme(&env, &image, "plain", &["/busybox", "cp"]);

    let out = env.output(["run", "--image", &image, "missing", "--", "make"]);
    out.expect_code(127);
    out.expect_stderr_contains(&format!(
        "agentbox: command not found in image {image}: make"
    ));
    env.assert_torn_down("missing");

    // A `/bin/sh` that links nowhere is no shell either.
    let dangling = format!("agentbox-test/dangling-shell:{}", env.id);
    build_test_image(
        &env,
        &dangling,
        &format!("FROM {IMAGE}\nRUN [\"/bin/ln\", \"-sf\", \"/nowhere\", \"/usr/bin/sh\"]\n"),
    );
    copies_the_readme(&env, &dangling, "linked", &["cp"]);
}

/// Runs task `task` on `image` copying README.md with `cp` (a command and its first words), and
/// checks that the command saw the checked-out worktree and that the task is torn down.
fn copies_the_readme(env: &TestEnv, image: &str, task: &str, cp: &[&str]) {
    let mut args = vec!["run", "--image", image, task, "--"];
    args.extend(cp);
    args.extend(["README.md", "copied.txt"]);
    let out = env.output(args);
    out.expect_code(0);
    assert_eq!(
        env.file_at(&format!("agentbox/{task}"), "copied.txt"),
        env.file_at("main", "README.md"),
        "the command saw the checked-out worktree\n{out}"
    );
    env.assert_torn_down(task);
}

/// Builds `image` from a Dockerfile given on stdin (no context), labelled for the test's guard.
fn build_test_image(env: &TestEnv, image: &str, dockerfile: &str) {
    let dockerfile = format!("{dockerfile}LABEL {TEST_LABEL}={}\n", env.id);
    let mut build = std::process::Command::new("docker")
        .args(["build", "-q", "-t", image, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut build.stdin.take().unwrap(), dockerfile.as_bytes()).unwrap();
    assert!(build.wait().unwrap().success(), "docker build {image}");
}

/// A task's container starts before the host has finished writing its worktree (behind its gate,
/// or as a pool slot moved to the task's start), so nothing of the image may run in it then: its
/// healthcheck, which could plant a symlink where the checkout is about to write, is off.
#[test]
fn an_images_healthcheck_never_runs_in_a_tasks_container() {
    let env = TestEnv::new("no-healthcheck");
    let image = format!("agentbox-test/healthcheck:{}", env.id);
    build_test_image(
        &env,
        &image,
        &format!("FROM {IMAGE}\nHEALTHCHECK --interval=100ms CMD touch health-ran\n"),
    );
    let out = env.output(["run", "--image", &image, "--keep", "checked", "--", "true"]);
    out.expect_code(0);
    let ids = env.containers();
    assert_eq!(ids.len(), 1, "{out}");
    let container = env.inspect(&ids[0]);
    assert_eq!(
        container["Config"]["Healthcheck"]["Test"],
        serde_json::json!(["NONE"]),
        "{container}"
    );
    assert!(
        !env.worktree_path("checked").join("health-ran").exists(),
        "the image's healthcheck ran"
    );
    env.output(["rm", "checked"]).expect_code(0);
}

/// The gate is the container's stdin, but what the command reads there is nothing: a command that
/// reads its stdin ends at once, as it did before there was a gate.
#[test]
fn a_gated_command_reads_an_empty_stdin() {
    let env = TestEnv::new("gate-stdin");
    let out = env.output(["run", "reads", "--", "sh", "-c", "cat; echo read-$?"]);
    out.expect_code(0);
    assert_eq!(out.stdout, "read-0\n", "{out}");
    env.assert_torn_down("reads");
}

#[test]
fn without_command_the_image_default_runs() {
    let env = TestEnv::new("default-cmd");
    // The default image's CMD is /bin/bash; with stdin not attached it ends at once.
    env.output(["run", "dflt"]).expect_code(0);
    env.assert_torn_down("dflt");
}

// ---- output -----------------------------------------------------------------------------------------

#[test]
fn stdout_and_stderr_are_kept_apart_and_logged() {
    let env = TestEnv::new("stdio");
    let out = env.output([
        "run",
        "io",
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; echo more-stdout",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout, "to-stdout\nmore-stdout\n",
        "stdout carries exactly the container's stdout\n{out}"
    );
    assert!(out.stderr.contains("to-stderr\n"), "{out}");
    for line in out.stderr.lines().filter(|l| *l != "to-stderr") {
        assert!(
            line.starts_with("agentbox: "),
            "agentbox's own messages are prefixed 'agentbox: ': {line:?}\n{out}"
        );
    }

    let logs = env.output(["logs", "io"]);
    logs.expect_code(0);
    for needle in ["to-stdout", "to-stderr", "more-stdout"] {
        assert!(logs.stdout.contains(needle), "logs show {needle:?}\n{logs}");
    }
    let log_dirs = env.log_files();
    assert_eq!(log_dirs, [env.task_log_dir("io")], "one log directory");
    let mut persisted = String::new();
    for segment in fs::read_dir(&log_dirs[0]).unwrap() {
        persisted.push_str(&String::from_utf8_lossy(
            &fs::read(segment.unwrap().path()).unwrap(),
        ));
    }
    assert!(
        persisted.contains("to-stdout") && persisted.contains("to-stderr"),
        "the log's segment files hold the output: {persisted:?}"
    );
}

// ---- options ----------------------------------------------------------------------------------------

#[test]
fn task_environment_reaches_the_container() {
    let env = TestEnv::new("task-env");
    let out = env.output([
        "run",
        "envt",
        "--env",
        "FOO=bar",
        "--env",
        "SPACED=a b",
        "--",
        "sh",
        "-c",
        "pwd; echo \"$AGENTBOX_TASK\"; echo \"$FOO\"; echo \"$SPACED\"; echo \"$(id -u):$(id -g)\"; \
         echo \"$GIT_AUTHOR_NAME <$GIT_AUTHOR_EMAIL>\"; echo \"$GIT_COMMITTER_NAME <$GIT_COMMITTER_EMAIL>\"; \
         git config --get-all safe.directory; git rev-parse --abbrev-ref HEAD",
    ]);
    out.expect_code(0);
    let ident = format!("{USER_NAME} <{USER_EMAIL}>");
    assert_eq!(
        out.stdout_lines(),
        [
            env.worktree_path("envt").to_str().unwrap(),
            "envt",
            "bar",
            "a b",
            own_user().as_str(),
            ident.as_str(),
            ident.as_str(),
            "*",
            "agentbox/envt",
        ],
        "{out}"
    );
}

#[test]
fn git_identity_falls_back_when_host_has_none() {
    let env = TestEnv::new("ident-fallback");
    env.write_global_config("");
    let out = env.output([
        "run",
        "ident",
        "--",
        "sh",
        "-c",
        "echo \"$GIT_AUTHOR_NAME <$GIT_AUTHOR_EMAIL>\"; echo \"$GIT_COMMITTER_NAME <$GIT_COMMITTER_EMAIL>\"",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [
            "agentbox <agentbox@localhost>",
            "agentbox <agentbox@localhost>"
        ],
        "{out}"
    );
}

#[test]
fn user_option_sets_uid_and_gid() {
    let env = TestEnv::new("user-opt");
    let out = env.output([
        "run",
        "usr",
        "--user",
        "1234:2345",
        "--",
        "sh",
        "-c",
        "echo \"$(id -u):$(id -g)\"",
    ]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), ["1234:2345"], "{out}");
}

#[test]
fn worktree_root_option_places_the_worktree() {
    let env = TestEnv::new("wt-root");
    let root = env.root.join("elsewhere");
    let wt = root.join("placed");
    let out = env.output([
        "run",
        "placed",
        "--keep",
        "--worktree-root",
        root.to_str().unwrap(),
        "--",
        "pwd",
    ]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), [wt.to_str().unwrap()], "{out}");
    assert!(
        wt.join("README.md").is_file(),
        "worktree at {}",
        wt.display()
    );
    assert_eq!(
        fs::read_to_string(wt.join(".git")).unwrap(),
        format!("gitdir: {}\n", env.task_git_dir("placed").display()),
        "the worktree at the custom root points at the task's git dir in the state dir"
    );
    assert!(
        !env.worktree_path("placed").exists(),
        "nothing at the default root"
    );
    assert_eq!(
        env.ls_task("placed").expect("ls")["worktree"],
        wt.to_str().unwrap()
    );

    env.output(["rm", "placed"]).expect_code(0);
    assert!(!wt.exists(), "rm removes the worktree at the custom root");
    assert!(root.is_dir(), "a root the user chose stays");
    assert!(
        !env.task_git_dir("placed").exists(),
        "rm removes the task's git dir"
    );
}

#[test]
fn base_option_starts_the_branch_at_the_given_ref() {
    let env = TestEnv::new("base-opt");
    let main = env.head();
    env.git(["switch", "-q", "-c", "other"]);
    fs::write(env.repo.join("other.txt"), "from other\n").unwrap();
    env.git(["add", "other.txt"]);
    env.git(["commit", "-q", "-m", "other commit"]);
    env.git(["switch", "-q", "main"]);
    let other = env.rev("other").unwrap();

    let out = env.output([
        "run",
        "based",
        "--keep-branch",
        "--base",
        "other",
        "--",
        "cat",
        "other.txt",
    ]);
    out.expect_code(0);
    assert_eq!(out.stdout, "from other\n", "{out}");
    assert_eq!(env.rev("agentbox/based").as_deref(), Some(other.as_str()));
    assert_eq!(env.head(), main);
    let rec = env.ls_task("based").expect("ls");
    assert_eq!(rec["base"], "other");
    assert_eq!(rec["base_commit"], other.as_str());
}

#[test]
fn repo_option_works_before_and_after_the_subcommand() {
    let env = TestEnv::new("repo-opt");
    let repo = env.repo.to_str().unwrap();
    output_of(env.agentbox_in(
        &env.home,
        [
            "--repo",
            repo,
            "run",
            "before",
            "--keep-branch",
            "--",
            "true",
        ],
    ))
    .expect_code(0);
    output_of(env.agentbox_in(
        &env.home,
        [
            "run",
            "after",
            "--keep-branch",
            "--repo",
            repo,
            "--",
            "true",
        ],
    ))
    .expect_code(0);
    assert!(env.branch_exists("agentbox/before"));
    assert!(env.branch_exists("agentbox/after"));
    let ls = output_of(env.agentbox_in(&env.home, ["ls", "--json", "--repo", repo]));
    ls.expect_code(0);
    let mut names: Vec<String> = ls
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["\"after\"", "\"before\""], "{ls}");
}

#[test]
fn run_from_linked_worktree_of_bare_repo_starts_at_its_head() {
    let env = TestEnv::new_bare("linked-wt");
    let feature = env.root.join("feature");
    env.git([
        "worktree",
        "add",
        "-q",
        "-b",
        "feature",
        feature.to_str().unwrap(),
        "main",
    ]);
    fs::write(feature.join("feature.txt"), "feat\n").unwrap();
    env.git_in(&feature, ["add", "feature.txt"]);
    env.git_in(&feature, ["commit", "-q", "-m", "feature commit"]);
    let feature_commit = env.rev("feature").unwrap();

    let out = output_of(env.agentbox_in(
        &feature,
        [
            "run",
            "lw",
            "--",
            "sh",
            "-c",
            "pwd; cat feature.txt; git commit -q --allow-empty -m in-task",
        ],
    ));
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [env.worktree_path("lw").to_str().unwrap(), "feat"],
        "worktree beside the bare repo, starting at the linked worktree's HEAD\n{out}"
    );
    assert_eq!(
        env.show_format("agentbox/lw", "%s %P"),
        format!("in-task {feature_commit}")
    );
    env.assert_torn_down("lw");
    assert!(
        feature.join("feature.txt").is_file(),
        "the linked worktree is untouched"
    );
}

#[test]
fn longest_valid_task_name_is_accepted() {
    let env = TestEnv::new("long-name");
    // 63 characters, using every allowed class.
    let name = format!("a1._-{}", "x".repeat(58));
    assert_eq!(name.len(), 63);
    let out = env.output(["run", &name, "--", "true"]);
    out.expect_code(0);
    env.assert_torn_down(&name);
    env.assert_branch_gone_unchanged(&name, &out);
    // With --keep-branch the branch stays, at the base.
    env.output(["run", &name, "--keep-branch", "--", "true"])
        .expect_code(0);
    assert_eq!(
        env.rev(&format!("agentbox/{name}")).as_deref(),
        Some(env.head().as_str())
    );
    env.assert_torn_down(&name);
}

// ---- concurrency ------------------------------------------------------------------------------------

#[test]
fn two_tasks_run_concurrently_in_one_repo() {
    let env = TestEnv::new("concurrent");
    let base = env.head();
    let script = format!(
        "echo ready; {}; echo \"$AGENTBOX_TASK\" > out.txt; git add out.txt; git commit -qm \"$AGENTBOX_TASK done\"",
        wait_for_file("go")
    );
    let mut a = env.spawn(["run", "par-a", "--", "sh", "-c", &script]);
    let mut b = env.spawn(["run", "par-b", "--", "sh", "-c", &script]);
    a.wait_for_line("ready");
    b.wait_for_line("ready");
    assert_eq!(
        env.live_containers().len(),
        2,
        "both tasks run at the same time:\n{}",
        env.container_report()
    );

    touch(&env.worktree_path("par-a").join("go"));
    touch(&env.worktree_path("par-b").join("go"));
    let (a, b) = (a.wait(), b.wait());
    a.expect_code(0);
    b.expect_code(0);

    for task in ["par-a", "par-b"] {
        let branch = format!("agentbox/{task}");
        assert_eq!(
            env.subjects(&format!("{base}..{branch}")),
            [format!("{task} done")]
        );
        assert_eq!(env.file_at(&branch, "out.txt"), Some(format!("{task}\n")));
        env.assert_torn_down(task);
    }
}
