//! The harness's fault injectors, tried against the real containerd with `ctr`: each breaks
//! what it says, and each is undone when its guard drops.
//!
//! Every test needs root (mounts, cgroups, signals to the sandbox's shims), systemd,
//! containerd and unshare; none needs eBPF.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use observer_tests::{K8S_NAMESPACE, Need, Sandbox, SandboxOptions, containerd_version, require};

const NEEDS: &[Need] = &[Need::Root, Need::Systemd, Need::Containerd, Need::Unshare];

/// `ctr ARGS` against the sandbox with a deadline: `Some(stdout)` when it succeeded in time,
/// `None` when it failed or hung.
fn ctr(sandbox: &Sandbox, namespace: &str, timeout: Duration, args: &[&str]) -> Option<String> {
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(sandbox.socket())
        .args(["--namespace", namespace, "--connect-timeout", "2s"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run ctr");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for ctr") {
            let mut out = String::new();
            use std::io::Read as _;
            let _ = child.stdout.take().unwrap().read_to_string(&mut out);
            return status.success().then_some(out);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn a_frozen_root_stops_metadata_writes_while_version_answers_and_thaws_on_drop() {
    let Ok(()) = require(
        "a_frozen_root_stops_metadata_writes_while_version_answers_and_thaws_on_drop",
        NEEDS,
    ) else {
        return;
    };
    let sandbox = start(SandboxOptions::new().root_on_loop_fs(128));
    let lease = ["leases", "create", "--expires", "1m"];
    assert!(ctr(&sandbox, "observer", Duration::from_secs(10), &lease).is_some());
    let frozen = sandbox.freeze_root().unwrap_or_else(|err| panic!("{err}"));
    assert!(
        ctr(&sandbox, "observer", Duration::from_secs(2), &lease).is_none(),
        "a lease was created on a frozen root"
    );
    // Not `ctr version`: it prints the answer, then hangs on the frozen root itself.
    containerd_version(sandbox.socket(), Duration::from_secs(5)).expect("Version() answers");
    drop(frozen);
    assert!(
        ctr(&sandbox, "observer", Duration::from_secs(10), &lease).is_some(),
        "writes did not resume after the thaw"
    );
}

#[test]
fn a_frozen_root_is_thawed_by_the_sandbox_even_if_the_guard_leaks() {
    let Ok(()) = require(
        "a_frozen_root_is_thawed_by_the_sandbox_even_if_the_guard_leaks",
        NEEDS,
    ) else {
        return;
    };
    let sandbox = start(SandboxOptions::new().root_on_loop_fs(128));
    let image = sandbox.dir().join("root.img");
    std::mem::forget(sandbox.freeze_root().unwrap_or_else(|err| panic!("{err}")));
    let started = Instant::now();
    drop(sandbox);
    assert!(!image.exists(), "the loop image outlived the sandbox");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "teardown waited on the frozen root"
    );
}

#[test]
fn a_stopped_shim_leaves_its_task_unknown_while_containerd_answers() {
    let Ok(()) = require(
        "a_stopped_shim_leaves_its_task_unknown_while_containerd_answers",
        NEEDS,
    ) else {
        return;
    };
    let sandbox = start(SandboxOptions::new());
    let container = sandbox
        .run_container()
        .unwrap_or_else(|err| panic!("{err}"));
    let tasks = ["task", "ls"];
    let listed = ctr(&sandbox, K8S_NAMESPACE, Duration::from_secs(10), &tasks).unwrap();
    assert!(
        listed.contains(container.id()) && listed.contains("RUNNING"),
        "{listed}"
    );
    let shim = container.stop_shim().unwrap_or_else(|err| panic!("{err}"));
    let listed = ctr(&sandbox, K8S_NAMESPACE, Duration::from_secs(10), &tasks).unwrap();
    assert!(listed.contains("UNKNOWN"), "{listed}");
    assert!(
        ctr(
            &sandbox,
            K8S_NAMESPACE,
            Duration::from_secs(5),
            &["version"]
        )
        .is_some()
    );
    drop(shim);
    let listed = ctr(&sandbox, K8S_NAMESPACE, Duration::from_secs(10), &tasks).unwrap();
    assert!(listed.contains("RUNNING"), "{listed}");
    let id = container.id().to_string();
    drop(container);
    let listed = ctr(&sandbox, K8S_NAMESPACE, Duration::from_secs(10), &tasks).unwrap();
    assert!(
        !listed.contains(&id),
        "the container outlived its guard: {listed}"
    );
}

#[test]
fn a_held_metadata_lock_hangs_containerd_at_start_until_released() {
    let Ok(()) = require(
        "a_held_metadata_lock_hangs_containerd_at_start_until_released",
        NEEDS,
    ) else {
        return;
    };
    let sandbox = start(SandboxOptions::new());
    let hang = sandbox.hang_startup().unwrap_or_else(|err| panic!("{err}"));
    let pid = sandbox
        .wait_for_main_pid(Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}"));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ctr(
            &sandbox,
            K8S_NAMESPACE,
            Duration::from_secs(2),
            &["version"]
        )
        .is_none(),
        "containerd served its socket with its metadata locked"
    );
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd is not running"
    );
    drop(hang);
    sandbox
        .wait_for_pid(None, Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        ctr(
            &sandbox,
            K8S_NAMESPACE,
            Duration::from_secs(10),
            &["version"]
        )
        .is_some()
    );
}
