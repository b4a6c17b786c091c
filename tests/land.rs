//! From many branches to one, on real repositories (a clone and a bare one) and the real engine:
//! `merge` in each mode, refusals that change nothing, `apply`, `review`, `conflicts` between
//! running and finished tasks, the `queue` that checks each task in a box before it lands, and a
//! hostile task whose `.gitattributes` asks the host to run its drivers.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::*;
use serde_json::Value;

/// Runs tasks with `agentbox batch` (in parallel), each `(name, shell script)`; all must exit 0.
fn tasks(env: &TestEnv, tasks: &[(&str, &str)]) {
    let mut file = String::new();
    for (name, script) in tasks {
        file.push_str(&format!(
            "[[task]]\nname = {name:?}\ncommand = {script:?}\n\n"
        ));
    }
    let path = env.root.join(format!("tasks-{}.toml", tasks[0].0));
    fs::write(&path, file).unwrap();
    let out = env.output(["batch".as_ref(), path.as_os_str()]);
    out.expect_code(0);
}

/// Every ref with its target.
fn refs(env: &TestEnv) -> BTreeMap<String, String> {
    env.git(["for-each-ref", "--format=%(refname) %(objectname)"])
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, id)| (n.to_owned(), id.to_owned()))
        .collect()
}

/// Commits `contents` to `path` on main (in the seed for a bare repository, then fetched).
fn commit_on_main(env: &TestEnv, path: &str, contents: &str) {
    let dir = match env.kind {
        RepoKind::Clone => env.repo.clone(),
        RepoKind::Bare => env.root.join("seed"),
    };
    fs::write(dir.join(path), contents).unwrap();
    env.git_in(&dir, ["add", path]);
    env.git_in(
        &dir,
        ["commit", "-q", "-m", &format!("main changes {path}")],
    );
    if env.kind == RepoKind::Bare {
        let seed = dir.display().to_string();
        env.git(["fetch", "-q", &seed, "+main:main"]);
    }
}

fn is_ancestor(env: &TestEnv, a: &str, b: &str) -> bool {
    env.git_try(["merge-base", "--is-ancestor", a, b]).is_some()
}

/// Merge, squash, rebase and fast-forward, each landing one task on main.
fn lands_in_each_mode(env: &TestEnv) {
    tasks(
        env,
        &[
            (
                "m",
                "echo m > m.txt && git add m.txt && git commit -qm 'add m'",
            ),
            (
                "s",
                "echo s1 > s.txt && git add s.txt && git commit -qm 's one' && echo s2 >> s.txt && git commit -qam 's two'",
            ),
            (
                "r",
                "echo r1 > r.txt && git add r.txt && git commit -qm 'r one' && echo r2 > r2.txt && git add r2.txt && git commit -qm 'r two'",
            ),
            (
                "f",
                "echo f > f.txt && git add f.txt && git commit -qm 'add f'",
            ),
        ],
    );
    let originals: BTreeMap<&str, String> = ["m", "s", "r", "f"]
        .into_iter()
        .map(|t| (t, env.rev(&format!("agentbox/{t}")).unwrap()))
        .collect();

    // Fast-forward first, while main has not moved since the tasks started.
    let before = env.rev("main").unwrap();
    env.output(["merge", "f", "--ff-only"]).expect_code(0);
    assert_eq!(env.rev("main").unwrap(), originals["f"]);
    assert!(is_ancestor(env, &before, "main"));

    // A fast-forward is refused once main has commits the task does not.
    let out = env.output(["merge", "m", "--ff-only"]);
    out.expect_code(1)
        .expect_stderr_contains("cannot fast-forward main to agentbox/m");
    assert_eq!(env.rev("main").unwrap(), originals["f"]);

    let out = env.output(["merge", "m"]);
    out.expect_code(0)
        .expect_stderr_contains("agentbox: landed task m on main");
    let merge = env.rev("main").unwrap();
    assert_eq!(
        env.git(["rev-list", "--parents", "-n", "1", &merge])
            .split(' ')
            .count(),
        3
    );
    assert_eq!(
        env.show_format("main", "%s"),
        "Merge branch 'agentbox/m' into main"
    );
    assert_eq!(env.file_at("main", "m.txt").as_deref(), Some("m\n"));

    env.output(["merge", "s", "--squash"]).expect_code(0);
    assert_eq!(
        env.git(["rev-list", "--parents", "-n", "1", "main"])
            .split(' ')
            .count(),
        2
    );
    let message = env.show_format("main", "%B");
    assert!(
        message.starts_with("Squashed task s (branch agentbox/s)"),
        "{message}"
    );
    assert!(message.contains("* s one\n* s two"), "{message}");
    assert_eq!(env.file_at("main", "s.txt").as_deref(), Some("s1\ns2\n"));

    env.output(["merge", "r", "--rebase"]).expect_code(0);
    assert_eq!(env.subjects("main~2..main"), ["r two", "r one"]);
    assert_eq!(
        env.show_format("main", "%an <%ae>"),
        format!("{USER_NAME} <{USER_EMAIL}>")
    );
    assert!(
        !is_ancestor(env, &originals["r"], "main"),
        "rebased, not merged"
    );

    // Landing again finds nothing to do; every task's own branch is as it was.
    let out = env.output(["merge", "m"]);
    out.expect_code(0)
        .expect_stderr_contains("task m is on main already");
    for (task, tip) in &originals {
        assert_eq!(&env.rev(&format!("agentbox/{task}")).unwrap(), tip);
    }
    // The target only moved forward.
    assert!(is_ancestor(env, &before, "main"));
}

#[test]
fn merge_lands_in_each_mode_in_a_clone_and_updates_its_clean_checkout() {
    let env = TestEnv::new("land-modes");
    lands_in_each_mode(&env);
    // The checkout of main followed, clean.
    assert_eq!(env.git(["status", "--porcelain"]), "");
    for file in ["m.txt", "s.txt", "r.txt", "r2.txt", "f.txt"] {
        assert!(env.repo.join(file).is_file(), "{file} checked out");
    }
}

