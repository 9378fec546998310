//! systemd over D-Bus: the connection to the manager, scoped to containerd's unit, and the
//! calls that act on it. What the unit looks like is read in [`crate::sense::unit`].
//!
//! The agent never signals or spawns containerd itself for a restart; it asks systemd, which
//! owns the unit, and waits for the job's result (`JobRemoved`).
//!
//! Every call has a deadline ([`CALL_DEADLINE`]): a bus or a manager that stops answering
//! fails the call instead of holding up the agent. A lost connection (the bus daemon
//! restarted) or a manager that left the bus (`daemon-reexec`) ends [`Systemd::changes`], and
//! the agent connects again.

use std::time::Duration;

use futures_util::StreamExt as _;
use zbus::{Connection, proxy, zvariant::OwnedObjectPath};

use crate::config::Bus;
pub use judge::policy::UnitStatus;

/// How long any one D-Bus call may take. systemd answers from memory in milliseconds; a call
/// that takes longer is stuck behind a manager that is busy re-executing or a bus that went away.
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// The name systemd's manager owns on the bus.
const MANAGER_NAME: &str = "org.freedesktop.systemd1";

#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_new(&self, id: u32, job: OwnedObjectPath, unit: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "cannot connect to the {bus} D-Bus: {source}; check that D-Bus runs and that --bus names the bus systemd is on"
    )]
    Connect { bus: Bus, source: zbus::Error },
    #[error("systemd refused {what}: {source}")]
    Call { what: String, source: zbus::Error },
    #[error(
        "unit {unit} is not loaded in systemd (LoadState={load_state}); check --unit names the unit running containerd"
    )]
    NotLoaded { unit: String, load_state: String },
    #[error("systemd did not finish the restart job {job} within {timeout:?}")]
    JobTimeout { job: String, timeout: Duration },
    #[error(
        "no answer from the {bus} D-Bus within {CALL_DEADLINE:?} while connecting; check that D-Bus and systemd run"
    )]
    ConnectTimeout { bus: Bus },
}

/// What [`Systemd::changes`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEvent {
    /// A property of the unit changed (`MainPID`, `ActiveState`, …).
    UnitChanged,
    /// systemd's manager left the bus or came back (`daemon-reexec`, a restart of the
    /// manager): its subscriptions must be made again.
    ManagerChanged,
}

/// A connection to systemd's manager, scoped to the unit running containerd.
#[derive(Clone)]
pub struct Systemd {
    pub(crate) connection: Connection,
    manager: ManagerProxy<'static>,
    unit: String,
    pub(crate) unit_path: OwnedObjectPath,
}

impl Systemd {
    /// Connects to the bus and checks that the unit is loaded, within [`CALL_DEADLINE`] for
    /// each step.
    pub async fn connect(bus: &Bus, unit: &str) -> Result<Self, SystemdError> {
        match tokio::time::timeout(CALL_DEADLINE * 2, Self::connect_unbounded(bus, unit)).await {
            Ok(result) => result,
            Err(_) => Err(SystemdError::ConnectTimeout { bus: bus.clone() }),
        }
    }

