//! Kubernetes mode: the PodAllocation resource, this node's pod index, the
//! writer that publishes decisions, the in-process resize controller (with
//! the early quota writes of increases), the weight lever that holds a pod to
//! its share under contention, and the node lease that lets one daemon per
//! node write.

pub mod client;
pub mod crd;
pub mod early;
pub mod lease;
pub mod node;
pub mod pods;
pub mod publish;
pub mod resize;
pub mod restore;
pub mod unmanaged;
pub mod weight;