#[test]
fn merge_lands_in_each_mode_in_a_bare_repository() {
    let env = TestEnv::new_bare("land-modes-bare");
    lands_in_each_mode(&env);
    env.git_raw(["fsck", "--no-dangling"])
        .expect("fsck is clean");
}

#[test]
fn merge_refuses_a_dirty_checked_out_target_and_changes_nothing() {
    let env = TestEnv::new("land-dirty");
    tasks(
        &env,
        &[("t", "echo t > t.txt && git add t.txt && git commit -qm t")],
    );
    fs::write(env.repo.join("README.md"), "local edit\n").unwrap();
    let before = refs(&env);
    let out = env.output(["merge", "t"]);
    out.expect_code(1).expect_stderr_contains(&format!(
        "branch main is checked out in {} with uncommitted changes",
        env.repo.display()
    ));
    assert_eq!(refs(&env), before);
    assert_eq!(
        fs::read_to_string(env.repo.join("README.md")).unwrap(),
        "local edit\n"
    );
    assert!(!env.repo.join("t.txt").exists());
    // Landing elsewhere is fine, and does not touch the checkout.
    env.git(["branch", "release", "main"]);
    env.output(["merge", "t", "--into", "release"])
        .expect_code(0);
    assert_eq!(env.file_at("release", "t.txt").as_deref(), Some("t\n"));
    assert_eq!(env.rev("main"), before.get("refs/heads/main").cloned());
    assert!(!env.repo.join("t.txt").exists());
}

#[test]
fn a_conflict_leaves_everything_as_it_was_and_names_the_files() {
    let env = TestEnv::new("land-conflict");
    tasks(
        &env,
        &[(
            "c",
            "echo task > README.md && git commit -qam 'task readme'",
        )],
    );
    commit_on_main(&env, "README.md", "main\n");
    let before = refs(&env);
    let status = env.git(["status", "--porcelain", "--untracked-files=all"]);
    let index = fs::read(env.common_dir().join("index")).unwrap();
    for mode in ["--squash", "--rebase", "--no-ff-placeholder"] {
        let mut args = vec!["merge", "c"];
        if mode != "--no-ff-placeholder" {
            args.push(mode);
        }
        let out = env.output(&args);
        out.expect_code(1).expect_stderr_contains(
            "landing task c on main conflicts in README.md; nothing was changed",
        );
    }
    assert_eq!(refs(&env), before);
    assert_eq!(
        env.git(["status", "--porcelain", "--untracked-files=all"]),
        status
    );
    assert_eq!(fs::read(env.common_dir().join("index")).unwrap(), index);
    assert_eq!(
        fs::read_to_string(env.repo.join("README.md")).unwrap(),
        "main\n"
    );
    assert_eq!(env.worktrees().len(), 1, "no worktree was left");
    // apply is all or nothing too.
    env.output(["apply", "c"])
        .expect_code(1)
        .expect_stderr_contains("conflicts in README.md");
    assert_eq!(
        env.git(["status", "--porcelain", "--untracked-files=all"]),
        status
    );
}

#[test]
fn apply_puts_a_tasks_changes_into_the_checkout_uncommitted() {
    let env = TestEnv::new("land-apply");
    tasks(
        &env,
        &[(
            "a",
            "echo more >> README.md && echo new > new.txt && git add -A && git commit -qm a",
        )],
    );
    let head = env.head();
    let out = env.output(["apply", "a"]);
    out.expect_code(0)
        .expect_stderr_contains("2 files changed, staged and not committed");
    assert_eq!(env.head(), head, "nothing was committed");
    assert_eq!(
        env.git(["diff", "--cached", "--name-only"]),
        "README.md\nnew.txt"
    );
    assert_eq!(
        fs::read_to_string(env.repo.join("README.md")).unwrap(),
        "hello\nmore\n"
    );
    let bare = TestEnv::new_bare("land-apply-bare");
    bare.output(["apply", "a"])
        .expect_code(1)
        .expect_stderr_contains("is a bare repository: apply needs a checkout");
}

