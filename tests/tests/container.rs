//! The DaemonSet, run for real: the image `cargo xtask image` built, run by `podman kube play`
//! as a Pod made from the shipped DaemonSet's pod template, with podman's default seccomp
//! profile, against the sandbox's containerd and systemd.
//!
//! What the test changes in the template, and why (everything else, flags and security
//! context included, is read from `deploy/kubernetes/daemonset.yaml` as shipped):
//! - the image, to the one built offline;
//! - the host paths that stand for the node's: `/run/containerd` is the sandbox's directory
//!   (which holds `containerd.sock`), `/run/dbus` a directory whose `system_bus_socket` is a
//!   hard link to the sandbox's bus socket, `/run/containerd-observer` a temp directory;
//! - what the kubelet would fill in and podman 4.3 cannot: `NODE_NAME`'s value (podman knows
//!   no `spec.nodeName` field reference), and the in-cluster API server's address and service
//!   account credentials (for the stand-in API server);
//! - the status port, on this machine shared with other test runs: a free port, given as
//!   `OBSERVER_STATUS_LISTEN`, and the probes moved to it;
//! - `hostPID: true` is honoured through the test's podman configuration (`pidns = "host"`):
//!   podman 4.3's `kube play` ignores the field;
//! - the probes are taken out and made by the test itself, as the kubelet makes them (an
//!   HTTP GET on the node's loopback): podman would run them as `curl` inside the image.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use observer_tests::{
    Need, OBSERVER_NEEDS, Podman, Sandbox, SandboxOptions, free_local_addr,
    image::{DOCKERFILE, ImageLayout, image_archive},
    require, signal,
};
use serde_json::{Value, json};

#[path = "container/api_server.rs"]
mod api_server;

use api_server::ApiServer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn needs() -> Vec<Need> {
    let mut needs = OBSERVER_NEEDS.to_vec();
    needs.extend([Need::Podman, Need::Image]);
    needs
}

/// The DaemonSet's pod spec, as shipped.
fn template_spec() -> Value {
    let path = repo().join("deploy/kubernetes/daemonset.yaml");
    let ds: Value = serde_saphyr::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    ds["spec"]["template"].clone()
}

/// A podman of the test's own with the observer's image loaded; returns the image's name.
/// Its containers share the host's PID namespace when the manifest's `hostPID` says so.
fn podman_with_image() -> (Podman, String) {
    let host_pid = template_spec()["spec"]["hostPID"] == true;
    let podman = Podman::new(host_pid).expect("podman");
    let names = podman.load(&image_archive()).expect("podman load");
    let name = names
        .into_iter()
        .next()
        .expect("the archive names its image");
    (podman, name)
}

