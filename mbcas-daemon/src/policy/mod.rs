//! Stability rules between the market's proposal and actuation (pure).
//!
//! The market says what each pod *should* get now; the policy decides what is
//! *written*, so that limits change rarely, by bounded steps, and never in a way
//! that hurts a pod that is being throttled. For each pod, in order:
//!
//! 1. **Exclusion.** Guaranteed pods (their QoS class may not change), opted-out
//!    pods (`mbcas.io/ignore=true`), excluded namespaces and pods without a CPU
//!    limit are never changed.
//! 2. **Rollback.** If the pod's limit was *decreased on account of its own
//!    demand* and the pod is throttled again within the cooldown, the previous
//!    limit is restored at once and that pod's cooldown doubles (up to
//!    `max_cooldown`) — but only when the rollback is carried out (not cancelled
//!    by the budget). A decrease the market made because the node is contended
//!    (the pod got less than it needs) is no mistake and is never rolled back. A
//!    decrease that survives its cooldown resets the pod's cooldown.
//! 3. **Fair share first.** A throttled pod below its base (the market's
//!    `max(entitlement, fair level)`: where its quota would bind before
//!    `cpu.weight` does) is raised to its proposal up to that base at once: no
//!    hysteresis, no cooldown, no step limit — unless the market holds it at
//!    its share under contention (rule 7): such a pod is throttled by design
//!    and its share moves a little every round, so its increases go through
//!    the hysteresis.
//! 4. **Hysteresis.** Otherwise no change under `hysteresis` (10 %) relative to
//!    the current limit for a throttled pod's increase, under twice that for
//!    any other change, and under 50 % for a change that only lends (the pod is
//!    not throttled and both limits exceed its need by more than twice the
//!    hysteresis: its entitlement moves with what the unmanaged pods use) —
//!    except to lift a limit below the pod's floor.
//! 5. **Increases** go through at once for a throttled pod; for a pod that is not
//!    throttled they wait out the cooldown after a decrease, and are not made
//!    while its recent peak demand stays below its limit by more than the
//!    hysteresis (`covered`: the ceiling already covers what it used). Above the
//!    base, one change raises a limit by at most ×`max_step_up` (1.5).
//! 6. **Decreases** never happen while the pod is throttled or the node is
//!    saturated (no idle CPU to lend: usage is then a share, not a demand) —
//!    unless the market gives it less than it needs (its share under
//!    contention) —, within the cooldown
//!    (default 30 s) after the pod's last change, or during warm-up (the first
//!    `warmup_samples` = 5 samples) below the limit the pod started with. One change
//!    lowers a limit by at most ×`max_step_down` (0.5).
//! 7. **Contention** (checked before rules 3–6). A pod the market caps at its fair share because the node
//!    is contended now (`Bound::Contention`: it wants more than its share while
//!    others wait) is lowered to it at once, past rules 5 and 6's cooldown,
//!    step limit and holds, unless the change is within the hysteresis and
//!    the pod used no more than its share (plus 5 % and 10 m) last window; a pod
//!    capped already (and held since) is lowered further only when the lower
//!    share is seen in two rounds in a row (one window's spike is no reason). It is
//!    no decrease on account of its own demand, so it is never rolled back; it
//!    is raised again by rule 3 (it is throttled below its base) as soon as
//!    the contention eases.
//! 8. **Budget.** The limits may add up to the market's over-commit budget. When
//!    the decisions exceed it, the part of each increase up to the pod's base is
//!    granted first: if even that does not fit, pods held above their proposal
//!    by the rules above (hysteresis, cooldown, step limits) give back just
//!    enough, in proportion to how far above it they are (`reclaim`: a pod's
//!    fair-share increase never waits for another pod's cooldown). Then the parts
//!    of increases above the bases share what is left, scaled down together; one
//!    cut below the hysteresis is not made. An increase is never scaled below
//!    the pod's base.
//!
//! Step-limited targets are rounded to 10 m. Every decision carries a [`Reason`],
//! whose `as_str()` code is what logs, metrics and the PodAllocation status show.
//! Time is injected (`now` is any monotonic time since a fixed origin), so the
//! daemon, local mode and the simulator run the same rules.
//!
//! Also here: [`node_capacity`], the capacity the market may hand out (allocatable
//! minus what the unmanaged pods use), and [`lendable_idle`], the idle CPU it may
//! lend (what the managed pods leave unused, less the soft node reserve).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{KeyMap, KeySet, MilliCpu, PodKey};

const QUANTUM: u64 = crate::market::QUANTUM;

/// A pod that used less than this share of its limit lately is idle: it is
/// not raised for lent CPU alone (see `decide_one`).
const IDLE_SHARE: f64 = 0.5;

