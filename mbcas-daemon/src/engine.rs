//! One decision round: counters → demand → market → policy (pure).
//!
//! The same [`Engine`] drives local mode, the Kubernetes daemon and the
//! simulator: callers read counters and current limits however they can, call
//! [`Engine::step`] with the time, and actuate the changed decisions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    demand::{Counters, DemandConfig, DemandEstimate, DemandEstimator, Sample, ThrottleMemory},
    market::{self, Bid, Bound, MarketInput, Recent},
    policy::{
        Decision, Exclusion, PodView, Policy, PolicyConfig, Reason, SavedPodState, lendable_idle,
    },
    units::{KeyMap, KeySet, MilliCpu, PodKey},
};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineConfig {
    pub demand: DemandConfig,
    pub policy: PolicyConfig,
    /// The market's over-commit factor ρ (limits may add up to ρ × capacity).
    pub overcommit: f64,
    /// The soft node reserve, a fraction of capacity held back from what is lent.
    pub reserve: f64,
    /// How a pod that takes more than its share under contention is held to
    /// it (market rule 0): its quota (default), or its weight, which the mode
    /// lowers ([`Row::contended`]).
    pub lever: market::Lever,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            demand: DemandConfig::default(),
            policy: PolicyConfig::default(),
            overcommit: market::DEFAULT_OVERCOMMIT,
            reserve: 0.10,
            lever: market::Lever::Quota,
        }
    }
}

/// What the caller knows about the node this round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeInput {
    /// What the consumers may use between them (Kubernetes mode: allocatable
    /// less what the unmanaged pods use). The market's total weight is the
    /// consumers' own: whoever is not among them is out of the capacity too.
    pub capacity: MilliCpu,
}

impl NodeInput {
    pub fn new(capacity: MilliCpu) -> Self {
        Self { capacity }
    }
}

/// What the caller knows about one consumer this round.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerInput {
    pub key: PodKey,
    pub counters: Counters,
    /// The limit in effect now.
    pub current: MilliCpu,
    /// The limit when MBCAS first saw the consumer.
    pub original: MilliCpu,
    pub weight: f64,
    pub floor: MilliCpu,
    pub cap: MilliCpu,
    pub exclusion: Option<Exclusion>,
    /// The lowest limit the kernel enforced during the counters' window, when
    /// the caller knows it and it may differ from `current`: in Kubernetes mode
    /// the kubelet puts a resized quota into the cgroup about a second after
    /// the spec changes, so the window after a raise ran partly under the old
    /// limit. Throttling is charged to it; `None`: to `current`.
    pub window_limit: Option<MilliCpu>,
    /// Its weight is lowered now by the mode (the weight lever).
    pub demoted: bool,
}

/// The outcome for one consumer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub key: PodKey,
    /// `None` on the first sight (no window yet) or when counters went backwards.
    pub estimate: Option<DemandEstimate>,
    pub need: MilliCpu,
    pub allocation: MilliCpu,
    /// The market's base (`max(entitlement, fair level)`, quantised).
    pub base: MilliCpu,
    pub bound: Option<Bound>,
    /// Market rule 0: it takes more than its share of what is wanted now and
    /// is to be held to it (at this share, millicores).
    pub contended: Option<MilliCpu>,
    pub from: MilliCpu,
    pub to: MilliCpu,
    pub reason: Reason,
}

