//! `mbcas simulate-cluster`: the closed loop across nodes, simulated — nodes
//! running MBCAS, a scheduler placing by requests, the descheduler's
//! LowNodeUtilization evicting by a node score, the score recomputed.
//!
//! The model, second by second:
//! - **Load**: each service has a total load (a [`Demand`], with a seeded
//!   noise factor per second) shared evenly by its ready replicas; a service
//!   with no ready replica leaves its whole load unmet.
//! - **A node** runs MBCAS (the work-conserving weighted water-fill), so what
//!   its pods get is min(D, C) for the sum D of their demands on capacity C,
//!   and its unmet demand is max(0, D − C). The inputs the scoring rules read
//!   (deploy/prometheus/mbcas-scoring-rules.yaml), per node: CPU in use
//!   cu = min(D, C) / C; CPU pressure cp = min(1, D / C − 1), the share of
//!   demand that waits, counted only while cu > 0.7 as the rule does (PSI's
//!   own figure is not modelled); memory in use mu = the pods' memory
//!   requests over the node's memory; memory pressure mp = 0 (not modelled);
//!   MBCAS's market ratio D / C. Each is averaged over the descheduler's
//!   interval, as the rules' `rate(...[1m])`.
//! - **The descheduler** (v0.36.0's LowNodeUtilization with the Prometheus
//!   source, as deploy/descheduler/ configures it), every interval: the score
//!   of every node by one [`Algorithm`]; with deviation thresholds a node is
//!   over-utilised above the mean + 0.10 and under-utilised below the mean
//!   − 0.10; the scores with absolute ones
//!   ([`Algorithm::absolute_thresholds`]) over > 0.10, under < 0.01. Nothing is evicted unless some
//!   node is under-utilised. From each over-utilised node, hottest first, one
//!   pod (`maxNoOfPodsToEvictPerNode: 1`) that fits on another node by
//!   requests (`nodeFit`); which one is not known to the descheduler (the
//!   Prometheus source has no per-pod figure and the pods of one priority and
//!   QoS class come in the informer's order), so a seeded random one.
//! - **The scheduler** places a replacement at once by requests
//!   (NodeResourcesFit's LeastAllocated: the most free CPU and memory by
//!   requests, one at random on a tie); with `--taint`, a node whose market
//!   ratio was above 1 at a cycle carries a `PreferNoSchedule` taint until it
//!   is below [`TAINT_CLEARED_BELOW`] and is chosen only when no other fits.
//!   The replacement is ready `start_s` later.
//!
//! Measured per algorithm: evictions; the time from the first over-committed
//! second (some node's D > C) until the node that was hottest then is no
//! longer over-committed for good; evictions after that (balancing that goes
//! on when nothing is hot); the over-committed node-seconds; the unmet demand
//! (core-seconds); and replacements that land on a node the same service had
//! a pod evicted from in the last [`BACK_WITHIN_S`] (moves back and forth).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::{
    scenario::{Demand, ScenarioError, json_files, parse_json},
    splitmix,
};

/// With `--taint`, a tainted node keeps its taint until its market ratio is
/// below this: cleared at 1.0, a node relieved by one eviction (0.86) took
/// the replacement of a pod evicted from the other hot node and was hot again
/// the next cycle, the two trading pods for the whole run.
pub const TAINT_CLEARED_BELOW: f64 = 0.8;

/// A replacement placed on a node its service lost a pod to an eviction
/// this recently is a move back.
pub const BACK_WITHIN_S: f64 = 600.0;

#[derive(Debug, clap::Args)]
pub struct SimulateClusterArgs {
    /// Cluster scenario file (JSON; see scenarios/cluster/ in the repository).
    #[arg(long, value_name = "FILE")]
    pub scenario: std::path::PathBuf,
    /// Scoring algorithm the descheduler evicts by (repeatable; default: all,
    /// and `none`, no descheduler, to compare with).
    #[arg(long = "algorithm", value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(ALGORITHM_NAMES))]
    pub algorithms: Vec<String>,
    /// Taint over-committed nodes `PreferNoSchedule` so that replacements go
    /// elsewhere when they can.
    #[arg(long)]
    pub taint: bool,
    /// Seed of the load noise and of the descheduler's choice of pod.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the results as JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
}

/// A cluster scenario: groups of identical nodes and the services on them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterScenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub duration_s: f64,
    /// The descheduler's interval (and the score's averaging window).
    #[serde(default = "default_interval")]
    pub descheduler_interval_s: f64,
    /// Seconds from a replacement's creation to its readiness.
    #[serde(default = "default_start")]
    pub start_s: f64,
    /// Each service's load is multiplied by a factor in [1 − noise, 1 + noise]
    /// redrawn every second.
    #[serde(default)]
    pub noise: f64,
    pub nodes: Vec<NodeGroup>,
    pub services: Vec<Service>,
}

fn default_interval() -> f64 {
    60.0
}

