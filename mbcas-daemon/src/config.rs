//! The decision parameters of `mbcas run`: flags, defaults, validation.
//!
//! [`DecisionArgs`] is flattened into `mbcas run` (both modes). Every flag has
//! an `MBCAS_<FLAG>` environment fallback (e.g. `--alpha-up` ↔ `MBCAS_ALPHA_UP`)
//! and the default documented in `--help`. [`DecisionArgs::validate`] checks
//! ranges and relations between flags and yields a [`DecisionConfig`] holding
//! the core's own config types; a [`ConfigError`] names the flag, the value and
//! what was expected, and the process exits with [`crate::error::EXIT_USAGE`] (64).
//!
//! Value syntax:
//! * durations: `1s`, `200ms`, `1.5s`, `4m`, `1h` (a bare number is seconds);
//! * CPU amounts: Kubernetes quantities, `100m` (millicores) or `0.5` / `2` (cores);
//! * fractions: `10%` or `0.1`.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use clap::Args;

use crate::{
    demand::{DemandConfig, DemandError},
    policy::{PolicyConfig, PolicyError},
    units::MilliCpu,
};

/// Smallest CPU limit the kernel can enforce meaningfully: a 1 ms quota per
/// 100 ms CFS period.
pub const MIN_ENFORCEABLE: MilliCpu = MilliCpu(10);