impl Row {
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepOutcome {
    pub price: f64,
    /// The market's contention level (rule 0); 0 when the node was not
    /// contended in the last window.
    pub contention_level: f64,
    pub overcommitted: bool,
    pub capacity: MilliCpu,
    /// What the limits may add up to.
    pub budget: MilliCpu,
    /// Idle CPU the market could lend this round.
    pub idle: MilliCpu,
    pub rows: Vec<Row>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Market(#[from] market::MarketError),
}

/// How long the engine remembers a consumer missing from its rounds: a pod
/// whose counters could not be read for a round (or a few) keeps its demand
/// history, throttle memory and the policy's state (cooldowns, holds), and
/// is not taken for a new one when it is back.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Memory {
    estimator: DemandEstimator,
    throttling: ThrottleMemory,
    last: Option<Counters>,
    last_estimate: Option<DemandEstimate>,
    /// The last round it was listed in.
    seen: Duration,
}

pub struct Engine {
    cfg: EngineConfig,
    policy: Policy,
    memory: KeyMap<Memory>,
}

/// One consumer's decision state as saved across daemon restarts (see
/// [`Engine::save`]): its demand history, throttle memory and the policy's
/// state. Its last counters are not kept: their timestamps are the old
/// process's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedConsumer {
    pub key: String,
    pub estimator: DemandEstimator,
    pub throttling: ThrottleMemory,
    pub last_estimate: Option<DemandEstimate>,
    pub policy: Option<SavedPodState>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            policy: Policy::new(cfg.policy),
            memory: KeyMap::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Every remembered consumer's decision state at `now`, by key.
    pub fn save(&self, now: Duration) -> Vec<SavedConsumer> {
        let mut saved: Vec<SavedConsumer> = self
            .memory
            .iter()
            .map(|(key, m)| SavedConsumer {
                key: key.as_str().to_owned(),
                estimator: m.estimator.clone(),
                throttling: m.throttling,
                last_estimate: m.last_estimate,
                policy: self.policy.save_pod(key, now),
            })
            .collect();
        saved.sort_by(|a, b| a.key.cmp(&b.key));
        saved
    }

    /// Takes back the state of consumers it does not know yet, saved `age`
    /// ago; returns how many. A consumer's first round after it is then a
    /// round like any other: its last estimate stands until a window is
    /// measured, and no warm-up holds it. Consumers that are not listed in
    /// the rounds are forgotten after [`FORGET_AFTER`] as usual.
    pub fn restore(&mut self, saved: Vec<SavedConsumer>, now: Duration, age: Duration) -> usize {
        let mut n = 0;
        for s in saved {
            let key = PodKey::from(s.key.as_str());
            if self.memory.contains_key(&key) {
                continue;
            }
            let policy = s.policy.unwrap_or(SavedPodState {
                since_change: None,
                capped: false,
                cap_pending: false,
                since_decrease: None,
                cooldown: Duration::ZERO,
            });
            self.policy.restore_pod(key.clone(), &policy, now, age);
            self.memory.insert(
                key,
                Memory {
                    estimator: s.estimator,
                    throttling: s.throttling,
                    last: None,
                    last_estimate: s.last_estimate,
                    seen: now,
                },
            );
            n += 1;
        }
        n
    }

