//! The repository's devcontainer.json as a task's environment, on the real engine: the image form,
//! the Dockerfile form (built once for several tasks), what a task cannot change about the next
//! task's environment, and bad files.

mod common;

use std::fs;

use common::{IMAGE, TOOLS_IMAGE, TestEnv};

/// Writes `files` into the repository and commits them.
fn commit_files(env: &TestEnv, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = env.repo.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    env.git(["add", "-A"]);
    env.git(["commit", "-q", "-m", "devcontainer"]);
}

#[test]
fn the_image_form_gives_the_task_its_folder_environment_ports_and_lifecycle_with_git_working() {
    let env = TestEnv::new("dc-image");
    let json = format!(
        r#"// the official templates mount the folder above the workspace
{{
  "name": "app",
  "image": "{IMAGE}",
  "workspaceMount": "source=${{localWorkspaceFolder}}/..,target=/workspaces,type=bind",
  "workspaceFolder": "/workspaces/${{localWorkspaceFolderBasename}}",
  "containerEnv": {{ "GREETING": "hello ${{containerWorkspaceFolder}}" }},
  "remoteEnv": {{ "PATH": "${{containerEnv:PATH}}:/opt/extra" }},
  "forwardPorts": [3000],
  "onCreateCommand": "echo on-create > /tmp/order",
  "postCreateCommand": {{ "one": "echo post-create >> /tmp/order", "two": ["true"] }},
  "postStartCommand": ["sh", "-c", "echo post-start >> /tmp/order"],
}}
"#
    );
    commit_files(&env, &[(".devcontainer/devcontainer.json", &json)]);
    let script = "pwd; echo \"$GREETING\"; echo \"$PATH\"; echo \"port=$AGENTBOX_PORT_PORT_3000\"; cat /tmp/order; \
                  ls /workspaces; echo work > made.txt; git add made.txt; git commit -q -m 'from the task'; \
                  git log --format=%s -1; echo left > left.txt";
    let out = env.output(["run", "dc1", "--", "sh", "-c", script]);
    out.expect_code(0);
    let lines = out.stdout_lines();
    assert_eq!(
        lines[0], "/workspaces/dc1",
        "the command starts in workspaceFolder\n{out}"
    );
    assert_eq!(lines[1], "hello /workspaces/dc1");
    assert!(
        lines[2].ends_with(":/opt/extra") && lines[2].contains("/usr/bin"),
        "{out}"
    );
    assert_eq!(lines[3], "port=3000");
    assert_eq!(
        &lines[4..7],
        ["on-create", "post-create", "post-start"],
        "{out}"
    );
    // Only this task's worktree is at /workspaces, not what is beside it.
    assert_eq!(lines[7], "dc1", "{out}");
    assert_eq!(
        lines[8], "from the task",
        "git works in workspaceFolder\n{out}"
    );
    out.expect_stderr_contains("only this task's worktree is mounted");
    assert_eq!(
        env.subjects("main..agentbox/dc1")[1..],
        ["from the task".to_owned()]
    );
    env.assert_snapshot_holds("dc1", "left.txt", "left\n");
    env.assert_torn_down("dc1");
}

