//! The `observer` binary, pointed at a [`Sandbox`], and a minimal HTTP client for its status
//! endpoint (std only: one GET per connection, `Connection: close`).

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Sandbox, SandboxError,
    process::{self, TAIL_LINES},
};

/// Bounds one status request: the endpoint answers from memory.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The observer to test: `$OBSERVER_BIN` when set, else the workspace's
/// `target/debug/observer` (or `$CARGO_TARGET_DIR/debug/observer`).
pub fn observer_bin() -> Result<PathBuf, SandboxError> {
    let path = match std::env::var_os("OBSERVER_BIN") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
            .join("debug/observer"),
    };
    if process::is_executable(&path) {
        Ok(path)
    } else {
        Err(SandboxError::ObserverMissing { path })
    }
}

/// A loopback address with a port that was free a moment ago. Another process can take the
/// port before the observer binds it; that is rare enough for tests.
pub fn free_local_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|err| panic!("could not bind a loopback TCP port: {err}"))
}

/// A running observer. Dropping it sends SIGTERM, waits up to 5 s, then SIGKILLs it.
#[derive(Debug)]
pub struct Observer {
    child: Mutex<Child>,
    status_addr: SocketAddr,
    log_path: PathBuf,
}

impl Observer {
    /// Runs `observer --socket <socket> --unit <unit> --bus <bus> --status-listen <free
    /// address> EXTRA_ARGS` with stdout and stderr in `<sandbox dir>/observer.log`, and
    /// `RUST_LOG=info,observer=debug` unless `RUST_LOG` is set, and without colours. `OBSERVER_*` variables of
    /// the test's environment are not passed on, so only the arguments configure it.
    pub fn spawn(sandbox: &Sandbox, extra_args: &[&str]) -> Result<Observer, SandboxError> {
        Self::spawn_on(sandbox, sandbox.socket(), extra_args)
    }

    /// Like [`spawn`](Self::spawn), with `--socket socket` instead of the sandbox's own:
    /// a path through a symlink, or a misconfiguration.
    pub fn spawn_on(
        sandbox: &Sandbox,
        socket: &std::path::Path,
        extra_args: &[&str],
    ) -> Result<Observer, SandboxError> {
        Self::spawn_with_env(sandbox, socket, extra_args, &[])
    }

    /// Like [`spawn_on`](Self::spawn_on), with extra environment variables.
    pub fn spawn_with_env(
        sandbox: &Sandbox,
        socket: &std::path::Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Observer, SandboxError> {
        Self::spawn_full(sandbox, socket, &[], extra_args, env)
    }

    /// Like [`spawn`](Self::spawn), run through the command `wrapper` that execs it, e.g.
    /// `["prlimit", "--nofile=1024:1024", "--"]`: the observer is still the child process.
    pub fn spawn_under(
        sandbox: &Sandbox,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Result<Observer, SandboxError> {
        Self::spawn_full(sandbox, sandbox.socket(), wrapper, extra_args, &[])
    }

    fn spawn_full(
        sandbox: &Sandbox,
        socket: &std::path::Path,
        wrapper: &[&str],
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Observer, SandboxError> {
        let bin = observer_bin()?;
        let status_addr = free_local_addr();
        let log_path = sandbox.dir().join("observer.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|err| {
                SandboxError::io(format!("could not open {}", log_path.display()), err)
            })?;
        let log_err = log
            .try_clone()
            .map_err(|err| SandboxError::io("could not duplicate a file handle", err))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        cmd.arg("--socket")
            .arg(socket)
            .args(["--unit", sandbox.unit()])
            .args(["--bus", &sandbox.bus_address()])
            .args(["--status-listen", &status_addr.to_string()])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OBSERVER_") {
                cmd.env_remove(key);
            }
        }
        // Plain text in the log file, which tests search.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,observer=debug");
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().map_err(|err| {
            SandboxError::io(format!("could not run `{}`", process::describe(&cmd)), err)
        })?;
        Ok(Observer {
            child: Mutex::new(child),
            status_addr,
            log_path,
        })
    }

    /// Where the status endpoint listens.
    pub fn status_addr(&self) -> SocketAddr {
        self.status_addr
    }

    /// `GET path` on the status endpoint: the status code and the body.
    pub fn get(&self, path: &str) -> Result<(u16, String), SandboxError> {
        http_get(self.status_addr, path, HTTP_TIMEOUT).map_err(|detail| SandboxError::Http {
            addr: self.status_addr,
            path: path.to_string(),
            detail,
        })
    }

