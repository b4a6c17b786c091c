//! A task's environment against a real engine: `agentbox.toml`, host ports, env files, secrets,
//! sidecar services, `copy` and `setup`.
//!
//! Tests that publish ports each use a `port_range` of their own (below the default 20000-29999
//! that other test files use, below the kernel's ephemeral ports): every test has its own state dir
//! and therefore its own ledger, so only disjoint ranges keep parallel tests from racing for a port.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use common::*;

// ---- helpers ----------------------------------------------------------------------------------------

/// `GET <path>` over HTTP/1.0 to 127.0.0.1:<port>; panics unless the answer is 200; returns the body.
#[track_caller]
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("reading the answer of 127.0.0.1:{port}: {e}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    assert_eq!(
        head.split_whitespace().nth(1),
        Some("200"),
        "GET {path} from 127.0.0.1:{port} must answer 200: {head}"
    );
    body.to_owned()
}

/// The host port `agentbox ports <task>` shows for `name` (lines `<name>  <container> -> <url>`),
/// checking the container port and the URL's form on the way.
#[track_caller]
fn shown_host_port(env: &TestEnv, task: &str, name: &str, container: u16) -> u16 {
    let out = env.output(["ports", task]);
    out.expect_code(0);
    let line = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("agentbox ports {task} must list {name}\n{out}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "`<name> <container> -> <url>`: {line:?}");
    assert_eq!(fields[1], container.to_string(), "container port: {line:?}");
    assert_eq!(fields[2], "->", "{line:?}");
    let port = fields[3]
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("URL on 127.0.0.1: {line:?}"));
    port.parse()
        .unwrap_or_else(|_| panic!("host port in {line:?}"))
}

/// Asserts that the run of `task` left nothing of its own, while other tasks of the same test may
/// still be running: no branch, worktree, record, `ls` entry, container or network of `task`.
#[track_caller]
fn assert_no_trace_of(env: &TestEnv, task: &str) {
    let branch = format!("agentbox/{task}");
    assert!(
        !env.branch_exists(&branch),
        "branch {branch} must not exist"
    );
    let wt = env.worktree_path(task);
    assert!(!wt.exists(), "worktree {} must not exist", wt.display());
    assert!(
        env.worktree_entry(&wt).is_none(),
        "git worktree list must not show {}",
        wt.display()
    );
    assert!(
        !env.task_records()
            .iter()
            .any(|p| p.file_stem().is_some_and(|s| s == task)),
        "no state record of {task}: {:?}",
        env.task_records()
    );
    assert!(
        env.ls_task(task).is_none(),
        "ls --json must not list {task}"
    );
    let report = env.container_report();
    assert!(
        !report.contains(&format!("agentbox.task={task}")),
        "no container of {task} may be left:\n{report}"
    );
    assert!(
        !env.networks()
            .iter()
            .any(|n| n.ends_with(&format!("-{task}"))),
        "no network of {task} may be left: {:?}",
        env.networks()
    );
}

/// Runs of one test that are still going. Dropping it (also when an assertion failed) ends each
/// gracefully: SIGTERM, then waits for agentbox's own teardown. Killing agentbox outright would
/// leave containers the engine was still creating after the drop guard looked for them.
struct Runs(Vec<Option<Spawned>>);

impl Runs {
    fn new(runs: impl IntoIterator<Item = Spawned>) -> Runs {
        Runs(runs.into_iter().map(Some).collect())
    }

    fn get(&mut self, index: usize) -> &mut Spawned {
        self.0[index].as_mut().expect("run not waited for yet")
    }

    /// Waits for run `index` to end.
    fn wait(&mut self, index: usize) -> Out {
        self.0[index].take().expect("run not waited for yet").wait()
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        let running: Vec<Spawned> = self
            .0
            .iter_mut()
            .filter_map(Option::take)
            .filter(|run| !run.is_finished())
            .collect();
        for run in &running {
            if let Some(pid) = rustix::process::Pid::from_raw(run.pid() as i32) {
                let _ = rustix::process::kill_process(pid, Signal::TERM);
            }
        }
        for run in running {
            // A run that does not end within the harness's timeout is killed there; never panic
            // while a failed test unwinds.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.wait()));
        }
    }
}

