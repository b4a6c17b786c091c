//! `agentbox review`: a task's commits (with their stats) and its diff against its base — at its
//! live state while it runs (uncommitted work included), at its branch once it has ended. As text
//! for a pager, or as data for `--json`.
//!
//! Every git command runs in the [`engine`](super::engine) (agentbox's configuration, no diff or
//! textconv driver can run, `--no-ext-diff`), over objects only.

use serde::Serialize;

use super::engine::{Engine, Store};
use super::{LandError, TaskWork, short};
use crate::git::snapshot::LiveObjects;
use crate::task::TaskName;
use crate::workspace::Workspace;

/// What `review` shows; its JSON form is the `review --json` schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Review {
    pub task: String,
    /// As `ls` names it (`branch` when agentbox forgot the task and only its branch is left).
    pub state: String,
    pub branch: String,
    /// The base as the task was started with (usually a branch), when agentbox knows it.
    pub base: Option<String>,
    /// The commit the task's changes are shown against.
    pub base_commit: String,
    /// The branch's tip; `None` when the task has no branch.
    pub tip: Option<String>,
    /// The files are the task's worktree as it is now, uncommitted work included.
    pub live: bool,
    /// Oldest first.
    pub commits: Vec<ReviewCommit>,
    /// Everything the task changed against `base_commit`.
    pub files: Vec<FileChange>,
    /// Paths changed in the worktree and not committed yet (only when `live`).
    pub uncommitted: Vec<String>,
    /// The review as text (git's log and diff), for a pager.
    #[serde(skip)]
    pub text: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewCommit {
    pub commit: String,
    pub author: String,
    pub email: String,
    /// Author date, strict ISO 8601.
    pub date: String,
    pub subject: String,
    pub files: Vec<FileStat>,
}

/// Lines added and deleted in a file; `None` for a binary file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileStat {
    pub path: String,
    pub added: Option<u64>,
    pub deleted: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    /// `added`, `modified`, `deleted` or `type-changed`.
    pub status: &'static str,
    pub added: Option<u64>,
    pub deleted: Option<u64>,
}

/// Reviews the task; `color` makes the text coloured (git's colours).
pub async fn review(ws: &Workspace, task: &TaskName, color: bool) -> Result<Review, LandError> {
    let work = TaskWork::find(ws, task)?;
    let mut engine = Engine::new(ws, Store::Scratch)?;
    let live = work.live_tree(ws, LiveObjects::Scratch).await?;
    if let Some(live) = &live {
        engine.borrow_objects(live.objects.clone());
    }
    let tip = match &live {
        Some(live) => Some(live.tip),
        None => work.tip,
    };
    let Some(tip) = tip else {
        return Err(LandError::NoBranch { task: task.clone() });
    };
    let base = match work.base_commit() {
        Some(base) => base,
        None => {
            let head = ws.repo.resolve_commit("HEAD")?;
            ws.repo.merge_base(head, tip)?.unwrap_or(head)
        }
    };
    let (base_hex, tip_hex) = (base.to_string(), tip.to_string());
    let after = live
        .as_ref()
        .map_or(tip_hex.clone(), |live| live.tree.to_string());
    let git = engine.git();
    let range = format!("{base_hex}..{tip_hex}");

    let log = git
        .run(&[
            "log",
            "--reverse",
            "--no-renames",
            "--no-ext-diff",
            "--no-textconv",
            "--format=%x1e%H%x1f%an%x1f%ae%x1f%aI%x1f%s",
            "--numstat",
            "-z",
            &range,
        ])
        .await?;
    let commits = parse_log(&log.stdout);
    let status = git
        .run(&[
            "diff",
            "--name-status",
            "-z",
            "--no-renames",
            &base_hex,
            &after,
        ])
        .await?;
    let numstat = git
        .run(&["diff", "--numstat", "-z", "--no-renames", &base_hex, &after])
        .await?;
    let files = file_changes(&status.stdout, &numstat.stdout);
    let uncommitted = match &live {
        Some(live) => {
            let out = git
                .run(&[
                    "diff",
                    "--name-only",
                    "-z",
                    "--no-renames",
                    &tip_hex,
                    &live.tree.to_string(),
                ])
                .await?;
            nul_fields(&out.stdout)
        }
        None => Vec::new(),
    };

    let colour = if color {
        "--color=always"
    } else {
        "--no-color"
    };
    let diff_args = |extra: &'static str, from: &str, to: &str| -> Vec<String> {
        [
            "diff",
            colour,
            "--no-ext-diff",
            "--no-textconv",
            extra,
            from,
            to,
        ]
        .into_iter()
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
    };
    let mut text = Vec::new();
    let state = work.state();
    let base_name = work.record.as_ref().map_or_else(
        || short(&base),
        |r| format!("{} ({})", r.base, short(&base)),
    );
    let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let mut header = format!(
        "task {task} ({state}), branch {}: {}, {} changed against {base_name}",
        work.branch,
        plural(commits.len(), "commit"),
        plural(files.len(), "file"),
    );
    if live.is_some() {
        header.push_str("; live: its worktree as it is now, uncommitted work included");
    }
    push_heading(&mut text, &header, color);
    if !commits.is_empty() {
        text.push(b'\n');
        let log = git
            .run(&[
                "log",
                colour,
                "--no-ext-diff",
                "--no-textconv",
                "--stat",
                "--format=medium",
                &range,
            ])
            .await?;
        text.extend_from_slice(&log.stdout);
    }
    if let Some(live) = live.as_ref().filter(|_| !uncommitted.is_empty()) {
        text.push(b'\n');
        push_heading(
            &mut text,
            "Uncommitted in the worktree (not on the branch yet):",
            color,
        );
        let args = diff_args("--stat", &tip_hex, &live.tree.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        text.extend_from_slice(&git.run(&args).await?.stdout);
    }
    if !files.is_empty() {
        text.push(b'\n');
        push_heading(&mut text, &format!("Changes against {base_name}:"), color);
        for extra in ["--stat", ""] {
            let args = diff_args(extra, &base_hex, &after);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            text.extend_from_slice(&git.run(&args).await?.stdout);
            if !extra.is_empty() {
                text.push(b'\n');
            }
        }
    }

    Ok(Review {
        task: task.to_string(),
        state,
        branch: work.branch.clone(),
        base: work.record.as_ref().map(|r| r.base.clone()),
        base_commit: base_hex,
        tip: work.tip.map(|t| t.to_string()),
        live: live.is_some(),
        commits,
        files,
        uncommitted,
        text,
    })
}

