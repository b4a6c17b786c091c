//! agentbox inside a container of the engine it drives (a devcontainer with the host's socket), with
//! the repository mounted at another path than the host's: the engine must get host paths for every
//! bind mount, and a path that is on no mount from the host is refused before anything is made.

mod common;

use std::path::Path;

use common::{IMAGE, TEST_LABEL, TestEnv};
use testcontainers::core::{ExecCommand, Mount, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

/// Where the container has the test's temporary directory (the host has it under /tmp).
const INSIDE: &str = "/srv/elsewhere";

/// A container of the default image with agentbox, the engine's socket and the test's directory
/// (repository, state, home) mounted at [`INSIDE`], idle until the test execs into it.
fn devbox(env: &TestEnv) -> Container<GenericImage> {
    let (name, tag) = IMAGE.split_once(':').unwrap();
    GenericImage::new(name, tag)
        .with_wait_for(WaitFor::Nothing)
        .with_cmd(["sleep", "infinity"])
        .with_label(TEST_LABEL, &env.id)
        .with_mount(Mount::bind_mount(
            env!("CARGO_BIN_EXE_agentbox"),
            "/usr/local/bin/agentbox",
        ))
        .with_mount(Mount::bind_mount(
            "/var/run/docker.sock",
            "/var/run/docker.sock",
        ))
        .with_mount(Mount::bind_mount(env.root.display().to_string(), INSIDE))
        .start()
        .expect("start the container agentbox runs in")
}

/// Runs `script` with sh in the container, in the repository, with the test's hermetic
/// environment translated to the container's paths; returns exit code, stdout and stderr.
fn sh_inside(env: &TestEnv, devbox: &Container<GenericImage>, script: &str) -> (i64, String) {
    let inside = |path: &Path| {
        let rest = path
            .strip_prefix(&env.root)
            .expect("a path of the test dir");
        format!("{INSIDE}/{}", rest.display())
    };
    let command = format!(
        "cd {} && exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME={} XDG_STATE_HOME={} \
         GIT_CONFIG_GLOBAL={} GIT_CONFIG_NOSYSTEM=1 sh -c '{script}' 2>&1",
        inside(&env.repo),
        inside(&env.home),
        inside(&env.state_home),
        inside(&env.gitconfig),
    );
    let mut exec = devbox
        .exec(ExecCommand::new(["sh", "-c", &command]))
        .expect("exec in the container");
    let output = String::from_utf8_lossy(&exec.stdout_to_vec().unwrap()).into_owned();
    let code = exec
        .exit_code()
        .unwrap()
        .expect("the exec has ended once its output did");
    (code, output)
}

#[test]
fn a_task_run_from_inside_a_container_lands_its_commit_and_snapshot_on_the_hosts_branch() {
    let env = TestEnv::new("inside");
    let devbox = devbox(&env);
    let label = format!("{TEST_LABEL}={}", env.id);
    let task = "echo one > a && git add a && git commit -qm made-inside && echo two > b";
    let (code, output) = sh_inside(
        &env,
        &devbox,
        &format!("agentbox run --label {label} t -- sh -c \"{task}\""),
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        env.subjects("main..agentbox/t"),
        [
            "agentbox: snapshot of uncommitted work in task t",
            "made-inside"
        ],
        "{output}"
    );
    assert_eq!(env.file_at("agentbox/t", "a").as_deref(), Some("one\n"));
    assert_eq!(env.file_at("agentbox/t", "b").as_deref(), Some("two\n"));
    assert!(!env.worktree_path("t").exists());
    assert_eq!(env.containers(), vec![devbox.id().to_owned()]);

    // A state dir on the container's own filesystem is nowhere on the host: refused, nothing made.
    let (code, output) = sh_inside(
        &env,
        &devbox,
        &format!("XDG_STATE_HOME=/var/tmp/state agentbox run --label {label} u -- true"),
    );
    assert_eq!(code, 125, "{output}");
    assert!(
        output.contains("/var/tmp/state") && output.contains("not on a mount from the host"),
        "{output}"
    );
    assert!(!env.branch_exists("agentbox/u"));
    assert!(!env.worktree_path("u").exists());
    assert_eq!(env.containers(), vec![devbox.id().to_owned()]);

    // doctor says how paths reach the engine.
    let (code, output) = sh_inside(&env, &devbox, "agentbox doctor");
    assert!(
        output.contains(&format!("{INSIDE} from {}", env.root.display())),
        "{output}"
    );
    assert_eq!(code, 0, "{output}");
}
