//! Reporting to Kubernetes: a node condition and events that say what the observer sees and
//! does, for `kubectl describe node`, alerting and node-problem-detector-style remediation.
//!
//! It is on when the agent runs in a cluster: `NODE_NAME` (from the downward API) and
//! in-cluster credentials (`KUBERNETES_SERVICE_HOST` and the service account's token) are
//! there; `--no-kubernetes` (or `OBSERVER_NO_KUBERNETES=true`) turns it off. It follows the status document through
//! the agent's `watch` channel in a task of its own, so the agent never waits for the API
//! server: while the API server cannot be reached, the agent goes on protecting the node, and
//! the reporter keeps the latest condition and a bounded queue of events and retries with
//! exponential backoff.
//!
//! - [`report`]: what to say, worked out from the document with no I/O
//! - `api`: the calls that say it

mod api;
pub mod report;
#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::{
    api::{ApiError, NodeApi},
    report::{Condition, Judgement, Observable, Occurrence, Tracker},
};
use crate::report::status::StatusDocument;

/// Where Kubernetes mounts the service account's token and the cluster's CA.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Set to `true` to keep the agent from reporting even in a cluster.
pub const OFF_SWITCH: &str = "OBSERVER_NO_KUBERNETES";

/// How to reach the API server, and which node to report on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterAccess {
    pub node: String,
    /// `https://host:port`, or `http://` for a stand-in server in tests.
    pub api_url: String,
    /// Re-read as it rotates.
    pub token_file: PathBuf,
    /// The CA that signed the API server's certificate; `None` trusts the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// Whether to report, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    On(ClusterAccess),
    /// `surprising`: the environment looks half set up, which deserves a warning.
    Off {
        why: String,
        surprising: bool,
    },
}

impl ClusterAccess {
    /// Reads `NODE_NAME`, `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT` and the off
    /// switch through `var`, and checks the credential files through `exists`.
    pub fn detect(
        var: impl Fn(&str) -> Option<String>,
        exists: impl Fn(&Path) -> bool,
    ) -> Detection {
        let off = |why: String, surprising| Detection::Off { why, surprising };
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if let Some(value) = var(OFF_SWITCH) {
            match value.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => return off(format!("{OFF_SWITCH}={value}"), false),
                "0" | "false" | "no" | "off" => {}
                _ => {
                    return off(
                        format!(
                            "{OFF_SWITCH}={value} is not true or false; reporting stays off until it is"
                        ),
                        true,
                    );
                }
            }
        }
        let (node, host) = match (var("NODE_NAME"), var("KUBERNETES_SERVICE_HOST")) {
            (None, None) => return off("not running in a Kubernetes cluster".into(), false),
            (None, Some(_)) => {
                return off(
                    "running in a cluster, but NODE_NAME is not set: set it from the downward API \
                     (fieldRef spec.nodeName) to report on the node"
                        .into(),
                    true,
                );
            }
            (Some(_), None) => {
                return off(
                    "NODE_NAME is set, but KUBERNETES_SERVICE_HOST is not: there is no in-cluster \
                     API server to report to"
                        .into(),
                    true,
                );
            }
            (Some(node), Some(host)) => (node, host),
        };
        for file in [TOKEN_FILE, CA_FILE] {
            if !exists(Path::new(file)) {
                return off(
                    format!(
                        "no {file}: mount the service account's token (automountServiceAccountToken: true)"
                    ),
                    true,
                );
            }
        }
        let port = var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Detection::On(ClusterAccess {
            node,
            api_url: format!("https://{host}:{port}"),
            token_file: TOKEN_FILE.into(),
            ca_file: Some(CA_FILE.into()),
        })
    }

    fn client(&self) -> Result<kube::Client, String> {
        let url = self
            .api_url
            .parse()
            .map_err(|e| format!("`{}` is not a URL: {e}", self.api_url))?;
        let mut config = kube::Config::new(url);
        config.auth_info.token_file = Some(self.token_file.to_string_lossy().into_owned());
        if let Some(ca) = &self.ca_file {
            use rustls_pki_types::{CertificateDer, pem::PemObject as _};
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("cannot read the cluster's CA from {}: {e}", ca.display()))?;
            config.root_cert = Some(certs.into_iter().map(|c| c.to_vec()).collect());
            // kube re-reads the file as the CA rotates.
            config.root_cert_file = Some(ca.clone());
        }
        // Retries are the reporter's own (with backoff), and no call may hang for long.
        config.default_retry = false;
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(10));
        config.reset_reader_on_write = true;
        config.write_timeout = Some(Duration::from_secs(10));
        kube::Client::try_from(config)
            .map_err(|e| format!("cannot set up the Kubernetes client: {e}"))
    }
}

