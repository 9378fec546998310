//! What to do about a verdict. Two pure steps, in the style of a reconcile function:
//!
//! - [`decide`]: from the verdict, the switches (pause, dry run), whether a restart is
//!   already in flight, and the restart budget at `now`, the [`Action`] the loop carries out.
//!   The remedy follows the cause ([`remedy`]): a restart clears a crash, a deadlock or a
//!   wedged lock; it cannot help a stalled disk, a hung shim or a containerd that hangs at
//!   every start, which are reported instead;
//! - [`plan`]: once systemd's view of the unit is read, whether the restart is ours to do.
//!   The observer never fights systemd: a unit systemd is already restarting is left to
//!   systemd, a unit an operator stopped stays stopped.
//!
//! [`settled`] then turns what a plan or a restart came to into the action recorded and what
//! the detector is told.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{
    budget::{Allowance, RestartBudget},
    detector::{Observation, State, Verdict},
};

/// The operator's switches that hold the observer's hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// The pause file exists: judge and report, never restart.
    pub paused: bool,
    /// `--dry-run`: say what would be done, do nothing.
    pub dry_run: bool,
    /// `--kill-hung-shims`: end a shim that does not answer (off by default).
    pub kill_hung_shims: bool,
}

/// What the loop does about a verdict that calls for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A restart is already in flight; its result decides what comes next.
    Wait,
    /// Paused by the operator: recorded, not acted on.
    Paused,
    /// Dry run: recorded, not acted on.
    DryRun,
    /// The budget wants a pause between restarts: try again in `retry_in`.
    BackOff {
        retry_in: Duration,
        recent_restarts: usize,
    },
    /// Too many restarts in the window: none until containerd is healthy for a while.
    GiveUp { recent_restarts: usize },
    /// Read the unit, [`plan`], and restart if the plan says so.
    Restart,
    /// A restart cannot help this cause: report it (node condition, event, log), and keep
    /// watching.
    Report { why: String },
    /// As [`Action::Report`], with containerd's goroutine dump taken first.
    ReportWithDump { why: String },
    /// Kill these hung shims (`--kill-hung-shims`); containerd itself is left alone.
    KillShims { pids: Vec<u32> },
}

impl Action {
    /// The name the action is recorded under, in `/status`, the metrics and the log.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Wait => "wait",
            Action::Paused => "paused",
            Action::DryRun => "dry_run",
            Action::BackOff { .. } => "back_off",
            Action::GiveUp { .. } => "give_up",
            Action::Restart => "restart",
            Action::Report { .. } => "report",
            Action::ReportWithDump { .. } => "report_with_dump",
            Action::KillShims { .. } => "kill_shims",
        }
    }
}

/// Whether `state` still calls for a restart (a deferred one is retried only then).
pub fn needs_restart(state: State) -> bool {
    matches!(
        state,
        State::Crashed | State::Hung | State::Unreachable | State::Suspect | State::StartupHung
    )
}

/// What a verdict's cause calls for, before the switches and the budget have their say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remedy {
    Restart,
    /// Report only, and why a restart cannot help.
    Report(String),
    /// Report with a goroutine dump.
    ReportWithDump(String),
    /// Kill these shims (only when the operator turned it on).
    KillShims(Vec<u32>),
}

/// The remedy by cause. A startup hang gets one restart (with its dump): a second that ends
/// the same way is reported, not retried, since containerd would loop (containerd #13848).
pub fn remedy(verdict: &Verdict, kill_hung_shims: bool) -> Remedy {
    match verdict.state {
        State::StorageStalled => Remedy::Report(
            "storage stall: containerd waits on its disk; a new containerd would block the same way, and a thread in D state cannot even be killed. Not restarting: relieve the disk; the observer acts normally once the stall clears".into(),
        ),
        State::Degraded => {
            let pids: Vec<u32> = verdict.silent_tasks.iter().filter_map(|t| t.shim_pid).collect();
            if kill_hung_shims && !pids.is_empty() {
                return Remedy::KillShims(pids);
            }
            let which: Vec<String> = verdict.silent_tasks.iter().map(ToString::to_string).collect();
            let which = if which.is_empty() {
                "Tasks.List does not answer".to_owned()
            } else {
                format!("no answer from the shim of {}", which.join(", "))
            };
            Remedy::Report(format!(
                "containerd degraded: {which}. Not restarting containerd: it would reconnect to the same shim, and can hang at start on it. Kill the shim, or run with --kill-hung-shims"
            ))
        }
        State::StartupHung if verdict.repeat >= 2 => Remedy::ReportWithDump(format!(
            "containerd hangs at start again after a restart ({} starts in a row): restarting does not help (containerd #13848). Not restarting; look for what it waits on in the goroutine dump (a leftover shim, a held lock)",
            verdict.repeat
        )),
        _ => Remedy::Restart,
    }
}

