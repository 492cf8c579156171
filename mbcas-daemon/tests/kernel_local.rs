//! Kernel tier: local mode end to end on real cgroups with real burners.
//! `mbcas run --mode local` is started as a process, its per-round JSON report is
//! read back, and the kernel's own counters are checked.
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{TestCgroup, kernel_lock, kernel_tier_available, steal_ticks, stolen_m, write};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mbcas");

/// How long `mbcas run` may take to exit after SIGINT (it finishes its round
/// and detaches the eBPF programs; seconds under an emulated CPU).
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A consumer: a child cgroup of the test's root with one `mbcas burn`.
fn consumer(
    root: &TestCgroup,
    name: &str,
    shares: Option<u64>,
    quota_m: u64,
    burn: &[&str],
) -> (PathBuf, Option<PathBuf>, Child) {
    let dir = root.path.join(name);
    root.delegate_cpu();
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let acct = root.acct.as_ref().map(|a| a.join(name));
    if let Some(a) = &acct {
        std::fs::create_dir(a).unwrap_or_else(|e| panic!("mkdir {}: {e}", a.display()));
    }
    if let Some(s) = shares {
        if root.v2 {
            write(&dir.join("cpu.weight"), &(s * 100 / 1024).to_string());
        } else {
            write(&dir.join("cpu.shares"), &s.to_string());
        }
    }
    if root.v2 {
        write(&dir.join("cpu.max"), &format!("{} 100000", quota_m * 100));
    } else {
        write(&dir.join("cpu.cfs_quota_us"), &(quota_m * 100).to_string());
    }
    let child = Command::new(BIN)
        .arg("burn")
        .args(burn)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn burn: {e}"));
    let pid = child.id().to_string();
    write(&dir.join("cgroup.procs"), &pid);
    if let Some(a) = &acct {
        write(&a.join("cgroup.procs"), &pid);
    }
    (dir, acct, child)
}

/// Burners and the loop die, then child cgroups go, before the root guard drops.
struct Run {
    children: Vec<(PathBuf, Option<PathBuf>, Child)>,
    daemon: Option<Child>,
    report: PathBuf,
}

impl Run {
    fn start(
        root: &TestCgroup,
        extra: &[&str],
        children: Vec<(PathBuf, Option<PathBuf>, Child)>,
    ) -> Self {
        let report = std::env::temp_dir().join(format!(
            "mbcas-local-{}-{}.jsonl",
            std::process::id(),
            root.path.display().to_string().len() + children.len()
        ));
        let _ = std::fs::remove_file(&report);
        let daemon = Command::new(BIN)
            .args([
                "--log-level",
                "info",
                "run",
                "--mode",
                "local",
                "--sensor",
                "auto",
                "--local-root",
            ])
            .arg(&root.path)
            .arg("--report-jsonl")
            .arg(&report)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn mbcas run: {e}"));
        Self {
            children,
            daemon: Some(daemon),
            report,
        }
    }

