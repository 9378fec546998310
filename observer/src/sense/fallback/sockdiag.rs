//! Pending connections on a unix listening socket, read from `NETLINK_SOCK_DIAG` (unix_diag).
//!
//! The fallback for the eBPF accept-queue sensor when eBPF is unavailable (not root, no BTF,
//! `--no-ebpf`): [`sample_listener`] shows how many connections wait in containerd's accept
//! queue, and [`PendingTracker`] turns successive samples into the age of the oldest one.
//!
//! The wire format is `netlink-packet-sock-diag`'s (`UnixRequest`, `Nla::ReceiveQueueLength`,
//! `Nla::PendingConnections`), the socket `netlink-sys`'s; this module asks, bounds what it
//! reads, and keeps the pending-connection bookkeeping. Unix socket diagnostics need no
//! privilege: any user sees every unix socket of its own network namespace (sockets of other
//! network namespaces are never visible).

use std::{
    collections::HashMap,
    io,
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::Path,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::SOCK_DIAG_BY_FAMILY,
    unix::{
        ShowFlags, StateFlags, UnixRequest, UnixResponse,
        nlas::{Nla, UnixDiagName},
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
/// `TCP_LISTEN`, the state unix sockets share with TCP for listening.
const TCP_LISTEN: u8 = 10;

/// How long one read of a dump may wait before [`sample_listener`] gives up.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest single datagram accepted from the kernel (its dump skbs are at most 32 KiB).
const MAX_DATAGRAM: usize = 1 << 20;
/// Largest whole dump accepted: a runaway reply ends with an error, not with memory exhaustion.
const MAX_DUMP_BYTES: usize = 256 << 20;

/// One listening unix socket bound to the sampled path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSample {
    /// The listening socket's inode.
    pub inode: u64,
    /// The bound name as the kernel reports it; an abstract name starts with `@`.
    pub path: String,
    /// Connections waiting in the accept queue (`UNIX_DIAG_RQLEN` rqueue for a listener).
    pub pending: u32,
    /// The listen(2) backlog after the kernel's clamp to `net.core.somaxconn`
    /// (`UNIX_DIAG_RQLEN` wqueue for a listener). Connects block, or fail with `EAGAIN` when
    /// non-blocking, once `pending` exceeds it.
    pub backlog: u32,
    /// The client-side socket inode of each waiting connection, oldest first
    /// (`UNIX_DIAG_ICONS`). `0` marks a connection whose client has already closed its end:
    /// it still waits in the queue until accepted. Empty, while `pending` is not, when the
    /// kernel could not report them (see [`sample_listener`]).
    pub pending_inodes: Vec<u64>,
}

/// Why [`sample_listener`] could not sample.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error(
        "cannot open a NETLINK_SOCK_DIAG socket: {0}; the kernel needs netlink sock_diag support \
         (a sandbox or seccomp filter may block it): run the observer with eBPF instead"
    )]
    Socket(#[source] io::Error),
    #[error("cannot send the unix socket dump request to the kernel: {0}")]
    Send(#[source] io::Error),
    #[error("cannot read the unix socket dump from the kernel: {0}")]
    Recv(#[source] io::Error),
    #[error(
        "the kernel did not answer the unix socket dump within {}s; retry on the next sample",
        RECV_TIMEOUT.as_secs()
    )]
    Timeout,
    #[error("the kernel refused the unix socket dump: {}; {}", errno_text(.errno), kernel_hint(.errno))]
    Kernel { errno: i32 },
    #[error(
        "malformed sock_diag reply at byte {offset}: {reason}; the reply does not match this \
         parser, please report it with the kernel version (uname -r)"
    )]
    Malformed { offset: usize, reason: String },
    #[error(
        "the kernel's unix socket dump is larger than accepted here ({} MiB in one datagram, \
         {} MiB in all); this is not a normal reply, please report it with the kernel version",
        MAX_DATAGRAM >> 20,
        MAX_DUMP_BYTES >> 20
    )]
    TooLarge,
}

fn errno_text(errno: &i32) -> String {
    format!("{} (errno {errno})", io::Error::from_raw_os_error(*errno))
}

fn kernel_hint(errno: &i32) -> &'static str {
    match *errno {
        libc::ENOENT => {
            "this kernel has no unix socket diagnostics: load them with `modprobe unix_diag` \
             (CONFIG_UNIX_DIAG) or run the observer with eBPF"
        }
        libc::EPERM | libc::EACCES => {
            "a security policy forbids sock_diag here: allow it or run the observer with eBPF"
        }
        _ => "retry on the next sample; if it persists, run the observer with eBPF",
    }
}