/// The SHA-256 of `text` in hex, as `sha256sum` prints it.
fn sha256_hex(text: &str) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let hex = String::from_utf8(out.stdout).unwrap();
    hex.split_whitespace().next().unwrap().to_owned()
}

/// Every path a commit reachable from any ref touched (`git log --all --name-only`).
fn paths_ever_committed(env: &TestEnv) -> BTreeSet<String> {
    lines(&env.git(["log", "--all", "--name-only", "--format="]))
        .into_iter()
        .collect()
}

// ---- ports ------------------------------------------------------------------------------------------

#[test]
fn server_in_task_is_reachable_from_host_at_allocated_port() {
    ensure_tools_image();
    let env = TestEnv::new("http");
    env.write_config(&format!(
        "image = \"{TOOLS_IMAGE}\"\nport_range = \"30100-30109\"\n[ports]\nweb = 8000\n"
    ));
    // Listens on $PORT, says `ready` once its own server answers inside the container, then runs
    // until stopped.
    let script = "mkdir -p /tmp/www && \
         printf '%s on %s (%s) at host port %s\\n' \"$AGENTBOX_TASK\" \"$PORT\" \"$AGENTBOX_PORT_WEB\" \"$AGENTBOX_HOST_PORT_WEB\" > /tmp/www/index.html && \
         busybox httpd -p \"$PORT\" -h /tmp/www || exit 3; \
         i=0; until busybox wget -qO /dev/null \"http://127.0.0.1:$PORT/index.html\"; do \
           i=$((i + 1)); [ \"$i\" -lt 400 ] || exit 4; busybox sleep 0.05; done; \
         echo ready; exec busybox sleep 300";
    let mut run = env.spawn(["run", "srv", "--", "sh", "-c", script]);
    run.wait_for_line("ready");

    let port = shown_host_port(&env, "srv", "web", 8000);
    assert!(
        (30100..=30109).contains(&port),
        "host port {port} must come from port_range 30100-30109"
    );
    assert_eq!(
        http_get(port, "/index.html"),
        format!("srv on 8000 (8000) at host port {port}\n"),
        "the host reaches the task's server; PORT, AGENTBOX_PORT_WEB and AGENTBOX_HOST_PORT_WEB \
         are set inside"
    );

    let task = env.ls_task("srv").expect("ls --json lists srv");
    assert_eq!(
        task["ports"],
        serde_json::json!({"web": {"container": 8000, "host": port, "url": format!("http://127.0.0.1:{port}")}}),
        "ports in ls --json"
    );
    let container = task["container_id"]
        .as_str()
        .expect("container_id")
        .to_owned();
    let published = std::process::Command::new("docker")
        .args(["port", &container])
        .output()
        .expect("docker port");
    assert_eq!(
        String::from_utf8_lossy(&published.stdout).trim(),
        format!("8000/tcp -> 127.0.0.1:{port}"),
        "published on 127.0.0.1 only"
    );
    assert_eq!(
        env.port_ledger().keys().copied().collect::<Vec<_>>(),
        [port],
        "the ledger holds the task's port while it runs"
    );

    env.output(["stop", "srv"]).expect_code(0);
    let out = run.wait();
    out.expect_code(143);
    out.expect_stderr_contains(&format!(
        "agentbox: port web (8000) is http://127.0.0.1:{port}\n"
    ));
    env.assert_torn_down("srv");
    assert!(
        env.port_ledger().is_empty(),
        "the port is released at teardown: {:?}",
        env.port_ledger()
    );
    let task = env.ls_task("srv").expect("ls --json lists srv");
    assert_eq!(
        task["ports"],
        serde_json::json!({"web": {"container": 8000, "host": port, "url": null}}),
        "a finished task's released port has no URL in ls --json"
    );
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
        "nothing listens on 127.0.0.1:{port} after the teardown"
    );
}

