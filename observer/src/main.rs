//! `observer`: the agent's entry point. Parses the command line, sets up logging, and runs
//! the agent, the `status` client or `doctor`.

use std::{io::IsTerminal as _, process::ExitCode, time::SystemTime};

use clap::Parser as _;
use observer::{
    config::{Cli, Command, DoctorArgs, Settings, StatusArgs},
    daemon::{agent, logging},
    doctor,
    report::status,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Status(args)) => runtime.block_on(show_status(args)),
        Some(Command::Doctor(args)) => runtime.block_on(run_doctor(args)),
        None => {
            // Settings first: they say how to log.
            let settings = match Settings::resolve(&cli.run) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("observer: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = logging::init(settings.log_format, &settings.log_level) {
                eprintln!("observer: {e}");
                return ExitCode::from(2);
            }
            match runtime.block_on(agent::run(settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `observer status`: exits 0 with the summary (or `--json`, the raw document), 3 when no
/// agent runs at the endpoint, 2 for a bad configuration, 1 when the agent cannot be read.
async fn show_status(args: StatusArgs) -> ExitCode {
    let target = match args.target() {
        Ok(target) => target,
        Err(e) => {
            eprintln!("observer status: {e}");
            return ExitCode::from(2);
        }
    };
    let body = match status::fetch(&target).await {
        Ok(body) => body,
        Err(e) => {
            eprintln!("observer status: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if args.json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let doc: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("observer status: the answer from {target} is not a status document ({e})");
            return ExitCode::FAILURE;
        }
    };
    let colour = logging::colour_allowed(std::io::stdout().is_terminal());
    print!("{}", status::summary(&doc, colour, SystemTime::now()));
    ExitCode::SUCCESS
}

/// `observer doctor`: exits 0 when the agent has what it needs here, 1 when something is
/// missing (each with its fix), 2 for a bad configuration.
async fn run_doctor(args: Box<DoctorArgs>) -> ExitCode {
    let settings = match Settings::resolve(&args.run) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("observer doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let report = doctor::examine(&settings).await;
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("observer doctor: cannot write the findings as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
