//! The demand model: from a window of kernel counters to a need in millicores (pure).
//!
//! ## Model
//!
//! Over a window of length `T` the kernel reports the CPU time a consumer used
//! (`usage`), how many CFS periods elapsed and how many of them ended throttled
//! (`nr_periods`, `nr_throttled`), and the time its run queues spent throttled
//! (`throttled`). `throttled` is summed over the group's per-CPU run queues: a
//! run queue is throttled only while it has runnable work the quota cut off, so
//! `throttled` measures runnable-but-not-running time caused by the limit.
//!
//! 1. **Raw demand** `d = (usage + throttled + wait) / T` (in cores, reported in
//!    millicores): what the consumer would have used had it neither been
//!    throttled nor queued. `wait` is the run-queue wait of its threads (runnable,
//!    not running, not throttled: a throttled group's threads are off the run
//!    queue), summed over threads like usage; a pod queued behind a neighbour's
//!    threads is measured at what it wanted, not at what the kernel gave it.
//!    Without throttling or waiting this is plain usage; with them it is an
//!    *upper* estimate of the unconstrained demand: a held-back thread might have
//!    slept for part of the time. Raising the limit (or capping the neighbour)
//!    then *discovers* the true demand: usage rises, throttling and waiting fall,
//!    and the estimate falls to it. Where the kernel gives pressure (cgroup v2
//!    `cpu.pressure` `some`) and the window was throttled, the larger of
//!    `throttled` and the pressure stall time is used, since each bounds the
//!    held-back runnable time from below. A wait counter that went backwards
//!    (threads that exited took their wait with them) counts as no wait.
//!    The wait says who contends *now*: the market's contention rule compares
//!    the last window's `d` ([`DemandEstimate::raw`]). What the consumer's own
//!    limit should follow is `d' = (usage + throttled) / T`, the demand
//!    without the wait: a limit caps what the consumer's threads run, not how
//!    long they queue behind a neighbour's, so raising the limit of a pod that
//!    is not throttled buys it nothing, and a wait that comes and goes with the
//!    node's load (a component restarting, a neighbour's burst) would move its
//!    limit up and down. Steps 2–5 smooth `d'`; under contention the pod's
//!    share of what is wanted (waiting included) is a floor of its ceiling.
//! 2. **Smoothing**, fast up and slow down: `e ← e + α·(d' − e)` with
//!    `α = α_up` (default 0.3) when `d' > e`, else `α_down` (default 0.1), for a
//!    window of the reference length `W` (the decision tick, default 1 s). A window
//!    of another length `T` weighs by its length: `α_T = 1 − (1 − α)^(T/W)`, so
//!    the loop waking early on a throttle onset (a short window) moves the
//!    estimate less, and slicing time into more windows does not bias it. A load
//!    step up reaches 90 % of its new level in ln(0.1)/ln(0.7) ≈ 6.5 windows; a
//!    step down takes ≈ 22 windows: decreases are slow and reversible.
//!    **Start:** until one reference window has been seen, `e` is the
//!    time-weighted mean of `d'` so far. (A first window that is short,
//!    e.g. the early wake-up on a new consumer's first throttling, would otherwise
//!    set `e` from a fraction of a second, and the slow decrease would take
//!    ~20 s to forget it.)
//! 3. **Variability**: `σ ← σ + α·(|d' − e| − σ)` (the same length-weighted
//!    factors, `α_up` when the deviation grows), an exponentially weighted mean
//!    absolute deviation of `d'` around the estimate.
//! 4. **Peak** `p ← max(d', e + (p − e)·2^(−T/60 s))`: the highest `d'` of
//!    the last minutes, decaying towards the estimate with a half-life of 60 s.
//!    A pod that bursts every few seconds keeps a ceiling above its bursts
//!    instead of a limit that follows each burst up and each lull down. A
//!    throttled window enters with its usage, not its `d'`: that is the upper
//!    estimate of step 1, which the raise it causes corrects within a few
//!    windows, while a peak floored at the estimate it inflated kept it for
//!    minutes (on the real node a burner's limit, raised on that reading, was
//!    raised again with lent idle CPU 3 minutes later, and a two-container pod
//!    kept a lent limit for 144 s). The peak may then sit below the estimate;
//!    only its part above adds headroom.
//! 5. **Need** `n = e + h` with headroom `h = max(2σ, p − e, headroom·e, 10 m)`
//!    (default headroom 5 %), rounded up to the market's quantum (10 m): a limit
//!    at `n` leaves room for the noise around `e` without throttling. The market
//!    lends idle CPU on top, so the headroom only has to cover what one decision
//!    interval can bring.
//! 6. **Throttling raises the need** ([`ThrottleMemory`]): a consumer throttled in
//!    more than a target share of its periods (Autothrottle's signal) was held
//!    back inside periods even when its mean use is under the limit (bursts
//!    shorter than the window); its need is then at least
//!    `limit · (1 + 2 · throttled ratio)`, on top of the throttled time already in
//!    `d`, and the level is remembered (half-life 30 min). The ratio is judged
//!    over at least 10 periods (short windows added up): one throttled period
//!    in a 200 ms wake-up window is not a ratio of 0.5.
//!
//! Windows of zero length, or counters that went backwards (a cgroup recreated
//! under the same id, a counter reset), are rejected by [`Sample::new`] and leave
//! the estimate unchanged.
//!
//! Multi-container pods: the pod's need is the sum of its containers' needs
//! ([`pod_need`]); the pod's allocation goes back to containers with
//! [`crate::market::split_to_containers`].

