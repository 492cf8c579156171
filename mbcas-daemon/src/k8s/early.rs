//! The kernel first: an increase goes into the pod's cgroups as soon as the
//! API server accepted the resize, not a kubelet pass later.
//!
//! The kubelet applies an accepted resize a pass later (bench-node on the
//! test node: MBCAS's decision → the kubelet's quota in the cgroup p50
//! 0.24 s, p99 1.65 s; a PATCH by hand → quota p50 1.0 s). For
//! increases only, the controller writes the same quotas itself: the pod's
//! cgroup first (on cgroup v1 a child's quota may not exceed its parent's),
//! then each raised container's. The pod's quota grows by what its
//! containers' quotas grow, so it keeps whatever the kubelet adds on top
//! (init containers, overhead), and only when it has one. The kubelet then
//! writes the same values. Decreases are the kubelet's alone. When the kubelet
//! does not carry the resize out (Deferred, Infeasible, Error) the values
//! written are put back, containers first, where nobody changed them since.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use crate::{
    cgroup::{
        CgroupDir, CgroupFsError, Hierarchy,
        files::{self, Quota},
    },
    units::MilliCpu,
};

/// A pod's cgroups as the decision loop resolved them.
#[derive(Clone, Debug)]
pub struct PodCgroups {
    pub pod: CgroupDir,
    /// By container name.
    pub containers: Vec<(String, CgroupDir)>,
    /// The pod cgroup's weight as the weight lever lowered it (v2's scale),
    /// while it is lowered ([`super::weight`]).
    pub lowered_weight: Option<f64>,
}

/// The cgroups of the node's managed pods by pod UID: the decision loop
/// fills it, the controller reads it.
#[derive(Clone, Debug, Default)]
pub struct CgroupBook(Arc<RwLock<HashMap<String, PodCgroups>>>);

impl CgroupBook {
    /// Records a pod's cgroup and its containers' (name, cgroup); writes
    /// only when they changed (the decision loop calls it every round).
    pub fn record<'a>(
        &self,
        uid: &str,
        pod: &CgroupDir,
        containers: impl Iterator<Item = (&'a str, &'a CgroupDir)> + Clone,
    ) {
        let same = self.0.read().ok().is_some_and(|m| {
            m.get(uid).is_some_and(|known| {
                known.pod == *pod
                    && known.containers.len() == containers.clone().count()
                    && known
                        .containers
                        .iter()
                        .zip(containers.clone())
                        .all(|((n, d), (name, dir))| n == name && d == dir)
            })
        });
        if same {
            return;
        }
        if let Ok(mut m) = self.0.write() {
            let lowered_weight = m.get(uid).and_then(|k| k.lowered_weight);
            m.insert(
                uid.to_owned(),
                PodCgroups {
                    pod: pod.clone(),
                    containers: containers.map(|(n, d)| (n.to_owned(), d.clone())).collect(),
                    lowered_weight,
                },
            );
        }
    }

    /// Records the weight the weight lever holds the pod's cgroup at
    /// (`None`: not lowered).
    pub fn set_lowered_weight(&self, uid: &str, weight: Option<f64>) {
        if let Ok(mut m) = self.0.write()
            && let Some(known) = m.get_mut(uid)
        {
            known.lowered_weight = weight;
        }
    }

    /// Writes the lowered weight back into the pod's cgroup when it differs:
    /// the kubelet resets the pod cgroup's weight from the requests when it
    /// carries out a resize (measured on 1.35: a limits-only resize of a held
    /// pod put its 64 shares back to 512), so the controller calls this as
    /// soon as it sees a resize applied. The weight written, if it wrote.
    pub fn reassert_weight(&self, uid: &str) -> Result<Option<f64>, CgroupFsError> {
        let Some(PodCgroups {
            pod,
            lowered_weight: Some(lowered),
            ..
        }) = self.get(uid)
        else {
            return Ok(None);
        };
        let now = files::read_weight(&pod.path, pod.hierarchy)?;
        if (now - lowered).abs() < 1e-6 {
            return Ok(None);
        }
        files::write_weight(&pod.path, pod.hierarchy, lowered).map(Some)
    }

    pub fn get(&self, uid: &str) -> Option<PodCgroups> {
        self.0.read().ok()?.get(uid).cloned()
    }

    /// Keeps the pods `keep` says yes to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut m) = self.0.write() {
            m.retain(|uid, _| keep(uid));
        }
    }

    pub fn len(&self) -> usize {
        self.0.read().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One cgroup's quota before and after an early write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub hierarchy: Hierarchy,
    pub before: Quota,
    pub after: Quota,
}

