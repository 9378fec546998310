//! `deploy/monitoring/`, checked on real data: a real Prometheus on loopback scrapes a real
//! observer watching the sandbox's containerd through a crash and a freeze, then the observer
//! stops. The series Prometheus stored (read back through its HTTP API, `query_range`) become
//! the input of `promtool test rules`, which evaluates the PrometheusRule's alerts on them;
//! every query of the Grafana dashboard runs against the same Prometheus. Nothing here makes
//! up a sample.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use observer_tests::{
    Need, OBSERVER_NEEDS, Observer, Sandbox, SandboxOptions, free_local_addr, http_get, require,
    signal,
};
use serde_json::{Value, json};

const JOB: &str = "containerd-observer";
/// Scrape and rule evaluation interval: short, so that a 1.7 s freeze leaves samples.
const STEP_S: u64 = 1;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `prometheus` process, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let config_doc = json!({
            "global": {"scrape_interval": format!("{STEP_S}s"), "evaluation_interval": format!("{STEP_S}s")},
            "scrape_configs": [{
                "job_name": JOB,
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": [target.to_string()]}],
            }],
        });
        fs::write(&config, config_doc.to_string()).unwrap();
        let addr = free_local_addr();
        let log = dir.join("prometheus.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("prometheus");
        let prometheus = Prometheus { child, addr, log };
        prometheus.wait("Prometheus to be ready", Duration::from_secs(30), || {
            http_get(addr, "/-/ready").is_some_and(|(code, _)| code == 200)
        });
        prometheus
    }

    fn wait(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `GET /api/v1/<api>?<params>`, its `data`.
    fn api(&self, api: &str, params: &[(&str, String)]) -> Value {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let path = format!("/api/v1/{api}?{}", query.join("&"));
        let (code, body) = http_get(self.addr, &path).expect("the Prometheus API answers");
        let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            code == 200 && doc["status"] == "success",
            "{path}: HTTP {code}: {body}"
        );
        doc["data"].clone()
    }

    fn instant(&self, query: &str, at: f64) -> Vec<Value> {
        self.api(
            "query",
            &[("query", query.into()), ("time", at.to_string())],
        )["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGCONT on drop: a frozen containerd is never left frozen.
struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `name{k="v",...}` in promtool's series notation.
fn series_name(metric: &serde_json::Map<String, Value>) -> String {
    let name = metric["__name__"].as_str().unwrap();
    let labels: Vec<String> = metric
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap()))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// The alerts of the PrometheusRule, as a plain rule file for promtool.
fn rule_file() -> Value {
    let path = repo().join("deploy/monitoring/prometheusrule.yaml");
    let doc: Value = serde_saphyr::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(doc["kind"], "PrometheusRule");
    json!({"groups": doc["spec"]["groups"]})
}

fn alert(labels: Value, summary: String, description: &str) -> Value {
    json!({"exp_labels": labels, "exp_annotations": {"summary": summary, "description": description}})
}

/// The description of `alert` in the rule file, folded as YAML folds it.
fn description(rules: &Value, alert: &str) -> String {
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .find(|r| r["alert"] == alert)
        .and_then(|r| r["annotations"]["description"].as_str())
        .unwrap_or_else(|| panic!("no alert {alert}"))
        .to_owned()
}

/// Needs root, eBPF, systemd, containerd and unshare (the sandbox), and prometheus with
/// promtool.
#[test]
fn alerts_fire_on_series_scraped_through_a_crash_and_a_freeze() {
    let mut needs = OBSERVER_NEEDS.to_vec();
    needs.push(Need::Prometheus);
    let Ok(()) = require(
        "alerts_fire_on_series_scraped_through_a_crash_and_a_freeze",
        &needs,
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let dir = sandbox.dir().join("monitoring");
    fs::create_dir_all(&dir).unwrap();
    let observer = Observer::spawn(&sandbox, &["--no-kubernetes"]).expect("observer");
    observer.wait_healthy(Duration::from_secs(20)).unwrap();
    let target = observer.status_addr();
    let prometheus = Prometheus::start(&dir, target);
    let up = |prometheus: &Prometheus, value: &str| {
        let q = format!("up{{job=\"{JOB}\"}} == {value}");
        !prometheus.instant(&q, now_s()).is_empty()
    };
    prometheus.wait("the first scrape", Duration::from_secs(20), || {
        up(&prometheus, "1")
    });
    let start = now_s().floor();
    std::thread::sleep(Duration::from_secs(4));

    let old = sandbox.main_pid().unwrap().unwrap();
    signal(old, libc::SIGKILL);
    let new = sandbox
        .wait_for_pid(Some(old), Duration::from_secs(10))
        .unwrap();
    observer
        .wait_for_status(
            "a healthy containerd after the crash",
            Duration::from_secs(10),
            |d| d["state"] == "healthy" && d["containerd_pid"] == new,
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));

    let frozen = Frozen(new);
    signal(new, libc::SIGSTOP);
    let newer = sandbox
        .wait_for_pid(Some(new), Duration::from_secs(15))
        .unwrap();
    drop(frozen);
    observer
        .wait_for_status(
            "a healthy containerd after the freeze",
            Duration::from_secs(10),
            |d| d["state"] == "healthy" && d["containerd_pid"] == newer,
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));

    // Cut off from the bus for over a minute: the observer can no longer restart anything.
    let outage = sandbox.stop_bus().expect("stop the bus");
    observer
        .wait_for_status("the bus lost", Duration::from_secs(15), |d| {
            d["bus"]["connected"] == false
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(66));
    let bus_lost_until = now_s();
    outage.end().expect("start the bus again");
    observer
        .wait_for_status("the bus back", Duration::from_secs(30), |d| {
            d["bus"]["connected"] == true
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let before_stop = now_s();
    drop(observer);
    prometheus.wait("a failed scrape", Duration::from_secs(10), || {
        up(&prometheus, "0")
    });
    std::thread::sleep(Duration::from_secs(2));
    let end = now_s().floor();

    // Every series of the job, one value per step; `_` where Prometheus has none.
    let steps = ((end - start) as u64) / STEP_S + 1;
    let data = prometheus.api(
        "query_range",
        &[
            ("query", format!("{{job=\"{JOB}\"}}")),
            ("start", start.to_string()),
            ("end", end.to_string()),
            ("step", format!("{STEP_S}s")),
        ],
    );
    let mut input = Vec::new();
    let mut names = BTreeMap::new();
    for series in data["result"].as_array().unwrap() {
        let metric = series["metric"].as_object().unwrap();
        let mut values = vec!["_".to_owned(); steps as usize];
        for point in series["values"].as_array().unwrap() {
            let at = point[0].as_f64().unwrap();
            let index = ((at - start) as u64 / STEP_S) as usize;
            values[index] = point[1].as_str().unwrap().to_owned();
        }
        *names
            .entry(metric["__name__"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
        input.push(json!({"series": series_name(metric), "values": values.join(" ")}));
    }
    for expected in [
        "containerd_observer_verdicts_total",
        "containerd_observer_restarts_total",
        "containerd_observer_state",
        "containerd_observer_bus_connected",
        "up",
    ] {
        assert!(
            names.contains_key(expected),
            "no {expected} scraped: {names:?}"
        );
    }

    let rules = rule_file();
    let rules_path = dir.join("rules.json");
    fs::write(&rules_path, rules.to_string()).unwrap();
    let at = format!("{}s", (steps - 1) * STEP_S);
    // The last step at which the bus had been gone for the whole minute before it.
    let cut_off_at = format!(
        "{}s",
        ((bus_lost_until - start) as u64 / STEP_S - 1) * STEP_S
    );
    let instance = target.to_string();
    let labels = |extra: Value| {
        let mut l = json!({"instance": instance, "job": JOB});
        for (k, v) in extra.as_object().unwrap() {
            l[k] = v.clone();
        }
        l
    };
    let test = json!({
        "rule_files": [rules_path],
        "evaluation_interval": format!("{STEP_S}s"),
        "tests": [{
            "interval": format!("{STEP_S}s"),
            "input_series": input,
            "alert_rule_test": [
                {"eval_time": at, "alertname": "ContainerdCrashed", "exp_alerts": [
                    alert(labels(json!({"severity": "warning", "verdict": "crashed"})),
                        format!("containerd crashed on {instance}"), &description(&rules, "ContainerdCrashed"))]},
                {"eval_time": at, "alertname": "ContainerdHung", "exp_alerts": [
                    alert(labels(json!({"severity": "warning", "verdict": "hung"})),
                        format!("containerd hung on {instance}"), &description(&rules, "ContainerdHung"))]},
                // Both were repaired at once: nothing failed, nothing was given up, and a
                // crash repaired in 100 ms is not a node that stopped serving.
                {"eval_time": at, "alertname": "ContainerdRestartFailed", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdRestartsGivenUp", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdNotServing", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdStorageStalled", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdShimHung", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdStartupHang", "exp_alerts": []},
                {"eval_time": at, "alertname": "ContainerdObserverNotReady", "exp_alerts": []},
                // A minute without the bus fires; once it is back, it clears.
                {"eval_time": cut_off_at, "alertname": "ContainerdObserverCutOffFromBus", "exp_alerts": [
                    alert(labels(json!({"severity": "warning"})),
                        format!("the containerd observer on {instance} cannot reach systemd"),
                        &description(&rules, "ContainerdObserverCutOffFromBus"))]},
                {"eval_time": at, "alertname": "ContainerdObserverCutOffFromBus", "exp_alerts": []},
                // Down for seconds only: pending, not firing (it waits 5 minutes).
                {"eval_time": at, "alertname": "ContainerdObserverDown", "exp_alerts": []},
            ],
            "promql_expr_test": [
                {"expr": format!("up{{job=~\".*containerd-observer.*\"}} == 0"), "eval_time": at,
                 "exp_samples": [{"labels": format!("up{{instance=\"{instance}\",job=\"{JOB}\"}}"), "value": 0}]},
            ],
        }],
    });
    let test_path = dir.join("rules-test.json");
    fs::write(&test_path, serde_json::to_string_pretty(&test).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test_path)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool test rules {} failed:\n{}{}",
        test_path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every panel of the dashboard has data on the same Prometheus, while the observer ran.
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(repo().join("deploy/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut empty = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let query = expr
                .replace("$instance", ".*")
                .replace("$__rate_interval", "30s");
            if prometheus.instant(&query, before_stop - 1.0).is_empty() {
                let _ = writeln!(empty, "{}: {expr}", panel["title"]);
            }
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{empty}");
}
