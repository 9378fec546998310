//! `cargo xtask setup`: makes this machine able to build and run the observer. It checks each
//! requirement, installs only what is missing, and is fast when nothing is, because `run`,
//! `test` and `lint` call it first every time. What it cannot install (not root, no apt-get)
//! it prints as commands to run by hand, and fails.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, TAG, display, find_in_path, is_root};

/// Debian packages, and why the project needs each.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22, which bpf-linker links against"),
    (
        "protobuf-compiler",
        "protoc, which containerd-client's build needs",
    ),
    ("containerd", "containerd, runc and ctr"),
    ("dbus", "the D-Bus daemon"),
    (
        "dbus-user-session",
        "the user dbus.socket unit the sandbox starts",
    ),
    ("systemd", "/lib/systemd/systemd and systemctl"),
    ("util-linux", "unshare, which the sandbox runs in"),
    ("iproute2", "ss, to look at containerd's socket queue"),
    (
        "podman",
        "cargo xtask image, and the container tests' `podman kube play`",
    ),
    ("catatonit", "the pause process of podman's pods"),
    (
        "debootstrap",
        "the image's Debian base (cargo xtask image) and the VM's root disk",
    ),
    (
        "prometheus",
        "prometheus and promtool, which check deploy/monitoring's rules",
    ),
    (
        "openssl",
        "the stand-in API server's certificates in the container test",
    ),
    (
        "busybox-static",
        "the only binary in the test containers' root filesystem",
    ),
    (
        "e2fsprogs",
        "mkfs.ext4, for the loop filesystem a test freezes under containerd",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// bpf-linker 0.13 reads bitcode up to LLVM 22; a nightly on a newer LLVM emits bitcode it cannot.
const MAX_NIGHTLY_LLVM: u32 = 22;
const TRACEFS: &str = "/sys/kernel/tracing";

/// Something missing, and how to install it.
enum Step {
    AptInstall(Vec<&'static str>),
    RustSrc,
    BpfLinker,
    MountTracefs,
}

impl Step {
    /// The exact commands that install it, in order.
    fn commands(&self) -> Vec<Command> {
        match self {
            Step::AptInstall(packages) => {
                let mut update = Command::new("apt-get");
                update.arg("update");
                let mut install = Command::new("apt-get");
                install
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(packages);
                vec![update, install]
            }
            Step::RustSrc => {
                // Only planned once `nightly` is known to be installed, so plain rustup is safe.
                let mut add = Command::new("rustup");
                add.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
                vec![add]
            }
            Step::BpfLinker => {
                // Plain `cargo`, not our CARGO: the printed line must work in a user's shell.
                let mut install = Command::new("cargo");
                install
                    .env("LLVM_PREFIX", LLVM_PREFIX)
                    .env("RUSTFLAGS", format!("-L native={LLVM_PREFIX}/lib"))
                    .args(["install", "--locked"])
                    .arg(format!("bpf-linker@{BPF_LINKER_VERSION}.0"))
                    .args(["--no-default-features", "--features", "llvm-22"]);
                vec![install]
            }
            Step::MountTracefs => {
                let mut mount = Command::new("mount");
                mount.args(["-t", "tracefs", "nodev", TRACEFS]);
                vec![mount]
            }
        }
    }

    fn needs_root(&self) -> bool {
        matches!(self, Step::AptInstall(_) | Step::MountTracefs)
    }

    /// Why this step cannot run here, if it cannot.
    fn blocker(&self) -> Option<String> {
        if self.needs_root() && !is_root() {
            return Some("needs root".into());
        }
        match self {
            Step::AptInstall(_) if find_in_path("apt-get").is_none() => {
                Some("apt-get is not installed".into())
            }
            Step::BpfLinker if find_in_path("cargo").is_none() => {
                Some("cargo is not on PATH (add ~/.cargo/bin)".into())
            }
            _ => None,
        }
    }
}

/// Checks everything and installs what is missing; with `dry_run`, only says what it would do.
pub fn setup(dry_run: bool) -> Result<()> {
    let steps = check()?;
    if steps.is_empty() {
        println!("{TAG} setup: everything is in place");
        return Ok(());
    }

    // Commands for a human: with `sudo` where root is needed and we are not root.
    let manual = |step: &Step| -> Vec<String> {
        let sudo = if step.needs_root() && !is_root() {
            "sudo "
        } else {
            ""
        };
        step.commands()
            .iter()
            .map(|cmd| format!("  {sudo}{}", display(cmd)))
            .collect()
    };

    if dry_run {
        println!("{TAG} setup --dry-run: would run:");
        steps
            .iter()
            .flat_map(manual)
            .for_each(|line| println!("{line}"));
        return Ok(());
    }

    let blockers: Vec<String> = steps.iter().filter_map(Step::blocker).collect();
    if !blockers.is_empty() {
        eprintln!(
            "{TAG} setup cannot install what is missing ({}).",
            blockers.join("; ")
        );
        eprintln!("{TAG} run these commands, then run the xtask command again:");
        steps
            .iter()
            .flat_map(manual)
            .for_each(|line| eprintln!("{line}"));
        bail!("setup is incomplete: run the commands above");
    }

    for step in &steps {
        for mut cmd in step.commands() {
            cmd::run(&mut cmd)?;
        }
    }
    // Check again: an install can succeed and still leave a check failing.
    if !check()?.is_empty() {
        bail!(
            "some checks still fail after installing (see above); if bpf-linker is one, \
             add ~/.cargo/bin to PATH"
        );
    }
    println!("{TAG} setup: done");
    Ok(())
}

/// Runs every check, printing each result, and returns what is missing in install order
/// (bpf-linker needs llvm-22-dev). Fails only for what setup must not fix itself.
fn check() -> Result<Vec<Step>> {
    let mut steps = Vec::new();

    let missing = missing_apt_packages();
    let names: Vec<&str> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
    match &missing {
        None => println!(
            "{TAG} checking Debian packages: no dpkg-query here, so make sure these are installed: {}",
            names.join(" ")
        ),
        Some(missing) if missing.is_empty() => {
            println!(
                "{TAG} checking Debian packages ({}): installed",
                names.join(" ")
            );
        }
        Some(missing) => {
            println!("{TAG} checking Debian packages: missing:");
            for (name, why) in APT_PACKAGES
                .iter()
                .filter(|(name, _)| missing.contains(name))
            {
                println!("  {name}: {why}");
            }
            steps.push(Step::AptInstall(missing.clone()));
        }
    }

    check_nightly()?;
    let has_rust_src =
        cmd::output(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .is_some_and(|list| list.lines().any(|line| line.trim() == "rust-src"));
    println!(
        "{TAG} checking rust-src for the nightly toolchain (-Z build-std=core): {}",
        if has_rust_src { "installed" } else { "missing" }
    );
    if !has_rust_src {
        steps.push(Step::RustSrc);
    }

    let linker = cmd::output(Command::new("bpf-linker").arg("--version"));
    let linker = linker.as_deref().map(str::trim);
    let linker_ok = linker.is_some_and(|version| {
        version
            .split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(&format!("{BPF_LINKER_VERSION}.")))
    });
    println!(
        "{TAG} checking bpf-linker {BPF_LINKER_VERSION} on PATH: {}",
        match (linker, linker_ok) {
            (_, true) => "found".to_string(),
            (Some(other), false) => format!("found `{other}`, need {BPF_LINKER_VERSION}"),
            (None, false) => "missing".to_string(),
        }
    );
    if !linker_ok {
        steps.push(Step::BpfLinker);
    }

    if !Path::new(TRACEFS).is_dir() {
        bail!(
            "{TRACEFS} does not exist: this kernel offers no tracefs (CONFIG_TRACING), \
             or sysfs is not mounted; the observer's tracepoints need it"
        );
    }
    let tracefs_mounted = tracefs_mounted();
    println!(
        "{TAG} checking tracefs at {TRACEFS}: {}",
        if tracefs_mounted {
            "mounted"
        } else {
            "not mounted"
        }
    );
    if !tracefs_mounted {
        steps.push(Step::MountTracefs);
    }

    Ok(steps)
}

/// `rustup`, never allowed to download a toolchain behind our back.
fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

/// The project's eBPF build runs `rustup run nightly`: the toolchain named `nightly` must exist
/// and be on an LLVM bpf-linker can read. Setup never installs or updates it, because today's
/// nightly may well be on a newer LLVM.
fn check_nightly() -> Result<()> {
    let help = format!(
        "install a nightly whose `rustc +nightly -vV` reports LLVM {MAX_NIGHTLY_LLVM} or older, \
         as the toolchain named `nightly` (`rustup toolchain install nightly --profile minimal \
         --component rust-src` installs today's nightly: check its LLVM version before keeping it). \
         Do not `rustup update` it: bpf-linker {BPF_LINKER_VERSION} cannot read bitcode from newer LLVM"
    );
    let toolchains = cmd::output(rustup().args(["toolchain", "list"])).ok_or_else(|| {
        anyhow::anyhow!(
            "`rustup toolchain list` failed: install rustup (https://rustup.rs), then {help}"
        )
    })?;
    // `nightly-<host>`; a dated nightly (`nightly-2026-05-19-<host>`) is another toolchain.
    let installed = toolchains.lines().any(|line| {
        line.split_whitespace()
            .next()
            .and_then(|name| name.strip_prefix("nightly-"))
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !installed {
        bail!("the Rust toolchain `nightly` is not installed: {help}");
    }
    let version = rustup()
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .context("could not run `rustup run nightly rustc -vV`")?;
    if !version.status.success() {
        bail!(
            "`rustup run nightly rustc -vV` failed: {}",
            String::from_utf8_lossy(&version.stderr).trim()
        );
    }
    let version = String::from_utf8_lossy(&version.stdout);
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse::<u32>().ok());
    match llvm_major {
        Some(major) if major <= MAX_NIGHTLY_LLVM => {
            println!("{TAG} checking the nightly toolchain: installed, LLVM {major}");
            Ok(())
        }
        Some(major) => bail!("the `nightly` toolchain is on LLVM {major}: {help}"),
        None => bail!("`rustup run nightly rustc -vV` did not report an LLVM version: {help}"),
    }
}

/// The packages of [`APT_PACKAGES`] dpkg does not report installed, or `None` without dpkg.
fn missing_apt_packages() -> Option<Vec<&'static str>> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(APT_PACKAGES.iter().map(|(name, _)| name))
        .stderr(std::process::Stdio::null());
    // dpkg-query exits 1 when it knows nothing of some package, yet lists the others.
    let out = query.output().ok()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Some(
        APT_PACKAGES
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !installed.contains(name))
            .collect(),
    )
}

fn tracefs_mounted() -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1);
            let fs_type = fields.next();
            mount_point == Some(TRACEFS) && fs_type == Some("tracefs")
        })
    })
}
