//! `mbcas evaluate`: every scenario of a directory under every policy (the
//! vertical ones, and the HPA alone and with MBCAS where a scenario has
//! services), reported with the project plan's metrics side by side.
//!
//! [`report`] is the simulated part of `docs/evaluation.md`, a pure function of
//! the scenarios and the seed: `cargo xtask evaluate` writes it (with charts
//! and the real-kernel figures of the machine it runs on), and a test fails
//! when the committed report differs from what the code produces now.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use super::{
    PolicyMetrics, ServiceTrace, Summary,
    scenario::{Scenario, ScenarioError},
    simulate_with,
};

#[derive(Debug, clap::Args)]
pub struct EvaluateArgs {
    /// Directory of scenario files (every `*.json` in it, in name order).
    #[arg(long, value_name = "DIR", default_value = "scenarios")]
    pub scenarios: std::path::PathBuf,
    /// Seed of the demand noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for `report.md` (the report's simulated part) and, per
    /// scenario with services, `<scenario>.services.json` (replicas and
    /// capacity over time, per policy, for the convergence charts).
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
}

/// One scenario's outcome under every policy.
pub struct ScenarioRun {
    pub scenario: Scenario,
    pub summary: Summary,
    /// The first node's services over time, per policy.
    pub services: BTreeMap<String, Vec<ServiceTrace>>,
}

/// Columns of the report, in this order.
const ORDER: [&str; 8] = [
    "mbcas",
    "mbcas+hpa",
    "hpa",
    "static",
    "nolimits",
    "burst",
    "vpa",
    "autothrottle",
];

/// The scenarios of `dir` (`*.json`), in file-name order.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>, ScenarioError> {
    super::scenario::json_files(dir)
        .map_err(|source| ScenarioError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .iter()
        .map(|f| Scenario::from_file(f))
        .collect()
}

/// Runs every scenario under every policy it applies to.
pub fn run_all(scenarios: &[Scenario], seed: u64) -> Vec<ScenarioRun> {
    scenarios
        .iter()
        .map(|s| {
            let (summary, traces) = simulate_with(s, &[], seed, 1, 0, None);
            ScenarioRun {
                scenario: s.clone(),
                summary,
                services: traces.services,
            }
        })
        .collect()
}

fn has_services(s: &Scenario) -> bool {
    s.nodes.iter().any(|n| !n.services.is_empty())
}

/// 1 − x / static, percent (`None` when static was never throttled).
fn reduction(m: &PolicyMetrics, st: Option<&PolicyMetrics>) -> Option<f64> {
    let st = st?.throttled_core_seconds;
    (st > 1e-9).then(|| (1.0 - m.throttled_core_seconds / st) * 100.0)
}

fn reaction(m: &PolicyMetrics) -> String {
    if m.reaction_steps == 0 {
        return "–".into();
    }
    let met = m.reaction_steps - m.reaction_censored;
    let mut t = if met == 0 {
        "never".to_owned()
    } else {
        format!("{:.0} / {:.0}", m.reaction_p50_s, m.reaction_p99_s)
    };
    if m.reaction_censored > 0 {
        let _ = write!(
            t,
            " ({} of {} not met)",
            m.reaction_censored, m.reaction_steps
        );
    }
    t
}

type Row = (
    &'static str,
    fn(&PolicyMetrics, Option<&PolicyMetrics>) -> String,
);

const ROWS: [Row; 15] = [
    ("CPU utilization of the node, %", |m, _| {
        format!("{:.1}", m.cpu_util_node_pct)
    }),
    ("CPU utilization of the requests, %", |m, _| {
        format!("{:.0}", m.cpu_util_requested_pct)
    }),
    ("unmet demand, core·s", |m, _| {
        format!("{:.1}", m.unmet_core_seconds)
    }),
    ("throttled (held back by quotas), core·s", |m, _| {
        format!("{:.1}", m.throttled_core_seconds)
    }),
    ("throttling reduction vs static, %", |m, st| {
        reduction(m, st).map_or("–".into(), |r| format!("{r:.0}"))
    }),
    ("PSI cpu some, % of serving time", |m, _| {
        format!("{:.2}", m.psi_some_pct)
    }),
    ("PSI cpu some avg10, p99 %", |m, _| {
        format!("{:.1}", m.psi_some_avg10_p99)
    }),
    ("throttled-period ratio, median pod", |m, _| {
        format!("{:.3}", m.throttled_ratio_p50)
    }),
    ("limit changes per pod·hour", |m, _| {
        format!("{:.1}", m.resizes_per_pod_hour)
    }),
    ("limit CV in steady phases", |m, _| {
        format!("{:.3}", m.limit_cv)
    }),
    ("oscillations (reversals within 60 s)", |m, _| {
        m.oscillations.to_string()
    }),
    ("reaction to a load step p50 / p99, s", |m, _| reaction(m)),
    ("ready replicas per service, mean", |m, _| {
        if m.replicas_mean > 0.0 {
            format!("{:.2}", m.replicas_mean)
        } else {
            "–".into()
        }
    }),
    ("scale events / replicas left Pending", |m, _| {
        format!("{} / {}", m.scale_events, m.pending_replicas)
    }),
    ("request latency p99, ms", |m, _| {
        if m.requests > 0 {
            format!("{:.1}", m.latency_p99_ms)
        } else {
            "–".into()
        }
    }),
];

