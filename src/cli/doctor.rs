use agentbox::doctor::{self, Setup, Status};
use agentbox::supervisor::DEFAULT_IMAGE;

use super::{CommandError, Context, EXIT_ERROR, failed, write_stdout};

/// Check that this machine can run tasks: the engine and its API version, the socket, git, the
/// default image, the state dir, free ports; each failure with its fix. Exits 1 when one fails
#[derive(Debug, clap::Args)]
pub struct Args {
    /// One JSON object per check: name, status (ok, warn, fail, skipped), detail, fix
    #[arg(long)]
    json: bool,
}

pub async fn doctor(context: &Context, args: Args) -> Result<u8, CommandError> {
    // Inside a repository, its agentbox.toml says which image and ports; elsewhere, the defaults.
    let workspace = context.workspace().ok();
    let config = workspace
        .as_ref()
        .and_then(|ws| ws.load_config().ok())
        .unwrap_or_default();
    let mut mounted = vec![context.env.state_home.clone()];
    if let Some(ws) = &workspace {
        mounted.extend([ws.repo.common_dir.clone(), ws.worktree_root().to_owned()]);
    }
    let (engine_address, default_engine_address) = context.engine_address();
    let setup = Setup {
        engine_address,
        default_engine_address,
        state_home: context.env.state_home.clone(),
        image: config.image.unwrap_or_else(|| DEFAULT_IMAGE.to_owned()),
        port_range: config.port_range.unwrap_or_default(),
        mounted,
    };
    // An engine that cannot be reached is one of the findings, not an error of doctor's.
    let runtime = context.runtime().await;
    let checks = doctor::run(&setup, runtime.as_deref()).await;
    let mut out = String::new();
    for check in &checks {
        if args.json {
            let line = serde_json::to_string(check).map_err(failed)?;
            out.push_str(&line);
            out.push('\n');
            continue;
        }
        let mark = match check.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        out.push_str(&format!("{mark}  {:<10} {}\n", check.name, check.detail));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("      {:<10} fix: {fix}\n", ""));
        }
    }
    write_stdout(out.as_bytes())?;
    let failures = checks.iter().filter(|c| c.status == Status::Fail).count();
    if failures > 0 {
        eprintln!(
            "agentbox: {failures} check{} failed",
            if failures == 1 { "" } else { "s" }
        );
        return Ok(EXIT_ERROR);
    }
    Ok(0)
}
