//! `status-flood ADDR SECONDS PER_KIND`: abuses an HTTP endpoint the way any local user can,
//! for the status-flood test, which runs it as `nobody`. It keeps up to `PER_KIND`
//! connections of each kind open and opens a new one for each the server closes:
//! - idle: connected, never a byte;
//! - half-sent: a request line and headers trickled one line a second, never finished;
//! - oversized: a header without end, or a body of a gigabyte, sent as fast as accepted.
//!
//! Bounded in time and in the connections it opens each turn, and stops early when its
//! standard input closes; loopback only. On exit it
//! prints one line: `flood: uid=U opened=N closed_by_server=C answered=A most_open=M`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// New connections per kind and turn, so the flood is heavy but leaves the machine usable.
const OPEN_PER_TURN: usize = 32;
const TURN: Duration = Duration::from_millis(50);
const TRICKLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Idle,
    HalfSent,
    HugeHeader,
    HugeBody,
}

struct Connection {
    stream: TcpStream,
    kind: Kind,
    last_write: Instant,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, seconds, per_kind] = &args[..] else {
        eprintln!("usage: status-flood ADDR SECONDS PER_KIND");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is host:port");
    assert!(
        addr.ip().is_loopback(),
        "status-flood only targets loopback"
    );
    let seconds: u64 = seconds.parse().expect("SECONDS is a number");
    let per_kind: usize = per_kind.parse().expect("PER_KIND is a number");
    let per_kind = per_kind.min(raise_nofile().saturating_sub(64) / 4);

    let kinds = [Kind::Idle, Kind::HalfSent, Kind::HugeHeader, Kind::HugeBody];
    let mut open: Vec<Connection> = Vec::new();
    let (mut opened, mut closed_by_server, mut answered, mut most_open) = (0u64, 0u64, 0u64, 0);
    let junk = vec![b'a'; 16 * 1024];
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin_closed = stop.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        stdin_closed.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for kind in kinds {
            let have = open.iter().filter(|c| c.kind == kind).count();
            for _ in have..per_kind.min(have + OPEN_PER_TURN) {
                let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                else {
                    break;
                };
                let head: &[u8] = match kind {
                    Kind::Idle => b"",
                    Kind::HalfSent => b"GET /status HTTP/1.1\r\nHost: flood\r\n",
                    Kind::HugeHeader => b"GET /status HTTP/1.1\r\nHost: flood\r\nX-Big: ",
                    Kind::HugeBody => {
                        b"POST /status HTTP/1.1\r\nHost: flood\r\nContent-Length: 1000000000\r\n\r\n"
                    }
                };
                let _ = stream.write_all(head);
                let _ = stream.set_nonblocking(true);
                opened += 1;
                open.push(Connection {
                    stream,
                    kind,
                    last_write: Instant::now(),
                });
            }
        }
        most_open = most_open.max(open.len());
        let mut buf = [0u8; 4096];
        open.retain_mut(|c| {
            match c.kind {
                Kind::Idle => {}
                Kind::HalfSent => {
                    if c.last_write.elapsed() >= TRICKLE_EVERY {
                        let _ = c.stream.write(b"X-Slow: a\r\n");
                        c.last_write = Instant::now();
                    }
                }
                Kind::HugeHeader | Kind::HugeBody => {
                    let _ = c.stream.write(&junk);
                }
            }
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    closed_by_server += 1;
                    false
                }
                Ok(_) => {
                    // An answer (an error status, most likely): start a new one.
                    answered += 1;
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                Err(_) => {
                    closed_by_server += 1;
                    false
                }
            }
        });
        std::thread::sleep(TURN);
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    println!(
        "flood: uid={uid} opened={opened} closed_by_server={closed_by_server} answered={answered} most_open={most_open}"
    );
}

/// Raises this process's soft descriptor limit to its hard one, and returns it.
fn raise_nofile() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a valid struct; raising the soft limit up to the hard
    // one needs no privilege.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}
