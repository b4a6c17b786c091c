//! `agentbox doctor`: whether this machine can run tasks, one check at a time, each failure with
//! its fix.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::PortRange;
use crate::runtime::host_paths::HostPaths;
use crate::runtime::{Runtime, RuntimeError};

/// The oldest engine API agentbox is tested with (Debian's docker.io 20.10).
const MIN_API: (u32, u32) = (1, 41);
/// The oldest git recommended.
const RECOMMENDED_GIT: (u32, u32) = (2, 38);

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but not as well as it could.
    Warn,
    Fail,
    /// Could not be checked because an earlier check failed.
    Skipped,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about a failure or a warning.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            ..Self::fail(name, detail, fix)
        }
    }

    fn skipped(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skipped,
            detail: detail.into(),
            fix: None,
        }
    }
}

/// What the checks look at; the CLI reads it from the environment.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Where the engine is looked for (`DOCKER_HOST`, or the engine's default address).
    pub engine_address: String,
    /// Where the engine is looked for when `DOCKER_HOST` is not set.
    pub default_engine_address: String,
    /// `$XDG_STATE_HOME` (or its default).
    pub state_home: PathBuf,
    /// The task image (`image` of agentbox.toml, or the default).
    pub image: String,
    /// The port range (`port_range` of agentbox.toml, or the default).
    pub port_range: PortRange,
    /// The directories a task's container gets bind mounts from: the state dir and, in a
    /// repository, its git dir and its tasks' worktrees.
    pub mounted: Vec<PathBuf>,
}

/// Runs every check, in order, against the engine the caller connected to (or the error that
/// connecting gave).
pub async fn run(setup: &Setup, runtime: Result<&dyn Runtime, &RuntimeError>) -> Vec<Check> {
    let mut checks = vec![socket(setup)];
    match runtime {
        Ok(runtime) => {
            checks.push(engine_version(setup, runtime).await);
            checks.push(paths(setup, &runtime.host_paths()));
        }
        Err(e) => checks.push(Check::fail(
            "engine",
            e.to_string(),
            unreachable_fix(setup, &e.to_string()),
        )),
    }
    checks.push(git().await);
    match runtime {
        Ok(runtime) => checks.push(image(runtime, &setup.image).await),
        Err(_) => checks.push(Check::skipped("image", "no engine to ask")),
    }
    checks.push(state_dir(&setup.state_home));
    checks.push(ports(setup));
    checks
}

