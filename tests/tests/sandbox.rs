//! The sandbox itself: a private containerd under a private systemd user manager.
//!
//! Every test here needs root (mount namespace, cgroups), systemd, containerd and unshare;
//! none needs eBPF.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use observer_tests::{Need, Sandbox, SandboxOptions, require};

const NEEDS: &[Need] = &[Need::Root, Need::Systemd, Need::Containerd, Need::Unshare];

fn start(opts: SandboxOptions) -> Sandbox {
    let started = Instant::now();
    let sandbox = Sandbox::start(opts).unwrap_or_else(|err| panic!("{err}"));
    eprintln!(
        "sandbox {} started in {:?}",
        sandbox.dir().display(),
        started.elapsed()
    );
    sandbox
}

/// `ctr version` against the sandbox's socket: the server part proves containerd answers.
fn ctr_version(sandbox: &Sandbox) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(sandbox.socket())
        .args(["--connect-timeout", "5s", "--timeout", "5s", "version"])
        .output()
        .expect("run ctr");
    assert!(
        out.status.success(),
        "ctr version failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state letter in /proc/PID/stat (R, S, T, Z, ...), `None` once the PID is gone.
fn pid_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

/// Alive: neither gone nor a zombie. A killed process whose parent died waits as a zombie
/// until PID 1 reaps it; it is dead all the same.
fn alive(pid: u32) -> bool {
    pid_state(pid).is_some_and(|state| state != 'Z')
}

/// PIDs whose cgroup path mentions `name` (the sandbox's cgroup is named after its directory).
fn pids_in_cgroup_named(name: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|cg| cg.contains(name))
        })
        .collect()
}

/// `pgrep -f <dir>/`: processes whose command line names the sandbox.
fn pgrep_dir(dir: &Path) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f"])
        .arg(format!("{}/", dir.display()))
        .output()
        .expect("run pgrep");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drops `sandbox` and checks that nothing of it is left: no process in its cgroup or naming
/// its directory, no cgroup, no directory.
fn teardown_and_check(sandbox: Sandbox, also_gone: &[u32]) {
    let dir = sandbox.dir().to_path_buf();
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    let in_cgroup = pids_in_cgroup_named(&name);
    assert!(!in_cgroup.is_empty(), "the sandbox runs in its own cgroup");
    let started = Instant::now();
    drop(sandbox);
    eprintln!(
        "sandbox {} torn down in {:?}",
        dir.display(),
        started.elapsed()
    );

    assert_eq!(pgrep_dir(&dir), "", "processes naming the sandbox survived");
    assert_eq!(pids_in_cgroup_named(&name), Vec::<u32>::new());
    for pid in in_cgroup.iter().chain(also_gone) {
        assert!(!alive(*pid), "pid {pid} survived the teardown");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    let cgroups = Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "2", "-name", &name])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cgroups.stdout), "", "cgroups left");
}

#[test]
fn containerd_answers_and_systemd_is_on_the_bus() {
    let Ok(()) = require("containerd_answers_and_systemd_is_on_the_bus", NEEDS) else {
        return;
    };
    let sandbox = start(SandboxOptions::new());
    assert!(ctr_version(&sandbox).contains("Server:"));
    assert_eq!(
        sandbox.unit_state().unwrap(),
        ("active".to_string(), "running".to_string())
    );
    let pid = sandbox
        .main_pid()
        .unwrap()
        .expect("containerd has a main PID");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("containerd"), "MainPID {pid} is {exe:?}");
    assert!(sandbox.bus_address().starts_with("unix:path="));
    assert!(sandbox.containerd_log().exists());

    // The bus is reachable from outside the manager's mount namespace.
    let out = Command::new("busctl")
        .arg(format!("--address={}", sandbox.bus_address()))
        .args([
            "get-property",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1/unit/containerd_2eservice",
            "org.freedesktop.systemd1.Service",
            "MainPID",
        ])
        .output()
        .expect("run busctl");
    assert!(
        out.status.success(),
        "busctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("u {pid}")
    );

    let err = sandbox
        .systemctl(&["start", "no-such.service"])
        .unwrap_err();
    assert!(err.to_string().contains("no-such.service"), "{err}");
    teardown_and_check(sandbox, &[pid]);
}

