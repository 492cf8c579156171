//! `cargo xtask test`: the one command that runs every test tier.
//!
//! It runs `setup` first, so a fresh machine needs nothing else, then the lints
//! (`cargo fmt --check`, `cargo clippy --all-targets -D warnings`: a warning
//! fails CI), then every target `cargo test --all-targets` would run, in two
//! parts:
//! 1. the kernel tier (the `kernel_*` integration tests: real eBPF, cgroups and
//!    burners, measuring CPU time on a small machine; they fail rather than skip
//!    in CI), first, while nothing else runs: a control plane cleaning up after
//!    the Kubernetes tests takes enough CPU to disturb their measurements;
//!    Then the VM tier: the same tests on Debian's 6.1 and 6.12 kernels with
//!    cgroup v2, in QEMU virtual machines (`cargo xtask vm-test`);
//! 2. everything else: unit, property and golden tests, and the control-plane
//!    tier, against a `cargo xtask testenv` control plane started here (its
//!    kubeconfig in `MBCAS_TESTENV_KUBECONFIG`) and stopped afterwards;
//! 3. the node tier: a real node (containerd, kubelet, kube-scheduler) added
//!    to that control plane, MBCAS deployed on it as its DaemonSet, and the
//!    end-to-end scenario of [`crate::e2e`], then three minutes of pod churn
//!    next to the DaemonSet (`cargo xtask soak --node`) (root; CI fails rather
//!    than skip);
//! 4. a short bounded pass of every fuzz target (`cargo xtask fuzz`), then a
//!    two-minute soak of local mode under churn (`cargo xtask soak`, root);
//! 5. a short `cargo xtask demo` whose asserted checks must all pass: every
//!    consumer gets 75–125 % of its weighted max-min fair share under MBCAS,
//!    fairness (Jain of usage / fair share) at least static limits' and no
//!    limits', less throttling than static limits; the project's goals (≥ 90 %
//!    of the fair share, ≤ 110 % while another is short, throttled ratio ≤ 0.05)
//!    are printed as reported, not asserted (root only; outside CI it is
//!    skipped with a message).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{cmd::run_cmd, setup, testenv};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip the short demo run.
    #[arg(long)]
    pub no_demo: bool,
}

/// How long CI soaks local mode (`cargo xtask soak` defaults to 10 min).
const SOAK_MINUTES: u64 = 2;

/// How long CI churns pods on the real node (`cargo xtask soak --node`).
const NODE_SOAK_MINUTES: u64 = 3;

/// How long CI fuzzes each target (`cargo xtask fuzz` defaults to 60 s).
const FUZZ_SECONDS: u64 = 20;

/// Integration tests whose name starts with this are the kernel tier.
const KERNEL_TIER: &str = "kernel_";

/// The integration-test targets of the workspace's default members, split into
/// the kernel tier and the rest.
fn integration_tests() -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let out = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("failed to run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata: bad JSON")?;
    let members: Vec<&str> = meta["workspace_default_members"]
        .as_array()
        .context("cargo metadata: no workspace_default_members")?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let mut names: Vec<String> = meta["packages"]
        .as_array()
        .context("cargo metadata: no packages")?
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(&id)))
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names.into_iter().partition(|n| n.starts_with(KERNEL_TIER)))
}

fn cargo_test(tests: &[String]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("test");
    for t in tests {
        cmd.args(["--test", t]);
    }
    cmd
}

