use std::io::{IsTerminal, Write};
use std::process::{Command, Stdio};

use agentbox::land::review;
use agentbox::output::json;
use agentbox::output::sanitize::{Colours, sanitize_text};

use super::{CommandError, Context, EXIT_ERROR, failed, task_name, write_stdout};

/// Show a task's commits and its diff against its base (live while it runs), in your pager
#[derive(Debug, clap::Args)]
pub struct Args {
    task: String,
    /// One JSON object: task, state, branch, base, base_commit, tip, live, commits (commit,
    /// author, email, date, subject, files), files (path, status, added, deleted), uncommitted
    #[arg(long)]
    json: bool,
}

pub async fn review(context: &Context, args: Args) -> Result<u8, CommandError> {
    let task = task_name(&args.task, EXIT_ERROR)?;
    let ws = context.workspace().map_err(failed)?;
    let terminal = std::io::stdout().is_terminal();
    let color = terminal && !context.env.no_color && !args.json;
    let review = review::review(&ws, &task, color).await.map_err(failed)?;
    if args.json {
        let mut line = json::to_string(&review).expect("a review always serialises");
        line.push('\n');
        write_stdout(line.as_bytes())?;
    } else {
        // The text quotes the task's commit messages, author names and files as git prints them
        // (raw): shown safely, on a terminal or off it. Only git's own colours are meant.
        let colours = if color { Colours::Keep } else { Colours::Show };
        let shown = sanitize_text(&review.text, colours);
        if terminal {
            page(context, shown.as_bytes())?;
        } else {
            write_stdout(shown.as_bytes())?;
        }
    }
    Ok(0)
}

/// Shows `text` through the user's pager as git would: `GIT_PAGER`, else `PAGER`, else `less`
/// (with `LESS=FRX` unless set, so that a short text just prints and colours pass); an empty
/// pager or `cat` means none.
fn page(context: &Context, text: &[u8]) -> Result<(), CommandError> {
    let vars = &context.env.vars;
    let pager = vars
        .get("GIT_PAGER")
        .or_else(|| vars.get("PAGER"))
        .map_or("less", String::as_str)
        .trim();
    if pager.is_empty() || pager == "cat" {
        return write_stdout(text).map(drop);
    }
    let mut command = Command::new("sh");
    command.args(["-c", pager]).stdin(Stdio::piped());
    if !vars.contains_key("LESS") {
        command.env("LESS", "FRX");
    }
    if !vars.contains_key("LV") {
        command.env("LV", "-c");
    }
    let Ok(mut child) = command.spawn() else {
        return write_stdout(text).map(drop);
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A pager that quits early (`q`) closes its end: not an error.
        let _ = stdin.write_all(text);
    }
    child
        .wait()
        .map_err(|e| failed(format!("cannot wait for the pager {pager:?}: {e}")))?;
    Ok(())
}
