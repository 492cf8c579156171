//! Recognising Kubernetes pod and container cgroups from their paths.
//!
//! Supported shapes (relative to the cpu hierarchy's root):
//! * systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//!   (Guaranteed pods sit directly under `kubepods.slice` as `kubepods-pod<uid>.slice`;
//!   BestEffort under `kubepods-besteffort.slice`; the pod UID's `-` are written `_`).
//! * Kind and other nested kubelets: the same under `kubelet.slice/kubelet-kubepods.slice/…`
//!   with a `kubelet-` prefix on every slice.
//! * cgroupfs driver: `kubepods/burstable/pod<uid>/<id>`, `kubepods/pod<uid>/<id>`,
//!   `kubepods/besteffort/pod<uid>/<id>`.
//! * Runtimes: containerd (`cri-containerd-<id>.scope`), CRI-O (`crio-<id>.scope`,
//!   `crio-conmon-<id>.scope` is not a container), Docker (`docker-<id>.scope`);
//!   with cgroupfs the container directory is the bare id.

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What a cgroup path says about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub qos: QosClass,
    /// The pod UID in its canonical form (with `-`).
    pub pod_uid: String,
    /// Set for a container's cgroup, `None` for the pod's own.
    pub container: Option<ContainerRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    pub id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// cgroupfs driver: the runtime is not in the name.
    Unknown,
}

fn strip_kubelet(s: &str) -> &str {
    s.strip_prefix("kubelet-").unwrap_or(s)
}

/// A pod UID as a path writes it: a UUID (8-4-4-4-12 hex digits, joined by
/// `-`, or by `_` under the systemd driver), or the 32 hex digits of the
/// config hash the kubelet gives a static pod.
fn is_uid(s: &str) -> bool {
    let hex = |g: &str| !g.is_empty() && g.bytes().all(|b| b.is_ascii_hexdigit());
    if s.len() == 32 {
        return hex(s);
    }
    let sep = if s.contains('_') { '_' } else { '-' };
    let groups: Vec<&str> = s.split(sep).collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| hex(g))
}

fn container_of(name: &str) -> Option<ContainerRef> {
    let (runtime, rest) = if let Some(r) = name.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, r)
    } else if let Some(r) = name.strip_prefix("crio-") {
        if r.starts_with("conmon-") {
            return None;
        }
        (Runtime::CriO, r)
    } else if let Some(r) = name.strip_prefix("docker-") {
        (Runtime::Docker, r)
    } else {
        (Runtime::Unknown, name)
    };
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    (id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| ContainerRef {
        runtime,
        id: id.to_owned(),
    })
}

/// The pod whose directory is `rest[i]` (UID `uid` as written in the path,
/// `pod_uid` its canonical form), and its container when `rest[i + 1]` is one;
/// `None` for deeper paths.
fn pod_below(
    rest: &[&str],
    i: usize,
    qos: QosClass,
    uid: &str,
    pod_uid: impl FnOnce(&str) -> String,
) -> Option<PodCgroup> {
    if !is_uid(uid) || rest.len() > i + 2 {
        return None;
    }
    let container = match rest.get(i + 1) {
        None => None,
        Some(c) => Some(container_of(c)?),
    };
    Some(PodCgroup {
        qos,
        pod_uid: pod_uid(uid),
        container,
    })
}