/// The VM tier: the kernel tier again on Debian's 6.1 and 6.12 kernels with
/// cgroup v2, in QEMU (`cargo xtask vm-test`), while the machine is quiet.
fn vm_tier(kernel: &[String]) -> anyhow::Result<()> {
    if kernel
        .iter()
        .map(String::as_str)
        .ne(crate::vm::TESTS.iter().copied())
    {
        bail!(
            "the kernel tier is {kernel:?} but the VM tier runs {:?}: update vm::TESTS",
            crate::vm::TESTS
        );
    }
    if !crate::procs::is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("the VM tier needs root (QEMU, busybox and kernels from apt) and CI must run it");
        }
        eprintln!("SKIP (VM tier): not running as root");
        return Ok(());
    }
    eprintln!("test: VM tier: the kernel tier on other kernels with cgroup v2");
    let t0 = std::time::Instant::now();
    crate::vm::run(&crate::vm::Options {
        kernels: crate::vm::MATRIX.iter().map(|s| (*s).to_owned()).collect(),
        filter: None,
        timeout: 900,
    })?;
    eprintln!("test: VM tier took {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The node tier: adds the real node to the running test environment and
/// runs the end-to-end scenario on it.
fn node_tier() -> anyhow::Result<()> {
    if !crate::procs::is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("the node tier needs root (containerd, kubelet, cgroups) and CI must run it");
        }
        eprintln!("SKIP (node tier): not running as root; a real node needs root");
        return Ok(());
    }
    eprintln!("test: node tier: a real node joins the test environment");
    testenv::up(true, true)?;
    let report = node_e2e()?;
    println!(
        "node tier: {} passed, 0 failed (limit {}m in {:.1} s; throttled {:.3} → {:.3})",
        report.passed.len(),
        report.raised_to,
        report.raise_seconds,
        report.throttled_before,
        report.throttled_after,
    );
    eprintln!("test: node tier: {NODE_SOAK_MINUTES} minutes of pod churn next to the DaemonSet");
    crate::soak::run(&crate::soak::Options {
        minutes: NODE_SOAK_MINUTES,
        node: true,
    })
}

/// The control-plane tests CI runs again on [`testenv::KUBERNETES_OLDEST`]:
/// resizes, refusals, restore, faults, RBAC and the manifests, against the
/// API server alone.
const CONTROL_PLANE_TESTS: &[&str] = &[
    "apiserver_env",
    "deploy_apply",
    "k8s_controller",
    "k8s_daemon",
    "k8s_faults",
    "k8s_rbac",
];

/// [`CONTROL_PLANE_TESTS`], each of which must exist (a renamed test would
/// otherwise drop out of the tier silently).
fn control_plane_tests(rest: &[String]) -> anyhow::Result<Vec<String>> {
    CONTROL_PLANE_TESTS
        .iter()
        .map(|t| {
            if rest.iter().any(|r| r == t) {
                Ok((*t).to_owned())
            } else {
                bail!("the control-plane tier names `{t}`, which is no integration test: update CONTROL_PLANE_TESTS")
            }
        })
        .collect()
}

