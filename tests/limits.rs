//! A task cannot exhaust the machine or reach other tasks: limits on processes and memory, a network
//! of its own, bounded logs and snapshots — each tried as a runaway or hostile task would.

mod common;

use std::process::Command;

use common::*;

#[test]
fn limits_are_on_by_default_and_flags_override_them() {
    let env = TestEnv::new("limits-default");
    let mut run = env.spawn([
        "run",
        "dflt",
        "--",
        "sh",
        "-c",
        &format!("echo ready; {}", wait_for_release()),
    ]);
    run.wait_for_line("ready");
    let id = env
        .live_containers()
        .pop()
        .expect("the task's container runs");
    let host = env.inspect(&id)["HostConfig"].clone();
    assert_eq!(host["PidsLimit"], 4096, "{host}");
    assert!(
        host["Memory"].as_i64().unwrap_or(0) > 0,
        "a memory limit by default: {host}"
    );
    assert_eq!(
        host["Memory"], host["MemorySwap"],
        "no swap beyond the limit: {host}"
    );
    assert_eq!(host["NanoCpus"], 0, "CPUs unlimited unless set: {host}");
    env.release("dflt");
    run.wait().expect_code(0);

    env.write_config("[limits]\ncpus = 1.5\nmemory = \"300m\"\npids = 300\n");
    let mut run = env.spawn([
        "run",
        "set",
        "--pids-limit",
        "200",
        "--",
        "sh",
        "-c",
        &format!("echo ready; {}", wait_for_release()),
    ]);
    run.wait_for_line("ready");
    let id = env
        .live_containers()
        .pop()
        .expect("the task's container runs");
    let host = env.inspect(&id)["HostConfig"].clone();
    assert_eq!(
        host["PidsLimit"], 200,
        "the flag wins over agentbox.toml: {host}"
    );
    assert_eq!(host["Memory"], 300 << 20, "{host}");
    assert_eq!(host["NanoCpus"], 1_500_000_000u64, "{host}");
    env.release("set");
    run.wait().expect_code(0);
}

#[test]
fn a_fork_loop_ends_at_the_pids_limit() {
    let env = TestEnv::new("limits-fork");
    // 10,000 background processes asked for; awk counts the forks the limit refused.
    let script = r#"exec awk 'BEGIN { for (i = 0; i < 10000; i++) if (system("exec 2>/dev/null; sleep 300 &") != 0) failed++; print "started=" 10000 - failed }'"#;
    let out = env.output([
        "run",
        "forks",
        "--pids-limit",
        "100",
        "--",
        "sh",
        "-c",
        script,
    ]);
    out.expect_code(0);
    let started: usize = out
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("started=")?.parse().ok())
        .unwrap_or_else(|| panic!("the task counted its processes\n{out}"));
    assert!(
        started < 100,
        "the limit stopped the loop at 100 processes: {started}\n{out}"
    );
    // The machine still answers: the engine serves another task at once.
    env.output(["run", "after", "--", "true"]).expect_code(0);
    assert_eq!(env.containers(), Vec::<String>::new());
}

#[test]
fn a_task_past_its_memory_limit_exits_137_and_keeps_its_work() {
    let env = TestEnv::new("limits-oom");
    let script = "echo kept > kept.txt && git add kept.txt && git commit -qm 'before the blow-up' && \
                  echo wip > wip.txt && exec tail /dev/zero";
    let out = env.output(["run", "oom", "--memory", "64m", "--", "sh", "-c", script]);
    out.expect_code(137);
    out.expect_stderr_contains("agentbox: task oom was killed: out of memory (limit 64 MiB)");
    assert!(
        env.subjects("main..agentbox/oom")
            .contains(&"before the blow-up".to_owned())
    );
    env.assert_snapshot_holds("oom", "wip.txt", "wip\n");
    assert_eq!(env.ls_task("oom").unwrap()["oom_killed"], true);
    env.assert_torn_down("oom");
}

/// The container's IP address on its task network.
fn ip_of(env: &TestEnv, task: &str) -> String {
    let id = env
        .live_containers()
        .into_iter()
        .find(|id| env.inspect(id)["Config"]["Labels"]["agentbox.task"] == task)
        .unwrap_or_else(|| panic!("no running container of task {task}"));
    let networks = env.inspect(&id)["NetworkSettings"]["Networks"].clone();
    let (_, network) = networks
        .as_object()
        .and_then(|n| n.iter().next())
        .expect("the task is on a network");
    network["IPAddress"].as_str().unwrap().to_owned()
}