#[test]
fn the_offline_image_has_the_dockerfiles_layout() {
    let Ok(()) = require("the_offline_image_has_the_dockerfiles_layout", &needs()) else {
        return;
    };
    let layout = ImageLayout::from_dockerfile(&repo().join(DOCKERFILE)).unwrap();
    let (podman, image) = podman_with_image();
    let inspect: Value = serde_json::from_str(
        &podman
            .run(&["image", "inspect", "--format", "{{json .Config}}", &image])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(inspect["User"], layout.user, "{inspect}");
    assert_eq!(inspect["Entrypoint"], json!(layout.entrypoint), "{inspect}");
    // The binary sits where the Dockerfile copies it, and runs on the image's own libc.
    let out = podman
        .run(&[
            "run",
            "--rm",
            "--entrypoint",
            "/usr/bin/stat",
            &image,
            "-c",
            "%a %U",
            &layout.binary,
        ])
        .unwrap();
    assert_eq!(out.trim(), "755 root", "{}: mode and owner", layout.binary);
    let out = podman.run(&["run", "--rm", &image, "--version"]).unwrap();
    assert!(
        out.starts_with("observer ") || out.contains(env!("CARGO_PKG_VERSION")),
        "the entrypoint runs the observer: {out}"
    );
    let os = podman
        .run(&[
            "run",
            "--rm",
            "--entrypoint",
            "/usr/bin/cat",
            &image,
            "/etc/os-release",
        ])
        .unwrap();
    let codename = layout
        .base
        .split(':')
        .nth(1)
        .and_then(|tag| tag.split('-').next())
        .unwrap();
    assert!(
        os.contains(&format!("VERSION_CODENAME={codename}")),
        "the base is Debian {codename}, as the Dockerfile's {}: {os}",
        layout.base
    );
}

/// The shipped DaemonSet's pod template as a Pod for `podman kube play`.
struct PodPlan {
    name: String,
    image: String,
    containerd_dir: PathBuf,
    dbus_dir: PathBuf,
    pause_dir: PathBuf,
    status: SocketAddr,
    /// Capabilities to take out of the manifest's `add` list.
    without: Vec<&'static str>,
    /// The stand-in API server and the service account directory (token, ca.crt) the
    /// kubelet would mount.
    api: Option<(SocketAddr, PathBuf)>,
}

impl PodPlan {
    fn yaml(&self) -> String {
        let template = &template_spec();
        let mut spec = template["spec"].clone();
        let containers = spec["containers"].as_array_mut().unwrap();
        assert_eq!(containers.len(), 1);
        let container = &mut containers[0];
        container["image"] = json!(self.image);
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            container.as_object_mut().unwrap().remove(probe);
        }
        let env = container["env"].as_array_mut().unwrap();
        for var in env.iter_mut() {
            if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                *var = json!({"name": var["name"], "value": self.name});
            }
        }
        env.push(json!({"name": "OBSERVER_STATUS_LISTEN", "value": self.status.to_string()}));
        if let Some((addr, _)) = &self.api {
            env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": addr.ip().to_string()}));
            env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": addr.port().to_string()}));
            container["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({
                    "name": "kube-api-access",
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "readOnly": true,
                }));
        }
        if !self.without.is_empty() {
            let add = container["securityContext"]["capabilities"]["add"]
                .as_array_mut()
                .unwrap();
            for cap in &self.without {
                let before = add.len();
                add.retain(|c| c != cap);
                assert_eq!(add.len() + 1, before, "the manifest adds {cap}");
            }
        }
        for volume in spec["volumes"].as_array_mut().unwrap() {
            let host = match volume["name"].as_str().unwrap() {
                "containerd-run" => &self.containerd_dir,
                "dbus-run" => &self.dbus_dir,
                "observer-run" => &self.pause_dir,
                // The host's BTF and tracefs, as on a node.
                _ => continue,
            };
            volume["hostPath"]["path"] = json!(host.to_string_lossy());
        }
        if let Some((_, secrets)) = &self.api {
            spec["volumes"].as_array_mut().unwrap().push(json!({
                "name": "kube-api-access",
                "hostPath": {"path": secrets.to_string_lossy(), "type": "Directory"},
            }));
        }
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "labels": template["metadata"]["labels"]},
            "spec": spec,
        });
        serde_json::to_string_pretty(&pod).unwrap()
    }
}

/// A pod started by `podman kube play`, and its observer's status endpoint.
struct Pod<'a> {
    podman: &'a Podman,
    name: String,
    container: String,
    status: SocketAddr,
}

impl Pod<'_> {
    /// The kubelet's HTTP probe: GET on the node's loopback.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        observer_tests::http_get(self.status, path)
    }

    fn status(&self) -> Value {
        let (code, body) = self.get("/status").expect("GET /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn logs(&self) -> String {
        self.podman
            .output(&["logs", &self.container])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", self.container.as_str()];
        all.extend(args);
        self.podman.run(&all).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls `/status` until `pred` holds; panics with the last document and the logs.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some((200, body)) = self.get("/status")
                && let Ok(doc) = serde_json::from_str::<Value>(&body)
            {
                if pred(&doc) {
                    return doc;
                }
                last = doc;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\nlast /status: {last}\nlogs:\n{}",
            self.logs()
        );
    }

    fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((200, body)) = self.get("/readyz") {
                assert!(body.contains("\"ready\":true"), "{body}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "/readyz did not turn ready in {timeout:?}\nlogs:\n{}",
            self.logs()
        );
    }
}

/// The directories the pod's host paths point at, for one sandbox.
struct HostDirs {
    dbus: PathBuf,
    pause: PathBuf,
}

fn host_dirs(sandbox: &Sandbox) -> HostDirs {
    let dbus = sandbox.dir().join("dbus-run");
    fs::create_dir_all(&dbus).unwrap();
    // A hard link: the same socket inode under the name the manifest's --bus uses.
    let bus = sandbox.bus_address();
    let bus = bus.strip_prefix("unix:path=").unwrap();
    fs::hard_link(bus, dbus.join("system_bus_socket")).unwrap();
    let pause = sandbox.dir().join("observer-run");
    fs::create_dir_all(&pause).unwrap();
    HostDirs { dbus, pause }
}

fn play<'a>(podman: &'a Podman, plan: &PodPlan) -> Pod<'a> {
    let yaml = podman.dir().join(format!("{}.yaml", plan.name));
    fs::write(&yaml, plan.yaml()).unwrap();
    podman
        .run(&["kube", "play", &yaml.to_string_lossy()])
        .unwrap_or_else(|e| panic!("podman kube play {}: {e}", yaml.display()));
    Pod {
        podman,
        name: plan.name.clone(),
        container: format!("{}-observer", plan.name),
        status: plan.status,
    }
}

