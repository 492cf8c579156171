//! `mbcas solve` input: refused with a field named, or a market whose
//! allocations keep the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(input) = mbcas::solve::parse(text) else {
        return;
    };
    let Ok(out) = mbcas::market::clear(&input) else {
        return;
    };
    for a in &out.allocations {
        let Some(bid) = input.bids.iter().find(|b| b.key == a.key) else {
            panic!("{text}: allocation {a:?} for no bid");
        };
        assert!(
            a.amount >= bid.floor,
            "{text}: {a:?} below the floor of {bid:?}"
        );
        assert!(
            a.amount <= bid.cap.max(bid.floor),
            "{text}: {a:?} above the cap of {bid:?}"
        );
    }
});
