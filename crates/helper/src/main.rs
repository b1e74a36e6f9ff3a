//! `podfleet-helper`: the helper alone, for tests and images built without the whole
//! podfleet binary. Same command line as `podfleet helper ...`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "podfleet-helper", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one helper stage of a job.
    Helper(podfleet_helper::cli::HelperArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("podfleet-helper: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Helper(args) => runtime.block_on(podfleet_helper::cli::run(args)),
    }
}
