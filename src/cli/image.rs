use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use super::{CommandError, EXIT_AGENTBOX_FAILED};

/// The script that builds the default image without a registry, carried in the binary so that it
/// works wherever agentbox is installed, not only in a source checkout.
const BUILD_BASE: &str = include_str!("../../images/build-base.sh");

/// Build agentbox's default image (agentbox/base:bookworm) without a container registry:
/// debootstrap from your machine's Debian mirror, imported into the engine. Needs root or
/// passwordless sudo for debootstrap; takes a few minutes
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Build the image unless it exists
    Build {
        /// Build it again even if it exists
        #[arg(long)]
        force: bool,
        /// The image's name
        #[arg(long, value_name = "NAME", default_value = agentbox::supervisor::DEFAULT_IMAGE)]
        tag: String,
    },
}

pub async fn image(args: Args) -> Result<u8, CommandError> {
    let Action::Build { force, tag } = args.action;
    let fail = |e: String| CommandError::new(e, EXIT_AGENTBOX_FAILED);
    let mut script =
        tempfile_in_tmp().map_err(|e| fail(format!("cannot write the build script: {e}")))?;
    script.1.write_all(BUILD_BASE.as_bytes()).map_err(|e| {
        fail(format!(
            "cannot write the build script {}: {e}",
            script.0.display()
        ))
    })?;
    drop(script.1);
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(&script.0)
        .env("AGENTBOX_BASE_IMAGE", &tag)
        .env("AGENTBOX_BUILD_NAME", "agentbox image build")
        .stdin(Stdio::null());
    if force {
        command.arg("--force");
    }
    let status = command
        .status()
        .await
        .map_err(|e| fail(format!("cannot run bash to build image {tag}: {e}")));
    let _ = std::fs::remove_file(&script.0);
    let status = status?;
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .unwrap_or(1))
}

/// A new private file for the script.
fn tempfile_in_tmp() -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let path = std::env::temp_dir().join(format!("agentbox-build-base-{}.sh", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    Ok((path, file))
}
