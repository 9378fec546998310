//! CRI's `ListPodSandbox` over containerd's gRPC socket, with std only: what
//! node-problem-detector's containerd check asks (`crictl pods`), for the NPD-like watchdog
//! of the fault zoo. The agent has no CRI client of its own to borrow (`Version()` goes
//! through the agent's probe, in `grpc.rs`).
//!
//! One call is one connection: the HTTP/2 preface and an empty SETTINGS frame, one request
//! (HPACK literals, no Huffman), then frames until the response's DATA frame. A frozen
//! containerd never answers, so every call has its own deadline.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const STREAM: u32 = 1;

/// CRI `ListPodSandbox` with an empty filter, what `crictl pods` asks: `Ok` once the answer
/// came; `ConnectionRefused` or `NotFound` when nobody listens, `TimedOut` when nobody
/// answers, `InvalidData` for a gRPC error (a CRI plugin that is not loaded, say).
pub fn list_pod_sandbox(socket: &Path, timeout: Duration) -> io::Result<()> {
    call(socket, LIST_POD_SANDBOX, timeout).map(|_| ())
}

/// One unary call with an empty request message on a fresh connection; the response's
/// message, length prefix included.
fn call(socket: &Path, path: &str, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&request(path))?;
    let answer = read_answer(&mut stream, deadline);
    // A clean goodbye keeps containerd's log free of "connection reset" lines.
    let _ = stream.write_all(&frame(GOAWAY, 0, 0, &[0; 8]));
    answer
}

/// Preface, SETTINGS, the request's HEADERS and its one empty message as DATA.
fn request(path: &str) -> Vec<u8> {
    let mut block = vec![
        0x83, // :method: POST (static table 3)
        0x86, // :scheme: http (static table 6)
    ];
    literal_indexed_name(&mut block, 4, path); // :path
    literal_indexed_name(&mut block, 1, "localhost"); // :authority
    literal_indexed_name(&mut block, 31, "application/grpc"); // content-type
    block.push(0x00); // a literal with a new name
    string(&mut block, "te");
    string(&mut block, "trailers");

    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS, STREAM, &block));
    // A gRPC message: not compressed, length 0 (an empty ListPodSandboxRequest has no filter).
    out.extend(frame(DATA, END_STREAM, STREAM, &[0, 0, 0, 0, 0]));
    out
}

/// HPACK "literal header field without indexing, indexed name" (RFC 7541 6.2.2).
fn literal_indexed_name(block: &mut Vec<u8>, index: usize, value: &str) {
    integer(block, 0x00, 4, index);
    string(block, value);
}

fn string(block: &mut Vec<u8>, value: &str) {
    integer(block, 0x00, 7, value.len());
    block.extend_from_slice(value.as_bytes());
}

/// HPACK integer with an `prefix_bits` prefix (RFC 7541 5.1).
fn integer(block: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        block.push(first | value as u8);
        return;
    }
    block.push(first | max as u8);
    value -= max;
    while value >= 128 {
        block.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    block.push(value as u8);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads frames until the response's DATA frame, answering SETTINGS and PING on the way.
fn read_answer(stream: &mut UnixStream, deadline: Instant) -> io::Result<Vec<u8>> {
    loop {
        let mut head = [0u8; 9];
        read_exact_by(stream, &mut head, deadline)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        read_exact_by(stream, &mut payload, deadline)?;
        match kind {
            SETTINGS if flags & ACK == 0 => stream.write_all(&frame(SETTINGS, ACK, 0, &[]))?,
            PING if flags & ACK == 0 => stream.write_all(&frame(PING, ACK, 0, &payload))?,
            DATA if id == STREAM => return Ok(payload),
            HEADERS if id == STREAM && flags & END_STREAM != 0 => {
                return Err(invalid("the call ended without a message (a gRPC error)"));
            }
            RST_STREAM if id == STREAM => return Err(invalid("containerd reset the call")),
            GOAWAY => return Err(invalid("containerd closed the connection (GOAWAY)")),
            _ => {}
        }
    }
}

fn read_exact_by(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "containerd did not answer in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        let mut block = Vec::new();
        integer(&mut block, 0x00, 4, 31);
        assert_eq!(block, [0x0f, 0x10]);
        block.clear();
        integer(&mut block, 0x00, 5, 1337);
        assert_eq!(block, [0x1f, 0x9a, 0x0a]);
        block.clear();
        integer(&mut block, 0x00, 7, 10);
        assert_eq!(block, [0x0a]);
    }
}