#[test]
fn the_dockerfile_form_is_built_once_for_three_tasks_from_the_base_commits_files() {
    let env = TestEnv::new("dc-build");
    let dockerfile = format!(
        "FROM {IMAGE}\nARG GREETING=unset\nRUN echo \"$GREETING\" > /greeting\nCOPY . /context\n"
    );
    let json = r#"{
  "build": { "dockerfile": "Dockerfile", "context": "..", "args": { "GREETING": "built-by-args" } },
  "postCreateCommand": "cat /greeting"
}"#;
    commit_files(
        &env,
        &[
            (".devcontainer/devcontainer.json", json),
            (".devcontainer/Dockerfile", &dockerfile),
            (".dockerignore", "secret.txt\n**/*.log\n"),
            ("secret.txt", "not for the image\n"),
        ],
    );
    let tasks = "[[task]]\nname = \"b1\"\ncommand = [\"ls\", \"-a\", \"/context\"]\n\
                 [[task]]\nname = \"b2\"\ncommand = [\"ls\", \"-a\", \"/context\"]\n\
                 [[task]]\nname = \"b3\"\ncommand = [\"ls\", \"-a\", \"/context\"]\n";
    fs::write(env.root.join("tasks.toml"), tasks).unwrap();
    let out = env.output(
        ["batch", "--parallel", "3"].iter().copied().chain([env
            .root
            .join("tasks.toml")
            .to_str()
            .unwrap()]),
    );
    out.expect_code(0);
    let builds = out
        .stderr
        .matches("agentbox: build: building image")
        .count();
    assert_eq!(builds, 1, "sixteen tasks, or three, build once\n{out}");
    for task in ["b1", "b2", "b3"] {
        assert!(out.stdout.contains(task), "{out}");
    }
    assert!(
        out.stdout.contains("README.md"),
        "the context is in the image\n{out}"
    );
    assert_eq!(out.stdout.matches("built-by-args").count(), 3, "{out}");
    assert!(
        !out.stdout.contains("secret.txt"),
        ".dockerignore is honoured\n{out}"
    );
    assert!(out.stdout.contains(".dockerignore"), "{out}");

    // The same commit again: no build at all.
    let again = env.output(["run", "b4", "--", "cat", "/greeting"]);
    again.expect_code(0);
    assert!(!again.stderr.contains("building image"), "{again}");

    // A Dockerfile changed in the checkout but not committed is not what tasks get.
    fs::write(
        env.repo.join(".devcontainer/Dockerfile"),
        format!("FROM {IMAGE}\nRUN false\n"),
    )
    .unwrap();
    env.output(["run", "b5", "--", "true"]).expect_code(0);
    for task in ["b1", "b2", "b3", "b4", "b5"] {
        env.assert_torn_down(task);
    }
}

#[test]
fn a_task_cannot_change_the_environment_of_the_next_task() {
    let env = TestEnv::new("dc-hostile");
    let json = format!(r#"{{ "image": "{IMAGE}", "containerEnv": {{ "WHO": "the-user" }} }}"#);
    commit_files(&env, &[(".devcontainer/devcontainer.json", &json)]);
    let marker = env.root.join("planted-on-the-host");
    let planted = format!(
        r#"{{ "image": "{IMAGE}", "containerEnv": {{ "WHO": "the-task" }},
  "initializeCommand": "touch {}",
  "mounts": ["source=/,target=/host,type=bind"] }}"#,
        marker.display()
    );
    let script = format!(
        "cat > .devcontainer/devcontainer.json <<'EOF'\n{planted}\nEOF\ngit commit -q -am 'plant' && echo \"$WHO\""
    );
    let out = env.output(["run", "evil", "--", "sh", "-c", &script]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), ["the-user"]);

    // The next task from main gets main's file.
    let next = env.output([
        "run",
        "next",
        "--",
        "sh",
        "-c",
        "echo \"$WHO\"; test ! -e /host",
    ]);
    next.expect_code(0);
    assert_eq!(next.stdout_lines(), ["the-user"], "{next}");

    // A task started from the planted branch gets the sandbox and nothing of the host.
    let from_branch = env.output(["run", "follow", "--base", "agentbox/evil", "--", "true"]);
    from_branch.expect_code(125);
    from_branch.expect_stderr_contains("initializeCommand runs on your host");
    assert!(!marker.exists(), "nothing ran on the host");
    assert!(!env.branch_exists("agentbox/follow"));
    assert!(!env.worktree_path("follow").exists());
    assert!(env.ls_task("follow").is_none());
    assert_eq!(env.containers(), Vec::<String>::new());
}

