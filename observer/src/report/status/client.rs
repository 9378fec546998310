//! The client side of `observer status`: fetches the document from a running agent, over
//! TCP or its unix socket, with hyper's HTTP/1 client and bounded waits, and says why when it
//! cannot.

use std::time::Duration;

use crate::config::StatusTarget;

/// Why `observer status` could not get the document.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "the observer is not running: nothing listens at {target} ({detail}); start it, or point --status-listen or --status-socket at where it listens"
    )]
    NotRunning {
        target: StatusTarget,
        detail: String,
    },
    #[error(
        "the observer at {target} did not answer within {} s: it may be stuck or overloaded; check its log and `curl {target}/livez`",
        .waited.as_secs_f64()
    )]
    Timeout {
        target: StatusTarget,
        waited: Duration,
    },
    #[error(
        "something answers at {target}, but not with HTTP: is that the observer's address? ({detail})"
    )]
    NotHttp {
        target: StatusTarget,
        detail: String,
    },
    #[error("the observer at {target} answered `{status_line}` instead of the status document")]
    Status {
        target: StatusTarget,
        status_line: String,
    },
    #[error("cannot reach the observer at {target}: {source}")]
    Io {
        target: StatusTarget,
        source: std::io::Error,
    },
}

impl FetchError {
    /// `observer status` exits with 3 when the agent is not running (like `systemctl status`
    /// for an inactive unit) and with 1 when it runs but cannot be read.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::NotRunning { .. } => 3,
            _ => 1,
        }
    }
}

/// How long `observer status` waits to connect and then for the whole answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes read of an answer's body. The status document is a few KiB; whatever listens on
/// the port may not be the agent, and must not make `observer status` eat the node's memory.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Fetches the status document from a running agent (for `observer status`).
pub async fn fetch(target: &StatusTarget) -> Result<String, FetchError> {
    fetch_with(target, CONNECT_TIMEOUT, ANSWER_TIMEOUT).await
}

async fn fetch_with(
    target: &StatusTarget,
    connect_within: Duration,
    answer_within: Duration,
) -> Result<String, FetchError> {
    let connect_error = |source: std::io::Error| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        if matches!(source.kind(), ConnectionRefused | NotFound) {
            FetchError::NotRunning {
                target: target.clone(),
                detail: source.to_string(),
            }
        } else {
            FetchError::Io {
                target: target.clone(),
                source,
            }
        }
    };
    let timeout = |waited| FetchError::Timeout {
        target: target.clone(),
        waited,
    };
    match target {
        StatusTarget::Tcp(addr) => {
            let stream = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| timeout(connect_within))?
                .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_status(stream, target, &addr.to_string()))
                .await
                .map_err(|_| timeout(answer_within))?
        }
        StatusTarget::Unix(path) => {
            let stream =
                tokio::time::timeout(connect_within, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| timeout(connect_within))?
                    .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_status(stream, target, "localhost"))
                .await
                .map_err(|_| timeout(answer_within))?
        }
    }
}

/// One `GET /status` over `stream` with hyper's HTTP/1 client, and the body of a `200` answer.
/// `target` only names the agent in errors. Unbounded in time: the caller bounds it.
///
/// The entry point for reading untrusted answers: any bytes the other end sends give the
/// document or a [`FetchError`], never a panic (see [`read_answer`] for a byte slice).
pub async fn get_status(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    target: &StatusTarget,
    host: &str,
) -> Result<String, FetchError> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::{Request, StatusCode, header};

    let not_http = |e: &hyper::Error| FetchError::NotHttp {
        target: target.clone(),
        detail: e.to_string(),
    };
    let failed = |e: hyper::Error| {
        // A parse error, or a connection closed before a whole answer: not an HTTP server.
        if e.is_parse() || e.is_parse_status() || e.is_incomplete_message() {
            not_http(&e)
        } else {
            FetchError::Io {
                target: target.clone(),
                source: std::io::Error::other(e),
            }
        }
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(failed)?;
    // The connection is driven here, beside the request, so nothing outlives this call.
    let request = Request::get("/status")
        .header(header::HOST, host)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| FetchError::Io {
            target: target.clone(),
            source: std::io::Error::other(e),
        })?;
    let exchange = async {
        let response = sender.send_request(request).await.map_err(failed)?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status {
                target: target.clone(),
                status_line: format!("{:?} {}", response.version(), response.status()),
            });
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => failed(*e),
                Err(_) => FetchError::Io {
                    target: target.clone(),
                    source: std::io::Error::other(format!(
                        "the answer is longer than {} MiB, which no status document is; is another program listening there?",
                        MAX_ANSWER_BYTES >> 20
                    )),
                },
            })?;
        Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
    };
    tokio::pin!(exchange);
    tokio::pin!(connection);
    tokio::select! {
        result = &mut exchange => result,
        // The connection ended first: its error says why; else the exchange has the answer.
        ended = &mut connection => match ended {
            Err(e) => Err(failed(e)),
            Ok(()) => exchange.await,
        },
    }
}

