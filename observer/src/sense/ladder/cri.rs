//! The two CRI calls the ladder makes, `RuntimeService/Status` and `ListPodSandbox`, over
//! containerd's own socket (its CRI plugin serves `runtime.v1` there).
//!
//! containerd-client carries no CRI API, so the messages are declared here, by hand, with
//! the field numbers of `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`. Only the fields the
//! probes read are declared: protobuf skips the others, so a newer CRI stays compatible.

use tonic::{Request, Status, client::Grpc, codegen::http::uri::PathAndQuery, transport::Channel};

const STATUS: &str = "/runtime.v1.RuntimeService/Status";
const LIST_POD_SANDBOX: &str = "/runtime.v1.RuntimeService/ListPodSandbox";

/// `StatusRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {
    #[prost(bool, tag = "1")]
    pub verbose: bool,
}

/// `RuntimeCondition`: `RuntimeReady` and `NetworkReady`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuntimeCondition {
    #[prost(string, tag = "1")]
    pub r#type: String,
    #[prost(bool, tag = "2")]
    pub status: bool,
    #[prost(string, tag = "3")]
    pub reason: String,
}

/// `RuntimeStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuntimeStatus {
    #[prost(message, repeated, tag = "1")]
    pub conditions: Vec<RuntimeCondition>,
}

/// `StatusResponse`, without its verbose `info` map.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RuntimeStatus>,
}

/// `PodSandboxStateValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStateValue {
    #[prost(int32, tag = "1")]
    pub state: i32,
}

/// `PodSandboxFilter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxFilter {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub state: Option<PodSandboxStateValue>,
}

/// `ListPodSandboxRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<PodSandboxFilter>,
}

/// `PodSandbox`, its ID only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
}

/// `ListPodSandboxResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

async fn unary<Q, A>(channel: Channel, path: &'static str, request: Q) -> Result<A, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    A: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Q, A>::default();
    grpc.unary(
        Request::new(request),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// CRI `Status`: the runtime's conditions, as `type=status` pairs.
pub async fn status(channel: Channel) -> Result<String, Status> {
    let reply: StatusResponse = unary(channel, STATUS, StatusRequest { verbose: false }).await?;
    let conditions: Vec<String> = reply
        .status
        .unwrap_or_default()
        .conditions
        .iter()
        .map(|c| format!("{}={}", c.r#type, c.status))
        .collect();
    Ok(conditions.join(" "))
}

/// CRI `ListPodSandbox` of the ready sandboxes (what the kubelet's relist asks), as a count.
pub async fn list_pod_sandbox(channel: Channel) -> Result<usize, Status> {
    let request = ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            id: String::new(),
            // SANDBOX_READY = 0.
            state: Some(PodSandboxStateValue { state: 0 }),
        }),
    };
    let reply: ListPodSandboxResponse = unary(channel, LIST_POD_SANDBOX, request).await?;
    Ok(reply.items.len())
}