#[test]
fn concurrent_tasks_get_different_ports_released_after_teardown() {
    let env = TestEnv::new("two-ports");
    env.write_config("port_range = \"30110-30119\"\n[ports]\nweb = 8000\n");
    let script = format!(
        "echo \"$AGENTBOX_HOST_PORT_WEB\"; echo ready; {}",
        wait_for_release()
    );
    let mut runs =
        Runs::new(["one", "two"].map(|task| env.spawn(["run", task, "--", "sh", "-c", &script])));
    runs.get(0).wait_for_line("ready");
    runs.get(1).wait_for_line("ready");

    // Both hold their ports at the same time.
    let port_one = shown_host_port(&env, "one", "web", 8000);
    let port_two = shown_host_port(&env, "two", "web", 8000);
    assert_ne!(port_one, port_two, "two running tasks share a host port");
    let ledger = env.port_ledger();
    assert_eq!(
        ledger.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([port_one, port_two]),
        "the ledger holds both ports: {ledger:?}"
    );

    env.release("one");
    env.release("two");
    let out_one = runs.wait(0);
    let out_two = runs.wait(1);
    out_one.expect_code(0);
    out_two.expect_code(0);
    assert_eq!(
        out_one.stdout_lines()[0],
        port_one.to_string(),
        "AGENTBOX_HOST_PORT_WEB inside is the port agentbox shows\n{out_one}"
    );
    assert_eq!(out_two.stdout_lines()[0], port_two.to_string(), "{out_two}");
    assert!(
        env.port_ledger().is_empty(),
        "both ports released after teardown: {:?}",
        env.port_ledger()
    );
    env.assert_torn_down("one");
    env.assert_torn_down("two");

    // A re-run prefers the ports of the task's previous run.
    let again = env.output([
        "run",
        "two",
        "--",
        "sh",
        "-c",
        "echo \"$AGENTBOX_HOST_PORT_WEB\"",
    ]);
    again.expect_code(0);
    assert_eq!(
        again.stdout_lines(),
        [port_two.to_string()],
        "re-run of two gets its earlier port\n{again}"
    );
    assert!(env.port_ledger().is_empty());
}

#[test]
fn twenty_concurrent_allocations_are_unique() {
    const TASKS: usize = 20;
    let env = TestEnv::new("twenty");
    // Exactly enough ports for all of them.
    env.write_config("port_range = \"30200-30239\"\n[ports]\nweb = 80\napi = 81\n");
    let script = format!(
        "echo \"$AGENTBOX_HOST_PORT_WEB $AGENTBOX_HOST_PORT_API\"; echo ready; {}",
        wait_for_release()
    );
    let names: Vec<String> = (0..TASKS).map(|i| format!("p{i:02}")).collect();
    let mut runs = Runs::new(
        names
            .iter()
            .map(|name| env.spawn(["run", name.as_str(), "--", "sh", "-c", &script])),
    );
    for i in 0..TASKS {
        runs.get(i).wait_for_line("ready");
    }
    // All twenty hold their two ports at once.
    assert_eq!(
        env.port_ledger().len(),
        2 * TASKS,
        "the ledger holds 40 ports while all tasks run: {:?}",
        env.port_ledger()
    );

    for name in &names {
        env.release(name);
    }
    let mut ports = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let out = runs.wait(i);
        out.expect_code(0);
        let line = out.stdout_lines().into_iter().next().unwrap_or_default();
        let pair: Vec<u16> = line
            .split_whitespace()
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|_| panic!("{name}: ports {line:?}\n{out}"))
            })
            .collect();
        assert_eq!(pair.len(), 2, "{name}: web and api ports\n{out}");
        ports.extend(pair);
    }
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        2 * TASKS,
        "40 pairwise distinct host ports: {ports:?}"
    );
    assert!(
        distinct.iter().all(|p| (30200..=30239).contains(p)),
        "all from the range: {distinct:?}"
    );
    assert!(env.port_ledger().is_empty(), "{:?}", env.port_ledger());
    assert_eq!(env.containers(), Vec::<String>::new());
}

