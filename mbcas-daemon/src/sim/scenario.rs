//! Scenario files: nodes, pods and their demand over time (JSON).
//!
//! ```json
//! {"name": "steady-mix", "duration_s": 600,
//!  "decision_interval_s": 1, "actuation_delay_s": 1,
//!  "nodes": [{"name": "node", "count": 1, "capacity_m": 4000, "reserve": 0.1,
//!    "pods": [{"name": "web", "count": 2, "request_m": 250, "limit_m": 500,
//!              "demand": {"kind": "steady", "m": 400}, "noise": 0.1}]}]}
//! ```
//! Demand kinds: `steady {m}`, `step {from_m, to_m, at_s}`,
//! `square {on_m, off_m, on_s, off_s, phase_s?}`, `diurnal {mean_m, amplitude_m, period_s}`,
//! `start {m, at_s, spike_m?, spike_s?, stop_s?}` (idle until `at_s`, then `spike_m` for
//! `spike_s` seconds if given, then `m`, idle again from `stop_s`: pod churn),
//! `steps {points: [[t_s, m], …]}` (piecewise constant: `m` from `t_s` on, times
//! increasing; the first point's `m` before it). `noise` (0–1) multiplies demand by a
//! seeded random factor in [1 − noise, 1 + noise], redrawn every second.
//! `limit_m` absent means no limit; `weight` defaults to the request.
//! `requests {rate_per_s, cpu_ms, threads, burst_every_s?, burst_n?}` adds a
//! request load served inside CFS periods, whose latency is measured (see
//! [`super::requests`]); `excluded: true` marks a pod MBCAS must not manage
//! (Guaranteed, kube-system, opted out): the `mbcas` policy leaves its limit and
//! counts its weight and limit as the daemon does.
//!
//! A node may also run `services`: a Deployment whose replicas share one load
//! evenly (a load balancer in front), scaled horizontally by the `hpa` policies:
//! ```json
//! "services": [{"name": "shop", "load": {"kind": "step", "from_m": 1200, "to_m": 3000, "at_s": 120},
//!   "replicas": {"min": 2, "max": 8}, "request_m": 500, "limit_m": 1000,
//!   "startup_s": 20, "target_utilization_pct": 70, "noise": 0.05}]
//! ```
//! `load` is the service's whole CPU demand (any demand kind); each ready
//! replica gets `load / ready replicas`. The service starts with `min` replicas;
//! only a horizontal policy changes their number. A new replica needs room for
//! its request on the node (else it stays Pending) and serves after
//! `startup_s` (default 20). `target_utilization_pct` (default 70) is the HPA's
//! CPU target, relative to requests.
//! Errors name the field path and the line.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub duration_s: f64,
    #[serde(default = "one")]
    pub decision_interval_s: f64,
    #[serde(default = "one")]
    pub actuation_delay_s: f64,
    pub nodes: Vec<NodeSpec>,
}

fn one() -> f64 {
    1.0
}

fn one_u() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default = "one_u")]
    pub count: u32,
    pub capacity_m: u64,
    #[serde(default)]
    pub reserve: f64,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// A Deployment whose replicas share one load (see the module documentation).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// The whole service's CPU demand, millicores.
    pub load: Demand,
    pub replicas: Replicas,
    pub request_m: u64,
    #[serde(default)]
    pub limit_m: Option<u64>,
    /// Seconds from a replica's creation on the node to its serving.
    #[serde(default = "twenty")]
    pub startup_s: f64,
    /// The HPA's target CPU utilization, percent of the request.
    #[serde(default = "seventy")]
    pub target_utilization_pct: f64,
    #[serde(default)]
    pub noise: f64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    pub min: u32,
    pub max: u32,
}

fn twenty() -> f64 {
    20.0
}

fn seventy() -> f64 {
    70.0
}

/// The most replicas a service may state.
pub const MAX_REPLICAS: u32 = 1000;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "one_u")]
    pub count: u32,
    pub request_m: u64,
    #[serde(default)]
    pub limit_m: Option<u64>,
    #[serde(default)]
    pub weight: Option<f64>,
    pub demand: Demand,
    #[serde(default)]
    pub noise: f64,
    #[serde(default)]
    pub requests: Option<super::requests::RequestSpec>,
    #[serde(default)]
    pub excluded: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Demand {
    Steady {
        m: f64,
    },
    Step {
        from_m: f64,
        to_m: f64,
        at_s: f64,
    },
    Square {
        on_m: f64,
        off_m: f64,
        on_s: f64,
        off_s: f64,
        #[serde(default)]
        phase_s: f64,
    },
    Diurnal {
        mean_m: f64,
        amplitude_m: f64,
        period_s: f64,
    },
    Start {
        m: f64,
        at_s: f64,
        /// Start-up burst: demand `spike_m` for the first `spike_s` seconds.
        #[serde(default)]
        spike_m: Option<f64>,
        #[serde(default)]
        spike_s: f64,
        /// Idle again from this time on (the pod stopped).
        #[serde(default)]
        stop_s: Option<f64>,
    },
    Steps {
        points: Vec<(f64, f64)>,
    },
}

