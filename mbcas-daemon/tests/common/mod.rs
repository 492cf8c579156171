//! Helpers for tests on the real kernel: cgroups and CPU burners that clean up
//! after themselves, even when a test panics.
#![allow(dead_code)]
// Helpers are test code: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod apiserver;
pub mod k8s;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::Duration,
};

/// Kernel tests share the CPUs and the cgroup tree: one at a time.
pub static KERNEL: Mutex<()> = Mutex::new(());

pub fn kernel_lock() -> std::sync::MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the kernel tier can run here; if not, says why. In CI it must run.
pub fn kernel_tier_available() -> bool {
    // SAFETY-free check of the effective uid via /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let why = if !root {
        Some("not running as root")
    } else if !Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        Some("no cgroup cpu controller found")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kernel test tier cannot run in CI: {why}"
            );
            eprintln!("SKIP (kernel tier): {why}");
            false
        }
    }
}

/// The cgroup layout of this machine for tests.
pub struct Layout {
    /// Where `cpu.stat` and the quota live.
    pub cpu_root: PathBuf,
    /// v1 with a separate cpuacct hierarchy: its root.
    pub cpuacct_root: Option<PathBuf>,
    pub v2: bool,
}

pub fn layout() -> Layout {
    if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
        let acct = Path::new("/sys/fs/cgroup/cpuacct");
        let separate = acct.join("cpuacct.usage").exists()
            && !Path::new("/sys/fs/cgroup/cpu/cpuacct.usage").exists();
        Layout {
            cpu_root: "/sys/fs/cgroup/cpu".into(),
            cpuacct_root: separate.then(|| acct.to_owned()),
            v2: false,
        }
    } else {
        Layout {
            cpu_root: "/sys/fs/cgroup".into(),
            cpuacct_root: None,
            v2: true,
        }
    }
}

/// A cgroup made for one test; removed (after killing its burners) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    pub acct: Option<PathBuf>,
    pub v2: bool,
    burners: Vec<Child>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let l = layout();
        let name = format!("mbcas-test-{tag}-{}", std::process::id());
        let path = l.cpu_root.join(&name);
        let acct = l.cpuacct_root.map(|r| r.join(&name));
        for p in std::iter::once(&path).chain(acct.iter()) {
            if p.exists() {
                let _ = std::fs::remove_dir(p);
            }
            std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        }
        Self {
            path,
            acct,
            v2: l.v2,
            burners: Vec::new(),
        }
    }

    /// On cgroup v2, hands the `cpu` controller to this cgroup's children
    /// (`+cpu` in `cgroup.subtree_control`): without it a child has no
    /// `cpu.max` or `cpu.weight`. Nothing to do on v1.
    pub fn delegate_cpu(&self) {
        if self.v2 {
            write(&self.path.join("cgroup.subtree_control"), "+cpu");
        }
    }

    /// Sets the CPU limit in millicores (`None`: unlimited), period 100 ms.
    pub fn set_limit(&self, millicores: Option<u64>) {
        if self.v2 {
            let v = millicores.map_or("max 100000".to_owned(), |m| format!("{} 100000", m * 100));
            write(&self.path.join("cpu.max"), &v);
        } else {
            write(&self.path.join("cpu.cfs_period_us"), "100000");
            let v = millicores.map_or("-1".to_owned(), |m| (m * 100).to_string());
            write(&self.path.join("cpu.cfs_quota_us"), &v);
        }
    }

    /// Starts a process that spins at 100 % of one CPU inside this cgroup.
    pub fn spin(&mut self) -> u32 {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn burner: {e}"));
        let pid = child.id();
        self.burners.push(child);
        self.adopt(pid);
        pid
    }

    /// Moves a process into this cgroup (and its cpuacct peer).
    pub fn adopt(&self, pid: u32) {
        write(&self.path.join("cgroup.procs"), &pid.to_string());
        if let Some(a) = &self.acct {
            write(&a.join("cgroup.procs"), &pid.to_string());
        }
    }

    /// Raw `cpu.stat` counters: (nr_periods, nr_throttled, throttled_ns).
    pub fn cpu_stat(&self) -> (u64, u64, u64) {
        let text = std::fs::read_to_string(self.path.join("cpu.stat"))
            .unwrap_or_else(|e| panic!("cpu.stat: {e}"));
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.trim().parse::<u64>().ok()))
                .unwrap_or_else(|| panic!("{k} missing in {text}"))
        };
        if self.v2 {
            (
                get("nr_periods "),
                get("nr_throttled "),
                get("throttled_usec ") * 1000,
            )
        } else {
            (
                get("nr_periods "),
                get("nr_throttled "),
                get("throttled_time "),
            )
        }
    }

    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.path)
            .map(|m| m.ino())
            .unwrap_or_else(|e| panic!("stat: {e}"))
    }

    pub fn kill_burners(&mut self) {
        for c in &mut self.burners {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.burners.clear();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        self.kill_burners();
        for p in std::iter::once(&self.path).chain(self.acct.iter()) {
            for _ in 0..50 {
                if !p.exists() || std::fs::remove_dir(p).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The host's steal time so far (`/proc/stat`'s eighth `cpu` field), USER_HZ
/// ticks of 10 ms; 0 where unreadable.
pub fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu "))?
                .split_whitespace()
                .nth(8)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// What the hypervisor stole per second since `from` (a [`steal_ticks`]
/// reading `secs` seconds ago), millicores: a timing measured while it is
/// high is not the machine's.
pub fn stolen_m(from: u64, secs: f64) -> f64 {
    steal_ticks().saturating_sub(from) as f64 * 10.0 / secs.max(1e-9)
}

pub fn write(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
}

/// |a - b| within `pct` % of the larger (and at least `abs`).
pub fn close(a: u64, b: u64, pct: f64, abs: u64) -> bool {
    let d = a.abs_diff(b);
    d <= abs || (d as f64) <= a.max(b) as f64 * pct / 100.0
}
