//! Many tasks in one repository at the same time: runs started all at once, a `git worktree prune`
//! inside one task's container while another task runs, and `ls`/`gc` while several tasks run.
//!
//! Tasks that must stay alive wait (inside their container) for a marker file in the git common dir,
//! which every task of the repository has mounted; the test creates it on the host to release them.

mod common;

use std::path::PathBuf;

use common::*;

/// What a task's stderr must never mention: git's own lock and worktree races.
const RACE_WORDS: [&str; 3] = ["index.lock", "lock", "commondir"];

#[track_caller]
fn assert_no_race_messages(task: &str, out: &Out) {
    let stderr = out.stderr.to_lowercase();
    for word in RACE_WORDS {
        assert!(
            !stderr.contains(word),
            "stderr of {task} mentions {word:?}\n{out}"
        );
    }
}

/// `<common dir>/marker-<task>`: the file that releases a task started with [`held`].
fn marker(env: &TestEnv, task: &str) -> PathBuf {
    env.common_dir().join(format!("marker-{task}"))
}

/// A task command that says `ready`, waits for its marker, then leaves `done.txt` as uncommitted
/// work.
fn held(env: &TestEnv, task: &str) -> String {
    format!(
        "echo ready; {}; echo done-$AGENTBOX_TASK > done.txt",
        wait_for_path(&marker(env, task))
    )
}

#[test]
fn twenty_runs_started_at_once_in_one_repo_all_succeed() {
    let env = TestEnv::new("conc_twenty");
    let tasks: Vec<String> = (1..=20).map(|i| format!("t{i:02}")).collect();
    // Started back to back, none waited for before the last one is under way.
    let runs: Vec<Spawned> = tasks
        .iter()
        .map(|task| {
            env.spawn([
                "run",
                task,
                "--",
                "sh",
                "-c",
                "echo $AGENTBOX_TASK > out.txt",
            ])
        })
        .collect();
    let outs: Vec<Out> = runs.into_iter().map(Spawned::wait).collect();

    for (task, out) in tasks.iter().zip(&outs) {
        out.expect_code(0);
        assert_no_race_messages(task, out);
    }
    for task in &tasks {
        env.assert_snapshot_holds(task, "out.txt", &format!("{task}\n"));
    }
    let mut expected: Vec<String> = tasks.iter().map(|t| format!("agentbox/{t}")).collect();
    expected.sort();
    assert_eq!(env.task_branches(), expected);
    assert_eq!(
        env.worktrees().len(),
        1,
        "git worktree list must show only the main worktree: {:?}",
        env.worktrees()
    );
    assert!(
        !env.worktree_root().exists()
            || std::fs::read_dir(env.worktree_root())
                .unwrap()
                .next()
                .is_none(),
        "no worktree directory may be left under {}",
        env.worktree_root().display()
    );
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "no container may be left: {}",
        env.container_report()
    );
}

#[test]
fn prune_inside_another_task_cannot_drop_a_running_tasks_worktree() {
    let env = TestEnv::new("conc_prune");
    let mut a = env.spawn(["run", "a", "--", "sh", "-c", &held(&env, "a")]);
    a.wait_for_line("ready");
    let wt_a = env.worktree_path("a");
    let admin_a = env
        .worktree_admin_dir(&wt_a)
        .expect("git has metadata for a's worktree while a runs");

    // A control: a linked worktree that is alive on the host but not locked, and (like a's) not
    // mounted in b's container. The prune in b must drop it, which shows that it ran and what it
    // would have done to a's metadata without the lock.
    let decoy = env.root.join("decoy");
    env.git([
        "worktree".as_ref(),
        "add".as_ref(),
        "-q".as_ref(),
        "-b".as_ref(),
        "decoy".as_ref(),
        decoy.as_os_str(),
        "HEAD".as_ref(),
    ]);
    assert!(env.worktree_entry(&decoy).is_some());

    let b = env.output(["run", "b", "--", "git", "worktree", "prune", "--verbose"]);
    b.expect_code(0);
    assert!(
        env.worktree_entry(&decoy).is_none(),
        "the prune inside b's container ran and dropped the unlocked decoy: {:?}\n{b}",
        env.worktrees()
    );

    // a's metadata survived, and git still knows a's worktree, locked.
    assert!(
        admin_a.is_dir(),
        "{} must survive the prune in b\n{b}",
        admin_a.display()
    );
    assert_eq!(env.worktree_admin_dir(&wt_a).as_ref(), Some(&admin_a));
    let entry = env.worktree_entry(&wt_a).unwrap_or_else(|| {
        panic!(
            "git worktree list must still show {}: {:?}",
            wt_a.display(),
            env.worktrees()
        )
    });
    assert!(entry.locked, "a's worktree must be locked: {entry:?}");
    assert_eq!(entry.branch.as_deref(), Some("refs/heads/agentbox/a"));
    assert_eq!(env.ls_task("a").expect("ls lists a")["state"], "running");

    touch(&marker(&env, "a"));
    let out = a.wait();
    out.expect_code(0);
    env.assert_snapshot_holds("a", "done.txt", "done-a\n");
    env.assert_torn_down("a");
    env.assert_torn_down("b");
    assert!(
        env.worktree_admin_dir(&wt_a).is_none(),
        "a's teardown removes its metadata"
    );
}

#[test]
fn ls_shows_many_running_tasks_and_gc_leaves_them_alone() {
    let env = TestEnv::new("conc_gc");
    let tasks = ["w1", "w2", "w3", "w4"];
    let mut runs: Vec<Spawned> = tasks
        .iter()
        .map(|task| env.spawn(["run", task, "--", "sh", "-c", &held(&env, task)]))
        .collect();
    for run in &mut runs {
        run.wait_for_line("ready");
    }
    let containers = env.containers();
    assert_eq!(containers.len(), 4, "{}", env.container_report());

    let gc = env.output(["gc", "--json"]);
    gc.expect_code(0);
    assert_eq!(gc.stdout.trim(), "", "gc has nothing to do\n{gc}");

    assert_eq!(env.containers(), containers, "gc removed no container");
    for id in &containers {
        assert!(
            env.is_running(id),
            "container {id} must still run\n{}",
            env.container_report()
        );
    }
    let listed = env.ls_json();
    let mut running: Vec<&str> = listed
        .iter()
        .filter(|t| t["state"] == "running")
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    running.sort();
    assert_eq!(running, tasks, "ls --json: {listed:?}");
    let table = env.output(["ls"]);
    table.expect_code(0);
    for task in tasks {
        let row = table
            .stdout_lines()
            .into_iter()
            .find(|l| l.split_whitespace().next() == Some(task))
            .unwrap_or_else(|| panic!("ls shows {task}\n{table}"));
        assert_eq!(
            row.split_whitespace().nth(1),
            Some("running"),
            "{row}\n{table}"
        );
        let wt = env.worktree_path(task);
        assert!(wt.is_dir(), "gc left {}", wt.display());
        assert!(
            env.worktree_entry(&wt).is_some_and(|w| w.locked),
            "{:?}",
            env.worktrees()
        );
    }

    for task in tasks {
        touch(&marker(&env, task));
    }
    for (task, run) in tasks.iter().zip(runs) {
        let out = run.wait();
        out.expect_code(0);
        env.assert_snapshot_holds(task, "done.txt", &format!("done-{task}\n"));
    }
    for task in tasks {
        env.assert_torn_down(task);
        assert_eq!(env.ls_task(task).expect("ls lists it")["state"], "exited");
    }
}
