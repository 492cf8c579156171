//! What the pods MBCAS does not manage use, measured (pure).
//!
//! The market shares what the managed pods may use between them: the node's
//! allocatable CPU less what the unmanaged pods (Guaranteed, kube-system,
//! opted out, without a CPU limit, restarted on resize) use. A limit or a
//! request says what a pod may use or is promised, not what it uses: counted
//! by limits, an idle Guaranteed pod holding 1500 m of a 2-core node would
//! leave the managed pods 500 m, and a limitless hog counted at its request
//! would look like idle CPU. So each unmanaged pod is counted at the peak of
//! its measured use (its pod cgroup's usage counter), decaying with a
//! half-life of [`HALF_LIFE`]: a pod that bursts now and then keeps its bursts
//! counted for a while. In the round it is first seen it counts for nothing
//! (one reading is no rate; counting its limit instead shrank the capacity for
//! that round and set off the contention rule); while its cgroup cannot be
//! read, it counts for nothing for 15 s (a new pod's cgroup is found within
//! one rescan of the tree) and then at its limit (its request without one).
//!
//! An unmanaged pod that wakes is still protected by the kernel: its
//! `cpu.shares`/`cpu.weight` gives it its request's share of a busy node,
//! whatever the managed pods' limits, and the next round counts its use.

use std::time::Duration;

/// How fast a counted peak decays towards what the pod uses now.
pub const HALF_LIFE: Duration = Duration::from_secs(30);

/// One unmanaged pod's measured use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UseMeter {
    /// The last reading: when, and the usage counter (ns).
    last: Option<(Duration, u64)>,
    /// The decaying peak of its use, millicores; `None` before two readings.
    peak_m: Option<f64>,
}

impl UseMeter {
    /// Takes a reading of the usage counter at `at` (time since any fixed
    /// start); returns the use to count, millicores, once known. A counter
    /// that fell (the cgroup was recreated) starts the measurement again.
    pub fn observe(&mut self, at: Duration, usage_ns: u64) -> Option<f64> {
        let Some((before, used)) = self.last else {
            self.last = Some((at, usage_ns));
            return None;
        };
        let Some(window) = at.checked_sub(before).filter(|w| !w.is_zero()) else {
            // Read twice at one instant (or out of order): nothing new.
            return self.peak_m;
        };
        self.peak_m = usage_ns.checked_sub(used).map(|delta| {
            let rate = delta as f64 / window.as_nanos() as f64 * 1000.0;
            let decay = 0.5f64.powf(window.as_secs_f64() / HALF_LIFE.as_secs_f64());
            self.peak_m.map_or(rate, |p| rate.max(p * decay))
        });
        self.last = Some((at, usage_ns));
        self.peak_m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn counts_the_decaying_peak_of_measured_use() {
        let mut m = UseMeter::default();
        let at = Duration::from_secs;
        assert_eq!(m.observe(at(0), 0), None, "one reading says nothing");
        // 50 m for a second.
        assert_eq!(m.observe(at(1), S / 20), Some(50.0));
        // A 1 s burst at 1500 m is counted at once…
        assert_eq!(m.observe(at(2), S / 20 + 3 * S / 2), Some(1500.0));
        // …and half of it 30 s later, while the pod uses nothing.
        let later = m.observe(at(32), S / 20 + 3 * S / 2);
        assert!(later.is_some_and(|p| (p - 750.0).abs() < 1e-6), "{later:?}");
        // An idle pod is counted at what it uses once the burst has decayed.
        let mut idle = UseMeter::default();
        idle.observe(at(0), 7 * S);
        assert_eq!(idle.observe(at(10), 7 * S), Some(0.0));
    }

    #[test]
    fn a_recreated_cgroup_starts_again() {
        let mut m = UseMeter::default();
        let at = Duration::from_secs;
        m.observe(at(0), 0);
        assert_eq!(m.observe(at(1), S), Some(1000.0));
        assert_eq!(m.observe(at(2), 5), None, "the counter fell");
        assert_eq!(m.observe(at(3), 5 + S / 10), Some(100.0));
        // A reading at the same instant changes nothing, not even the base.
        assert_eq!(m.observe(at(3), 5 + S), Some(100.0));
        assert_eq!(m.observe(at(4), 5 + S / 5), Some(100.0));
    }
}
