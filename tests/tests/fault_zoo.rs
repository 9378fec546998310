//! The fault zoo: failures nodes suffer, injected into the real containerd of a sandbox (see
//! `observer_tests::fault`), each checked for three things: the verdict and its evidence, the
//! action, and that nothing else happened (one restart where one is right, and no more).
//!
//! Also here: a stop that makes no progress is cut short on that evidence, well inside
//! kill-grace (issue 15), and the kill is only ever for the old process, never for a new
//! containerd that is slow to start (issue 13, "Kill only what hangs").
//!
//! Needs root, BTF and the tracepoints the kernel sensors use (`oom/mark_victim` among them),
//! cgroup2 at /sys/fs/cgroup/unified (or /sys/fs/cgroup) and a cgroup v1 memory hierarchy,
//! systemd, containerd, unshare.

use std::time::Duration;

use observer_tests::{
    OBSERVER_NEEDS as NEEDS, Observer, Sandbox, SandboxOptions, containerd_version, fault, require,
    signal,
};
use serde_json::Value;

/// systemd's own stop timeout in these sandboxes is long, so that any kill of a hanging stop
/// is the observer's.
const LONG_STOP: &str = "TimeoutStopSec=90s";

fn healthy(observer: &Observer) -> Value {
    observer
        .wait_healthy(Duration::from_secs(20))
        .expect("healthy")
}

/// The first verdict in `state`, or a panic that shows the document.
fn verdict<'a>(doc: &'a Value, state: &str) -> &'a Value {
    doc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == state)
        .unwrap_or_else(|| panic!("no {state} verdict: {doc}"))
}

