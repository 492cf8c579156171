use proptest::prelude::*;

use super::*;

fn bid(key: &str, weight: f64, floor: u64, cap: u64, need: u64) -> Bid {
    Bid {
        key: key.into(),
        weight,
        floor: MilliCpu(floor),
        cap: MilliCpu(cap),
        need: MilliCpu(need),
    }
}

fn input(capacity: u64, surplus: Surplus, bids: Vec<Bid>) -> MarketInput {
    MarketInput {
        capacity: MilliCpu(capacity),
        surplus,
        bids,
    }
}

fn amounts(o: &MarketOutcome) -> Vec<u64> {
    o.allocations.iter().map(|a| a.amount.0).collect()
}

fn clear_ok(i: &MarketInput) -> MarketOutcome {
    clear(i).unwrap_or_else(|e| panic!("clear failed: {e}"))
}

#[test]
fn uncontended_gets_needs_with_hold() {
    let o = clear_ok(&input(
        4000,
        Surplus::Hold,
        vec![bid("a", 1.0, 100, 4000, 500), bid("b", 1.0, 100, 4000, 800)],
    ));
    assert_eq!(amounts(&o), vec![500, 800]);
    assert_eq!(o.price, 0.0);
    assert!(o.allocations.iter().all(|a| a.bound == Bound::Need));
}

#[test]
fn contended_shares_by_weight() {
    // Both want everything; weights 1:3 split 2000 m as 500:1500.
    let o = clear_ok(&input(
        2000,
        Surplus::Distribute,
        vec![
            bid("a", 100.0, 100, 2000, 2000),
            bid("b", 300.0, 100, 2000, 2000),
        ],
    ));
    assert_eq!(amounts(&o), vec![500, 1500]);
    assert!((o.price - 5.0).abs() < 1e-9, "price {}", o.price);
    assert!(!o.overcommitted);
}

#[test]
fn small_need_is_met_and_rest_shared() {
    let o = clear_ok(&input(
        2000,
        Surplus::Distribute,
        vec![
            bid("small", 1.0, 100, 2000, 200),
            bid("big1", 1.0, 100, 2000, 2000),
            bid("big2", 1.0, 100, 2000, 2000),
        ],
    ));
    assert_eq!(amounts(&o), vec![200, 900, 900]);
    assert_eq!(o.allocations[0].bound, Bound::Need);
    assert_eq!(o.allocations[1].bound, Bound::Level);
}

#[test]
fn surplus_distributed_by_weight_up_to_caps() {
    let o = clear_ok(&input(
        2000,
        Surplus::Distribute,
        vec![bid("a", 1.0, 100, 500, 200), bid("b", 1.0, 100, 2000, 200)],
    ));
    assert_eq!(amounts(&o), vec![500, 1500]);
    assert_eq!(o.allocations[0].bound, Bound::Cap);
    assert_eq!(o.allocations[1].bound, Bound::Level);
    assert!(o.surplus_level > 0.0);
}

#[test]
fn all_capped_when_caps_fit() {
    let o = clear_ok(&input(
        5000,
        Surplus::Distribute,
        vec![bid("a", 1.0, 100, 500, 200), bid("b", 1.0, 100, 700, 200)],
    ));
    assert_eq!(amounts(&o), vec![500, 700]);
}

#[test]
fn overcommit_keeps_floors_and_says_so() {
    let o = clear_ok(&input(
        500,
        Surplus::Distribute,
        vec![bid("a", 1.0, 300, 1000, 900), bid("b", 1.0, 400, 1000, 900)],
    ));
    assert!(o.overcommitted);
    assert_eq!(amounts(&o), vec![300, 400]);
    assert!(o.allocations.iter().all(|a| a.bound == Bound::Floor));
}

#[test]
fn floor_binds_under_contention() {
    // Weight says 1/11 of 1100 = 100, but the floor is 300.
    let o = clear_ok(&input(
        1100,
        Surplus::Distribute,
        vec![
            bid("a", 1.0, 300, 1100, 1100),
            bid("b", 10.0, 100, 1100, 1100),
        ],
    ));
    assert_eq!(amounts(&o), vec![300, 800]);
    assert_eq!(o.allocations[0].bound, Bound::Floor);
}

