//! Closed-loop simulator: the daemon's decision code against a simulated CFS.
//!
//! Nodes and pods come from a [`scenario::Scenario`]; time advances in 100 ms CFS
//! periods ([`cfs::period`]); every `decision_interval_s` each node's policy sees
//! the counters the kernel would report (usage, periods, throttled periods,
//! throttled time) and asks for new limits, which take effect after
//! `actuation_delay_s`. Deterministic for a given seed (demand noise comes from a
//! SplitMix64 stream keyed by seed, node, pod and second).

pub mod cfs;
pub mod cmd;
pub mod policies;
pub mod scenario;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use serde::Serialize;

use self::{
    cfs::{PeriodOutcome, PodLoad},
    policies::{NodeObs, PodObs, SimPolicy},
    scenario::{Demand, Scenario},
};
use crate::{demand::Counters, units::PodKey};

pub const PERIOD_S: f64 = 0.1;
const PERIOD_NS: f64 = 1e8;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Scenario file (JSON; see scenarios/ in the repository).
    #[arg(long, value_name = "FILE")]
    pub scenario: PathBuf,
    /// Policy to run (repeatable; default: all).
    #[arg(long = "policy", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(policies::ALL))]
    pub policies: Vec<String>,
    /// Seed of the demand noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for summary.json, summary.md and metrics.prom.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON on standard output.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one policy on one scenario.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyMetrics {
    pub throttled_ratio_p50: f64,
    pub throttled_ratio_p99: f64,
    pub unmet_core_seconds: f64,
    pub jain: f64,
    pub slack_pct: f64,
    pub resizes_per_pod_hour: f64,
    pub oscillations: u64,
    pub adapt_p50_s: f64,
    pub adapt_p99_s: f64,
    pub starved_pods: u64,
    pub pods: u64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    pub policies: BTreeMap<String, PolicyMetrics>,
}