#[test]
fn review_shows_commits_and_diff_of_finished_and_running_tasks() {
    let env = TestEnv::new("land-review");
    tasks(
        &env,
        &[(
            "done",
            "echo one > one.txt && git add one.txt && git commit -qm 'add one'",
        )],
    );
    let out = env.output(["review", "done"]);
    out.expect_code(0);
    assert!(
        out.stdout.starts_with(
            "task done (exited), branch agentbox/done: 1 commit, 1 file changed against main"
        ),
        "{out}"
    );
    assert!(
        out.stdout.contains("    add one\n") && out.stdout.contains("+one"),
        "{out}"
    );
    assert!(!out.stdout.contains("\x1b["), "no colours off a terminal");
    let json: Value =
        serde_json::from_str(&env.output(["review", "done", "--json"]).stdout).unwrap();
    assert_eq!(json["live"], false);
    assert_eq!(json["commits"][0]["subject"], "add one");
    assert_eq!(json["commits"][0]["files"][0]["path"], "one.txt");
    assert_eq!(json["files"][0]["status"], "added");

    let script = format!(
        "echo c > committed.txt && git add . && git commit -qm committed && echo wip > wip.txt && echo ready && {}",
        wait_for_release()
    );
    let mut run = env.spawn(["run", "live", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");
    // The live import brings the commit over within a second; review reads the worktree anyway.
    let json: Value =
        serde_json::from_str(&env.output(["review", "live", "--json"]).stdout).unwrap();
    assert_eq!(json["state"], "running");
    assert_eq!(json["live"], true);
    let files: Vec<&str> = json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["committed.txt", "wip.txt"]);
    assert!(
        json["uncommitted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "wip.txt"),
        "{json}"
    );
    let text = env.output(["review", "live"]).stdout;
    assert!(
        text.contains("Uncommitted in the worktree") && text.contains("+wip"),
        "{text}"
    );
    env.release("live");
    run.wait().expect_code(0);
}

#[test]
fn conflicts_are_predicted_between_running_tasks_finished_branches_and_the_target() {
    let env = TestEnv::new("land-conflicts");
    // Finished: two overlapping branches, one disjoint.
    tasks(
        &env,
        &[
            ("fa", "echo fa > README.md && git commit -qam fa"),
            ("fb", "echo fb > README.md && git commit -qam fb"),
            (
                "fc",
                "echo fc > fc.txt && git add fc.txt && git commit -qm fc",
            ),
        ],
    );
    // Running: two with overlapping uncommitted edits, one disjoint.
    let wait = wait_for_release();
    let mut runs = Vec::new();
    for (task, edit) in [
        ("ra", "echo ra > shared.txt"),
        ("rb", "echo rb > shared.txt"),
        ("rc", "echo rc > rc.txt"),
    ] {
        let script = format!("{edit} && echo ready && {wait}");
        let mut run = env.spawn(["run", task, "--", "sh", "-c", &script]);
        run.wait_for_line("ready");
        runs.push((task, run));
    }
    let before = refs(&env);
    let objects = || env.git(["count-objects", "-v"]);
    let objects_before = objects();

    let out = env.output(["conflicts"]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["fa <-> fb: README.md", "ra <-> rb: shared.txt"],
        "{out}"
    );
    let out = env.output(["conflicts", "--json"]);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[1],
        serde_json::json!({"kind": "tasks", "task": "ra", "other": "rb", "files": ["shared.txt"]})
    );
    let summary = &lines[2];
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["pairs"], 15);
    assert_eq!(summary["targets"], 6);
    let at: BTreeMap<&str, &str> = summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["task"].as_str().unwrap(), t["at"].as_str().unwrap()))
        .collect();
    assert_eq!(at["ra"], "live");
    assert_eq!(at["fa"], "branch");
    assert_eq!(
        env.output(["conflicts", "fa", "fc", "rc"]).stdout,
        "no conflicts\n"
    );
    // Nothing changed: no ref, no object of the repository, no worktree.
    assert_eq!(refs(&env), before);
    assert_eq!(objects(), objects_before);
    assert_eq!(
        fs::read_to_string(env.worktree_path("ra").join("shared.txt")).unwrap(),
        "ra\n"
    );

    // Against a target that moved, the conflict is with the target.
    commit_on_main(&env, "shared.txt", "main\n");
    let out = env.output(["conflicts", "ra", "rc"]);
    assert_eq!(out.stdout_lines(), ["ra -> main: shared.txt"], "{out}");
    for (task, run) in runs {
        env.release(task);
        run.wait().expect_code(0);
    }
}

#[test]
fn batch_warns_when_a_finished_task_conflicts_with_an_earlier_one() {
    let env = TestEnv::new("land-batch");
    let path = env.root.join("tasks.toml");
    fs::write(
        &path,
        "[[task]]\nname = \"one\"\ncommand = \"echo one > README.md\"\n\n[[task]]\nname = \"two\"\ncommand = \"sleep 1; echo two > README.md\"\n",
    )
    .unwrap();
    let out = env.output([
        "batch".as_ref(),
        path.as_os_str(),
        "--json".as_ref(),
        "--parallel".as_ref(),
        "1".as_ref(),
    ]);
    out.expect_code(0);
    let conflict: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "conflict")
        .collect();
    assert_eq!(conflict.len(), 1, "{out}");
    assert_eq!(conflict[0]["task"], "two");
    assert_eq!(conflict[0]["other"], "one");
    assert_eq!(conflict[0]["files"], serde_json::json!(["README.md"]));
    let text = env.output([
        "batch".as_ref(),
        path.as_os_str(),
        "--parallel".as_ref(),
        "1".as_ref(),
    ]);
    // Run again: both continue on their branches and still conflict.
    text.expect_code(0).expect_stderr_contains(
        "two | agentbox: warning: conflicts with task one (finished earlier) in README.md",
    );
}

#[test]
fn the_queue_lands_only_what_passes_its_check_by_fast_forward() {
    let env = TestEnv::new("land-queue");
    tasks(
        &env,
        &[
            ("clash", "echo clash > README.md && git commit -qam clash"),
            (
                "broken",
                "touch broken.marker && git add . && git commit -qm broken",
            ),
            (
                "good",
                "echo good > good.txt && git add . && git commit -qm good",
            ),
        ],
    );
    commit_on_main(&env, "README.md", "main moved\n");
    let originals: BTreeMap<String, String> = env
        .task_branches()
        .into_iter()
        .map(|b| {
            let tip = env.rev(&b).unwrap();
            (b, tip)
        })
        .collect();
    let main_before = env.rev("main").unwrap();

    let out = env.output([
        "queue",
        "clash",
        "broken",
        "good",
        "--check",
        "test ! -e broken.marker && echo checked",
        "--json",
        "--log-lines",
    ]);
    out.expect_code(1);
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["landed"], serde_json::json!(["good"]));
    let outcomes: Vec<&str> = summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["conflict", "check-failed", "landed"]);
    assert_eq!(
        summary["tasks"][0]["files"],
        serde_json::json!(["README.md"])
    );
    assert_eq!(summary["tasks"][1]["check_exit_code"], 1);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "log" && e["task"] == "good" && e["line"] == "checked"),
        "{out}"
    );

    // Exactly one landed, by fast-forward: main moved once, from its old tip to a descendant.
    let main_after = env.rev("main").unwrap();
    assert!(is_ancestor(&env, &main_before, &main_after));
    assert_eq!(env.subjects(&format!("{main_before}..main")), ["good"]);
    let reflog = env.git(["reflog", "show", "--format=%H %gs", "refs/heads/main"]);
    let entries: Vec<&str> = reflog.lines().collect();
    assert!(entries[0].contains("agentbox queue: task good"), "{reflog}");
    for pair in entries.windows(2) {
        let (new, old) = (
            pair[0].split(' ').next().unwrap(),
            pair[1].split(' ').next().unwrap(),
        );
        assert!(
            is_ancestor(&env, old, new),
            "main moved by fast-forward only: {reflog}"
        );
    }
    // Every original branch is as it was; the failed attempt is kept; the boxes left nothing.
    for (branch, tip) in &originals {
        assert_eq!(&env.rev(branch).unwrap(), tip, "{branch}");
    }
    assert_eq!(
        env.task_branches(),
        ["agentbox/broken", "agentbox/clash", "agentbox/good"]
    );
    let attempt = env
        .rev("refs/agentbox/broken/queue")
        .expect("the failed attempt is kept");
    assert!(is_ancestor(&env, &main_before, &attempt));
    assert!(env.rev("refs/agentbox/clash/queue").is_none());
    assert!(env.rev("refs/agentbox/good/queue").is_none());
    assert!(env.ls_task("broken-queue-1").is_none());
    assert_eq!(env.containers(), Vec::<String>::new());
    assert_eq!(
        fs::read_to_string(env.repo.join("good.txt")).unwrap(),
        "good\n",
        "the clean checkout followed"
    );
}

