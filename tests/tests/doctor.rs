//! `observer doctor` against the harness's sandbox: it loads the kernel programs through the
//! agent's loader, probes the private containerd, and reaches its systemd manager over the
//! private bus; and it names the fix when one of them is not where the flags say.
//!
//! Needs root, eBPF (tp_btf or tracepoints), BTF, systemd, containerd and unshare.

use std::process::{Command, Output};

use observer_tests::{OBSERVER_NEEDS, Sandbox, SandboxOptions, observer_bin, require};
use serde_json::Value;

/// `observer doctor ARGS` on the sandbox's socket, unit and bus unless `args` name others,
/// with no `OBSERVER_*` variable from the test's environment.
fn doctor_command(sandbox: &Sandbox, args: &[&str]) -> Output {
    let mut cmd = Command::new(observer_bin().expect("the observer binary"));
    cmd.arg("doctor");
    let named = |flag: &str| args.contains(&flag);
    if !named("--socket") {
        cmd.arg("--socket").arg(sandbox.socket());
    }
    if !named("--unit") {
        cmd.args(["--unit", sandbox.unit()]);
    }
    if !named("--bus") {
        cmd.args(["--bus", &sandbox.bus_address()]);
    }
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OBSERVER_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("run observer doctor")
}

/// `observer doctor --json ARGS`, and its findings.
fn doctor(sandbox: &Sandbox, args: &[&str]) -> (Output, Value) {
    let output = doctor_command(sandbox, &[&["--json"], args].concat());
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "observer doctor printed no JSON ({e}); stdout: {}; stderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check `{name}` in {report:#}"))
}

#[test]
fn doctor_finds_what_the_agent_needs_in_the_sandbox() {
    if require(
        "doctor_finds_what_the_agent_needs_in_the_sandbox",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    let (output, report) = doctor(&sandbox, &[]);
    assert!(output.status.success(), "doctor failed: {report:#}");
    assert_eq!(report["ready"], true, "{report:#}");
    for sensor in [
        "process exit",
        "exit cause",
        "accept queue",
        "blocked threads",
    ] {
        let found = check(&report, sensor);
        assert_eq!(found["verdict"], "ok", "{sensor} did not load: {report:#}");
        let layer = found["layer"].as_str().unwrap_or_default();
        assert!(
            ["fentry", "tp_btf", "tracepoint"].contains(&layer),
            "{sensor} on a kernel layer: {found}"
        );
    }
    let containerd = check(&report, "containerd");
    assert_eq!(containerd["verdict"], "ok", "{report:#}");
    assert!(
        containerd["found"].as_str().unwrap().contains("answered"),
        "{containerd}"
    );
    assert_eq!(check(&report, "D-Bus")["verdict"], "ok", "{report:#}");
    let unit = check(&report, "unit");
    assert_eq!(unit["verdict"], "ok", "{report:#}");
    let pid = sandbox
        .main_pid()
        .expect("main pid")
        .expect("containerd runs");
    assert!(
        unit["found"].as_str().unwrap().contains(&pid.to_string()),
        "the unit's main PID {pid}: {unit}"
    );

    // With the kernel programs refused, the fallbacks are tried and said to stand in.
    let (output, report) = doctor(&sandbox, &["--fallback-sensors"]);
    assert!(output.status.success(), "{report:#}");
    for sensor in ["process exit", "accept queue", "blocked threads"] {
        let found = check(&report, sensor);
        assert_eq!(
            (found["verdict"].as_str(), found["layer"].as_str()),
            (Some("degraded"), Some("fallback")),
            "{found}"
        );
    }
}

#[test]
fn doctor_names_the_fix_for_a_wrong_socket_or_unit() {
    if require(
        "doctor_names_the_fix_for_a_wrong_socket_or_unit",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    let absent = sandbox.dir().join("absent.sock");
    let (output, report) = doctor(&sandbox, &["--socket", absent.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ready"], false);
    let containerd = check(&report, "containerd");
    assert_eq!(containerd["verdict"], "missing", "{containerd}");
    let fix = containerd["fix"].as_str().expect("a fix");
    assert!(fix.contains("--socket"), "{fix}");
    assert!(fix.contains(absent.to_str().unwrap()), "{fix}");
    // The rest still stands.
    assert_eq!(check(&report, "unit")["verdict"], "ok", "{report:#}");

    let (output, report) = doctor(&sandbox, &["--unit", "no-such-containerd.service"]);
    assert_eq!(output.status.code(), Some(1), "{report:#}");
    let unit = check(&report, "unit");
    assert_eq!(unit["verdict"], "missing", "{unit}");
    assert!(unit["fix"].as_str().unwrap().contains("--unit"), "{unit}");
    assert_eq!(check(&report, "D-Bus")["verdict"], "ok", "{report:#}");
    assert_eq!(check(&report, "containerd")["verdict"], "ok", "{report:#}");

    // And the text for people says it too.
    let text = doctor_command(&sandbox, &["--unit", "no-such-containerd.service"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("NOT READY: the agent needs unit"),
        "{stdout}"
    );
    assert!(stdout.contains("fix: pass --unit"), "{stdout}");
}
