//! What the node should say about containerd, worked out from the status document with no
//! I/O: the `ContainerRuntimeUnhealthy` condition and one event per new verdict or action.
//! The parent module sends what this one decides.

use std::collections::VecDeque;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use serde_json::{Value, json};

use crate::{
    judge::detector::State,
    report::metrics::state_label,
    report::status::{ActionRecord, StatusDocument, VerdictRecord},
};

/// The node condition's type. Problem polarity, as node-problem-detector's conditions:
/// `True` means containerd is not serving.
pub const CONDITION_TYPE: &str = "ContainerRuntimeUnhealthy";
/// The component named as the source of events and as the patches' field manager.
pub const COMPONENT: &str = "containerd-observer";
/// Events about a Node live in `default`, as the kubelet's and node-problem-detector's do:
/// a Node has no namespace, and `kubectl describe node` looks there.
pub const EVENT_NAMESPACE: &str = "default";
/// Longest message written, in bytes: evidence can be long, and an event's note is limited.
pub const MAX_MESSAGE: usize = 1024;
/// How many of the newest entries are reported when the reporter lost its place in a history
/// (more than a history's worth of entries came between two looks).
const CATCH_UP: usize = 10;

/// The parts of the status document that reports are made of.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub state: State,
    pub unit: &'a str,
    pub verdicts: &'a VecDeque<VerdictRecord>,
    pub actions: &'a VecDeque<ActionRecord>,
}

/// A document the reporter can follow.
pub trait Observable {
    fn observed(&self) -> Observed<'_>;
}

impl Observable for StatusDocument {
    fn observed(&self) -> Observed<'_> {
        Observed {
            state: self.state,
            unit: &self.unit,
            verdicts: &self.verdicts,
            actions: &self.actions,
        }
    }
}

/// What the condition should say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// `Some(true)` while containerd is not serving; `None` keeps what the node says
    /// (a suspicion is not enough to flip the condition either way).
    pub unhealthy: Option<bool>,
    pub reason: &'static str,
    pub message: String,
    /// When the verdict behind it was made, if one was: the transition time should the
    /// status flip.
    pub since: Option<Timestamp>,
}

/// The condition for the observed state; `None` before the first judgement, when nothing is
/// known to say.
///
/// `True` for crashed, hung, unreachable, recovering (a restart is in flight: nothing
/// serves) and stopped (an operator stopped containerd: the node cannot run pods, though the
/// observer leaves it stopped; the reason tells it from a fault). `False` when healthy.
pub fn judge(observed: &Observed<'_>) -> Option<Judgement> {
    let unit = observed.unit;
    let latest = |state: State| observed.verdicts.iter().rev().find(|v| v.state == state);
    let evidence = |state: State| {
        latest(state)
            .map(|v| format!(": {}", evidence_text(v)))
            .unwrap_or_default()
    };
    let (unhealthy, reason, message) = match observed.state {
        State::Starting => return None,
        State::Healthy => (
            Some(false),
            "ContainerdHealthy",
            format!("{unit} answers its API"),
        ),
        State::Suspect => (
            None,
            "ContainerdSuspect",
            format!(
                "{unit} may be unwell, not confirmed yet{}",
                evidence(State::Suspect)
            ),
        ),
        // Overload is reported, never acted on, and does not flip the status by itself.
        State::Overloaded => (
            None,
            "ContainerdOverloaded",
            format!(
                "{unit} is overloaded: it makes progress, slowly{}",
                evidence(State::Overloaded)
            ),
        ),
        State::Crashed => (
            Some(true),
            "ContainerdCrashed",
            format!("{unit} crashed{}", evidence(State::Crashed)),
        ),
        State::Hung => (
            Some(true),
            "ContainerdHung",
            format!("{unit} hung{}", evidence(State::Hung)),
        ),
        State::Unreachable => (
            Some(true),
            "ContainerdUnreachable",
            format!("{unit} is unreachable{}", evidence(State::Unreachable)),
        ),
        State::Recovering => {
            let after = observed
                .verdicts
                .iter()
                .rev()
                .find(|v| !matches!(v.state, State::Healthy | State::Recovering))
                .map(|v| {
                    format!(
                        " after it was {}: {}",
                        state_label(v.state),
                        evidence_text(v)
                    )
                })
                .unwrap_or_default();
            (
                Some(true),
                "ContainerdRecovering",
                format!("{unit} is being restarted{after}"),
            )
        }
        State::Stopped => (
            Some(true),
            "ContainerdStopped",
            format!(
                "{unit} was stopped on purpose and is left stopped{}",
                evidence(State::Stopped)
            ),
        ),
        State::Degraded => (
            Some(true),
            "ContainerdDegraded",
            format!(
                "{unit} answers, but not for every container; it is not restarted{}",
                evidence(State::Degraded)
            ),
        ),
        State::StorageStalled => (
            Some(true),
            "ContainerdStorageStalled",
            format!(
                "{unit} waits on its storage; a restart cannot help, so none is made{}",
                evidence(State::StorageStalled)
            ),
        ),
        State::StartupHung => (
            Some(true),
            "ContainerdStartupHung",
            format!(
                "{unit} runs but has not served its socket since it started{}",
                evidence(State::StartupHung)
            ),
        ),
    };
    let since = latest(observed.state).and_then(|v| v.at.parse().ok());
    Some(Judgement {
        unhealthy,
        reason,
        message: truncate(message),
        since,
    })
}

