//! The probe ladder: below `Version()` (which [`super::probe`] asks over a fresh connection
//! each time), one call per layer of containerd, each with its own deadline and period.
//!
//! | layer | call | what it exercises |
//! |---|---|---|
//! | `cri` | CRI `RuntimeService/Status` | the CRI plugin's server; `Unimplemented`: the plugin is not loaded |
//! | `sandboxes` | CRI `ListPodSandbox` | the kubelet's relist path |
//! | `metadata_read` | `Containers.List` in `k8s.io` | a bbolt read transaction |
//! | `metadata_write` | a lease created and deleted in the observer's namespace | a bbolt write transaction and its fsync |
//! | `snapshots` | `Snapshots.Remove` of an absent key | the snapshotter's lock (see below) |
//! | `tasks` | `Tasks.List` in `k8s.io` | every shim's `State` |
//!
//! The snapshots call: in containerd's metadata snapshotter (`metadata/snapshot.go`), the
//! garbage collector holds the snapshotter's lock (`s.l.Lock()`) for its whole pass,
//! backend calls included (containerd #13798, where a stalled proxy snapshotter held it for
//! hours). `Stat`, `Usage`, `Mounts` and `Walk` never take that lock, so they answer through
//! the wedge. `Prepare`, `View`, `Commit`, `Update` and `Remove` take it (`s.l.RLock()`),
//! and of those only `Remove` of a key that does not exist changes nothing: it takes the
//! lock, opens a bbolt write transaction (through the metadata database's GC lock too),
//! finds no key, rolls back and answers `NotFound`, which is this layer's success.
//!
//! The deeper layers share one kept-open gRPC channel: they test containerd's handlers, not
//! its accept loop, which the `Version()` probe's fresh connection and the accept-queue
//! sensor watch. A channel that fails to connect is dropped and made again next time.
//!
//! The lease of `metadata_write` carries containerd's `containerd.io/gc.expire` label, so a
//! lease the observer could not delete (it died between the two calls) expires by itself.

pub mod cri;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use containerd_client::{
    services::v1::{
        CreateRequest, DeleteRequest, ListContainersRequest, ListTasksRequest,
        containers_client::ContainersClient,
        leases_client::LeasesClient,
        snapshots::{RemoveSnapshotRequest, snapshots_client::SnapshotsClient},
        tasks_client::TasksClient,
    },
    types::v1::Status as TaskStatus,
};
use tokio::sync::Mutex;
use tonic::{Code, Request, transport::Channel};

use crate::judge::{
    detector::ProbeFailure,
    layer::{Layer, SilentTask},
};

/// The namespace the kubelet's pods and containers live in.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The observer's own namespace, for the lease and the snapshot key it probes with.
pub const OBSERVER_NAMESPACE: &str = "containerd-observer";
/// The snapshot key the `snapshots` layer removes; it never exists.
const ABSENT_SNAPSHOT: &str = "containerd-observer-probe-absent";
/// A container ID no container has: the metadata read lists nothing, cheaply.
const ABSENT_CONTAINER: &str = "containerd-observer-probe-none";
/// containerd's garbage collector removes a lease with this label once the time passes.
const GC_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// How long a probe lease may outlive a dead observer.
const LEASE_EXPIRY: Duration = Duration::from_secs(300);

/// One layer's timing: how often it is asked, and how long an answer may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerTiming {
    pub period: Duration,
    pub deadline: Duration,
}

/// The timing of a deeper layer, from the base period (`--ladder-interval`). The reads run
/// every base period; the writes, the snapshotter call and `Tasks.List` (which waits 2 s
/// per silent shim inside containerd) every two. Deadlines are well above a healthy
/// answer's milliseconds and below the kubelet's own (CRI 2 min, relist 3 min).
pub fn timing(layer: Layer, base: Duration) -> LayerTiming {
    let (periods, deadline_s) = match layer {
        Layer::Version => (1, 1),
        Layer::Cri => (1, 2),
        Layer::Sandboxes => (1, 3),
        Layer::MetadataRead => (1, 2),
        Layer::MetadataWrite => (2, 3),
        Layer::Snapshots => (2, 3),
        Layer::Tasks => (2, 6),
    };
    LayerTiming {
        period: base * periods,
        deadline: Duration::from_secs(deadline_s),
    }
}

/// What one probe of a deeper layer found.
#[derive(Debug, Clone)]
pub struct LayerResult {
    pub layer: Layer,
    pub started: Instant,
    pub started_wall: SystemTime,
    pub latency: Duration,
    pub outcome: LayerOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Answered within the deadline; `detail` says what (for `tasks`, silent shims too).
    Answered {
        detail: String,
        silent_tasks: Vec<SilentTask>,
    },
    /// The running containerd does not serve this layer (a configuration fact).
    Unsupported(String),
    Failed(ProbeFailure, String),
}

