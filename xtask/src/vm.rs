//! `cargo xtask vm-test`: the kernel tier on other kernels, on cgroup v2, in
//! QEMU virtual machines.
//!
//! For each kernel of the matrix (Debian's 6.1 and 6.12 cloud kernels, the
//! newest build of each series the Debian archive serves), the package is
//! fetched with `apt-get download` into the cache (`~/.cache/mbcas/vm`) and its
//! `vmlinuz` unpacked; nothing is installed on the host's boot. The VM boots
//! that kernel with an initramfs written here: busybox (Debian's
//! `busybox-static`), the kernel-tier test binaries and the `mbcas` binary
//! they run (debug info stripped, at the paths they were built with, with the
//! shared libraries `ldd` names), and an `/init` that mounts cgroup v2 with the
//! `cpu` controller delegated to the root's children, runs each test binary
//! with `CI=1` (a test that cannot run fails rather than skips) and reports
//! through the serial console (`mbcas-vm: result NAME CODE`); no disk, no
//! network. The kernel command line turns on PSI (`psi=1`: Debian builds it
//! disabled by default).
//!
//! KVM is used when a probe guest boots under it within [`KVM_PROBE`];
//! otherwise QEMU emulates the CPU (TCG, one host thread per guest CPU), and
//! the output says which. Emulated CPUs are slow: the tests assert what the
//! kernel does, with the tolerances written in each test, not emulated timing.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd::{output_of, run_cmd, shared_libraries};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Kernel series to boot (Debian cloud kernels), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = MATRIX.map(String::from))]
    pub kernels: Vec<String>,
    /// Only the tests whose name contains this (passed to each test binary).
    #[arg(long)]
    pub filter: Option<String>,
    /// Give up on a VM after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// The kernel series booted by default (and by CI).
pub const MATRIX: [&str; 2] = ["6.1", "6.12"];

/// The test binaries run in each VM: the host's kernel tier.
pub const TESTS: &[&str] = &["kernel_local", "kernel_sensor"];

/// How long one test binary may run in the guest before its init reports it
/// stalled, dumps what every task waits on and kills it.
const TEST_STALL_S: u64 = 420;

/// How long the serial console may stay silent before the guest is taken
/// for hung and killed (longer than [`TEST_STALL_S`] and its dump).
const SILENCE: Duration = Duration::from_secs(540);

/// How long a probe guest may take to boot under KVM before TCG is used.
const KVM_PROBE: Duration = Duration::from_secs(20);

/// What the guest's `/init` prints; the host parses it.
const MARK: &str = "mbcas-vm:";

/// A kernel series of the matrix: the Debian package names it matches.
struct Series {
    name: &'static str,
    /// `linux-image-{prefix}N{suffix}`, N an ABI or patch number.
    prefix: &'static str,
    suffix: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud-amd64",
    },
];

/// One VM's outcome.
struct Outcome {
    kernel: String,
    accel: &'static str,
    boot: Option<Duration>,
    total: Duration,
    results: Vec<(String, i32, Duration)>,
    /// Boots of this kernel before the one reported that crashed or stalled
    /// (see [`guest_trouble`]).
    crashed_boots: u32,
}

