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
            // Bad input (a recording that is not one, truncated or corrupt; a bad web config;
            // a command that cannot run where it was started) is the user's to fix, like a bad
            // flag: exit 2 as clap does. Everything else is 1.
            let bad_input = |c: &(dyn std::error::Error + 'static)| {
                c.is::<tcptrace::source::record::RecordError>()
                    || c.is::<tcptrace::views::serve::webconfig::WebConfigError>()
                    || c.is::<tcptrace::app::UsageError>()
            };
            if err.chain().any(bad_input) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
