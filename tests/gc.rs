//! Crash recovery: `agentbox gc` after the supervisor was killed with SIGKILL, and `run` of a task
//! whose earlier run died.

mod common;

use common::*;
use serde_json::Value;

/// Leaves uncommitted work, says `ready`, then runs until stopped.
const WIP: &str = "echo wip > wip.txt; echo ready; exec sleep 300";

/// Runs `task` with [`WIP`] and kills its `agentbox run` with SIGKILL once the work is written,
/// leaving a running container, a worktree with uncommitted work and a record in state `running`.
fn crash(env: &TestEnv, task: &str) {
    let mut run = env.spawn(["run", task, "--", "sh", "-c", WIP]);
    run.wait_for_line("ready");
    run.signal(Signal::KILL);
    let out = run.wait();
    assert_eq!(out.code(), None, "killed by SIGKILL\n{out}");
}

/// `agentbox gc --json <args>`: its exit code and one JSON value per line of stdout.
fn gc_json(env: &TestEnv, args: &[&str]) -> (Out, Vec<Value>) {
    let mut all = vec!["gc", "--json"];
    all.extend(args);
    let out = env.output(all);
    let actions = out
        .stdout_lines()
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("gc --json line is not JSON ({e}): {l}\n{out}"))
        })
        .collect();
    (out, actions)
}