/// The check's box is a task like any other: whatever it does to the target in its own git dir,
/// the target moves only by agentbox's fast-forward after a check that passed.
#[test]
fn a_check_cannot_move_the_target_itself() {
    let env = TestEnv::new("land-queue-hostile");
    tasks(
        &env,
        &[("q", "echo q > q.txt && git add . && git commit -qm q")],
    );
    commit_on_main(&env, "other.txt", "other\n");
    let main = env.rev("main").unwrap();
    let check = "git update-ref refs/heads/main HEAD && git branch -f agentbox/q HEAD && exit 3";
    let out = env.output(["queue", "q", "--merge", "--check", check]);
    out.expect_code(1);
    assert!(out.stdout.contains("check-failed"), "{out}");
    assert_eq!(
        env.rev("main").unwrap(),
        main,
        "the check did not move main"
    );
    assert_eq!(
        env.subjects("main..agentbox/q"),
        ["q"],
        "nor the task's branch"
    );
    let attempt = env.rev("refs/agentbox/q/queue").unwrap();
    assert_eq!(
        env.show_format(&attempt, "%s"),
        "Merge branch 'agentbox/q' into main"
    );
    let leftovers: Vec<String> = refs(&env)
        .into_keys()
        .filter(|r| r.contains("q-queue"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new(), "the box left no ref");
}

/// A task plants attributes that select a filter, a diff driver and a merge driver which the
/// user's configuration defines as commands: predicting, reviewing, landing and the update of the
/// checkout run none of them.
#[test]
fn attributes_a_task_planted_run_no_driver_on_the_host() {
    let env = TestEnv::new("land-hostile");
    let marker = env.root.join("pwned");
    let m = marker.display();
    env.write_global_config(&format!(
        "[user]\n\tname = {USER_NAME}\n\temail = {USER_EMAIL}\n[init]\n\tdefaultBranch = main\n\
         [merge \"evil\"]\n\tdriver = touch {m}-merge; cat %B > %A\n\
         [filter \"evil\"]\n\tsmudge = touch {m}-smudge; cat\n\tclean = touch {m}-clean; cat\n\
         [diff \"evil\"]\n\tcommand = touch {m}-diff\n\ttextconv = touch {m}-textconv; cat\n"
    ));
    let plant = "printf '* merge=evil filter=evil diff=evil\\n' > .gitattributes";
    tasks(
        &env,
        &[
            (
                "evil",
                &format!("{plant} && echo evil > README.md && git add -A && git commit -qm evil"),
            ),
            (
                "evil2",
                &format!("{plant} && echo x > x.txt && git add -A && git commit -qm evil2"),
            ),
            ("other", "echo other > README.md && git commit -qam other"),
        ],
    );
    let found = || -> Vec<String> {
        fs::read_dir(&env.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("pwned"))
            .collect()
    };
    // Its merge driver would have "resolved" the conflict: git's own merge names it.
    let out = env.output(["conflicts", "evil", "other"]);
    assert_eq!(out.stdout_lines(), ["evil <-> other: README.md"], "{out}");
    env.output(["review", "evil"]).expect_code(0);
    env.output(["merge", "other"]).expect_code(0);
    env.output(["merge", "evil"])
        .expect_code(1)
        .expect_stderr_contains("conflicts in README.md");
    assert_eq!(found(), Vec::<String>::new(), "no driver ran");
    // Landed into the checkout, its files are written without its smudge filter.
    env.output(["merge", "evil2"]).expect_code(0);
    assert_eq!(fs::read_to_string(env.repo.join("x.txt")).unwrap(), "x\n");
    assert_eq!(found(), Vec::<String>::new(), "no filter ran");
}

#[test]
fn hooks_run_only_when_asked_and_may_refuse() {
    let env = TestEnv::new("land-hooks");
    tasks(
        &env,
        &[("h", "echo h > h.txt && git add . && git commit -qm h")],
    );
    let hooks = env.common_dir().join("hooks");
    fs::create_dir_all(&hooks).unwrap();
    let marker = env.root.join("hook-ran");
    let hook = hooks.join("pre-merge-commit");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\ntest -f h.txt && touch {}\necho refused by policy >&2\nexit 1\n",
            marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let main = env.rev("main");
    let out = env.output(["merge", "h", "--run-hooks"]);
    out.expect_code(1).expect_stderr_contains(
        "the pre-merge-commit hook refused to land task h (exit code 1): refused by policy",
    );
    assert!(marker.exists(), "the hook saw the result checked out");
    assert_eq!(env.rev("main"), main);
    assert_eq!(env.worktrees().len(), 1, "the temporary worktree is gone");
    fs::remove_file(&marker).unwrap();
    env.output(["merge", "h"]).expect_code(0);
    assert!(!marker.exists(), "hooks do not run unless asked");
}

/// The commands of the README's worked example of landing.
fn land_example_commands() -> Vec<String> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, after) = readme
        .split_once("<!-- land-example -->")
        .expect("the README marks its landing example");
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
fn the_readme_landing_example_runs_as_written() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let env = TestEnv::new("land-readme");
    let commands = land_example_commands();
    assert!(commands.len() >= 8, "{commands:?}");
    let bin = env.root.join("bin");
    fs::create_dir(&bin).unwrap();
    let wrapper = bin.join("agentbox");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$1\" in run|batch|queue) sub=$1; shift; exec '{exe}' \"$sub\" --label {TEST_LABEL}={id} \"$@\";; esac\nexec '{exe}' \"$@\"\n",
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
        if line.starts_with("agentbox conflicts") {
            assert_eq!(
                out.stdout_lines(),
                ["add-auth <-> add-cache: config.txt"],
                "{out}"
            );
        }
        if line.starts_with("agentbox queue") {
            assert_eq!(
                out.stdout_lines().last().unwrap(),
                "queue exited 1",
                "{out}"
            );
        }
    }
    assert_eq!(
        env.file_at("main", "config.txt").as_deref(),
        Some("debug: off\nauth: on\ncache: on\n")
    );
    assert_eq!(
        env.file_at("main", "USAGE.md").as_deref(),
        Some("Run it with make.\n")
    );
    assert_eq!(env.git(["status", "--porcelain"]), "");
    assert_eq!(env.containers(), Vec::<String>::new());
}

