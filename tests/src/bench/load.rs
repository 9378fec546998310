//! Load on the node: a storm of connections and `Version()` calls against containerd's
//! socket, CPU hogs, and the two unrelated workloads whose slowdown under the agent is
//! measured (unix-socket connect/accept/close cycles, and a plain syscall).

use std::{
    hint::black_box,
    io,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{Summary, summarize};
use crate::grpc::containerd_version;

/// The shape of a storm against containerd's socket.
#[derive(Debug, Clone, Serialize)]
pub struct StormSpec {
    /// Threads that connect and close at once.
    pub connect_threads: usize,
    /// Connections per second over all those threads; `None`: as fast as containerd
    /// accepts (a blocking connect waits while the accept queue is full).
    pub connect_rate: Option<u32>,
    /// Threads that call `Version()`.
    pub version_threads: usize,
    /// Pause between two calls of one thread; `None`: back to back.
    #[serde(serialize_with = "opt_ms")]
    pub version_interval: Option<Duration>,
    /// Deadline of one call.
    #[serde(serialize_with = "opt_ms")]
    pub version_timeout: Option<Duration>,
}

impl StormSpec {
    /// Heavy but within what containerd accepts: 2000 connections a second from two threads,
    /// and 100 `Version()` calls a second.
    pub fn paced() -> Self {
        StormSpec {
            connect_threads: 2,
            connect_rate: Some(2000),
            version_threads: 1,
            version_interval: Some(Duration::from_millis(10)),
            version_timeout: Some(Duration::from_secs(5)),
        }
    }

    /// Unbounded: one thread connecting and closing as fast as the accept queue lets it (a
    /// blocking connect waits while the queue is full), one calling `Version()` back to back.
    pub fn flat_out() -> Self {
        StormSpec {
            connect_threads: 1,
            connect_rate: None,
            version_threads: 1,
            version_interval: None,
            version_timeout: Some(Duration::from_secs(5)),
        }
    }
}

/// What a storm did.
#[derive(Debug, Clone, Serialize)]
pub struct StormStats {
    pub seconds: f64,
    pub connects: u64,
    pub connect_errors: u64,
    pub version_calls: u64,
    pub version_errors: u64,
    /// Latency of the successful `Version()` calls, in ms.
    pub version_latency_ms: Option<Summary>,
    /// The first few errors, for the report.
    pub sample_errors: Vec<String>,
}

impl StormStats {
    pub fn connects_per_s(&self) -> f64 {
        self.connects as f64 / self.seconds.max(1e-9)
    }

    pub fn version_calls_per_s(&self) -> f64 {
        self.version_calls as f64 / self.seconds.max(1e-9)
    }
}

#[derive(Default)]
struct Tally {
    connects: u64,
    connect_errors: u64,
    version_calls: u64,
    version_errors: u64,
    latencies_ms: Vec<f64>,
    errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, what: &str, err: &io::Error) {
        if self.errors.len() < 5 {
            self.errors.push(format!("{what}: {err}"));
        }
    }
}

/// A storm in progress; [`Storm::stop`] ends it and counts.
pub struct Storm {
    stop: Arc<AtomicBool>,
    started: Instant,
    threads: Vec<JoinHandle<Tally>>,
}

