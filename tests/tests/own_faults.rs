//! The observer's own faults never restart a healthy containerd, nor silently stop protecting
//! it: a lost bus, a systemd `daemon-reexec`, a `--socket` where containerd does not answer or
//! that names it through a symlink, an operator's stop while a restart is being prepared.
//!
//! Needs root, BTF and the tracepoints the kernel sensors use, systemd, containerd, unshare;
//! the operator-stop test also needs the cgroup2 freezer (`cgroup.freeze`).

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use observer_tests::{OBSERVER_NEEDS as NEEDS, Observer, Sandbox, SandboxOptions, require, signal};
use serde_json::Value;

fn healthy(observer: &Observer) -> Value {
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy")
}

/// Polls `path` until its status code is `code`; returns the body.
fn wait_for_code(observer: &Observer, path: &str, code: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let last = observer.get(path);
        if let Ok((got, body)) = &last
            && *got == code
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} did not answer {code} within {timeout:?}; last: {last:?}\n{}",
            observer.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn metric(observer: &Observer, name: &str) -> Option<f64> {
    let (_, body) = observer.get("/metrics").expect("GET /metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A crash after whatever the test did is still seen and restarted.
fn a_crash_is_still_restarted(sandbox: &Sandbox, observer: &Observer) {
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    signal(pid, libc::SIGKILL);
    observer
        .wait_for_status(
            "a finished restart after the crash",
            Duration::from_secs(20),
            |doc| {
                doc["restarts"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["job_result"] == "done"))
            },
        )
        .expect("restarted");
    sandbox
        .wait_for_pid(Some(pid), Duration::from_secs(10))
        .expect("a new containerd");
}

#[test]
fn a_restarted_bus_is_reconnected_and_protection_continues() {
    if require(
        "a_restarted_bus_is_reconnected_and_protection_continues",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    wait_for_code(&observer, "/readyz", 200, Duration::from_secs(10));
    assert_eq!(
        metric(&observer, "containerd_observer_bus_connected"),
        Some(1.0)
    );

    let outage = sandbox.stop_bus().expect("stop the bus");
    let body = wait_for_code(&observer, "/readyz", 503, Duration::from_secs(15));
    assert!(body.contains("systemd"), "{body}");
    let doc = observer.status().expect("status");
    assert_eq!(doc["bus"]["connected"], false, "{doc}");
    assert!(doc["bus"]["last_error"].is_string(), "{doc}");
    assert_eq!(
        metric(&observer, "containerd_observer_bus_connected"),
        Some(0.0)
    );
    // Still 503 a while later: nothing pretends the bus is back.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(observer.get("/readyz").expect("readyz").0, 503);

    outage.end().expect("start the bus again");
    wait_for_code(&observer, "/readyz", 200, Duration::from_secs(20));
    let doc = observer.status().expect("status");
    assert_eq!(doc["bus"]["connected"], true, "{doc}");
    assert!(doc["bus"]["reconnects"].as_u64() >= Some(1), "{doc}");
    assert_eq!(
        metric(&observer, "containerd_observer_bus_connected"),
        Some(1.0)
    );
    assert!(doc["restarts"].as_array().unwrap().is_empty(), "{doc}");

    a_crash_is_still_restarted(&sandbox, &observer);
}

#[test]
fn a_daemon_reexec_restarts_nothing_and_protection_continues() {
    if require(
        "a_daemon_reexec_restarts_nothing_and_protection_continues",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let observer = Observer::spawn(&sandbox, &[]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");

    sandbox
        .systemctl(&["daemon-reexec"])
        .expect("daemon-reexec");
    // The observer notices systemd leaving and rejoining the bus, and follows it again.
    observer
        .wait_for_status(
            "the observer connected to the re-executed systemd",
            Duration::from_secs(20),
            |doc| doc["bus"]["reconnects"].as_u64() >= Some(1) && doc["bus"]["connected"] == true,
        )
        .expect("reconnected");
    thread::sleep(Duration::from_secs(3));
    let doc = observer.status().expect("status");
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert!(doc["restarts"].as_array().unwrap().is_empty(), "{doc}");
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd untouched"
    );
    wait_for_code(&observer, "/readyz", 200, Duration::from_secs(10));

    a_crash_is_still_restarted(&sandbox, &observer);
}

/// Asserts that the observer, pointed at `socket`, reports a configuration problem and never
/// restarts the healthy containerd.
fn a_config_problem_and_no_restart(sandbox: &Sandbox, socket: &Path, expected: &str) {
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let observer = Observer::spawn_on(
        sandbox,
        socket,
        &["--probe-interval", "500ms", "--probe-timeout", "300ms"],
    )
    .expect("observer");
    let doc = observer
        .wait_for_status("a configuration problem", Duration::from_secs(20), |doc| {
            doc["config_problem"].is_string()
        })
        .expect("config problem");
    let problem = doc["config_problem"].as_str().unwrap();
    assert!(problem.contains("--socket"), "{problem}");
    assert!(problem.contains(expected), "{problem}");
    let readyz = wait_for_code(&observer, "/readyz", 503, Duration::from_secs(5));
    assert!(readyz.contains("--socket"), "{readyz}");
    assert!(
        observer.log().contains("configuration problem"),
        "{}",
        observer.log()
    );
    // Many more failed probes than `failures-to-hang` (3): still no restart.
    thread::sleep(Duration::from_secs(4));
    let doc = observer.status().expect("status");
    assert!(doc["restarts"].as_array().unwrap().is_empty(), "{doc}");
    assert!(
        !doc["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "restart"),
        "{doc}"
    );
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd untouched"
    );
}

#[test]
fn a_socket_where_containerd_does_not_answer_is_a_config_problem_not_a_restart() {
    if require(
        "a_socket_where_containerd_does_not_answer_is_a_config_problem_not_a_restart",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    // A typo: nothing at the path.
    a_config_problem_and_no_restart(
        &sandbox,
        &sandbox.dir().join("typo.sock"),
        "nothing exists at",
    );
    // Another program's socket that never answers: its queue stalls, its calls time out,
    // but nothing ties it to containerd's process.
    let other = sandbox.dir().join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    a_config_problem_and_no_restart(&sandbox, &other, "not held by");
}

#[test]
fn a_socket_path_through_a_symlink_keeps_the_kernel_stall_evidence() {
    if require(
        "a_socket_path_through_a_symlink_keeps_the_kernel_stall_evidence",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    // As /var/run -> /run on a node.
    let link = sandbox.dir().join("var-run");
    std::os::unix::fs::symlink(sandbox.dir(), &link).expect("symlink");
    let socket = link.join("containerd.sock");
    let observer = Observer::spawn_on(&sandbox, &socket, &[]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    signal(pid, libc::SIGSTOP);
    let doc = observer
        .wait_for_status(
            "a restart after the freeze",
            Duration::from_secs(30),
            |doc| {
                doc["restarts"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["job_result"] == "done"))
            },
        )
        .expect("restarted");
    let hang = doc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "hung")
        .unwrap_or_else(|| panic!("no hung verdict: {doc}"));
    let sources: Vec<&str> = hang["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["ebpf", "probe"], "kernel evidence kept: {doc}");
    remove_dump(&doc);
}

/// Removes the goroutine dump a restart of a hung containerd left in /tmp.
fn remove_dump(doc: &Value) {
    for restart in doc["restarts"].as_array().into_iter().flatten() {
        if let Some(path) = restart["stack_dump"]
            .as_str()
            .and_then(|d| d.strip_prefix("written to "))
            .and_then(|d| d.split(' ').next())
        {
            let _ = fs::remove_file(path);
        }
    }
}

/// containerd's cgroup frozen through the cgroup2 freezer; thawed when dropped. Unlike
/// SIGSTOP, the frozen process is not in state `T`, so the observer waits for its dump.
struct Frozen(PathBuf);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        let path = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 path");
        let file = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(|root| PathBuf::from(format!("{root}{path}/cgroup.freeze")))
            .find(|f| f.exists())
            .unwrap_or_else(|| {
                panic!("no cgroup.freeze for {path}: the cgroup2 freezer is needed")
            });
        fs::write(&file, "1").expect("freeze");
        Frozen(file)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, "0");
    }
}

#[test]
fn an_operators_stop_during_the_restart_preparation_wins() {
    if require(
        "an_operators_stop_during_the_restart_preparation_wins",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    // A wide dump window, so that the stop surely falls inside it.
    let observer = Observer::spawn(&sandbox, &["--stack-dump-wait", "8s"]).expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let frozen = Frozen::freeze(pid);
    observer
        .wait_for("the hung verdict", Duration::from_secs(20), |body| {
            serde_json::from_str::<Value>(body).is_ok_and(|doc| {
                doc["verdicts"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["state"] == "hung"))
            })
        })
        .expect("hung");
    // The observer now waits for the dump. The operator stops containerd meanwhile.
    sandbox
        .systemctl(&["stop", "--no-block", sandbox.unit()])
        .expect("stop");
    let doc = observer
        .wait_for_status("the stopped state", Duration::from_secs(30), |doc| {
            doc["state"] == "stopped"
        })
        .expect("stopped");
    drop(frozen);
    // The stop finishes (SIGKILL after TimeoutStopSec ends the frozen process); nothing
    // starts containerd again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sandbox.unit_state().unwrap().0 != "inactive"
        && sandbox.unit_state().unwrap().0 != "failed"
    {
        assert!(Instant::now() < deadline, "the stop did not finish");
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(2));
    let doc_after = observer.status().expect("status");
    assert_eq!(doc_after["state"], "stopped", "{doc_after}");
    assert!(
        doc_after["restarts"].as_array().unwrap().is_empty(),
        "no restart replaced the operator's stop: {doc_after}"
    );
    assert_eq!(sandbox.main_pid().unwrap(), None, "{doc}");
}

#[test]
fn sigterm_ends_the_observer_promptly_with_a_probe_hanging() {
    if require(
        "sigterm_ends_the_observer_promptly_with_a_probe_hanging",
        NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    // Probes with a long deadline, and no action: a probe hangs on the frozen containerd
    // when the observer is told to stop.
    let observer = Observer::spawn(
        &sandbox,
        &[
            "--dry-run",
            "--probe-interval",
            "40s",
            "--probe-timeout",
            "30s",
        ],
    )
    .expect("observer");
    healthy(&observer);
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let frozen = Frozen::freeze(pid);
    // The kernel sees the stall; the probe sent to confirm it waits for its 30 s deadline.
    observer
        .wait_for_status("a suspect containerd", Duration::from_secs(20), |doc| {
            doc["state"] == "suspect"
        })
        .expect("suspect");
    let asked = Instant::now();
    signal(observer.pid(), libc::SIGTERM);
    let status = observer
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", observer.log()));
    let took = asked.elapsed();
    drop(frozen);
    assert!(status.success(), "{status}\n{}", observer.log());
    assert!(
        observer.log().contains("observer stopped"),
        "{}",
        observer.log()
    );
    eprintln!("SIGTERM to exit: {took:?}");
}
