//! The fast path, chosen per kernel at load time: process exit on `tp_btf/sched_process_exit`
//! and accept latency on fentry/fexit of `unix_stream_connect` and fexit of `unix_accept`
//! (see `observer-ebpf/src/fentry.rs`), and blocked threads on `tp_btf/sched_switch`
//! (`observer-ebpf/src/blocked.rs`). Where the kernel refuses them (no BTF, no trampolines,
//! a lockdown that forbids fentry: EPERM) the loader falls back to the classic tracepoints,
//! and `/status` names the path each sensor took.
//!
//! `OBSERVER_KERNEL_HOOKS=tracepoint` turns the fast path off, to compare both paths' cost
//! on one kernel.

use aya::{
    Ebpf,
    programs::{BtfTracePoint, FEntry, FExit, Program, ProgramError},
};
use observer_common::{
    ACCEPT_BTF_PROGRAM, ACCEPT_EXIT_PROGRAM, BLOCKED_BTF_PROGRAM, CONNECT_BTF_PROGRAM,
    CONNECT_ENTRY_PROGRAM, CONNECT_EXIT_PROGRAM, Layout, PROCESS_EXIT_BTF_PROGRAM,
};

use crate::sense::kernel::btf::Btf;

/// Environment variable that picks the kernel path: `tracepoint` turns the fast path off.
pub const HOOKS_ENV: &str = "OBSERVER_KERNEL_HOOKS";

/// Which kind of hook a sensor runs on, as `/status` names it.
pub mod path {
    pub const TP_BTF: &str = "tp_btf";
    pub const FENTRY: &str = "fentry";
    pub const TRACEPOINT: &str = "tracepoint";
}

/// Why the fast path is not even tried, if it is not.
pub fn disabled() -> Option<String> {
    match std::env::var(HOOKS_ENV) {
        Ok(v) if v == "tracepoint" => {
            Some(format!("fast path turned off ({HOOKS_ENV}=tracepoint)"))
        }
        _ => None,
    }
}

/// The struct offsets the fast path reads, from the kernel's BTF, written into `layout`.
/// Returns, for the exit and the accept programs, why they cannot run if they cannot.
pub fn fill_layout(
    layout: &mut Layout,
    btf: Result<&Btf, String>,
) -> (Result<(), String>, Result<(), String>) {
    let btf = match btf {
        Ok(btf) => btf,
        Err(e) => return (Err(e.clone()), Err(e)),
    };
    let offset =
        |name: &str, path: &[&str]| btf.member_offset(name, path).map_err(|e| e.to_string());
    let exit = (|| {
        layout.task_signal = offset("task_struct", &["signal"])?;
        layout.signal_live = offset("signal_struct", &["live"])?;
        Ok(())
    })();
    let accept = (|| {
        layout.socket_sk = offset("socket", &["sk"])?;
        layout.unix_peer = offset("unix_sock", &["peer"])?;
        layout.unix_path_dentry = offset("unix_sock", &["path"])? + offset("path", &["dentry"])?;
        Ok(())
    })();
    (exit, accept)
}

