//! The reporter's edge: the four Kubernetes API calls it makes, and what their failures mean
//! for retrying. RBAC grants exactly these (`deploy/kubernetes/rbac.yaml`).

use k8s_openapi::api::core::v1::{Event, Node};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::Value;

use super::report::{COMPONENT, CONDITION_TYPE, Condition, EVENT_NAMESPACE};

/// A failed call, sorted by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API server is unreachable, overloaded or failing: try again later.
    #[error("{0}")]
    Transient(String),
    /// The API server refused the request itself: sending it again will not help.
    #[error("{0}")]
    Refused(String),
    /// The object does not exist (a node not registered, an event expired).
    #[error("{0}")]
    NotFound(String),
    /// The object exists already (a create that went through before its answer was lost).
    #[error("{0}")]
    AlreadyExists(String),
}

impl ApiError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ApiError::Transient(_))
    }

    /// Sorts a kube error; `what` names the call, `grant` the RBAC rule it needs.
    fn of(what: &str, grant: &str, e: kube::Error) -> Self {
        let kube::Error::Api(status) = e else {
            return ApiError::Transient(format!("{what}: {e}"));
        };
        let detail = format!("{what}: HTTP {} {}", status.code, status.message.trim());
        match status.code {
            404 => ApiError::NotFound(detail),
            409 => ApiError::AlreadyExists(detail),
            // Credentials and RBAC can be fixed while the agent runs: keep trying, slowly.
            401 => ApiError::Transient(format!(
                "{detail}; the service account token was not accepted (is it mounted and current?)"
            )),
            403 => ApiError::Transient(format!(
                "{detail}; grant {grant} to the observer's service account (deploy/kubernetes/rbac.yaml)"
            )),
            408 | 429 => ApiError::Transient(detail),
            code if code >= 500 || code == 0 => ApiError::Transient(detail),
            _ => ApiError::Refused(detail),
        }
    }
}

/// The node the agent runs on, and the events about it.
#[derive(Clone)]
pub struct NodeApi {
    node: String,
    nodes: Api<Node>,
    events: Api<Event>,
}

impl NodeApi {
    pub fn new(client: Client, node: &str) -> Self {
        NodeApi {
            node: node.to_owned(),
            nodes: Api::all(client.clone()),
            events: Api::namespaced(client, EVENT_NAMESPACE),
        }
    }

    fn params() -> PatchParams {
        PatchParams {
            field_manager: Some(COMPONENT.to_owned()),
            ..PatchParams::default()
        }
    }

    /// The condition as the node has it now (`GET nodes/{name}`), so that a restarted agent
    /// keeps its transition time; `None` if the node has none, or one that says `Unknown`.
    pub async fn condition(&self) -> Result<Option<Condition>, ApiError> {
        let node = self.nodes.get(&self.node).await.map_err(|e| {
            match ApiError::of(&format!("GET node {}", self.node), "get on nodes", e) {
                ApiError::NotFound(detail) => ApiError::Transient(format!(
                    "{detail}; NODE_NAME must be the node's name (fieldRef spec.nodeName)"
                )),
                other => other,
            }
        })?;
        let found = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == CONDITION_TYPE);
        Ok(found.and_then(|c| {
            let unhealthy = match c.status.as_str() {
                "True" => true,
                "False" => false,
                _ => return None,
            };
            Some(Condition {
                unhealthy,
                reason: c.reason.unwrap_or_default(),
                message: c.message.unwrap_or_default(),
                last_transition: c.last_transition_time?.0,
            })
        }))
    }

    /// `PATCH nodes/{name}/status` with a strategic merge.
    pub async fn patch_condition(&self, patch: &Value) -> Result<(), ApiError> {
        self.nodes
            .patch_status(&self.node, &Self::params(), &Patch::Strategic(patch))
            .await
            .map(drop)
            .map_err(|e| {
                ApiError::of(
                    &format!("PATCH node {} status", self.node),
                    "patch on nodes/status",
                    e,
                )
            })
    }

    /// `POST events`.
    pub async fn create_event(&self, event: &Event) -> Result<(), ApiError> {
        self.events
            .create(&PostParams::default(), event)
            .await
            .map(drop)
            .map_err(|e| {
                ApiError::of(
                    &format!(
                        "POST event {}",
                        event.metadata.name.as_deref().unwrap_or("")
                    ),
                    "create on events",
                    e,
                )
            })
    }

    /// `PATCH events/{name}` with a strategic merge: a repeat folded into an event.
    pub async fn patch_event(&self, name: &str, patch: &Value) -> Result<(), ApiError> {
        self.events
            .patch(name, &Self::params(), &Patch::Strategic(patch))
            .await
            .map(drop)
            .map_err(|e| ApiError::of(&format!("PATCH event {name}"), "patch on events", e))
    }
}
