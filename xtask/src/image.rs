//! `cargo xtask image`: the observer's container image, built offline from local inputs only.
//!
//! - the binary: `cargo build -p observer` on this host, as CI builds it (`--release` for the
//!   optimised one);
//! - the base: `debootstrap --variant=minbase` of Debian 12, the same release as the
//!   Dockerfile's `debian:bookworm-slim`, from the Debian mirror the host's apt uses, cached
//!   under `target/image/`;
//! - the assembly: `podman import` of the base with the binary at the path the Dockerfile
//!   copies it to, and the Dockerfile's `USER` and `ENTRYPOINT` (read from the Dockerfile:
//!   see `observer_tests::image`), in a podman store of its own under `target/image/`, so the
//!   machine's own images are never touched; then `podman save` to a docker-archive.
//!
//! `podman load`, `docker load` and `ctr -n k8s.io images import` read the result.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use observer_tests::image::{DOCKERFILE, IMAGE_ARCHIVE, IMAGE_NAME, ImageLayout};

use crate::{
    cmd::{self, TAG, find_in_path, is_root, target_dir, workspace_root},
    vm::{Mirrors, SUITE},
};

/// Host programs the image build runs, and the Debian package of each (`cargo xtask setup`
/// installs them).
pub const TOOLS: &[(&str, &str)] = &[("debootstrap", "debootstrap"), ("podman", "podman")];

pub struct ImageOptions {
    pub release: bool,
}

/// Builds the image and returns the archive's path.
pub fn image(opts: &ImageOptions) -> Result<PathBuf> {
    if !is_root() {
        bail!(
            "`cargo xtask image` needs root (debootstrap, and a root filesystem whose files root owns): run it as root"
        );
    }
    crate::setup::setup(false)?;
    for (tool, package) in TOOLS {
        if find_in_path(tool).is_none() {
            bail!("{tool} is not installed: apt-get install -y {package}, or `cargo xtask setup`");
        }
    }
    let mut build = cmd::cargo();
    build.args(["build", "-p", "observer"]);
    if opts.release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let profile = if opts.release { "release" } else { "debug" };
    let binary = target_dir().join(profile).join("observer");
    build_from(&binary)
}

/// Builds the image around an already built `binary`.
pub fn build_from(binary: &Path) -> Result<PathBuf> {
    let layout = ImageLayout::from_dockerfile(&workspace_root().join(DOCKERFILE))
        .map_err(anyhow::Error::msg)?;
    let cache = target_dir().join("image");
    fs::create_dir_all(&cache)?;
    let base = base_rootfs(&cache)?;

    // The binary alone in a tree of its own, appended to the base's in one tarball.
    let stage = cache.join("stage");
    let _ = fs::remove_dir_all(&stage);
    let relative = layout.binary.trim_start_matches('/');
    let dest = stage.join(relative);
    fs::create_dir_all(dest.parent().unwrap_or(&stage))?;
    fs::copy(binary, &dest).with_context(|| format!("cannot copy {}", binary.display()))?;
    let tarball = cache.join("rootfs.tar");
    cmd::run(
        Command::new("tar")
            .args(["--numeric-owner", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&base)
            .arg(".")
            .arg("-C")
            .arg(&stage)
            .arg(format!("./{relative}")),
    )?;

    let store = cache.join("store");
    let _ = fs::remove_dir_all(&store);
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        cmd
    };
    let name = format!("{IMAGE_NAME}:{}", env!("CARGO_PKG_VERSION"));
    let mut import = podman(&["import"]);
    for change in layout.import_changes() {
        import.arg("--change").arg(change);
    }
    import.arg(&tarball).arg(&name);
    cmd::run(&mut import)?;
    let archive = target_dir().join(IMAGE_ARCHIVE);
    let partial = archive.with_extension("partial");
    let _ = fs::remove_file(&partial);
    let mut save = podman(&["save", "--format", "docker-archive", "-o"]);
    save.arg(&partial).arg(&name);
    cmd::run(&mut save)?;
    fs::rename(&partial, &archive)?;
    fs::remove_dir_all(&store)?;
    fs::remove_dir_all(&stage)?;
    fs::remove_file(&tarball)?;
    println!(
        "{TAG} image {name} (base: debootstrap {SUITE} minbase, for the Dockerfile's {}; {} at {}, user {}) saved to {}",
        layout.base,
        profile_of(binary),
        layout.binary,
        layout.user,
        archive.display()
    );
    println!(
        "{TAG} load it with `podman load -i {0}`, `docker load -i {0}` or `ctr -n k8s.io images import {0}`",
        archive.display()
    );
    Ok(archive)
}

fn profile_of(binary: &Path) -> String {
    binary
        .parent()
        .and_then(Path::file_name)
        .map(|p| format!("the {} observer", p.to_string_lossy()))
        .unwrap_or_else(|| "the observer".into())
}

/// Debian's minimal base, built once and kept under `cache`.
fn base_rootfs(cache: &Path) -> Result<PathBuf> {
    let base = cache.join(format!("debootstrap-{SUITE}-minbase"));
    if base.join("usr/bin/dpkg").is_file() {
        println!("{TAG} base root filesystem: cached at {}", base.display());
        return Ok(base);
    }
    let mirrors = Mirrors::find()?;
    let partial = base.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    cmd::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(SUITE)
            .arg(&partial)
            .arg(&mirrors.archive),
    )?;
    // What bookworm-slim leaves out too: package caches and lists.
    let _ = fs::remove_dir_all(partial.join("var/cache/apt/archives"));
    let _ = fs::remove_dir_all(partial.join("var/lib/apt/lists"));
    fs::rename(&partial, &base)?;
    Ok(base)
}
