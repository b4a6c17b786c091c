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
    devbox_request(env)
        .start()
        .expect("start the container agentbox runs in")
}

fn devbox_request(env: &TestEnv) -> testcontainers::ContainerRequest<GenericImage> {
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
}

/// Where [`devbox_with_state`] has its state volume.
const VOLUME_STATE: &str = "/var/lib/agentbox-state";

/// [`devbox`] with the volume `volume` at [`VOLUME_STATE`].
fn devbox_with_state(env: &TestEnv, volume: &str) -> Container<GenericImage> {
    devbox_request(env)
        .with_mount(Mount::volume_mount(volume, VOLUME_STATE))
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

    // The state in a volume, as devcontainer/devcontainer.json has it: the engine has the volume's
    // directory on the host too.
    let volume = format!("agentbox-test-state-{}", env.id);
    common::docker_lines(&["volume", "create", "--label", &label, &volume]);
    let in_volume = devbox_with_state(&env, &volume);
    let (code, output) = sh_inside(
        &env,
        &in_volume,
        &format!(
            "XDG_STATE_HOME={VOLUME_STATE} agentbox run --label {label} v -- sh -c \"echo three > c\""
        ),
    );
    assert_eq!(code, 0, "{output}");
    assert_eq!(env.file_at("agentbox/v", "c").as_deref(), Some("three\n"));
    let (code, output) = sh_inside(
        &env,
        &in_volume,
        &format!("XDG_STATE_HOME={VOLUME_STATE} agentbox ls --json"),
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains(r#""name":"v","state":"exited""#),
        "the record is in the volume: {output}"
    );
    assert!(
        !env.task_records().iter().any(|r| r.ends_with("v.json")),
        "and not in the mounted state: {:?}",
        env.task_records()
    );
    // The task's stopped container goes with a purge that may still be running in there.
    let outer = [devbox.id().to_owned(), in_volume.id().to_owned()];
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let task_containers = || {
        let mut left = env.containers();
        left.retain(|id| !outer.contains(id));
        left
    };
    while !task_containers().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(task_containers(), Vec::<String>::new());
    drop(in_volume);

    // doctor says how paths reach the engine.
    let (code, output) = sh_inside(&env, &devbox, "agentbox doctor");
    assert!(
        output.contains(&format!("{INSIDE} from {}", env.root.display())),
        "{output}"
    );
    assert_eq!(code, 0, "{output}");
}
