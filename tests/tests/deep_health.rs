//! Deep health against the real containerd: the failures in which containerd still answers
//! `Version()`, each injected for real, and what the observer makes of them. Each test
//! checks the verdict and its evidence, the action (a restart or none), and that nothing
//! else happened.
//!
//! Needs root (loop mounts, fsfreeze, signals to shims, cgroups), eBPF tracepoints (the
//! observer runs as shipped, with its kernel sensors), systemd, containerd with its CRI
//! plugin, Debian's busybox-static, and unshare.

use std::time::{Duration, Instant};

use observer_tests::{OBSERVER_NEEDS, Observer, Sandbox, SandboxOptions, require};
use serde_json::Value;

/// Short periods so that a verdict comes within seconds; the rules are the shipped ones.
const FAST: &[&str] = &[
    "--ladder-interval",
    "1s",
    "--probe-interval",
    "1s",
    "--probe-timeout",
    "500ms",
    "--failures-to-hang",
    "2",
    "--blocked-threshold",
    "1s",
    "--kill-grace",
    "2s",
    "--no-kubernetes",
];

fn observer(sandbox: &Sandbox, extra: &[&str]) -> Observer {
    let args: Vec<&str> = FAST.iter().chain(extra).copied().collect();
    let observer = Observer::spawn(sandbox, &args).unwrap_or_else(|err| panic!("{err}"));
    observer
        .wait_healthy(Duration::from_secs(20))
        .unwrap_or_else(|err| panic!("{err}"));
    observer
}

fn items<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc[key].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The states of every verdict so far, oldest first.
fn verdict_states(doc: &Value) -> Vec<String> {
    items(doc, "verdicts")
        .iter()
        .map(|v| v["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn action_names(doc: &Value) -> Vec<String> {
    items(doc, "actions")
        .iter()
        .map(|a| a["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn layer<'a>(doc: &'a Value, name: &str) -> &'a Value {
    items(doc, "layers")
        .iter()
        .find(|l| l["layer"] == name)
        .unwrap_or_else(|| panic!("no layer {name} in {doc}"))
}

/// Waits until every layer in `names` has answered at least once.
fn wait_layers_ok(observer: &Observer, names: &[&str]) -> Value {
    observer
        .wait_for_status("every layer to answer", Duration::from_secs(20), |doc| {
            names
                .iter()
                .all(|name| layer(doc, name)["last"]["result"] == "ok")
        })
        .unwrap_or_else(|err| panic!("{err}"))
}

fn latest<'a>(doc: &'a Value, state: &str) -> &'a Value {
    items(doc, "verdicts")
        .iter()
        .rev()
        .find(|v| v["state"] == state)
        .unwrap_or_else(|| panic!("no {state} verdict: {doc}"))
}

/// Some containerd thread in `doc`'s blocked threads waits in a named kernel function.
fn assert_waits_in_the_kernel(doc: &Value, pid: u32) {
    let threads = items(&doc["blocked_threads"], "threads");
    assert!(
        threads.iter().any(|t| t["owner"] == "containerd"
            && t["pid"] == pid
            && t["wchan"].as_str().is_some_and(|w| !w.is_empty())),
        "no containerd thread with its wait site: {}",
        doc["blocked_threads"]
    );
}

/// The other two sources of blocked threads, on the same frozen root: the classic
/// `sched_switch` tracepoint (the fast path turned off) and `/proc` sampling (no eBPF for
/// the sensor). Each reports containerd's blocked thread with its wait site and stalls.
#[test]
fn a_frozen_root_is_seen_by_the_classic_tracepoint_and_by_proc_sampling() {
    let Ok(()) = require(
        "a_frozen_root_is_seen_by_the_classic_tracepoint_and_by_proc_sampling",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new().root_on_loop_fs(256))
        .unwrap_or_else(|err| panic!("{err}"));
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    /// How the observer runs, and which source and kernel path it should report.
    struct Case {
        args: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
        source: &'static str,
        path: Option<&'static str>,
    }
    let cases = [
        Case {
            args: &[],
            env: &[("OBSERVER_KERNEL_HOOKS", "tracepoint")],
            source: "ebpf",
            path: Some("tracepoint"),
        },
        Case {
            args: &["--fallback-sensors"],
            env: &[],
            source: "procfs",
            path: None,
        },
    ];
    for Case {
        args,
        env,
        source,
        path,
    } in cases
    {
        let args: Vec<&str> = FAST.iter().chain(args).copied().collect();
        let observer = Observer::spawn_with_env(&sandbox, sandbox.socket(), &args, env)
            .unwrap_or_else(|err| panic!("{err}"));
        let doc = observer
            .wait_healthy(Duration::from_secs(20))
            .unwrap_or_else(|err| panic!("{err}"));
        let sensor = &doc["sensors"]["blocked_threads"];
        assert_eq!(
            sensor["state"],
            if path.is_some() { "on" } else { "fallback" },
            "{sensor}"
        );
        assert_eq!(sensor["path"].as_str(), path, "{sensor}");
        wait_layers_ok(&observer, &["metadata_write"]);
        let frozen = sandbox.freeze_root().unwrap_or_else(|err| panic!("{err}"));
        let doc = observer
            .wait_for_status("a storage stall", Duration::from_secs(30), |doc| {
                doc["state"] == "storage_stalled"
            })
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            latest(&doc, "storage_stalled")["evidence"][0]["source"],
            source,
            "{doc}"
        );
        assert_eq!(doc["blocked_threads"]["source"], source, "{doc}");
        assert_waits_in_the_kernel(&doc, pid);
        drop(frozen);
        observer
            .wait_healthy(Duration::from_secs(30))
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(items(&observer.status().unwrap(), "restarts").is_empty());
    }
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd was restarted"
    );
}

