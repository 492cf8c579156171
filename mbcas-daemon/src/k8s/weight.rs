//! The weight lever in Kubernetes mode: a pod the market holds to its share
//! (rule 0) gets its pod cgroup's CPU weight lowered, not its limit.
//!
//! A quota caps a neighbour's average, not when it runs: held to 1 100 m, a
//! two-thread pod still takes both cores of a 2-core node for 55 ms of every
//! 100 ms, and a server that wakes in that time waits behind it (measured on
//! the real node: nginx's p99 under MBCAS's quota lever 16.5 ms, alone
//! 13.3 ms). A lowered weight lets every waking thread of the other pods
//! preempt the held pod at once, and the held pod keeps what they leave, with
//! no API write and no round in between. Local mode has done this since it
//! owns its cgroups ([`crate::local`]); here the kubelet owns the pod cgroup's
//! `cpu.shares` / `cpu.weight` and writes it when the pod is created and when
//! it carries out a resize — also a limits-only one (measured on 1.35: a held
//! pod's 64 shares back at 512 after each resize); the resize controller puts
//! the lowered weight back as soon as it sees the resize applied
//! ([`super::early::CgroupBook::reassert_weight`]), and a round that finds it
//! reset lowers it again. MBCAS puts the kubelet's weight back itself: when
//! the contention ends, when the loop stops, and — for a
//! daemon that died holding pods — at the first sight of a pod whose weight is
//! exactly what MBCAS would have lowered the kubelet's weight to
//! ([`left_lowered`]). A weight someone else changed (the kubelet after a
//! requests resize, an operator) is taken as the new original, never
//! overwritten with the old one.

use std::collections::{HashMap, HashSet};

use super::early::CgroupBook;
use crate::{
    cgroup::{CgroupDir, CgroupFsError, Hierarchy, files},
    error::error_chain,
    metrics::Metrics,
    units::{MilliCpu, PodKey},
};

/// What a held pod's weight is multiplied by (as local mode's, for the same
/// reasons: the held pods keep their weights' proportions among themselves).
pub const FACTOR: f64 = 1.0 / 8.0;

/// The weight the kubelet gives a pod cgroup for `request` (the pod's CPU
/// request), in v2's scale as [`files::read_weight`] returns it: `cpu.shares`
/// = request × 1024 / 1000 (at least 2) on v1; on v2 the kubelet's conversion
/// of those shares, `1 + (shares − 2) × 9999 / 262142`.
pub fn kubelet_weight(request: MilliCpu, h: Hierarchy) -> f64 {
    let shares = (request.get().saturating_mul(1024) / 1000).clamp(2, 262_144);
    match h {
        Hierarchy::V1 => shares as f64 * 100.0 / 1024.0,
        Hierarchy::V2 => (1 + (shares - 2) * 9999 / 262_142) as f64,
    }
}

/// What [`files::write_weight`] leaves in the cgroup (v2's scale) when asked
/// for `weight`.
pub fn as_written(weight: f64, h: Hierarchy) -> f64 {
    match h {
        Hierarchy::V2 => weight.round().clamp(1.0, 10_000.0),
        Hierarchy::V1 => (weight * 1024.0 / 100.0).round().clamp(2.0, 262_144.0) * 100.0 / 1024.0,
    }
}

/// Whether `current` is the weight MBCAS lowers the kubelet's weight for
/// `request` to (and not the kubelet's own): a pod a stopped daemon left held.
pub fn left_lowered(current: f64, request: MilliCpu, h: Hierarchy) -> bool {
    let kubelet = kubelet_weight(request, h);
    let lowered = as_written(kubelet * FACTOR, h);
    same(current, lowered) && !same(current, kubelet)
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

/// A pod whose weight MBCAS lowered.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lowered {
    /// Its weight before, put back when it is released.
    original: f64,
    /// What MBCAS wrote (as the cgroup holds it).
    written: f64,
    /// In the book the controller reads.
    shared: bool,
}

/// The pods whose weight is lowered now, and the pods seen since the start.
#[derive(Default)]
pub struct WeightLever {
    lowered: HashMap<PodKey, (CgroupDir, Lowered)>,
    seen: HashSet<PodKey>,
    metrics: Option<Metrics>,
    /// Where the controller finds the lowered weights, to put them back after
    /// the kubelet's resizes.
    book: Option<CgroupBook>,
}

impl WeightLever {
    pub fn new(metrics: Option<Metrics>) -> Self {
        if let Some(m) = &metrics {
            m.init_weight_writes();
        }
        Self {
            metrics,
            ..Self::default()
        }
    }

    /// Shares the lowered weights with the resize controller through `book`.
    pub fn set_book(&mut self, book: CgroupBook) {
        self.book = Some(book);
    }

    fn share(&self, key: &PodKey, weight: Option<f64>) {
        if let Some(b) = &self.book {
            b.set_lowered_weight(key.as_str(), weight);
        }
    }