    /// `GET /status`, parsed.
    pub fn status(&self) -> Result<serde_json::Value, SandboxError> {
        let (code, body) = self.get("/status")?;
        if code != 200 {
            return Err(SandboxError::Http {
                addr: self.status_addr,
                path: "/status".into(),
                detail: format!("HTTP {code}: {body}"),
            });
        }
        serde_json::from_str(&body).map_err(|err| SandboxError::Http {
            addr: self.status_addr,
            path: "/status".into(),
            detail: format!("not JSON ({err}): {body}"),
        })
    }

    /// Like [`wait_for`](Self::wait_for), on the parsed document.
    pub fn wait_for_status(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, SandboxError> {
        let body = self.wait_for(what, timeout, |body| {
            serde_json::from_str(body).is_ok_and(|doc| pred(&doc))
        })?;
        serde_json::from_str(&body).map_err(|err| SandboxError::Http {
            addr: self.status_addr,
            path: "/status".into(),
            detail: format!("not JSON ({err}): {body}"),
        })
    }

    /// Waits until containerd is judged healthy.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<serde_json::Value, SandboxError> {
        self.wait_for_status("a healthy containerd", timeout, |doc| {
            doc["state"] == "healthy"
        })
    }

    /// Waits until `GET /status` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), SandboxError> {
        self.wait_for("the observer's /status to answer 200", timeout, |_| true)
            .map(drop)
    }

    /// Polls `GET /status` until a 200 body satisfies `pred`, and returns that body. `what`
    /// names the awaited condition in the error, which carries the last answer and the tail
    /// of the observer's log. Fails at once if the observer exits.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, SandboxError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.get("/status") {
                Ok((200, body)) if pred(&body) => return Ok(body),
                Ok((code, body)) => format!("HTTP {code}: {body}"),
                Err(err) => err.to_string(),
            };
            if let Some(status) = self.exit_status() {
                return Err(SandboxError::Failed {
                    what: format!("the observer exited ({status}) while waiting for {what}"),
                    details: format!("last answer: {last}\n{}", self.log_tail()),
                });
            }
            if Instant::now() >= deadline {
                return Err(SandboxError::Timeout {
                    what: what.to_string(),
                    waited: timeout,
                    details: format!("last answer: {last}\n{}", self.log_tail()),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The observer's PID, to signal it.
    pub fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    /// Waits up to `timeout` for the observer to exit, and returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Everything the observer logged so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        process::log_tail(&self.log_path, TAIL_LINES)
    }

    /// The exit status once the observer has exited.
    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_wait()
            .ok()
            .flatten()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if matches!(child.try_wait(), Ok(None)) {
            process::signal(child.id(), libc::SIGTERM);
            if !matches!(
                process::wait_bounded(child, Duration::from_secs(5)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("observer at teardown after a panic:\n{}", self.log_tail());
        }
    }
}

/// One `GET` with `Connection: close`. Reads to EOF and handles both `Content-Length` and
/// chunked bodies. The error is a sentence for [`SandboxError::Http`].
pub(crate) fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|err| format!("could not connect: {err}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|err| format!("could not set a socket timeout: {err}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|err| format!("could not send the request: {err}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|err| format!("could not read the response: {err}"))?;
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> Result<(u16, String), String> {
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {} bytes", response.len()))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length `{value}`"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        decode_chunked(body)?
    } else if let Some(length) = content_length {
        body.get(..length)
            .ok_or_else(|| format!("body cut short: {} of {length} bytes", body.len()))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or("chunked body cut short before a chunk size")?;
        let size_line = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size `{size_hex}`"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| format!("chunk cut short: {} of {size} bytes", rest.len()))?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `responses` in order, one per connection, after reading the request head.
    fn serve(responses: Vec<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for response in responses {
                let (mut stream, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                assert!(head.starts_with(b"GET /status HTTP/1.1\r\n"));
                stream.write_all(response.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn get_reads_content_length_chunked_and_eof_bodies() {
        let addr = serve(vec![
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}",
            "HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n5;x=1\r\n:1}\r\n\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof",
        ]);
        let get = || http_get(addr, "/status", Duration::from_secs(5)).unwrap();
        assert_eq!(get(), (200, "{\"ok\":true}".to_string()));
        assert_eq!(get(), (503, "{\"a\":1}\r\n".to_string()));
        assert_eq!(get(), (200, "until eof".to_string()));
    }

    #[test]
    fn get_reports_a_closed_port() {
        let addr = free_local_addr();
        let err = http_get(addr, "/status", Duration::from_secs(1)).unwrap_err();
        assert!(err.starts_with("could not connect"), "{err}");
    }

    #[test]
    fn truncated_bodies_are_errors() {
        let err = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").unwrap_err();
        assert!(err.contains("3 of 10"), "{err}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
