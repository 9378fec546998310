//! The gate in front of every privileged test: skip loudly on a developer machine that lacks
//! something, fail in CI.

use std::{fmt, io::Write as _, path::Path};

use crate::process;

/// Something a privileged test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Effective UID 0: loading eBPF, mount namespaces, cgroups.
    Root,
    /// Kernel BTF at `/sys/kernel/btf/vmlinux`, for `tp_btf` programs.
    Btf,
    /// The systemd binary at `/lib/systemd/systemd`, run as a user manager.
    Systemd,
    /// `containerd` on `PATH`.
    Containerd,
    /// `unshare` on `PATH`, for the manager's private mount namespace.
    Unshare,
    /// `podman` and `catatonit` (its pods' pause process), for `podman kube play`.
    Podman,
    /// The observer's image, built by `cargo xtask image` (`$OBSERVER_IMAGE`, or
    /// `target/image/containerd-observer.tar`).
    Image,
    /// `prometheus` and `promtool` on `PATH`.
    Prometheus,
}

impl Need {
    fn is_met(self) -> bool {
        match self {
            // SAFETY: geteuid has no preconditions and cannot fail.
            Need::Root => (unsafe { libc::geteuid() }) == 0,
            Need::Btf => Path::new("/sys/kernel/btf/vmlinux").exists(),
            Need::Systemd => ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
                .iter()
                .any(|path| process::is_executable(Path::new(path))),
            Need::Containerd => process::find_on_path("containerd").is_some(),
            Need::Unshare => process::find_on_path("unshare").is_some(),
            Need::Podman => {
                process::find_on_path("podman").is_some()
                    && process::is_executable(Path::new("/usr/libexec/podman/catatonit"))
            }
            Need::Image => crate::image::image_archive().is_file(),
            Need::Prometheus => ["prometheus", "promtool"]
                .iter()
                .all(|tool| process::find_on_path(tool).is_some()),
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Need::Root => "root (run the tests as root, e.g. `sudo -E cargo test -p observer-tests`)",
            Need::Btf => "kernel BTF at /sys/kernel/btf/vmlinux (a kernel built with CONFIG_DEBUG_INFO_BTF)",
            Need::Systemd => {
                "/lib/systemd/systemd (apt-get install -y systemd dbus-user-session, or `cargo xtask setup`)"
            }
            Need::Containerd => {
                "containerd on PATH (apt-get install -y containerd, or `cargo xtask setup`)"
            }
            Need::Unshare => "unshare on PATH (apt-get install -y util-linux)",
            Need::Podman => {
                "podman and /usr/libexec/podman/catatonit (apt-get install -y podman catatonit, or `cargo xtask setup`)"
            }
            Need::Image => {
                "the observer's image (`cargo xtask image`, or OBSERVER_IMAGE naming its archive; `cargo xtask test` builds it)"
            }
            Need::Prometheus => {
                "prometheus and promtool on PATH (apt-get install -y prometheus, or `cargo xtask setup`)"
            }
        })
    }
}

/// What every test that runs the observer against a sandbox needs: eBPF (root and BTF), a
/// systemd user manager in its own mount namespace, and containerd.
pub const OBSERVER_NEEDS: &[Need] = &[
    Need::Root,
    Need::Btf,
    Need::Systemd,
    Need::Containerd,
    Need::Unshare,
];

/// A privileged test that could not run here. [`require`] has already said why on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// What was missing, one entry per unmet [`Need`].
    pub missing: Vec<Need>,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "needs {}", join(&self.missing))
    }
}

impl std::error::Error for Skip {}

/// Returns `Ok(())` when the privileged test `test` can run. When something it needs is
/// missing: under `CI=true` it panics with a message naming what is missing (a privileged
/// test must not skip in CI); otherwise it prints `SKIPPED <test>: needs <what>` to stderr
/// and returns `Err(Skip)`.
///
/// ```no_run
/// # use observer_tests::{Need, require};
/// let Ok(()) = require("restarts_a_killed_containerd", &[Need::Root, Need::Containerd]) else {
///     return;
/// };
/// ```
pub fn require(test: &str, needs: &[Need]) -> Result<(), Skip> {
    let missing: Vec<Need> = needs
        .iter()
        .copied()
        .filter(|need| !need.is_met())
        .collect();
    decide(test, missing, in_ci())
}

fn decide(test: &str, missing: Vec<Need>, ci: bool) -> Result<(), Skip> {
    if missing.is_empty() {
        return Ok(());
    }
    let skip = Skip { missing };
    if ci {
        panic!("{test} cannot run in CI: it {skip}. Privileged tests must not be skipped in CI.");
    }
    // Straight to stderr, not eprintln!: the test harness captures eprintln! output and
    // shows it only for failed tests, which would make the skip silent.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {skip}");
    Err(skip)
}

/// CI services set `CI=true`; `1` is accepted too.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

fn join(needs: &[Need]) -> String {
    needs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_runs() {
        assert_eq!(decide("t", Vec::new(), true), Ok(()));
    }

    #[test]
    fn missing_skips_outside_ci() {
        let skip = decide("t", vec![Need::Root, Need::Btf], false).unwrap_err();
        assert_eq!(skip.missing, vec![Need::Root, Need::Btf]);
        assert!(skip.to_string().starts_with("needs root"), "{skip}");
    }

    #[test]
    #[should_panic(expected = "t cannot run in CI: it needs kernel BTF")]
    fn missing_fails_in_ci() {
        let _ = decide("t", vec![Need::Btf], true);
    }
}