#[test]
fn tasks_cannot_reach_each_other_and_none_has_no_network() {
    ensure_tools_image();
    let env = TestEnv::new("limits-net");
    env.write_config(&format!("image = \"{TOOLS_IMAGE}\"\n"));
    let server = format!(
        "echo hi > /tmp/i.html; busybox httpd -p 3000 -h /tmp; echo ready; {}",
        wait_for_release()
    );
    let mut a = env.spawn(["run", "server", "--", "sh", "-c", &server]);
    a.wait_for_line("ready");
    let ip = ip_of(&env, "server");
    let probe = format!(
        "if busybox wget -q -T 3 -O- http://{ip}:3000/i.html; then echo reached; else echo unreachable; fi; \
         if busybox wget -q -T 3 -O- http://127.0.0.1:3000/ 2>/dev/null; then echo self; fi"
    );
    let b = env.output(["run", "client", "--", "sh", "-c", &probe]);
    b.expect_code(0);
    assert_eq!(
        b.stdout_lines(),
        ["unreachable"],
        "another task's server is out of reach\n{b}"
    );
    env.release("server");
    a.wait().expect_code(0);

    let none = env.output([
        "run",
        "offline",
        "--network",
        "none",
        "--",
        "sh",
        "-c",
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
    ]);
    none.expect_code(0);
    assert_eq!(none.stdout_lines(), ["lo"], "only loopback\n{none}");
    // Tasks without services share one network on which their containers cannot reach each other;
    // gc removes it once no task uses it.
    let networks = env.networks();
    assert_eq!(networks.len(), 1, "{networks:?}");
    assert!(networks[0].contains("--isolated-"), "{networks:?}");
    let gc = env.output(["gc"]);
    gc.expect_code(0);
    gc.expect_stderr_contains("which no task uses any more");
    assert_eq!(env.networks(), Vec::<String>::new());

    let host = env.output(["run", "h", "--network", "host", "--", "true"]);
    host.expect_code(125);
    host.expect_stderr_contains("host is refused");
}

#[test]
fn the_log_is_capped_and_private_but_the_caller_gets_every_byte() {
    let env = TestEnv::new("limits-log");
    env.write_config("log_max = \"1m\"\n");
    // 32 MiB of numbered lines.
    let script = "seq 1 3000000 | awk '{ printf \"%09d padding-padding\\n\", $1 }'";
    let out = env.output(["run", "loud", "--", "sh", "-c", script]);
    out.expect_code(0);
    let lines = out.stdout_lines();
    assert_eq!(lines.len(), 3_000_000, "the caller got every line");
    assert_eq!(lines.last().unwrap(), "003000000 padding-padding");

    let dir = env
        .state_root()
        .join(env.repo_id())
        .join("logs")
        .join("loud");
    let mut on_disk = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "{:?} is private",
            entry.path()
        );
        on_disk += meta.len();
    }
    assert!(
        on_disk <= (1 << 20) + 4096,
        "the log keeps at most its cap: {on_disk} bytes"
    );
    let logs = env.output(["logs", "loud"]);
    logs.expect_code(0);
    assert!(logs.stdout.starts_with("000000001 padding-padding\n"));
    assert!(logs.stdout.ends_with("003000000 padding-padding\n"));
    assert!(
        logs.stdout.contains("left out"),
        "the log says what it left out"
    );
}

#[test]
fn a_huge_sparse_file_is_left_out_of_the_snapshot_and_the_worktree_kept() {
    let env = TestEnv::new("limits-sparse");
    let script = "truncate -s 3G big.bin && echo small > small.txt";
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "cpu=%U+%S"]);
    let inner = env.agentbox(["run", "sparse", "--", "sh", "-c", script]);
    cmd.arg(inner.get_program())
        .args(inner.get_args())
        .current_dir(&env.repo)
        .env_clear()
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
    let out = output_of(cmd);
    out.expect_code(0);
    out.expect_stderr_contains("big.bin (3 GiB)");
    let cpu: f64 = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("cpu="))
        .map(|t| t.split('+').map(|n| n.parse::<f64>().unwrap()).sum())
        .expect("/usr/bin/time reported the CPU time");
    assert!(
        cpu < 2.0,
        "the teardown did not read the 3 GB file: {cpu}s of CPU\n{out}"
    );
    env.assert_snapshot_holds("sparse", "small.txt", "small\n");
    assert_eq!(env.file_at("agentbox/sparse", "big.bin"), None);
    let task = env.ls_task("sparse").unwrap();
    assert_eq!(task["state"], "kept", "{task}");
    assert_eq!(task["left_out"][0]["path"], "big.bin", "{task}");
    assert!(
        env.worktree_path("sparse").join("big.bin").exists(),
        "nothing is lost"
    );
    let rm = env.output(["rm", "sparse"]);
    rm.expect_code(0);
    assert!(!env.worktree_path("sparse").exists());
}

