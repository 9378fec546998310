//! Kernel struct member offsets, read from the running kernel's BTF.
//!
//! A few kernel programs read kernel structs directly: `task_struct.exit_code` when a task
//! exits, and the tail of a socket's receive queue (`sock.sk_receive_queue.prev`). Where those
//! members sit changes from one kernel build to the next. Programs written in C get them fixed
//! up at load time by libbpf's CO-RE relocations; Rust eBPF programs have no CO-RE
//! relocations, so any offset compiled into them would only be a guess. Instead the agent
//! reads the offsets once at start from the running kernel's own type information,
//! `/sys/kernel/btf/vmlinux`, and hands them to its kernel programs as globals. A member this
//! kernel lacks becomes an error that says so, and the sensor that needs it stays off instead
//! of reading garbage.
//!
//! Only as much of BTF as that needs is understood: the header, the type section (every kind
//! is stepped over so that type IDs line up, but only structs, unions, typedefs, modifiers,
//! integers, enums, floats, pointers and arrays are looked into) and the string section. The
//! format is described in the kernel's `Documentation/bpf/btf.rst`. Blobs of either byte
//! order are read. Every input, however malformed, gives an error and never a panic: a
//! lookup that could loop (a struct that contains itself, a typedef cycle) is cut off.
//!
//! Why a reader of our own, when aya parses the same file to load the programs (weighed for
//! issue 12, measured on 6.18 with its 5.3 MiB vmlinux BTF, debug build):
//! - aya 0.14 keeps its member lookups crate-private (`Btf::types`, `type_by_id`), and
//!   Rust eBPF programs carry no CO-RE field relocations for aya to resolve (bpf-linker 0.13
//!   emits none), so aya cannot give these offsets; a C shim for CO-RE would bring clang into
//!   every build for five offsets.
//! - It does not set the peak. This parse peaks at +11.7 MiB and holds 6.3 MiB, aya's at
//!   +18.6 MiB holding 13.4 MiB (`EbpfLoader::new()` alone: the same), each in about 0.1 s;
//!   this one is dropped before aya parses (`KernelSensors::load`), so the start-up peak is
//!   aya's, and removing this reader would not bring it under 32 MiB. Parsing once would
//!   need a reduced BTF for aya (BENCHMARKS.md, "Memory").

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

/// Where the running kernel publishes its own BTF.
pub const SYS_FS_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The BTF magic number as it reads in the blob's own byte order.
const MAGIC: u16 = 0xeb9f;
/// The only BTF version there is.
const VERSION: u8 = 1;
/// Length of the header fields this module knows (`struct btf_header`).
const HEADER_LEN: usize = 24;
/// Length of `struct btf_type`, before its kind-specific data.
const TYPE_HEADER_LEN: usize = 12;

/// Most typedef/modifier hops, and most nested anonymous members or array dimensions, that a
/// lookup follows before calling the BTF malformed (real kernels need a handful).
const MAX_DEPTH: usize = 64;
/// Most struct members one lookup looks at, so that crafted input cannot make a lookup
/// explode through shared anonymous members (every lookup of a member of a vmlinux struct
/// on 6.18 looks at fewer than 1024).
const MAX_VISITS: usize = 1 << 16;

/// BTF kinds (`BTF_KIND_*`).
mod kind {
    pub const VOID: u32 = 0;
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

/// Why a BTF blob could not be read, or a member could not be found in it.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "{path} does not exist: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF); \
         the sensors that need struct offsets are off"
    )]
    NoKernelBtf { path: String },

    #[error(
        "cannot read {path}: {source}; run the agent as root so that it can read the kernel's \
         BTF, or the sensors that need struct offsets stay off"
    )]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "not BTF: the magic number is {found:#06x}, not 0xeb9f; give the raw BTF blob \
         (as in /sys/kernel/btf/vmlinux), not an ELF file or a text dump"
    )]
    BadMagic { found: u16 },

    #[error(
        "BTF version {found} is not supported (only version 1 is); \
         the sensors that need struct offsets are off"
    )]
    UnsupportedVersion { found: u8 },

    #[error(
        "BTF is truncated: {what} needs bytes {start}..{end} of {len}; \
         the file was cut short or is not BTF"
    )]
    Truncated {
        what: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },

    #[error(
        "malformed BTF: {0}; the blob is corrupt, or uses a newer BTF format than this \
         agent reads"
    )]
    Malformed(String),

    #[error("empty member path for `{name}`: name at least one member")]
    EmptyPath { name: String },

    #[error(
        "this kernel's BTF has no struct or union named `{name}`; the kernel is too old or \
         too new for the sensor that needs it, which stays off"
    )]
    NoSuchType { name: String },

    #[error(
        "{owner} has no member `{member}` (looking up `{path}`) in this kernel's BTF; \
         its layout differs from what the sensor expects, so that sensor stays off"
    )]
    NoSuchMember {
        owner: String,
        member: String,
        path: String,
    },

    #[error(
        "`{path}` is {kind}, not a struct or union, so `{next}` cannot be looked up inside it; \
         member paths do not follow pointers or arrays: look up the pointed-to struct on its own"
    )]
    NotAStruct {
        path: String,
        kind: &'static str,
        next: String,
    },

    #[error(
        "`{path}` is a {bits}-bit bitfield at bit {bit_offset}, which is {problem}; \
         read the bytes that contain it and mask the bits instead"
    )]
    Bitfield {
        path: String,
        bit_offset: u64,
        bits: u32,
        problem: &'static str,
    },

    #[error("`{path}` has no size in bytes: {reason}")]
    NoSize { path: String, reason: String },
}