/// The condition as the node has it, or as it will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub unhealthy: bool,
    pub reason: String,
    pub message: String,
    pub last_transition: Timestamp,
}

impl Condition {
    /// What `judgement` makes of `current`, the condition the node has. The transition time
    /// is kept unless the status flips; then it is `flipped_at`.
    pub fn next(current: Option<&Condition>, judgement: &Judgement, flipped_at: Timestamp) -> Self {
        let unhealthy = judgement
            .unhealthy
            .or(current.map(|c| c.unhealthy))
            .unwrap_or(false);
        let last_transition = match current {
            Some(c) if c.unhealthy == unhealthy => c.last_transition,
            _ => flipped_at,
        };
        Condition {
            unhealthy,
            reason: judgement.reason.to_owned(),
            message: judgement.message.clone(),
            last_transition,
        }
    }

    /// The strategic-merge patch of `nodes/{name}/status` that writes this condition. Node
    /// conditions merge by `type`, so the kubelet's own conditions are left as they are.
    pub fn patch(&self, heartbeat: Timestamp) -> Value {
        json!({
            "status": {
                "conditions": [{
                    "type": CONDITION_TYPE,
                    "status": if self.unhealthy { "True" } else { "False" },
                    "reason": self.reason,
                    "message": self.message,
                    "lastTransitionTime": Time(self.last_transition),
                    "lastHeartbeatTime": Time(heartbeat),
                }]
            }
        })
    }
}

/// Something worth an event on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    /// CamelCase, as Kubernetes reasons are.
    pub reason: String,
    pub message: String,
    pub warning: bool,
    /// How many times it happened (repeats of an action are folded in the document too).
    pub count: u32,
}

impl Occurrence {
    /// Events fold into one when reason, type and message repeat, as the kubelet's do.
    pub fn key(&self) -> (String, bool, String) {
        (self.reason.clone(), self.warning, self.message.clone())
    }
}

/// Where the reporter is in the document's histories, so that each verdict and action is
/// reported once.
#[derive(Debug, Default)]
pub struct Tracker {
    last_verdict: Option<(String, State)>,
    last_action: Option<ActionMark>,
    /// Whether a verdict other than healthy was seen: the first healthy verdict of a fresh
    /// agent is no news.
    saw_trouble: bool,
}

#[derive(Debug, Clone)]
struct ActionMark {
    at: String,
    action: &'static str,
    reason: State,
    result: String,
    count: u32,
}

impl ActionMark {
    fn of(a: &ActionRecord) -> Self {
        ActionMark {
            at: a.at.clone(),
            action: a.action,
            reason: a.reason,
            result: a.result.clone(),
            count: a.count,
        }
    }

    fn same_action(&self, a: &ActionRecord) -> bool {
        a.action == self.action && a.reason == self.reason && a.result == self.result
    }
}

