//! The short summary that `observer status` prints for people.

use std::time::{Duration, SystemTime};

/// The short summary `observer status` prints for people. `colour` adds ANSI colours;
/// `now` dates the document's times ("3 s ago").
pub fn summary(doc: &serde_json::Value, colour: bool, now: SystemTime) -> String {
    use serde_json::Value;
    use std::fmt::Write as _;
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let ago = |v: &Value| {
        v.as_str()
            .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
            .and_then(|at| now.duration_since(at).ok())
            .map(|d| {
                format!(
                    "{} ago",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
            .unwrap_or_else(|| text(v))
    };
    let state_colour = |state: &str| match state {
        "healthy" | "on" | "done" | "ok" | "restart" => "32",
        "starting" | "suspect" | "recovering" | "fallback" | "dry_run" | "paused" => "33",
        "off" => "2",
        _ => "31",
    };
    let mut out = String::new();
    let state = text(&doc["state"]);
    let _ = writeln!(
        out,
        "containerd  {}  {} pid {} version {}",
        paint(&format!("1;{}", state_colour(&state)), &state),
        text(&doc["unit"]),
        text(&doc["containerd_pid"]),
        text(&doc["containerd_version"]),
    );
    let mut mode = text(&doc["mode"]);
    if doc["dry_run"] == true {
        mode.push_str(", dry run");
    }
    if doc["paused"] == true {
        mode.push_str(", paused");
    }
    let _ = writeln!(
        out,
        "observer    pid {} version {}, {mode}",
        text(&doc["observer"]["pid"]),
        text(&doc["observer"]["version"]),
    );
    let degraded = &doc["observer"]["degraded"];
    if degraded.is_object() {
        let _ = writeln!(
            out,
            "            {} since {}: {}",
            paint("1;31", "degraded"),
            ago(&degraded["since"]),
            text(&degraded["reason"]),
        );
    }
    let probe = &doc["last_probe"];
    if probe.is_object() {
        let result = text(&probe["result"]);
        let _ = writeln!(
            out,
            "last probe  {} in {} ms, {}{}",
            paint(state_colour(&result), &result),
            text(&probe["latency_ms"]),
            ago(&probe["at"]),
            probe["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(out, "last probe  none yet");
    }
    // The ladder on one line: a layer that is not `ok` says so in red, with its detail.
    let layers: Vec<String> = doc["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["state"] == "on")
        .map(|l| {
            let name = text(&l["layer"]);
            let last = &l["last"];
            if !last.is_object() {
                return format!("{name} -");
            }
            let result = text(&last["result"]);
            let detail = last["detail"]
                .as_str()
                .filter(|d| result != "ok" && !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            format!(
                "{name} {} {} ms{detail}",
                paint(state_colour(&result), &result),
                text(&last["latency_ms"]),
            )
        })
        .collect();
    if !layers.is_empty() {
        let _ = writeln!(out, "layers      {}", layers.join(", "));
    }
    let blocked = doc["blocked_threads"]["threads"]
        .as_array()
        .map_or(0, Vec::len);
    if blocked > 0 {
        let _ = writeln!(
            out,
            "blocked     {} via {}, first in {} ({})",
            paint("1;31", &format!("{blocked} thread(s) in D state")),
            text(&doc["blocked_threads"]["source"]),
            text(&doc["blocked_threads"]["threads"][0]["wchan"]),
            text(&doc["blocked_threads"]["pressure"]),
        );
    }
    if let Some(sensors) = doc["sensors"].as_object() {
        for (i, (name, sensor)) in sensors.iter().enumerate() {
            let state = text(&sensor["state"]);
            let _ = writeln!(
                out,
                "{}{name:<15} {} via {}{}",
                if i == 0 {
                    "sensors     "
                } else {
                    "            "
                },
                paint(state_colour(&state), &format!("{state:<8}")),
                text(&sensor["hook"]),
                sensor["reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    match doc["verdicts"].as_array().and_then(|v| v.last()) {
        Some(v) => {
            let state = text(&v["state"]);
            let _ = writeln!(
                out,
                "verdict     {} {}, pid {}, detected in {} ms{}",
                paint(state_colour(&state), &state),
                ago(&v["at"]),
                text(&v["pid"]),
                text(&v["detection_latency_ms"]),
                v["evidence"][0]["detail"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "verdict     none yet");
        }
    }
    match doc["actions"].as_array().and_then(|a| a.last()) {
        Some(a) => {
            let action = text(&a["action"]);
            let count = a["count"].as_u64().filter(|&c| c > 1);
            let _ = writeln!(
                out,
                "action      {} for {} {}: {}{}",
                paint(state_colour(&action), &action),
                text(&a["reason"]),
                ago(&a["at"]),
                text(&a["result"]),
                count.map(|c| format!(" ({c} times)")).unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "action      none yet");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> serde_json::Value {
        serde_json::json!({
            "state": "crashed",
            "unit": "containerd.service",
            "containerd_pid": 41,
            "containerd_version": "1.6.20",
            "mode": "fused",
            "dry_run": false,
            "paused": true,
            "observer": { "version": "0.1.0", "pid": 7 },
            "sensors": {
                "process_exit": { "state": "on", "hook": "sched_process_exit", "reason": null },
                "accept_queue": { "state": "fallback", "hook": "sock_diag", "reason": "no BTF" }
            },
            "last_probe": { "at": "2030-01-01T00:00:00Z", "result": "refused", "latency_ms": 0.2, "error": "cannot connect" },
            "layers": [
                { "layer": "cri", "state": "on", "last": { "result": "ok", "latency_ms": 1.5, "detail": "ready" } },
                { "layer": "metadata_write", "state": "on", "last": { "result": "timeout", "latency_ms": 2000.0, "detail": "no answer within 2s" } },
                { "layer": "snapshots", "state": "off", "last": null }
            ],
            "blocked_threads": { "source": "ebpf", "threads": [{ "tid": 50, "wchan": "percpu_rwsem_wait" }], "pressure": "io some avg10=40.00" },
            "verdicts": [{ "at": "2030-01-01T00:00:00Z", "state": "crashed", "pid": 41,
                           "detection_latency_ms": 0.1, "evidence": [{ "detail": "killed by SIGKILL" }] }],
            "actions": [{ "at": "2030-01-01T00:00:01Z", "action": "restart", "reason": "crashed",
                          "result": "done: new pid 42", "count": 1 }]
        })
    }

    #[test]
    fn summary_names_state_pid_probe_sensors_verdict_and_action() {
        let now = humantime::parse_rfc3339("2030-01-01T00:00:05Z").unwrap();
        let text = summary(&document(), false, now);
        for wanted in [
            "containerd  crashed  containerd.service pid 41 version 1.6.20",
            "observer    pid 7 version 0.1.0, fused, paused",
            "last probe  refused in 0.2 ms, 5s ago: cannot connect",
            "layers      cri ok 1.5 ms, metadata_write timeout 2000.0 ms (no answer within 2s)",
            "blocked     1 thread(s) in D state via ebpf, first in percpu_rwsem_wait (io some avg10=40.00)",
            "sensors     accept_queue    fallback via sock_diag (no BTF)",
            "            process_exit    on       via sched_process_exit",
            "verdict     crashed 5s ago, pid 41, detected in 0.1 ms: killed by SIGKILL",
            "action      restart for crashed 4s ago: done: new pid 42",
        ] {
            assert!(text.contains(wanted), "{wanted:?} not in\n{text}");
        }
        assert!(!text.contains('\x1b'), "no colour asked for");
        let coloured = summary(&document(), true, now);
        assert!(coloured.contains("\x1b[1;31mcrashed\x1b[0m"), "{coloured}");
        assert!(coloured.contains("\x1b[32mon      \x1b[0m"), "{coloured}");
    }

    #[test]
    fn summary_of_a_starting_agent_says_none_yet() {
        let doc = serde_json::json!({ "state": "starting", "verdicts": [], "actions": [] });
        let text = summary(&doc, false, SystemTime::now());
        assert!(text.contains("last probe  none yet"), "{text}");
        assert!(text.contains("verdict     none yet"), "{text}");
        assert!(text.contains("action      none yet"), "{text}");
    }
}