fn columns(sum: &Summary) -> Vec<&'static str> {
    ORDER
        .into_iter()
        .filter(|p| sum.policies.contains_key(*p))
        .collect()
}

const METHOD: &str = "## Method\n\n\
The closed-loop simulator (`mbcas simulate`) runs each scenario's nodes in 100 ms CFS \
bandwidth periods: pods want CPU (the scenario's demand, with seeded noise), quotas cap \
them, and a contended node is shared by weight as `cpu.weight` shares it. Every policy \
sees what a real controller would see (the counters of `cpu.stat`, usage) and its limits \
land after the actuation delay; MBCAS is the daemon's own decision code. A *service* is a \
Deployment whose ready replicas share one load evenly.\n\n\
- **hpa** models the Horizontal Pod Autoscaler with the upstream defaults: a sync every \
15 s on CPU utilization relative to requests (target per service, 70 % here), 10 % \
tolerance, scale-up stabilization 0 s and at most max(+100 %, +4 pods) per 15 s, \
scale-down stabilization 300 s; pods not ready count as idle on a scale-up; a new replica \
needs room for its request on its node (else it stays Pending) and serves after its \
start-up time (20 s here); limits are static. It sees each pod's mean usage since the \
last sync — fresher than metrics-server's 15 s resolution allows, in the HPA's favour. \
On scenarios without services the HPA has nothing to scale (it would equal static), so \
it runs only where there are services.\n\
- **mbcas+hpa** runs both: MBCAS resizes in place, the HPA scales the replicas.\n\
- **static**, **nolimits**, **burst** (Koordinator-style CFS burst), **vpa** (VPA-style \
recommender, in-place updates) and **autothrottle** are described in the README's \
comparison.\n\n\
Metrics, per policy and scenario: CPU utilization of the node (used / capacity) and of \
the requests (used / Σ requests of the pods on the node); CPU held back by quotas and its \
reduction against static limits; **PSI** — simulated `cpu.pressure` *some*: the share of \
a pod's wanted CPU time it could not run in a period (waiting on its quota or on the run \
queue), as a share of its serving time, and the p99 of its `avg10` (updated every 2 s \
with the kernel's decay e^(−2/10)); allocation stability — limit changes per pod·hour, \
the coefficient of variation of each limit over the seconds its pod's demand had been \
unchanged for 30 s, direction reversals within 60 s; **reaction time** — from an upward \
step of a service's load to its ready replicas' limits adding up to the new load (no \
limit counts as the whole node), p50 / p99 over steps, steps never met counted apart; \
request latency from the request model where pods serve requests.\n\n";

/// The simulated part of `docs/evaluation.md`.
pub fn report(runs: &[ScenarioRun], seed: u64) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Generated by `cargo xtask evaluate` (seed {seed}) from the {} scenarios under `scenarios/`; \
         a test fails when this part differs from what the code produces.\n",
        runs.len()
    );
    t.push_str(METHOD);
    headline(&mut t, runs);
    t.push_str("## Scenarios\n\n| scenario | nodes | pods per node | services (replicas min–max) | duration s |\n|---|---|---|---|---|\n");
    for r in runs {
        let s = &r.scenario;
        let nodes: u32 = s.nodes.iter().map(|n| n.count).sum();
        let pods: Vec<String> = s
            .nodes
            .iter()
            .map(|n| n.pods.iter().map(|p| p.count).sum::<u32>().to_string())
            .collect();
        let svcs: Vec<String> = s
            .nodes
            .iter()
            .flat_map(|n| &n.services)
            .map(|v| format!("{} ({}–{})", v.name, v.replicas.min, v.replicas.max))
            .collect();
        let _ = writeln!(
            t,
            "| {} | {nodes} | {} | {} | {:.0} |",
            s.name,
            pods.join(", "),
            if svcs.is_empty() {
                "–".to_owned()
            } else {
                svcs.join(", ")
            },
            s.duration_s
        );
    }
    t.push_str("\n## Results per scenario\n\n");
    for r in runs {
        let cols = columns(&r.summary);
        let st = r.summary.policies.get("static");
        let _ = writeln!(t, "### {}\n", r.scenario.name);
        let _ = writeln!(t, "| metric | {} |", cols.join(" | "));
        let _ = writeln!(t, "|---|{}", "---|".repeat(cols.len()));
        for (name, get) in ROWS {
            let cells: Vec<String> = cols
                .iter()
                .filter_map(|p| r.summary.policies.get(*p))
                .map(|m| get(m, st))
                .collect();
            let _ = writeln!(t, "| {name} | {} |", cells.join(" | "));
        }
        t.push('\n');
        if !r.services.is_empty() {
            let _ = writeln!(
                t,
                "![{0}: capacity and replicas after the steps](evaluation/{0}-convergence.png)\n",
                r.scenario.name
            );
        }
    }
    analysis(&mut t, runs);
    t
}

