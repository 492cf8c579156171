//! `mbcas run`: the decision loop, in local mode (plain cgroups) or Kubernetes mode.

use clap::ValueEnum;

use crate::{config::DecisionArgs, local::LocalArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Every child cgroup of --local-root is a consumer; quotas are written directly.
    Local,
    /// The node daemon: PodAllocations and in-place pod resizes.
    Kubernetes,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Decide {
    /// Decide from kernel signals and write PodAllocations.
    #[default]
    On,
    /// Run the resize controller alone (apply existing PodAllocations).
    Off,
}

/// Flags of `--mode kubernetes`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubernetesArgs {
    /// Kubernetes mode: this node's name (the DaemonSet sets it from the downward API).
    #[arg(
        long,
        env = "MBCAS_NODE_NAME",
        value_name = "NODE",
        help_heading = "Kubernetes mode"
    )]
    pub node_name: Option<String>,
    /// Kubernetes mode: kubeconfig to use instead of the in-cluster configuration.
    #[arg(
        long,
        env = "KUBECONFIG",
        value_name = "FILE",
        help_heading = "Kubernetes mode"
    )]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Kubernetes mode: `off` runs the resize controller only.
    #[arg(
        long,
        value_enum,
        env = "MBCAS_DECIDE",
        default_value_t,
        help_heading = "Kubernetes mode"
    )]
    pub decide: Decide,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where the loop runs.
    #[arg(long, value_enum, env = "MBCAS_MODE")]
    pub mode: Mode,
    #[command(flatten)]
    pub decision: DecisionArgs,
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}