#[test]
fn invalid_bids_are_rejected() {
    let bad_weight = input(1000, Surplus::Hold, vec![bid("a", 0.0, 100, 200, 100)]);
    assert!(matches!(
        clear(&bad_weight),
        Err(MarketError::InvalidWeight { .. })
    ));
    let nan = input(1000, Surplus::Hold, vec![bid("a", f64::NAN, 100, 200, 100)]);
    assert!(matches!(
        clear(&nan),
        Err(MarketError::InvalidWeight { .. })
    ));
    let floor_cap = input(1000, Surplus::Hold, vec![bid("a", 1.0, 300, 200, 100)]);
    assert!(matches!(
        clear(&floor_cap),
        Err(MarketError::FloorAboveCap { .. })
    ));
    let dup = input(
        1000,
        Surplus::Hold,
        vec![bid("a", 1.0, 1, 2, 1), bid("a", 1.0, 1, 2, 1)],
    );
    assert!(matches!(clear(&dup), Err(MarketError::DuplicateKey { .. })));
}

#[test]
fn empty_market() {
    let o = clear_ok(&input(1000, Surplus::Distribute, vec![]));
    assert!(o.allocations.is_empty());
    assert!(!o.overcommitted);
}

#[test]
fn split_respects_requests_and_sums() {
    let parts = split_to_containers(
        MilliCpu(1000),
        &[MilliCpu(600), MilliCpu(200), MilliCpu(0)],
        &[MilliCpu(100), MilliCpu(100), MilliCpu(50)],
    );
    assert_eq!(parts.iter().map(|p| p.0).sum::<u64>(), 1000);
    assert!(parts[0] > parts[1]);
    assert_eq!(parts[2], MilliCpu(50));
    let under = split_to_containers(
        MilliCpu(100),
        &[MilliCpu(1), MilliCpu(1)],
        &[MilliCpu(80), MilliCpu(80)],
    );
    assert_eq!(under, vec![MilliCpu(80), MilliCpu(80)]);
    let no_need = split_to_containers(
        MilliCpu(300),
        &[MilliCpu(0), MilliCpu(0)],
        &[MilliCpu(100), MilliCpu(0)],
    );
    assert_eq!(no_need.iter().map(|p| p.0).sum::<u64>(), 300);
}

// ---------- properties ----------

fn arb_bid(i: usize) -> impl Strategy<Value = Bid> {
    (1u32..=4000, 0u64..=1000, 0u64..=3000, 0u64..=5000).prop_map(move |(w, f, extra, n)| Bid {
        key: PodKey::from(format!("p{i}")),
        weight: f64::from(w),
        floor: MilliCpu(f),
        cap: MilliCpu(f + extra),
        need: MilliCpu(n),
    })
}

fn arb_bids() -> impl Strategy<Value = Vec<Bid>> {
    (1usize..40).prop_flat_map(|n| (0..n).map(arb_bid).collect::<Vec<_>>())
}

