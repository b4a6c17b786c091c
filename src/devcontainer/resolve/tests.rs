use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::devcontainer::parse;

const WORKTREE: &str = "/src/.agentbox-worktrees/app/t1";

fn loaded(text: &str, trusted: bool) -> Loaded {
    Loaded {
        file: parse(text, "main:.devcontainer/devcontainer.json").unwrap(),
        path: ".devcontainer/devcontainer.json".into(),
        shown: "main:.devcontainer/devcontainer.json".into(),
        commit: gix::ObjectId::null(gix::hash::Kind::Sha1),
        trusted,
    }
}

fn resolve_with(text: &str, trusted: bool, allow_privileged: bool) -> Result<Resolved, String> {
    let env = BTreeMap::from([("HOME".to_owned(), "/home/u".to_owned())]);
    let context = ResolveContext {
        worktree: Path::new(WORKTREE),
        host_env: &env,
        devcontainer_id: "id".into(),
        allow_privileged,
        protected: vec![
            PathBuf::from("/src/app/.git"),
            PathBuf::from("/src/.agentbox-worktrees/app"),
            PathBuf::from("/home/u/.local/state/agentbox"),
        ],
    };
    resolve(&loaded(text, trusted), &context).map_err(|e| e.to_string())
}

fn ok(text: &str) -> Resolved {
    resolve_with(text, true, false).unwrap()
}

fn refused(text: &str, trusted: bool) -> String {
    resolve_with(text, trusted, false).unwrap_err()
}

