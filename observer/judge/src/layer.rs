//! The layers of the probe ladder, from the gRPC server down to the shims, and the kernel's
//! view of threads that do not run. Each layer exercises one more part of containerd than
//! the one above it, so the first layer that fails names where containerd is stuck.

use std::{fmt, str::FromStr, time::Duration};

use serde::Serialize;

/// One rung of the probe ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// `Version()`: the gRPC server runs at all.
    Version,
    /// CRI `RuntimeService/Status`: what the kubelet asks every few seconds.
    Cri,
    /// CRI `ListPodSandbox`: the kubelet's relist (PLEG) path.
    Sandboxes,
    /// A container list in `k8s.io`: a metadata (bbolt) read transaction.
    MetadataRead,
    /// A lease created and deleted: a metadata write transaction and its fsync.
    MetadataWrite,
    /// A snapshot removal that takes the snapshotter's lock (containerd #13798).
    Snapshots,
    /// `Tasks.List` in `k8s.io`: every shim's `State`.
    Tasks,
}

impl Layer {
    pub const ALL: [Layer; 7] = [
        Layer::Version,
        Layer::Cri,
        Layer::Sandboxes,
        Layer::MetadataRead,
        Layer::MetadataWrite,
        Layer::Snapshots,
        Layer::Tasks,
    ];

    /// The name in `--probes`, `/status` and the metrics' `layer` label.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Version => "version",
            Layer::Cri => "cri",
            Layer::Sandboxes => "sandboxes",
            Layer::MetadataRead => "metadata_read",
            Layer::MetadataWrite => "metadata_write",
            Layer::Snapshots => "snapshots",
            Layer::Tasks => "tasks",
        }
    }

    /// What the layer's call is, for evidence an operator reads.
    pub fn call(self) -> &'static str {
        match self {
            Layer::Version => "Version()",
            Layer::Cri => "CRI RuntimeService/Status",
            Layer::Sandboxes => "CRI ListPodSandbox",
            Layer::MetadataRead => "Containers.List in k8s.io",
            Layer::MetadataWrite => "a lease create and delete",
            Layer::Snapshots => "Snapshots.Remove of an absent key",
            Layer::Tasks => "Tasks.List in k8s.io",
        }
    }

    /// Whether the layer's storage is containerd's metadata database, so that a layer stuck
    /// while containerd's threads wait on the disk is a storage stall, not a deadlock.
    pub fn touches_storage(self) -> bool {
        matches!(
            self,
            Layer::MetadataRead | Layer::MetadataWrite | Layer::Snapshots
        )
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Layer::ALL
            .into_iter()
            .find(|layer| layer.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Layer::ALL.iter().map(|l| l.name()).collect();
                format!(
                    "`{s}` is not a probe layer; use some of {}",
                    names.join(", ")
                )
            })
    }
}

/// A task whose shim did not answer containerd's `State` call within containerd's own
/// deadline: `Tasks.List` reported it `UNKNOWN`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SilentTask {
    /// The container's ID.
    pub id: String,
    /// The shim's PID, found from its command line; `None` when no shim process serves it.
    pub shim_pid: Option<u32>,
}

impl fmt::Display for SilentTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shim_pid {
            Some(pid) => write!(f, "container {} (shim pid {pid})", self.id),
            None => write!(f, "container {} (no shim process found)", self.id),
        }
    }
}

/// Whose thread a blocked thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    Containerd,
    Shim,
}

/// A thread in uninterruptible sleep (D state) for longer than the threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedThread {
    pub owner: Owner,
    pub pid: u32,
    pub tid: u32,
    /// The kernel function it waits in (`wchan`), e.g. `percpu_rwsem_wait`.
    pub wchan: String,
    /// How long it has been seen in D state, at least.
    pub blocked_for: Duration,
}

impl fmt::Display for BlockedThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owner = match self.owner {
            Owner::Containerd => "containerd",
            Owner::Shim => "shim",
        };
        write!(
            f,
            "{owner} thread {} (pid {}) in D state for {:.1} s in {}",
            self.tid,
            self.pid,
            self.blocked_for.as_secs_f64(),
            if self.wchan.is_empty() {
                "an unknown kernel function"
            } else {
                &self.wchan
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_a_typo_lists_the_layers() {
        for layer in Layer::ALL {
            assert_eq!(layer.name().parse::<Layer>(), Ok(layer));
        }
        let err = "metadata".parse::<Layer>().unwrap_err();
        assert!(err.contains("metadata_read, metadata_write"), "{err}");
    }
}
