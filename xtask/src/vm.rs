//! `cargo xtask vm --kernel 6.1|6.12`: runs the observer's scenarios on a Debian distro kernel,
//! under QEMU with software emulation (TCG: no KVM needed).
//!
//! What it assembles, each cached under `target/vm/` so that a rerun only rebuilds the observer:
//! - the kernel: Debian's signed `linux-image-*-amd64` package, found through the
//!   `linux-image-amd64` metapackage of bookworm (6.1) or bookworm-backports (6.12), with a
//!   scratch apt configuration so the host's own sources are neither used nor changed;
//! - an initramfs of busybox and the few modules the root disk and the shared folder need;
//! - a root disk: debootstrap of Debian 12 with systemd as PID 1, the system D-Bus and
//!   containerd as `containerd.service`, plus the units in `xtask/vm/`;
//! - a shared folder (virtio-9p) with the observer built on this host, the scenario runner
//!   (`xtask/vm/scenarios.sh`) and, after the run, its results.
//!
//! The root disk is opened with `snapshot=on`, so every boot starts from the same image.
//! The VM powers itself off when the scenarios end; the results are printed, and any failed
//! scenario makes the task fail.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, TAG, find_in_path, is_root, target_dir, workspace_root};

/// The Debian release the root disk is built from, and the key its archive is signed with.
pub(crate) const SUITE: &str = "bookworm";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Where the host's apt sources are; the VM uses the same Debian mirrors.
const APT_SOURCES: &[&str] = &["/etc/apt/sources.list", "/etc/apt/sources.list.d"];
/// Overrides the Debian mirror (`URL` of the archive with `dists/bookworm`).
const MIRROR_ENV: &str = "OBSERVER_VM_MIRROR";

/// What the root disk holds besides debootstrap's minimal base.
const ROOTFS_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "kmod",
    "containerd",
    "curl",
    "jq",
    "procps",
    "iproute2",
];

/// Modules the initramfs loads, in this order (with their dependencies first): the root disk
/// (virtio-blk, ext4 with its checksums), the shared folder (9p over virtio), and sock_diag
/// for unix sockets, which the observer's fallback samples (the root disk has no modules).
const INITRAMFS_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "unix_diag",
];

/// Units the root disk must not start: they only slow the boot or write to the console.
const MASKED_UNITS: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-pstore.service",
];

/// Host programs the task runs, and the Debian package of each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("debootstrap", "debootstrap"),
    ("depmod", "kmod"),
    ("busybox", "busybox-static"),
    ("mkfs.ext4", "e2fsprogs"),
    ("xz", "xz-utils"),
];

/// A Debian kernel the task can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 12's own LTS kernel (bookworm).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13's kernel as bookworm-backports ships it.
    #[value(name = "6.12")]
    V6_12,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }

    /// The apt sources that carry this kernel's `linux-image-amd64`.
    fn sources(self, mirrors: &Mirrors) -> String {
        let line = |suite: &str, mirror: &str| {
            format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n")
        };
        match self {
            Kernel::V6_1 => {
                let mut sources = line(SUITE, &mirrors.archive);
                if let Some(security) = &mirrors.security {
                    sources += &line(&format!("{SUITE}-security"), security);
                }
                sources
            }
            // Backports live in the main archive.
            Kernel::V6_12 => line(&format!("{SUITE}-backports"), &mirrors.archive),
        }
    }
}

/// The Debian mirrors to fetch from: the archive, and the security archive if known.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mirrors {
    pub(crate) archive: String,
    security: Option<String>,
}

