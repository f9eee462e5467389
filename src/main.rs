//! pgrouter's binary: parse the command line and hand over to [`pgrouter::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pgrouter::cli::Cli::parse().run()
}
