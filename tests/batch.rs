//! `agentbox batch`: many tasks at once, their output multiplexed, the exit-code rule, the JSON
//! event stream (pinned by a snapshot), artifacts, bad task files and Ctrl-C.

mod common;

use std::collections::BTreeMap;
use std::fs;

use common::{TestEnv, lines};
use rustix::process::Signal;
use serde_json::Value;

fn write_tasks(env: &TestEnv, text: &str) -> std::path::PathBuf {
    let path = env.root.join("tasks.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn mixed_batch_reports_each_task_and_exits_with_the_first_failure_in_file_order() {
    let env = TestEnv::new("batch_mixed");
    let tasks = write_tasks(
        &env,
        r#"
[[task]]
name = "pass"
command = "echo passing; echo work > pass.txt"

[[task]]
name = "fail3"
command = ["sh", "-c", "echo failing >&2; exit 3"]

[[task]]
name = "fail4"
command = "echo $LEVEL; exit 4"
env = { LEVEL = "level-two" }
"#,
    );
    let artifacts = env.root.join("artifacts");
    let out = env.output([
        "batch".as_ref(),
        tasks.as_os_str(),
        "--parallel".as_ref(),
        "3".as_ref(),
        "--artifacts".as_ref(),
        artifacts.as_os_str(),
    ]);
    out.expect_code(3);
    let stdout = lines(&out.stdout);
    assert!(stdout.contains(&"pass  | passing".to_owned()), "{out}");
    assert!(stdout.contains(&"fail4 | level-two".to_owned()), "{out}");
    assert!(out.stderr.contains("fail3 | failing\n"), "{out}");

    // The summary table names every task with its exit code and branch, in file order.
    let table: Vec<&String> = stdout
        .iter()
        .skip_while(|l| !l.starts_with("TASK"))
        .collect();
    assert_eq!(table.len(), 4, "header and one row per task: {out}");
    // A task that changed nothing leaves no branch: `-`.
    for (row, (task, code, branch)) in table[1..].iter().zip([
        ("pass", "0", "agentbox/pass"),
        ("fail3", "3", "-"),
        ("fail4", "4", "-"),
    ]) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], task, "{row}");
        assert_eq!(cells[1], code, "{row}");
        assert_eq!(cells[5], branch, "{row}");
    }

    env.assert_snapshot_holds("pass", "pass.txt", "work\n");
    assert_eq!(env.task_branches(), ["agentbox/pass"], "{out}");
    for task in ["pass", "fail3", "fail4"] {
        env.assert_torn_down(task);
        let dir = artifacts.join(task);
        let result: Value =
            serde_json::from_slice(&fs::read(dir.join("result.json")).unwrap()).unwrap();
        assert_eq!(result["task"], task);
        assert!(dir.join("log.txt").is_file());
        assert!(dir.join("changes.patch").is_file());
    }
    assert_eq!(
        fs::read_to_string(artifacts.join("fail4/log.txt")).unwrap(),
        "level-two\n"
    );
    let patch = fs::read_to_string(artifacts.join("pass/changes.patch")).unwrap();
    assert!(
        patch.contains("+++ b/pass.txt") && patch.contains("+work"),
        "{patch}"
    );
    assert_eq!(
        fs::read_to_string(artifacts.join("fail3/changes.patch")).unwrap(),
        ""
    );
    let summary: Value =
        serde_json::from_slice(&fs::read(artifacts.join("summary.json")).unwrap()).unwrap();
    let codes: Vec<i64> = summary
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [0, 3, 4]);
}

/// Replaces what changes from run to run (times, ids, paths, durations) so the event stream can be
/// compared with the pinned snapshot; orders events by task (keeping each task's own order) because
/// tasks run concurrently.
fn normalised_events(env: &TestEnv, stdout: &str) -> String {
    let root = env.root.display().to_string();
    let mut by_task: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut summary = None;
    for line in stdout.lines() {
        let mut event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let time = event["time"].as_str().expect("every event has a time");
        assert!(
            humantime::parse_rfc3339(time).is_ok(),
            "time {time:?} must be RFC 3339"
        );
        event["time"] = "<time>".into();
        scrub(&mut event, &root);
        match event["event"].as_str() {
            Some("summary") => summary = Some(event),
            _ => {
                let task = event["task"]
                    .as_str()
                    .expect("task events name their task")
                    .to_owned();
                by_task.entry(task).or_default().push(event);
            }
        }
    }
    let mut out: Vec<String> = by_task
        .into_values()
        .flatten()
        .map(|e| serde_json::to_string(&e).unwrap())
        .collect();
    out.push(serde_json::to_string(&summary.expect("the last event is the summary")).unwrap());
    out.join("\n")
}

fn scrub(value: &mut Value, root: &str) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "container_id" | "snapshot_commit" if v.is_string() => *v = "<id>".into(),
                    "duration_ms" => *v = 0.into(),
                    _ => scrub(v, root),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, root)),
        Value::String(s) if s.contains(root) => *s = s.replace(root, "<tmp>"),
        _ => {}
    }
}

