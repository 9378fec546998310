//! systemd over D-Bus: where containerd's main PID comes from, and how it is restarted.
//!
//! The agent never signals or spawns containerd itself for a restart; it asks systemd, which
//! owns the unit, and waits for the job's result (`JobRemoved`).

use std::time::Duration;

use futures_util::StreamExt as _;
use zbus::{Connection, proxy, proxy::CacheProperties, zvariant::OwnedObjectPath};

use crate::config::Bus;

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
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    /// The job pending on the unit: (0, "/") when none.
    #[zbus(property)]
    fn job(&self) -> zbus::Result<(u32, OwnedObjectPath)>;
}

#[proxy(
    interface = "org.freedesktop.systemd1.Job",
    default_service = "org.freedesktop.systemd1"
)]
trait Job {
    #[zbus(property)]
    fn job_type(&self) -> zbus::Result<String>;
}

#[proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    /// The last main process, kept after it exits.
    #[zbus(property, name = "ExecMainPID")]
    fn exec_main_pid(&self) -> zbus::Result<u32>;
    /// `success`, `exit-code`, `signal`, `core-dump`, `timeout`, `start-limit-hit`, …
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    /// How many times systemd restarted the unit by its `Restart=` setting.
    #[zbus(property)]
    fn n_restarts(&self) -> zbus::Result<u32>;
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
}

/// systemd's view of one unit.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
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

/// A connection to systemd's manager, scoped to the unit running containerd.
#[derive(Clone)]
pub struct Systemd {
    connection: Connection,
    manager: ManagerProxy<'static>,
    unit: String,
    unit_path: OwnedObjectPath,
}

impl Systemd {
    /// Connects to the bus and checks that the unit is loaded.
    pub async fn connect(bus: &Bus, unit: &str) -> Result<Self, SystemdError> {
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
        let connection = builder.build().await.map_err(connect_err)?;
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
        let load_state = systemd
            .unit_proxy()
            .await?
            .load_state()
            .await
            .map_err(|source| call("LoadState", source))?;
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

    async fn unit_proxy(&self) -> Result<UnitProxy<'static>, SystemdError> {
        UnitProxy::builder(&self.connection)
            .path(self.unit_path.clone())
            .map(|b| b.cache_properties(CacheProperties::No))
            .map_err(|source| call("a proxy for the unit", source))?
            .build()
            .await
            .map_err(|source| call("a proxy for the unit", source))
    }

    /// Reads the unit's state and main PID, fresh (no cached properties).
    pub async fn status(&self) -> Result<UnitStatus, SystemdError> {
        let unit = self.unit_proxy().await?;
        let service = ServiceProxy::builder(&self.connection)
            .path(self.unit_path.clone())
            .map(|b| b.cache_properties(CacheProperties::No))
            .map_err(|source| call("a proxy for the service", source))?
            .build()
            .await
            .map_err(|source| call("a proxy for the service", source))?;
        let active_state = unit
            .active_state()
            .await
            .map_err(|source| call("ActiveState", source))?;
        let sub_state = unit
            .sub_state()
            .await
            .map_err(|source| call("SubState", source))?;
        let main_pid = service
            .main_pid()
            .await
            .map_err(|source| call("MainPID", source))?;
        let exec_main_pid = service
            .exec_main_pid()
            .await
            .map_err(|source| call("ExecMainPID", source))?;
        let result = service
            .result()
            .await
            .map_err(|source| call("Result", source))?;
        let n_restarts = service.n_restarts().await.unwrap_or(0);
        let (job_id, job_path) = unit.job().await.map_err(|source| call("Job", source))?;
        let job = if job_id == 0 {
            None
        } else {
            // The job can finish between the two reads; then there is none.
            match JobProxy::builder(&self.connection)
                .path(job_path)
                .map(|b| b.cache_properties(CacheProperties::No))
            {
                Ok(builder) => match builder.build().await {
                    Ok(job) => job.job_type().await.ok(),
                    Err(_) => None,
                },
                Err(_) => None,
            }
        };
        Ok(UnitStatus {
            active_state,
            sub_state,
            main_pid: (main_pid != 0).then_some(main_pid),
            exec_main_pid: (exec_main_pid != 0).then_some(exec_main_pid),
            job,
            result,
            n_restarts,
        })
    }

    /// `KillUnit(unit, "main", signal)`: systemd signals the unit's main process.
    pub async fn kill_main(&self, signal: i32) -> Result<(), SystemdError> {
        self.manager
            .kill_unit(&self.unit, "main", signal)
            .await
            .map_err(|source| call(&format!("KillUnit({}, main, {signal})", self.unit), source))
    }

    /// Resolves each time systemd reports a change of the unit's properties (`MainPID`,
    /// `ActiveState`, …), so the agent can re-read them at once instead of at its next tick.
    pub async fn unit_changes(
        &self,
    ) -> Result<impl futures_util::Stream<Item = ()> + Send + 'static, SystemdError> {
        let properties = zbus::fdo::PropertiesProxy::builder(&self.connection)
            .destination("org.freedesktop.systemd1")
            .and_then(|b| b.path(self.unit_path.clone()))
            .map_err(|source| call("a proxy for the unit's properties", source))?
            .build()
            .await
            .map_err(|source| call("a proxy for the unit's properties", source))?;
        let changes = properties
            .receive_properties_changed()
            .await
            .map_err(|source| call("a match on PropertiesChanged", source))?;
        Ok(changes.map(|_| ()))
    }

    /// `RestartUnit(unit, "replace")`: returns the queued job, to wait on.
    pub async fn begin_restart(&self) -> Result<RestartJob, SystemdError> {
        // Listen before asking, so the job cannot finish unseen.
        let removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(|source| call("a match on JobRemoved", source))?;
        let job = self
            .manager
            .restart_unit(&self.unit, "replace")
            .await
            .map_err(|source| call(&format!("RestartUnit({}, replace)", self.unit), source))?;
        Ok(RestartJob { job, removed })
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

fn call(what: &str, source: zbus::Error) -> SystemdError {
    SystemdError::Call {
        what: what.to_owned(),
        source,
    }
}