/// Reads `answer`, as if an agent at `target` had sent it, into the document or the error
/// `observer status` would give; for fuzzing and tests of the reader.
pub fn read_answer(answer: &[u8]) -> Result<String, FetchError> {
    let target = StatusTarget::Unix("/fuzz".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|source| FetchError::Io {
            target: target.clone(),
            source,
        })?;
    runtime.block_on(get_status(Canned::new(answer), &target, "localhost"))
}

/// A stream that answers with fixed bytes once the request is written, then end of file, and
/// swallows what is written (hyper takes bytes read before its request for a stray message).
struct Canned {
    answer: std::io::Cursor<Vec<u8>>,
    asked: bool,
    reader: Option<std::task::Waker>,
}

impl Canned {
    fn new(answer: &[u8]) -> Self {
        Self {
            answer: std::io::Cursor::new(answer.to_vec()),
            asked: false,
            reader: None,
        }
    }
}

impl tokio::io::AsyncRead for Canned {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.asked {
            self.reader = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.answer).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Canned {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.asked = true;
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection with `answer` (or never answers when `None`), after reading
    /// the request.
    async fn one_shot(answer: Option<&'static [u8]>) -> StatusTarget {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            match answer {
                Some(a) => {
                    let _ = stream.write_all(a).await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
        });
        StatusTarget::Tcp(addr)
    }

    fn fetch_quickly(target: &StatusTarget) -> Result<String, FetchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fetch_with(
            target,
            Duration::from_millis(500),
            Duration::from_millis(300),
        ))
    }

    fn with_server(answer: Option<&'static [u8]>) -> Result<String, FetchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let target = rt.block_on(one_shot(answer));
        let result = rt.block_on(fetch_with(
            &target,
            Duration::from_millis(500),
            Duration::from_millis(300),
        ));
        rt.shutdown_background();
        result
    }

    #[test]
    fn fetch_tells_not_running_from_timeout_from_not_http() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch_quickly(&StatusTarget::Tcp(closed)).unwrap_err();
        assert!(matches!(err, FetchError::NotRunning { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("not running"), "{err}");

        let err =
            fetch_quickly(&StatusTarget::Unix("/nonexistent/observer.sock".into())).unwrap_err();
        assert!(matches!(err, FetchError::NotRunning { .. }), "{err}");

        let err = with_server(None).unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("did not answer within"), "{err}");
        assert_eq!(err.exit_code(), 1);

        let err = with_server(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).unwrap_err();
        assert!(matches!(err, FetchError::NotHttp { .. }), "{err}");
        let err = with_server(Some(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")).unwrap_err();
        assert!(matches!(err, FetchError::NotHttp { .. }), "{err}");

        let err = with_server(Some(b"HTTP/1.0 404 Not Found\r\n\r\nnope")).unwrap_err();
        assert!(err.to_string().contains("404 Not Found"), "{err}");

        let body = with_server(Some(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}")).unwrap();
        assert_eq!(body, "{}");
    }

    #[test]
    fn an_endless_answer_is_cut_off_with_an_error() {
        let mut answer = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        answer.resize(answer.len() + MAX_ANSWER_BYTES + 1, b'a');
        let err = read_answer(&answer).unwrap_err();
        assert!(err.to_string().contains("longer than 16 MiB"), "{err}");
    }

    #[test]
    fn reads_answers_from_bytes() {
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap(),
            "{}"
        );
        // A body that runs to the end of the connection (HTTP/1.0, no length) and a chunked one.
        assert_eq!(
            read_answer(b"HTTP/1.0 200 OK\r\n\r\n{\"a\":1}").unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(
            read_answer(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
            )
            .unwrap(),
            "{}"
        );
        for garbage in [
            &b""[..],
            b"\0\0\0\0",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        ] {
            let err = read_answer(garbage).unwrap_err();
            assert!(
                matches!(err, FetchError::NotHttp { .. }),
                "{garbage:?}: {err}"
            );
        }
    }
}
