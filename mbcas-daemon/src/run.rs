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
    /// Kubernetes mode: multiply each pod's weight by 1 + priority/10⁹ (its
    /// PriorityClass value); off: the weight is the CPU request alone.
    #[arg(
        long,
        env = "MBCAS_PRIORITY_WEIGHTING",
        help_heading = "Kubernetes mode"
    )]
    pub priority_weighting: bool,
    /// Kubernetes mode: how long SIGTERM waits for in-flight work before exiting.
    #[arg(long, env = "MBCAS_GRACE_PERIOD", value_name = "DURATION", default_value = "10s",
          value_parser = crate::config::parse_duration, help_heading = "Kubernetes mode")]
    pub grace_period: std::time::Duration,
    /// Kubernetes mode: hold the node's Lease (`mbcas-node-<node>`, in
    /// `--daemon-namespace`) before
    /// deciding or writing, so one daemon per node acts (a second copy watches
    /// and takes over when the first stops or its lease expires); `off` for a
    /// single copy that must act without it.
    #[arg(
        long,
        value_enum,
        env = "MBCAS_NODE_LEASE",
        default_value_t,
        help_heading = "Kubernetes mode"
    )]
    pub node_lease: NodeLeaseMode,
    /// Kubernetes mode: how long a lease not renewed stays held (renewed every
    /// quarter of it); a copy that died is replaced after at most this long.
    #[arg(long, env = "MBCAS_LEASE_DURATION", value_name = "DURATION", default_value = "40s",
          value_parser = crate::config::parse_duration, help_heading = "Kubernetes mode")]
    pub lease_duration: std::time::Duration,
    /// Kubernetes mode: this daemon's identity in the Lease (the DaemonSet
    /// passes its pod's name; default: host name, process id and start time).
    #[arg(
        long,
        env = "MBCAS_LEASE_IDENTITY",
        value_name = "NAME",
        help_heading = "Kubernetes mode"
    )]
    pub lease_identity: Option<String>,
    /// Kubernetes mode: how long a pod whose CPU limits someone else resized
    /// (`kubectl patch --subresource resize`, another controller) is left
    /// alone; its limits become the original at once (what `mbcas restore`
    /// puts back). `0s`: adopt them and carry on.
    #[arg(long, env = "MBCAS_OPERATOR_HOLD", value_name = "DURATION", default_value = "30m",
          value_parser = crate::config::parse_duration, help_heading = "Kubernetes mode")]
    pub operator_hold: std::time::Duration,
    /// Kubernetes mode: once the API server accepted a resize that raises a
    /// pod's limits, write the new quotas into its cgroups at once (the pod's,
    /// then its containers'), not a kubelet pass (about a second) later; the
    /// kubelet then writes the same values. Decreases always wait for the
    /// kubelet; a resize the kubelet does not carry out is put back.
    #[arg(long, env = "MBCAS_EARLY_QUOTA", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set, help_heading = "Kubernetes mode")]
    pub early_quota: bool,
    /// Kubernetes mode: hold a pod that takes more than its share of a busy
    /// node by lowering its pod cgroup's CPU weight (× 1/8), not its limit:
    /// the other pods' waking threads preempt it at once, and it keeps what
    /// they leave. Put back when the contention ends, when the daemon stops,
    /// and by a restarted daemon. The kubelet writes that weight only when a
    /// pod's CPU requests change. `false`: the quota lever (its limit lowered
    /// through `pods/resize`).
    #[arg(long, env = "MBCAS_WEIGHT_LEVER", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set, help_heading = "Kubernetes mode")]
    pub weight_lever: bool,
    /// Kubernetes mode: keep each pod's decision state (demand history,
    /// throttle memory, cooldowns) in this file across restarts and upgrades
    /// (the DaemonSet uses a hostPath directory); unset: a restart starts
    /// every pod afresh.
    #[arg(
        long,
        env = "MBCAS_STATE_FILE",
        value_name = "FILE",
        help_heading = "Kubernetes mode"
    )]
    pub state_file: Option<std::path::PathBuf>,
    /// Testing only: JSON object mapping `namespace/name` to a cgroup directory
    /// that stands in for that pod's cgroup (control-plane-only test environments).
    #[arg(long, env = "MBCAS_TEST_POD_CGROUPS", value_name = "FILE", hide = true)]
    pub test_pod_cgroups: Option<std::path::PathBuf>,
}

/// Whether the daemon holds its node's Lease before acting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NodeLeaseMode {
    #[default]
    On,
    Off,
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
