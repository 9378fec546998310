//! The reporter against a stand-in API server on 127.0.0.1 that records every request: exact
//! paths, patch types and bodies, folding of repeats, and retries while the server fails or
//! is unreachable. Also the fixtures `report`'s tests share.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State as AxumState,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse as _, Response},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    ClusterAccess, Detection, Options, TOKEN_FILE,
    report::{Observable, Observed},
};
use crate::{
    judge::detector::{Source, State},
    report::status::{ActionRecord, EvidenceRecord, VerdictRecord},
};

/// A status document reduced to what the reporter reads.
#[derive(Debug, Clone)]
pub(super) struct Doc {
    pub state: State,
    pub verdicts: VecDeque<VerdictRecord>,
    pub actions: VecDeque<ActionRecord>,
}

impl Doc {
    pub fn new(state: State) -> Self {
        Doc {
            state,
            verdicts: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }
}

impl Observable for Doc {
    fn observed(&self) -> Observed<'_> {
        Observed {
            state: self.state,
            unit: "containerd.service",
            verdicts: &self.verdicts,
            actions: &self.actions,
        }
    }
}

pub(super) fn verdict(at: &str, state: State, detail: &str) -> VerdictRecord {
    VerdictRecord {
        at: at.to_owned(),
        state,
        pid: Some(41),
        detection_latency_ms: 0.5,
        evidence: vec![EvidenceRecord {
            source: Source::Probe,
            at: at.to_owned(),
            detail: detail.to_owned(),
        }],
        layer: None,
        repeat: 1,
        silent_tasks: Vec::new(),
    }
}

pub(super) fn action(at: &str, action: &'static str, result: &str, count: u32) -> ActionRecord {
    ActionRecord {
        at: at.to_owned(),
        action,
        reason: State::Hung,
        evidence: vec![],
        result: result.to_owned(),
        count,
    }
}

const NODE: &str = "node-a";
const TOKEN: &str = "stand-in-token";
const RESTARTED: &str =
    "restarted containerd.service through systemd: job done in 74 ms, new PID 42";

#[derive(Debug, Clone)]
struct Recorded {
    at: Instant,
    method: Method,
    path: String,
    query: Option<String>,
    content_type: String,
    authorization: String,
    body: Value,
}

impl Recorded {
    fn is(&self, method: Method, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// The stand-in API server's state and script.
#[derive(Default)]
struct StandIn {
    requests: Mutex<Vec<Recorded>>,
    /// This many requests are answered 500 first.
    fail_first: AtomicUsize,
    /// Conditions the node has before the reporter writes.
    conditions: Mutex<Vec<Value>>,
    /// Answer 404 to event patches, as for an expired event.
    events_expired: AtomicBool,
    /// Answer 422 to the next event create.
    refuse_next_event: AtomicBool,
}

impl StandIn {
    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn node(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE},
            "status": {"conditions": *self.conditions.lock().unwrap()},
        })
    }
}

fn api_status(code: u16, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code, "message": message})
}

async fn answer(
    AxumState(stand_in): AxumState<Arc<StandIn>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    stand_in.requests.lock().unwrap().push(Recorded {
        at: Instant::now(),
        method: method.clone(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: body.clone(),
    });
    if stand_in
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let status = api_status(500, "stand-in failure");
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(status)).into_response();
    }
    let path = uri.path();
    let node_path = format!("/api/v1/nodes/{NODE}");
    let events_path = "/api/v1/namespaces/default/events";
    let node_read = method == Method::GET && path == node_path;
    let status_patched = method == Method::PATCH && path == format!("{node_path}/status");
    if node_read || status_patched {
        Json(stand_in.node()).into_response()
    } else if method == Method::POST && path == events_path {
        if stand_in.refuse_next_event.swap(false, Ordering::SeqCst) {
            let status = api_status(422, "Event is invalid");
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(status)).into_response();
        }
        (StatusCode::CREATED, Json(body)).into_response()
    } else if method == Method::PATCH
        && let Some(name) = path.strip_prefix(&format!("{events_path}/"))
    {
        if stand_in.events_expired.load(Ordering::SeqCst) {
            let status = api_status(404, &format!("events \"{name}\" not found"));
            return (StatusCode::NOT_FOUND, Json(status)).into_response();
        }
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": "default"},
            "involvedObject": {"kind": "Node", "name": NODE},
        });
        Json(event).into_response()
    } else {
        (StatusCode::NOT_FOUND, Json(api_status(404, "not found"))).into_response()
    }
}

