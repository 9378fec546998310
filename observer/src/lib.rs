//! The containerd observer. The modules follow the data path:
//!
//! - [`sense`]: what is observed. The kernel programs and their fallbacks, the heartbeat, the
//!   `Version()` probe, and the unit as systemd sees it.
//! - [`judge`]: the detector, the restart budget and the policy, in a crate of its own that
//!   does no I/O and takes the time from its caller.
//! - [`act`]: restarts and their escalation, through systemd over D-Bus.
//! - [`report`]: the status document, its HTTP endpoint and client, metrics, and the
//!   Kubernetes node condition and events.
//! - [`daemon`]: the event loop that carries observations to the judge and its actions out,
//!   with the process's health, systemd notification and logging.
//! - [`config`]: flags, environment and the config file.
//! - [`doctor`]: `observer doctor`, what the agent would use on this node, tried without
//!   starting it.
pub mod act;
pub mod config;
pub mod daemon;
pub mod doctor;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod report;
pub mod sense;

pub use judge;
