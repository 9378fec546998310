//! Builds the kernel programs (`observer-ebpf`) with nightly and bpf-linker, and leaves the
//! object in `$OUT_DIR/observer` for `include_bytes_aligned!`. Nothing compiled is committed.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("observer has no parent directory"))?
        .join("observer-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "observer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` (needs nightly with rust-src and bpf-linker 0.13)")
}
