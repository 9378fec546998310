//! `cargo xtask run`: builds the observer and runs it as root. Against the host's containerd
//! when systemd manages it; otherwise against a private sandbox (its own containerd, as a unit
//! of a private systemd user manager) that xtask starts first and tears down when the
//! observer exits.

use std::{
    env,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode, ExitStatus},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

use anyhow::{Context, Result, bail};
use observer_tests::{Sandbox, SandboxOptions};

use crate::cmd::{self, TAG, find_in_path, is_root, target_dir};

const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9847";

pub struct RunOptions {
    pub release: bool,
    /// Skip setup and build: set when xtask re-executes itself under sudo.
    pub prebuilt: bool,
    pub observer_args: Vec<String>,
}

pub fn run(opts: RunOptions) -> Result<ExitCode> {
    if !opts.prebuilt {
        crate::setup::setup(false)?;
        let mut build = cmd::cargo();
        build.args(["build", "-p", "observer"]);
        if opts.release {
            build.arg("--release");
        }
        cmd::run(&mut build)?;
    }
    let observer = target_dir()
        .join(if opts.release { "release" } else { "debug" })
        .join("observer");
    if !observer.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build -p observer{}`",
            observer.display(),
            if opts.release { " --release" } else { "" }
        );
    }

    if !is_root() {
        return rerun_under_sudo(&opts);
    }
    if host_containerd_under_systemd() {
        println!("{TAG} this host's systemd manages containerd.service: observing it");
        let mut observer = Command::new(&observer);
        observer.args(&opts.observer_args);
        println!("{TAG} running: {}", cmd::display(&observer));
        // Replace xtask: signals then reach the observer alone, and its exit code is ours.
        let err = observer.exec();
        bail!(
            "could not start {}: {err}",
            observer.get_program().display()
        );
    }
    run_in_sandbox(&observer, &opts.observer_args)
}

/// The observer loads eBPF programs, and the sandbox needs mount namespaces: both need root.
/// Re-running all of xtask (not just the observer) keeps the sandbox in the same process that
/// tears it down.
fn rerun_under_sudo(opts: &RunOptions) -> Result<ExitCode> {
    let Some(sudo) = find_in_path("sudo") else {
        bail!(
            "the observer loads eBPF programs, so it needs root, and sudo is not installed: \
             run `cargo xtask run` as root"
        );
    };
    let xtask = env::current_exe().context("could not find xtask's own executable")?;
    let mut rerun = Command::new(sudo);
    // `env` keeps the log filter across sudo, which resets the environment.
    rerun.arg("--").arg("env");
    if let Ok(filter) = env::var("RUST_LOG") {
        rerun.arg(format!("RUST_LOG={filter}"));
    }
    rerun.arg(xtask).args(["run", "--prebuilt"]);
    if opts.release {
        rerun.arg("--release");
    }
    rerun.arg("--").args(&opts.observer_args);
    println!("{TAG} the observer loads eBPF programs, so it needs root: re-running under sudo");
    println!("{TAG} running: {}", cmd::display(&rerun));
    let err = rerun.exec();
    bail!("could not run sudo: {err}");
}

/// True when systemd is PID 1 and has a containerd.service unit loaded.
fn host_containerd_under_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && cmd::output(Command::new("systemctl").args([
            "show",
            "containerd.service",
            "-p",
            "LoadState",
            "--value",
        ]))
        .is_some_and(|state| state.trim() == "loaded")
}

fn run_in_sandbox(observer: &Path, user_args: &[String]) -> Result<ExitCode> {
    // Handlers first: a Ctrl-C while the sandbox starts must not leave its containerd behind.
    install_signal_handlers()?;
    println!(
        "{TAG} this host's containerd is not managed by systemd (PID 1 is not systemd, or it \
         has no containerd.service), so there is nothing for the observer to restart."
    );
    println!(
        "{TAG} starting a private sandbox instead: its own containerd, run as a unit of a \
         private systemd user manager with Restart=no, so that every restart comes from the observer."
    );
    let sandbox = Sandbox::start(SandboxOptions::new().restart("no"))
        .map_err(|err| anyhow::anyhow!("could not start the sandbox: {err}"))?;
    if STOP_REQUESTED.load(Ordering::SeqCst) {
        println!("{TAG} interrupted while the sandbox started: tearing it down");
        drop(sandbox);
        return Ok(ExitCode::from(130));
    }

    let observer_cmd = observer_command(observer, &sandbox, user_args);
    print_guide(&sandbox, observer, user_args);
    println!("{TAG} running: {}", cmd::display(&observer_cmd));
    let status = run_observer(observer_cmd);
    println!(
        "{TAG} tearing down the sandbox in {}",
        sandbox.dir().display()
    );
    drop(sandbox);
    let status = status?;
    println!("{TAG} the observer exited ({status})");
    Ok(exit_code(status))
}

/// The observer pointed at the sandbox, with the user's arguments after ours. A flag the user
/// gives wins: ours is left out rather than given twice.
fn observer_command(observer: &Path, sandbox: &Sandbox, user_args: &[String]) -> Command {
    let mut command = Command::new(observer);
    let ours = [
        ("--socket", sandbox.socket().display().to_string()),
        ("--unit", sandbox.unit().to_string()),
        ("--bus", sandbox.bus_address()),
    ];
    for (flag, value) in ours {
        if flag_value(user_args, flag).is_none() {
            command.arg(flag).arg(value);
        }
    }
    command.args(user_args);
    command
}

fn print_guide(sandbox: &Sandbox, observer: &Path, user_args: &[String]) {
    let pid = match sandbox.main_pid() {
        Ok(Some(pid)) => pid.to_string(),
        Ok(None) => "<pid>".to_string(),
        Err(err) => {
            println!("{TAG} could not learn containerd's PID: {err}");
            "<pid>".to_string()
        }
    };
    // Where the observer will listen: its flag, else its environment variable, else its default.
    let from_env = env::var("OBSERVER_STATUS_LISTEN").ok();
    let listen = flag_value(user_args, "--status-listen")
        .or(from_env.as_deref())
        .unwrap_or(DEFAULT_STATUS_LISTEN);
    let url = status_url(listen);
    let status_cmd = if listen == DEFAULT_STATUS_LISTEN {
        format!("{} status", observer.display())
    } else {
        format!("{} status --status-listen {listen}", observer.display())
    };
    println!();
    println!("  sandbox:         {}", sandbox.dir().display());
    println!("  containerd:      pid {pid}, unit {}", sandbox.unit());
    println!("  socket:          {}", sandbox.socket().display());
    println!("  containerd log:  {}", sandbox.containerd_log().display());
    println!("  D-Bus:           {}", sandbox.bus_address());
    println!("  status:          {url}");
    println!();
    println!("  Inject faults from another terminal:");
    println!(
        "    kill -STOP {pid}    # freeze containerd: probes time out, the observer restarts it"
    );
    println!("    kill -CONT {pid}    # thaw it before the observer acts");
    println!("    kill -KILL {pid}    # kill it: the observer sees the exit and starts it again");
    println!("  After a restart containerd has a new PID.");
    println!("  Watch the status:");
    println!("    curl -s {url}");
    println!("    {status_cmd}");
    println!("  Ctrl-C stops the observer and tears the sandbox down.");
    println!();
}

/// `http://HOST:PORT/status` for a listen address; an unspecified host becomes loopback.
fn status_url(listen: &str) -> String {
    let listen = listen
        .replacen("0.0.0.0:", "127.0.0.1:", 1)
        .replacen("[::]:", "[::1]:", 1);
    format!("http://{listen}/status")
}

/// The value of `--flag value` or `--flag=value` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            return args.next().map(String::as_str);
        }
        if let Some(value) = arg
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(value);
        }
    }
    None
}

