//! What the observer tells: the status document and its endpoint, Prometheus metrics, and the
//! node condition and events in Kubernetes.
pub mod kubernetes;
pub mod metrics;
pub mod status;
