//! Sensors: everything the observer learns about containerd comes through here.
//!
//! - [`kernel`]: the eBPF programs (exits and their cause, the accept queue), and the kernel
//!   BTF and tracefs layouts they are loaded with;
//! - [`fallback`]: pidfd and sock_diag, which stand in where eBPF cannot load;
//! - [`sensors`]: picks, per sensor, the kernel program or its fallback, and says which;
//! - [`heartbeat`]: the cheap connects that keep the accept queue observed;
//! - [`probe`]: `Version()` over gRPC, each call with its own deadline;
//! - [`process`]: a process named by its PID and start time, which a reused PID does not
//!   share;
//! - [`listener`]: whether a listening socket is containerd's own, by its inode;
//! - [`ladder`]: the deeper probe layers below `Version()` (CRI, metadata, snapshots, tasks);
//! - [`blocked`]: containerd's and its shims' threads in D state, from `/proc`;
//! - [`unit`]: the unit as systemd sees it, and its changes.
pub mod blocked;
pub mod fallback;
pub mod heartbeat;
pub mod kernel;
pub mod ladder;
pub mod listener;
pub mod probe;
pub mod process;
pub mod sensors;
pub mod unit;
