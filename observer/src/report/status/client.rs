//! The client side of `observer status`: fetches the document from a running agent, over
//! TCP or its unix socket, with bounded waits, and says why when it cannot.

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
    let response = match target {
        StatusTarget::Tcp(addr) => {
            let stream = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| timeout(connect_within))?
                .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_over(stream, &addr.to_string()))
                .await
                .map_err(|_| timeout(answer_within))?
        }
        StatusTarget::Unix(path) => {
            let stream =
                tokio::time::timeout(connect_within, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| timeout(connect_within))?
                    .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_over(stream, "localhost"))
                .await
                .map_err(|_| timeout(answer_within))?
        }
    }
    .map_err(|source| FetchError::Io {
        target: target.clone(),
        source,
    })?;
    let not_http = |detail: &str| FetchError::NotHttp {
        target: target.clone(),
        detail: detail.to_owned(),
    };
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| not_http("no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") {
        return Err(not_http(&format!(
            "it began with {:?}",
            status_line.chars().take(40).collect::<String>()
        )));
    }
    if status_line.split(' ').nth(1) != Some("200") {
        return Err(FetchError::Status {
            target: target.clone(),
            status_line: status_line.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&response[split + 4..]).into_owned())
}

/// One `GET /status` over HTTP/1.0, which makes the server close the connection after a
/// plain (not chunked) body.
async fn get_over(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    host: &str,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request =
        format!("GET /status HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(response)
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
}