fn default_start() -> f64 {
    10.0
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroup {
    /// Nodes are named `<name>-<i>`.
    pub name: String,
    pub count: u32,
    pub cpu_m: f64,
    pub memory_mi: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub replicas: u32,
    pub request_m: f64,
    pub memory_mi: f64,
    /// The whole service's load, shared by its ready replicas.
    pub load: Demand,
    /// Nodes its replicas start on, in turn (as left by an earlier
    /// rollout); by default the scheduler places them.
    #[serde(default)]
    pub on: Vec<String>,
}

impl ClusterScenario {
    pub fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Self = parse_json(text, origin)?;
        let invalid = |field: &str, message: &str| ScenarioError::Invalid {
            path: origin.to_owned(),
            field: field.to_owned(),
            message: message.to_owned(),
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(s.duration_s) || s.duration_s > 1e6 {
            return Err(invalid("duration_s", "must be in (0, 1e6] seconds"));
        }
        if !positive(s.descheduler_interval_s) {
            return Err(invalid("descheduler_interval_s", "must be > 0"));
        }
        if !(s.start_s.is_finite() && s.start_s >= 0.0) {
            return Err(invalid("start_s", "must be ≥ 0"));
        }
        if !(0.0..1.0).contains(&s.noise) {
            return Err(invalid("noise", "must be in [0, 1)"));
        }
        if s.nodes.iter().map(|g| u64::from(g.count)).sum::<u64>() == 0 {
            return Err(invalid("nodes", "needs at least one node"));
        }
        for (i, g) in s.nodes.iter().enumerate() {
            if !positive(g.cpu_m) || !positive(g.memory_mi) {
                return Err(invalid(
                    &format!("nodes[{i}]"),
                    "cpu_m and memory_mi must be > 0",
                ));
            }
        }
        let names: HashSet<String> = node_names(&s.nodes).into_iter().collect();
        for (i, v) in s.services.iter().enumerate() {
            let field = format!("services[{i}]");
            let non_negative = |x: f64| x.is_finite() && x >= 0.0;
            if !(non_negative(v.request_m) && non_negative(v.memory_mi)) {
                return Err(invalid(&field, "request_m and memory_mi must be ≥ 0"));
            }
            v.load
                .validate()
                .map_err(|m| invalid(&format!("{field}.load"), m))?;
            if let Some(n) = v.on.iter().find(|n| !names.contains(*n)) {
                return Err(invalid(&format!("{field}.on"), &format!("no node {n}")));
            }
        }
        Ok(s)
    }
}

fn node_names(groups: &[NodeGroup]) -> Vec<String> {
    groups
        .iter()
        .flat_map(|g| (0..g.count).map(move |i| format!("{}-{i}", g.name)))
        .collect()
}

/// A node score of deploy/prometheus/mbcas-scoring-rules.yaml, by the same
/// formula (`mbcas:node_score:<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    WeightedAverage,
    MaxMetric,
    EuclideanDistance,
    PressureFocused,
    WeightedRmsPositiveDeviation,
    WeightedMeanSquarePositiveDeviation,
    LinearWeightedPositiveDeviation,
    CentroidDistance,
    DirectionalCentroidDistance,
    VarianceMinimization,
    DirectionalVarianceMinimization,
    CriticalDimensionFocus,
    IdealPointPositiveDistance,
    LinearAmplifiedIppdK1,
    LinearAmplifiedIppdK3,
    LinearAmplifiedIppdK5,
    CpuFocused,
    MemoryFocused,
    MarketPressure,
}

impl Algorithm {
    pub const ALL: [Self; 19] = [
        Self::WeightedAverage,
        Self::MaxMetric,
        Self::EuclideanDistance,
        Self::PressureFocused,
        Self::WeightedRmsPositiveDeviation,
        Self::WeightedMeanSquarePositiveDeviation,
        Self::LinearWeightedPositiveDeviation,
        Self::CentroidDistance,
        Self::DirectionalCentroidDistance,
        Self::VarianceMinimization,
        Self::DirectionalVarianceMinimization,
        Self::CriticalDimensionFocus,
        Self::IdealPointPositiveDistance,
        Self::LinearAmplifiedIppdK1,
        Self::LinearAmplifiedIppdK3,
        Self::LinearAmplifiedIppdK5,
        Self::CpuFocused,
        Self::MemoryFocused,
        Self::MarketPressure,
    ];