#[test]
fn a_long_line_reaches_batch_json_in_pieces() {
    let env = TestEnv::new("limits-line");
    let tasks = env.root.join("tasks.toml");
    std::fs::write(
        &tasks,
        "[[task]]\nname = \"long\"\ncommand = \"head -c 3000000 /dev/zero | tr '\\\\0' x; echo; echo after\"\n",
    )
    .unwrap();
    let out = env.output(["batch", tasks.to_str().unwrap(), "--json", "--log-lines"]);
    out.expect_code(0);
    let logs: Vec<serde_json::Value> = out
        .stdout_lines()
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "log")
        .collect();
    let pieces: Vec<usize> = logs
        .iter()
        .map(|e| e["line"].as_str().unwrap().len())
        .collect();
    assert_eq!(
        pieces,
        [1 << 20, 1 << 20, 3_000_000 - (2 << 20), 5],
        "{pieces:?}"
    );
    assert_eq!(logs[0]["continued"], true);
    assert_eq!(logs[2].get("continued"), None);
    assert_eq!(logs[3]["line"], "after");
}

#[test]
fn bad_limits_and_ports_are_refused_before_anything_starts() {
    let env = TestEnv::new("limits-bad");
    let cases = [
        ("[ports]\nweb = 0\n", "web = 0"),
        (
            "[ports]\nweb = 3000\nalso = 3000\n",
            "both name container port 3000",
        ),
        ("env_file_name = \".git\"\n", "env_file_name"),
        ("[limits]\nmemory = \"lots\"\n", "is not a size"),
        ("network = \"host\"\n", "refused"),
    ];
    for (config, message) in cases {
        env.write_config(config);
        let out = env.output(["run", "bad", "--", "true"]);
        out.expect_code(125);
        out.expect_stderr_contains(message);
        env.assert_nothing_left("bad");
    }
    env.write_config("");
    let out = env.output(["run", "bad", "--memory", "lots", "--", "true"]);
    out.expect_code(125);
}

/// A service shares the task's limits unless it sets its own (`[services.<name>.limits]`), and a
/// task of a batch file sets its own over `agentbox.toml`'s.
#[test]
fn services_share_the_tasks_limits_unless_they_set_their_own() {
    ensure_tools_image();
    let env = TestEnv::new("limits-services");
    env.write_config(&format!(
        "[limits]\nmemory = \"300m\"\npids = 300\n\
         [services.db]\nimage = \"{TOOLS_IMAGE}\"\ncommand = \"exec busybox sleep 300\"\n\
         [services.db.limits]\npids = 100\n"
    ));
    let tasks = env.root.join("tasks.toml");
    std::fs::write(
        &tasks,
        format!(
            "[[task]]\nname = \"svc\"\nlimits = {{ pids = 150 }}\ncommand = \"echo ready; {}\"\n",
            wait_for_release().replace('"', "\\\"")
        ),
    )
    .unwrap();
    let mut batch = env.spawn(["batch", tasks.to_str().unwrap()]);
    batch.wait_for_line("svc | ready");
    let limits_of = |service: Option<&str>| {
        let test = format!("label={TEST_LABEL}={}", env.id);
        let mut args = vec!["ps", "-q", "--filter", test.as_str()];
        let service_filter = service.map(|s| format!("label=agentbox.service={s}"));
        if let Some(filter) = &service_filter {
            args.extend(["--filter", filter.as_str()]);
        }
        let ids = docker_lines(&args);
        let id = ids
            .iter()
            .find(|id| {
                let labels = env.inspect(id)["Config"]["Labels"].clone();
                labels.get("agentbox.service").is_some() == service.is_some()
            })
            .unwrap_or_else(|| panic!("a container for {service:?} among {ids:?}"))
            .clone();
        let host = env.inspect(&id)["HostConfig"].clone();
        (host["PidsLimit"].as_i64(), host["Memory"].as_i64())
    };
    assert_eq!(
        limits_of(None),
        (Some(150), Some(300 << 20)),
        "the batch task's own pids over agentbox.toml's memory"
    );
    assert_eq!(
        limits_of(Some("db")),
        (Some(100), Some(300 << 20)),
        "the service's own pids, the task's memory"
    );
    env.release("svc");
    batch.wait().expect_code(0);
}