/// The reconcile step: what to do now about a verdict.
pub fn decide(
    verdict: &Verdict,
    restart_in_flight: bool,
    switches: Switches,
    budget: &mut RestartBudget,
    now: Instant,
) -> Action {
    if restart_in_flight {
        return Action::Wait;
    }
    match remedy(verdict, switches.kill_hung_shims) {
        Remedy::Restart => {}
        // Reporting acts on nothing: neither the pause nor a dry run holds it back.
        Remedy::Report(why) => return Action::Report { why },
        Remedy::ReportWithDump(why) => return Action::ReportWithDump { why },
        Remedy::KillShims(_) if switches.paused => return Action::Paused,
        Remedy::KillShims(_) if switches.dry_run => return Action::DryRun,
        Remedy::KillShims(pids) => return Action::KillShims { pids },
    }
    if switches.paused {
        return Action::Paused;
    }
    if switches.dry_run {
        return Action::DryRun;
    }
    match budget.allowance(now) {
        Allowance::Allowed => Action::Restart,
        Allowance::BackingOff { retry_in } => Action::BackOff {
            retry_in,
            recent_restarts: budget.recent_restarts(),
        },
        Allowance::GaveUp => Action::GiveUp {
            recent_restarts: budget.recent_restarts(),
        },
    }
}

/// What a plan that did not restart comes to: the action recorded, its detail, and what the
/// detector is told.
pub fn settled(plan: Plan) -> Option<(&'static str, String, Observation)> {
    Some(match plan {
        Plan::LeaveToSystemd(why) => (
            "leave_to_systemd",
            why,
            Observation::RestartFinished { ok: true },
        ),
        Plan::LeaveStopped(why) => (
            "leave_stopped",
            why.clone(),
            Observation::UnitStopped { detail: why },
        ),
        Plan::LeaveFrozen(why) => (
            "leave_frozen",
            why.clone(),
            Observation::UnitStopped { detail: why },
        ),
        Plan::Refused(why) => (
            "refused_by_systemd",
            why,
            Observation::RestartFinished { ok: false },
        ),
        Plan::Restart => return None,
    })
}

/// Whether a recorded action is one an operator must look at (logged as a warning).
pub fn alarming(action: &str, succeeded: bool) -> bool {
    matches!(action, "give_up" | "refused_by_systemd") || (action == "restart" && !succeeded)
}

/// systemd's view of one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UnitStatus {
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: Option<u32>,
    /// The last main process, kept after it exits.
    pub exec_main_pid: Option<u32>,
    /// The type of the job pending on the unit (`start`, `stop`, `restart`, …), if any.
    pub job: Option<String>,
    /// The result of the unit's last run.
    pub result: String,
    pub n_restarts: u32,
    /// systemd's freezer state of the unit: `running`, `freezing`, `frozen` or `thawing`
    /// (empty where systemd has no freezer).
    pub freezer_state: String,
}

/// What to do about a bad verdict, given the unit's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Restart,
    /// systemd is already on it (a job, or its own `Restart=`).
    LeaveToSystemd(String),
    /// Someone stopped the unit: never start it.
    LeaveStopped(String),
    /// Someone froze the unit through systemd (`systemctl freeze`): like a stop, an
    /// operator's action; never restart it.
    LeaveFrozen(String),
    /// systemd refuses to start it (its start limit); restarting would fail.
    Refused(String),
}