#[test]
fn exhausted_port_range_fails_with_125_and_leaves_nothing() {
    let env = TestEnv::new("exhausted");
    env.write_config("port_range = \"30120-30120\"\n[ports]\nweb = 80\n");
    let mut hold = Runs::new([env.spawn([
        "run",
        "hold",
        "--",
        "sh",
        "-c",
        &format!("echo ready; {}", wait_for_release()),
    ])]);
    hold.get(0).wait_for_line("ready");

    let out = env.output(["run", "starved", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("30120-30120");
    assert_no_trace_of(&env, "starved");
    assert_eq!(
        env.port_ledger().keys().copied().collect::<Vec<_>>(),
        [30120],
        "only the first task's port is reserved"
    );
    assert_eq!(
        env.ls_task("hold").expect("hold still listed")["state"],
        "running",
        "the first task is unaffected"
    );

    env.release("hold");
    hold.wait(0).expect_code(0);
    env.assert_torn_down("hold");
    assert!(env.port_ledger().is_empty());
}

// ---- env file and secrets ---------------------------------------------------------------------------

fn env_file_is_private_and_never_committed(env: &TestEnv) {
    env.write_config("[env]\nGREETING = \"hello ${task} on ${branch}\"\nPRICE = \"$$5\"\n");
    let exclude = env.common_dir().join("info/exclude");
    let exclude_before = fs::read(&exclude).ok();
    let script = "stat -c %a .env.agentbox; \
         grep -e '^GREETING=' -e '^PRICE=' .env.agentbox; \
         echo \"$GREETING\"; \
         echo one > committed.txt && git add -A && git commit -q -m 'task commit' || exit 9; \
         git status --porcelain --ignored -- .env.agentbox; \
         gd=$(git rev-parse --absolute-git-dir); echo \"$gd\"; \
         grep -x /.env.agentbox \"$gd/info/exclude\"; \
         echo wip > wip.txt";
    let out = env.output(["run", "envf", "--", "sh", "-c", script]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [
            "600",
            "GREETING=hello envf on agentbox/envf",
            "PRICE=$5",
            "hello envf on agentbox/envf",
            "!! .env.agentbox",
            env.task_git_dir("envf").to_str().unwrap(),
            "/.env.agentbox",
        ],
        "the env file is in the worktree, mode 600, with the [env] values, and ignored by git \
         through the task's own git dir's info/exclude\n{out}"
    );

    let branch = "agentbox/envf";
    let new_commits = lines(&env.git(["rev-list", &format!("{}..{branch}", env.head())]));
    assert_eq!(
        new_commits.len(),
        2,
        "the task's commit and the snapshot\n{out}"
    );
    assert_eq!(env.changed_files(&new_commits[1]), ["committed.txt"]);
    env.assert_snapshot_holds("envf", "wip.txt", "wip\n");
    assert_eq!(env.changed_files(&new_commits[0]), ["wip.txt"]);
    assert!(
        !paths_ever_committed(env).contains(".env.agentbox"),
        "no commit ever holds the env file: {:?}",
        paths_ever_committed(env)
    );
    assert_eq!(env.file_at(branch, ".env.agentbox"), None);
    assert_eq!(
        fs::read(&exclude).ok(),
        exclude_before,
        "the repository's own info/exclude is left alone"
    );
    env.assert_torn_down("envf");
}

#[test]
fn env_file_is_private_and_never_committed_in_clone() {
    let env = TestEnv::new("envfile-clone");
    env_file_is_private_and_never_committed(&env);
}

#[test]
fn env_file_is_private_and_never_committed_in_bare_repo() {
    let env = TestEnv::new_bare("envfile-bare");
    env_file_is_private_and_never_committed(&env);
}

#[test]
fn secrets_reach_the_container_but_never_agentbox_records() {
    const TOKEN: &str = "tok-5ecret-from-host-env";
    const API_KEY: &str = "key-5ecret-from-env-file";
    const PASSED: &str = "pass-5ecret-from-bare-flag";
    let secrets = [TOKEN, API_KEY, PASSED];

    let env = TestEnv::new("secrets");
    env.write_config(
        "[env]\nTOKEN = \"${env:HOST_TOKEN}\"\nPLAIN = \"visible\"\nLAYER = \"from-config\"\n\
         FILE_WINS = \"from-config\"\n",
    );
    let env_file = env.root.join("secrets.env");
    fs::write(
        &env_file,
        format!("# secrets\nAPI_KEY={API_KEY}\nLAYER=from-file\nFILE_WINS=from-file\n"),
    )
    .unwrap();
    // The task compares the values it sees with their SHA-256 hashes: the values themselves must not
    // be on its command line (which agentbox records).
    let script = format!(
        "for k in TOKEN API_KEY PASSED; do \
           eval v=\\$$k; \
           case $k in TOKEN) e={token};; API_KEY) e={api_key};; PASSED) e={passed};; esac; \
           h=$(printf %s \"$v\" | sha256sum | cut -d' ' -f1); \
           if [ \"$h\" = \"$e\" ]; then echo $k=ok; else echo $k=wrong; fi; \
           if grep -qxF \"$k=$v\" .env.agentbox; then echo $k=in-file; else echo $k=not-in-file; fi; \
         done; \
         echo \"PLAIN=$PLAIN LAYER=$LAYER FILE_WINS=$FILE_WINS\"; \
         echo ready; {wait}",
        token = sha256_hex(TOKEN),
        api_key = sha256_hex(API_KEY),
        passed = sha256_hex(PASSED),
        wait = wait_for_release(),
    );
    let mut cmd = env.agentbox([
        "run".as_ref(),
        "sec".as_ref(),
        "--env-file".as_ref(),
        env_file.as_os_str(),
        "--env".as_ref(),
        "PASSED".as_ref(),
        "--env".as_ref(),
        "LAYER=from-flag".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        script.as_ref(),
    ]);
    cmd.env("HOST_TOKEN", TOKEN).env("PASSED", PASSED);
    let mut run = Spawned::start(cmd);
    run.wait_for_line("ready");

    // While it runs: `agentbox env` and `ls --json` show no secret.
    let shown = env.output(["env", "sec"]);
    shown.expect_code(0);
    for line in [
        "TOKEN=********",
        "API_KEY=********",
        "PASSED=********",
        "FILE_WINS=********",
        "PLAIN=visible",
        "LAYER=from-flag",
        "AGENTBOX_TASK=sec",
    ] {
        assert!(
            shown.stdout_lines().iter().any(|l| l == line),
            "agentbox env sec must show {line:?}\n{shown}"
        );
    }
    let listed = env.output(["ls", "--json"]);
    listed.expect_code(0);
    for secret in secrets {
        assert!(
            !shown.stdout.contains(secret),
            "env shows {secret}\n{shown}"
        );
        assert!(
            !listed.stdout.contains(secret),
            "ls --json shows {secret}\n{listed}"
        );
    }

    env.release("sec");
    let out = run.wait();
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        [
            "TOKEN=ok",
            "TOKEN=in-file",
            "API_KEY=ok",
            "API_KEY=in-file",
            "PASSED=ok",
            "PASSED=in-file",
            "PLAIN=visible LAYER=from-flag FILE_WINS=from-file",
            "ready",
        ],
        "the container sees every value; precedence [env] < --env-file < --env\n{out}"
    );
    let files = env.state_files();
    let log_dir = env.task_log_dir("sec");
    assert!(
        files.iter().any(|p| p.starts_with(&log_dir)),
        "the task's log is under the state dir: {files:?}"
    );
    for file in &files {
        let text = String::from_utf8_lossy(&fs::read(file).unwrap()).into_owned();
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{} holds the secret {secret}:\n{text}",
                file.display()
            );
        }
    }
    let shown = env.output(["env", "sec"]);
    shown.expect_code(0);
    assert!(
        shown.stdout_lines().iter().any(|l| l == "TOKEN=********"),
        "after the run, too\n{shown}"
    );
    for secret in secrets {
        assert!(!shown.stdout.contains(secret), "{shown}");
        assert!(!out.stderr.contains(secret), "{out}");
    }
    env.assert_torn_down("sec");
}

