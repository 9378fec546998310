//! The detector: one state machine that turns observations into verdicts and decisions.
//!
//! It does no I/O and reads no clock: every call carries `now` from the caller, so its tests
//! run on a virtual clock. Sensors (the kernel programs, the `Version()` probes, systemd, the
//! agent's own clocks) feed it [`Observation`]s; it answers with a [`Decision`] that the agent
//! hands to the actuator.
//!
//! Rules:
//! - a kernel-reported exit of containerd's main process is a crash at once;
//! - the accept loop is judged by its progress: a connection waiting in containerd's accept
//!   queue longer than `stall_threshold` while containerd accepted nothing for that long is a
//!   kernel suspicion (a stall): containerd becomes suspect;
//! - a confirming probe is asked for once the oldest connection has waited half the stall
//!   threshold ([`DetectorConfig::confirm_after`]), so that its deadline runs alongside
//!   the threshold instead of after it;
//! - a failed fresh-connection probe while the stall stands is a hang, unless the probe over
//!   the connection kept open answered since the stall began (the handlers live: the accept
//!   loop is behind);
//! - a long queue that moves (containerd accepted within the threshold), or failed probes
//!   during which containerd accepted or answered on the open connection, is an overload, not
//!   a hang: it is reported and never restarted. It becomes a hang again when calls on the
//!   open connection fail for longer than `call_horizon` (the kubelet's own horizon);
//! - without kernel evidence, `failures_to_hang` consecutive failed probes make a hang
//!   (timeouts) or an unreachable containerd (connection refused, socket missing);
//! - a probe that answers, however slowly, makes containerd healthy: slow is not hung;
//! - until containerd has answered once, failed probes alone never make a restart: they
//!   could come from the observer's own configuration (a `--socket` where nothing listens,
//!   a permission error). Only evidence tied to containerd's process counts then: its exit,
//!   or a stall on a listener the kernel ties to its main process
//!   ([`Detector::set_listener_owned`]). [`Detector::unanswered`] tells the agent to report a
//!   configuration problem instead;
//! - a gap in the observer's own scheduling is no evidence: probes and pending ages that span
//!   it are discarded, and containerd is probed again before it is judged;
//! - a probe that failed on the observer's own side (out of descriptors or memory) is no
//!   evidence about containerd at all: it neither counts towards a verdict nor clears one;
//! - while a restart is in flight, nothing triggers another one; failures from before a
//!   restart do not count after it.
//!
//! An episode's failures are counted, not copied: a verdict carries at most
//! [`MAX_EVIDENCE`] pieces of evidence however long the outage, and a bad state is recorded
//! once per episode, so an outage of hours costs no more memory than one of seconds.
//!
//! The deeper layers of the probe ladder ([`Layer`]) add, per layer:
//! - `failures_to_hang` consecutive failures of one layer while containerd's threads run
//!   make a hang that names the layer (`tasks`: a degraded containerd, see below). Its first
//!   piece of evidence says that no thread of containerd was in D state at the latest sample
//!   (the threads are runnable: a lock or a deadlock, not the disk) and which layers
//!   answered meanwhile, which places the hang;
//! - containerd's threads in D state past `blocked_threshold`, alone or with a failing
//!   layer, make a storage stall; while any of its threads is in D state, a failing layer is
//!   not judged a hang (it may be the disk, which a restart cannot fix);
//! - a task whose shim does not answer while `Tasks.List` does makes containerd degraded,
//!   naming the container and the shim;
//! - a `Version()` answer never clears a verdict of a deeper layer: only that layer
//!   answering again (or a restart) does;
//! - refused connections from a process that has never served its socket since it started
//!   make a startup hang; each verdict counts how many came in a row ([`Verdict::repeat`]).

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use serde::Serialize;

/// Most pieces of evidence one verdict carries.
pub const MAX_EVIDENCE: usize = 4;
/// Window over which the accept rate is reported.
pub const ACCEPT_RATE_WINDOW: Duration = Duration::from_secs(5);
/// Most accept samples kept for the rate (the agent samples at most every 100 ms).
const MAX_ACCEPT_SAMPLES: usize = 256;
use crate::layer::{BlockedThread, Layer, Owner, SilentTask};

/// Tunables of the detector.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Consecutive failed probes that make a hang or an unreachable containerd when there
    /// is no kernel evidence.
    pub failures_to_hang: u32,
    /// Age of the oldest pending connection from which the accept loop looks stalled, and
    /// how long containerd must have accepted nothing for a stall.
    pub stall_threshold: Duration,
    /// Least time between two confirming probes asked for by kernel suspicion.
    pub confirm_spacing: Duration,
    /// How long an overloaded containerd (one seen accepting from a long queue) must accept
    /// nothing before its accept loop counts as stalled: a throttled process accepts in
    /// bursts, with pauses longer than `stall_threshold` between them.
    pub overloaded_stall: Duration,
    /// How long calls on an open connection may fail while containerd is overloaded before
    /// it counts as hung: the kubelet reports the runtime down after 30 s without a
    /// successful `Status`.
    pub call_horizon: Duration,
    /// How long containerd's threads may stay in D state before it is a storage stall.
    pub blocked_threshold: Duration,
}

impl DetectorConfig {
    /// Age of the oldest pending connection from which a confirming probe is asked for: half
    /// the stall threshold, so that the probe's deadline runs alongside the threshold and a
    /// hang is judged about one deadline sooner. The verdict still needs the full threshold
    /// and a failed probe.
    pub fn confirm_after(&self) -> Duration {
        self.stall_threshold / 2
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            failures_to_hang: 3,
            stall_threshold: Duration::from_secs(1),
            confirm_spacing: Duration::from_secs(1),
            overloaded_stall: Duration::from_secs(5),
            call_horizon: Duration::from_secs(30),
            blocked_threshold: Duration::from_secs(2),
        }
    }
}

/// Why a probe failed, as far as the detector cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeFailure {
    /// No answer within the deadline: containerd accepted or queued the call and sat on it.
    Timeout,
    /// Nobody listens on the socket (refused, or the socket file is missing).
    Refused,
    /// Any other error (a gRPC error status, a broken connection).
    Error,
    /// The probe could not be sent because of the observer's own state: it ran out of file
    /// descriptors (EMFILE, ENFILE) or memory (ENOMEM, ENOBUFS), or may not open the socket
    /// (EACCES, EPERM). The observer is degraded; containerd is not judged by it.
    ObserverSide,
}

/// Which connection a probe rode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeChannel {
    /// A connection opened for this probe: it needs containerd's accept loop.
    Fresh,
    /// A connection kept open between probes, as the kubelet's is: it needs only the handlers.
    Open,
}

/// Something a sensor saw.
#[derive(Debug, Clone)]
pub enum Observation {
    ProbeSucceeded {
        latency: Duration,
        version: String,
        channel: ProbeChannel,
    },
    ProbeFailed {
        /// When the failed probe started: the first moment containerd did not answer.
        started: Instant,
        failure: ProbeFailure,
        error: String,
        channel: ProbeChannel,
    },
    /// containerd's main process exited.
    ProcessExited {
        pid: u32,
        /// When it exited, as exactly as the sensor knows.
        at: Instant,
        sensor: Source,
        detail: String,
    },
    /// The actuator started a restart.
    RestartStarted,
    /// The restart job finished, with systemd's result.
    RestartFinished { ok: bool },
    /// systemd reports the unit stopped on purpose (by an operator, or a clean exit).
    UnitStopped { detail: String },
    /// The kernel's view of containerd's accept queue.
    Pending {
        count: u32,
        oldest_age: Option<Duration>,
        /// Connections containerd accepted since the previous sample.
        accepted: u32,
        sensor: Source,
    },
    /// The observer itself was not scheduled from `from` to `to` (a late tick, or a
    /// suspended machine): deadlines that expired across it are not containerd's doing.
    SchedulingGap { from: Instant, to: Instant },
    /// A deeper layer of the probe ladder answered within its deadline, however slowly.
    /// For `tasks`, the tasks whose shim did not answer containerd.
    LayerAnswered {
        layer: Layer,
        latency: Duration,
        silent_tasks: Vec<SilentTask>,
    },
    /// A deeper layer did not answer within its deadline, or failed.
    LayerFailed {
        layer: Layer,
        started: Instant,
        failure: ProbeFailure,
        error: String,
    },
    /// The threads of containerd and its shims now in D state (none: empty), and the unit's
    /// pressure as context.
    Blocked {
        threads: Vec<BlockedThread>,
        context: String,
        sensor: Source,
    },
}

/// Where a piece of evidence came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A kernel program (eBPF).
    Ebpf,
    /// The kernel's socket diagnostics (sock_diag), the accept queue without eBPF.
    SockDiag,
    /// A pidfd, process exits without eBPF.
    Pidfd,
    /// The `Version()` probe.
    Probe,
    /// systemd's view of the unit.
    Systemd,
    /// A deeper layer of the probe ladder.
    Ladder,
    /// `/proc/<pid>/task/*/stat` and `wchan`: threads in D state.
    Procfs,
}

/// One fact behind a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub source: Source,
    pub at: Instant,
    pub detail: String,
}

/// The detector's overall judgement of containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No probe has finished yet.
    Starting,
    Healthy,
    /// Something looks wrong but not enough to act.
    Suspect,
    /// containerd makes progress (accepts connections, answers calls) but falls behind:
    /// reported, never restarted.
    Overloaded,
    Crashed,
    Hung,
    Unreachable,
    /// A restart is in flight or has finished and containerd has not answered yet.
    Recovering,
    /// An operator stopped the unit: nothing is restarted until it runs again.
    Stopped,
    /// containerd answers, but a shim does not (or `Tasks.List` as a whole hangs).
    Degraded,
    /// containerd waits on its storage (threads in D state, writes not taken).
    StorageStalled,
    /// containerd runs but has never served its socket since it started.
    StartupHung,
}

/// A judgement worth recording: what was seen, when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub state: State,
    pub at: Instant,
    /// The first sign that led here; `at - first_sign` is the detection latency.
    pub first_sign: Instant,
    pub pid: Option<u32>,
    /// At most [`MAX_EVIDENCE`] entries.
    pub evidence: Vec<Evidence>,
    /// The probe layer that failed, for verdicts of the ladder.
    pub layer: Option<Layer>,
    /// How many verdicts of this state came in a row, across restarts, without containerd
    /// answering in between (1 for the first). Only startup hangs count; others say 1.
    pub repeat: u32,
    /// The tasks whose shims do not answer, for a degraded containerd.
    pub silent_tasks: Vec<SilentTask>,
}

impl Verdict {
    pub fn detection_latency(&self) -> Duration {
        self.at.saturating_duration_since(self.first_sign)
    }
}

/// What the agent should do after an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait,
    /// Probe containerd now to confirm a kernel suspicion.
    ProbeNow,
    /// Act on this verdict; [`crate::policy::decide`] says how (a restart, or a report when
    /// a restart cannot help).
    Act(Verdict),
}

/// How far containerd's accept loop got, for `/status` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AcceptProgress {
    /// Connections accepted per second over [`ACCEPT_RATE_WINDOW`].
    pub per_second: f64,
    /// How long ago containerd last accepted one, if it was seen.
    pub last_accept_ago: Option<Duration>,
}