/// Decides, from systemd's view of the unit, whether restarting is ours to do.
pub fn plan(verdict: State, unit: &UnitStatus, dead_pid: Option<u32>) -> Plan {
    // A unit frozen through systemd hangs because someone asked for it; systemd's freezer is
    // not a cgroup frozen behind its back, which systemd reports `running`.
    if matches!(unit.freezer_state.as_str(), "frozen" | "freezing") {
        return Plan::LeaveFrozen(format!(
            "systemd reports the unit {} (FreezerState): an operator froze it, and `systemctl thaw` resumes it",
            unit.freezer_state
        ));
    }
    // A start job that never finishes is what hangs: replacing it is the restart.
    if verdict == State::StartupHung
        && unit.job.as_deref().is_none_or(|job| job == "start")
        && matches!(unit.active_state.as_str(), "activating" | "active")
    {
        return Plan::Restart;
    }
    match unit.job.as_deref() {
        Some("stop") => {
            return Plan::LeaveStopped(
                "a stop job is running on the unit: it is being stopped".into(),
            );
        }
        Some(job) => {
            return Plan::LeaveToSystemd(format!(
                "systemd is already running a {job} job on the unit"
            ));
        }
        None => {}
    }
    match unit.active_state.as_str() {
        "activating" if unit.sub_state == "auto-restart" => {
            Plan::LeaveToSystemd("systemd will restart it by itself (Restart=)".into())
        }
        "activating" | "deactivating" | "reloading" => Plan::LeaveToSystemd(format!(
            "the unit is {} ({}); systemd is acting on it",
            unit.active_state, unit.sub_state
        )),
        "inactive" => Plan::LeaveStopped(format!(
            "the unit is stopped (inactive, result {}): an operator stopped it or it exited cleanly",
            unit.result
        )),
        "failed" if unit.result == "start-limit-hit" => Plan::Refused(
            "systemd's start limit refused further starts (StartLimitBurst); run `systemctl reset-failed` once the cause is fixed".into(),
        ),
        "active"
            if verdict == State::Crashed
                && dead_pid.is_some()
                && unit.main_pid.is_some()
                && unit.main_pid != dead_pid =>
        {
            Plan::LeaveToSystemd(format!(
                "systemd already runs a new main process ({})",
                unit.main_pid.unwrap_or_default()
            ))
        }
        _ => Plan::Restart,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{budget::BudgetConfig, layer::SilentTask};

    fn verdict(state: State) -> Verdict {
        Verdict {
            state,
            at: Instant::now(),
            first_sign: Instant::now(),
            pid: Some(10),
            evidence: Vec::new(),
            layer: None,
            repeat: 1,
            silent_tasks: Vec::new(),
        }
    }

    fn hung() -> Verdict {
        verdict(State::Hung)
    }

    fn budget(max_restarts: usize) -> RestartBudget {
        RestartBudget::new(BudgetConfig {
            max_restarts,
            ..BudgetConfig::default()
        })
    }

    const ON: Switches = Switches {
        paused: false,
        dry_run: false,
        kill_hung_shims: false,
    };

    #[test]
    fn a_restart_in_flight_waits_for_its_result() {
        let t0 = Instant::now();
        assert_eq!(decide(&hung(), true, ON, &mut budget(5), t0), Action::Wait);
    }

    #[test]
    fn pause_wins_over_dry_run_and_both_win_over_the_budget() {
        let t0 = Instant::now();
        let both = Switches {
            paused: true,
            dry_run: true,
            kill_hung_shims: false,
        };
        assert_eq!(
            decide(&hung(), false, both, &mut budget(5), t0),
            Action::Paused
        );
        let dry = Switches {
            paused: false,
            dry_run: true,
            kill_hung_shims: false,
        };
        assert_eq!(
            decide(&hung(), false, dry, &mut budget(0), t0),
            Action::DryRun
        );
    }

    #[test]
    fn the_budget_spaces_restarts_then_gives_up() {
        let t0 = Instant::now();
        let mut b = budget(2);
        assert_eq!(decide(&hung(), false, ON, &mut b, t0), Action::Restart);
        b.record_restart(t0);
        match decide(&hung(), false, ON, &mut b, t0 + Duration::from_secs(1)) {
            Action::BackOff {
                retry_in,
                recent_restarts: 1,
            } => assert!(retry_in > Duration::ZERO && retry_in <= Duration::from_secs(10)),
            other => panic!("expected a back-off, got {other:?}"),
        }
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(decide(&hung(), false, ON, &mut b, t1), Action::Restart);
        b.record_restart(t1);
        assert_eq!(
            decide(&hung(), false, ON, &mut b, t1 + Duration::from_secs(60)),
            Action::GiveUp { recent_restarts: 2 }
        );
    }

    #[test]
    fn a_crash_loop_that_answers_one_probe_each_time_still_ends_in_give_up() {
        let t0 = Instant::now();
        let mut b = budget(3);
        let mut t = t0;
        let mut restarts = 0;
        for _ in 0..20 {
            // Restarted, answers one probe, dies; the next crash asks for a restart again.
            b.observe_health(t + Duration::from_secs(1), true);
            t += Duration::from_secs(2);
            b.observe_health(t, false);
            match decide(&verdict(State::Crashed), false, ON, &mut b, t) {
                Action::Restart => {
                    b.record_restart(t);
                    restarts += 1;
                }
                Action::BackOff { retry_in, .. } => t += retry_in,
                Action::GiveUp { .. } => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(restarts, 3);
        assert!(matches!(
            decide(&verdict(State::Crashed), false, ON, &mut b, t),
            Action::GiveUp { .. }
        ));
        b.observe_health(t + Duration::from_secs(1), true);
        assert!(matches!(
            decide(
                &verdict(State::Crashed),
                false,
                ON,
                &mut b,
                t + Duration::from_secs(2)
            ),
            Action::GiveUp { .. }
        ));
    }

    #[test]
    fn a_storage_stall_is_reported_never_restarted_even_with_budget_left() {
        let t0 = Instant::now();
        let mut b = budget(5);
        let action = decide(&verdict(State::StorageStalled), false, ON, &mut b, t0);
        let Action::Report { why } = action else {
            panic!("expected a report, got {action:?}");
        };
        assert!(
            why.contains("storage stall") && why.contains("Not restarting"),
            "{why}"
        );
        assert_eq!(b.recent_restarts(), 0);
        // Paused or not, a report is made: it acts on nothing.
        let paused = Switches { paused: true, ..ON };
        assert!(matches!(
            decide(&verdict(State::StorageStalled), false, paused, &mut b, t0),
            Action::Report { .. }
        ));
    }

    #[test]
    fn a_hung_shim_is_reported_and_killed_only_when_asked() {
        let t0 = Instant::now();
        let mut v = verdict(State::Degraded);
        v.silent_tasks = vec![SilentTask {
            id: "web".into(),
            shim_pid: Some(4242),
        }];
        let Action::Report { why } = decide(&v, false, ON, &mut budget(5), t0) else {
            panic!("expected a report");
        };
        assert!(why.contains("container web (shim pid 4242)"), "{why}");
        assert!(why.contains("Not restarting containerd"), "{why}");
        let kill = Switches {
            kill_hung_shims: true,
            ..ON
        };
        assert_eq!(
            decide(&v, false, kill, &mut budget(5), t0),
            Action::KillShims { pids: vec![4242] }
        );
        let paused = Switches {
            paused: true,
            ..kill
        };
        assert_eq!(
            decide(&v, false, paused, &mut budget(5), t0),
            Action::Paused
        );
    }

    #[test]
    fn a_startup_hang_gets_one_restart_then_a_report_with_the_dump() {
        let t0 = Instant::now();
        let mut b = budget(5);
        let mut v = verdict(State::StartupHung);
        assert_eq!(decide(&v, false, ON, &mut b, t0), Action::Restart);
        b.record_restart(t0);
        v.repeat = 2;
        let later = t0 + Duration::from_secs(60);
        let Action::ReportWithDump { why } = decide(&v, false, ON, &mut b, later) else {
            panic!("expected a report with the dump");
        };
        assert!(why.contains("#13848"), "{why}");
        assert_eq!(b.recent_restarts(), 1);
    }

    #[test]
    fn a_hung_start_job_is_replaced_by_the_restart() {
        let u = unit("activating", "start", Some(11), Some("start"));
        assert_eq!(plan(State::StartupHung, &u, None), Plan::Restart);
        // Any other verdict leaves a start job to systemd.
        assert!(matches!(
            plan(State::Hung, &u, None),
            Plan::LeaveToSystemd(_)
        ));
        // A stop still wins.
        let u = unit("deactivating", "stop-sigterm", Some(11), Some("stop"));
        assert!(matches!(
            plan(State::StartupHung, &u, None),
            Plan::LeaveStopped(_)
        ));
    }

    #[test]
    fn only_bad_states_are_retried() {
        assert!(needs_restart(State::Hung));
        assert!(needs_restart(State::Crashed));
        assert!(!needs_restart(State::Healthy));
        assert!(!needs_restart(State::Overloaded));
        assert!(!needs_restart(State::Recovering));
        assert!(!needs_restart(State::Stopped));
    }

    #[test]
    fn a_plan_that_does_not_restart_tells_the_detector_why() {
        let (action, _, observation) = settled(Plan::LeaveStopped("stopped".into())).unwrap();
        assert_eq!(action, "leave_stopped");
        assert!(matches!(observation, Observation::UnitStopped { .. }));
        let (action, _, observation) = settled(Plan::Refused("limit".into())).unwrap();
        assert_eq!(action, "refused_by_systemd");
        assert!(matches!(
            observation,
            Observation::RestartFinished { ok: false }
        ));
        assert!(settled(Plan::Restart).is_none());
    }

    #[test]
    fn failures_and_refusals_are_alarming_routine_is_not() {
        assert!(alarming("give_up", true));
        assert!(alarming("refused_by_systemd", true));
        assert!(alarming("restart", false));
        assert!(!alarming("restart", true));
        assert!(!alarming("back_off", true));
    }

    fn unit(active: &str, sub: &str, main: Option<u32>, job: Option<&str>) -> UnitStatus {
        UnitStatus {
            active_state: active.into(),
            sub_state: sub.into(),
            main_pid: main,
            exec_main_pid: main,
            job: job.map(str::to_owned),
            result: "success".into(),
            n_restarts: 0,
            freezer_state: "running".into(),
        }
    }

    #[test]
    fn a_hung_active_unit_is_restarted() {
        assert_eq!(
            plan(
                State::Hung,
                &unit("active", "running", Some(10), None),
                None
            ),
            Plan::Restart
        );
    }

    #[test]
    fn a_failed_unit_after_a_crash_is_restarted() {
        let mut u = unit("failed", "failed", None, None);
        u.result = "signal".into();
        assert_eq!(plan(State::Crashed, &u, Some(10)), Plan::Restart);
    }

    #[test]
    fn systemds_own_restart_is_left_to_it() {
        let u = unit("activating", "auto-restart", None, None);
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::LeaveToSystemd(_)
        ));
        let u = unit("activating", "start", Some(11), Some("start"));
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::LeaveToSystemd(_)
        ));
    }

    #[test]
    fn a_new_main_process_means_systemd_already_restarted_it() {
        let u = unit("active", "running", Some(11), None);
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::LeaveToSystemd(_)
        ));
    }

    #[test]
    fn an_active_unit_without_a_main_process_is_not_taken_for_a_restart_by_systemd() {
        let u = unit("active", "running", None, None);
        assert_eq!(plan(State::Crashed, &u, Some(10)), Plan::Restart);
    }

    #[test]
    fn an_operator_stop_is_never_undone() {
        let u = unit("deactivating", "stop-sigterm", Some(10), Some("stop"));
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::LeaveStopped(_)
        ));
        let u = unit("inactive", "dead", None, None);
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::LeaveStopped(_)
        ));
        assert!(matches!(
            plan(State::Unreachable, &u, None),
            Plan::LeaveStopped(_)
        ));
    }

    #[test]
    fn a_unit_frozen_through_systemd_is_left_frozen() {
        for freezer in ["frozen", "freezing"] {
            let mut u = unit("active", "running", Some(10), None);
            u.freezer_state = freezer.into();
            let plan = plan(State::Hung, &u, None);
            assert!(
                matches!(&plan, Plan::LeaveFrozen(why) if why.contains(freezer)),
                "{plan:?}"
            );
            let (action, _, observation) = settled(plan).unwrap();
            assert_eq!(action, "leave_frozen");
            assert!(matches!(observation, Observation::UnitStopped { .. }));
        }
        // Thawing, or no freezer at all: judged as usual.
        for freezer in ["thawing", "running", ""] {
            let mut u = unit("active", "running", Some(10), None);
            u.freezer_state = freezer.into();
            assert_eq!(plan(State::Hung, &u, None), Plan::Restart, "{freezer}");
        }
    }

    #[test]
    fn systemds_start_limit_is_reported_not_fought() {
        let mut u = unit("failed", "failed", None, None);
        u.result = "start-limit-hit".into();
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::Refused(_)
        ));
    }
}