    /// The rule's name (`mbcas:node_score:<name>`).
    pub fn name(self) -> &'static str {
        ALGORITHM_NAMES[Self::ALL.iter().position(|a| *a == self).unwrap_or(0) + 1]
    }

    /// Whether its descheduler policy has absolute thresholds (over-utilised
    /// above 0.10, under-utilised below 0.01) rather than deviation ones:
    /// MBCAS's market pressure, and the scores that are 0 for every node at
    /// or below the cluster's mean (with deviation thresholds no node is ever
    /// under-utilised while fewer than a tenth of the nodes are hot: on the
    /// bench's 1000 nodes with 100 hot, nothing was evicted).
    pub fn absolute_thresholds(self) -> bool {
        matches!(
            self,
            Self::MarketPressure
                | Self::WeightedRmsPositiveDeviation
                | Self::WeightedMeanSquarePositiveDeviation
                | Self::LinearWeightedPositiveDeviation
                | Self::DirectionalCentroidDistance
                | Self::DirectionalVarianceMinimization
                | Self::CriticalDimensionFocus
                | Self::IdealPointPositiveDistance
                | Self::LinearAmplifiedIppdK1
                | Self::LinearAmplifiedIppdK3
                | Self::LinearAmplifiedIppdK5
        )
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// `none` (no descheduler) and the algorithms, in [`Algorithm::ALL`]'s order.
pub const ALGORITHM_NAMES: [&str; 20] = [
    "none",
    "weighted_average",
    "max_metric",
    "euclidean_distance",
    "pressure_focused",
    "weighted_rms_positive_deviation",
    "weighted_mean_square_positive_deviation",
    "linear_weighted_positive_deviation",
    "centroid_distance",
    "directional_centroid_distance",
    "variance_minimization",
    "directional_variance_minimization",
    "critical_dimension_focus",
    "ideal_point_positive_distance",
    "linear_amplified_ippd_k1",
    "linear_amplified_ippd_k3",
    "linear_amplified_ippd_k5",
    "cpu_focused",
    "memory_focused",
    "market_pressure",
];

/// A node's inputs to the scores, each in 0..1 but the market ratio; `cp` is
/// already 0 where the CPU is not above 0.7 in use.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Inputs {
    pub cu: f64,
    pub cp: f64,
    pub mu: f64,
    pub mp: f64,
    pub market: f64,
}

impl Inputs {
    fn dims(&self) -> [f64; 4] {
        [self.cu, self.cp, self.mu, self.mp]
    }
}

/// Every node's score by `alg`, as the recording rules compute it.
pub fn scores(alg: Algorithm, nodes: &[Inputs]) -> Vec<f64> {
    let n = nodes.len().max(1) as f64;
    let mut mean = [0.0; 4];
    for x in nodes {
        for (m, v) in mean.iter_mut().zip(x.dims()) {
            *m += v / n;
        }
    }
    let dev = |x: &Inputs| -> [f64; 4] {
        let d = x.dims();
        [0, 1, 2, 3].map(|i| d[i] - mean[i])
    };
    let pos = |x: &Inputs| dev(x).map(|d| d.max(0.0));
    let norm = |v: [f64; 4]| v.iter().map(|d| d * d).sum::<f64>().sqrt();
    // Over the largest of the nodes (1e-9 at least), as the rules.
    let over_max = |raw: Vec<f64>| -> Vec<f64> {
        let max = raw.iter().copied().fold(f64::MIN, f64::max).max(1e-9);
        raw.into_iter().map(|r| r / max).collect()
    };
    let weighted = |d: [f64; 4], f: fn(f64) -> f64| {
        0.15 * f(d[0]) + 0.35 * f(d[1]) + 0.15 * f(d[2]) + 0.35 * f(d[3])
    };
    let each = |f: &dyn Fn(&Inputs) -> f64| nodes.iter().map(f).collect::<Vec<f64>>();
    match alg {
        Algorithm::WeightedAverage => each(&|x| x.dims().iter().sum::<f64>() / 4.0),
        Algorithm::MaxMetric => each(&|x| x.dims().into_iter().fold(0.0, f64::max)),
        Algorithm::EuclideanDistance => each(&|x| norm(x.dims()) / 2.0),
        Algorithm::PressureFocused => {
            each(&|x| (((x.cp + x.mp) + (x.cu + x.mu) / 2.0) / 3.0).min(1.0))
        }
        Algorithm::WeightedRmsPositiveDeviation => each(&|x| weighted(pos(x), |d| d * d).sqrt()),
        Algorithm::WeightedMeanSquarePositiveDeviation => each(&|x| weighted(pos(x), |d| d * d)),
        Algorithm::LinearWeightedPositiveDeviation => each(&|x| weighted(pos(x), |d| d)),
        Algorithm::CentroidDistance => over_max(each(&|x| norm(dev(x)))),
        Algorithm::DirectionalCentroidDistance => over_max(each(&|x| norm(pos(x)))),
        Algorithm::VarianceMinimization => over_max(each(&|x| {
            let d = dev(x);
            (d[0] * d[0] + 2.0 * d[1] * d[1] + d[2] * d[2] + 2.0 * d[3] * d[3]).sqrt()
        })),
        Algorithm::DirectionalVarianceMinimization => over_max(each(&|x| {
            let d = pos(x);
            d[0] + 2.0 * d[1] + d[2] + 2.0 * d[3]
        })),
        Algorithm::CriticalDimensionFocus => {
            let mut mean_pos = [0.0; 4];
            for x in nodes {
                for (m, d) in mean_pos.iter_mut().zip(pos(x)) {
                    *m += d / n;
                }
            }
            // The first of the largest (cu, cp, mu, mp on a tie).
            let k = (0..4).fold(0, |k, i| if mean_pos[i] > mean_pos[k] { i } else { k });
            over_max(each(&|x| pos(x)[k]))
        }
        Algorithm::IdealPointPositiveDistance | Algorithm::LinearAmplifiedIppdK1 => {
            each(&|x| norm(pos(x)).min(1.0))
        }
        Algorithm::LinearAmplifiedIppdK3 => each(&|x| (3.0 * norm(pos(x))).min(1.0)),
        Algorithm::LinearAmplifiedIppdK5 => each(&|x| (5.0 * norm(pos(x))).min(1.0)),
        Algorithm::CpuFocused => each(&|x| 0.7 * x.cu + 0.3 * x.cp),
        Algorithm::MemoryFocused => each(&|x| 0.7 * x.mu + 0.3 * x.mp),
        Algorithm::MarketPressure => each(&|x| (x.market - 1.0).clamp(0.0, 1.0)),
    }
}