/// File names a task chose that set the terminal's title (OSC 0, ended by BEL) and clear its
/// screen (CSI 2 J, and its C1 form U+009B 2 J), and how agentbox shows them.
const TITLE_NAME: &str = "\x1b]0;pwned\x07x.txt";
const TITLE_SHOWN: &str = "^[]0;pwned^Gx.txt";
const CLEAR_NAME: &str = "\x1b[2Jf";
const CLEAR_SHOWN: &str = "^[[2Jf";
const C1_NAME: &str = "\u{9b}2Jc";
const C1_SHOWN: &str = "M-^[2Jc";

/// A task's script that writes `content` to the hostile names (into the title one after a title
/// change of its own) and commits them with a hostile subject and author name (the sh of the image
/// makes the bytes with printf).
fn hostile_commit(content: &str) -> String {
    format!(
        "title=$(printf '\\033]0;pwned\\007x.txt') && clear=$(printf '\\033[2Jf') && \
         c1=$(printf '\\302\\2332Jc') && echo {content} > \"$c1\" && \
         printf '\\033]0;pwned-content\\007{content}\\n' > \"$title\" && \
         echo {content} > \"$clear\" && git add -A && \
         GIT_AUTHOR_NAME=\"$(printf 'Mallory\\033]0;pwned-author\\007')\" \
         git commit -qm \"$(printf '\\033]0;pwned-subject\\007fix\\033[2J')\""
    )
}

#[track_caller]
fn assert_no_escape(out: &Out) {
    assert!(
        !out.stdout.contains(['\x1b', '\u{9b}']) && !out.stderr.contains(['\x1b', '\u{9b}']),
        "a raw ESC or CSI reached the output of {}\nstdout: {:?}\nstderr: {:?}",
        out.what,
        out.stdout,
        out.stderr
    );
}

/// Whether every ESC in `shown` starts an SGR (`ESC [ digits ; m`), which only colours text.
fn only_colours(shown: &str) -> bool {
    shown.split('\x1b').skip(1).all(|seq| {
        seq.strip_prefix('[').is_some_and(|rest| {
            let params = rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';');
            params.starts_with('m')
        })
    })
}

