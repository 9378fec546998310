//! The observer's judgement, free of I/O: observations and the time they were made go in,
//! verdicts and the actions they call for come out.
//!
//! - [`detector`]: the state machine that turns exits, stalls and probe results into verdicts
//! - [`cause`]: names an exit (signal, sender, OOM) for the verdict's evidence
//! - [`latency`]: accept-latency percentiles over a sliding window
//! - [`layer`]: the layers of the probe ladder, silent shims and blocked threads
//! - [`budget`]: how many restarts may still be made, and when
//! - [`policy`]: what to do about a verdict, given systemd's view of the unit
//! - [`schedule`]: gaps in the observer's own scheduling, which are not containerd's fault
//!
//! This crate depends on no runtime and reads no clock: every function that needs the time
//! takes `now` from its caller, so its tests run on a virtual clock and never sleep.
// Tests start their virtual clock at a real instant; only the clock's origin comes from it.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod budget;
pub mod cause;
pub mod detector;
pub mod latency;
pub mod layer;
pub mod policy;
pub mod schedule;