/// The figures the plan asks for first, from the scenarios with services.
fn headline(t: &mut String, runs: &[ScenarioRun]) {
    t.push_str("## Headline\n\n");
    for r in runs.iter().filter(|r| has_services(&r.scenario)) {
        let p = &r.summary.policies;
        let (Some(mb), Some(hpa), Some(st)) = (p.get("mbcas"), p.get("hpa"), p.get("static"))
        else {
            continue;
        };
        let ratio = if mb.reaction_p50_s > 0.0 {
            format!("{:.0}× sooner", hpa.reaction_p50_s / mb.reaction_p50_s)
        } else {
            "MBCAS had the capacity before the step".to_owned()
        };
        let _ = writeln!(
            t,
            "- **{}**: reaction to the load step p50 / p99 MBCAS {} s, HPA {} s ({ratio}); \
             PSI some MBCAS {:.2} %, HPA {:.2} %, static {:.2} %; throttled MBCAS {:.1}, HPA {:.1}, \
             static {:.1} core·s; CPU utilization of the requests MBCAS {:.0} %, HPA {:.0} %.",
            r.scenario.name,
            reaction(mb),
            reaction(hpa),
            mb.psi_some_pct,
            hpa.psi_some_pct,
            st.psi_some_pct,
            mb.throttled_core_seconds,
            hpa.throttled_core_seconds,
            st.throttled_core_seconds,
            mb.cpu_util_requested_pct,
            hpa.cpu_util_requested_pct,
        );
    }
    let reductions: Vec<f64> = runs
        .iter()
        .filter_map(|r| {
            let p = &r.summary.policies;
            reduction(p.get("mbcas")?, p.get("static"))
        })
        .collect();
    if !reductions.is_empty() {
        let mut sorted = reductions.clone();
        sorted.sort_by(f64::total_cmp);
        let _ = writeln!(
            t,
            "- **Throttling reduction against static limits** (MBCAS, over the {} scenarios where \
             static limits throttle): median {:.0} %, lowest {:.0} %.",
            sorted.len(),
            sorted[sorted.len() / 2],
            sorted[0],
        );
    }
    t.push('\n');
}

