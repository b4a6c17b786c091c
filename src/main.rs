use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let parsed = match cli::Cli::try_parse_from(&args) {
        Ok(parsed) => parsed,
        Err(e) => return ExitCode::from(cli::usage_error(&e, &args)),
    };
    let env = cli::Env::from_process();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agentbox: error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_AGENTBOX_FAILED);
        }
    };
    let result = runtime.block_on(cli::dispatch(parsed, env));
    // Nothing may linger: a blocked stdin read or a slow engine request is abandoned here.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            e.report();
            ExitCode::from(e.exit_code)
        }
    }
}