fn push_heading(text: &mut Vec<u8>, line: &str, color: bool) {
    if color {
        text.extend_from_slice(format!("\x1b[1m{line}\x1b[m\n").as_bytes());
    } else {
        text.extend_from_slice(format!("{line}\n").as_bytes());
    }
}

fn nul_fields(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// `git log --format=%x1e%H%x1f%an%x1f%ae%x1f%aI%x1f%s --numstat -z`: per commit, a record
/// separator, the fields, NUL, then `added<TAB>deleted<TAB>path` NUL per file.
fn parse_log(bytes: &[u8]) -> Vec<ReviewCommit> {
    bytes
        .split(|&b| b == 0x1e)
        .filter(|r| !r.is_empty())
        .filter_map(|record| {
            let mut parts = record.split(|&b| b == 0);
            let header = String::from_utf8_lossy(parts.next()?).into_owned();
            let mut fields = header.splitn(5, '\x1f');
            let mut next = || fields.next().unwrap_or_default().to_owned();
            let (commit, author, email, date, subject) = (next(), next(), next(), next(), next());
            let files = parts
                .filter_map(|entry| {
                    let entry = String::from_utf8_lossy(entry);
                    parse_numstat(entry.trim_start_matches('\n'))
                })
                .collect();
            Some(ReviewCommit {
                commit,
                author,
                email,
                date,
                subject,
                files,
            })
        })
        .collect()
}

fn parse_numstat(entry: &str) -> Option<FileStat> {
    let mut fields = entry.splitn(3, '\t');
    let (added, deleted, path) = (fields.next()?, fields.next()?, fields.next()?);
    Some(FileStat {
        path: path.to_owned(),
        added: added.parse().ok(),
        deleted: deleted.parse().ok(),
    })
}

/// `diff --name-status -z` (`M` NUL path NUL …) joined with `diff --numstat -z`.
fn file_changes(status: &[u8], numstat: &[u8]) -> Vec<FileChange> {
    let stats: std::collections::HashMap<String, FileStat> = numstat
        .split(|&b| b == 0)
        .filter_map(|e| parse_numstat(&String::from_utf8_lossy(e)))
        .map(|s| (s.path.clone(), s))
        .collect();
    let fields = nul_fields(status);
    fields
        .chunks(2)
        .filter_map(|pair| {
            let [code, path] = pair else { return None };
            let status = match code.as_str() {
                "A" => "added",
                "D" => "deleted",
                "T" => "type-changed",
                _ => "modified",
            };
            let stat = stats.get(path);
            Some(FileChange {
                path: path.clone(),
                status,
                added: stat.and_then(|s| s.added),
                deleted: stat.and_then(|s| s.deleted),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_with_numstat_are_read_per_commit() {
        let c1 = "1".repeat(40);
        let c2 = "2".repeat(40);
        let out = format!(
            "\x1e{c1}\x1fA U\x1fa@x\x1f2026-01-01T00:00:00+00:00\x1ffix: it\0\n1\t2\tsrc/a.rs\0-\t-\tlogo.png\0\x1e{c2}\x1fB\x1fb@x\x1f2026-01-02T00:00:00+00:00\x1fempty\0"
        );
        let commits = parse_log(out.as_bytes());
        assert_eq!(commits.len(), 2);
        assert_eq!(commits[0].commit, c1);
        assert_eq!(commits[0].subject, "fix: it");
        assert_eq!(
            commits[0].files,
            [
                FileStat {
                    path: "src/a.rs".into(),
                    added: Some(1),
                    deleted: Some(2)
                },
                FileStat {
                    path: "logo.png".into(),
                    added: None,
                    deleted: None
                }
            ]
        );
        assert!(commits[1].files.is_empty());
    }

    #[test]
    fn file_changes_join_status_and_numstat() {
        let changes = file_changes(b"A\0new.txt\0D\0old.txt\0", b"3\t0\tnew.txt\0");
        assert_eq!(changes[0].status, "added");
        assert_eq!(changes[0].added, Some(3));
        assert_eq!(changes[1].status, "deleted");
        assert_eq!(changes[1].added, None);
    }
}