#[test]
fn a_mount_above_the_worktree_mounts_only_the_worktree() {
    let resolved = ok(r#"{"image": "i",
        "workspaceMount": "source=${localWorkspaceFolder}/../..,target=/workspaces,type=bind",
        "workspaceFolder": "/workspaces/app/t1"}"#);
    assert!(resolved.mounts.is_empty(), "{:?}", resolved.mounts);
    assert_eq!(
        resolved.workspace_folder.as_deref(),
        Some("/workspaces/app/t1")
    );
    assert_eq!(resolved.notes.len(), 1, "said once: {:?}", resolved.notes);

    let resolved = ok(r#"{"image": "i", "mounts": ["source=/src,target=/all,type=bind"]}"#);
    assert_eq!(
        resolved.mounts,
        [Mount {
            source: WORKTREE.into(),
            target: "/all/.agentbox-worktrees/app/t1".into(),
            read_only: false,
        }]
    );
}

#[test]
fn what_holds_the_repository_or_other_tasks_is_never_mounted() {
    for source in [
        "/src/app",
        "/src/.agentbox-worktrees/app/t2",
        "/home/u/.local/state",
    ] {
        let text = format!(
            r#"{{"image": "i", "mounts": [{{"source": "{source}", "target": "/x", "type": "bind"}}]}}"#
        );
        let error = refused(&text, true);
        assert!(
            error.contains("no task may have mounted"),
            "{source}: {error}"
        );
    }
    let error = refused(
        r#"{"image": "i", "mounts": ["source=cache,target=/cache,type=volume"]}"#,
        true,
    );
    assert!(error.contains("only bind mounts"), "{error}");
}

#[test]
fn what_reaches_the_host_needs_the_users_own_file() {
    let host_path =
        r#"{"image": "i", "mounts": ["source=${localEnv:HOME}/.cache,target=/c,type=bind"]}"#;
    assert_eq!(ok(host_path).mounts[0].source, "/home/u/.cache");
    assert!(refused(host_path, false).contains("not the one at your checkout's HEAD"));

    let initialize = r#"{"image": "i", "initializeCommand": "touch x"}"#;
    assert_eq!(ok(initialize).host_setup, ["touch x"]);
    assert!(refused(initialize, false).contains("initializeCommand runs on your host"));
}

#[test]
fn privileges_need_the_flag() {
    for text in [
        r#"{"image": "i", "privileged": true}"#,
        r#"{"image": "i", "capAdd": ["SYS_PTRACE"]}"#,
        r#"{"image": "i", "runArgs": ["--privileged"]}"#,
        r#"{"image": "i", "runArgs": ["--cap-add=NET_ADMIN"]}"#,
    ] {
        assert!(refused(text, true).contains("--allow-privileged"), "{text}");
        let granted = resolve_with(text, true, true).unwrap();
        assert!(!granted.privileges.is_empty(), "{text}");
        assert!(
            resolve_with(text, false, true).is_err(),
            "{text}: untrusted"
        );
    }
}

#[test]
fn run_args_that_undo_the_sandbox_are_refused_by_name() {
    for (arg, said) in [
        ("--network=host", "--network=host is refused"),
        ("--pid=host", "--pid is refused"),
        ("-v", "-v is refused"),
        ("--shm-size=1g", "not a flag agentbox supports"),
    ] {
        let text = format!(r#"{{"image": "i", "runArgs": ["{arg}", "x"]}}"#);
        let error = refused(&text, true);
        assert!(error.contains(said), "{arg}: {error}");
    }
    let resolved = ok(
        r#"{"image": "i", "runArgs": ["--memory=1g", "-e", "A=b", "--network", "none", "--label", "team=x"]}"#,
    );
    assert_eq!(resolved.limits.memory.map(|m| m.0), Some(1 << 30));
    assert_eq!(resolved.env[0].key, "A");
    assert_eq!(resolved.network, Some(NetworkSetting::None));
    assert_eq!(resolved.labels, [("team".to_owned(), "x".to_owned())]);
}

#[test]
fn features_and_forms_are_checked() {
    assert!(
        refused(r#"{"image": "i", "features": {"ghcr.io/x/y:1": {}}}"#, true).contains("registry")
    );
    assert!(ok(r#"{"image": "i", "features": {}}"#).setup.is_empty());
    assert!(refused(r#"{"name": "x"}"#, true).contains("names no image"));
    assert!(
        refused(r#"{"image": "i", "build": {"dockerfile": "D"}}"#, true).contains("more than one")
    );
    assert!(
        refused(r#"{"build": {"dockerfile": "../../D"}}"#, true).contains("outside the repository")
    );
}

#[test]
fn lifecycle_steps_run_in_order_and_the_environment_splits() {
    let resolved = ok(r#"{"image": "i",
        "postStartCommand": "echo 3", "onCreateCommand": ["echo", "1"], "postCreateCommand": {"a": "echo 2"},
        "containerEnv": {"A": "${localEnv:HOME}", "B": "b"},
        "remoteEnv": {"PATH": "${containerEnv:PATH}:/x", "B": null},
        "forwardPorts": [3000, "3000", 8080], "appPort": "9000:80"}"#);
    assert_eq!(resolved.setup[0], "echo 1");
    assert!(resolved.setup[1].contains("echo 2"));
    assert_eq!(resolved.setup[2], "echo 3");
    assert_eq!(resolved.env.len(), 1, "B was unset: {:?}", resolved.env);
    assert!(
        resolved.env[0].secret,
        "a value of the host's environment is a secret"
    );
    assert_eq!(
        resolved.shell_env,
        [("PATH".to_owned(), "${PATH}:/x".to_owned())]
    );
    assert_eq!(resolved.ports, [3000, 8080, 80]);
    assert!(
        refused(
            r#"{"image": "i", "containerEnv": {"P": "${containerEnv:PATH}"}}"#,
            true
        )
        .contains("remoteEnv")
    );
}

#[test]
fn agentbox_keys_in_customizations_are_checked_like_agentbox_toml() {
    let resolved = ok(
        r#"{"image": "i", "customizations": {"agentbox": {"setup": ["x"], "limits": {"memory": "1g"}}, "vscode": {"settings": {}}}}"#,
    );
    assert_eq!(resolved.agentbox.setup, ["x"]);
    assert!(
        refused(
            r#"{"image": "i", "customizations": {"agentbox": {"imagee": "x"}}}"#,
            true
        )
        .contains("imagee")
    );
    assert!(
        refused(
            r#"{"image": "i", "customizations": {"agentbox": {"network": "host"}}}"#,
            true
        )
        .contains("refused")
    );
}