use serde::{Deserialize, Serialize};

use crate::units::MilliCpu;

const NS_PER_S: f64 = 1e9;

/// Parameters of the demand model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DemandConfig {
    /// Smoothing factor when demand rises, in (0, 1].
    pub alpha_up: f64,
    /// Smoothing factor when demand falls, in (0, 1].
    pub alpha_down: f64,
    /// Smallest headroom above the smoothed demand, as a fraction of it, ≥ 0
    /// (the headroom is also at least twice the demand's deviation, the recent
    /// peak above it, and 10 m).
    pub headroom: f64,
    /// The window length, in seconds, to which `alpha_up` and `alpha_down` apply
    /// (the decision tick); windows of other lengths are weighted by length.
    #[serde(default = "default_window_s")]
    pub window_s: f64,
}

fn default_window_s() -> f64 {
    1.0
}

impl Default for DemandConfig {
    fn default() -> Self {
        Self {
            alpha_up: 0.3,
            alpha_down: 0.1,
            headroom: 0.05,
            window_s: default_window_s(),
        }
    }
}

impl DemandConfig {
    pub fn validate(&self) -> Result<(), DemandError> {
        for (name, v) in [("alpha_up", self.alpha_up), ("alpha_down", self.alpha_down)] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(DemandError::InvalidConfig {
                    field: name,
                    value: v,
                    expected: "in (0, 1]",
                });
            }
        }
        if !(self.headroom.is_finite() && self.headroom >= 0.0) {
            return Err(DemandError::InvalidConfig {
                field: "headroom",
                value: self.headroom,
                expected: "a finite number ≥ 0",
            });
        }
        if !(self.window_s.is_finite() && self.window_s > 0.0) {
            return Err(DemandError::InvalidConfig {
                field: "window_s",
                value: self.window_s,
                expected: "a finite number of seconds > 0",
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DemandError {
    #[error("demand model: {field} = {value} must be {expected}")]
    InvalidConfig {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
    #[error("sample window is empty")]
    EmptyWindow,
    #[error("{counter} went backwards ({before} → {after}): counters were reset")]
    CounterReset {
        counter: &'static str,
        before: u64,
        after: u64,
    },
}

/// Cumulative counters of one consumer at one instant, as the kernel reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Monotonic time of the reading, in nanoseconds from any fixed origin.
    pub at_ns: u64,
    pub usage_ns: u64,
    pub throttled_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    /// Total `some` stall time from `cpu.pressure`, when the kernel gives it.
    pub psi_some_ns: Option<u64>,
    /// Run-queue wait of the consumer's threads (ns of thread-time), when the
    /// sensor measures it.
    #[serde(default)]
    pub wait_ns: Option<u64>,
}

/// Counter deltas over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub window_ns: u64,
    pub usage_ns: u64,
    pub throttled_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub psi_some_ns: Option<u64>,
    #[serde(default)]
    pub wait_ns: Option<u64>,
}

impl Sample {
    /// The deltas between two readings of the same consumer.
    pub fn new(before: &Counters, after: &Counters) -> Result<Self, DemandError> {
        fn delta(counter: &'static str, before: u64, after: u64) -> Result<u64, DemandError> {
            after.checked_sub(before).ok_or(DemandError::CounterReset {
                counter,
                before,
                after,
            })
        }
        let window_ns = delta("time", before.at_ns, after.at_ns)?;
        if window_ns == 0 {
            return Err(DemandError::EmptyWindow);
        }
        let psi_some_ns = match (before.psi_some_ns, after.psi_some_ns) {
            (Some(b), Some(a)) => Some(delta("cpu.pressure some", b, a)?),
            _ => None,
        };
        Ok(Self {
            window_ns,
            usage_ns: delta("usage", before.usage_ns, after.usage_ns)?,
            throttled_ns: delta("throttled_time", before.throttled_ns, after.throttled_ns)?,
            nr_periods: delta("nr_periods", before.nr_periods, after.nr_periods)?,
            nr_throttled: delta("nr_throttled", before.nr_throttled, after.nr_throttled)?,
            psi_some_ns,
            wait_ns: match (before.wait_ns, after.wait_ns) {
                (Some(b), Some(a)) => Some(a.saturating_sub(b)),
                _ => None,
            },
        })
    }

    /// Fraction of CFS periods in the window that ended throttled (0 without periods).
    pub fn throttled_ratio(&self) -> f64 {
        if self.nr_periods == 0 {
            0.0
        } else {
            self.nr_throttled as f64 / self.nr_periods as f64
        }
    }

    /// CPU used over the window, in millicores.
    pub fn usage_millicores(&self) -> f64 {
        self.usage_ns as f64 / self.window_ns as f64 * 1000.0
    }

    /// Raw unconstrained demand over the window, in millicores (step 1 of the model).
    pub fn raw_demand_millicores(&self) -> f64 {
        let mut held_back = self.throttled_ns;
        if self.nr_throttled > 0
            && let Some(psi) = self.psi_some_ns
        {
            held_back = held_back.max(psi);
        }
        (self
            .usage_ns
            .saturating_add(held_back)
            .saturating_add(self.wait_ns.unwrap_or(0))) as f64
            / self.window_ns as f64
            * 1000.0
    }

    /// What the consumer's own limit held back plus what it used, in
    /// millicores: the raw demand without the run-queue wait. This is what
    /// the smoothed demand and the need follow (see the module's step 2).
    pub fn limited_demand_millicores(&self) -> f64 {
        self.raw_demand_millicores() - self.wait_millicores()
    }

    /// Run-queue wait over the window, in millicores (0 when not measured).
    pub fn wait_millicores(&self) -> f64 {
        self.wait_ns.unwrap_or(0) as f64 / self.window_ns as f64 * 1000.0
    }

    pub fn window_secs(&self) -> f64 {
        self.window_ns as f64 / NS_PER_S
    }
}

/// What the model concluded from the samples so far.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DemandEstimate {
    /// Raw demand of the last window, waiting included, in millicores: what
    /// the market's contention rule compares.
    pub raw: f64,
    /// Smoothed demand without the waiting, in millicores.
    pub smoothed: f64,
    /// Mean absolute deviation of that demand around the estimate, millicores.
    pub deviation: f64,
    /// Highest recent demand without the waiting, decaying towards the
    /// estimate, millicores.
    pub peak: f64,
    /// Smoothed demand plus headroom: what the pod should get.
    pub need: MilliCpu,
    /// Usage of the last window, in millicores.
    pub usage: f64,
    /// Run-queue wait of the last window, in millicores (thread-time).
    #[serde(default)]
    pub wait: f64,
    /// Length of the last window, seconds.
    #[serde(default)]
    pub window_s: f64,
    pub throttled_ratio: f64,
    /// Samples folded in so far.
    pub samples: u32,
}

/// Per-consumer state of the demand model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandEstimator {
    smoothed: Option<f64>,
    deviation: f64,
    peak: f64,
    samples: u32,
    /// While less than one reference window was seen: Σ raw·T and Σ T (seconds).
    start: Option<(f64, f64)>,
}

