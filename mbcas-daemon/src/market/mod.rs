//! The market: entitlements by weight, fair shares by water-filling, and
//! over-committed ceilings that lend idle CPU (pure).
//!
//! A limit is a *ceiling*, not a slice of a partition: under contention the
//! kernel's `cpu.weight` already shares the CPU by weight, so a quota only has to
//! stop a pod from taking more than it may, never bind before `cpu.weight` would.
//!
//! Each pod bids with a weight `wᵢ > 0` (by default its CPU request, as
//! `cpu.weight` is derived), a hard floor `fᵢ`, a cap `Mᵢ ≥ fᵢ`, its smoothed
//! demand `dᵢ` and its need `nᵢ = dᵢ + hᵢ` (the demand model's headroom `hᵢ`
//! covers its variability). The node gives the capacity `C` (allocatable minus
//! what unmanaged pods may use), the weight `W` of every pod on the node
//! (unmanaged ones included), the idle CPU it measured that may be lent `I`
//! (after the soft reserve), and the over-commit factor `ρ ≥ 1`.
//!
//! 1. **Entitlement** `Eᵢ = clamp(C·wᵢ/W, fᵢ, Mᵢ)`: what `cpu.weight` guarantees
//!    the pod under full contention.
//! 2. **Fair level** `xᵢ` (phase 1): targets `tᵢ = clamp(dᵢ, fᵢ, Mᵢ)`; if
//!    `Σtᵢ ≤ C` every pod's fair level is its target, else the level `λ` with
//!    `Σ clamp(λ·wᵢ, fᵢ, tᵢ) = C` gives `xᵢ = clamp(λ·wᵢ, fᵢ, tᵢ)`. This
//!    maximises `Σ wᵢ·log xᵢ` subject to `Σxᵢ ≤ C` and `fᵢ ≤ xᵢ ≤ tᵢ` (KKT:
//!    pods strictly inside their bounds share one ratio `xᵢ/wᵢ = λ`): the
//!    Fisher-market equilibrium with budgets `wᵢ` at price `1/λ`, reported as the
//!    outcome's `price` (millicores per unit of weight; 0 when nothing is scarce).
//! 3. **Ceiling** `Tᵢ = clamp(max(Eᵢ, min(nᵢ, xᵢ + hᵢ + I)), fᵢ, Mᵢ)`: the pod's
//!    need when the node can give it, else its fair level plus its headroom plus
//!    what is idle; never below its entitlement.
//! 4. **Base** `Bᵢ = clamp(max(Eᵢ, min(nᵢ, xᵢ)), fᵢ, Mᵢ)`: what no budget takes
//!    away.
//! 5. **Budget** (phase 2): limits may add up to `ρ·C` (default ρ = 3). When
//!    `ΣTᵢ` exceeds it, the level `μ` with `Σ clamp(μ·wᵢ, Bᵢ, Tᵢ) = ρ·C` gives
//!    `Lᵢ = clamp(μ·wᵢ, Bᵢ, Tᵢ)` (every pod at its base when `ΣBᵢ ≥ ρ·C`);
//!    otherwise `Lᵢ = Tᵢ`. ρ = 1 with `I = 0` is a strict partition.
//!
//! 0. **Contention** (runs first, overrides 3–5 for the pods it caps): the
//!    demands above are smoothed over many windows, so they describe the
//!    average and lag a neighbour that starts or stops. Each bid also carries
//!    `rᵢ`, the demand of the last window alone (usage + throttled + run-queue
//!    wait: what it wanted, not what the kernel gave it). When
//!    `Σ min(rᵢ, Mᵢ) > C·(1 + 5 %)` the node is contended *now*: the level `ν`
//!    with `Σ clamp(ν·wᵢ, 0, min(rᵢ, Mᵢ)) = C` gives each pod its weighted
//!    max-min fair share `yᵢ = clamp(ν·wᵢ, 0, min(rᵢ, Mᵢ))`. A pod that wants
//!    clearly more (`rᵢ > 1.05·yᵢ + 10 m`) *and takes it* — it used clearly
//!    more (`uᵢ > 1.25·yᵢ + 10 m`), or it is held already (quota lever: its
//!    limit `ℓᵢ ≤ 1.05·yᵢ + 10 m` and it used at least 80 % of it: a capped
//!    pod uses what its cap lets it, one far below its limit is not held by it;
//!    weight lever: its weight is lowered) — is held to its share: with
//!    the quota lever (Kubernetes mode) it gets `max(yᵢ, Eᵢ, fᵢ)` as its
//!    ceiling and base: no headroom, no lent idle CPU, no budget level
//!    ([`Bound::Contention`]); with the weight lever (local mode) its limit
//!    is what rules 1–5 give it (at least `yᵢ`) but no more than its limit now
//!    (`max(ℓᵢ, yᵢ, Eᵢ, xᵢ)`: a pod held is not raised in the same round), and the
//!    caller lowers its weight; under the weight lever a pod that uses clearly more than its
//!    entitlement (`uᵢ > 1.25·Eᵢ + 10 m`, held while `uᵢ > Eᵢ`) is held too,
//!    contended or not: it borrows CPU its owners left idle, and a lowered
//!    weight returns it the moment they wake. When rule 0 holds two or more
//!    pods, the weight lever caps their quotas at their shares too: between
//!    held pods at lowered weights the kernel does not split a busy node
//!    precisely by weight
//!    ([`Lever::Weight`]; every allocation says whether it is held, and at
//!    what share, in [`Allocation::contended`]). A pod that
//!    wants more than its share but got less is a victim, not a cause: its
//!    shortfall is waiting, which a lower limit would only turn into
//!    throttling. Every other pod's ceiling and base are raised to at least
//!    `yᵢ`, so the pods that wait get theirs at once. Idle pods count
//!    at what they want (not at their floors). When the contention clears, the
//!    next round lends again. Reason: on a busy node the kernel does not share
//!    by weight (a 2-thread pod occupies both cores of a 2-core node for most of
//!    every period while a 1-thread pod with twice its weight waits); a quota is
//!    the lever that holds a neighbour to its share.
//!
//! Invariants (property-tested): `fᵢ ≤ Lᵢ ≤ Mᵢ`;
//! `Lᵢ ≥ min(Mᵢ, max(Eᵢ, xᵢ))` (a quota never binds before `cpu.weight` would);
//! `ΣLᵢ ≤ max(ρ·C, ΣBᵢ)` before rounding. If `Σfᵢ > C` the floors stand and the
//! node is reported overcommitted.
//!
//! Levels come from one routine, [`water_fill`]: `λ ↦ Σ clamp(λ·wᵢ, lᵢ, uᵢ)` is
//! piecewise linear and non-decreasing with breakpoints `lᵢ/wᵢ` and `uᵢ/wᵢ`;
//! sorting the `2n` breakpoints and sweeping them finds the level in
//! `O(n log n)`.
//!
//! **Quantisation.** Limits are written in 10 m steps, rounded *up* (a limit a
//! few millicores under a need throttles a small pod), then clamped to
//! `[fᵢ, Mᵢ]` (floors and caps are kept exactly even when they are not
//! multiples of 10). Deterministic for a given input.

