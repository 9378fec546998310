//! What the blocked-thread program costs the machine: it runs on every context switch, of
//! every process. Two processes that the observer does not watch pass a byte back and forth
//! over two pipes (each round trip is at least two switches); rounds alternate without the
//! agent, with the agent on `tp_btf/sched_switch` (its default here) and with it on the
//! classic `sched/sched_switch` tracepoint (`OBSERVER_KERNEL_HOOKS=tracepoint`), in a
//! rotating order, and each round gives its own ratios, as in [`super::cost`]. BPF stats
//! around each sample give the program's runs per round trip and its run time per switch.
//!
//! The workload triggers none of the agent's other programs (no exit, signal, socket wake-up
//! or freed skb), so the difference is the `sched_switch` hook's.

use std::{
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::Value;

use super::{Summary, recovery::LOG_ARGS, summarize};
use crate::{Observer, Sandbox, SandboxOptions};

/// The ping-pong's name in the results.
pub const PING_PONG: &str = "pipe ping-pong round trip (two unwatched processes)";

/// How the agent runs in one arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    Without,
    TpBtf,
    Tracepoint,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Without, Arm::TpBtf, Arm::Tracepoint];

    /// The program's name as `/status` lists it.
    fn program(self) -> &'static str {
        match self {
            Arm::Tracepoint => "blocked_switch",
            _ => "blocked_switch_btf",
        }
    }
}

