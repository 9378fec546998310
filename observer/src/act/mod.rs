//! The actuator: carries out the judge's actions through systemd, and only through it.
//!
//! - [`systemd`]: the D-Bus client for systemd's manager, scoped to containerd's unit;
//! - [`restart`]: a restart and its escalation (goroutine dump, `RestartUnit`, `SIGKILL` of a
//!   stop that hangs);
//! - [`stop`]: whether a stop makes progress, from the old process in `/proc`, and the pidfd
//!   that kills only it.
pub mod restart;
pub mod stop;
pub mod systemd;
