//! `cargo xtask bench-latency`: a real HTTP server's latency next to a noisy
//! neighbour, under static limits, no limits and MBCAS, on this machine.
//!
//! The server is Debian's nginx (two workers, gzip level 6 on a 256 KiB text
//! page: a few ms of CPU a request), the load an open-loop generator (vegeta,
//! built from its Go module and cached: requests are sent at a fixed rate
//! whether or not earlier ones completed, so queueing shows in the latency),
//! the neighbour `mbcas burn --threads 2` (two spinning threads). Both run in
//! cgroups of a tree made here (`server`: weight of a 1-core request,
//! `noisy`: of a 500 m request); vegeta runs outside it.
//!
//! Four phases on identical load, each `--repeats` times, interleaved (one
//! repetition runs every phase before the next starts, so drift of the machine
//! hits them alike), each rate of `--rates` for `--seconds` after a warm-up:
//! 1. `alone`: the server with no neighbour and no limit (the physical limit);
//! 2. `static`: server 1000 m, neighbour 1000 m (a partition of the 2 cores);
//! 3. `nolimits`: no quota on either; `cpu.shares`/`cpu.weight` only;
//! 4. `mbcas`: `mbcas run --mode local` over the tree, starting from the
//!    static limits.
//!
//! Reported per rate and phase: latency p50/p99/p999 (median of the
//! repetitions, with their spread), errors, the server's throttled-period
//! ratio and run-queue wait, the neighbour's CPU. Then the claim:
//! MBCAS's p99 ≤ 0.9 × min(static, no limits) where static is not saturated,
//! or ≤ 1.1 × alone where the better baseline is already within 1.2 × alone,
//! never above 1.3 × alone, and no more errors than either baseline. Every
//! process and cgroup it made is removed on exit and on failure. Needs root.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

mod node;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Request rates (per second), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    pub rates: Vec<u32>,
    /// Measured seconds per rate and phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Repetitions of every phase.
    #[arg(long, default_value_t = 3)]
    pub repeats: u32,
    /// Seconds of load before measuring, per phase (MBCAS learns in it).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Where the Markdown summary (`latency.md`, with `--node`
    /// `latency-node.md`) goes; `docs/evaluation` puts it into the evaluation
    /// report.
    #[arg(long, value_name = "DIR", default_value = "target/bench-latency")]
    pub report_dir: PathBuf,
    /// Run the server and the neighbour as pods on the test environment's
    /// real node (brought up when down), MBCAS as its DaemonSet, instead of
    /// in a cgroup tree on this machine.
    #[arg(long)]
    pub node: bool,
}

const VEGETA_MODULE: &str = "github.com/tsenart/vegeta/v12";
const VEGETA_VERSION: &str = "v12.13.0";
const PORT: u16 = 18_481;
const PAGE_BYTES: usize = 256 * 1024;
const CAPACITY_M: u64 = 2000;

/// The phases, in the order each repetition runs them.
const PHASES: [&str; 4] = ["alone", "static", "nolimits", "mbcas"];

fn vegeta() -> anyhow::Result<PathBuf> {
    let bin = crate::testenv::cache_dir()
        .join("bin")
        .join(format!("vegeta-{VEGETA_VERSION}"));
    if !bin.is_file() {
        crate::testenv::build_go_tool(
            "vegeta",
            VEGETA_MODULE,
            VEGETA_VERSION,
            VEGETA_MODULE,
            "",
            &bin,
        )?;
    }
    Ok(bin)
}

/// One group's counters: usage ns, nr_periods, nr_throttled, Σ run delay
/// of its threads ns.
type Counters = (u64, u64, u64, u64);