/// Where each policy comes out best, metric by metric, and where MBCAS does not.
fn analysis(t: &mut String, runs: &[ScenarioRun]) {
    t.push_str("## Analysis\n\n");
    type Metric = (&'static str, fn(&PolicyMetrics) -> f64);
    let metrics: [Metric; 4] = [
        ("PSI cpu some", |m| m.psi_some_pct),
        ("unmet demand", |m| m.unmet_core_seconds),
        ("throttled core·s", |m| m.throttled_core_seconds),
        ("limit changes per pod·hour", |m| m.resizes_per_pod_hour),
    ];
    let with_services = runs.iter().filter(|r| has_services(&r.scenario)).count();
    let _ = write!(
        t,
        "Scenarios where a policy has the lowest value of a metric (ties within 1 % of the \
         best, or 0.01, shared), among the policies that set limits — no limits is the bound \
         they are measured against. The vertical policies ran on all {} scenarios, `hpa` and \
         `mbcas+hpa` on the {with_services} with services.\n\n| metric | ",
        runs.len()
    );
    let limited: Vec<&str> = ORDER.into_iter().filter(|p| *p != "nolimits").collect();
    let _ = writeln!(t, "{} |", limited.join(" | "));
    let _ = writeln!(t, "|---|{}", "---|".repeat(limited.len()));
    for (name, get) in metrics {
        let mut wins: BTreeMap<&str, u32> = BTreeMap::new();
        for r in runs {
            let vals: Vec<(&str, f64)> = limited
                .iter()
                .filter_map(|p| r.summary.policies.get(*p).map(|m| (*p, get(m))))
                .collect();
            let best = vals.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
            for (p, v) in vals {
                if v <= best + (best.abs() * 0.01).max(0.01) {
                    *wins.entry(p).or_default() += 1;
                }
            }
        }
        let cells: Vec<String> = limited
            .iter()
            .map(|p| wins.get(p).copied().unwrap_or(0).to_string())
            .collect();
        let _ = writeln!(t, "| {name} | {} |", cells.join(" | "));
    }
    t.push_str(
        "\nWhere MBCAS leaves more demand unmet than another policy that sets limits, or more \
         than 1 % of the demand above no limits:\n\n",
    );
    let mut any = false;
    for r in runs {
        let p = &r.summary.policies;
        let Some(mb) = p.get("mbcas") else { continue };
        let better: Vec<String> = limited
            .iter()
            .filter(|n| !n.starts_with("mbcas"))
            .filter_map(|n| p.get(*n).map(|m| (n, m)))
            .filter(|(_, m)| m.unmet_core_seconds < mb.unmet_core_seconds * 0.99 - 0.05)
            .map(|(n, m)| format!("{n} {:.1}", m.unmet_core_seconds))
            .collect();
        let over_open = p.get("nolimits").is_some_and(|o| {
            mb.unmet_core_seconds - o.unmet_core_seconds > 0.01 * mb.demand_core_seconds
        });
        if better.is_empty() && !over_open {
            continue;
        }
        any = true;
        let _ = writeln!(
            t,
            "- {}: MBCAS {:.1} core·s of {:.0}{}{}.",
            r.scenario.name,
            mb.unmet_core_seconds,
            mb.demand_core_seconds,
            if better.is_empty() {
                String::new()
            } else {
                format!("; lower: {}", better.join(", "))
            },
            p.get("nolimits")
                .map(|o| format!("; no limits {:.1}", o.unmet_core_seconds))
                .unwrap_or_default(),
        );
    }
    if !any {
        t.push_str("- none.\n");
    }
    t.push_str(
        "\nWhy, in short:\n\n\
         - **MBCAS against the HPA.** A vertical resize in place lands within the daemon's \
         decision round and the kubelet's actuation; a horizontal scale-up waits for the next \
         15 s sync, for metrics that only then show the step, and for the new replica's start-up. \
         The HPA cannot add CPU where a replica's request does not fit (its replicas stay \
         Pending), while MBCAS can only hand out what the node has: on a full node the market \
         shares it by weight, and the service's limits do not reach its load.\n\
         - **MBCAS with the HPA.** MBCAS lets a pod use more than its request, and the HPA \
         measures utilization against requests: together the HPA still scales out (its \
         utilization target holds), while MBCAS covers the seconds until the new replicas serve.\n\
         - **Where the HPA is better.** It never changes a limit, and it keeps pods near their \
         requests (utilization of the requests near its target), so the scheduler, which packs \
         nodes by requests, sees the load; under MBCAS alone pods run above their requests on \
         lent CPU, which a node's requests do not show. Where a service's load outgrows its \
         node, only new replicas elsewhere help, and MBCAS cannot add them.\n\
         - **No limits** is the throughput bound: nothing is held back while the node has CPU, \
         but nothing protects a pod from a neighbour's burst either; MBCAS's claim is to come \
         close to it while keeping limits.\n\
         - **PSI** here is the share of a pod's wanted CPU time it could not run, from quota \
         or from the run queue; static limits and slow controllers show it as pressure while \
         the node idles.\n",
    );
}

/// `mbcas evaluate`.
pub fn run(args: &EvaluateArgs) -> Result<std::process::ExitCode, super::cmd::SimulateError> {
    let scenarios = load_dir(&args.scenarios)?;
    let runs = run_all(&scenarios, args.seed);
    let write = |name: String, text: &str| {
        let p = args.out.join(name);
        std::fs::create_dir_all(&args.out)
            .and_then(|()| std::fs::write(&p, text))
            .map_err(|source| super::cmd::SimulateError::Write {
                path: p.display().to_string(),
                source,
            })
    };
    for r in &runs {
        if r.services.is_empty() {
            continue;
        }
        let json = serde_json::to_string(&r.services).map_err(|source| {
            super::cmd::SimulateError::Json {
                what: "service traces",
                source,
            }
        })?;
        write(format!("{}.services.json", r.scenario.name), &json)?;
    }
    let cluster = super::cluster::load_dir(&args.scenarios.join("cluster"))?;
    let text = report(&runs, args.seed) + &super::cluster::report(&cluster, args.seed);
    write("report.md".into(), &text)?;
    let policies: usize = runs.iter().map(|r| r.summary.policies.len()).sum();
    println!(
        "evaluated {} scenarios ({policies} policy runs); wrote {}",
        runs.len(),
        args.out.join("report.md").display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
