//! The `tcptrace` binary: a thin shell over the library.
use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = tcptrace::cli::Cli::parse();
    match tcptrace::app::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tcptrace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
