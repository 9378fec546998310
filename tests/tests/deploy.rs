//! The deployment files. Each Kubernetes manifest parses into its k8s-openapi type, with no
//! field the type does not know (a typo would be dropped silently by `kubectl apply`), and says
//! what the observer needs; the systemd unit runs for real, hardening included, under the
//! sandbox's systemd user manager.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use observer_tests::{
    OBSERVER_NEEDS, Sandbox, SandboxOptions, free_local_addr, observer_bin, require,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// The YAML documents of a file in deploy/kubernetes.
fn documents(file: &str) -> Vec<Value> {
    let path = kubernetes_dir().join(file);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// `doc` as a `T`, which must carry every field of the document: a field k8s-openapi does not
/// know is a typo that the API server would drop.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let what = format!("{} {}", doc["kind"], doc["metadata"]["name"]);
    let value: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse as its Kubernetes type: {e}"));
    let dropped = dropped_fields(doc, &serde_json::to_value(&value).unwrap(), "");
    assert!(
        dropped.is_empty(),
        "{what} has fields its Kubernetes type does not know (typos?): {dropped:?}"
    );
    value
}

/// The paths in `original` whose value `parsed` lost or changed.
fn dropped_fields(original: &Value, parsed: &Value, path: &str) -> Vec<String> {
    match (original, parsed) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .flat_map(|(k, v)| match b.get(k) {
                Some(w) => dropped_fields(v, w, &format!("{path}.{k}")),
                None => vec![format!("{path}.{k}")],
            })
            .collect(),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (v, w))| dropped_fields(v, w, &format!("{path}[{i}]")))
            .collect(),
        _ if original == parsed => vec![],
        _ => vec![path.to_owned()],
    }
}

fn the<T: DeserializeOwned + Serialize>(file: &str, kind: &str) -> T {
    let docs: Vec<Value> = documents(file)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "one {kind} in {file}");
    typed(&docs[0])
}

fn daemonset_pod() -> PodSpec {
    let ds: DaemonSet = the("daemonset.yaml", "DaemonSet");
    ds.spec
        .and_then(|s| s.template.spec)
        .expect("the DaemonSet has a pod spec")
}

fn observer_container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container");
    &pod.containers[0]
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let listed: Vec<String> = documents("kustomization.yaml")[0]["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = fs::read_dir(kubernetes_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        present,
        "kustomization.yaml lists every manifest"
    );
    let mut kinds = Vec::new();
    for file in &listed {
        for doc in documents(file) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "DaemonSet" => drop(typed::<DaemonSet>(&doc)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc)),
                "ClusterRole" => drop(typed::<ClusterRole>(&doc)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc)),
                "Role" => drop(typed::<Role>(&doc)),
                "RoleBinding" => drop(typed::<RoleBinding>(&doc)),
                other => panic!("{file}: a {other} the tests do not check"),
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_daemonset_runs_on_every_node_as_node_critical() {
    let ds: DaemonSet = the("daemonset.yaml", "DaemonSet");
    let sa: ServiceAccount = the("serviceaccount.yaml", "ServiceAccount");
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
    let pod = daemonset_pod();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert_eq!(tolerations.len(), 1, "{tolerations:?}");
    let t = &tolerations[0];
    assert_eq!(t.operator.as_deref(), Some("Exists"));
    assert!(
        t.key.is_none() && t.effect.is_none() && t.toleration_seconds.is_none(),
        "a toleration of every taint, of every effect, forever: {t:?}"
    );
    assert_eq!(pod.host_pid, Some(true), "containerd's PID is a host PID");
    assert_eq!(
        pod.host_network,
        Some(true),
        "probes reach the status endpoint on the node's loopback"
    );
    let env = observer_container(&pod).env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME comes from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn sockets_are_reached_through_mounted_directories() {
    let pod = daemonset_pod();
    let container = observer_container(&pod);
    let args = container.args.clone().unwrap_or_default();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("{flag} is given: {args:?}"))
            .clone()
    };
    assert_eq!(arg("--socket"), "/run/containerd/containerd.sock");
    assert_eq!(arg("--bus"), "unix:path=/run/dbus/system_bus_socket");

    let volumes = pod.volumes.clone().unwrap_or_default();
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let host_dir = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("{mount_path} is mounted: {mounts:?}"));
        let host = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("{} is a hostPath volume", mount.name));
        (host, mount.read_only == Some(true))
    };
    for dir in ["/run/containerd", "/run/dbus"] {
        let (host, _) = host_dir(dir);
        assert_eq!(host.path, dir, "the same path inside as on the host");
        assert_eq!(
            host.type_.as_deref(),
            Some("Directory"),
            "{dir}: a directory, so that a recreated socket is seen"
        );
    }
    for dir in ["/sys/kernel/btf", "/sys/kernel/tracing"] {
        let (host, read_only) = host_dir(dir);
        assert_eq!(host.path, dir);
        assert!(read_only, "{dir} is only read");
    }
    let (pause, _) = host_dir("/run/containerd-observer");
    assert_eq!(pause.type_.as_deref(), Some("DirectoryOrCreate"));
    for volume in &volumes {
        let host = volume.host_path.as_ref().expect("only hostPath volumes");
        assert!(
            matches!(
                host.type_.as_deref(),
                Some("Directory" | "DirectoryOrCreate")
            ),
            "{}: mount directories, never files or sockets: {host:?}",
            volume.name
        );
    }
}