/// Queries all listening `AF_UNIX` sockets (`udiag_states = 1 << TCP_LISTEN`, showing name,
/// queue lengths and pending-connection inodes) and returns the ones whose bound name equals
/// `path`.
///
/// There can be several: one per network namespace in principle, though the kernel only shows
/// the caller's; and within one namespace, a listener whose file was unlinked and bound anew
/// (a restarted daemon whose old instance still holds its socket). All are returned.
///
/// The name the kernel reports is what was given to bind(2). It matches `path` as given or
/// `path` with its symlinks resolved, so `/var/run/containerd/containerd.sock` (through the
/// `/var/run` -> `/run` symlink) finds the listener bound at `/run/containerd/containerd.sock`.
/// An abstract name is matched and rendered with a leading `@` for its leading NUL: pass
/// `Path::new("@name")` to sample one.
///
/// Two dumps are made on one netlink socket: names and queue lengths first, which always fit,
/// then the same with the pending inodes. The kernel silently ends a dump at a socket whose
/// reply outgrows its 32 KiB buffer, which `UNIX_DIAG_ICONS` does past about 8000 pending
/// connections (possible only with `net.core.somaxconn` raised that high); such a listener is
/// still returned, with its counts and an empty `pending_inodes`.
///
/// This blocks, each read for at most 5 s: call it from `spawn_blocking` in async code.
pub fn sample_listener(path: &Path) -> Result<Vec<ListenerSample>, SockDiagError> {
    // An abstract name has no file to resolve.
    let canonical = std::fs::canonicalize(path).ok();
    let given = path.as_os_str().as_bytes();
    let mut names = vec![given];
    if let Some(c) = canonical.as_deref().filter(|c| *c != path) {
        names.push(c.as_os_str().as_bytes());
    }
    let path = names.as_slice();
    let socket = open_socket()?;
    // A fresh socket receives nothing but our replies, so any sequence numbers serve; distinct
    // ones still guard against stray messages.
    let seq = std::process::id() ^ 0x5eed_d1a6;
    let counts = dump_unix_listeners(&socket, seq, ShowFlags::NAME | ShowFlags::RQLEN)?;
    let mut samples = select_listeners(&counts, path);
    if samples.is_empty() {
        return Ok(samples);
    }
    let show = ShowFlags::NAME | ShowFlags::RQLEN | ShowFlags::ICONS;
    let detailed = dump_unix_listeners(&socket, seq.wrapping_add(1), show)?;
    add_pending_inodes(&mut samples, &select_listeners(&detailed, path));
    Ok(samples)
}

/// Completes `samples` (from the dump without inodes) with the counts and inodes of the same
/// listeners in `detailed`, which may lack some of them.
fn add_pending_inodes(samples: &mut [ListenerSample], detailed: &[ListenerSample]) {
    for sample in samples {
        if let Some(found) = detailed.iter().find(|d| d.inode == sample.inode) {
            sample.pending = found.pending;
            sample.backlog = found.backlog;
            sample.pending_inodes.clone_from(&found.pending_inodes);
        }
    }
}

/// Tracks how long each pending connection has waited, from successive samples: a connection's
/// age counts from the first sample that showed its inode; ages are therefore at most one
/// sampling interval short.
///
/// Feed it `pending_inodes` in queue order (oldest first, as [`ListenerSample`] has them). The
/// accept queue is first-in first-out, so a connection whose client closed (inode `0`) keeps
/// the age it had under its inode. Several such closed connections cannot be told apart: the
/// tracker then assumes the fewest accepts that fit the samples, so their ages err long, never
/// short. Use one tracker per listener inode: a new listener starts a new queue.
#[derive(Debug, Clone, Default)]
pub struct PendingTracker {
    /// The last sample's queue, oldest first, each with the time it was first seen.
    queue: Vec<(u64, Instant)>,
    /// Connections taken off the head of the queue between the last two samples.
    accepted: u32,
}

impl PendingTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed a sample taken at `now`; returns (pending count, age of the oldest pending
    /// connection or None).
    pub fn update(&mut self, now: Instant, pending_inodes: &[u64]) -> (u32, Option<Duration>) {
        let accepted = fifo_accepted(&self.queue, pending_inodes);
        self.accepted = u32::try_from(accepted).unwrap_or(u32::MAX);
        let kept = &self.queue[accepted..];
        let mut earlier: Option<HashMap<u64, Instant>> = None;
        let mut next = Vec::with_capacity(pending_inodes.len());
        for (i, &inode) in pending_inodes.iter().enumerate() {
            let seen = match kept.get(i) {
                Some(&(_, seen)) => seen,
                // Not where a FIFO queue would have it; still, an inode already seen keeps its
                // age (this only matters for input that is not in queue order).
                None if inode != 0 => *earlier
                    .get_or_insert_with(|| self.queue.iter().rev().copied().collect())
                    .get(&inode)
                    .unwrap_or(&now),
                None => now,
            };
            next.push((inode, seen));
        }
        self.queue = next;
        let count = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        let oldest = self
            .queue
            .iter()
            .map(|&(_, seen)| seen)
            .min()
            .map(|seen| now.saturating_duration_since(seen));
        (count, oldest)
    }
}

impl PendingTracker {
    /// Connections accepted between the last two samples (taken off the queue's head).
    pub fn accepted(&self) -> u32 {
        self.accepted
    }
}