impl Mirrors {
    /// `OBSERVER_VM_MIRROR`, else the mirrors the host's apt uses for bookworm.
    pub(crate) fn find() -> Result<Mirrors> {
        let mut text = String::new();
        for source in APT_SOURCES {
            let path = Path::new(source);
            let files: Vec<PathBuf> = if path.is_dir() {
                fs::read_dir(path)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
                    .collect()
            } else {
                vec![path.to_path_buf()]
            };
            for file in files {
                text += &fs::read_to_string(file).unwrap_or_default();
                text.push('\n');
            }
        }
        let mut mirrors = Mirrors::from_sources(&text);
        if let Ok(archive) = std::env::var(MIRROR_ENV) {
            mirrors = Some(Mirrors {
                archive,
                security: mirrors.and_then(|m| m.security),
            });
        }
        mirrors.with_context(|| {
            format!(
                "this host's apt has no Debian {SUITE} source: set {MIRROR_ENV} to a Debian mirror's URL"
            )
        })
    }

    /// Reads both apt source formats (one-line `deb URI suite ...` and deb822 stanzas).
    fn from_sources(text: &str) -> Option<Mirrors> {
        let mut pairs: Vec<(String, Vec<String>)> = Vec::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("deb ") {
                let words: Vec<&str> = rest
                    .split_whitespace()
                    .skip_while(|w| w.starts_with('['))
                    .filter(|w| !w.ends_with(']') || w.contains("://"))
                    .collect();
                if let [uri, suite, ..] = words[..] {
                    pairs.push((uri.to_owned(), vec![suite.to_owned()]));
                }
            }
        }
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(name).map(str::trim))
                    .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
                && let Some(uri) = uris.first()
            {
                pairs.push((uri.clone(), suites));
            }
        }
        let serving = |suite: &str| {
            pairs
                .iter()
                .find(|(_, suites)| suites.iter().any(|s| s == suite))
                .map(|(uri, _)| uri.trim_end_matches('/').to_owned())
        };
        Some(Mirrors {
            archive: serving(SUITE)?,
            security: serving(&format!("{SUITE}-security")),
        })
    }
}

pub struct VmOptions {
    pub kernel: Kernel,
    /// Kernel paths to run the scenarios on: `auto` (fast path where it loads), `tracepoint`.
    pub paths: Vec<String>,
    pub timeout: Duration,
    pub memory_mib: u32,
}

/// `cargo xtask vm`'s defaults: the VM's deadline and memory.
pub const DEFAULT_TIMEOUT_MIN: u64 = 30;
pub const DEFAULT_MEMORY_MIB: u32 = 2048;