/// The relative change below which a limit that only lends (the pod is not
/// throttled; its need is clearly exceeded before and after) is not written.
pub const LENDING_BAND: f64 = 0.5;

/// How long a pod capped at its share under contention must see a clearly
/// lower share, in every round, before it is capped further.
pub const CAP_CONFIRM: Duration = Duration::from_secs(2);

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
    /// The pod's CPU is set at pod level (`spec.resources`): MBCAS resizes
    /// container limits only.
    PodLevel,
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
    SaturatedHold,
    ContentionCap,
    Rollback,
    CapacityLimited,
    Reclaim,
    Covered,
    BelowFloor,
    ExcludedGuaranteed,
    ExcludedOptedOut,
    ExcludedNamespace,
    ExcludedNoLimit,
    ExcludedRestartPolicy,
    ExcludedPodLevel,
}

impl Reason {
    pub const ALL: [Reason; 23] = [
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
        Self::SaturatedHold,
        Self::ContentionCap,
        Self::Rollback,
        Self::CapacityLimited,
        Self::Reclaim,
        Self::Covered,
        Self::BelowFloor,
        Self::ExcludedGuaranteed,
        Self::ExcludedOptedOut,
        Self::ExcludedNamespace,
        Self::ExcludedNoLimit,
        Self::ExcludedRestartPolicy,
        Self::ExcludedPodLevel,
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
            Self::SaturatedHold => "saturated_hold",
            Self::ContentionCap => "contention_cap",
            Self::Rollback => "rollback",
            Self::CapacityLimited => "capacity_limited",
            Self::Reclaim => "reclaim",
            Self::Covered => "covered",
            Self::BelowFloor => "below_floor",
            Self::ExcludedGuaranteed => "excluded_guaranteed",
            Self::ExcludedOptedOut => "excluded_opted_out",
            Self::ExcludedNamespace => "excluded_namespace",
            Self::ExcludedNoLimit => "excluded_no_limit",
            Self::ExcludedRestartPolicy => "excluded_restart_policy",
            Self::ExcludedPodLevel => "excluded_pod_level",
        }
    }

    fn of(e: Exclusion) -> Self {
        match e {
            Exclusion::Guaranteed => Self::ExcludedGuaranteed,
            Exclusion::OptedOut => Self::ExcludedOptedOut,
            Exclusion::Namespace => Self::ExcludedNamespace,
            Exclusion::NoLimit => Self::ExcludedNoLimit,
            Exclusion::RestartPolicy => Self::ExcludedRestartPolicy,
            Exclusion::PodLevel => Self::ExcludedPodLevel,
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
    /// The market's base for the pod: below it the quota binds before
    /// `cpu.weight` would.
    pub base: MilliCpu,
    /// What the pod's demand model says it needs (the market's input).
    pub need: MilliCpu,
    /// The highest demand the pod showed lately (the demand model's peak).
    pub peak: MilliCpu,
    /// What the pod used over the last window (its limit before the first).
    pub used: MilliCpu,
    /// Fraction of CFS periods throttled in the last window.
    pub throttled_ratio: f64,
    /// Demand samples seen for this pod.
    pub samples: u32,
    /// The node had no idle CPU to lend over the last window (its pods used
    /// all of the capacity but the soft reserve): a pod's usage is then its
    /// share under `cpu.weight`, not its demand.
    pub saturated: bool,
    /// The market capped the pod at its fair share because the node is
    /// contended now (`market::Bound::Contention`).
    pub contended: bool,
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
    /// Capped at its share under contention (rule 7) and held since.
    capped: bool,
    /// A lower share was first seen at this time while held, and in every
    /// round since: the cap waits until it has been for [`CAP_CONFIRM`].
    cap_pending: Option<Duration>,
    /// When the last decrease on account of the pod's own demand happened and
    /// the limit it replaced.
    last_decrease: Option<(Duration, MilliCpu)>,
    cooldown: Duration,
    /// Restored from a saved state at this time: until a cooldown has passed
    /// only a throttled pod is raised (see [`Policy::restore_pod`]).
    restored: Option<Duration>,
}

impl PodState {
    fn new(cfg: PolicyConfig) -> Self {
        Self {
            last_change: None,
            capped: false,
            cap_pending: None,
            last_decrease: None,
            cooldown: cfg.cooldown,
            restored: None,
        }
    }
}

/// A pod's stability state saved across daemon restarts: its times as how
/// long before the save they were.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedPodState {
    pub since_change: Option<Duration>,
    pub capped: bool,
    pub cap_pending: bool,
    pub since_decrease: Option<(Duration, MilliCpu)>,
    pub cooldown: Duration,
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

    /// The pod's state to save at `now`, if it has one.
    pub fn save_pod(&self, key: &PodKey, now: Duration) -> Option<SavedPodState> {
        let st = self.pods.get(key)?;
        Some(SavedPodState {
            since_change: st.last_change.map(|t| now.saturating_sub(t)),
            capped: st.capped,
            cap_pending: st.cap_pending.is_some(),
            since_decrease: st.last_decrease.map(|(t, l)| (now.saturating_sub(t), l)),
            cooldown: st.cooldown,
        })
    }

    /// Takes a saved state back at `now`, `age` after it was saved. The
    /// restart counts as a change with the longest cooldown: the new
    /// process's view of the node is new (the unmanaged pods' use, its own
    /// start-up, the containers' needs), and on the real node a restored pod
    /// was lowered 610 → 480 m 35 s after a restart that changed nothing
    /// else. So no limit is lowered for `max_cooldown` after a restart, and
    /// none is raised that is not throttled: the new process lends from a
    /// capacity it has measured for seconds (the unmanaged pods' decaying
    /// peaks start again), and on the real node, next to a busy unmanaged
    /// pod, a restored two-container pod was raised 490 → 620 m two seconds
    /// after a restart (the old daemon had held it at 490 m for four
    /// minutes). A throttled pod is still raised at once, and a pod above
    /// its fair share under contention still capped.
    pub fn restore_pod(
        &mut self,
        key: PodKey,
        saved: &SavedPodState,
        now: Duration,
        age: Duration,
    ) {
        let at = |since: Duration| now.saturating_sub(since.saturating_add(age));
        self.pods.insert(
            key,
            PodState {
                last_change: Some(now),
                capped: saved.capped,
                cap_pending: saved.cap_pending.then_some(now),
                last_decrease: saved.since_decrease.map(|(t, l)| (at(t), l)),
                cooldown: self.cfg.max_cooldown.max(self.cfg.cooldown),
                restored: Some(now),
            },
        );
    }

    /// The current cooldown of a pod (doubled by rollbacks).
    pub fn cooldown_of(&self, key: &PodKey) -> Duration {
        self.pods.get(key).map_or(self.cfg.cooldown, |s| s.cooldown)
    }

    /// Decides every pod's limit for this round and records the changes as made.
    /// `budget` is what the limits may add up to (the market's over-commit
    /// budget). Decisions come back in the order of `views`.
    pub fn decide(&mut self, now: Duration, budget: MilliCpu, views: &[PodView]) -> Vec<Decision> {
        let mut out: Vec<Decision> = views.iter().map(|v| self.decide_one(now, v)).collect();
        fit_budget(budget, self.cfg.hysteresis, views, &mut out);
        for (v, d) in views.iter().zip(&out) {
            if let Some(st) = self.pods.get_mut(&v.key) {
                if d.changed() && d.reason == Reason::ContentionCap {
                    st.capped = true;
                } else if !v.contended {
                    st.capped = false;
                }
                if !(v.contended && v.proposed < v.current) {
                    st.cap_pending = None;
                }
            }
        }
        for (v, d) in views.iter().zip(&out) {
            if !d.changed() {
                continue;
            }
            let cfg = self.cfg;
            let st = self
                .pods
                .entry(v.key.clone())
                .or_insert_with(|| PodState::new(cfg));
            st.last_change = Some(now);
            if d.reason == Reason::Rollback {
                // Doubled only when the rollback is carried out.
                st.cooldown = (st.cooldown * 2).min(cfg.max_cooldown);
                st.last_decrease = None;
            } else if d.to < d.from && v.proposed >= v.need {
                // A decrease on account of the pod's own demand: if throttling
                // comes back within the cooldown, it was wrong.
                st.last_decrease = Some((now, d.from));
            } else {
                // An increase, or a squeeze under contention (the pod got less
                // than it needs): nothing to roll back.
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
        let st = self
            .pods
            .entry(v.key.clone())
            .or_insert_with(|| PodState::new(cfg));

        if let Some((at, previous)) = st.last_decrease {
            let since = now.saturating_sub(at);
            if since < st.cooldown {
                if throttled && previous > v.current {
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
        if st
            .restored
            .is_some_and(|t| now.saturating_sub(t) >= st.cooldown)
        {
            st.restored = None;
        }
        let just_restored = st.restored.is_some();

        if v.current < v.floor {
            return go(v.proposed.max(v.floor), Reason::BelowFloor);
        }
        let (cur, prop) = (v.current.0 as f64, v.proposed.0 as f64);
        if v.proposed == v.current {
            return keep(Reason::Unchanged);
        }
        // Above its fair share while others wait: capped at once (no
        // cooldown, no step limit, no hold), within the plain hysteresis.
        if v.contended && v.proposed < v.current {
            // Within the hysteresis it stays, unless it takes clearly more
            // than its share: in the kernel tier a pod held at 1350 m, 9 %
            // above its 1233 m share, used 1334 m while its neighbour, held
            // at its share by weight, got 509 of its 614 m (the kernel's
            // placement of two 2-thread groups on 2 cores is not by weight).
            let taking = v.used.0 as f64
                > prop * (1.0 + crate::market::SQUEEZE_MARGIN) + crate::market::CONTENTION_SLACK_M;
            if cur - prop < cfg.hysteresis * cur && !taking {
                return keep(Reason::Hysteresis);
            }
            // Capped already: a lower share must be seen in every round for
            // CAP_CONFIRM. One window's spike of a neighbour's demand (under
            // emulation, stolen time read as run-queue wait) capped two held
            // pods 610 → 500 and 1220 → 1000 m and raised them back the round
            // after; with rounds woken early by events, two rounds in a row
            // were not enough (6.1 under TCG: 610 → 530 and 530 → 590 m 0.4 s
            // apart). A first cap still goes at once (a pod held but never
            // capped, its limit within the hysteresis of its share, is capped
            // on the first round its share is clearly lower).
            if st.capped {
                let since = *st.cap_pending.get_or_insert(now);
                if now.saturating_sub(since) < CAP_CONFIRM {
                    return keep(Reason::Hysteresis);
                }
            }
            st.cap_pending = None;
            return go(v.proposed.max(v.floor), Reason::ContentionCap);
        }
        // Its quota binds before cpu.weight would: no hysteresis, and the step
        // limit below lets it reach its base at once.
        // A pod held at its share is throttled by design, and its share moves
        // a little every round: its increases go through the hysteresis (on
        // a 6.1 kernel two held pods were raised 10 m at a time, 5 writes in
        // 60 s).
        let fair_first = throttled && !v.contended && v.current < v.base && v.proposed > v.current;
        // Only a throttled pod's increase passes the plain band; the others need
        // twice the gap: a ceiling above what a pod uses costs nothing while
        // cpu.weight arbitrates, a limit that follows every swing of the demand
        // costs a resize each time.
        // A pod that is not throttled and whose own need both the current
        // limit and the proposal clearly exceed only gains or loses lent CPU (its
        // entitlement moves with what the unmanaged pods use): such a change
        // waits for a wider band. On the real node a two-container pod using
        // 310 m went 490 ↔ 660 m every 30–60 s as the capacity moved.
        let lent = |x: f64| x > v.need.0 as f64 * (1.0 + 2.0 * cfg.hysteresis);
        let lending_only = !throttled && lent(cur) && lent(prop);
        let band = if lending_only {
            LENDING_BAND.max(2.0 * cfg.hysteresis)
        } else if prop < cur || !throttled {
            2.0 * cfg.hysteresis
        } else {
            cfg.hysteresis
        };
        if !fair_first && (prop - cur).abs() < band * cur {
            return keep(Reason::Hysteresis);
        }
        if v.proposed > v.current {
            if !throttled && (in_cooldown_after_decrease || just_restored) {
                return keep(Reason::Cooldown);
            }
            // Not throttled and its limit well above what it used lately: the
            // ceiling already covers it (a need that swings with the demand's
            // variability would otherwise move the limit up and down). Below
            // its base too when it used less than half its limit lately: a
            // pod that is throttled is raised to its base at once (rule 3),
            // so raising an idle one before that only lends CPU it does not
            // use (on the real node five idle pods using 10 m were raised
            // 100 → 400 m on an empty node and lowered in two steps as the
            // others arrived: 15 resizes for nothing). A busier pod below its
            // base is still raised to it ahead of a burst (without that, on
            // the simulated step-up-down scenario the median pod was throttled
            // more than under its static limit).
            let peak = v.peak.0 as f64;
            let idle = peak < cur * IDLE_SHARE;
            if !throttled && (v.current >= v.base || idle) && peak < cur * (1.0 - cfg.hysteresis) {
                return keep(Reason::Covered);
            }
            let step = round_down(cur * cfg.max_step_up)
                .max(v.current.0 + QUANTUM)
                .max(v.base.0);
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
        // Nor while the node is saturated: what the pod uses is its weighted
        // share, so its demand estimate falls with the contention, not with its
        // load, and a lower ceiling only throttles its bursts (on cgroup v1 no
        // pressure shows the wait). The ceiling costs nothing while cpu.weight
        // arbitrates; the budget can still reclaim it.
        if v.saturated && v.proposed >= v.need {
            return keep(Reason::SaturatedHold);
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
}

/// Brings the decisions within `budget` (rule 7 of the module documentation).
fn fit_budget(budget: MilliCpu, hysteresis: f64, views: &[PodView], out: &mut [Decision]) {
    // Excluded pods are not the market's: their limits are outside the budget.
    let managed = |v: &PodView| v.exclusion.is_none();
    if out
        .iter()
        .zip(views)
        .filter(|(_, v)| managed(v))
        .map(|(d, _)| d.to.0)
        .sum::<u64>()
        <= budget.0
    {
        return;
    }
    // The part of each increase up to max(from, base) is the pod's fair share:
    // it is granted, if need be by reclaiming what the rules hold above the
    // market's proposal elsewhere (just enough, in proportion to the gaps).
    let kept = |d: &Decision, v: &PodView| {
        if d.to > d.from {
            d.to.min(d.from.max(v.base))
        } else {
            d.to
        }
    };
    let fair_total = |out: &[Decision]| -> u64 {
        out.iter()
            .zip(views)
            .filter(|(_, v)| managed(v))
            .map(|(d, v)| kept(d, v).0)
            .sum()
    };
    let fair = fair_total(out);
    if fair > budget.0 {
        let gap = |d: &Decision, v: &PodView| {
            if v.exclusion.is_none() && d.to <= d.from {
                d.to.0.saturating_sub(v.proposed.max(v.floor).0)
            } else {
                0
            }
        };
        let gaps: u64 = out.iter().zip(views).map(|(d, v)| gap(d, v)).sum();
        let excess = fair - budget.0;
        if gaps > 0 {
            let share = (excess as f64 / gaps as f64).min(1.0);
            for (d, v) in out.iter_mut().zip(views) {
                let g = gap(d, v);
                if g > 0 {
                    let give = round_up(g as f64 * share).min(g);
                    d.to = MilliCpu(d.to.0 - give);
                    d.reason = Reason::Reclaim;
                }
            }
        }
    }
    // What is left of the budget goes to the parts of increases above the
    // fair share, scaled down together; an increase cut below the hysteresis
    // is not worth a resize.
    let fair = fair_total(out);
    let extra: u64 = out
        .iter()
        .zip(views)
        .filter(|(_, v)| managed(v))
        .map(|(d, v)| d.to.0 - kept(d, v).0)
        .sum();
    if extra == 0 || fair + extra <= budget.0 {
        return;
    }
    let scale = (budget.0.saturating_sub(fair) as f64 / extra as f64).min(1.0);
    for (d, v) in out.iter_mut().zip(views) {
        let low = kept(d, v);
        let more = d.to.0 - low.0;
        if more == 0 {
            continue;
        }
        let mut to = MilliCpu(low.0 + round_down(more as f64 * scale));
        if to > d.from && ((to.0 - d.from.0) as f64) < hysteresis * d.from.0 as f64 && to > v.base {
            to = d.from.max(low);
        }
        // Lifting a pod to its floor is never scaled away.
        if d.reason == Reason::BelowFloor {
            d.to = to.max(v.floor);
        } else {
            // A rollback cut to nothing is not carried out: no doubling. One
            // cut short is still a rollback.
            d.to = to;
            if !(d.reason == Reason::Rollback && to > d.from) {
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

/// The capacity the market may hand out: allocatable CPU minus what the pods
/// MBCAS does not manage take (Kubernetes mode: their measured use, see
/// `k8s::unmanaged`). The node reserve is not taken from it: see
/// [`lendable_idle`].
pub fn node_capacity(allocatable: MilliCpu, excluded_limits: MilliCpu) -> MilliCpu {
    allocatable.saturating_sub(excluded_limits)
}

/// The idle CPU the market may lend: what the managed pods leave of `capacity`
/// (their `usage` over the last window), less the node reserve (a fraction of
/// `capacity`). The reserve is soft: it is held back from what is lent while the
/// node is busy, never taken from a pod's entitlement, so a quiet node's idle CPU
/// is never wasted.
pub fn lendable_idle(capacity: MilliCpu, usage: f64, reserve_fraction: f64) -> MilliCpu {
    let reserve = capacity.0 as f64 * reserve_fraction.clamp(0.0, 1.0);
    let idle = capacity.0 as f64 - usage.max(0.0) - reserve;
    if idle.is_finite() && idle > 0.0 {
        MilliCpu(idle.floor() as u64)
    } else {
        MilliCpu::ZERO
    }
}

#[cfg(test)]
mod tests;