#[test]
fn killed_containerd_stays_down_with_restart_no() {
    let Ok(()) = require("killed_containerd_stays_down_with_restart_no", NEEDS) else {
        return;
    };
    let sandbox = start(SandboxOptions::new().restart("no"));
    let pid = sandbox.wait_for_pid(None, Duration::from_secs(5)).unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("the unit to fail", Duration::from_secs(5), || {
        sandbox.unit_state().unwrap().0 == "failed"
    });
    assert_eq!(
        sandbox.unit_state().unwrap(),
        ("failed".to_string(), "failed".to_string())
    );
    assert_eq!(sandbox.main_pid().unwrap(), None);
    wait_until("the killed PID to vanish", Duration::from_secs(5), || {
        !alive(pid)
    });
    let err = sandbox
        .wait_for_pid(Some(pid), Duration::from_millis(300))
        .unwrap_err();
    assert!(err.to_string().contains("ActiveState=failed"), "{err}");
    teardown_and_check(sandbox, &[pid]);
}

#[test]
fn killed_containerd_comes_back_with_restart_always() {
    let Ok(()) = require("killed_containerd_comes_back_with_restart_always", NEEDS) else {
        return;
    };
    let sandbox = start(
        SandboxOptions::new()
            .restart("always")
            .service_extra("RestartSec=100ms"),
    );
    let old = sandbox.main_pid().unwrap().unwrap();
    let killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .unwrap();
    let new = sandbox
        .wait_for_pid(Some(old), Duration::from_secs(10))
        .unwrap();
    eprintln!("containerd {old} -> {new} in {:?}", killed.elapsed());
    assert_ne!(new, old);
    assert!(ctr_version(&sandbox).contains("Server:"));
    let restarts = sandbox
        .systemctl(&["show", "-p", "NRestarts", "--value", sandbox.unit()])
        .unwrap();
    assert_eq!(restarts.trim(), "1");
    teardown_and_check(sandbox, &[old, new]);
}

#[test]
fn two_sandboxes_run_side_by_side() {
    let Ok(()) = require("two_sandboxes_run_side_by_side", NEEDS) else {
        return;
    };
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| start(SandboxOptions::new()));
        let b = scope.spawn(|| start(SandboxOptions::new()));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.dir(), b.dir());
    assert_ne!(a.socket(), b.socket());
    let (pid_a, pid_b) = (
        a.main_pid().unwrap().unwrap(),
        b.main_pid().unwrap().unwrap(),
    );
    assert_ne!(pid_a, pid_b);
    ctr_version(&a);
    ctr_version(&b);

    // Same unit name, different cgroups: stopping one leaves the other alone.
    a.systemctl(&["stop", a.unit()]).unwrap();
    assert_eq!(a.main_pid().unwrap(), None);
    assert_eq!(b.main_pid().unwrap(), Some(pid_b));
    assert_eq!(b.unit_state().unwrap().0, "active");
    teardown_and_check(a, &[pid_a]);
    assert!(alive(pid_b));
    assert!(ctr_version(&b).contains("Server:"));
    teardown_and_check(b, &[pid_b]);
}

#[test]
fn teardown_ends_a_frozen_containerd_and_extra_units() {
    let Ok(()) = require("teardown_ends_a_frozen_containerd_and_extra_units", NEEDS) else {
        return;
    };
    let sandbox = start(SandboxOptions::new());
    let pid = sandbox.main_pid().unwrap().unwrap();
    sandbox
        .write_unit(
            "idle.service",
            "[Service]\nExecStart=/bin/sleep infinity\nKillMode=none\n",
        )
        .unwrap();
    sandbox.systemctl(&["start", "idle.service"]).unwrap();
    let idle = sandbox
        .systemctl(&["show", "-p", "MainPID", "--value", "idle.service"])
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    assert!(idle != 0 && alive(idle));
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("containerd to stop", Duration::from_secs(5), || {
        pid_state(pid) == Some('T')
    });
    teardown_and_check(sandbox, &[pid, idle]);
}