    /// Whether the pod's weight is lowered now. At the first sight of a pod,
    /// adopts a weight a stopped daemon left lowered ([`left_lowered`]), so
    /// that it is put back when the pod is not held.
    pub fn lowered(&mut self, key: &PodKey, dir: &CgroupDir, request: MilliCpu) -> bool {
        if self.seen.insert(key.clone())
            && let Ok(current) = files::read_weight(&dir.path, dir.hierarchy)
            && left_lowered(current, request, dir.hierarchy)
        {
            let original = kubelet_weight(request, dir.hierarchy);
            tracing::info!(pod = %key, weight = current, kubelet = original, "weight left lowered by an earlier daemon; taken over");
            self.lowered.insert(
                key.clone(),
                (
                    dir.clone(),
                    Lowered {
                        original,
                        written: current,
                        shared: false,
                    },
                ),
            );
        }
        self.lowered.contains_key(key)
    }

    /// Forgets the pods not in `live` (gone from the node or from the
    /// managed set: their cgroups are gone, or no longer MBCAS's to weigh).
    pub fn retain(&mut self, live: impl Fn(&PodKey) -> bool) {
        let gone: Vec<PodKey> = self.lowered.keys().filter(|k| !live(k)).cloned().collect();
        for key in gone {
            // A pod opted out or excluded while held gets its weight back.
            self.release(&key, "no longer managed");
        }
        self.seen.retain(|k| live(k));
    }

    /// Lowers the pod's weight if `held` and it is not lowered, puts it back
    /// if not `held` and it is. A weight changed by someone else since MBCAS
    /// wrote it is taken as the new original.
    pub fn apply(&mut self, key: &PodKey, dir: &CgroupDir, held: bool) {
        match (held, self.lowered.get(key).map(|(_, l)| *l)) {
            (true, None) => self.lower(key, dir, None),
            (true, Some(l)) => {
                // Someone wrote its weight since and the controller did not
                // put it back (a requests resize, an operator): lowered again
                // from what they wrote.
                if let Ok(current) = files::read_weight(&dir.path, dir.hierarchy)
                    && !same(current, l.written)
                {
                    tracing::info!(pod = %key, weight = current, lowered = l.written, "weight changed by someone else while held");
                    self.lower(key, dir, Some(current));
                } else if !l.shared {
                    self.share(key, Some(l.written));
                    if let Some((_, l)) = self.lowered.get_mut(key) {
                        l.shared = true;
                    }
                }
            }
            (false, Some(_)) => self.release(key, "released"),
            (false, None) => {}
        }
    }

    /// Exports how many pods are held by their weight (once a round, after
    /// [`Self::retain`] and [`Self::apply`]).
    pub fn export(&self) {
        if let Some(m) = &self.metrics {
            m.set_weight_lowered_pods(self.lowered.len());
        }
    }

    /// Puts every lowered weight back (the loop stops).
    pub fn release_all(&mut self) {
        let keys: Vec<PodKey> = self.lowered.keys().cloned().collect();
        for key in keys {
            self.release(&key, "daemon stopping");
        }
        self.export();
    }

    fn lower(&mut self, key: &PodKey, dir: &CgroupDir, current: Option<f64>) {
        let original =
            match current.map_or_else(|| files::read_weight(&dir.path, dir.hierarchy), Ok) {
                Ok(w) => w,
                Err(e) => return self.failed(key, "read", &e),
            };
        match files::write_weight(&dir.path, dir.hierarchy, original * FACTOR) {
            Ok(written) => {
                tracing::info!(pod = %key, weight = written, original, "weight lowered");
                self.count("lowered");
                self.share(key, Some(written));
                self.lowered.insert(
                    key.clone(),
                    (
                        dir.clone(),
                        Lowered {
                            original,
                            written,
                            shared: true,
                        },
                    ),
                );
            }
            Err(e) => self.failed(key, "write", &e),
        }
    }

    fn release(&mut self, key: &PodKey, why: &str) {
        let Some((dir, l)) = self.lowered.remove(key) else {
            return;
        };
        self.share(key, None);
        match files::read_weight(&dir.path, dir.hierarchy) {
            Ok(current) if !same(current, l.written) => {
                // Someone else's value now: theirs stays.
                tracing::info!(pod = %key, weight = current, "weight changed by someone else; left as it is");
                return;
            }
            Err(CgroupFsError::Vanished { .. }) => return,
            _ => {}
        }
        match files::write_weight(&dir.path, dir.hierarchy, l.original) {
            Ok(written) => {
                tracing::info!(pod = %key, weight = written, why, "weight restored");
                self.count("restored");
            }
            Err(CgroupFsError::Vanished { .. }) => {}
            Err(e) => self.failed(key, "restore", &e),
        }
    }

