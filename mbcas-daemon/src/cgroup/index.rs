//! cgroup id ↔ path, for a subtree, rescanned to follow cgroups as they come and go.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::kubernetes::{self, PodCgroup};
use crate::units::CgroupId;

/// Depth limit of a scan (kubepods trees are 5–6 levels deep).
const MAX_DEPTH: usize = 12;

#[derive(Debug, Default)]
pub struct CgroupIndex {
    root: PathBuf,
    by_id: HashMap<CgroupId, PathBuf>,
    by_path: HashMap<PathBuf, CgroupId>,
}

/// What changed in one rescan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<CgroupId>,
    pub removed: Vec<CgroupId>,
}

impl CgroupIndex {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Walks the tree again; cgroups that vanish during the walk are skipped.
    pub fn rescan(&mut self) -> Changes {
        let mut found: HashMap<CgroupId, PathBuf> = HashMap::new();
        let mut stack = vec![(self.root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            found.insert(CgroupId(meta.ino()), dir.clone());
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        let mut changes = Changes::default();
        for id in found.keys() {
            if !self.by_id.contains_key(id) {
                changes.added.push(*id);
            }
        }
        for id in self.by_id.keys() {
            if !found.contains_key(id) {
                changes.removed.push(*id);
            }
        }
        changes.added.sort();
        changes.removed.sort();
        self.by_path = found.iter().map(|(id, p)| (p.clone(), *id)).collect();
        self.by_id = found;
        changes
    }

    pub fn path(&self, id: CgroupId) -> Option<&Path> {
        self.by_id.get(&id).map(PathBuf::as_path)
    }

    pub fn id(&self, path: &Path) -> Option<CgroupId> {
        self.by_path.get(path).copied()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every pod and container cgroup in the tree, with what its path says.
    pub fn pods(&self) -> Vec<(CgroupId, PodCgroup)> {
        let mut v: Vec<(CgroupId, PodCgroup)> = self
            .by_id
            .iter()
            .filter_map(|(id, p)| {
                let rel = p.strip_prefix(&self.root).unwrap_or(p);
                kubernetes::parse(rel).map(|pc| (*id, pc))
            })
            .collect();
        v.sort_by_key(|a| a.0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_cgroups_as_they_come_and_go() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = "5f1d2c3b_aaaa_4bbb_8ccc_0123456789ab";
        let cid = "0123456789abcdef0123456789abcdef";
        let pod = tmp.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
        ));
        let ctr = pod.join(format!("cri-containerd-{cid}.scope"));
        std::fs::create_dir_all(&ctr).unwrap();
        let mut idx = CgroupIndex::new(tmp.path());
        let first = idx.rescan();
        assert_eq!(first.added.len(), 5);
        let ctr_id = CgroupId(std::fs::metadata(&ctr).map(|m| m.ino()).unwrap_or(0));
        assert_eq!(idx.path(ctr_id), Some(ctr.as_path()));
        assert_eq!(idx.id(&ctr), Some(ctr_id));
        let pods = idx.pods();
        assert_eq!(pods.len(), 2, "{pods:?}");
        assert!(
            pods.iter()
                .all(|(_, p)| p.pod_uid == "5f1d2c3b-aaaa-4bbb-8ccc-0123456789ab")
        );
        std::fs::remove_dir(&ctr).unwrap();
        let second = idx.rescan();
        assert_eq!(second.removed, vec![ctr_id]);
        assert!(second.added.is_empty());
        assert_eq!(idx.path(ctr_id), None);
    }
}