/// QEMU 7.2 (Debian 12's) races when one emulated CPU patches kernel text
/// another is running (static keys, jump labels: at boot, when a tracepoint
/// is enabled, when the first CFS quota is set); the guest dies with
/// `Oops: int3`, or hangs. QEMU 8.1 fixed it ("accel/tcg: Always lock pages
/// before translation"). A guest that crashes or stalls under TCG is booted
/// once more, and says so, keeping the first serial log; a second crash or
/// stall fails the tier.
const TCG_BOOTS: u32 = 2;

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !crate::procs::is_root() {
        bail!("vm-test needs root: apt-get for QEMU, busybox and the kernels");
    }
    crate::setup::ensure_debian_packages(&["qemu-system-x86", "busybox-static"])?;
    let series: Vec<&Series> = opts
        .kernels
        .iter()
        .map(|k| {
            SERIES.iter().find(|s| s.name == k).with_context(|| {
                format!(
                    "kernel series {k:?} is not in the matrix ({})",
                    SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let work = crate::testenv::workspace_root().join("target/vm-test");
    fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    let binaries = build_tests()?;
    let initrd = work.join("initramfs.cpio");
    write_initramfs(&initrd, &work, &binaries, opts.filter.as_deref())?;
    let accel = choose_accel(&work)?;
    let mut outcomes = Vec::new();
    for s in series {
        let kernel = fetch_kernel(s)?;
        eprintln!(
            "vm-test: booting {} ({}) with cgroup v2 under {accel}",
            kernel.display(),
            s.name
        );
        let log = work.join(format!("{}.log", s.name));
        let boots = if accel == "tcg" { TCG_BOOTS } else { 1 };
        let mut crashed_boots = 0;
        let outcome = loop {
            let (lines, ending) = run_vm(
                &kernel,
                &initrd,
                accel,
                &log,
                Duration::from_secs(opts.timeout),
                |line| eprintln!("[{}] {line}", s.name),
            )?;
            match guest_trouble(&lines, ending) {
                Some(trouble) if crashed_boots + 1 < boots => {
                    crashed_boots += 1;
                    let kept = work.join(format!("{}.crash{crashed_boots}.log", s.name));
                    let _ = fs::copy(&log, &kept);
                    eprintln!(
                        "vm-test: WARNING: the {} guest {trouble} under TCG; QEMU 7.2 races \
                         on cross-CPU kernel text patching: booting it once more (serial \
                         log kept in {})",
                        s.name,
                        kept.display()
                    );
                }
                Some(trouble) => bail!(
                    "the {} guest {trouble}, in {} boot(s) (serial log: {})",
                    s.name,
                    crashed_boots + 1,
                    log.display()
                ),
                None => break outcome(s.name, accel, &log, &lines, crashed_boots)?,
            }
        };
        outcomes.push(outcome);
    }
    let mut failed = Vec::new();
    println!("vm-test: kernel | accel | boot | tests | wall | crashed or stalled boots");
    for o in &outcomes {
        let tests: Vec<String> = o
            .results
            .iter()
            .map(|(n, rc, d)| {
                format!(
                    "{n} {} in {:.0} s",
                    if *rc == 0 { "ok" } else { "FAILED" },
                    d.as_secs_f64()
                )
            })
            .collect();
        println!(
            "vm-test: {} | {} | {} | {} | {:.0} s | {}",
            o.kernel,
            o.accel,
            o.boot
                .map_or("-".into(), |b| format!("{:.1} s", b.as_secs_f64())),
            tests.join(", "),
            o.total.as_secs_f64(),
            o.crashed_boots
        );
        for t in TESTS {
            match o.results.iter().find(|(n, _, _)| n == t) {
                Some((_, 0, _)) => {}
                Some((_, rc, _)) => failed.push(format!("{t} on {} exited {rc}", o.kernel)),
                None => failed.push(format!("{t} on {} did not report", o.kernel)),
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "vm-test: {} (serial logs in {})",
            failed.join("; "),
            work.display()
        );
    }
    Ok(())
}

/// Builds the kernel-tier test binaries (as `cargo xtask test`'s kernel tier
/// builds them, so CI reuses its build); returns (path on the host, path in
/// the VM) for them and for the `mbcas` binary they run.
fn build_tests() -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for t in TESTS {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        let test = v["profile"]["test"].as_bool() == Some(true);
        if test && TESTS.contains(&name) {
            files.push((PathBuf::from(exe), PathBuf::from(format!("/t/{name}"))));
        } else if !test && name == "mbcas" {
            // At the path the tests were built with (`CARGO_BIN_EXE_mbcas`).
            files.push((PathBuf::from(exe), PathBuf::from(exe)));
        }
    }
    for t in TESTS {
        if !files.iter().any(|(_, to)| to.ends_with(t)) {
            bail!("cargo built no test binary for {t}");
        }
    }
    if files.len() != TESTS.len() + 1 {
        bail!("cargo test --no-run named no mbcas binary (or more than one)");
    }
    Ok(files)
}

/// The init the guest runs: mounts, cgroup v2 with `cpu` delegated, each
/// test binary in turn, its exit code, power off. A binary still running
/// [`TEST_STALL_S`] after it started is reported stalled (`mbcas-vm: stall`),
/// what each task waits on is printed (`wchan`, the kernel's blocked-task and
/// per-CPU backtraces from sysrq), and every process but init is killed.
fn init_script(filter: Option<&str>) -> String {
    let filter = filter.map_or(String::new(), |f| format!(" '{}'", f.replace('\'', "")));
    let mut s = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root CI=1 RUST_BACKTRACE=1
mkdir -p /proc /sys /dev /tmp /root /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "{MARK} no cgroup2"
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
ulimit -l unlimited
echo "{MARK} kernel $(uname -r) cpus $(nproc) controllers $(cat /sys/fs/cgroup/cgroup.controllers) btf $(test -e /sys/kernel/btf/vmlinux && echo yes || echo no)"
"#
    );
    for t in TESTS {
        s.push_str(&format!(
            r#"echo "{MARK} start {t}"
/t/{t} --test-threads=1{filter} &
p=$!
(i=0; while kill -0 $p 2>/dev/null && [ $i -lt {TEST_STALL_S} ]; do sleep 1; i=$((i+1)); done
 if kill -0 $p 2>/dev/null; then
  echo "{MARK} stall {t} after {TEST_STALL_S} s"
  for d in /proc/[0-9]*; do echo "task ${{d#/proc/}} $(cat $d/comm) $(cut -d' ' -f3 $d/stat) $(cat $d/wchan)"; done
  echo 1 > /proc/sys/kernel/sysrq; echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger
  dmesg | tail -n 300
  kill -9 -1
 fi) &
w=$!
wait $p
echo "{MARK} result {t} $?"
wait $w
"#
        ));
    }
    s.push_str(&format!("echo \"{MARK} done\"\npoweroff -f\n"));
    s
}

/// Writes the initramfs (newc cpio, uncompressed): busybox, `/init`, the
/// binaries (debug info stripped) and the libraries they load.
fn write_initramfs(
    to: &Path,
    work: &Path,
    binaries: &[(PathBuf, PathBuf)],
    filter: Option<&str>,
) -> anyhow::Result<()> {
    let stripped = work.join("stripped");
    fs::create_dir_all(&stripped)?;
    let mut entries: Vec<(PathBuf, Entry)> = vec![
        (
            PathBuf::from("/bin/busybox"),
            Entry::File(PathBuf::from("/bin/busybox"), 0o755),
        ),
        (
            PathBuf::from("/init"),
            Entry::Data(init_script(filter).into_bytes(), 0o755),
        ),
    ];
    let mut libs = Vec::new();
    for (i, (host, guest)) in binaries.iter().enumerate() {
        let small = stripped.join(format!("{i}"));
        run_cmd(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(host)
                .arg(&small),
        )?;
        entries.push((guest.clone(), Entry::File(small, 0o755)));
        for lib in shared_libraries(host)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    for lib in libs {
        let real = fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone());
        entries.push((lib, Entry::File(real, 0o755)));
    }
    let file = fs::File::create(to).with_context(|| format!("create {}", to.display()))?;
    let mut w = Cpio::new(std::io::BufWriter::new(file));
    let mut dirs: Vec<PathBuf> = ["/proc", "/sys", "/dev", "/tmp", "/root", "/run", "/t"]
        .iter()
        .map(PathBuf::from)
        .collect();
    for (path, _) in &entries {
        dirs.extend(path.ancestors().skip(1).map(Path::to_path_buf));
    }
    let mut dirs: Vec<PathBuf> = dirs.into_iter().filter(|d| d.as_os_str() != "/").collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        w.dir(d)?;
    }
    for (path, entry) in entries {
        match entry {
            Entry::File(from, mode) => {
                let data = fs::read(&from).with_context(|| format!("read {}", from.display()))?;
                w.file(&path, &data, mode)?;
            }
            Entry::Data(data, mode) => w.file(&path, &data, mode)?,
        }
    }
    w.finish()?;
    let size = fs::metadata(to)?.len();
    eprintln!(
        "vm-test: initramfs {} ({} MiB)",
        to.display(),
        size / (1 << 20)
    );
    Ok(())
}

enum Entry {
    File(PathBuf, u32),
    Data(Vec<u8>, u32),
}

/// A writer of the cpio "newc" format the kernel unpacks into its rootfs.
struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: std::io::Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn dir(&mut self, path: &Path) -> anyhow::Result<()> {
        self.entry(path, 0o040_755, &[])
    }

    fn file(&mut self, path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
        self.entry(path, 0o100_000 | mode, data)
    }

    fn entry(&mut self, path: &Path, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let name = path.to_string_lossy();
        let name = name.trim_start_matches('/');
        self.raw(name, mode, data)
    }

    fn raw(&mut self, name: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        let size = u32::try_from(data.len()).with_context(|| format!("{name}: over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1).context("name too long")?;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> anyhow::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.raw("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok(())
    }
}

/// The newest package of the series the archive serves, its `vmlinuz`
/// unpacked into the cache (reused when there).
fn fetch_kernel(s: &Series) -> anyhow::Result<PathBuf> {
    let mut newest = newest_package(s);
    if newest.is_none() {
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        newest = newest_package(s);
    }
    let pkg = newest.with_context(|| {
        format!(
            "no {}N{} package in the Debian archive (apt-cache pkgnames)",
            s.prefix, s.suffix
        )
    })?;
    let dir = crate::testenv::cache_dir().join("vm").join(&pkg);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.exists() {
        eprintln!("vm-test: {pkg} cached");
        return Ok(vmlinuz);
    }
    fs::create_dir_all(&dir)?;
    eprintln!("vm-test: fetching {pkg}");
    run_cmd(
        Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(&dir),
    )?;
    let deb = fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {pkg} left no .deb in {}", dir.display()))?;
    let unpacked = dir.join("unpacked");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let boot = unpacked.join("boot");
    let image = fs::read_dir(&boot)
        .with_context(|| format!("{pkg}: no /boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{pkg}: no /boot/vmlinuz-*"))?;
    fs::copy(&image, &vmlinuz)?;
    // The modules and the .deb are not needed: the VM boots without modules.
    let _ = fs::remove_dir_all(&unpacked);
    let _ = fs::remove_file(&deb);
    Ok(vmlinuz)
}

/// The newest `linux-image-{prefix}N{suffix}` by N, from apt's package lists.
fn newest_package(s: &Series) -> Option<String> {
    newest_of(
        s,
        &output_of(Command::new("apt-cache").args(["pkgnames", s.prefix]))?,
    )
}

/// The newest package of the series among `names` (one per line).
fn newest_of(s: &Series, names: &str) -> Option<String> {
    names
        .lines()
        .filter_map(|n| {
            let n = n.trim();
            let mid = n.strip_prefix(s.prefix)?.strip_suffix(s.suffix)?;
            let v: u64 = mid.parse().ok()?;
            Some((v, n.to_owned()))
        })
        .max()
        .map(|(_, n)| n)
}

/// KVM when a probe guest boots under it, else TCG.
fn choose_accel(work: &Path) -> anyhow::Result<&'static str> {
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = kvm {
        eprintln!("vm-test: /dev/kvm cannot be opened ({e}): emulating the CPU (TCG)");
        return Ok("tcg");
    }
    let kernel = fetch_kernel(&SERIES[0])?;
    let probe = work.join("probe.cpio");
    {
        let file = fs::File::create(&probe)?;
        let mut w = Cpio::new(std::io::BufWriter::new(file));
        w.dir(Path::new("/bin"))?;
        w.file(Path::new("/bin/busybox"), &fs::read("/bin/busybox")?, 0o755)?;
        let init = format!(
            "#!/bin/busybox sh\n/bin/busybox echo \"{MARK} probe ok\"\n/bin/busybox poweroff -f\n"
        );
        w.file(Path::new("/init"), init.as_bytes(), 0o755)?;
        w.finish()?;
    }
    let log = work.join("kvm-probe.log");
    let ok = run_vm(&kernel, &probe, "kvm", &log, KVM_PROBE, |_| {})
        .map(|(lines, _)| lines.iter().any(|l| l.contains("probe ok")))
        .unwrap_or(false);
    if ok {
        eprintln!("vm-test: KVM works here");
        Ok("kvm")
    } else {
        eprintln!(
            "vm-test: a guest did not boot under KVM within {} s (log: {}): emulating the CPU (TCG)",
            KVM_PROBE.as_secs(),
            log.display()
        );
        Ok("tcg")
    }
}

/// How a QEMU run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// QEMU exited (the guest powered off, or QEMU failed).
    Exited,
    /// Killed at the VM's timeout.
    Timeout,
    /// Killed after [`SILENCE`] without a serial line.
    Silent,
}

/// What went wrong with the guest itself, if anything did: its kernel
/// crashed (the first line that says so), a test binary stalled (the init's
/// report), or its console fell silent.
fn guest_trouble(lines: &[String], ending: Ending) -> Option<String> {
    let texts = || {
        lines
            .iter()
            .filter_map(|l| stamped(l).map(|(_, text)| text))
    };
    if let Some(crash) = texts()
        .find(|text| text.contains("Kernel panic - not syncing") || text.contains("] Oops: "))
    {
        return Some(format!("kernel crashed ({})", crash.trim()));
    }
    if let Some(stall) = texts().find_map(|text| text.split_once(&format!("{MARK} stall "))) {
        return Some(format!("test binary stalled ({})", stall.1.trim()));
    }
    (ending == Ending::Silent).then(|| {
        format!(
            "console fell silent for {} s (hung; killed)",
            SILENCE.as_secs()
        )
    })
}

/// What one VM's serial lines say: when init started, each test's result.
fn outcome(
    name: &str,
    accel: &'static str,
    log: &Path,
    lines: &[String],
    crashed_boots: u32,
) -> anyhow::Result<Outcome> {
    let mut boot = None;
    let mut started: Option<(String, Duration)> = None;
    let mut results = Vec::new();
    let mut kernel_line = None;
    let mut total = Duration::ZERO;
    for line in lines {
        let Some((at, rest)) = stamped(line) else {
            continue;
        };
        total = at;
        let Some(rest) = rest.split_once(MARK).map(|(_, r)| r.trim()) else {
            continue;
        };
        if let Some(k) = rest.strip_prefix("kernel ") {
            boot = Some(at);
            kernel_line = Some(k.to_owned());
        } else if let Some(t) = rest.strip_prefix("start ") {
            started = Some((t.to_owned(), at));
        } else if let Some(r) = rest.strip_prefix("result ") {
            let mut it = r.split_whitespace();
            let (Some(t), Some(rc)) = (it.next(), it.next()) else {
                continue;
            };
            let took = started
                .as_ref()
                .filter(|(s, _)| s == t)
                .map_or(Duration::ZERO, |(_, s)| at.saturating_sub(*s));
            results.push((t.to_owned(), rc.parse().unwrap_or(-1), took));
        }
    }
    let kernel_line = kernel_line.with_context(|| {
        format!(
            "the {name} VM never reached its init (serial log: {})",
            log.display()
        )
    })?;
    eprintln!("vm-test: {name}: {kernel_line}");
    if !kernel_line.contains("cpu") {
        bail!("the {name} VM has no cgroup v2 cpu controller: {kernel_line}");
    }
    Ok(Outcome {
        kernel: kernel_line
            .split_whitespace()
            .next()
            .unwrap_or(name)
            .to_owned(),
        accel,
        boot,
        total,
        results,
        crashed_boots,
    })
}

/// A line as `run_vm` returns it: the time since QEMU started, and the text.
fn stamped(line: &str) -> Option<(Duration, &str)> {
    let (ms, text) = line.split_once('|')?;
    Some((Duration::from_millis(ms.trim().parse().ok()?), text))
}

/// Runs QEMU until the guest powers off, `timeout` passes or the console is
/// silent for [`SILENCE`] (then kills it); every serial line goes to `log`
/// and to `each`. Returns the lines, each prefixed with the milliseconds
/// since boot and `|`, and how the run ended.
fn run_vm(
    kernel: &Path,
    initrd: &Path,
    accel: &str,
    log: &Path,
    timeout: Duration,
    each: impl Fn(&str),
) -> anyhow::Result<(Vec<String>, Ending)> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
    ])
    .args(["-serial", "stdio", "-m", "2048", "-smp", "2"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 psi=1 panic=-1 quiet loglevel=4 mitigations=off",
    ]);
    if accel == "kvm" {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start qemu-system-x86_64")?;
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu: no stdout")?;
    let stderr = child.stderr.take().context("qemu: no stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    let mut file = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut lines = Vec::new();
    let mut last_line = Instant::now();
    // Every line the readers hold now: to the log, to `each`, stamped.
    let mut drain = |last_line: &mut Instant| {
        while let Ok(line) = rx.try_recv() {
            let stamped = format!("{}|{line}", t0.elapsed().as_millis());
            let _ = writeln!(file, "{stamped}");
            each(&line);
            lines.push(stamped);
            *last_line = Instant::now();
        }
    };
    let (status, ending) = loop {
        drain(&mut last_line);
        if let Some(status) = child.try_wait()? {
            break (Some(status), Ending::Exited);
        }
        let ending = if t0.elapsed() > timeout {
            Ending::Timeout
        } else if last_line.elapsed() > SILENCE {
            Ending::Silent
        } else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // Our own child: kill it.
        let _ = child.kill();
        let _ = child.wait();
        break (None, ending);
    };
    // What the readers still hold.
    std::thread::sleep(Duration::from_millis(100));
    drain(&mut last_line);
    let said = match (status, ending) {
        (_, Ending::Timeout) => Some(format!("killed after {} s", timeout.as_secs())),
        (_, Ending::Silent) => Some(format!(
            "killed after {} s of silence, {:.0} s in",
            SILENCE.as_secs(),
            t0.elapsed().as_secs_f64()
        )),
        (Some(s), Ending::Exited) if !s.success() => Some(format!("qemu exited: {s}")),
        _ => None,
    };
    if let Some(said) = said {
        let _ = writeln!(file, "vm-test: {said}");
        each(&said);
    }
    let _ = fs::set_permissions(log, fs::Permissions::from_mode(0o644));
    Ok((lines, ending))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_crash_stall_or_silence_is_found_and_a_clean_boot_is_not() {
        let clean: Vec<String> = [
            "812|[    0.000000] Linux version 6.12.118+deb12-cloud-amd64",
            "3411|mbcas-vm: kernel 6.12.118 cgroup2 cpu",
            "9000|test oops_are_counted ... ok",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(guest_trouble(&clean, Ending::Exited), None);
        // A timeout is the tests' own slowness, not the guest's trouble.
        assert_eq!(guest_trouble(&clean, Ending::Timeout), None);
        assert_eq!(
            guest_trouble(&clean, Ending::Silent).as_deref(),
            Some("console fell silent for 540 s (hung; killed)")
        );
        let mut crashed = clean.clone();
        crashed.insert(
            1,
            "1490|[    1.486277] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI".into(),
        );
        crashed.push("1500|[    1.488811] Kernel panic - not syncing: Fatal exception".into());
        assert_eq!(
            guest_trouble(&crashed, Ending::Exited).as_deref(),
            Some("kernel crashed ([    1.486277] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI)")
        );
        let mut stalled = clean.clone();
        stalled.push("430000|mbcas-vm: stall kernel_local after 420 s".into());
        assert_eq!(
            guest_trouble(&stalled, Ending::Exited).as_deref(),
            Some("test binary stalled (kernel_local after 420 s)")
        );
    }

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut buf = Vec::new();
        {
            let mut w = Cpio::new(&mut buf);
            w.dir(Path::new("/bin")).unwrap();
            w.file(Path::new("/bin/x"), b"hello", 0o755).unwrap();
            w.finish().unwrap();
        }
        assert_eq!(buf.len() % 4, 0);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("070701"));
        // mode of the file: regular, 0755; size 5.
        let second = text.match_indices("070701").nth(1).unwrap().0;
        assert_eq!(&text[second + 14..second + 22], "000081ed");
        assert_eq!(&text[second + 54..second + 62], "00000005");
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.trim_end_matches('\0').ends_with("TRAILER!!!"));
    }

    #[test]
    fn the_init_runs_every_test_and_reports_its_code() {
        let s = init_script(Some("sense'"));
        for t in TESTS {
            assert!(
                s.contains(&format!("/t/{t} --test-threads=1 'sense' &")),
                "{s}"
            );
            assert!(s.contains(&format!("{MARK} result {t} $?")), "{s}");
            assert!(s.contains(&format!("{MARK} stall {t} after")), "{s}");
        }
        assert!(s.contains("mount -t cgroup2"));
        assert!(s.contains("+cpu"));
        assert!(s.ends_with("poweroff -f\n"));
    }

    #[test]
    fn the_newest_package_of_a_series_wins() {
        let names = "linux-image-6.12.9+deb12-cloud-amd64\n\
                     linux-image-6.12.118+deb12-cloud-amd64\n\
                     linux-image-6.12.118+deb12-cloud-amd64-dbg\n\
                     linux-image-6.12.200+deb12-cloud-amd64-unsigned\n";
        assert_eq!(
            newest_of(&SERIES[1], names).as_deref(),
            Some("linux-image-6.12.118+deb12-cloud-amd64")
        );
        assert_eq!(
            newest_of(
                &SERIES[0],
                "linux-image-6.1.0-47-cloud-amd64\nlinux-image-6.1.0-53-cloud-amd64\n"
            )
            .as_deref(),
            Some("linux-image-6.1.0-53-cloud-amd64")
        );
        assert_eq!(newest_of(&SERIES[0], names), None);
    }
}