#[test]
fn probes_ask_the_status_endpoint_on_loopback() {
    let pod = daemonset_pod();
    let container = observer_container(&pod);
    let http = |probe: &Option<Probe>, which: &str| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("an HTTP {which} probe"));
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{which}");
        assert_eq!(
            get.port,
            IntOrString::Int(9847),
            "{which}: the default status port"
        );
        get.path.unwrap_or_default()
    };
    assert_eq!(http(&container.liveness_probe, "liveness"), "/livez");
    assert_eq!(http(&container.readiness_probe, "readiness"), "/readyz");
    assert_eq!(http(&container.startup_probe, "startup"), "/livez");
}

#[test]
fn the_container_gets_capabilities_not_privileged() {
    let pod = daemonset_pod();
    let security = observer_container(&pod)
        .security_context
        .clone()
        .expect("a security context");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(
        security.run_as_user,
        Some(0),
        "systemd lets uid 0 manage units"
    );
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    assert_eq!(
        added,
        ["BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"]
            .map(str::to_owned)
            .into()
    );
}

/// `(scope, resource, verb)` for each grant, the scope being `cluster` or a namespace.
fn grants(scope: &str, rules: Option<Vec<PolicyRule>>) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for rule in rules.unwrap_or_default() {
        assert_eq!(
            rule.api_groups,
            Some(vec![String::new()]),
            "core API group only"
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for resource in rule.resources.unwrap_or_default() {
            for verb in &rule.verbs {
                out.push((scope.to_owned(), resource.clone(), verb.clone()));
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_the_calls_the_reporter_makes() {
    let sa: ServiceAccount = the("serviceaccount.yaml", "ServiceAccount");
    let cluster_role: ClusterRole = the("rbac.yaml", "ClusterRole");
    let role: Role = the("rbac.yaml", "Role");
    let namespace = role.metadata.namespace.clone().unwrap_or_default();
    assert_eq!(namespace, "default", "events about nodes live in default");
    let mut all = grants("cluster", cluster_role.rules);
    all.extend(grants(&namespace, role.rules));
    all.sort();
    let expected: Vec<(String, String, String)> = [
        ("cluster", "nodes", "get"),
        ("cluster", "nodes/status", "patch"),
        ("default", "events", "create"),
        ("default", "events", "patch"),
    ]
    .iter()
    .map(|(s, r, v)| (s.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(all, expected);

    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: sa.metadata.name.clone().unwrap(),
        namespace: sa.metadata.namespace.clone(),
        api_group: None,
    };
    let binding: ClusterRoleBinding = the("rbac.yaml", "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        cluster_role.metadata.name.as_ref()
    );
    assert_eq!(binding.subjects, Some(vec![subject.clone()]));
    let binding: RoleBinding = the("rbac.yaml", "RoleBinding");
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert_eq!(binding.subjects, Some(vec![subject]));
}

/// Replaces the one `key=` line of `unit` with `key=value`.
fn set(unit: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key}=");
    let matching = unit.lines().filter(|l| l.starts_with(&prefix)).count();
    assert_eq!(matching, 1, "one {key}= in the unit");
    unit.lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{key}={value}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `systemctl show` properties of `unit`, as `(name, value)`.
fn show(sandbox: &Sandbox, unit: &str, props: &str) -> Vec<(String, String)> {
    sandbox
        .systemctl(&["show", "-p", props, unit])
        .expect("systemctl show")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn prop<'a>(props: &'a [(String, String)], name: &str) -> &'a str {
    props
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {props:?}"))
}

/// Needs root, eBPF tracepoints, systemd, containerd and unshare (OBSERVER_NEEDS).
#[test]
fn the_systemd_unit_starts_hardened_and_feeds_its_watchdog() {
    if require(
        "the_systemd_unit_starts_hardened_and_feeds_its_watchdog",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new()).expect("sandbox");
    let bin = observer_bin().expect("the observer binary");
    let status = free_local_addr();
    let log = sandbox.dir().join("observer-unit.log");
    let unit = fs::read_to_string(repo().join("deploy/systemd/observer.service")).unwrap();
    // Pointed at the sandbox, with a short watchdog, and its output in a file (a user manager
    // without journald would lose it). Every hardening setting stays as shipped.
    let unit = set(
        &unit,
        "ExecStart",
        &format!(
            "{} --socket {} --unit {} --bus {} --status-listen {status}",
            bin.display(),
            sandbox.socket().display(),
            sandbox.unit(),
            sandbox.bus_address(),
        ),
    );
    let unit = set(&unit, "WatchdogSec", "2s");
    let unit = set(
        &unit,
        "TimeoutStopSec",
        &format!(
            "20s\nStandardOutput=append:{0}\nStandardError=append:{0}",
            log.display()
        ),
    );
    let name = "containerd-observer.service";
    sandbox.write_unit(name, &unit).expect("unit written");
    let logged = || fs::read_to_string(&log).unwrap_or_default();

    // Type=notify: start returns once the observer said READY=1.
    if let Err(e) = sandbox.systemctl(&["start", name]) {
        // ExecMainStatus names the step that failed, e.g. 226 (NAMESPACE) for a sandboxing
        // setting the manager cannot apply.
        let status = show(
            &sandbox,
            name,
            "Result,ExecMainCode,ExecMainStatus,StatusText",
        );
        panic!("{name} did not start: {e}\n{status:?}\n{}", logged());
    }
    let props = "ActiveState,SubState,MainPID,NRestarts,Result,WatchdogTimestampMonotonic";
    let first = show(&sandbox, name, props);
    assert_eq!(
        (prop(&first, "ActiveState"), prop(&first, "SubState")),
        ("active", "running"),
        "{first:?}\n{}",
        logged()
    );
    // Three watchdog periods: without pets systemd would have killed and restarted it.
    std::thread::sleep(Duration::from_secs(6));
    let later = show(&sandbox, name, props);
    let context = format!("{first:?}\n{later:?}\n{}", logged());
    assert_eq!(prop(&later, "ActiveState"), "active", "{context}");
    assert_eq!(
        prop(&later, "MainPID"),
        prop(&first, "MainPID"),
        "{context}"
    );
    assert_eq!(prop(&later, "NRestarts"), "0", "{context}");
    assert_eq!(prop(&later, "Result"), "success", "{context}");
    let pet = |p: &[(String, String)]| {
        prop(p, "WatchdogTimestampMonotonic")
            .parse::<u64>()
            .unwrap()
    };
    assert!(
        pet(&later) > pet(&first),
        "the watchdog was pet since the start: {context}"
    );

    // The hardening still lets it load its kernel programs and see containerd.
    let out = std::process::Command::new(&bin)
        .args(["status", "--json", "--status-listen", &status.to_string()])
        .output()
        .expect("observer status");
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("observer status --json: {e}: {out:?}\n{}", logged()));
    assert_eq!(doc["state"], "healthy", "{doc}");
    assert_eq!(
        doc["mode"], "fused",
        "eBPF loads under the hardening: {doc}"
    );
    assert_eq!(doc["sensors"]["process_exit"]["state"], "on", "{doc}");
    // The pause file's directory (RuntimeDirectory=) is root's, and only root may write in it.
    {
        use std::os::unix::fs::MetadataExt as _;
        let runtime = sandbox.dir().join("runtime/containerd-observer");
        let meta = fs::metadata(&runtime).unwrap_or_else(|e| panic!("{}: {e}", runtime.display()));
        assert_eq!(meta.uid(), 0, "{}", runtime.display());
        assert_eq!(meta.mode() & 0o022, 0, "{:o}", meta.mode());
    }
    // LimitNOFILE= applies, and the observer runs with the soft limit raised to it.
    let limits = fs::read_to_string(format!("/proc/{}/limits", prop(&later, "MainPID"))).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    // A user manager cannot go above its own hard limit, which may be lower than the unit's;
    // the soft limit is raised to the hard one either way.
    let words: Vec<&str> = open_files.split_whitespace().collect();
    let (soft, hard): (u64, u64) = (words[3].parse().unwrap(), words[4].parse().unwrap());
    assert_eq!(soft, hard, "{open_files}");
    assert!(hard > 1024, "{open_files}");
    assert_eq!(
        prop(&show(&sandbox, name, "LimitNOFILE"), "LimitNOFILE"),
        "65536"
    );

    sandbox.systemctl(&["stop", name]).expect("stop");
    let stopped = show(&sandbox, name, "ActiveState,Result");
    assert_eq!(prop(&stopped, "ActiveState"), "inactive", "{stopped:?}");
    assert_eq!(
        prop(&stopped, "Result"),
        "success",
        "a clean exit on SIGTERM"
    );
}
