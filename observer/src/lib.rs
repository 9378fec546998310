//! The containerd observer: sensors feed one detector, whose decisions one actuator carries
//! out through systemd, while the status endpoint shows what was seen and done.
//!
//! - sensors: [`kernel`] (eBPF programs), [`sensors`] (each kernel sensor or its fallback:
//!   [`pidfd`], [`sockdiag`]), [`heartbeat`], [`probe`] (`Version()` over gRPC),
//!   [`systemd`] (the unit)
//! - [`detector`]: the state machine, free of I/O
//! - [`actuator`]: restarts through systemd
//! - [`status`]: the JSON document and its HTTP endpoint
//! - [`kubernetes`]: the node condition and events, when running in a cluster
//! - [`agent`]: wires them together
pub mod actuator;
pub mod agent;
pub mod btf;
pub mod budget;
pub mod cause;
pub mod config;
pub mod detector;
pub mod health;
pub mod heartbeat;
pub mod kernel;
pub mod kubernetes;
pub mod latency;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pidfd;
pub mod probe;
pub mod sensors;
pub mod sockdiag;
pub mod status;
pub mod systemd;