#[test]
fn malformed_env_file_line_fails_with_file_and_line() {
    let env = TestEnv::new("bad-env-file");
    let env_file = env.root.join("bad.env");
    fs::write(&env_file, "# fine\nA=1\nBAD KEY=2\n").unwrap();
    let out = env.output([
        "run".as_ref(),
        "badenv".as_ref(),
        "--env-file".as_ref(),
        env_file.as_os_str(),
        "--".as_ref(),
        "true".as_ref(),
    ]);
    out.expect_code(125);
    out.expect_stderr_contains(&format!("{}:3:", env_file.display()));
    env.assert_nothing_left("badenv");
}

// ---- services ---------------------------------------------------------------------------------------

#[test]
fn sidecar_service_is_reachable_by_name_and_removed_with_its_network() {
    ensure_tools_image();
    let env = TestEnv::new("sidecar");
    env.write_config(&format!(
        "image = \"{TOOLS_IMAGE}\"\n\
         [services.db]\n\
         image = \"{TOOLS_IMAGE}\"\n\
         command = [\"sh\", \"-c\", \"echo db-ok > /tmp/i.html; exec busybox httpd -f -p 80 -h /tmp\"]\n"
    ));
    let script = format!(
        "i=0; until answer=$(busybox wget -qO- http://db/i.html 2>/dev/null); do \
           i=$((i + 1)); [ \"$i\" -lt 400 ] || {{ echo db-unreachable; exit 4; }}; busybox sleep 0.05; done; \
         echo \"$answer\"; echo ready; {}",
        wait_for_release()
    );
    let mut run = env.spawn(["run", "side", "--", "sh", "-c", &script]);
    run.wait_for_line("ready");

    let repo_id = env.repo_id();
    let service = docker_lines_of(&[
        "ps",
        "--filter",
        &format!("label={TEST_LABEL}={}", env.id),
        "--filter",
        "label=agentbox.service=db",
        "--filter",
        "label=agentbox.task=side",
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(
        service,
        [format!("agentbox-{repo_id}-side-db")],
        "one running service container, named and labelled"
    );
    assert_eq!(
        env.networks(),
        [format!("agentbox-{repo_id}-side")],
        "the task's network, labelled like its containers"
    );

    env.release("side");
    let out = run.wait();
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["db-ok", "ready"],
        "the task reaches the service as `db`\n{out}"
    );
    env.assert_torn_down("side");
    assert_eq!(
        docker_lines_of(&[
            "ps",
            "-a",
            "--filter",
            &format!("label={TEST_LABEL}={}", env.id),
            "--format",
            "{{.Names}}",
        ]),
        Vec::<String>::new(),
        "service container removed"
    );
    assert_eq!(env.networks(), Vec::<String>::new(), "network removed");
    let network = format!("agentbox-{repo_id}-side");
    assert!(
        !docker_lines_of(&["network", "ls", "--format", "{{.Name}}"]).contains(&network),
        "no network named {network} exists"
    );
}

fn docker_lines_of(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&String::from_utf8_lossy(&out.stdout))
}

