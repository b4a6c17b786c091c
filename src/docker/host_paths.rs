//! Finding out whether agentbox runs in a container of the engine it talks to, and which host
//! directories that container has: see [`HostPaths`].

use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;

use super::{api, is_status};
use crate::runtime::RuntimeError;
use crate::runtime::host_paths::{HostPaths, MountedDir};

/// The mounts the engine sets up in every container it makes: their sources name the container.
const ENGINE_MADE_FILES: &[&str] = &["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// Asks the engine about the container agentbox runs in, if any. A container the engine does not
/// know is another engine's (agentbox talks to a remote engine, or to one inside its own
/// container): there the paths are the engine's own.
pub(super) async fn discover(docker: &Docker) -> Result<HostPaths, RuntimeError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let Some(id) = own_container_id(&mountinfo, hostname.trim()) else {
        return Ok(HostPaths::Same);
    };
    let inspect = match docker
        .inspect_container(&id, None::<InspectContainerOptions>)
        .await
    {
        Ok(inspect) => inspect,
        Err(e) if is_status(&e, &[404]) => return Ok(HostPaths::Same),
        Err(e) => return Err(api("inspecting agentbox's own container", &id)(e)),
    };
    let container = inspect
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or(id);
    let mounts = inspect
        .mounts
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| {
            let (source, destination) = (m.source?, m.destination?);
            // A tmpfs has no source: nothing of it is on the host.
            let host = PathBuf::from(source);
            host.is_absolute().then(|| MountedDir {
                inside: PathBuf::from(destination),
                host,
            })
        })
        .collect();
    Ok(HostPaths::Through { container, mounts })
}

/// The id of the container this process runs in, from the sources of the files the engine mounts
/// into each container (`/var/lib/docker/containers/<id>/hostname`), or else from a host name
/// that has the form of a short id (the engine's default host name).
fn own_container_id(mountinfo: &str, hostname: &str) -> Option<String> {
    let from_mounts = mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point ...
        let mut fields = line.split(' ');
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        if !ENGINE_MADE_FILES.contains(&mount_point) {
            return None;
        }
        Path::new(root)
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .find(|c| is_hex(c, 64))
            .map(str::to_owned)
    });
    from_mounts.or_else(|| is_hex(hostname, 12).then(|| hostname.to_owned()))
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c9a2b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    #[test]
    fn the_container_is_named_by_the_source_of_its_hostname_file() {
        let mountinfo = format!(
            "612 590 0:52 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/x\n\
             620 612 254:1 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda1 rw\n\
             621 612 254:1 /home/u/src /workspaces rw - ext4 /dev/vda1 rw\n"
        );
        assert_eq!(own_container_id(&mountinfo, "devbox").as_deref(), Some(ID));
    }

    #[test]
    fn a_short_id_host_name_names_it_when_the_mounts_do_not() {
        assert_eq!(
            own_container_id("", "3f1c9a2b7d4e").as_deref(),
            Some("3f1c9a2b7d4e")
        );
    }

    #[test]
    fn a_machine_that_is_no_container_has_no_id() {
        let host = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    25 22 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(own_container_id(host, "build-host"), None);
        // A 64-hex directory elsewhere is no container's.
        let elsewhere = format!("30 22 254:1 /srv/{ID} /data rw - ext4 /dev/vda1 rw\n");
        assert_eq!(own_container_id(&elsewhere, "build-host"), None);
    }
}
