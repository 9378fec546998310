//! Developer and CI tasks for the observer: `cargo xtask <task>`. Each task says what it checks
//! and prints every command it runs, so anything it does can be repeated by hand.

mod checks;
mod cmd;
mod run;
mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check what building and running the observer needs, and install what is missing
    /// (Debian packages, rust-src for nightly, bpf-linker 0.13, tracefs). Safe to rerun.
    Setup {
        /// Only print what would be installed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Build the observer and run it as root: against the host's containerd when systemd
    /// manages it, otherwise against a private containerd sandbox torn down on exit.
    Run {
        /// Build and run the release binary.
        #[arg(long)]
        release: bool,
        /// Skip setup and build (xtask sets this when it re-runs itself under sudo).
        #[arg(long, hide = true)]
        prebuilt: bool,
        /// Arguments for the observer, after `--`.
        #[arg(last = true, value_name = "OBSERVER_ARGS")]
        observer_args: Vec<String>,
    },
    /// Build the observer, then run the workspace tests with OBSERVER_BIN set.
    Test {
        /// Arguments for `cargo test`, after `--` (e.g. `-- -p observer -- --nocapture`).
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        cargo_test_args: Vec<String>,
    },
    /// Check formatting (cargo fmt) and lints (cargo clippy, warnings denied).
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { dry_run } => setup::setup(dry_run).map(|()| ExitCode::SUCCESS),
        Task::Run {
            release,
            prebuilt,
            observer_args,
        } => run::run(run::RunOptions {
            release,
            prebuilt,
            observer_args,
        }),
        Task::Test { cargo_test_args } => {
            checks::test(&cargo_test_args).map(|()| ExitCode::SUCCESS)
        }
        Task::Lint => checks::lint().map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|err| {
        eprintln!("{} error: {err:#}", cmd::TAG);
        ExitCode::FAILURE
    })
}