/// The fewest connections accepted from the head of `previous` that leave the rest a prefix of
/// `current`: each kept entry still shows the same inode, or `0` once its client has closed.
/// Accepting all of them always fits, so this never fails.
fn fifo_accepted(previous: &[(u64, Instant)], current: &[u64]) -> usize {
    (0..previous.len())
        .find(|&accepted| {
            let rest = &previous[accepted..];
            rest.len() <= current.len()
                && rest
                    .iter()
                    .zip(current)
                    .all(|(&(was, _), &now)| was == now || now == 0)
        })
        .unwrap_or(previous.len())
}

/// One unix socket from a `SOCK_DIAG_BY_FAMILY` reply, with the attributes this module asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiagEntry {
    state: u8,
    inode: u32,
    /// `UNIX_DIAG_NAME` as sent: a path with its trailing NUL, or an abstract name after a NUL.
    name: Option<Vec<u8>>,
    /// `UNIX_DIAG_RQLEN`: (rqueue, wqueue).
    rqlen: Option<(u32, u32)>,
    /// `UNIX_DIAG_ICONS`.
    icons: Option<Vec<u32>>,
}

/// Keeps the listening unix sockets whose name is one of `names` (abstract names as `@name`).
fn select_listeners(entries: &[DiagEntry], names: &[&[u8]]) -> Vec<ListenerSample> {
    entries
        .iter()
        .filter(|e| e.state == TCP_LISTEN)
        .filter_map(|e| {
            let name = render_name(e.name.as_deref()?)?;
            if !names.contains(&name.as_slice()) {
                return None;
            }
            let icons: Vec<u64> = e.icons.iter().flatten().map(|&i| u64::from(i)).collect();
            let (pending, backlog) = e
                .rqlen
                .unwrap_or((u32::try_from(icons.len()).unwrap_or(u32::MAX), 0));
            Some(ListenerSample {
                inode: u64::from(e.inode),
                path: String::from_utf8_lossy(&name).into_owned(),
                pending,
                backlog,
                pending_inodes: icons,
            })
        })
        .collect()
}

/// The name as a path would spell it: a filesystem path without its trailing NUL, or `@` and
/// the abstract name. `None` for an unnamed socket.
fn render_name(raw: &[u8]) -> Option<Vec<u8>> {
    match raw.split_first() {
        None => None,
        Some((0, abstract_name)) => {
            let mut name = Vec::with_capacity(raw.len());
            name.push(b'@');
            name.extend_from_slice(abstract_name);
            Some(name)
        }
        // A filesystem path ends at its first NUL (the kernel sends one trailing NUL).
        Some(_) => Some(raw.split(|&b| b == 0).next().unwrap_or(raw).to_vec()),
    }
}

/// Runs one `SOCK_DIAG_BY_FAMILY` dump of listening unix sockets on `socket`, showing `show`,
/// and collects every reply.
fn dump_unix_listeners(
    socket: &Socket,
    seq: u32,
    show: ShowFlags,
) -> Result<Vec<DiagEntry>, SockDiagError> {
    send_to_kernel(socket, &build_request(seq, StateFlags::LISTEN, show))?;
    let mut entries = Vec::new();
    let mut buf = Vec::with_capacity(32 * 1024);
    let mut total = 0usize;
    loop {
        let Some(len) = recv_datagram(socket, &mut buf)? else {
            continue;
        };
        total = total.saturating_add(len);
        if total > MAX_DUMP_BYTES {
            return Err(SockDiagError::TooLarge);
        }
        let datagram = buf.get(..len).ok_or_else(|| SockDiagError::Malformed {
            offset: 0,
            reason: "datagram longer than the receive buffer".into(),
        })?;
        if parse_datagram(datagram, seq, &mut entries)? {
            return Ok(entries);
        }
    }
}

fn open_socket() -> Result<Socket, SockDiagError> {
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(RECV_TIMEOUT))
        .map_err(SockDiagError::Socket)?;
    Ok(socket)
}

fn send_to_kernel(socket: &Socket, request: &[u8]) -> Result<(), SockDiagError> {
    let kernel = SocketAddr::new(0, 0);
    loop {
        match socket.send_to(request, &kernel, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SockDiagError::Send(e)),
            Ok(sent) if sent != request.len() => {
                return Err(SockDiagError::Send(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the request was sent only in part",
                )));
            }
            Ok(_) => return Ok(()),
        }
    }
}

/// Receives one datagram into `buf`, growing it to fit. `Ok(None)` for a datagram that did not
/// come from the kernel, which is dropped.
fn recv_datagram(socket: &Socket, buf: &mut Vec<u8>) -> Result<Option<usize>, SockDiagError> {
    // Peek first: MSG_TRUNC makes the kernel return the datagram's full length.
    buf.clear();
    let needed = recv_once(socket, buf, libc::MSG_PEEK | libc::MSG_TRUNC)?.0;
    if needed > MAX_DATAGRAM {
        return Err(SockDiagError::TooLarge);
    }
    buf.clear();
    buf.reserve(needed);
    let (len, from) = recv_once(socket, buf, 0)?;
    if len > buf.len() {
        return Err(SockDiagError::Malformed {
            offset: 0,
            reason: "datagram longer than the receive buffer".into(),
        });
    }
    // Only the kernel (port id 0) answers sock_diag requests.
    Ok((from == 0).then_some(len))
}

