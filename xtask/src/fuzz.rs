//! `cargo xtask fuzz`: runs each fuzz target of `observer/fuzz` for a while with cargo-fuzz on
//! nightly, seeded from its corpus in the repository (`observer/fuzz/corpus/TARGET`, kept
//! small). What a run discovers goes to `target/fuzz-corpus/TARGET`, not into the repository;
//! an input that crashes a target is left in `observer/fuzz/artifacts/TARGET` and fails the
//! task. `cargo xtask bench` runs it too.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, TAG};

/// Every target, one per parser of outside input (see `observer::fuzzing`).
pub const TARGETS: [&str; 5] = [
    "config",
    "status_response",
    "btf",
    "tracefs_format",
    "sock_diag",
];

/// Longest input, in bytes: larger than any seed, small enough to keep runs fast.
const MAX_LEN: u32 = 64 * 1024;

/// Runs `targets` (all when empty) for `seconds` each.
pub fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!(
                "there is no fuzz target `{target}`; choose among {}",
                TARGETS.join(", ")
            );
        }
    }
    install_cargo_fuzz()?;
    let root = cmd::workspace_root();
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for target in chosen {
        let found = cmd::target_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)
            .with_context(|| format!("could not create {}", found.display()))?;
        let seeds = root.join("observer/fuzz/corpus").join(target);
        let mut run = Command::new("cargo");
        run.current_dir(root.join("observer"))
            // What `cargo xtask` itself runs under (stable's cargo and rustc, our target
            // directory) must not leak into the nightly build of the targets.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg("-print_final_stats=1");
        cmd::run(&mut run).with_context(|| {
            format!(
                "fuzz target {target} failed: the input that broke it is in observer/fuzz/artifacts/{target}/; \
                 replay it with `cargo +nightly fuzz run {target} FILE` from observer/"
            )
        })?;
    }
    println!("{TAG} fuzz: every target ran {seconds} s without a failure");
    Ok(())
}

/// cargo-fuzz from crates.io, unless it is there.
fn install_cargo_fuzz() -> Result<()> {
    if cmd::output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    cmd::run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
}
