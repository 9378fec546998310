//! `cargo xtask bench` and `cargo xtask soak` keep working: their measuring code runs here on
//! a tiny plan, and its output must be complete and plausible. No figure is held to a
//! bound: timings on a shared test machine mean nothing.
//!
//! Needs root, BTF and the tracepoints the kernel sensors use (sched/sched_process_exit,
//! signal/signal_generate, sock/sk_data_ready, skb/consume_skb), systemd, containerd,
//! unshare, and for the soak the cgroup CPU controller (v1 `cpu` or delegated v2 `cpu`).

use std::time::Duration;

use observer_tests::{
    OBSERVER_NEEDS as NEEDS,
    bench::{self, BenchPlan, Config, Fault, Load, Scenario, Watchdog, soak},
    require,
};

fn positive(value: f64) -> bool {
    value.is_finite() && value > 0.0
}

#[test]
fn a_small_bench_measures_recovery_cost_and_slowdown() {
    if require("a_small_bench_measures_recovery_cost_and_slowdown", NEEDS).is_err() {
        return;
    }
    let plan = BenchPlan {
        scenarios: vec![Scenario::Crash],
        // One fault of the zoo, for fused and polling-only (the references take minutes).
        faults: vec![Fault::OomKill],
        rest: Duration::from_secs(2),
        storm: Duration::from_secs(2),
        flood: Duration::from_secs(1),
        warmup: Duration::from_millis(500),
        slowdown_sample: Duration::from_millis(100),
        ..BenchPlan::quick()
    };
    let results = bench::run(&plan, &mut |line| eprintln!("{line}"));

    for trial in &results.trials {
        assert!(trial.error.is_none(), "{}", trial.one_line());
        let times = trial.times.as_ref().expect("a measured trial");
        assert!(
            positive(times.fault_to_answer_ms)
                && times.fault_to_answer_ms >= times.fault_to_verdict_ms,
            "the new containerd answers after the verdict: {}",
            trial.one_line()
        );
    }
    let fused = results
        .recovery
        .iter()
        .find(|r| r.scenario == Scenario::Crash && r.config == Config::Fused)
        .expect("a fused crash row");
    assert_eq!(fused.verdicts[0].0, "crashed (ebpf)", "{fused:?}");
    assert!(
        results
            .ratios
            .iter()
            .any(|r| r.answer_ratio.is_some_and(positive)),
        "{:?}",
        results.ratios
    );

    assert_eq!(results.cost.len(), 6, "{:?}", results.cost);
    for window in &results.cost {
        assert!(window.error.is_none(), "{}", window.one_line());
        assert!(
            positive(window.vm_hwm_mib) && window.cpu_percent >= 0.0,
            "{}",
            window.one_line()
        );
        if window.load != Load::Rest {
            assert!(
                window.storm.as_ref().is_some_and(|s| s.connects > 0),
                "{}",
                window.one_line()
            );
        }
    }
    let fused_storm = results
        .cost
        .iter()
        .find(|c| c.config == Config::Fused && c.load == Load::Storm)
        .unwrap();
    assert!(
        fused_storm
            .programs
            .iter()
            .any(|p| p.runs > 0 && positive(p.avg_run_ns)),
        "the storm runs the accept programs: {fused_storm:?}"
    );

    let slowdown = results.slowdown.as_ref().expect("slowdown measured");
    assert_eq!(slowdown.workloads.len(), 2);
    for workload in &slowdown.workloads {
        assert!(
            workload.fused_ratio.is_some_and(|r| positive(r.median)),
            "{}",
            workload.one_line()
        );
    }
    assert!(
        results.aims.iter().any(|a| a.met.is_some()),
        "{:?}",
        results.aims
    );
    assert_eq!(results.zoo_trials.len(), 2, "{:?}", results.zoo_trials);
    for trial in &results.zoo_trials {
        assert!(trial.error.is_none(), "{}", trial.one_line());
        assert!(trial.right(), "one restart: {}", trial.one_line());
        // Fused names the crash from the kernel; polling alone sees only refused probes.
        let expected = match trial.watchdog {
            Watchdog::Observer(Config::Fused) => "crashed",
            _ => "unreachable",
        };
        assert_eq!(
            trial.verdict.as_deref(),
            Some(expected),
            "{}",
            trial.one_line()
        );
        assert!(
            trial
                .fault_to_recovery_ms
                .zip(trial.fault_to_verdict_ms)
                .is_some_and(|(back, verdict)| back >= verdict),
            "back after the verdict: {}",
            trial.one_line()
        );
    }
    let json = serde_json::to_value(&results).expect("results serialise");
    assert!(
        json["machine"]["cpus"].as_u64().is_some_and(|n| n > 0),
        "{json}"
    );
}

#[test]
fn a_short_soak_watches_a_throttled_containerd_and_reports() {
    if require(
        "a_short_soak_watches_a_throttled_containerd_and_reports",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let mut plan = soak::SoakPlan::new(Duration::from_secs(8), 20);
    plan.hogs = 1;
    let report = soak::run(&plan, &mut |line| eprintln!("{line}")).expect("the soak runs");
    eprintln!("{report:#?}");
    assert!(report.memory_series.len() >= 4, "{report:?}");
    assert!(
        positive(report.rss_start_mib) && positive(report.hwm_mib),
        "{report:?}"
    );
    assert!(report.probes > 0, "the agent probed: {report:?}");
    assert!(
        report.storm.connects > 0 && report.storm.version_calls > 0,
        "{report:?}"
    );
    assert!(report.throttle.contains("20"), "{}", report.throttle);
    assert_eq!(report.passed, report.failures.is_empty(), "{report:?}");
}