/// Serves the stand-in on `addr` (a free port when `None`).
async fn serve(
    stand_in: Arc<StandIn>,
    addr: Option<SocketAddr>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener =
        tokio::net::TcpListener::bind(addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(answer).with_state(stand_in);
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, server)
}

/// A token file of its own for each test.
fn access(addr: SocketAddr, test: &str) -> ClusterAccess {
    let dir = std::env::temp_dir().join(format!("observer-kube-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file: PathBuf = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    ClusterAccess {
        node: NODE.into(),
        api_url: format!("http://{addr}"),
        token_file,
        ca_file: None,
    }
}

fn quick() -> Options {
    Options {
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        heartbeat: Duration::from_secs(3600),
        max_queued_events: 100,
    }
}

/// Waits until the recorded requests satisfy `done`.
async fn wait_for(
    stand_in: &StandIn,
    what: &str,
    done: impl Fn(&[Recorded]) -> bool,
) -> Vec<Recorded> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let requests = stand_in.requests();
        if done(&requests) {
            return requests;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; requests: {requests:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn condition_patches(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.is(Method::PATCH, "/api/v1/nodes/node-a/status"))
        .collect()
}

fn creates(requests: &[Recorded]) -> Vec<&Recorded> {
    requests
        .iter()
        .filter(|r| r.is(Method::POST, "/api/v1/namespaces/default/events"))
        .collect()
}

fn our_condition(patch: &Recorded) -> &Value {
    let conditions = patch.body["status"]["conditions"].as_array().unwrap();
    assert_eq!(
        conditions.len(),
        1,
        "only our condition is sent: {:?}",
        patch.body
    );
    &conditions[0]
}

#[tokio::test]
async fn the_condition_and_events_reach_the_api_server() {
    let stand_in = Arc::new(StandIn::default());
    let (addr, server) = serve(stand_in.clone(), None).await;
    let (tx, rx) = watch::channel(Doc::new(State::Starting));
    let reporter = tokio::spawn(super::run(
        access(addr, "paths"),
        quick(),
        rx,
        CancellationToken::new(),
    ));

    tx.send_modify(|d| {
        d.state = State::Hung;
        d.verdicts.push_back(verdict(
            "2030-01-01T00:00:01Z",
            State::Hung,
            "a connection waited 1.2 s in the accept queue; probe timed out",
        ));
    });
    let requests = wait_for(&stand_in, "the condition and the hung event", |r| {
        !condition_patches(r).is_empty() && !creates(r).is_empty()
    })
    .await;
    assert!(
        requests[0].is(Method::GET, "/api/v1/nodes/node-a"),
        "the node's own view is read first: {requests:#?}"
    );
    for r in &requests {
        assert_eq!(r.authorization, format!("Bearer {TOKEN}"), "{r:?}");
    }
    let patch = condition_patches(&requests)[0];
    assert_eq!(patch.content_type, "application/strategic-merge-patch+json");
    // kube writes `?&fieldManager=...`; the API server reads the parameters alike.
    let query: Vec<&str> = patch
        .query
        .iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
        .collect();
    assert_eq!(query, ["fieldManager=containerd-observer"]);
    let condition = our_condition(patch);
    assert_eq!(condition["type"], "ContainerRuntimeUnhealthy");
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "ContainerdHung");
    assert_eq!(
        condition["message"],
        "containerd.service hung: a connection waited 1.2 s in the accept queue; probe timed out"
    );
    assert!(condition["lastHeartbeatTime"].is_string(), "{condition}");
    let hung_since = condition["lastTransitionTime"].clone();
    assert_eq!(hung_since, "2030-01-01T00:00:01Z", "the verdict's time");

    let event = &creates(&requests)[0];
    assert_eq!(event.content_type, "application/json");
    let body = &event.body;
    assert_eq!(body["reason"], "ContainerdHung");
    assert_eq!(body["type"], "Warning");
    assert_eq!(body["count"], 1);
    assert_eq!(
        body["involvedObject"],
        json!({"kind": "Node", "name": NODE, "uid": NODE})
    );
    assert_eq!(
        body["source"],
        json!({"component": "containerd-observer", "host": NODE})
    );
    assert_eq!(body["metadata"]["namespace"], "default");
    assert!(
        body["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("node-a."),
        "{body}"
    );

    // A restart (still True: the transition time stays), then healthy (False: it moves).
    tx.send_modify(|d| {
        d.state = State::Recovering;
    });
    wait_for(&stand_in, "the recovering condition", |r| {
        condition_patches(r).len() == 2
    })
    .await;
    tx.send_modify(|d| {
        d.state = State::Healthy;
        d.actions
            .push_back(action("2030-01-01T00:00:02Z", "restart", RESTARTED, 1));
        d.verdicts.push_back(verdict(
            "2030-01-01T00:00:03Z",
            State::Healthy,
            "Version() answered",
        ));
    });
    let requests = wait_for(&stand_in, "healthy, and two more events", |r| {
        condition_patches(r).len() == 3 && creates(r).len() == 3
    })
    .await;
    let patches = condition_patches(&requests);
    let recovering = our_condition(patches[1]);
    assert_eq!(recovering["reason"], "ContainerdRecovering");
    assert_eq!(recovering["status"], "True");
    assert_eq!(recovering["lastTransitionTime"], hung_since);
    let healthy = our_condition(patches[2]);
    assert_eq!(healthy["status"], "False");
    assert_eq!(healthy["reason"], "ContainerdHealthy");
    assert_eq!(healthy["message"], "containerd.service answers its API");
    assert_eq!(healthy["lastTransitionTime"], "2030-01-01T00:00:03Z");
    let events = creates(&requests);
    assert_eq!(
        (
            events[1].body["reason"].as_str(),
            events[1].body["type"].as_str()
        ),
        (Some("ContainerdRestarted"), Some("Normal"))
    );
    assert_eq!(
        events[1].body["message"],
        format!("{RESTARTED} (verdict: hung)")
    );
    assert_eq!(events[2].body["reason"], "ContainerdHealthy");

    // Nothing new: nothing more is sent.
    tx.send_modify(|_| {});
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stand_in.requests().len(), requests.len());

    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), reporter)
        .await
        .expect("the reporter stops with the agent")
        .unwrap();
    server.abort();
}

