//! Files in a task's worktree, from the host side: read, write, edit, list, delete.
//!
//! Everything goes through [`GuardedDir`]: the worktree is opened once (its path is agentbox's
//! own), and every path below it is walked one component at a time without following a symlink.
//! A path with `..` or an absolute one is refused before anything is opened; a symlink on the way
//! or at the end is refused whatever it points to (the task may have planted it to lead the host
//! out of the worktree); nothing but a regular file is read or replaced. The worktree's `.git` (the
//! task's link to its git dir) and any `.git` below it are not the tools' to touch.

use std::path::{Component, Path, PathBuf};

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Server, ToolError, ToolResult, done, parse_task, respond};
use crate::fs_guard::{FileType, GuardedDir};
use crate::task::TaskName;

/// The largest file the tools read or edit.
const MAX_FILE: u64 = 8 << 20;
/// The most entries one listing returns.
const MAX_ENTRIES: usize = 5000;

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadParams {
    /// The task's name.
    pub task: String,
    /// Path relative to the task's worktree.
    pub path: String,
    /// First line to return, counting from 1 (default: the first).
    #[serde(default)]
    pub start_line: Option<usize>,
    /// Last line to return, inclusive (default: the last).
    #[serde(default)]
    pub end_line: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteParams {
    /// The task's name.
    pub task: String,
    /// Path relative to the task's worktree; missing directories are made.
    pub path: String,
    /// The file's whole new content.
    pub content: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct EditParams {
    /// The task's name.
    pub task: String,
    /// Path relative to the task's worktree.
    pub path: String,
    /// The exact text to find; it must occur exactly once unless replace_all.
    pub old_string: String,
    /// What replaces it.
    pub new_string: String,
    /// Replace every occurrence.
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListParams {
    /// The task's name.
    pub task: String,
    /// Directory relative to the task's worktree (default: the worktree).
    #[serde(default)]
    pub path: Option<String>,
    /// Everything below it too (`.git` and symlinked directories are not entered).
    #[serde(default)]
    pub recursive: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct DeleteParams {
    /// The task's name.
    pub task: String,
    /// Path relative to the task's worktree: a file, a symlink (itself) or an empty directory.
    pub path: String,
}

#[derive(Debug, Serialize)]
struct ListedEntry {
    path: String,
    /// `file`, `dir`, `symlink` or `other`.
    kind: &'static str,
    size: Option<u64>,
    /// Where a symlink points (never followed).
    target: Option<String>,
}

/// A path an agent gave, checked: relative, no `..`, not the worktree's `.git`.
fn checked(path: &str) -> Result<PathBuf, ToolError> {
    let given = Path::new(path);
    let mut clean = PathBuf::new();
    for component in given.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ToolError::new(format!(
                    "path {path:?} leaves the task's worktree ('..' is refused)"
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ToolError::new(format!(
                    "path {path:?} is absolute; paths are relative to the task's worktree"
                )));
            }
        }
    }
    // The worktree's `.git` (the task's link to its git dir, or whatever the task put in its
    // place) and any repository's git dir below it: what git reads there, it obeys.
    if clean
        .components()
        .any(|part| part.as_os_str().eq_ignore_ascii_case(".git"))
    {
        return Err(ToolError::new(format!(
            "path {path:?} is in a git dir or is the task's link to one; use task_run with git instead"
        )));
    }
    Ok(clean)
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        _ => "other",
    }
}

#[tool_router(router = file_router, vis = "pub(super)")]
impl Server {
    #[tool(
        description = "Read a text file in a task's worktree, whole or a range of lines (numbered from 1)."
    )]
    async fn file_read(&self, Parameters(params): Parameters<ReadParams>) -> ToolResult {
        respond(self.read(params).await)
    }

    #[tool(
        description = "Write a file in a task's worktree (replacing it if it exists; missing directories are made)."
    )]
    async fn file_write(&self, Parameters(params): Parameters<WriteParams>) -> ToolResult {
        respond(self.write(params).await)
    }

    #[tool(
        description = "Replace exact text in a file of a task's worktree: old_string must occur once (or set replace_all). Returns the lines that matched."
    )]
    async fn file_edit(&self, Parameters(params): Parameters<EditParams>) -> ToolResult {
        respond(self.edit(params).await)
    }

    #[tool(description = "List a directory of a task's worktree (recursive if asked).")]
    async fn file_list(&self, Parameters(params): Parameters<ListParams>) -> ToolResult {
        respond(self.list_files(params).await)
    }

    #[tool(
        description = "Delete a file, a symlink (itself) or an empty directory in a task's worktree."
    )]
    async fn file_delete(&self, Parameters(params): Parameters<DeleteParams>) -> ToolResult {
        respond(self.delete(params).await)
    }
}

