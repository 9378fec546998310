//! The containerd observer: sensors feed one detector, whose decisions one actuator carries
//! out through systemd, while the status endpoint shows what was seen and done.
//!
//! - sensors: [`kernel`] (eBPF programs), [`probe`] (`Version()` over gRPC), [`systemd`] (the unit)
//! - [`detector`]: the state machine, free of I/O
//! - [`actuator`]: restarts through systemd
//! - [`status`]: the JSON document and its HTTP endpoint
//! - [`agent`]: wires them together
pub mod actuator;
pub mod agent;
pub mod config;
pub mod detector;
pub mod kernel;
pub mod probe;
pub mod status;
pub mod systemd;