/// Decision loop, market, stability and demand parameters of `mbcas run`.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct DecisionArgs {
    // ── Decision loop ───────────────────────────────────────────────────────
    /// Period of the decision loop when no throttle event wakes it.
    #[arg(long, env = "MBCAS_TICK", value_name = "DURATION", default_value = "1s",
          value_parser = parse_duration, help_heading = "Decision loop")]
    pub tick: Duration,
    /// How long the loop waits after a throttle event for more events before deciding.
    #[arg(long, env = "MBCAS_DEBOUNCE", value_name = "DURATION", default_value = "200ms",
          value_parser = parse_duration, help_heading = "Decision loop")]
    pub debounce: Duration,

    // ── Market ──────────────────────────────────────────────────────────────
    /// Smallest CPU limit MBCAS ever writes (each pod's floor is max(request, this)).
    #[arg(long, env = "MBCAS_MIN_LIMIT", value_name = "CPU", default_value = "100m",
          value_parser = parse_cpu, help_heading = "Market")]
    pub min_limit: MilliCpu,
    /// How far limits may add up beyond the node's capacity (ρ): limits are
    /// ceilings, the kernel's cpu.weight shares the CPU under contention. Each pod
    /// keeps at least its weighted share of the node; idle CPU is lent on top, up
    /// to ρ × capacity in all. 1 = a strict partition (Σ limits ≤ capacity).
    #[arg(
        long,
        env = "MBCAS_OVERCOMMIT",
        value_name = "FACTOR",
        default_value = "3",
        help_heading = "Market",
        allow_hyphen_values = true
    )]
    pub overcommit: f64,
    /// Share of the node's CPU held back from what is lent while the node is busy
    /// (a soft reserve: it never lowers a pod's weighted share).
    #[arg(long, env = "MBCAS_NODE_RESERVE", value_name = "FRACTION", default_value = "10%",
          value_parser = parse_fraction, help_heading = "Market",
          allow_hyphen_values = true)]
    pub node_reserve: f64,
    /// Per-pod cap as a multiple of the pod's original CPU limit; 0 = capped by the
    /// market capacity only.
    #[arg(
        long,
        env = "MBCAS_CAP_FACTOR",
        value_name = "FACTOR",
        default_value = "0",
        help_heading = "Market",
        allow_hyphen_values = true
    )]
    pub cap_factor: f64,

    // ── Stability ───────────────────────────────────────────────────────────
    /// Relative change below which a limit is left as it is.
    #[arg(long, env = "MBCAS_HYSTERESIS", value_name = "FRACTION", default_value = "10%",
          value_parser = parse_fraction, help_heading = "Stability",
          allow_hyphen_values = true)]
    pub hysteresis: f64,
    /// Largest factor one increase may apply (> 1).
    #[arg(
        long,
        env = "MBCAS_MAX_STEP_UP",
        value_name = "FACTOR",
        default_value = "1.5",
        help_heading = "Stability",
        allow_hyphen_values = true
    )]
    pub max_step_up: f64,
    /// Smallest factor one decrease may apply, in (0, 1).
    #[arg(
        long,
        env = "MBCAS_MAX_STEP_DOWN",
        value_name = "FACTOR",
        default_value = "0.5",
        help_heading = "Stability",
        allow_hyphen_values = true
    )]
    pub max_step_down: f64,
    /// Time after a pod's last change before its limit may decrease.
    #[arg(long, env = "MBCAS_COOLDOWN", value_name = "DURATION", default_value = "30s",
          value_parser = parse_duration, help_heading = "Stability")]
    pub cooldown: Duration,
    /// Upper bound of a pod's cooldown, which doubles after each rollback.
    #[arg(long, env = "MBCAS_MAX_COOLDOWN", value_name = "DURATION", default_value = "4m",
          value_parser = parse_duration, help_heading = "Stability")]
    pub max_cooldown: Duration,
    /// Samples during which a new pod's limit is not lowered below its original.
    #[arg(
        long,
        env = "MBCAS_WARMUP_SAMPLES",
        value_name = "N",
        default_value = "5",
        help_heading = "Stability",
        allow_hyphen_values = true
    )]
    pub warmup_samples: u32,
    /// Share of throttled CFS periods above which a pod counts as throttled.
    #[arg(long, env = "MBCAS_THROTTLED_THRESHOLD", value_name = "FRACTION", default_value = "5%",
          value_parser = parse_fraction, help_heading = "Stability",
          allow_hyphen_values = true)]
    pub throttled_threshold: f64,

    // ── Demand model ────────────────────────────────────────────────────────
    /// Smoothing factor when demand rises, in (0, 1], per window of one
    /// --tick (shorter windows weigh less).
    #[arg(
        long,
        env = "MBCAS_ALPHA_UP",
        value_name = "ALPHA",
        default_value = "0.3",
        help_heading = "Demand model",
        allow_hyphen_values = true
    )]
    pub alpha_up: f64,
    /// Smoothing factor when demand falls, in (0, 1], per window of one
    /// --tick (shorter windows weigh less).
    #[arg(
        long,
        env = "MBCAS_ALPHA_DOWN",
        value_name = "ALPHA",
        default_value = "0.1",
        help_heading = "Demand model",
        allow_hyphen_values = true
    )]
    pub alpha_down: f64,
    /// Smallest headroom above the smoothed demand, as a share of it (the
    /// headroom is also at least twice the demand's deviation, what it used
    /// lately above it, and 10m).
    #[arg(long, env = "MBCAS_HEADROOM", value_name = "FRACTION", default_value = "5%",
          value_parser = parse_fraction, help_heading = "Demand model",
          allow_hyphen_values = true)]
    pub headroom: f64,

    // ── Scope and endpoints ─────────────────────────────────────────────────
    /// Namespaces whose pods are never resized (comma-separated); the daemon's
    /// own namespace is always added.
    #[arg(
        long,
        env = "MBCAS_EXCLUDED_NAMESPACES",
        value_name = "NS,…",
        value_delimiter = ',',
        default_value = "kube-system",
        help_heading = "Scope"
    )]
    pub excluded_namespaces: Vec<String>,
    /// The namespace the daemon runs in (set from the downward API in the DaemonSet).
    #[arg(
        long,
        env = "MBCAS_DAEMON_NAMESPACE",
        value_name = "NS",
        default_value = "mbcas-system",
        help_heading = "Scope"
    )]
    pub daemon_namespace: String,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(
        long,
        env = "MBCAS_METRICS_ADDR",
        value_name = "ADDR",
        default_value = "0.0.0.0:9090",
        help_heading = "Scope"
    )]
    pub metrics_addr: SocketAddr,
}

