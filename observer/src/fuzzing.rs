//! Entry points for the fuzz targets in `observer/fuzz`, one per parser that reads what comes
//! from outside the observer: bytes in, the project's own parser called as the agent calls
//! it. Built only with the `fuzzing` feature. Each must return, never panic, on any input.

use std::path::Path;

/// The config file and the environment: the bytes up to the first NUL are the file's text,
/// each line after it `NAME=value` for the variable `OBSERVER_NAME`.
pub fn config(data: &[u8]) {
    use clap::Parser as _;
    let (file, env) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut set = Vec::new();
    for line in env.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let (name, value) = line.split_once('=').unwrap_or((&line, ""));
        let name = format!("OBSERVER_{}", name.to_ascii_uppercase());
        if name.contains(['=', '\0']) || value.contains('\0') {
            continue;
        }
        // SAFETY: a fuzz target runs its inputs one at a time on one thread.
        unsafe { std::env::set_var(&name, value) };
        set.push(name);
    }
    if let Ok(cli) = crate::config::Cli::try_parse_from(["observer"]) {
        let text = String::from_utf8_lossy(file).into_owned();
        let _ = crate::config::Settings::resolve_file_text(
            &cli.run,
            Path::new("/etc/containerd-observer.toml"),
            text,
        );
    }
    for name in set {
        // SAFETY: as above.
        unsafe { std::env::remove_var(name) };
    }
}

/// What `observer status` reads back from whatever answers on the status port.
pub fn status_response(data: &[u8]) {
    let _ = crate::report::status::client::read_answer(data);
}

/// The kernel's BTF (`/sys/kernel/btf/vmlinux`), and the lookups the layout makes in it.
pub fn btf(data: &[u8]) {
    use crate::sense::kernel::{btf::Btf, layout::StructOffsets};
    let btf = Btf::parse(data);
    let _ = StructOffsets::from_btf(btf.as_ref().map_err(ToString::to_string));
}

/// A tracefs event `format` file.
pub fn tracefs_format(data: &[u8]) {
    let _ = crate::sense::kernel::layout::parse_format(&String::from_utf8_lossy(data));
}

/// One datagram of the kernel's sock_diag reply to a dump of unix listeners.
pub fn sock_diag(data: &[u8]) {
    crate::sense::fallback::sockdiag::parse_reply(data);
}
