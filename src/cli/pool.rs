use agentbox::pool::{self, SlotState};
use agentbox::task::TaskName;

use super::{CommandError, Context, EXIT_AGENTBOX_FAILED, failed, labels, write_stdout};

/// The warm pool: sandboxes made ahead of time, so that `agentbox run` starts its command at once
/// (`[pool] size` of agentbox.toml)
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// The slots: ready, being made, being taken
    Status {
        /// One JSON object per slot
        #[arg(long)]
        json: bool,
    },
    /// Make slots until N are ready [default: `[pool] size` of agentbox.toml]
    Fill {
        count: Option<usize>,
        /// A label on the slots' containers (a task with the same labels takes them)
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    /// Remove every ready slot
    Drain,
}

pub async fn pool(context: &Context, args: Args) -> Result<u8, CommandError> {
    match args.action {
        Action::Status { json } => status(context, json),
        Action::Fill { count, labels } => fill(context, count, &labels).await,
        Action::Drain => drain(context).await,
    }
}

fn status(context: &Context, json: bool) -> Result<u8, CommandError> {
    let ws = context.workspace().map_err(failed)?;
    let slots = pool::status(&ws).map_err(failed)?;
    let mut out = String::new();
    for (slot, busy) in &slots {
        let state = match (slot.state, busy) {
            (SlotState::Creating, false) | (SlotState::Taken, false) => "dead",
            (SlotState::Creating, true) => "creating",
            (SlotState::Ready, _) => "ready",
            (SlotState::Taken, true) => "taken",
        };
        if json {
            let line = serde_json::json!({
                "slot": slot.id,
                "state": state,
                "image": slot.image,
                "base": slot.base,
                "base_commit": slot.base_commit,
                "worktree": slot.worktree,
                "created_at": humantime::format_rfc3339_seconds(slot.created_at).to_string(),
            });
            out.push_str(&format!("{line}\n"));
        } else {
            out.push_str(&format!(
                "{}  {state:<8}  {}  {} ({})\n",
                slot.id,
                slot.image,
                slot.base,
                &slot.base_commit[..slot.base_commit.len().min(7)]
            ));
        }
    }
    if slots.is_empty() && !json {
        eprintln!("agentbox: the pool is empty; `agentbox pool fill` makes slots");
    }
    let refill = std::fs::read_to_string(pool::refill_log(&ws)).unwrap_or_default();
    if let Some(error) = refill.lines().find(|l| l.starts_with("agentbox: error")) {
        super::say(&format!(
            "agentbox: the last refill in the background failed: {error}"
        ));
    }
    write_stdout(out.as_bytes())?;
    Ok(0)
}

async fn fill(context: &Context, count: Option<usize>, raw: &[String]) -> Result<u8, CommandError> {
    let fail =
        |e: Box<dyn std::error::Error + Send + Sync>| CommandError::new(e, EXIT_AGENTBOX_FAILED);
    let (ws, config, runtime, _) = context.prepare_runs(None, None, false).await?;
    let count = count.unwrap_or(config.pool.size);
    if count == 0 {
        return Err(fail(
            "no pool size: pass N, or set [pool] size in agentbox.toml".into(),
        ));
    }
    let task = TaskName::parse("pool").expect("a valid name");
    let mut request = context.default_request(task, &config, &ws);
    request.labels = labels(raw)?;
    let made = pool::fill(&ws, &*runtime, &request, count)
        .await
        .map_err(|e| fail(e.into()))?;
    eprintln!(
        "agentbox: made {made} slot(s); {count} ready for {}",
        request.image
    );
    Ok(0)
}

async fn drain(context: &Context) -> Result<u8, CommandError> {
    let ws = context.workspace().map_err(failed)?;
    let runtime = context.runtime().await.map_err(failed)?;
    let mut removed = 0;
    for (slot, busy) in pool::status(&ws).map_err(failed)? {
        if busy && slot.state != SlotState::Ready {
            continue;
        }
        pool::remove_slot(&ws, &*runtime, &slot)
            .await
            .map_err(failed)?;
        removed += 1;
    }
    eprintln!("agentbox: removed {removed} slot(s)");
    Ok(0)
}

/// Starts `agentbox pool fill` in the background (once a run started), with the labels the run had
/// so that new slots serve the same kind of task. It makes nothing when the pool is full.
pub fn refill_in_background(
    start_dir: &std::path::Path,
    labels: &[(String, String)],
    log: &std::path::Path,
) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let said = std::fs::File::create(log)
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null());
    let mut command = tokio::process::Command::new(exe);
    command.arg("--repo").arg(start_dir).args(["pool", "fill"]);
    for (key, value) in labels {
        command.arg("--label").arg(format!("{key}={value}"));
    }
    let _ = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(said)
        .process_group(0)
        .kill_on_drop(false)
        .spawn();
}