/// Market parameters the daemon applies around [`crate::market::clear`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarketConfig {
    /// Over-commit factor ρ ≥ 1 (see [`crate::market`]).
    pub overcommit: f64,
    /// Floor for every pod's limit (a pod's floor is max(request, this)).
    pub min_limit: MilliCpu,
    /// Fraction of the capacity held back from what is lent, in [0, 1) (see
    /// [`crate::policy::lendable_idle`]).
    pub node_reserve: f64,
    /// Cap as a multiple of the original limit; `None` = market capacity only.
    pub cap_factor: Option<f64>,
}

impl MarketConfig {
    /// A pod's cap: `cap_factor × original`, never above `capacity` nor below `floor`.
    pub fn cap(&self, original: MilliCpu, floor: MilliCpu, capacity: MilliCpu) -> MilliCpu {
        let cap = match self.cap_factor {
            Some(f) => MilliCpu(((original.get() as f64) * f).floor() as u64).min(capacity),
            None => capacity,
        };
        cap.max(floor)
    }
}

/// The validated configuration the decision loop runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionConfig {
    pub tick: Duration,
    pub debounce: Duration,
    pub market: MarketConfig,
    pub policy: PolicyConfig,
    pub demand: DemandConfig,
    /// Always contains `daemon_namespace`.
    pub excluded_namespaces: BTreeSet<String>,
    pub daemon_namespace: String,
    pub metrics_addr: SocketAddr,
}

impl DecisionConfig {
    pub fn is_excluded_namespace(&self, ns: &str) -> bool {
        self.excluded_namespaces.contains(ns)
    }

    /// What the engine needs of it.
    pub fn engine(&self) -> crate::engine::EngineConfig {
        crate::engine::EngineConfig {
            demand: self.demand,
            policy: self.policy,
            overcommit: self.market.overcommit,
            reserve: self.market.node_reserve,
            lever: crate::market::Lever::Quota,
        }
    }

