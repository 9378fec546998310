//! Where eBPF cannot load (no BTF, not root, an old kernel): a pidfd sees containerd's exit,
//! and sock_diag reads the listener's accept queue.
pub mod pidfd;
pub mod sockdiag;
