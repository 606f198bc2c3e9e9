use denokv::config::Command;

fn main() {
    // Before anything else: every thread started later inherits both.
    denokv::fatal::install_panic_hook();
    if let Err(e) = denokv::runtime::block_signals() {
        eprintln!("Error: cannot block signals: {e:#}");
        std::process::exit(1);
    }
    let cli = denokv::config::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            let logging = denokv::telemetry::init_logging(args.log_level_file());
            // Only when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set.
            let traces = denokv::traces::init_from_env();
            let served = args
                .into_options(cli.sqlite_path)
                .and_then(|opts| denokv::runtime::serve(opts, Some(&logging)));
            // After the drain: the spans of the last requests and commits are exported.
            if let Some(traces) = traces {
                traces.shutdown();
            }
            served
        }
        Command::Pitr(command) => {
            let _logging = denokv::telemetry::init_logging(None);
            command.run(&cli.sqlite_path)
        }
        Command::Restore(args) => {
            denokv::telemetry::init_logging(None);
            args.s3
                .location()
                .and_then(|location| {
                    denokv::backup::restore::restore(&cli.sqlite_path, location, args.versionstamp)
                })
                .map(|restored| println!("{}", restored.describe()))
        }
    };
    if let Err(e) = result {
        eprintln!("{}Error: {e:#}", denokv::telemetry::error_prefix());
        std::process::exit(1);
    }
}