#[tokio::test]
async fn kubelets_conditions_are_untouched_and_a_restart_keeps_the_transition_time() {
    let stand_in = Arc::new(StandIn::default());
    *stand_in.conditions.lock().unwrap() = vec![
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
               "lastTransitionTime": "2030-01-01T00:00:00Z", "lastHeartbeatTime": "2030-01-01T00:00:00Z"}),
        json!({"type": "ContainerRuntimeUnhealthy", "status": "True", "reason": "ContainerdCrashed",
               "message": "crashed before the observer restarted",
               "lastTransitionTime": "2029-12-31T23:00:00Z", "lastHeartbeatTime": "2029-12-31T23:00:00Z"}),
    ];
    let (addr, server) = serve(stand_in.clone(), None).await;
    let mut doc = Doc::new(State::Unreachable);
    doc.verdicts.push_back(verdict(
        "2030-01-01T00:00:01Z",
        State::Unreachable,
        "nobody listens",
    ));
    let (_tx, rx) = watch::channel(doc);
    let reporter = tokio::spawn(super::run(
        access(addr, "kubelet"),
        quick(),
        rx,
        CancellationToken::new(),
    ));
    let requests = wait_for(&stand_in, "the condition patch", |r| {
        !condition_patches(r).is_empty()
    })
    .await;
    let condition = our_condition(condition_patches(&requests)[0]);
    assert_eq!(condition["reason"], "ContainerdUnreachable");
    assert_eq!(
        condition["lastTransitionTime"], "2029-12-31T23:00:00Z",
        "still True since before this agent started"
    );
    reporter.abort();
    server.abort();
}

