//! Kubernetes mode: the PodAllocation resource, this node's pod index, the
//! writer that publishes decisions and the in-process resize controller.

pub mod client;
pub mod crd;
pub mod node;
pub mod pods;
pub mod publish;
pub mod resize;
pub mod restore;
pub mod unmanaged;
