//! `cargo xtask bench`: builds the release observer, then measures, in one run on the private
//! sandbox, how fast each configuration recovers containerd from a crash, a freeze and a
//! wedged stop, what the agent costs, and how much it slows unrelated work
//! (`observer_tests::bench` does the measuring). The figures go to `BENCHMARKS.md` and
//! `benchmarks/results.json`; a `--quick` run goes to `target/bench/` instead.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};
use observer_tests::bench::{
    self, BenchPlan, BenchResults, Config, Load, Scenario, recovery::RecoveryRow,
};

use crate::{
    cmd::{self, TAG, is_root, target_dir, workspace_root},
    report::{self, change, ms, ratio},
};

pub struct BenchOptions {
    pub trials: usize,
    pub reference_trials: usize,
    pub zoo_trials: usize,
    pub zoo_reference_trials: usize,
    pub zoo_only: bool,
    /// Names of the zoo faults to run; empty: all.
    pub zoo_faults: Vec<String>,
    pub switch_cost: bool,
    pub quick: bool,
    /// Seconds each fuzz target runs after the measurements (`cargo xtask fuzz`); 0: none.
    pub fuzz_seconds: u64,
}

pub fn bench(opts: BenchOptions) -> Result<ExitCode> {
    let faults = opts
        .zoo_faults
        .iter()
        .map(|name| {
            bench::Fault::from_name(name).with_context(|| {
                let known: Vec<&str> = bench::Fault::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "--zoo-faults: no fault {name:?}; the zoo has {}",
                    known.join(", ")
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    prepare_observer()?;
    let mut plan = if opts.quick {
        BenchPlan::quick()
    } else {
        BenchPlan {
            reference_trials: opts.reference_trials,
            zoo_trials: opts.zoo_trials,
            zoo_reference_trials: opts.zoo_reference_trials,
            zoo_only: opts.zoo_only,
            ..BenchPlan::full(opts.trials)
        }
    };
    let subset = !faults.is_empty() && faults.len() < bench::Fault::ALL.len();
    if !faults.is_empty() {
        plan.faults = faults;
    }
    if plan.zoo_only || subset {
        plan.zoo_only = true;
        return bench_zoo(&plan, subset);
    }
    if opts.switch_cost {
        return bench_switch(&plan).map(|()| ExitCode::SUCCESS);
    }
    if plan.trials == 0 {
        bail!("--trials 0 measures nothing: give at least 1");
    }
    println!(
        "{TAG} bench: {} trial(s) per scenario and configuration, {} of the Gardener-like reference; cost windows {:.0} s at rest and {:.0} s under a storm; {} slowdown round(s)",
        plan.trials,
        plan.reference_trials,
        plan.rest.as_secs_f64(),
        plan.storm.as_secs_f64(),
        plan.slowdown_rounds
    );
    let results = bench::run(&plan, &mut |line| println!("{TAG} {line}"));
    let command = invocation();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": command,
        "results": results,
    }))
    .context("could not serialise the results")?;

    let headline = headline(&results);
    let body = results_section(&results, &command);
    let zoo = zoo_table(&results, &command);
    if opts.quick {
        let dir = target_dir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        write(&dir.join("quick.json"), &json)?;
        write(&dir.join("quick.md"), &format!("{headline}\n{body}\n{zoo}"))?;
        println!("{headline}\n{body}\n{zoo}");
        println!(
            "{TAG} a --quick run only checks that everything runs: results in {}, BENCHMARKS.md left alone",
            dir.display()
        );
    } else {
        let json_path = workspace_root().join("benchmarks/results.json");
        if let Some(dir) = json_path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
        }
        write(&json_path, &json)?;
        let doc = workspace_root().join("BENCHMARKS.md");
        report::write_block(&doc, "bench-headline", &headline, "## Headline")?;
        report::write_block(&doc, "bench-results", &body, "## Results")?;
        write_zoo(&zoo)?;
        println!("{headline}\n{zoo}");
        bench_switch(&plan)?;
        println!(
            "{TAG} results written to {} and {}",
            doc.display(),
            json_path.display()
        );
    }

    let failed: Vec<String> = results
        .trials
        .iter()
        .filter_map(|t| t.error.as_ref().map(|_| t.one_line()))
        .chain(
            results
                .zoo_trials
                .iter()
                .filter_map(|t| t.error.as_ref().map(|_| t.one_line())),
        )
        .chain(
            results
                .cost
                .iter()
                .filter_map(|c| c.error.as_ref().map(|e| format!("cost window: {e}"))),
        )
        .collect();
    if opts.fuzz_seconds > 0 {
        crate::fuzz::fuzz(opts.fuzz_seconds, &[])?;
    }
    if failed.is_empty() && results.slowdown.is_some() {
        Ok(ExitCode::SUCCESS)
    } else {
        for line in &failed {
            eprintln!("{TAG} failed: {line}");
        }
        eprintln!("{TAG} some measurements failed; the figures above leave them out");
        Ok(ExitCode::FAILURE)
    }
}

