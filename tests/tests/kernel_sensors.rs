//! The kernel sensors against a real containerd: accept latency, pending connections while
//! frozen, the cause of an exit, thread exits that are not process exits, following a
//! restart, and the fallbacks that stand in without eBPF.
//!
//! Needs root, BTF, the tracepoints sched/sched_process_exit, signal/signal_generate,
//! sock/sk_data_ready and skb/consume_skb, systemd, containerd and unshare.

use std::time::Duration;

use observer_tests::{OBSERVER_NEEDS as NEEDS, Observer, Sandbox, SandboxOptions, require, signal};
use serde_json::Value;

fn parse(body: &str) -> Value {
    serde_json::from_str(body).expect("status is JSON")
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn accept_latency_of_heartbeats_is_measured() {
    if require("accept_latency_of_heartbeats_is_measured", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    let body = observer
        .wait_for("accept latency samples", Duration::from_secs(15), |body| {
            let doc = parse(body);
            number(&doc["accept_latency"]["count"]) >= 3.0
        })
        .expect("accept latency");
    let doc = parse(&body);
    eprintln!("status after heartbeats: {doc:#}");
    assert_eq!(doc["sensors"]["accept_queue"]["state"], "on", "{doc}");
    let p50 = number(&doc["accept_latency"]["p50_ms"]);
    let max = number(&doc["accept_latency"]["max_ms"]);
    assert!(p50 > 0.0 && p50 < 1000.0, "implausible p50 {p50} ms: {doc}");
    assert!(max >= p50, "{doc}");
    assert_eq!(doc["pending_connections"]["source"], "ebpf", "{doc}");
    let programs = doc["sensors"]["accept_queue"]["programs"]
        .as_array()
        .unwrap();
    assert!(
        programs.iter().any(|p| number(&p["run_count"]) > 0.0),
        "BPF stats count runs: {doc}"
    );
    let log = std::fs::read_to_string(sandbox.containerd_log()).unwrap_or_default();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("preface") || l.contains("transport:") || l.contains("EOF"))
        .collect();
    assert!(
        noisy.is_empty(),
        "heartbeats leave no noise in containerd's log: {noisy:?}"
    );
}

#[test]
fn a_frozen_accept_loop_shows_an_ageing_pending_connection() {
    if require(
        "a_frozen_accept_loop_shows_an_ageing_pending_connection",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    // --dry-run: judge but never restart, so containerd stays frozen.
    let observer = Observer::spawn(&sandbox, &["--dry-run"]).expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let pid = sandbox.main_pid().unwrap().unwrap();
    signal(pid, libc::SIGSTOP);
    let body = observer
        .wait_for(
            "a pending connection older than 1 s",
            Duration::from_secs(10),
            |b| number(&parse(b)["pending_connections"]["oldest_age_ms"]) > 1000.0,
        )
        .expect("pending age");
    let doc = parse(&body);
    assert!(number(&doc["pending_connections"]["count"]) >= 1.0, "{doc}");
    // It keeps growing while containerd stays frozen.
    observer
        .wait_for("the age to pass 2 s", Duration::from_secs(10), |b| {
            number(&parse(b)["pending_connections"]["oldest_age_ms"]) > 2000.0
        })
        .expect("growing age");
    signal(pid, libc::SIGCONT);
    observer
        .wait_for("the queue to drain", Duration::from_secs(10), |b| {
            number(&parse(b)["pending_connections"]["count"]) == 0.0
        })
        .expect("drained");
}

#[test]
fn sigkill_names_the_signal_and_its_sender_and_a_restarted_pid_is_still_watched() {
    if require("sigkill_names_the_signal_and_its_sender", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let first = sandbox.main_pid().unwrap().unwrap();
    signal(first, libc::SIGKILL);
    let body = observer
        .wait_for("the exit and its cause", Duration::from_secs(15), |b| {
            parse(b)["last_exit"]["pid"] == first
        })
        .expect("exit cause");
    let exit = parse(&body)["last_exit"].clone();
    assert_eq!(exit["source"], "ebpf", "{exit}");
    assert_eq!(exit["cause"]["signal"], 9, "{exit}");
    assert_eq!(exit["cause"]["signal_name"], "SIGKILL", "{exit}");
    assert_eq!(exit["cause"]["sender_pid"], std::process::id(), "{exit}");

    // The observer restarts it; the new process is watched as closely.
    let second = sandbox
        .wait_for_pid(Some(first), Duration::from_secs(15))
        .expect("restarted");
    observer
        .wait_for("the new PID to be followed", Duration::from_secs(10), |b| {
            let doc = parse(b);
            doc["containerd_pid"] == second && doc["state"] == "healthy"
        })
        .expect("followed");
    signal(second, libc::SIGKILL);
    let body = observer
        .wait_for("the second exit", Duration::from_secs(15), |b| {
            parse(b)["last_exit"]["pid"] == second
        })
        .expect("second exit");
    let exit = parse(&body)["last_exit"].clone();
    assert_eq!(exit["source"], "ebpf", "{exit}");
    assert_eq!(exit["cause"]["sender_pid"], std::process::id(), "{exit}");
}

#[test]
fn a_thread_exiting_is_not_a_process_exit() {
    if require("a_thread_exiting_is_not_a_process_exit", NEEDS).is_err() {
        return;
    }
    // A stand-in daemon whose worker thread ends after 1 s while the process lives on.
    let daemon = "/usr/bin/python3 -c 'import threading,time; t=threading.Thread(target=time.sleep, args=(1,)); t.start(); t.join(); open(\"{dir}/thread-done\",\"w\").close(); time.sleep(3600)'";
    let sandbox = Sandbox::start(
        SandboxOptions::new()
            .exec_start(daemon)
            .service_extra("Type=simple"),
    )
    .expect("sandbox");
    let observer = Observer::spawn(&sandbox, &["--dry-run"]).expect("observer");
    let pid = sandbox.main_pid().unwrap().unwrap();
    observer
        .wait_for(
            "the observer to watch the daemon",
            Duration::from_secs(15),
            |b| parse(b)["containerd_pid"] == pid,
        )
        .expect("watching");
    let marker = sandbox.dir().join("thread-done");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the thread never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, body) = observer.get("/status").unwrap();
    let doc = parse(&body);
    assert!(
        doc["last_exit"].is_null(),
        "a thread exit was taken for a process exit: {doc}"
    );
    // The sensor was watching all along: the process's own exit is seen.
    signal(pid, libc::SIGKILL);
    observer
        .wait_for("the process exit", Duration::from_secs(10), |b| {
            parse(b)["last_exit"]["pid"] == pid
        })
        .expect("process exit seen");
}

#[test]
fn without_ebpf_pidfd_and_sock_diag_stand_in() {
    if require("without_ebpf_pidfd_and_sock_diag_stand_in", NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer =
        Observer::spawn(&sandbox, &["--fallback-sensors", "--dry-run"]).expect("observer");
    let doc = observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    assert_eq!(doc["mode"], "fallback", "{doc}");
    assert_eq!(doc["sensors"]["process_exit"]["state"], "fallback", "{doc}");
    assert_eq!(doc["sensors"]["accept_queue"]["state"], "fallback", "{doc}");
    assert!(
        doc["sensors"]["accept_queue"]["reason"].as_str().is_some(),
        "{doc}"
    );
    assert_eq!(
        doc["sensors"]["blocked_threads"]["state"], "fallback",
        "{doc}"
    );
    assert_eq!(doc["blocked_threads"]["source"], "procfs", "{doc}");
    let pid = sandbox.main_pid().unwrap().unwrap();
    signal(pid, libc::SIGSTOP);
    observer
        .wait_for(
            "sock_diag to see an ageing connection",
            Duration::from_secs(10),
            |b| {
                let doc = parse(b);
                doc["pending_connections"]["source"] == "sock_diag"
                    && number(&doc["pending_connections"]["oldest_age_ms"]) > 1000.0
            },
        )
        .expect("sock_diag pending");
    signal(pid, libc::SIGKILL);
    let body = observer
        .wait_for("pidfd to see the exit", Duration::from_secs(10), |b| {
            parse(b)["last_exit"]["pid"] == pid
        })
        .expect("pidfd exit");
    assert_eq!(parse(&body)["last_exit"]["source"], "pidfd");
}