// ---- copy -------------------------------------------------------------------------------------------

#[test]
fn copy_brings_local_files_and_snapshot_leaves_them_out() {
    let env = TestEnv::new("copy");
    env.write_config("copy = [\".env\", \"config/local.yml\"]\n");
    fs::write(env.repo.join(".gitignore"), "ignored.txt\n*.log\n.env\n").unwrap();
    env.git(["commit", "-q", "-am", "ignore .env"]);
    // An ignored file and an untracked (not ignored) one in the source checkout.
    fs::write(env.repo.join(".env"), "DB=local\n").unwrap();
    fs::create_dir(env.repo.join("config")).unwrap();
    fs::write(env.repo.join("config/local.yml"), "mode: local\n").unwrap();

    let out = env.output([
        "run",
        "cp",
        "--",
        "sh",
        "-c",
        "cat .env config/local.yml && echo wip > wip.txt",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["DB=local", "mode: local"],
        "the copies are in the worktree\n{out}"
    );
    env.assert_snapshot_holds("cp", "wip.txt", "wip\n");
    let tip = env.rev("agentbox/cp").unwrap();
    assert_eq!(
        env.changed_files(&tip),
        ["wip.txt"],
        "the snapshot leaves the copied files out"
    );
    let committed = paths_ever_committed(&env);
    assert!(
        !committed.contains(".env") && !committed.contains("config/local.yml"),
        "no commit holds a copied file: {committed:?}"
    );
    assert_eq!(
        fs::read_to_string(env.repo.join(".env")).unwrap(),
        "DB=local\n",
        "the source stays"
    );
    env.assert_torn_down("cp");
}

#[test]
fn copy_from_outside_the_repository_is_a_config_error() {
    let env = TestEnv::new("copy-escape");
    fs::write(env.root.join("x"), "outside\n").unwrap();
    env.write_config("copy = [\"../x\"]\n");
    let out = env.output(["run", "esc", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("agentbox.toml");
    out.expect_stderr_contains("copy");
    out.expect_stderr_contains("../x");
    env.assert_nothing_left("esc");
}

#[test]
fn copy_of_missing_file_fails_and_rolls_back_everything() {
    ensure_tools_image();
    let env = TestEnv::new("copy-missing");
    // Ports and a service too, so that the rollback has a reservation, a network and a container to
    // undo.
    env.write_config(&format!(
        "copy = [\"missing.env\"]\nport_range = \"30130-30139\"\n[ports]\nweb = 80\n\
         [services.db]\nimage = \"{TOOLS_IMAGE}\"\ncommand = \"exec busybox sleep 300\"\n"
    ));
    let out = env.output(["run", "miss", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("missing.env");
    env.assert_nothing_left("miss");
    assert_eq!(env.networks(), Vec::<String>::new(), "no network left");
    assert!(
        env.port_ledger().is_empty(),
        "ports released: {:?}",
        env.port_ledger()
    );
}

// ---- setup ------------------------------------------------------------------------------------------

#[test]
fn setup_steps_run_in_order_before_the_command() {
    let env = TestEnv::new("setup");
    env.write_config(
        "setup = [\"echo step-one\", \"echo step-two >&2\", \"echo made-by-setup > /tmp/setup.txt\"]\n",
    );
    let out = env.output([
        "run",
        "set",
        "--",
        "sh",
        "-c",
        "cat /tmp/setup.txt; echo command-ran",
    ]);
    out.expect_code(0);
    assert_eq!(
        out.stdout_lines(),
        ["step-one", "made-by-setup", "command-ran"],
        "setup output first, then the command, which sees what setup made\n{out}"
    );
    let expected_stderr = [
        "agentbox: setup: echo step-one",
        "agentbox: setup: echo step-two >&2",
        "step-two",
        "agentbox: setup: echo made-by-setup > /tmp/setup.txt",
    ];
    let positions: Vec<usize> = expected_stderr
        .iter()
        .map(|needle| {
            out.stderr
                .lines()
                .position(|l| l == *needle)
                .unwrap_or_else(|| panic!("stderr must have the line {needle:?}\n{out}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "setup steps announced in order\n{out}"
    );

    let logs = env.output(["logs", "set"]);
    logs.expect_code(0);
    for line in ["step-one", "step-two", "made-by-setup", "command-ran"] {
        assert!(
            logs.stdout.lines().any(|l| l == line),
            "agentbox logs has {line:?}\n{logs}"
        );
    }
    env.assert_torn_down("set");
}

#[test]
fn failing_setup_step_ends_task_with_its_code() {
    let env = TestEnv::new("setup-fail");
    env.write_config("setup = [\"echo first-step\", \"exit 7\", \"echo third-step\"]\n");
    let out = env.output(["run", "sfail", "--", "sh", "-c", "echo command-ran"]);
    out.expect_code(7);
    assert_eq!(
        out.stdout_lines(),
        ["first-step"],
        "neither the later step nor the command runs\n{out}"
    );
    out.expect_stderr_contains("agentbox: setup step 2 failed with exit code 7: exit 7");
    out.expect_stderr_contains("agentbox: task sfail exited 7");
    env.assert_torn_down("sfail");
    assert_eq!(
        env.ls_task("sfail").expect("record kept")["exit_code"],
        7,
        "the task's exit code is the step's"
    );
}

// ---- agentbox.toml ----------------------------------------------------------------------------------

#[test]
fn unknown_config_key_fails_naming_key_and_file() {
    let env = TestEnv::new("unknown-key");
    env.write_config("imagee = \"agentbox/base:bookworm\"\n");
    let out = env.output(["run", "uk", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("imagee");
    out.expect_stderr_contains("agentbox.toml");
    env.assert_nothing_left("uk");
}

#[test]
fn image_flag_overrides_config_image() {
    ensure_tools_image();
    let env = TestEnv::new("image-override");
    env.write_config(&format!("image = \"{TOOLS_IMAGE}\"\n"));
    let probe = "command -v busybox || echo no-busybox";

    let from_file = env.output(["run", "file", "--", "sh", "-c", probe]);
    from_file.expect_code(0);
    assert_eq!(
        from_file.stdout_lines(),
        ["/usr/local/bin/busybox"],
        "the config's image is used\n{from_file}"
    );
    assert_eq!(env.ls_task("file").unwrap()["image"], TOOLS_IMAGE);

    let from_flag = env.output(["run", "flag", "--image", IMAGE, "--", "sh", "-c", probe]);
    from_flag.expect_code(0);
    assert_eq!(
        from_flag.stdout_lines(),
        ["no-busybox"],
        "--image wins over the config's image\n{from_flag}"
    );
    assert_eq!(env.ls_task("flag").unwrap()["image"], IMAGE);
    env.assert_torn_down("file");
    env.assert_torn_down("flag");
}