    async fn connect_unbounded(bus: &Bus, unit: &str) -> Result<Self, SystemdError> {
        let connect_err = |source| SystemdError::Connect {
            bus: bus.clone(),
            source,
        };
        let builder = match bus {
            Bus::System => zbus::connection::Builder::system(),
            Bus::Session => zbus::connection::Builder::session(),
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
        .map_err(connect_err)?;
        let connection = builder
            .method_timeout(CALL_DEADLINE)
            .build()
            .await
            .map_err(connect_err)?;
        let manager = ManagerProxy::new(&connection)
            .await
            .map_err(|source| call("a proxy for the manager", source))?;
        manager
            .subscribe()
            .await
            .map_err(|source| call("Subscribe()", source))?;
        let unit_path = manager
            .load_unit(unit)
            .await
            .map_err(|source| call(&format!("LoadUnit({unit})"), source))?;
        let systemd = Self {
            connection,
            manager,
            unit: unit.to_owned(),
            unit_path,
        };
        let load_state = systemd.load_state().await?;
        if load_state != "loaded" {
            return Err(SystemdError::NotLoaded {
                unit: unit.to_owned(),
                load_state,
            });
        }
        Ok(systemd)
    }

    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// `KillUnit(unit, "main", signal)`: systemd signals the unit's main process.
    pub async fn kill_main(&self, signal: i32) -> Result<(), SystemdError> {
        self.manager
            .kill_unit(&self.unit, "main", signal)
            .await
            .map_err(|source| call(&format!("KillUnit({}, main, {signal})", self.unit), source))
    }

    /// `RestartUnit(unit, "fail")`: returns the queued job, to wait on. Mode `fail` makes
    /// systemd refuse the restart while another job is queued on the unit, so a `systemctl
    /// stop` that an operator issued meanwhile wins: it is never replaced by our restart.
    pub async fn begin_restart(&self) -> Result<RestartJob, SystemdError> {
        // Listen before asking, so the job cannot finish unseen.
        let removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(|source| call("a match on JobRemoved", source))?;
        let job = self
            .manager
            .restart_unit(&self.unit, "fail")
            .await
            .map_err(|source| call(&format!("RestartUnit({}, fail)", self.unit), source))?;
        Ok(RestartJob { job, removed })
    }
}

/// Whether systemd's manager owns its name on the bus now.
pub(crate) async fn manager_changes(
    connection: &Connection,
) -> Result<impl futures_util::Stream<Item = BusEvent> + Send + 'static, SystemdError> {
    let dbus = zbus::fdo::DBusProxy::new(connection)
        .await
        .map_err(|source| call("a proxy for the bus", source))?;
    let changes = dbus
        .receive_name_owner_changed_with_args(&[(0, MANAGER_NAME)])
        .await
        .map_err(|source| call("a match on NameOwnerChanged", source))?;
    Ok(changes.map(|_| BusEvent::ManagerChanged))
}

impl Systemd {
    /// Starts noting the jobs queued on the unit from now on (`JobNew`).
    pub async fn watch_jobs(&self) -> Result<JobWatch, SystemdError> {
        let new = self
            .manager
            .receive_job_new()
            .await
            .map_err(|source| call("a match on JobNew", source))?;
        Ok(JobWatch {
            new,
            systemd: self.clone(),
        })
    }
}

/// The jobs others queue on the unit: an operator's `systemctl stop`, say.
pub struct JobWatch {
    new: JobNewStream,
    systemd: Systemd,
}

impl JobWatch {
    /// Runs `work` to its end, and returns its output with the type of the first job queued
    /// on the unit meanwhile (`stop`, `start`, …; `unknown` when it finished before its type
    /// could be read).
    pub async fn during<F: Future>(&mut self, work: F) -> (F::Output, Option<String>) {
        let mut work = std::pin::pin!(work);
        let mut seen: Option<String> = None;
        loop {
            tokio::select! {
                output = &mut work => return (output, seen),
                signal = self.new.next(), if seen.is_none() => {
                    let Some(signal) = signal else {
                        // The connection is gone; the work's own calls will say so.
                        return (work.await, seen);
                    };
                    if let Ok(args) = signal.args()
                        && args.unit == self.systemd.unit
                    {
                        let job = args.job.clone();
                        seen = Some(
                            self.systemd
                                .job_type(job)
                                .await
                                .unwrap_or_else(|| "unknown".into()),
                        );
                    }
                }
            }
        }
    }
}

/// A restart job systemd is running.
pub struct RestartJob {
    job: OwnedObjectPath,
    removed: JobRemovedStream,
}

impl RestartJob {
    /// Waits up to `timeout` for the job's result (`done`, `failed`, `timeout`, …);
    /// `None` if it is still running then.
    pub async fn wait(&mut self, timeout: Duration) -> Result<Option<String>, SystemdError> {
        let job = &self.job;
        let removed = &mut self.removed;
        let wait = async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job == *job
                {
                    return Some(args.result.clone());
                }
            }
            None
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(result)) => Ok(Some(result)),
            Ok(None) => Err(call(
                "the JobRemoved stream",
                zbus::Error::Failure("the bus connection closed".into()),
            )),
            Err(_) => Ok(None),
        }
    }

    pub fn path(&self) -> String {
        self.job.to_string()
    }
}

pub(crate) fn call(what: &str, source: zbus::Error) -> SystemdError {
    SystemdError::Call {
        what: what.to_owned(),
        source,
    }
}
