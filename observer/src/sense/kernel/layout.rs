//! Finds, on the running kernel, every offset the kernel programs read: tracepoint record
//! fields from the tracefs `format` files, and kernel struct members from BTF.
//!
//! Nothing is hard-coded: a field that this kernel lacks becomes [`NO_OFFSET`] and the
//! sensor that needs it is reported off, with the reason, instead of reading garbage.

use std::path::{Path, PathBuf};

use observer_common::{FATAL_SIGNALS, Layout, NO_OFFSET};

use crate::sense::kernel::btf::Btf;

/// Where tracefs is usually mounted, newest convention first.
pub const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint record, as its format file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracefs `format` file into its fields.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            // The name is the declaration's last word, without an array suffix.
            let name = decl.split_whitespace().last()?.split('[').next()?;
            let number = |key: &str| -> Option<u32> {
                line.split(';')
                    .find_map(|part| part.trim().strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            };
            Some(Field {
                name: name.to_owned(),
                offset: number("offset:")?,
                size: number("size:")?,
            })
        })
        .collect()
}

/// A tracepoint's record fields, or why they could not be read.
#[derive(Debug, Clone)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
    pub fields: Result<Vec<Field>, String>,
}

impl Tracepoint {
    /// Reads the format file of `category/name` from tracefs.
    pub fn read(category: &'static str, name: &'static str) -> Self {
        let fields = read_format(category, name).map(|(_, text)| parse_format(&text));
        Self {
            category,
            name,
            fields,
        }
    }

    /// Offset of field `name` if it exists with the given size.
    pub fn offset(&self, name: &str, size: u32) -> Option<u32> {
        self.fields
            .as_ref()
            .ok()?
            .iter()
            .find(|f| f.name == name && f.size == size)
            .map(|f| f.offset)
    }

    /// Offset of a field the sensor cannot work without, or a reason naming what is missing.
    pub fn require(&self, name: &str, size: u32) -> Result<u32, String> {
        match &self.fields {
            Err(e) => Err(e.clone()),
            Ok(_) => self.offset(name, size).ok_or_else(|| {
                format!(
                    "tracepoint {}/{} has no {size}-byte field `{name}` on this kernel",
                    self.category, self.name
                )
            }),
        }
    }
}

fn read_format(category: &str, name: &str) -> Result<(PathBuf, String), String> {
    let mut errors = Vec::new();
    for root in TRACEFS_ROOTS {
        let path = Path::new(root)
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok((path, text)),
            Err(e) => errors.push(format!("{}: {e}", path.display())),
        }
    }
    // With tracefs mounted but no such event, the kernel simply lacks the tracepoint.
    if let Some(root) = mounted_tracefs() {
        return Err(format!(
            "this kernel has no tracepoint {category}/{name} (no {root}/events/{category}/{name})"
        ));
    }
    Err(format!(
        "cannot read the format of tracepoint {category}/{name} ({}); is tracefs mounted? (mount -t tracefs nodev /sys/kernel/tracing)",
        errors.join("; ")
    ))
}

/// The first of [`TRACEFS_ROOTS`] where tracefs is mounted (it shows the `sched` events,
/// which every kernel has).
pub fn mounted_tracefs() -> Option<&'static str> {
    TRACEFS_ROOTS
        .iter()
        .copied()
        .find(|root| Path::new(root).join("events").join("sched").is_dir())
}

/// The tracepoints the programs use, with their formats as this kernel has them.
pub struct Formats {
    pub process_exit: Tracepoint,
    pub process_exec: Tracepoint,
    pub signal_generate: Tracepoint,
    pub mark_victim: Tracepoint,
    pub sk_data_ready: Tracepoint,
    pub consume_skb: Tracepoint,
    pub sched_switch: Tracepoint,
}

