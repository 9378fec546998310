//! The actuator against a real systemd user manager: it restarts what systemd will not, leaves
//! to systemd what systemd already does, never starts what an operator stopped, kills a stop
//! that hangs, backs off from a crash loop, and stays given up through a loop that answers a
//! probe between its hangs until an operator restarts containerd.
//!
//! Needs root, BTF and the tracepoints the kernel sensors use, systemd, containerd, unshare.

use std::time::{Duration, Instant};

use observer_tests::{OBSERVER_NEEDS as NEEDS, Observer, Sandbox, SandboxOptions, require, signal};
use serde_json::Value;

fn parse(body: &str) -> Value {
    serde_json::from_str(body).expect("status is JSON")
}

fn status(observer: &Observer) -> Value {
    observer.status().expect("GET /status")
}

fn healthy(observer: &Observer) {
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
}

fn actions(doc: &Value) -> Vec<String> {
    doc["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_owned())
        .collect()
}

fn n_restarts(sandbox: &Sandbox) -> u32 {
    sandbox
        .systemctl(&["show", "-p", "NRestarts", "--value", sandbox.unit()])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_crash_under_restart_always_is_left_to_systemd() {
    if require("a_crash_under_restart_always_is_left_to_systemd", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(
        SandboxOptions::new()
            .restart("always")
            .service_extra("RestartSec=300ms"),
    )
    .expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    let old = sandbox.main_pid().unwrap().unwrap();
    signal(old, libc::SIGKILL);
    let new = sandbox
        .wait_for_pid(Some(old), Duration::from_secs(10))
        .expect("systemd restarts it");
    let body = observer
        .wait_for("the observer to follow", Duration::from_secs(10), |b| {
            let d = parse(b);
            d["containerd_pid"] == new && d["state"] == "healthy"
        })
        .expect("followed");
    // Give a second restart every chance to happen, then check there was none.
    std::thread::sleep(Duration::from_secs(2));
    let doc = status(&observer);
    assert_eq!(
        n_restarts(&sandbox),
        1,
        "exactly one restart, systemd's: {doc}"
    );
    assert_eq!(sandbox.main_pid().unwrap(), Some(new));
    assert!(doc["restarts"].as_array().unwrap().is_empty(), "{doc}");
    assert!(
        actions(&doc).contains(&"leave_to_systemd".to_owned()),
        "{body}"
    );
}

#[test]
fn an_operators_stop_is_never_undone() {
    if require("an_operators_stop_is_never_undone", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    sandbox.systemctl(&["stop", sandbox.unit()]).expect("stop");
    observer
        .wait_for("the stopped verdict", Duration::from_secs(15), |b| {
            parse(b)["state"] == "stopped"
        })
        .expect("stopped");
    std::thread::sleep(Duration::from_secs(3));
    let doc = status(&observer);
    assert_eq!(doc["state"], "stopped", "{doc}");
    assert_eq!(sandbox.unit_state().unwrap().0, "inactive", "{doc}");
    assert!(doc["restarts"].as_array().unwrap().is_empty(), "{doc}");
    assert!(actions(&doc).contains(&"leave_stopped".to_owned()), "{doc}");
    // Started again by the operator, it is watched again.
    sandbox
        .systemctl(&["start", sandbox.unit()])
        .expect("start");
    healthy(&observer);
}

/// Time from SIGSTOP to a finished restart, in a fresh sandbox.
fn freeze_and_time_restart(extra: &[&str]) -> (Duration, Value) {
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, extra).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().unwrap();
    let frozen = Instant::now();
    signal(pid, libc::SIGSTOP);
    let body = observer
        .wait_for("a restart after the freeze", Duration::from_secs(30), |b| {
            parse(b)["restarts"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["job_result"] == "done"))
        })
        .expect("restarted");
    let took = frozen.elapsed();
    assert!(
        sandbox
            .wait_for_pid(Some(pid), Duration::from_secs(10))
            .is_ok()
    );
    (took, parse(&body))
}

#[test]
fn a_frozen_containerd_is_restarted_sooner_than_by_polling_alone() {
    if require(
        "a_frozen_containerd_is_restarted_sooner_than_by_polling_alone",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let (fused, fused_doc) = freeze_and_time_restart(&[]);
    let (polling, polling_doc) = freeze_and_time_restart(&["--no-ebpf"]);
    eprintln!("freeze to restart: fused {fused:?}, polling only {polling:?}");
    let hang = |doc: &Value| {
        doc["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["state"] == "hung")
            .cloned()
            .unwrap_or_else(|| panic!("no hung verdict: {doc}"))
    };
    let fused_hang = hang(&fused_doc);
    let sources: Vec<&str> = fused_hang["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        ["ebpf", "probe"],
        "kernel evidence and one probe: {fused_doc}"
    );
    // The dump was asked for before the restart; containerd wrote it once systemd's stop
    // woke it.
    let dump = fused_doc["restarts"][0]["stack_dump"]
        .as_str()
        .unwrap_or_default();
    assert!(
        dump.starts_with("written to /tmp/containerd."),
        "{fused_doc}"
    );
    for doc in [&fused_doc, &polling_doc] {
        let dump = doc["restarts"][0]["stack_dump"]
            .as_str()
            .unwrap_or_default();
        if let Some(path) = dump
            .strip_prefix("written to ")
            .and_then(|d| d.split(' ').next())
        {
            let _ = std::fs::remove_file(path);
        }
    }
    let polling_hang = hang(&polling_doc);
    assert!(
        polling_hang["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["source"] == "probe"),
        "{polling_doc}"
    );
    assert!(
        fused < polling,
        "fused ({fused:?}) restarts before polling only ({polling:?})"
    );
}

#[test]
fn a_stop_that_hangs_is_cut_short_long_before_timeout_stop_sec() {
    if require("a_stop_that_hangs_is_cut_short", NEEDS).is_err() {
        return;
    }
    // The main process ignores SIGTERM and keeps containerd as its child: a stop hangs until
    // TimeoutStopSec (90 s) unless someone kills the main process.
    let wedged = "/bin/sh -c 'trap \"\" TERM; /usr/bin/containerd --config {dir}/containerd/config.toml & while :; do sleep 1; done'";
    let sandbox = Sandbox::start(
        SandboxOptions::new()
            .exec_start(wedged)
            .service_extra("NotifyAccess=all\nKillMode=control-group\nTimeoutStopSec=90s"),
    )
    .expect("sandbox");
    let observer =
        Observer::spawn(&sandbox, &["--kill-grace", "2s", "--no-stack-dump"]).expect("observer");
    healthy(&observer);
    let main = sandbox.main_pid().unwrap().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{main}/task/{main}/children")).unwrap();
    let containerd = children
        .split_whitespace()
        .map(|p| p.parse::<u32>().unwrap())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "containerd")
        })
        .expect("containerd runs under the wedged main process");
    let frozen = Instant::now();
    signal(containerd, libc::SIGSTOP);
    let body = observer
        .wait_for(
            "a restart that killed the main process",
            Duration::from_secs(40),
            |b| {
                parse(b)["restarts"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["killed_main"] == true))
            },
        )
        .expect("restart with kill");
    let doc = parse(&body);
    let restart = &doc["restarts"][0];
    assert_eq!(restart["job_result"], "done", "{doc}");
    healthy(&observer);
    let took = frozen.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "healthy again after {took:?}, before TimeoutStopSec (90 s) would have ended the stop"
    );
}

