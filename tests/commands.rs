//! `ls`, `logs`, `diff`, `stop` and `rm` on finished tasks, and their error exits.

mod common;

use common::*;

#[test]
fn ls_json_describes_a_finished_task() {
    let env = TestEnv::new("ls-json");
    assert!(env.ls_json().is_empty(), "no tasks yet");
    let base = env.head();
    env.output(["run", "lsj", "--", "sh", "-c", "exit 0"])
        .expect_code(0);

    let all = env.ls_json();
    assert_eq!(all.len(), 1, "one line per task: {all:?}");
    let rec = &all[0];
    let obj = rec.as_object().expect("each line is a JSON object");
    for key in [
        "name",
        "state",
        "branch",
        "base",
        "base_commit",
        "container_id",
        "worktree",
        "exit_code",
        "started_at",
        "finished_at",
        "image",
        "command",
        "ports",
        "left_out",
        "oom_killed",
    ] {
        assert!(obj.contains_key(key), "key {key:?} missing: {rec}");
    }
    assert_eq!(rec["name"], "lsj");
    assert_eq!(rec["state"], "exited");
    assert_eq!(rec["branch"], "agentbox/lsj");
    assert_eq!(rec["base_commit"], base.as_str());
    let base_ref = rec["base"].as_str().expect("base is a string");
    assert_eq!(
        env.rev(base_ref).as_deref(),
        Some(base.as_str()),
        "base names the ref the branch started from: {rec}"
    );
    assert!(
        rec["container_id"].is_string() || rec["container_id"].is_null(),
        "container_id: {rec}"
    );
    assert_eq!(rec["worktree"], env.worktree_path("lsj").to_str().unwrap());
    assert_eq!(rec["exit_code"], 0);
    let started = rec["started_at"].as_str().expect("started_at is a string");
    let finished = rec["finished_at"]
        .as_str()
        .expect("finished_at is a string");
    assert!(is_rfc3339(started), "started_at is RFC 3339: {started}");
    assert!(is_rfc3339(finished), "finished_at is RFC 3339: {finished}");
    if started.ends_with('Z') && finished.ends_with('Z') {
        assert!(started[..19] <= finished[..19], "{started} <= {finished}");
    }
    assert_eq!(rec["image"], IMAGE);
    assert_eq!(rec["command"], serde_json::json!(["sh", "-c", "exit 0"]));
    assert_eq!(rec["left_out"], serde_json::json!([]));
    assert_eq!(rec["oom_killed"], false);
}

#[test]
fn ls_table_lists_every_task() {
    let env = TestEnv::new("ls-table");
    env.output(["run", "good", "--", "true"]).expect_code(0);
    env.output(["run", "bad", "--", "sh", "-c", "exit 7"])
        .expect_code(7);

    let ls = env.output(["ls"]);
    ls.expect_code(0);
    let rows = ls.stdout_lines();
    // The first columns are fixed; later issues may append more (e.g. PORTS).
    let header: Vec<&str> = rows[0].split_whitespace().take(5).collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "BRANCH", "EXIT", "STARTED"],
        "{ls}"
    );
    assert_eq!(rows.len(), 3, "header and one row per task\n{ls}");
    for (task, exit) in [("good", "0"), ("bad", "7")] {
        let row = rows
            .iter()
            .find(|r| r.split_whitespace().next() == Some(task))
            .unwrap_or_else(|| panic!("no row for {task}\n{ls}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2], format!("agentbox/{task}"), "{row}");
        assert_eq!(cols[3], exit, "{row}");
    }
}

#[test]
fn diff_shows_branch_changes_against_base() {
    let env = TestEnv::new("diff");
    env.output([
        "run",
        "dif",
        "--",
        "sh",
        "-c",
        "echo hello > greet.txt && echo more >> README.md && git add -A && git commit -qm greet",
    ])
    .expect_code(0);

    let diff = env.output(["diff", "dif"]);
    diff.expect_code(0);
    for needle in ["greet.txt", "+hello", "README.md", "+more"] {
        assert!(
            diff.stdout.contains(needle),
            "diff shows {needle:?}\n{diff}"
        );
    }
    let stat = env.output(["diff", "dif", "--stat"]);
    stat.expect_code(0);
    assert!(
        stat.stdout.contains("greet.txt")
            && stat.stdout.contains("README.md")
            && stat.stdout.contains("2 files changed"),
        "{stat}"
    );
    assert!(
        !stat.stdout.contains("+hello"),
        "--stat shows no patch\n{stat}"
    );
}

#[test]
fn rm_forgets_task_and_keeps_branch() {
    let env = TestEnv::new("rm");
    env.output([
        "run",
        "gone",
        "--",
        "git",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "kept-commit",
    ])
    .expect_code(0);
    assert_eq!(env.task_records().len(), 1);
    assert_eq!(env.log_files().len(), 1);

    env.output(["rm", "gone"]).expect_code(0);
    assert!(env.ls_task("gone").is_none(), "rm forgets the task");
    assert_eq!(
        env.task_records(),
        Vec::<std::path::PathBuf>::new(),
        "record removed"
    );
    assert_eq!(
        env.log_files(),
        Vec::<std::path::PathBuf>::new(),
        "log removed"
    );
    env.output(["logs", "gone"]).expect_code(1);
    assert!(env.branch_exists("agentbox/gone"), "branch stays");
    assert_eq!(env.show_format("agentbox/gone", "%s"), "kept-commit");
}

#[test]
fn rm_delete_branch_deletes_the_branch() {
    let env = TestEnv::new("rm-branch");
    env.output([
        "run",
        "del",
        "--",
        "git",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "doomed",
    ])
    .expect_code(0);
    let tip = env.rev("agentbox/del").expect("branch agentbox/del");

    let rm = env.output(["rm", "--delete-branch", "del"]);
    rm.expect_code(0);
    rm.expect_stderr_contains(&format!(
        "deleted refs/heads/agentbox/del (was {tip}; `git update-ref refs/heads/agentbox/del {tip}` restores it)"
    ));
    assert!(!env.branch_exists("agentbox/del"), "branch deleted");
    assert!(env.ls_task("del").is_none());
    assert_eq!(env.branches(), ["main"], "other branches untouched");
}

#[test]
fn commands_on_unknown_or_finished_tasks_fail_with_1() {
    let env = TestEnv::new("unknown-task");
    for args in [
        &["logs", "ghost"][..],
        &["diff", "ghost"],
        &["stop", "ghost"],
        &["rm", "ghost"],
    ] {
        let out = env.output(args);
        out.expect_code(1);
        out.expect_stderr_contains("ghost");
    }

    env.output(["run", "done", "--", "true"]).expect_code(0);
    let stop = env.output(["stop", "done"]);
    stop.expect_code(1);
    stop.expect_stderr_contains("done");
    assert!(
        env.ls_task("done").is_some(),
        "a failed stop changes nothing"
    );
}

#[test]
fn usage_errors_exit_2() {
    let env = TestEnv::new("usage");
    for args in [
        &["ls", "--no-such-flag"][..],
        &["rm"],
        &["logs"],
        &["no-such-subcommand"],
    ] {
        let out = env.output(args);
        out.expect_code(2);
    }
}