#[test]
fn bad_devcontainer_files_are_clear_errors_that_leave_nothing() {
    let env = TestEnv::new("dc-bad");
    let cases: [(&str, &str, &str, &str); 5] = [
        (
            ".devcontainer/devcontainer.json",
            "{\n  \"image\": \"x\"\n  \"init\": true\n}\n",
            "",
            "devcontainer.json:2:",
        ),
        (
            ".devcontainer/devcontainer.json",
            "{\n  \"image\": \"x\",\n  \"imagee\": 1\n}\n",
            "",
            "devcontainer.json:3:",
        ),
        (
            ".devcontainer/devcontainer.json",
            "{ \"image\": \"x\", \"features\": { \"ghcr.io/devcontainers/features/node:1\": {} } }",
            "",
            "build an image with them once",
        ),
        (
            ".devcontainer/devcontainer.json",
            "{ \"build\": { \"dockerfile\": \"Nope\" } }",
            "",
            "\".devcontainer/Nope\" does not exist",
        ),
        (
            ".devcontainer/devcontainer.json",
            "{ \"image\": \"x\", \"runArgs\": [\"--network=host\"] }",
            "",
            "--network=host is refused",
        ),
    ];
    for (index, (path, text, _, said)) in cases.iter().enumerate() {
        commit_files(&env, &[(path, text)]);
        let task = format!("bad{index}");
        let out = env.output(["run", &task, "--", "true"]);
        out.expect_code(125);
        out.expect_stderr_contains(said);
        out.expect_stderr_contains("main:.devcontainer/devcontainer.json");
        env.assert_nothing_left(&task);
    }
    // The Dockerfile exists but does not build: the engine's words, and still nothing left.
    commit_files(
        &env,
        &[
            (
                ".devcontainer/devcontainer.json",
                "{ \"build\": { \"dockerfile\": \"Dockerfile\" } }",
            ),
            (
                ".devcontainer/Dockerfile",
                &format!("FROM {IMAGE}\nRUN exit 7\n"),
            ),
        ],
    );
    let out = env.output(["run", "nobuild", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("building .devcontainer/Dockerfile failed");
    env.assert_nothing_left("nobuild");
}

/// The layout of the official "Python 3 & PostgreSQL" template: an app service built from a
/// Dockerfile that joins the database's network namespace, a database-like service with a
/// healthcheck and a named volume, a fixed host port and a container name that would collide.
fn compose_project(env: &TestEnv) {
    let dockerfile = format!("FROM {TOOLS_IMAGE}\nRUN echo app-image > /app-marker\n");
    let json = r#"{
  "name": "Python 3 & PostgreSQL",
  "dockerComposeFile": "docker-compose.yml",
  "service": "app",
  "workspaceFolder": "/workspaces/${localWorkspaceFolderBasename}",
  "forwardPorts": [5000],
}"#;
    let compose = r#"version: '3.8'
services:
  app:
    build:
      context: ..
      dockerfile: .devcontainer/Dockerfile
    volumes:
      - ../..:/workspaces:cached
    command: sleep infinity
    network_mode: service:db
    depends_on:
      db:
        condition: service_healthy
    environment:
      DATABASE_URL: http://localhost:5432/state
  db:
    image: agentbox-test/tools:latest
    restart: unless-stopped
    container_name: db
    volumes:
      - dbdata:/data
    command: ["sh", "-c", "sleep 1; hostname > /data/state; exec busybox httpd -f -p 5432 -h /data"]
    healthcheck:
      test: ["CMD-SHELL", "test -s /data/state"]
      interval: 1s
      timeout: 1s
      retries: 30
    ports:
      - "5432:5432"
volumes:
  dbdata:
"#;
    commit_files(
        env,
        &[
            (".devcontainer/devcontainer.json", json),
            (".devcontainer/Dockerfile", &dockerfile),
            (".devcontainer/docker-compose.yml", compose),
        ],
    );
}

/// Containers, networks and volumes of this test.
fn engine_objects(env: &TestEnv) -> Vec<String> {
    let filter = format!("label=agentbox.test={}", env.id);
    ["ps -aq", "network ls -q", "volume ls -q"]
        .iter()
        .flat_map(|command| {
            let mut args: Vec<&str> = command.split(' ').collect();
            args.extend(["--filter", &filter]);
            common::docker_lines(&args)
        })
        .collect()
}

#[test]
fn three_compose_tasks_at_once_each_get_their_own_database_and_leave_nothing() {
    common::ensure_tools_image();
    let env = TestEnv::new("dc-compose");
    compose_project(&env);
    let script = "pwd; cat /app-marker; busybox wget -qO- \"$DATABASE_URL\"; \
                  echo from-task > made.txt; git add made.txt; git commit -q -m \"work of $AGENTBOX_TASK\"; \
                  git log --format=%s -1";
    let tasks: String = ["c1", "c2", "c3"]
        .iter()
        .map(|t| format!("[[task]]\nname = \"{t}\"\ncommand = [\"sh\", \"-c\", {script:?}]\n"))
        .collect();
    let file = env.root.join("tasks.toml");
    fs::write(&file, tasks).unwrap();
    let out = env.output(["batch", "--parallel", "3", file.to_str().unwrap()]);
    out.expect_code(0);
    assert_eq!(
        out.stderr
            .matches("agentbox: build: building image")
            .count(),
        1,
        "the app's image is built once\n{out}"
    );
    out.expect_stderr_contains("container_name is dropped");
    out.expect_stderr_contains("fixed host ports are remapped");
    let mut databases = Vec::new();
    for task in ["c1", "c2", "c3"] {
        let own: Vec<&str> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{task} | ")))
            .collect();
        assert_eq!(own[0], format!("/workspaces/{task}"), "{out}");
        assert_eq!(own[1], "app-image", "{out}");
        databases.push(own[2].to_owned());
        assert_eq!(
            own[3],
            format!("work of {task}"),
            "git works in workspaceFolder\n{out}"
        );
        assert_eq!(
            env.subjects(&format!("main..agentbox/{task}")),
            [format!("work of {task}")]
        );
        env.assert_torn_down(task);
    }
    databases.sort();
    databases.dedup();
    assert_eq!(
        databases.len(),
        3,
        "each task reached its own database: {databases:?}"
    );
    assert_eq!(
        engine_objects(&env),
        Vec::<String>::new(),
        "no container, network or volume left"
    );
}

#[test]
fn a_service_that_never_gets_healthy_is_named_and_nothing_is_left() {
    common::ensure_tools_image();
    let env = TestEnv::new("dc-unhealthy");
    let json = r#"{ "dockerComposeFile": ["compose.yml"], "service": "app" }"#;
    let compose = format!(
        "services:\n  app:\n    image: {TOOLS_IMAGE}\n    depends_on:\n      db:\n        condition: service_healthy\n  db:\n    image: {TOOLS_IMAGE}\n    command: [\"sleep\", \"600\"]\n    healthcheck:\n      test: [\"CMD\", \"false\"]\n      interval: 200ms\n      timeout: 1s\n      retries: 2\n"
    );
    commit_files(
        &env,
        &[
            (".devcontainer/devcontainer.json", json),
            (".devcontainer/compose.yml", &compose),
        ],
    );
    let out = env.output(["run", "sick", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("service");
    out.expect_stderr_contains("db");
    assert!(
        out.stderr.contains("unhealthy") || out.stderr.contains("never got healthy"),
        "{out}"
    );
    env.assert_nothing_left("sick");
    assert_eq!(engine_objects(&env), Vec::<String>::new());

    // A key agentbox does not implement is an error naming it and the file.
    commit_files(
        &env,
        &[(
            ".devcontainer/compose.yml",
            &format!("services:\n  app:\n    image: {TOOLS_IMAGE}\n    privileged: true\n"),
        )],
    );
    let out = env.output(["run", "unknown", "--", "true"]);
    out.expect_code(125);
    out.expect_stderr_contains("main:.devcontainer/compose.yml");
    out.expect_stderr_contains("services.app.privileged is not supported");
    env.assert_nothing_left("unknown");
}

#[test]
fn dry_run_shows_the_resolved_environment_with_secrets_masked_and_creates_nothing() {
    let env = TestEnv::new("dc-dry");
    let json = format!(
        r#"{{ "image": "{IMAGE}", "workspaceFolder": "/workspaces/app",
  "containerEnv": {{ "PLAIN": "shown", "TOKEN": "${{localEnv:HOME}}" }},
  "remoteEnv": {{ "PATH": "${{containerEnv:PATH}}:/opt/bin" }},
  "customizations": {{ "agentbox": {{ "setup": ["echo from-keys"], "env": {{ "FROM_KEYS": "${{task}}" }} }},
                      "vscode": {{ "extensions": ["x.y"] }} }},
  "forwardPorts": [3000], "postCreateCommand": "make deps" }}"#
    );
    commit_files(&env, &[(".devcontainer/devcontainer.json", &json)]);
    let out = env.output(["run", "dry", "--dry-run", "--", "make", "test"]);
    out.expect_code(0);
    for expected in [
        &format!("image      {IMAGE}"),
        "workdir    /workspaces/app",
        "command    make test",
        "PLAIN=shown",
        "TOKEN=****",
        "port_3000 3000",
        "1. make deps",
        "2. echo from-keys",
        "FROM_KEYS=dry",
        "PATH=${PATH}:/opt/bin (in the container's shell)",
        &format!(
            "{} -> /workspaces/app (rw)",
            env.worktree_path("dry").display()
        ),
    ] {
        assert!(out.stdout.contains(expected), "{expected:?} in\n{out}");
    }
    assert!(
        !out.stdout.contains(env.home.to_str().unwrap()),
        "a value from the host's environment is a secret\n{out}"
    );
    env.assert_nothing_left("dry");
}

#[test]
fn a_symlink_a_task_committed_where_a_bind_mount_starts_is_never_followed() {
    let env = TestEnv::new("dc-link");
    let json = format!(
        r#"{{ "image": "{IMAGE}", "mounts": ["source=${{localWorkspaceFolder}}/data,target=/data,type=bind"] }}"#
    );
    commit_files(
        &env,
        &[
            (".devcontainer/devcontainer.json", &json),
            ("data/keep", "kept\n"),
        ],
    );
    let secret = env.root.join("host-secret");
    fs::create_dir(&secret).unwrap();
    fs::write(secret.join("token"), "host only\n").unwrap();
    // The first run mounts the repository's directory; the task replaces it with a link to the host.
    let plant = format!(
        "cat /data/keep && rm -rf data && ln -s {} data && git add -A && git commit -q -m plant",
        secret.display()
    );
    let out = env.output(["run", "evil", "--", "sh", "-c", &plant]);
    out.expect_code(0);
    assert_eq!(out.stdout_lines(), ["kept"]);
    // The next run continues the branch, whose checkout holds the link: refused, nothing made.
    let again = env.output(["run", "evil", "--", "cat", "/data/token"]);
    again.expect_code(125);
    again.expect_stderr_contains("not a symlink");
    assert!(!again.stdout.contains("host only"), "{again}");
    assert!(!env.worktree_path("evil").exists());
    assert_eq!(env.containers(), Vec::<String>::new());
    // A task started from main still gets the repository's directory.
    env.output(["run", "fresh", "--", "cat", "/data/keep"])
        .expect_code(0);
}

#[test]
fn a_host_bind_a_task_added_to_the_compose_file_is_refused_when_its_branch_is_the_base() {
    let env = TestEnv::new("dc-compose-trust");
    let secret = env.root.join("host-secret");
    fs::create_dir(&secret).unwrap();
    fs::write(secret.join("token"), "host only\n").unwrap();
    let json =
        r#"{ "dockerComposeFile": "compose.yml", "service": "app", "workspaceFolder": "/w" }"#;
    let compose = |extra: &str| {
        format!("services:\n  app:\n    image: {IMAGE}\n    volumes:\n      - ..:/w\n{extra}")
    };
    let host_bind = format!("      - {}:/secret\n", secret.display());
    // The user's own file may bind a host path.
    commit_files(
        &env,
        &[
            (".devcontainer/devcontainer.json", json),
            (".devcontainer/compose.yml", &compose(&host_bind)),
        ],
    );
    env.output(["run", "own", "--", "cat", "/secret/token"])
        .expect_code(0);
    commit_files(&env, &[(".devcontainer/compose.yml", &compose(""))]);

    // A task puts the bind into the compose file on its branch; devcontainer.json stays the same.
    let plant = format!(
        "printf '%s' '{}' > .devcontainer/compose.yml && git commit -qam plant",
        compose(&host_bind)
    );
    env.output(["run", "evil", "--", "sh", "-c", &plant])
        .expect_code(0);
    let out = env.output([
        "run",
        "--base",
        "agentbox/evil",
        "next",
        "--",
        "cat",
        "/secret/token",
    ]);
    out.expect_code(125);
    out.expect_stderr_contains("host path");
    assert!(!out.stdout.contains("host only"), "{out}");
    assert!(!env.branch_exists("agentbox/next"));
    assert!(!env.worktree_path("next").exists());
    assert_eq!(env.containers(), Vec::<String>::new());
}