/// A hostile task's file names, contents and commit subject, in a conflict with the target and with
/// another task: `batch`, `conflicts`, `merge`, `queue`, `review` (off a terminal, and on one with
/// `PAGER=cat`) and `diff` on a terminal show them escaped, never raw; JSON carries them exactly,
/// escaped by JSON.
#[test]
fn file_names_and_subjects_a_task_chose_reach_no_terminal_raw() {
    let env = TestEnv::new("land-escapes");
    let path = env.root.join("tasks.toml");
    fs::write(
        &path,
        format!(
            "[[task]]\nname = \"t\"\ncommand = {:?}\n\n[[task]]\nname = \"u\"\ncommand = {:?}\n",
            hostile_commit("task"),
            hostile_commit("other")
        ),
    )
    .unwrap();
    let out = env.output([
        "batch".as_ref(),
        path.as_os_str(),
        "--parallel".as_ref(),
        "1".as_ref(),
    ]);
    out.expect_code(0).expect_stderr_contains(&format!(
        "u | agentbox: warning: conflicts with task t (finished earlier) in {CLEAR_SHOWN}, {TITLE_SHOWN}, {C1_SHOWN}"
    ));
    assert_no_escape(&out);
    let made = env.git([
        "diff-tree",
        "--no-commit-id",
        "--name-only",
        "-z",
        "-r",
        "agentbox/t",
    ]);
    assert_eq!(
        made.split('\0')
            .filter(|f| !f.is_empty())
            .collect::<Vec<_>>(),
        [CLEAR_NAME, TITLE_NAME, C1_NAME],
        "the task made the names it meant"
    );
    // main gets the same names with other content: both tasks conflict with it.
    for name in [TITLE_NAME, CLEAR_NAME, C1_NAME] {
        fs::write(env.repo.join(name), "main\n").unwrap();
    }
    env.git(["add", "-A"]);
    env.git(["commit", "-qm", "main takes the names"]);
    let before = refs(&env);

    let out = env.output(["conflicts"]);
    out.expect_code(0);
    assert_no_escape(&out);
    let files = format!("{CLEAR_SHOWN}, {TITLE_SHOWN}, {C1_SHOWN}");
    assert_eq!(
        out.stdout_lines(),
        [
            format!("t <-> u: {files}"),
            format!("t -> main: {files}"),
            format!("u -> main: {files}"),
        ],
        "{out}"
    );
    let out = env.output(["conflicts", "t", "--json"]);
    assert_no_escape(&out);
    let first: Value = serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(
        first["files"],
        serde_json::json!([CLEAR_NAME, TITLE_NAME, C1_NAME])
    );

    let out = env.output(["merge", "t"]);
    out.expect_code(1).expect_stderr_contains(&format!(
        "landing task t on main conflicts in {files}; nothing was changed"
    ));
    assert_no_escape(&out);

    let out = env.output(["queue", "t", "--check", "true"]);
    out.expect_code(1).expect_stderr_contains(&format!(
        "agentbox: t: conflicts with main in {files}; not landed"
    ));
    assert_no_escape(&out);
    assert!(
        out.stdout_lines()
            .iter()
            .any(|l| l.starts_with("t ") && l.contains("conflict") && l.ends_with(&files)),
        "{out}"
    );
    let out = env.output(["queue", "t", "--check", "true", "--json"]);
    out.expect_code(1);
    assert_no_escape(&out);
    let summary: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["tasks"][0]["files"],
        serde_json::json!([CLEAR_NAME, TITLE_NAME, C1_NAME])
    );
    assert_eq!(refs(&env), before, "nothing landed");

    // review: git prints the subject and the author's name as they are (it drops the BEL of the
    // name, not its ESC); its quoting of file names, "\033]0;pwned\ax.txt", keeps them
    // recognisable.
    let subject_shown = "^[]0;pwned-subject^Gfix^[[2J";
    let out = env.output(["review", "t"]);
    out.expect_code(0);
    assert_no_escape(&out);
    for shown in [
        subject_shown,
        "Author: Mallory^[]0;pwned-author <",
        "+^[]0;pwned-content^Gtask",
        r#""b/\033]0;pwned\ax.txt""#,
    ] {
        assert!(out.stdout.contains(shown), "{shown:?} in {:?}", out.stdout);
    }
    let json: Value = serde_json::from_str(&env.output(["review", "t", "--json"]).stdout).unwrap();
    assert_eq!(
        json["commits"][0]["subject"],
        "\x1b]0;pwned-subject\x07fix\x1b[2J"
    );
    let terminal = |args: &[&str], extra: &[(&str, &str)]| {
        let inner = env.agentbox(args);
        let mut cmd = on_a_terminal(&inner, &format!("exec {}", sh_line(&inner)));
        cmd.envs(extra.iter().copied());
        output_of(cmd)
    };
    let plain = terminal(&["review", "t"], &[("PAGER", "cat"), ("NO_COLOR", "1")]);
    plain.expect_code(0);
    assert_no_escape(&plain);
    assert!(plain.stdout.contains(subject_shown), "{:?}", plain.stdout);
    let coloured = terminal(&["review", "t"], &[("PAGER", "cat")]);
    coloured.expect_code(0);
    assert!(
        coloured.stdout.contains("\x1b[")
            && only_colours(&coloured.stdout)
            && !coloured.stdout.contains('\u{9b}'),
        "git's colours and nothing else: {:?}",
        coloured.stdout
    );
    assert!(
        coloured.stdout.contains(subject_shown),
        "{:?}",
        coloured.stdout
    );

    // diff: the exact patch into a pipe (to be applied), shown safely on a terminal.
    let piped = env.output(["diff", "t"]);
    piped.expect_code(0);
    assert!(
        piped.stdout.contains("+\x1b]0;pwned-content\x07task\n"),
        "{:?}",
        piped.stdout
    );
    let shown = terminal(&["diff", "t"], &[]);
    shown.expect_code(0);
    assert_no_escape(&shown);
    assert!(
        shown.stdout.contains("+^[]0;pwned-content^Gtask"),
        "{:?}",
        shown.stdout
    );
}

/// Runs tasks with `agentbox batch` from `dir` (a worktree of the repository); all must exit 0.
fn tasks_in(env: &TestEnv, dir: &std::path::Path, tasks: &[(&str, &str)]) {
    let mut file = String::new();
    for (name, script) in tasks {
        file.push_str(&format!(
            "[[task]]\nname = {name:?}\ncommand = {script:?}\n\n"
        ));
    }
    let path = env.root.join(format!("tasks-{}.toml", tasks[0].0));
    fs::write(&path, file).unwrap();
    output_of(env.agentbox_in(dir, ["batch".as_ref(), path.as_os_str()])).expect_code(0);
}