#[test]
fn a_crash_loop_backs_off_and_gives_up() {
    if require("a_crash_loop_backs_off_and_gives_up", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(
        &sandbox,
        &[
            "--restart-backoff",
            "2s",
            "--max-restarts",
            "3",
            "--probe-interval",
            "500ms",
            "--probe-timeout",
            "250ms",
        ],
    )
    .expect("observer");
    healthy(&observer);
    // Break containerd's config, then crash it: every start from now on fails.
    std::fs::write(
        sandbox.dir().join("containerd/config.toml"),
        "version = 2\nthis is not toml\n",
    )
    .unwrap();
    signal(sandbox.main_pid().unwrap().unwrap(), libc::SIGKILL);
    let body = observer
        .wait_for("the observer to give up", Duration::from_secs(40), |b| {
            actions(&parse(b)).contains(&"give_up".to_owned())
        })
        .expect("gave up");
    let doc = parse(&body);
    let restarts = doc["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 3, "{doc}");
    assert!(restarts.iter().all(|r| r["job_result"] != "done"), "{doc}");
    assert!(actions(&doc).contains(&"back_off".to_owned()), "{doc}");
    assert_eq!(doc["restart_budget"]["state"], "gave_up", "{doc}");
    // It stays given up: no more restarts while containerd cannot start.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&observer)["restarts"].as_array().unwrap().len(), 3);
}

/// A hang loop that systemd feeds: each containerd answers probes for 2 s, then freezes; the
/// observer restarts it until its budget is spent. Then the wrapper kills the frozen one and
/// systemd's own `Restart=` starts the next, which again answers before it freezes. Those
/// answers must not lift the give-up; an operator's own restart does.
#[test]
fn a_loop_that_answers_a_probe_between_hangs_stays_given_up_until_an_operator_restarts() {
    if require(
        "a_loop_that_answers_a_probe_between_hangs_stays_given_up_until_an_operator_restarts",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let looping = "/bin/sh -c '/usr/bin/containerd --config {dir}/containerd/config.toml & c=$!; sleep 2; kill -STOP $c; sleep 4; kill -KILL $c; exit 1'";
    let sandbox = Sandbox::start(
        SandboxOptions::new()
            .exec_start(looping)
            .restart("on-failure")
            .service_extra(
                "NotifyAccess=all\nKillMode=control-group\nRestartSec=1\n[Unit]\nStartLimitIntervalSec=0",
            ),
    )
    .expect("sandbox");
    let observer = Observer::spawn(
        &sandbox,
        &[
            "--restart-backoff",
            "1s",
            "--max-restarts",
            "3",
            "--probe-interval",
            "500ms",
            "--probe-timeout",
            "250ms",
            "--no-stack-dump",
        ],
    )
    .expect("observer");
    healthy(&observer);
    let body = observer
        .wait_for("the observer to give up", Duration::from_secs(60), |b| {
            actions(&parse(b)).contains(&"give_up".to_owned())
        })
        .expect("gave up");
    assert_eq!(restarts_of(&parse(&body)), 3, "{body}");
    // systemd restarts it twice on its own; each new containerd answers before it freezes.
    let systemd_before = n_restarts(&sandbox);
    let (mut answered, mut doc) = (false, Value::Null);
    let deadline = Instant::now() + Duration::from_secs(40);
    while n_restarts(&sandbox) < systemd_before + 2 {
        assert!(
            Instant::now() < deadline,
            "systemd did not restart it: {doc}"
        );
        doc = status(&observer);
        answered |= doc["state"] == "healthy";
        assert_eq!(restarts_of(&doc), 3, "the give-up was lifted: {doc}");
        assert_eq!(doc["restart_budget"]["state"], "gave_up", "{doc}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answered, "containerd answered between its hangs: {doc}");
    // An operator restarts it: they took over, the budget starts afresh.
    sandbox
        .systemctl(&["restart", sandbox.unit()])
        .expect("operator restart");
    // Lifted: the budget allows restarts again, or the observer restarted the next hang.
    observer
        .wait_for("the budget to start afresh", Duration::from_secs(15), |b| {
            let doc = parse(b);
            doc["restart_budget"]["state"] != "gave_up" || restarts_of(&doc) > 3
        })
        .expect("budget lifted by the operator's restart");
}

fn restarts_of(doc: &Value) -> usize {
    doc["restarts"].as_array().map_or(0, Vec::len)
}