impl Storm {
    pub fn start(socket: &Path, spec: &StormSpec) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let per_thread_gap = spec
            .connect_rate
            .filter(|&rate| rate > 0)
            .map(|rate| Duration::from_secs_f64(spec.connect_threads as f64 / f64::from(rate)));
        for _ in 0..spec.connect_threads {
            let (socket, stop) = (socket.to_path_buf(), stop.clone());
            threads.push(thread::spawn(move || {
                connect_loop(&socket, per_thread_gap, &stop)
            }));
        }
        for _ in 0..spec.version_threads {
            let (socket, stop) = (socket.to_path_buf(), stop.clone());
            let (gap, timeout) = (spec.version_interval, spec.version_timeout);
            let timeout = timeout.unwrap_or(Duration::from_secs(5));
            threads.push(thread::spawn(move || {
                version_loop(&socket, gap, timeout, &stop)
            }));
        }
        Storm {
            stop,
            started: Instant::now(),
            threads,
        }
    }

    pub fn stop(self) -> StormStats {
        self.stop.store(true, Ordering::SeqCst);
        let seconds = self.started.elapsed().as_secs_f64();
        let mut total = Tally::default();
        for handle in self.threads {
            let Ok(t) = handle.join() else { continue };
            total.connects += t.connects;
            total.connect_errors += t.connect_errors;
            total.version_calls += t.version_calls;
            total.version_errors += t.version_errors;
            total.latencies_ms.extend(t.latencies_ms);
            for e in t.errors {
                if total.errors.len() < 5 {
                    total.errors.push(e);
                }
            }
        }
        StormStats {
            seconds,
            connects: total.connects,
            connect_errors: total.connect_errors,
            version_calls: total.version_calls,
            version_errors: total.version_errors,
            version_latency_ms: summarize(&total.latencies_ms),
            sample_errors: total.errors,
        }
    }
}

fn connect_loop(socket: &Path, gap: Option<Duration>, stop: &AtomicBool) -> Tally {
    let mut tally = Tally::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match UnixStream::connect(socket) {
            Ok(stream) => {
                drop(stream);
                tally.connects += 1;
            }
            Err(err) => {
                tally.connect_errors += 1;
                tally.error("connect", &err);
                // containerd is not listening: do not spin.
                thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(gap) = gap {
            next += gap;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else {
                // Behind schedule (a slow connect): do not try to catch up in a burst.
                next = now;
            }
        }
    }
    tally
}

fn version_loop(
    socket: &Path,
    gap: Option<Duration>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Tally {
    let mut tally = Tally::default();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match containerd_version(socket, timeout) {
            Ok(_) => {
                tally.version_calls += 1;
                tally
                    .latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1e3);
            }
            Err(err) => {
                tally.version_errors += 1;
                tally.error("Version()", &err);
                thread::sleep(Duration::from_millis(10));
            }
        }
        if let Some(gap) = gap {
            thread::sleep(gap);
        }
    }
    tally
}

/// Threads that spin until dropped: a node busy with other work.
pub struct CpuHogs {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl CpuHogs {
    pub fn start(count: usize) -> CpuHogs {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                        }
                    }
                })
            })
            .collect();
        CpuHogs { stop, threads }
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A private listening socket for the connect-cycle workload; removed on drop.
pub struct CycleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl CycleSocket {
    pub fn bind(dir: &Path) -> io::Result<CycleSocket> {
        let path = dir.join(format!("bench-cycle-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        Ok(CycleSocket { path, listener })
    }

    /// Nanoseconds per connect + accept + close of both ends, over about `length`, and the
    /// number of cycles.
    pub fn cycle_ns(&self, length: Duration) -> io::Result<(f64, u64)> {
        let started = Instant::now();
        let mut cycles = 0u64;
        while started.elapsed() < length {
            for _ in 0..100 {
                let client = UnixStream::connect(&self.path)?;
                let (server, _) = self.listener.accept()?;
                drop(client);
                drop(server);
            }
            cycles += 100;
        }
        Ok((
            started.elapsed().as_secs_f64() * 1e9 / cycles as f64,
            cycles,
        ))
    }
}

impl Drop for CycleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Nanoseconds per `getppid(2)` (a raw syscall: no libc caching), over about `length`, and
/// the number of calls.
pub fn syscall_ns(length: Duration) -> (f64, u64) {
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < length {
        for _ in 0..10_000 {
            // SAFETY: getppid takes no arguments and cannot fail.
            black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        }
        calls += 10_000;
    }
    (started.elapsed().as_secs_f64() * 1e9 / calls as f64, calls)
}

fn opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64() * 1e3),
        None => s.serialize_none(),
    }
}
