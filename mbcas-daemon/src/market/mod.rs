//! The market: weighted proportional fairness by water-filling (pure).
//!
//! Each pod bids with a weight `wᵢ > 0` (its budget; by default its CPU request), a
//! hard floor `fᵢ`, a cap `Mᵢ ≥ fᵢ` and a need `nᵢ`. Its target is
//! `tᵢ = clamp(nᵢ, fᵢ, Mᵢ)`. With capacity `C`:
//!
//! * **Overcommitted** (`Σfᵢ > C`): floors stand, every pod gets `fᵢ`, and the
//!   outcome says so. A limit is never below its floor.
//! * **Phase 1** (`Σtᵢ > C`): find the level `λ` with `Σ clamp(λ·wᵢ, fᵢ, tᵢ) = C`.
//!   This maximises `Σ wᵢ·log xᵢ` subject to `Σxᵢ ≤ C` and `fᵢ ≤ xᵢ ≤ tᵢ` (KKT:
//!   pods strictly inside their bounds share one ratio `xᵢ/wᵢ = λ`), i.e. it is the
//!   Fisher-market equilibrium with budgets `wᵢ` at price `1/λ`. `λ` is reported as
//!   the outcome's `price` (the clearing level, in millicores per unit of weight).
//! * Otherwise every pod gets `tᵢ` (`price` is 0: nothing is scarce), and in
//!   **phase 2** (`Surplus::Distribute`, the default) what is left is spread by
//!   weight: `xᵢ = min(Mᵢ, max(tᵢ, μ·wᵢ))` with the level `μ` chosen so that
//!   `Σxᵢ = C`, or every pod at its cap when `ΣMᵢ ≤ C`. `Surplus::Hold` leaves it.
//!
//! Both levels come from one routine, [`water_fill`]: the function
//! `λ ↦ Σ clamp(λ·wᵢ, lᵢ, uᵢ)` is piecewise linear and non-decreasing with
//! breakpoints `lᵢ/wᵢ` and `uᵢ/wᵢ`; sorting the `2n` breakpoints and sweeping them
//! finds the level in `O(n log n)`.
//!
//! **Quantisation.** Limits are written in 10 m steps: each exact `xᵢ` is rounded
//! down to a multiple of 10 m but never below `fᵢ` (floors need not be multiples of
//! 10: a floor is kept exactly), then the 10 m units left below `C` go one each to
//! the pods with the largest rounding remainders (ties: input order), never above a
//! cap. Hence `Σxᵢ ≤ C` (unless overcommitted), every pod is within 10 m of its
//! exact share, and the result is deterministic for a given input order.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::units::{MilliCpu, PodKey};

/// The quantum limits are written in.
pub const QUANTUM: u64 = 10;

/// What to do with capacity left after every pod reached its target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Surplus {
    /// Spread it by weight up to the caps (limits above need cost nothing while
    /// the node is idle, and absorb bursts before the next decision).
    #[default]
    Distribute,
    /// Leave it unallocated: limits track need.
    Hold,
}

/// Which constraint determined a pod's allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// Held at its floor (request / minimum limit).
    Floor,
    /// Got exactly what it needs.
    Need,
    /// Held at its cap.
    Cap,
    /// Set by the clearing level (phase 1) or the surplus level (phase 2).
    Level,
}