/// SIGCONT on drop, so a test that froze containerd never leaves it frozen.
struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn plan(sandbox: &Sandbox, dirs: &HostDirs, image: &str, name: &str) -> PodPlan {
    PodPlan {
        name: unique(name),
        image: image.to_owned(),
        containerd_dir: sandbox.dir().to_owned(),
        dbus_dir: dirs.dbus.clone(),
        pause_dir: dirs.pause.clone(),
        status: free_local_addr(),
        without: Vec::new(),
        api: None,
    }
}

/// Waits for a restart record newer than `count` entries, with `reason`, and returns it.
fn wait_for_restart(pod: &Pod<'_>, count: usize, reason: &str) -> Value {
    let doc = pod.wait_for(
        &format!("a restart for `{reason}`"),
        Duration::from_secs(30),
        |doc| {
            doc["restarts"].as_array().is_some_and(|r| {
                r.len() > count && r[count]["job_result"] == "done" && r[count]["reason"] == reason
            })
        },
    );
    doc["restarts"][count].clone()
}

/// Needs root, eBPF (tracepoints and BTF), systemd, containerd, unshare, podman with
/// catatonit, and the image.
#[test]
fn the_daemonset_pod_watches_and_restarts_containerd() {
    let Ok(()) = require(
        "the_daemonset_pod_watches_and_restarts_containerd",
        &needs(),
    ) else {
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let dirs = host_dirs(&sandbox);
    let (podman, image) = podman_with_image();
    let mut plan = plan(&sandbox, &dirs, &image, "observer-pod");
    let secrets = sandbox.dir().join("api/serviceaccount");
    let api = ApiServer::start(&secrets, &plan.name);
    plan.api = Some((api.addr, secrets));
    let pod = play(&podman, &plan);
    assert!(!pod.name.is_empty());

    pod.wait_ready(Duration::from_secs(30));
    let doc = pod.wait_for("a healthy containerd", Duration::from_secs(10), |d| {
        d["state"] == "healthy"
    });
    assert_eq!(doc["mode"], "fused", "the kernel programs load: {doc}");
    assert_ne!(
        doc["observer"]["pid"], 1,
        "hostPID: the agent sees host PIDs: {doc}"
    );
    for sensor in ["process_exit", "exit_cause", "accept_queue"] {
        assert_eq!(doc["sensors"][sensor]["state"], "on", "{sensor}: {doc}");
    }
    let socket_inode = |dir: &str| -> u64 {
        pod.exec(&[
            "/usr/bin/stat",
            "-c",
            "%i",
            &format!("{dir}/containerd.sock"),
        ])
        .trim()
        .parse()
        .unwrap()
    };
    assert_eq!(
        socket_inode("/run/containerd"),
        fs::metadata(sandbox.socket()).unwrap().ino()
    );

    // A crash: restarted over the bus, and the new socket shows through the directory mount.
    let old = sandbox.main_pid().unwrap().unwrap();
    signal(old, libc::SIGKILL);
    let restart = wait_for_restart(&pod, 0, "crashed");
    let new = sandbox
        .wait_for_pid(Some(old), Duration::from_secs(10))
        .unwrap();
    assert_eq!(restart["new_pid"], new, "{restart}");
    let doc = pod.wait_for(
        "probes of the new containerd",
        Duration::from_secs(10),
        |d| {
            d["state"] == "healthy"
                && d["containerd_pid"] == new
                && d["last_probe"]["result"] == "ok"
        },
    );
    assert_eq!(
        socket_inode("/run/containerd"),
        fs::metadata(sandbox.socket()).unwrap().ino(),
        "the container sees the new socket: {doc}"
    );

    // A freeze: judged hung, restarted over the bus.
    let frozen = Frozen(new);
    signal(new, libc::SIGSTOP);
    let restart = wait_for_restart(&pod, 1, "hung");
    drop(frozen);
    let newer = sandbox
        .wait_for_pid(Some(new), Duration::from_secs(10))
        .unwrap();
    assert_eq!(restart["new_pid"], newer, "{restart}");
    pod.wait_for("probes after the freeze", Duration::from_secs(10), |d| {
        d["state"] == "healthy" && d["containerd_pid"] == newer && d["last_probe"]["result"] == "ok"
    });
    assert_eq!(
        socket_inode("/run/containerd"),
        fs::metadata(sandbox.socket()).unwrap().ino()
    );

    // The node condition and the events, at the stand-in API server, over TLS with the
    // service account's token.
    let deadline = Instant::now() + Duration::from_secs(20);
    let wanted = ["ContainerdCrashed", "ContainerdRestarted", "ContainerdHung"];
    while Instant::now() < deadline
        && !(wanted
            .iter()
            .all(|w| api.event_reasons().iter().any(|r| r == w))
            && api
                .conditions()
                .last()
                .is_some_and(|c| c["status"] == "False"))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let requests = api.requests();
    let context = format!("{requests:#?}\nlogs:\n{}", pod.logs());
    assert!(
        !requests.is_empty(),
        "no request reached the API server: {context}"
    );
    assert_eq!(
        requests[0].method, "GET",
        "the node is read first: {context}"
    );
    for r in &requests {
        assert_eq!(
            r.authorization,
            format!("Bearer {}", api_server::TOKEN),
            "{r:?}"
        );
    }
    let reasons = api.event_reasons();
    for w in wanted {
        assert!(
            reasons.iter().any(|r| r == w),
            "event {w}: {reasons:?}\n{context}"
        );
    }
    let conditions = api.conditions();
    // The reporter sends the latest condition only: a crash repaired at once may show as
    // `ContainerdRecovering` straight away, its message naming the verdict.
    let said = |verdict: &str| {
        conditions.iter().any(|c| {
            c["status"] == "True"
                && (c["reason"] == format!("Containerd{verdict}")
                    || (c["reason"] == "ContainerdRecovering"
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(&verdict.to_lowercase()))))
        })
    };
    assert!(said("Crashed"), "{conditions:#?}");
    assert!(said("Hung"), "{conditions:#?}");
    assert_eq!(
        conditions
            .last()
            .map(|c| (c["status"].clone(), c["reason"].clone())),
        Some((json!("False"), json!("ContainerdHealthy"))),
        "{conditions:#?}"
    );
}