/// The devcontainer layout: `git clone --bare`, then `git worktree add` beside it. Tasks started in
/// a worktree land on the branch checked out there, which is brought along (and refused while it
/// has local changes), whether agentbox runs in that worktree, in the bare repository itself, or
/// lands on the branch of another worktree; `apply` puts changes into the worktree it runs in.
#[test]
fn merge_in_a_bare_repository_with_worktrees_beside_it() {
    let env = TestEnv::new_bare("land-bare-worktrees");
    let main = env.root.join("main");
    let feature = env.root.join("feature");
    env.git([
        "worktree".as_ref(),
        "add".as_ref(),
        "-q".as_ref(),
        main.as_os_str(),
        "main".as_ref(),
    ]);
    env.git([
        "worktree".as_ref(),
        "add".as_ref(),
        "-q".as_ref(),
        "-b".as_ref(),
        "feature".as_ref(),
        feature.as_os_str(),
        "main".as_ref(),
    ]);
    tasks_in(
        &env,
        &main,
        &[
            ("a", "echo a > a.txt && git add a.txt && git commit -qm a"),
            ("b", "echo b > b.txt && git add b.txt && git commit -qm b"),
            ("f", "echo f > f.txt && git add f.txt && git commit -qm f"),
            ("p", "echo p > p.txt && git add p.txt && git commit -qm p"),
        ],
    );
    let status = |dir: &std::path::Path| env.git_in(dir, ["status", "--porcelain"]);
    let ls: Value = serde_json::from_str(
        output_of(env.agentbox_in(&main, ["ls", "--json"]))
            .stdout
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ls["base"], "main", "{ls}");

    // In the worktree of main: main lands and the worktree follows.
    let out = output_of(env.agentbox_in(&main, ["merge", "a"]));
    out.expect_code(0)
        .expect_stderr_contains("agentbox: landed task a on main")
        .expect_stderr_contains(&format!(
            "agentbox: updated the checkout of main in {}",
            main.display()
        ));
    assert_eq!(env.file_at("main", "a.txt").as_deref(), Some("a\n"));
    assert_eq!(fs::read_to_string(main.join("a.txt")).unwrap(), "a\n");
    assert_eq!(status(&main), "");
    assert!(
        !feature.join("a.txt").exists(),
        "the other worktree is left alone"
    );

    // Local changes in the worktree of main: refused, nothing moved.
    fs::write(main.join("README.md"), "local edit\n").unwrap();
    let before = refs(&env);
    let out = output_of(env.agentbox_in(&main, ["merge", "b"]));
    out.expect_code(1).expect_stderr_contains(&format!(
        "branch main is checked out in {} with uncommitted changes",
        main.display()
    ));
    assert_eq!(refs(&env), before);
    assert!(!main.join("b.txt").exists());
    env.git_in(&main, ["checkout", "--", "README.md"]);

    // From the bare repository itself: the worktree of main is found and brought along all the same.
    let out = env.output(["merge", "b"]);
    out.expect_code(0).expect_stderr_contains(&format!(
        "agentbox: updated the checkout of main in {}",
        main.display()
    ));
    assert_eq!(fs::read_to_string(main.join("b.txt")).unwrap(), "b\n");
    assert_eq!(status(&main), "");

    // Onto the branch of the other worktree, which follows; main's worktree does not change.
    let main_tip = env.rev("main");
    let out = output_of(env.agentbox_in(&main, ["merge", "f", "--into", "feature"]));
    out.expect_code(0).expect_stderr_contains(&format!(
        "agentbox: updated the checkout of feature in {}",
        feature.display()
    ));
    assert_eq!(fs::read_to_string(feature.join("f.txt")).unwrap(), "f\n");
    assert_eq!(status(&feature), "");
    assert_eq!(env.rev("main"), main_tip);
    assert!(!main.join("f.txt").exists());

    // apply: into the worktree it runs in, staged; from the bare repository it has none.
    output_of(env.agentbox_in(&main, ["apply", "p"])).expect_code(0);
    assert_eq!(
        env.git_in(&main, ["diff", "--cached", "--name-only"]),
        "p.txt"
    );
    assert_eq!(env.rev("main"), main_tip, "nothing was committed");
    env.output(["apply", "p"])
        .expect_code(1)
        .expect_stderr_contains("is a bare repository: apply needs a checkout");
    env.git_raw(["fsck", "--no-dangling"])
        .expect("fsck is clean");
}

/// `merge --delete` removes the task and its refs only once it landed: a conflict or a refusal
/// keeps them; a landing prints each deleted ref with its commit, and the printed command restores
/// it. A task agentbox forgot (`rm` keeps its branch) loses its branch the same way.
#[test]
fn merge_delete_removes_the_task_only_after_it_landed() {
    let env = TestEnv::new("land-delete");
    tasks(
        &env,
        &[
            ("c", "echo task > README.md && git commit -qam c"),
            ("d", "echo d > d.txt && git add d.txt && git commit -qm d"),
            ("k", "echo k > k.txt && git add k.txt && git commit -qm k"),
        ],
    );
    commit_on_main(&env, "README.md", "main\n");
    // A check that fails keeps an attempt under refs/agentbox/<task>/.
    for task in ["d", "k"] {
        env.output(["queue", task, "--check", "false"])
            .expect_code(1);
        assert!(env.rev(&format!("refs/agentbox/{task}/queue")).is_some());
    }

    let before = refs(&env);
    env.output(["merge", "c", "--delete"])
        .expect_code(1)
        .expect_stderr_contains("conflicts in README.md");
    env.output(["merge", "d", "--ff-only", "--delete"])
        .expect_code(1)
        .expect_stderr_contains("cannot fast-forward main to agentbox/d");
    assert_eq!(refs(&env), before, "nothing landed, nothing was deleted");
    for task in ["c", "d"] {
        assert!(env.ls_task(task).is_some(), "task {task} is still known");
    }

    let tip = env.rev("agentbox/d").unwrap();
    let attempt = env.rev("refs/agentbox/d/queue").unwrap();
    let out = env.output(["merge", "d", "--delete"]);
    out.expect_code(0);
    let landed = out
        .stderr
        .find("agentbox: landed task d on main")
        .expect("landed");
    let deleted = out
        .stderr
        .find(&format!(
            "agentbox: deleted refs/heads/agentbox/d (was {tip}; `git update-ref refs/heads/agentbox/d {tip}` restores it)"
        ))
        .unwrap_or_else(|| panic!("the branch is deleted\n{out}"));
    assert!(landed < deleted, "landed first, then deleted\n{out}");
    out.expect_stderr_contains(&format!(
        "agentbox: deleted refs/agentbox/d/queue (was {attempt};"
    ))
    .expect_stderr_contains("agentbox: removed task d");
    assert!(!env.branch_exists("agentbox/d"));
    assert!(env.rev("refs/agentbox/d/queue").is_none());
    assert!(env.ls_task("d").is_none());
    assert_eq!(env.file_at("main", "d.txt").as_deref(), Some("d\n"));
    env.git(["update-ref", "refs/heads/agentbox/d", &tip]);
    assert_eq!(
        env.rev("agentbox/d").as_deref(),
        Some(tip.as_str()),
        "restored"
    );

    // Forgotten by agentbox, the task still has its branch and its attempt.
    env.output(["rm", "k"]).expect_code(0);
    assert!(env.ls_task("k").is_none());
    let tip = env.rev("agentbox/k").unwrap();
    let out = env.output(["merge", "k", "--delete"]);
    out.expect_code(0)
        .expect_stderr_contains("agentbox: landed task k on main")
        .expect_stderr_contains(&format!(
            "agentbox: deleted refs/heads/agentbox/k (was {tip}; `git update-ref refs/heads/agentbox/k {tip}` restores it)"
        ))
        .expect_stderr_contains("agentbox: deleted refs/agentbox/k/queue");
    assert!(!env.branch_exists("agentbox/k"));
    assert!(env.rev("refs/agentbox/k/queue").is_none());
    assert_eq!(env.file_at("main", "k.txt").as_deref(), Some("k\n"));
    assert!(
        env.branch_exists("agentbox/c"),
        "the conflicting task kept its branch"
    );
}

