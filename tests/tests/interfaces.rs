//! The observer's interfaces for people and machines: the `/status` schema, `/livez`,
//! `/readyz`, `/metrics` in OpenMetrics, `observer status`, configuration errors, and the
//! agent under systemd as a `Type=notify` unit with a watchdog.
//!
//! The privileged tests need root, eBPF tracepoints (sched/sched_process_exit), BTF,
//! systemd, containerd and unshare; the others run anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use observer_tests::{
    OBSERVER_NEEDS, Observer, Sandbox, SandboxOptions, free_local_addr, observer_bin, require,
    signal,
};
use serde_json::Value;

/// `observer ARGS` with no `OBSERVER_*` variable from the test's environment.
fn observer_cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(observer_bin().expect("the observer binary"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OBSERVER_") {
            cmd.env_remove(key);
        }
    }
    cmd.output().expect("run observer")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// Asserts the exact key set of the object at `path`; a schema change must change this test.
fn assert_keys(doc: &Value, path: &str, v: &Value, expected: &[&str]) {
    let expected: BTreeSet<&str> = expected.iter().copied().collect();
    assert_eq!(keys(v), expected, "keys of {path} changed; document: {doc}");
}

fn assert_each(doc: &Value, path: &str, v: &Value, expected: &[&str]) {
    let items = v
        .as_array()
        .unwrap_or_else(|| panic!("{path} is not an array: {doc}"));
    assert!(!items.is_empty(), "{path} is empty: {doc}");
    for (i, item) in items.iter().enumerate() {
        assert_keys(doc, &format!("{path}[{i}]"), item, expected);
    }
}