/// The `action` names of the actions for `task`, in order.
fn actions_of(actions: &[Value], task: &str) -> Vec<String> {
    actions
        .iter()
        .filter(|a| a["task"] == task)
        .map(|a| a["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts that the actions for `task` are `expected` up to the order of the steps a teardown
/// takes at the same time (removing containers while it keeps the work): `stop-container` first,
/// `mark-record` last, `import-branch` before `remove-worktree`.
#[track_caller]
fn assert_actions(actions: &[Value], task: &str, expected: &[&str], out: &Out) {
    let got = actions_of(actions, task);
    let mut sorted = got.clone();
    sorted.sort();
    let mut wanted: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    wanted.sort();
    assert_eq!(sorted, wanted, "the actions for {task}: {got:?}\n{out}");
    let at = |name: &str| got.iter().position(|a| a == name);
    if let Some(stop) = at("stop-container") {
        assert_eq!(stop, 0, "stop-container comes first: {got:?}\n{out}");
    }
    assert_eq!(
        got.last().map(String::as_str),
        Some("mark-record"),
        "mark-record comes last: {got:?}\n{out}"
    );
    if let (Some(import), Some(remove)) = (at("import-branch"), at("remove-worktree")) {
        assert!(import < remove, "import before removal: {got:?}\n{out}");
    }
}

#[test]
fn gc_recovers_a_task_whose_supervisor_was_killed_and_leaves_live_tasks_alone() {
    let env = TestEnv::new("gc-crash");
    let live_script = format!("echo ready; {}; echo done > done.txt", wait_for_file("go"));
    let mut live = env.spawn(["run", "live", "--", "sh", "-c", &live_script]);
    live.wait_for_line("ready");

    crash(&env, "t");
    let wt = env.worktree_path("t");
    assert_eq!(env.ls_task("t").expect("ls lists t")["state"], "orphaned");
    assert_eq!(env.live_containers().len(), 2, "{}", env.container_report());
    let tip_before = env.rev("agentbox/t");

    // --dry-run says what it would do and changes nothing.
    let (dry, planned) = gc_json(&env, &["--dry-run"]);
    dry.expect_code(0);
    assert_actions(
        &planned,
        "t",
        &[
            "stop-container",
            "remove-container",
            "remove-worktree",
            "mark-record",
        ],
        &dry,
    );
    assert!(
        planned
            .iter()
            .all(|a| a["dry_run"] == true && a["ok"] == true),
        "{dry}"
    );
    assert!(actions_of(&planned, "live").is_empty(), "{dry}");
    let worktree_step = planned
        .iter()
        .find(|a| a["action"] == "remove-worktree")
        .unwrap();
    assert_eq!(worktree_step["target"], wt.to_str().unwrap());
    let human = env.output(["gc", "--dry-run"]);
    human.expect_code(0);
    human.expect_stderr_contains("would stop container");
    human.expect_stderr_contains("left alone, still running: live");
    assert_eq!(env.live_containers().len(), 2, "{}", env.container_report());
    assert!(wt.join("wip.txt").is_file(), "dry run keeps the worktree");
    assert_eq!(env.rev("agentbox/t"), tip_before, "dry run commits nothing");
    assert_eq!(env.ls_task("t").unwrap()["state"], "orphaned");

    // The real thing.
    let (gc, done) = gc_json(&env, &["--stop-timeout", "5"]);
    gc.expect_code(0);
    assert_actions(
        &done,
        "t",
        &[
            "stop-container",
            "remove-container",
            "remove-worktree",
            "mark-record",
        ],
        &gc,
    );
    assert!(actions_of(&done, "live").is_empty(), "{gc}");
    let snapshot = done
        .iter()
        .find(|a| a["action"] == "remove-worktree")
        .and_then(|a| a["snapshot_commit"].as_str())
        .unwrap_or_else(|| panic!("remove-worktree names the snapshot commit\n{gc}"))
        .to_owned();
    assert_eq!(env.rev("agentbox/t").as_deref(), Some(snapshot.as_str()));
    env.assert_snapshot_holds("t", "wip.txt", "wip\n");
    assert!(!wt.exists(), "worktree {} is removed", wt.display());
    assert!(
        !env.task_git_dir("t").exists() && !env.scratch_dir("t").exists(),
        "the task's git dir and scratch dir are removed"
    );
    let rec = env.ls_task("t").unwrap();
    assert_eq!(rec["state"], "recovered");
    assert_eq!(rec["snapshot_commit"], snapshot.as_str());
    assert!(
        rec["error"].as_str().is_some_and(|e| e.contains("died")),
        "the record says what happened: {rec}"
    );

    // Nothing is left to do, and doing it again changes nothing.
    let (again, none) = gc_json(&env, &[]);
    again.expect_code(0);
    assert!(none.is_empty(), "a second gc does nothing\n{again}");
    let human = env.output(["gc"]);
    human.expect_code(0);
    human.expect_stderr_contains("nothing to clean up");
    assert_eq!(env.rev("agentbox/t").as_deref(), Some(snapshot.as_str()));

    // The live task was never touched.
    let live_wt = env.worktree_path("live");
    assert_eq!(env.live_containers().len(), 1, "{}", env.container_report());
    assert!(live_wt.join("README.md").is_file());
    assert_eq!(env.ls_task("live").unwrap()["state"], "running");
    touch(&live_wt.join("go"));
    live.wait().expect_code(0);
    env.assert_snapshot_holds("live", "done.txt", "done\n");
    env.assert_torn_down("live");
    assert_eq!(
        env.worktrees().len(),
        1,
        "only the main worktree is left: {:?}",
        env.worktrees()
    );
}

#[test]
fn run_after_a_crash_recovers_the_task_and_continues_on_its_branch() {
    let env = TestEnv::new("gc-rerun");
    let base = env.head();
    crash(&env, "again");
    assert_eq!(env.ls_task("again").unwrap()["state"], "orphaned");

    let out = env.output([
        "run",
        "again",
        "--",
        "sh",
        "-c",
        "cat wip.txt; git log -1 --format=%s",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [
            "wip",
            "agentbox: snapshot of uncommitted work in task again"
        ],
        "the new run continues where the dead one stopped\n{out}"
    );
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/again")),
        ["agentbox: snapshot of uncommitted work in task again"]
    );
    env.assert_torn_down("again");
    assert_eq!(env.ls_task("again").unwrap()["state"], "exited");
}

/// Damages the git dir of a crashed task in one way, runs `gc`, and checks that the worktree and the
/// git dir are kept (the task is `kept`), that gc says why and exits 1, and that the work is still
/// on disk and, by the snapshot, on the branch.
fn gc_keeps_a_task_whose_git_dir_is_damaged(test: &str, damage: impl FnOnce(&TestEnv, &str)) {
    let env = TestEnv::new(test);
    crash(&env, "dmg");
    let wt = env.worktree_path("dmg");
    let git_dir = env.task_git_dir("dmg");
    damage(&env, "dmg");

    let (gc, done) = gc_json(&env, &["--stop-timeout", "5"]);
    gc.expect_code(1);
    let import = done
        .iter()
        .find(|a| a["action"] == "import-branch")
        .unwrap_or_else(|| panic!("an import-branch step\n{gc}"));
    assert_eq!(import["task"], "dmg", "{gc}");
    assert_eq!(import["ok"], false, "{gc}");
    let why = import["error"].as_str().unwrap_or_default();
    for needle in ["tampered", git_dir.to_str().unwrap(), wt.to_str().unwrap()] {
        assert!(why.contains(needle), "gc says why, naming {needle:?}\n{gc}");
    }
    assert!(wt.join("wip.txt").is_file(), "the work stays on disk\n{gc}");
    assert!(wt.join("README.md").is_file(), "the worktree stays\n{gc}");
    assert!(git_dir.is_dir(), "the task's git dir stays\n{gc}");
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "the container is gone"
    );
    env.assert_snapshot_holds("dmg", "wip.txt", "wip\n");
    let tip = env.rev("agentbox/dmg");
    let rec = env.ls_task("dmg").unwrap();
    assert_eq!(rec["state"], "kept", "left for the user to look at: {rec}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("tampered")),
        "the record says why: {rec}"
    );

    // A later gc leaves the kept task alone.
    let again = env.output(["gc"]);
    again.expect_code(0);
    again.expect_stderr_contains("kept");
    assert!(wt.join("wip.txt").is_file(), "{again}");
    assert!(git_dir.is_dir(), "{again}");
    assert_eq!(env.rev("agentbox/dmg"), tip);
}

#[test]
fn gc_keeps_a_task_whose_branch_ref_holds_garbage() {
    gc_keeps_a_task_whose_git_dir_is_damaged("gc-bad-ref", |env, task| {
        let branch = env
            .task_git_dir(task)
            .join(format!("refs/heads/agentbox/{task}"));
        std::fs::write(branch, "this is not a commit id\n").unwrap();
    });
}

#[test]
fn gc_keeps_a_task_whose_objects_dir_holds_a_symlink() {
    gc_keeps_a_task_whose_git_dir_is_damaged("gc-bad-objects", |env, task| {
        // A commit the import must fetch, and a symlink among the objects that it must not follow.
        let wt = env.worktree_path(task);
        env.git_in(&wt, ["commit", "-q", "--allow-empty", "-m", "unimported"]);
        let objects = env.task_git_dir(task).join("objects");
        std::os::unix::fs::symlink("/etc/passwd", objects.join("pack/pack-planted.pack")).unwrap();
    });
}

#[test]
fn gc_removes_services_and_network_and_releases_ports_of_a_dead_task() {
    ensure_tools_image();
    let env = TestEnv::new("gc-services");
    env.write_config(&format!(
        "image = \"{TOOLS_IMAGE}\"\nport_range = \"30300-30309\"\n[ports]\nweb = 8000\n\
         [services.db]\nimage = \"{TOOLS_IMAGE}\"\ncommand = \"exec busybox sleep 300\"\n"
    ));
    crash(&env, "svc");
    assert_eq!(env.networks().len(), 1, "the task's network exists");
    assert_eq!(env.port_ledger().len(), 1, "{:?}", env.port_ledger());

    let (gc, done) = gc_json(&env, &["--stop-timeout", "5"]);
    gc.expect_code(0);
    let steps = actions_of(&done, "svc");
    for step in [
        "stop-container",
        "remove-container",
        "remove-network",
        "remove-worktree",
        "release-ports",
        "mark-record",
    ] {
        assert!(steps.iter().any(|s| s == step), "{step} missing\n{gc}");
    }
    assert_eq!(
        steps.iter().filter(|s| *s == "remove-container").count(),
        2,
        "the task's and the service's container\n{gc}"
    );
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "{}",
        env.container_report()
    );
    assert_eq!(
        env.networks(),
        Vec::<String>::new(),
        "the network is removed"
    );
    assert!(env.port_ledger().is_empty(), "{:?}", env.port_ledger());
    env.assert_snapshot_holds("svc", "wip.txt", "wip\n");
    env.assert_torn_down("svc");
}

#[test]
fn task_whose_container_is_gone_but_worktree_left_is_orphaned_and_recovered() {
    let env = TestEnv::new("gc-no-container");
    let base = env.head();
    crash(&env, "wt");
    let removed = std::process::Command::new("docker")
        .args(["rm", "-f"])
        .args(env.containers())
        .output()
        .unwrap();
    assert!(removed.status.success());
    assert_eq!(env.ls_task("wt").unwrap()["state"], "orphaned");
    // A commit in the task's git dir that no supervisor imported (made after its death).
    let wt = env.worktree_path("wt");
    std::fs::write(wt.join("late.txt"), "late\n").unwrap();
    env.git_in(&wt, ["add", "late.txt"]);
    env.git_in(&wt, ["commit", "-q", "-m", "late"]);
    assert_eq!(env.rev("agentbox/wt").as_deref(), Some(base.as_str()));

    let (dry, planned) = gc_json(&env, &["--dry-run"]);
    dry.expect_code(0);
    assert_eq!(
        actions_of(&planned, "wt"),
        ["import-branch", "remove-worktree", "mark-record"],
        "{dry}"
    );
    assert_eq!(env.rev("agentbox/wt").as_deref(), Some(base.as_str()));

    let (gc, done) = gc_json(&env, &[]);
    gc.expect_code(0);
    assert_eq!(
        actions_of(&done, "wt"),
        ["import-branch", "remove-worktree", "mark-record"],
        "{gc}"
    );
    assert!(
        done.iter().all(|a| a["task"] == "wt" && a["ok"] == true),
        "{gc}"
    );
    env.assert_snapshot_holds("wt", "wip.txt", "wip\n");
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/wt")),
        ["agentbox: snapshot of uncommitted work in task wt", "late"],
        "the late commit is imported, the snapshot on top of it"
    );
    env.assert_torn_down("wt");
    assert_eq!(env.ls_task("wt").unwrap()["state"], "recovered");
}