/// The largest CPU amount a scenario may state, in millicores (a million
/// cores): beyond it the simulated nanosecond counters would overflow.
pub const MAX_MILLICORES: f64 = 1e9;
/// The longest scenario, in seconds (30 days).
pub const MAX_DURATION_S: f64 = 30.0 * 86_400.0;

impl Demand {
    /// Amounts finite, ≥ 0 and at most [`MAX_MILLICORES`]; times finite and ≥ 0.
    pub(super) fn validate(&self) -> Result<(), &'static str> {
        let (amounts, times): (Vec<f64>, Vec<f64>) = match self {
            Self::Steady { m } => (vec![*m], vec![]),
            Self::Step { from_m, to_m, at_s } => (vec![*from_m, *to_m], vec![*at_s]),
            Self::Square {
                on_m,
                off_m,
                on_s,
                off_s,
                phase_s,
            } => (vec![*on_m, *off_m], vec![*on_s, *off_s, *phase_s]),
            Self::Diurnal {
                mean_m,
                amplitude_m,
                period_s,
            } => (vec![*mean_m, amplitude_m.abs()], vec![*period_s]),
            Self::Start {
                m,
                at_s,
                spike_m,
                spike_s,
                stop_s,
            } => (
                vec![*m, spike_m.unwrap_or(0.0)],
                vec![*at_s, *spike_s, stop_s.unwrap_or(0.0)],
            ),
            Self::Steps { points } => {
                if points.is_empty() || points.len() > 10_000 {
                    return Err("steps needs 1 to 10000 points");
                }
                if points.windows(2).any(|w| w[1].0 <= w[0].0) {
                    return Err("step times must increase");
                }
                points.iter().copied().unzip()
            }
        };
        if !amounts
            .iter()
            .all(|v| v.is_finite() && (0.0..=MAX_MILLICORES).contains(v))
        {
            return Err("amounts must be between 0 and 1e9 millicores");
        }
        if !times.iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err("times must be finite and ≥ 0");
        }
        Ok(())
    }

    /// Demand in millicores at time `t` (seconds), before noise.
    pub fn at(&self, t: f64) -> f64 {
        if let Self::Steps { points } = self {
            let i = points.partition_point(|&(at, _)| at <= t);
            return points.get(i.saturating_sub(1)).map_or(0.0, |p| p.1);
        }
        match *self {
            Self::Steps { .. } => 0.0,
            Self::Steady { m } => m,
            Self::Step { from_m, to_m, at_s } => {
                if t < at_s {
                    from_m
                } else {
                    to_m
                }
            }
            Self::Square {
                on_m,
                off_m,
                on_s,
                off_s,
                phase_s,
            } => {
                let cycle = (on_s + off_s).max(1e-9);
                if (t + phase_s).rem_euclid(cycle) < on_s {
                    on_m
                } else {
                    off_m
                }
            }
            Self::Diurnal {
                mean_m,
                amplitude_m,
                period_s,
            } => (mean_m
                + amplitude_m * (2.0 * std::f64::consts::PI * t / period_s.max(1e-9)).sin())
            .max(0.0),
            Self::Start {
                m,
                at_s,
                spike_m,
                spike_s,
                stop_s,
            } => {
                if t < at_s || stop_s.is_some_and(|s| t >= s) {
                    0.0
                } else if let Some(sp) = spike_m
                    && t < at_s + spike_s
                {
                    sp
                } else {
                    m
                }
            }
        }
    }

    /// A time after `t` before which the demand does not change (it may change
    /// then); `f64::INFINITY` when it never changes again, `t` itself when it
    /// changes continuously.
    pub fn next_change(&self, t: f64) -> f64 {
        if let Self::Steps { points } = self {
            let i = points.partition_point(|&(at, _)| at <= t);
            return points.get(i).map_or(f64::INFINITY, |p| p.0);
        }
        match *self {
            Self::Steps { .. } => f64::INFINITY,
            Self::Steady { .. } => f64::INFINITY,
            Self::Step { at_s, .. } => {
                if t < at_s {
                    at_s
                } else {
                    f64::INFINITY
                }
            }
            Self::Start {
                at_s,
                spike_m,
                spike_s,
                stop_s,
                ..
            } => {
                if t < at_s {
                    at_s
                } else if spike_m.is_some() && t < at_s + spike_s {
                    at_s + spike_s
                } else if let Some(s) = stop_s
                    && t < s
                {
                    s
                } else {
                    f64::INFINITY
                }
            }
            Self::Square {
                on_m,
                off_m,
                on_s,
                off_s,
                phase_s,
            } => {
                if on_m == off_m {
                    return f64::INFINITY;
                }
                let cycle = (on_s + off_s).max(1e-9);
                let pos = (t + phase_s).rem_euclid(cycle);
                if pos < on_s {
                    t + (on_s - pos)
                } else {
                    t + (cycle - pos)
                }
            }
            Self::Diurnal { amplitude_m, .. } => {
                if amplitude_m == 0.0 {
                    f64::INFINITY
                } else {
                    t
                }
            }
        }
    }

    /// Times at which the demand steps (for time-to-adapt).
    pub fn steps(&self, duration_s: f64) -> Vec<f64> {
        if let Self::Steps { points } = self {
            return points
                .iter()
                .map(|p| p.0)
                .filter(|&t| t > 0.0 && t < duration_s)
                .collect();
        }
        match *self {
            Self::Step { at_s, .. } if at_s < duration_s => vec![at_s],
            Self::Start {
                at_s,
                spike_m,
                spike_s,
                stop_s,
                ..
            } => [Some(at_s), spike_m.map(|_| at_s + spike_s), stop_s]
                .into_iter()
                .flatten()
                .filter(|&t| t < duration_s)
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}, column {column}: field `{field}`: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// The `*.json` files of `dir`, in name order.
pub(super) fn json_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

/// JSON text as `T`; an error names the field, line and column (`origin`
/// names the text).
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ScenarioError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        ScenarioError::Parse {
            path: origin.to_owned(),
            line: inner.line(),
            column: inner.column(),
            field,
            message: inner
                .to_string()
                .split(" at line")
                .next()
                .unwrap_or_default()
                .to_owned(),
        }
    })
}