#[tokio::test]
async fn repeats_fold_into_one_event_and_an_expired_one_is_created_again() {
    let stand_in = Arc::new(StandIn::default());
    let (addr, server) = serve(stand_in.clone(), None).await;
    let mut doc = Doc::new(State::Hung);
    doc.actions
        .push_back(action("2030-01-01T00:00:01Z", "back_off", "backing off", 1));
    let (tx, rx) = watch::channel(doc);
    let reporter = tokio::spawn(super::run(
        access(addr, "fold"),
        quick(),
        rx,
        CancellationToken::new(),
    ));
    let requests = wait_for(&stand_in, "the back-off event", |r| creates(r).len() == 1).await;
    let name = requests
        .iter()
        .find(|r| r.method == Method::POST)
        .unwrap()
        .body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    tx.send_modify(|d| {
        let last = d.actions.back_mut().unwrap();
        last.count = 2;
        last.at = "2030-01-01T00:00:11Z".into();
    });
    let path = format!("/api/v1/namespaces/default/events/{name}");
    let requests = wait_for(&stand_in, "the folded repeat", |r| {
        r.iter().any(|r| r.is(Method::PATCH, &path))
    })
    .await;
    let fold = requests
        .iter()
        .find(|r| r.is(Method::PATCH, &path))
        .unwrap();
    assert_eq!(fold.content_type, "application/strategic-merge-patch+json");
    assert_eq!(fold.body["count"], 2);
    assert_eq!(fold.body["message"], "backing off (verdict: hung)");
    assert!(fold.body["lastTimestamp"].is_string(), "{}", fold.body);
    assert_eq!(creates(&requests).len(), 1, "no second event");

    stand_in.events_expired.store(true, Ordering::SeqCst);
    tx.send_modify(|d| d.actions.back_mut().unwrap().count = 3);
    let requests = wait_for(&stand_in, "a new event for the expired one", |r| {
        creates(r).len() == 2
    })
    .await;
    let again = &creates(&requests)[1].body;
    assert_eq!(again["reason"], "RestartBackingOff");
    assert_eq!(again["count"], 1);
    assert_ne!(again["metadata"]["name"], name.as_str());
    reporter.abort();
    server.abort();
}

#[tokio::test]
async fn at_shutdown_the_last_condition_is_written_whatever_the_backoff() {
    let stand_in = Arc::new(StandIn::default());
    stand_in.fail_first.store(1, Ordering::SeqCst);
    let (addr, server) = serve(stand_in.clone(), None).await;
    let (tx, rx) = watch::channel(Doc::new(State::Healthy));
    let stop = CancellationToken::new();
    let slow = Options {
        backoff_initial: Duration::from_secs(600),
        ..quick()
    };
    let reporter = tokio::spawn(super::run(access(addr, "last"), slow, rx, stop.clone()));
    // The first call fails: the reporter now waits ten minutes before it tries again.
    wait_for(&stand_in, "the first, failed call", |r| !r.is_empty()).await;
    tx.send_modify(|d| {
        d.state = State::Hung;
        d.verdicts.push_back(verdict(
            "2030-01-01T00:00:01Z",
            State::Hung,
            "a connection waited 1.2 s in the accept queue; probe timed out",
        ));
    });
    stop.cancel();
    tokio::time::timeout(super::LAST_WORDS * 2, reporter)
        .await
        .expect("the reporter ends promptly once stopped")
        .unwrap();
    let requests = stand_in.requests();
    let patches = condition_patches(&requests);
    assert_eq!(patches.len(), 1, "{requests:#?}");
    assert_eq!(our_condition(patches[0])["reason"], "ContainerdHung");
    assert_eq!(
        creates(&requests).len(),
        1,
        "the hung event too: {requests:#?}"
    );
    server.abort();
}