impl LayerOutcome {
    /// The result's name in `/status` and the metrics.
    pub fn name(&self) -> &'static str {
        match self {
            LayerOutcome::Answered { .. } => "ok",
            LayerOutcome::Unsupported(_) => "unsupported",
            LayerOutcome::Failed(ProbeFailure::Timeout, _) => "timeout",
            LayerOutcome::Failed(ProbeFailure::Refused, _) => "refused",
            LayerOutcome::Failed(ProbeFailure::Error, _) => "error",
            LayerOutcome::Failed(ProbeFailure::ObserverSide, _) => "observer_side",
        }
    }
}

/// The ladder's connection to containerd and what its calls need.
#[derive(Debug)]
pub struct Ladder {
    socket: PathBuf,
    snapshotter: String,
    channel: Mutex<Option<Channel>>,
    leases: AtomicU64,
}

impl Ladder {
    pub fn new(socket: &Path, snapshotter: &str) -> Arc<Ladder> {
        Arc::new(Ladder {
            socket: socket.to_path_buf(),
            snapshotter: snapshotter.to_owned(),
            channel: Mutex::new(None),
            leases: AtomicU64::new(0),
        })
    }

    /// Probes `layer` within `deadline`, connecting first if need be.
    pub async fn probe(&self, layer: Layer, deadline: Duration) -> LayerResult {
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let outcome = match tokio::time::timeout(deadline, self.call(layer)).await {
            Ok(outcome) => outcome,
            Err(_) => LayerOutcome::Failed(
                ProbeFailure::Timeout,
                format!("no answer within {}", humantime::format_duration(deadline)),
            ),
        };
        if matches!(outcome, LayerOutcome::Failed(ProbeFailure::Refused, _)) {
            *self.channel.lock().await = None;
        }
        LayerResult {
            layer,
            started,
            started_wall,
            latency: started.elapsed(),
            outcome,
        }
    }

    async fn channel(&self) -> Result<Channel, LayerOutcome> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref() {
            return Ok(channel.clone());
        }
        let channel = containerd_client::connect(&self.socket)
            .await
            .map_err(|e| {
                // The observer's own exhaustion is no evidence against containerd.
                let failure = if crate::sense::probe::io_error_in(&e)
                    .and_then(crate::sense::probe::observer_side)
                    .is_some()
                {
                    ProbeFailure::ObserverSide
                } else {
                    ProbeFailure::Refused
                };
                LayerOutcome::Failed(
                    failure,
                    format!("cannot connect to {}: {e}", self.socket.display()),
                )
            })?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn call(&self, layer: Layer) -> LayerOutcome {
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(outcome) => return outcome,
        };
        let answered = |detail: String| LayerOutcome::Answered {
            detail,
            silent_tasks: Vec::new(),
        };
        let result = match layer {
            // Asked by the Version() probe itself, over a fresh connection.
            Layer::Version => return answered("asked by the Version() probe".into()),
            Layer::Cri => cri::status(channel).await.map(answered),
            Layer::Sandboxes => cri::list_pod_sandbox(channel)
                .await
                .map(|n| answered(format!("{n} ready pod sandbox(es)"))),
            Layer::MetadataRead => {
                let request = ListContainersRequest {
                    filters: vec![format!("id=={ABSENT_CONTAINER}")],
                };
                ContainersClient::new(channel)
                    .list(namespaced(request, K8S_NAMESPACE))
                    .await
                    .map(|_| answered("the container list answered".into()))
            }
            Layer::MetadataWrite => self.write_lease(channel).await.map(answered),
            Layer::Snapshots => {
                let request = RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: ABSENT_SNAPSHOT.into(),
                };
                match SnapshotsClient::new(channel)
                    .remove(namespaced(request, OBSERVER_NAMESPACE))
                    .await
                {
                    Err(status) if status.code() == Code::NotFound => Ok(answered(format!(
                        "snapshotter {} took its lock and answered NotFound",
                        self.snapshotter
                    ))),
                    Err(status)
                        if status.code() == Code::InvalidArgument
                            && status.message().contains("not loaded") =>
                    {
                        return LayerOutcome::Unsupported(format!(
                            "snapshotter {} is not loaded in this containerd; name the one the CRI plugin uses with --snapshotter",
                            self.snapshotter
                        ));
                    }
                    Err(status) => Err(status),
                    Ok(_) => Ok(answered(format!(
                        "snapshotter {} removed {ABSENT_SNAPSHOT}",
                        self.snapshotter
                    ))),
                }
            }
            Layer::Tasks => return list_tasks(channel).await,
        };
        match result {
            Ok(outcome) => outcome,
            Err(status) => classify(layer, &status),
        }
    }

    /// Creates a lease that expires by itself, then deletes it.
    async fn write_lease(&self, channel: Channel) -> Result<String, tonic::Status> {
        let n = self.leases.fetch_add(1, Ordering::Relaxed);
        let id = format!("containerd-observer-probe-{}-{n}", std::process::id());
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + LEASE_EXPIRY);
        let mut client = LeasesClient::new(channel);
        let create = CreateRequest {
            id: id.clone(),
            labels: HashMap::from([(GC_EXPIRE_LABEL.to_owned(), expire.to_string())]),
        };
        client
            .create(namespaced(create, OBSERVER_NAMESPACE))
            .await?;
        let delete = DeleteRequest {
            id: id.clone(),
            sync: false,
        };
        client
            .delete(namespaced(delete, OBSERVER_NAMESPACE))
            .await?;
        Ok(format!("lease {id} created and deleted"))
    }
}

