//! `cargo xtask bench-local`: local mode's own cost and its reaction time.
//!
//! 1. Overhead: 100 consumer cgroups, each with a light `mbcas burn` (2 %), and
//!    `mbcas run --mode local` over them for `--seconds`; prints the daemon's CPU
//!    share of one core (from /proc/PID/stat) and peak RSS (VmHWM).
//! 2. Reaction: one consumer at a 100 m quota starts a full-core burner; the time
//!    until the quota file changes is measured, `--trials` times; prints p50/max.
//!
//! Needs root. Removes every cgroup and process it made, also on failure.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Length of the overhead run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Reaction-time trials.
    #[arg(long, default_value_t = 5)]
    pub trials: u32,
}

/// A consumer's `cpu` directory and, on hybrid v1, its `cpuacct` peer.
type ConsumerDirs = (PathBuf, Option<PathBuf>);

struct Guard {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            crate::host::remove_cgroup(d);
        }
    }
}

impl Guard {
    fn mkdir(&mut self, p: PathBuf) -> anyhow::Result<PathBuf> {
        std::fs::create_dir(&p).with_context(|| format!("mkdir {} (needs root)", p.display()))?;
        self.dirs.push(p.clone());
        Ok(p)
    }

    /// A root and `n` consumers under it; returns the root.
    fn tree(
        &mut self,
        tag: &str,
        n: usize,
        quota_m: u64,
    ) -> anyhow::Result<(PathBuf, Vec<ConsumerDirs>)> {
        let roots = crate::host::CgroupRoots::detect()?;
        if roots.v2 {
            bail!("bench-local supports cgroup v1 (this project's CI machines) only");
        }
        let (cpu, acct) = (roots.cpu, roots.cpuacct);
        let name = format!("mbcas-bench-{tag}-{}", std::process::id());
        let root = self.mkdir(cpu.join(&name))?;
        let aroot = match &acct {
            Some(a) => Some(self.mkdir(a.join(&name))?),
            None => None,
        };
        let mut out = Vec::new();
        for i in 0..n {
            let d = self.mkdir(root.join(format!("c{i}")))?;
            std::fs::write(d.join("cpu.cfs_quota_us"), (quota_m * 100).to_string())?;
            let a = match &aroot {
                Some(a) => Some(self.mkdir(a.join(format!("c{i}")))?),
                None => None,
            };
            out.push((d, a));
        }
        Ok((root, out))
    }

    fn burn(
        &mut self,
        bin: &Path,
        dir: &(PathBuf, Option<PathBuf>),
        args: &[&str],
    ) -> anyhow::Result<()> {
        let child = Command::new(bin)
            .arg("burn")
            .args(args)
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id().to_string();
        self.children.push(child);
        std::fs::write(dir.0.join("cgroup.procs"), &pid)?;
        if let Some(a) = &dir.1 {
            std::fs::write(a.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }
}

fn daemon(bin: &Path, root: &Path) -> anyhow::Result<Child> {
    Command::new(bin)
        .args([
            "--log-level",
            "warn",
            "run",
            "--mode",
            "local",
            "--capacity-millicores",
            "2000",
            "--local-root",
        ])
        .arg(root)
        .stdin(Stdio::null())
        .spawn()
        .context("start mbcas run")
}

fn stop(mut d: Child) {
    if let Err(e) = crate::cmd::signal(&d, nix::sys::signal::Signal::SIGINT) {
        eprintln!("bench-local: {e:#}");
    }
    let _ = d.wait();
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let bin = crate::host::build_mbcas(true)?;

    // 1. Overhead with 100 consumers.
    {
        let mut g = Guard {
            dirs: Vec::new(),
            children: Vec::new(),
        };
        let (root, consumers) = g.tree("overhead", 100, 200)?;
        for c in &consumers {
            g.burn(&bin, c, &["--threads", "1", "--percent", "2"])?;
        }
        let d = daemon(&bin, &root)?;
        let pid = d.id();
        std::thread::sleep(Duration::from_secs(3));
        let c0 = crate::procs::cpu_seconds(pid);
        std::thread::sleep(Duration::from_secs(opts.seconds));
        let c1 = crate::procs::cpu_seconds(pid);
        let hwm = crate::procs::status_kib(pid, "VmHWM");
        stop(d);
        println!(
            "local mode, 100 consumers, {} s: {:.2} % of one core, peak RSS {:.1} MiB",
            opts.seconds,
            (c1 - c0) / opts.seconds as f64 * 100.0,
            hwm as f64 / 1024.0
        );
    }

    // 2. Reaction time.
    let mut times = Vec::new();
    for trial in 0..opts.trials {
        let mut g = Guard {
            dirs: Vec::new(),
            children: Vec::new(),
        };
        let (root, consumers) = g.tree(&format!("react{trial}"), 1, 100)?;
        let d = daemon(&bin, &root)?;
        // Let the loop see the idle consumer first.
        std::thread::sleep(Duration::from_secs(3));
        let quota = consumers[0].0.join("cpu.cfs_quota_us");
        let before = std::fs::read_to_string(&quota)?;
        let t0 = Instant::now();
        g.burn(&bin, &consumers[0], &["--threads", "1"])?;
        let mut reacted = None;
        while t0.elapsed() < Duration::from_secs(10) {
            if std::fs::read_to_string(&quota)? != before {
                reacted = Some(t0.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        stop(d);
        match reacted {
            Some(t) => times.push(t),
            None => println!("trial {trial}: no quota change within 10 s"),
        }
    }
    times.sort();
    if let (Some(p50), Some(max)) = (times.get(times.len() / 2), times.last()) {
        println!(
            "reaction (burner start → new quota written): p50 {:.0} ms, max {:.0} ms over {} trials",
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            times.len()
        );
    }
    Ok(())
}
