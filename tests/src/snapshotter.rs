//! A fake at the far edge: a remote snapshotter that containerd reaches as a proxy plugin
//! (`[proxy_plugins.<name>]`, type `snapshot`), serving containerd's
//! `containerd.services.snapshots.v1.Snapshots` gRPC API on a unix socket of the sandbox.
//! containerd itself is the real one; only the backend behind its proxy is fake.
//!
//! It keeps its snapshots in memory and answers every call plausibly, except that a `List`
//! (what containerd's `Snapshotter.Walk` sends) can be made to stall, once: a remote
//! snapshotter that hung one time, as in containerd #13798. Its later calls, those of a
//! restarted containerd included, are answered again.
//!
//! [`RemoteSnapshotter::wedge`] reproduces #13798 with it, through containerd's own paths
//! (1.6: `metadata/db.go`, `metadata/snapshot.go`, `services/leases`): a lease holding a
//! snapshot of this snapshotter is deleted with `sync`, so containerd's garbage collector runs
//! at once, sweeps the snapshot, and cleans this snapshotter up: `garbageCollect` takes the
//! snapshotter's lock (`s.l.Lock()`) and calls `Walk`, which never returns. Every later call
//! that takes that lock (`Prepare`, `Remove`, ...) then waits behind it, while the metadata
//! database itself stays writable: `GarbageCollect` releases its own lock (`wlock`) before it
//! waits for the cleanups. The wedge lasts until containerd restarts or this fake goes.
//!
//! tonic builds no server for containerd's API (containerd-client generates clients only), so
//! the service is written by hand: one `tower` service that routes by path, with
//! `tonic::server::Grpc` and prost's codec over containerd-client's message types.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use containerd_client::{
    services::v1::{
        CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
        leases_client::LeasesClient,
        snapshots::{
            CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest,
            ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
            PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest,
            StatSnapshotResponse, UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest,
            UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
            snapshots_client::SnapshotsClient,
        },
    },
    types::Mount,
};
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, BoxStream, Service, http, tokio_stream},
    metadata::MetadataValue,
    server::{Grpc, NamedService},
};

use crate::{SandboxError, process};