impl Scenario {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Self = parse_json(text, origin)?;
        s.validate(origin)?;
        Ok(s)
    }

    fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let bad = |field: String, message: &str| {
            Err(ScenarioError::Invalid {
                path: origin.to_owned(),
                field,
                message: message.to_owned(),
            })
        };
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return bad("duration_s".into(), "must be > 0");
        }
        if self.duration_s > MAX_DURATION_S {
            return bad("duration_s".into(), "must be at most 30 days");
        }
        if !(self.decision_interval_s >= 0.1 && self.decision_interval_s.is_finite()) {
            return bad("decision_interval_s".into(), "must be ≥ 0.1");
        }
        if !(self.actuation_delay_s >= 0.0 && self.actuation_delay_s.is_finite()) {
            return bad("actuation_delay_s".into(), "must be ≥ 0");
        }
        if self.nodes.is_empty() {
            return bad("nodes".into(), "must list at least one node");
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.capacity_m == 0 || n.capacity_m as f64 > MAX_MILLICORES {
                return bad(
                    format!("nodes[{i}].capacity_m"),
                    "must be > 0 and at most 1e9 (a million cores)",
                );
            }
            if !(0.0..1.0).contains(&n.reserve) {
                return bad(format!("nodes[{i}].reserve"), "must be in [0, 1)");
            }
            for (j, p) in n.pods.iter().enumerate() {
                let f = |k: &str| format!("nodes[{i}].pods[{j}].{k}");
                if p.limit_m.is_some_and(|l| l < p.request_m) {
                    return bad(f("limit_m"), "must be ≥ request_m");
                }
                if p.request_m as f64 > MAX_MILLICORES
                    || p.limit_m.is_some_and(|l| l as f64 > MAX_MILLICORES)
                {
                    return bad(f("request_m"), "request and limit must be at most 1e9");
                }
                if let Err(e) = p.demand.validate() {
                    return bad(f("demand"), e);
                }
                if p.weight.is_some_and(|w| !(w.is_finite() && w > 0.0)) {
                    return bad(f("weight"), "must be > 0");
                }
                if p.request_m == 0 && p.weight.is_none() {
                    return bad(f("request_m"), "must be > 0 (or give a weight)");
                }
                if !(0.0..=1.0).contains(&p.noise) {
                    return bad(f("noise"), "must be in [0, 1]");
                }
                if let Some(r) = &p.requests
                    && let Err(e) = r.validate()
                {
                    return bad(f("requests"), e);
                }
            }
            for (j, v) in n.services.iter().enumerate() {
                let f = |k: &str| format!("nodes[{i}].services[{j}].{k}");
                if v.request_m == 0 || v.request_m as f64 > MAX_MILLICORES {
                    return bad(
                        f("request_m"),
                        "must be > 0 (the HPA's utilization is relative to it) and at most 1e9",
                    );
                }
                if v.limit_m
                    .is_some_and(|l| l < v.request_m || l as f64 > MAX_MILLICORES)
                {
                    return bad(f("limit_m"), "must be ≥ request_m and at most 1e9");
                }
                if let Err(e) = v.load.validate() {
                    return bad(f("load"), e);
                }
                if v.replicas.min == 0 || v.replicas.max < v.replicas.min {
                    return bad(f("replicas"), "need 1 ≤ min ≤ max");
                }
                if v.replicas.max > MAX_REPLICAS {
                    return bad(f("replicas.max"), "must be at most 1000");
                }
                if !(v.startup_s.is_finite() && (0.0..=3600.0).contains(&v.startup_s)) {
                    return bad(f("startup_s"), "must be in [0, 3600]");
                }
                if !(v.target_utilization_pct.is_finite()
                    && v.target_utilization_pct > 0.0
                    && v.target_utilization_pct <= 1000.0)
                {
                    return bad(f("target_utilization_pct"), "must be in (0, 1000]");
                }
                if !(0.0..=1.0).contains(&v.noise) {
                    return bad(f("noise"), "must be in [0, 1]");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"name": "t", "duration_s": 10,
      "nodes": [{"name": "n", "capacity_m": 1000,
        "pods": [{"name": "p", "request_m": 100, "limit_m": 200, "demand": {"kind": "step", "from_m": 100, "to_m": 900, "at_s": 5}}]}]}"#;

    #[test]
    /// Found by `cargo xtask fuzz` (scenario): a node of 1e15 millicores made
    /// the simulated nanosecond counters overflow.
    fn huge_amounts_are_refused() {
        let huge_node = OK.replace("\"capacity_m\": 1000", "\"capacity_m\": 1000000000000000");
        let e = Scenario::parse(&huge_node, "x").unwrap_err().to_string();
        assert!(e.contains("capacity_m"), "{e}");
        let huge_demand = OK.replace("\"to_m\": 900", "\"to_m\": 1e300");
        let e = Scenario::parse(&huge_demand, "x").unwrap_err().to_string();
        assert!(e.contains("demand"), "{e}");
        let nan = OK.replace("\"at_s\": 5", "\"at_s\": -5");
        assert!(Scenario::parse(&nan, "x").is_err());
    }

    #[test]
    fn parses_and_evaluates_demand() {
        let s = Scenario::parse(OK, "ok.json").unwrap();
        let d = &s.nodes[0].pods[0].demand;
        assert_eq!((d.at(1.0), d.at(6.0)), (100.0, 900.0));
        assert_eq!(d.steps(10.0), vec![5.0]);
        let sq = Demand::Square {
            on_m: 1000.0,
            off_m: 0.0,
            on_s: 1.0,
            off_s: 2.0,
            phase_s: 0.0,
        };
        assert_eq!((sq.at(0.5), sq.at(1.5), sq.at(3.2)), (1000.0, 0.0, 1000.0));
        assert_eq!((sq.next_change(0.5), sq.next_change(1.5)), (1.0, 3.0));
        assert_eq!(d.next_change(1.0), 5.0);
        assert_eq!(d.next_change(6.0), f64::INFINITY);
    }

    #[test]
    fn errors_name_field_and_line() {
        let bad = OK.replace("\"request_m\": 100", "\"request_m\": \"lots\"");
        let e = Scenario::parse(&bad, "bad.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("nodes[0].pods[0].request_m") && e.contains("line 3"),
            "{e}"
        );
        let unknown = OK.replace("\"capacity_m\"", "\"capacity\"");
        let e = Scenario::parse(&unknown, "u.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("capacity") && e.contains("line 2"), "{e}");
        let kind = OK.replace("\"step\"", "\"sawtooth\"");
        let e = Scenario::parse(&kind, "k.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("demand"), "{e}");
        let lim = OK.replace("\"limit_m\": 200", "\"limit_m\": 50");
        let e = Scenario::parse(&lim, "l.json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("nodes[0].pods[0].limit_m"), "{e}");
    }
}
