//! Run-queue wait of a cgroup's tasks, without eBPF, and the cgroups under a
//! consumer's cgroup.
//!
//! The kernel keeps, per task, the time it was runnable but waiting for a CPU
//! (`sched_info.run_delay`, the second field of `/proc/<tid>/schedstat`, in
//! ns). No cgroup file sums it on cgroup v1; v2's `cpu.pressure` `some` is wall
//! time during which *at least one* task waited, which undercounts a pod whose
//! several threads wait at once. Demand is counted in thread-time (like usage),
//! so the wait is the sum over the cgroup's threads: [`schedstat_wait_ns`]
//! (the polling equivalent of the eBPF program `mbcas_runq_wait`).
//!
//! A thread that exits takes its wait with it, so this sum can go backwards;
//! the demand model counts a window whose wait went down as no wait.

use std::path::Path;

use super::{CgroupFsError, Hierarchy, dir::read_file};
use crate::units::CgroupId;

/// How deep under a consumer's cgroup its descendants are looked for (a pod
/// cgroup holds container cgroups; local-mode consumers may nest one more).
pub const SUBTREE_DEPTH: usize = 3;

/// The cgroup `path` and its descendants down to `depth` levels, as
/// `(id, path)`. The id is the directory's inode, read from the directory
/// entry (no `stat`). A child that vanishes while listed is skipped.
pub fn subtree(path: &Path, id: CgroupId, depth: usize) -> Vec<(CgroupId, std::path::PathBuf)> {
    use std::os::unix::fs::DirEntryExt as _;
    let mut out = vec![(id, path.to_owned())];
    let mut levels = vec![0usize];
    let mut i = 0;
    while i < out.len() {
        if levels[i] < depth
            && let Ok(entries) = std::fs::read_dir(&out[i].1)
        {
            let level = levels[i] + 1;
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push((CgroupId(e.ino()), e.path()));
                    levels.push(level);
                }
            }
        }
        i += 1;
    }
    out
}

/// The thread ids listed in one cgroup (not its children).
fn threads(dir: &Path, h: Hierarchy) -> Result<Vec<u32>, CgroupFsError> {
    let file = match h {
        Hierarchy::V1 => dir.join("tasks"),
        Hierarchy::V2 => dir.join("cgroup.threads"),
    };
    let text = read_file(&file)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse().map_err(|_| CgroupFsError::Malformed {
                path: file.clone(),
                reason: format!("expected a thread id, got {l:?}"),
            })
        })
        .collect()
}

/// The run delay (ns) of a `/proc/<tid>/schedstat` line: its second field.
pub fn parse_schedstat_run_delay(text: &str) -> Result<u64, String> {
    let mut it = text.split_whitespace();
    let _on_cpu = it.next().ok_or("empty schedstat")?;
    let delay = it.next().ok_or("schedstat has one field, expected three")?;
    delay
        .parse()
        .map_err(|_| format!("run delay {delay:?} is not a number of nanoseconds"))
}

/// Σ run delay over the threads of `dir` and its descendants, read from
/// `/proc/<tid>/schedstat`. A thread that exits between the listing and the
/// read is skipped; a cgroup that vanished is an error.
pub fn schedstat_wait_ns(dir: &Path, id: CgroupId, h: Hierarchy) -> Result<u64, CgroupFsError> {
    let mut total: u64 = 0;
    for (_, path) in subtree(dir, id, SUBTREE_DEPTH) {
        for tid in threads(&path, h)? {
            let f = format!("/proc/{tid}/schedstat");
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            let d =
                parse_schedstat_run_delay(&text).map_err(|reason| CgroupFsError::Malformed {
                    path: f.into(),
                    reason,
                })?;
            total = total.saturating_add(d);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_lines() {
        assert_eq!(
            parse_schedstat_run_delay("123 456 7\n"),
            Ok(456),
            "second field"
        );
        assert!(parse_schedstat_run_delay("").is_err());
        assert!(parse_schedstat_run_delay("1").is_err());
        assert!(parse_schedstat_run_delay("1 x 2").is_err());
    }

    #[test]
    fn subtree_lists_descendants_to_the_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("a/b/c/d")).unwrap();
        std::fs::create_dir_all(root.join("e")).unwrap();
        std::fs::write(root.join("cpu.stat"), "").unwrap();
        let names = |depth| {
            let mut v: Vec<String> = subtree(root, CgroupId(1), depth)
                .into_iter()
                .map(|(_, p)| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(0), vec![""]);
        assert_eq!(names(1), vec!["", "a", "e"]);
        assert_eq!(names(3), vec!["", "a", "a/b", "a/b/c", "e"]);
        let ino = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(root.join("e")).unwrap().ino()
        };
        assert!(
            subtree(root, CgroupId(1), 1)
                .iter()
                .any(|(id, p)| p.ends_with("e") && id.0 == ino),
            "ids are the directories' inodes"
        );
    }

    #[test]
    fn wait_sums_the_threads_of_the_subtree() {
        // This test's own thread is in no cgroup file here; the listing is
        // what is under test: two fake cgroups naming this process's threads.
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        std::fs::create_dir_all(tmp.path().join("c")).unwrap();
        std::fs::write(tmp.path().join("tasks"), format!("{me}\n")).unwrap();
        std::fs::write(tmp.path().join("c/tasks"), format!("{me}\n999999999\n")).unwrap();
        let own = parse_schedstat_run_delay(
            &std::fs::read_to_string(format!("/proc/{me}/schedstat")).unwrap(),
        )
        .unwrap();
        let total = schedstat_wait_ns(tmp.path(), CgroupId(1), Hierarchy::V1).unwrap();
        // Counted twice (listed in both), the vanished thread skipped; the
        // counter only grows between the two reads.
        assert!(total >= 2 * own, "{total} vs 2 × {own}");
        std::fs::write(tmp.path().join("c/tasks"), "garbage\n").unwrap();
        assert!(matches!(
            schedstat_wait_ns(tmp.path(), CgroupId(1), Hierarchy::V1),
            Err(CgroupFsError::Malformed { .. })
        ));
    }
}