/// The control-plane tests again on the oldest Kubernetes release still proven
/// (its API server, controller manager and kubectl only: the node tier runs
/// on the newest). Leaves the default release selected for what follows.
fn oldest_release_tier(tests: &[String]) -> anyhow::Result<()> {
    let oldest = testenv::KUBERNETES_OLDEST;
    eprintln!(
        "test: control-plane tier again on Kubernetes {oldest}, the oldest release proven: {}",
        tests.join(", ")
    );
    let t0 = std::time::Instant::now();
    testenv::set_kubernetes_version(Some(oldest));
    let result = testenv::up(true, false).and_then(|(kubeconfig, started)| {
        let tests = run_cmd(
            cargo_test(tests)
                .env(testenv::KUBECONFIG_ENV, &kubeconfig)
                .env(testenv::KUBERNETES_VERSION_ENV, oldest),
        );
        let stopped = if started { testenv::down() } else { Ok(()) };
        tests.and(stopped)
    });
    testenv::set_kubernetes_version(None);
    result?;
    eprintln!(
        "test: control-plane tier on {oldest} took {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The end-to-end scenario on the test environment's node (it must be up).
pub fn node_e2e() -> anyhow::Result<crate::e2e::Report> {
    let node = testenv::node::TestNode::running()?;
    crate::e2e::run_scenario(&node)
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    setup::run(&setup::Options {})?;
    eprintln!(
        "test: lints (rustfmt, clippy with warnings as errors), alerting rules (promtool) and \
         the Helm chart (helm lint, rendered objects against deploy/)"
    );
    run_cmd(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run_cmd(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    crate::prometheus::check_rules()?;
    crate::helm::check()?;
    let (kernel, rest) = integration_tests()?;
    if kernel.is_empty() {
        bail!("no `{KERNEL_TIER}*` integration tests found: the kernel tier would not run");
    }
    eprintln!(
        "test: kernel tier first, on a quiet machine: {}",
        kernel.join(", ")
    );
    run_cmd(&mut cargo_test(&kernel))?;
    vm_tier(&kernel)?;
    let oldest = control_plane_tests(&rest)?;
    let (kubeconfig, started) = testenv::up(true, false)?;
    // What `--all-targets` covers, less the kernel tier that already ran.
    let tests = run_cmd(
        cargo_test(&rest)
            .args(["--lib", "--bins", "--benches", "--examples"])
            .env(testenv::KUBECONFIG_ENV, &kubeconfig)
            .env(
                testenv::KUBERNETES_VERSION_ENV,
                testenv::kubernetes_version(),
            ),
    );
    let node = if tests.is_ok() { node_tier() } else { Ok(()) };
    // Stop the control plane (and the node) even when tests failed, unless it
    // was already running before (then it belongs to whoever started it).
    let stopped = if started { testenv::down() } else { Ok(()) };
    tests?;
    node?;
    stopped?;
    oldest_release_tier(&oldest)?;
    eprintln!("test: fuzz tier, a short bounded pass of every target");
    crate::fuzz::run(&crate::fuzz::Options {
        seconds: FUZZ_SECONDS,
        dev: true,
        target: None,
    })?;
    if crate::procs::is_root() {
        eprintln!("test: soak tier, {SOAK_MINUTES} minutes of consumer churn in local mode");
        crate::soak::run(&crate::soak::Options {
            minutes: SOAK_MINUTES,
            node: false,
        })?;
    } else if std::env::var_os("CI").is_some() {
        bail!("the soak tier needs root (cgroups) and CI must run it");
    } else {
        eprintln!("SKIP (soak tier): not running as root");
    }
    if opts.no_demo {
        return Ok(());
    }
    if !crate::procs::is_root() {
        if std::env::var_os("CI").is_some() {
            bail!("the demo tier needs root and CI must run it");
        }
        eprintln!("SKIP (demo tier): not running as root");
        return Ok(());
    }
    let out = PathBuf::from("target/demo-ci.json");
    crate::demo::run(&crate::demo::Options {
        duration: 90,
        json_out: Some(out.clone()),
        report_dir: PathBuf::from("target/demo-ci"),
        kubernetes: false,
    })?;
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?,
    )?;
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    if checks.is_empty() {
        bail!("demo: the summary has no checks");
    }
    for c in checks
        .iter()
        .filter(|c| c["asserted"].as_bool() == Some(false))
    {
        println!(
            "demo: reported, not asserted: {} — {} (measured {})",
            c["claim"],
            if c["passed"].as_bool() == Some(true) {
                "holds"
            } else {
                "does not hold"
            },
            c["measured"]
        );
    }
    let asserted: Vec<&serde_json::Value> = checks
        .iter()
        .filter(|c| c["asserted"].as_bool() != Some(false))
        .collect();
    let failed: Vec<String> = asserted
        .iter()
        .filter(|c| c["passed"].as_bool() != Some(true))
        .map(|c| format!("{} (measured {})", c["claim"], c["measured"]))
        .collect();
    let passed = asserted.len() - failed.len();
    // Figures taken while the hypervisor steals much of the CPU are not
    // this machine's: say how much it stole.
    println!(
        "demo: CPU stolen by the hypervisor, mean: static {} m, no limits {} m, MBCAS {} m",
        v["static"]["stolen_m"], v["nolimits"]["stolen_m"], v["mbcas"]["stolen_m"]
    );
    println!("demo: {passed} passed, {} failed", failed.len());
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("demo: claims that did not hold:\n  {}", failed.join("\n  "))
    }
}