impl DemandEstimator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one window in and returns the new estimate.
    pub fn update(&mut self, sample: &Sample, cfg: &DemandConfig) -> DemandEstimate {
        let wanted = sample.raw_demand_millicores();
        let raw = sample.limited_demand_millicores();
        let t = sample.window_secs();
        let smoothed = match (self.smoothed, self.start) {
            (Some(e), None) => {
                let dev = (raw - e).abs();
                let alpha = if dev > self.deviation {
                    cfg.alpha_up
                } else {
                    cfg.alpha_down
                };
                self.deviation += weighted_alpha(alpha, t / cfg.window_s) * (dev - self.deviation);
                let alpha = if raw > e {
                    cfg.alpha_up
                } else {
                    cfg.alpha_down
                };
                e + weighted_alpha(alpha, t / cfg.window_s) * (raw - e)
            }
            // The start: the time-weighted mean until one reference window is seen.
            (_, start) => {
                let (sum, seen) = start.unwrap_or((0.0, 0.0));
                let (sum, seen) = (sum + raw * t, seen + t);
                self.start = (seen < cfg.window_s).then_some((sum, seen));
                sum / seen
            }
        };
        self.smoothed = Some(smoothed);
        self.samples = self.samples.saturating_add(1);
        let decay = half_life_decay(t, PEAK_HALF_LIFE_S);
        // A throttled window's demand is an upper estimate (held-back time
        // counted as if all of it would have run): the peak takes what was
        // seen running, and may then sit below the estimate, which that
        // window raised (only a peak above it adds headroom).
        let seen = if sample.nr_throttled > 0 {
            sample.usage_millicores()
        } else {
            raw
        };
        self.peak = seen.max(smoothed + (self.peak - smoothed) * decay);
        DemandEstimate {
            raw: wanted,
            smoothed,
            deviation: self.deviation,
            peak: self.peak,
            need: need_of(smoothed, self.deviation, self.peak, cfg),
            usage: sample.usage_millicores(),
            wait: sample.wait_millicores(),
            window_s: t,
            throttled_ratio: sample.throttled_ratio(),
            samples: self.samples,
        }
    }

    /// The current smoothed demand, if any sample was seen.
    pub fn smoothed(&self) -> Option<f64> {
        self.smoothed
    }

    pub fn samples(&self) -> u32 {
        self.samples
    }
}

