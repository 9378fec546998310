//! Do no harm: the observer's own view must never restart a containerd that works. Each test
//! runs the real containerd under the sandbox's systemd user manager on its real bus, with
//! the observer binary watching it.
//!
//! - an overloaded containerd (its CPU capped, its socket stormed with short connections)
//!   still accepts and answers: it is reported `overloaded`, never restarted;
//! - the observer stopped itself (SIGSTOP, as a paused VM or a starved cgroup would) sees the
//!   gap, discards what expired across it, restarts nothing, and still catches a freeze;
//! - an outage of containerd while nothing is restarted (dry run) keeps `/status` under a
//!   fixed size and the agent's memory flat.
//!
//! Needs root, BTF and the tracepoints the kernel sensors use, systemd, containerd, unshare,
//! and for the overload the cgroup CPU controller.

use std::{
    thread,
    time::{Duration, Instant},
};

use observer_tests::{
    OBSERVER_NEEDS as NEEDS, Observer, Sandbox, SandboxOptions, Stopped,
    bench::{
        load::{CpuHogs, Storm, StormSpec},
        procfs,
        soak::Throttle,
    },
    require,
};
use serde_json::Value;

fn parse(body: &str) -> Value {
    serde_json::from_str(body).expect("status is JSON")
}

fn restarts(doc: &Value) -> usize {
    doc["restarts"].as_array().map_or(0, Vec::len)
}

fn states(doc: &Value) -> Vec<String> {
    doc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_overloaded_containerd_that_still_accepts_is_reported_not_restarted() {
    if require(
        "an_overloaded_containerd_that_still_accepts_is_reported_not_restarted",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let pid = sandbox.main_pid().unwrap().unwrap();
    // Throttled hard on a loaded node, and a storm of short connections: the accept queue
    // fills and its oldest connection waits for seconds, while containerd goes on accepting.
    let throttle = Throttle::apply(&sandbox, pid, 5).expect("cap containerd's CPU");
    eprintln!("{}", throttle.how);
    let hogs = CpuHogs::start(2);
    let storm = Storm::start(
        sandbox.socket(),
        &StormSpec {
            connect_threads: 8,
            connect_rate: None,
            version_threads: 0,
            version_interval: None,
            version_timeout: None,
        },
    );
    let body = observer.wait_for("an overloaded verdict", Duration::from_secs(30), |b| {
        states(&parse(b)).iter().any(|s| s == "overloaded")
    });
    // The overload goes on for a while: still no restart. Kept well inside the kubelet's
    // 30 s horizon, after which calls failing on an open connection would make it a hang.
    let mut queue_seen = (0f64, 0f64, 0f64);
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = Value::Null;
    while body.is_ok() && Instant::now() < until {
        let doc = observer.status().expect("GET /status");
        let pending = &doc["pending_connections"];
        let count = pending["count"].as_f64().unwrap_or(0.0);
        let age = pending["oldest_age_ms"].as_f64().unwrap_or(0.0);
        let rate = pending["accepted_per_s"].as_f64().unwrap_or(0.0);
        if age > queue_seen.1 {
            queue_seen = (count, age, rate);
        }
        assert_eq!(
            restarts(&doc),
            0,
            "restarted an overloaded containerd: {doc}"
        );
        last = doc;
        thread::sleep(Duration::from_millis(500));
    }
    let stats = storm.stop();
    drop(hogs);
    let body = body.unwrap_or_else(|e| panic!("{e}; the last status: {last}"));
    eprintln!(
        "storm: {:.0} connects/s; worst queue: {} waiting, the oldest {:.0} ms, {:.0} accepted/s",
        stats.connects_per_s(),
        queue_seen.0,
        queue_seen.1,
        queue_seen.2
    );
    let doc = parse(&body);
    let overloaded = doc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "overloaded")
        .cloned()
        .unwrap();
    eprintln!("{overloaded}");
    let evidence = overloaded["evidence"].to_string();
    assert!(
        evidence.contains("it moves") || evidence.contains("meanwhile containerd"),
        "the verdict says containerd made progress: {overloaded}"
    );
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd kept its PID"
    );
    let doc = observer.status().expect("GET /status");
    assert_eq!(restarts(&doc), 0, "{doc}");
    assert!(
        !states(&doc).iter().any(|s| s == "hung"),
        "an overload was called a hang: {doc}"
    );
    observer
        .wait_healthy(Duration::from_secs(30))
        .expect("healthy again once the storm is over");
}