#[tokio::test]
async fn failures_are_retried_with_growing_waits() {
    let stand_in = Arc::new(StandIn::default());
    stand_in.fail_first.store(3, Ordering::SeqCst);
    let (addr, server) = serve(stand_in.clone(), None).await;
    let mut doc = Doc::new(State::Crashed);
    doc.verdicts.push_back(verdict(
        "2030-01-01T00:00:01Z",
        State::Crashed,
        "killed by SIGKILL",
    ));
    let (_tx, rx) = watch::channel(doc);
    let reporter = tokio::spawn(super::run(
        access(addr, "retry"),
        quick(),
        rx,
        CancellationToken::new(),
    ));
    let requests = wait_for(&stand_in, "the condition and event after three 500s", |r| {
        !condition_patches(r).is_empty() && !creates(r).is_empty()
    })
    .await;
    let gets: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.is(Method::GET, "/api/v1/nodes/node-a"))
        .collect();
    assert_eq!(gets.len(), 4, "three failures, then success: {requests:#?}");
    let waits: Vec<Duration> = gets.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (wait, backoff) in waits.iter().zip([50, 100, 200]) {
        assert!(
            *wait >= Duration::from_millis(backoff),
            "waited {wait:?}, less than the {backoff} ms backoff: {waits:?}"
        );
    }
    assert_eq!(
        our_condition(condition_patches(&requests)[0])["reason"],
        "ContainerdCrashed"
    );
    assert_eq!(condition_patches(&requests).len(), 1, "sent once it worked");
    reporter.abort();
    server.abort();
}

#[tokio::test]
async fn an_unreachable_api_server_never_holds_up_the_agent() {
    // A port nobody listens on, for now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (tx, rx) = watch::channel(Doc::new(State::Starting));
    let reporter = tokio::spawn(super::run(
        access(addr, "unreachable"),
        quick(),
        rx,
        CancellationToken::new(),
    ));

    // The agent's side: many updates, none of which waits for the reporter.
    let started = Instant::now();
    for i in 0..1000u32 {
        tx.send_modify(|d| {
            d.state = State::Hung;
            if i % 100 == 0 {
                d.verdicts.push_back(verdict(
                    &format!("2030-01-01T00:00:{:02}Z", i / 100),
                    State::Suspect,
                    &format!("suspicion {i}"),
                ));
            }
        });
    }
    tx.send_modify(|d| {
        d.verdicts.push_back(verdict(
            "2030-01-01T00:00:30Z",
            State::Hung,
            "probe timed out",
        ));
    });
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "updating the document took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!reporter.is_finished(), "the reporter keeps trying");

    let stand_in = Arc::new(StandIn::default());
    let (_, server) = serve(stand_in.clone(), Some(addr)).await;
    let requests = wait_for(&stand_in, "everything, once the API server is back", |r| {
        !condition_patches(r).is_empty() && creates(r).len() == 11
    })
    .await;
    let condition = our_condition(condition_patches(&requests)[0]);
    assert_eq!(
        condition["reason"], "ContainerdHung",
        "the latest state, not a stale one"
    );
    let reasons: Vec<&str> = creates(&requests)
        .iter()
        .map(|r| r.body["message"].as_str().unwrap())
        .collect();
    assert!(reasons[0].ends_with("suspicion 0"), "in order: {reasons:?}");
    assert!(
        reasons[10].ends_with("probe timed out"),
        "in order: {reasons:?}"
    );
    reporter.abort();
    server.abort();
}

#[tokio::test]
async fn a_refused_event_is_dropped_and_the_next_one_sent() {
    let stand_in = Arc::new(StandIn::default());
    stand_in.refuse_next_event.store(true, Ordering::SeqCst);
    let (addr, server) = serve(stand_in.clone(), None).await;
    let mut doc = Doc::new(State::Hung);
    doc.verdicts
        .push_back(verdict("2030-01-01T00:00:01Z", State::Hung, "first"));
    doc.verdicts
        .push_back(verdict("2030-01-01T00:00:02Z", State::Hung, "second"));
    let (_tx, rx) = watch::channel(doc);
    let reporter = tokio::spawn(super::run(
        access(addr, "refused"),
        quick(),
        rx,
        CancellationToken::new(),
    ));
    let requests = wait_for(&stand_in, "both creates", |r| creates(r).len() == 2).await;
    assert!(
        creates(&requests)[1].body["message"]
            .as_str()
            .unwrap()
            .ends_with("second")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        creates(&stand_in.requests()).len(),
        2,
        "the refused one is not retried"
    );
    reporter.abort();
    server.abort();
}