#[test]
fn run_of_another_task_cleans_up_a_crashed_one_first() {
    let env = TestEnv::new("gc-implicit");
    crash(&env, "dead");
    assert_eq!(
        env.ls_task("dead").expect("ls lists dead")["state"],
        "orphaned"
    );

    let out = env.output(["run", "other", "--", "true"]);
    out.expect_code(0);
    out.expect_stderr_contains("agentbox: recovered: task dead: removed container");
    assert_eq!(
        env.ls_task("dead").expect("ls lists dead")["state"],
        "recovered"
    );
    env.assert_snapshot_holds("dead", "wip.txt", "wip\n");
    env.assert_torn_down("dead");
    env.assert_torn_down("other");

    // Nothing left behind: the next run does no recovery at all.
    let quiet = env.output(["run", "third", "--", "true"]);
    quiet.expect_code(0);
    assert!(!quiet.stderr.contains("recovered"), "{quiet}");
}

#[test]
fn gc_does_not_commit_a_half_removed_worktree_as_deletions() {
    let env = TestEnv::new("gc-half-removed");
    // A task whose work is committed and whose worktree removal was cut short: simulated with a
    // kept task whose record is put in the state a supervisor writes just before the removal,
    // and a tracked file already gone from the worktree.
    let commit_all = "echo done > done.txt && git add done.txt && git commit -qm done";
    env.output(["run", "t", "--keep", "--", "sh", "-c", commit_all])
        .expect_code(0);
    let tip = env.rev("agentbox/t");
    let record_path = env
        .task_records()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "t.json"))
        .expect("t has a record");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["state"] = "removing-worktree".into();
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    std::fs::remove_file(env.worktree_path("t").join("README.md")).unwrap();
    assert_eq!(env.ls_task("t").expect("ls lists t")["state"], "orphaned");

    env.output(["gc"]).expect_code(0);
    assert_eq!(
        env.rev("agentbox/t"),
        tip,
        "no snapshot commit of the missing file"
    );
    env.assert_torn_down("t");
}

