//! What the probe ladder costs: containerd's CPU per probe of each layer (its unit cgroup's
//! `cpu.stat`, shims included) and the agent's (its threads' `schedstat`), then the whole
//! ladder at its defaults. A measurement, not a check: it is ignored by default and prints
//! a table for BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p observer
//! CI=true OBSERVER_BIN=target/release/observer \
//!   cargo test -p observer-tests --test ladder_cost -- --ignored --nocapture
//! ```
//!
//! Needs what every observer test needs (root, eBPF, systemd, containerd, unshare) and
//! busybox-static for the container the `tasks` layer lists.

use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use observer_tests::{OBSERVER_NEEDS, Observer, Sandbox, SandboxOptions, require};

const LAYERS: [&str; 6] = [
    "cri",
    "sandboxes",
    "metadata_read",
    "metadata_write",
    "snapshots",
    "tasks",
];
/// How long each layer is measured, probed every second (twice as long for the layers that
/// run every two periods, so each gets about the same number of probes).
const WINDOW: Duration = Duration::from_secs(30);
/// How long the defaults are measured.
const DEFAULTS_WINDOW: Duration = Duration::from_secs(60);

/// CPU time of the cgroup that holds `pid` (cgroup v2 `cpu.stat`), in microseconds.
fn cgroup_usage_us(pid: u32) -> u64 {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 path");
    let relative = path.trim_start_matches('/');
    let stat = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| PathBuf::from(root).join(relative).join("cpu.stat"))
        .find_map(|p| fs::read_to_string(p).ok())
        .expect("cpu.stat of containerd's unit");
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .expect("usage_usec")
}

/// CPU time of a process's threads (`schedstat`), in microseconds.
fn process_cpu_us(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        / 1000
}

/// The observer's count of probes of `layer` that answered.
fn probes_ok(observer: &Observer, layer: &str) -> u64 {
    let (_, body) = observer.get("/metrics").unwrap();
    let needle =
        format!("containerd_observer_layer_probes_total{{layer=\"{layer}\",result=\"ok\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

struct Run {
    containerd_us: u64,
    agent_us: u64,
    probes: u64,
    wall: Duration,
}

fn measure(sandbox: &Sandbox, args: &[&str], layer: Option<&str>, window: Duration) -> Run {
    let observer = Observer::spawn(sandbox, args).unwrap();
    observer.wait_healthy(Duration::from_secs(20)).unwrap();
    // Past the start: every layer has answered once.
    std::thread::sleep(Duration::from_secs(3));
    let containerd = sandbox.main_pid().unwrap().unwrap();
    let agent = observer_pid(&observer);
    let (cd0, ag0, p0, t0) = (
        cgroup_usage_us(containerd),
        process_cpu_us(agent),
        layer.map_or(0, |l| probes_ok(&observer, l)),
        Instant::now(),
    );
    std::thread::sleep(window);
    let run = Run {
        containerd_us: cgroup_usage_us(containerd) - cd0,
        agent_us: process_cpu_us(agent) - ag0,
        probes: layer.map_or(0, |l| probes_ok(&observer, l)) - p0,
        wall: t0.elapsed(),
    };
    drop(observer);
    run
}

fn observer_pid(observer: &Observer) -> u32 {
    let status: serde_json::Value = observer.status().unwrap();
    status["observer"]["pid"].as_u64().unwrap() as u32
}

fn per_second(us: u64, wall: Duration) -> f64 {
    us as f64 / wall.as_secs_f64()
}

#[test]
#[ignore = "a measurement for BENCHMARKS.md; run it with --ignored"]
fn ladder_cost() {
    let Ok(()) = require("ladder_cost", OBSERVER_NEEDS) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).unwrap();
    let _container = sandbox.run_container().unwrap();
    let common = ["--no-kubernetes", "--ladder-interval", "1s"];
    let with = |probes: &str| -> Vec<String> {
        common
            .iter()
            .map(ToString::to_string)
            .chain(["--probes".into(), probes.into()])
            .collect()
    };
    let baseline_args = with("version");
    let baseline_args: Vec<&str> = baseline_args.iter().map(String::as_str).collect();
    let base = measure(&sandbox, &baseline_args, None, WINDOW);
    println!(
        "baseline (--probes version): containerd {:.0} us/s, agent {:.0} us/s",
        per_second(base.containerd_us, base.wall),
        per_second(base.agent_us, base.wall)
    );
    println!("| layer | probes | containerd CPU per probe | agent CPU per probe |");
    println!("|---|---|---|---|");
    for layer in LAYERS {
        let args = with(&format!("version,{layer}"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let window = if matches!(layer, "metadata_write" | "snapshots" | "tasks") {
            WINDOW * 2
        } else {
            WINDOW
        };
        let run = measure(&sandbox, &args, Some(layer), window);
        let extra = |us: u64, base_us: u64| {
            let base_rate = per_second(base_us, base.wall);
            (us as f64 - base_rate * run.wall.as_secs_f64()).max(0.0) / run.probes.max(1) as f64
        };
        println!(
            "| `{layer}` | {} | {:.0} us | {:.0} us |",
            run.probes,
            extra(run.containerd_us, base.containerd_us),
            extra(run.agent_us, base.agent_us)
        );
    }
    // The defaults: every layer, base period 5 s, against Version() alone at its default.
    let defaults = measure(&sandbox, &["--no-kubernetes"], None, DEFAULTS_WINDOW);
    let version_only = measure(
        &sandbox,
        &["--no-kubernetes", "--probes", "version"],
        None,
        DEFAULTS_WINDOW,
    );
    let pct = |us: u64, wall: Duration| per_second(us, wall) / 1e4;
    println!(
        "defaults, every layer: containerd {:.3} % of a CPU, agent {:.3} %; Version() alone: containerd {:.3} %, agent {:.3} %",
        pct(defaults.containerd_us, defaults.wall),
        pct(defaults.agent_us, defaults.wall),
        pct(version_only.containerd_us, version_only.wall),
        pct(version_only.agent_us, version_only.wall),
    );
}