fn arb_input() -> impl Strategy<Value = MarketInput> {
    (
        arb_bids(),
        0u64..60_000,
        prop_oneof![Just(Surplus::Distribute), Just(Surplus::Hold)],
    )
        .prop_map(|(bids, c, s)| input(c, s, bids))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn capacity_floors_caps_hold(inp in arb_input()) {
        let o = clear_ok(&inp);
        let floors: u64 = inp.bids.iter().map(|b| b.floor.0).sum();
        prop_assert_eq!(o.overcommitted, floors > inp.capacity.0);
        if !o.overcommitted {
            prop_assert!(o.total() <= inp.capacity, "total {} > {}", o.total(), inp.capacity);
        }
        for (a, b) in o.allocations.iter().zip(&inp.bids) {
            prop_assert!(a.amount >= b.floor && a.amount <= b.cap, "{:?} {:?}", a, b);
            prop_assert_eq!(&a.key, &b.key);
        }
    }

    #[test]
    fn quantisation_within_one_quantum(inp in arb_input()) {
        let o = clear_ok(&inp);
        for a in &o.allocations {
            prop_assert!((a.amount.0 as f64 - a.exact).abs() < QUANTUM as f64 + 1e-6, "{:?}", a);
        }
    }

    #[test]
    fn kkt_of_phase_one(inp in arb_input()) {
        let o = clear_ok(&inp);
        let targets: Vec<f64> = inp.bids.iter().map(|b| b.need.0.clamp(b.floor.0, b.cap.0) as f64).collect();
        let contended = !o.overcommitted && targets.iter().sum::<f64>() > inp.capacity.0 as f64;
        prop_assume!(contended);
        let lambda = o.price;
        let sum: f64 = o.allocations.iter().map(|a| a.exact).sum();
        prop_assert!((sum - inp.capacity.0 as f64).abs() < 1e-6 * (1.0 + sum), "Σx {} ≠ C", sum);
        for ((a, b), t) in o.allocations.iter().zip(&inp.bids).zip(&targets) {
            let f = b.floor.0 as f64;
            let ratio = a.exact / b.weight;
            let tol = 1e-7 * (1.0 + lambda);
            if a.exact > f + 1e-9 && a.exact < t - 1e-9 {
                // Interior: marginal utility wᵢ/xᵢ equals the common dual 1/λ.
                prop_assert!((ratio - lambda).abs() < tol, "interior ratio {} vs λ {}", ratio, lambda);
            } else if a.exact <= f + 1e-9 && f < *t {
                // At the floor: it would want less, i.e. λ·w ≤ f.
                prop_assert!(lambda * b.weight <= f + 1e-6, "floor pod above level");
            } else if a.exact >= t - 1e-9 && f < *t {
                // At its target: it would want more, i.e. λ·w ≥ t.
                prop_assert!(lambda * b.weight >= t - 1e-6, "target pod below level");
            }
        }
    }

    #[test]
    fn monotone_in_capacity(inp in arb_input(), extra in 0u64..5000) {
        let a = clear_ok(&inp);
        let mut more = inp.clone();
        more.capacity = MilliCpu(inp.capacity.0 + extra);
        let b = clear_ok(&more);
        for (x, y) in a.allocations.iter().zip(&b.allocations) {
            prop_assert!(y.exact + 1e-6 >= x.exact, "{} -> {}", x.exact, y.exact);
        }
    }

    #[test]
    fn monotone_in_own_weight(inp in arb_input(), pick in any::<prop::sample::Index>(), factor in 1.0f64..10.0) {
        let i = pick.index(inp.bids.len());
        let a = clear_ok(&inp);
        let mut heavier = inp.clone();
        heavier.bids[i].weight *= factor;
        let b = clear_ok(&heavier);
        prop_assert!(b.allocations[i].exact + 1e-6 >= a.allocations[i].exact);
    }

    #[test]
    fn permutation_invariant_and_deterministic(inp in arb_input(), seed in any::<u64>()) {
        let a = clear_ok(&inp);
        prop_assert_eq!(&a, &clear_ok(&inp));
        let mut shuffled = inp.clone();
        // Deterministic Fisher–Yates driven by the seed.
        let mut s = seed | 1;
        for i in (1..shuffled.bids.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            shuffled.bids.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let b = clear_ok(&shuffled);
        prop_assert!((a.price - b.price).abs() < 1e-9 * (1.0 + a.price));
        for x in &a.allocations {
            let y = b.allocations.iter().find(|y| y.key == x.key);
            prop_assert!(y.is_some());
            if let Some(y) = y {
                prop_assert!((x.exact - y.exact).abs() < 1e-6);
                // Quantised amounts may differ only where remainders tie.
                prop_assert!(x.amount.0.abs_diff(y.amount.0) <= QUANTUM);
            }
        }
    }

    #[test]
    fn split_sums_and_keeps_requests(total in 0u64..10_000, parts in prop::collection::vec((0u64..3000, 0u64..1000), 1..8)) {
        let needs: Vec<MilliCpu> = parts.iter().map(|p| MilliCpu(p.0)).collect();
        let reqs: Vec<MilliCpu> = parts.iter().map(|p| MilliCpu(p.1)).collect();
        let out = split_to_containers(MilliCpu(total), &needs, &reqs);
        let req_sum: u64 = reqs.iter().map(|r| r.0).sum();
        prop_assert_eq!(out.iter().map(|p| p.0).sum::<u64>(), total.max(req_sum));
        for (o, r) in out.iter().zip(&reqs) {
            prop_assert!(o >= r);
        }
    }
}

#[test]
fn event_keys_sort_by_level_then_enter_then_index() {
    let levels = [
        -1.5,
        -0.0,
        0.0,
        1e-300,
        0.5,
        1.0,
        3.25,
        1e300,
        f64::INFINITY,
    ];
    for w in levels.windows(2) {
        assert!(
            ordered_bits(w[0]) < ordered_bits(w[1]),
            "{} < {}",
            w[0],
            w[1]
        );
    }
    for &x in &levels {
        assert_eq!(from_ordered_bits(ordered_bits(x)).to_bits(), x.to_bits());
    }
    let mut keys = vec![
        event_key(2.0, false, 0),
        event_key(2.0, true, 7),
        event_key(1.0, false, 3),
        event_key(2.0, true, 1),
    ];
    keys.sort_unstable();
    let decoded: Vec<_> = keys.into_iter().map(event_of).collect();
    assert_eq!(
        decoded,
        [
            (1.0, false, 3),
            (2.0, true, 1),
            (2.0, true, 7),
            (2.0, false, 0)
        ]
    );
}