impl Server {
    /// The task's worktree, opened without following a symlink, on a blocking thread.
    async fn in_worktree<T: Send + 'static>(
        &self,
        task: &str,
        work: impl FnOnce(&GuardedDir, &TaskName) -> Result<T, ToolError> + Send + 'static,
    ) -> Result<T, ToolError> {
        let task = parse_task(task)?;
        let record = self.record(&task)?;
        if !record.worktree.is_dir() {
            return Err(ToolError::new(format!(
                "task {task} has no worktree (it is {}); its work is on branch {}",
                record.state.as_str(),
                record.branch
            ))
            .hint(format!("task_create with name {task} starts it again")));
        }
        let worktree = record.worktree.clone();
        tokio::task::spawn_blocking(move || {
            let dir = GuardedDir::open(&worktree)?;
            work(&dir, &task)
        })
        .await
        .map_err(ToolError::new)?
    }

    async fn read(&self, params: ReadParams) -> Result<CallToolResult, ToolError> {
        let relative = checked(&params.path)?;
        let shown = params.path.clone();
        let text = self
            .in_worktree(&params.task, move |dir, task| {
                let bytes = dir.read_file(&relative, MAX_FILE)?.ok_or_else(|| {
                    ToolError::new(format!("no file {shown:?} in task {task}'s worktree"))
                })?;
                String::from_utf8(bytes)
                    .map_err(|_| ToolError::new(format!("{shown:?} is not UTF-8 text")))
            })
            .await?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let total = lines.len();
        let first = params.start_line.unwrap_or(1).max(1);
        let last = params.end_line.unwrap_or(total).min(total);
        let content: String = if first > last {
            String::new()
        } else {
            lines[first - 1..last].concat()
        };
        let short = if content.is_empty() {
            format!(
                "{} has {total} lines; none in the range asked for",
                params.path
            )
        } else {
            content.clone()
        };
        done(
            short,
            serde_json::json!({
                "path": params.path,
                "content": content,
                "start_line": first,
                "end_line": last,
                "total_lines": total,
            }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn write(&self, params: WriteParams) -> Result<CallToolResult, ToolError> {
        let relative = checked(&params.path)?;
        let bytes = params.content.into_bytes();
        let size = bytes.len();
        let created = self
            .in_worktree(&params.task, move |dir, _| {
                let existing = dir.stat(&relative)?;
                let mode = existing.map_or(0o644, |e| e.mode & 0o777);
                dir.write_file(&relative, &bytes, mode)?;
                Ok(existing.is_none())
            })
            .await?;
        let verb = if created { "created" } else { "replaced" };
        done(
            format!("{verb} {} ({size} bytes)", params.path),
            serde_json::json!({ "path": params.path, "bytes": size, "created": created }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn edit(&self, params: EditParams) -> Result<CallToolResult, ToolError> {
        let relative = checked(&params.path)?;
        if params.old_string.is_empty() {
            return Err(ToolError::new(
                "old_string is empty; file_write replaces a whole file",
            ));
        }
        let shown = params.path.clone();
        let (old, new, all) = (params.old_string, params.new_string, params.replace_all);
        let lines = self
            .in_worktree(&params.task, move |dir, task| {
                let bytes = dir.read_file(&relative, MAX_FILE)?.ok_or_else(|| {
                    ToolError::new(format!("no file {shown:?} in task {task}'s worktree"))
                })?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| ToolError::new(format!("{shown:?} is not UTF-8 text")))?;
                let starts: Vec<usize> = text.match_indices(&old).map(|(i, _)| i).collect();
                match starts.len() {
                    0 => {
                        return Err(ToolError::new(format!(
                            "old_string does not occur in {shown:?}; nothing was changed"
                        )));
                    }
                    n if n > 1 && !all => {
                        let at: Vec<String> = starts
                            .iter()
                            .map(|&i| (text[..i].matches('\n').count() + 1).to_string())
                            .collect();
                        return Err(ToolError::new(format!(
                            "old_string occurs {n} times in {shown:?} (lines {}); give more context to pick one, or set replace_all",
                            at.join(", ")
                        )));
                    }
                    _ => {}
                }
                let lines: Vec<usize> = starts
                    .iter()
                    .map(|&i| text[..i].matches('\n').count() + 1)
                    .collect();
                let mode = dir.stat(&relative)?.map_or(0o644, |e| e.mode & 0o777);
                let changed = text.replace(&old, &new);
                dir.write_file(&relative, changed.as_bytes(), mode)?;
                Ok(lines)
            })
            .await?;
        let at: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        done(
            format!(
                "replaced {} occurrence{} in {} (line {})",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" },
                params.path,
                at.join(", ")
            ),
            serde_json::json!({ "path": params.path, "replacements": lines.len(), "lines": lines }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn list_files(&self, params: ListParams) -> Result<CallToolResult, ToolError> {
        let base = match params.path.as_deref() {
            None | Some("") | Some(".") => PathBuf::new(),
            Some(path) => checked(path)?,
        };
        let recursive = params.recursive;
        let shown = base.clone();
        let (entries, truncated) = self
            .in_worktree(&params.task, move |root, _| {
                let mut entries = Vec::new();
                // Directories still to list, by path: each is opened (walked again from the root,
                // without following a symlink) when its turn comes, so a tree of many directories
                // does not hold a descriptor for each at once.
                let mut pending = vec![base.clone()];
                let mut truncated = false;
                while let Some(at) = pending.pop() {
                    if truncated {
                        break;
                    }
                    let dir = root.dir(&at, false)?;
                    let mut found = dir.entries()?;
                    found.sort_by(|a, b| a.0.cmp(&b.0));
                    for (name, kind) in found {
                        if entries.len() >= MAX_ENTRIES {
                            truncated = true;
                            break;
                        }
                        let path = at.join(&name);
                        let name_path = Path::new(&name);
                        let target = (kind == FileType::Symlink)
                            .then(|| dir.read_link(name_path).ok())
                            .flatten()
                            .map(|t| t.display().to_string());
                        let size = (kind == FileType::RegularFile)
                            .then(|| dir.stat(name_path).ok().flatten().map(|e| e.size))
                            .flatten();
                        if recursive
                            && kind == FileType::Directory
                            && !name.eq_ignore_ascii_case(".git")
                        {
                            pending.push(path.clone());
                        }
                        entries.push(ListedEntry {
                            path: path.display().to_string(),
                            kind: kind_name(kind),
                            size,
                            target,
                        });
                    }
                }
                entries.sort_by(|a, b| a.path.cmp(&b.path));
                Ok((entries, truncated))
            })
            .await?;
        let mut text: String = entries
            .iter()
            .map(|e| match (&e.target, e.kind) {
                (Some(target), _) => format!("{} -> {target}\n", e.path),
                (None, "dir") => format!("{}/\n", e.path),
                _ => format!("{}\n", e.path),
            })
            .collect();
        if truncated {
            text.push_str(&format!("[only the first {MAX_ENTRIES} entries]\n"));
        }
        if entries.is_empty() {
            text = format!("{} is empty", shown.display());
        }
        done(
            text,
            serde_json::json!({ "path": shown.display().to_string(), "entries": entries, "truncated": truncated }),
        )
        .map_err(|e| ToolError::new(e.message))
    }

    async fn delete(&self, params: DeleteParams) -> Result<CallToolResult, ToolError> {
        let relative = checked(&params.path)?;
        if relative.as_os_str().is_empty() {
            return Err(ToolError::new("the worktree itself cannot be deleted"));
        }
        let shown = params.path.clone();
        let removed = self
            .in_worktree(&params.task, move |dir, task| {
                dir.remove(&relative)
                    .map_err(|e| match e {
                        crate::fs_guard::GuardError::Io { source, .. }
                            if source.raw_os_error()
                                == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) =>
                        {
                            ToolError::new(format!(
                                "directory {shown:?} is not empty; delete what is in it first"
                            ))
                        }
                        other => ToolError::from(other),
                    })?
                    .ok_or_else(|| {
                        ToolError::new(format!("no {shown:?} in task {task}'s worktree"))
                    })
            })
            .await?;
        done(
            format!("deleted {} ({})", params.path, kind_name(removed)),
            serde_json::json!({ "path": params.path, "kind": kind_name(removed) }),
        )
        .map_err(|e| ToolError::new(e.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_worktree_are_refused_before_anything_is_opened() {
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            ".git/config",
            "./.git",
            "vendor/lib/.git/hooks/pre-commit",
            ".GIT/config",
        ] {
            assert!(checked(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(checked("./a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(
            checked("src/.gitignore").unwrap(),
            PathBuf::from("src/.gitignore")
        );
    }
}
