use std::path::{Path, PathBuf};
use std::process::Stdio;

use agentbox::trash;

use super::{CommandError, Context, failed};

/// Delete what a finished task left, as listed in a trash manifest (agentbox starts this in the
/// background itself)
#[derive(Debug, clap::Args)]
pub struct Args {
    manifest: PathBuf,
}

pub async fn purge(context: &Context, args: Args) -> Result<u8, CommandError> {
    let runtime = context.runtime().await.map_err(failed)?;
    trash::purge(&*runtime, &args.manifest)
        .await
        .map_err(failed)?;
    Ok(0)
}

/// Starts `agentbox purge <manifest>` in the background, in a process group of its own so that a
/// Ctrl-C at the terminal does not stop it, and returns at once. If it cannot start, or dies, the
/// next `agentbox gc` deletes what the manifest lists.
pub fn in_background(manifest: &Path) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let _ = tokio::process::Command::new(exe)
        .arg("purge")
        .arg(manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(false)
        .spawn();
}