impl Tracker {
    /// The occurrences new since the last look, oldest first.
    pub fn observe(&mut self, observed: &Observed<'_>) -> Vec<Occurrence> {
        // Each with its time: the document's times have one width, so they sort as text.
        let mut found: Vec<(&str, Occurrence)> = Vec::new();
        let verdicts = observed.verdicts;
        let first_new = match &self.last_verdict {
            None => 0,
            Some((at, state)) => verdicts
                .iter()
                .rposition(|v| &v.at == at && v.state == *state)
                .map_or(verdicts.len().saturating_sub(CATCH_UP), |i| i + 1),
        };
        for v in verdicts.iter().skip(first_new) {
            if v.state == State::Healthy && !self.saw_trouble {
                continue;
            }
            self.saw_trouble |= v.state != State::Healthy;
            found.push((&v.at, verdict_occurrence(observed.unit, v)));
        }
        if let Some(v) = verdicts.back() {
            self.last_verdict = Some((v.at.clone(), v.state));
        }

        let actions = observed.actions;
        let (first_new, repeats) = match &self.last_action {
            None => (0, 0),
            Some(mark) => {
                // The entry itself, unchanged; or, folded since, the first like it that is
                // not older (entries only gain count and time by folding).
                let exact = actions
                    .iter()
                    .rposition(|a| mark.same_action(a) && a.at == mark.at && a.count == mark.count);
                let folded = || {
                    actions.iter().position(|a| {
                        mark.same_action(a) && a.count > mark.count && a.at >= mark.at
                    })
                };
                match exact.or_else(folded) {
                    Some(i) => (i + 1, actions[i].count - mark.count),
                    None => (actions.len().saturating_sub(CATCH_UP), 0),
                }
            }
        };
        if repeats > 0
            && let Some(i) = first_new.checked_sub(1)
        {
            let occurrence = Occurrence {
                count: repeats,
                ..action_occurrence(&actions[i])
            };
            found.push((&actions[i].at, occurrence));
        }
        found.extend(
            actions
                .iter()
                .skip(first_new)
                .map(|a| (a.at.as_str(), action_occurrence(a))),
        );
        if let Some(a) = actions.back() {
            self.last_action = Some(ActionMark::of(a));
        }
        found.sort_by(|a, b| a.0.cmp(b.0));
        found.into_iter().map(|(_, o)| o).collect()
    }
}

fn evidence_text(v: &VerdictRecord) -> String {
    if v.evidence.is_empty() {
        return "no evidence recorded".to_owned();
    }
    v.evidence
        .iter()
        .map(|e| e.detail.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

fn verdict_occurrence(unit: &str, v: &VerdictRecord) -> Occurrence {
    let (reason, warning) = match v.state {
        State::Starting => ("ObserverStarting", false),
        State::Healthy => ("ContainerdHealthy", false),
        State::Suspect => ("ContainerdSuspect", true),
        State::Overloaded => ("ContainerdOverloaded", true),
        State::Crashed => ("ContainerdCrashed", true),
        State::Hung => ("ContainerdHung", true),
        State::Unreachable => ("ContainerdUnreachable", true),
        State::Recovering => ("ContainerdRecovering", false),
        State::Stopped => ("ContainerdStopped", true),
        State::Degraded => ("ContainerdDegraded", true),
        State::StorageStalled => ("ContainerdStorageStalled", true),
        State::StartupHung => ("ContainerdStartupHung", true),
    };
    let pid = v.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
    Occurrence {
        reason: reason.to_owned(),
        message: truncate(format!(
            "{unit}{pid} is {}, detected in {} ms: {}",
            state_label(v.state),
            v.detection_latency_ms,
            evidence_text(v)
        )),
        warning,
        count: 1,
    }
}

fn action_occurrence(a: &ActionRecord) -> Occurrence {
    let (reason, warning) = match a.action {
        // The agent words a restart that worked as "restarted ..."; anything else (failed,
        // interrupted) is a warning.
        "restart" if a.result.starts_with("restarted ") => ("ContainerdRestarted".into(), false),
        "restart" => ("ContainerdRestartFailed".into(), true),
        "leave_to_systemd" => ("RestartLeftToSystemd".into(), false),
        "leave_stopped" => ("RestartSkippedUnitStopped".into(), false),
        "leave_frozen" => ("RestartSkippedUnitFrozen".into(), false),
        "refused_by_systemd" => ("RestartRefusedBySystemd".into(), true),
        "back_off" => ("RestartBackingOff".into(), true),
        "give_up" => ("RestartGivenUp".into(), true),
        "dry_run" => ("RestartSkippedDryRun".into(), false),
        "paused" => ("RestartSkippedPaused".into(), false),
        other => (camel_case(other), false),
    };
    Occurrence {
        reason,
        message: truncate(format!("{} (verdict: {})", a.result, state_label(a.reason))),
        warning,
        count: a.count,
    }
}

/// `leave_to_systemd` → `LeaveToSystemd`.
fn camel_case(snake: &str) -> String {
    snake
        .split('_')
        .flat_map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase())
                .into_iter()
                .chain(chars)
        })
        .collect()
}

fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// The name of a new event: the node's name and the time in hexadecimal nanoseconds, as
/// client-go names them.
pub fn event_name(node: &str, at: Timestamp) -> String {
    format!("{node}.{:x}", at.as_nanosecond())
}

/// A new event on `node` for `occurrence`, first seen at `at`.
pub fn event(node: &str, name: &str, occurrence: &Occurrence, at: Timestamp) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(EVENT_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        // The kubelet uses the node's name as its UID in events, and `kubectl describe
        // node` searches for exactly that.
        involved_object: ObjectReference {
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            uid: Some(node.to_owned()),
            ..ObjectReference::default()
        },
        reason: Some(occurrence.reason.clone()),
        message: Some(occurrence.message.clone()),
        type_: Some(
            if occurrence.warning {
                "Warning"
            } else {
                "Normal"
            }
            .to_owned(),
        ),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some(COMPONENT.to_owned()),
        reporting_instance: Some(node.to_owned()),
        count: Some(occurrence.count.try_into().unwrap_or(i32::MAX)),
        first_timestamp: Some(Time(at)),
        last_timestamp: Some(Time(at)),
        ..Event::default()
    }
}

/// The strategic-merge patch that folds a repeat into an existing event.
///
/// Folding stays here rather than in kube-runtime 5's `events::Recorder`, which was weighed:
/// - it stamps an event with the time it is published (`Timestamp::now()`), while this
///   reporter queues occurrences through an API outage and posts them later with the time
///   they happened;
/// - a repeat there keeps the first event's note and counts its own calls, while a repeat
///   here carries its new message and the agent's own count;
/// - it writes `events.k8s.io/v1`: the RBAC would change, and so would the lookup by the
///   node's name as UID that `kubectl describe node` makes;
/// - it brings in kube-runtime and some fifteen crates for two small pure functions here.
pub fn event_repeat_patch(count: u32, last: Timestamp, message: &str) -> Value {
    json!({
        "count": count,
        "lastTimestamp": Time(last),
        "message": message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::kubernetes::tests::{Doc, action, verdict};

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn problem_polarity_true_while_containerd_does_not_serve() {
        let mut doc = Doc::new(State::Starting);
        assert_eq!(
            judge(&doc.observed()),
            None,
            "nothing to say before a judgement"
        );
        doc.verdicts.push_back(verdict(
            "2030-01-01T00:00:01Z",
            State::Hung,
            "probe timed out",
        ));
        for (state, unhealthy, reason) in [
            (State::Healthy, Some(false), "ContainerdHealthy"),
            (State::Suspect, None, "ContainerdSuspect"),
            (State::Crashed, Some(true), "ContainerdCrashed"),
            (State::Hung, Some(true), "ContainerdHung"),
            (State::Unreachable, Some(true), "ContainerdUnreachable"),
            (State::Recovering, Some(true), "ContainerdRecovering"),
            (State::Stopped, Some(true), "ContainerdStopped"),
            (State::Degraded, Some(true), "ContainerdDegraded"),
            (
                State::StorageStalled,
                Some(true),
                "ContainerdStorageStalled",
            ),
            (State::StartupHung, Some(true), "ContainerdStartupHung"),
        ] {
            doc.state = state;
            let j = judge(&doc.observed()).unwrap();
            assert_eq!((j.unhealthy, j.reason), (unhealthy, reason), "{state:?}");
        }
        doc.state = State::Hung;
        let hung = judge(&doc.observed()).unwrap();
        assert_eq!(hung.message, "containerd.service hung: probe timed out");
        assert_eq!(
            hung.since,
            Some(t("2030-01-01T00:00:01Z")),
            "the verdict's time"
        );
        doc.state = State::Recovering;
        assert_eq!(
            judge(&doc.observed()).unwrap().message,
            "containerd.service is being restarted after it was hung: probe timed out"
        );
        // A storage stall: its own reason, and the message says no restart is made.
        doc.verdicts.push_back(verdict(
            "2030-01-01T00:00:02Z",
            State::StorageStalled,
            "1 containerd thread(s) in D state",
        ));
        doc.state = State::StorageStalled;
        let stall = judge(&doc.observed()).unwrap();
        assert_eq!(stall.reason, "ContainerdStorageStalled");
        assert_eq!(
            stall.message,
            "containerd.service waits on its storage; a restart cannot help, so none is made: 1 containerd thread(s) in D state"
        );
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let hung = Judgement {
            unhealthy: Some(true),
            reason: "ContainerdHung",
            message: "hung".into(),
            since: None,
        };
        let recovering = Judgement {
            unhealthy: Some(true),
            reason: "ContainerdRecovering",
            message: "restarting".into(),
            since: None,
        };
        let suspect = Judgement {
            unhealthy: None,
            reason: "ContainerdSuspect",
            message: "maybe".into(),
            since: None,
        };
        let healthy = Judgement {
            unhealthy: Some(false),
            reason: "ContainerdHealthy",
            message: "fine".into(),
            since: None,
        };
        let c1 = Condition::next(None, &hung, t("2030-01-01T00:00:01Z"));
        assert!(c1.unhealthy);
        assert_eq!(c1.last_transition, t("2030-01-01T00:00:01Z"));
        let c2 = Condition::next(Some(&c1), &recovering, t("2030-01-01T00:00:02Z"));
        assert_eq!(c2.reason, "ContainerdRecovering");
        assert_eq!(c2.last_transition, c1.last_transition, "still True");
        let c3 = Condition::next(Some(&c2), &suspect, t("2030-01-01T00:00:03Z"));
        assert!(c3.unhealthy, "a suspicion keeps the status");
        assert_eq!(c3.last_transition, c1.last_transition);
        let c4 = Condition::next(Some(&c3), &healthy, t("2030-01-01T00:00:04Z"));
        assert!(!c4.unhealthy);
        assert_eq!(c4.last_transition, t("2030-01-01T00:00:04Z"));
        let fresh = Condition::next(None, &suspect, t("2030-01-01T00:00:05Z"));
        assert!(
            !fresh.unhealthy,
            "a suspicion on a node that says nothing is False"
        );
    }

    #[test]
    fn the_patch_carries_only_our_condition() {
        let c = Condition {
            unhealthy: true,
            reason: "ContainerdHung".into(),
            message: "containerd.service hung: probe timed out".into(),
            last_transition: t("2030-01-01T00:00:01Z"),
        };
        assert_eq!(
            c.patch(t("2030-01-01T00:00:09.5Z")),
            json!({"status": {"conditions": [{
                "type": "ContainerRuntimeUnhealthy",
                "status": "True",
                "reason": "ContainerdHung",
                "message": "containerd.service hung: probe timed out",
                "lastTransitionTime": "2030-01-01T00:00:01Z",
                "lastHeartbeatTime": "2030-01-01T00:00:09Z",
            }]}})
        );
    }

    #[test]
    fn each_verdict_and_action_is_reported_once() {
        let mut doc = Doc::new(State::Healthy);
        let mut tracker = Tracker::default();
        doc.verdicts
            .push_back(verdict("2030-01-01T00:00:00Z", State::Healthy, "answered"));
        assert_eq!(
            tracker.observe(&doc.observed()),
            vec![],
            "a first healthy verdict is no news"
        );
        doc.verdicts.push_back(verdict(
            "2030-01-01T00:00:01Z",
            State::Hung,
            "probe timed out",
        ));
        doc.actions.push_back(action(
            "2030-01-01T00:00:02Z",
            "restart",
            "restarted containerd.service through systemd: job done in 74 ms, new PID 42",
            1,
        ));
        let found = tracker.observe(&doc.observed());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].reason, "ContainerdHung");
        assert!(found[0].warning);
        assert_eq!(
            found[0].message,
            "containerd.service (pid 41) is hung, detected in 0.5 ms: probe timed out"
        );
        assert_eq!(found[1].reason, "ContainerdRestarted");
        assert!(!found[1].warning);
        assert!(found[1].message.ends_with("new PID 42 (verdict: hung)"));
        assert_eq!(tracker.observe(&doc.observed()), vec![], "nothing new");

        doc.verdicts
            .push_back(verdict("2030-01-01T00:00:03Z", State::Healthy, "answered"));
        let found = tracker.observe(&doc.observed());
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].reason, "ContainerdHealthy",
            "healthy again is news"
        );
    }

    #[test]
    fn folded_repeats_of_an_action_are_counted() {
        let mut doc = Doc::new(State::Hung);
        let mut tracker = Tracker::default();
        doc.actions
            .push_back(action("2030-01-01T00:00:01Z", "back_off", "backing off", 1));
        assert_eq!(tracker.observe(&doc.observed())[0].count, 1);
        // The agent folds two more repeats into the same entry.
        let last = doc.actions.back_mut().unwrap();
        last.count = 3;
        last.at = "2030-01-01T00:00:05Z".into();
        let found = tracker.observe(&doc.observed());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].reason.as_str(), found[0].count, found[0].warning),
            ("RestartBackingOff", 2, true)
        );
        // Folded once more, then followed by another action before the next look.
        let last = doc.actions.back_mut().unwrap();
        last.count = 4;
        last.at = "2030-01-01T00:00:06Z".into();
        doc.actions.push_back(action(
            "2030-01-01T00:00:07Z",
            "restart",
            "restart of containerd.service failed: job failed",
            1,
        ));
        let found = tracker.observe(&doc.observed());
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].count, 1);
        assert_eq!(found[1].reason, "ContainerdRestartFailed");
        assert!(found[1].warning);
    }

    #[test]
    fn a_lost_place_reports_only_the_newest_entries() {
        let mut doc = Doc::new(State::Hung);
        let mut tracker = Tracker::default();
        doc.verdicts
            .push_back(verdict("2030-01-01T00:00:00Z", State::Hung, "first"));
        tracker.observe(&doc.observed());
        doc.verdicts.clear();
        for i in 0..50 {
            doc.verdicts.push_back(verdict(
                &format!("2030-01-01T00:01:{i:02}Z"),
                State::Suspect,
                "again",
            ));
        }
        assert_eq!(tracker.observe(&doc.observed()).len(), CATCH_UP);
    }

    #[test]
    fn reasons_are_camel_case_and_messages_bounded() {
        assert_eq!(camel_case("leave_to_systemd"), "LeaveToSystemd");
        let long = truncate("é".repeat(MAX_MESSAGE));
        assert!(long.len() <= MAX_MESSAGE, "{}", long.len());
        assert!(long.ends_with('…'));
    }

    #[test]
    fn events_name_the_node_as_kubelet_does() {
        let occurrence = Occurrence {
            reason: "ContainerdCrashed".into(),
            message: "crashed".into(),
            warning: true,
            count: 1,
        };
        let at = t("2030-01-01T00:00:01Z");
        let name = event_name("node-a", at);
        assert_eq!(name, format!("node-a.{:x}", 1_893_456_001_000_000_000_i128));
        let value = serde_json::to_value(event("node-a", &name, &occurrence, at)).unwrap();
        assert_eq!(
            value["involvedObject"],
            json!({"kind": "Node", "name": "node-a", "uid": "node-a"})
        );
        assert_eq!(value["type"], "Warning");
        assert_eq!(
            value["source"],
            json!({"component": "containerd-observer", "host": "node-a"})
        );
        assert_eq!(value["metadata"]["namespace"], "default");
        assert_eq!(value["count"], 1);
        assert_eq!(value["firstTimestamp"], "2030-01-01T00:00:01Z");
    }
}
