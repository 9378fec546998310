//! What the agent costs: its CPU and memory at rest and under a connection storm, its eBPF
//! programs' run counts and times, and the slowdown it causes on unrelated work.
//!
//! A paced storm must not move the agent's verdict; a flood that keeps containerd's accept
//! queue full shows what the agent makes of a containerd no new client can reach.
//!
//! The agent's CPU is utime + stime from `/proc/<pid>/stat`. The kernel charges an eBPF
//! program's run time to the task that hit the hook (containerd accepting, any process
//! freeing a socket buffer), not to the agent, so the programs' share comes from their own
//! statistics (`sensors.*.programs` in `/status`, BPF stats that the agent turns on).
//! Slowdown rounds alternate without the agent, with the fused agent and with the
//! polling-only agent, in a rotating order, and each round gives its own ratios: a shared,
//! noisy machine drifts less within a round than across a run.

use std::{thread, time::Duration};

use serde::Serialize;
use serde_json::Value;

use super::{
    Summary,
    load::{CycleSocket, Storm, StormSpec, StormStats, syscall_ns},
    procfs,
    recovery::{Config, LOG_ARGS},
    summarize,
};
use crate::{Observer, Sandbox, SandboxOptions};

/// What the node does while the agent's cost is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Nothing but the agent's own heartbeats and probes.
    Rest,
    /// [`StormSpec::paced`] against containerd's socket.
    Storm,
    /// [`StormSpec::flat_out`]: containerd's accept queue stays full.
    Flood,
}

impl Load {
    pub fn label(self) -> &'static str {
        match self {
            Load::Rest => "at rest",
            Load::Storm => "under a connection storm",
            Load::Flood => "under a connection flood",
        }
    }

    fn storm(self) -> Option<StormSpec> {
        match self {
            Load::Rest => None,
            Load::Storm => Some(StormSpec::paced()),
            Load::Flood => Some(StormSpec::flat_out()),
        }
    }
}

/// One cost window.
#[derive(Debug, Clone, Serialize)]
pub struct CostWindow {
    pub config: Config,
    pub load: Load,
    pub seconds: f64,
    /// The agent's CPU, in percent of one CPU.
    pub cpu_percent: f64,
    /// The eBPF programs' run time over the window, in percent of one CPU.
    pub bpf_cpu_percent: f64,
    /// The agent's peak resident memory since it started (startup included).
    pub vm_hwm_mib: f64,
    /// Its resident memory at the end of the window.
    pub vm_rss_mib: f64,
    pub programs: Vec<ProgramCost>,
    pub storm: Option<StormStats>,
    /// Verdicts other than healthy reached during the window (a storm must not cause any).
    pub verdicts: Vec<String>,
    /// Restarts the agent made during the window.
    pub restarts: usize,
    pub error: Option<String>,
}

/// One eBPF program over a window.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramCost {
    pub sensor: String,
    pub name: String,
    pub runs: u64,
    pub runs_per_s: f64,
    pub run_time_ms: f64,
    pub avg_run_ns: f64,
}

impl CostWindow {
    pub fn one_line(&self) -> String {
        if let Some(err) = &self.error {
            return format!("FAILED: {err}");
        }
        let storm = self.storm.as_ref().map_or(String::new(), |s| {
            format!(
                ", storm {:.0} connects/s and {:.0} Version()/s",
                s.connects_per_s(),
                s.version_calls_per_s()
            )
        });
        format!(
            "agent CPU {:.3} %, eBPF programs {:.3} %, VmHWM {:.1} MiB, VmRSS {:.1} MiB{storm}{}",
            self.cpu_percent,
            self.bpf_cpu_percent,
            self.vm_hwm_mib,
            self.vm_rss_mib,
            if self.verdicts.is_empty() {
                String::new()
            } else {
                format!(
                    ", verdicts: {}, {} restart(s)",
                    self.verdicts.join(", "),
                    self.restarts
                )
            }
        )
    }
}

/// Measures the agent in `config` over `window` of `load`, after `warmup`, in a fresh sandbox.
pub fn measure_window(
    config: Config,
    load: Load,
    window: Duration,
    warmup: Duration,
) -> CostWindow {
    let mut result = CostWindow {
        config,
        load,
        seconds: 0.0,
        cpu_percent: f64::NAN,
        bpf_cpu_percent: 0.0,
        vm_hwm_mib: f64::NAN,
        vm_rss_mib: f64::NAN,
        programs: Vec::new(),
        storm: None,
        verdicts: Vec::new(),
        restarts: 0,
        error: None,
    };
    if let Err(err) = fill_window(&mut result, window, warmup) {
        result.error = Some(err);
    }
    result
}