#[test]
fn the_observers_own_stop_is_not_containerds_hang() {
    if require("the_observers_own_stop_is_not_containerds_hang", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    let doc = observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let agent = doc["observer"]["pid"].as_u64().unwrap() as u32;
    let containerd = sandbox.main_pid().unwrap().unwrap();
    // Another client keeps connecting meanwhile, as the kubelet would.
    let storm = Storm::start(
        sandbox.socket(),
        &StormSpec {
            connect_threads: 1,
            connect_rate: Some(20),
            version_threads: 1,
            version_interval: Some(Duration::from_millis(200)),
            version_timeout: Some(Duration::from_secs(5)),
        },
    );
    // Stopped for longer than the stall threshold and a probe deadline (1 s + 1 s), again
    // and again.
    for _ in 0..3 {
        let stopped = Stopped::stop(agent);
        thread::sleep(Duration::from_secs(3));
        stopped.resume();
        thread::sleep(Duration::from_secs(3));
    }
    // The whole node paused: both stopped; the observer runs again a moment before
    // containerd does, and finds a connection that has waited for seconds.
    let frozen = Stopped::stop(containerd);
    let stopped = Stopped::stop(agent);
    thread::sleep(Duration::from_secs(3));
    stopped.resume();
    thread::sleep(Duration::from_millis(200));
    frozen.resume();
    thread::sleep(Duration::from_secs(4));
    let stats = storm.stop();
    let doc = observer.status().expect("GET /status");
    eprintln!(
        "gaps: {}; storm errors: {} of {} connects",
        doc["observer"]["last_scheduling_gap"], stats.connect_errors, stats.connects
    );
    assert_eq!(restarts(&doc), 0, "restarted a healthy containerd: {doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(containerd));
    assert!(
        doc["observer"]["scheduling_gaps"].as_u64().unwrap_or(0) >= 4,
        "each stop is noticed as a gap: {doc}"
    );
    assert!(
        doc["observer"]["last_scheduling_gap"]["duration_ms"]
            .as_f64()
            .unwrap_or(0.0)
            >= 2500.0,
        "{doc}"
    );
    assert!(
        !states(&doc)
            .iter()
            .any(|s| s == "hung" || s == "unreachable"),
        "{doc}"
    );
    // Right after such gaps, a real freeze is still caught and restarted.
    let frozen = Instant::now();
    let _stopped = Stopped::stop(containerd);
    let body = observer
        .wait_for("a restart after the freeze", Duration::from_secs(30), |b| {
            parse(b)["restarts"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["job_result"] == "done"))
        })
        .expect("restarted");
    eprintln!("freeze to restart after the gaps: {:?}", frozen.elapsed());
    let doc = parse(&body);
    assert!(states(&doc).iter().any(|s| s == "hung"), "{doc}");
}

/// containerd frozen for a long time under `--dry-run` with a fast probe: every probe fails
/// and the agent neither restarts nor grows.
#[test]
fn a_long_outage_in_dry_run_keeps_status_bounded_and_memory_flat() {
    if require(
        "a_long_outage_in_dry_run_keeps_status_bounded_and_memory_flat",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    const STATUS_BOUND: usize = 96 * 1024;
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(
        &sandbox,
        &[
            "--dry-run",
            "--probe-interval",
            "100ms",
            "--probe-timeout",
            "50ms",
        ],
    )
    .expect("observer");
    let doc = observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let agent = doc["observer"]["pid"].as_u64().unwrap() as u32;
    let pid = sandbox.main_pid().unwrap().unwrap();
    let _frozen = Stopped::stop(pid);
    observer
        .wait_for("a hung verdict", Duration::from_secs(15), |b| {
            parse(b)["state"] == "hung"
        })
        .expect("hung");
    // Settle (allocator pools, the first dry-run records), then watch for 45 s: some 450
    // failed probes and as many dry-run decisions.
    thread::sleep(Duration::from_secs(5));
    let start = procfs::sample(agent).expect("agent's /proc");
    let mut largest = 0usize;
    let mut rss = Vec::new();
    let until = Instant::now() + Duration::from_secs(45);
    while Instant::now() < until {
        let (_, body) = observer.get("/status").expect("GET /status");
        largest = largest.max(body.len());
        rss.push(procfs::sample(agent).expect("agent's /proc").rss_kib);
        thread::sleep(Duration::from_secs(1));
    }
    let doc = observer.status().expect("GET /status");
    let end_kib = rss[rss.len() - 5..].iter().sum::<u64>() / 5;
    eprintln!(
        "after {} failed probes: /status at most {largest} bytes; VmRSS {} -> {end_kib} KiB",
        doc["failed_probes"], start.rss_kib
    );
    assert!(
        doc["failed_probes"].as_u64().unwrap_or(0) > 200,
        "the probes kept failing and were counted: {doc}"
    );
    assert_eq!(doc["state"], "hung", "{doc}");
    assert_eq!(restarts(&doc), 0, "a dry run restarts nothing: {doc}");
    assert!(
        largest < STATUS_BOUND,
        "/status grew to {largest} bytes during the outage: {doc}"
    );
    let verdicts = doc["verdicts"].as_array().unwrap();
    assert!(verdicts.len() <= 10, "one outage, few verdicts: {doc}");
    for v in verdicts {
        assert!(v["evidence"].as_array().unwrap().len() <= 4, "{v}");
    }
    let grown = end_kib.saturating_sub(start.rss_kib);
    let allowed = (2 * 1024).max(start.rss_kib / 10);
    assert!(
        grown <= allowed,
        "the agent's VmRSS grew by {grown} KiB ({} -> {end_kib} KiB) during the outage",
        start.rss_kib
    );
}