/// Consecutive failed probes of one episode: counted, with the first and the latest kept.
#[derive(Debug, Clone)]
struct Failures {
    count: u32,
    /// The latest run of failures during which containerd showed no progress at all: only
    /// these count towards a hang.
    unexplained: u32,
    first: Evidence,
    last: Evidence,
}

impl Failures {
    fn evidence(&self) -> Vec<Evidence> {
        let mut evidence = vec![self.first.clone()];
        if self.count > 1 {
            evidence.push(self.last.clone());
        }
        if self.count > 2 {
            evidence.push(Evidence {
                source: Source::Probe,
                at: self.last.at,
                detail: format!(
                    "{} consecutive failed probes, the first and the latest shown",
                    self.count
                ),
            });
        }
        evidence
    }
}

/// The state machine. Feed it with [`Detector::observe`].
#[derive(Debug)]
pub struct Detector {
    config: DetectorConfig,
    state: State,
    main_pid: Option<u32>,
    /// Failed fresh-connection probes of this episode.
    failures: Option<Failures>,
    restart_in_flight: bool,
    /// Evidence of a stalled accept loop, while it stands.
    stall: Option<Evidence>,
    last_confirm: Option<Instant>,
    /// When the accept queue was last sampled: the earliest moment an accept counted at the
    /// next sample can have happened.
    last_sample: Option<Instant>,
    /// The earliest moment containerd's latest seen accept can have happened.
    last_accept: Option<Instant>,
    /// Accepts per sample over [`ACCEPT_RATE_WINDOW`]: `(sampled at, accepted)`.
    accepts: VecDeque<(Instant, u32)>,
    /// The last sample showed an old connection at the back of a queue that moves.
    queue_moving_behind: bool,
    /// When the probe over the open connection last answered.
    open_answered: Option<Instant>,
    /// The first failure on the open connection since it last answered.
    open_failing: Option<Evidence>,
    /// The end of the latest gap in the observer's own scheduling.
    gap_end: Option<Instant>,
    /// Whether containerd ever answered a probe on the configured socket.
    answered: bool,
    /// Whether the kernel ties the watched listener to containerd's main process.
    listener_owned: bool,
    /// Verdicts not yet taken by [`Detector::take_verdicts`].
    new_verdicts: Vec<Verdict>,
    /// The verdict of the bad episode under way, handed out again while it lasts.
    episode: Option<Verdict>,
    /// Consecutive failures of each deeper layer, oldest first.
    layer_failures: BTreeMap<Layer, Vec<Evidence>>,
    /// containerd's own threads now in D state.
    blocked: Vec<BlockedThread>,
    blocked_context: String,
    blocked_sensor: Source,
    /// When containerd's threads were last sampled for D state.
    blocked_sampled: Option<Instant>,
    /// When each layer last answered (`version`: a `Version()` probe).
    answered_at: BTreeMap<Layer, Instant>,
    /// Tasks whose shims did not answer at the last `Tasks.List`.
    silent: Vec<SilentTask>,
    /// The layer of the standing verdict, if a deeper layer made it.
    verdict_layer: Option<Layer>,
    /// Whether the current main process has answered a probe since it started.
    answered_since_start: bool,
    /// Startup hangs in a row without an answer in between.
    startup_hangs: u32,
    /// systemd is still starting the unit.
    unit_starting: bool,
    /// Refused probes while systemd kept starting the current process.
    starting_refusals: u32,
    /// The process the last startup hang was about: one verdict per process.
    startup_hung_pid: Option<u32>,
    /// A restart after a startup hang did not finish its start either.
    retry_hung: bool,
    /// The state a restart in flight was for.
    restarting_from: Option<State>,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            state: State::Starting,
            main_pid: None,
            failures: None,
            restart_in_flight: false,
            stall: None,
            last_confirm: None,
            last_sample: None,
            last_accept: None,
            accepts: VecDeque::new(),
            queue_moving_behind: false,
            open_answered: None,
            open_failing: None,
            gap_end: None,
            answered: false,
            listener_owned: false,
            new_verdicts: Vec::new(),
            episode: None,
            layer_failures: BTreeMap::new(),
            blocked: Vec::new(),
            blocked_context: String::new(),
            blocked_sensor: Source::Procfs,
            blocked_sampled: None,
            answered_at: BTreeMap::new(),
            silent: Vec::new(),
            verdict_layer: None,
            answered_since_start: false,
            startup_hangs: 0,
            unit_starting: false,
            starting_refusals: 0,
            startup_hung_pid: None,
            retry_hung: false,
            restarting_from: None,
        }
    }

    /// Tells the detector whether the listener whose queue it is shown belongs to
    /// containerd's main process, as the kernel sees it (the socket's inode among the
    /// process's file descriptors). Before containerd's first answer, only a stall on such a
    /// listener counts.
    pub fn set_listener_owned(&mut self, owned: bool) {
        self.listener_owned = owned;
    }

    /// Whether containerd has answered a probe yet.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Probes failed often enough to act on, but containerd has never answered and nothing
    /// ties the failures to its process: the observer waits, and the agent reports a
    /// configuration problem.
    pub fn unanswered(&self) -> bool {
        !self.answered
            && self.failed_probes() >= self.config.failures_to_hang
            && !self.restart_in_flight
            && !self.startup_evidence()
    }

    /// Tells the detector whether systemd is still starting the unit (`activating`, its
    /// start job not finished): for a notify unit, containerd has not said it is ready.
    pub fn set_unit_starting(&mut self, starting: bool) {
        if !starting {
            self.starting_refusals = 0;
        }
        self.unit_starting = starting;
    }

    /// Whether containerd hangs at start, with evidence that ties this to its process and
    /// not to the observer's `--socket` or to a crash loop: `failures_to_hang` refusals in a
    /// row while systemd kept waiting for this process to finish starting (a notify unit
    /// that never said it is ready), or a restart after a startup hang whose start did not
    /// finish either. One verdict per process.
    fn startup_evidence(&self) -> bool {
        if self.answered_since_start {
            return false;
        }
        let starting = self.starting_refusals >= self.config.failures_to_hang
            && self.main_pid.is_some()
            && self.main_pid != self.startup_hung_pid;
        starting || self.retry_hung
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Tells the detector which PID is containerd's main process now (from systemd).
    pub fn set_main_pid(&mut self, pid: Option<u32>) {
        if pid != self.main_pid {
            self.answered_since_start = false;
            self.starting_refusals = 0;
            // A new main process after a crash or a stop the observer left alone: systemd's
            // `Restart=` or an operator started containerd again. It is judged afresh, as
            // after a restart of the observer's own, so that a start that hangs is seen.
            if pid.is_some()
                && !self.restart_in_flight
                && matches!(self.state, State::Crashed | State::Stopped)
            {
                self.state = State::Recovering;
                self.failures = None;
            }
        }
        self.main_pid = pid;
    }

    /// Verdicts reached since the last call, oldest first.
    pub fn take_verdicts(&mut self) -> Vec<Verdict> {
        std::mem::take(&mut self.new_verdicts)
    }

    /// Consecutive failed fresh-connection probes in the episode under way.
    pub fn failed_probes(&self) -> u32 {
        self.failures.as_ref().map_or(0, |f| f.count)
    }

    /// The accept loop's progress at `now`.
    pub fn accept_progress(&self, now: Instant) -> AcceptProgress {
        let accepted: u64 = self
            .accepts
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= ACCEPT_RATE_WINDOW)
            .map(|(_, n)| u64::from(*n))
            .sum();
        AcceptProgress {
            per_second: accepted as f64 / ACCEPT_RATE_WINDOW.as_secs_f64(),
            last_accept_ago: self.last_accept.map(|at| now.saturating_duration_since(at)),
        }
    }

    pub fn observe(&mut self, now: Instant, observation: Observation) -> Decision {
        match observation {
            Observation::ProbeSucceeded {
                latency,
                version,
                channel,
            } => {
                let detail = format!(
                    "Version() {}answered {version} in {:.1} ms",
                    channel_words(channel),
                    latency.as_secs_f64() * 1e3
                );
                let evidence = Evidence {
                    source: Source::Probe,
                    at: now,
                    detail,
                };
                self.answered = true;
                self.answered_since_start = true;
                self.answered_at.insert(Layer::Version, now);
                self.startup_hangs = 0;
                self.retry_hung = false;
                self.startup_hung_pid = None;
                match channel {
                    ProbeChannel::Fresh => {
                        self.failures = None;
                        if self.restart_in_flight || self.deep_verdict_stands() {
                            return Decision::Wait;
                        }
                        if self.queue_moving_behind {
                            if self.state != State::Overloaded {
                                self.record(now, State::Overloaded, now, vec![evidence]);
                            }
                        } else if self.state != State::Healthy {
                            self.record(now, State::Healthy, now, vec![evidence]);
                        }
                    }
                    ProbeChannel::Open => {
                        // When the call left: a frozen containerd cannot answer a call sent
                        // after it froze, whenever the answer to an earlier one is read.
                        let sent = now.checked_sub(latency).unwrap_or(now);
                        self.open_answered = Some(sent);
                        self.open_failing = None;
                        if self.restart_in_flight
                            || matches!(self.state, State::Crashed | State::Stopped)
                            || self.deep_verdict_stands()
                        {
                            return Decision::Wait;
                        }
                        if let Some(failures) = self.failures.as_ref().filter(|f| sent >= f.last.at)
                        {
                            // The handlers answer while fresh connections fail: behind, not dead.
                            let mut evidence = vec![failures.last.clone(), evidence];
                            evidence.truncate(MAX_EVIDENCE);
                            if self.state == State::Suspect {
                                let first = failures.first.at;
                                self.record(now, State::Overloaded, first, evidence);
                            }
                        } else if self.stall.is_none()
                            && !self.queue_moving_behind
                            && matches!(self.state, State::Starting | State::Recovering)
                        {
                            self.record(now, State::Healthy, now, vec![evidence]);
                        }
                    }
                }
                Decision::Wait
            }
            Observation::ProbeFailed {
                failure: ProbeFailure::ObserverSide,
                ..
            } => {
                // Neither a failure of containerd nor an answer from it: the count of
                // failures in a row, the kernel's suspicion and the state all stay as they are.
                Decision::Wait
            }
            Observation::ProbeFailed {
                started,
                failure,
                error,
                channel,
            } => {
                if self.gap_end.is_some_and(|end| started < end) {
                    // Its deadline ran across the observer's own gap: no evidence either way.
                    return Decision::Wait;
                }
                let evidence = Evidence {
                    source: Source::Probe,
                    at: started,
                    detail: format!(
                        "Version() {}failed ({}): {error}",
                        channel_words(channel),
                        failure_name(failure)
                    ),
                };
                match channel {
                    ProbeChannel::Open => self.on_open_failure(now, evidence),
                    ProbeChannel::Fresh => self.on_fresh_failure(now, started, failure, evidence),
                }
            }
            Observation::ProcessExited {
                pid,
                at,
                sensor,
                detail,
            } => {
                // Exits of other PIDs (an old main process we already restarted) and exits
                // caused by our own restart are expected.
                if self.main_pid.is_some_and(|main| main != pid) || self.restart_in_flight {
                    return Decision::Wait;
                }
                if matches!(self.state, State::Crashed | State::Stopped) {
                    return Decision::Wait;
                }
                let evidence = Evidence {
                    source: sensor,
                    at,
                    detail,
                };
                let verdict = self.record(now, State::Crashed, at, vec![evidence]);
                Decision::Act(verdict)
            }
            Observation::Pending {
                count,
                oldest_age,
                accepted,
                sensor,
            } => self.on_pending(now, count, oldest_age, accepted, sensor),
            Observation::SchedulingGap { to, .. } => {
                // Whatever expired across the gap says nothing about containerd; look afresh.
                self.gap_end = Some(self.gap_end.map_or(to, |end| end.max(to)));
                self.stall = None;
                self.failures = None;
                self.open_failing = None;
                self.last_confirm = Some(now);
                Decision::ProbeNow
            }
            Observation::UnitStopped { detail } => {
                self.restart_in_flight = false;
                self.forget_episode();
                if self.state != State::Stopped {
                    let evidence = Evidence {
                        source: Source::Systemd,
                        at: now,
                        detail,
                    };
                    self.record(now, State::Stopped, now, vec![evidence]);
                }
                Decision::Wait
            }
            Observation::RestartStarted => {
                self.restarting_from = Some(self.state);
                self.restart_in_flight = true;
                self.forget_episode();
                self.layer_failures.clear();
                self.silent.clear();
                self.verdict_layer = None;
                self.state = State::Recovering;
                Decision::Wait
            }
            Observation::LayerAnswered {
                layer,
                latency,
                silent_tasks,
            } => self.on_layer_answered(now, layer, latency, silent_tasks),
            Observation::LayerFailed {
                layer,
                started,
                failure,
                error,
            } => self.on_layer_failed(now, layer, started, failure, error),
            Observation::Blocked {
                threads,
                context,
                sensor,
            } => self.on_blocked(now, threads, context, sensor),
            Observation::RestartFinished { ok } => {
                self.restart_in_flight = false;
                let from = self.restarting_from.take();
                if !ok && from == Some(State::StartupHung) {
                    // The restart's own start never finished (systemd's start timeout, for
                    // a notify unit): it hung the same way. The next refusals count again.
                    self.state = State::StartupHung;
                    self.answered_since_start = false;
                    self.retry_hung = true;
                } else if !ok {
                    // The next failed probes will judge again.
                    self.state = State::Suspect;
                }
                Decision::Wait
            }
        }
    }

    fn on_fresh_failure(
        &mut self,
        now: Instant,
        started: Instant,
        failure: ProbeFailure,
        evidence: Evidence,
    ) -> Decision {
        match &mut self.failures {
            Some(f) => {
                f.count = f.count.saturating_add(1);
                f.unexplained = f.unexplained.saturating_add(1);
                f.last = evidence.clone();
            }
            None => {
                self.failures = Some(Failures {
                    count: 1,
                    unexplained: 1,
                    first: evidence.clone(),
                    last: evidence.clone(),
                });
            }
        }
        if failure == ProbeFailure::Refused && self.unit_starting {
            self.starting_refusals += 1;
        }
        if self.restart_in_flight
            || matches!(self.state, State::Crashed | State::Stopped)
            // A storage stall can block Version() too; a restart would not help.
            || self.state == State::StorageStalled
            // Reported: restarting a process that hangs at start does not help.
            || (self.state == State::StartupHung && self.startup_hangs >= 2)
        {
            return Decision::Wait;
        }
        if failure != ProbeFailure::Refused {
            // Before containerd's first answer, a stall counts only on its own listener.
            let stall = self
                .stall
                .clone()
                .filter(|_| self.answered || self.listener_owned);
            if let Some(stall) = stall {
                // A call on the open connection sent after this probe left was answered:
                // no accept for the threshold, yet the handlers live. A throttled accept
                // loop that works in bursts is behind: overloaded. One that stays silent
                // past `overloaded_stall` while connections wait is dead (out of
                // descriptors, say): hung, whatever the open connection says. (The stall's
                // own start may predate a connection seen late.)
                let silent_since = self.last_accept.map_or(stall.at, |at| at.max(stall.at));
                let silent_for = now.saturating_duration_since(silent_since);
                if self.open_answered.is_some_and(|at| at >= started) {
                    if silent_for < self.config.overloaded_stall {
                        self.enter_overload(now, stall);
                        return self.hang_past_horizon(now);
                    }
                    let mut stall = stall;
                    stall.detail.push_str(&format!(
                        "; none accepted for {:.1} s though containerd answers on an open connection: its accept loop is dead",
                        silent_for.as_secs_f64()
                    ));
                    return self.judge_bad(now, State::Hung, stall.at, vec![stall, evidence]);
                }
                return self.judge_bad(now, State::Hung, stall.at, vec![stall, evidence]);
            }
            let progressed = self.last_accept.is_some_and(|at| at >= started)
                || self.open_answered.is_some_and(|at| at >= started);
            if progressed {
                if let Some(f) = &mut self.failures {
                    f.unexplained = 0;
                }
                let mut why = evidence;
                why.detail.push_str(&format!(
                    "; meanwhile containerd {}",
                    self.progress_words(now, started)
                ));
                self.enter_overload(now, why);
                return self.hang_past_horizon(now);
            }
        }
        let startup_hang = failure == ProbeFailure::Refused && self.startup_evidence();
        let failures = self.failures.as_ref().expect("just counted");
        let first = failures.first.at;
        if failures.unexplained < self.config.failures_to_hang || (!self.answered && !startup_hang)
        {
            // An overload stays one until the failures without progress make a hang.
            if !matches!(self.state, State::Suspect | State::Overloaded) {
                let evidence = failures.evidence();
                self.record(now, State::Suspect, first, evidence);
            }
            return Decision::Wait;
        }
        let state = match failure {
            ProbeFailure::Refused if startup_hang => State::StartupHung,
            ProbeFailure::Refused => State::Unreachable,
            _ => State::Hung,
        };
        let evidence = failures.evidence();
        if state == State::StartupHung {
            return self.judge_startup_hang(now, first, evidence);
        }
        self.judge_bad(now, state, first, evidence)
    }

    /// A startup hang: counted across restarts, with systemd's side of it as evidence.
    fn judge_startup_hang(
        &mut self,
        now: Instant,
        first: Instant,
        mut evidence: Vec<Evidence>,
    ) -> Decision {
        self.startup_hangs += 1;
        self.startup_hung_pid = self.main_pid;
        self.retry_hung = false;
        // Keep room for systemd's evidence within the verdict's bound.
        evidence.truncate(MAX_EVIDENCE - 1);
        evidence.push(Evidence {
            source: Source::Systemd,
            at: now,
            detail: match self.main_pid {
                Some(pid) => format!(
                    "process {pid} runs but has not served its socket since it started, and systemd still waits for it to be ready ({} start(s) in a row)",
                    self.startup_hangs
                ),
                None => format!(
                    "the restart's start did not finish either: systemd gave up waiting for containerd to be ready ({} start(s) in a row)",
                    self.startup_hangs
                ),
            },
        });
        let mut verdict = self.record(now, State::StartupHung, first, evidence);
        verdict.repeat = self.startup_hangs;
        if let Some(last) = self.new_verdicts.last_mut() {
            last.repeat = self.startup_hangs;
        }
        if let Some(episode) = &mut self.episode {
            episode.repeat = self.startup_hangs;
        }
        Decision::Act(verdict)
    }

    fn on_open_failure(&mut self, now: Instant, evidence: Evidence) -> Decision {
        if self.open_failing.is_none() {
            self.open_failing = Some(evidence);
        }
        if self.restart_in_flight
            || matches!(
                self.state,
                State::Crashed | State::Stopped | State::StorageStalled
            )
        {
            return Decision::Wait;
        }
        self.hang_past_horizon(now)
    }

    /// While overloaded: a hang once calls on the open connection failed for the horizon.
    fn hang_past_horizon(&mut self, now: Instant) -> Decision {
        if !matches!(self.state, State::Overloaded | State::Hung) {
            return Decision::Wait;
        }
        let Some(failing) = self.open_failing.clone() else {
            return Decision::Wait;
        };
        let failed_for = now.saturating_duration_since(failing.at);
        if failed_for < self.config.call_horizon {
            return Decision::Wait;
        }
        let mut evidence = vec![failing.clone()];
        if let Some(failures) = &self.failures {
            evidence.push(failures.last.clone());
        }
        evidence.push(Evidence {
            source: Source::Probe,
            at: now,
            detail: format!(
                "no answer on an open connection for {:.0} s (the kubelet's horizon is {:.0} s): overloaded past recovery",
                failed_for.as_secs_f64(),
                self.config.call_horizon.as_secs_f64()
            ),
        });
        self.judge_bad(now, State::Hung, failing.at, evidence)
    }

    fn on_pending(
        &mut self,
        now: Instant,
        count: u32,
        oldest_age: Option<Duration>,
        accepted: u32,
        sensor: Source,
    ) -> Decision {
        if accepted > 0 {
            self.last_accept = Some(self.last_sample.unwrap_or(now));
            if self.accepts.len() == MAX_ACCEPT_SAMPLES {
                self.accepts.pop_front();
            }
            self.accepts.push_back((now, accepted));
        }
        while self
            .accepts
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > ACCEPT_RATE_WINDOW)
        {
            self.accepts.pop_front();
        }
        self.last_sample = Some(now);
        // The part of a connection's wait that spans the observer's own gap is not counted:
        // it has waited at least since the observer looked again.
        let oldest_age = oldest_age.map(|age| match self.gap_end {
            Some(end) => age.min(now.saturating_duration_since(end)),
            None => age,
        });
        let Some(age) = oldest_age.filter(|age| *age >= self.config.confirm_after()) else {
            self.stall = None;
            self.queue_moving_behind = false;
            if self.state == State::Overloaded && self.failures.is_none() && !self.restart_in_flight
            {
                let evidence = Evidence {
                    source: sensor,
                    at: now,
                    detail: format!(
                        "containerd caught up: {count} connection(s) waiting, accepting {:.0}/s",
                        self.accept_progress(now).per_second
                    ),
                };
                self.record(now, State::Healthy, now, vec![evidence]);
            }
            return Decision::Wait;
        };
        if self.restart_in_flight || matches!(self.state, State::Crashed | State::Stopped) {
            return Decision::Wait;
        }
        let queued = now.checked_sub(age).unwrap_or(now);
        let silence = if self.state == State::Overloaded {
            self.config
                .overloaded_stall
                .max(self.config.stall_threshold)
        } else {
            self.config.stall_threshold
        };
        let moving = self
            .last_accept
            .is_some_and(|at| now.saturating_duration_since(at) < silence);
        if age < self.config.stall_threshold {
            // Not a stall yet, but worth a probe whose deadline ends past the threshold.
            self.stall = None;
            self.queue_moving_behind = false;
        } else if moving {
            // An old connection at the back of a queue that moves: overloaded, not hung.
            self.stall = None;
            self.queue_moving_behind = true;
            let evidence = Evidence {
                source: sensor,
                at: queued,
                detail: format!(
                    "{count} connection(s) waiting in containerd's accept queue, the oldest for {:.0} ms, but it moves: {}",
                    age.as_secs_f64() * 1e3,
                    self.progress_words(now, queued)
                ),
            };
            self.enter_overload(now, evidence);
        } else if self.stall.is_none() {
            self.queue_moving_behind = false;
            let since = match self.last_accept {
                Some(at) => format!(
                    "containerd accepted none for {:.0} ms",
                    now.saturating_duration_since(at).as_secs_f64() * 1e3
                ),
                None => "no accept seen".to_owned(),
            };
            let evidence = Evidence {
                source: sensor,
                at: queued,
                detail: format!(
                    "{count} connection(s) waiting in containerd's accept queue, the oldest for {:.0} ms; {since}",
                    age.as_secs_f64() * 1e3
                ),
            };
            self.stall = Some(evidence.clone());
            if matches!(
                self.state,
                State::Healthy | State::Starting | State::Overloaded
            ) {
                self.record(now, State::Suspect, queued, vec![evidence]);
            }
        }
        let due = self
            .last_confirm
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.confirm_spacing);
        if due {
            self.last_confirm = Some(now);
            Decision::ProbeNow
        } else {
            Decision::Wait
        }
    }

    /// Moves to `Overloaded`, recording it once per episode.
    fn enter_overload(&mut self, now: Instant, evidence: Evidence) {
        if matches!(
            self.state,
            State::Healthy | State::Starting | State::Suspect | State::Recovering
        ) {
            let first = evidence.at;
            self.record(now, State::Overloaded, first, vec![evidence]);
        }
    }

    /// "accepted N connection(s) in the last … (R/s)" or "answered on the open connection".
    fn progress_words(&self, now: Instant, since: Instant) -> String {
        let progress = self.accept_progress(now);
        let mut words = Vec::new();
        if self.last_accept.is_some_and(|at| at >= since) {
            words.push(format!(
                "accepts {:.0} connection(s)/s (the latest {:.0} ms ago)",
                progress.per_second,
                progress.last_accept_ago.unwrap_or_default().as_secs_f64() * 1e3
            ));
        }
        if self.open_answered.is_some_and(|at| at >= since) {
            words.push("answered on the open connection".to_owned());
        }
        words.join(" and ")
    }

    /// A bad state calls for a restart; recorded once per episode, handed out while it lasts.
    fn judge_bad(
        &mut self,
        now: Instant,
        state: State,
        first: Instant,
        evidence: Vec<Evidence>,
    ) -> Decision {
        if self.state == state
            && let Some(verdict) = &self.episode
        {
            return Decision::Act(verdict.clone());
        }
        Decision::Act(self.record(now, state, first, evidence))
    }

    /// Forgets what the episode saw: a restart or a stop starts afresh.
    fn forget_episode(&mut self) {
        self.stall = None;
        self.failures = None;
        self.open_failing = None;
        self.open_answered = None;
        self.last_accept = None;
        self.accepts.clear();
        self.queue_moving_behind = false;
    }

    fn record(
        &mut self,
        now: Instant,
        state: State,
        first_sign: Instant,
        evidence: Vec<Evidence>,
    ) -> Verdict {
        self.record_layer(now, state, first_sign, evidence, None)
    }

    fn record_layer(
        &mut self,
        now: Instant,
        state: State,
        first_sign: Instant,
        mut evidence: Vec<Evidence>,
        layer: Option<Layer>,
    ) -> Verdict {
        evidence.truncate(MAX_EVIDENCE);
        self.state = state;
        self.verdict_layer = layer;
        let verdict = Verdict {
            state,
            at: now,
            first_sign,
            pid: self.main_pid,
            evidence,
            layer,
            repeat: 1,
            silent_tasks: if state == State::Degraded {
                self.silent.clone()
            } else {
                Vec::new()
            },
        };
        self.episode = Some(verdict.clone());
        self.new_verdicts.push(verdict.clone());
        verdict
    }

    fn on_layer_answered(
        &mut self,
        now: Instant,
        layer: Layer,
        latency: Duration,
        silent_tasks: Vec<SilentTask>,
    ) -> Decision {
        self.layer_failures.remove(&layer);
        self.answered_at.insert(layer, now);
        let answered = format!(
            "{} answered in {:.1} ms",
            layer.call(),
            latency.as_secs_f64() * 1e3
        );
        if layer == Layer::Tasks {
            let changed = silent_tasks != self.silent;
            self.silent = silent_tasks;
            if !self.silent.is_empty()
                && (changed || self.state != State::Degraded)
                && self.may_judge_deep()
                && self.state != State::StorageStalled
            {
                let names: Vec<String> = self.silent.iter().map(ToString::to_string).collect();
                let evidence = Evidence {
                    source: Source::Ladder,
                    at: now,
                    detail: format!(
                        "{answered}, but the shim did not answer containerd for {}: containerd reported the task UNKNOWN",
                        names.join(", ")
                    ),
                };
                let verdict =
                    self.record_layer(now, State::Degraded, now, vec![evidence], Some(layer));
                return Decision::Act(verdict);
            }
        }
        self.recover_if_clear(now, format!("{answered}; every deeper layer answers again"));
        Decision::Wait
    }

    fn on_layer_failed(
        &mut self,
        now: Instant,
        layer: Layer,
        started: Instant,
        failure: ProbeFailure,
        error: String,
    ) -> Decision {
        // Nobody listening is the Version() probe's to judge; the observer's own exhaustion
        // is no evidence at all.
        if matches!(failure, ProbeFailure::Refused | ProbeFailure::ObserverSide) {
            return Decision::Wait;
        }
        let failures = self.layer_failures.entry(layer).or_default();
        failures.push(Evidence {
            source: Source::Ladder,
            at: started,
            detail: format!(
                "{} failed ({}): {error}",
                layer.call(),
                failure_name(failure)
            ),
        });
        let count = failures.len() as u32;
        if count < self.config.failures_to_hang || !self.may_judge_deep() {
            return Decision::Wait;
        }
        let mut evidence = self.layer_failures[&layer].clone();
        let first = evidence[0].at;
        if let Some(blocked) = self.blocked_evidence(now) {
            if self.state == State::StorageStalled {
                return Decision::Wait;
            }
            evidence.insert(0, blocked);
            let first = evidence.iter().map(|e| e.at).min().unwrap_or(first);
            let verdict =
                self.record_layer(now, State::StorageStalled, first, evidence, Some(layer));
            return Decision::Act(verdict);
        }
        if !self.blocked.is_empty() {
            // Threads in D state, not yet for long: the disk may be behind. Judge once they
            // have been blocked past the threshold, or have run again.
            return Decision::Wait;
        }
        let state = if layer == Layer::Tasks {
            State::Degraded
        } else {
            State::Hung
        };
        if self.state == state && self.verdict_layer == Some(layer) {
            return Decision::Wait;
        }
        if state == State::Hung {
            evidence.insert(0, self.runnable_evidence(now, layer, first));
        }
        let verdict = self.record_layer(now, state, first, evidence, Some(layer));
        Decision::Act(verdict)
    }

    /// Why a failing `layer` is a hang inside containerd: its threads are runnable (none in
    /// D state at the latest sample), and which layers answered since `since`, the layer's
    /// first failure.
    fn runnable_evidence(&self, now: Instant, layer: Layer, since: Instant) -> Evidence {
        let threads = match self.blocked_sampled {
            Some(at) => format!(
                "no containerd thread in D state at the latest sample ({:.1} s ago): its threads are runnable, so {layer} is stuck on a lock or in a deadlock inside containerd, not on its disk",
                now.saturating_duration_since(at).as_secs_f64()
            ),
            None => format!(
                "containerd's threads have not been sampled for D state; {layer} is judged stuck inside containerd"
            ),
        };
        let answering: Vec<&str> = self
            .answered_at
            .iter()
            .filter(|(l, at)| **l != layer && **at >= since)
            .map(|(l, _)| l.name())
            .collect();
        let answering = if answering.is_empty() {
            "no other layer answered meanwhile".to_owned()
        } else {
            format!("answering meanwhile: {}", answering.join(", "))
        };
        Evidence {
            source: if self.blocked_sampled.is_some() {
                self.blocked_sensor
            } else {
                Source::Ladder
            },
            at: now,
            detail: format!("{threads}; {answering}"),
        }
    }

    fn on_blocked(
        &mut self,
        now: Instant,
        threads: Vec<BlockedThread>,
        context: String,
        sensor: Source,
    ) -> Decision {
        self.blocked = threads
            .into_iter()
            .filter(|t| t.owner == Owner::Containerd)
            .collect();
        self.blocked_context = context;
        self.blocked_sensor = sensor;
        self.blocked_sampled = Some(now);
        let Some(blocked) = self.blocked_evidence(now) else {
            self.recover_if_clear(
                now,
                "no containerd thread is in D state any more, and every deeper layer answers"
                    .into(),
            );
            return Decision::Wait;
        };
        if self.state == State::StorageStalled || !self.may_judge_deep() {
            return Decision::Wait;
        }
        let mut evidence = vec![blocked];
        evidence.extend(self.layer_failures.values().flatten().cloned());
        let first = evidence.iter().map(|e| e.at).min().unwrap_or(now);
        let layer = self
            .layer_failures
            .iter()
            .find(|(_, f)| !f.is_empty())
            .map(|(l, _)| *l);
        let verdict = self.record_layer(now, State::StorageStalled, first, evidence, layer);
        Decision::Act(verdict)
    }

    /// Whether the standing verdict came from a deeper layer (or the kernel's view of
    /// blocked threads), which a `Version()` answer cannot clear.
    fn deep_verdict_stands(&self) -> bool {
        matches!(self.state, State::Degraded | State::StorageStalled)
            || (self.state == State::Hung && self.verdict_layer.is_some())
    }

    /// Whether nothing deeper is wrong any more: no layer failing, no thread blocked past
    /// the threshold, no silent shim.
    fn deep_layers_clear(&self) -> bool {
        self.layer_failures.values().all(Vec::is_empty)
            && self.blocked_past_threshold().is_empty()
            && self.silent.is_empty()
    }

    fn blocked_past_threshold(&self) -> Vec<&BlockedThread> {
        self.blocked
            .iter()
            .filter(|t| t.blocked_for >= self.config.blocked_threshold)
            .collect()
    }

    /// Whether verdicts may be made now: not during a restart, nor about a containerd that
    /// crashed, was stopped, or is reported hanging at start.
    fn may_judge_deep(&self) -> bool {
        !self.restart_in_flight
            && !matches!(
                self.state,
                State::Crashed
                    | State::Stopped
                    | State::Recovering
                    | State::Starting
                    | State::Unreachable
                    | State::StartupHung
            )
            && (self.state != State::Hung || self.verdict_layer.is_some())
    }

    /// A deep verdict clears once everything deeper answers again.
    fn recover_if_clear(&mut self, now: Instant, detail: String) {
        if self.deep_verdict_stands() && self.deep_layers_clear() && !self.restart_in_flight {
            let evidence = Evidence {
                source: Source::Ladder,
                at: now,
                detail,
            };
            self.record(now, State::Healthy, now, vec![evidence]);
        }
    }

    fn blocked_evidence(&self, now: Instant) -> Option<Evidence> {
        let past = self.blocked_past_threshold();
        let longest = past.iter().map(|t| t.blocked_for).max()?;
        let shown: Vec<String> = past.iter().take(3).map(ToString::to_string).collect();
        let more = past.len().saturating_sub(3);
        let mut detail = format!(
            "{} containerd thread(s) in D state past {:.1} s: {}",
            past.len(),
            self.config.blocked_threshold.as_secs_f64(),
            shown.join("; ")
        );
        if more > 0 {
            detail.push_str(&format!("; and {more} more"));
        }
        if !self.blocked_context.is_empty() {
            detail.push_str(&format!(" ({})", self.blocked_context));
        }
        Some(Evidence {
            source: self.blocked_sensor,
            at: now.checked_sub(longest).unwrap_or(now),
            detail,
        })
    }
}

