//! The unit as systemd sees it: its state, main PID and pending job, read fresh, and a stream
//! that fires when systemd reports a change, so a new main PID is followed at once.

use futures_util::StreamExt as _;
use zbus::{proxy, proxy::CacheProperties, zvariant::OwnedObjectPath};

use crate::act::systemd::{BusEvent, Systemd, SystemdError, UnitStatus, call, manager_changes};

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
    /// `running`, `freezing`, `frozen` or `thawing` (systemd 246 and later).
    #[zbus(property)]
    fn freezer_state(&self) -> zbus::Result<String>;
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

impl Systemd {
    /// The unit's `LoadState`: `loaded` when systemd knows it.
    pub(crate) async fn load_state(&self) -> Result<String, SystemdError> {
        self.unit_proxy()
            .await?
            .load_state()
            .await
            .map_err(|source| call("LoadState", source))
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
        // Older systemd has no freezer: nothing can be frozen through it there.
        let freezer_state = unit.freezer_state().await.unwrap_or_default();
        let (job_id, job_path) = unit.job().await.map_err(|source| call("Job", source))?;
        let job = if job_id == 0 {
            None
        } else {
            self.job_type(job_path).await
        };
        Ok(UnitStatus {
            active_state,
            sub_state,
            main_pid: (main_pid != 0).then_some(main_pid),
            exec_main_pid: (exec_main_pid != 0).then_some(exec_main_pid),
            job,
            result,
            n_restarts,
            freezer_state,
        })
    }

    /// The type of a job (`start`, `stop`, `restart`, …); `None` once it has finished.
    pub(crate) async fn job_type(&self, job: OwnedObjectPath) -> Option<String> {
        let builder = JobProxy::builder(&self.connection)
            .path(job)
            .ok()?
            .cache_properties(CacheProperties::No);
        builder.build().await.ok()?.job_type().await.ok()
    }

    /// Yields each time systemd reports a change of the unit's properties (`MainPID`,
    /// `ActiveState`, …), so the agent can re-read them at once instead of at its next tick,
    /// and when systemd's manager leaves or rejoins the bus. It ends when the connection to
    /// the bus is lost.
    pub async fn changes(
        &self,
    ) -> Result<impl futures_util::Stream<Item = BusEvent> + Send + 'static, SystemdError> {
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
        let manager = manager_changes(&self.connection).await?;
        Ok(futures_util::stream::select(
            changes.map(|_| BusEvent::UnitChanged),
            manager,
        ))
    }
}