fn fill_window(result: &mut CostWindow, window: Duration, warmup: Duration) -> Result<(), String> {
    let sandbox = Sandbox::start(SandboxOptions::new()).map_err(|e| e.to_string())?;
    let mut args = result.config.args().to_vec();
    args.extend(LOG_ARGS);
    let observer = Observer::spawn(&sandbox, &args).map_err(|e| e.to_string())?;
    let doc = observer
        .wait_healthy(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let pid = doc["observer"]["pid"]
        .as_u64()
        .ok_or("/status has no observer.pid")? as u32;
    thread::sleep(warmup);

    let doc_before = observer.status().map_err(|e| e.to_string())?;
    let before = procfs::sample(pid).map_err(|e| e.to_string())?;
    let storm = result
        .load
        .storm()
        .map(|spec| Storm::start(sandbox.socket(), &spec));
    thread::sleep(window);
    let after = procfs::sample(pid).map_err(|e| e.to_string())?;
    result.storm = storm.map(Storm::stop);
    // The document refreshes program statistics every second; both ends lag alike.
    let doc_after = observer.status().map_err(|e| e.to_string())?;

    result.seconds = after.at.duration_since(before.at).as_secs_f64();
    result.cpu_percent = procfs::cpu_percent(&before, &after);
    result.vm_hwm_mib = after.hwm_kib as f64 / 1024.0;
    result.vm_rss_mib = after.rss_kib as f64 / 1024.0;
    result.programs = program_deltas(&doc_before, &doc_after, result.seconds);
    // A fold from +0.0: an empty f64 sum is -0.0.
    result.bpf_cpu_percent = result
        .programs
        .iter()
        .fold(0.0, |sum, p| sum + p.run_time_ms)
        / (result.seconds * 1e3)
        * 100.0;
    let seen_before = doc_before["verdicts"].as_array().map_or(0, Vec::len);
    result.verdicts = doc_after["verdicts"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(seen_before)
        .filter(|v| v["state"] != "healthy")
        .map(|v| v["state"].as_str().unwrap_or("?").to_owned())
        .collect();
    let restarts = |doc: &Value| doc["restarts"].as_array().map_or(0, Vec::len);
    result.restarts = restarts(&doc_after).saturating_sub(restarts(&doc_before));
    Ok(())
}

/// Each program's runs and run time between two status documents.
fn program_deltas(before: &Value, after: &Value, seconds: f64) -> Vec<ProgramCost> {
    let mut out = Vec::new();
    let Some(sensors) = after["sensors"].as_object() else {
        return out;
    };
    for (sensor, status) in sensors {
        for program in status["programs"].as_array().into_iter().flatten() {
            let name = program["name"].as_str().unwrap_or("?");
            let earlier = before["sensors"][sensor]["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name);
            let field =
                |p: Option<&Value>, key: &str| p.and_then(|p| p[key].as_f64()).unwrap_or(0.0);
            let runs = field(Some(program), "run_count") - field(earlier, "run_count");
            let time = field(Some(program), "run_time_ms") - field(earlier, "run_time_ms");
            out.push(ProgramCost {
                sensor: sensor.clone(),
                name: name.to_owned(),
                runs: runs.max(0.0) as u64,
                runs_per_s: runs.max(0.0) / seconds.max(1e-9),
                run_time_ms: time.max(0.0),
                avg_run_ns: if runs > 0.0 { time * 1e6 / runs } else { 0.0 },
            });
        }
    }
    out
}

/// The slowdown of unrelated work.
#[derive(Debug, Clone, Serialize)]
pub struct Slowdown {
    pub rounds: usize,
    pub sample_s: f64,
    pub workloads: Vec<WorkloadSlowdown>,
}

/// One workload: nanoseconds per operation in each round, and the per-round ratios.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSlowdown {
    pub name: String,
    pub without_ns: Vec<f64>,
    pub fused_ns: Vec<f64>,
    pub polling_ns: Vec<f64>,
    /// Per round: with the fused agent / without.
    pub fused_ratio: Option<Summary>,
    /// Per round: with the polling-only agent / without.
    pub polling_ratio: Option<Summary>,
    /// Per round: the fused agent's eBPF programs' run time per operation of the workload
    /// (BPF stats over the sample, the agent's own background included), in ns.
    pub fused_bpf_ns: Option<Summary>,
}

impl WorkloadSlowdown {
    pub fn one_line(&self) -> String {
        let median = |v: &[f64]| summarize(v).map_or(f64::NAN, |s| s.median);
        format!(
            "{}: {:.0} ns/op without, {:.0} with fused ({:+.1} %; its eBPF programs {:.0} ns/op), {:.0} with polling-only ({:+.1} %)",
            self.name,
            median(&self.without_ns),
            median(&self.fused_ns),
            self.fused_ratio
                .map_or(f64::NAN, |r| (r.median - 1.0) * 100.0),
            self.fused_bpf_ns.map_or(f64::NAN, |s| s.median),
            median(&self.polling_ns),
            self.polling_ratio
                .map_or(f64::NAN, |r| (r.median - 1.0) * 100.0),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arm {
    Without,
    With(Config),
}

/// How long to wait for the status document's next refresh of program statistics.
const STATS_REFRESH: Duration = Duration::from_millis(1100);

pub const CONNECT_CYCLE: &str = "unix connect/accept/close cycle";
pub const SYSCALL: &str = "getppid(2) syscall";

/// `rounds` rounds; each samples both workloads for `sample` in every arm. With the fused
/// agent, the programs' statistics are read around each sample, so their run time can be
/// charged to the workload's operations: a figure the machine's noise does not blur.
pub fn measure_slowdown(rounds: usize, sample: Duration) -> Result<Slowdown, String> {
    let sandbox = Sandbox::start(SandboxOptions::new()).map_err(|e| e.to_string())?;
    let cycle = CycleSocket::bind(sandbox.dir()).map_err(|e| e.to_string())?;
    let arms = [
        Arm::Without,
        Arm::With(Config::Fused),
        Arm::With(Config::PollingOnly),
    ];
    // [workload][arm] -> ns per operation, one per round
    let mut ns: [[Vec<f64>; 3]; 2] = Default::default();
    // [workload] -> eBPF ns per operation with the fused agent, one per round
    let mut bpf: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        for k in 0..arms.len() {
            let index = (round + k) % arms.len();
            let observer = match arms[index] {
                Arm::Without => None,
                Arm::With(config) => {
                    let mut args = config.args().to_vec();
                    args.extend(LOG_ARGS);
                    let observer = Observer::spawn(&sandbox, &args).map_err(|e| e.to_string())?;
                    observer
                        .wait_healthy(Duration::from_secs(20))
                        .map_err(|e| e.to_string())?;
                    // Past the startup burst (BTF, program loading).
                    thread::sleep(Duration::from_secs(1));
                    Some(observer)
                }
            };
            let fused = observer
                .as_ref()
                .filter(|_| arms[index] == Arm::With(Config::Fused));
            for (workload, bpf) in bpf.iter_mut().enumerate() {
                let before = fused
                    .map(Observer::status)
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let (per_op, ops) = match workload {
                    0 => cycle.cycle_ns(sample).map_err(|e| e.to_string())?,
                    _ => syscall_ns(sample),
                };
                ns[workload][index].push(per_op);
                if let (Some(observer), Some(before)) = (fused, before) {
                    // The document refreshes program statistics once a second.
                    thread::sleep(STATS_REFRESH);
                    let after = observer.status().map_err(|e| e.to_string())?;
                    let run_ms = program_deltas(&before, &after, 1.0)
                        .iter()
                        .fold(0.0, |sum, p| sum + p.run_time_ms);
                    bpf.push(run_ms * 1e6 / ops.max(1) as f64);
                }
            }
            drop(observer);
        }
    }
    let ratio = |with: &[f64], without: &[f64]| {
        summarize(
            &with
                .iter()
                .zip(without)
                .map(|(w, wo)| w / wo)
                .collect::<Vec<_>>(),
        )
    };
    let workloads = [CONNECT_CYCLE, SYSCALL]
        .iter()
        .zip(ns)
        .zip(bpf)
        .map(
            |((name, [without, fused, polling]), bpf)| WorkloadSlowdown {
                name: (*name).to_owned(),
                fused_ratio: ratio(&fused, &without),
                polling_ratio: ratio(&polling, &without),
                fused_bpf_ns: summarize(&bpf),
                without_ns: without,
                fused_ns: fused,
                polling_ns: polling,
            },
        )
        .collect();
    Ok(Slowdown {
        rounds,
        sample_s: sample.as_secs_f64(),
        workloads,
    })
}
