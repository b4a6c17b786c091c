use std::path::PathBuf;

use super::{CommandError, Context, failed, write_stdout};

const BEGIN: &str =
    "<!-- agentbox:begin (written by `agentbox agent-setup`; it replaces this part) -->";
const END: &str = "<!-- agentbox:end -->";

/// What a coding agent is told: work through agentbox, never directly in the checkout.
const INSTRUCTIONS: &str = "\
## Working through agentbox

This repository is worked on through agentbox: every change is made in a task of its own, in its
own container, on its own branch `agentbox/<task>`, and never directly in this checkout.

- With the agentbox MCP server (`agentbox mcp`; tools `task_create`, `task_run`, `file_read`,
  `file_write`, `file_edit`, `file_list`, `file_delete`, `task_diff`, `task_commit`, `task_stop`,
  `task_list`, `task_logs`, `task_add_service`):
  1. `task_create` with a short name for the piece of work (`fix-login`); it returns the branch and
     the worktree. Paths given to the file tools are relative to the task's worktree.
  2. Read and change files with the file tools; run builds, tests and git with `task_run`
     (it returns the exit code and the end of the output).
  3. Look at `task_diff`, then `task_commit` with a message saying why.
  4. `task_stop` when done: the branch keeps everything, uncommitted work as a snapshot commit.
- Without MCP, the same through the CLI: `agentbox up <task>`, `agentbox exec <task> -- <command>`,
  `agentbox diff <task>`, `agentbox exec <task> -- git commit -am \"<message>\"`,
  `agentbox stop <task>`.
- Several tasks may run at once; each has its own ports (`agentbox ports <task>`).
- Never push, never change branches other than your task's, never edit files outside the task's
  worktree.
";

/// Write the instructions that tell a coding agent to work through agentbox into AGENTS.md (or
/// CLAUDE.md) at the root of the checkout; a part written before is replaced
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The instructions file, relative to the checkout's root (AGENTS.md for Codex, Cursor and
    /// most agents; CLAUDE.md for Claude Code)
    #[arg(long, value_name = "FILE", default_value = "AGENTS.md")]
    file: PathBuf,
    /// Print the instructions instead of writing them
    #[arg(long)]
    print: bool,
}

pub fn agent_setup(context: &Context, args: Args) -> Result<u8, CommandError> {
    let section = format!("{BEGIN}\n{INSTRUCTIONS}{END}\n");
    if args.print {
        write_stdout(section.as_bytes())?;
        return Ok(0);
    }
    let ws = context.workspace().map_err(failed)?;
    let root = ws.repo.workdir.clone().ok_or_else(|| {
        failed("this is a bare repository: there is no checkout to write the instructions into")
            .with_hint("run it in a worktree, or `agentbox agent-setup --print` and put them where you like")
    })?;
    let path = root.join(&args.file);
    let existing = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(failed(format!("cannot read {}: {e}", path.display()))),
    };
    let updated = merge(existing.as_deref(), &section);
    std::fs::write(&path, &updated)
        .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    let verb = match existing {
        None => "wrote",
        Some(text) if text.contains(BEGIN) => "updated the agentbox part of",
        Some(_) => "added the agentbox part to",
    };
    eprintln!("agentbox: {verb} {}", path.display());
    Ok(0)
}

/// The file with `section` in place of an earlier one, or appended.
fn merge(existing: Option<&str>, section: &str) -> String {
    let Some(text) = existing else {
        return section.to_owned();
    };
    if let (Some(start), Some(end)) = (text.find(BEGIN), text.find(END))
        && start < end
    {
        let after = &text[end + END.len()..];
        let after = after.strip_prefix('\n').unwrap_or(after);
        return format!("{}{section}{after}", &text[..start]);
    }
    let separator = if text.is_empty() || text.ends_with("\n\n") {
        ""
    } else if text.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    format!("{text}{separator}{section}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_appended_once_and_replaced_after() {
        let section = format!("{BEGIN}\nnew\n{END}\n");
        assert_eq!(merge(None, &section), section);
        let appended = merge(Some("# Project\nrules"), &section);
        assert_eq!(appended, format!("# Project\nrules\n\n{section}"));
        let old = format!("# Project\n\n{BEGIN}\nold\n{END}\nafter\n");
        assert_eq!(
            merge(Some(&old), &section),
            format!("# Project\n\n{section}after\n")
        );
    }
}