impl Formats {
    pub fn read() -> Self {
        Self {
            process_exit: Tracepoint::read("sched", "sched_process_exit"),
            process_exec: Tracepoint::read("sched", "sched_process_exec"),
            signal_generate: Tracepoint::read("signal", "signal_generate"),
            mark_victim: Tracepoint::read("oom", "mark_victim"),
            sk_data_ready: Tracepoint::read("sock", "sk_data_ready"),
            consume_skb: Tracepoint::read("skb", "consume_skb"),
            sched_switch: Tracepoint::read("sched", "sched_switch"),
        }
    }
}

/// Kernel struct offsets from BTF, or why each is unknown.
pub struct StructOffsets {
    pub task_exit_code: Result<u32, String>,
    pub sock_receive_queue_tail: Result<u32, String>,
    pub sock_receive_queue_head: Result<u32, String>,
    /// `sock.__sk_common.skc_family`: the BTF-typed `sk_data_ready` program reads the family
    /// from the socket, having no trace record.
    pub sock_family: Result<u32, String>,
}

impl StructOffsets {
    pub fn from_btf(btf: Result<&Btf, String>) -> Self {
        let btf = match btf {
            Ok(b) => b,
            Err(e) => {
                return Self {
                    task_exit_code: Err(e.clone()),
                    sock_receive_queue_head: Err(e.clone()),
                    sock_receive_queue_tail: Err(e.clone()),
                    sock_family: Err(e),
                };
            }
        };
        let task_exit_code = btf
            .member_offset("task_struct", &["exit_code"])
            .map_err(|e| e.to_string());
        let sock_receive_queue_head = btf
            .member_offset("sock", &["sk_receive_queue"])
            .map_err(|e| e.to_string());
        let sock_receive_queue_tail = sock_receive_queue_head.clone().and_then(|queue| {
            Ok(queue
                + btf
                    .member_offset("sk_buff_head", &["prev"])
                    .map_err(|e| e.to_string())?)
        });
        let sock_family = btf
            .member_offset("sock", &["__sk_common", "skc_family"])
            .map_err(|e| e.to_string());
        Self {
            task_exit_code,
            sock_receive_queue_head,
            sock_receive_queue_tail,
            sock_family,
        }
    }
}