/// Byte order of a BTF blob; the kernel writes its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endian {
    Little,
    Big,
}

impl Endian {
    fn u32_at(self, bytes: &[u8], at: usize) -> Option<u32> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(match self {
            Endian::Little => u32::from_le_bytes(raw),
            Endian::Big => u32::from_be_bytes(raw),
        })
    }
}

/// The parsed type and string sections of one BTF blob.
///
/// Parsing checks that every type's data lies inside the type section, so reading a type
/// by ID never runs off the end; what type IDs and string offsets point at is checked when
/// a lookup follows them.
pub struct Btf {
    endian: Endian,
    /// The type section.
    types: Vec<u8>,
    /// The string section.
    strings: Vec<u8>,
    /// `type_starts[id - 1]` is where type `id` starts in `types`.
    type_starts: Vec<u32>,
    /// Named structs, unions and typedefs: (name range in `strings`, type ID), sorted by
    /// name and, for equal names, by type ID.
    by_name: Vec<(Range<u32>, u32)>,
    /// Size of a pointer, found from the size of `long` the first time it is needed.
    pointer_size: OnceLock<Option<u32>>,
}

impl fmt::Debug for Btf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Btf")
            .field("endian", &self.endian)
            .field("types", &self.type_starts.len())
            .field("type_bytes", &self.types.len())
            .field("string_bytes", &self.strings.len())
            .finish()
    }
}