#[tokio::test]
async fn an_unchanged_condition_is_written_again_as_a_heartbeat() {
    let stand_in = Arc::new(StandIn::default());
    let (addr, server) = serve(stand_in.clone(), None).await;
    let (_tx, rx) = watch::channel(Doc::new(State::Healthy));
    let options = Options {
        heartbeat: Duration::from_millis(300),
        ..quick()
    };
    let reporter = tokio::spawn(super::run(
        access(addr, "heartbeat"),
        options,
        rx,
        CancellationToken::new(),
    ));
    let requests = wait_for(&stand_in, "two heartbeats", |r| {
        condition_patches(r).len() == 2
    })
    .await;
    let patches = condition_patches(&requests);
    assert!(patches[1].at - patches[0].at >= Duration::from_millis(300));
    assert_eq!(
        our_condition(patches[0])["lastTransitionTime"],
        our_condition(patches[1])["lastTransitionTime"]
    );
    assert_eq!(our_condition(patches[1])["status"], "False");
    assert!(creates(&requests).is_empty(), "a healthy start is no event");
    reporter.abort();
    server.abort();
}

#[test]
fn reporting_is_on_only_in_a_cluster_with_credentials() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let all = |_: &std::path::Path| true;
    let in_cluster: &[(&str, &str)] = &[
        ("NODE_NAME", "node-a"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ];
    let Detection::On(access) = ClusterAccess::detect(env(in_cluster), all) else {
        panic!("in a cluster");
    };
    assert_eq!(access.node, "node-a");
    assert_eq!(access.api_url, "https://10.96.0.1:443");
    assert_eq!(access.token_file, PathBuf::from(TOKEN_FILE));

    let v6: &[(&str, &str)] = &[("NODE_NAME", "n"), ("KUBERNETES_SERVICE_HOST", "fd00::1")];
    let Detection::On(access) = ClusterAccess::detect(env(v6), all) else {
        panic!("in a cluster");
    };
    assert_eq!(access.api_url, "https://[fd00::1]:443");

    let off =
        |vars, exists: fn(&std::path::Path) -> bool| match ClusterAccess::detect(env(vars), exists)
        {
            Detection::Off { why, surprising } => (why, surprising),
            Detection::On(_) => panic!("reporting should be off for {vars:?}"),
        };
    assert!(!off(&[], all).1, "outside a cluster, quietly off");
    assert!(
        off(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")], all)
            .0
            .contains("NODE_NAME")
    );
    assert!(
        off(&[("NODE_NAME", "n")], all)
            .0
            .contains("KUBERNETES_SERVICE_HOST")
    );
    let (why, surprising) = off(in_cluster, |p| !p.ends_with("token"));
    assert!(
        why.contains("automountServiceAccountToken") && surprising,
        "{why}"
    );
    let forced: &[(&str, &str)] = &[
        ("NODE_NAME", "node-a"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("OBSERVER_NO_KUBERNETES", "true"),
    ];
    assert!(!off(forced, all).1, "turned off on purpose, quietly");
    let typo: &[(&str, &str)] = &[
        ("NODE_NAME", "node-a"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("OBSERVER_NO_KUBERNETES", "ture"),
    ];
    assert!(off(typo, all).0.contains("not true or false"));
    let on_anyway: &[(&str, &str)] = &[
        ("NODE_NAME", "node-a"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("OBSERVER_NO_KUBERNETES", "false"),
    ];
    assert!(matches!(
        ClusterAccess::detect(env(on_anyway), all),
        Detection::On(_)
    ));
}
