use denokv::config::Command;

fn main() {
    let cli = denokv::config::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let logging = denokv::telemetry::init_logging(args.log_level_file());
            args.into_options(cli.sqlite_path)
                .and_then(|opts| denokv::runtime::serve(opts, Some(&logging)))
        }
    };
    if let Err(e) = result {
        eprintln!("{}Error: {e:#}", denokv::telemetry::error_prefix());
        std::process::exit(1);
    }
}