/// The figures of one arm with the agent.
#[derive(Debug, Clone, Serialize)]
pub struct ArmCost {
    pub arm: Arm,
    /// Nanoseconds per round trip, one per round.
    pub round_trip_ns: Vec<f64>,
    /// Per round: with the agent / without.
    pub ratio: Option<Summary>,
    /// Per round: the program's extra wall time per context switch, (with - without) / the
    /// program's runs per round trip, in ns.
    pub wall_ns_per_switch: Option<Summary>,
    /// Per round: the program's own average run time (BPF stats), in ns.
    pub program_ns_per_switch: Option<Summary>,
    /// Per round: the program's runs per round trip (context switches, machine-wide).
    pub switches_per_round_trip: Option<Summary>,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchCost {
    pub rounds: usize,
    pub sample_s: f64,
    pub without_ns: Vec<f64>,
    pub arms: Vec<ArmCost>,
}

impl SwitchCost {
    pub fn one_line(&self) -> String {
        let median = |s: Option<Summary>| s.map_or(f64::NAN, |s| s.median);
        let mut line = format!(
            "{PING_PONG}: {:.0} ns without the agent",
            summarize(&self.without_ns).map_or(f64::NAN, |s| s.median)
        );
        for arm in &self.arms {
            line.push_str(&format!(
                "; {:?}: {:.0} ns ({:+.1} %), {:.1} switches per round trip, {:.0} ns of wall time and {:.0} ns of program per switch",
                arm.arm,
                summarize(&arm.round_trip_ns).map_or(f64::NAN, |s| s.median),
                (median(arm.ratio) - 1.0) * 100.0,
                median(arm.switches_per_round_trip),
                median(arm.wall_ns_per_switch),
                median(arm.program_ns_per_switch),
            ));
        }
        line
    }
}

/// `rounds` rounds of `sample` per arm.
pub fn measure_switch_cost(rounds: usize, sample: Duration) -> Result<SwitchCost, String> {
    let sandbox = Sandbox::start(SandboxOptions::new()).map_err(|e| e.to_string())?;
    let mut ns: [Vec<f64>; 3] = Default::default();
    // Per arm with the agent: (program runs per round trip, program ns per run), per round.
    let mut stats: [Vec<(f64, f64)>; 3] = Default::default();
    for round in 0..rounds {
        for k in 0..Arm::ALL.len() {
            let index = (round + k) % Arm::ALL.len();
            let arm = Arm::ALL[index];
            let observer = match arm {
                Arm::Without => None,
                Arm::TpBtf | Arm::Tracepoint => {
                    let env: &[(&str, &str)] = if arm == Arm::Tracepoint {
                        &[("OBSERVER_KERNEL_HOOKS", "tracepoint")]
                    } else {
                        &[]
                    };
                    let observer =
                        Observer::spawn_with_env(&sandbox, sandbox.socket(), &LOG_ARGS, env)
                            .map_err(|e| e.to_string())?;
                    observer
                        .wait_healthy(Duration::from_secs(20))
                        .map_err(|e| e.to_string())?;
                    // Past the startup burst (BTF, program loading).
                    thread::sleep(Duration::from_secs(1));
                    Some(observer)
                }
            };
            let before = observer
                .as_ref()
                .map(Observer::status)
                .transpose()
                .map_err(|e| e.to_string())?;
            let (per_trip, trips) = ping_pong_ns(sample)?;
            ns[index].push(per_trip);
            if let (Some(observer), Some(before)) = (&observer, before) {
                // The document refreshes program statistics once a second.
                thread::sleep(Duration::from_millis(1100));
                let after = observer.status().map_err(|e| e.to_string())?;
                let (runs, time_ms) = program_delta(&before, &after, arm.program())
                    .ok_or_else(|| format!("{} did not run in {arm:?}", arm.program()))?;
                stats[index].push((
                    runs / trips.max(1) as f64,
                    if runs > 0.0 {
                        time_ms * 1e6 / runs
                    } else {
                        0.0
                    },
                ));
            }
            drop(observer);
        }
    }
    let [without, tp_btf, tracepoint] = ns;
    let arms = [(Arm::TpBtf, tp_btf), (Arm::Tracepoint, tracepoint)]
        .into_iter()
        .map(|(arm, with)| {
            let per_round = &stats[arm as usize];
            let ratios: Vec<f64> = with.iter().zip(&without).map(|(w, wo)| w / wo).collect();
            let wall: Vec<f64> = with
                .iter()
                .zip(&without)
                .zip(per_round)
                .map(|((w, wo), (switches, _))| (w - wo) / switches.max(1e-9))
                .collect();
            ArmCost {
                arm,
                ratio: summarize(&ratios),
                wall_ns_per_switch: summarize(&wall),
                program_ns_per_switch: summarize(
                    &per_round.iter().map(|(_, ns)| *ns).collect::<Vec<_>>(),
                ),
                switches_per_round_trip: summarize(
                    &per_round.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                ),
                round_trip_ns: with,
            }
        })
        .collect();
    Ok(SwitchCost {
        rounds,
        sample_s: sample.as_secs_f64(),
        without_ns: without,
        arms,
    })
}

/// Runs and run time (ms) of `program` between two status documents.
fn program_delta(before: &Value, after: &Value, program: &str) -> Option<(f64, f64)> {
    let find = |doc: &Value| {
        doc["sensors"]["blocked_threads"]["programs"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == program)
            .map(|p| {
                (
                    p["run_count"].as_f64().unwrap_or(0.0),
                    p["run_time_ms"].as_f64().unwrap_or(0.0),
                )
            })
    };
    let (runs_before, ms_before) = find(before)?;
    let (runs_after, ms_after) = find(after)?;
    Some((
        (runs_after - runs_before).max(0.0),
        (ms_after - ms_before).max(0.0),
    ))
}

/// Nanoseconds per round trip of one byte between this process and a forked child over two
/// pipes, for about `length`, and the number of round trips.
pub fn ping_pong_ns(length: Duration) -> Result<(f64, u64), String> {
    let pipe = || -> Result<[libc::c_int; 2], String> {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array we own.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        Ok(fds)
    };
    let (ping, pong) = (pipe()?, pipe()?);
    // SAFETY: the child only calls read, write and _exit, which are async-signal-safe.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        let mut byte = 0u8;
        // SAFETY: plain reads and writes on our own pipes, then _exit.
        unsafe {
            libc::close(ping[1]);
            libc::close(pong[0]);
            while libc::read(ping[0], (&raw mut byte).cast(), 1) == 1 {
                if libc::write(pong[1], (&raw const byte).cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing the child's ends in the parent.
    unsafe {
        libc::close(ping[0]);
        libc::close(pong[1]);
    }
    let mut byte = 1u8;
    let mut trips = 0u64;
    let started = Instant::now();
    let mut failed = None;
    'outer: while started.elapsed() < length {
        for _ in 0..1000 {
            // SAFETY: one byte to and from our own pipes.
            let ok = unsafe {
                libc::write(ping[1], (&raw const byte).cast(), 1) == 1
                    && libc::read(pong[0], (&raw mut byte).cast(), 1) == 1
            };
            if !ok {
                failed = Some(std::io::Error::last_os_error());
                break 'outer;
            }
            trips += 1;
        }
    }
    let elapsed = started.elapsed();
    // SAFETY: closing our ends ends the child's loop; then it is reaped.
    unsafe {
        libc::close(ping[1]);
        libc::close(pong[0]);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    if let Some(e) = failed {
        return Err(format!("pipe ping-pong: {e}"));
    }
    Ok((elapsed.as_secs_f64() * 1e9 / trips.max(1) as f64, trips))
}
