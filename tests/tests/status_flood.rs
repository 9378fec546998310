//! No one without root can make the observer restart containerd (issue 17): an unprivileged
//! user floods the status port with idle, half-sent and oversized requests while the
//! observer runs under systemd's default soft descriptor limit of 1024, and throughout the
//! flood containerd is not restarted, a crash of containerd is still restarted, and
//! `/livez` answers.
//!
//! Needs root (to drop to `nobody` and to run the sandbox), eBPF tracepoints
//! (sched/sched_process_exit), systemd, containerd, unshare, setpriv and prlimit.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use observer_tests::{OBSERVER_NEEDS, Observer, Sandbox, SandboxOptions, require, signal};

/// Connections of each of the flood's four kinds held at once, 2400 in all: the idle and
/// half-sent ones alone are more than the limit of 1024, if the observer kept them.
const PER_KIND: &str = "600";
/// How long the flood lasts before the crash.
const FLOOD_BEFORE_CRASH: Duration = Duration::from_secs(10);

/// The flood, as `nobody`. Dropping it ends it (its stdin closes) and reaps it.
struct Flood(Option<Child>);

impl Flood {
    fn start(observer: &Observer) -> Flood {
        let child = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_status-flood"))
            .args([&observer.status_addr().to_string(), "120", PER_KIND])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv runs the flood as nobody");
        Flood(Some(child))
    }

    /// Ends the flood and returns its summary line.
    fn finish(mut self) -> String {
        let mut child = self.0.take().expect("running");
        drop(child.stdin.take());
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "the flood failed: {status}");
        line
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn field(summary: &str, name: &str) -> u64 {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
}

fn metric(observer: &Observer, series: &str) -> f64 {
    let (_, text) = observer.get("/metrics").expect("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[test]
fn a_flood_from_nobody_restarts_nothing_and_a_crash_is_still_handled() {
    if require(
        "a_flood_from_nobody_restarts_nothing_and_a_crash_is_still_handled",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    // systemd's default for a service, soft and hard: raising the soft limit cannot help.
    let observer = Observer::spawn_under(&sandbox, &["prlimit", "--nofile=1024:1024", "--"], &[])
        .expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", observer.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );
    let old_pid = sandbox.main_pid().unwrap().expect("containerd runs");

    let livez_asked = AtomicU32::new(0);
    let livez_failed = AtomicU32::new(0);
    let done = AtomicBool::new(false);
    let flood = Flood::start(&observer);
    let summary = std::thread::scope(|scope| {
        // The kubelet's view: /livez every 250 ms, each within the harness's 5 s.
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                livez_asked.fetch_add(1, Ordering::Relaxed);
                match observer.get("/livez") {
                    Ok((200, _)) => {}
                    other => {
                        eprintln!("/livez during the flood: {other:?}");
                        livez_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        // Stops the /livez thread however this closure ends, a failed assertion included.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _done = Done(&done);
        let check = || {
            // Nothing restarted and nothing judged against a healthy containerd.
            let doc = observer.status().expect("/status answers during the flood");
            assert_eq!(doc["restarts"], serde_json::json!([]), "{doc}");
            assert_eq!(doc["state"], "healthy", "{doc}");
            assert_eq!(
                doc["observer"]["degraded"],
                serde_json::Value::Null,
                "{doc}"
            );
            assert_eq!(sandbox.main_pid().unwrap(), Some(old_pid));
        };
        let flood_until = Instant::now() + FLOOD_BEFORE_CRASH;
        while Instant::now() < flood_until {
            check();
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            metric(
                &observer,
                "containerd_observer_status_connections_shed_total"
            ) > 0.0,
            "the flood reached the connection cap"
        );

        // A crash during the flood is still seen and restarted.
        signal(old_pid, libc::SIGKILL);
        let doc = observer
            .wait_for_status("the crash restarted", Duration::from_secs(30), |doc| {
                doc["restarts"][0]["job_result"] == "done"
            })
            .expect("restart during the flood");
        assert_eq!(doc["restarts"][0]["reason"], "crashed", "{doc}");
        let new_pid = sandbox
            .wait_for_pid(Some(old_pid), Duration::from_secs(10))
            .expect("a new containerd");
        observer
            .wait_for("healthy again", Duration::from_secs(15), |body| {
                body.contains(&format!(r#""containerd_pid":{new_pid}"#))
                    && body.contains(r#""state":"healthy""#)
            })
            .expect("healthy again");
        let doc = observer.status().unwrap();
        assert_eq!(
            doc["restarts"].as_array().unwrap().len(),
            1,
            "only the crash: {doc}"
        );
        flood.finish()
    });
    eprintln!("{summary}");
    assert_eq!(field(&summary, "uid"), 65534, "the flood ran as nobody");
    assert!(field(&summary, "opened") > 1024, "{summary}");
    // The cap (256) and the kernel's accept queue, shed and refilled.
    assert!(field(&summary, "most_open") >= 256, "{summary}");
    assert!(field(&summary, "closed_by_server") > 0, "{summary}");
    assert!(livez_asked.load(Ordering::Relaxed) > 10);
    assert_eq!(
        livez_failed.load(Ordering::Relaxed),
        0,
        "/livez answered throughout the flood"
    );
    assert_eq!(
        metric(
            &observer,
            "containerd_observer_probes_total{result=\"observer_side\"}"
        ),
        0.0,
        "the observer's probes always had their descriptors"
    );
}

/// The status line's code of `METHOD path` on `addr`.
fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: observer\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line from {method} {path}: {answer:?}"))
}

/// A directory every user may enter, removed on drop.
struct OpenDir(std::path::PathBuf);

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_route_is_read_only_and_the_status_socket_is_roots_alone() {
    if require(
        "every_route_is_read_only_and_the_status_socket_is_roots_alone",
        OBSERVER_NEEDS,
    )
    .is_err()
    {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no")).expect("sandbox");
    // The socket's directory lets everyone in, so that only the socket's own mode decides.
    let dir = OpenDir(std::env::temp_dir().join(format!(
        "observer-open-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.0.join("status.sock");
    let observer = Observer::spawn(&sandbox, &["--status-socket", socket.to_str().unwrap()])
        .expect("observer");
    observer
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy");
    let pid = sandbox.main_pid().unwrap();

    for path in ["/status", "/livez", "/readyz", "/metrics"] {
        for method in ["POST", "PUT", "DELETE", "PATCH"] {
            assert_eq!(
                request(observer.status_addr(), method, path),
                405,
                "{method} {path}"
            );
        }
    }
    for path in [
        "/",
        "/restart",
        "/pause",
        "/status/../restart",
        "/debug/pprof",
    ] {
        assert_eq!(request(observer.status_addr(), "POST", path), 404, "{path}");
    }
    let doc = observer.status().unwrap();
    assert_eq!(doc["restarts"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["actions"], serde_json::json!([]), "{doc}");
    assert_eq!(doc["paused"], false, "{doc}");
    assert_eq!(sandbox.main_pid().unwrap(), pid);

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let bin = observer_tests::observer_bin().unwrap();
    let status = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
                .arg(&bin);
            cmd
        } else {
            Command::new(&bin)
        };
        cmd.args(["status", "--json", "--status-socket"])
            .arg(&socket)
            .output()
            .unwrap()
    };
    let root = status(false);
    assert!(root.status.success(), "{root:?}");
    let nobody = status(true);
    assert!(!nobody.status.success(), "{nobody:?}");
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("Permission denied"),
        "{nobody:?}"
    );
}
