//! What to do about a verdict, given systemd's view of the unit: the rule that the observer
//! never fights systemd. A unit systemd is already restarting is left to systemd; a unit an
//! operator stopped stays stopped.

use serde::Serialize;

use crate::detector::State;

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
}

/// What to do about a bad verdict, given the unit's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Restart,
    /// systemd is already on it (a job, or its own `Restart=`).
    LeaveToSystemd(String),
    /// Someone stopped the unit: never start it.
    LeaveStopped(String),
    /// systemd refuses to start it (its start limit); restarting would fail.
    Refused(String),
}

/// Decides, from systemd's view of the unit, whether restarting is ours to do.
pub fn plan(verdict: State, unit: &UnitStatus, dead_pid: Option<u32>) -> Plan {
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

    fn unit(active: &str, sub: &str, main: Option<u32>, job: Option<&str>) -> UnitStatus {
        UnitStatus {
            active_state: active.into(),
            sub_state: sub.into(),
            main_pid: main,
            exec_main_pid: main,
            job: job.map(str::to_owned),
            result: "success".into(),
            n_restarts: 0,
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
    fn systemds_start_limit_is_reported_not_fought() {
        let mut u = unit("failed", "failed", None, None);
        u.result = "start-limit-hit".into();
        assert!(matches!(
            plan(State::Crashed, &u, Some(10)),
            Plan::Refused(_)
        ));
    }
}