    fn failed(&self, key: &PodKey, what: &str, e: &CgroupFsError) {
        if matches!(e, CgroupFsError::Vanished { .. }) {
            return;
        }
        tracing::warn!(pod = %key, error = %error_chain(e), "cannot {what} the pod cgroup's weight");
        self.count("failed");
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.inc_weight_write(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelets_weight_follows_its_conversion_of_the_request() {
        // 1000 m: 1024 shares; on v2 1 + 1022 × 9999 / 262142 = 39.
        assert_eq!(kubelet_weight(MilliCpu(1000), Hierarchy::V1), 100.0);
        assert_eq!(kubelet_weight(MilliCpu(1000), Hierarchy::V2), 39.0);
        // No request: 2 shares, weight 1.
        assert_eq!(
            kubelet_weight(MilliCpu(0), Hierarchy::V1),
            2.0 * 100.0 / 1024.0
        );
        assert_eq!(kubelet_weight(MilliCpu(0), Hierarchy::V2), 1.0);
        assert_eq!(kubelet_weight(MilliCpu(500), Hierarchy::V2), 20.0);
    }

    #[test]
    fn only_the_weight_mbcas_would_write_counts_as_left_lowered() {
        // v1, 500 m: 512 shares, lowered to 64.
        let l = 64.0 * 100.0 / 1024.0;
        assert!(left_lowered(l, MilliCpu(500), Hierarchy::V1));
        assert!(!left_lowered(
            512.0 * 100.0 / 1024.0,
            MilliCpu(500),
            Hierarchy::V1
        ));
        assert!(!left_lowered(
            65.0 * 100.0 / 1024.0,
            MilliCpu(500),
            Hierarchy::V1
        ));
        // v2, 500 m: weight 20, lowered to round(2.5) = 3 (rounded half away).
        assert!(left_lowered(3.0, MilliCpu(500), Hierarchy::V2));
        assert!(!left_lowered(20.0, MilliCpu(500), Hierarchy::V2));
        // A weight of 1 is the kubelet's own for a tiny request: never adopted.
        assert!(!left_lowered(1.0, MilliCpu(10), Hierarchy::V2));
    }

    fn pod_cgroup(shares: &str) -> (tempfile::TempDir, CgroupDir) {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cpu.shares"), shares).unwrap();
        let dir = CgroupDir {
            path: t.path().to_owned(),
            id: crate::units::CgroupId(0),
            hierarchy: Hierarchy::V1,
            usage_file: None,
        };
        (t, dir)
    }

    fn shares(d: &CgroupDir) -> String {
        std::fs::read_to_string(d.path.join("cpu.shares"))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_held_pod_is_lowered_once_and_restored_when_released() {
        let (_t, dir) = pod_cgroup("512\n");
        let key = PodKey::from("uid-1");
        let mut lever = WeightLever::default();
        assert!(!lever.lowered(&key, &dir, MilliCpu(500)));
        lever.apply(&key, &dir, true);
        assert_eq!(shares(&dir), "64");
        assert!(lever.lowered(&key, &dir, MilliCpu(500)));
        lever.apply(&key, &dir, true);
        assert_eq!(shares(&dir), "64");
        lever.apply(&key, &dir, false);
        assert_eq!(shares(&dir), "512");
        assert!(!lever.lowered(&key, &dir, MilliCpu(500)));
    }

    #[test]
    fn a_weight_someone_else_wrote_is_theirs() {
        let (_t, dir) = pod_cgroup("512\n");
        let key = PodKey::from("uid-1");
        let mut lever = WeightLever::default();
        lever.apply(&key, &dir, true);
        // The kubelet resized the pod's request to 1000 m while it was held.
        std::fs::write(dir.path.join("cpu.shares"), "1024").unwrap();
        lever.apply(&key, &dir, true);
        assert_eq!(shares(&dir), "128");
        lever.apply(&key, &dir, false);
        assert_eq!(shares(&dir), "1024");
        // Changed again by someone while held, then released: left alone.
        lever.apply(&key, &dir, true);
        std::fs::write(dir.path.join("cpu.shares"), "300").unwrap();
        lever.release_all();
        assert_eq!(shares(&dir), "300");
    }

    #[test]
    fn a_weight_left_lowered_by_a_stopped_daemon_is_put_back() {
        let (_t, dir) = pod_cgroup("64\n");
        let key = PodKey::from("uid-1");
        let mut lever = WeightLever::default();
        assert!(lever.lowered(&key, &dir, MilliCpu(500)));
        lever.apply(&key, &dir, false);
        assert_eq!(shares(&dir), "512");
        // A pod at some other low weight is not MBCAS's doing.
        let (_t2, other) = pod_cgroup("40\n");
        let key2 = PodKey::from("uid-2");
        assert!(!lever.lowered(&key2, &other, MilliCpu(500)));
        lever.apply(&key2, &other, false);
        assert_eq!(shares(&other), "40");
    }

    #[test]
    fn pods_no_longer_managed_get_their_weight_back_and_a_vanished_cgroup_is_no_error() {
        let (_t, dir) = pod_cgroup("512\n");
        let key = PodKey::from("uid-1");
        let mut lever = WeightLever::default();
        lever.apply(&key, &dir, true);
        lever.retain(|_| false);
        assert_eq!(shares(&dir), "512");
        let (t2, gone) = pod_cgroup("512\n");
        let key2 = PodKey::from("uid-2");
        lever.apply(&key2, &gone, true);
        drop(t2);
        lever.release_all();
        assert!(lever.lowered.is_empty());
    }
}