/// The smoothing factor for a window of `windows` reference windows.
fn weighted_alpha(alpha: f64, windows: f64) -> f64 {
    // Windows of one tick are the common case (and the only one in the
    // simulator): no `powf` for them.
    let whole_tick = (windows - 1.0).abs() < 1e-6;
    if whole_tick || !(windows.is_finite() && windows > 0.0) {
        alpha
    } else {
        1.0 - (1.0 - alpha).powf(windows)
    }
}

/// The smallest headroom, millicores.
pub const MIN_HEADROOM_M: f64 = 10.0;

/// How many deviations of headroom a need carries.
const HEADROOM_DEVIATIONS: f64 = 2.0;

/// Half-life of the peak's decay towards the estimate, seconds.
const PEAK_HALF_LIFE_S: f64 = 60.0;

/// `2^(−t / half_life)`, 1 for a window that is not a finite positive length.
/// One-second windows are the common case (the default tick, every window of
/// the simulator's default scenarios): their factors are computed once.
fn half_life_decay(t: f64, half_life: f64) -> f64 {
    use std::sync::OnceLock;
    static ONE_SECOND: OnceLock<[f64; 2]> = OnceLock::new();
    if !(t.is_finite() && t > 0.0) {
        return 1.0;
    }
    if (t - 1.0).abs() < 1e-12 {
        let [peak, throttle] = *ONE_SECOND.get_or_init(|| {
            [
                (-1.0 / PEAK_HALF_LIFE_S).exp2(),
                (-1.0 / THROTTLE_HALF_LIFE_S).exp2(),
            ]
        });
        if half_life == PEAK_HALF_LIFE_S {
            return peak;
        }
        if half_life == THROTTLE_HALF_LIFE_S {
            return throttle;
        }
    }
    (-t / half_life).exp2()
}

