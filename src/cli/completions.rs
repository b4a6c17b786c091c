use clap::CommandFactory;

use super::{Cli, CommandError, write_stdout};

/// Print a shell completion script for agentbox (bash, zsh, fish, elvish, powershell), e.g.
/// `agentbox completions bash > ~/.local/share/bash-completion/completions/agentbox`
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

pub fn completions(args: Args) -> Result<u8, CommandError> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "agentbox", &mut script);
    write_stdout(&script)?;
    Ok(0)
}