fn sources(verdict: &Value) -> Vec<&str> {
    verdict["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect()
}

fn details(verdict: &Value) -> String {
    verdict["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Waits for a finished restart and for containerd to be healthy after it, then gives a
/// second restart every chance to happen and returns the document once it did not.
fn one_restart(observer: &Observer, sandbox: &Sandbox, old_pid: u32) -> Value {
    observer
        .wait_for_status("a finished restart", Duration::from_secs(40), |doc| {
            doc["restarts"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["job_result"] != Value::Null))
        })
        .expect("a restart");
    let new_pid = sandbox
        .wait_for_pid(Some(old_pid), Duration::from_secs(20))
        .expect("a new containerd");
    observer
        .wait_for_status(
            "healthy on the new containerd",
            Duration::from_secs(20),
            |doc| doc["state"] == "healthy" && doc["containerd_pid"] == new_pid,
        )
        .expect("healthy again");
    std::thread::sleep(Duration::from_secs(3));
    let doc = observer.status().expect("status");
    let restarts = doc["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 1, "exactly one restart: {doc}");
    let restart = &restarts[0];
    assert_eq!(restart["job_result"], "done", "{doc}");
    assert_eq!(restart["old_pid"], old_pid, "{doc}");
    assert_eq!(restart["new_pid"], new_pid, "{doc}");
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(new_pid), "{doc}");
    containerd_version(sandbox.socket(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the new containerd answers: {e}; {doc}"));
    doc
}

#[test]
fn an_oom_kill_is_a_crash_named_by_the_kernel() {
    if require("an_oom_kill_is_a_crash_named_by_the_kernel", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    let limit = fault::MemoryLimit::squeeze(&sandbox, pid, 64 << 10).expect("memory cgroup");
    // containerd allocates as it serves the observer's probes; our own calls speed it up.
    let _ = containerd_version(sandbox.socket(), Duration::from_secs(1));
    let doc = one_restart(&observer, &sandbox, pid);
    assert!(limit.oom_kills() >= 1, "the memcg OOM killer ran: {doc}");
    let crash = verdict(&doc, "crashed");
    assert_eq!(crash["pid"], pid, "{doc}");
    assert_eq!(sources(crash), ["ebpf"], "{doc}");
    // The cause comes from oom/mark_victim, not from the exit code (a SIGKILL like any other).
    assert!(details(crash).contains("killed by the OOM killer"), "{doc}");
    assert_eq!(doc["restarts"][0]["reason"], "crashed", "{doc}");
    assert_eq!(doc["restarts"][0]["killed_main"], false, "{doc}");
}

/// A fault that leaves containerd alive but hung, whose stop cannot finish: the verdict is
/// `hung` on kernel evidence and a probe, and the stop is cut short because it makes no
/// progress, long before kill-grace (30 s here) or systemd's TimeoutStopSec (90 s).
fn assert_hung_and_cut_short(doc: &Value, pid: u32) {
    let hang = verdict(doc, "hung");
    assert_eq!(hang["pid"], pid, "{doc}");
    assert_eq!(sources(hang), ["ebpf", "probe"], "{doc}");
    assert!(details(hang).contains("accept queue"), "{doc}");
    let restart = &doc["restarts"][0];
    assert_eq!(restart["reason"], "hung", "{doc}");
    assert_eq!(restart["killed_main"], true, "{doc}");
    let escalation = restart["escalation"].as_str().unwrap_or_default();
    assert!(
        escalation.contains("the stop made no progress")
            && escalation.contains(&format!(
                "SIGKILL to the old process {pid} through its pidfd"
            )),
        "{doc}"
    );
    assert!(
        restart["duration_ms"].as_f64().unwrap() < 30_000.0,
        "cut short before kill-grace: {doc}"
    );
}

#[test]
fn a_frozen_cgroup_is_hung_and_its_stuck_stop_is_cut_short() {
    if require(
        "a_frozen_cgroup_is_hung_and_its_stuck_stop_is_cut_short",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().service_extra(LONG_STOP)).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &["--kill-grace", "30s"]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    let frozen = fault::CgroupFreeze::freeze(&sandbox, pid).expect("cgroup.freeze");
    let doc = one_restart(&observer, &sandbox, pid);
    assert_hung_and_cut_short(&doc, pid);
    // SIGCONT cannot wake a frozen cgroup, so systemd's stop alone would have hung; the
    // new containerd runs (the cgroup was emptied and is no longer frozen).
    assert!(!frozen.frozen(), "{}", frozen.dir().display());
}

#[test]
fn descriptor_exhaustion_is_hung_and_its_stuck_stop_is_cut_short() {
    if require(
        "descriptor_exhaustion_is_hung_and_its_stuck_stop_is_cut_short",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().service_extra(LONG_STOP)).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &["--kill-grace", "30s"]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    let exhausted = fault::FdExhaustion::exhaust(sandbox.socket(), pid, 4, 8).expect("EMFILE");
    let doc = one_restart(&observer, &sandbox, pid);
    assert_hung_and_cut_short(&doc, pid);
    // The new containerd is a new process with systemd's limits, not the lowered one.
    let new_pid = sandbox.main_pid().unwrap().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{new_pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files
            .split_whitespace()
            .any(|f| f == exhausted.old_soft_limit().to_string()),
        "{open_files}"
    );
}

/// containerd runs on, but its socket file is gone (moved away) or is a dead socket: the
/// kubelet cannot reach it. The observer, which saw it answer at that path, judges it
/// `unreachable` and restarts it, since containerd binds its socket anew at start. The
/// restart is right: nothing else gives the path back.
fn socket_lost(replace: bool, error: &str) {
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    let _moved = fault::SocketMoved::inject(sandbox.socket(), replace).expect("socket moved");
    let doc = one_restart(&observer, &sandbox, pid);
    let lost = verdict(&doc, "unreachable");
    assert_eq!(lost["pid"], pid, "{doc}");
    assert!(sources(lost).iter().all(|s| *s == "probe"), "{doc}");
    assert!(details(lost).contains(error), "{doc}");
    // containerd was alive throughout: no crash and no hang was reported.
    for state in ["crashed", "hung"] {
        assert!(
            doc["verdicts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v["state"] != state),
            "{doc}"
        );
    }
    assert_eq!(doc["restarts"][0]["reason"], "unreachable", "{doc}");
    assert_eq!(doc["restarts"][0]["killed_main"], false, "{doc}");
}

#[test]
fn a_removed_socket_file_is_unreachable_and_restarted_once() {
    if require(
        "a_removed_socket_file_is_unreachable_and_restarted_once",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    socket_lost(false, "No such file or directory");
}

#[test]
fn a_replaced_socket_file_is_unreachable_and_restarted_once() {
    if require(
        "a_replaced_socket_file_is_unreachable_and_restarted_once",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    socket_lost(true, "Connection refused");
}

#[test]
fn a_new_containerd_slow_to_start_is_never_killed() {
    if require("a_new_containerd_slow_to_start_is_never_killed", NEEDS).is_err() {
        return;
    }
    // Each start takes 4 s before containerd runs (the same PID: sh execs it), more than the
    // kill-grace of 1 s: a kill at kill-grace would hit the new instance.
    let slow =
        "/bin/sh -c 'sleep 4; exec /usr/bin/containerd --config {dir}/containerd/config.toml'";
    let sandbox = Sandbox::start(SandboxOptions::new().exec_start(slow)).expect("sandbox");
    containerd_version(sandbox.socket(), Duration::from_secs(5)).expect("containerd answers");
    let observer =
        Observer::spawn(&sandbox, &["--kill-grace", "1s", "--no-stack-dump"]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    // Hung: systemd's stop wakes it (SIGCONT after SIGTERM) and it exits at once; then the
    // restart job's start runs for 4 s.
    signal(pid, libc::SIGSTOP);
    let doc = one_restart(&observer, &sandbox, pid);
    assert!(verdict(&doc, "hung")["pid"] == pid, "{doc}");
    let restart = &doc["restarts"][0];
    assert_eq!(restart["killed_main"], false, "{doc}");
    assert_eq!(restart["escalation"], Value::Null, "{doc}");
    assert!(
        restart["duration_ms"].as_f64().unwrap() > 1_000.0,
        "the start outlasted kill-grace: {doc}"
    );
    let n_restarts = sandbox
        .systemctl(&["show", "-p", "NRestarts", "--value", sandbox.unit()])
        .unwrap();
    assert_eq!(
        n_restarts.trim(),
        "0",
        "systemd restarted nothing itself: {doc}"
    );
}