impl VmOptions {
    /// Both paths (fast path, then tracepoints) with `cargo xtask vm`'s defaults.
    pub fn both_paths(kernel: Kernel) -> Self {
        Self {
            kernel,
            paths: vec!["auto".into(), "tracepoint".into()],
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_MIN * 60),
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

/// Builds the observer and runs the scenarios on one kernel; `Ok(false)` when any failed.
pub fn vm(opts: VmOptions) -> Result<bool> {
    let observer = prepare_host()?;
    run(&opts, &observer)
}

/// What every kernel's run needs from this host, done once: root, the host tools, the
/// observer built. Returns the observer's path.
pub fn prepare_host() -> Result<PathBuf> {
    if !is_root() {
        bail!(
            "`cargo xtask vm` needs root (debootstrap, and a root disk whose files root owns): run it as root"
        );
    }
    install_host_tools()?;
    crate::setup::setup(false)?;
    cmd::run(cmd::cargo().args(["build", "-p", "observer"]))?;
    Ok(target_dir().join("debug").join("observer"))
}

/// Runs the scenarios on one kernel with `observer` (see [`prepare_host`]); `Ok(false)` when
/// any scenario failed.
pub fn run(opts: &VmOptions, observer: &Path) -> Result<bool> {
    let started = Instant::now();
    for path in &opts.paths {
        if path != "auto" && path != "tracepoint" {
            bail!("unknown kernel path `{path}`: use auto, tracepoint or both (auto,tracepoint)");
        }
    }

    let cache = target_dir().join("vm");
    fs::create_dir_all(&cache)?;
    let mirrors = Mirrors::find()?;
    let kernel = fetch_kernel(&cache, opts.kernel, &mirrors)?;
    println!(
        "{TAG} kernel {} ({})",
        kernel.release,
        kernel.vmlinuz.display()
    );
    let initramfs = build_initramfs(&cache, &kernel)?;
    let rootfs = build_rootfs(&cache, &mirrors.archive)?;
    let share = prepare_share(&cache, opts.kernel, observer, &opts.paths)?;
    let prepared = started.elapsed();
    println!(
        "{TAG} VM assets ready in {:.0} s; booting {} under QEMU (TCG)",
        prepared.as_secs_f64(),
        kernel.release
    );

    let boot = Instant::now();
    let serial_log = share.parent().unwrap_or(&cache).join("serial.log");
    let finished = boot_vm(&kernel, &initramfs, &rootfs, &share, &serial_log, opts)?;
    let results = share.join("results");
    let ok = report(&results, opts.kernel, finished)?;
    println!(
        "{TAG} kernel {}: {} in {:.0} s ({:.0} s preparing, {:.0} s in the VM); results in {}, serial console in {}",
        kernel.release,
        if ok { "all scenarios passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        prepared.as_secs_f64(),
        boot.elapsed().as_secs_f64(),
        results.display(),
        serial_log.display()
    );
    Ok(ok)
}

fn install_host_tools() -> Result<()> {
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("{TAG} installing what the VM needs: {}", missing.join(" "));
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

/// A kernel unpacked from its Debian package, with `modules.dep` generated.
struct UnpackedKernel {
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// apt options that read only `sources` and keep every list and download under `dir`.
fn scratch_apt(dir: &Path, sources: &str) -> Result<Vec<String>> {
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let list = dir.join("sources.list");
    fs::write(&list, sources)?;
    let d = dir.display();
    Ok(vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={d}/lists"),
        format!("-oDir::Cache={d}/cache"),
        "-oAPT::Sandbox::User=root".into(),
    ])
}

fn fetch_kernel(cache: &Path, kernel: Kernel, mirrors: &Mirrors) -> Result<UnpackedKernel> {
    let apt_dir = cache.join(format!("apt-{}", kernel.name()));
    let apt = scratch_apt(&apt_dir, &kernel.sources(mirrors))?;
    // The lists are small (a second or two); refreshing them picks up a new kernel upload.
    let mut update = Command::new("apt-get");
    update.args(&apt).args(["-qq", "update"]);
    if let Err(e) = cmd::run(&mut update) {
        println!("{TAG} cannot refresh the kernel's package lists ({e:#}); trying the cached ones");
    }
    let depends = cmd::output(
        Command::new("apt-cache")
            .args(&apt)
            .args(["depends", "linux-image-amd64"]),
    )
    .context("apt-cache knows no linux-image-amd64: are the Debian mirrors reachable?")?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("linux-image-amd64 depends on no kernel image:\n{depends}"))?
        .to_owned();
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let root = cache.join("kernels").join(&release);
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    if !modules.join("modules.dep").is_file() || !vmlinuz.is_file() {
        let downloads = cache.join("kernels");
        fs::create_dir_all(&downloads)?;
        cmd::run(
            Command::new("apt-get")
                .current_dir(&downloads)
                .args(&apt)
                .args(["-qq", "download", &package]),
        )?;
        let deb = fs::read_dir(&downloads)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let _ = fs::remove_dir_all(&root);
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        fs::remove_file(&deb)?;
    }
    Ok(UnpackedKernel {
        release,
        vmlinuz,
        modules,
    })
}

/// The initramfs: busybox, `/init` from `xtask/vm/init`, and [`INITRAMFS_MODULES`] with
/// their dependencies, uncompressed (busybox's insmod reads plain `.ko` files).
fn build_initramfs(cache: &Path, kernel: &UnpackedKernel) -> Result<PathBuf> {
    let deps = fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let order = module_load_order(&deps, &builtin, INITRAMFS_MODULES)?;

    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        archive.dir(dir);
    }
    archive.char_device("dev/console", 5, 1);
    let busybox = find_in_path("busybox").context("busybox is not installed")?;
    let busybox = fs::read(&busybox)?;
    if has_interpreter(&busybox) {
        bail!(
            "this host's busybox is linked dynamically and cannot run alone in an initramfs: apt-get install busybox-static"
        );
    }
    archive.file("bin/busybox", 0o755, &busybox);
    let init = workspace_root().join("xtask/vm/init");
    archive.file("init", 0o755, &fs::read(&init)?);
    let mut names = String::new();
    for relative in &order {
        let path = kernel.modules.join(relative);
        let bytes = decompress(&path)?;
        let name = module_name(relative);
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, &bytes);
        names.push_str(&name);
        names.push('\n');
    }
    archive.file("modules", 0o644, names.as_bytes());
    let out = cache.join(format!("initramfs-{}.cpio", kernel.release));
    fs::write(&out, archive.finish())?;
    Ok(out)
}

/// Whether a 64-bit ELF executable names a program interpreter (is linked dynamically).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let phoff = elf
        .get(0x20..0x28)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize);
    let (Some(phoff), Some(size), Some(count)) = (phoff, u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..count as usize).any(|i| u32_at(phoff + i * size as usize) == Some(PT_INTERP))
}