fn channel_words(channel: ProbeChannel) -> &'static str {
    match channel {
        ProbeChannel::Fresh => "",
        ProbeChannel::Open => "on the open connection ",
    }
}

fn failure_name(f: ProbeFailure) -> &'static str {
    match f {
        ProbeFailure::Timeout => "timeout",
        ProbeFailure::Refused => "refused",
        ProbeFailure::Error => "error",
        ProbeFailure::ObserverSide => "observer_side",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok() -> Observation {
        Observation::ProbeSucceeded {
            latency: ms(2),
            version: "1.6.20".into(),
            channel: ProbeChannel::Fresh,
        }
    }

    fn failed(started: Instant, failure: ProbeFailure) -> Observation {
        Observation::ProbeFailed {
            started,
            failure,
            error: "x".into(),
            channel: ProbeChannel::Fresh,
        }
    }

    fn exit(pid: u32, at: Instant) -> Observation {
        Observation::ProcessExited {
            pid,
            at,
            sensor: Source::Ebpf,
            detail: "exited".into(),
        }
    }

    fn healthy_detector(t0: Instant) -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        assert_eq!(d.observe(t0, ok()), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
        d.take_verdicts();
        d
    }

    #[test]
    fn exit_of_main_process_is_a_crash_at_once() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let Decision::Act(v) = d.observe(t0 + ms(1001), exit(100, t0 + ms(1000))) else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Crashed);
        assert_eq!(v.detection_latency(), ms(1));
        assert_eq!(v.evidence[0].source, Source::Ebpf);
        assert_eq!(d.state(), State::Crashed);
    }

    #[test]
    fn duplicate_exit_does_not_restart_twice() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert!(matches!(d.observe(t0, exit(100, t0)), Decision::Act(_)));
        assert_eq!(d.observe(t0 + ms(1), exit(100, t0)), Decision::Wait);
    }

    #[test]
    fn exit_of_another_pid_is_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, exit(99, t0)), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn exit_during_our_restart_is_expected() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        assert_eq!(d.observe(t0 + ms(5), exit(100, t0 + ms(5))), Decision::Wait);
        assert_eq!(d.state(), State::Recovering);
    }

    #[test]
    fn repeated_timeouts_make_a_hang_with_the_first_and_latest_evidence() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let step = ms(2000);
        assert_eq!(
            d.observe(t0 + ms(1000), failed(t0, ProbeFailure::Timeout)),
            Decision::Wait
        );
        assert_eq!(d.state(), State::Suspect);
        assert_eq!(
            d.observe(
                t0 + step + ms(1000),
                failed(t0 + step, ProbeFailure::Timeout)
            ),
            Decision::Wait
        );
        let Decision::Act(v) = d.observe(
            t0 + step * 2 + ms(1000),
            failed(t0 + step * 2, ProbeFailure::Timeout),
        ) else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.evidence.len(), 3);
        assert_eq!(v.detection_latency(), ms(5000));
    }

    #[test]
    fn refused_connections_make_containerd_unreachable() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..2 {
            d.observe(t0 + ms(i), failed(t0 + ms(i), ProbeFailure::Refused));
        }
        let Decision::Act(v) = d.observe(t0 + ms(3), failed(t0 + ms(3), ProbeFailure::Refused))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Unreachable);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..10 {
            let t = t0 + ms(i * 100);
            d.observe(t, failed(t, ProbeFailure::Timeout));
            d.observe(t, failed(t, ProbeFailure::Timeout));
            assert_eq!(d.observe(t, ok()), Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn no_second_restart_while_one_is_in_flight() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        for i in 0..5 {
            let t = t0 + ms(i);
            assert_eq!(
                d.observe(t, failed(t, ProbeFailure::Refused)),
                Decision::Wait
            );
        }
        d.observe(t0 + ms(10), Observation::RestartFinished { ok: true });
        assert_eq!(d.state(), State::Recovering);
        d.observe(t0 + ms(20), ok());
        assert_eq!(d.state(), State::Healthy);
        let verdicts = d.take_verdicts();
        assert_eq!(verdicts.last().unwrap().state, State::Healthy);
    }

    #[test]
    fn a_failed_restart_lets_probes_judge_again() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        d.observe(t0, Observation::RestartFinished { ok: false });
        let mut decision = Decision::Wait;
        for i in 0..3 {
            let t = t0 + ms(i);
            decision = d.observe(t, failed(t, ProbeFailure::Refused));
        }
        assert!(matches!(decision, Decision::Act(_)));
    }
    fn pending(age_ms: Option<u64>) -> Observation {
        Observation::Pending {
            count: age_ms.map_or(0, |_| 1),
            oldest_age: age_ms.map(ms),
            accepted: 0,
            sensor: Source::Ebpf,
        }
    }

    #[test]
    fn a_stalled_accept_queue_asks_for_a_probe_at_once_and_makes_containerd_suspect() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(400))), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
        assert_eq!(
            d.observe(t0 + ms(600), pending(Some(1100))),
            Decision::ProbeNow
        );
        assert_eq!(d.state(), State::Suspect);
        let v = d.take_verdicts();
        assert_eq!(v[0].first_sign, t0 + ms(600) - ms(1100));
    }

    #[test]
    fn the_confirming_probe_leaves_at_half_the_threshold_without_suspicion() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(500))), Decision::ProbeNow);
        assert_eq!(d.state(), State::Healthy);
        assert!(d.take_verdicts().is_empty());
    }

    #[test]
    fn an_early_confirming_probe_that_fails_once_the_stall_stands_is_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // Queued at t0; the probe leaves at 500 ms, the stall stands from 1000 ms, the probe's
        // 1 s deadline passes at 1500 ms.
        assert_eq!(
            d.observe(t0 + ms(500), pending(Some(500))),
            Decision::ProbeNow
        );
        for age in (600..=1400).step_by(100) {
            assert!(!matches!(
                d.observe(t0 + ms(age), pending(Some(age))),
                Decision::Act(_)
            ));
        }
        assert_eq!(d.state(), State::Suspect);
        let Decision::Act(v) =
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.detection_latency(), ms(1500));
    }

    #[test]
    fn a_probe_that_fails_before_the_stall_threshold_is_no_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(
            d.observe(t0 + ms(500), pending(Some(500))),
            Decision::ProbeNow
        );
        // A short deadline: the probe fails while the oldest connection is 800 ms old.
        assert_eq!(
            d.observe(t0 + ms(800), failed(t0 + ms(500), ProbeFailure::Timeout)),
            Decision::Wait
        );
        assert_ne!(d.state(), State::Hung);
    }

    #[test]
    fn kernel_suspicion_plus_one_failed_probe_is_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0 + ms(1200), pending(Some(1000)));
        let Decision::Act(v) =
            d.observe(t0 + ms(2200), failed(t0 + ms(1200), ProbeFailure::Timeout))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.evidence.len(), 2);
        assert_eq!(v.evidence[0].source, Source::Ebpf);
        assert_eq!(v.evidence[1].source, Source::Probe);
        assert_eq!(v.detection_latency(), ms(2000));
    }

    #[test]
    fn slow_is_not_hung() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..20 {
            let t = t0 + ms(i * 500);
            // The queue looks stalled, but every confirming probe answers, slowly.
            let decision = d.observe(t, pending(Some(1500)));
            assert!(!matches!(decision, Decision::Act(_)));
            let decision = d.observe(
                t,
                Observation::ProbeSucceeded {
                    latency: ms(900),
                    version: "1.6.20".into(),
                    channel: ProbeChannel::Fresh,
                },
            );
            assert_eq!(decision, Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn confirming_probes_are_spaced() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(1000))), Decision::ProbeNow);
        assert_eq!(d.observe(t0 + ms(100), pending(Some(1100))), Decision::Wait);
        assert_eq!(
            d.observe(t0 + ms(1000), pending(Some(2000))),
            Decision::ProbeNow
        );
    }

    #[test]
    fn a_drained_queue_clears_the_suspicion() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, pending(Some(1000)));
        d.observe(t0 + ms(100), pending(None));
        // Without the kernel evidence one failed probe is not enough.
        assert_eq!(
            d.observe(t0 + ms(200), failed(t0 + ms(200), ProbeFailure::Timeout)),
            Decision::Wait
        );
    }

    #[test]
    fn refused_probe_with_a_stale_queue_is_not_called_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, pending(Some(1000)));
        assert_eq!(
            d.observe(t0 + ms(10), failed(t0, ProbeFailure::Refused)),
            Decision::Wait
        );
    }

    #[test]
    fn an_operator_stop_is_final_until_containerd_answers_again() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, exit(100, t0));
        d.observe(t0, Observation::RestartStarted);
        d.observe(
            t0 + ms(5),
            Observation::UnitStopped {
                detail: "inactive".into(),
            },
        );
        assert_eq!(d.state(), State::Stopped);
        for i in 0..10 {
            let t = t0 + ms(100 * i);
            assert_eq!(
                d.observe(t, failed(t, ProbeFailure::Refused)),
                Decision::Wait
            );
            assert_eq!(d.observe(t, pending(Some(5000))), Decision::Wait);
        }
        d.observe(t0 + ms(2000), ok());
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn late_exit_of_an_old_pid_after_recovery_is_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, exit(100, t0));
        d.observe(t0, Observation::RestartStarted);
        d.observe(t0, Observation::RestartFinished { ok: true });
        d.set_main_pid(Some(200));
        d.observe(t0 + ms(10), ok());
        assert_eq!(d.observe(t0 + ms(20), exit(100, t0)), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn probe_jitter_around_the_deadline_does_not_flap_into_a_restart() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // Alternating late and timely answers: never three failures in a row.
        for i in 0..30u64 {
            let t = t0 + ms(i * 2000);
            let decision = if i % 3 == 2 {
                d.observe(t, ok())
            } else {
                d.observe(t, failed(t, ProbeFailure::Timeout))
            };
            assert!(!matches!(decision, Decision::Act(_)), "restart at {i}");
        }
    }

    #[test]
    fn the_observers_own_exhaustion_never_makes_a_verdict() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // A flood of failures on the observer's side, second after second, kernel stall or not.
        for i in 0..100u64 {
            let t = t0 + ms(i * 1000);
            if i % 10 == 5 {
                d.observe(t, pending(Some(1500)));
            }
            assert_eq!(
                d.observe(t, failed(t, ProbeFailure::ObserverSide)),
                Decision::Wait,
                "probe {i}"
            );
        }
        // The kernel's stalls make containerd suspect; the observer's failed probes never
        // confirm them.
        assert_eq!(d.state(), State::Suspect);
        assert!(d.take_verdicts().iter().all(|v| v.state == State::Suspect));
    }

    #[test]
    fn the_observers_exhaustion_neither_counts_nor_clears_failures_of_containerd() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, failed(t0, ProbeFailure::Timeout));
        d.observe(t0 + ms(1), failed(t0 + ms(1), ProbeFailure::ObserverSide));
        d.observe(t0 + ms(2), failed(t0 + ms(2), ProbeFailure::Timeout));
        assert_eq!(d.state(), State::Suspect);
        d.observe(t0 + ms(3), failed(t0 + ms(3), ProbeFailure::ObserverSide));
        let Decision::Act(v) = d.observe(t0 + ms(4), failed(t0 + ms(4), ProbeFailure::Timeout))
        else {
            panic!("three timeouts of containerd make a hang");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(
            v.evidence.len(),
            3,
            "only containerd's failures are evidence"
        );
    }

    #[test]
    fn a_crash_is_still_a_crash_while_the_observer_is_exhausted() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, failed(t0, ProbeFailure::ObserverSide));
        let Decision::Act(v) = d.observe(t0 + ms(1), exit(100, t0 + ms(1))) else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Crashed);
    }

    #[test]
    fn pending_connections_during_a_restart_are_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        assert_eq!(d.observe(t0, pending(Some(5000))), Decision::Wait);
        assert_eq!(d.state(), State::Recovering);
    }

    fn sample(count: u32, age_ms: u64, accepted: u32) -> Observation {
        Observation::Pending {
            count,
            oldest_age: Some(ms(age_ms)),
            accepted,
            sensor: Source::Ebpf,
        }
    }

    fn open_ok(latency_ms: u64) -> Observation {
        Observation::ProbeSucceeded {
            latency: ms(latency_ms),
            version: "1.6.20".into(),
            channel: ProbeChannel::Open,
        }
    }

    fn open_failed(started: Instant) -> Observation {
        Observation::ProbeFailed {
            started,
            failure: ProbeFailure::Timeout,
            error: "no answer within 1s".into(),
            channel: ProbeChannel::Open,
        }
    }

    /// The field report: a long queue whose oldest waits over a second, fresh probes that
    /// time out on a full backlog, and containerd accepting all along.
    #[test]
    fn a_long_queue_that_moves_is_overloaded_not_hung() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let mut out: Vec<Instant> = Vec::new();
        for i in 0..300u64 {
            let t = t0 + ms(i * 100);
            // Each confirming probe times out a second after it left.
            while let Some(&left) = out.first().filter(|left| t >= **left + ms(1000)) {
                out.remove(0);
                let failure = d.observe(t, failed(left, ProbeFailure::Timeout));
                assert!(!matches!(failure, Decision::Act(_)), "restart at {i}");
            }
            let decision = d.observe(t, sample(4097, 1138, 350));
            assert!(!matches!(decision, Decision::Act(_)), "restart at {i}");
            if decision == Decision::ProbeNow {
                out.push(t);
            }
        }
        assert_eq!(d.state(), State::Overloaded);
        let verdicts = d.take_verdicts();
        assert_eq!(verdicts.len(), 1, "recorded once: {verdicts:?}");
        assert!(
            verdicts[0].evidence[0]
                .detail
                .contains("4097 connection(s)")
        );
        let progress = d.accept_progress(t0 + ms(29_900));
        assert!((progress.per_second - 3500.0).abs() < 100.0, "{progress:?}");
        // Caught up, and a fresh connection answers: healthy again.
        d.observe(t0 + ms(30_000), pending(None));
        d.observe(t0 + ms(30_010), ok());
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn an_overload_whose_open_connection_fails_past_the_kubelets_horizon_is_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let mut restarted = None;
        for i in 0..400u64 {
            let t = t0 + ms(i * 100);
            d.observe(t, sample(900, 1500, 20));
            if i % 10 == 0 {
                // Every second a call on the open connection times out: the handlers are dead.
                if let Decision::Act(v) = d.observe(t + ms(1000), open_failed(t)) {
                    restarted = Some((t + ms(1000), v));
                    break;
                }
            }
        }
        let (at, verdict) = restarted.expect("a hang once the horizon passed");
        assert_eq!(verdict.state, State::Hung);
        assert_eq!(at.duration_since(t0), ms(30_000));
        assert!(
            verdict
                .evidence
                .iter()
                .any(|e| e.detail.contains("horizon"))
        );
    }

    #[test]
    fn a_freeze_after_steady_accepts_is_still_a_hang_within_the_threshold() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..50u64 {
            d.observe(t0 + ms(i * 100), sample(1, 10, 3));
        }
        // Frozen at 5 s: the heartbeat's next connection waits from 5.05 s, nothing is accepted.
        let frozen = t0 + ms(5000);
        let queued = frozen + ms(50);
        let mut probe_left = None;
        for step in 1..=20u64 {
            let t = frozen + ms(step * 100);
            let age = t.saturating_duration_since(queued);
            let accepted = u32::from(step == 1);
            let obs = Observation::Pending {
                count: 1,
                oldest_age: Some(age),
                accepted,
                sensor: Source::Ebpf,
            };
            if d.observe(t, obs) == Decision::ProbeNow && probe_left.is_none() {
                probe_left = Some(t);
            }
        }
        let left = probe_left.expect("a confirming probe");
        let Decision::Act(v) = d.observe(left + ms(1000), failed(left, ProbeFailure::Timeout))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert!(
            v.detection_latency() <= ms(1600),
            "{:?}",
            v.detection_latency()
        );
    }

    #[test]
    fn an_open_connection_that_answers_after_the_probe_left_means_the_accept_loop_is_behind() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(
            d.observe(t0 + ms(1200), pending(Some(1200))),
            Decision::ProbeNow
        );
        assert_eq!(d.state(), State::Suspect);
        // Sent at 1.2 s, after the oldest connection was queued (at 0): the handlers live.
        d.observe(t0 + ms(1250), open_ok(50));
        let decision = d.observe(t0 + ms(2200), failed(t0 + ms(1200), ProbeFailure::Timeout));
        assert_eq!(decision, Decision::Wait);
        assert_eq!(d.state(), State::Overloaded);
        // An answer read late to a call sent before the stall is no such sign.
        let mut d = healthy_detector(t0);
        d.observe(t0 + ms(1200), pending(Some(1100)));
        d.observe(t0 + ms(1250), open_ok(1200));
        let decision = d.observe(t0 + ms(2200), failed(t0 + ms(1200), ProbeFailure::Timeout));
        assert!(matches!(decision, Decision::Act(_)));
    }

    #[test]
    fn without_kernel_sensors_an_open_connection_that_answers_keeps_failed_fresh_probes_from_a_hang()
     {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..20u64 {
            let t = t0 + ms(i * 2000);
            d.observe(t + ms(30), open_ok(30));
            let decision = d.observe(t + ms(1000), failed(t, ProbeFailure::Timeout));
            assert_eq!(decision, Decision::Wait, "at {i}");
        }
        assert_eq!(d.state(), State::Overloaded);
        // The open connection stops answering too: after the horizon, a hang.
        let mut decision = Decision::Wait;
        for i in 20..40u64 {
            let t = t0 + ms(i * 2000);
            d.observe(t + ms(1000), open_failed(t));
            decision = d.observe(t + ms(1000), failed(t, ProbeFailure::Timeout));
            if matches!(decision, Decision::Act(_)) {
                break;
            }
        }
        assert!(matches!(decision, Decision::Act(ref v) if v.state == State::Hung));
    }

    fn gap(from: Instant, to: Instant) -> Observation {
        Observation::SchedulingGap { from, to }
    }

    #[test]
    fn probes_that_span_the_observers_own_gap_are_no_evidence() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // The observer was stopped from 1 s to 6 s; its probes' deadlines expired meanwhile.
        assert_eq!(
            d.observe(t0 + ms(6000), gap(t0 + ms(1000), t0 + ms(6000))),
            Decision::ProbeNow
        );
        for _ in 0..5 {
            assert_eq!(
                d.observe(t0 + ms(6001), failed(t0 + ms(900), ProbeFailure::Timeout)),
                Decision::Wait
            );
        }
        assert_eq!(d.state(), State::Healthy);
        // A connection queued before the gap counts only from its end.
        assert_eq!(
            d.observe(t0 + ms(6100), pending(Some(5500))),
            Decision::Wait
        );
        assert_eq!(d.state(), State::Healthy);
        d.observe(t0 + ms(6200), ok());
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn a_freeze_right_after_a_gap_is_still_caught() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let end = t0 + ms(6000);
        d.observe(end, gap(t0 + ms(1000), end));
        // containerd froze during the gap: its connection has waited since before the gap.
        let mut probe = None;
        for step in 1..=20u64 {
            let t = end + ms(step * 100);
            let age = t.saturating_duration_since(t0 + ms(2000));
            let decision = d.observe(
                t,
                Observation::Pending {
                    count: 1,
                    oldest_age: Some(age),
                    accepted: 0,
                    sensor: Source::Ebpf,
                },
            );
            if decision == Decision::ProbeNow && probe.is_none() {
                probe = Some(t);
            }
        }
        let left = probe.expect("a confirming probe after the gap");
        assert!(left >= end + ms(500));
        let Decision::Act(v) = d.observe(left + ms(1000), failed(left, ProbeFailure::Timeout))
        else {
            panic!("a freeze after the gap is a hang");
        };
        assert_eq!(v.state, State::Hung);
        assert!(v.at <= end + ms(2600));
    }

    #[test]
    fn repeated_gaps_never_make_a_hang_of_a_healthy_containerd() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..50u64 {
            let from = t0 + ms(i * 10_000);
            let to = from + ms(4000);
            d.observe(to, gap(from, to));
            // Each gap expires the probe that was out, and ages what waited.
            assert_eq!(
                d.observe(to + ms(1), failed(from, ProbeFailure::Timeout)),
                Decision::Wait
            );
            assert!(!matches!(
                d.observe(to + ms(2), pending(Some(4000))),
                Decision::Act(_)
            ));
            d.observe(to + ms(10), ok());
        }
        assert_eq!(d.state(), State::Healthy);
    }

    /// Hours of outage while nothing is restarted (paused, dry run, given up): the detector
    /// hands out verdicts whose evidence stays small, and records the episode once.
    #[test]
    fn a_long_outage_keeps_verdicts_and_evidence_bounded() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let mut recorded = 0usize;
        let mut largest = 0usize;
        for i in 0..(4 * 3600 / 2) as u64 {
            let t = t0 + ms(i * 2000);
            for _ in 0..10 {
                d.observe(t, pending(Some(5000 + i * 2000)));
            }
            if let Decision::Act(v) = d.observe(t + ms(1000), failed(t, ProbeFailure::Timeout)) {
                largest = largest.max(v.evidence.len());
            }
            d.observe(t + ms(1000), open_failed(t));
            let taken = d.take_verdicts();
            recorded += taken.len();
            largest = largest.max(taken.iter().map(|v| v.evidence.len()).max().unwrap_or(0));
        }
        assert_eq!(d.state(), State::Hung);
        assert!(recorded <= 3, "{recorded} verdicts recorded for one outage");
        assert!(largest <= MAX_EVIDENCE);
        assert!(d.failed_probes() > 7000);
        assert!(d.accepts.len() <= MAX_ACCEPT_SAMPLES);
    }

    #[test]
    fn failures_before_a_restart_do_not_count_after_it() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, failed(t0, ProbeFailure::Timeout));
        d.observe(t0 + ms(2000), failed(t0 + ms(2000), ProbeFailure::Timeout));
        d.observe(t0 + ms(2100), Observation::RestartStarted);
        d.observe(t0 + ms(2200), Observation::RestartFinished { ok: true });
        assert_eq!(d.failed_probes(), 0);
        assert_eq!(
            d.observe(t0 + ms(4000), failed(t0 + ms(4000), ProbeFailure::Timeout)),
            Decision::Wait
        );
        assert_eq!(d.failed_probes(), 1);
    }

    #[test]
    fn failed_probes_during_which_containerd_made_progress_do_not_add_up_to_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..30u64 {
            let t = t0 + ms(i * 2000);
            // Every other probe, the open connection answers while the fresh one waits.
            if i % 2 == 0 {
                d.observe(t + ms(500), open_ok(400));
            } else {
                d.observe(t + ms(1000), open_failed(t));
            }
            let decision = d.observe(t + ms(1000), failed(t, ProbeFailure::Timeout));
            assert_eq!(decision, Decision::Wait, "at {i}");
        }
        assert_eq!(d.state(), State::Overloaded);
        assert_eq!(d.failed_probes(), 30);
        assert_eq!(d.take_verdicts().len(), 1, "one overload, recorded once");
    }

    /// A detector that has never seen containerd answer (a wrong `--socket`, say).
    fn unanswered_detector() -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        d
    }

    #[test]
    fn failed_probes_alone_never_restart_a_containerd_never_seen_answer() {
        let t0 = Instant::now();
        for failure in [
            ProbeFailure::Refused,
            ProbeFailure::Timeout,
            ProbeFailure::Error,
        ] {
            let mut d = unanswered_detector();
            for i in 0..20u64 {
                let t = t0 + ms(i * 2000);
                assert_eq!(
                    d.observe(t, failed(t, failure)),
                    Decision::Wait,
                    "{failure:?}"
                );
            }
            assert!(
                d.unanswered(),
                "{failure:?}: reported as a configuration problem"
            );
            assert_eq!(d.state(), State::Suspect);
            // One answer later, the usual rules hold again.
            d.observe(t0 + ms(50_000), ok());
            assert!(!d.unanswered());
            let mut decision = Decision::Wait;
            for i in 0..3u64 {
                let t = t0 + ms(60_000 + i * 2000);
                decision = d.observe(t, failed(t, failure));
            }
            assert!(matches!(decision, Decision::Act(_)), "{failure:?}");
        }
    }

    #[test]
    fn before_the_first_answer_an_exit_is_still_a_crash() {
        let t0 = Instant::now();
        let mut d = unanswered_detector();
        for i in 0..5u64 {
            d.observe(t0 + ms(i), failed(t0 + ms(i), ProbeFailure::Refused));
        }
        let Decision::Act(v) = d.observe(t0 + ms(10), exit(100, t0 + ms(9))) else {
            panic!("an exit of the main process is evidence tied to the process");
        };
        assert_eq!(v.state, State::Crashed);
    }

    #[test]
    fn before_the_first_answer_only_a_stall_on_containerds_own_listener_counts() {
        let t0 = Instant::now();
        // A listener the kernel does not tie to containerd's process: no hang.
        let mut d = unanswered_detector();
        d.observe(t0, pending(Some(500)));
        d.observe(t0 + ms(600), pending(Some(1100)));
        assert_eq!(
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout)),
            Decision::Wait
        );
        // The same on containerd's own listener: a hang.
        let mut d = unanswered_detector();
        d.set_listener_owned(true);
        d.observe(t0, pending(Some(500)));
        d.observe(t0 + ms(600), pending(Some(1100)));
        let Decision::Act(v) =
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout))
        else {
            panic!("a stall on containerd's own listener is evidence tied to the process");
        };
        assert_eq!(v.state, State::Hung);
    }

    /// Seen against the real containerd: the oldest pending entry predates the freeze (its
    /// accept went unseen), and the open connection answered just before the freeze. That
    /// answer is older than the confirming probe: a hang, at once.
    #[test]
    fn a_freeze_just_after_the_open_connection_answered_is_still_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0 + ms(80), open_ok(4));
        assert_eq!(
            d.observe(t0 + ms(1000), pending(Some(1000))),
            Decision::ProbeNow
        );
        let Decision::Act(v) =
            d.observe(t0 + ms(2000), failed(t0 + ms(1000), ProbeFailure::Timeout))
        else {
            panic!("a frozen containerd is hung");
        };
        assert_eq!(v.state, State::Hung);
    }

    /// Out of descriptors, containerd answers on the connections it has but accepts none:
    /// the open connection's answers buy it `overloaded_stall`, not a reprieve for ever.
    #[test]
    fn an_accept_loop_silent_past_the_overload_allowance_is_hung_though_the_open_connection_answers()
     {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let mut verdict = None;
        for step in 0..200u64 {
            let t = t0 + ms(step * 100);
            // Connections queue from t0 on and none is ever accepted.
            d.observe(t, sample(200, step * 100, 0));
            if step % 10 == 5 {
                d.observe(t, open_ok(4));
            }
            if step >= 10
                && step % 10 == 0
                && let Decision::Act(v) = d.observe(t, failed(t - ms(1000), ProbeFailure::Timeout))
            {
                verdict = Some((t, v));
                break;
            }
        }
        let (at, v) = verdict.expect("a dead accept loop is a hang");
        assert_eq!(v.state, State::Hung);
        let waited = at.duration_since(t0);
        assert!(
            waited >= ms(5000) && waited <= ms(7000),
            "hung after the overload allowance, not before nor long after: {waited:?}"
        );
        assert!(
            v.evidence
                .iter()
                .any(|e| e.detail.contains("accept loop is dead")),
            "{v:?}"
        );
    }

    /// A throttled containerd accepts in bursts: a pause a little longer than the threshold,
    /// once it was seen overloaded, is no stall. Five seconds of silence are.
    #[test]
    fn an_overloaded_containerd_that_pauses_between_bursts_is_not_stalled_until_it_stays_silent() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, sample(4096, 1200, 50));
        d.observe(t0 + ms(100), sample(4096, 1300, 40));
        assert_eq!(d.state(), State::Overloaded);
        // 1.5 s without an accept; a confirming probe fails meanwhile.
        for step in 1..=15u64 {
            d.observe(
                t0 + ms(100 + step * 100),
                sample(4096, 1300 + step * 100, 0),
            );
        }
        let decision = d.observe(t0 + ms(1600), failed(t0 + ms(600), ProbeFailure::Timeout));
        assert!(!matches!(decision, Decision::Act(_)));
        assert_eq!(d.state(), State::Overloaded);
        // It stays silent: a stall, and the next failed probe is a hang.
        for step in 16..=60u64 {
            d.observe(
                t0 + ms(100 + step * 100),
                sample(4096, 1300 + step * 100, 0),
            );
        }
        assert_eq!(d.state(), State::Suspect);
        let Decision::Act(v) =
            d.observe(t0 + ms(7000), failed(t0 + ms(6000), ProbeFailure::Timeout))
        else {
            panic!("silent for 5 s: hung");
        };
        assert_eq!(v.state, State::Hung);
    }

    fn layer_failed(layer: Layer, started: Instant) -> Observation {
        Observation::LayerFailed {
            layer,
            started,
            failure: ProbeFailure::Timeout,
            error: "no answer within 3s".into(),
        }
    }

    /// A deeper layer the observer could not even ask (its own descriptors ran out) is no
    /// evidence: however long it lasts, containerd is not judged hung for it.
    #[test]
    fn a_layer_the_observer_could_not_ask_is_no_evidence() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..100u64 {
            let t = t0 + ms(i * 1000);
            let decision = d.observe(
                t + ms(10),
                Observation::LayerFailed {
                    layer: Layer::MetadataRead,
                    started: t,
                    failure: ProbeFailure::ObserverSide,
                    error: "Too many open files (os error 24)".into(),
                },
            );
            assert!(!matches!(decision, Decision::Act(_)), "acted at {i}");
        }
        assert_eq!(d.state(), State::Healthy);
    }

    fn layer_ok(layer: Layer, latency: Duration) -> Observation {
        Observation::LayerAnswered {
            layer,
            latency,
            silent_tasks: Vec::new(),
        }
    }

    fn blocked(for_ms: u64) -> Observation {
        let threads = if for_ms == 0 {
            Vec::new()
        } else {
            vec![BlockedThread {
                owner: Owner::Containerd,
                pid: 100,
                tid: 105,
                wchan: "percpu_rwsem_wait".into(),
                blocked_for: ms(for_ms),
            }]
        };
        Observation::Blocked {
            threads,
            context: "io pressure some avg10=12.00".into(),
            sensor: Source::Procfs,
        }
    }

    /// Feeds `failures_to_hang` (3) failures of `layer`, one a second from `t`; returns the
    /// last decision.
    fn fail_layer(d: &mut Detector, layer: Layer, t: Instant) -> Decision {
        let mut last = Decision::Wait;
        for i in 0..3 {
            let at = t + ms(1000 * i);
            last = d.observe(at + ms(3000), layer_failed(layer, at));
        }
        last
    }

    #[test]
    fn a_hung_layer_while_threads_run_is_a_hang_naming_the_layer() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // Two failures are not enough; Version keeps answering meanwhile.
        assert_eq!(
            d.observe(t0 + ms(3000), layer_failed(Layer::Snapshots, t0)),
            Decision::Wait
        );
        assert_eq!(d.observe(t0 + ms(3100), ok()), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
        assert_eq!(d.observe(t0 + ms(3200), blocked(0)), Decision::Wait);
        assert_eq!(
            d.observe(t0 + ms(4000), layer_failed(Layer::Snapshots, t0 + ms(1000))),
            Decision::Wait
        );
        let Decision::Act(v) =
            d.observe(t0 + ms(5000), layer_failed(Layer::Snapshots, t0 + ms(2000)))
        else {
            panic!("expected a verdict to act on");
        };
        assert_eq!((v.state, v.layer), (State::Hung, Some(Layer::Snapshots)));
        // First, why it is a hang inside containerd: its threads run, and Version() answered
        // after the snapshots layer began to fail.
        let (why, failures) = v.evidence.split_first().unwrap();
        assert_eq!(why.source, Source::Procfs, "{why:?}");
        assert!(
            why.detail.contains("no containerd thread in D state")
                && why.detail.contains("runnable")
                && why.detail.ends_with("answering meanwhile: version"),
            "{why:?}"
        );
        assert!(
            failures
                .iter()
                .all(|e| e.source == Source::Ladder && e.detail.contains("Snapshots.Remove")),
            "{:?}",
            v.evidence
        );
        // A Version() answer does not clear it; the layer answering does.
        assert_eq!(d.observe(t0 + ms(9000), ok()), Decision::Wait);
        assert_eq!(d.state(), State::Hung);
        d.observe(t0 + ms(9500), layer_ok(Layer::Snapshots, ms(20)));
        assert_eq!(d.state(), State::Healthy);
    }

    /// The hang's evidence places it: the layers that answered after the failing layer began
    /// to fail, not those that answered only before; and it claims runnable threads only
    /// when they were sampled.
    #[test]
    fn a_layer_hang_names_the_layers_answering_meanwhile() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0 + ms(500), layer_ok(Layer::Tasks, ms(5)));
        d.observe(t0 + ms(3000), layer_failed(Layer::Snapshots, t0 + ms(1000)));
        d.observe(t0 + ms(3100), layer_ok(Layer::MetadataWrite, ms(10)));
        d.observe(t0 + ms(3200), layer_ok(Layer::Cri, ms(3)));
        d.observe(t0 + ms(4000), layer_failed(Layer::Snapshots, t0 + ms(2000)));
        let Decision::Act(v) =
            d.observe(t0 + ms(5000), layer_failed(Layer::Snapshots, t0 + ms(3000)))
        else {
            panic!("expected a verdict to act on");
        };
        assert_eq!((v.state, v.layer), (State::Hung, Some(Layer::Snapshots)));
        let why = &v.evidence[0];
        assert_eq!(why.source, Source::Ladder, "never sampled: {why:?}");
        assert!(
            why.detail.contains("have not been sampled for D state")
                && !why.detail.contains("runnable"),
            "{why:?}"
        );
        assert!(
            why.detail
                .ends_with("answering meanwhile: cri, metadata_write"),
            "{why:?}"
        );
    }

    #[test]
    fn a_layer_that_answers_slowly_within_its_deadline_is_healthy() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..20 {
            let decision = d.observe(t0 + ms(5000 * i), layer_ok(Layer::MetadataWrite, ms(2900)));
            assert_eq!(decision, Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
        assert!(d.take_verdicts().is_empty());
    }

    #[test]
    fn a_refused_deep_layer_is_left_to_the_version_probe() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..5 {
            let observation = Observation::LayerFailed {
                layer: Layer::Cri,
                started: t0 + ms(i),
                failure: ProbeFailure::Refused,
                error: "refused".into(),
            };
            assert_eq!(d.observe(t0 + ms(i), observation), Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn blocked_threads_make_a_storage_stall_that_clears_and_then_acts_normally() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // A write failing while a thread is in D state, not yet for long: no hang.
        assert_eq!(d.observe(t0 + ms(500), blocked(500)), Decision::Wait);
        assert_eq!(
            fail_layer(&mut d, Layer::MetadataWrite, t0),
            Decision::Wait,
            "a failing write while containerd waits on the disk is not a hang"
        );
        assert_eq!(d.state(), State::Healthy);
        let Decision::Act(v) = d.observe(t0 + ms(6000), blocked(2500)) else {
            panic!("expected a storage stall");
        };
        assert_eq!(v.state, State::StorageStalled);
        assert_eq!(v.layer, Some(Layer::MetadataWrite));
        assert_eq!(v.evidence[0].source, Source::Procfs);
        assert!(
            v.evidence[0].detail.contains("percpu_rwsem_wait"),
            "{:?}",
            v.evidence
        );
        assert!(
            v.evidence[0].detail.contains("io pressure"),
            "{:?}",
            v.evidence
        );
        assert!(v.evidence.iter().any(|e| e.detail.contains("lease")));
        // While it stands: more failures, Version timeouts, answers: nothing new.
        assert_eq!(
            fail_layer(&mut d, Layer::MetadataWrite, t0 + ms(7000)),
            Decision::Wait
        );
        for i in 0..4 {
            let at = t0 + ms(10_000 + 2000 * i);
            assert_eq!(
                d.observe(at + ms(1000), failed(at, ProbeFailure::Timeout)),
                Decision::Wait
            );
        }
        assert_eq!(d.observe(t0 + ms(19_000), ok()), Decision::Wait);
        assert_eq!(d.observe(t0 + ms(19_500), blocked(9000)), Decision::Wait);
        assert_eq!(d.state(), State::StorageStalled);
        // The thaw: threads run, then the write answers.
        d.observe(t0 + ms(20_000), blocked(0));
        assert_eq!(
            d.state(),
            State::StorageStalled,
            "the write has not answered yet"
        );
        d.observe(t0 + ms(20_100), layer_ok(Layer::MetadataWrite, ms(40)));
        assert_eq!(d.state(), State::Healthy);
        // Normal again: a crash is acted on.
        let Decision::Act(v) = d.observe(t0 + ms(21_000), exit(100, t0 + ms(21_000))) else {
            panic!("expected a crash");
        };
        assert_eq!(v.state, State::Crashed);
    }

    #[test]
    fn a_silent_shim_degrades_containerd_naming_the_container_and_the_shim() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let silent = vec![SilentTask {
            id: "web".into(),
            shim_pid: Some(4242),
        }];
        let answered = Observation::LayerAnswered {
            layer: Layer::Tasks,
            latency: ms(2010),
            silent_tasks: silent.clone(),
        };
        let Decision::Act(v) = d.observe(t0 + ms(2000), answered.clone()) else {
            panic!("expected a degraded verdict");
        };
        assert_eq!((v.state, v.layer), (State::Degraded, Some(Layer::Tasks)));
        assert_eq!(v.silent_tasks, silent);
        assert!(
            v.evidence[0]
                .detail
                .contains("container web (shim pid 4242)"),
            "{:?}",
            v.evidence
        );
        // The same silence again is nothing new; Version answering does not clear it.
        assert_eq!(d.observe(t0 + ms(12_000), answered), Decision::Wait);
        assert_eq!(d.observe(t0 + ms(12_100), ok()), Decision::Wait);
        assert_eq!(d.state(), State::Degraded);
        d.observe(t0 + ms(22_000), layer_ok(Layer::Tasks, ms(3)));
        assert_eq!(d.state(), State::Healthy);
    }

    /// An operator's `systemctl restart` whose start hangs: the stop is seen (an exit, then
    /// the unit stopped), and the new process that never serves is still a startup hang.
    #[test]
    fn a_start_that_hangs_after_an_operators_stop_is_a_startup_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.set_main_pid(Some(100));
        let exit = Observation::ProcessExited {
            pid: 100,
            at: t0 + ms(100),
            sensor: Source::Ebpf,
            detail: "exited with status 0".into(),
        };
        d.observe(t0 + ms(100), exit);
        d.observe(
            t0 + ms(200),
            Observation::UnitStopped {
                detail: "the unit is stopped".into(),
            },
        );
        assert_eq!(d.state(), State::Stopped);
        // Refused while no process runs: nothing to judge.
        let at = t0 + ms(300);
        assert_eq!(
            d.observe(at, failed(at, ProbeFailure::Refused)),
            Decision::Wait
        );
        // Started again; it never serves its socket.
        d.set_main_pid(Some(101));
        d.set_unit_starting(true);
        assert_eq!(d.state(), State::Recovering);
        let mut last = Decision::Wait;
        for i in 0..3 {
            let at = t0 + ms(2000 + 2000 * i);
            last = d.observe(at, failed(at, ProbeFailure::Refused));
        }
        let Decision::Act(v) = last else {
            panic!("expected a startup hang, state {:?}", d.state());
        };
        assert_eq!(
            (v.state, v.pid, v.repeat),
            (State::StartupHung, Some(101), 1)
        );
        // A start that serves is healthy, as before.
        let mut d = healthy_detector(t0);
        d.set_main_pid(Some(100));
        d.observe(
            t0 + ms(200),
            Observation::UnitStopped {
                detail: "the unit is stopped".into(),
            },
        );
        d.set_main_pid(Some(101));
        d.observe(t0 + ms(1000), ok());
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn a_restart_whose_start_never_finishes_counts_as_the_same_startup_hang() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        d.set_unit_starting(true);
        for i in 0..3 {
            let at = t0 + ms(2000 * i);
            d.observe(at, failed(at, ProbeFailure::Refused));
        }
        assert_eq!(d.state(), State::StartupHung);
        d.observe(t0 + ms(5000), Observation::RestartStarted);
        // systemd's start timeout ends the restart job; the unit is left without a process.
        d.observe(t0 + ms(25_000), Observation::RestartFinished { ok: false });
        d.set_main_pid(None);
        d.set_unit_starting(false);
        assert_eq!(d.state(), State::StartupHung);
        let mut last = Decision::Wait;
        for i in 0..3 {
            let at = t0 + ms(26_000 + 2000 * i);
            last = d.observe(at, failed(at, ProbeFailure::Refused));
        }
        let Decision::Act(v) = last else {
            panic!("expected the second startup hang");
        };
        assert_eq!((v.state, v.repeat), (State::StartupHung, 2));
    }

    #[test]
    fn a_crash_loop_is_not_a_startup_hang() {
        // Each start exits at once (a broken config): systemd is starting it only briefly,
        // between the refusals, and every process is new.
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..12u32 {
            let at = t0 + ms(500 * u64::from(i));
            d.set_main_pid(Some(200 + i));
            d.set_unit_starting(true);
            d.set_unit_starting(false);
            d.set_main_pid(None);
            if let Decision::Act(v) = d.observe(at, failed(at, ProbeFailure::Refused)) {
                assert_ne!(v.state, State::StartupHung, "{v:?}");
                d.observe(at, Observation::RestartStarted);
                d.observe(at, Observation::RestartFinished { ok: false });
            }
        }
        assert!(
            d.take_verdicts()
                .iter()
                .all(|v| v.state != State::StartupHung)
        );
    }

    #[test]
    fn a_socket_never_served_by_a_started_unit_is_a_configuration_problem_not_a_startup_hang() {
        // systemd says the unit is up, containerd never answered on the configured socket:
        // the socket may be the observer's mistake. Nothing is restarted.
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        d.set_unit_starting(false);
        for i in 0..6 {
            let at = t0 + ms(2000 * i);
            assert_eq!(
                d.observe(at, failed(at, ProbeFailure::Refused)),
                Decision::Wait
            );
        }
        assert!(d.unanswered());
        assert_eq!(d.state(), State::Suspect);
    }

    #[test]
    fn tasks_list_hanging_as_a_whole_is_degraded_not_hung() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let Decision::Act(v) = fail_layer(&mut d, Layer::Tasks, t0) else {
            panic!("expected a verdict");
        };
        assert_eq!(v.state, State::Degraded);
    }

    #[test]
    fn a_process_that_never_serves_its_socket_is_a_startup_hang_counted_across_restarts() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        // systemd still waits for the notify unit to be ready.
        d.set_unit_starting(true);
        let refuse_three = |d: &mut Detector, t: Instant| {
            let mut last = Decision::Wait;
            for i in 0..3 {
                let at = t + ms(2000 * i);
                last = d.observe(at, failed(at, ProbeFailure::Refused));
            }
            last
        };
        let Decision::Act(v) = refuse_three(&mut d, t0) else {
            panic!("expected a startup hang");
        };
        assert_eq!((v.state, v.repeat), (State::StartupHung, 1));
        assert!(
            v.evidence
                .iter()
                .any(|e| e.detail.contains("has not served its socket"))
        );
        d.observe(t0 + ms(5000), Observation::RestartStarted);
        d.observe(t0 + ms(5100), Observation::RestartFinished { ok: true });
        d.set_main_pid(Some(101));
        let Decision::Act(v) = refuse_three(&mut d, t0 + ms(6000)) else {
            panic!("expected a second startup hang");
        };
        assert_eq!((v.state, v.repeat), (State::StartupHung, 2));
        // Reported: more refusals make nothing new.
        assert_eq!(refuse_three(&mut d, t0 + ms(12_000)), Decision::Wait);
        // Once it answers, a later refusal is an unreachable containerd, not a startup hang.
        d.set_unit_starting(false);
        d.observe(t0 + ms(20_000), ok());
        assert_eq!(d.state(), State::Healthy);
        let Decision::Act(v) = refuse_three(&mut d, t0 + ms(21_000)) else {
            panic!("expected a verdict");
        };
        assert_eq!(v.state, State::Unreachable);
    }
}