/// The reporter's pacing.
#[derive(Debug, Clone)]
pub struct Options {
    /// First wait after a failed call; doubles with each failure in a row.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often an unchanged condition is written again (its `lastHeartbeatTime`), as
    /// node-problem-detector does.
    pub heartbeat: Duration,
    /// Events kept while the API server cannot be reached; the oldest go first.
    pub max_queued_events: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            heartbeat: Duration::from_secs(300),
            max_queued_events: 100,
        }
    }
}

/// How long the reporter may take, once the agent stops, to write the last condition and
/// the events still queued.
pub const LAST_WORDS: Duration = Duration::from_secs(5);

/// Starts reporting what `status` carries, when the agent runs in a cluster and `turned_off`
/// (`--no-kubernetes`) is not set; returns at once, with the reporter's task to wait for.
/// The reporter stops when `stop` is cancelled (or the agent drops the document's sender),
/// after it wrote what the document last said.
pub fn spawn(
    status: watch::Receiver<StatusDocument>,
    turned_off: bool,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if turned_off {
        debug!("not reporting to Kubernetes: no-kubernetes is set");
        return None;
    }
    let detection = ClusterAccess::detect(|name| std::env::var(name).ok(), Path::exists);
    match detection {
        Detection::Off { why, surprising } => {
            if surprising {
                warn!("not reporting to Kubernetes: {why}");
            } else {
                debug!("not reporting to Kubernetes: {why}");
            }
            None
        }
        Detection::On(access) => Some(tokio::spawn(run(access, Options::default(), status, stop))),
    }
}