use std::cmp::Ordering;

use crate::units::{MilliCpu, PodKey};

/// The quantum limits are written in.
pub const QUANTUM: u64 = 10;

/// The default over-commit factor ρ: limits may add up to three times the
/// capacity. With 2, the budget held fan-out pods of the simulator's
/// `microbursts` (mean 180 m, 80 ms of CPU in one period each second) at 730 m
/// and they were throttled in 11 % of periods, and `bursty-microservices` was
/// quota-throttled while the node idled for 1.3 % of its demand.
pub const DEFAULT_OVERCOMMIT: f64 = 3.0;

/// Which rule determined a pod's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// Held at its floor (request / minimum limit).
    Floor,
    /// Got what it needs (demand plus headroom).
    Need,
    /// Held at its cap.
    Cap,
    /// Its entitlement `C·w/W` was more than it needs.
    Entitlement,
    /// Contended: its fair level plus headroom plus the idle CPU lent.
    Share,
    /// Set by the over-commit budget's level.
    Level,
    /// Capped at its fair share while the node is contended now (rule 0).
    Contention,
}

impl Bound {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Need => "need",
            Self::Cap => "cap",
            Self::Entitlement => "entitlement",
            Self::Share => "share",
            Self::Level => "level",
            Self::Contention => "contention",
        }
    }
}

