use clap::Parser;

use denokv::config::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    denokv::telemetry::init_logging();
    let result = match cli.command {
        Command::Serve(args) => args
            .into_options(cli.sqlite_path)
            .and_then(denokv::runtime::serve),
    };
    if let Err(e) = result {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