/// The child's code, or 128 + signal as a shell reports it.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

// Signals. The observer shares our process group, so a Ctrl-C reaches it directly: xtask
// only has to survive it, then wait for the observer and tear the sandbox down. A SIGTERM or
// SIGHUP is sent to xtask alone, so xtask passes it on as SIGTERM.

/// The observer's PID while it runs, 0 otherwise.
static OBSERVER_PID: AtomicI32 = AtomicI32::new(0);
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

extern "C" fn on_terminate(_signal: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
    let pid = OBSERVER_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

fn install_signal_handlers() -> Result<()> {
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] = [
        (libc::SIGINT, on_interrupt),
        (libc::SIGTERM, on_terminate),
        (libc::SIGHUP, on_terminate),
    ];
    for (signal, handler) in handlers {
        // A handler, not SIG_IGN: an ignored signal would stay ignored in the observer after
        // exec, and the observer must still stop on Ctrl-C.
        // SAFETY: the action is fully initialised and the handlers only touch atomics and
        // call kill, which are async-signal-safe.
        let result = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error())
                .context("could not install a signal handler");
        }
    }
    Ok(())
}

/// Runs the observer to its end, passing on a SIGTERM that arrived while it started.
fn run_observer(mut observer: Command) -> Result<ExitStatus> {
    let program = PathBuf::from(observer.get_program());
    let mut child = observer
        .spawn()
        .with_context(|| format!("could not start {}", program.display()))?;
    OBSERVER_PID.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    if STOP_REQUESTED.load(Ordering::SeqCst) {
        // SAFETY: the child is ours and not yet reaped, so its PID is still its own.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let status = child.wait();
    OBSERVER_PID.store(0, Ordering::SeqCst);
    status.with_context(|| format!("could not wait for {}", program.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn flag_value_reads_both_spellings() {
        let given = args(&["--status-listen", "0.0.0.0:1", "--bus=unix:path=/b"]);
        assert_eq!(flag_value(&given, "--status-listen"), Some("0.0.0.0:1"));
        assert_eq!(flag_value(&given, "--bus"), Some("unix:path=/b"));
        assert_eq!(flag_value(&given, "--socket"), None);
        // A flag that only starts like ours is another flag.
        assert_eq!(flag_value(&args(&["--bus-timeout=3"]), "--bus"), None);
    }

    #[test]
    fn status_url_points_at_loopback_for_unspecified_hosts() {
        assert_eq!(status_url("127.0.0.1:9847"), "http://127.0.0.1:9847/status");
        assert_eq!(status_url("0.0.0.0:80"), "http://127.0.0.1:80/status");
        assert_eq!(status_url("[::]:80"), "http://[::1]:80/status");
    }
}