/// `--zoo-only`: the zoo alone, written to its own blocks and `benchmarks/zoo.json`; a
/// `subset` of its faults to target/bench/zoo-subset.md instead, so that a partial table
/// never replaces the whole one.
fn bench_zoo(plan: &BenchPlan, subset: bool) -> Result<ExitCode> {
    println!(
        "{TAG} bench --zoo-only: {} fault(s), {} trial(s) each for fused and polling-only, {} for each reference",
        plan.faults.len(),
        plan.zoo_trials,
        plan.zoo_reference_trials
    );
    let results = bench::run(plan, &mut |line| println!("{TAG} {line}"));
    let command = invocation();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": command,
        "results": results,
    }))
    .context("could not serialise the results")?;
    let zoo = zoo_table(&results, &command);
    if subset {
        let dir = target_dir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        write(&dir.join("zoo-subset.json"), &json)?;
        write(&dir.join("zoo-subset.md"), &zoo)?;
    } else {
        write(&workspace_root().join("benchmarks/zoo.json"), &json)?;
        write_zoo(&zoo)?;
    }
    println!("{zoo}");
    let failed: Vec<String> = results
        .zoo_trials
        .iter()
        .filter_map(|t| t.error.as_ref().map(|_| t.one_line()))
        .collect();
    for line in &failed {
        eprintln!("{TAG} failed: {line}");
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Rounds and sample length of the switch-cost measurement (`--quick`: one short round).
fn switch_plan(plan: &BenchPlan) -> (usize, std::time::Duration) {
    (plan.slowdown_rounds, plan.slowdown_sample)
}

/// The blocked-thread program's cost per context switch, written to its block of
/// BENCHMARKS.md and to `benchmarks/switch.json`.
fn bench_switch(plan: &BenchPlan) -> Result<()> {
    let (rounds, sample) = switch_plan(plan);
    println!(
        "{TAG} bench: sched_switch cost, {rounds} round(s) of {:.1} s without the agent, with it on tp_btf and on the classic tracepoint",
        sample.as_secs_f64()
    );
    let cost = bench::switch::measure_switch_cost(rounds, sample)
        .map_err(|e| anyhow::anyhow!("the sched_switch cost could not be measured: {e}"))?;
    println!("{TAG} {}", cost.one_line());
    let command = invocation();
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": command,
        "results": cost,
    }))
    .context("could not serialise the results")?;
    write(&workspace_root().join("benchmarks/switch.json"), &json)?;
    let table = switch_table(&cost, &command);
    report::write_block(
        &workspace_root().join("BENCHMARKS.md"),
        "bench-switch",
        &table,
        "## Cost of the blocked-thread program",
    )?;
    println!("{table}");
    Ok(())
}

fn switch_table(cost: &bench::switch::SwitchCost, command: &str) -> String {
    use bench::switch::Arm;
    let median = |s: Option<bench::Summary>| s.map_or(f64::NAN, |s| s.median);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run `{command}` on {}: {} round(s), each {:.1} s of `{}` per arm, in a rotating order.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        cost.rounds,
        cost.sample_s,
        bench::switch::PING_PONG,
    );
    out.push_str("| agent | round trip | with / without | switches per round trip | wall time per switch | program run per switch (BPF stats) |\n|---|---|---|---|---|---|\n");
    let _ = writeln!(
        out,
        "| none | {:.0} ns | – | – | – | – |",
        bench::summarize(&cost.without_ns).map_or(f64::NAN, |s| s.median)
    );
    for arm in &cost.arms {
        let name = match arm.arm {
            Arm::TpBtf => "`tp_btf/sched_switch` (default)",
            Arm::Tracepoint => "`sched/sched_switch` (`OBSERVER_KERNEL_HOOKS=tracepoint`)",
            Arm::Without => "none",
        };
        let _ = writeln!(
            out,
            "| {name} | {:.0} ns | {} | {:.2} | {:.0} ns | {:.0} ns |",
            bench::summarize(&arm.round_trip_ns).map_or(f64::NAN, |s| s.median),
            spread(arm.ratio),
            median(arm.switches_per_round_trip),
            median(arm.wall_ns_per_switch),
            median(arm.program_ns_per_switch),
        );
    }
    out
}

