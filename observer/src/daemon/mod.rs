//! The running agent: the event loop, the process's own health (`/livez`, `/readyz`),
//! systemd's readiness notification, its descriptor limit and logging.
pub mod agent;
pub mod health;
pub mod limits;
pub mod logging;
pub mod notify;