/// Which nodes the descheduler takes as over- and under-utilised by `scores`
/// (see the module's description of the thresholds).
fn classify(alg: Algorithm, scores: &[f64]) -> (Vec<bool>, Vec<bool>) {
    let (over, under) = if alg.absolute_thresholds() {
        (0.10, 0.01)
    } else {
        let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
        (mean + 0.10, mean - 0.10)
    };
    (
        scores.iter().map(|s| *s > over).collect(),
        scores.iter().map(|s| *s < under).collect(),
    )
}

/// One algorithm's outcome on a scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterRun {
    pub algorithm: String,
    pub evictions: u32,
    /// Evictions after the hottest node's relief.
    pub evictions_after_relief: u32,
    /// Replacements placed on a node their service had a pod evicted from in
    /// the last [`BACK_WITHIN_S`].
    pub moved_back: u32,
    /// From the first over-committed second until the node hottest then is
    /// over-committed no more; `None`: still over-committed at the end (or
    /// never over-committed: then `onset_s` is `None` too).
    pub relief_s: Option<f64>,
    pub onset_s: Option<f64>,
    pub overcommitted_node_s: f64,
    pub unmet_core_s: f64,
    /// Over-committed nodes in the last second.
    pub hot_nodes_at_end: u32,
}

struct Pod {
    service: usize,
    node: usize,
    ready_at: f64,
}

struct Node {
    name: String,
    cpu_m: f64,
    memory_mi: f64,
    req_m: f64,
    req_mi: f64,
}

