//! The warm pool (`[pool]`, `agentbox pool`): a task that takes a ready slot is the task a cold start
//! makes — same environment, ports, branch, base, paths and snapshot — the pool refills itself, a slot
//! never serves two tasks, and nothing of the pool outlives `pool drain` and `gc`, also when the
//! process making a slot or supervising a pooled task is killed.

mod common;

use std::fs::{self, File, TryLockError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A pool of one slot; each test publishes ports from a `port_range` of its own (every test has
/// its own port ledger, so only disjoint ranges keep parallel tests from racing for a port).
fn pool_of_one(port_range: &str) -> String {
    format!(
        "port_range = \"{port_range}\"\n\n[pool]\nsize = 1\n\n[ports]\napi = 8080\n\n[env]\nGREETING = \"hello ${{task}}\"\n"
    )
}

/// `agentbox pool status --json`: one object per slot.
fn slots(env: &TestEnv) -> Vec<Value> {
    let out = env.output(["pool", "status", "--json"]);
    out.expect_code(0);
    out.stdout_lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{out}")))
        .collect()
}

fn ready_slots(env: &TestEnv) -> Vec<Value> {
    slots(env)
        .into_iter()
        .filter(|s| s["state"] == "ready")
        .collect()
}

/// Waits until the pool holds `n` ready slots and nothing else: the refill a run started in the
/// background has finished. Bounded, so that a refill that never comes fails the test.
fn wait_for_pool(env: &TestEnv, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let all = slots(env);
        if all.len() == n && all.iter().all(|s| s["state"] == "ready") {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never settled at {n} ready slot(s): {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (bounded) until no `pool fill` of the repository runs, so that the test's guard removes
/// every container a background refill made, also when an assertion failed.
struct FillerGuard(PathBuf);

impl FillerGuard {
    fn new(env: &TestEnv) -> Self {
        Self(env.state_root())
    }
}

impl Drop for FillerGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let Ok(repos) = fs::read_dir(&self.0) else {
            return;
        };
        for repo in repos.flatten() {
            let Ok(lock) = File::open(repo.path().join("pool/fill.lock")) else {
                continue;
            };
            while matches!(lock.try_lock(), Err(TryLockError::WouldBlock))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Directories of the pool (`.pool-<id>`) anywhere agentbox keeps task directories.
fn pool_dirs(env: &TestEnv) -> Vec<PathBuf> {
    let repo_state = env.state_root().join(env.repo_id());
    [
        env.worktree_root(),
        repo_state.join("git"),
        repo_state.join("scratch"),
    ]
    .iter()
    .filter_map(|dir| fs::read_dir(dir).ok())
    .flat_map(|entries| entries.flatten().map(|e| e.path()))
    .filter(|p| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".pool-")
    })
    .collect()
}

/// Asserts that the pool is empty and left nothing: no container, record, directory or port.
fn assert_pool_gone(env: &TestEnv) {
    assert_eq!(slots(env), Vec::<Value>::new(), "no slot may be left");
    assert_eq!(
        env.containers(),
        Vec::<String>::new(),
        "no container may be left"
    );
    assert_eq!(
        pool_dirs(env),
        Vec::<PathBuf>::new(),
        "no slot directory may be left"
    );
    assert!(
        env.port_ledger().is_empty(),
        "no port may stay reserved: {:?}",
        env.port_ledger()
    );
}

fn commit_file(env: &TestEnv, file: &str, contents: &str) -> String {
    fs::write(env.repo.join(file), contents).unwrap();
    env.git(["add", file]);
    env.git(["commit", "-q", "-m", file]);
    env.head()
}

#[test]
fn a_task_from_the_pool_is_the_task_a_cold_start_makes() {
    let env = TestEnv::new("pool-same");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30400-30409"));
    env.output(["pool", "fill"]).expect_code(0);
    let before = ready_slots(&env);
    assert_eq!(before.len(), 1, "{before:?}");
    let slot = before[0]["slot"].as_str().unwrap().to_owned();

    // The base moves on after the slot was made: the task still starts from the new tip.
    let tip = commit_file(&env, "later.txt", "later\n");
    let script = "echo task=$AGENTBOX_TASK; echo greeting=$GREETING; echo port=$AGENTBOX_PORT_API; \
                  echo host_port=$AGENTBOX_HOST_PORT_API; cat later.txt; echo pwd=$(pwd); \
                  echo head=$(git rev-parse --abbrev-ref HEAD); echo dirty=$(git status --porcelain | wc -l); \
                  grep -c '^GREETING=hello t$' .env.agentbox; echo work > work.txt";
    let out = env.output(["run", "t", "--", "sh", "-c", script]);
    out.expect_code(0);
    out.expect_stderr_contains("agentbox: the task's sandbox comes from the pool");
    let lines = out.stdout_lines();
    for expected in [
        "task=t",
        "greeting=hello t",
        "port=8080",
        "later",
        "head=agentbox/t",
        "dirty=0",
        "1",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} missing\n{out}"
        );
    }
    let host_port = lines
        .iter()
        .find_map(|l| l.strip_prefix("host_port="))
        .unwrap_or_else(|| panic!("no host port\n{out}"));
    assert!(
        out.stderr
            .contains(&format!("http://127.0.0.1:{host_port}")),
        "the run names the task's host port\n{out}"
    );
    // The container sees the worktree at the path it has on the host (the slot's).
    let pwd = lines.iter().find_map(|l| l.strip_prefix("pwd=")).unwrap();
    assert_eq!(
        PathBuf::from(pwd),
        env.worktree_root().join(format!(".pool-{slot}")),
        "{out}"
    );

    env.assert_snapshot_holds("t", "work.txt", "work\n");
    assert_eq!(
        env.rev("agentbox/t^").as_deref(),
        Some(tip.as_str()),
        "the task starts at the base's tip"
    );
    assert!(
        fs::symlink_metadata(env.worktree_path("t")).is_err(),
        "the link at the task's worktree path goes with the task"
    );

    // The pool is back at its size with a new slot, at the new tip; the taken one is gone.
    let after = wait_for_pool(&env, 1);
    assert_ne!(
        after[0]["slot"],
        slot.as_str(),
        "a slot never serves two tasks"
    );
    assert_eq!(after[0]["base_commit"], tip.as_str());
    assert!(
        !pool_dirs(&env)
            .iter()
            .any(|p| p.to_string_lossy().contains(&slot)),
        "the taken slot's directories are gone: {:?}",
        pool_dirs(&env)
    );
    assert_eq!(
        env.containers().len(),
        1,
        "only the new slot's container is left"
    );
    assert_eq!(env.port_ledger().len(), 1, "only the new slot holds a port");

    let out = env.output(["pool", "drain"]);
    out.expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_pooled_task_is_stopped_gracefully_and_carries_its_name() {
    let env = TestEnv::new("pool-stop");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30410-30419"));
    env.output(["pool", "fill"]).expect_code(0);
    let mut run = env.spawn([
        "run",
        "g",
        "--",
        "sh",
        "-c",
        "trap 'echo term > term.txt; exit 3' TERM; echo ready; while :; do sleep 0.1; done",
    ]);
    run.wait_for_line("ready");
    let names = docker_names(&env);
    let own = format!("agentbox-{}-g", env.repo_id());
    assert!(
        names.contains(&own),
        "the slot's container took the task's name: {names:?}"
    );
    assert!(
        fs::symlink_metadata(env.worktree_path("g")).is_ok_and(|m| m.file_type().is_symlink()),
        "the task's usual worktree path leads to its worktree"
    );
    run.signal(Signal::INT);
    let out = run.wait();
    out.expect_stderr_contains("stopping the task gracefully");
    env.assert_snapshot_holds("g", "term.txt", "term\n");

    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

fn docker_names(env: &TestEnv) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "--filter", &format!("label=agentbox.test={}", env.id)])
        .args(["--format", "{{.Names}}"])
        .output()
        .unwrap();
    lines(&String::from_utf8_lossy(&out.stdout))
}

#[test]
fn a_pooled_task_whose_supervisor_is_killed_keeps_its_work() {
    let env = TestEnv::new("pool-kill");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30420-30429"));
    env.output(["pool", "fill"]).expect_code(0);
    let mut run = env.spawn([
        "run",
        "k",
        "--",
        "sh",
        "-c",
        "echo wip > wip.txt; echo ready; exec sleep 300",
    ]);
    run.wait_for_line("ready");
    run.signal(Signal::KILL);
    assert_eq!(run.wait().code(), None);

    env.output(["gc"]).expect_code(0);
    env.assert_snapshot_holds("k", "wip.txt", "wip\n");
    assert!(fs::symlink_metadata(env.worktree_path("k")).is_err());
    let state = env.ls_task("k").map(|t| t["state"].clone());
    assert_eq!(
        state,
        Some(Value::from("recovered")),
        "gc finished the task"
    );

    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_slot_whose_maker_is_killed_is_removed_by_gc() {
    let env = TestEnv::new("pool-maker");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30430-30439"));
    let fill = env.spawn(["pool", "fill", "3"]);
    // Killed wherever it is: while making the first slot, or a later one.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !slots(&env).iter().any(|s| s["state"] == "creating") {
        assert!(Instant::now() < deadline, "no slot was ever being made");
        std::thread::sleep(Duration::from_millis(20));
    }
    fill.signal(Signal::KILL);
    fill.wait();

    env.output(["gc"]).expect_code(0);
    assert!(
        slots(&env).iter().all(|s| s["state"] == "ready"),
        "gc removes dead slots and keeps ready ones: {:?}",
        slots(&env)
    );
    assert_eq!(
        env.containers().len(),
        ready_slots(&env).len(),
        "a container for each ready slot and none else"
    );
    assert_eq!(pool_dirs(&env).len(), 3 * ready_slots(&env).len());
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn tasks_the_pool_does_not_fit_start_cold_and_leave_it_alone() {
    let env = TestEnv::new("pool-misfit");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30440-30449"));
    env.output(["pool", "fill"]).expect_code(0);
    let slot = ready_slots(&env)[0]["slot"].clone();

    for args in [
        vec!["run", "m", "--memory", "300m", "--", "true"],
        vec!["run", "n", "--no-pool", "--", "true"],
    ] {
        let out = env.output(&args);
        out.expect_code(0);
        assert!(
            !out.stderr.contains("comes from the pool"),
            "{args:?} starts cold\n{out}"
        );
    }
    let after = wait_for_pool(&env, 1);
    assert_eq!(after[0]["slot"], slot, "the slot waits for a task it fits");

    // A service whose environment names the task cannot be made before the task exists.
    env.write_config(&format!(
        "{}\n[services.db]\nimage = \"{IMAGE}\"\ncommand = \"sleep 300\"\nenv = {{ NAME = \"db-${{task}}\" }}\n",
        pool_of_one("30440-30449")
    ));
    let out = env.output(["pool", "fill"]);
    out.expect_code(125);
    out.expect_stderr_contains("[services.db.env] NAME names the task");
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_pooled_task_reaches_its_services_which_take_its_name() {
    ensure_tools_image();
    let env = TestEnv::new("pool-services");
    let _filler = FillerGuard::new(&env);
    env.write_config(&format!(
        "image = \"{TOOLS_IMAGE}\"\n{}\n[services.db]\nimage = \"{TOOLS_IMAGE}\"\n\
         command = [\"sh\", \"-c\", \"echo db-ok > /tmp/i.html; exec busybox httpd -f -p 80 -h /tmp\"]\n",
        pool_of_one("30450-30459")
    ));
    env.output(["pool", "fill"]).expect_code(0);
    assert_eq!(
        env.networks().len(),
        1,
        "a slot with services has a network of its own"
    );
    let script = format!(
        "i=0; until answer=$(busybox wget -qO- http://db/i.html 2>/dev/null); do \
           i=$((i + 1)); [ \"$i\" -lt 400 ] || {{ echo db-unreachable; exit 4; }}; busybox sleep 0.05; done; \
         echo \"$answer\"; echo ready; {}",
        wait_for_release()
    );
    let mut run = env.spawn(["run", "s", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");
    let names = docker_names(&env);
    let task_container = format!("agentbox-{}-s", env.repo_id());
    for name in [task_container.clone(), format!("{task_container}-db")] {
        assert!(names.contains(&name), "{name} runs: {names:?}");
    }
    env.release("s");
    let out = run.wait();
    out.expect_code(0);
    out.expect_stderr_contains("comes from the pool");
    assert_eq!(out.stdout_lines(), ["db-ok", "ready"], "{out}");

    // The task's services and network went with it; the new slot has its own.
    wait_for_pool(&env, 1);
    assert_eq!(
        env.containers().len(),
        2,
        "the new slot's container and its service"
    );
    assert_eq!(env.networks().len(), 1, "the new slot's network");
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
    assert_eq!(env.networks(), Vec::<String>::new());
}

#[test]
fn a_batch_takes_what_the_pool_has_and_starts_the_rest_cold() {
    let env = TestEnv::new("pool-batch");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30460-30469"));
    env.output(["pool", "fill", "2"]).expect_code(0);
    let tasks = env.root.join("tasks.toml");
    fs::write(
        &tasks,
        "[[task]]\nname = \"a\"\ncommand = \"echo a > a.txt\"\n\n\
         [[task]]\nname = \"b\"\ncommand = \"echo b > b.txt\"\n\n\
         [[task]]\nname = \"c\"\ncommand = \"echo c > c.txt\"\n",
    )
    .unwrap();
    let out = env.output(["batch".as_ref(), tasks.as_os_str(), "--json".as_ref()]);
    out.expect_code(0);
    let from_pool: Vec<bool> = out
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "created")
        .map(|e| e["from_pool"].as_bool().expect("created says from_pool"))
        .collect();
    assert_eq!(from_pool.len(), 3, "{out}");
    assert_eq!(
        from_pool.iter().filter(|p| **p).count(),
        2,
        "two tasks take the two slots, one starts cold\n{out}"
    );
    for task in ["a", "b", "c"] {
        env.assert_snapshot_holds(task, &format!("{task}.txt"), &format!("{task}\n"));
    }
    // `[pool] size` is 1: the refill after the batch makes one.
    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_pooled_task_sees_no_other_slot() {
    let env = TestEnv::new("pool-apart");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30470-30479"));
    env.output(["pool", "fill", "2"]).expect_code(0);
    let root = env.worktree_root();
    let script = format!(
        "ls -A {}; ls -A \"$(dirname \"$(git rev-parse --git-dir)\")\"",
        root.display()
    );
    let out = env.output(["run", "p", "--", "sh", "-c", &script]);
    out.expect_code(0);
    out.expect_stderr_contains("comes from the pool");
    let seen = out.stdout_lines();
    assert_eq!(
        seen.len(),
        2,
        "one worktree and one git dir, its own\n{out}"
    );
    assert!(seen.iter().all(|name| name.starts_with(".pool-")), "{out}");
    assert_eq!(
        seen[0], seen[1],
        "the slot's own worktree and git dir\n{out}"
    );
    // One slot is left, and `[pool] size` is 1: the refill makes none.
    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_long_lived_task_from_the_pool_gives_its_commands_the_tasks_environment() {
    let env = TestEnv::new("pool-up");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30480-30489"));
    env.output(["pool", "fill"]).expect_code(0);
    let slot = ready_slots(&env)[0]["slot"].as_str().unwrap().to_owned();
    env.output(["up", "u"]).expect_code(0);
    let task = env.ls_task("u").expect("ls lists the task");
    assert!(
        task["worktree"]
            .as_str()
            .unwrap()
            .ends_with(&format!(".pool-{slot}")),
        "the long-lived task took the slot: {task}"
    );
    // Commands run later in the task's container get the task's environment, secrets and git
    // identity included, as they would in a container made for the task.
    let out = env.output([
        "exec",
        "u",
        "--",
        "sh",
        "-c",
        "echo \"$AGENTBOX_TASK/$GREETING\"; echo work > w.txt; git add w.txt; git commit -q -m 'from exec'; git log -1 --format=%an",
    ]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), ["u/hello u", USER_NAME], "{out}");
    env.output(["stop", "u"]).expect_code(0);
    env.output(["wait", "u"]);
    assert_eq!(env.subjects("main..agentbox/u"), ["from exec"]);

    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_pooled_task_past_its_memory_limit_is_said_to_be_out_of_memory() {
    let env = TestEnv::new("pool-oom");
    let _filler = FillerGuard::new(&env);
    env.write_config(&format!(
        "{}\n[limits]\nmemory = \"64m\"\n",
        pool_of_one("30490-30499")
    ));
    env.output(["pool", "fill"]).expect_code(0);
    let script = "echo wip > wip.txt && exec tail /dev/zero";
    let out = env.output(["run", "oom", "--", "sh", "-c", script]);
    out.expect_code(137);
    out.expect_stderr_contains("comes from the pool");
    out.expect_stderr_contains("agentbox: task oom was killed: out of memory (limit 64 MiB)");
    env.assert_snapshot_holds("oom", "wip.txt", "wip\n");
    assert_eq!(env.ls_task("oom").unwrap()["oom_killed"], true);

    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}

#[test]
fn a_command_the_image_lacks_is_said_as_for_a_cold_start() {
    let env = TestEnv::new("pool-missing");
    let _filler = FillerGuard::new(&env);
    env.write_config(&pool_of_one("30500-30509"));
    env.output(["pool", "fill"]).expect_code(0);
    let out = env.output(["run", "nf", "--", "make", "lint"]);
    out.expect_code(127);
    out.expect_stderr_contains("comes from the pool");
    out.expect_stderr_contains("agentbox: command not found in image agentbox/base:bookworm: make");
    wait_for_pool(&env, 1);
    env.output(["pool", "drain"]).expect_code(0);
    assert_pool_gone(&env);
}