/// Parses a cgroup path (absolute or relative to the hierarchy root).
pub fn parse(path: &Path) -> Option<PodCgroup> {
    let parts: Vec<&str> = path
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    let start = parts.iter().position(|p| {
        let p = strip_kubelet(p);
        p == "kubepods.slice" || p == "kubepods"
    })?;
    let rest = &parts[start..];
    if strip_kubelet(rest[0]) == "kubepods.slice" {
        // systemd driver
        let mut i = 1;
        let mut qos = QosClass::Guaranteed;
        match rest.get(1).map(|s| strip_kubelet(s)) {
            Some("kubepods-burstable.slice") => {
                qos = QosClass::Burstable;
                i = 2;
            }
            Some("kubepods-besteffort.slice") => {
                qos = QosClass::BestEffort;
                i = 2;
            }
            _ => {}
        }
        let pod = strip_kubelet(rest.get(i)?);
        let prefix = match qos {
            QosClass::Guaranteed => "kubepods-pod",
            QosClass::Burstable => "kubepods-burstable-pod",
            QosClass::BestEffort => "kubepods-besteffort-pod",
        };
        let uid = pod.strip_prefix(prefix)?.strip_suffix(".slice")?;
        // The systemd driver writes the UID's `-` as `_`.
        pod_below(rest, i, qos, uid, |u| u.replace('_', "-"))
    } else {
        // cgroupfs driver
        let (qos, i) = match rest.get(1).copied() {
            Some("burstable") => (QosClass::Burstable, 2),
            Some("besteffort") => (QosClass::BestEffort, 2),
            _ => (QosClass::Guaranteed, 1),
        };
        let uid = rest.get(i)?.strip_prefix("pod")?;
        // The cgroupfs driver writes the UID as it is, with `-`.
        if uid.contains('_') {
            return None;
        }
        pod_below(rest, i, qos, uid, str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by `cargo xtask fuzz` (kubepods_path): a 39-character "UID" was
    /// taken for a pod's and recorded as its UID.
    #[test]
    fn only_uuids_and_static_pod_hashes_are_uids() {
        let bad = "/sys/fs/cgroup/kubepods.slice/kubepods-pod0c5a1e72_4e1b_4f04f0b_9f3c_2a7c8d9e0f11.slice/crio-d733f974c67aca90fa67941144adb7a0e4fa92bfecc111bf0fc90dfbb86a3.scope";
        assert_eq!(parse(Path::new(bad)), None);
        let static_pod =
            "/sys/fs/cgroup/cpu/kubepods/burstable/pod5ba4d5c9e88c4c4cd1a1cd3c0a9c9e6a";
        assert_eq!(
            parse(Path::new(static_pod)).map(|p| p.pod_uid),
            Some("5ba4d5c9e88c4c4cd1a1cd3c0a9c9e6a".to_owned())
        );
        for uid in [
            "0c5a1e72-4e1b-4f0b-9f3c-2a7c8d9e0f11",
            "0c5a1e72_4e1b_4f0b_9f3c_2a7c8d9e0f11",
        ] {
            assert!(is_uid(uid), "{uid}");
        }
        for uid in [
            "0c5a1e72-4e1b-4f0b-9f3c-2a7c8d9e0f1",
            "g5ba4d5c9e88c4c4cd1a1cd3c0a9c9e6a",
            "0c5a1e724e1b4f0b9f3c2a7c8d9e0f11aa",
        ] {
            assert!(!is_uid(uid), "{uid}");
        }
    }

    const UID: &str = "5f1d2c3b-aaaa-4bbb-8ccc-0123456789ab";
    const UID_: &str = "5f1d2c3b_aaaa_4bbb_8ccc_0123456789ab";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Option<PodCgroup> {
        parse(Path::new(s))
    }

    #[test]
    fn systemd_containerd_burstable() {
        let got = p(&format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ));
        assert_eq!(
            got,
            Some(PodCgroup {
                qos: QosClass::Burstable,
                pod_uid: UID.into(),
                container: Some(ContainerRef {
                    runtime: Runtime::Containerd,
                    id: CID.into()
                })
            })
        );
    }

    #[test]
    fn systemd_classes_and_pod_level() {
        let g = p(&format!("kubepods.slice/kubepods-pod{UID_}.slice")).expect("guaranteed");
        assert_eq!((g.qos, g.container), (QosClass::Guaranteed, None));
        let b = p(&format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"))
            .expect("besteffort");
        assert_eq!(b.qos, QosClass::BestEffort);
        assert_eq!(b.container.map(|c| c.runtime), Some(Runtime::CriO));
        let d = p(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope"))
            .expect("docker");
        assert_eq!(d.container.map(|c| c.runtime), Some(Runtime::Docker));
        assert_eq!(
            p(&format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"
            )),
            None
        );
    }

    #[test]
    fn kind_nested_kubelet_slice() {
        let got = p(&format!(
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
        ))
        .expect("kind");
        assert_eq!((got.qos, got.pod_uid.as_str()), (QosClass::Burstable, UID));
        assert_eq!(got.container.map(|c| c.id), Some(CID.to_owned()));
    }

    #[test]
    fn cgroupfs_driver() {
        let b = p(&format!(
            "/sys/fs/cgroup/cpu/kubepods/burstable/pod{UID}/{CID}"
        ))
        .expect("cgroupfs");
        assert_eq!((b.qos, b.pod_uid.as_str()), (QosClass::Burstable, UID));
        assert_eq!(b.container.map(|c| c.runtime), Some(Runtime::Unknown));
        let g = p(&format!("kubepods/pod{UID}")).expect("guaranteed");
        assert_eq!((g.qos, g.container), (QosClass::Guaranteed, None));
        assert_eq!(
            p(&format!("kubepods/besteffort/pod{UID}")).map(|x| x.qos),
            Some(QosClass::BestEffort)
        );
    }

    #[test]
    fn non_pod_paths() {
        for s in [
            "/sys/fs/cgroup/system.slice/containerd.service",
            "kubepods.slice",
            "kubepods/burstable",
            "kubepods/podnotauid/x",
            "user.slice/user-0.slice",
        ] {
            assert_eq!(p(s), None, "{s}");
        }
    }
}