/// The descheduler's choice of pod and the noise: one stream per use.
fn uniform(seed: u64, a: u64, b: u64) -> f64 {
    (splitmix(seed ^ splitmix(a ^ splitmix(b))) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `s` with the descheduler evicting by `alg` (`None`: no descheduler).
pub fn run(s: &ClusterScenario, alg: Option<Algorithm>, taint: bool, seed: u64) -> ClusterRun {
    let mut nodes: Vec<Node> = s
        .nodes
        .iter()
        .flat_map(|g| {
            (0..g.count).map(move |i| Node {
                name: format!("{}-{i}", g.name),
                cpu_m: g.cpu_m,
                memory_mi: g.memory_mi,
                req_m: 0.0,
                req_mi: 0.0,
            })
        })
        .collect();
    let mut tainted = vec![false; nodes.len()];
    let mut pods: Vec<Pod> = Vec::new();
    for (si, svc) in s.services.iter().enumerate() {
        for r in 0..svc.replicas as usize {
            let pinned = (!svc.on.is_empty())
                .then(|| {
                    nodes
                        .iter()
                        .position(|n| n.name == svc.on[r % svc.on.len()])
                })
                .flatten();
            let draw = uniform(seed ^ 0x5c4e, si as u64, r as u64);
            let Some(node) = pinned.or_else(|| place(&nodes, &tainted, svc, draw)) else {
                continue; // Pending: fits nowhere.
            };
            nodes[node].req_m += svc.request_m;
            nodes[node].req_mi += svc.memory_mi;
            pods.push(Pod {
                service: si,
                node,
                ready_at: 0.0,
            });
        }
    }
    let steps = s.duration_s.ceil() as u64;
    let mut window = vec![Inputs::default(); nodes.len()];
    let mut window_n = 0u32;
    // Per service: node → when it last lost a pod of it to an eviction.
    let mut evicted_from: Vec<HashMap<usize, f64>> = vec![HashMap::new(); s.services.len()];
    let mut eviction_times = Vec::new();
    let mut out = ClusterRun {
        algorithm: alg.map_or("none", Algorithm::name).to_owned(),
        evictions: 0,
        evictions_after_relief: 0,
        moved_back: 0,
        relief_s: None,
        onset_s: None,
        overcommitted_node_s: 0.0,
        unmet_core_s: 0.0,
        hot_nodes_at_end: 0,
    };
    let mut hottest: Option<usize> = None;
    let mut last_hot_at: Option<f64> = None;
    let mut demand = vec![0.0; nodes.len()];
    let mut ready = vec![0u32; s.services.len()];
    let mut load = vec![0.0; s.services.len()];
    let mut last_market = vec![0.0; nodes.len()];
    for step in 0..steps {
        let t = step as f64;
        ready.iter_mut().for_each(|r| *r = 0);
        for p in pods.iter().filter(|p| p.ready_at <= t) {
            ready[p.service] += 1;
        }
        demand.iter_mut().for_each(|d| *d = 0.0);
        for (si, svc) in s.services.iter().enumerate() {
            load[si] =
                svc.load.at(t) * (1.0 + s.noise * (2.0 * uniform(seed, si as u64, step) - 1.0));
            if ready[si] == 0 {
                out.unmet_core_s += load[si] / 1000.0;
            }
        }
        for p in pods.iter().filter(|p| p.ready_at <= t) {
            demand[p.node] += load[p.service] / f64::from(ready[p.service]);
        }
        let mut hot_now = 0;
        let mut worst: Option<(usize, f64)> = None;
        for (i, node) in nodes.iter().enumerate() {
            let d = demand[i];
            let ratio = d / node.cpu_m;
            let cu = ratio.min(1.0);
            let x = Inputs {
                cu,
                cp: if cu > 0.7 {
                    (ratio - 1.0).clamp(0.0, 1.0)
                } else {
                    0.0
                },
                mu: (node.req_mi / node.memory_mi).min(1.0),
                mp: 0.0,
                market: ratio,
            };
            let w = &mut window[i];
            w.cu += x.cu;
            w.cp += x.cp;
            w.mu += x.mu;
            w.market += x.market;
            last_market[i] = ratio;
            if d > node.cpu_m {
                hot_now += 1;
                out.unmet_core_s += (d - node.cpu_m) / 1000.0;
                if worst.is_none_or(|(_, r)| ratio > r) {
                    worst = Some((i, ratio));
                }
            }
        }
        window_n += 1;
        out.overcommitted_node_s += f64::from(hot_now);
        if out.onset_s.is_none()
            && let Some((i, _)) = worst
        {
            out.onset_s = Some(t);
            hottest = Some(i);
        }
        if let Some(h) = hottest
            && demand[h] > nodes[h].cpu_m
        {
            last_hot_at = Some(t);
        }
        out.hot_nodes_at_end = hot_now;
        let cycle = ((step + 1) as f64 / s.descheduler_interval_s).floor()
            > (step as f64 / s.descheduler_interval_s).floor();
        if !cycle {
            continue;
        }
        let inputs: Vec<Inputs> = window
            .iter()
            .map(|w| {
                let k = f64::from(window_n.max(1));
                Inputs {
                    cu: w.cu / k,
                    cp: w.cp / k,
                    mu: w.mu / k,
                    mp: 0.0,
                    market: w.market / k,
                }
            })
            .collect();
        window.iter_mut().for_each(|w| *w = Inputs::default());
        window_n = 0;
        if taint {
            for (t, m) in tainted.iter_mut().zip(&last_market) {
                *t = *m > 1.0 || (*t && *m > TAINT_CLEARED_BELOW);
            }
        }
        let Some(alg) = alg else { continue };
        let sc = scores(alg, &inputs);
        let (over, under) = classify(alg, &sc);
        if !under.iter().any(|u| *u) {
            continue;
        }
        let mut sources: Vec<usize> = (0..nodes.len()).filter(|i| over[*i]).collect();
        sources.sort_by(|a, b| sc[*b].total_cmp(&sc[*a]).then(a.cmp(b)));
        for src in sources {
            let fits_elsewhere = |p: &Pod| {
                let svc = &s.services[p.service];
                nodes
                    .iter()
                    .enumerate()
                    .any(|(i, n)| i != src && fits(n, svc))
            };
            let candidates: Vec<usize> = (0..pods.len())
                .filter(|k| {
                    pods[*k].node == src && pods[*k].ready_at <= t && fits_elsewhere(&pods[*k])
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let pick = (uniform(seed ^ 0xe71c, u64::from(out.evictions), step)
                * candidates.len() as f64) as usize;
            let k = candidates[pick.min(candidates.len() - 1)];
            let svc_i = pods[k].service;
            let svc = &s.services[svc_i];
            nodes[src].req_m -= svc.request_m;
            nodes[src].req_mi -= svc.memory_mi;
            pods.swap_remove(k);
            out.evictions += 1;
            eviction_times.push(t);
            let draw = uniform(seed ^ 0x5c4e, u64::from(out.evictions), step);
            let Some(to) = place(&nodes, &tainted, svc, draw) else {
                evicted_from[svc_i].insert(src, t);
                continue;
            };
            if evicted_from[svc_i]
                .get(&to)
                .is_some_and(|at| t - at <= BACK_WITHIN_S)
            {
                out.moved_back += 1;
            }
            evicted_from[svc_i].insert(src, t);
            nodes[to].req_m += svc.request_m;
            nodes[to].req_mi += svc.memory_mi;
            pods.push(Pod {
                service: svc_i,
                node: to,
                ready_at: t + 1.0 + s.start_s,
            });
        }
    }
    // Relieved for good: not over-committed in the last second.
    out.relief_s = match (out.onset_s, last_hot_at, hottest) {
        (Some(on), Some(last), Some(h)) if demand[h] <= nodes[h].cpu_m => Some(last + 1.0 - on),
        _ => None,
    };
    if let (Some(on), Some(relief)) = (out.onset_s, out.relief_s) {
        out.evictions_after_relief =
            eviction_times.iter().filter(|t| **t >= on + relief).count() as u32;
    }
    out
}

fn fits(n: &Node, svc: &Service) -> bool {
    n.req_m + svc.request_m <= n.cpu_m + 1e-9 && n.req_mi + svc.memory_mi <= n.memory_mi + 1e-9
}

/// The scheduler: where a new pod of `svc` goes, `None` when it fits
/// nowhere. NodeResourcesFit's LeastAllocated score, an integer 0..100 (the
/// mean free share of CPU and memory by requests after placing it); among the
/// best, one at random as kube-scheduler's `selectHost` does (`draw` in
/// 0..1); a tainted node only when no untainted one fits.
fn place(nodes: &[Node], tainted: &[bool], svc: &Service, draw: f64) -> Option<usize> {
    let score = |n: &Node| {
        let free = ((n.cpu_m - n.req_m - svc.request_m) / n.cpu_m
            + (n.memory_mi - n.req_mi - svc.memory_mi) / n.memory_mi)
            / 2.0;
        (free * 100.0).floor() as i64
    };
    let best = |want_tainted: bool| {
        let fit: Vec<(usize, i64)> = nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                tainted.get(*i).copied().unwrap_or(false) == want_tainted && fits(n, svc)
            })
            .map(|(i, n)| (i, score(n)))
            .collect();
        let top = fit.iter().map(|(_, s)| *s).max()?;
        let best: Vec<usize> = fit
            .into_iter()
            .filter(|(_, s)| *s == top)
            .map(|(i, _)| i)
            .collect();
        best.get(((draw * best.len() as f64) as usize).min(best.len() - 1))
            .copied()
    };
    best(false).or_else(|| best(true))
}

/// Every algorithm asked for (all, and `none`, by default) on `s`.
pub fn run_all(s: &ClusterScenario, names: &[String], taint: bool, seed: u64) -> Vec<ClusterRun> {
    let names: Vec<&str> = if names.is_empty() {
        ALGORITHM_NAMES.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    names
        .into_iter()
        .map(|n| run(s, Algorithm::from_name(n), taint, seed))
        .collect()
}

/// The runs as a Markdown table.
pub fn markdown(runs: &[ClusterRun]) -> String {
    let mut t = String::from(
        "| algorithm | evictions | after relief | moved back | relief of the hottest node s | over-committed node·s | unmet core·s | hot nodes at the end |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let relief = match (r.onset_s, r.relief_s) {
            (None, _) => "no hot spot".to_owned(),
            (Some(_), Some(s)) => format!("{s:.0}"),
            (Some(_), None) => "not relieved".to_owned(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {relief} | {:.0} | {:.1} | {} |",
            r.algorithm,
            r.evictions,
            r.evictions_after_relief,
            r.moved_back,
            r.overcommitted_node_s,
            r.unmet_core_s,
            r.hot_nodes_at_end
        );
    }
    t
}

/// The cluster scenarios of `dir` (`*.json`, in file-name order); none when
/// the directory does not exist.
pub fn load_dir(dir: &Path) -> Result<Vec<ClusterScenario>, ScenarioError> {
    let files = match json_files(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ScenarioError::Read {
                path: dir.display().to_string(),
                source,
            });
        }
    };
    files
        .iter()
        .map(|f| ClusterScenario::from_file(f))
        .collect()
}

/// The cluster part of `docs/evaluation.md`: every scenario under every
/// algorithm, without and with the taint.
pub fn report(scenarios: &[ClusterScenario], seed: u64) -> String {
    let mut t = String::new();
    if scenarios.is_empty() {
        return t;
    }
    let _ = writeln!(
        t,
        "## Across nodes: the descheduler by node score\n\n\
         `mbcas simulate-cluster` on the {} scenarios under `scenarios/cluster/` (seed {seed}): \
         MBCAS on every node (a node's pods get min(demand, capacity)), the scheduler placing \
         replacements by requests (LeastAllocated), and the descheduler's LowNodeUtilization \
         evicting one pod per over-utilised node per cycle by each score of \
         `deploy/prometheus/mbcas-scoring-rules.yaml` with the thresholds of \
         `deploy/descheduler/` (`none`: no descheduler). \"Relief\": from the first \
         over-committed second until the node hottest then is over-committed no more; \
         \"after relief\": evictions after it; \"moved back\": replacements placed on a node \
         their service had a pod evicted from in the last 10 minutes; \
         \"taint\": over-committed nodes carry `PreferNoSchedule`. A model: CPU pressure is \
         the share of demand above capacity, memory pressure is not modelled (see \
         `mbcas-daemon/src/sim/cluster.rs`).\n",
        scenarios.len()
    );
    for s in scenarios {
        let plain = run_all(s, &[], false, seed);
        let taint = run_all(s, &[], true, seed);
        let _ = writeln!(
            t,
            "### {}\n\n{}\n\n| algorithm | evictions (after relief) | moved back | relief s | unmet core·s | \
             taint: evictions (after relief) | moved back | relief s | unmet core·s |\n|---|---|---|---|---|---|---|---|---|",
            s.name, s.description
        );
        let relief = |r: &ClusterRun| match (r.onset_s, r.relief_s) {
            (None, _) => "no hot spot".to_owned(),
            (Some(_), Some(s)) => format!("{s:.0}"),
            (Some(_), None) => "never".to_owned(),
        };
        for (p, q) in plain.iter().zip(&taint) {
            let _ = writeln!(
                t,
                "| {} | {} ({}) | {} | {} | {:.0} | {} ({}) | {} | {} | {:.0} |",
                p.algorithm,
                p.evictions,
                p.evictions_after_relief,
                p.moved_back,
                relief(p),
                p.unmet_core_s,
                q.evictions,
                q.evictions_after_relief,
                q.moved_back,
                relief(q),
                q.unmet_core_s
            );
        }
        let fastest = plain
            .iter()
            .chain(&taint)
            .filter_map(|r| r.relief_s)
            .fold(f64::INFINITY, f64::min);
        let best: Vec<String> = plain
            .iter()
            .map(|r| (r, ""))
            .chain(taint.iter().map(|r| (r, " (taint)")))
            .filter(|(r, _)| r.relief_s == Some(fastest))
            .map(|(r, how)| format!("`{}`{how}", r.algorithm))
            .collect();
        let never: Vec<String> = plain
            .iter()
            .filter(|r| r.onset_s.is_some() && r.relief_s.is_none() && r.algorithm != "none")
            .map(|r| format!("`{}`", r.algorithm))
            .collect();
        if fastest.is_finite() {
            let _ = writeln!(t, "\nFastest relief, {fastest:.0} s: {}.", best.join(", "));
        }
        if !never.is_empty() {
            let _ = writeln!(t, "Never relieved without the taint: {}.", never.join(", "));
        }
        t.push('\n');
    }
    t
}

/// `mbcas simulate-cluster`.
pub fn cmd(args: &SimulateClusterArgs) -> Result<String, ScenarioError> {
    let s = ClusterScenario::from_file(&args.scenario)?;
    let runs = run_all(&s, &args.algorithms, args.taint, args.seed);
    if args.json {
        Ok(serde_json::to_string_pretty(&runs).unwrap_or_default())
    } else {
        Ok(format!(
            "{} ({} nodes, {} s{}):\n\n{}",
            s.name,
            s.nodes.iter().map(|g| g.count).sum::<u32>(),
            s.duration_s,
            if args.taint {
                ", PreferNoSchedule taint on over-committed nodes"
            } else {
                ""
            },
            markdown(&runs)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(path: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    /// The promtool test's three nodes, as its header states them (node-b's
    /// CPU PSI not counted: its CPU is at 0.5).
    const PROMTOOL_NODES: [(&str, Inputs); 3] = [
        (
            "node-a",
            Inputs {
                cu: 0.9,
                cp: 0.3,
                mu: 0.5,
                mp: 0.02,
                market: 1.4,
            },
        ),
        (
            "node-b",
            Inputs {
                cu: 0.5,
                cp: 0.0,
                mu: 0.8,
                mp: 0.1,
                market: 0.6,
            },
        ),
        (
            "node-c",
            Inputs {
                cu: 0.2,
                cp: 0.0,
                mu: 0.3,
                mp: 0.0,
                market: 0.2,
            },
        ),
    ];

    #[test]
    fn every_score_is_the_recording_rule_s_on_the_promtool_test_s_nodes() {
        // The values promtool checks the rules against (CI's lint stage).
        let text = std::fs::read_to_string(repo("deploy/prometheus/mbcas-scoring-rules.test.yaml"))
            .unwrap();
        let (mut alg, mut node) = (None, None);
        let mut checked = HashSet::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("- expr: round(mbcas:node_score:") {
                alg = rest.split(',').next().and_then(Algorithm::from_name);
                assert!(alg.is_some(), "no algorithm for {line}");
            } else if let Some(rest) = line.strip_prefix("- labels: '{instance=\"") {
                node = PROMTOOL_NODES.iter().position(|(n, _)| rest.starts_with(n));
            } else if let (Some(rest), Some(a), Some(n)) = (line.strip_prefix("value: "), alg, node)
            {
                let want: f64 = rest.parse().unwrap();
                let inputs: Vec<Inputs> = PROMTOOL_NODES.iter().map(|(_, x)| *x).collect();
                let got = scores(a, &inputs)[n];
                assert!(
                    (got - want).abs() <= 1e-6,
                    "{} on {}: {got} here, {want} in the rules' test",
                    a.name(),
                    PROMTOOL_NODES[n].0
                );
                checked.insert(a.name());
            }
        }
        for a in Algorithm::ALL {
            assert!(
                checked.contains(a.name()),
                "{} not in the promtool test",
                a.name()
            );
        }
    }

    #[test]
    fn algorithm_names_are_the_rules() {
        let rules =
            std::fs::read_to_string(repo("deploy/prometheus/mbcas-scoring-rules.yaml")).unwrap();
        for a in Algorithm::ALL {
            assert!(
                rules.contains(&format!("record: mbcas:node_score:{}\n", a.name())),
                "{}",
                a.name()
            );
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
        }
        assert_eq!(Algorithm::from_name("none"), None);
    }

    #[test]
    fn the_thresholds_modelled_are_the_descheduler_policies() {
        for a in Algorithm::ALL {
            let file = repo(&format!(
                "deploy/descheduler/{}.yaml",
                a.name().replace('_', "-")
            ));
            let policy = std::fs::read_to_string(&file).unwrap();
            assert_eq!(
                policy.contains("useDeviationThresholds: true"),
                !a.absolute_thresholds(),
                "{}",
                file.display()
            );
            let under = if a.absolute_thresholds() { 1 } else { 10 };
            assert!(
                policy.contains(&format!(
                    "thresholds:\n            MetricResource: {under}\n"
                )),
                "{}",
                file.display()
            );
            assert!(policy.contains("targetThresholds:\n            MetricResource: 10\n"));
        }
    }

    fn scenario(name: &str) -> ClusterScenario {
        ClusterScenario::from_file(&repo(&format!("scenarios/cluster/{name}.json"))).unwrap()
    }

    #[test]
    fn without_a_descheduler_the_hot_spot_stays_and_with_one_it_is_relieved() {
        let s = scenario("hot-service");
        let none = run(&s, None, false, 1);
        assert_eq!(none.evictions, 0);
        assert_eq!(none.onset_s, Some(300.0), "{none:?}");
        assert_eq!(none.relief_s, None, "{none:?}");
        assert_eq!(none.hot_nodes_at_end, 2, "{none:?}");
        let cpu = run(&s, Some(Algorithm::CpuFocused), false, 1);
        assert!(cpu.evictions > 0, "{cpu:?}");
        assert!(cpu.relief_s.is_some(), "{cpu:?}");
        assert!(
            cpu.unmet_core_s < none.unmet_core_s / 2.0,
            "{cpu:?} vs {none:?}"
        );
        // Memory alone does not see the CPU hot spot.
        let mem = run(&s, Some(Algorithm::MemoryFocused), false, 1);
        assert_eq!(mem.relief_s, None, "{mem:?}");
        // Deterministic for a seed.
        assert_eq!(run(&s, Some(Algorithm::CpuFocused), false, 1), cpu);
    }

    #[test]
    fn the_taint_keeps_replacements_off_the_hot_nodes() {
        let s = scenario("understated-requests");
        let plain = run(&s, Some(Algorithm::CpuFocused), false, 1);
        let taint = run(&s, Some(Algorithm::CpuFocused), true, 1);
        // The hot nodes look the emptiest by requests: replacements go back
        // to them and the hot spot stays.
        assert!(plain.moved_back > 0, "{plain:?}");
        assert_eq!(plain.relief_s, None, "{plain:?}");
        assert!(
            taint.moved_back < plain.moved_back,
            "{taint:?} vs {plain:?}"
        );
        assert!(taint.relief_s.is_some(), "{taint:?}");
        assert!(
            taint.unmet_core_s < plain.unmet_core_s / 2.0,
            "{taint:?} vs {plain:?}"
        );
    }

    #[test]
    fn the_scheduler_places_by_requests_and_avoids_tainted_nodes() {
        let node = |req_m| Node {
            name: String::new(),
            cpu_m: 4000.0,
            memory_mi: 1000.0,
            req_m,
            req_mi: 0.0,
        };
        let nodes = [node(3000.0), node(1000.0), node(2000.0)];
        let svc = Service {
            name: "s".into(),
            replicas: 1,
            request_m: 500.0,
            memory_mi: 0.0,
            load: Demand::Steady { m: 0.0 },
            on: vec![],
        };
        assert_eq!(place(&nodes, &[false; 3], &svc, 0.5), Some(1));
        assert_eq!(place(&nodes, &[false, true, false], &svc, 0.5), Some(2));
        assert_eq!(place(&nodes, &[true; 3], &svc, 0.5), Some(1));
        // A tie: either, by the draw.
        let tie = [node(1000.0), node(3000.0), node(1000.0)];
        assert_eq!(place(&tie, &[false; 3], &svc, 0.1), Some(0));
        assert_eq!(place(&tie, &[false; 3], &svc, 0.9), Some(2));
        let big = Service {
            request_m: 3500.0,
            ..svc
        };
        assert_eq!(place(&nodes, &[false; 3], &big, 0.5), None);
    }

    #[test]
    fn deviation_thresholds_are_around_the_mean_and_market_pressure_s_absolute() {
        let (over, under) = classify(Algorithm::CpuFocused, &[0.9, 0.6, 0.6, 0.6]);
        assert_eq!(
            (over, under),
            (vec![true, false, false, false], vec![false; 4])
        );
        let (over, under) = classify(Algorithm::CpuFocused, &[0.9, 0.5, 0.1]);
        assert_eq!(
            (over, under),
            (vec![true, false, false], vec![false, false, true])
        );
        let (over, under) = classify(Algorithm::MarketPressure, &[0.2, 0.05, 0.0]);
        assert_eq!(
            (over, under),
            (vec![true, false, false], vec![false, false, true])
        );
    }

    #[test]
    fn a_bad_scenario_names_its_field() {
        let bad = r#"{"name": "x", "duration_s": 60, "nodes": [{"name": "n", "count": 1, "cpu_m": 1000, "memory_mi": 1000}],
            "services": [{"name": "s", "replicas": 1, "request_m": 100, "memory_mi": 0, "load": {"kind": "steady", "m": 1}, "on": ["m-0"]}]}"#;
        let e = ClusterScenario::parse(bad, "bad.json")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "bad.json: field `services[0].on`: no node m-0");
        let e = ClusterScenario::parse(r#"{"name": "x"}"#, "b.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("duration_s"), "{e}");
    }
}