#[test]
fn a_frozen_root_is_a_storage_stall_reported_not_restarted_and_clears_on_thaw() {
    let Ok(()) = require(
        "a_frozen_root_is_a_storage_stall_reported_not_restarted_and_clears_on_thaw",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new().root_on_loop_fs(256))
        .unwrap_or_else(|err| panic!("{err}"));
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let observer = observer(&sandbox, &[]);
    wait_layers_ok(&observer, &["metadata_write", "snapshots", "cri"]);

    let frozen = sandbox.freeze_root().unwrap_or_else(|err| panic!("{err}"));
    let doc = observer
        .wait_for_status("a storage stall", Duration::from_secs(30), |doc| {
            doc["state"] == "storage_stalled"
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let verdict = latest(&doc, "storage_stalled");
    let blocked = &verdict["evidence"][0];
    // Timed by the kernel's sched_switch program, which has run, not by /proc sampling.
    assert_eq!(blocked["source"], "ebpf", "{verdict}");
    assert_eq!(doc["blocked_threads"]["source"], "ebpf", "{doc}");
    let sensor = &doc["sensors"]["blocked_threads"];
    assert_eq!(sensor["state"], "on", "{sensor}");
    assert_eq!(sensor["path"], "tp_btf", "{sensor}");
    assert!(
        items(sensor, "programs")
            .iter()
            .any(|p| p["name"] == "blocked_switch_btf" && p["run_count"].as_u64() > Some(0)),
        "{sensor}"
    );
    let detail = blocked["detail"].as_str().unwrap();
    assert!(detail.contains("in D state"), "{detail}");
    assert_waits_in_the_kernel(&doc, pid);
    assert!(
        detail.contains("pressure"),
        "the PSI context is missing: {detail}"
    );
    // The stall holds long enough for a layer that writes to fail, or it is the D state alone.
    // Held a while longer, it is still reported, never restarted.
    std::thread::sleep(Duration::from_secs(6));
    let doc = observer.status().unwrap();
    assert_eq!(doc["state"], "storage_stalled", "{doc}");
    assert!(
        items(&doc, "restarts").is_empty(),
        "a storage stall was restarted: {doc}"
    );
    assert_eq!(
        sandbox.main_pid().unwrap(),
        Some(pid),
        "containerd was restarted"
    );
    let actions = action_names(&doc);
    assert_eq!(actions, ["report"], "{doc}");
    let report = &items(&doc, "actions")[0];
    assert_eq!(report["reason"], "storage_stalled", "{doc}");
    assert!(
        report["result"]
            .as_str()
            .unwrap()
            .contains("Not restarting"),
        "{report}"
    );
    let write = layer(&doc, "metadata_write");
    assert_eq!(write["last"]["result"], "timeout", "{write}");

    drop(frozen);
    let doc = observer
        .wait_healthy(Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("{err}"));
    let states = verdict_states(&doc);
    assert_eq!(
        states,
        ["healthy", "storage_stalled", "healthy"],
        "nothing but the stall and its end: {doc}"
    );
    assert!(items(&doc, "restarts").is_empty(), "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(pid));
}

#[test]
fn a_stopped_shim_degrades_containerd_naming_the_container_and_the_shim_without_a_restart() {
    let Ok(()) = require(
        "a_stopped_shim_degrades_containerd_naming_the_container_and_the_shim_without_a_restart",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).unwrap_or_else(|err| panic!("{err}"));
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let container = sandbox
        .run_container()
        .unwrap_or_else(|err| panic!("{err}"));
    let observer = observer(&sandbox, &[]);
    wait_layers_ok(&observer, &["tasks"]);

    let shim = container.stop_shim().unwrap_or_else(|err| panic!("{err}"));
    let doc = observer
        .wait_for_status("a degraded containerd", Duration::from_secs(30), |doc| {
            doc["state"] == "degraded"
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let verdict = latest(&doc, "degraded");
    assert_eq!(verdict["layer"], "tasks", "{verdict}");
    assert_eq!(
        verdict["silent_tasks"][0]["id"],
        container.id(),
        "{verdict}"
    );
    assert_eq!(
        verdict["silent_tasks"][0]["shim_pid"],
        shim.pid(),
        "{verdict}"
    );
    let detail = verdict["evidence"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(container.id()) && detail.contains(&format!("shim pid {}", shim.pid())),
        "{detail}"
    );
    let report = items(&doc, "actions")
        .iter()
        .find(|a| a["reason"] == "degraded")
        .unwrap_or_else(|| panic!("no action for the verdict: {doc}"));
    assert_eq!(report["action"], "report", "{report}");
    assert!(
        report["result"]
            .as_str()
            .unwrap()
            .contains("Not restarting containerd"),
        "{report}"
    );
    // Held a while, nothing else happens: no restart, no other verdict.
    std::thread::sleep(Duration::from_secs(4));
    let doc = observer.status().unwrap();
    assert_eq!(doc["state"], "degraded", "{doc}");
    assert!(items(&doc, "restarts").is_empty(), "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(pid));
    assert!(
        std::path::Path::new(&format!("/proc/{}", shim.pid())).exists(),
        "the shim was killed though --kill-hung-shims is off"
    );

    drop(shim);
    let doc = observer
        .wait_healthy(Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        verdict_states(&doc),
        ["healthy", "degraded", "healthy"],
        "{doc}"
    );
    assert_eq!(action_names(&doc), ["report"], "{doc}");
}

#[test]
fn kill_hung_shims_ends_the_shim_and_leaves_containerd_running() {
    let Ok(()) = require(
        "kill_hung_shims_ends_the_shim_and_leaves_containerd_running",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).unwrap_or_else(|err| panic!("{err}"));
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    let container = sandbox
        .run_container()
        .unwrap_or_else(|err| panic!("{err}"));
    let observer = observer(&sandbox, &["--kill-hung-shims"]);
    wait_layers_ok(&observer, &["tasks"]);
    let shim = container.stop_shim().unwrap_or_else(|err| panic!("{err}"));
    let shim_pid = shim.pid();
    let doc = observer
        .wait_for_status("the hung shim killed", Duration::from_secs(30), |doc| {
            action_names(doc).iter().any(|a| a == "kill_shims")
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let kill = items(&doc, "actions")
        .iter()
        .find(|a| a["action"] == "kill_shims")
        .unwrap();
    assert!(
        kill["result"]
            .as_str()
            .unwrap()
            .contains(&format!("shim {shim_pid} killed")),
        "{kill}"
    );
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !std::path::Path::new(&format!("/proc/{shim_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    });
    assert!(gone, "the shim still runs");
    assert!(items(&doc, "restarts").is_empty(), "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(pid));
    drop(shim);
}

#[test]
fn a_startup_hang_gets_one_restart_then_is_reported_with_the_dump() {
    let Ok(()) = require(
        "a_startup_hang_gets_one_restart_then_is_reported_with_the_dump",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    // Type=notify as packaged: a start that never notifies ends at TimeoutStartSec.
    let sandbox = Sandbox::start(SandboxOptions::new().service_extra("TimeoutStartSec=6s"))
        .unwrap_or_else(|err| panic!("{err}"));
    // Hung before the observer starts, as on a node that boots into it (and so that the
    // injector's own stop is not part of what the observer sees).
    let hang = sandbox.hang_startup().unwrap_or_else(|err| panic!("{err}"));
    let args: Vec<&str> = FAST.to_vec();
    let observer = Observer::spawn(&sandbox, &args).unwrap_or_else(|err| panic!("{err}"));
    let doc = observer
        .wait_for_status("a reported startup hang", Duration::from_secs(60), |doc| {
            action_names(doc).iter().any(|a| a == "report_with_dump")
        })
        .unwrap_or_else(|err| panic!("{err}"));
    let hangs: Vec<&Value> = items(&doc, "verdicts")
        .iter()
        .filter(|v| v["state"] == "startup_hung")
        .collect();
    assert_eq!(hangs.len(), 2, "{doc}");
    assert_eq!(
        (hangs[0]["repeat"].as_u64(), hangs[1]["repeat"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        hangs[0]["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"]
                .as_str()
                .unwrap()
                .contains("has not served its socket")),
        "{doc}"
    );
    // One restart for the startup hang, with the goroutine dump asked for before it. The
    // restarted process may also exit at once (status 1) before it hangs again: that is a
    // crash, restarted once within the budget, never a loop (seen once in CI).
    let restarts = items(&doc, "restarts");
    let for_the_hang: Vec<&Value> = restarts
        .iter()
        .filter(|r| r["reason"] == "startup_hung")
        .collect();
    assert_eq!(for_the_hang.len(), 1, "{doc}");
    assert!(for_the_hang[0]["stack_dump"].is_string(), "{doc}");
    assert!(
        restarts.len() <= 2
            && restarts
                .iter()
                .all(|r| ["startup_hung", "crashed"]
                    .contains(&r["reason"].as_str().unwrap_or_default())),
        "{doc}"
    );
    let restarts_at_report = restarts.len();
    let report = items(&doc, "actions")
        .iter()
        .find(|a| a["action"] == "report_with_dump")
        .unwrap();
    assert!(
        report["result"].as_str().unwrap().contains("#13848"),
        "{report}"
    );
    // No more restarts while it keeps hanging.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(500));
        let doc = observer.status().unwrap();
        assert_eq!(
            items(&doc, "restarts").len(),
            restarts_at_report,
            "restarted again: {doc}"
        );
    }
    let states = verdict_states(&observer.status().unwrap());
    assert!(
        states
            .iter()
            .all(|s| ["startup_hung", "suspect", "crashed"].contains(&s.as_str())),
        "{states:?}"
    );
    drop(hang);
}

#[test]
fn a_healthy_containerd_under_load_is_never_flagged() {
    let Ok(()) = require(
        "a_healthy_containerd_under_load_is_never_flagged",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).unwrap_or_else(|err| panic!("{err}"));
    let container = sandbox
        .run_container()
        .unwrap_or_else(|err| panic!("{err}"));
    let observer = observer(&sandbox, &[]);
    wait_layers_ok(
        &observer,
        &[
            "cri",
            "sandboxes",
            "metadata_read",
            "metadata_write",
            "snapshots",
            "tasks",
        ],
    );
    // Load: leases written and containers listed as fast as ctr goes, from two threads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = [
        &["leases", "create", "--expires", "1m"][..],
        &["containers", "ls"][..],
    ]
    .into_iter()
    .map(|args| {
        let stop = stop.clone();
        let socket = sandbox.socket().to_path_buf();
        let args: Vec<String> = args.iter().map(ToString::to_string).collect();
        std::thread::spawn(move || {
            let mut calls = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::process::Command::new("ctr")
                    .arg("--address")
                    .arg(&socket)
                    .args(["--namespace", "load"])
                    .args(&args)
                    .output();
                calls += 1;
            }
            calls
        })
    })
    .collect();
    std::thread::sleep(Duration::from_secs(12));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let calls: u32 = load.into_iter().map(|t| t.join().unwrap()).sum();
    let doc = observer.status().unwrap();
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert_eq!(
        verdict_states(&doc),
        ["healthy"],
        "flagged under load: {doc}"
    );
    assert!(action_names(&doc).is_empty(), "{doc}");
    assert!(calls > 10, "the load did not run ({calls} calls)");
    for name in [
        "cri",
        "sandboxes",
        "metadata_read",
        "metadata_write",
        "snapshots",
        "tasks",
    ] {
        assert_eq!(layer(&doc, name)["state"], "on", "{doc}");
    }
    drop(container);
}

#[test]
fn a_containerd_without_cri_is_a_configuration_fact_not_a_hang() {
    let Ok(()) = require(
        "a_containerd_without_cri_is_a_configuration_fact_not_a_hang",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox =
        Sandbox::start(SandboxOptions::new().without_cri()).unwrap_or_else(|err| panic!("{err}"));
    let observer = observer(&sandbox, &[]);
    let doc = observer
        .wait_for_status(
            "the CRI layers judged unsupported",
            Duration::from_secs(20),
            |doc| {
                layer(doc, "cri")["state"] == "unsupported"
                    && layer(doc, "sandboxes")["state"] == "unsupported"
                    && layer(doc, "metadata_read")["last"]["result"] == "ok"
            },
        )
        .unwrap_or_else(|err| panic!("{err}"));
    let reason = layer(&doc, "cri")["reason"].as_str().unwrap();
    assert!(reason.contains("CRI plugin is not loaded"), "{reason}");
    std::thread::sleep(Duration::from_secs(3));
    let doc = observer.status().unwrap();
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert_eq!(verdict_states(&doc), ["healthy"], "{doc}");
}

/// containerd #13798, for real: containerd's garbage collector holds the lock of a remote
/// snapshotter (a proxy plugin, whose backend is the harness's fake) while that snapshotter's
/// `Walk` never returns. containerd's threads run, and every layer but `snapshots` answers.
/// The observer says `hung`, naming the layer and saying the threads are runnable, takes a
/// goroutine dump that shows the wedge, then restarts containerd, once.
#[test]
fn a_wedged_snapshotter_lock_is_a_hang_dumped_then_restarted_once() {
    let Ok(()) = require(
        "a_wedged_snapshotter_lock_is_a_hang_dumped_then_restarted_once",
        OBSERVER_NEEDS,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new().remote_snapshotter("remote"))
        .unwrap_or_else(|err| panic!("{err}"));
    let remote = sandbox.remote_snapshotter().expect("started with one");
    let pid = sandbox.main_pid().unwrap().expect("containerd runs");
    // containerd 1.6 writes its dump to its log and to this file in its /tmp (ours too).
    let dump = RemovedOnDrop(std::path::PathBuf::from(format!(
        "/tmp/containerd.{pid}.stacks.log"
    )));
    let observer = observer(&sandbox, &["--snapshotter", remote.name()]);
    let layers = ["cri", "metadata_read", "metadata_write", "snapshots"];
    wait_layers_ok(&observer, &layers);

    let wedged_at = std::time::SystemTime::now();
    remote
        .wedge(sandbox.socket())
        .unwrap_or_else(|err| panic!("{err}"));
    let doc = observer
        .wait_for_status("a hang and its restart", Duration::from_secs(60), |doc| {
            !items(doc, "restarts").is_empty()
        })
        .unwrap_or_else(|err| panic!("{err}"));

    // The verdict: hung in the snapshots layer, inside a containerd whose threads run while
    // the other layers answer.
    let verdict = latest(&doc, "hung");
    assert_eq!(verdict["layer"], "snapshots", "{verdict}");
    assert_eq!(verdict["pid"], pid, "{verdict}");
    let evidence = verdict["evidence"].as_array().unwrap();
    let why = &evidence[0];
    // From the blocked-thread sensor in use: eBPF where it loads, else /proc sampling.
    assert_eq!(why["source"], doc["blocked_threads"]["source"], "{verdict}");
    assert!(
        ["ebpf", "procfs"].contains(&why["source"].as_str().unwrap_or_default()),
        "{verdict}"
    );
    let why = why["detail"].as_str().unwrap();
    assert!(
        why.contains("no containerd thread in D state") && why.contains("runnable"),
        "{why}"
    );
    let answering = why
        .split_once("answering meanwhile: ")
        .map(|(_, names)| names.split(", ").collect::<Vec<_>>())
        .unwrap_or_default();
    for name in ["version", "cri", "metadata_read", "metadata_write"] {
        assert!(answering.contains(&name), "{name} did not answer: {why}");
    }
    assert!(!answering.contains(&"snapshots"), "{why}");
    assert!(
        evidence[1..].iter().all(|e| e["source"] == "ladder"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("Snapshots.Remove of an absent key failed (timeout)")),
        "{verdict}"
    );

    // The action: the goroutine dump, taken while the lock was held, then one restart.
    let restarts = items(&doc, "restarts");
    assert_eq!(restarts.len(), 1, "{doc}");
    let restart = &restarts[0];
    assert_eq!(
        (restart["reason"].as_str(), restart["old_pid"].as_u64()),
        (Some("hung"), Some(u64::from(pid))),
        "{restart}"
    );
    let named = format!("written to {}", dump.0.display());
    assert!(
        restart["stack_dump"]
            .as_str()
            .is_some_and(|note| note.contains(&named)),
        "no goroutine dump before the restart: {restart}"
    );
    let action = &items(&doc, "actions")[0];
    assert_eq!(action_names(&doc), ["restart"], "{doc}");
    assert!(
        action["result"]
            .as_str()
            .unwrap()
            .contains(&format!("goroutine dump before it: {named}")),
        "{action}"
    );
    let written = std::fs::metadata(&dump.0)
        .and_then(|m| m.modified())
        .unwrap_or_else(|err| panic!("no dump at {}: {err}", dump.0.display()));
    assert!(
        written >= wedged_at,
        "{} is older than the wedge",
        dump.0.display()
    );
    let stacks = std::fs::read_to_string(&dump.0).unwrap();
    assert!(
        stacks.contains("metadata.(*snapshotter).garbageCollect")
            && stacks.contains("proxy.(*proxySnapshotter).Walk"),
        "the dump does not show the collector waiting in Walk:\n{stacks}"
    );
    let log = std::fs::read_to_string(sandbox.containerd_log()).unwrap();
    let dumped = log.find("=== BEGIN goroutine stack dump ===");
    let restarted = log
        .match_indices("starting containerd")
        .nth(1)
        .map(|(i, _)| i);
    assert!(
        matches!((dumped, restarted), (Some(d), Some(r)) if d < r),
        "the dump is not in containerd's log before the restart (at {dumped:?}, restart at {restarted:?})"
    );

    // Nothing else: containerd answers in every layer again, the wedge is gone with the old
    // process, and holding on brings no other verdict and no second restart.
    wait_layers_ok(&observer, &layers);
    let new_pid = sandbox.main_pid().unwrap().expect("containerd runs");
    assert_eq!(restart["new_pid"], new_pid, "{restart}");
    std::thread::sleep(Duration::from_secs(4));
    let doc = observer.status().unwrap();
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert_eq!(
        verdict_states(&doc),
        ["healthy", "hung", "healthy"],
        "nothing but the hang and its end: {doc}"
    );
    assert_eq!(action_names(&doc), ["restart"], "{doc}");
    assert_eq!(items(&doc, "restarts").len(), 1, "{doc}");
    assert_eq!(layer(&doc, "snapshots")["last"]["result"], "ok", "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), Some(new_pid));
    assert_eq!(
        remote.stalled_lists(),
        1,
        "the remote snapshotter stalled once"
    );
}

/// A file containerd wrote outside the sandbox, removed when the test ends, however it ends.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
