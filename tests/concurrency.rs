//! Many tasks in one repository at the same time: runs started all at once, a `git worktree prune`
//! and `git gc --prune=now` inside one task's container while another task runs, and `ls`/`gc`
//! while several tasks run.
//!
//! Tasks that must stay alive wait (inside their container) for the release file in their own
//! worktree ([`wait_for_release`]); the test creates it on the host to release them.

mod common;

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

/// A task command that says `ready`, waits to be released, then leaves `done.txt` as uncommitted
/// work.
fn held() -> String {
    format!(
        "echo ready; {}; echo done-$AGENTBOX_TASK > done.txt",
        wait_for_release()
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
    assert_eq!(
        (env.task_git_dirs(), env.scratch_dirs()),
        (Vec::new(), Vec::new()),
        "no task git dir or scratch dir may be left"
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
fn prune_and_gc_inside_another_task_cannot_touch_a_running_task() {
    let env = TestEnv::new("conc_prune");
    let base = env.head();
    // a commits, leaves uncommitted work, and runs on.
    let script_a = format!(
        "echo kept > kept.txt && git add kept.txt && git commit -qm a-commit || exit 9; \
         echo wip > wip.txt; echo ready; {}; echo done-a > done.txt",
        wait_for_release()
    );
    let mut a = env.spawn(["run", "a", "--", "sh", "-c", &script_a]);
    a.wait_for_line("ready");
    let wt_a = env.worktree_path("a");
    let git_a = env.task_git_dir("a");
    assert!(git_a.join("HEAD").is_file(), "a's git dir while a runs");
    let dot_git_a = std::fs::read(wt_a.join(".git")).unwrap();
    let a_commit = env.git_in(&wt_a, ["rev-parse", "HEAD"]);

    // A control: a linked worktree of the repository that is alive on the host but not locked. A
    // prune that could reach the repository's worktree metadata would drop it (its path is not
    // mounted in b's container).
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

    let b = env.output([
        "run",
        "b",
        "--",
        "sh",
        "-c",
        "git worktree prune --verbose && git reflog expire --expire=now --all && \
         git gc --prune=now --quiet && echo b-done",
    ]);
    b.expect_code(0);
    assert_eq!(b.stdout_lines(), ["b-done"], "{b}");
    assert!(
        env.worktree_entry(&decoy).is_some(),
        "the prune inside b reached the repository's worktrees: {:?}\n{b}",
        env.worktrees()
    );

    // a's worktree, git dir, commit and uncommitted work survived, and a still runs.
    assert_eq!(env.ls_task("a").expect("ls lists a")["state"], "running");
    assert!(git_a.join("HEAD").is_file(), "a's git dir survives\n{b}");
    assert_eq!(
        std::fs::read(wt_a.join(".git")).unwrap(),
        dot_git_a,
        "a's .git file unchanged"
    );
    assert_eq!(
        env.git_in(&wt_a, ["rev-parse", "HEAD"]),
        a_commit,
        "a's branch in its git dir unchanged"
    );
    assert_eq!(
        env.git_in(&wt_a, ["cat-file", "-p", "HEAD:kept.txt"]),
        "kept",
        "a's commit is readable"
    );
    assert!(wt_a.join("wip.txt").is_file(), "a's uncommitted work stays");

    env.release("a");
    let out = a.wait();
    out.expect_code(0);
    assert_eq!(
        env.subjects(&format!("{base}..agentbox/a")),
        [
            "agentbox: snapshot of uncommitted work in task a",
            "a-commit"
        ],
        "{out}"
    );
    env.assert_snapshot_holds("a", "done.txt", "done-a\n");
    assert_eq!(
        env.file_at("agentbox/a", "wip.txt").as_deref(),
        Some("wip\n")
    );
    assert_eq!(
        env.file_at("agentbox/a", "kept.txt").as_deref(),
        Some("kept\n")
    );
    env.assert_torn_down("a");
    env.assert_torn_down("b");
    assert!(env.worktree_entry(&decoy).is_some());
}

#[test]
fn ls_shows_many_running_tasks_and_gc_leaves_them_alone() {
    let env = TestEnv::new("conc_gc");
    let tasks = ["w1", "w2", "w3", "w4"];
    let mut runs: Vec<Spawned> = tasks
        .iter()
        .map(|task| env.spawn(["run", task, "--", "sh", "-c", &held()]))
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
            env.task_git_dir(task).join("HEAD").is_file(),
            "gc left the git dir of {task}"
        );
        assert!(
            env.worktree_entry(&wt).is_none(),
            "a task's worktree is not a linked worktree of the repository: {:?}",
            env.worktrees()
        );
    }

    for task in tasks {
        env.release(task);
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
