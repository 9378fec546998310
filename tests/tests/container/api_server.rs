//! A stand-in Kubernetes API server for the pod: HTTPS on loopback (the observer reports only
//! over https, with the service account's CA, as in a cluster), answering the calls of
//! `observer/src/kubernetes/api.rs` as `observer/src/kubernetes/tests.rs`'s stand-in does,
//! and recording each request. The CA and its server certificate (for 127.0.0.1) are made
//! by `openssl` for each run; the CA and a token go where the kubelet mounts them.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use rustls::{ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::{Value, json};

pub const TOKEN: &str = "stand-in-token";

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub body: Value,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    node: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl ApiServer {
    /// Writes `ca.crt` and `token` into `secrets` (the service account directory) and serves.
    pub fn start(secrets: &Path, node: &str) -> ApiServer {
        std::fs::create_dir_all(secrets).unwrap();
        let work = secrets.parent().unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=stand-in-ca"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(work, &ca);
        let mut server = vec!["req", "-x509", "-days", "1", "-subj", "/CN=127.0.0.1"];
        server.extend(ec);
        server.extend([
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
        ]);
        openssl(work, &server);
        std::fs::copy(work.join("ca.pem"), secrets.join("ca.crt")).unwrap();
        std::fs::write(secrets.join("token"), TOKEN).unwrap();

        let certs = CertificateDer::pem_file_iter(work.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(work.join("server.key")).unwrap();
        let config = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (reqs, stopping, node_name) = (requests.clone(), stop.clone(), node.to_owned());
        thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (config, reqs, node) =
                            (config.clone(), reqs.clone(), node_name.clone());
                        thread::spawn(move || serve(stream, config, &reqs, &node));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ApiServer {
            addr,
            node: node.to_owned(),
            requests,
            stop,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The conditions of our type that were patched onto the node, in order.
    pub fn conditions(&self) -> Vec<Value> {
        let path = format!("/api/v1/nodes/{}/status", self.node);
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .flat_map(|r| {
                r.body["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|c| c["type"] == "ContainerRuntimeUnhealthy")
            .collect()
    }

    /// The reasons of the events created, in order.
    pub fn event_reasons(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v1/namespaces/default/events")
            .filter_map(|r| r.body["reason"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    stream: TcpStream,
    config: Arc<ServerConfig>,
    requests: &Mutex<Vec<Recorded>>,
    node: &str,
) {
    stream.set_nonblocking(false).ok();
    stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let Ok(conn) = ServerConnection::new(config) else {
        return;
    };
    let mut reader = BufReader::new(StreamOwned::new(conn, stream));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let (mut length, mut authorization) = (0usize, String::new());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = value.trim().to_owned(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = target.split('?').next().unwrap_or_default().to_owned();
        requests.lock().unwrap().push(Recorded {
            method: method.clone(),
            path: path.clone(),
            authorization,
            body: body.clone(),
        });
        let (code, answer) = answer(&method, &path, body, node);
        let text = answer.to_string();
        let response = format!(
            "HTTP/1.1 {code} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            if code < 300 { "OK" } else { "Not Found" },
            text.len()
        );
        let stream = reader.get_mut();
        if stream
            .write_all(response.as_bytes())
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
    }
}

fn answer(method: &str, path: &str, body: Value, node: &str) -> (u16, Value) {
    let node_path = format!("/api/v1/nodes/{node}");
    let events = "/api/v1/namespaces/default/events";
    let node_doc = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "status": {"conditions": []}});
    match method {
        "GET" if path == node_path => (200, node_doc),
        "PATCH" if path == format!("{node_path}/status") => (200, node_doc),
        "POST" if path == events => (201, body),
        "PATCH" if path.starts_with(&format!("{events}/")) => {
            let name = &path[events.len() + 1..];
            (
                200,
                json!({"apiVersion": "v1", "kind": "Event",
                       "metadata": {"name": name, "namespace": "default"},
                       "involvedObject": {"kind": "Node", "name": node}}),
            )
        }
        _ => (
            404,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 404, "message": "not found"}),
        ),
    }
}
