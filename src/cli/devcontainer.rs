//! What `run` and `batch` share about the repository's devcontainer.json: the flags, the build's
//! progress on stderr, and `run --dry-run`'s account of a task's environment.

use std::io::{IsTerminal, Write};

use agentbox::Workspace;
use agentbox::config::ProjectConfig;
use agentbox::devcontainer::{self, Choice, PrepareOptions};
use agentbox::runtime::Runtime;
use agentbox::supervisor::RunRequest;

use super::{CommandError, EXIT_AGENTBOX_FAILED};

#[derive(Debug, Default, Clone, clap::Args)]
pub struct DevcontainerArgs {
    /// Take the task's environment from this devcontainer.json, a path in the repository read at
    /// the task's base commit [default: `devcontainer` of agentbox.toml, or
    /// .devcontainer/devcontainer.json or .devcontainer.json when no image is named]
    #[arg(long, value_name = "PATH")]
    pub devcontainer: Option<String>,
    /// Ignore the repository's devcontainer.json
    #[arg(long, conflicts_with = "devcontainer")]
    pub no_devcontainer: bool,
    /// Grant what a devcontainer.json asks for beyond the sandbox (privileged, capAdd,
    /// securityOpt, the same flags in runArgs)
    #[arg(long)]
    pub allow_privileged: bool,
}

impl DevcontainerArgs {
    /// Which file to use: the flag, else `agentbox.toml`'s `devcontainer`, else the usual places
    /// when nothing names an image. `image_flag` is an `--image` (or a task file's `image`).
    fn choice(
        &self,
        config: &ProjectConfig,
        image_flag: bool,
    ) -> Result<Option<Choice>, CommandError> {
        if self.no_devcontainer {
            return Ok(None);
        }
        match (&self.devcontainer, &config.devcontainer) {
            (Some(_), _) if image_flag => Err(CommandError::new(
                "--devcontainer and --image both name the task's image; keep one",
                EXIT_AGENTBOX_FAILED,
            )),
            (Some(path), _) => Ok(Some(Choice::Named(path.clone()))),
            (None, _) if image_flag => Ok(None),
            (None, Some(path)) => Ok(Some(Choice::Named(path.clone()))),
            (None, None) if config.image.is_some() => Ok(None),
            (None, None) => Ok(Some(Choice::Discover)),
        }
    }

    /// Makes `request` the task the devcontainer.json describes, when there is one to use.
    pub async fn apply(
        &self,
        ws: &Workspace,
        runtime: &dyn Runtime,
        request: &mut RunRequest,
        config: &ProjectConfig,
        given: Given,
        said: &mut std::collections::BTreeSet<String>,
    ) -> Result<(), CommandError> {
        let Some(choice) = self.choice(config, given.image)? else {
            return Ok(());
        };
        let options = PrepareOptions {
            choice,
            allow_privileged: self.allow_privileged,
            user_given: given.user,
            config,
        };
        let progress = BuildProgress::new();
        let resolved = devcontainer::prepare(ws, runtime, request, &options, &|line: &str| {
            progress.line(line)
        })
        .await;
        progress.finish();
        let resolved = resolved.map_err(|e| CommandError::new(e, EXIT_AGENTBOX_FAILED))?;
        for note in resolved.iter().flat_map(|r| &r.notes) {
            if said.insert(note.clone()) {
                eprintln!("agentbox: {note}");
            }
        }
        Ok(())
    }
}

/// What the command line (or a task file) named itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Given {
    /// An image (`--image`, a task's `image`): no devcontainer.json is looked for.
    pub image: bool,
    /// A user (`--user`): it wins over the file's.
    pub user: bool,
}

/// The build's output: one line that changes on a terminal, every line otherwise.
struct BuildProgress {
    terminal: bool,
    shown: std::sync::atomic::AtomicBool,
}

impl BuildProgress {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            shown: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn line(&self, line: &str) {
        let line = agentbox::output::sanitize::sanitize_line(line.as_bytes());
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let width = super::terminal::size().map_or(80, |(_, cols)| usize::from(cols));
            let cut: String = line.chars().take(width.saturating_sub(18)).collect();
            let _ = write!(stderr, "\r\x1b[Kagentbox: build: {cut}");
            self.shown.store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            let _ = writeln!(stderr, "agentbox: build: {line}");
        }
    }

    fn finish(&self) {
        if self.shown.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!();
        }
    }
}

/// `run --dry-run`: what the task would be, as text, without creating anything.
pub fn describe(ws: &Workspace, request: &RunRequest) -> Result<String, CommandError> {
    let d = agentbox::supervisor::describe(ws, request)
        .map_err(|e| CommandError::new(e, EXIT_AGENTBOX_FAILED))?;
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("task       {}", d.task));
    line(format!("base       {}", d.base));
    line(format!("image      {}", d.image));
    line(format!(
        "command    {}",
        d.command
            .as_ref()
            .map_or("(the image's own)".to_owned(), shell_words::join)
    ));
    line(format!(
        "user       {}",
        d.user.as_deref().unwrap_or("(the image's own)")
    ));
    line(format!("workdir    {}", d.working_dir));
    line(format!("network    {}", d.network));
    line(format!("limits     {}", d.limits));
    if !d.privileges.is_empty() {
        line(format!("privileges {}", d.privileges));
    }
    line("mounts".to_owned());
    for m in &d.mounts {
        let mode = if m.read_only { "ro" } else { "rw" };
        line(format!("  {} -> {} ({mode})", m.source, m.target));
    }
    if !d.ports.is_empty() {
        line("ports (each gets a host port on 127.0.0.1 when the task starts)".to_owned());
        for (name, port) in &d.ports {
            line(format!("  {name} {port}"));
        }
    }
    line("env".to_owned());
    for (key, value) in &d.env {
        line(format!("  {key}={}", value.as_deref().unwrap_or("****")));
    }
    for (key, value) in &d.shell_env {
        line(format!("  {key}={value} (in the container's shell)"));
    }
    for (heading, steps) in [
        (
            "on the host, in the worktree, before the start",
            &d.host_setup,
        ),
        ("setup, in the container, before the command", &d.setup),
    ] {
        if !steps.is_empty() {
            line(heading.to_owned());
            for (i, step) in steps.iter().enumerate() {
                line(format!(
                    "  {}. {}",
                    i + 1,
                    step.trim_end().replace('\n', "\n     ")
                ));
            }
        }
    }
    for (name, image) in &d.services {
        line(format!("service    {name} ({image})"));
    }
    Ok(out)
}
