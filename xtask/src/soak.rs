//! `cargo xtask soak`: a slow but alive containerd on a loaded node, watched by the release
//! observer for `--duration` (`observer_tests::bench::soak` does the watching). Passes with
//! zero restarts and flat memory, prints what it saw, and records it in `BENCHMARKS.md` and
//! `benchmarks/soak.json` (a run shorter than 10 minutes goes to `target/bench/` only).

use std::{fmt::Write as _, fs, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use observer_tests::bench::soak::{self, SoakPlan, SoakReport};

use crate::{
    bench::{invocation, prepare_observer},
    cmd::{TAG, target_dir, workspace_root},
    report,
};

/// Soaks shorter than this are checks, not results worth recording.
const RECORDED_FROM: Duration = Duration::from_secs(600);

pub struct SoakOptions {
    pub duration: Duration,
    pub cpu_quota: u32,
    pub connect_rate: u32,
    pub hogs: Option<usize>,
}

pub fn soak(opts: SoakOptions) -> Result<ExitCode> {
    prepare_observer()?;
    let mut plan = SoakPlan::new(opts.duration, opts.cpu_quota);
    plan.storm.connect_rate = Some(opts.connect_rate);
    if let Some(hogs) = opts.hogs {
        plan.hogs = hogs;
    }
    println!(
        "{TAG} soak for {:.0} s: containerd capped at {} % of one CPU, {} CPU hog(s), {} connects/s and a Version() call every {:.0} ms against its socket",
        plan.duration.as_secs_f64(),
        plan.cpu_quota_percent,
        plan.hogs,
        opts.connect_rate,
        plan.storm
            .version_interval
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    let report = soak::run(&plan, &mut |line| println!("{TAG} {line}"))
        .map_err(|err| anyhow::anyhow!("the soak could not run: {err}"))?;
    let text = describe(&report, &invocation());
    println!("{text}");

    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": invocation(),
        "report": report,
    }))
    .context("could not serialise the soak report")?;
    if opts.duration >= RECORDED_FROM {
        let json_path = workspace_root().join("benchmarks/soak.json");
        if let Some(dir) = json_path.parent() {
            fs::create_dir_all(dir)
                .with_context(|| format!("could not create {}", dir.display()))?;
        }
        fs::write(&json_path, json)
            .with_context(|| format!("could not write {}", json_path.display()))?;
        let doc = workspace_root().join("BENCHMARKS.md");
        report::write_block(&doc, "soak-headline", &headline(&report), "## Headline")?;
        report::write_block(&doc, "soak-results", &text, "## Soak")?;
        println!(
            "{TAG} recorded in {} and {}",
            doc.display(),
            json_path.display()
        );
    } else {
        let dir = target_dir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
        fs::write(dir.join("soak.json"), json).context("could not write the soak report")?;
        println!(
            "{TAG} shorter than {} min: not recorded in BENCHMARKS.md (report in {})",
            RECORDED_FROM.as_secs() / 60,
            dir.join("soak.json").display()
        );
    }
    if report.passed {
        println!("{TAG} soak passed");
        Ok(ExitCode::SUCCESS)
    } else {
        for failure in &report.failures {
            eprintln!("{TAG} soak failed: {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn headline(r: &SoakReport) -> String {
    format!(
        "Soak ({:.0} min, containerd capped at {} % of one CPU on a loaded node): {} restart(s), \
         agent memory {:.1} → {:.1} MiB, probe p99 {:.0} ms. {}",
        r.seconds / 60.0,
        r.plan.cpu_quota_percent,
        r.restarts,
        r.rss_start_mib,
        r.rss_end_mib,
        r.probe_latency_ms.map_or(f64::NAN, |s| s.p99),
        if r.passed { "Passed." } else { "**Failed.**" }
    )
}

/// What the soak saw, as Markdown.
fn describe(r: &SoakReport, command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "`{command}`: {:.1} min, **{}**.\n",
        r.seconds / 60.0,
        if r.passed { "passed" } else { "failed" }
    );
    let _ = writeln!(out, "- containerd's cap: {}", r.throttle);
    let _ = writeln!(
        out,
        "- containerd used {:.1} % of one CPU{}",
        r.containerd_cpu_percent,
        r.throttled_periods
            .map_or(String::new(), |(all, throttled)| format!(
                "; the cap stopped it in {throttled} of {all} periods of 100 ms ({:.0} %)",
                throttled as f64 * 100.0 / all.max(1) as f64
            ))
    );
    let _ = writeln!(
        out,
        "- Load: {} CPU hog thread(s); {} connections ({:.0}/s, {} failed) and {} `Version()` calls ({:.1}/s, {} failed) against containerd's socket",
        r.plan.hogs,
        r.storm.connects,
        r.storm.connects_per_s(),
        r.storm.connect_errors,
        r.storm.version_calls,
        r.storm.version_calls_per_s(),
        r.storm.version_errors
    );
    if let Some(v) = r.storm.version_latency_ms {
        let _ = writeln!(
            out,
            "- The load's `Version()` latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.median, v.p99, v.max
        );
    }
    let _ = writeln!(
        out,
        "- The agent's probes: {} ({} failed); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (deadline 1 s)",
        r.probes,
        r.probe_failures,
        r.probe_latency_ms.map_or(f64::NAN, |s| s.median),
        r.probe_latency_ms.map_or(f64::NAN, |s| s.p99),
        r.probe_latency_ms.map_or(f64::NAN, |s| s.max)
    );
    let _ = writeln!(
        out,
        "- Oldest pending connection the agent reported: {:.0} ms (stall threshold 1 s); above the threshold in {} sample(s), {} of them while the kernel's accept queue (`ss -xl` Recv-Q) was empty",
        r.max_pending_age_ms, r.stalled_samples, r.phantom_pending_samples
    );
    let verdicts: Vec<String> = r
        .verdicts
        .iter()
        .map(|(name, n)| format!("{n}× {name}"))
        .collect();
    let _ = writeln!(
        out,
        "- Verdicts: {}",
        if verdicts.is_empty() {
            "none besides the first healthy one".to_owned()
        } else {
            verdicts.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "- Restarts by the observer: {}; containerd's main PID {}",
        r.restarts,
        if r.main_pid_changed {
            "changed"
        } else {
            "unchanged"
        }
    );
    let _ = writeln!(
        out,
        "- The agent's VmRSS: {:.2} MiB over the first tenth, {:.2} MiB over the last (allowed growth: the larger of {:.0} MiB and {:.0} %); VmHWM {:.1} MiB",
        r.rss_start_mib,
        r.rss_end_mib,
        r.plan.memory_tolerance_mib,
        r.plan.memory_tolerance_percent,
        r.hwm_mib
    );
    let step = (r.memory_series.len() / 10).max(1);
    let series: Vec<String> = r
        .memory_series
        .iter()
        .step_by(step)
        .chain(r.memory_series.last())
        .map(|(t, mib)| format!("{t:.0} s: {mib:.2}"))
        .collect();
    let _ = writeln!(out, "- VmRSS series (MiB): {}", series.join(", "));
    for failure in &r.failures {
        let _ = writeln!(out, "- **Failure:** {failure}");
    }
    out
}