fn need_of(smoothed: f64, deviation: f64, peak: f64, cfg: &DemandConfig) -> MilliCpu {
    let headroom = (HEADROOM_DEVIATIONS * deviation)
        .max(peak - smoothed)
        .max(cfg.headroom * smoothed)
        .max(MIN_HEADROOM_M);
    round_up_quantum(smoothed + headroom)
}

fn round_up_quantum(x: f64) -> MilliCpu {
    let q = crate::market::QUANTUM as f64;
    // The small tolerance keeps float noise (e.g. 600.0000000001) from adding a quantum.
    let n = ((x - 1e-6) / q).ceil() * q;
    if n.is_finite() && n > 0.0 {
        MilliCpu(n as u64)
    } else {
        MilliCpu(0)
    }
}

/// Half-life of the throttling memory, seconds.
const THROTTLE_HALF_LIFE_S: f64 = 1800.0;

/// What throttling taught about a consumer's need (step 6 of the model).
///
/// A consumer throttled in more than `target` of its periods under `limit` was
/// held back inside periods even when its mean use is under the limit (bursts
/// shorter than the window: N threads busy for a few milliseconds). Its need is
/// then at least `limit · (1 + 2 · throttled ratio)` (at most twice the limit a
/// round), and that level is remembered, decaying with a half-life of 30
/// minutes: a mean computed over whole windows cannot see such bursts, so
/// without the memory the next quiet window would lower the limit into them
/// again (the simulator's `microbursts`, seed 1: 163 resizes per pod-hour
/// without it, 45 with a 10-minute half-life, 27 with 30 minutes).
///
/// The ratio is judged over at least [`MEMORY_PERIODS`] periods, the windows
/// added up until there are that many: the loop wakes early on a throttle
/// onset, and a 200 ms window of an idle pod holds two periods, so one
/// throttled period read as a ratio of 0.5 and doubled the need for half an
/// hour (about ten resizes per throttled period on an idle node). Judged over
/// 20 periods (so that one throttled period alone is never above the 5 %
/// target), the simulator's bursty pods lost the memory of bursts throttled
/// once every two seconds: limit changes per pod·hour rose from 16.9 to 24.4
/// in `bursty-microservices`, and direction reversals from 2 to 34.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThrottleMemory {
    level: f64,
    /// Periods and throttled periods of the windows not judged yet, and the
    /// lowest limit they ran under.
    periods: u64,
    throttled: u64,
    limit: Option<MilliCpu>,
}

/// The fewest CFS periods a throttled ratio is judged over: 1 s of the
/// default 100 ms period while the group runs (the decision tick's window).
pub const MEMORY_PERIODS: u64 = 10;

impl ThrottleMemory {
    /// Folds in one window of `window_s` seconds with `periods` CFS periods,
    /// `throttled` of them throttled, under `limit`; returns the remembered
    /// level.
    pub fn update(
        &mut self,
        limit: MilliCpu,
        periods: u64,
        throttled: u64,
        target: f64,
        window_s: f64,
    ) -> f64 {
        let decay = half_life_decay(window_s, THROTTLE_HALF_LIFE_S);
        self.level *= decay;
        self.periods = self.periods.saturating_add(periods);
        self.throttled = self.throttled.saturating_add(throttled.min(periods));
        let limit = self.limit.map_or(limit, |l| l.min(limit));
        self.limit = Some(limit);
        if self.periods < MEMORY_PERIODS {
            return self.level;
        }
        let ratio = self.throttled as f64 / self.periods as f64;
        (self.periods, self.throttled, self.limit) = (0, 0, None);
        let over = ratio.partial_cmp(&target) == Some(std::cmp::Ordering::Greater);
        if over && limit.0 > 0 {
            let ratio = ratio.clamp(0.0, 1.0);
            self.level = self
                .level
                .max(limit.0 as f64 * (1.0 + (2.0 * ratio).min(1.0)));
        }
        self.level
    }

    /// `need`, raised to the remembered level.
    pub fn need(&self, need: MilliCpu) -> MilliCpu {
        need.max(round_up_quantum(self.level))
    }
}

/// A multi-container pod's need: the sum of its containers' needs.
pub fn pod_need(container_needs: &[MilliCpu]) -> MilliCpu {
    MilliCpu(container_needs.iter().map(|n| n.0).sum())
}

#[cfg(test)]
mod tests;