/// What `/status` and the log say about the kernel programs with `without` taken out of the
/// manifest's capabilities.
fn run_without(test: &str, without: &[&'static str]) -> (Value, String) {
    let Ok(()) = require(test, &needs()) else {
        return (Value::Null, String::new());
    };
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let dirs = host_dirs(&sandbox);
    let (podman, image) = podman_with_image();
    let mut plan = plan(&sandbox, &dirs, &image, test);
    plan.name = unique(&test.replace('_', "-"));
    plan.without = without.to_vec();
    let pod = play(&podman, &plan);
    pod.wait_ready(Duration::from_secs(30));
    let doc = pod.wait_for("a healthy containerd", Duration::from_secs(10), |d| {
        d["state"] == "healthy"
    });
    // Let the programs run a little, so their statistics (where on) count something.
    std::thread::sleep(Duration::from_secs(2));
    let doc = if doc.is_null() { doc } else { pod.status() };
    (doc, pod.logs())
}

fn program_runs(doc: &Value) -> u64 {
    doc["sensors"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|s| s["programs"].as_array().cloned().unwrap_or_default())
        .map(|p| p["run_count"].as_u64().unwrap_or(0))
        .sum()
}

/// podman's default seccomp profile (containers-common) admits `bpf(2)` and
/// `perf_event_open(2)` only to a process with `CAP_SYS_ADMIN`: without it the kernel
/// programs cannot load, whatever `CAP_BPF` and `CAP_PERFMON` allow, and the agent falls back
/// to pidfd and sock_diag. It still judges and restarts (the fallback's figures are in the
/// README).
#[test]
fn without_sys_admin_the_runtimes_seccomp_profile_leaves_only_the_fallback() {
    let (doc, logs) = run_without("without_sys_admin", &["SYS_ADMIN"]);
    if doc.is_null() {
        return;
    }
    let context = format!("{doc}\n{logs}");
    assert_eq!(doc["mode"], "fallback", "{context}");
    for sensor in ["process_exit", "accept_queue"] {
        assert_eq!(
            doc["sensors"][sensor]["state"], "fallback",
            "{sensor}: {context}"
        );
        let reason = doc["sensors"][sensor]["reason"]
            .as_str()
            .unwrap_or_default();
        assert!(
            reason.starts_with("eBPF unavailable"),
            "{sensor}: {context}"
        );
    }
    assert_eq!(
        doc["restarts"],
        json!([]),
        "no restart of a healthy containerd: {context}"
    );
}

/// With `SYS_ADMIN` kept, `PERFMON` adds nothing: the kernel lets `CAP_SYS_ADMIN` do what
/// `CAP_PERFMON` does (`perfmon_capable()`), and the seccomp profile asks for SYS_ADMIN alone.
#[test]
fn without_perfmon_nothing_goes_while_sys_admin_stays() {
    let (doc, logs) = run_without("without_perfmon", &["PERFMON"]);
    if doc.is_null() {
        return;
    }
    let context = format!("{doc}\n{logs}");
    assert_eq!(doc["mode"], "fused", "{context}");
    for sensor in ["process_exit", "exit_cause", "accept_queue"] {
        assert_eq!(doc["sensors"][sensor]["state"], "on", "{sensor}: {context}");
    }
    assert!(program_runs(&doc) > 0, "BPF statistics count: {context}");
    assert_eq!(doc["restarts"], json!([]), "{context}");
}