struct Pod {
    key: PodKey,
    request_m: u64,
    original_m: Option<u64>,
    limit_m: Option<u64>,
    weight: f64,
    demand: Demand,
    noise: f64,
    counters: Counters,
    // Window accumulators.
    win_usage: f64,
    win_periods: u64,
    win_throttled: u64,
    // Metric accumulators.
    periods: u64,
    throttled: u64,
    pending: Vec<(f64, u64)>,
    last_change: Option<(f64, i8)>,
    oscillations: u64,
    resizes: u64,
    zero_run: u64,
    starved: bool,
    steps: Vec<f64>,
    calm_since: Option<f64>,
    adapt: Vec<f64>,
    open_steps: Vec<f64>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A factor in [1 − noise, 1 + noise], fixed per (seed, node, pod, second).
fn noise_factor(seed: u64, node: u64, pod: u64, second: u64, noise: f64) -> f64 {
    if noise == 0.0 {
        return 1.0;
    }
    let r = splitmix(seed ^ splitmix(node ^ splitmix(pod ^ splitmix(second))));
    let u = (r >> 11) as f64 / (1u64 << 53) as f64;
    1.0 + noise * (2.0 * u - 1.0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs one policy over the whole scenario.
pub fn run_policy(s: &Scenario, policy: &str, seed: u64) -> Option<PolicyMetrics> {
    let n_periods = (s.duration_s / PERIOD_S).round() as u64;
    let per_decision = ((s.decision_interval_s / PERIOD_S).round() as u64).max(1);
    let mut all_pods: Vec<Pod> = Vec::new();
    let (mut unmet, mut jain_sum, mut jain_n, mut lim_sum, mut use_sum) =
        (0.0, 0.0, 0u64, 0.0, 0.0);
    let mut node_idx = 0u64;
    for ns in &s.nodes {
        for _ in 0..ns.count {
            node_idx += 1;
            let mut pol: Box<dyn SimPolicy> = policies::by_name(policy)?;
            let unlimited = pol.unlimited();
            let mut pods: Vec<Pod> = Vec::new();
            for ps in &ns.pods {
                for k in 0..ps.count {
                    let limit = if unlimited { None } else { ps.limit_m };
                    pods.push(Pod {
                        key: PodKey(format!("{}-{node_idx}/{}-{k}", ns.name, ps.name)),
                        request_m: ps.request_m,
                        original_m: limit,
                        limit_m: limit,
                        weight: ps.weight.unwrap_or(ps.request_m.max(1) as f64),
                        demand: ps.demand.clone(),
                        noise: ps.noise,
                        counters: Counters::default(),
                        win_usage: 0.0,
                        win_periods: 0,
                        win_throttled: 0,
                        periods: 0,
                        throttled: 0,
                        pending: Vec::new(),
                        last_change: None,
                        oscillations: 0,
                        resizes: 0,
                        zero_run: 0,
                        starved: false,
                        steps: ps.demand.steps(s.duration_s),
                        calm_since: None,
                        adapt: Vec::new(),
                        open_steps: Vec::new(),
                    });
                }
            }
            let mut loads = Vec::with_capacity(pods.len());
            let mut out: Vec<PeriodOutcome> = Vec::with_capacity(pods.len());
            let mut node_window_usage = 0.0;
            for k in 0..n_periods {
                let t = k as f64 * PERIOD_S;
                loads.clear();
                for (i, p) in pods.iter_mut().enumerate() {
                    p.pending.retain(|&(at, lim)| {
                        if at <= t + 1e-9 {
                            p.limit_m = Some(lim);
                            false
                        } else {
                            true
                        }
                    });
                    for &st in &p.steps {
                        if (st - t).abs() < PERIOD_S / 2.0 {
                            p.open_steps.push(st);
                        }
                    }
                    let d =
                        p.demand.at(t) * noise_factor(seed, node_idx, i as u64, t as u64, p.noise);
                    loads.push(PodLoad {
                        demand_m: d,
                        quota_m: p.limit_m.map(|l| l as f64),
                        weight: p.weight,
                    });
                }
                cfs::period(ns.capacity_m as f64, &loads, &mut out);
                let mut contending = Vec::new();
                for ((p, l), o) in pods.iter_mut().zip(&loads).zip(&out) {
                    p.counters.at_ns += PERIOD_NS as u64;
                    p.counters.usage_ns += (o.usage_m * PERIOD_NS / 1000.0) as u64;
                    p.counters.throttled_ns += (o.held_back_m * PERIOD_NS / 1000.0) as u64;
                    if o.active {
                        p.counters.nr_periods += 1;
                        p.periods += 1;
                        p.win_periods += 1;
                    }
                    if o.throttled {
                        p.counters.nr_throttled += 1;
                        p.throttled += 1;
                        p.win_throttled += 1;
                    }
                    p.win_usage += o.usage_m;
                    node_window_usage += o.usage_m;
                    let short = l.demand_m - o.usage_m;
                    unmet += short.max(0.0) * PERIOD_S / 1000.0;
                    if short > 1e-6 {
                        contending.push(o.usage_m / p.weight);
                    }
                    if let Some(lim) = p.limit_m {
                        lim_sum += lim as f64;
                        use_sum += o.usage_m;
                    }
                    if l.demand_m > 0.0 && o.usage_m <= 1e-9 {
                        p.zero_run += 1;
                        if p.zero_run > 50 {
                            p.starved = true;
                        }
                    } else {
                        p.zero_run = 0;
                    }
                    // Time to adapt: first second without throttling after a step.
                    if o.throttled || short > 1e-6 {
                        p.calm_since = None;
                    } else if p.calm_since.is_none() {
                        p.calm_since = Some(t);
                    }
                    if let Some(c) = p.calm_since
                        && t + PERIOD_S - c >= 1.0 - 1e-9
                    {
                        for st in p.open_steps.drain(..) {
                            p.adapt.push((c - st).max(0.0));
                        }
                    }
                }
                if contending.len() >= 2 {
                    let sum: f64 = contending.iter().sum();
                    let sq: f64 = contending.iter().map(|x| x * x).sum();
                    if sq > 0.0 {
                        jain_sum += sum * sum / (contending.len() as f64 * sq);
                        jain_n += 1;
                    }
                }
                if (k + 1) % per_decision == 0 {
                    let now = t + PERIOD_S;
                    let obs: Vec<PodObs> = pods
                        .iter()
                        .map(|p| PodObs {
                            key: p.key.clone(),
                            request_m: p.request_m,
                            original_m: p.original_m,
                            limit_m: p.pending.last().map(|x| x.1).or(p.limit_m),
                            weight: p.weight,
                            counters: p.counters,
                            usage_m: p.win_usage / per_decision as f64,
                            throttled_ratio: if p.win_periods == 0 {
                                0.0
                            } else {
                                p.win_throttled as f64 / p.win_periods as f64
                            },
                        })
                        .collect();
                    let node = NodeObs {
                        capacity_m: ns.capacity_m,
                        reserve: ns.reserve,
                        usage_m: node_window_usage / per_decision as f64,
                    };
                    let wanted = pol.decide(now, &node, &obs);
                    for ((p, w), o) in pods.iter_mut().zip(wanted).zip(&obs) {
                        p.win_usage = 0.0;
                        p.win_periods = 0;
                        p.win_throttled = 0;
                        let (Some(new), Some(cur)) = (w, o.limit_m) else {
                            continue;
                        };
                        if new == cur {
                            continue;
                        }
                        p.pending.push((now + s.actuation_delay_s, new));
                        p.resizes += 1;
                        let dir: i8 = if new > cur { 1 } else { -1 };
                        if let Some((at, d)) = p.last_change
                            && d != dir
                            && now - at <= 60.0
                        {
                            p.oscillations += 1;
                        }
                        p.last_change = Some((now, dir));
                    }
                    node_window_usage = 0.0;
                }
            }
            for p in &mut pods {
                for st in p.open_steps.drain(..) {
                    p.adapt.push(s.duration_s - st);
                }
            }
            all_pods.extend(pods);
        }
    }
    let n = all_pods.len().max(1) as f64;
    let mut ratios: Vec<f64> = all_pods
        .iter()
        .map(|p| {
            if p.periods == 0 {
                0.0
            } else {
                p.throttled as f64 / p.periods as f64
            }
        })
        .collect();
    let mut adapt: Vec<f64> = all_pods
        .iter()
        .flat_map(|p| p.adapt.iter().copied())
        .collect();
    Some(PolicyMetrics {
        throttled_ratio_p50: percentile(&mut ratios, 0.5),
        throttled_ratio_p99: percentile(&mut ratios, 0.99),
        unmet_core_seconds: unmet,
        jain: if jain_n == 0 {
            1.0
        } else {
            jain_sum / jain_n as f64
        },
        slack_pct: if lim_sum > 0.0 {
            (lim_sum - use_sum) / lim_sum * 100.0
        } else {
            0.0
        },
        resizes_per_pod_hour: all_pods.iter().map(|p| p.resizes).sum::<u64>() as f64
            / n
            / (s.duration_s / 3600.0),
        oscillations: all_pods.iter().map(|p| p.oscillations).sum(),
        adapt_p50_s: percentile(&mut adapt.clone(), 0.5),
        adapt_p99_s: percentile(&mut adapt, 0.99),
        starved_pods: all_pods.iter().filter(|p| p.starved).count() as u64,
        pods: all_pods.len() as u64,
    })
}

/// Runs the listed policies (all when empty) on the same scenario and seed.
pub fn simulate(s: &Scenario, names: &[String], seed: u64) -> Summary {
    let names: Vec<&str> = if names.is_empty() {
        policies::ALL.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    let policies = names
        .iter()
        .filter_map(|n| Some(((*n).to_owned(), run_policy(s, n, seed)?)))
        .collect();
    Summary {
        scenario: s.name.clone(),
        seed,
        policies,
    }
}

/// The summary as a markdown table.
pub fn markdown(sum: &Summary) -> String {
    let mut t = format!("### {} (seed {})\n\n", sum.scenario, sum.seed);
    t.push_str("| policy | throttled p50 | throttled p99 | unmet core·s | Jain | slack % | resizes/pod·h | oscillations | adapt p50 s | adapt p99 s | starved |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (name, m) in &sum.policies {
        let _ = writeln!(
            t,
            "| {name} | {:.3} | {:.3} | {:.1} | {:.3} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
            m.throttled_ratio_p50,
            m.throttled_ratio_p99,
            m.unmet_core_seconds,
            m.jain,
            m.slack_pct,
            m.resizes_per_pod_hour,
            m.oscillations,
            m.adapt_p50_s,
            m.adapt_p99_s,
            m.starved_pods
        );
    }
    t
}

/// Name, help text and getter of one exported simulation metric.
type PromMetric = (&'static str, &'static str, fn(&PolicyMetrics) -> f64);

/// The summary as a Prometheus text exposition.
pub fn prometheus(sum: &Summary) -> String {
    let mut t = String::new();
    let metrics: [PromMetric; 10] = [
        (
            "throttled_ratio_p50",
            "Median per-pod throttled-period ratio",
            |m| m.throttled_ratio_p50,
        ),
        (
            "throttled_ratio_p99",
            "p99 per-pod throttled-period ratio",
            |m| m.throttled_ratio_p99,
        ),
        (
            "unmet_core_seconds",
            "Demand not served, core-seconds",
            |m| m.unmet_core_seconds,
        ),
        (
            "jain",
            "Jain index of usage/weight among contending pods",
            |m| m.jain,
        ),
        (
            "slack_percent",
            "Sum of limits minus usage, percent of limits",
            |m| m.slack_pct,
        ),
        ("resizes_per_pod_hour", "Limit changes per pod-hour", |m| {
            m.resizes_per_pod_hour
        }),
        ("oscillations", "Direction changes within 60 s", |m| {
            m.oscillations as f64
        }),
        (
            "adapt_p50_seconds",
            "Median time to adapt after a demand step",
            |m| m.adapt_p50_s,
        ),
        (
            "adapt_p99_seconds",
            "p99 time to adapt after a demand step",
            |m| m.adapt_p99_s,
        ),
        ("starved_pods", "Pods starved for more than 5 s", |m| {
            m.starved_pods as f64
        }),
    ];
    for (name, help, get) in metrics {
        let _ = writeln!(
            t,
            "# HELP mbcas_sim_{name} {help}.\n# TYPE mbcas_sim_{name} gauge"
        );
        for (policy, m) in &sum.policies {
            let _ = writeln!(
                t,
                "mbcas_sim_{name}{{scenario=\"{}\",policy=\"{policy}\"}} {}",
                sum.scenario,
                get(m)
            );
        }
    }
    t
}

#[cfg(test)]
mod tests;
