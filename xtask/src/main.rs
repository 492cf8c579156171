//! Developer tasks: `cargo xtask <command>`. Each command lives in its own module.

mod bench_k8s;
mod bench_latency;
mod bench_local;
mod bench_node;
mod bench_sensor;
mod bench_sim;
mod build_ebpf;
mod cmd;
mod demo;
mod e2e;
mod evaluate;
mod fuzz;
mod helm;
mod host;
mod kind;
mod procs;
mod prometheus;
mod setup;
mod sim_charts;
mod soak;
mod test;
mod testenv;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "MBCAS developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install, only where missing, every tool the build and the tests need.
    Setup(setup::Options),
    /// Measure local mode: overhead with 100 consumers and reaction time (root).
    BenchLocal(bench_local::Options),
    /// Measure Kubernetes mode on private control planes: 500 resizes, API requests, a 110-pod node (root).
    BenchK8s(bench_k8s::Options),
    /// Measure MBCAS on the test environment's real node: onset → new quota, PATCH → status,
    /// daemon CPU/RSS and API writes on a node of 40 pods (root).
    BenchNode(bench_node::Options),
    /// Measure the eBPF sensor: per-program cost, events, drops, latency, own CPU/RSS (root).
    BenchSensor(bench_sensor::Options),
    /// A real nginx under open-loop load next to a noisy neighbour: alone, static limits,
    /// no limits, MBCAS; latency p50/p99/p999, errors, throttling, run-queue wait (root).
    BenchLatency(bench_latency::Options),
    /// Time the simulator at cluster scale (default 1000 nodes × 110 pods × 1 h): wall time, peak RSS.
    BenchSim(bench_sim::Options),
    /// Static limits vs MBCAS on the same loads, live, with charts and a summary (root).
    Demo(demo::Options),
    /// Build the eBPF programs (through mbcas-daemon's build script) and show the object.
    BuildEbpf(build_ebpf::Options),
    /// Fuzz every parser of outside input (cgroup files, kubepods paths, BTF, CPU
    /// quantities, scenarios, `mbcas solve` input, PodAllocations) N seconds each.
    Fuzz(fuzz::Options),
    /// Local mode under churn (consumers created and removed, loads changing) for N
    /// minutes: RSS, file descriptors and per-consumer series must stay flat (root).
    Soak(soak::Options),
    /// The Helm chart (deploy/helm/mbcas): helm lint, the values schema, and its rendered
    /// objects against `kubectl kustomize deploy/`.
    HelmCheck,
    /// Run setup, then every test tier (unit, kernel, control plane).
    Test(test::Options),
    /// Create a Kind cluster (deploy/kind-config.yaml), build and load the image, deploy MBCAS.
    /// Needs Docker, kind and kubectl.
    KindUp(kind::Options),
    /// On the Kind cluster: check that MBCAS raises a throttled pod's CPU limit in place.
    KindE2e(kind::Options),
    /// Delete the Kind cluster.
    KindDown(kind::Options),
    /// On the test environment's node (`testenv up --with-node`): the end-to-end
    /// scenario kind-e2e runs (DaemonSet, resizes on real cgroups, restore).
    NodeE2e,
    /// A real etcd + kube-apiserver on loopback, and with `up --with-node` a real node:
    /// build | up | down | status | kubectl | kill | start.
    Testenv(testenv::Options),
    /// The kernel tier on Debian's 6.1 and 6.12 kernels with cgroup v2, in QEMU VMs
    /// (KVM when a guest boots under it, else emulated); kernels fetched into the cache (root).
    VmTest(vm::Options),
    /// Draw the PNG charts of a `mbcas simulate --out DIR` directory.
    SimCharts(sim_charts::ChartOptions),
    /// Simulate every shipped scenario under every policy; write docs/compare/ and the
    /// README's "How MBCAS compares" tables.
    Compare(sim_charts::CompareOptions),
    /// Every scenario under every policy, the HPA included, with the project plan's
    /// metrics, convergence charts and the real-kernel demo: docs/evaluation.md.
    Evaluate(evaluate::Options),
}

fn main() -> anyhow::Result<()> {
    testenv::check_kubernetes_version()?;
    match Cli::parse().command {
        Command::Setup(opts) => setup::run(&opts),
        Command::BuildEbpf(opts) => build_ebpf::run(&opts),
        Command::Demo(opts) => demo::run(&opts),
        Command::BenchSensor(opts) => bench_sensor::run(&opts),
        Command::BenchLatency(opts) => bench_latency::run(&opts),
        Command::BenchLocal(opts) => bench_local::run(&opts),
        Command::BenchSim(opts) => bench_sim::run(&opts),
        Command::BenchK8s(opts) => bench_k8s::run(&opts),
        Command::BenchNode(opts) => bench_node::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::HelmCheck => helm::check(),
        Command::Soak(opts) => soak::run(&opts),
        Command::KindUp(opts) => kind::up(&opts),
        Command::KindE2e(opts) => kind::e2e(&opts),
        Command::KindDown(opts) => kind::down(&opts),
        Command::NodeE2e => test::node_e2e().map(|_| ()),
        Command::Testenv(opts) => testenv::run(&opts),
        Command::VmTest(opts) => vm::run(&opts),
        Command::SimCharts(opts) => sim_charts::run_charts(&opts),
        Command::Compare(opts) => sim_charts::run_compare(&opts),
        Command::Evaluate(opts) => evaluate::run(&opts),
    }
}