/// The raised quotas, from the current ones: `pod`'s, each container's by
/// name, and the resize's new limits. Containers without a quota (the kubelet
/// sets none without a limit) and limits not above the quota are left out;
/// the pod's quota, when it has one, grows by what the containers' grow.
pub fn plan_raise(
    pod: Quota,
    containers: &[(String, Quota)],
    changes: &[(String, MilliCpu)],
) -> (Option<Quota>, Vec<(String, Quota)>) {
    let mut raised = Vec::new();
    let mut added_m = 0.0;
    for (name, limit) in changes {
        let Some((_, q)) = containers.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let Some(now_us) = q.quota_us else { continue };
        let new = Quota::from_millicores(*limit, q.period_us);
        let Some(new_us) = new.quota_us.filter(|&us| us > now_us) else {
            continue;
        };
        added_m += (new_us - now_us) as f64 * 1000.0 / q.period_us as f64;
        raised.push((name.clone(), new));
    }
    let pod = match pod.quota_us {
        Some(us) if added_m > 0.0 => {
            let add = (added_m * pod.period_us as f64 / 1000.0).ceil() as u64;
            Some(Quota {
                quota_us: Some(us.saturating_add(add)),
                period_us: pod.period_us,
            })
        }
        _ => None,
    };
    (pod, raised)
}

/// Writes the raised quotas of `changes` into `cg` (the pod's first);
/// returns what it wrote, in order. A failed write puts back what this call
/// wrote before it.
pub fn raise(
    cg: &PodCgroups,
    changes: &[(String, MilliCpu)],
) -> Result<Vec<Written>, CgroupFsError> {
    let pod_now = files::read_quota(&cg.pod.path, cg.pod.hierarchy)?;
    let mut now = Vec::with_capacity(cg.containers.len());
    for (name, dir) in &cg.containers {
        if changes.iter().any(|(n, _)| n == name) {
            now.push((name.clone(), files::read_quota(&dir.path, dir.hierarchy)?));
        }
    }
    let (pod_new, raised) = plan_raise(pod_now, &now, changes);
    let mut steps = Vec::with_capacity(raised.len() + 1);
    if let Some(after) = pod_new {
        steps.push(Written {
            path: cg.pod.path.clone(),
            hierarchy: cg.pod.hierarchy,
            before: pod_now,
            after,
        });
    }
    for (name, after) in raised {
        let Some((_, dir)) = cg.containers.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let Some((_, before)) = now.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        steps.push(Written {
            path: dir.path.clone(),
            hierarchy: dir.hierarchy,
            before: *before,
            after,
        });
    }
    let mut done: Vec<Written> = Vec::with_capacity(steps.len());
    for w in steps {
        if let Err(e) = files::write_quota(&w.path, w.hierarchy, w.after) {
            revert(&done);
            return Err(e);
        }
        done.push(w);
    }
    Ok(done)
}