/// Loads and attaches `process_exit_btf`; returns the hook's description.
pub fn attach_process_exit(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<String, String> {
    let program: &mut BtfTracePoint = program(ebpf, PROCESS_EXIT_BTF_PROGRAM)?;
    program
        .load("sched_process_exit", kernel_btf)
        .map_err(|e| refused(PROCESS_EXIT_BTF_PROGRAM, e))?;
    program
        .attach()
        .map_err(|e| format!("cannot attach {PROCESS_EXIT_BTF_PROGRAM}: {e}"))?;
    Ok(
        "tp_btf sched_process_exit (exit code and whole-process exit from task_struct, via BTF)"
            .into(),
    )
}

/// Loads and attaches the three accept-latency programs, exits first so that no connect is
/// recorded without the program that resolves it. On any failure every one of them is
/// unloaded again (the tracepoint path then stands in). Returns the hooks' description.
pub fn attach_accept_queue(
    ebpf: &mut Ebpf,
    kernel_btf: &aya::Btf,
    accept_signature: &str,
) -> Result<String, String> {
    let attached = (|| {
        let accept: &mut FExit = program(ebpf, ACCEPT_EXIT_PROGRAM)?;
        accept
            .load("unix_accept", kernel_btf)
            .map_err(|e| refused(ACCEPT_EXIT_PROGRAM, e))?;
        accept
            .attach()
            .map_err(|e| format!("cannot attach {ACCEPT_EXIT_PROGRAM} to unix_accept: {e}"))?;
        let connect_exit: &mut FExit = program(ebpf, CONNECT_EXIT_PROGRAM)?;
        connect_exit
            .load("unix_stream_connect", kernel_btf)
            .map_err(|e| refused(CONNECT_EXIT_PROGRAM, e))?;
        connect_exit.attach().map_err(|e| {
            format!("cannot attach {CONNECT_EXIT_PROGRAM} to unix_stream_connect: {e}")
        })?;
        let connect_entry: &mut FEntry = program(ebpf, CONNECT_ENTRY_PROGRAM)?;
        connect_entry
            .load("unix_stream_connect", kernel_btf)
            .map_err(|e| refused(CONNECT_ENTRY_PROGRAM, e))?;
        connect_entry.attach().map_err(|e| {
            format!("cannot attach {CONNECT_ENTRY_PROGRAM} to unix_stream_connect: {e}")
        })?;
        Ok(())
    })();
    if let Err(e) = attached {
        for name in [
            CONNECT_ENTRY_PROGRAM,
            CONNECT_EXIT_PROGRAM,
            ACCEPT_EXIT_PROGRAM,
        ] {
            if let Some(program) = ebpf.program_mut(name) {
                let _ = unload(program);
            }
        }
        return Err(e);
    }
    Ok(format!(
        "fentry/fexit unix_stream_connect (connect), fexit unix_accept{accept_signature} (accepted)"
    ))
}

/// Loads and attaches the accept-queue programs on BTF-typed tracepoints (`sk_data_ready`,
/// 6.6+, and `consume_skb`), accept first as in [`attach_accept_queue`]; on any failure both
/// are unloaded again and the classic tracepoints stand in. Returns the hooks' description.
pub fn attach_accept_queue_btf(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<String, String> {
    let attached = (|| {
        for (name, hook) in [
            (ACCEPT_BTF_PROGRAM, "consume_skb"),
            (CONNECT_BTF_PROGRAM, "sk_data_ready"),
        ] {
            let program: &mut BtfTracePoint = program(ebpf, name)?;
            program
                .load(hook, kernel_btf)
                .map_err(|e| refused(name, e))?;
            program
                .attach()
                .map_err(|e| format!("cannot attach {name} to tp_btf {hook}: {e}"))?;
        }
        Ok(())
    })();
    if let Err(e) = attached {
        for name in [CONNECT_BTF_PROGRAM, ACCEPT_BTF_PROGRAM] {
            if let Some(program) = ebpf.program_mut(name) {
                let _ = unload(program);
            }
        }
        return Err(e);
    }
    Ok("tp_btf sk_data_ready (connect queued), tp_btf consume_skb (accepted)".into())
}

/// Loads and attaches `blocked_switch_btf`; returns the hook's description. Kernels before
/// 5.18 pass no `prev_state` to `sched_switch`, and the verifier refuses the program there.
pub fn attach_blocked_btf(ebpf: &mut Ebpf, kernel_btf: &aya::Btf) -> Result<String, String> {
    let program: &mut BtfTracePoint = program(ebpf, BLOCKED_BTF_PROGRAM)?;
    program
        .load("sched_switch", kernel_btf)
        .map_err(|e| refused(BLOCKED_BTF_PROGRAM, e))?;
    program
        .attach()
        .map_err(|e| format!("cannot attach {BLOCKED_BTF_PROGRAM}: {e}"))?;
    Ok("tp_btf sched_switch (prev_state of containerd's and its shims' threads)".into())
}

/// `unix_accept` changed its arguments in 6.10; the programs read only the first two, which
/// did not move, but the status says which one this kernel has.
pub fn accept_signature(btf: &Btf) -> &'static str {
    if btf.member_offset("proto_accept_arg", &["flags"]).is_ok() {
        " (sock, newsock, struct proto_accept_arg *)"
    } else {
        " (sock, newsock, int flags, bool kern)"
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} is missing from the object"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

fn unload(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::FEntry(p) => p.unload(),
        Program::FExit(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        _ => Ok(()),
    }
}

/// The kernel's refusal, short: a verifier log is kept to its last lines.
fn refused(name: &str, e: ProgramError) -> String {
    let text = e.to_string();
    // aya appends the verifier's log, empty when the kernel refused before verifying.
    let text = text
        .trim_end()
        .trim_end_matches("Verifier output:")
        .trim_end();
    let lines: Vec<&str> = text.lines().collect();
    let tail = if lines.len() > 6 {
        lines[lines.len() - 6..].join(" | ")
    } else {
        lines.join(" | ")
    };
    format!("the kernel refused {name}: {tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_btf_neither_fast_sensor_runs_and_the_layout_stays_unknown() {
        let mut layout = Layout::UNKNOWN;
        let (exit, accept) = fill_layout(&mut layout, Err("no BTF".into()));
        assert_eq!(exit.unwrap_err(), "no BTF");
        assert_eq!(accept.unwrap_err(), "no BTF");
        assert_eq!(layout, Layout::UNKNOWN);
    }

    /// Needs the running kernel's BTF (`/sys/kernel/btf/vmlinux`, readable without root).
    #[test]
    fn this_kernels_btf_has_every_fast_path_offset() {
        let Some(btf) = crate::sense::kernel::btf::tests::kernel_btf() else {
            return;
        };
        let mut layout = Layout::UNKNOWN;
        let (exit, accept) = fill_layout(&mut layout, Ok(&btf));
        exit.unwrap();
        accept.unwrap();
        // `sock` comes first in `unix_sock`; its peer and path follow it.
        assert!(
            layout.unix_peer > 0 && layout.unix_path_dentry > 0,
            "{layout:?}"
        );
        assert_ne!(layout.unix_peer, layout.unix_path_dentry);
        assert!(accept_signature(&btf).starts_with(" (sock, newsock"));
    }
}