    /// Runs one round. Consumers absent from `inputs` for longer than
    /// [`FORGET_AFTER`] are forgotten.
    pub fn step(
        &mut self,
        now: Duration,
        node: &NodeInput,
        inputs: &[ConsumerInput],
    ) -> Result<StepOutcome, EngineError> {
        let capacity = node.capacity;
        // Forget consumers not listed for a while. After the inserts below the
        // memory holds every listed key, so it holds exactly those when the
        // sizes match and no key was new: then (the common case) nothing needs
        // pruning.
        let mut new_keys = false;
        for inp in inputs {
            match self.memory.get_mut(&inp.key) {
                Some(mem) => mem.seen = now,
                None => {
                    let mem = Memory {
                        seen: now,
                        ..Memory::default()
                    };
                    self.memory.insert(inp.key.clone(), mem);
                    new_keys = true;
                }
            }
        }
        if new_keys || self.memory.len() != inputs.len() {
            self.memory
                .retain(|_, m| now.saturating_sub(m.seen) <= FORGET_AFTER);
            let kept: KeySet = self.memory.keys().collect();
            self.policy.retain(kept);
        }
        let mut estimates = Vec::with_capacity(inputs.len());
        // Whether this round measured a window of the consumer.
        let mut fresh = Vec::with_capacity(inputs.len());
        let mut throttling = Vec::with_capacity(inputs.len());
        let target = self.cfg.policy.throttled_threshold;
        for inp in inputs {
            let Some(mem) = self.memory.get_mut(&inp.key) else {
                fresh.push(false);
                estimates.push(None);
                throttling.push(ThrottleMemory::default());
                continue;
            };
            let est = match mem.last.map(|prev| Sample::new(&prev, &inp.counters)) {
                Some(Ok(sample)) => {
                    let e = mem.estimator.update(&sample, &self.cfg.demand);
                    // Charged to a limit just raised, the periods throttled
                    // under the old one would teach a need of twice the new
                    // limit, and raise after raise run to the cap (seen on a
                    // real node: 800m → 1520m → 2280m → 3420m for 450m of use).
                    let limit = inp.window_limit.map_or(inp.current, |w| w.min(inp.current));
                    mem.throttling.update(
                        limit,
                        sample.nr_periods,
                        sample.nr_throttled,
                        target,
                        sample.window_secs(),
                    );
                    Some(e)
                }
                Some(Err(e)) => {
                    tracing::debug!(consumer = %inp.key, error = %e, "counters not usable this round");
                    None
                }
                None => None,
            };
            mem.last = Some(inp.counters);
            if est.is_some() {
                mem.last_estimate = est;
            }
            fresh.push(est.is_some());
            estimates.push(est.or(mem.last_estimate));
            throttling.push(mem.throttling);
        }
        // Excluded consumers keep their limits and do not bid; their weight
        // counts in the entitlements, as cpu.weight counts every group.
        let needs: Vec<MilliCpu> = inputs
            .iter()
            .zip(&estimates)
            .zip(&throttling)
            .map(|((inp, e), t)| e.map_or(inp.current, |e| t.need(e.need)))
            .collect();
        let bidders: Vec<usize> = (0..inputs.len())
            .filter(|&i| inputs[i].exclusion.is_none())
            .collect();
        let bids: Vec<Bid> = bidders
            .iter()
            .map(|&i| {
                let inp = &inputs[i];
                let demand = estimates[i].map_or(inp.current, |e| {
                    MilliCpu(e.smoothed.max(0.0).ceil().min(u64::MAX as f64) as u64)
                });
                Bid {
                    key: inp.key.clone(),
                    weight: inp.weight,
                    floor: inp.floor.min(inp.cap),
                    cap: inp.cap,
                    demand,
                    need: needs[i],
                    // The last window alone: who contends now. A consumer
                    // not yet measured wants what its limit lets it use.
                    recent: Some({
                        let m = |x: f64| MilliCpu(x.max(0.0).ceil().min(u64::MAX as f64) as u64);
                        Recent {
                            demand: estimates[i].map_or(inp.current, |e| m(e.raw)),
                            usage: estimates[i].map_or(inp.current, |e| m(e.usage)),
                            limit: inp.current,
                            lever: self.cfg.lever,
                            demoted: inp.demoted,
                        }
                    }),
                }
            })
            .collect();
        // What the bidders used over the last window (their limit when unknown).
        let usage: f64 = bidders
            .iter()
            .map(|&i| estimates[i].map_or(inputs[i].current.0 as f64, |e| e.usage))
            .sum();
        let idle = lendable_idle(capacity, usage, self.cfg.reserve);
        let total_weight: f64 = inputs
            .iter()
            .filter(|i| i.weight.is_finite() && i.weight > 0.0)
            .map(|i| i.weight)
            .sum::<f64>();
        let outcome = market::clear(&MarketInput {
            capacity,
            total_weight: Some(total_weight),
            idle,
            overcommit: self.cfg.overcommit,
            bids,
        })?;
        let mut alloc: Vec<Option<&market::Allocation>> = vec![None; inputs.len()];
        for (&i, a) in bidders.iter().zip(&outcome.allocations) {
            alloc[i] = Some(a);
        }
        let views: Vec<PodView> = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| PodView {
                key: inp.key.clone(),
                current: inp.current,
                original: inp.original,
                floor: inp.floor,
                proposed: alloc[i].map_or(inp.current, |a| a.amount),
                base: alloc[i].map_or(inp.current, |a| a.base),
                need: needs[i],
                peak: estimates[i].map_or(inp.current, |e| {
                    MilliCpu(e.peak.max(0.0).ceil().min(u64::MAX as f64) as u64)
                }),
                used: estimates[i].map_or(inp.current, |e| {
                    MilliCpu(e.usage.max(0.0).ceil().min(u64::MAX as f64) as u64)
                }),
                throttled_ratio: estimates[i].map_or(0.0, |e| e.throttled_ratio),
                samples: estimates[i].map_or(0, |e| e.samples),
                saturated: idle == MilliCpu::ZERO,
                contended: alloc[i].is_some_and(|a| a.bound == Bound::Contention),
                exclusion: inp.exclusion,
            })
            .collect();
        // Before the first full window nothing is known: hold. Nor is a limit
        // changed in a round that measured no window of the consumer (its
        // first round after a restart, its state taken back; a counter
        // reset): the mode's view of the node may be as new as the process
        // (on the real node a restarted daemon counted the unmanaged pods it
        // had not read twice yet at 0 m and lent their CPU: 720 → 1180 m).
        let mut decisions: Vec<Decision> = self.policy.decide(now, outcome.budget, &views);
        for (i, d) in decisions.iter_mut().enumerate() {
            if !fresh[i] && d.changed() && d.reason != Reason::BelowFloor {
                d.to = d.from;
                d.reason = Reason::WarmUp;
            }
        }
        let rows = inputs
            .iter()
            .zip(decisions)
            .enumerate()
            .map(|(i, (inp, d))| Row {
                key: inp.key.clone(),
                estimate: estimates[i],
                need: needs[i],
                allocation: alloc[i].map_or(inp.current, |a| a.amount),
                base: alloc[i].map_or(inp.current, |a| a.base),
                bound: alloc[i].map(|a| a.bound),
                contended: alloc[i]
                    .and_then(|a| a.contended)
                    .map(|y| MilliCpu(y.max(0.0).ceil() as u64)),
                from: d.from,
                to: d.to,
                reason: d.reason,
            })
            .collect();
        Ok(StepOutcome {
            price: outcome.price,
            contention_level: outcome.contention_level,
            overcommitted: outcome.overcommitted,
            capacity,
            budget: outcome.budget,
            idle,
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(key: &str, c: Counters, current: u64) -> ConsumerInput {
        ConsumerInput {
            key: key.into(),
            counters: c,
            current: MilliCpu(current),
            original: MilliCpu(200),
            weight: 100.0,
            floor: MilliCpu(100),
            cap: MilliCpu(2000),
            exclusion: None,
            window_limit: None,
            demoted: false,
        }
    }

    fn counters(
        t_s: u64,
        usage_ms: u64,
        throttled_ms: u64,
        periods: u64,
        throttled: u64,
    ) -> Counters {
        Counters {
            at_ns: t_s * 1_000_000_000,
            usage_ns: usage_ms * 1_000_000,
            throttled_ns: throttled_ms * 1_000_000,
            nr_periods: periods,
            nr_throttled: throttled,
            psi_some_ns: None,
            wait_ns: None,
        }
    }

    #[test]
    fn throttled_consumer_gets_more_after_the_first_window() {
        let mut e = Engine::new(EngineConfig::default());
        let first = e.step(
            Duration::from_secs(0),
            &NodeInput::new(MilliCpu(2000)),
            &[input("a", counters(0, 0, 0, 0, 0), 200)],
        );
        let first = first.unwrap();
        assert!(
            !first.rows[0].changed(),
            "nothing is known before the first window"
        );
        // One second at the 200 m quota, held back 800 ms: demand 1000 m.
        let second = e
            .step(
                Duration::from_secs(1),
                &NodeInput::new(MilliCpu(2000)),
                &[input("a", counters(1, 200, 800, 10, 10), 200)],
            )
            .unwrap();
        let r = &second.rows[0];
        // 1000 m of demand, 5 % headroom.
        assert_eq!(r.need, MilliCpu(1050));
        // Alone on the node its entitlement is the whole node: its quota must
        // not bind before cpu.weight would, so it goes there at once.
        assert!(
            r.changed() && r.to == MilliCpu(2000),
            "fair-share increase: {r:?}"
        );
        assert_eq!(r.reason, Reason::IncreaseThrottled);
    }

    #[test]
    fn throttling_is_charged_to_the_limit_the_window_ran_under() {
        let mut e = Engine::new(EngineConfig::default());
        let node = NodeInput::new(MilliCpu(2000));
        let step = |e: &mut Engine, t: u64, c: Counters, current: u64, window: Option<u64>| {
            let mut i = input("a", c, current);
            i.window_limit = window.map(MilliCpu);
            e.step(Duration::from_secs(t), &node, &[i]).unwrap().rows[0].clone()
        };
        step(&mut e, 0, counters(0, 0, 0, 0, 0), 300, None);
        // Fully throttled under 300 m: the memory learns 2 × 300 m.
        let r = step(&mut e, 1, counters(1, 300, 700, 10, 10), 300, None);
        assert!(r.need >= MilliCpu(600), "{r:?}");
        // Raised to 1300 m in the spec; the kernel still enforced 300 m for
        // part of the next window, whose throttled periods are the old limit's.
        let r = step(&mut e, 2, counters(2, 750, 900, 20, 16), 1300, Some(300));
        assert!(
            r.need < MilliCpu(1300),
            "stale throttling must not teach 2 × 1300 m: {r:?}"
        );
        // Throttled under 1300 m itself: that is learnt.
        let r = step(&mut e, 6, counters(6, 5950, 3900, 60, 56), 1300, Some(1300));
        assert!(r.need >= MilliCpu(2600), "{r:?}");
    }

    #[test]
    fn excluded_consumers_do_not_bid_and_keep_limits() {
        let mut e = Engine::new(EngineConfig::default());
        let mut x = input("x", counters(0, 0, 0, 0, 0), 500);
        x.exclusion = Some(Exclusion::Guaranteed);
        let out = e
            .step(Duration::ZERO, &NodeInput::new(MilliCpu(1000)), &[x])
            .unwrap();
        assert_eq!(out.rows[0].reason, Reason::ExcludedGuaranteed);
        assert_eq!(out.rows[0].bound, None);
    }

    #[test]
    fn counter_reset_keeps_the_last_estimate() {
        let mut e = Engine::new(EngineConfig::default());
        let _ = e.step(
            Duration::ZERO,
            &NodeInput::new(MilliCpu(2000)),
            &[input("a", counters(0, 0, 0, 0, 0), 500)],
        );
        let ok = e.step(
            Duration::from_secs(1),
            &NodeInput::new(MilliCpu(2000)),
            &[input("a", counters(1, 300, 0, 10, 0), 500)],
        );
        let need = ok.map(|o| o.rows[0].need).unwrap_or_default();
        // Counters went backwards (the cgroup was recreated): no new sample.
        let reset = e
            .step(
                Duration::from_secs(2),
                &NodeInput::new(MilliCpu(2000)),
                &[input("a", counters(2, 10, 0, 1, 0), 500)],
            )
            .unwrap();
        assert_eq!(reset.rows[0].need, need);
    }

    #[test]
    fn saved_state_survives_a_restart() {
        let node = NodeInput::new(MilliCpu(2000));
        let mut a = Engine::new(EngineConfig::default());
        // Throttled under 300 m for a few rounds: raised, with a throttle
        // memory and a demand history.
        let mut current = 300;
        for t in 0..6 {
            let c = counters(t, 300 * t, 700 * t, 10 * t, 10 * t);
            let out = a
                .step(Duration::from_secs(t), &node, &[input("a", c, current)])
                .unwrap();
            current = out.rows[0].to.get();
        }
        let saved = a.save(Duration::from_secs(5));
        assert_eq!(saved.len(), 1);
        let p = saved[0].policy.clone().unwrap();
        assert!(p.since_change.is_some(), "{p:?}");
        let json = serde_json::to_string(&saved).unwrap();
        let back: Vec<SavedConsumer> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        // A new process, 3 s later, its clock at 0: the consumer goes on
        // where it was (the last estimate stands, no limit changes before a
        // window is measured)…
        let mut b = Engine::new(EngineConfig::default());
        assert_eq!(
            b.restore(back.clone(), Duration::ZERO, Duration::from_secs(3)),
            1
        );
        let out = b
            .step(
                Duration::ZERO,
                &node,
                &[input("a", counters(100, 0, 0, 0, 0), current)],
            )
            .unwrap();
        let r = &out.rows[0];
        assert_eq!(r.estimate, saved[0].last_estimate, "{r:?}");
        assert_eq!(
            r.to,
            MilliCpu(current),
            "a restart alone changes no limit: {r:?}"
        );
        // The restart counts as a change with the longest cooldown: nothing
        // is lowered for max_cooldown.
        let cfg = EngineConfig::default().policy;
        assert_eq!(b.policy.cooldown_of(&"a".into()), cfg.max_cooldown);
        // The next window adds to the history.
        let out = b
            .step(
                Duration::from_secs(1),
                &node,
                &[input("a", counters(101, 300, 700, 10, 10), current)],
            )
            .unwrap();
        let samples = |e: Option<DemandEstimate>| e.map(|e| e.samples);
        assert_eq!(
            samples(out.rows[0].estimate),
            samples(saved[0].last_estimate).map(|n| n + 1)
        );
        // …whereas without the state it would be a new consumer.
        let mut fresh = Engine::new(EngineConfig::default());
        let out = fresh
            .step(
                Duration::ZERO,
                &node,
                &[input("a", counters(100, 0, 0, 0, 0), current)],
            )
            .unwrap();
        assert_eq!(out.rows[0].estimate, None);
        // Known consumers are not overwritten.
        assert_eq!(b.restore(back, Duration::ZERO, Duration::ZERO), 0);
    }

    #[test]
    fn consumers_missing_a_round_are_kept_and_gone_ones_forgotten() {
        let mut e = Engine::new(EngineConfig::default());
        let step = |e: &mut Engine, t: u64, keys: &[&str]| {
            let inputs: Vec<ConsumerInput> = keys
                .iter()
                .map(|k| input(k, counters(t, 100 * t, 0, 10 * t, 0), 500))
                .collect();
            e.step(
                Duration::from_secs(t),
                &NodeInput::new(MilliCpu(2000)),
                &inputs,
            )
            .unwrap()
        };
        let _ = step(&mut e, 0, &["a", "b"]);
        let both = step(&mut e, 1, &["a", "b"]);
        assert!(both.rows.iter().all(|r| r.estimate.is_some()), "{both:?}");
        let samples = both.rows[1].estimate.map(|e| e.samples);
        // b unreadable for a round (c is new): b is remembered, its history
        // goes on over the longer window.
        let swapped = step(&mut e, 2, &["a", "c"]);
        assert!(swapped.rows[0].estimate.is_some() && swapped.rows[1].estimate.is_none());
        let back = step(&mut e, 3, &["a", "b", "c"]);
        assert_eq!(
            back.rows[1].estimate.map(|e| e.samples),
            samples.map(|n| n + 1),
            "b goes on: {:?}",
            back.rows[1]
        );
        assert!(back.rows[2].estimate.is_some());
        // Gone for longer than FORGET_AFTER: forgotten, a new one when back.
        let t = 4 + FORGET_AFTER.as_secs();
        let fewer = step(&mut e, t, &["c"]);
        let again = step(&mut e, t + 1, &["a", "c"]);
        assert!(fewer.rows[0].estimate.is_some() && again.rows[0].estimate.is_none());
        assert_eq!(e.memory.len(), 2, "b forgotten too");
    }
}