/// Where the server and its neighbour run: a cgroup tree on this machine or
/// pods on the test node.
trait Stage {
    /// Sets `phase` up (limits, the neighbour, MBCAS); the server answers
    /// at [`Stage::url`] when it returns.
    fn enter(&mut self, phase: &'static str) -> anyhow::Result<()>;
    /// Stops what [`Stage::enter`] started.
    fn leave(&mut self) -> anyhow::Result<()>;
    /// The page the load generator asks for.
    fn url(&self) -> String;
    /// The server's and the neighbour's counters (zeros for a neighbour that
    /// does not run).
    fn counters(&self) -> anyhow::Result<(Counters, Counters)>;
    /// A directory for the load generator's results.
    fn work(&self) -> &Path;
    /// Where it ran, for the report.
    fn describe(&self) -> String;
}

/// The limits of a phase: (server, neighbour), `None` for no limit.
fn phase_limits(phase: &str) -> (Option<u64>, Option<u64>) {
    match phase {
        "static" | "mbcas" => (Some(1000), Some(1000)),
        _ => (None, None),
    }
}

/// nginx's configuration: two workers, gzip 6, `listen`, pid and temporary
/// files in `tmp`, the page in `html`.
fn nginx_conf(listen: &str, tmp: &Path, html: &Path) -> String {
    format!(
        "worker_processes 2;\npid {tmp}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  \
         fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  \
         gzip on;\n  gzip_comp_level 6;\n  gzip_types text/plain;\n  gzip_min_length 1;\n  \
         server {{\n    listen {listen};\n    root {html};\n    default_type text/plain;\n  }}\n}}\n",
        tmp = tmp.display(),
        html = html.display()
    )
}

/// A cgroup of the tree: its directory in the `cpu` hierarchy (v1) or the
/// unified one (v2), and its `cpuacct` twin on a v1 hybrid.
struct Group {
    cpu: PathBuf,
    acct: Option<PathBuf>,
}

/// Everything the bench made; dropped in reverse order, also on error.
struct Bench {
    root: Group,
    server: Group,
    noisy: Group,
    v2: bool,
    work: PathBuf,
    /// The `mbcas` binary (the neighbour's burner and the daemon).
    bin: PathBuf,
    nginx: Option<Child>,
    neighbour: Option<Child>,
    daemon: Option<Child>,
}

impl Bench {
    fn new(work: PathBuf, bin: PathBuf) -> anyhow::Result<Self> {
        let roots = crate::host::CgroupRoots::detect()?;
        let name = format!("mbcas-latency-{}", std::process::id());
        let group = |rel: &str| Group {
            cpu: roots.cpu.join(rel),
            acct: roots.cpuacct.as_ref().map(|a| a.join(rel)),
        };
        let b = Self {
            root: group(&name),
            server: group(&format!("{name}/server")),
            noisy: group(&format!("{name}/noisy")),
            v2: roots.v2,
            work,
            bin,
            nginx: None,
            neighbour: None,
            daemon: None,
        };
        for g in [&b.root, &b.server, &b.noisy] {
            for d in std::iter::once(&g.cpu).chain(g.acct.iter()) {
                std::fs::create_dir(d)
                    .with_context(|| format!("mkdir {} (needs root)", d.display()))?;
            }
        }
        if b.v2 {
            let _ = std::fs::write(b.root.cpu.join("cgroup.subtree_control"), "+cpu");
        }
        // Weights of a 1-core request and a 500 m one.
        for (g, shares) in [(&b.server, 1024u64), (&b.noisy, 512)] {
            if b.v2 {
                std::fs::write(g.cpu.join("cpu.weight"), (shares * 100 / 1024).to_string())?;
            } else {
                std::fs::write(g.cpu.join("cpu.shares"), shares.to_string())?;
            }
        }
        Ok(b)
    }

    /// Sets a group's limit (`None`: no limit), period 100 ms.
    fn limit(&self, g: &Group, m: Option<u64>) -> anyhow::Result<()> {
        if self.v2 {
            let q = m.map_or_else(|| "max".to_owned(), |m| (m * 100).to_string());
            std::fs::write(g.cpu.join("cpu.max"), format!("{q} 100000"))?;
        } else {
            std::fs::write(g.cpu.join("cpu.cfs_period_us"), "100000")?;
            let q = m.map_or(-1, |m| i64::try_from(m * 100).unwrap_or(i64::MAX));
            std::fs::write(g.cpu.join("cpu.cfs_quota_us"), q.to_string())?;
        }
        Ok(())
    }