/// `kernel/fs/ext4/ext4.ko.xz` → `ext4`.
fn module_name(relative: &str) -> String {
    let file = relative.rsplit('/').next().unwrap_or(relative);
    file.split(".ko").next().unwrap_or(file).to_owned()
}

/// The module files to load for `wanted`, dependencies first, each once. A wanted module that
/// is built into the kernel needs nothing; one that is neither built in nor a module is an
/// error, as the VM could not boot without it.
fn module_load_order(deps: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    for want in wanted {
        let line = deps.lines().find_map(|line| {
            let (module, needs) = line.split_once(':')?;
            (module_name(module) == *want).then_some((module, needs))
        });
        let Some((module, needs)) = line else {
            if builtin.lines().any(|b| module_name(b) == *want) {
                continue;
            }
            bail!("this kernel has no module {want}, built in or loadable");
        };
        // modules.dep lists the whole closure, the most basic module last.
        for m in needs.split_whitespace().rev().chain([module]) {
            if !order.iter().any(|o| o == m) {
                order.push(m.to_owned());
            }
        }
    }
    Ok(order)
}

fn decompress(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return Ok(fs::read(path)?);
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool} to decompress {name}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A `newc` cpio archive, the format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

/// The files of `xtask/vm/` that go into the root disk, and where.
const ROOTFS_FILES: &[(&str, &str)] = &[
    ("fstab", "etc/fstab"),
    ("observer.service", "etc/systemd/system/observer.service"),
    (
        "observer-scenarios.service",
        "etc/systemd/system/observer-scenarios.service",
    ),
    (
        "containerd-vm.conf",
        "etc/systemd/system/containerd.service.d/vm.conf",
    ),
];