/// Whether the engine can find what agentbox mounts into tasks: only a question when agentbox runs
/// in a container of that engine.
fn paths(setup: &Setup, host_paths: &HostPaths) -> Check {
    let refused: Vec<String> = setup
        .mounted
        .iter()
        .filter_map(|dir| host_paths.translate(&dir.display().to_string()).err())
        .map(|e| e.to_string())
        .collect();
    match refused.first() {
        None => Check::ok("paths", host_paths.describe()),
        Some(first) => Check::fail(
            "paths",
            first.clone(),
            format!(
                "start agentbox's container with {} bind-mounted from the host (same path inside is simplest), or set XDG_STATE_HOME to a directory that is",
                setup
                    .mounted
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

fn unreachable_fix(setup: &Setup, error: &str) -> String {
    let (address, default) = (&setup.engine_address, &setup.default_engine_address);
    if error.to_ascii_lowercase().contains("permission denied") {
        "add yourself to the socket's group: `sudo usermod -aG docker $USER`, then log in again"
            .to_owned()
    } else if address == default {
        "start the engine (`sudo systemctl start docker`, or `sudo service docker start`), or set DOCKER_HOST to one that runs".to_owned()
    } else {
        format!(
            "DOCKER_HOST={address}: start the engine there, or unset DOCKER_HOST to use {default}"
        )
    }
}

/// The engine's socket, when it is a local one: there, and ours to read and write.
fn socket(setup: &Setup) -> Check {
    let address = setup.engine_address.as_str();
    let Some(path) = address.strip_prefix("unix://") else {
        return Check::ok(
            "socket",
            format!("{address} is not a local socket; nothing to check"),
        );
    };
    let path = Path::new(path);
    match std::fs::metadata(path) {
        Err(e) => Check::fail(
            "socket",
            format!("{}: {e}", path.display()),
            unreachable_fix(setup, &e.to_string()),
        ),
        Ok(_) => match rustix::fs::access(
            path,
            rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
        ) {
            Ok(()) => Check::ok(
                "socket",
                format!("{} is readable and writable", path.display()),
            ),
            Err(e) => Check::fail(
                "socket",
                format!("{}: {}", path.display(), std::io::Error::from(e)),
                "add yourself to the socket's group: `sudo usermod -aG docker $USER`, then log in again",
            ),
        },
    }
}

async fn engine_version(setup: &Setup, runtime: &dyn Runtime) -> Check {
    match runtime.version().await {
        Ok(version) => {
            let detail = format!(
                "Docker {} (API {}; agentbox speaks {}) at {}",
                version.engine, version.api, version.agreed, setup.engine_address
            );
            match parse_version(&version.api) {
                Some(found) if found < MIN_API => Check::fail(
                    "engine",
                    detail,
                    format!(
                        "the engine is older than API {}.{} (Docker 20.10): upgrade it",
                        MIN_API.0, MIN_API.1
                    ),
                ),
                _ => Check::ok("engine", detail),
            }
        }
        Err(e) => Check::fail(
            "engine",
            e.to_string(),
            "check that the engine is healthy: `docker info`",
        ),
    }
}

async fn git() -> Check {
    let out = tokio::process::Command::new("git")
        .arg("--version")
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            return Check::fail(
                "git",
                format!(
                    "git --version failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                "install git (`sudo apt-get install git`)",
            );
        }
        Err(e) => {
            return Check::fail(
                "git",
                format!("cannot run git: {e}"),
                "install git (`sudo apt-get install git`)",
            );
        }
    };
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let version = text
        .strip_prefix("git version ")
        .unwrap_or(&text)
        .to_owned();
    match parse_version(&version) {
        Some(found) if found < RECOMMENDED_GIT => Check::warn(
            "git",
            format!("git {version}"),
            format!(
                "git {}.{} or newer is recommended; upgrade git",
                RECOMMENDED_GIT.0, RECOMMENDED_GIT.1
            ),
        ),
        _ => Check::ok("git", format!("git {version}")),
    }
}

async fn image(runtime: &dyn Runtime, image: &str) -> Check {
    match runtime.image_present(image).await {
        Ok(true) => Check::ok("image", format!("{image} is present")),
        Ok(false) if image == crate::supervisor::DEFAULT_IMAGE => Check::fail(
            "image",
            format!("{image} is not present"),
            "build it: `agentbox image build` (a few minutes; debootstrap, needs root or sudo)",
        ),
        Ok(false) => Check::fail(
            "image",
            format!("{image} (from agentbox.toml) is not present"),
            format!("build or pull it: `docker pull {image}`, or change `image` in agentbox.toml"),
        ),
        Err(e) => Check::fail(
            "image",
            e.to_string(),
            "check that the engine is healthy: `docker info`",
        ),
    }
}

/// The state dir: ours, writable, and not writable by others (it holds records and logs).
fn state_dir(state_home: &Path) -> Check {
    let dir = state_home.join("agentbox");
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_owned();
    let writable = rustix::fs::access(
        &existing,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    );
    if let Err(e) = writable {
        return Check::fail(
            "state dir",
            format!("{}: {}", existing.display(), std::io::Error::from(e)),
            format!(
                "make it yours: `sudo chown -R $USER {}` (or set XDG_STATE_HOME to a directory of yours)",
                existing.display()
            ),
        );
    }
    if existing != dir {
        return Check::ok(
            "state dir",
            format!("{} will be made on first use", dir.display()),
        );
    }
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(&dir) {
        Ok(meta) if meta.mode() & 0o022 != 0 => Check::fail(
            "state dir",
            format!(
                "{} is writable by others (mode {:o}): they could change agentbox's records",
                dir.display(),
                meta.mode() & 0o777
            ),
            format!("`chmod go-w {}`", dir.display()),
        ),
        Ok(meta) if meta.uid() != rustix::process::getuid().as_raw() => Check::warn(
            "state dir",
            format!("{} belongs to uid {}", dir.display(), meta.uid()),
            format!("`sudo chown -R $USER {}`", dir.display()),
        ),
        Ok(_) => Check::ok(
            "state dir",
            format!("{} is yours and writable", dir.display()),
        ),
        Err(e) => Check::fail(
            "state dir",
            format!("{}: {e}", dir.display()),
            "check the directory's permissions",
        ),
    }
}

/// Free host ports in the range: not in agentbox's ledger, and free now.
fn ports(setup: &Setup) -> Check {
    let range = setup.port_range;
    let held: Vec<u16> = crate::ports::PortLedger::new(&setup.state_home)
        .all_held()
        .unwrap_or_default();
    let total = usize::from(range.last - range.first) + 1;
    let free = (range.first..=range.last)
        .filter(|p| !held.contains(p))
        .filter(|p| crate::ports::is_free(*p))
        .count();
    let detail = format!(
        "{free} of {total} ports free in {}-{} ({} held by agentbox tasks)",
        range.first,
        range.last,
        held.len()
    );
    if free == 0 {
        Check::fail(
            "ports",
            detail,
            "stop tasks you no longer need (`agentbox ls`, `agentbox stop`), or widen `port_range` in agentbox.toml",
        )
    } else {
        Check::ok("ports", detail)
    }
}

/// `major.minor` at the start of a version string.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert_eq!(parse_version("2.39.5"), Some((2, 39)));
        assert_eq!(parse_version("1.41"), Some((1, 41)));
        assert!(parse_version("2.37.1").unwrap() < RECOMMENDED_GIT);
        assert!(parse_version("2.9.0").unwrap() < RECOMMENDED_GIT);
        assert_eq!(parse_version("x"), None);
    }

    fn setup(state_home: &Path) -> Setup {
        Setup {
            engine_address: "unix:///nonexistent/doctor.sock".into(),
            default_engine_address: "unix:///nonexistent/doctor.sock".into(),
            state_home: state_home.to_owned(),
            image: "some/image:1".into(),
            port_range: PortRange::default(),
            mounted: vec![state_home.to_owned()],
        }
    }

    #[test]
    fn inside_a_container_a_state_dir_on_no_host_mount_fails_naming_it() {
        let setup = setup(Path::new("/root/.local/state"));
        assert_eq!(paths(&setup, &HostPaths::Same).status, Status::Ok);
        let mounted = |inside: &str| HostPaths::Through {
            container: "devbox".into(),
            mounts: vec![crate::runtime::host_paths::MountedDir {
                inside: inside.into(),
                host: "/home/u".into(),
            }],
        };
        let good = paths(&setup, &mounted("/root"));
        assert_eq!(good.status, Status::Ok, "{good:?}");
        assert!(good.detail.contains("devbox"), "{good:?}");
        let bad = paths(&setup, &mounted("/workspaces"));
        assert_eq!(bad.status, Status::Fail, "{bad:?}");
        assert!(bad.detail.contains("/root/.local/state"), "{bad:?}");
        assert!(bad.fix.unwrap().contains("/root/.local/state"));
    }

    #[tokio::test]
    async fn the_engine_and_the_image_are_asked_through_the_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let setup = setup(tmp.path());
        let fake = crate::runtime::fake::FakeRuntime::default();
        let missing = image(&fake, &setup.image).await;
        assert_eq!(missing.status, Status::Fail, "{missing:?}");
        assert!(missing.fix.unwrap().contains("docker pull some/image:1"));
        fake.has_image("some/image:1");
        assert_eq!(image(&fake, &setup.image).await.status, Status::Ok);

        let engine = engine_version(&setup, &fake).await;
        assert_eq!(engine.status, Status::Ok, "{engine:?}");
        assert!(engine.detail.contains("API 1.41"), "{engine:?}");
        assert!(
            engine
                .detail
                .ends_with(" at unix:///nonexistent/doctor.sock")
        );
        fake.speaks_api("1.40");
        let old = engine_version(&setup, &fake).await;
        assert_eq!(old.status, Status::Fail, "{old:?}");
        assert!(old.fix.unwrap().contains("upgrade"));
    }

    #[tokio::test]
    async fn an_engine_out_of_reach_fails_and_skips_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let setup = setup(tmp.path());
        let unreachable = RuntimeError::Unreachable {
            address: setup.engine_address.clone(),
            reason: "no such file".into(),
        };
        let checks = run(&setup, Err(&unreachable)).await;
        let named = |name| checks.iter().find(|c| c.name == name).unwrap();
        assert_eq!(named("engine").status, Status::Fail);
        assert!(
            named("engine")
                .fix
                .as_ref()
                .unwrap()
                .contains("start the engine")
        );
        assert_eq!(named("image").status, Status::Skipped);
    }

    #[test]
    fn a_state_dir_others_can_write_fails() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agentbox");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let check = state_dir(tmp.path());
        assert_eq!(check.status, Status::Fail, "{check:?}");
        assert!(check.fix.unwrap().contains("chmod go-w"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state_dir(tmp.path()).status, Status::Ok);
        assert_eq!(state_dir(&tmp.path().join("new")).status, Status::Ok);
    }
}