    /// Starts `program args` inside `g`: a shell moves itself into the group
    /// (both hierarchies on v1) and then execs, so every process it forks is in.
    fn spawn_in(g: &Group, program: &Path, args: &[&str]) -> anyhow::Result<Child> {
        let mut script = format!("echo $$ > '{}/cgroup.procs'", g.cpu.display());
        if let Some(a) = &g.acct {
            script.push_str(&format!(" && echo $$ > '{}/cgroup.procs'", a.display()));
        }
        script.push_str(" && exec \"$@\"");
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", program.display()))
    }

    fn start_nginx(&mut self) -> anyhow::Result<()> {
        let conf = self.work.join("nginx.conf");
        let html = self.work.join("html");
        let tmp = self.work.join("tmp");
        std::fs::create_dir_all(&html)?;
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(html.join("page.txt"), page())?;
        std::fs::write(&conf, nginx_conf(&format!("127.0.0.1:{PORT}"), &tmp, &html))?;
        let conf = conf.to_string_lossy().into_owned();
        self.nginx = Some(Self::spawn_in(
            &self.server,
            Path::new("/usr/sbin/nginx"),
            &["-c", &conf, "-g", "daemon off;"],
        )?);
        // Wait until it answers.
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen on 127.0.0.1:{PORT} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stop(child: &mut Option<Child>, sig: nix::sys::signal::Signal) {
        if let Some(mut c) = child.take() {
            let _ = crate::cmd::signal(&c, sig);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        use nix::sys::signal::Signal;
        Self::stop(&mut self.daemon, Signal::SIGINT);
        Self::stop(&mut self.neighbour, Signal::SIGKILL);
        Self::stop(&mut self.nginx, Signal::SIGQUIT);
        for g in [&self.server, &self.noisy, &self.root] {
            for d in std::iter::once(&g.cpu).chain(g.acct.iter()) {
                crate::host::remove_cgroup(d);
            }
        }
    }
}

impl Stage for Bench {
    fn enter(&mut self, phase: &'static str) -> anyhow::Result<()> {
        let (server, noisy) = phase_limits(phase);
        self.limit(&self.server, server)?;
        self.limit(&self.noisy, noisy)?;
        if phase != "alone" {
            self.neighbour = Some(Self::spawn_in(
                &self.noisy,
                &self.bin,
                &["burn", "--threads", "2"],
            )?);
        }
        if phase == "mbcas" {
            let mut cmd = crate::host::local_daemon(&self.bin, &self.root.cpu, CAPACITY_M);
            self.daemon = Some(cmd.spawn().context("start mbcas run --mode local")?);
        }
        Ok(())
    }

    fn leave(&mut self) -> anyhow::Result<()> {
        Self::stop(&mut self.daemon, nix::sys::signal::Signal::SIGINT);
        Self::stop(&mut self.neighbour, nix::sys::signal::Signal::SIGKILL);
        Ok(())
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{PORT}/page.txt")
    }

    fn counters(&self) -> anyhow::Result<(Counters, Counters)> {
        Ok((
            counters(&self.server, self.v2)?,
            counters(&self.noisy, self.v2)?,
        ))
    }

    fn work(&self) -> &Path {
        &self.work
    }

    fn describe(&self) -> String {
        format!(
            "a cgroup tree on this machine (cgroup {}), MBCAS in local mode",
            if self.v2 { "v2" } else { "v1" }
        )
    }
}

/// A compressible but not trivial text page (gzip works for its ratio).
fn page() -> String {
    let words = [
        "market",
        "based",
        "cpu",
        "allocation",
        "kernel",
        "throttling",
        "cgroup",
        "quota",
        "weight",
        "demand",
        "latency",
        "neighbour",
        "scheduler",
        "period",
        "burst",
        "share",
    ];
    let mut s = String::with_capacity(PAGE_BYTES + 64);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while s.len() < PAGE_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(words[(x % words.len() as u64) as usize]);
        s.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
    }
    s
}

/// Counters of one group.
fn counters(g: &Group, v2: bool) -> anyhow::Result<Counters> {
    let r = crate::demo::read_counters(&g.cpu, g.acct.as_deref(), v2)?;
    Ok((r.usage_ns, r.nr_periods, r.nr_throttled, r.wait_ns))
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
struct Run {
    phase: &'static str,
    rate: u32,
    repeat: u32,
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    server_throttled_ratio: f64,
    /// Run-queue wait of the server's threads, thread-millicores.
    server_wait_m: f64,
    server_cpu_m: f64,
    noisy_cpu_m: f64,
    /// What the hypervisor stole from the machine meanwhile, millicores: a
    /// latency taken while it is high is not the machine's own.
    stolen_m: f64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Sends `rate` requests a second for `seconds` and measures.
fn attack(
    b: &dyn Stage,
    vegeta: &Path,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let out = b.work().join("results.bin");
    let mut child = Command::new(vegeta)
        .args([
            "attack",
            &format!("-rate={rate}/s"),
            &format!("-duration={seconds}s"),
            "-timeout=10s",
            "-header=Accept-Encoding: gzip",
            "-keepalive=true",
        ])
        .arg(format!("-output={}", out.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("run vegeta attack")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("vegeta stdin")?;
        writeln!(stdin, "GET {}", b.url())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("vegeta attack failed: {status}");
    }
    let csv = Command::new(vegeta)
        .args(["encode", "--to", "csv"])
        .arg(&out)
        .output()
        .context("run vegeta encode")?;
    if !csv.status.success() {
        bail!("vegeta encode failed: {}", csv.status);
    }
    // timestamp,code,latency_ns,bytes_out,bytes_in,error,body,attack,seq,method,url,headers
    let mut lat = Vec::new();
    let mut errors = 0;
    for line in String::from_utf8_lossy(&csv.stdout).lines() {
        let f: Vec<&str> = line.splitn(7, ',').collect();
        if f.len() < 6 {
            continue;
        }
        let code: u32 = f[1].parse().unwrap_or(0);
        if code != 200 || !f[5].is_empty() {
            errors += 1;
        }
        if let Ok(ns) = f[2].parse::<f64>() {
            lat.push(ns / 1e6);
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat, errors))
}

fn measure(
    b: &dyn Stage,
    vegeta: &Path,
    phase: &'static str,
    rate: u32,
    repeat: u32,
    seconds: u64,
) -> anyhow::Result<Run> {
    let (s0, n0) = b.counters()?;
    let steal0 = crate::procs::steal_ticks();
    let t0 = Instant::now();
    let (lat, errors) = attack(b, vegeta, rate, seconds)?;
    let (s1, n1) = b.counters()?;
    let secs = t0.elapsed().as_secs_f64();
    let periods = s1.1.saturating_sub(s0.1);
    Ok(Run {
        phase,
        rate,
        repeat,
        requests: lat.len(),
        errors,
        p50_ms: quantile(&lat, 0.5),
        p99_ms: quantile(&lat, 0.99),
        p999_ms: quantile(&lat, 0.999),
        server_throttled_ratio: if periods == 0 {
            0.0
        } else {
            s1.2.saturating_sub(s0.2) as f64 / periods as f64
        },
        server_wait_m: s1.3.saturating_sub(s0.3) as f64 / 1e6 / secs,
        server_cpu_m: s1.0.saturating_sub(s0.0) as f64 / 1e6 / secs,
        noisy_cpu_m: n1.0.saturating_sub(n0.0) as f64 / 1e6 / secs,
        stolen_m: crate::procs::stolen_m(steal0, secs),
    })
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !crate::procs::is_root() {
        bail!("bench-latency needs root (cgroups)");
    }
    if opts.rates.is_empty() || opts.repeats == 0 {
        bail!("--rates and --repeats must not be empty");
    }
    crate::setup::ensure_debian_packages(&["nginx"])?;
    let vegeta = vegeta()?;
    std::fs::create_dir_all(&opts.report_dir)?;
    let work = std::env::temp_dir().join(format!("mbcas-latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = if opts.node {
        node::run(work.clone(), |stage| phases(stage, &vegeta, opts))
    } else {
        let bin = crate::host::build_mbcas(true)?;
        Bench::new(work.clone(), bin).and_then(|mut b| {
            b.start_nginx()?;
            phases(&mut b, &vegeta, opts)
        })
    };
    let _ = std::fs::remove_dir_all(&work);
    let (runs, place) = result?;
    let summary = summarise(&runs, &opts.rates);
    let md = markdown(&summary, opts, &place);
    let name = if opts.node {
        "latency-node.md"
    } else {
        "latency.md"
    };
    std::fs::write(opts.report_dir.join(name), &md)?;
    println!("\n{md}");
    if let Some(out) = &opts.json_out {
        std::fs::write(out, serde_json::to_string_pretty(&(&runs, &summary))?)?;
    }
    Ok(())
}

/// Every repetition of every phase at every rate on `stage`; returns the
/// runs and where they ran.
fn phases(
    stage: &mut dyn Stage,
    vegeta: &Path,
    opts: &Options,
) -> anyhow::Result<(Vec<Run>, String)> {
    let mut runs = Vec::new();
    for repeat in 1..=opts.repeats {
        for phase in PHASES {
            eprintln!("bench-latency: repetition {repeat}, phase {phase}");
            stage.enter(phase)?;
            let measured = (|| {
                // Warm-up under the first rate's load.
                let _ = attack(stage, vegeta, opts.rates[0], opts.warmup)?;
                for &rate in &opts.rates {
                    let r = measure(stage, vegeta, phase, rate, repeat, opts.seconds)?;
                    eprintln!(
                        "  {phase} {rate}/s: p50 {:.1} ms p99 {:.1} ms p999 {:.1} ms, errors {}, server throttled {:.3}, wait {:.0} m, noisy {:.0} m, stolen {:.0} m",
                        r.p50_ms,
                        r.p99_ms,
                        r.p999_ms,
                        r.errors,
                        r.server_throttled_ratio,
                        r.server_wait_m,
                        r.noisy_cpu_m,
                        r.stolen_m
                    );
                    runs.push(r);
                }
                anyhow::Ok(())
            })();
            let left = stage.leave();
            measured?;
            left?;
        }
    }
    Ok((runs, stage.describe()))
}

/// Median and spread of one figure over the repetitions.
#[derive(Clone, Copy, Debug, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        median: quantile(&v, 0.5),
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

#[derive(Debug, Serialize)]
struct Cell {
    phase: &'static str,
    rate: u32,
    p50: Spread,
    p99: Spread,
    p999: Spread,
    errors: usize,
    server_throttled_ratio: f64,
    server_wait_m: f64,
    noisy_cpu_m: f64,
    stolen_m: f64,
}

#[derive(Debug, Serialize)]
struct Verdict {
    rate: u32,
    goal: String,
    passed: bool,
}

#[derive(Debug, Serialize)]
struct Summary {
    cells: Vec<Cell>,
    verdicts: Vec<Verdict>,
    kernel: String,
}

fn summarise(runs: &[Run], rates: &[u32]) -> Summary {
    let mut cells = Vec::new();
    for &rate in rates {
        for phase in PHASES {
            let rs: Vec<&Run> = runs
                .iter()
                .filter(|r| r.phase == phase && r.rate == rate)
                .collect();
            let mean =
                |f: fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / rs.len().max(1) as f64;
            cells.push(Cell {
                phase,
                rate,
                p50: spread(rs.iter().map(|r| r.p50_ms).collect()),
                p99: spread(rs.iter().map(|r| r.p99_ms).collect()),
                p999: spread(rs.iter().map(|r| r.p999_ms).collect()),
                errors: rs.iter().map(|r| r.errors).sum(),
                server_throttled_ratio: mean(|r| r.server_throttled_ratio),
                server_wait_m: mean(|r| r.server_wait_m),
                noisy_cpu_m: mean(|r| r.noisy_cpu_m),
                stolen_m: mean(|r| r.stolen_m),
            });
        }
    }
    let mut verdicts = Vec::new();
    for &rate in rates {
        let get = |p: &str| cells.iter().find(|c| c.phase == p && c.rate == rate);
        let (Some(alone), Some(st), Some(nl), Some(mb)) =
            (get("alone"), get("static"), get("nolimits"), get("mbcas"))
        else {
            continue;
        };
        let best = st.p99.median.min(nl.p99.median);
        // Static saturated: its server was throttled in most periods.
        let static_saturated = st.server_throttled_ratio > 0.5;
        let (goal, ok) = if best <= 1.2 * alone.p99.median {
            (
                format!(
                    "p99 ≤ 1.1 × alone ({:.1} ms): the better baseline is within 1.2 × alone",
                    1.1 * alone.p99.median
                ),
                mb.p99.median <= 1.1 * alone.p99.median,
            )
        } else if static_saturated {
            (
                format!(
                    "static saturated: p99 ≤ no limits' ({:.1} ms)",
                    nl.p99.median
                ),
                mb.p99.median <= nl.p99.median,
            )
        } else {
            (
                format!("p99 ≤ 0.9 × min(static, no limits) = {:.1} ms", 0.9 * best),
                mb.p99.median <= 0.9 * best,
            )
        };
        let ceiling = mb.p99.median <= 1.3 * alone.p99.median;
        let errors = mb.errors <= st.errors.min(nl.errors);
        verdicts.push(Verdict {
            rate,
            goal: format!(
                "{goal}; ≤ 1.3 × alone ({:.1} ms); errors ≤ min(static, no limits) ({}): MBCAS p99 {:.1} ms, errors {}",
                1.3 * alone.p99.median,
                st.errors.min(nl.errors),
                mb.p99.median,
                mb.errors
            ),
            passed: ok && ceiling && errors,
        });
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Summary {
        cells,
        verdicts,
        kernel,
    }
}

fn markdown(s: &Summary, opts: &Options, place: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let mut out = format!(
        "nginx (gzip 6, 256 KiB page) under vegeta's open-loop load next to `mbcas burn --threads 2`, \
         in {place}; Linux {}, {cpus} CPUs; {} s per rate after a {} s warm-up, {} repetitions (median, min–max):\n\n\
         | rate | phase | p50 ms | p99 ms | p999 ms | errors | server throttled | server wait m | neighbour CPU m | stolen m |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        s.kernel, opts.seconds, opts.warmup, opts.repeats
    );
    let f = |x: &Spread| format!("{:.1} ({:.1}–{:.1})", x.median, x.min, x.max);
    for c in &s.cells {
        out.push_str(&format!(
            "| {}/s | {} | {} | {} | {} | {} | {:.3} | {:.0} | {:.0} | {:.0} |\n",
            c.rate,
            c.phase,
            f(&c.p50),
            f(&c.p99),
            f(&c.p999),
            c.errors,
            c.server_throttled_ratio,
            c.server_wait_m,
            c.noisy_cpu_m,
            c.stolen_m
        ));
    }
    out.push_str("\n| rate | claim | |\n|---|---|---|\n");
    for v in &s.verdicts {
        out.push_str(&format!(
            "| {}/s | {} | {} |\n",
            v.rate,
            v.goal,
            if v.passed { "pass" } else { "MISSED" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_spread() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 501.0);
        assert_eq!(quantile(&v, 0.99), 990.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert!(quantile(&[], 0.5).is_nan());
        let s = spread(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    }

    #[test]
    fn the_page_compresses_but_not_to_nothing() {
        let p = page();
        assert!(p.len() >= PAGE_BYTES);
        assert!(p.is_ascii());
    }
}