/// One pod's bid.
#[derive(Clone, Debug, PartialEq)]
pub struct Bid {
    pub key: PodKey,
    /// Budget, > 0 and finite.
    pub weight: f64,
    pub floor: MilliCpu,
    /// ≥ `floor`.
    pub cap: MilliCpu,
    /// Smoothed demand `dᵢ`: what the pod would use without a limit.
    pub demand: MilliCpu,
    /// Demand plus headroom `nᵢ` (a need below the demand counts as the demand).
    pub need: MilliCpu,
    /// The last window alone (rule 0); `None`: the smoothed demand stands for
    /// its demand, and the pod is taken to use it. Rule 0 runs only when some
    /// bid carries one (a market on smoothed demands alone, e.g. `mbcas solve`
    /// on a file, is rules 1–5).
    pub recent: Option<Recent>,
}

/// What a pod did in the last window (rule 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recent {
    /// `rᵢ`: usage + throttled + run-queue wait.
    pub demand: MilliCpu,
    /// `uᵢ`: what it used.
    pub usage: MilliCpu,
    /// `ℓᵢ`: its limit now.
    pub limit: MilliCpu,
    /// How the pod is held to its share under contention.
    pub lever: Lever,
    /// Its weight is lowered now (the weight lever is acting on it).
    pub demoted: bool,
}

/// How a pod that takes more than its share under contention is held to it
/// (rule 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lever {
    /// Its limit is lowered to its share (Kubernetes mode: `pods/resize`).
    #[default]
    Quota,
    /// Its limit is left alone and the caller lowers its weight instead
    /// (local mode, which owns the cgroups): it then yields to every pod that
    /// wants the CPU and still gets what they leave, at once, without a
    /// round in between and without being throttled.
    Weight,
}

impl Bid {
    fn need(&self) -> u64 {
        self.need.0.max(self.demand.0)
    }