/// Checks the whole `/status` document of an agent that has seen a crash and restarted.
fn assert_status_schema(doc: &Value) {
    assert_keys(
        doc,
        "/",
        doc,
        &[
            "observer",
            "state",
            "unit",
            "containerd_pid",
            "containerd_version",
            "mode",
            "dry_run",
            "sensors",
            "last_probe",
            "open_probe",
            "failed_probes",
            "pending_connections",
            "accept_latency",
            "heartbeat",
            "last_exit",
            "verdicts",
            "restarts",
            "actions",
            "unit_state",
            "restart_budget",
            "paused",
            "bus",
            "config_problem",
            "layers",
            "blocked_threads",
        ],
    );
    assert_each(
        doc,
        "layers",
        &doc["layers"],
        &[
            "layer",
            "state",
            "reason",
            "period_ms",
            "deadline_ms",
            "last",
        ],
    );
    assert_eq!(
        doc["layers"].as_array().map(Vec::len),
        Some(6),
        "one entry per deeper layer: {doc}"
    );
    assert_keys(
        doc,
        "blocked_threads",
        &doc["blocked_threads"],
        &[
            "source",
            "interval_ms",
            "threshold_ms",
            "threads",
            "pressure",
        ],
    );
    assert_keys(
        doc,
        "bus",
        &doc["bus"],
        &["connected", "since", "reconnects", "last_error"],
    );
    assert_keys(
        doc,
        "observer",
        &doc["observer"],
        &[
            "version",
            "pid",
            "started_at",
            "scheduling_gaps",
            "last_scheduling_gap",
            "degraded",
        ],
    );
    let sensors = &doc["sensors"];
    assert_keys(
        doc,
        "sensors",
        sensors,
        &[
            "process_exit",
            "exit_cause",
            "accept_queue",
            "blocked_threads",
        ],
    );
    for (name, sensor) in sensors.as_object().unwrap() {
        let path = format!("sensors.{name}");
        assert_keys(
            doc,
            &path,
            sensor,
            &["state", "hook", "path", "reason", "notes", "programs"],
        );
        for (i, program) in sensor["programs"].as_array().unwrap().iter().enumerate() {
            assert_keys(
                doc,
                &format!("{path}.programs[{i}]"),
                program,
                &["name", "run_count", "run_time_ms", "avg_run_ns"],
            );
        }
    }
    assert!(
        !sensors["process_exit"]["programs"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the eBPF exit sensor reports its cost: {doc}"
    );
    assert_keys(
        doc,
        "last_probe",
        &doc["last_probe"],
        &["at", "latency_ms", "result", "version", "error"],
    );
    assert_keys(
        doc,
        "open_probe",
        &doc["open_probe"],
        &["at", "latency_ms", "result", "version", "error"],
    );
    assert_keys(
        doc,
        "pending_connections",
        &doc["pending_connections"],
        &[
            "count",
            "oldest_age_ms",
            "source",
            "accepted_per_s",
            "last_accept_ago_ms",
        ],
    );
    if !doc["accept_latency"].is_null() {
        assert_keys(
            doc,
            "accept_latency",
            &doc["accept_latency"],
            &["window_s", "count", "p50_ms", "p99_ms", "max_ms"],
        );
    }
    assert_keys(
        doc,
        "heartbeat",
        &doc["heartbeat"],
        &["interval_ms", "sent", "failed"],
    );
    let exit = &doc["last_exit"];
    assert_keys(
        doc,
        "last_exit",
        exit,
        &["at", "pid", "source", "description", "cause"],
    );
    assert_keys(
        doc,
        "last_exit.cause",
        &exit["cause"],
        &[
            "status",
            "signal",
            "signal_name",
            "core_dumped",
            "sender_pid",
            "sender_comm",
            "oom_killed",
        ],
    );
    assert_each(
        doc,
        "verdicts",
        &doc["verdicts"],
        &[
            "at",
            "state",
            "pid",
            "detection_latency_ms",
            "evidence",
            "layer",
            "repeat",
            "silent_tasks",
        ],
    );
    for verdict in doc["verdicts"].as_array().unwrap() {
        assert_each(
            doc,
            "verdicts[].evidence",
            &verdict["evidence"],
            &["source", "at", "detail"],
        );
    }
    assert_each(
        doc,
        "restarts",
        &doc["restarts"],
        &[
            "at",
            "reason",
            "old_pid",
            "job_result",
            "error",
            "duration_ms",
            "new_pid",
            "stack_dump",
            "killed_main",
            "escalation",
        ],
    );
    assert_each(
        doc,
        "actions",
        &doc["actions"],
        &["at", "action", "reason", "evidence", "result", "count"],
    );
    assert_keys(
        doc,
        "unit_state",
        &doc["unit_state"],
        &[
            "active_state",
            "sub_state",
            "main_pid",
            "exec_main_pid",
            "job",
            "result",
            "n_restarts",
            "freezer_state",
        ],
    );
    let budget = &doc["restart_budget"];
    let mut budget_keys = vec!["state", "recent_restarts", "max_restarts", "window_s"];
    if budget["state"] == "backing_off" {
        budget_keys.push("retry_in");
    }
    assert_keys(doc, "restart_budget", budget, &budget_keys);
}

/// One metric family of an OpenMetrics exposition.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    unit: Option<String>,
    help: Option<String>,
    /// (sample name, labels, value)
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// Parses the OpenMetrics text format strictly enough to catch a malformed exposition:
/// metadata before samples, every sample in a declared family with a suffix its type allows,
/// units as name suffixes, and `# EOF` at the end.
fn parse_openmetrics(text: &str) -> BTreeMap<String, Family> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut saw_eof = false;
    for line in text.lines() {
        assert!(!saw_eof, "a line after # EOF: {line}");
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (what, name, rest) = (
                parts.next().unwrap(),
                parts.next().expect("a metric name"),
                parts.next().unwrap_or_default(),
            );
            let family = families.entry(name.to_owned()).or_default();
            assert!(family.samples.is_empty(), "metadata after samples: {line}");
            match what {
                "TYPE" => family.kind = rest.to_owned(),
                "UNIT" => family.unit = Some(rest.to_owned()),
                "HELP" => family.help = Some(rest.to_owned()),
                other => panic!("unknown metadata {other}: {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let labels = body
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        let family_name = families
            .keys()
            .filter(|f| name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("sample {name} of no declared family"))
            .clone();
        let family = families.get_mut(&family_name).unwrap();
        let suffix = &name[family_name.len()..];
        let allowed: &[&str] = match family.kind.as_str() {
            "counter" => &["_total", "_created"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            other => panic!("unexpected type {other} of {family_name}"),
        };
        assert!(
            allowed.contains(&suffix),
            "{name} is not a valid sample of {} {family_name}",
            family.kind
        );
        family.samples.push((name.to_owned(), labels, value));
    }
    assert!(saw_eof, "the exposition does not end with # EOF");
    for (name, family) in &families {
        assert!(!family.kind.is_empty(), "{name} has no TYPE");
        assert!(family.help.is_some(), "{name} has no HELP");
        if let Some(unit) = &family.unit {
            assert!(
                name.ends_with(&format!("_{unit}")),
                "{name} does not end in its unit {unit}"
            );
        }
        if family.kind == "histogram" {
            check_histogram(name, family);
        }
    }
    families
}

/// Buckets are cumulative and the `+Inf` bucket equals the count, in each series of the
/// histogram (a labelled histogram has one per label set).
fn check_histogram(name: &str, family: &Family) {
    let series_of = |labels: &BTreeMap<String, String>| {
        let mut labels = labels.clone();
        labels.remove("le");
        labels
    };
    let series: BTreeSet<BTreeMap<String, String>> = family
        .samples
        .iter()
        .map(|(_, l, _)| series_of(l))
        .collect();
    for key in series {
        let buckets: Vec<(f64, f64)> = family
            .samples
            .iter()
            .filter(|(n, l, _)| n.ends_with("_bucket") && series_of(l) == key)
            .map(|(_, labels, v)| {
                let le = labels.get("le").expect("a bucket has le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name} {key:?}: {buckets:?}"
        );
        let count = family
            .samples
            .iter()
            .find(|(n, l, _)| n.ends_with("_count") && *l == key)
            .map(|s| s.2)
            .expect("a histogram has a count");
        assert_eq!(
            buckets.last().map(|b| b.0),
            Some(f64::INFINITY),
            "{name} {key:?}"
        );
        assert_eq!(buckets.last().map(|b| b.1), Some(count), "{name} {key:?}");
    }
}

/// The value of the sample `name` with exactly these labels.
fn sample(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    families
        .values()
        .flat_map(|f| &f.samples)
        .find(|(n, l, _)| n == name && *l == labels)
        .map(|s| s.2)
}

fn metrics(observer: &Observer) -> BTreeMap<String, Family> {
    let (code, body) = observer.get("/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    parse_openmetrics(&body)
}

#[test]
fn metrics_parse_and_count_a_crash_restart() {
    if require("metrics_parse_and_count_a_crash_restart", OBSERVER_NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    // JSON logs, which this test reads back line by line.
    let observer = Observer::spawn(&sandbox, &["--log-format", "json"]).expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");

    let families = metrics(&observer);
    let expected: BTreeMap<&str, (&str, Option<&str>)> = [
        (
            "containerd_observer_probe_latency_seconds",
            ("histogram", Some("seconds")),
        ),
        ("containerd_observer_probes", ("counter", None)),
        (
            "containerd_observer_accept_latency_seconds",
            ("histogram", Some("seconds")),
        ),
        ("containerd_observer_pending_connections", ("gauge", None)),
        (
            "containerd_observer_oldest_pending_age_seconds",
            ("gauge", Some("seconds")),
        ),
        ("containerd_observer_accept_rate", ("gauge", None)),
        ("containerd_observer_scheduling_gaps", ("counter", None)),
        ("containerd_observer_exits", ("counter", None)),
        ("containerd_observer_verdicts", ("counter", None)),
        ("containerd_observer_restarts", ("counter", None)),
        ("containerd_observer_actions", ("counter", None)),
        ("containerd_observer_state", ("gauge", None)),
        ("containerd_observer_bus_connected", ("gauge", None)),
        ("containerd_observer_bus_reconnects", ("counter", None)),
        (
            "containerd_observer_layer_probe_latency_seconds",
            ("histogram", Some("seconds")),
        ),
        ("containerd_observer_layer_probes", ("counter", None)),
        ("containerd_observer_blocked_threads", ("gauge", None)),
        ("containerd_observer_degraded", ("gauge", None)),
        ("containerd_observer_status_connections", ("gauge", None)),
        (
            "containerd_observer_status_connections_shed",
            ("counter", None),
        ),
        (
            "containerd_observer_status_accept_errors",
            ("counter", None),
        ),
        ("containerd_observer_build", ("info", None)),
    ]
    .into_iter()
    .collect();
    let found: BTreeMap<&str, (&str, Option<&str>)> = families
        .iter()
        .map(|(name, f)| (name.as_str(), (f.kind.as_str(), f.unit.as_deref())))
        .collect();
    assert_eq!(found, expected, "metric families changed");
    for family in families.values().filter(|f| f.kind == "counter") {
        for (name, ..) in &family.samples {
            assert!(
                name.ends_with("_total"),
                "counter sample {name} lacks _total"
            );
        }
    }
    let ok_probes = sample(
        &families,
        "containerd_observer_probes_total",
        &[("result", "ok")],
    );
    assert!(ok_probes.is_some_and(|n| n >= 1.0), "{ok_probes:?}");
    assert!(
        sample(
            &families,
            "containerd_observer_probe_latency_seconds_count",
            &[]
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        sample(
            &families,
            "containerd_observer_state",
            &[("state", "healthy")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &families,
            "containerd_observer_state",
            &[("state", "crashed")]
        ),
        Some(0.0)
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &families,
            "containerd_observer_build_info",
            &[("version", version)]
        ),
        Some(1.0)
    );

    let old_pid = sandbox.main_pid().unwrap().expect("containerd runs");
    signal(old_pid, libc::SIGKILL);
    observer
        .wait_for_status("a finished restart", Duration::from_secs(20), |doc| {
            doc["restarts"][0]["job_result"] == "done"
        })
        .expect("restart");
    let families = metrics(&observer);
    let restarts = |result| {
        sample(
            &families,
            "containerd_observer_restarts_total",
            &[("trigger", "crashed"), ("result", result)],
        )
    };
    assert_eq!(restarts("done"), Some(1.0), "{families:#?}");
    assert_eq!(
        sample(
            &families,
            "containerd_observer_exits_total",
            &[("cause", "sigkill")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &families,
            "containerd_observer_verdicts_total",
            &[("verdict", "crashed")]
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        sample(
            &families,
            "containerd_observer_actions_total",
            &[("action", "restart")]
        ),
        Some(1.0)
    );

    // The same agent, after a crash and a restart, shows every part of the document.
    let doc = observer
        .wait_for_status(
            "the new containerd answering",
            Duration::from_secs(10),
            |doc| doc["state"] == "healthy" && !doc["last_exit"].is_null(),
        )
        .expect("healthy again");
    assert_status_schema(&doc);
    // JSON logs: every line an object; one line per verdict and per action; the eBPF
    // program's own message (aya-log, through the `log` bridge) in the same stream.
    let log = observer.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let count = |pred: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| pred(l)).count();
    assert_eq!(
        count(&|l| l["message"] == "verdict" && l["verdict"] == "Crashed"),
        1,
        "{log}"
    );
    assert_eq!(count(&|l| l["action"] == "restart"), 1, "{log}");
    let ebpf_message = format!("watched process {old_pid} exited");
    assert_eq!(
        count(&|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains(&ebpf_message))),
        1,
        "{log}"
    );
}

#[test]
fn probes_status_command_and_unix_socket() {
    if require("probes_status_command_and_unix_socket", OBSERVER_NEEDS).is_err() {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    let socket = sandbox.dir().join("observer.sock");
    // A socket file left behind by an earlier run must not stop the agent.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let socket_arg = socket.to_str().unwrap();
    let observer = Observer::spawn(&sandbox, &["--status-socket", socket_arg]).expect("observer");
    let doc = observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");

    let (code, body) = observer.get("/livez").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["live"], true);
    let (code, body) = observer.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);

    let addr = observer.status_addr().to_string();
    let out = observer_cli(&["status", "--status-listen", &addr]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let pid = doc["containerd_pid"].as_u64().unwrap();
    for wanted in [
        "containerd  healthy  containerd.service pid ".to_owned() + &pid.to_string(),
        format!("observer    pid {}", doc["observer"]["pid"]),
        "last probe  ok in ".into(),
        "sensors     accept_queue    on".into(),
        "process_exit    on       via ".into(),
        "verdict     ".into(),
        "action      none yet".into(),
    ] {
        assert!(stdout.contains(&wanted), "{wanted:?} not in\n{stdout}");
    }
    assert!(!stdout.contains('\x1b'), "no colour on a pipe:\n{stdout}");

    let out = observer_cli(&["status", "--json", "--status-socket", socket_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("--json prints the document");
    assert_eq!(doc["state"], "healthy");
    assert_eq!(doc["containerd_pid"], pid);
}

#[test]
fn status_of_a_missing_agent_says_it_is_not_running() {
    let addr = free_local_addr().to_string();
    let out = observer_cli(&["status", "--status-listen", &addr]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("is not running"), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = observer_cli(&[
        "status",
        "--json",
        "--status-socket",
        "/nonexistent/observer.sock",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(text(&out.stderr).contains("/nonexistent/observer.sock"));
}

#[test]
fn a_bad_config_file_is_refused_with_its_line() {
    let dir = std::env::temp_dir().join(format!("observer-interfaces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("observer.toml");
    std::fs::write(
        &path,
        "unit = \"containerd.service\"\nprobe-timeout = \"0s\"\n",
    )
    .unwrap();
    let out = observer_cli(&["--config", path.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("positive duration"), "{stderr}");
}

/// `systemctl --user show -p NAME --value UNIT`.
fn show(sandbox: &Sandbox, unit: &str, property: &str) -> String {
    sandbox
        .systemctl(&["show", "-p", property, "--value", unit])
        .expect("systemctl show")
        .trim()
        .to_owned()
}

#[test]
fn runs_as_a_notify_unit_with_a_watchdog_and_stops_cleanly() {
    if require(
        "runs_as_a_notify_unit_with_a_watchdog_and_stops_cleanly",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    let log = sandbox.dir().join("observer-unit.log");
    let unit = format!(
        "[Service]\n\
         Type=notify\n\
         WatchdogSec=2s\n\
         TimeoutStartSec=20s\n\
         TimeoutStopSec=20s\n\
         Environment=NO_COLOR=1 RUST_LOG=info\n\
         ExecStart={bin} --socket {socket} --unit {target} --bus {bus} --status-listen {addr}\n\
         StandardOutput=append:{log}\n\
         StandardError=append:{log}\n",
        bin = observer_bin().unwrap().display(),
        socket = sandbox.socket().display(),
        target = sandbox.unit(),
        bus = sandbox.bus_address(),
        addr = free_local_addr(),
        log = log.display(),
    );
    sandbox.write_unit("observer.service", &unit).expect("unit");
    let started = Instant::now();
    // Type=notify: start returns once the agent sent READY=1.
    sandbox
        .systemctl(&["start", "observer.service"])
        .unwrap_or_else(|e| panic!("start: {e}\n{}", read(&log)));
    assert_eq!(
        show(&sandbox, "observer.service", "ActiveState"),
        "active",
        "{}",
        read(&log)
    );
    assert!(read(&log).contains("observer ready"), "{}", read(&log));
    // Several watchdog periods: systemd would kill an agent that stopped petting.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        show(&sandbox, "observer.service", "ActiveState"),
        "active",
        "{}",
        read(&log)
    );
    assert_eq!(show(&sandbox, "observer.service", "NRestarts"), "0");
    let status_text = show(&sandbox, "observer.service", "StatusText");
    assert_eq!(status_text, "containerd is healthy");

    sandbox
        .systemctl(&["stop", "observer.service"])
        .expect("stop");
    assert_eq!(
        show(&sandbox, "observer.service", "Result"),
        "success",
        "{}",
        read(&log)
    );
    assert_eq!(
        show(&sandbox, "observer.service", "ExecMainStatus"),
        "0",
        "{}",
        read(&log)
    );
    assert!(read(&log).contains("observer stopped"), "{}", read(&log));
    assert!(started.elapsed() < Duration::from_secs(30));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