#[test]
fn a_damaged_record_is_named_by_ls_gc_and_rm_and_stops_no_other_task() {
    let env = TestEnv::new("gc-damaged");
    env.output(["run", "fine", "--", "true"]).expect_code(0);
    crash(&env, "crashed");
    let record = env.task_records().into_iter().next().unwrap();
    let damaged = record.with_file_name("broken.json");
    std::fs::write(&damaged, "{ \"name\": \"broken\", \"state\": ").unwrap();
    let names_it = |out: &Out| {
        out.expect_stderr_contains("task broken")
            .expect_stderr_contains(&damaged.display().to_string());
    };

    let ls = env.output(["ls"]);
    ls.expect_code(1);
    names_it(&ls);
    assert!(
        ls.stdout.contains("fine") && ls.stdout.contains("crashed"),
        "{ls}"
    );

    let gc = env.output(["gc"]);
    gc.expect_code(1);
    names_it(&gc);
    env.assert_torn_down("crashed");
    assert_eq!(
        env.file_at("agentbox/crashed", "wip.txt").as_deref(),
        Some("wip\n"),
        "the other task was recovered\n{gc}"
    );

    let rm = env.output(["rm", "broken"]);
    rm.expect_code(1);
    names_it(&rm);
    env.output(["rm", "fine"]).expect_code(0);
    assert!(damaged.exists(), "the damaged record is left for the user");
}

#[test]
fn a_file_name_the_task_chose_reaches_gcs_messages_escaped() {
    let env = TestEnv::new("gc-esc-name");
    crash(&env, "esc");
    let wt = env.worktree_path("esc");
    env.git_in(&wt, ["commit", "-q", "--allow-empty", "-m", "unimported"]);
    let objects = env.task_git_dir("esc").join("objects");
    // A title change and a screen clear in the name of a link the import refuses to follow.
    std::os::unix::fs::symlink(
        "/etc/passwd",
        objects.join("pack/pack-\u{1b}]0;pwned\u{7}\u{1b}[2J.pack"),
    )
    .unwrap();
    let gc = env.output(["gc", "--stop-timeout", "5"]);
    gc.expect_code(1);
    gc.expect_stderr_contains("tampered");
    gc.expect_stderr_contains("pwned");
    assert!(
        !gc.stderr.contains('\u{1b}') && !gc.stdout.contains('\u{1b}'),
        "no escape sequence reaches the terminal raw\n{gc}"
    );
    env.output(["rm", "-f", "esc"]).expect_code(0);
}
