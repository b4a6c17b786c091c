//! Where the engine finds the paths agentbox sees.
//!
//! Usually they are the same paths. When agentbox runs in a container of the very engine it drives
//! (a devcontainer with the host's Docker socket mounted), a path agentbox sees exists on the host
//! only through one of that container's mounts, and the engine resolves a bind source on the host:
//! every source is translated through the mounts, and a path on none of them (the container's own
//! filesystem, a tmpfs) is refused, since the engine would mount whatever the host has there.

use std::path::{Component, Path, PathBuf};

/// One directory agentbox's container has from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedDir {
    /// Where agentbox sees it.
    pub inside: PathBuf,
    /// Where the engine has it.
    pub host: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostPaths {
    /// agentbox and the engine see one filesystem.
    #[default]
    Same,
    /// agentbox runs in the engine's container `container`, which has these directories from the
    /// host.
    Through {
        container: String,
        mounts: Vec<MountedDir>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path} is not on a mount from the host in agentbox's own container {container}, so the engine cannot mount it into a task; run agentbox with the directory that holds the repository, its worktrees and agentbox's state ({}) bind-mounted from the host (the devcontainer/ folder of agentbox's repository shows how)",
    describe_mounts(.mounts)
)]
pub struct Untranslatable {
    pub path: String,
    pub container: String,
    mounts: Vec<MountedDir>,
}

fn describe_mounts(mounts: &[MountedDir]) -> String {
    if mounts.is_empty() {
        return "the container has no bind mounts".into();
    }
    let listed: Vec<String> = mounts
        .iter()
        .map(|m| format!("{} from {}", m.inside.display(), m.host.display()))
        .collect();
    format!("the container has {}", listed.join(", "))
}

impl HostPaths {
    /// The host path of `path`, a path agentbox sees.
    pub fn translate(&self, path: &str) -> Result<String, Untranslatable> {
        let HostPaths::Through { container, mounts } = self else {
            return Ok(path.to_owned());
        };
        let untranslatable = || Untranslatable {
            path: path.to_owned(),
            container: container.clone(),
            mounts: mounts.clone(),
        };
        let wanted = Path::new(path);
        // `..` could climb out of the mount it starts in; the paths agentbox mounts are made
        // absolute and plain before they reach the engine, so one that is not is refused.
        if !wanted.is_absolute() || wanted.components().any(|c| c == Component::ParentDir) {
            return Err(untranslatable());
        }
        // The innermost mount wins: a mount inside another hides what the outer one has there.
        mounts
            .iter()
            .filter_map(|m| Some((m, wanted.strip_prefix(&m.inside).ok()?)))
            .max_by_key(|(m, _)| m.inside.components().count())
            .map(|(m, rest)| {
                if rest.as_os_str().is_empty() {
                    m.host.display().to_string()
                } else {
                    m.host.join(rest).display().to_string()
                }
            })
            .ok_or_else(untranslatable)
    }

    /// One line for `doctor`: how paths reach the engine.
    pub fn describe(&self) -> String {
        match self {
            HostPaths::Same => "agentbox and the engine see the same paths".into(),
            HostPaths::Through { container, mounts } => format!(
                "agentbox runs in the engine's container {container}; bind sources are translated to host paths: {}",
                describe_mounts(mounts).trim_start_matches("the container has ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(mounts: &[(&str, &str)]) -> HostPaths {
        HostPaths::Through {
            container: "devbox".into(),
            mounts: mounts
                .iter()
                .map(|(inside, host)| MountedDir {
                    inside: inside.into(),
                    host: host.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_same_filesystem_keeps_every_path() {
        assert_eq!(
            HostPaths::Same.translate("/anywhere/x").unwrap(),
            "/anywhere/x"
        );
    }

    #[test]
    fn a_path_goes_through_the_innermost_mount_that_holds_it() {
        let paths = through(&[
            ("/workspaces", "/home/u/src"),
            ("/workspaces/proj/.state", "/var/lib/docker/volumes/s/_data"),
        ]);
        assert_eq!(
            paths.translate("/workspaces/proj/wt/a").unwrap(),
            "/home/u/src/proj/wt/a"
        );
        assert_eq!(
            paths.translate("/workspaces/proj/.state/git").unwrap(),
            "/var/lib/docker/volumes/s/_data/git"
        );
        assert_eq!(paths.translate("/workspaces").unwrap(), "/home/u/src");
    }

    #[test]
    fn a_path_on_no_mount_is_refused_naming_it_and_the_mounts() {
        let paths = through(&[("/workspaces", "/home/u/src")]);
        for path in ["/tmp/x", "/workspacesX/y", "relative", "/workspaces/../etc"] {
            let e = paths.translate(path).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(path), "{text}");
            assert!(text.contains("/workspaces from /home/u/src"), "{text}");
            assert!(text.contains("devbox"), "{text}");
        }
    }
}