/// Builds the layout the programs read with. Unknown offsets stay [`NO_OFFSET`].
pub fn build(formats: &Formats, offsets: &StructOffsets) -> Layout {
    let or_none = |o: Option<u32>| o.unwrap_or(NO_OFFSET);
    Layout {
        exit_group_dead: or_none(formats.process_exit.offset("group_dead", 1)),
        exec_filename: or_none(formats.process_exec.offset("filename", 4)),
        task_exit_code: or_none(offsets.task_exit_code.clone().ok()),
        signal_sig: or_none(formats.signal_generate.offset("sig", 4)),
        signal_pid: or_none(formats.signal_generate.offset("pid", 4)),
        signal_result: or_none(formats.signal_generate.offset("result", 4)),
        oom_pid: or_none(formats.mark_victim.offset("pid", 4)),
        data_ready_skaddr: or_none(formats.sk_data_ready.offset("skaddr", 8)),
        data_ready_family: or_none(formats.sk_data_ready.offset("family", 2)),
        consume_skbaddr: or_none(formats.consume_skb.offset("skbaddr", 8)),
        sock_receive_queue_tail: or_none(offsets.sock_receive_queue_tail.clone().ok()),
        sock_receive_queue_head: or_none(offsets.sock_receive_queue_head.clone().ok()),
        sock_family: or_none(offsets.sock_family.clone().ok()),
        // A `long`: the program reads its low half, which holds every state bit.
        switch_prev_state: or_none(formats.sched_switch.offset("prev_state", 8)),
        reported_signals: FATAL_SIGNALS,
        // The fast path's offsets: filled in by `kernel::fentry` when it is tried.
        ..Layout::UNKNOWN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_FORMAT_6_18: &str = "name: sched_process_exit
ID: 369
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;

print fmt: \"comm=%s pid=%d prio=%d group_dead=%s\", REC->comm, REC->pid, REC->prio, REC->group_dead ? \"true\" : \"false\"
";

    fn tracepoint(text: &str) -> Tracepoint {
        Tracepoint {
            category: "sched",
            name: "sched_process_exit",
            fields: Ok(parse_format(text)),
        }
    }

    #[test]
    fn parses_fields_with_offsets_and_sizes() {
        let fields = parse_format(EXIT_FORMAT_6_18);
        let get = |n: &str| fields.iter().find(|f| f.name == n).cloned().unwrap();
        assert_eq!(
            get("comm"),
            Field {
                name: "comm".into(),
                offset: 8,
                size: 16
            }
        );
        assert_eq!(get("pid").offset, 24);
        assert_eq!(get("group_dead").offset, 32);
        assert_eq!(fields.len(), 8);
    }

    #[test]
    fn data_loc_fields_parse_by_their_last_word() {
        let fields =
            parse_format("\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;");
        assert_eq!(fields[0].name, "comm");
        assert_eq!(fields[0].offset, 12);
    }

    #[test]
    fn an_older_kernel_without_group_dead_leaves_it_unknown() {
        let old = EXIT_FORMAT_6_18.replace(
            "\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n",
            "",
        );
        let formats = Formats {
            process_exit: tracepoint(&old),
            process_exec: tracepoint(""),
            signal_generate: tracepoint(""),
            mark_victim: tracepoint(""),
            sk_data_ready: tracepoint(""),
            consume_skb: tracepoint(""),
            sched_switch: tracepoint(""),
        };
        let offsets = StructOffsets::from_btf(Err("no BTF".into()));
        let layout = build(&formats, &offsets);
        assert_eq!(layout.exit_group_dead, NO_OFFSET);
        assert_eq!(layout.switch_prev_state, NO_OFFSET);
        assert_eq!(layout.task_exit_code, NO_OFFSET);
        assert_eq!(layout.sock_receive_queue_tail, NO_OFFSET);
    }

    #[test]
    fn sched_switch_gives_its_prev_state() {
        let format = "name: sched_switch
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;
";
        let formats = Formats {
            process_exit: tracepoint(""),
            process_exec: tracepoint(""),
            signal_generate: tracepoint(""),
            mark_victim: tracepoint(""),
            sk_data_ready: tracepoint(""),
            consume_skb: tracepoint(""),
            sched_switch: tracepoint(format),
        };
        let layout = build(&formats, &StructOffsets::from_btf(Err("no BTF".into())));
        assert_eq!(layout.switch_prev_state, 32);
    }

    #[test]
    fn a_field_of_another_size_is_not_taken() {
        let tp = tracepoint(EXIT_FORMAT_6_18);
        assert_eq!(tp.offset("group_dead", 1), Some(32));
        assert_eq!(tp.offset("group_dead", 4), None);
        assert!(
            tp.require("group_dead", 4)
                .unwrap_err()
                .contains("group_dead")
        );
    }

    #[test]
    fn a_missing_tracepoint_or_tracefs_is_explained() {
        let tp = Tracepoint::read("no_such_category", "no_such_event");
        let err = tp.require("pid", 4).unwrap_err();
        if mounted_tracefs().is_some() {
            assert!(
                err.contains("this kernel has no tracepoint no_such_category/no_such_event"),
                "{err}"
            );
        } else {
            assert!(err.contains("is tracefs mounted"), "{err}");
        }
    }

    /// Needs the running kernel's BTF (`/sys/kernel/btf/vmlinux`, readable without root).
    #[test]
    fn this_kernels_btf_has_the_socket_offsets_the_programs_read() {
        let Some(btf) = crate::sense::kernel::btf::tests::kernel_btf() else {
            return;
        };
        let offsets = StructOffsets::from_btf(Ok(&btf));
        // `__sk_common` opens `struct sock`, and the family is among its first members.
        let family = offsets.sock_family.unwrap();
        assert!(family > 0 && family < 64, "skc_family at {family}");
        let head = offsets.sock_receive_queue_head.unwrap();
        assert_eq!(offsets.sock_receive_queue_tail.unwrap(), head + 8);
    }
}
