//! `observer`: the agent's entry point. Parses the command line, sets up logging, and runs
//! either the agent or the `status` client.

use std::process::ExitCode;

use clap::Parser as _;
use observer::{
    agent,
    config::{Cli, Command, Settings, StatusArgs},
    status,
};
use tracing_subscriber::EnvFilter;

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
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            let settings = match Settings::resolve(&cli.run) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("observer: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(agent::run(settings, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("observer: {e:#}");
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

async fn show_status(args: StatusArgs) -> ExitCode {
    let addr = args
        .status_listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 9847)));
    let body = match status::fetch(addr).await {
        Ok(body) => body,
        Err(e) => {
            eprintln!("observer status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let doc: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("observer status: the status document is not JSON ({e})");
            return ExitCode::FAILURE;
        }
    };
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!("state:      {}", s(&doc["state"]));
    println!(
        "containerd: {} pid {} version {}",
        s(&doc["unit"]),
        s(&doc["containerd_pid"]),
        s(&doc["containerd_version"])
    );
    println!("mode:       {}", s(&doc["mode"]));
    let probe = &doc["last_probe"];
    println!(
        "last probe: {} {} ({} ms)",
        s(&probe["at"]),
        s(&probe["result"]),
        s(&probe["latency_ms"])
    );
    if let Some(sensors) = doc["sensors"].as_object() {
        for (name, sensor) in sensors {
            println!(
                "sensor:     {name} {} via {}{}",
                s(&sensor["state"]),
                s(&sensor["hook"]),
                sensor["reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(v) = doc["verdicts"].as_array().and_then(|v| v.last()) {
        println!(
            "verdict:    {} at {} after {} ms",
            s(&v["state"]),
            s(&v["at"]),
            s(&v["detection_latency_ms"])
        );
    }
    if let Some(r) = doc["restarts"].as_array().and_then(|v| v.last()) {
        println!(
            "restart:    {} at {} ({}), pid {} -> {}",
            s(&r["reason"]),
            s(&r["at"]),
            s(&r["job_result"]),
            s(&r["old_pid"]),
            s(&r["new_pid"])
        );
    }
    ExitCode::SUCCESS
}