/// The zoo's table goes to BENCHMARKS.md and, the same, to the README.
fn write_zoo(zoo: &str) -> Result<()> {
    report::write_block(
        &workspace_root().join("BENCHMARKS.md"),
        "bench-zoo",
        zoo,
        "## Fault zoo",
    )?;
    report::write_block(
        &workspace_root().join("README.md"),
        "bench-zoo",
        zoo,
        "### The fault zoo",
    )
}

/// Fault × watchdog: time to the verdict, whether it acted and whether that was right, and
/// time to a new containerd answering.
fn zoo_table(results: &BenchResults, command: &str) -> String {
    use bench::{Fault, Watchdog, zoo::ZooRow};
    let mut out = String::new();
    if results.zoo.is_empty() {
        return "The fault zoo was not run.\n".into();
    }
    let find = |fault: Fault, watchdog: Watchdog| -> Option<&ZooRow> {
        results
            .zoo
            .iter()
            .find(|r| r.fault == fault && r.watchdog == watchdog)
    };
    let _ = writeln!(
        out,
        "From `{command}` ({}; Linux {}, {} CPUs). Each cell: fault → verdict (median); acted \
         (trials that acted / trials) and whether that was right (✓: one restart, or one kill, \
         where a restart is the remedy; none where a report is, for a storage stall or a hung shim; one and no more for a startup hang; \
         repeated kills that bring nothing back are ✗); fault → a new containerd answering `Version()` (median), where a restart is the remedy. \
         \"never\": not within the trial's window (verdict: 150 s for the observer's \
         configurations, 30 s for the NPD-like one; recovery: 60 s after the verdict).\n",
        results.started_at.get(..10).unwrap_or_default(),
        results.machine.kernel,
        results.machine.cpus
    );
    let watchdogs: Vec<Watchdog> = Watchdog::ALL
        .into_iter()
        .filter(|w| results.zoo.iter().any(|r| r.watchdog == *w))
        .collect();
    out.push_str("| fault |");
    for w in &watchdogs {
        let _ = write!(out, " {} |", w.label());
    }
    out.push_str("\n|---|");
    for _ in &watchdogs {
        out.push_str("---|");
    }
    out.push('\n');
    for fault in Fault::ALL {
        if !results.zoo.iter().any(|r| r.fault == fault) {
            continue;
        }
        let _ = write!(out, "| {} |", fault.label());
        for w in &watchdogs {
            let cell = match find(fault, *w) {
                None => "–".to_owned(),
                Some(r) if r.failed == r.trials => format!("failed ({} trial(s))", r.trials),
                Some(r) => zoo_cell(r),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push_str("\nVerdicts and notes, by cell:\n\n");
    for r in &results.zoo {
        let _ = writeln!(
            out,
            "- {} / {}: {} trial(s){}; verdicts {}{}",
            r.fault.label(),
            r.watchdog.label(),
            r.trials,
            if r.failed > 0 {
                format!(" ({} failed to run)", r.failed)
            } else {
                String::new()
            },
            r.verdicts.join(", "),
            if r.notes.is_empty() {
                String::new()
            } else {
                format!("; {}", r.notes.join("; "))
            }
        );
    }
    out
}

fn zoo_cell(r: &bench::zoo::ZooRow) -> String {
    use bench::zoo::Remedy;
    let done = r.trials - r.failed;
    let right = if r.right == done { "✓" } else { "✗" };
    let acted = if r.acted == 0 && r.right == done && r.fault.remedy() == Remedy::Restart {
        "did not act, left to systemd's `Restart=`".to_owned()
    } else if r.acted == 0 {
        "did not act".to_owned()
    } else if r.most_actions > 1 {
        format!("acted {}/{done}, up to {} times", r.acted, r.most_actions)
    } else {
        format!("acted {}/{done}", r.acted)
    };
    let wrong = if r.wrong_verdicts > 0 {
        format!(" (wrong verdict in {})", r.wrong_verdicts)
    } else {
        String::new()
    };
    if r.fault.remedy() == Remedy::Nothing {
        // Nothing is wrong with containerd: the right verdict is none, and no action.
        let verdict = match r.fault_to_verdict_ms {
            None => "no verdict".to_owned(),
            Some(s) => format!("{} after {}", r.verdicts.join(", "), ms(s.median)),
        };
        return format!("{verdict}; {acted} {right}");
    }
    let verdict = match r.fault_to_verdict_ms {
        Some(s) if r.never_verdict == 0 => ms(s.median),
        Some(s) => format!("{} ({} never)", ms(s.median), r.never_verdict),
        None => "never".to_owned(),
    };
    if r.fault.remedy() != Remedy::Restart {
        // A report is the remedy (after one restart, for a startup hang): no recovery time.
        return format!("{verdict}{wrong}; {acted} {right}");
    }
    let recovery = match r.fault_to_recovery_ms {
        Some(s) if r.never_recovered == 0 => ms(s.median),
        Some(s) => format!("{} ({} never)", ms(s.median), r.never_recovered),
        None => "never".to_owned(),
    };
    format!("{verdict}{wrong}; {acted} {right}; back in {recovery}")
}

/// Root, the release observer built, and `OBSERVER_BIN` pointing at it for the harness.
pub fn prepare_observer() -> Result<PathBuf> {
    if !is_root() {
        bail!(
            "benchmarks load eBPF programs and start sandboxes, which needs root: run `sudo -E cargo xtask ...`"
        );
    }
    crate::setup::setup(false)?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "observer"]))?;
    let observer = target_dir().join("release/observer");
    if !observer.is_file() {
        bail!("{} is missing after the build", observer.display());
    }
    // SAFETY: xtask is single-threaded until the benchmarks start, after this.
    unsafe { std::env::set_var("OBSERVER_BIN", &observer) };
    println!("{TAG} measuring {}", observer.display());
    Ok(observer)
}

