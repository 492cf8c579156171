//! Kubernetes mode: the PodAllocation resource, this node's pod index, the
//! writer that publishes decisions and the in-process resize controller.

pub mod crd;
pub mod pods;
pub mod resize;