/// The queue's settings in agentbox.toml: `check` runs when no `--check` is given (a string under
/// `sh -c`, an array as it is, no shell), after the project's `setup`; `queue_strategy` picks merge
/// or rebase, and flags win over both. With no check anywhere the queue refuses and changes nothing. In a bare repository
/// the file comes from the tree of HEAD.
#[test]
fn the_queue_takes_its_check_and_strategy_from_agentbox_toml() {
    let env = TestEnv::new("land-queue-config");
    tasks(
        &env,
        &[
            ("a", "echo a > a.txt && git add . && git commit -qm a"),
            ("b", "echo b > b.txt && git add . && git commit -qm b"),
            ("c", "echo c > c.txt && git add . && git commit -qm c"),
            ("d", "echo d > d.txt && git add . && git commit -qm d"),
        ],
    );
    let before = refs(&env);
    env.output(["queue", "a"])
        .expect_code(1)
        .expect_stderr_contains("no check to run before landing")
        .expect_stderr_contains("set `check = \"...\"` in agentbox.toml");
    assert_eq!(refs(&env), before);

    let events = |out: &Out| -> Vec<Value> {
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let event = |events: &[Value], kind: &str| -> Value {
        events
            .iter()
            .find(|e| e["event"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:?}"))
            .clone()
    };
    // The box of the check is set up like every task's: `setup` ran before it.
    let check = "test -e /tmp/set-up && echo checked-by-config $(ls *.txt)";
    commit_on_main(
        &env,
        "agentbox.toml",
        &format!(
            "check = {check:?}\nqueue_strategy = \"merge\"\nsetup = [\"touch /tmp/set-up\"]\n"
        ),
    );
    let out = env.output(["queue", "a", "--json", "--log-lines"]);
    out.expect_code(0);
    let events_a = events(&out);
    assert_eq!(event(&events_a, "attempt")["strategy"], "merge");
    assert_eq!(
        event(&events_a, "check_started")["command"],
        serde_json::json!(["sh", "-c", check])
    );
    assert!(
        events_a
            .iter()
            .any(|e| e["event"] == "log" && e["line"] == "checked-by-config a.txt"),
        "{out}"
    );
    assert_eq!(
        env.git(["rev-list", "--parents", "-n", "1", "main"])
            .split(' ')
            .count(),
        3,
        "a merge commit, as queue_strategy asks"
    );

    // --rebase wins over queue_strategy; the check is still the file's.
    let out = env.output(["queue", "b", "--rebase", "--json", "--log-lines"]);
    out.expect_code(0);
    let events_b = events(&out);
    assert_eq!(event(&events_b, "attempt")["strategy"], "rebase");
    assert!(
        events_b
            .iter()
            .any(|e| e["event"] == "log" && e["line"] == "checked-by-config a.txt b.txt"),
        "{out}"
    );
    assert_eq!(env.subjects("main~1..main"), ["b"]);
    assert_eq!(
        env.git(["rev-list", "--parents", "-n", "1", "main"])
            .split(' ')
            .count(),
        2,
        "rebased"
    );

    // --check wins over the file's check.
    let main_before = env.rev("main");
    env.output(["queue", "c", "--check", "exit 7", "--json"])
        .expect_code(1);
    assert_eq!(env.rev("main"), main_before, "the flag's check failed");

    // An array runs as it is: no shell expands `$HOME` or splits "a b".
    commit_on_main(
        &env,
        "agentbox.toml",
        "check = [\"printf\", \"%s|\", \"a b\", \"$HOME\"]\nqueue_strategy = \"rebase\"\n",
    );
    let out = env.output(["queue", "d", "--json", "--log-lines"]);
    out.expect_code(0);
    let events_d = events(&out);
    assert_eq!(event(&events_d, "attempt")["strategy"], "rebase");
    assert_eq!(
        event(&events_d, "check_started")["command"],
        serde_json::json!(["printf", "%s|", "a b", "$HOME"])
    );
    assert!(
        events_d
            .iter()
            .any(|e| e["event"] == "log" && e["line"] == "a b|$HOME|"),
        "{out}"
    );

    // A bare repository reads agentbox.toml from the tree of HEAD.
    let bare = TestEnv::new_bare("land-queue-config-bare");
    tasks(
        &bare,
        &[("q", "echo q > q.txt && git add . && git commit -qm q")],
    );
    commit_on_main(
        &bare,
        "agentbox.toml",
        "check = \"test -e q.txt && echo from-head\"\n",
    );
    let out = bare.output(["queue", "q", "--json", "--log-lines"]);
    out.expect_code(0);
    assert!(
        events(&out)
            .iter()
            .any(|e| e["event"] == "log" && e["line"] == "from-head"),
        "{out}"
    );
    assert_eq!(bare.file_at("main", "q.txt").as_deref(), Some("q\n"));
}
