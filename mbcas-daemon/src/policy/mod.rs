//! Stability rules between the market's proposal and actuation (pure).
//!
//! The market says what each pod *should* get now; the policy decides what is
//! *written*, so that limits change rarely, by bounded steps, and never in a way
//! that hurts a pod that is being throttled. For each pod, in order:
//!
//! 1. **Exclusion.** Guaranteed pods (their QoS class may not change), opted-out
//!    pods (`mbcas.io/ignore=true`), excluded namespaces and pods without a CPU
//!    limit are never changed.
//! 2. **Rollback.** If the pod's limit was *decreased* and the pod is throttled
//!    again within the cooldown, the previous limit is restored at once and that
//!    pod's cooldown doubles (up to `max_cooldown`). A decrease that survives its
//!    cooldown resets the pod's cooldown to the base value.
//! 3. **Hysteresis.** No change under `hysteresis` (10 %) relative to the current
//!    limit — except to lift a limit below the pod's floor.
//! 4. **Increases** go through at once for a throttled pod; for a pod that is not
//!    throttled (surplus being spread) they wait out the cooldown after a decrease.
//!    One change raises a limit by at most ×`max_step_up` (1.5).
//! 5. **Decreases** never happen while the pod is throttled (unless the market
//!    gives it less than it needs: its fair share under contention), within the cooldown
//!    (default 30 s) after the pod's last change, or during warm-up (the first
//!    `warmup_samples` = 5 samples) below the limit the pod started with. One change
//!    lowers a limit by at most ×`max_step_down` (0.5).
//! 6. **Capacity.** Step limits can keep a pod above its market share for a while;
//!    increases are therefore granted only from capacity not held by the other
//!    pods' new limits, scaled down together when they do not all fit.
//!
//! Step-limited targets are rounded to 10 m. Every decision carries a [`Reason`],
//! whose `as_str()` code is what logs, metrics and the PodAllocation status show.
//! Time is injected (`now` is any monotonic time since a fixed origin), so the
//! daemon, local mode and the simulator run the same rules.
//!
//! Also here: [`node_capacity`], the capacity the market may hand out (allocatable
//! minus the node reserve minus the limits of excluded pods).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{KeyMap, KeySet, MilliCpu, PodKey};

const QUANTUM: u64 = crate::market::QUANTUM;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// Relative change below which nothing is written, in [0, 1).
    pub hysteresis: f64,
    /// Largest factor one increase may apply, ≥ 1.
    pub max_step_up: f64,
    /// Smallest factor one decrease may apply, in (0, 1].
    pub max_step_down: f64,
    /// Minimum time after a change before a decrease (and after a decrease before
    /// a non-throttled increase).
    pub cooldown: Duration,
    /// Cap for the cooldown doubled by rollbacks.
    pub max_cooldown: Duration,
    /// Samples during which a new pod's limit is not decreased below its original.
    pub warmup_samples: u32,
    /// Fraction of throttled periods in the last window above which a pod counts
    /// as throttled.
    pub throttled_threshold: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            hysteresis: 0.10,
            max_step_up: 1.5,
            max_step_down: 0.5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(240),
            warmup_samples: 5,
            throttled_threshold: 0.05,
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field: &'static str, value: f64, expected: &'static str| {
            Err(PolicyError::InvalidConfig {
                field,
                value,
                expected,
            })
        };
        if !(0.0..1.0).contains(&self.hysteresis) {
            return bad("hysteresis", self.hysteresis, "in [0, 1)");
        }
        if !(self.max_step_up.is_finite() && self.max_step_up >= 1.0) {
            return bad("max_step_up", self.max_step_up, "a finite number ≥ 1");
        }
        if !(self.max_step_down > 0.0 && self.max_step_down <= 1.0) {
            return bad("max_step_down", self.max_step_down, "in (0, 1]");
        }
        if self.max_cooldown < self.cooldown {
            return bad(
                "max_cooldown",
                self.max_cooldown.as_secs_f64(),
                "≥ cooldown",
            );
        }
        if !(0.0..=1.0).contains(&self.throttled_threshold) {
            return bad("throttled_threshold", self.throttled_threshold, "in [0, 1]");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error("stability policy: {field} = {value} must be {expected}")]
    InvalidConfig {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exclusion {
    Guaranteed,
    OptedOut,
    Namespace,
    NoLimit,
    /// A container's CPU `resizePolicy` is `RestartContainer`: a resize would restart it.
    RestartPolicy,
}

/// Why a decision came out as it did. `as_str()` gives the stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Unchanged,
    Hysteresis,
    Increase,
    IncreaseThrottled,
    MaxStepUp,
    Decrease,
    MaxStepDown,
    Cooldown,
    WarmUp,
    ThrottledHold,
    Rollback,
    CapacityLimited,
    BelowFloor,
    ExcludedGuaranteed,
    ExcludedOptedOut,
    ExcludedNamespace,
    ExcludedNoLimit,
    ExcludedRestartPolicy,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Self::Unchanged,
        Self::Hysteresis,
        Self::Increase,
        Self::IncreaseThrottled,
        Self::MaxStepUp,
        Self::Decrease,
        Self::MaxStepDown,
        Self::Cooldown,
        Self::WarmUp,
        Self::ThrottledHold,
        Self::Rollback,
        Self::CapacityLimited,
        Self::BelowFloor,
        Self::ExcludedGuaranteed,
        Self::ExcludedOptedOut,
        Self::ExcludedNamespace,
        Self::ExcludedNoLimit,
        Self::ExcludedRestartPolicy,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::Hysteresis => "hysteresis",
            Self::Increase => "increase",
            Self::IncreaseThrottled => "increase_throttled",
            Self::MaxStepUp => "max_step_up",
            Self::Decrease => "decrease",
            Self::MaxStepDown => "max_step_down",
            Self::Cooldown => "cooldown",
            Self::WarmUp => "warm_up",
            Self::ThrottledHold => "throttled_hold",
            Self::Rollback => "rollback",
            Self::CapacityLimited => "capacity_limited",
            Self::BelowFloor => "below_floor",
            Self::ExcludedGuaranteed => "excluded_guaranteed",
            Self::ExcludedOptedOut => "excluded_opted_out",
            Self::ExcludedNamespace => "excluded_namespace",
            Self::ExcludedNoLimit => "excluded_no_limit",
            Self::ExcludedRestartPolicy => "excluded_restart_policy",
        }
    }

    fn of(e: Exclusion) -> Self {
        match e {
            Exclusion::Guaranteed => Self::ExcludedGuaranteed,
            Exclusion::OptedOut => Self::ExcludedOptedOut,
            Exclusion::Namespace => Self::ExcludedNamespace,
            Exclusion::NoLimit => Self::ExcludedNoLimit,
            Exclusion::RestartPolicy => Self::ExcludedRestartPolicy,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the policy needs to know about one pod this round.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub key: PodKey,
    /// The limit in effect now.
    pub current: MilliCpu,
    /// The limit the pod had when MBCAS first saw it.
    pub original: MilliCpu,
    /// Never go below this (request, minimum limit).
    pub floor: MilliCpu,
    /// The market's allocation.
    pub proposed: MilliCpu,
    /// What the pod's demand model says it needs (the market's input).
    pub need: MilliCpu,
    /// Fraction of CFS periods throttled in the last window.
    pub throttled_ratio: f64,
    /// Demand samples seen for this pod.
    pub samples: u32,
    pub exclusion: Option<Exclusion>,
}

/// The outcome for one pod: `to == from` means nothing is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub key: PodKey,
    pub from: MilliCpu,
    pub to: MilliCpu,
    pub reason: Reason,
}

