//! The command line of `mbcas`. Each subcommand's arguments live next to the
//! module that implements it; this file only lists the subcommands.

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "mbcas",
    version,
    about = "Market-based CPU allocation for Kubernetes pods"
)]
pub struct Cli {
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or `target=level,…`).
    #[arg(long, global = true, env = "MBCAS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format on stderr.
    #[arg(
        long,
        global = true,
        env = "MBCAS_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version and exit.
    Version,
    /// Clear the market on JSON input (stdin or --input) and print the allocation as JSON.
    Solve(crate::solve::SolveArgs),
    /// Run the allocation loop (local mode over plain cgroups, or the Kubernetes node daemon).
    Run(Box<crate::run::RunArgs>),
    /// Compare MBCAS with other policies on a scenario, in a closed-loop simulation.
    Simulate(crate::sim::SimulateArgs),
    /// Simulate the loop across nodes: MBCAS on every node, the scheduler, the
    /// descheduler evicting by each node score (scenarios/cluster/).
    SimulateCluster(crate::sim::cluster::SimulateClusterArgs),
    /// Simulate every scenario of a directory under every policy, the HPA
    /// included, and write the evaluation report (`cargo xtask evaluate`
    /// turns it into docs/evaluation.md).
    Evaluate(crate::sim::evaluate::EvaluateArgs),
    /// Generate CPU load (for demos and tests).
    Burn(crate::burn::BurnArgs),
    /// Watch cgroups for a while and print the throttling the sensor saw.
    Sense(crate::sense::SenseArgs),
    /// Print the PodAllocation CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Put recorded original CPU limits back and delete the PodAllocations (uninstall).
    Restore(crate::k8s::restore::RestoreArgs),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse() {
        let cli = Cli::try_parse_from(["mbcas", "--log-format", "json", "version"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert_eq!(cli.log_level, "info");
    }
}