/// `cargo xtask <args>`, as it was run.
pub fn invocation() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

/// A ratio's median as a change, with its range over rounds.
fn spread(ratio: Option<bench::Summary>) -> String {
    ratio.map_or("–".to_owned(), |r| {
        format!(
            "{} ({} – {})",
            change(r.median),
            change(r.min),
            change(r.max)
        )
    })
}

fn write(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("could not write {}", path.display()))
}

fn row(results: &BenchResults, scenario: Scenario, config: Config) -> Option<&RecoveryRow> {
    results
        .recovery
        .iter()
        .find(|r| r.scenario == scenario && r.config == config)
}

fn median_answer(results: &BenchResults, scenario: Scenario, config: Config) -> Option<f64> {
    row(results, scenario, config)
        .and_then(|r| r.fault_to_answer_ms)
        .map(|s| s.median)
}

/// The short section the README quotes.
fn headline(results: &BenchResults) -> String {
    let m = &results.machine;
    let mut out = format!(
        "Measured by `cargo xtask bench` ({}; Linux {}, {} CPUs, {}). Time from the fault until a \
         new containerd answers `Version()`, median of {} trials ({} for the reference):\n\n",
        results.started_at.get(..10).unwrap_or_default(),
        m.kernel,
        m.cpus,
        m.cpu_model,
        results.plan.trials,
        results.plan.reference_trials
    );
    out.push_str("| fault | fused (default) | polling-only | Gardener-like reference |\n");
    out.push_str("|---|---|---|---|\n");
    for scenario in &results.plan.scenarios {
        let fused = median_answer(results, *scenario, Config::Fused);
        let cell = |config| {
            let Some(value) = median_answer(results, *scenario, config) else {
                return "–".to_owned();
            };
            match fused.filter(|f| *f > 0.0 && config != Config::Fused) {
                Some(f) => format!("{} ({:.1}x slower)", ms(value), value / f),
                None => ms(value),
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            scenario.label(),
            cell(Config::Fused),
            cell(Config::PollingOnly),
            cell(Config::GardenerLike)
        );
    }
    let window = |load| {
        results
            .cost
            .iter()
            .find(|c| c.config == Config::Fused && c.load == load && c.error.is_none())
    };
    if let (Some(rest), Some(storm)) = (window(Load::Rest), window(Load::Storm)) {
        let _ = write!(
            out,
            "\nCost of the fused agent: {:.2} % of one CPU at rest and {:.2} % under a storm of \
             2000 connections a second to containerd (its eBPF programs add {:.3} % and {:.2} % \
             in the tasks that trigger them); peak memory {:.1} MiB.",
            rest.cpu_percent,
            storm.cpu_percent,
            rest.bpf_cpu_percent,
            storm.bpf_cpu_percent,
            rest.vm_hwm_mib.max(storm.vm_hwm_mib)
        );
    }
    if let Some(slowdown) = &results.slowdown {
        let parts: Vec<String> = slowdown
            .workloads
            .iter()
            .filter_map(|w| {
                let without = bench::summarize(&w.without_ns)?.median;
                Some(format!(
                    "{}: its eBPF programs add {:.0} ns ({:.1} %), measured {} against a control of {}",
                    w.name,
                    w.fused_bpf_ns?.median,
                    w.fused_bpf_ns?.median / without * 100.0,
                    change(w.fused_ratio?.median),
                    change(w.polling_ratio?.median)
                ))
            })
            .collect();
        let _ = write!(out, " Unrelated work while it runs: {}.", parts.join("; "));
    }
    out.push('\n');
    out
}

/// Everything measured, as tables.
fn results_section(results: &BenchResults, command: &str) -> String {
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Run `{command}` on {}, {:.0} min wall time.\n",
        results.started_at,
        results.wall_s / 60.0
    );
    let _ = writeln!(
        out,
        "- Machine: Linux {}, {} CPUs ({}), {} MiB memory; {}",
        m.kernel, m.cpus, m.cpu_model, m.memory_mib, m.containerd
    );
    let _ = writeln!(out, "- Observer: `{}` (release build)", m.observer_bin);
    let _ = writeln!(
        out,
        "- Configurations: fused = the defaults (probe every 2 s, 1 s deadline, heartbeat every 250 ms, \
         stall threshold 1 s); polling-only = `--no-ebpf`, same probe settings (hang after 3 failed \
         probes); Gardener-like = `{}`. The wedged stop adds `{}` to each. Every trial has a fresh \
         sandbox and observer, and the fault lands at a random point of the probe interval.\n",
        Config::GardenerLike.args().join(" "),
        Scenario::Wedge.observer_args().join(" ")
    );

    out.push_str("### Recovery\n\n");
    out.push_str(
        "Fault → verdict: from the signal to the observer's crashed/hung/unreachable verdict. \
         Fault → answer: from the signal until our own `Version()` client gets an answer from the \
         new containerd. Restart: the observer's restart job (stop, start) as it recorded it. \
         Median / p95 / max in ms (nearest-rank p95: with 5 trials it is the maximum).\n\n",
    );
    out.push_str("| fault | configuration | trials | fault → verdict | fault → answer | restart job | verdicts (evidence) |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for r in &results.recovery {
        let three = |s: Option<bench::Summary>| {
            s.map_or("–".to_owned(), |s| {
                format!("{:.0} / {:.0} / {:.0}", s.median, s.p95, s.max)
            })
        };
        let verdicts: Vec<String> = r
            .verdicts
            .iter()
            .map(|(name, count)| format!("{count}× {name}"))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {}{} | {} | {} | {} | {} |",
            r.scenario.label(),
            r.config.label(),
            r.trials,
            if r.failed > 0 {
                format!(" ({} failed)", r.failed)
            } else {
                String::new()
            },
            three(r.fault_to_verdict_ms),
            three(r.fault_to_answer_ms),
            r.restart_ms.map_or("–".to_owned(), |s| ms(s.median)),
            verdicts.join(", ")
        );
    }
    out.push_str("\nRatios of medians, against fused:\n\n");
    out.push_str(
        "| fault | configuration | fault → verdict | fault → answer |\n|---|---|---|---|\n",
    );
    for r in &results.ratios {
        let _ = writeln!(
            out,
            "| {} | {} / fused | {} | {} |",
            r.scenario.label(),
            r.config.label(),
            ratio(r.verdict_ratio),
            ratio(r.answer_ratio)
        );
    }

    out.push_str("\n### Cost\n\n");
    out.push_str(
        "The agent's CPU is utime + stime of its process (`/proc/<pid>/stat`) over the window, in \
         percent of one CPU. eBPF programs run in the context of whichever task hits their hook, \
         so their run time (BPF stats) is given apart. VmHWM is the peak resident memory since \
         start, startup included. The storm is paced: 2000 connections a second opened and \
         closed against containerd's socket, and 100 `Version()` calls a second. The flood is \
         one thread connecting and closing as fast as the accept queue lets it and one calling \
         `Version()` back to back: the queue stays full.\n\n",
    );
    out.push_str("| configuration | load | window | agent CPU | eBPF programs | VmHWM | VmRSS | load achieved | verdicts | restarts |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for c in &results.cost {
        if let Some(err) = &c.error {
            let _ = writeln!(
                out,
                "| {} | {} | failed: {err} | | | | | | | |",
                c.config.label(),
                c.load.label()
            );
            continue;
        }
        let storm = c.storm.as_ref().map_or("–".to_owned(), |s| {
            format!(
                "{:.0} connects/s, {:.0} Version()/s",
                s.connects_per_s(),
                s.version_calls_per_s()
            )
        });
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} s | {:.3} % | {:.3} % | {:.1} MiB | {:.1} MiB | {storm} | {} | {} |",
            c.config.label(),
            c.load.label(),
            c.seconds,
            c.cpu_percent,
            c.bpf_cpu_percent,
            c.vm_hwm_mib,
            c.vm_rss_mib,
            if c.verdicts.is_empty() {
                "none".to_owned()
            } else {
                c.verdicts.join(", ")
            },
            c.restarts
        );
    }
    out.push_str("\neBPF programs of the fused agent:\n\n");
    out.push_str(
        "| sensor | program | load | runs/s | average run | CPU |\n|---|---|---|---|---|---|\n",
    );
    for c in results
        .cost
        .iter()
        .filter(|c| c.config == Config::Fused && c.error.is_none())
    {
        for p in &c.programs {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {:.1} | {:.0} ns | {:.4} % |",
                p.sensor,
                p.name,
                c.load.label(),
                p.runs_per_s,
                p.avg_run_ns,
                p.run_time_ms / (c.seconds * 1e3) * 100.0
            );
        }
    }

    out.push_str("\n### Slowdown of unrelated work\n\n");
    match &results.slowdown {
        Some(s) => {
            let _ = writeln!(
                out,
                "{} rounds; each round samples both workloads for {:.1} s without the agent, with the \
                 fused agent and with the polling-only agent, in a rotating order. Ratios are per \
                 round (with / without), then the median over rounds (min–max in brackets). The \
                 polling-only agent attaches no hook, so its column is a control: how far this \
                 machine's noise alone moves the figure. The last column charges the fused agent's \
                 eBPF run time (BPF stats read around each sample) to the workload's operations.\n",
                s.rounds, s.sample_s
            );
            out.push_str("| workload | without | fused | fused / without | polling-only | polling-only / without (control) | fused eBPF per operation |\n");
            out.push_str("|---|---|---|---|---|---|---|\n");
            let median = |v: &[f64]| bench::summarize(v).map_or(f64::NAN, |s| s.median);
            for w in &s.workloads {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} ns | {:.0} ns | {} | {:.0} ns | {} | {} |",
                    w.name,
                    median(&w.without_ns),
                    median(&w.fused_ns),
                    spread(w.fused_ratio),
                    median(&w.polling_ns),
                    spread(w.polling_ratio),
                    w.fused_bpf_ns.map_or("–".to_owned(), |b| format!(
                        "{:.0} ns ({:.1} %)",
                        b.median,
                        b.median / median(&w.without_ns) * 100.0
                    )),
                );
            }
        }
        None => out.push_str("Not measured: the slowdown rounds failed (see the run's output).\n"),
    }

    out.push_str("\n### Against the project's aims\n\n| aim | measured | met |\n|---|---|---|\n");
    for aim in &results.aims {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            aim.aim,
            aim.measured,
            match aim.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        );
    }
    let failed: Vec<String> = results
        .trials
        .iter()
        .filter(|t| t.error.is_some())
        .map(bench::TrialResult::one_line)
        .collect();
    if !failed.is_empty() {
        out.push_str("\nFailed trials (left out of the figures):\n\n");
        for line in failed {
            let _ = writeln!(out, "- {line}");
        }
    }
    out
}