/// Puts back what [`raise`] wrote, in reverse order (containers first),
/// where the quota is still what it wrote; returns how many it put back.
pub fn revert(written: &[Written]) -> usize {
    let mut n = 0;
    for w in written.iter().rev() {
        match files::read_quota(&w.path, w.hierarchy) {
            Ok(q) if q == w.after => match files::write_quota(&w.path, w.hierarchy, w.before) {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(cgroup = %w.path.display(), error = %crate::error::error_chain(&e), "could not put the quota back");
                }
            },
            // Changed since (the kubelet applied a resize) or gone.
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::CgroupId;

    fn q(us: Option<u64>) -> Quota {
        Quota {
            quota_us: us,
            period_us: 100_000,
        }
    }

    #[test]
    fn the_pod_grows_by_what_its_raised_containers_grow() {
        // app 200 m → 500 m, sidecar stays at 100 m; the pod had 300 m + 50 m
        // of overhead.
        let (pod, raised) = plan_raise(
            q(Some(35_000)),
            &[
                ("app".into(), q(Some(20_000))),
                ("sidecar".into(), q(Some(10_000))),
            ],
            &[
                ("app".into(), MilliCpu(500)),
                ("sidecar".into(), MilliCpu(100)),
            ],
        );
        assert_eq!(pod, Some(q(Some(65_000))));
        assert_eq!(raised, vec![("app".to_owned(), q(Some(50_000)))]);
    }

    #[test]
    fn decreases_and_unlimited_cgroups_are_left_to_the_kubelet() {
        let (pod, raised) = plan_raise(
            q(Some(30_000)),
            &[("app".into(), q(Some(30_000)))],
            &[("app".into(), MilliCpu(200))],
        );
        assert_eq!((pod, raised), (None, vec![]));
        // A container without a quota, a container not in the pod.
        let (pod, raised) = plan_raise(
            q(Some(30_000)),
            &[("app".into(), q(None))],
            &[
                ("app".into(), MilliCpu(900)),
                ("ghost".into(), MilliCpu(900)),
            ],
        );
        assert_eq!((pod, raised), (None, vec![]));
        // A pod without a quota: only the container.
        let (pod, raised) = plan_raise(
            q(None),
            &[("app".into(), q(Some(30_000)))],
            &[("app".into(), MilliCpu(900))],
        );
        assert_eq!(pod, None);
        assert_eq!(raised, vec![("app".to_owned(), q(Some(90_000)))]);
    }

    #[test]
    fn periods_other_than_the_kubelets_are_kept() {
        let (pod, raised) = plan_raise(
            Quota {
                quota_us: Some(10_000),
                period_us: 50_000,
            },
            &[(
                "app".into(),
                Quota {
                    quota_us: Some(20_000),
                    period_us: 100_000,
                },
            )],
            &[("app".into(), MilliCpu(400))],
        );
        // +200 m: 10 ms more per 50 ms period on the pod.
        assert_eq!(
            pod,
            Some(Quota {
                quota_us: Some(20_000),
                period_us: 50_000
            })
        );
        assert_eq!(raised[0].1.quota_us, Some(40_000));
    }

    fn tree() -> (tempfile::TempDir, PodCgroups) {
        let tmp = tempfile::tempdir().unwrap();
        let pod = tmp.path().join("pod");
        let app = pod.join("app");
        std::fs::create_dir_all(&app).unwrap();
        for (dir, quota) in [(&pod, "30000"), (&app, "20000")] {
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota).unwrap();
            std::fs::write(dir.join("cpu.cfs_period_us"), "100000").unwrap();
        }
        let dir = |path: &std::path::Path| CgroupDir {
            path: path.to_owned(),
            id: CgroupId(0),
            hierarchy: Hierarchy::V1,
            usage_file: None,
        };
        let cg = PodCgroups {
            pod: dir(&pod),
            containers: vec![("app".into(), dir(&app))],
            lowered_weight: None,
        };
        (tmp, cg)
    }

    #[test]
    fn the_book_keeps_the_latest_cgroups_of_each_pod() {
        let (_tmp, cg) = tree();
        let book = CgroupBook::default();
        fn parts(cg: &PodCgroups) -> Vec<(&str, &CgroupDir)> {
            cg.containers.iter().map(|(n, d)| (n.as_str(), d)).collect()
        }
        book.record("u1", &cg.pod, parts(&cg).into_iter());
        book.record("u1", &cg.pod, parts(&cg).into_iter());
        assert_eq!(book.len(), 1);
        assert_eq!(book.get("u1").map(|c| c.containers.len()), Some(1));
        // A container replaced: its new cgroup is recorded.
        let mut moved = cg.clone();
        moved.containers[0].1.path = cg.pod.path.join("app2");
        book.record("u1", &moved.pod, parts(&moved).into_iter());
        assert_eq!(
            book.get("u1").map(|c| c.containers[0].1.path.clone()),
            Some(cg.pod.path.join("app2"))
        );
        book.retain(|uid| uid != "u1");
        assert!(book.is_empty());
    }

    fn quota(path: &std::path::Path) -> String {
        std::fs::read_to_string(path.join("cpu.cfs_quota_us")).unwrap()
    }

    #[test]
    fn raised_then_put_back_where_nobody_changed_it() {
        let (_tmp, cg) = tree();
        let w = raise(&cg, &[("app".into(), MilliCpu(700))]).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].path, cg.pod.path, "the pod first");
        assert_eq!(quota(&cg.pod.path), "80000");
        assert_eq!(quota(&cg.containers[0].1.path), "70000");
        // The kubelet applied another value to the pod meanwhile: only the
        // container goes back.
        std::fs::write(cg.pod.path.join("cpu.cfs_quota_us"), "90000").unwrap();
        assert_eq!(revert(&w), 1);
        assert_eq!(quota(&cg.containers[0].1.path), "20000");
        assert_eq!(quota(&cg.pod.path), "90000");
    }

    #[test]
    fn a_failed_write_puts_back_what_was_written() {
        let (_tmp, cg) = tree();
        // The container's quota reads as a number but cannot be written: a
        // read-only sysfs attribute (255 µs on this kind of host) in its place.
        let attr = std::path::Path::new("/sys/devices/system/cpu/kernel_max");
        if !attr.exists() {
            panic!("{} missing: this test needs sysfs", attr.display());
        }
        let app = &cg.containers[0].1.path;
        std::fs::remove_file(app.join("cpu.cfs_quota_us")).unwrap();
        std::os::unix::fs::symlink(attr, app.join("cpu.cfs_quota_us")).unwrap();
        let err = raise(&cg, &[("app".into(), MilliCpu(700))]).unwrap_err();
        assert!(matches!(err, CgroupFsError::Unreadable { .. }), "{err:?}");
        assert_eq!(quota(&cg.pod.path), "30000", "the pod's raise put back");
    }

    #[test]
    fn a_lowered_weight_the_kubelet_reset_is_put_back_and_kept_across_records() {
        let (_tmp, cg) = tree();
        std::fs::write(cg.pod.path.join("cpu.shares"), "64").unwrap();
        let book = CgroupBook::default();
        let containers = || cg.containers.iter().map(|(n, d)| (n.as_str(), d));
        book.record("uid", &cg.pod, containers());
        // Not lowered: nothing to put back.
        assert_eq!(book.reassert_weight("uid").unwrap(), None);
        book.set_lowered_weight("uid", Some(64.0 * 100.0 / 1024.0));
        // A new container cgroup recorded: the lowered weight stays known.
        book.record("uid", &cg.pod, std::iter::empty());
        assert_eq!(book.reassert_weight("uid").unwrap(), None, "unchanged");
        // The kubelet's resize reset it.
        std::fs::write(cg.pod.path.join("cpu.shares"), "512").unwrap();
        assert_eq!(
            book.reassert_weight("uid").unwrap(),
            Some(64.0 * 100.0 / 1024.0)
        );
        let shares = std::fs::read_to_string(cg.pod.path.join("cpu.shares")).unwrap();
        assert_eq!(shares.trim(), "64");
        book.set_lowered_weight("uid", None);
        std::fs::write(cg.pod.path.join("cpu.shares"), "512").unwrap();
        assert_eq!(book.reassert_weight("uid").unwrap(), None, "released");
        assert_eq!(book.reassert_weight("unknown").unwrap(), None);
    }
}
