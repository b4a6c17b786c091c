use std::path::PathBuf;

use clap::CommandFactory;

use super::{Cli, CommandError, failed, write_stdout};

/// Print agentbox's man page, or write it and one per subcommand (agentbox-run.1, …) into a
/// directory, e.g. `agentbox man --dir ~/.local/share/man/man1`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Write agentbox.1 and agentbox-<subcommand>.1 into this directory
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn man(args: Args) -> Result<u8, CommandError> {
    let command = Cli::command();
    let Some(dir) = args.dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut page)
            .map_err(|e| failed(format!("cannot render the man page: {e}")))?;
        write_stdout(&page)?;
        return Ok(0);
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    let mut pages = vec![("agentbox".to_owned(), command.clone())];
    for sub in command.get_subcommands() {
        let name = format!("agentbox-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .version(env!("CARGO_PKG_VERSION"));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut text = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut text)
            .map_err(|e| failed(format!("cannot render {}: {e}", path.display())))?;
        std::fs::write(&path, text)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
        eprintln!("agentbox: wrote {}", path.display());
    }
    Ok(0)
}