#[test]
fn json_events_follow_the_pinned_schema() {
    let env = TestEnv::new("batch_json");
    let tasks = write_tasks(
        &env,
        r#"
[[task]]
name = "alpha"
command = "echo one; printf 'no newline'; echo change > a.txt"

[[task]]
name = "beta"
command = "echo oops >&2; exit 2"
"#,
    );
    let out = env.output([
        "batch".as_ref(),
        tasks.as_os_str(),
        "--json".as_ref(),
        "--log-lines".as_ref(),
    ]);
    out.expect_code(2);
    let last: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "summary", "the summary comes last");
    insta::assert_snapshot!("batch_json_events", normalised_events(&env, &out.stdout));

    // Without --log-lines there are no log events, and everything else is still there.
    let quiet = env.output(["batch".as_ref(), tasks.as_os_str(), "--json".as_ref()]);
    quiet.expect_code(2);
    let kinds: Vec<String> = quiet
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(!kinds.contains(&"log".to_owned()), "{kinds:?}");
    for kind in ["created", "started", "exited", "torn_down", "summary"] {
        assert!(
            kinds.contains(&kind.to_owned()),
            "{kind} missing: {kinds:?}"
        );
    }
}

#[test]
fn multiplexed_output_never_splits_a_line() {
    let env = TestEnv::new("batch_lines");
    // Each line is written in three pieces, so a multiplexer that forwarded chunks as they come
    // would mix the two tasks' pieces.
    let script = "i=0; while [ $i -lt 300 ]; do printf \"$AGENTBOX_TASK-$i\"; printf -- '-middle'; printf -- '-end\\n'; i=$((i+1)); done";
    let tasks = write_tasks(
        &env,
        &format!(
            "[[task]]\nname = \"left\"\ncommand = '''{script}'''\n\n[[task]]\nname = \"right\"\ncommand = '''{script}'''\n"
        ),
    );
    let out = env.output([
        "batch".as_ref(),
        tasks.as_os_str(),
        "-p".as_ref(),
        "2".as_ref(),
    ]);
    out.expect_code(0);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in out.stdout.lines().take_while(|l| !l.starts_with("TASK")) {
        let (prefix, text) = line
            .split_once(" | ")
            .unwrap_or_else(|| panic!("unprefixed line {line:?}"));
        let task = prefix.trim_end();
        let n = seen.entry(task).or_default();
        assert_eq!(text, format!("{task}-{n}-middle-end"), "line {line:?}");
        *n += 1;
    }
    assert_eq!(seen, BTreeMap::from([("left", 300), ("right", 300)]));
}

#[test]
fn bad_task_files_are_refused_before_anything_starts() {
    let env = TestEnv::new("batch_bad");
    let cases = [
        (
            "[[task]]\nname = \"ok\"\n[[task]]\nname = \"x\"\ncomand = \"true\"\n",
            "task 2 (\"x\"): unknown field `comand`",
        ),
        (
            "[[task]]\nname = \"ok\"\n[[task]]\nname = \"ok\"\n",
            "task 2 (\"ok\"): the name is already used by task 1",
        ),
        (
            "[[task]]\nname = \"ok\"\n[[task]]\nname = \"../x\"\n",
            "task 2 (\"../x\"): task name",
        ),
    ];
    for (text, message) in cases {
        let tasks = write_tasks(&env, text);
        let out = env.output(["batch".as_ref(), tasks.as_os_str()]);
        out.expect_code(125);
        out.expect_stderr_contains(&format!("{}: {message}", tasks.display()));
        env.assert_nothing_left("ok");
    }
}

#[test]
fn ctrl_c_stops_every_task_keeps_their_work_and_skips_waiting_ones() {
    let env = TestEnv::new("batch_sigint");
    let long = "echo wip-$AGENTBOX_TASK > wip.txt; echo ready; exec sleep 300";
    let tasks = write_tasks(
        &env,
        &format!(
            "[[task]]\nname = \"one\"\ncommand = '{long}'\n\n[[task]]\nname = \"two\"\ncommand = '{long}'\n\n[[task]]\nname = \"wai\"\ncommand = 'echo never'\n"
        ),
    );
    let mut batch = env.spawn([
        "batch".as_ref(),
        tasks.as_os_str(),
        "-p".as_ref(),
        "2".as_ref(),
        "--json".as_ref(),
        "--log-lines".as_ref(),
    ]);
    let mut ready = 0;
    while ready < 2 {
        let line = batch.next_line();
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["event"] == "log" && event["line"] == "ready" {
            ready += 1;
        }
    }
    batch.signal(Signal::INT);
    let out = batch.wait();
    out.expect_code(130);
    let summary: Value = serde_json::from_str(out.stdout.lines().last().unwrap()).unwrap();
    let results = summary["tasks"].as_array().unwrap();
    assert_eq!(results[2]["task"], "wai");
    assert_eq!(results[2]["started"], false, "{summary}");
    assert_eq!(
        results[2]["branch"],
        Value::Null,
        "it never got a branch: {summary}"
    );
    for task in ["one", "two"] {
        env.assert_torn_down(task);
        env.assert_snapshot_holds(task, "wip.txt", &format!("wip-{task}\n"));
    }
    assert!(
        !env.branch_exists("agentbox/wai"),
        "a task that never started leaves no branch"
    );
}