/// The root disk image, built once per recipe: debootstrap (cached on its own, by package
/// list) plus the files of `xtask/vm/`.
fn build_rootfs(cache: &Path, mirror: &str) -> Result<PathBuf> {
    let assets = workspace_root().join("xtask/vm");
    let packages = ROOTFS_PACKAGES.join(",");
    let base = cache.join(format!(
        "debootstrap-{SUITE}-{:016x}",
        fnv1a(packages.as_bytes())
    ));
    let mut recipe = packages.clone().into_bytes();
    for (asset, _) in ROOTFS_FILES {
        recipe.extend(fs::read(assets.join(asset))?);
    }
    recipe.extend(MASKED_UNITS.join(",").bytes());
    let image = cache.join(format!("rootfs-{:016x}.img", fnv1a(&recipe)));
    if image.is_file() {
        return Ok(image);
    }
    if !base.join("usr/bin/containerd").is_file() {
        let partial = base.with_extension("partial");
        let _ = fs::remove_dir_all(&partial);
        cmd::run(
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={packages}")])
                .arg(SUITE)
                .arg(&partial)
                .arg(mirror),
        )?;
        // Package caches only make the image bigger.
        let _ = fs::remove_dir_all(partial.join("var/cache/apt/archives"));
        fs::rename(&partial, &base)?;
    }
    let staging = cache.join("rootfs.staging");
    let _ = fs::remove_dir_all(&staging);
    cmd::run(Command::new("cp").arg("-a").arg(&base).arg(&staging))?;
    for (asset, target) in ROOTFS_FILES {
        let target = staging.join(target);
        fs::create_dir_all(target.parent().unwrap_or(&staging))?;
        fs::copy(assets.join(asset), &target)?;
    }
    fs::create_dir_all(staging.join("mnt/vm"))?;
    fs::write(staging.join("etc/hostname"), "observer-vm\n")?;
    let units = staging.join("etc/systemd/system");
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    let _ = fs::remove_file(wants.join("observer-scenarios.service"));
    symlink(
        "/etc/systemd/system/observer-scenarios.service",
        wants.join("observer-scenarios.service"),
    )?;
    for unit in MASKED_UNITS {
        for dir in fs::read_dir(&units)? {
            let _ = fs::remove_file(dir?.path().join(unit));
        }
        let _ = fs::remove_file(units.join(unit));
        symlink("/dev/null", units.join(unit))?;
    }
    let partial = image.with_extension("partial");
    let _ = fs::remove_file(&partial);
    cmd::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "observer-vm", "-d"])
            .arg(&staging)
            .arg(&partial)
            .arg("2G"),
    )?;
    fs::rename(&partial, &image)?;
    fs::remove_dir_all(&staging)?;
    Ok(image)
}

/// FNV-1a: a stable hash of a cache recipe (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The folder the VM mounts at /mnt/vm: the observer, the scenario runner, the paths to run,
/// and an empty `results/`.
fn prepare_share(
    cache: &Path,
    kernel: Kernel,
    observer: &Path,
    paths: &[String],
) -> Result<PathBuf> {
    let share = cache.join(format!("run-{}", kernel.name())).join("share");
    let _ = fs::remove_dir_all(&share);
    fs::create_dir_all(share.join("results"))?;
    fs::copy(observer, share.join("observer"))
        .with_context(|| format!("cannot copy {}", observer.display()))?;
    fs::copy(
        workspace_root().join("xtask/vm/scenarios.sh"),
        share.join("scenarios.sh"),
    )?;
    fs::write(share.join("paths"), paths.join(" ") + "\n")?;
    Ok(share)
}