const SERVICE: &str = "containerd.services.snapshots.v1.Snapshots";
/// The namespace the wedge's lease and snapshot live in.
const NAMESPACE: &str = "observer-tests";
/// How long the wedge's lease delete waits for containerd's garbage collector: far longer
/// than any test holds the wedge; it ends with the restart.
const GC_WAIT: Duration = Duration::from_secs(300);
/// Bounds the calls that set the wedge up, and the wait for containerd to reach `Walk`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The fake remote snapshotter, serving until dropped. Dropping it ends every call in
/// flight, a stalled `List` too, and removes its socket.
#[derive(Debug)]
pub struct RemoteSnapshotter {
    name: String,
    socket: PathBuf,
    backend: Arc<Backend>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// What the fake keeps, shared by its calls.
#[derive(Debug, Default)]
struct Backend {
    /// Snapshots by key, as the proxy named them.
    snapshots: Mutex<BTreeMap<String, Info>>,
    /// The next `List` stalls.
    stall_next_list: AtomicBool,
    /// `List` calls that stalled, and that were answered.
    stalled_lists: AtomicU32,
    answered_lists: AtomicU32,
}

impl RemoteSnapshotter {
    /// Serves the snapshotter `name` (as containerd's config names it) on `socket`.
    pub(crate) fn serve(name: &str, socket: &Path) -> Result<RemoteSnapshotter, SandboxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("remote-snapshotter")
            .enable_all()
            .build()
            .map_err(|err| {
                SandboxError::io("could not start the remote snapshotter's runtime", err)
            })?;
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::bind(socket).map_err(|err| {
                SandboxError::io(format!("could not listen on {}", socket.display()), err)
            })?
        };
        let backend = Arc::new(Backend::default());
        let incoming = futures_util::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| stream);
            Some((accepted, listener))
        });
        let service = Snapshots(backend.clone());
        runtime.spawn(async move {
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("the remote snapshotter stopped serving: {err}");
            }
        });
        Ok(RemoteSnapshotter {
            name: name.to_owned(),
            socket: socket.to_path_buf(),
            backend,
            runtime: Some(runtime),
        })
    }

    /// The snapshotter's name in containerd (`--snapshotter` for the observer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `List` calls that stalled so far.
    pub fn stalled_lists(&self) -> u32 {
        self.backend.stalled_lists.load(Ordering::SeqCst)
    }

    /// `List` calls answered so far.
    pub fn answered_lists(&self) -> u32 {
        self.backend.answered_lists.load(Ordering::SeqCst)
    }

    /// Wedges the snapshotter's lock in the containerd at `containerd` (containerd #13798):
    /// creates a lease, prepares a snapshot of this snapshotter under it, and deletes the
    /// lease with `sync`, in the background, so that containerd's garbage collector calls
    /// `Walk` here while it holds the lock, and this fake stalls that call. Returns once the
    /// stalled call has arrived: from then on, the lock is held.
    pub fn wedge(&self, containerd: &Path) -> Result<(), SandboxError> {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        let failed = |what: String| SandboxError::Failed {
            what,
            details: String::new(),
        };
        let lease = format!("observer-tests-wedge-{}", std::process::id());
        let delete = runtime.block_on(async {
            let channel =
                tokio::time::timeout(SETUP_TIMEOUT, containerd_client::connect(containerd))
                    .await
                    .map_err(|_| {
                        failed(format!(
                            "containerd at {} did not accept",
                            containerd.display()
                        ))
                    })?
                    .map_err(|err| {
                        failed(format!("cannot connect to {}: {err}", containerd.display()))
                    })?;
            let mut leases = LeasesClient::new(channel.clone());
            let create = CreateLeaseRequest {
                id: lease.clone(),
                labels: HashMap::new(),
            };
            tokio::time::timeout(SETUP_TIMEOUT, leases.create(request(create, None)))
                .await
                .map_err(|_| failed("containerd did not create the lease".into()))?
                .map_err(|status| failed(format!("Leases.Create failed: {status}")))?;
            let prepare = PrepareSnapshotRequest {
                snapshotter: self.name.clone(),
                key: lease.clone(),
                parent: String::new(),
                labels: HashMap::new(),
            };
            tokio::time::timeout(
                SETUP_TIMEOUT,
                SnapshotsClient::new(channel).prepare(request(prepare, Some(&lease))),
            )
            .await
            .map_err(|_| {
                failed(format!(
                    "containerd did not prepare a snapshot of {}",
                    self.name
                ))
            })?
            .map_err(|status| {
                failed(format!(
                    "Snapshots.Prepare in {} failed: {status}",
                    self.name
                ))
            })?;
            self.backend.stall_next_list.store(true, Ordering::SeqCst);
            let delete = DeleteLeaseRequest {
                id: lease.clone(),
                sync: true,
            };
            // It returns only once the collection has finished, which the stall prevents.
            Ok::<_, SandboxError>(tokio::spawn(async move {
                let mut call = tonic::Request::new(delete);
                call.set_timeout(GC_WAIT);
                let call = namespaced(call, None);
                tokio::time::timeout(GC_WAIT, leases.delete(call)).await
            }))
        })?;
        let stalled = process::poll(SETUP_TIMEOUT, Duration::from_millis(20), || {
            (self.stalled_lists() > 0 || delete.is_finished()).then_some(())
        });
        if stalled.is_none() || self.stalled_lists() == 0 {
            let outcome = if delete.is_finished() {
                format!("{:?}", runtime.block_on(delete))
            } else {
                "still waiting".to_owned()
            };
            return Err(failed(format!(
                "containerd's garbage collector did not call Walk on {} after the lease was deleted with sync (the delete: {outcome})",
                self.name
            )));
        }
        Ok(())
    }
}

impl Drop for RemoteSnapshotter {
    fn drop(&mut self) {
        // Drops every task: the server, its connections and the stalled call with them.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A request in the wedge's namespace, under `lease` when given.
fn request<T>(message: T, lease: Option<&str>) -> tonic::Request<T> {
    namespaced(tonic::Request::new(message), lease)
}

fn namespaced<T>(mut request: tonic::Request<T>, lease: Option<&str>) -> tonic::Request<T> {
    let headers = request.metadata_mut();
    headers.insert(
        "containerd-namespace",
        MetadataValue::from_static(NAMESPACE),
    );
    if let Some(lease) = lease.and_then(|l| MetadataValue::try_from(l).ok()) {
        headers.insert("containerd-lease", lease);
    }
    request
}

impl Backend {
    fn snapshots(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Info>> {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn create(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
        kind: Kind,
    ) -> Result<Vec<Mount>, Status> {
        let mut snapshots = self.snapshots();
        if snapshots.contains_key(&key) {
            return Err(Status::already_exists(format!(
                "snapshot {key} already exists"
            )));
        }
        if !parent.is_empty() && !snapshots.contains_key(&parent) {
            return Err(Status::not_found(format!(
                "parent snapshot {parent} does not exist"
            )));
        }
        let mounts = mounts(&key);
        snapshots.insert(
            key.clone(),
            Info {
                name: key,
                parent,
                kind: kind as i32,
                labels,
                ..Info::default()
            },
        );
        Ok(mounts)
    }

    fn info(&self, key: &str) -> Result<Info, Status> {
        self.snapshots()
            .get(key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))
    }

    fn commit(&self, r: CommitSnapshotRequest) -> Result<(), Status> {
        let mut snapshots = self.snapshots();
        let mut info = snapshots
            .remove(&r.key)
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.key)))?;
        info.name = r.name.clone();
        info.kind = Kind::Committed as i32;
        info.labels.extend(r.labels);
        snapshots.insert(r.name, info);
        Ok(())
    }

