//! Developer and CI tasks for the observer: `cargo xtask <task>`. Each task says what it checks
//! and prints every command it runs, so anything it does can be repeated by hand.

mod bench;
mod checks;
mod cmd;
mod fuzz;
mod image;
mod report;
mod run;
mod setup;
mod soak;
mod vm;

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
    /// Build the observer, run the workspace tests with OBSERVER_BIN set, then the kernel
    /// matrix (`cargo xtask vm`) on the kernels given by `--kernels`.
    Test {
        /// Debian kernels to run the VM scenarios on after the tests, comma-separated, or
        /// `none`. Default: every kernel under `CI=true`, none otherwise (they take minutes).
        #[arg(long, value_delimiter = ',', value_name = "KERNELS", value_parser = parse_kernel_or_none)]
        kernels: Option<Vec<Option<vm::Kernel>>>,
        /// Arguments for `cargo test`, after `--` (e.g. `-- -p observer -- --nocapture`).
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        cargo_test_args: Vec<String>,
    },
    /// Build the observer's container image offline (as root): the binary built here, a
    /// debootstrap of Debian 12 as the base, the Dockerfile's layout, assembled by podman in a
    /// store of its own. Writes a docker-archive to target/image/containerd-observer.tar.
    Image {
        /// Put the release binary in the image.
        #[arg(long)]
        release: bool,
    },
    /// Check formatting (cargo fmt) and lints (cargo clippy, warnings denied).
    Lint,
    /// Measure recovery from a crash, a freeze and a wedged stop (fused, polling-only and a
    /// Gardener-like reference), the fault zoo against four watchdogs, the agent's cost, and
    /// its slowdown of unrelated work, on the private sandbox (as root). Writes BENCHMARKS.md,
    /// the README's zoo table and benchmarks/results.json.
    Bench {
        /// Trials per fault for the fused and the polling-only configurations.
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Trials per fault for the Gardener-like reference (over a minute each; they run in
        /// parallel sandboxes). 0 leaves it out.
        #[arg(long, default_value_t = 2)]
        reference_trials: usize,
        /// Trials per fault of the fault zoo for fused and polling-only.
        #[arg(long, default_value_t = 2)]
        zoo_trials: usize,
        /// Trials per fault of the zoo for each reference watchdog (Gardener-like,
        /// NPD-like: 2-4 minutes each, in parallel sandboxes). 0 leaves them out.
        #[arg(long, default_value_t = 1)]
        zoo_reference_trials: usize,
        /// Only the fault zoo: writes its table to BENCHMARKS.md and the README and
        /// benchmarks/zoo.json, and leaves the other figures alone.
        #[arg(long)]
        zoo_only: bool,
        /// Only these zoo faults, comma-separated (e.g. storage-stall,hung-shim); the table
        /// then goes to target/bench/zoo-subset.md and leaves BENCHMARKS.md alone [default: all]
        #[arg(long, value_delimiter = ',', value_name = "FAULTS")]
        zoo_faults: Vec<String>,
        /// Only the cost of the blocked-thread program on `sched_switch` (a pipe ping-pong
        /// without the agent, with it on tp_btf and on the classic tracepoint): writes its
        /// block of BENCHMARKS.md and benchmarks/switch.json, and leaves the other figures alone.
        #[arg(long)]
        switch_cost: bool,
        /// One trial each, short windows, no reference: checks that everything runs in about
        /// a minute, and writes to target/bench/ instead of BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
        /// Then run each fuzz target this long (`cargo xtask fuzz`); 0 leaves fuzzing out.
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u64,
    },
    /// Run each fuzz target (observer/fuzz) for a while, seeded from its corpus in the
    /// repository, with cargo-fuzz on nightly (installed when missing). Fails on any crash.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Targets to run [default: all].
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Keep a throttled containerd under load for a while and check that the observer restarts
    /// nothing and its memory stays flat (as root). Exits non-zero on failure.
    Soak {
        /// How long, e.g. 10m or 1h. Runs of 10 minutes or more are recorded in BENCHMARKS.md.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        duration: std::time::Duration,
        /// containerd's CPU cap, in percent of one CPU. At 10 % containerd is slow but alive
        /// under this load on the 2-core machines of BENCHMARKS.md; at 7 % and below it falls
        /// behind now and then, and probes miss their 1 s deadline.
        #[arg(long, default_value_t = 10)]
        cpu_quota: u32,
        /// Connections per second opened and closed against containerd's socket.
        #[arg(long, default_value_t = 200)]
        connect_rate: u32,
        /// CPU hog threads [default: one per CPU].
        #[arg(long)]
        hogs: Option<usize>,
    },
    /// Boot a Debian kernel under QEMU (TCG) with systemd, the system D-Bus and containerd,
    /// and run the observer's scenarios inside it (crash, freeze, exit cause, accept latency).
    Vm {
        /// Which Debian kernel to boot.
        #[arg(long, value_enum)]
        kernel: vm::Kernel,
        /// Kernel paths to run the scenarios on, comma-separated: `auto` (the fentry/tp_btf
        /// fast path where it loads) and `tracepoint` (the fast path turned off).
        #[arg(long, value_delimiter = ',', default_value = "auto,tracepoint")]
        paths: Vec<String>,
        /// Stop the VM after this many minutes.
        #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT_MIN)]
        timeout_min: u64,
        /// The VM's memory in MiB.
        #[arg(long, default_value_t = vm::DEFAULT_MEMORY_MIB)]
        memory_mib: u32,
    },
}

/// A kernel of `vm::Kernel`, or `none` (no kernel matrix).
fn parse_kernel_or_none(value: &str) -> Result<Option<vm::Kernel>, String> {
    use clap::ValueEnum as _;
    if value == "none" {
        return Ok(None);
    }
    vm::Kernel::from_str(value, false)
        .map(Some)
        .map_err(|_| format!("unknown kernel `{value}`: use 6.1, 6.12 or none"))
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
        Task::Test {
            kernels,
            cargo_test_args,
        } => checks::test(&cargo_test_args, kernels).map(|()| ExitCode::SUCCESS),
        Task::Image { release } => {
            image::image(&image::ImageOptions { release }).map(|_| ExitCode::SUCCESS)
        }
        Task::Lint => checks::lint().map(|()| ExitCode::SUCCESS),
        Task::Bench {
            trials,
            reference_trials,
            zoo_trials,
            zoo_reference_trials,
            zoo_only,
            zoo_faults,
            switch_cost,
            quick,
            fuzz_seconds,
        } => bench::bench(bench::BenchOptions {
            trials,
            reference_trials,
            zoo_trials,
            zoo_reference_trials,
            zoo_only,
            zoo_faults,
            switch_cost,
            quick,
            fuzz_seconds,
        }),
        Task::Fuzz { seconds, targets } => {
            fuzz::fuzz(seconds, &targets).map(|()| ExitCode::SUCCESS)
        }
        Task::Soak {
            duration,
            cpu_quota,
            connect_rate,
            hogs,
        } => soak::soak(soak::SoakOptions {
            duration,
            cpu_quota,
            connect_rate,
            hogs,
        }),
        Task::Vm {
            kernel,
            paths,
            timeout_min,
            memory_mib,
        } => vm::vm(vm::VmOptions {
            kernel,
            paths,
            timeout: std::time::Duration::from_secs(timeout_min * 60),
            memory_mib,
        })
        .map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
    };
    result.unwrap_or_else(|err| {
        eprintln!("{} error: {err:#}", cmd::TAG);
        ExitCode::FAILURE
    })
}