#[test]
fn exec_start_runs_a_fake_daemon() {
    let Ok(()) = require("exec_start_runs_a_fake_daemon", NEEDS) else {
        return;
    };
    let sandbox = start(
        SandboxOptions::new()
            .exec_start("/bin/sh -c 'echo fake for {socket}; exec sleep infinity'")
            .service_extra("Type=exec"),
    );
    let pid = sandbox.main_pid().unwrap().unwrap();
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "sleep"
    );
    wait_until("the fake to log", Duration::from_secs(5), || {
        fs::read_to_string(sandbox.containerd_log())
            .is_ok_and(|log| log.contains(&format!("fake for {}", sandbox.socket().display())))
    });
    teardown_and_check(sandbox, &[pid]);
}

#[test]
fn keep_dir_keeps_the_logs() {
    let Ok(()) = require("keep_dir_keeps_the_logs", NEEDS) else {
        return;
    };
    let sandbox = start(SandboxOptions::new().keep_dir(true));
    let dir = sandbox.dir().to_path_buf();
    let pid = sandbox.main_pid().unwrap().unwrap();
    drop(sandbox);
    assert!(!alive(pid));
    let log = fs::read_to_string(dir.join("containerd.log")).unwrap();
    assert!(log.contains("containerd successfully booted"), "{log}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_options_say_what_to_do() {
    let err = Sandbox::start(SandboxOptions::new().restart("sometimes")).unwrap_err();
    assert!(err.to_string().contains("use one of no, always"), "{err}");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let Ok(()) = require("a_panicking_test_leaves_nothing_behind", NEEDS) else {
        return;
    };
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let sandbox = start(SandboxOptions::new());
        let pid = sandbox.main_pid().unwrap().unwrap();
        let name = sandbox
            .dir()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        seen = Some((sandbox.dir().to_path_buf(), name, pid));
        panic!("the test failed");
    }));
    assert!(result.is_err());
    let (dir, name, pid) = seen.unwrap();
    assert!(!alive(pid));
    assert!(!dir.exists());
    assert_eq!(pgrep_dir(&dir), "");
    assert_eq!(pids_in_cgroup_named(&name), Vec::<u32>::new());
}

/// The cgroup2 mount (or, on a legacy host, the name=systemd one) where sandboxes live.
fn tracking_cgroup_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount_point = |wanted: &dyn Fn(&str, &str) -> bool| {
        info.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split(' ');
            let (fstype, opts) = (right.next()?, right.nth(1)?);
            wanted(fstype, opts).then(|| PathBuf::from(left.split(' ').nth(4).unwrap()))
        })
    };
    mount_point(&|fstype, _| fstype == "cgroup2")
        .or_else(|| {
            mount_point(&|fstype, opts| fstype == "cgroup" && opts.contains("name=systemd"))
        })
        .expect("a cgroup2 or name=systemd mount")
}

#[test]
fn start_reaps_the_sandbox_of_a_dead_test_process() {
    let Ok(()) = require("start_reaps_the_sandbox_of_a_dead_test_process", NEEDS) else {
        return;
    };
    // What a test run killed by a timeout leaves: a directory and a cgroup named after a
    // PID that is gone, with a process still inside.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let name = format!("observer-sandbox-{dead}-0-dead");
    let dir = std::env::temp_dir().join(&name);
    let cgroup = tracking_cgroup_root().join(&name);
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&cgroup).unwrap();
    let mut leftover = Command::new("sleep").arg("1000").spawn().unwrap();
    fs::write(cgroup.join("cgroup.procs"), leftover.id().to_string()).unwrap();

    let sandbox = start(SandboxOptions::new());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = leftover.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            leftover.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.is_some_and(|status| !status.success()),
        "the leftover was not killed"
    );
    assert!(!dir.exists());
    assert!(!cgroup.exists());
    drop(sandbox);
}