/// Reports until `stop` is cancelled or the agent drops its end of `status`; then writes
/// what the document last said, within [`LAST_WORDS`], whatever the backoff.
pub async fn run<D: Observable>(
    access: ClusterAccess,
    options: Options,
    mut status: watch::Receiver<D>,
    stop: CancellationToken,
) {
    let api = match access.client() {
        Ok(client) => NodeApi::new(client, &access.node),
        Err(e) => {
            error!("not reporting to Kubernetes: {e}");
            return;
        }
    };
    info!(
        node = %access.node,
        api = %access.api_url,
        "reporting to Kubernetes: condition {} and events on the node",
        report::CONDITION_TYPE
    );
    let mut reporter = Reporter::new(access.node.clone(), options.clone());
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    let mut retry_at: Option<Instant> = None;
    loop {
        reporter.observe(&status.borrow_and_update().observed(), Timestamp::now());
        if retry_at.is_none_or(|at| at <= Instant::now()) && reporter.has_work(Instant::now()) {
            match reporter.flush(&api).await {
                Ok(()) => {
                    if backoff.failures > 0 {
                        info!(
                            "reporting to Kubernetes again after {} failed attempts",
                            backoff.failures
                        );
                    }
                    backoff.reset();
                    retry_at = None;
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(
                        attempt = backoff.failures,
                        queued_events = reporter.events.len(),
                        "reporting to Kubernetes failed, trying again in {wait:?}: {e}"
                    );
                    retry_at = Some(Instant::now() + wait);
                }
            }
            continue;
        }
        let wake = retry_at.or(reporter.heartbeat_due);
        tokio::select! {
            changed = status.changed() => if changed.is_err() { break },
            () = sleep_until(wake) => {}
            () = stop.cancelled() => break,
        }
    }
    // The agent stops: its last word (a verdict or action just made, say) must not be lost
    // to a backoff or to the process's exit.
    reporter.observe(&status.borrow_and_update().observed(), Timestamp::now());
    if reporter.has_work(Instant::now()) {
        match tokio::time::timeout(LAST_WORDS, reporter.flush(&api)).await {
            Ok(Ok(())) => debug!("the last condition was written"),
            Ok(Err(e)) => warn!("could not write the last condition to Kubernetes: {e}"),
            Err(_) => {
                warn!("could not write the last condition to Kubernetes within {LAST_WORDS:?}");
            }
        }
    }
    debug!("the agent stopped: no more reports to Kubernetes");
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff: `initial`, doubling up to `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            failures: 0,
        }
    }

    fn next(&mut self) -> Duration {
        let wait = self
            .initial
            .saturating_mul(1 << self.failures.min(20))
            .min(self.max);
        self.failures += 1;
        wait
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// An event waiting to be sent.
#[derive(Debug, Clone)]
struct Queued {
    occurrence: Occurrence,
    at: Timestamp,
    /// Chosen once, so that a create retried after a lost answer finds its own event.
    name: String,
}

/// An event already on the API server that repeats fold into.
#[derive(Debug)]
struct Series {
    key: (String, bool, String),
    name: String,
    count: u32,
}

/// How many distinct events are remembered for folding repeats.
const SERIES: usize = 64;

/// The reporter's state between calls: what to say, and what was said.
struct Reporter {
    node: String,
    options: Options,
    tracker: Tracker,
    judgement: Option<Judgement>,
    /// When the judged status last flipped: the next transition time.
    flipped: Option<(bool, Timestamp)>,
    /// The condition as the node has it: `None` until read from the API server, then what
    /// was last written.
    node_says: Option<Option<Condition>>,
    heartbeat_due: Option<Instant>,
    events: VecDeque<Queued>,
    series: VecDeque<Series>,
    dropped: u64,
}

impl Reporter {
    fn new(node: String, options: Options) -> Self {
        Reporter {
            node,
            options,
            tracker: Tracker::default(),
            judgement: None,
            flipped: None,
            node_says: None,
            heartbeat_due: None,
            events: VecDeque::new(),
            series: VecDeque::new(),
            dropped: 0,
        }
    }

    /// Takes in the document as it is at `now`.
    fn observe(&mut self, observed: &report::Observed<'_>, now: Timestamp) {
        if let Some(judgement) = report::judge(observed) {
            if let Some(unhealthy) = judgement.unhealthy
                && self.flipped.is_none_or(|(was, _)| was != unhealthy)
            {
                self.flipped = Some((unhealthy, judgement.since.unwrap_or(now)));
            }
            self.judgement = Some(judgement);
        }
        for occurrence in self.tracker.observe(observed) {
            if self.events.len() == self.options.max_queued_events {
                self.events.pop_front();
                self.dropped += 1;
                warn!(
                    dropped = self.dropped,
                    "the Kubernetes API server is out of reach and {} events wait: dropping the oldest",
                    self.options.max_queued_events
                );
            }
            let name = report::event_name(&self.node, now);
            // Two occurrences in one look share `now`; their names must differ.
            let name = if self.events.iter().any(|q| q.name == name) {
                format!("{name}.{}", self.events.len())
            } else {
                name
            };
            self.events.push_back(Queued {
                occurrence,
                at: now,
                name,
            });
        }
    }

    /// The condition to write, if it differs from what the node says.
    fn next_condition(&self, now: Timestamp) -> Option<Condition> {
        let judgement = self.judgement.as_ref()?;
        let current = self.node_says.as_ref().and_then(Option::as_ref);
        let flipped_at = self.flipped.map_or(now, |(_, at)| at);
        Some(Condition::next(current, judgement, flipped_at))
    }

    fn has_work(&self, now: Instant) -> bool {
        let condition_changed = match (&self.node_says, self.next_condition(Timestamp::now())) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(says), Some(next)) => {
                says.as_ref() != Some(&next) || self.heartbeat_due.is_some_and(|at| at <= now)
            }
        };
        condition_changed || !self.events.is_empty()
    }

    /// Writes the condition if it changed or its heartbeat is due, then sends the queued
    /// events in order. Stops at the first call worth retrying.
    async fn flush(&mut self, api: &NodeApi) -> Result<(), ApiError> {
        if self.judgement.is_some() {
            if self.node_says.is_none() {
                self.node_says = Some(api.condition().await?);
            }
            let now = Timestamp::now();
            if let Some(next) = self.next_condition(now)
                && (self.node_says.as_ref().and_then(Option::as_ref) != Some(&next)
                    || self.heartbeat_due.is_none_or(|at| at <= Instant::now()))
            {
                api.patch_condition(&next.patch(now)).await?;
                self.node_says = Some(Some(next));
                self.heartbeat_due = Some(Instant::now() + self.options.heartbeat);
            }
        }
        while let Some(queued) = self.events.front().cloned() {
            self.send_event(api, &queued).await?;
            self.events.pop_front();
        }
        Ok(())
    }

    /// Folds `queued` into the event it repeats, or creates one. A call the API server
    /// refuses outright drops the event with a warning, so that one bad event cannot hold up
    /// the rest.
    async fn send_event(&mut self, api: &NodeApi, queued: &Queued) -> Result<(), ApiError> {
        let key = queued.occurrence.key();
        if let Some(i) = self.series.iter().position(|s| s.key == key) {
            let count = self.series[i].count + queued.occurrence.count;
            let patch = report::event_repeat_patch(count, queued.at, &queued.occurrence.message);
            match api.patch_event(&self.series[i].name, &patch).await {
                Ok(()) => {
                    self.series[i].count = count;
                    return Ok(());
                }
                // The event expired (the API server keeps them an hour): start a new one.
                Err(ApiError::NotFound(_)) => {
                    self.series.remove(i);
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    warn!("dropping an event the API server refused: {e}");
                    return Ok(());
                }
            }
        }
        let event = report::event(&self.node, &queued.name, &queued.occurrence, queued.at);
        match api.create_event(&event).await {
            Ok(()) | Err(ApiError::AlreadyExists(_)) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                warn!("dropping an event the API server refused: {e}");
                return Ok(());
            }
        }
        if self.series.len() == SERIES {
            self.series.pop_front();
        }
        self.series.push_back(Series {
            key,
            name: queued.name.clone(),
            count: queued.occurrence.count,
        });
        Ok(())
    }
}
