use agentbox::land::conflicts::{self, ConflictKind};
use agentbox::output::json;
use agentbox::output::sanitize::sanitize_name;

use super::{CommandError, Context, EXIT_ERROR, failed, file_list, task_name, write_stdout};

/// Predict which tasks would conflict with each other and with the branch they land on, and in
/// which files (running tasks at their live state), without changing anything
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tasks to compare [default: every task with work]
    tasks: Vec<String>,
    /// Compare with this branch instead of each task's base branch
    #[arg(long, value_name = "BRANCH")]
    into: Option<String>,
    /// JSON Lines: one object per conflict (kind, task, other, files), then a summary (kind
    /// "summary", tasks, pairs, targets, conflicts)
    #[arg(long)]
    json: bool,
}

pub async fn conflicts(context: &Context, args: Args) -> Result<u8, CommandError> {
    let tasks = args
        .tasks
        .iter()
        .map(|t| task_name(t, EXIT_ERROR))
        .collect::<Result<Vec<_>, _>>()?;
    let ws = context.workspace().map_err(failed)?;
    let prediction = conflicts::predict(&ws, &tasks, args.into.as_deref())
        .await
        .map_err(failed)?;
    let mut out = String::new();
    if args.json {
        for conflict in &prediction.conflicts {
            out.push_str(&json::to_string(conflict).expect("a conflict serialises"));
            out.push('\n');
        }
        let summary = serde_json::json!({
            "kind": "summary",
            "tasks": prediction.tasks,
            "pairs": prediction.pairs,
            "targets": prediction.targets,
            "conflicts": prediction.conflicts.len(),
        });
        out.push_str(&json::to_string(&summary).expect("a summary serialises"));
        out.push('\n');
    } else if prediction.conflicts.is_empty() {
        out.push_str("no conflicts\n");
    } else {
        for conflict in &prediction.conflicts {
            let arrow = match conflict.kind {
                ConflictKind::Tasks => "<->",
                ConflictKind::Target => "->",
            };
            out.push_str(&format!(
                "{} {arrow} {}: {}\n",
                conflict.task,
                sanitize_name(&conflict.other),
                file_list(&conflict.files)
            ));
        }
    }
    write_stdout(out.as_bytes())?;
    if !args.json {
        let live = prediction.tasks.iter().filter(|t| t.at == "live").count();
        eprintln!(
            "agentbox: compared {} task{} ({live} at their live state): {} pair{}, {} with their target",
            prediction.tasks.len(),
            if prediction.tasks.len() == 1 { "" } else { "s" },
            prediction.pairs,
            if prediction.pairs == 1 { "" } else { "s" },
            prediction.targets,
        );
    }
    Ok(0)
}