/// One `struct btf_type` header, plus where its kind-specific data starts.
#[derive(Debug, Clone, Copy)]
struct Type {
    id: u32,
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` for sized kinds, `type` for the kinds that refer to another type.
    size_or_type: u32,
    /// Start of the kind-specific data in the type section.
    data: usize,
}

impl Type {
    fn is_composite(&self) -> bool {
        matches!(self.kind, kind::STRUCT | kind::UNION)
    }
}

/// A member found inside a struct or union, with its offset from the outermost struct.
#[derive(Debug, Clone, Copy)]
struct Found {
    type_id: u32,
    bit_offset: u64,
    /// Bitfield width in bits, 0 for a member that is not a bitfield.
    bits: u32,
}

/// Length of the data that follows a type's header, or `None` for a kind this module does
/// not know (whose length it therefore cannot step over).
fn trailing_len(kind: u32, vlen: u32) -> Option<usize> {
    let vlen = vlen as usize;
    Some(match kind {
        kind::INT | kind::VAR | kind::DECL_TAG => 4,
        kind::ARRAY => 12,
        kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
        kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
        kind::PTR
        | kind::FWD
        | kind::TYPEDEF
        | kind::VOLATILE
        | kind::CONST
        | kind::RESTRICT
        | kind::FUNC
        | kind::FLOAT
        | kind::TYPE_TAG => 0,
        _ => return None,
    })
}

/// "a pointer", "a struct", ... for error messages.
fn kind_phrase(kind: u32) -> &'static str {
    match kind {
        kind::VOID => "void",
        kind::INT => "an integer",
        kind::PTR => "a pointer",
        kind::ARRAY => "an array",
        kind::STRUCT => "a struct",
        kind::UNION => "a union",
        kind::ENUM | kind::ENUM64 => "an enum",
        kind::FWD => "a forward declaration",
        kind::TYPEDEF => "a typedef",
        kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => "a type modifier",
        kind::FUNC => "a function",
        kind::FUNC_PROTO => "a function type",
        kind::VAR => "a variable",
        kind::DATASEC => "a data section",
        kind::FLOAT => "a floating-point number",
        kind::DECL_TAG => "a declaration tag",
        _ => "an unknown kind",
    }
}

/// `name.a.b` for error messages.
fn dotted(name: &str, path: &[&str]) -> String {
    let mut s = name.to_owned();
    for part in path {
        s.push('.');
        s.push_str(part);
    }
    s
}

/// Checks that bytes `start..start + len` lie inside a blob of `total` bytes.
fn section(
    what: &'static str,
    start: u64,
    len: u32,
    total: usize,
) -> Result<Range<usize>, BtfError> {
    let end = start + u64::from(len);
    if end > total as u64 {
        return Err(BtfError::Truncated {
            what,
            start,
            end,
            len: total,
        });
    }
    // Both fit in usize: they are at most `total`.
    Ok(start as usize..end as usize)
}

impl Btf {
    /// Reads the running kernel's BTF from `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_path(Path::new(SYS_FS_PATH))
    }

    fn from_path(path: &Path) -> Result<Btf, BtfError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BtfError::NoKernelBtf {
                path: path.display().to_string(),
            }),
            Err(source) => Err(BtfError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Parses a raw BTF blob, as found in `/sys/kernel/btf/vmlinux`, in either byte order.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let truncated = |what, end: usize| BtfError::Truncated {
            what,
            start: 0,
            end: end as u64,
            len: bytes.len(),
        };
        let endian = match bytes {
            [a, b, ..] if u16::from_le_bytes([*a, *b]) == MAGIC => Endian::Little,
            [a, b, ..] if u16::from_be_bytes([*a, *b]) == MAGIC => Endian::Big,
            [a, b, ..] => {
                return Err(BtfError::BadMagic {
                    found: u16::from_le_bytes([*a, *b]),
                });
            }
            _ => return Err(truncated("the header", HEADER_LEN)),
        };
        if bytes.len() < HEADER_LEN {
            return Err(truncated("the header", HEADER_LEN));
        }
        let version = bytes[2];
        if version != VERSION {
            return Err(BtfError::UnsupportedVersion { found: version });
        }
        let field = |at| endian.u32_at(bytes, at).unwrap_or(0);
        let hdr_len = field(4);
        if (hdr_len as usize) < HEADER_LEN {
            return Err(BtfError::Malformed(format!(
                "header length {hdr_len} is shorter than the {HEADER_LEN} bytes of a BTF header"
            )));
        }
        if hdr_len as usize > bytes.len() {
            return Err(truncated("the header", hdr_len as usize));
        }
        let (type_off, type_len, str_off, str_len) = (field(8), field(12), field(16), field(20));
        let base = u64::from(hdr_len);
        let type_range = section(
            "the type section",
            base + u64::from(type_off),
            type_len,
            bytes.len(),
        )?;
        let str_range = section(
            "the string section",
            base + u64::from(str_off),
            str_len,
            bytes.len(),
        )?;
        let types = bytes[type_range].to_vec();
        let strings = bytes[str_range].to_vec();

        let mut type_starts = Vec::with_capacity(types.len() / 32);
        let mut at = 0usize;
        while at < types.len() {
            let id = type_starts.len() + 1;
            let header_end = at + TYPE_HEADER_LEN;
            let info = endian.u32_at(&types, at + 4);
            let Some(info) = info.filter(|_| header_end <= types.len()) else {
                return Err(BtfError::Truncated {
                    what: "a type header",
                    start: at as u64,
                    end: header_end as u64,
                    len: types.len(),
                });
            };
            let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
            let Some(extra) = trailing_len(kind, vlen) else {
                return Err(BtfError::Malformed(format!(
                    "type {id} has kind {kind}, which this agent does not know"
                )));
            };
            let end = header_end + extra;
            if end > types.len() {
                return Err(BtfError::Truncated {
                    what: "a type's data",
                    start: header_end as u64,
                    end: end as u64,
                    len: types.len(),
                });
            }
            // The type section is at most u32::MAX bytes long, so `at` fits.
            type_starts.push(at as u32);
            at = end;
        }

        let mut btf = Btf {
            endian,
            types,
            strings,
            type_starts,
            by_name: Vec::new(),
            pointer_size: OnceLock::new(),
        };
        btf.index_names()?;
        Ok(btf)
    }

    /// Builds the sorted name index of structs, unions and typedefs.
    fn index_names(&mut self) -> Result<(), BtfError> {
        let mut by_name = Vec::new();
        for id in 1..=self.type_starts.len() as u32 {
            let t = self.ty(id)?;
            if matches!(t.kind, kind::STRUCT | kind::UNION | kind::TYPEDEF) && t.name_off != 0 {
                let range = self.name_range(t.name_off)?;
                if !range.is_empty() {
                    by_name.push((range, id));
                }
            }
        }
        let strings = &self.strings;
        let name = |r: &Range<u32>| &strings[r.start as usize..r.end as usize];
        // Stable, so equal names stay in type ID order.
        by_name.sort_by(|a, b| name(&a.0).cmp(name(&b.0)));
        self.by_name = by_name;
        Ok(())
    }

    /// Where the NUL-terminated string at `off` lies in the string section (without the NUL).
    fn name_range(&self, off: u32) -> Result<Range<u32>, BtfError> {
        if off == 0 {
            return Ok(0..0);
        }
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        match rest.iter().position(|&b| b == 0) {
            // The string section is at most u32::MAX bytes long, so the end fits.
            Some(len) => Ok(off..off + len as u32),
            None => Err(BtfError::Malformed(format!(
                "name offset {off} is outside the string section or not NUL-terminated"
            ))),
        }
    }

    fn name(&self, off: u32) -> Result<&[u8], BtfError> {
        let r = self.name_range(off)?;
        Ok(&self.strings[r.start as usize..r.end as usize])
    }

    /// A type's name for messages, e.g. "struct sock" or "an anonymous union".
    fn describe(&self, t: &Type) -> String {
        let word = match t.kind {
            kind::STRUCT => "struct",
            kind::UNION => "union",
            _ => "type",
        };
        match self.name(t.name_off) {
            Ok(n) if !n.is_empty() => format!("{word} {}", String::from_utf8_lossy(n)),
            _ => format!("an anonymous {word} (type {})", t.id),
        }
    }

    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        self.endian
            .u32_at(&self.types, at)
            .ok_or_else(|| BtfError::Malformed(format!("read past the type section at byte {at}")))
    }

    /// The type with ID `id`; ID 0 is void.
    fn ty(&self, id: u32) -> Result<Type, BtfError> {
        if id == 0 {
            return Ok(Type {
                id,
                name_off: 0,
                kind: kind::VOID,
                vlen: 0,
                kind_flag: false,
                size_or_type: 0,
                data: 0,
            });
        }
        let Some(&start) = self.type_starts.get(id as usize - 1) else {
            return Err(BtfError::Malformed(format!(
                "type ID {id} is out of range (there are {} types)",
                self.type_starts.len()
            )));
        };
        let at = start as usize;
        let info = self.u32_at(at + 4)?;
        Ok(Type {
            id,
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            data: at + TYPE_HEADER_LEN,
        })
    }

    /// Follows typedefs and modifiers (const, volatile, restrict, type tags) from `id` to
    /// the type underneath.
    fn resolve(&self, id: u32) -> Result<Type, BtfError> {
        let mut t = self.ty(id)?;
        for _ in 0..MAX_DEPTH {
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    t = self.ty(t.size_or_type)?;
                }
                _ => return Ok(t),
            }
        }
        Err(BtfError::Malformed(format!(
            "more than {MAX_DEPTH} typedefs and modifiers in a row from type {id} (a loop?)"
        )))
    }

    /// The structs and unions called `name`, in type ID order; those reached through a
    /// typedef of that name come after those named so themselves.
    fn composites_named(&self, name: &str) -> Result<Vec<Type>, BtfError> {
        let name = name.as_bytes();
        let key = |r: &Range<u32>| &self.strings[r.start as usize..r.end as usize];
        let first = self.by_name.partition_point(|(r, _)| key(r) < name);
        let ids = self.by_name[first..]
            .iter()
            .take_while(|(r, _)| key(r) == name)
            .map(|&(_, id)| id);
        let (mut direct, mut via_typedef) = (Vec::new(), Vec::new());
        for id in ids {
            let t = self.ty(id)?;
            if t.is_composite() {
                direct.push(t);
            } else if let Ok(target) = self.resolve(id)
                && target.is_composite()
            {
                via_typedef.push(target);
            }
        }
        direct.extend(via_typedef);
        Ok(direct)
    }

    /// Member `index` of struct or union `t`: (name offset, type ID, raw offset field).
    fn member(&self, t: &Type, index: u32) -> Result<(u32, u32, u32), BtfError> {
        let at = t.data + 12 * index as usize;
        Ok((self.u32_at(at)?, self.u32_at(at + 4)?, self.u32_at(at + 8)?))
    }

    /// Finds member `name` of struct or union `t`, looking inside anonymous struct and union
    /// members as C does. The offset is from the start of `t`.
    fn find_member(
        &self,
        t: &Type,
        name: &[u8],
        depth: usize,
        visits: &mut usize,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::Malformed(format!(
                "anonymous members nest more than {MAX_DEPTH} deep in type {} (a loop?)",
                t.id
            )));
        }
        for index in 0..t.vlen {
            *visits += 1;
            if *visits > MAX_VISITS {
                return Err(BtfError::Malformed(format!(
                    "looking for a member visited more than {MAX_VISITS} members"
                )));
            }
            let (name_off, type_id, raw_offset) = self.member(t, index)?;
            let (bit_offset, bits) = if t.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24)
            } else {
                (raw_offset, 0)
            };
            let member_name = self.name(name_off)?;
            if member_name == name {
                return Ok(Some(Found {
                    type_id,
                    bit_offset: u64::from(bit_offset),
                    bits,
                }));
            }
            if member_name.is_empty() {
                let inner = self.resolve(type_id)?;
                if inner.is_composite()
                    && let Some(mut found) = self.find_member(&inner, name, depth + 1, visits)?
                {
                    found.bit_offset = found.bit_offset.saturating_add(u64::from(bit_offset));
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// Finds `path` inside `start`, a struct or union called `name`.
    fn walk(&self, name: &str, start: Type, path: &[&str]) -> Result<Found, BtfError> {
        let mut owner = start;
        let mut bit_offset = 0u64;
        let mut visits = 0usize;
        for (i, &part) in path.iter().enumerate() {
            let here = dotted(name, &path[..=i]);
            let found = if part.is_empty() {
                None
            } else {
                self.find_member(&owner, part.as_bytes(), 0, &mut visits)?
            };
            let Some(mut found) = found else {
                return Err(BtfError::NoSuchMember {
                    owner: self.describe(&owner),
                    member: part.to_owned(),
                    path: here,
                });
            };
            // Old-style bitfields (no kind_flag) keep their width, and possibly a further
            // bit offset, in the integer type.
            let target = self.resolve(found.type_id)?;
            if found.bits == 0 && target.kind == kind::INT {
                let encoding = self.u32_at(target.data)?;
                let (int_offset, int_bits) = ((encoding >> 16) & 0xff, encoding & 0xff);
                if int_offset != 0 || u64::from(int_bits) != u64::from(target.size_or_type) * 8 {
                    found.bit_offset = found.bit_offset.saturating_add(u64::from(int_offset));
                    found.bits = int_bits;
                }
            }
            bit_offset = bit_offset.saturating_add(found.bit_offset);
            let Some(&next) = path.get(i + 1) else {
                return Ok(Found {
                    bit_offset,
                    ..found
                });
            };
            if !target.is_composite() {
                return Err(BtfError::NotAStruct {
                    path: here,
                    kind: kind_phrase(target.kind),
                    next: next.to_owned(),
                });
            }
            owner = target;
        }
        Err(BtfError::EmptyPath {
            name: name.to_owned(),
        })
    }

    /// Finds `path` inside the first struct or union called `name` that has it.
    fn lookup(&self, name: &str, path: &[&str]) -> Result<Found, BtfError> {
        if path.is_empty() {
            return Err(BtfError::EmptyPath {
                name: name.to_owned(),
            });
        }
        let mut first_error = None;
        for candidate in self.composites_named(name)? {
            match self.walk(name, candidate, path) {
                Ok(found) => return Ok(found),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| BtfError::NoSuchType {
            name: name.to_owned(),
        }))
    }

    /// Byte offset of `path` inside struct (or union) `name`, following nested members, e.g.
    /// `member_offset("sock", &["sk_receive_queue"])`, `member_offset("sk_buff_head",
    /// &["prev"])`, `member_offset("task_struct", &["exit_code"])`.
    ///
    /// Anonymous struct and union members are looked through as in C (`task_struct` and
    /// `sock` have many), and typedefs and const/volatile are followed to reach the struct
    /// that the next element of `path` is looked up in. Pointers are not followed. When
    /// several structs share `name`, the first that has `path` is used. A bitfield member
    /// that does not start on a byte boundary is an error.
    pub fn member_offset(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let found = self.lookup(name, path)?;
        if found.bit_offset % 8 != 0 {
            let here = dotted(name, path);
            return Err(if found.bits != 0 {
                BtfError::Bitfield {
                    path: here,
                    bit_offset: found.bit_offset,
                    bits: found.bits,
                    problem: "not on a byte boundary, so it has no byte offset",
                }
            } else {
                BtfError::Malformed(format!(
                    "`{here}` is at bit {}, not on a byte boundary, and is not a bitfield",
                    found.bit_offset
                ))
            });
        }
        u32::try_from(found.bit_offset / 8).map_err(|_| {
            BtfError::Malformed(format!(
                "`{}` is at bit {}, further than 4 GiB into the struct",
                dotted(name, path),
                found.bit_offset
            ))
        })
    }

    /// Size in bytes of member `path` of struct (or union) `name`, typedefs and modifiers
    /// resolved, for sanity checks (e.g. `task_struct.exit_code` is 4). A bitfield has a size
    /// only when it is a whole number of bytes on a byte boundary.
    pub fn member_size(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let found = self.lookup(name, path)?;
        let here = || dotted(name, path);
        if found.bits != 0 {
            if found.bits % 8 != 0 || found.bit_offset % 8 != 0 {
                return Err(BtfError::Bitfield {
                    path: here(),
                    bit_offset: found.bit_offset,
                    bits: found.bits,
                    problem: "not a whole number of bytes on a byte boundary, so it has no size \
                              in bytes",
                });
            }
            return Ok(found.bits / 8);
        }
        let size = self.size_of(found.type_id, 0).map_err(|e| match e {
            SizeError::Btf(e) => e,
            SizeError::None(reason) => BtfError::NoSize {
                path: here(),
                reason,
            },
        })?;
        u32::try_from(size).map_err(|_| BtfError::NoSize {
            path: here(),
            reason: format!("its size, {size} bytes, does not fit in 32 bits"),
        })
    }

    /// Size in bytes of type `id`.
    fn size_of(&self, id: u32, depth: usize) -> Result<u64, SizeError> {
        if depth > MAX_DEPTH {
            return Err(SizeError::Btf(BtfError::Malformed(format!(
                "arrays nest more than {MAX_DEPTH} deep at type {id} (a loop?)"
            ))));
        }
        let t = self.resolve(id)?;
        match t.kind {
            kind::INT | kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FLOAT => {
                Ok(u64::from(t.size_or_type))
            }
            kind::PTR => self.pointer_size().map(u64::from).ok_or_else(|| {
                SizeError::None(
                    "it is a pointer, and this BTF has no `long` to tell a pointer's size".into(),
                )
            }),
            kind::ARRAY => {
                let element = self.u32_at(t.data)?;
                let count = self.u32_at(t.data + 8)?;
                let each = self.size_of(element, depth + 1)?;
                each.checked_mul(u64::from(count)).ok_or_else(|| {
                    SizeError::None(format!(
                        "an array of {count} elements of {each} bytes overflows"
                    ))
                })
            }
            other => Err(SizeError::None(format!("it is {}", kind_phrase(other)))),
        }
    }

    /// Size of a pointer: the size of `long`, as libbpf works it out.
    fn pointer_size(&self) -> Option<u32> {
        *self.pointer_size.get_or_init(|| {
            const LONGS: [&[u8]; 5] = [
                b"long",
                b"long int",
                b"unsigned long",
                b"long unsigned int",
                b"unsigned long int",
            ];
            (1..=self.type_starts.len() as u32)
                .filter_map(|id| self.ty(id).ok())
                .filter(|t| t.kind == kind::INT && matches!(t.size_or_type, 4 | 8))
                .find(|t| self.name(t.name_off).is_ok_and(|n| LONGS.contains(&n)))
                .map(|t| t.size_or_type)
        })
    }
}

/// Why [`Btf::size_of`] gave no size: broken BTF, or a type that has none.
enum SizeError {
    Btf(BtfError),
    None(String),
}

impl From<BtfError> for SizeError {
    fn from(e: BtfError) -> Self {
        SizeError::Btf(e)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Instant;

    /// Builds small BTF blobs, one type at a time.
    struct Builder {
        endian: Endian,
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self::with_endian(Endian::Little)
        }

        fn with_endian(endian: Endian) -> Self {
            Builder {
                endian,
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn push(&mut self, v: u32) {
            let bytes = match self.endian {
                Endian::Little => v.to_le_bytes(),
                Endian::Big => v.to_be_bytes(),
            };
            self.types.extend_from_slice(&bytes);
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn header(
            &mut self,
            name: &str,
            kind: u32,
            vlen: u32,
            flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.string(name);
            self.push(name_off);
            self.push((u32::from(flag) << 31) | (kind << 24) | vlen);
            self.push(size_or_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.int_bits(name, size, 0, size * 8)
        }

        fn int_bits(&mut self, name: &str, size: u32, offset: u32, bits: u32) -> u32 {
            let id = self.header(name, kind::INT, 0, false, size);
            self.push((offset << 16) | bits);
            id
        }

        fn refer(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.header(name, kind, 0, false, target)
        }

        fn array(&mut self, element: u32, index: u32, count: u32) -> u32 {
            let id = self.header("", kind::ARRAY, 0, false, 0);
            self.push(element);
            self.push(index);
            self.push(count);
            id
        }

        /// A struct or union; members are (name, type, offset field as stored).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.header(name, kind, members.len() as u32, flag, size);
            for &(member, ty, offset) in members {
                let name_off = self.string(member);
                self.push(name_off);
                self.push(ty);
                self.push(offset);
            }
            id
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(kind::STRUCT, name, size, false, members)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = match self.endian {
                Endian::Little => MAGIC.to_le_bytes(),
                Endian::Big => MAGIC.to_be_bytes(),
            }
            .to_vec();
            out.extend_from_slice(&[VERSION, 0]);
            let types_len = self.types.len() as u32;
            let strings_len = self.strings.len() as u32;
            // hdr_len, type_off, type_len, str_off, str_len
            for v in [HEADER_LEN as u32, 0, types_len, types_len, strings_len] {
                out.extend_from_slice(&match self.endian {
                    Endian::Little => v.to_le_bytes(),
                    Endian::Big => v.to_be_bytes(),
                });
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A small kernel-like world:
    ///
    /// ```c
    /// struct list { struct list *next, *prev; };              // 16 bytes
    /// typedef struct list list_t;
    /// struct task {
    ///     int pid;                                            // 0
    ///     union { long state; struct { int a; int b; }; };   // 8: state, a; 12: b
    ///     const volatile list_t children;                     // 16
    ///     unsigned flags:3, mode:5, wide:16;                  // bits 256, 259, 264 (kind_flag)
    ///     struct list *parent;                                // 40
    ///     char comm[16];                                      // 48
    /// };                                                      // 64 bytes
    /// ```
    fn world(endian: Endian) -> Vec<u8> {
        let mut b = Builder::with_endian(endian);
        let int = b.int("int", 4); // 1
        let long = b.int("long", 8); // 2
        let uint = b.int("unsigned int", 4); // 3
        let chr = b.int("char", 1); // 4
        // struct list is type 6: the pointer refers forward to it.
        let list_ptr = b.refer(kind::PTR, "", 6); // 5
        let list = b.strukt("list", 16, &[("next", list_ptr, 0), ("prev", list_ptr, 64)]);
        assert_eq!(list, 6);
        let list_t = b.refer(kind::TYPEDEF, "list_t", list);
        let volatile = b.refer(kind::VOLATILE, "", list_t);
        let konst = b.refer(kind::CONST, "", volatile);
        let ab = b.strukt("", 8, &[("a", int, 0), ("b", int, 32)]);
        let state = b.composite(
            kind::UNION,
            "",
            8,
            false,
            &[("state", long, 0), ("", ab, 0)],
        );
        let index = b.int("__ARRAY_SIZE_TYPE__", 4);
        let comm = b.array(chr, index, 16);
        b.composite(
            kind::STRUCT,
            "task",
            64,
            true,
            &[
                ("pid", int, 0),
                ("", state, 64),
                ("children", konst, 128),
                ("flags", uint, (3 << 24) | 256),
                ("mode", uint, (5 << 24) | 259),
                ("wide", uint, (16 << 24) | 264),
                ("parent", list_ptr, 320),
                ("comm", comm, 384),
            ],
        );
        b.build()
    }

    fn parsed() -> Btf {
        Btf::parse(&world(Endian::Little)).expect("the synthetic blob parses")
    }

    #[test]
    fn top_level_members() {
        let btf = parsed();
        assert_eq!(btf.member_offset("task", &["pid"]).unwrap(), 0);
        assert_eq!(btf.member_size("task", &["pid"]).unwrap(), 4);
        assert_eq!(btf.member_offset("task", &["parent"]).unwrap(), 40);
        assert_eq!(
            btf.member_size("task", &["parent"]).unwrap(),
            8,
            "size of long"
        );
        assert_eq!(btf.member_offset("task", &["comm"]).unwrap(), 48);
        assert_eq!(btf.member_size("task", &["comm"]).unwrap(), 16);
        assert_eq!(btf.member_offset("list", &["prev"]).unwrap(), 8);
    }

    #[test]
    fn nested_member_through_typedef_and_modifiers() {
        let btf = parsed();
        assert_eq!(btf.member_offset("task", &["children"]).unwrap(), 16);
        assert_eq!(btf.member_size("task", &["children"]).unwrap(), 16);
        assert_eq!(
            btf.member_offset("task", &["children", "prev"]).unwrap(),
            24
        );
        assert_eq!(btf.member_size("task", &["children", "prev"]).unwrap(), 8);
        // A typedef name works as the outer name too.
        assert_eq!(btf.member_offset("list_t", &["prev"]).unwrap(), 8);
    }

    #[test]
    fn anonymous_union_and_struct_descent() {
        let btf = parsed();
        assert_eq!(btf.member_offset("task", &["state"]).unwrap(), 8);
        assert_eq!(btf.member_size("task", &["state"]).unwrap(), 8);
        assert_eq!(btf.member_offset("task", &["a"]).unwrap(), 8);
        assert_eq!(btf.member_offset("task", &["b"]).unwrap(), 12);
        assert_eq!(btf.member_size("task", &["b"]).unwrap(), 4);
    }

    #[test]
    fn bitfields() {
        let btf = parsed();
        // `flags` starts on a byte boundary, `mode` does not; `wide` is two whole bytes.
        assert_eq!(btf.member_offset("task", &["flags"]).unwrap(), 32);
        assert_eq!(btf.member_offset("task", &["wide"]).unwrap(), 33);
        assert_eq!(btf.member_size("task", &["wide"]).unwrap(), 2);
        let e = btf.member_offset("task", &["mode"]).unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::Bitfield {
                    bit_offset: 259,
                    bits: 5,
                    ..
                }
            ),
            "{e}"
        );
        let e = btf.member_size("task", &["flags"]).unwrap_err();
        assert!(matches!(e, BtfError::Bitfield { bits: 3, .. }), "{e}");
    }

    #[test]
    fn old_style_bitfield_in_the_int_type() {
        let mut b = Builder::new();
        let narrow = b.int_bits("unsigned int", 4, 2, 4);
        b.strukt("s", 8, &[("x", narrow, 32), ("y", narrow, 40)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let e = btf.member_offset("s", &["x"]).unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::Bitfield {
                    bit_offset: 34,
                    bits: 4,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn big_endian_blob_reads_the_same() {
        let btf = Btf::parse(&world(Endian::Big)).unwrap();
        assert_eq!(btf.endian, Endian::Big);
        assert_eq!(
            btf.member_offset("task", &["children", "prev"]).unwrap(),
            24
        );
        assert_eq!(btf.member_offset("task", &["b"]).unwrap(), 12);
        assert_eq!(btf.member_size("task", &["comm"]).unwrap(), 16);
    }

    #[test]
    fn first_struct_with_the_member_wins() {
        let mut b = Builder::new();
        let int = b.int("int", 4);
        b.strukt("dup", 4, &[("a", int, 0)]);
        b.strukt("dup", 8, &[("z", int, 0), ("b", int, 32)]);
        b.strukt("dup", 8, &[("b", int, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("dup", &["a"]).unwrap(), 0);
        assert_eq!(btf.member_offset("dup", &["b"]).unwrap(), 4);
    }

    #[test]
    fn lookup_errors_say_what_is_missing() {
        let btf = parsed();
        let e = btf.member_offset("nope", &["x"]).unwrap_err();
        assert!(matches!(e, BtfError::NoSuchType { .. }), "{e}");
        let e = btf.member_offset("task", &["nope"]).unwrap_err();
        assert!(matches!(e, BtfError::NoSuchMember { .. }), "{e}");
        assert!(
            e.to_string().contains("struct task has no member `nope`"),
            "{e}"
        );
        let e = btf
            .member_offset("task", &["children", "nope"])
            .unwrap_err();
        assert!(e.to_string().contains("task.children.nope"), "{e}");
        let e = btf.member_offset("task", &["parent", "prev"]).unwrap_err();
        assert!(
            matches!(
                e,
                BtfError::NotAStruct {
                    kind: "a pointer",
                    ..
                }
            ),
            "{e}"
        );
        let e = btf.member_offset("task", &[]).unwrap_err();
        assert!(matches!(e, BtfError::EmptyPath { .. }), "{e}");
        let e = btf.member_offset("task", &[""]).unwrap_err();
        assert!(matches!(e, BtfError::NoSuchMember { .. }), "{e}");
        // `int` is not indexed as a struct, so it is not found as one.
        let e = btf.member_offset("int", &["x"]).unwrap_err();
        assert!(matches!(e, BtfError::NoSuchType { .. }), "{e}");
    }

    #[test]
    fn missing_file_means_no_kernel_btf() {
        let e = Btf::from_path(Path::new("/nonexistent/btf/vmlinux")).unwrap_err();
        assert!(matches!(e, BtfError::NoKernelBtf { .. }), "{e}");
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{e}");
    }

    #[test]
    fn bad_headers_are_errors() {
        assert!(matches!(Btf::parse(&[]), Err(BtfError::Truncated { .. })));
        assert!(matches!(
            Btf::parse(b"\x7fELF....................."),
            Err(BtfError::BadMagic { .. })
        ));
        let good = world(Endian::Little);
        let mut v2 = good.clone();
        v2[2] = 2;
        assert!(matches!(
            Btf::parse(&v2),
            Err(BtfError::UnsupportedVersion { found: 2 })
        ));
        let mut short_header = good.clone();
        short_header[4] = 8;
        assert!(matches!(
            Btf::parse(&short_header),
            Err(BtfError::Malformed(_))
        ));
        let mut long_strings = good.clone();
        long_strings[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&long_strings),
            Err(BtfError::Truncated { .. })
        ));
        let mut unknown_kind = good;
        unknown_kind[HEADER_LEN + 7] = 31; // kind 31 in the first type's info
        assert!(matches!(
            Btf::parse(&unknown_kind),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn loops_are_errors_not_hangs() {
        let mut b = Builder::new();
        // A typedef cycle: 1 -> 2 -> 1.
        b.refer(kind::TYPEDEF, "t1", 2);
        b.refer(kind::TYPEDEF, "t2", 1);
        // A struct that contains itself anonymously, and one with a member of the loop.
        b.strukt("selfish", 8, &[("", 3, 0)]);
        b.strukt("looped", 8, &[("x", 1, 0)]);
        // Anonymous members sharing one inner struct, 8 wide and many deep: 8^depth paths.
        let mut inner = b.strukt("", 4, &[("leaf", 0, 0)]);
        for _ in 0..40 {
            let members = vec![("", inner, 0); 8];
            inner = b.strukt("", 4, &members);
        }
        b.refer(kind::TYPEDEF, "wide", inner);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(btf.member_offset("selfish", &["x"]).is_err());
        assert!(btf.member_offset("looped", &["x", "y"]).is_err());
        assert!(btf.member_size("looped", &["x"]).is_err());
        assert!(btf.member_offset("t1", &["x"]).is_err());
        let started = Instant::now();
        assert!(btf.member_offset("wide", &["missing"]).is_err());
        assert!(started.elapsed().as_secs() < 5);
    }

    /// Runs every lookup the agent makes, and then some, ignoring the results: for inputs
    /// that must merely not panic.
    fn poke(bytes: &[u8]) {
        if let Ok(btf) = Btf::parse(bytes) {
            for name in ["task", "list", "list_t", "int", ""] {
                for path in [
                    &["pid"][..],
                    &["children", "prev"],
                    &["b"],
                    &["mode"],
                    &["wide"],
                    &["comm"],
                    &["parent"],
                    &["parent", "x"],
                ] {
                    let _ = btf.member_offset(name, path);
                    let _ = btf.member_size(name, path);
                }
            }
        }
    }

    #[test]
    fn every_prefix_is_an_error_not_a_panic() {
        let good = world(Endian::Little);
        for len in 0..good.len() {
            let prefix = &good[..len];
            assert!(Btf::parse(prefix).is_err(), "prefix of {len} bytes parsed");
        }
        for blob in [world(Endian::Little), world(Endian::Big)] {
            for len in 0..blob.len() {
                poke(&blob[..len]);
            }
        }
    }

    #[test]
    fn byte_flips_do_not_panic() {
        for good in [world(Endian::Little), world(Endian::Big)] {
            for at in 0..good.len() {
                for mask in [0x01, 0x80, 0xff, 0x10, 0x7f] {
                    let mut bad = good.clone();
                    bad[at] ^= mask;
                    poke(&bad);
                }
            }
            // Random multi-byte damage, from a fixed xorshift seed.
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            for _ in 0..5_000 {
                let mut bad = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % bad.len() as u64) as usize;
                    let word = next().to_le_bytes();
                    let end = (at + 1 + (next() % 4) as usize).min(bad.len());
                    bad[at..end].copy_from_slice(&word[..end - at]);
                }
                poke(&bad);
            }
        }
    }

    /// The running kernel's BTF, or `None` (with a message) where this kernel has none.
    pub(crate) fn kernel_btf() -> Option<Btf> {
        if !Path::new(SYS_FS_PATH).exists() {
            println!("skipped: {SYS_FS_PATH} is absent (kernel without CONFIG_DEBUG_INFO_BTF)");
            return None;
        }
        let started = Instant::now();
        let btf = Btf::from_sys_fs().expect("the running kernel's BTF parses");
        println!("parsed {SYS_FS_PATH} in {:?}: {btf:?}", started.elapsed());
        Some(btf)
    }

    #[test]
    fn running_kernel_offsets() {
        let Some(btf) = kernel_btf() else { return };
        let queue = btf.member_offset("sock", &["sk_receive_queue"]).unwrap();
        let prev = btf.member_offset("sk_buff_head", &["prev"]).unwrap();
        let nested = btf
            .member_offset("sock", &["sk_receive_queue", "prev"])
            .unwrap();
        let exit_code = btf.member_offset("task_struct", &["exit_code"]).unwrap();
        let pid = btf.member_offset("task_struct", &["pid"]).unwrap();
        let signal = btf.member_offset("task_struct", &["signal"]).unwrap();
        let group_exit = btf
            .member_offset("signal_struct", &["group_exit_code"])
            .unwrap();
        println!(
            "sock.sk_receive_queue={queue} sk_buff_head.prev={prev} \
             task_struct.exit_code={exit_code} task_struct.pid={pid} \
             task_struct.signal={signal} signal_struct.group_exit_code={group_exit}"
        );
        assert_eq!(prev, 8);
        assert_eq!(nested, queue + prev);
        assert_eq!(btf.member_size("sk_buff_head", &["prev"]).unwrap(), 8);
        assert_eq!(btf.member_size("task_struct", &["exit_code"]).unwrap(), 4);
        assert_eq!(btf.member_size("task_struct", &["pid"]).unwrap(), 4);
        assert_eq!(btf.member_size("task_struct", &["signal"]).unwrap(), 8);
        assert_eq!(
            btf.member_size("signal_struct", &["group_exit_code"])
                .unwrap(),
            4
        );
        // `sk_buff_head.prev` above sits in an anonymous struct in an anonymous union; so do
        // these, one struct deeper.
        let family = btf
            .member_offset("sock", &["__sk_common", "skc_family"])
            .unwrap();
        assert_eq!(
            family,
            btf.member_offset("sock_common", &["skc_family"]).unwrap()
        );
        assert_eq!(btf.member_offset("sock_common", &["skc_daddr"]).unwrap(), 0);
        assert_eq!(
            btf.member_offset("sock_common", &["skc_rcv_saddr"])
                .unwrap(),
            4
        );
        assert_eq!(
            btf.member_size("sock_common", &["skc_rcv_saddr"]).unwrap(),
            4
        );
        assert!(matches!(
            btf.member_offset("task_struct", &["signal", "group_exit_code"]),
            Err(BtfError::NotAStruct { .. })
        ));
    }

    /// Every named member of every named struct and union in the running kernel can be
    /// looked up without a panic, and nearly all give an offset.
    #[test]
    fn running_kernel_every_member() {
        let Some(btf) = kernel_btf() else { return };
        let (mut ok, mut bitfields, mut other) = (0usize, 0usize, Vec::new());
        for id in 1..=btf.type_starts.len() as u32 {
            let t = btf.ty(id).unwrap();
            let Ok(name) = btf.name(t.name_off) else {
                continue;
            };
            if !t.is_composite() || name.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(name).into_owned();
            for index in 0..t.vlen {
                let (name_off, _, _) = btf.member(&t, index).unwrap();
                let member = String::from_utf8_lossy(btf.name(name_off).unwrap()).into_owned();
                if member.is_empty() {
                    continue;
                }
                match btf.member_offset(&name, &[&member]) {
                    Ok(_) => ok += 1,
                    Err(BtfError::Bitfield { .. }) => bitfields += 1,
                    Err(e) => other.push(e.to_string()),
                }
                let _ = btf.member_size(&name, &[&member]);
            }
        }
        println!(
            "{ok} members found, {bitfields} unaligned bitfields, {} other",
            other.len()
        );
        assert!(ok > 10_000, "only {ok} members found");
        assert!(other.is_empty(), "{:?}", &other[..other.len().min(5)]);
    }
}