    /// How the decision loop paces its rounds.
    pub fn pacing(&self) -> crate::decision::Pacing {
        crate::decision::Pacing {
            tick: self.tick,
            debounce: self.debounce,
            throttled_threshold: self.policy.throttled_threshold,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid value for --{flag}: {value} (must be {expected})")]
    Invalid {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid demand-model configuration")]
    Demand(#[source] DemandError),
    #[error("invalid stability-policy configuration")]
    Policy(#[source] PolicyError),
}

impl ConfigError {
    /// The process exit code for a configuration error (sysexits EX_USAGE).
    pub const fn exit_code(&self) -> u8 {
        crate::error::EXIT_USAGE
    }
}

fn invalid(flag: &'static str, value: impl ToString, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_string(),
        expected,
    }
}

fn in_open_closed_unit(v: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= 1.0
}

/// A DNS-1123 label, what Kubernetes accepts as a namespace name.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl DecisionArgs {
    /// Checks every flag and returns the typed configuration.
    pub fn validate(&self) -> Result<DecisionConfig, ConfigError> {
        if self.tick < Duration::from_millis(10) || self.tick > Duration::from_secs(3600) {
            return Err(invalid(
                "tick",
                fmt_duration(self.tick),
                "between 10ms and 1h",
            ));
        }
        if self.debounce > self.tick {
            return Err(invalid(
                "debounce",
                fmt_duration(self.debounce),
                "at most --tick",
            ));
        }
        if self.min_limit < MIN_ENFORCEABLE {
            return Err(invalid(
                "min-limit",
                self.min_limit,
                "at least 10m (a 1 ms quota per 100 ms period)",
            ));
        }
        if !(self.overcommit.is_finite() && (1.0..=100.0).contains(&self.overcommit)) {
            return Err(invalid("overcommit", self.overcommit, "in [1, 100]"));
        }
        if !(0.0..1.0).contains(&self.node_reserve) {
            return Err(invalid("node-reserve", self.node_reserve, "in [0, 1)"));
        }
        if !(self.cap_factor == 0.0 || (self.cap_factor.is_finite() && self.cap_factor >= 1.0)) {
            return Err(invalid("cap-factor", self.cap_factor, "0 (off) or ≥ 1"));
        }
        if !(0.0..1.0).contains(&self.hysteresis) {
            return Err(invalid("hysteresis", self.hysteresis, "in [0, 1)"));
        }
        if !(self.max_step_up.is_finite() && self.max_step_up > 1.0) {
            return Err(invalid(
                "max-step-up",
                self.max_step_up,
                "a finite number > 1",
            ));
        }
        if !(self.max_step_down > 0.0 && self.max_step_down < 1.0) {
            return Err(invalid("max-step-down", self.max_step_down, "in (0, 1)"));
        }
        if self.max_cooldown < self.cooldown {
            return Err(invalid(
                "max-cooldown",
                fmt_duration(self.max_cooldown),
                "at least --cooldown",
            ));
        }
        if !(0.0..=1.0).contains(&self.throttled_threshold) {
            return Err(invalid(
                "throttled-threshold",
                self.throttled_threshold,
                "in [0, 1]",
            ));
        }
        if !in_open_closed_unit(self.alpha_up) {
            return Err(invalid("alpha-up", self.alpha_up, "in (0, 1]"));
        }
        if !in_open_closed_unit(self.alpha_down) {
            return Err(invalid("alpha-down", self.alpha_down, "in (0, 1]"));
        }
        if !(self.headroom.is_finite() && (0.0..=10.0).contains(&self.headroom)) {
            return Err(invalid("headroom", self.headroom, "in [0, 1000%]"));
        }
        if let Some(ns) = self.excluded_namespaces.iter().find(|ns| !is_dns_label(ns)) {
            return Err(invalid(
                "excluded-namespaces",
                format!("{ns:?}"),
                "a comma-separated list of namespace names (DNS-1123 labels)",
            ));
        }
        if !is_dns_label(&self.daemon_namespace) {
            return Err(invalid(
                "daemon-namespace",
                format!("{:?}", self.daemon_namespace),
                "a namespace name (DNS-1123 label)",
            ));
        }

        let demand = DemandConfig {
            alpha_up: self.alpha_up,
            alpha_down: self.alpha_down,
            headroom: self.headroom,
            window_s: self.tick.as_secs_f64(),
        };
        demand.validate().map_err(ConfigError::Demand)?;
        let policy = PolicyConfig {
            hysteresis: self.hysteresis,
            max_step_up: self.max_step_up,
            max_step_down: self.max_step_down,
            cooldown: self.cooldown,
            max_cooldown: self.max_cooldown,
            warmup_samples: self.warmup_samples,
            throttled_threshold: self.throttled_threshold,
        };
        policy.validate().map_err(ConfigError::Policy)?;
        let mut excluded: BTreeSet<String> = self.excluded_namespaces.iter().cloned().collect();
        excluded.insert(self.daemon_namespace.clone());
        Ok(DecisionConfig {
            tick: self.tick,
            debounce: self.debounce,
            market: MarketConfig {
                overcommit: self.overcommit,
                min_limit: self.min_limit,
                node_reserve: self.node_reserve,
                cap_factor: (self.cap_factor > 0.0).then_some(self.cap_factor),
            },
            policy,
            demand,
            excluded_namespaces: excluded,
            daemon_namespace: self.daemon_namespace.clone(),
            metrics_addr: self.metrics_addr,
        })
    }
}

fn fmt_duration(d: Duration) -> String {
    format!("{d:?}")
}

/// Parses `200ms`, `1s`, `1.5s`, `4m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 200ms, 1s, 4m)"))?;
    let secs = v * scale;
    if !((0.0..=30.0 * 86_400.0).contains(&secs)) {
        return Err(format!("{s:?}: must be between 0 and 30 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a CPU quantity as Kubernetes writes it: `100m` (millicores) or
/// `0.5` / `2` (cores); see [`mbcas_common::quantity::millicores`].
pub fn parse_cpu(s: &str) -> Result<MilliCpu, String> {
    let m = mbcas_common::quantity::millicores(s)
        .ok_or_else(|| format!("{s:?} is not a CPU amount (e.g. 100m or 0.5)"))?;
    if m > 1_000_000_000 {
        return Err(format!("{s:?}: must be between 0 and 1000000 cores"));
    }
    Ok(MilliCpu(m))
}

/// Parses a fraction: `10%` or `0.1`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a fraction (e.g. 10% or 0.1)"))?;
    if !v.is_finite() {
        return Err(format!("{s:?} is not a finite number"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