/// Boots the VM and waits until it powers off or `opts.timeout` passes. Console lines of the
/// scenario runner (`vm: ...`) and of the initramfs are echoed; everything goes to
/// `serial_log`. Returns whether the VM powered off by itself.
fn boot_vm(
    kernel: &UnpackedKernel,
    initramfs: &Path,
    rootfs: &Path,
    share: &Path,
    serial_log: &Path,
    opts: &VmOptions,
) -> Result<bool> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=4 panic=-1 systemd.show_status=false",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            rootfs.display()
        ))
        .arg("-fsdev")
        .arg(format!(
            "local,id=vmshare,path={},security_model=none",
            share.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=vmshare,mount_tag=vmshare"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("{TAG} running: {}", cmd::display(&qemu));
    let mut child = qemu.spawn().context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("no QEMU stdout")?;
    let mut log = fs::File::create(serial_log)?;
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if lines_tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    let deadline = Instant::now() + opts.timeout;
    loop {
        match lines_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                writeln!(log, "{line}")?;
                if let Some(at) = ["vm: ", "initramfs: ", "Kernel panic"]
                    .iter()
                    .find_map(|marker| line.find(marker))
                {
                    println!("{TAG} [vm] {}", &line[at..]);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                child.wait()?;
                return Ok(true);
            }
        }
        if Instant::now() > deadline {
            println!(
                "{TAG} the VM did not finish within {} s: stopping QEMU",
                opts.timeout.as_secs()
            );
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
    }
}

/// Prints the results table and says whether every scenario passed.
fn report(results: &Path, kernel: Kernel, finished: bool) -> Result<bool> {
    let table = fs::read_to_string(results.join("results.tsv")).unwrap_or_default();
    let release = fs::read_to_string(results.join("kernel")).unwrap_or_default();
    let clock = fs::read_to_string(results.join("clocksource")).unwrap_or_default();
    println!(
        "{TAG} results on kernel {} ({}, clocksource {}):",
        kernel.name(),
        release.trim(),
        clock.trim()
    );
    let mut failed = 0;
    let mut rows = 0;
    for line in table.lines() {
        let mut cols = line.splitn(4, '\t');
        let (path, scenario, result, detail) = (
            cols.next().unwrap_or(""),
            cols.next().unwrap_or(""),
            cols.next().unwrap_or(""),
            cols.next().unwrap_or(""),
        );
        rows += 1;
        if result == "fail" {
            failed += 1;
        }
        println!("  {path:<10} {scenario:<15} {result:<5} {detail}");
    }
    let done = results.join("done").is_file();
    if !finished || !done {
        println!(
            "{TAG} the scenario runner did not finish (see the serial console log and {})",
            results.display()
        );
    }
    if rows == 0 {
        println!("{TAG} no scenario reported a result");
    }
    Ok(finished && done && rows > 0 && failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPS: &str = "\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/drivers/block/virtio_blk.ko.xz:
";

    #[test]
    fn modules_load_after_their_dependencies_and_once() {
        let order = module_load_order(
            DEPS,
            "kernel/drivers/virtio/virtio_pci.ko\n",
            &["virtio_pci", "virtio_blk", "ext4", "9pnet_virtio", "9p"],
        )
        .unwrap();
        let names: Vec<String> = order.iter().map(|m| module_name(m)).collect();
        assert_eq!(
            names,
            [
                "virtio_blk",
                "jbd2",
                "mbcache",
                "crc16",
                "ext4",
                "netfs",
                "9pnet",
                "9pnet_virtio",
                "9p"
            ]
        );
    }

    #[test]
    fn a_module_the_kernel_lacks_is_an_error() {
        let err = module_load_order(DEPS, "", &["virtio_pci"]).unwrap_err();
        assert!(err.to_string().contains("virtio_pci"), "{err}");
    }

    #[test]
    fn mirrors_come_from_either_apt_source_format() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security/\nSuites: bookworm-security\n";
        assert_eq!(
            Mirrors::from_sources(deb822),
            Some(Mirrors {
                archive: "http://mirror.example/debian".into(),
                security: Some("http://mirror.example/debian-security".into()),
            })
        );
        let one_line = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
        assert_eq!(
            Mirrors::from_sources(one_line),
            Some(Mirrors {
                archive: "http://m.example/debian".into(),
                security: None,
            })
        );
        assert_eq!(
            Mirrors::from_sources("deb http://m.example/debian trixie main\n"),
            None
        );
    }

    #[test]
    fn a_dynamic_executable_has_an_interpreter_and_busybox_static_has_none() {
        let dynamic = fs::read("/bin/sh").unwrap();
        assert!(has_interpreter(&dynamic));
        if let Some(busybox) = find_in_path("busybox") {
            assert!(!has_interpreter(&fs::read(busybox).unwrap()));
        }
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_a_trailer() {
        let mut archive = Cpio::default();
        archive.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = archive.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
