//! `cargo xtask test` and `cargo xtask lint`: the checks CI runs, runnable the same way by hand.

use std::{env, process::Command};

use anyhow::{Result, bail};

use crate::{
    cmd::{self, TAG, is_root, target_dir},
    vm::{self, Kernel},
};

/// Builds the observer, then runs the workspace's tests (its default members: the eBPF crate
/// only builds for the BPF target) with `OBSERVER_BIN` naming the binary under test, then the
/// kernel matrix: the VM scenarios on each of `kernels` (default: all under `CI=true`).
pub fn test(cargo_test_args: &[String], kernels: Option<Vec<Option<Kernel>>>) -> Result<()> {
    use clap::ValueEnum as _;
    let in_ci = env::var("CI").is_ok_and(|v| v == "true");
    let kernels: Vec<Kernel> = match kernels {
        Some(chosen) => chosen.into_iter().flatten().collect(),
        None if in_ci => Kernel::value_variants().to_vec(),
        None => Vec::new(),
    };
    workspace_tests(cargo_test_args)?;
    if kernels.is_empty() {
        println!(
            "{TAG} kernel matrix: not run (it takes minutes per kernel; CI=true runs it): `cargo xtask test --kernels 6.1,6.12` or `cargo xtask vm --kernel 6.1`"
        );
        return Ok(());
    }
    let observer = vm::prepare_host()?;
    let mut failed = Vec::new();
    for kernel in &kernels {
        println!("{TAG} kernel matrix: Debian {}", kernel.name());
        let outcome = vm::run(&vm::VmOptions::both_paths(*kernel), &observer);
        match outcome {
            Ok(true) => {}
            Ok(false) => failed.push(format!("{}: a scenario failed", kernel.name())),
            Err(err) => failed.push(format!("{}: {err:#}", kernel.name())),
        }
    }
    if !failed.is_empty() {
        bail!("kernel matrix failed:\n  {}", failed.join("\n  "));
    }
    println!(
        "{TAG} kernel matrix: all scenarios passed on Debian {}",
        kernels
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn workspace_tests(cargo_test_args: &[String]) -> Result<()> {
    crate::setup::setup(false)?;
    cmd::run(cmd::cargo().args(["build", "-p", "observer"]))?;

    let observer = target_dir().join("debug").join("observer");
    let mut test = cmd::cargo();
    if is_root() {
        // The container tests run this image: the binary under test, in the offline image.
        let archive = crate::image::build_from(&observer)?;
        test.env("OBSERVER_IMAGE", archive);
    } else {
        println!(
            "{TAG} not root: tests that need root (eBPF, the sandbox, the image) will say they skip"
        );
    }
    test.arg("test").env("OBSERVER_BIN", &observer);
    // Inherited anyway; set explicitly so the printed command shows it.
    if let Some(ci) = env::var_os("CI") {
        test.env("CI", ci);
    }
    test.args(cargo_test_args);
    cmd::run(&mut test)
}

/// rustfmt's check and clippy with warnings denied; runs both, then reports what failed.
pub fn lint() -> Result<()> {
    // Clippy runs the observer's build script, which builds the eBPF crate.
    crate::setup::setup(false)?;
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cmd::cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);

    let failed: Vec<String> = [fmt, clippy]
        .iter_mut()
        .filter_map(|check: &mut Command| cmd::run(check).err().map(|err| err.to_string()))
        .collect();
    if !failed.is_empty() {
        bail!("lint failed:\n  {}", failed.join("\n  "));
    }
    println!("{TAG} lint: clean");
    Ok(())
}