impl Bound {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Need => "need",
            Self::Cap => "cap",
            Self::Level => "level",
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
    pub need: MilliCpu,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MarketInput {
    pub capacity: MilliCpu,
    pub surplus: Surplus,
    pub bids: Vec<Bid>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    pub key: PodKey,
    /// Quantised allocation (what is written).
    pub amount: MilliCpu,
    /// The exact, unquantised allocation.
    pub exact: f64,
    pub bound: Bound,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MarketOutcome {
    /// Phase-1 clearing level λ; 0 when the node is not contended or overcommitted.
    pub price: f64,
    /// Phase-2 surplus level μ; 0 when no surplus was distributed.
    pub surplus_level: f64,
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
    let bids = &input.bids;
    let cap_total = input.capacity.0 as f64;
    let floors: Vec<f64> = bids.iter().map(|b| b.floor.0 as f64).collect();
    let targets: Vec<f64> = bids
        .iter()
        .map(|b| b.need.0.clamp(b.floor.0, b.cap.0) as f64)
        .collect();
    let weights: Vec<f64> = bids.iter().map(|b| b.weight).collect();
    let floor_sum: u64 = bids.iter().map(|b| b.floor.0).sum();

    if floor_sum > input.capacity.0 {
        let allocations = bids
            .iter()
            .map(|b| Allocation {
                key: b.key.clone(),
                amount: b.floor,
                exact: b.floor.0 as f64,
                bound: Bound::Floor,
            })
            .collect();
        return Ok(MarketOutcome {
            price: 0.0,
            surplus_level: 0.0,
            overcommitted: true,
            allocations,
        });
    }

    let target_sum: f64 = targets.iter().sum();
    let mut price = 0.0;
    let mut surplus_level = 0.0;
    let mut exact: Vec<f64>;
    let mut bounds: Vec<Bound>;
    if target_sum > cap_total {
        price = water_fill(&floors, &targets, &weights, cap_total);
        exact = Vec::with_capacity(bids.len());
        bounds = Vec::with_capacity(bids.len());
        for i in 0..bids.len() {
            let x = (price * weights[i]).clamp(floors[i], targets[i]);
            exact.push(x);
            bounds.push(if x <= floors[i] {
                Bound::Floor
            } else if x >= targets[i] {
                target_bound(&bids[i])
            } else {
                Bound::Level
            });
        }
    } else {
        exact = targets.clone();
        bounds = bids.iter().map(target_bound).collect();
        if input.surplus == Surplus::Distribute {
            let caps: Vec<f64> = bids.iter().map(|b| b.cap.0 as f64).collect();
            let cap_sum: f64 = caps.iter().sum();
            if cap_sum <= cap_total {
                exact = caps;
                bounds = vec![Bound::Cap; bids.len()];
            } else if target_sum < cap_total {
                surplus_level = water_fill(&targets, &caps, &weights, cap_total);
                for i in 0..bids.len() {
                    let x = (surplus_level * weights[i]).clamp(targets[i], caps[i]);
                    if x >= caps[i] {
                        bounds[i] = Bound::Cap;
                    } else if x > targets[i] {
                        bounds[i] = Bound::Level;
                    }
                    exact[i] = x;
                }
            }
        }
    }

    let amounts = quantise(&exact, bids, input.capacity);
    let allocations = bids
        .iter()
        .zip(amounts)
        .zip(exact.iter().zip(bounds))
        .map(|((b, amount), (&exact, bound))| Allocation {
            key: b.key.clone(),
            amount,
            exact,
            bound,
        })
        .collect();
    Ok(MarketOutcome {
        price,
        surplus_level,
        overcommitted: false,
        allocations,
    })
}

/// The bound a pod is at when it gets exactly its target `clamp(need, floor, cap)`.
fn target_bound(b: &Bid) -> Bound {
    if b.need <= b.floor {
        Bound::Floor
    } else if b.need >= b.cap {
        Bound::Cap
    } else {
        Bound::Need
    }
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

/// Rounds exact allocations to the quantum, keeping floors, caps and `Σ ≤ capacity`.
fn quantise(exact: &[f64], bids: &[Bid], capacity: MilliCpu) -> Vec<MilliCpu> {
    let mut amounts: Vec<u64> = exact
        .iter()
        .zip(bids)
        .map(|(&x, b)| {
            // Guard against float noise just below a representable value.
            let x = x + 1e-6;
            let down = ((x / QUANTUM as f64).floor() as u64) * QUANTUM;
            down.clamp(b.floor.0, b.cap.0)
        })
        .collect();
    let used: u64 = amounts.iter().sum();
    let mut spare = capacity.0.saturating_sub(used) / QUANTUM;
    if spare > 0 {
        let mut order: Vec<(f64, usize)> = exact
            .iter()
            .zip(&amounts)
            .enumerate()
            .filter(|&(i, (&x, &a))| x - a as f64 > 1e-6 && a + QUANTUM <= bids[i].cap.0)
            .map(|(i, (&x, &a))| (x - a as f64, i))
            .collect();
        let by_remainder =
            |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        // Only the `spare` largest remainders get a unit: select those, then order them.
        let take = usize::try_from(spare)
            .unwrap_or(usize::MAX)
            .min(order.len());
        if take > 0 && take < order.len() {
            order.select_nth_unstable_by(take - 1, by_remainder);
            order.truncate(take);
        }
        order.sort_unstable_by(by_remainder);
        for (_, i) in order {
            if spare == 0 {
                break;
            }
            amounts[i] += QUANTUM;
            spare -= 1;
        }
    }
    amounts.into_iter().map(MilliCpu).collect()
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