    fn headroom(&self) -> u64 {
        self.need() - self.demand.0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MarketInput {
    /// `C`: what the bidders may use between them.
    pub capacity: MilliCpu,
    /// `W`: weight of every pod on the node; `None` (or less than the bids'
    /// total) means the bids' total.
    pub total_weight: Option<f64>,
    /// `I`: idle CPU measured on the node that may be lent.
    pub idle: MilliCpu,
    /// `ρ ≥ 1` (values below 1 count as 1).
    pub overcommit: f64,
    pub bids: Vec<Bid>,
}

impl MarketInput {
    /// A strict partition: no over-commit, nothing lent, `W` = the bids' total.
    pub fn strict(capacity: MilliCpu, bids: Vec<Bid>) -> Self {
        Self {
            capacity,
            total_weight: None,
            idle: MilliCpu::ZERO,
            overcommit: 1.0,
            bids,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    pub key: PodKey,
    /// Quantised limit (what is written).
    pub amount: MilliCpu,
    /// The exact, unquantised limit `Lᵢ`.
    pub exact: f64,
    pub bound: Bound,
    /// `Eᵢ`.
    pub entitlement: f64,
    /// `xᵢ`.
    pub fair: f64,
    /// `Bᵢ`, quantised up: the limit below which the pod's share would bind.
    pub base: MilliCpu,
    /// Rule 0: the pod takes more than `yᵢ`, its share of what is wanted now
    /// (millicores), and is to be held to it — by this limit (bound
    /// [`Bound::Contention`], the quota lever) or by its weight (the caller's
    /// part, the weight lever).
    pub contended: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MarketOutcome {
    /// Phase-1 clearing level λ; 0 when the node is not contended or overcommitted.
    pub price: f64,
    /// Phase-2 budget level μ; 0 when the budget did not bind.
    pub budget_level: f64,
    /// Rule 0's level ν (millicores per unit of weight); 0 when the node is
    /// not contended now.
    pub contention_level: f64,
    /// `max(ρ·C, ΣBᵢ)`: what the limits may add up to.
    pub budget: MilliCpu,
    /// `Σ floors > capacity`: floors were kept and the node is over-committed.
    pub overcommitted: bool,
    /// One per bid, in input order.
    pub allocations: Vec<Allocation>,
}

impl MarketOutcome {
    pub fn total(&self) -> MilliCpu {
        MilliCpu(self.allocations.iter().map(|a| a.amount.0).sum())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MarketError {
    #[error("pod {key}: weight must be a finite number > 0, got {weight}")]
    InvalidWeight { key: PodKey, weight: f64 },
    #[error("pod {key}: floor {floor} is above cap {cap}")]
    FloorAboveCap {
        key: PodKey,
        floor: MilliCpu,
        cap: MilliCpu,
    },
    #[error("pod {key} bids twice")]
    DuplicateKey { key: PodKey },
    #[error("over-commit factor must be a finite number ≥ 1, got {0}")]
    InvalidOvercommit(f64),
}

/// Σ recent demand must exceed the capacity by this fraction for the node to
/// count as contended now (rule 0): scheduling noise adds a little wait to
/// every pod, and a node exactly full is not contended.
pub const CONTENTION_MARGIN: f64 = 0.05;
/// A pod is capped under contention only when it wants more than its fair
/// share by this fraction plus [`CONTENTION_SLACK_M`].
pub const SQUEEZE_MARGIN: f64 = 0.05;
pub const CONTENTION_SLACK_M: f64 = 10.0;
/// A pod not held yet is held only when it used more than its share by this
/// fraction (plus the slack): a pod that got its whole demand in a window
/// where its share was a little less is no cause of anyone's waiting, and
/// holding it (its weight lowered to the minimum) cost the demo's steady
/// `api` half its CPU for two seconds.
pub const TAKING_MARGIN: f64 = 0.25;
/// A pod counts as held at its share by its own limit only when it used at
/// least this fraction of that limit: one that leaves much of its limit unused
/// is not held by it, and what it lacks is waiting, not quota (on the real
/// node a two-container pod using 310 m of a 550 m limit was "held" at its
/// share whenever the node was busy and released when it was not, so a
/// kubelet restart moved its limit 550 → 660 m).
pub const HELD_USE: f64 = 0.8;

/// Rule 0: each pod's fair share of what is wanted now, and whether it is
/// capped at it; `None` when the node is not contended now.
type Contention = (f64, Vec<(f64, bool)>);

fn contention(bids: &[Bid], weights: &[f64], caps: &[f64], c: f64) -> Option<Contention> {
    if bids.iter().all(|b| b.recent.is_none()) {
        return None;
    }
    let recent: Vec<f64> = bids
        .iter()
        .zip(caps)
        .map(|(b, &cap)| (b.recent.map_or(b.demand, |r| r.demand).0 as f64).min(cap))
        .collect();
    if recent.iter().sum::<f64>() <= c * (1.0 + CONTENTION_MARGIN) {
        return None;
    }
    let zeros = vec![0.0; bids.len()];
    let level = water_fill(&zeros, &recent, weights, c);
    let above = |x: f64, y: f64| x > y * (1.0 + SQUEEZE_MARGIN) + CONTENTION_SLACK_M;
    Some((
        level,
        recent
            .iter()
            .zip(weights)
            .zip(bids)
            .map(|((&r, &w), b)| {
                let y = (level * w).clamp(0.0, r);
                // Taking more than its share, or held at about it by its
                // limit already (a capped pod uses what its cap lets it).
                let (usage, limit) = b.recent.map_or((b.demand.0 as f64, f64::INFINITY), |x| {
                    (x.usage.0 as f64, x.limit.0 as f64)
                });
                // Under the weight lever a limit is no cap of ours (at the
                // start every limit is low), and a demoted pod is held by
                // its weight: it stays held while it wants more.
                let (by_weight, demoted) = b
                    .recent
                    .map_or((false, false), |x| (x.lever == Lever::Weight, x.demoted));
                let capped = !by_weight && !above(limit, y) && usage >= HELD_USE * limit;
                let taking =
                    usage > y * (1.0 + TAKING_MARGIN) + CONTENTION_SLACK_M || capped || demoted;
                (y, above(r, y) && taking)
            })
            .collect(),
    ))
}

/// Validates a bid list: weights positive and finite, floors ≤ caps, unique keys.
pub fn validate(bids: &[Bid]) -> Result<(), MarketError> {
    let mut seen = crate::units::KeySet::with_capacity_and_hasher(bids.len(), Default::default());
    for b in bids {
        if !(b.weight.is_finite() && b.weight > 0.0) {
            return Err(MarketError::InvalidWeight {
                key: b.key.clone(),
                weight: b.weight,
            });
        }
        if b.floor > b.cap {
            return Err(MarketError::FloorAboveCap {
                key: b.key.clone(),
                floor: b.floor,
                cap: b.cap,
            });
        }
        if !seen.insert(&b.key) {
            return Err(MarketError::DuplicateKey { key: b.key.clone() });
        }
    }
    Ok(())
}

/// Clears the market. See the module documentation for the rule.
pub fn clear(input: &MarketInput) -> Result<MarketOutcome, MarketError> {
    validate(&input.bids)?;
    if !input.overcommit.is_finite() {
        return Err(MarketError::InvalidOvercommit(input.overcommit));
    }
    let bids = &input.bids;
    let n = bids.len();
    let c = input.capacity.0 as f64;
    let floors: Vec<f64> = bids.iter().map(|b| b.floor.0 as f64).collect();
    let caps: Vec<f64> = bids.iter().map(|b| b.cap.0 as f64).collect();
    let weights: Vec<f64> = bids.iter().map(|b| b.weight).collect();
    let bid_weight: f64 = weights.iter().sum();
    let total_weight = input.total_weight.map_or(bid_weight, |w| {
        if w.is_finite() {
            w.max(bid_weight)
        } else {
            bid_weight
        }
    });
    let floor_sum: u64 = bids.iter().map(|b| b.floor.0).sum();
    let overcommitted = floor_sum > input.capacity.0;

    // Phase 1: the fair level of demand under C.
    let targets: Vec<f64> = bids
        .iter()
        .map(|b| b.demand.0.clamp(b.floor.0, b.cap.0) as f64)
        .collect();
    let target_sum: f64 = targets.iter().sum();
    let (price, fair) = if target_sum > c {
        let level = water_fill(&floors, &targets, &weights, c);
        let fair = (0..n)
            .map(|i| (level * weights[i]).clamp(floors[i], targets[i]))
            .collect();
        (if overcommitted { 0.0 } else { level }, fair)
    } else {
        (0.0, targets.clone())
    };

    let idle = input.idle.0 as f64;
    let (contended_level, contended) = match contention(bids, &weights, &caps, c) {
        Some((level, v)) => (level, Some(v)),
        None => (0.0, None),
    };
    // Under the weight lever, two or more pods held by rule 0 compete with
    // each other at their lowered weights, and the kernel does not split a
    // busy node precisely by weight between multi-threaded groups: their
    // quotas hold them to their shares as well.
    let held_by_rule0 = contended
        .as_ref()
        .map_or(0, |v| v.iter().filter(|(_, h)| *h).count());
    let mut entitlement = Vec::with_capacity(n);
    let mut ceiling = Vec::with_capacity(n);
    let mut base = Vec::with_capacity(n);
    let mut bounds = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for (i, b) in bids.iter().enumerate() {
        let e = if total_weight > 0.0 {
            (c * weights[i] / total_weight).clamp(floors[i], caps[i])
        } else {
            floors[i]
        };
        let need = b.need() as f64;
        let share = fair[i] + b.headroom() as f64 + idle;
        let wanted = need.min(share);
        let t = e.max(wanted).clamp(floors[i], caps[i]);
        bounds.push(if t <= floors[i] {
            Bound::Floor
        } else if t >= caps[i] {
            Bound::Cap
        } else if e >= wanted {
            Bound::Entitlement
        } else if need <= share {
            Bound::Need
        } else {
            Bound::Share
        });
        let mut bs = e.max(need.min(fair[i])).clamp(floors[i], caps[i]);
        let mut t = t;
        let by_quota = b.recent.is_none_or(|x| x.lever == Lever::Quota) || held_by_rule0 >= 2;
        match contended.as_ref().map(|v| v[i]) {
            Some((y, true)) if by_quota => {
                let y = e.max(y).clamp(floors[i], caps[i]);
                t = y;
                bs = y;
                bounds[i] = Bound::Contention;
            }
            Some((y, held)) => {
                t = t.max(y).min(caps[i]);
                bs = bs.max(y).min(caps[i]);
                // Held by its weight: not raised above its limit now (at
                // least its share, its entitlement and its fair level) in
                // the round that holds it. Raising the
                // quota of the pod that takes more than its share only to
                // cap it the round after cost two writes (on a 6.1 kernel:
                // 1410 → 2000 → 1210 m in two rounds).
                if let (true, Some(x)) = (held, b.recent) {
                    let keep = (x.limit.0 as f64)
                        .max(y)
                        .max(e)
                        .max(fair[i])
                        .clamp(floors[i], caps[i]);
                    t = t.min(keep);
                    bs = bs.min(t);
                }
            }
            None => {}
        }
        // Weight lever: a pod that uses clearly more than its entitlement is
        // borrowing CPU its owners left idle; its lowered weight gives it back
        // the moment they wake (no round in between), and costs it nothing
        // while they sleep. Held while it still uses more than it.
        let borrowing = b.recent.is_some_and(|x| {
            let u = x.usage.0 as f64;
            x.lever == Lever::Weight
                && (u > e * (1.0 + TAKING_MARGIN) + CONTENTION_SLACK_M || (x.demoted && u > e))
        });
        held.push(match contended.as_ref().map(|v| v[i]) {
            Some((y, true)) => Some(y),
            _ if borrowing => Some(e),
            _ => None,
        });
        entitlement.push(e);
        ceiling.push(t);
        base.push(bs);
    }

    // Phase 2: the over-commit budget.
    let budget = c * input.overcommit.max(1.0);
    let ceiling_sum: f64 = ceiling.iter().sum();
    let base_sum: f64 = base.iter().sum();
    let mut budget_level = 0.0;
    let exact: Vec<f64> = if ceiling_sum <= budget {
        ceiling
    } else if base_sum >= budget {
        for (i, bd) in bounds.iter_mut().enumerate() {
            if base[i] < ceiling[i] {
                *bd = Bound::Level;
            }
        }
        base.clone()
    } else {
        budget_level = water_fill(&base, &ceiling, &weights, budget);
        (0..n)
            .map(|i| {
                let x = (budget_level * weights[i]).clamp(base[i], ceiling[i]);
                if x < ceiling[i] {
                    bounds[i] = Bound::Level;
                }
                x
            })
            .collect()
    };

    let allocations = (0..n)
        .map(|i| {
            let b = &bids[i];
            Allocation {
                key: b.key.clone(),
                amount: round_limit(exact[i], b),
                exact: exact[i],
                bound: bounds[i],
                entitlement: entitlement[i],
                fair: fair[i],
                base: round_limit(base[i], b),
                contended: held[i],
            }
        })
        .collect();
    Ok(MarketOutcome {
        price,
        budget_level,
        contention_level: contended_level,
        budget: MilliCpu(budget.max(base_sum).ceil() as u64),
        overcommitted,
        allocations,
    })
}

/// Rounds a limit up to the quantum, then keeps it within the bid's floor and cap.
fn round_limit(x: f64, b: &Bid) -> MilliCpu {
    let q = QUANTUM as f64;
    // The tolerance keeps float noise (600.0000001) from adding a quantum.
    let up = ((x - 1e-6) / q).ceil().max(0.0) * q;
    MilliCpu((up as u64).clamp(b.floor.0, b.cap.0))
}

/// Finds a level `λ ≥ 0` with `Σ clamp(λ·wᵢ, lᵢ, uᵢ) = total`.
///
/// Requires `lᵢ ≤ uᵢ`, `wᵢ > 0` and `Σlᵢ ≤ total ≤ Σuᵢ` (otherwise the level that
/// comes closest is returned: 0 below, the last breakpoint above). `O(n log n)`.
pub fn water_fill(lower: &[f64], upper: &[f64], weights: &[f64], total: f64) -> f64 {
    // Breakpoints: at lᵢ/wᵢ pod i starts rising (slope += wᵢ, constant -= lᵢ),
    // at uᵢ/wᵢ it stops (slope -= wᵢ, constant += uᵢ).
    //
    // Each event is one `u128` sort key: the level's `total_cmp` bits, then
    // enter before leave at the same level, then the index. The order is total,
    // so the unstable sort is deterministic, and comparing integers is several
    // times faster than comparing `(f64, bool, usize)` tuples.
    let mut events: Vec<u128> = Vec::with_capacity(2 * lower.len());
    for i in 0..lower.len() {
        events.push(event_key(lower[i] / weights[i], true, i));
        events.push(event_key(upper[i] / weights[i], false, i));
    }
    events.sort_unstable();
    let mut constant: f64 = lower.iter().sum();
    let mut slope = 0.0;
    let mut level = 0.0;
    if constant >= total {
        return 0.0;
    }
    for key in events {
        let (at, enter, i) = event_of(key);
        let value = constant + slope * at;
        if value >= total && slope > 0.0 {
            return ((total - constant) / slope).max(level);
        }
        level = at;
        if enter {
            slope += weights[i];
            constant -= lower[i];
        } else {
            slope -= weights[i];
            constant += upper[i];
        }
    }
    level
}

/// Index bits in an event key: enough for any bid list that fits in memory.
const EVENT_INDEX_BITS: u32 = 63;

/// An f64's bits mapped so that unsigned order is `f64::total_cmp` order.
fn ordered_bits(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 { !b } else { b | (1 << 63) }
}

fn from_ordered_bits(b: u64) -> f64 {
    f64::from_bits(if b >> 63 == 1 { b & !(1 << 63) } else { !b })
}

fn event_key(at: f64, enter: bool, i: usize) -> u128 {
    (u128::from(ordered_bits(at)) << 64)
        | (u128::from(!enter) << EVENT_INDEX_BITS)
        | (i as u128 & ((1 << EVENT_INDEX_BITS) - 1))
}

fn event_of(key: u128) -> (f64, bool, usize) {
    let at = from_ordered_bits((key >> 64) as u64);
    let enter = (key >> EVENT_INDEX_BITS) & 1 == 0;
    let i = (key & ((1 << EVENT_INDEX_BITS) - 1)) as usize;
    (at, enter, i)
}

/// Splits a pod's allocation back to its containers.
///
/// Each container gets at least its request; the rest is shared in proportion to
/// the containers' needs (containers with no need get their request only; if no
/// container has a need the rest is shared equally). The parts add up to `total`
/// exactly, or to the sum of requests when `total` is below it.
pub fn split_to_containers(
    total: MilliCpu,
    needs: &[MilliCpu],
    requests: &[MilliCpu],
) -> Vec<MilliCpu> {
    let n = needs.len().min(requests.len());
    if n == 0 {
        return Vec::new();
    }
    let req_sum: u64 = requests[..n].iter().map(|r| r.0).sum();
    if total.0 <= req_sum {
        return requests[..n].to_vec();
    }
    let need_sum: u64 = needs[..n].iter().map(|x| x.0).sum();
    let weights: Vec<f64> = needs[..n]
        .iter()
        .map(|x| {
            if need_sum == 0 {
                1.0
            } else {
                (x.0 as f64).max(1e-9)
            }
        })
        .collect();
    let lower: Vec<f64> = requests[..n].iter().map(|r| r.0 as f64).collect();
    let upper = vec![total.0 as f64; n];
    let level = water_fill(&lower, &upper, &weights, total.0 as f64);
    let exact: Vec<f64> = (0..n)
        .map(|i| (level * weights[i]).clamp(lower[i], upper[i]))
        .collect();
    // Largest-remainder rounding to whole millicores, never below a request.
    let mut parts: Vec<u64> = exact
        .iter()
        .zip(&requests[..n])
        .map(|(&x, r)| (x.floor() as u64).max(r.0))
        .collect();
    let mut left = total.0.saturating_sub(parts.iter().sum());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - parts[a] as f64;
        let rb = exact[b] - parts[b] as f64;
        rb.partial_cmp(&ra)
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    });
    for i in order.into_iter().cycle().take(n * 2) {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    if left > 0 {
        parts[0] += left;
    }
    parts.into_iter().map(MilliCpu).collect()
}

#[cfg(test)]
mod tests;