    fn update(&self, r: UpdateSnapshotRequest) -> Result<UpdateSnapshotResponse, Status> {
        let new = r
            .info
            .ok_or_else(|| Status::invalid_argument("an update needs the snapshot's info"))?;
        let mut snapshots = self.snapshots();
        let info = snapshots
            .get_mut(&new.name)
            .ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", new.name)))?;
        info.labels = new.labels;
        Ok(UpdateSnapshotResponse {
            info: Some(info.clone()),
        })
    }

    fn remove(&self, key: &str) -> Result<(), Status> {
        self.snapshots()
            .remove(key)
            .map(drop)
            .ok_or_else(|| Status::not_found(format!("snapshot {key} does not exist")))
    }

    /// Every snapshot in one message, or, the first time after [`RemoteSnapshotter::wedge`]
    /// armed it, no message and no end: the stall.
    fn list(&self) -> BoxStream<ListSnapshotsResponse> {
        if self.stall_next_list.swap(false, Ordering::SeqCst) {
            self.stalled_lists.fetch_add(1, Ordering::SeqCst);
            return Box::pin(tokio_stream::pending());
        }
        self.answered_lists.fetch_add(1, Ordering::SeqCst);
        let info = self.snapshots().values().cloned().collect();
        Box::pin(tokio_stream::iter([Ok(ListSnapshotsResponse { info })]))
    }
}

/// Where a snapshot would be mounted from; nothing mounts it in these tests.
fn mounts(key: &str) -> Vec<Mount> {
    vec![Mount {
        r#type: "bind".into(),
        source: format!("/var/lib/remote-snapshotter/{key}"),
        target: String::new(),
        options: vec!["rbind".into(), "rw".into()],
    }]
}

/// The gRPC service, routed by path.
#[derive(Debug, Clone)]
struct Snapshots(Arc<Backend>);

impl NamedService for Snapshots {
    const NAME: &'static str = SERVICE;
}

impl Service<http::Request<Body>> for Snapshots {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let backend = self.0.clone();
        let method = req
            .uri()
            .path()
            .strip_prefix(&format!("/{SERVICE}/"))
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            let b = backend;
            Ok(match method.as_str() {
                "Prepare" => {
                    unary(req, move |r: PrepareSnapshotRequest| {
                        b.create(r.key, r.parent, r.labels, Kind::Active)
                            .map(|mounts| PrepareSnapshotResponse { mounts })
                    })
                    .await
                }
                "View" => {
                    unary(req, move |r: ViewSnapshotRequest| {
                        b.create(r.key, r.parent, r.labels, Kind::View)
                            .map(|mounts| ViewSnapshotResponse { mounts })
                    })
                    .await
                }
                "Mounts" => {
                    unary(req, move |r: MountsRequest| {
                        b.info(&r.key).map(|_| MountsResponse {
                            mounts: mounts(&r.key),
                        })
                    })
                    .await
                }
                "Commit" => unary(req, move |r: CommitSnapshotRequest| b.commit(r)).await,
                "Remove" => unary(req, move |r: RemoveSnapshotRequest| b.remove(&r.key)).await,
                "Stat" => {
                    unary(req, move |r: StatSnapshotRequest| {
                        b.info(&r.key)
                            .map(|info| StatSnapshotResponse { info: Some(info) })
                    })
                    .await
                }
                "Update" => unary(req, move |r: UpdateSnapshotRequest| b.update(r)).await,
                "Usage" => {
                    unary(req, move |r: UsageRequest| {
                        b.info(&r.key).map(|_| UsageResponse { size: 0, inodes: 1 })
                    })
                    .await
                }
                "Cleanup" => unary(req, move |_: CleanupRequest| Ok(())).await,
                "List" => {
                    Grpc::new(tonic_prost::ProstCodec::default())
                        .server_streaming(Handler(move |_: ListSnapshotsRequest| Ok(b.list())), req)
                        .await
                }
                _ => Status::unimplemented(format!("{SERVICE}/{method}")).into_http(),
            })
        })
    }
}

/// One unary call, answered by `handle`.
async fn unary<Req, Resp, F>(req: http::Request<Body>, handle: F) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Req) -> Result<Resp, Status> + Send + 'static,
{
    Grpc::new(tonic_prost::ProstCodec::default())
        .unary(Handler(handle), req)
        .await
}

/// A call's handler as the `tower` service that `tonic::server::Grpc` drives.
struct Handler<F>(F);

impl<Req, Resp, F> Service<tonic::Request<Req>> for Handler<F>
where
    F: FnMut(Req) -> Result<Resp, Status>,
{
    type Response = tonic::Response<Resp>;
    type Error = Status;
    type Future = std::future::Ready<Result<tonic::Response<Resp>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        std::future::ready((self.0)(request.into_inner()).map(tonic::Response::new))
    }
}
