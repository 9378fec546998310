//! The first real loop: containerd dies, the kernel tells the observer, the observer asks
//! systemd to restart it, and a new containerd answers.
//!
//! Needs root, eBPF tracepoints (sched/sched_process_exit), systemd, containerd, unshare.

use std::time::Duration;

use observer_tests::{OBSERVER_NEEDS, Sandbox, SandboxOptions, require, signal};

/// `ctr version` against the sandbox's socket: an answer from the server, independent of
/// the observer's own probe.
fn containerd_answers(sandbox: &Sandbox) -> bool {
    std::process::Command::new("ctr")
        .arg("--address")
        .arg(sandbox.socket())
        .arg("version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Server:"))
        .unwrap_or(false)
}

#[test]
fn sigkill_is_seen_through_ebpf_and_restarted_over_dbus() {
    if require(
        "sigkill_is_seen_through_ebpf_and_restarted_over_dbus",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    let observer = observer_tests::Observer::spawn(&sandbox, &[]).expect("observer");
    let doc = observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    assert_eq!(doc["mode"], "fused", "{doc}");
    assert_eq!(doc["sensors"]["process_exit"]["state"], "on", "{doc}");
    let old_pid = sandbox.main_pid().unwrap().expect("containerd runs");
    assert_eq!(doc["containerd_pid"], old_pid);

    signal(old_pid, libc::SIGKILL);

    let doc = observer
        .wait_for_status("a finished restart", Duration::from_secs(20), |doc| {
            doc["restarts"][0]["job_result"] == "done"
        })
        .expect("restart");
    let crash = doc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["state"] == "crashed")
        .unwrap_or_else(|| panic!("no crashed verdict: {doc}"));
    assert_eq!(crash["pid"], old_pid, "{doc}");
    assert_eq!(crash["evidence"][0]["source"], "ebpf", "{doc}");
    assert!(
        crash["evidence"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("sched_process_exit"),
        "{doc}"
    );
    let restart = &doc["restarts"][0];
    assert_eq!(restart["reason"], "crashed", "{doc}");
    assert_eq!(restart["old_pid"], old_pid, "{doc}");

    let new_pid = sandbox
        .wait_for_pid(Some(old_pid), Duration::from_secs(10))
        .expect("a new containerd");
    assert_ne!(new_pid, old_pid);
    assert_eq!(restart["new_pid"], new_pid, "{doc}");
    assert!(containerd_answers(&sandbox), "the new containerd answers");
    observer
        .wait_for(
            "the observer to follow the new PID",
            Duration::from_secs(10),
            |body| {
                body.contains(&format!(r#""containerd_pid":{new_pid}"#))
                    && body.contains(r#""state":"healthy""#)
            },
        )
        .expect("healthy again");
}