/// One recvfrom(2) into the spare capacity of `buf`: the length it returned and the sender's
/// netlink port id.
fn recv_once(
    socket: &Socket,
    buf: &mut Vec<u8>,
    flags: libc::c_int,
) -> Result<(usize, u32), SockDiagError> {
    loop {
        return match socket.recv_from(buf, flags) {
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Err(SockDiagError::Timeout),
                _ => Err(SockDiagError::Recv(e)),
            },
            Ok((0, _)) => Err(SockDiagError::Recv(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the kernel sent an empty datagram",
            ))),
            Ok((got, from)) => Ok((got, from.port_number())),
        };
    }
}

/// A dump request for the unix sockets in `states`, showing `show`.
fn build_request(seq: u32, states: StateFlags, show: ShowFlags) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: states,
            // A dump matches every inode, and ignores the cookie ("no cookie").
            inode: 0,
            show_flags: show,
            cookie: [0xff; 8],
        })
        .into(),
    );
    message.finalize();
    let mut request = vec![0; message.buffer_len()];
    message.serialize(&mut request);
    request
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn malformed(offset: usize, reason: impl std::fmt::Display) -> SockDiagError {
    SockDiagError::Malformed {
        offset,
        reason: reason.to_string(),
    }
}

/// Parses one reply datagram as [`sample_listener`] does, for the fuzz targets. The sequence
/// number is read from the first message, so that any input reaches the message parsers.
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_reply(datagram: &[u8]) {
    let seq = datagram
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    let mut entries = Vec::new();
    let _ = parse_datagram(datagram, seq, &mut entries);
    let _ = select_listeners(&entries, &[b"/run/containerd/containerd.sock"]);
}

/// Parses one netlink datagram of a sock_diag dump answering request `seq`, appending each
/// unix socket to `out`. Returns whether the dump is complete (`NLMSG_DONE`); messages for
/// another sequence number, and of types a dump does not send, are skipped. Pure: everything
/// it knows comes from `buf`, which may hold anything (the fuzzing entry point).
pub fn parse_datagram(
    buf: &[u8],
    seq: u32,
    out: &mut Vec<DiagEntry>,
) -> Result<bool, SockDiagError> {
    let mut at = 0usize;
    while at < buf.len() {
        let rest = &buf[at..];
        let header = NetlinkBuffer::new_checked(rest).map_err(|e| malformed(at, e))?;
        let len = usize::try_from(header.length()).unwrap_or(usize::MAX);
        let kind = header.message_type();
        let ours = header.sequence_number() == seq
            && matches!(
                kind,
                NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE | NLMSG_OVERRUN | SOCK_DIAG_BY_FAMILY
            );
        if ours {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .map_err(|e: DecodeError| malformed(at, e))?;
            match message.payload {
                NetlinkPayload::Noop => {}
                // Since Linux 4.x the DONE payload carries the dump's final status.
                NetlinkPayload::Done(done) if done.code < 0 => return Err(kernel_error(done.code)),
                NetlinkPayload::Done(_) => return Ok(true),
                // No code: an acknowledgement, and nothing more follows.
                NetlinkPayload::Error(error) => match error.code {
                    None => return Ok(true),
                    Some(code) => return Err(kernel_error(code.get())),
                },
                NetlinkPayload::Overrun(_) => {
                    return Err(malformed(at, "the kernel reported an overrun"));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(response)) => {
                    out.push(DiagEntry::from(*response));
                }
                // Sockets of other families: not asked for.
                NetlinkPayload::InnerMessage(_) => {}
                _ => {}
            }
        }
        // The last message of a datagram may lack its padding.
        at = at.saturating_add(align4(len)).min(buf.len());
    }
    Ok(false)
}

fn kernel_error(status: i32) -> SockDiagError {
    let errno = status.checked_neg().unwrap_or(i32::MAX);
    SockDiagError::Kernel { errno }
}

impl From<UnixResponse> for DiagEntry {
    fn from(response: UnixResponse) -> Self {
        let mut entry = DiagEntry {
            state: response.header.state,
            inode: response.header.inode,
            ..DiagEntry::default()
        };
        for nla in response.nlas {
            match nla {
                // Kept as the kernel sends it, so that `render_name` reads both kinds alike.
                Nla::Name(UnixDiagName::Pathname(path)) => {
                    let mut name = path.into_vec();
                    name.push(0);
                    entry.name = Some(name);
                }
                Nla::Name(UnixDiagName::Abstract(name)) => {
                    let mut raw = Vec::with_capacity(name.len() + 1);
                    raw.push(0);
                    raw.extend_from_slice(&name);
                    entry.name = Some(raw);
                }
                Nla::ReceiveQueueLength(rqueue, wqueue) => entry.rqlen = Some((rqueue, wqueue)),
                Nla::PendingConnections(icons) => entry.icons = Some(icons),
                // VFS, PEER, MEMINFO, SHUTDOWN, UID and anything newer: not asked for.
                _ => {}
            }
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::Write,
        os::{
            fd::OwnedFd,
            linux::net::SocketAddrExt,
            unix::net::{SocketAddr, UnixListener, UnixStream},
        },
        path::PathBuf,
    };

    const SEQ: u32 = 77;
    const NLMSG_HDRLEN: usize = 16;
    const UNIX_DIAG_NAME: u16 = 0;
    const UNIX_DIAG_ICONS: u16 = 3;
    const UNIX_DIAG_RQLEN: u16 = 4;

    fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
    }

    fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
    }

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn rtattr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn diag_msg(state: u8, inode: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![libc::AF_UNIX as u8, libc::SOCK_STREAM as u8, state, 0];
        m.extend_from_slice(&inode.to_ne_bytes());
        m.extend_from_slice(&[0xab; 8]);
        for a in attrs {
            m.extend_from_slice(a);
        }
        m
    }

    fn rqlen(rqueue: u32, wqueue: u32) -> Vec<u8> {
        let mut p = rqueue.to_ne_bytes().to_vec();
        p.extend_from_slice(&wqueue.to_ne_bytes());
        rtattr(UNIX_DIAG_RQLEN, &p)
    }

    fn icons(inodes: &[u32]) -> Vec<u8> {
        let p: Vec<u8> = inodes.iter().flat_map(|i| i.to_ne_bytes()).collect();
        rtattr(UNIX_DIAG_ICONS, &p)
    }

    fn listener(inode: u32, name: &[u8], pending: &[u32]) -> Vec<u8> {
        nlmsg(
            SOCK_DIAG_BY_FAMILY,
            SEQ,
            &diag_msg(
                TCP_LISTEN,
                inode,
                &[
                    rtattr(UNIX_DIAG_NAME, name),
                    rqlen(pending.len() as u32, 4096),
                    icons(pending),
                ],
            ),
        )
    }

    fn done() -> Vec<u8> {
        nlmsg(NLMSG_DONE, SEQ, &0i32.to_ne_bytes())
    }

    fn parse_all(datagrams: &[Vec<u8>]) -> Result<(Vec<DiagEntry>, bool), SockDiagError> {
        let mut out = Vec::new();
        let mut finished = false;
        for d in datagrams {
            finished = parse_datagram(d, SEQ, &mut out)?;
        }
        Ok((out, finished))
    }

    #[test]
    fn request_layout() {
        let req = build_request(9, StateFlags::LISTEN, ShowFlags::from_bits_truncate(0x19));
        assert_eq!(read_u32(&req, 0), Some(40));
        assert_eq!(read_u16(&req, 4), Some(20));
        assert_eq!(read_u16(&req, 6), Some(0x301));
        assert_eq!(read_u32(&req, 8), Some(9));
        assert_eq!(req[16], libc::AF_UNIX as u8);
        assert_eq!(read_u32(&req, 20), Some(1 << 10));
        assert_eq!(read_u32(&req, 24), Some(0));
        assert_eq!(read_u32(&req, 28), Some(0x19));
    }

    #[test]
    fn parses_a_multipart_dump() {
        let mut first = listener(10, b"/run/a.sock\0", &[100, 101]);
        first.extend(listener(11, b"\0abstract", &[]));
        let second = [listener(12, b"/run/a.sock\0", &[7]), done()].concat();

        let mut out = Vec::new();
        assert!(!parse_datagram(&first, SEQ, &mut out).unwrap());
        assert!(parse_datagram(&second, SEQ, &mut out).unwrap());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].inode, 10);
        assert_eq!(out[0].rqlen, Some((2, 4096)));
        assert_eq!(out[0].icons.as_deref(), Some(&[100, 101][..]));
        assert_eq!(out[1].name.as_deref(), Some(&b"\0abstract"[..]));

        let found = select_listeners(&out, &[b"/run/a.sock"]);
        assert_eq!(
            found.len(),
            2,
            "both listeners bound to the path are returned"
        );
        assert_eq!(found[0].path, "/run/a.sock");
        assert_eq!(found[0].pending, 2);
        assert_eq!(found[0].backlog, 4096);
        assert_eq!(found[0].pending_inodes, vec![100, 101]);
        assert_eq!(found[1].inode, 12);

        let abstract_found = select_listeners(&out, &[b"@abstract"]);
        assert_eq!(abstract_found.len(), 1);
        assert_eq!(abstract_found[0].path, "@abstract");
        assert!(select_listeners(&out, &[b"/run/other.sock"]).is_empty());
        assert!(select_listeners(&out, &[b""]).is_empty());
    }

    #[test]
    fn skips_non_listeners_unnamed_sockets_and_foreign_messages() {
        let datagram = [
            nlmsg(
                SOCK_DIAG_BY_FAMILY,
                SEQ,
                &diag_msg(1, 5, &[rtattr(UNIX_DIAG_NAME, b"/x\0")]),
            ),
            nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &diag_msg(TCP_LISTEN, 6, &[])),
            // Another request's answer, then a no-op, then an unknown type: all ignored.
            nlmsg(NLMSG_ERROR, SEQ + 1, &(-libc::EIO).to_ne_bytes()),
            nlmsg(NLMSG_NOOP, SEQ, &[]),
            nlmsg(999, SEQ, &[1, 2, 3]),
            listener(7, b"/x\0", &[1]),
            done(),
        ]
        .concat();
        let (entries, finished) = parse_all(&[datagram]).unwrap();
        assert!(finished);
        assert_eq!(entries.len(), 3);
        let found = select_listeners(&entries, &[b"/x"]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].inode, 7);
    }

    #[test]
    fn tolerates_unknown_attributes_flags_and_missing_padding() {
        let msg = diag_msg(
            TCP_LISTEN,
            3,
            &[
                rtattr(7, &1000u32.to_ne_bytes()),        // UNIX_DIAG_UID
                rtattr(UNIX_DIAG_NAME | 0x8000, b"/p\0"), // NLA_F_NESTED set
                rtattr(UNIX_DIAG_RQLEN, &[1, 0, 0, 0, 9, 0, 0, 0]),
            ],
        );
        let mut datagram = nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &msg);
        // A final attribute of 7 bytes, its padding cut off with the datagram.
        let name = rtattr(UNIX_DIAG_NAME, b"/q\0");
        let mut short = msg.clone();
        short.extend_from_slice(&name[..7]);
        let mut last = nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &short);
        last.truncate(NLMSG_HDRLEN + short.len());
        datagram.extend_from_slice(&last);
        let (entries, finished) = parse_all(&[datagram]).unwrap();
        assert!(!finished);
        assert_eq!(entries[0].name.as_deref(), Some(&b"/p\0"[..]));
        assert_eq!(
            entries[0].rqlen.map(|r| r.0),
            Some(u32::from_ne_bytes([1, 0, 0, 0]))
        );
        assert_eq!(entries[1].name.as_deref(), Some(&b"/q\0"[..]));
    }

    #[test]
    fn missing_rqlen_falls_back_to_the_icons() {
        let msg = diag_msg(
            TCP_LISTEN,
            3,
            &[rtattr(UNIX_DIAG_NAME, b"/p\0"), icons(&[5, 6])],
        );
        let (entries, _) = parse_all(&[nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &msg)]).unwrap();
        let found = select_listeners(&entries, &[b"/p"]);
        assert_eq!((found[0].pending, found[0].backlog), (2, 0));
    }

    #[test]
    fn kernel_errors_say_what_to_do() {
        let reply = nlmsg(NLMSG_ERROR, SEQ, &(-libc::ENOENT).to_ne_bytes());
        let err = parse_all(&[reply]).unwrap_err();
        assert!(matches!(err, SockDiagError::Kernel { errno } if errno == libc::ENOENT));
        assert!(err.to_string().contains("modprobe unix_diag"), "{err}");

        let reply = nlmsg(NLMSG_DONE, SEQ, &(-libc::EPERM).to_ne_bytes());
        let err = parse_all(&[reply]).unwrap_err();
        assert!(matches!(err, SockDiagError::Kernel { errno } if errno == libc::EPERM));

        let reply = nlmsg(NLMSG_ERROR, SEQ, &i32::MIN.to_ne_bytes());
        assert!(matches!(
            parse_all(&[reply]),
            Err(SockDiagError::Kernel { .. })
        ));

        // An ACK, or a DONE without a status (old kernels), ends the dump.
        assert!(
            parse_all(&[nlmsg(NLMSG_ERROR, SEQ, &0i32.to_ne_bytes())])
                .unwrap()
                .1
        );
        assert!(parse_all(&[nlmsg(NLMSG_DONE, SEQ, &[])]).unwrap().1);
        assert!(matches!(
            parse_all(&[nlmsg(NLMSG_OVERRUN, SEQ, &[])]),
            Err(SockDiagError::Malformed { .. })
        ));
    }

    fn assert_malformed(datagram: &[u8], why: &str) {
        let mut out = Vec::new();
        match parse_datagram(datagram, SEQ, &mut out) {
            Err(SockDiagError::Malformed { .. }) => {}
            other => panic!("{why}: expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_replies() {
        let good = listener(1, b"/a\0", &[1, 2]);

        assert_malformed(&good[..10], "header cut");
        let mut long = good.clone();
        long[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_malformed(&long, "nlmsg_len past the datagram");
        let mut short = good.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_malformed(&short, "nlmsg_len under the header");
        assert_malformed(&nlmsg(NLMSG_ERROR, SEQ, &[1, 2]), "short NLMSG_ERROR");
        assert_malformed(
            &nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &[1, 1, 10, 0, 5]),
            "short unix_diag_msg",
        );

        let mut bad_attr = diag_msg(TCP_LISTEN, 1, &[]);
        bad_attr.extend_from_slice(&[2, 0, 0, 0]); // rta_len 2
        assert_malformed(&nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &bad_attr), "rta_len < 4");
        let mut past = diag_msg(TCP_LISTEN, 1, &[]);
        past.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4]);
        assert_malformed(&nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &past), "rta_len too long");
        let mut stub = diag_msg(TCP_LISTEN, 1, &[]);
        stub.extend_from_slice(&[8, 0]);
        assert_malformed(&nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &stub), "attr header cut");
        let short_rqlen = diag_msg(TCP_LISTEN, 1, &[rtattr(UNIX_DIAG_RQLEN, &[1, 2, 3, 4])]);
        assert_malformed(
            &nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &short_rqlen),
            "short RQLEN",
        );
        let odd_icons = diag_msg(TCP_LISTEN, 1, &[rtattr(UNIX_DIAG_ICONS, &[1, 2, 3, 4, 5])]);
        assert_malformed(&nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &odd_icons), "ICONS % 4");
        let long_rqlen = diag_msg(TCP_LISTEN, 1, &[rtattr(UNIX_DIAG_RQLEN, &[1; 12])]);
        assert_malformed(&nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &long_rqlen), "long RQLEN");
        let unterminated = diag_msg(TCP_LISTEN, 1, &[rtattr(UNIX_DIAG_NAME, b"/p")]);
        assert_malformed(
            &nlmsg(SOCK_DIAG_BY_FAMILY, SEQ, &unterminated),
            "a path without its NUL",
        );
    }

    /// A tiny xorshift generator, so the hostile-input tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn survives_truncated_and_hostile_replies() {
        let good = [
            listener(1, b"/a\0", &[1, 2, 3]),
            listener(2, b"\0b", &[]),
            done(),
        ]
        .concat();
        let mut out = Vec::new();
        // Every truncation.
        for cut in 0..good.len() {
            let _ = parse_datagram(&good[..cut], SEQ, &mut out);
        }
        // Every byte set to each of a few telling values.
        for at in 0..good.len() {
            for value in [0u8, 1, 3, 4, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = value;
                let _ = parse_datagram(&bad, SEQ, &mut out);
            }
        }
        // Random mutations and random bytes.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut bad = good.clone();
            for _ in 0..(rng.next() % 6 + 1) {
                let at = (rng.next() as usize) % bad.len();
                bad[at] = rng.next() as u8;
            }
            bad.truncate((rng.next() as usize) % (bad.len() + 1));
            out.clear();
            if parse_datagram(&bad, SEQ, &mut out).is_ok() {
                let _ = select_listeners(&out, &[b"/a"]);
            }
            let noise: Vec<u8> = (0..rng.next() % 128).map(|_| rng.next() as u8).collect();
            let _ = parse_datagram(&noise, SEQ, &mut out);
        }
    }

    #[test]
    fn inodes_from_the_second_dump_complete_the_first() {
        let counts = [
            listener(1, b"/a\0", &[0; 9000]),
            listener(2, b"/a\0", &[0; 2]),
            done(),
        ]
        .concat();
        // The dump with inodes ended before listener 1, whose reply did not fit.
        let detailed = [listener(2, b"/a\0", &[50, 51, 52]), done()].concat();
        let (counts, _) = parse_all(&[counts]).unwrap();
        let (detailed, _) = parse_all(&[detailed]).unwrap();
        let mut samples = select_listeners(&counts, &[b"/a"]);
        for s in &mut samples {
            s.pending_inodes.clear(); // as the dump without UDIAG_SHOW_ICONS has them
        }
        add_pending_inodes(&mut samples, &select_listeners(&detailed, &[b"/a"]));
        assert_eq!(samples.len(), 2);
        assert_eq!(
            (samples[0].pending, samples[0].pending_inodes.len()),
            (9000, 0)
        );
        assert_eq!(samples[1].pending, 3, "counts taken with the inodes");
        assert_eq!(samples[1].pending_inodes, vec![50, 51, 52]);
    }

    #[test]
    fn renders_names() {
        assert_eq!(
            render_name(b"/run/x.sock\0").as_deref(),
            Some(&b"/run/x.sock"[..])
        );
        assert_eq!(
            render_name(b"/run/x.sock").as_deref(),
            Some(&b"/run/x.sock"[..])
        );
        assert_eq!(render_name(b"\0name\0x").as_deref(), Some(&b"@name\0x"[..]));
        assert_eq!(render_name(b"\0").as_deref(), Some(&b"@"[..]));
        assert_eq!(render_name(b""), None);
    }

    #[test]
    fn tracker_ages_connections_on_a_virtual_clock() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut tracker = PendingTracker::new();
        assert_eq!(tracker.update(t0, &[]), (0, None));
        assert_eq!(tracker.update(t0 + s(1), &[10, 11]), (2, Some(s(0))));
        assert_eq!(tracker.update(t0 + s(2), &[10, 11, 12]), (3, Some(s(1))));
        // 10 accepted: 11 is now the oldest, first seen at 1s.
        assert_eq!(tracker.update(t0 + s(3), &[11, 12]), (2, Some(s(2))));
        assert_eq!(tracker.accepted(), 1);
        // 11's client gave up: its connection still waits, with its age.
        assert_eq!(tracker.update(t0 + s(5), &[0, 12, 13]), (3, Some(s(4))));
        assert_eq!(tracker.update(t0 + s(6), &[0, 0, 13]), (3, Some(s(5))));
        // Two accepted: only 13 (first seen at 5s) remains.
        assert_eq!(tracker.update(t0 + s(7), &[13]), (1, Some(s(2))));
        // All accepted, and new ones came between samples.
        assert_eq!(tracker.update(t0 + s(8), &[20, 21]), (2, Some(s(0))));
        assert_eq!(tracker.update(t0 + s(9), &[]), (0, None));
        assert_eq!(tracker.update(t0 + s(10), &[20]), (1, Some(s(0))));
    }

    #[test]
    fn tracker_copes_with_odd_input() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut tracker = PendingTracker::new();
        tracker.update(t0 + s(10), &[1, 2, 3]);
        // A clock that steps back gives age zero, not a panic.
        assert_eq!(tracker.update(t0, &[1, 2, 3]), (3, Some(s(0))));
        // Out of queue order: known inodes keep their first sighting.
        assert_eq!(tracker.update(t0 + s(12), &[3, 1, 4]), (3, Some(s(2))));
        // Duplicates and zeros only.
        assert_eq!(tracker.update(t0 + s(13), &[0, 0, 0, 0]), (4, Some(s(3))));
        let mut fresh = PendingTracker::new();
        assert_eq!(fresh.update(t0, &[5, 5, 0]), (3, Some(s(0))));
        assert_eq!(fresh.update(t0 + s(1), &[5, 0, 5]), (3, Some(s(1))));
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir =
                std::env::temp_dir().join(format!("sockdiag-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn inode_of(stream: &UnixStream) -> u64 {
        use std::os::unix::fs::MetadataExt;
        // fstat on a socket gives its sockfs inode, the one sock_diag reports.
        std::fs::File::from(OwnedFd::from(stream.try_clone().expect("dup")))
            .metadata()
            .expect("fstat")
            .ino()
    }

    fn sample_one(path: &Path) -> ListenerSample {
        let mut samples = sample_listener(path).expect("sample_listener");
        assert_eq!(
            samples.len(),
            1,
            "one listener on {}: {samples:?}",
            path.display()
        );
        samples.remove(0)
    }

    #[test]
    fn counts_pending_connections_on_a_real_listener() {
        let dir = TempDir::new("real");
        let path = dir.0.join("containerd.sock");
        let listener = UnixListener::bind(&path).expect("bind");

        let before = sample_one(&path);
        assert_eq!(before.pending, 0);
        assert!(before.pending_inodes.is_empty());
        assert_eq!(before.path, path.to_str().unwrap());
        assert!(before.backlog > 0);

        let clients: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        let client_inodes: Vec<u64> = clients.iter().map(inode_of).collect();

        let sample = sample_one(&path);
        assert_eq!(sample.inode, before.inode);
        assert_eq!(sample.pending, 3);
        assert_eq!(sample.pending_inodes.len(), 3);
        assert_eq!(
            sample.pending_inodes, client_inodes,
            "client inodes, oldest first"
        );
        eprintln!("listener sample: {sample:?}");

        let (mut accepted, _) = listener.accept().expect("accept");
        accepted.write_all(b"x").expect("write");
        let sample = sample_one(&path);
        assert_eq!(sample.pending, 2);
        assert_eq!(sample.pending_inodes, client_inodes[1..].to_vec());

        // A client that gives up leaves its connection queued, under inode 0.
        drop(clients);
        let sample = sample_one(&path);
        assert_eq!(sample.pending, 2);
        assert_eq!(sample.pending_inodes, vec![0, 0]);

        assert!(
            sample_listener(&dir.0.join("absent.sock"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn finds_abstract_listeners_and_rebound_paths() {
        let name = format!("sockdiag-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let _listener = UnixListener::bind_addr(&addr).expect("bind abstract");
        let _client = UnixStream::connect_addr(&addr).expect("connect abstract");
        let sample = sample_one(Path::new(&format!("@{name}")));
        assert_eq!(sample.path, format!("@{name}"));
        assert_eq!(sample.pending, 1);

        // The old listener's file unlinked and the path bound again: both are returned.
        let dir = TempDir::new("rebound");
        let path = dir.0.join("c.sock");
        let old = UnixListener::bind(&path).expect("bind");
        std::fs::remove_file(&path).expect("unlink");
        let new = UnixListener::bind(&path).expect("bind again");
        let samples = sample_listener(&path).expect("sample");
        assert_eq!(samples.len(), 2, "{samples:?}");
        drop((old, new));
    }

    #[test]
    fn a_path_through_a_symlink_finds_the_listener() {
        // As /var/run -> /run on most distributions: the listener is bound at the real path,
        // the observer is told the path through the symlink.
        let dir = TempDir::new("symlink");
        let real = dir.0.join("run");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink(&real, dir.0.join("var-run")).expect("symlink");
        let _listener = UnixListener::bind(real.join("c.sock")).expect("bind");
        let _client = UnixStream::connect(real.join("c.sock")).expect("connect");
        let through_link = sample_one(&dir.0.join("var-run/c.sock"));
        let direct = sample_one(&real.join("c.sock"));
        assert_eq!(through_link.inode, direct.inode);
        assert_eq!(through_link.pending, 1);
    }
}