impl Decision {
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

#[derive(Clone, Debug, PartialEq)]
struct PodState {
    last_change: Option<Duration>,
    /// When the last decrease happened and the limit it replaced.
    last_decrease: Option<(Duration, MilliCpu)>,
    cooldown: Duration,
}

/// Per-pod memory of the stability rules.
#[derive(Clone, Debug)]
pub struct Policy {
    cfg: PolicyConfig,
    pods: KeyMap<PodState>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Self {
        Self {
            cfg,
            pods: KeyMap::default(),
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    /// Forgets pods not in `live` (pods that went away).
    pub fn retain<'a>(&mut self, live: impl IntoIterator<Item = &'a PodKey>) {
        let live: KeySet = live.into_iter().collect();
        self.pods.retain(|k, _| live.contains(k));
    }

    /// The current cooldown of a pod (doubled by rollbacks).
    pub fn cooldown_of(&self, key: &PodKey) -> Duration {
        self.pods.get(key).map_or(self.cfg.cooldown, |s| s.cooldown)
    }

    /// Decides every pod's limit for this round and records the changes as made.
    /// Decisions come back in the order of `views`.
    pub fn decide(
        &mut self,
        now: Duration,
        capacity: MilliCpu,
        views: &[PodView],
    ) -> Vec<Decision> {
        let mut out: Vec<Decision> = views.iter().map(|v| self.decide_one(now, v)).collect();
        self.fit_increases(capacity, views, &mut out);
        for (v, d) in views.iter().zip(&out) {
            if !d.changed() {
                continue;
            }
            let base = self.cfg.cooldown;
            let st = self.pods.entry(v.key.clone()).or_insert_with(|| PodState {
                last_change: None,
                last_decrease: None,
                cooldown: base,
            });
            st.last_change = Some(now);
            if d.to < d.from {
                st.last_decrease = Some((now, d.from));
            } else if d.reason != Reason::Rollback {
                st.last_decrease = None;
            }
        }
        out
    }

    fn decide_one(&mut self, now: Duration, v: &PodView) -> Decision {
        let keep = |reason| Decision {
            key: v.key.clone(),
            from: v.current,
            to: v.current,
            reason,
        };
        let go = |to, reason| Decision {
            key: v.key.clone(),
            from: v.current,
            to,
            reason,
        };
        if let Some(e) = v.exclusion {
            return keep(Reason::of(e));
        }
        let cfg = self.cfg;
        let throttled = v.throttled_ratio > cfg.throttled_threshold;
        let st = self.pods.entry(v.key.clone()).or_insert_with(|| PodState {
            last_change: None,
            last_decrease: None,
            cooldown: cfg.cooldown,
        });

        if let Some((at, previous)) = st.last_decrease {
            let since = now.saturating_sub(at);
            if since < st.cooldown {
                if throttled && previous > v.current {
                    st.cooldown = (st.cooldown * 2).min(cfg.max_cooldown);
                    st.last_decrease = None;
                    return go(previous, Reason::Rollback);
                }
            } else {
                // The decrease held for a whole cooldown: it was right.
                st.last_decrease = None;
                st.cooldown = cfg.cooldown;
            }
        }
        let in_cooldown_after_change = st
            .last_change
            .is_some_and(|t| now.saturating_sub(t) < st.cooldown);
        let in_cooldown_after_decrease = st.last_decrease.is_some();

        if v.current < v.floor {
            return go(v.proposed.max(v.floor), Reason::BelowFloor);
        }
        let (cur, prop) = (v.current.0 as f64, v.proposed.0 as f64);
        if v.proposed == v.current {
            return keep(Reason::Unchanged);
        }
        if (prop - cur).abs() < cfg.hysteresis * cur {
            return keep(Reason::Hysteresis);
        }
        if v.proposed > v.current {
            if !throttled && in_cooldown_after_decrease {
                return keep(Reason::Cooldown);
            }
            let step = round_down(cur * cfg.max_step_up).max(v.current.0 + QUANTUM);
            let reason = if throttled {
                Reason::IncreaseThrottled
            } else {
                Reason::Increase
            };
            return if v.proposed.0 > step {
                go(MilliCpu(step), Reason::MaxStepUp)
            } else {
                go(v.proposed, reason)
            };
        }
        // A decrease. A throttled pod is not decreased on account of its own
        // demand estimate (it is wrong while the pod is held back); it is when the
        // market gives it less than it needs (its fair share under contention).
        if throttled && v.proposed >= v.need {
            return keep(Reason::ThrottledHold);
        }
        if in_cooldown_after_change {
            return keep(Reason::Cooldown);
        }
        let mut target = v.proposed;
        let mut reason = Reason::Decrease;
        if v.samples < cfg.warmup_samples && target < v.original {
            target = v.original;
            reason = Reason::WarmUp;
            if target >= v.current {
                return keep(Reason::WarmUp);
            }
        }
        let step = MilliCpu(round_up(cur * cfg.max_step_down)).max(v.floor);
        if target < step {
            target = step;
            reason = Reason::MaxStepDown;
        }
        if target >= v.current {
            return keep(reason);
        }
        go(target, reason)
    }

    /// Scales increases down so that the new limits fit the capacity.
    fn fit_increases(&self, capacity: MilliCpu, views: &[PodView], out: &mut [Decision]) {
        let held: u64 = out.iter().filter(|d| d.to <= d.from).map(|d| d.to.0).sum();
        let wanted: u64 = out
            .iter()
            .filter(|d| d.to > d.from)
            .map(|d| d.to.0 - d.from.0)
            .sum();
        let base: u64 = out.iter().filter(|d| d.to > d.from).map(|d| d.from.0).sum();
        let free = capacity.0.saturating_sub(held + base);
        if wanted <= free {
            return;
        }
        let scale = free as f64 / wanted as f64;
        for (d, v) in out.iter_mut().zip(views) {
            if d.to > d.from {
                let inc = round_down((d.to.0 - d.from.0) as f64 * scale);
                let to = MilliCpu(d.from.0 + inc);
                // Lifting a pod to its floor is never scaled away.
                d.to = if d.reason == Reason::BelowFloor {
                    to.max(v.floor)
                } else {
                    to
                };
                d.reason = Reason::CapacityLimited;
            }
        }
    }
}

fn round_down(x: f64) -> u64 {
    ((x / QUANTUM as f64).floor().max(0.0) as u64) * QUANTUM
}

fn round_up(x: f64) -> u64 {
    ((x / QUANTUM as f64).ceil().max(0.0) as u64) * QUANTUM
}

/// The capacity the market may hand out: allocatable CPU minus the node reserve
/// (a fraction of allocatable, default 10 %) minus the limits of pods MBCAS does
/// not manage (they may use up to their limits).
pub fn node_capacity(
    allocatable: MilliCpu,
    reserve_fraction: f64,
    excluded_limits: MilliCpu,
) -> MilliCpu {
    let reserve = (allocatable.0 as f64 * reserve_fraction.clamp(0.0, 1.0)).ceil() as u64;
    allocatable
        .saturating_sub(MilliCpu(reserve))
        .saturating_sub(excluded_limits)
}

#[cfg(test)]
mod tests;
