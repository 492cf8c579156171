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

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where the loop runs.
    #[arg(long, value_enum, env = "MBCAS_MODE")]
    pub mode: Mode,
    #[command(flatten)]
    pub decision: DecisionArgs,
    #[command(flatten)]
    pub local: LocalArgs,
}