/// `Tasks.List` in `k8s.io`: the tasks containerd reported `UNKNOWN` are those whose shim
/// did not answer its `State` call within containerd's own deadline (2 s on 1.6).
async fn list_tasks(channel: Channel) -> LayerOutcome {
    let request = ListTasksRequest {
        filter: String::new(),
    };
    let reply = match TasksClient::new(channel)
        .list(namespaced(request, K8S_NAMESPACE))
        .await
    {
        Ok(reply) => reply.into_inner(),
        Err(status) => return classify(Layer::Tasks, &status),
    };
    let silent_tasks: Vec<SilentTask> = reply
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Unknown as i32)
        .map(|t| {
            // containerd 1.6 leaves container_id empty for a task whose State failed; the
            // init process's ID is the container's.
            let id = if t.container_id.is_empty() {
                t.id.clone()
            } else {
                t.container_id.clone()
            };
            SilentTask {
                shim_pid: shim_pid(K8S_NAMESPACE, &id),
                id,
            }
        })
        .collect();
    LayerOutcome::Answered {
        detail: format!(
            "{} task(s), {} with a silent shim",
            reply.tasks.len(),
            silent_tasks.len()
        ),
        silent_tasks,
    }
}

fn namespaced<T>(message: T, namespace: &'static str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(namespace),
    );
    request
}

/// A gRPC error as a probe result. `Unimplemented` from a CRI call means the CRI plugin is
/// not loaded: a fact of containerd's configuration, never a hang.
fn classify(layer: Layer, status: &tonic::Status) -> LayerOutcome {
    if status.code() == Code::Unimplemented && matches!(layer, Layer::Cri | Layer::Sandboxes) {
        return LayerOutcome::Unsupported(
            "containerd does not serve the CRI API (Unimplemented): its CRI plugin is not loaded (disabled_plugins, or it failed to load: see containerd's log)".into(),
        );
    }
    if let Some(errno) =
        crate::sense::probe::io_error_in(status).and_then(crate::sense::probe::observer_side)
    {
        return LayerOutcome::Failed(
            ProbeFailure::ObserverSide,
            format!("{} could not be sent ({errno}): {status}", layer.call()),
        );
    }
    let refused = status.code() == Code::Unavailable
        && error_chain(status).iter().any(|e| {
            e.contains("Connection refused")
                || e.contains("No such file")
                || e.contains("os error 2")
        });
    let failure = if refused {
        ProbeFailure::Refused
    } else {
        ProbeFailure::Error
    };
    LayerOutcome::Failed(
        failure,
        format!(
            "{} returned {}: {}",
            layer.call(),
            status.code(),
            status.message()
        ),
    )
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        out.push(s.to_string());
        source = s.source();
    }
    out
}

/// The PID of the shim serving task `id` in `namespace`, from the shims' command lines
/// (`containerd-shim-runc-v2 -namespace NS -id ID -address ...`). A container grouped under
/// its pod's shim is served by a shim named after the pod's sandbox, and is not found here.
pub fn shim_pid(namespace: &str, id: &str) -> Option<u32> {
    let needle = format!("-namespace\0{namespace}\0-id\0{id}\0");
    let needle = needle.as_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_shims_run_half_as_often_as_reads() {
        let base = Duration::from_secs(5);
        assert_eq!(timing(Layer::Cri, base).period, base);
        assert_eq!(timing(Layer::MetadataWrite, base).period, base * 2);
        // Tasks.List waits 2 s per silent shim inside containerd: its deadline must exceed it.
        assert!(timing(Layer::Tasks, base).deadline > Duration::from_secs(2));
    }

    #[test]
    fn unimplemented_cri_is_a_configuration_fact() {
        let status = tonic::Status::unimplemented("unknown service runtime.v1.RuntimeService");
        assert!(matches!(
            classify(Layer::Cri, &status),
            LayerOutcome::Unsupported(_)
        ));
        assert!(matches!(
            classify(Layer::Tasks, &status),
            LayerOutcome::Failed(ProbeFailure::Error, _)
        ));
    }

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_refused() {
        let dir = std::env::temp_dir().join(format!("observer-ladder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ladder = Ladder::new(&dir.join("missing.sock"), "overlayfs");
        let result = ladder
            .probe(Layer::MetadataRead, Duration::from_secs(1))
            .await;
        assert!(
            matches!(
                result.outcome,
                LayerOutcome::Failed(ProbeFailure::Refused, _)
            ),
            "{:?}",
            result.outcome
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
