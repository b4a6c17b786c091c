//! The task file of `agentbox batch`: `[[task]]` tables, each checked before anything runs.

use std::collections::HashMap;
use std::path::Path;

use indexmap::IndexMap;
use serde::Deserialize;

use super::BatchError;
use crate::config::{CommandSpec, EnvVar, LimitsConfig};
use crate::supervisor::RunRequest;
use crate::task::TaskName;

/// One `[[task]]` of a task file. Every key but `name` is optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskEntry {
    name: String,
    command: Option<CommandSpec>,
    base: Option<String>,
    image: Option<String>,
    #[serde(default)]
    env: IndexMap<String, String>,
    #[serde(default)]
    limits: LimitsConfig,
}

/// A task of a batch, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTask {
    pub name: TaskName,
    pub command: Option<Vec<String>>,
    pub base: Option<String>,
    pub image: Option<String>,
    pub env: Vec<EnvVar>,
    pub limits: LimitsConfig,
}

impl BatchTask {
    /// Applies this task's keys over `request` (which holds `agentbox.toml` and the flags).
    pub fn apply(&self, mut request: RunRequest) -> RunRequest {
        request.task = self.name.clone();
        if self.command.is_some() {
            request.command = self.command.clone();
        }
        if self.base.is_some() {
            request.base = self.base.clone();
        }
        if let Some(image) = &self.image {
            request.image = image.clone();
        }
        request.env.extend(self.env.iter().cloned());
        request.apply_limits(&self.limits);
        request
    }
}

/// Parses a task file; every problem is reported with the file and the task, before anything runs.
pub fn parse_task_file(text: &str, path: &Path) -> Result<Vec<BatchTask>, BatchError> {
    let invalid = |message: String| BatchError::Invalid {
        path: path.to_owned(),
        message,
    };
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_owned()))?;
    let entries = match table.remove("task") {
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            return Err(invalid(
                "`task` must be an array of tables: write [[task]]".into(),
            ));
        }
        None => {
            return Err(invalid(
                "no tasks: add at least one [[task]] with a name".into(),
            ));
        }
    };
    if let Some(key) = table.keys().next() {
        return Err(invalid(format!(
            "unknown key `{key}` (only [[task]] tables belong here)"
        )));
    }
    let mut tasks = Vec::with_capacity(entries.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (position, entry) in entries.into_iter().enumerate() {
        let index = position + 1;
        let name = entry
            .get("name")
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        let task_error = |message: String| BatchError::Task {
            path: path.to_owned(),
            index,
            name: name.clone(),
            message,
        };
        let entry: TaskEntry = entry
            .try_into()
            .map_err(|e: toml::de::Error| task_error(e.message().to_owned()))?;
        let task = TaskName::parse(&entry.name).map_err(|e| task_error(e.to_string()))?;
        if let Some(first) = seen.insert(entry.name.clone(), index) {
            return Err(task_error(format!(
                "the name is already used by task {first}"
            )));
        }
        let env = entry
            .env
            .iter()
            .map(|(key, value)| EnvVar {
                key: key.clone(),
                value: value.clone(),
                secret: false,
            })
            .collect();
        tasks.push(BatchTask {
            name: task,
            command: entry.command.map(|c| c.argv()),
            base: entry.base,
            image: entry.image,
            env,
            limits: entry.limits,
        });
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("tasks.toml")
    }

    #[test]
    fn parses_tasks_with_optional_keys() {
        let tasks = parse_task_file(
            r#"
[[task]]
name = "fix-auth"
command = "make test"
base = "main"
image = "img"
env = { LEVEL = "2" }

[[task]]
name = "lint"
command = ["cargo", "clippy"]
"#,
            path(),
        )
        .unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            tasks[0].command.as_deref().unwrap(),
            ["sh", "-c", "make test"]
        );
        assert_eq!(tasks[0].env[0].key, "LEVEL");
        assert_eq!(tasks[1].command.as_deref().unwrap(), ["cargo", "clippy"]);
        assert_eq!(tasks[1].base, None);
    }

    #[test]
    fn errors_name_the_file_and_the_task() {
        let unknown =
            parse_task_file("[[task]]\nname = \"a\"\ncomand = \"x\"\n", path()).unwrap_err();
        assert!(
            unknown
                .to_string()
                .starts_with("tasks.toml: task 1 (\"a\"): unknown field `comand`"),
            "{unknown}"
        );
        let dup = parse_task_file("[[task]]\nname = \"a\"\n[[task]]\nname = \"a\"\n", path())
            .unwrap_err();
        assert_eq!(
            dup.to_string(),
            "tasks.toml: task 2 (\"a\"): the name is already used by task 1"
        );
        let bad = parse_task_file("[[task]]\nname = \"../x\"\n", path()).unwrap_err();
        assert!(
            bad.to_string()
                .starts_with("tasks.toml: task 1 (\"../x\"): task name"),
            "{bad}"
        );
        let empty = parse_task_file("", path()).unwrap_err();
        assert!(empty.to_string().contains("no tasks"), "{empty}");
        let stray = parse_task_file("parallel = 3\n[[task]]\nname = \"a\"\n", path()).unwrap_err();
        assert!(
            stray.to_string().contains("unknown key `parallel`"),
            "{stray}"
        );
    }
}