    fn rounds(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.report)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGINT the loop; returns its stderr. A loop that has not exited
    /// [`STOP_GRACE`] later is killed and the test fails (a hang here once
    /// held a VM-tier guest silent until its timeout).
    fn stop(&mut self) -> String {
        let Some(mut d) = self.daemon.take() else {
            return String::new();
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(d.id()).expect("pid fits a pid_t"));
        let mut stderr = d.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        });
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let t0 = Instant::now();
        let status = loop {
            if let Some(status) = d.try_wait().unwrap() {
                break Some(status);
            }
            if t0.elapsed() > STOP_GRACE {
                let _ = d.kill();
                let _ = d.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = reader.join().unwrap_or_default();
        match status {
            None => panic!(
                "mbcas run had not exited {} s after SIGINT (killed); log:\n{log}",
                STOP_GRACE.as_secs()
            ),
            Some(s) => assert!(s.success(), "mbcas run exited with {s}; log:\n{log}"),
        }
        log
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for (dir, acct, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            for p in std::iter::once(&*dir).chain(acct.iter()) {
                for _ in 0..50 {
                    if !p.exists() || std::fs::remove_dir(p).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_file(&self.report);
    }
}

fn consumer_at<'a>(round: &'a Value, name: &str) -> Option<&'a Value> {
    round["consumers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// The cgroup's CPU usage counter, ns (`cpu.stat` usage_usec on v2, the
/// cpuacct controller's `cpuacct.usage` on v1).
fn usage_ns(dir: &Path, acct: Option<&Path>, v2: bool) -> u64 {
    if v2 {
        let t = std::fs::read_to_string(dir.join("cpu.stat")).unwrap();
        t.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap()
            * 1000
    } else {
        let file = acct.unwrap_or(dir).join("cpuacct.usage");
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .trim()
            .parse()
            .unwrap()
    }
}

/// Σ run-queue wait of a process's threads so far, ns (`/proc/<pid>/task/*/schedstat`'s
/// second field); 0 where unreadable.
fn run_delay_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| mbcas::cgroup::runq::parse_schedstat_run_delay(&s).ok())
        .sum()
}

fn quota_m(dir: &Path, v2: bool) -> u64 {
    if v2 {
        let t = std::fs::read_to_string(dir.join("cpu.max")).unwrap_or_default();
        t.split_whitespace()
            .next()
            .and_then(|q| q.parse::<u64>().ok())
            .map_or(u64::MAX, |q| q / 100)
    } else {
        let t = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap_or_default();
        t.trim()
            .parse::<i64>()
            .ok()
            .and_then(|q| u64::try_from(q).ok())
            .map_or(u64::MAX, |q| q / 100)
    }
}

/// One burner of known demand under a tight quota: the estimate converges to the
/// demand and the quota follows.
fn accuracy(tag: &str, burn: &[&str], demand_m: f64) {
    let root = TestCgroup::new(tag);
    let c = consumer(&root, "c", None, 200, burn);
    let (dir, acct, pid) = (c.0.clone(), c.1.clone(), c.2.id());
    let mut run = Run::start(
        &root,
        &["--capacity-millicores", "2000", "--node-reserve", "0"],
        vec![c],
    );
    // The clock starts at the loop's first round: loading the eBPF programs
    // took 5 s of a 6.1 guest under TCG, and the quota followed 10.4 s after
    // the daemon was spawned.
    let spawned = Instant::now();
    while run.rounds().is_empty() {
        if spawned.elapsed() > Duration::from_secs(30) {
            let log = run.stop();
            panic!("{tag}: no round within 30 s of the start; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    eprintln!(
        "{tag}: first round {:.1} s after the start",
        spawned.elapsed().as_secs_f64()
    );
    let mut followed = None;
    // What the burner used in the run's second half, unthrottled by then.
    let mut used_from = None;
    while t0.elapsed() < Duration::from_secs(16) {
        std::thread::sleep(Duration::from_millis(250));
        if followed.is_none() && quota_m(&dir, root.v2) as f64 >= demand_m * 0.95 {
            followed = Some(t0.elapsed());
        }
        if used_from.is_none() && t0.elapsed() >= Duration::from_secs(8) {
            used_from = Some((
                Instant::now(),
                usage_ns(&dir, acct.as_deref(), root.v2),
                run_delay_ns(pid),
                steal_ticks(),
            ));
        }
    }
    // Per second of the run's second half: CPU used, and time its threads
    // were runnable but waited for a CPU (`/proc/<tid>/schedstat`).
    // And what the hypervisor stole meanwhile: no figure here can tell it
    // from its own.
    let (used_m, waited_m, stolen) =
        used_from.map_or((None, 0.0, 0.0), |(at, ns, delay, steal)| {
            let secs = at.elapsed().as_nanos() as f64;
            let used = usage_ns(&dir, acct.as_deref(), root.v2).saturating_sub(ns);
            let waited = run_delay_ns(pid).saturating_sub(delay);
            (
                Some(used as f64 / secs * 1000.0),
                waited as f64 / secs * 1000.0,
                stolen_m(steal, secs / 1e9),
            )
        });
    let rounds = run.rounds();
    let log = run.stop();
    let last = rounds
        .last()
        .and_then(|r| consumer_at(r, "c"))
        .cloned()
        .unwrap_or_else(|| panic!("{tag}: no report; log:\n{log}"));
    // The estimate over the same 8 s: a square wave's estimate moves with
    // the phase each window ends in, so one round alone is a sample of it.
    let end = rounds.last().and_then(|r| r["t"].as_f64()).unwrap_or(0.0);
    let late: Vec<f64> = rounds
        .iter()
        .filter(|r| r["t"].as_f64().is_some_and(|t| t >= end - 8.0))
        .filter_map(|r| consumer_at(r, "c")?["demand_m"].as_f64())
        .collect();
    let est = late.iter().sum::<f64>() / late.len().max(1) as f64;
    let used = used_m.unwrap_or_else(|| panic!("{tag}: no usage measured; log:\n{log}"));
    // Demand is what the burner would have used had it neither been
    // throttled nor waited for a CPU.
    let truth = used + waited_m;
    eprintln!(
        "{tag}: demand {demand_m} m, used {used:.0} m and waited {waited_m:.0} m in the last 8 s \
         ({stolen:.0} m stolen by the hypervisor), \
         estimate {est:.0} m over them ({} rounds; the last {:.0} m), need {} m, limit {} m, quota followed {followed:?} after the first round",
        late.len(),
        last["demand_m"].as_f64().unwrap_or(f64::NAN),
        last["need_m"],
        last["limit_m"]
    );
    // The truth is what the burner used and waited, unthrottled: under
    // emulation its duty cycle drifts from the nominal and its threads wait
    // for the guest's emulated CPUs (on a 6.1 guest under TCG the square
    // wave's last estimate read 580 m of a nominal 500 m, on 6.12 610 m of
    // 506 m used). The nominal still bounds the use, more loosely.
    assert!(
        (est - truth).abs() <= truth * 0.15,
        "{tag}: estimate {est:.0} m vs {used:.0} m used + {waited_m:.0} m waited; log:\n{log}"
    );
    assert!(
        (used - demand_m).abs() <= demand_m * 0.25,
        "{tag}: the burner used {used:.0} m of a nominal {demand_m} m \
         ({stolen:.0} m stolen by the hypervisor meanwhile); log:\n{log}"
    );
    let after =
        followed.unwrap_or_else(|| panic!("{tag}: quota never reached the demand; log:\n{log}"));
    assert!(
        after <= Duration::from_secs(10),
        "{tag}: quota followed {after:?} after the first round"
    );
    // --on-exit restore: the starting quota is back.
    assert_eq!(quota_m(&dir, root.v2), 200, "{tag}: quota restored on exit");
}

#[test]
fn accuracy_one_thread_full() {
    let _g = kernel_lock();
    if !kernel_tier_available() {
        return;
    }
    accuracy("acc1", &["--threads", "1", "--percent", "100"], 1000.0);
}

#[test]
fn accuracy_two_threads_full() {
    let _g = kernel_lock();
    if !kernel_tier_available() {
        return;
    }
    // Two spinning threads on this two-core machine: the test process and the
    // loop need a little CPU too, so the attainable demand is just under 2000 m.
    accuracy("acc2", &["--threads", "2", "--percent", "100"], 1900.0);
}

#[test]
fn accuracy_square_wave_half() {
    let _g = kernel_lock();
    if !kernel_tier_available() {
        return;
    }
    accuracy(
        "accsq",
        &[
            "--threads",
            "1",
            "--percent",
            "100",
            "--pattern",
            "square:500/500",
        ],
        500.0,
    );
}

/// Total demand above the machine: CPU follows the weights, nobody starves, and
/// once converged the quotas stay put. MBCAS's limits are ceilings at or above
/// each consumer's weighted share, so the kernel's `cpu.shares` arbitrate: the
/// capacity is the machine's own (a smaller `--capacity-millicores` than the
/// machine would be a partition the kernel does not enforce).
#[test]
fn contention_is_weighted_fair_and_stable() {
    let _g = kernel_lock();
    if !kernel_tier_available() {
        return;
    }
    let root = TestCgroup::new("fair");
    let a = consumer(&root, "a", Some(1024), 200, &["--threads", "2"]);
    let b = consumer(&root, "b", Some(2048), 200, &["--threads", "2"]);
    let c = consumer(
        &root,
        "c",
        Some(1024),
        200,
        &["--threads", "1", "--percent", "15"],
    );
    let mut run = Run::start(&root, &["--node-reserve", "0"], vec![a, b, c]);
    std::thread::sleep(Duration::from_secs(20));
    // Converged: a and b, which each want both cores, are held at their
    // shares (market rule 0), and no limit was written for 5 rounds in a row.
    // Quiet rounds alone are not enough: under emulation, in the VM tier, the
    // node read as contended only now and then for the first 20–50 s (a pod
    // is held only once it takes more than its share), and the caps that
    // followed counted as changes after convergence.
    let t0 = std::time::Instant::now();
    let settled = |r: &Value| {
        ["a", "b", "c"]
            .iter()
            .all(|n| consumer_at(r, n).is_some_and(|c| c["changed"] != true))
            && ["a", "b"]
                .iter()
                .all(|n| consumer_at(r, n).is_some_and(|c| !c["contended_m"].is_null()))
    };
    let converged = loop {
        let rounds = run.rounds();
        if rounds.len() >= 5 && rounds[rounds.len() - 5..].iter().all(settled) {
            break rounds.len();
        }
        if t0.elapsed() > Duration::from_secs(80) {
            let log = run.stop();
            panic!(
                "a and b not held and quiet for 5 rounds within 100 s of the start; log:\n{log}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (steal0, t1) = (steal_ticks(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(60));
    let stolen = stolen_m(steal0, t1.elapsed().as_secs_f64());
    let rounds = run.rounds();
    let log = run.stop();
    let late = &rounds[converged.min(rounds.len())..];
    assert!(late.len() >= 50, "rounds after convergence: {}", late.len());
    let mean = |name: &str, key: &str| {
        let v: Vec<f64> = late
            .iter()
            .filter_map(|r| consumer_at(r, name)?[key].as_f64())
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (ua, ub, uc) = (
        mean("a", "usage_m"),
        mean("b", "usage_m"),
        mean("c", "usage_m"),
    );
    eprintln!(
        "usage a {ua:.0} m, b {ub:.0} m, c {uc:.0} m; {stolen:.0} m stolen by the hypervisor"
    );
    // c needs ~150 m and gets it; a and b share what is left 1:2 (what is left
    // is the machine less c and whatever else runs: measured, not assumed).
    assert!(uc >= 100.0, "the small consumer is served: {uc:.0} m");
    let rest = ua + ub;
    assert!(
        rest >= 1500.0,
        "a and b use the rest of the machine: {rest:.0} m ({stolen:.0} m stolen by the hypervisor); log:\n{log}"
    );
    let (fa, fb) = (rest / 3.0, rest * 2.0 / 3.0);
    assert!(
        (ua - fa).abs() <= fa * 0.10,
        "a: {ua:.0} m vs fair {fa:.0} m; log:\n{log}"
    );
    assert!(
        (ub - fb).abs() <= fb * 0.10,
        "b: {ub:.0} m vs fair {fb:.0} m; log:\n{log}"
    );
    for name in ["a", "b", "c"] {
        let changes = late
            .iter()
            .filter(|r| consumer_at(r, name).is_some_and(|c| c["changed"] == true))
            .count();
        assert!(
            changes <= 1,
            "{name} changed {changes} times in 60 s after convergence; log:\n{log}"
        );
    }
}

/// A consumer removed mid-run and a quota changed behind MBCAS's back are logged
/// and handled; the loop keeps running.
#[test]
fn removed_consumer_and_foreign_quota_change() {
    let _g = kernel_lock();
    if !kernel_tier_available() {
        return;
    }
    let root = TestCgroup::new("bad");
    let keep = consumer(
        &root,
        "keep",
        None,
        200,
        &["--threads", "1", "--percent", "30"],
    );
    let mut gone = consumer(
        &root,
        "gone",
        None,
        200,
        &["--threads", "1", "--percent", "30"],
    );
    let keep_dir = keep.0.clone();
    let mut run = Run::start(&root, &["--capacity-millicores", "1500"], vec![keep]);
    // Both consumers in a round (loading the eBPF programs takes seconds in
    // an emulated VM), then a few more rounds.
    let t0 = std::time::Instant::now();
    while !run
        .rounds()
        .last()
        .is_some_and(|r| consumer_at(r, "gone").is_some() && consumer_at(r, "keep").is_some())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no round with both consumers in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    // Remove one consumer: kill its burner and delete its cgroup.
    let _ = gone.2.kill();
    let _ = gone.2.wait();
    for p in std::iter::once(&gone.0).chain(gone.1.iter()) {
        for _ in 0..50 {
            if std::fs::remove_dir(p).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    // Change the quota behind MBCAS's back.
    if root.v2 {
        write(&keep_dir.join("cpu.max"), "77700 100000");
    } else {
        write(&keep_dir.join("cpu.cfs_quota_us"), "77700");
    }
    std::thread::sleep(Duration::from_secs(3));
    let rounds = run.rounds();
    let log = run.stop();
    assert!(
        log.contains("vanished") || log.contains("removed"),
        "removal logged:\n{log}"
    );
    assert!(
        log.contains("behind MBCAS's back"),
        "foreign change logged:\n{log}"
    );
    let last = rounds.last().expect("no rounds");
    assert!(
        consumer_at(last, "gone").is_none(),
        "removed consumer forgotten"
    );
    assert!(consumer_at(last, "keep").is_some(), "loop kept running");
    let stats_line = log
        .lines()
        .find(|l| l.contains("local mode stopped"))
        .unwrap_or_default()
        .to_owned();
    assert!(stats_line.contains("consumers_removed: 1"), "{stats_line}");
    assert!(stats_line.contains("external_changes: 1"), "{stats_line}");
}
