//! Loading and attaching the kernel programs, and reading what they report.
//!
//! Hooks: `tp_btf/hrtimer_expire_exit` (CFS period timer; needed),
//! `tp_btf/sched_switch` (the onset of throttling mid-period; only where the
//! kernel has `task_struct.throttled`, 6.18+) and a second program on
//! `tp_btf/sched_switch` for run-queue wait per cgroup (where the kernel has
//! `task_struct.sched_info.run_delay`, i.e. `CONFIG_SCHED_INFO`; without it the
//! daemon runs without wait and says so). Offsets come from `/sys/kernel/btf/vmlinux`,
//! the period timer's address from `/proc/kallsyms`; both go in as load-time
//! globals. Maps, programs and links live in [`EbpfSensor`]; the ring buffer is
//! read by one tokio task through `AsyncFd` and forwarded as plain
//! [`ThrottleEvent`]s.

#![allow(unsafe_code)]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePoint,
};
use mbcas_common::{self as common, CgroupBandwidth, ThrottleEvent, globals};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};

use super::btf::{self, Btf};
use crate::units::CgroupId;

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const KALLSYMS: &str = "/proc/kallsyms";
const PERIOD_TIMER_SYMBOL: &str = "sched_cfs_period_timer";

/// The compiled programs, embedded by `build.rs` (empty when it skipped the build).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mbcas"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary has no eBPF object embedded (built without the eBPF toolchain; run `cargo xtask setup` and rebuild)"
    )]
    NotEmbedded,
    #[error("the kernel has no BTF at {VMLINUX}: struct offsets cannot be found")]
    NoBtf,
    #[error("kernel BTF lacks a field the programs need")]
    Btf(#[from] btf::BtfError),
    #[error(
        "{PERIOD_TIMER_SYMBOL} not found in {KALLSYMS} (kernel without CFS bandwidth control, or addresses hidden by kptr_restrict)"
    )]
    NoPeriodTimer,
    #[error("loading the eBPF object failed")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("cannot read kernel BTF through aya")]
    AyaBtf(#[source] Box<aya::BtfError>),
    #[error("cannot poll the ring buffer")]
    Poll(#[source] std::io::Error),
}

impl EbpfError {
    /// A short, bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotEmbedded => "not_embedded",
            Self::NoBtf => "no_btf",
            Self::Btf(_) | Self::AyaBtf(_) => "btf",
            Self::NoPeriodTimer => "no_period_timer",
            Self::Load(_) => "load",
            Self::MissingProgram { .. } | Self::MissingMap { .. } => "object",
            Self::Program { .. } => "attach",
            Self::Map { .. } => "map",
            Self::Poll(_) => "poll",
        }
    }
}

/// Whether an object is embedded in this binary.
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

/// The address of a text symbol in `/proc/kallsyms`; `None` if absent or hidden (0).
pub fn kallsyms_address(text: &str, symbol: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        let (addr, kind, name) = (it.next()?, it.next()?, it.next()?);
        if name != symbol || !matches!(kind, "t" | "T") {
            return None;
        }
        u64::from_str_radix(addr, 16).ok().filter(|&a| a != 0)
    })
}

/// Counters of the programs themselves (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelStats {
    pub period_timers: u64,
    pub events: u64,
    pub ringbuf_drops: u64,
    pub read_errors: u64,
    /// Onset events sent by sched_switch, mid-period.
    pub switch_edges: u64,
    pub map_errors: u64,
    /// Switch-outs that added run-queue wait to a cgroup.
    pub runq_updates: u64,
    /// Events the reader could not hand on (consumer too slow).
    pub user_drops: u64,
}

/// Run time of one attached program, from `kernel.bpf_stats_enabled`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The loaded and attached programs. Dropping it detaches everything.
pub struct EbpfSensor {
    ebpf: Ebpf,
    cgroups: BpfHashMap<MapData, u64, CgroupBandwidth>,
    stats: PerCpuArray<MapData, u64>,
    /// Run-queue wait per cgroup, when its program is attached.
    runq: Option<PerCpuHashMap<MapData, u64, u64>>,
    user_drops: Arc<AtomicU64>,
    reader: JoinHandle<()>,
    logger: Option<JoinHandle<()>>,
    pub programs: Vec<&'static str>,
}

impl Drop for EbpfSensor {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(l) = &self.logger {
            l.abort();
        }
    }
}

struct Offsets(Vec<(&'static str, u64)>);

fn offsets(
    kbtf: &Btf,
    timer_fn: u64,
    with_switch: bool,
    with_runq: bool,
    debug: bool,
) -> Result<Offsets, EbpfError> {
    let f = |s: &str, m: &str| kbtf.field(s, m);
    let nr_periods = f("cfs_bandwidth", "nr_periods")?;
    let nr_throttled = f("cfs_bandwidth", "nr_throttled")?;
    let mut v = vec![
        (globals::PERIOD_TIMER_FN, timer_fn),
        (
            globals::OFF_HRTIMER_FUNCTION,
            f("hrtimer", "function")?.offset,
        ),
        (
            globals::OFF_CFSB_PERIOD_TIMER,
            f("cfs_bandwidth", "period_timer")?.offset,
        ),
        (globals::OFF_CFSB_NR_PERIODS, nr_periods.offset),
        (globals::OFF_CFSB_NR_THROTTLED, nr_throttled.offset),
        (
            globals::OFF_CFSB_THROTTLED_TIME,
            f("cfs_bandwidth", "throttled_time")?.offset,
        ),
        (globals::SIZE_CFSB_NR_PERIODS, nr_periods.size.unwrap_or(4)),
        (
            globals::SIZE_CFSB_NR_THROTTLED,
            nr_throttled.size.unwrap_or(4),
        ),
        (
            globals::OFF_TG_CFS_BANDWIDTH,
            f("task_group", "cfs_bandwidth")?.offset,
        ),
        (globals::OFF_TG_CSS, f("task_group", "css")?.offset),
        (
            globals::OFF_CSS_CGROUP,
            f("cgroup_subsys_state", "cgroup")?.offset,
        ),
        (globals::OFF_CGROUP_KN, f("cgroup", "kn")?.offset),
        (globals::OFF_KN_ID, f("kernfs_node", "id")?.offset),
        (globals::OFF_TASK_PID, f("task_struct", "pid")?.offset),
        (globals::DEBUG, u64::from(debug)),
    ];
    if with_switch {
        v.push((
            globals::OFF_TASK_THROTTLED,
            f("task_struct", "throttled")?.offset,
        ));
    }
    if with_switch || with_runq {
        v.push((
            globals::OFF_TASK_TG,
            f("task_struct", "sched_task_group")?.offset,
        ));
    }
    if with_runq {
        let info = f("task_struct", "sched_info")?.offset;
        let pcount = f("sched_info", "pcount")?;
        v.push((
            globals::OFF_TASK_RUN_DELAY,
            info + f("sched_info", "run_delay")?.offset,
        ));
        v.push((globals::OFF_TASK_PCOUNT, info + pcount.offset));
        v.push((globals::SIZE_TASK_PCOUNT, pcount.size.unwrap_or(8)));
    }
    Ok(Offsets(v))
}

impl EbpfSensor {
    /// Loads and attaches the programs; events go to `tx`. Must run inside a tokio
    /// runtime. `debug` turns on the programs' aya-log output (bridged to tracing
    /// at debug level).
    pub fn start(tx: mpsc::Sender<ThrottleEvent>, debug: bool) -> Result<Self, EbpfError> {
        if !object_embedded() {
            return Err(EbpfError::NotEmbedded);
        }
        if !Path::new(VMLINUX).exists() {
            return Err(EbpfError::NoBtf);
        }
        let kbtf = Btf::from_file(Path::new(VMLINUX))?;
        let kallsyms = std::fs::read_to_string(KALLSYMS).unwrap_or_default();
        let timer_fn =
            kallsyms_address(&kallsyms, PERIOD_TIMER_SYMBOL).ok_or(EbpfError::NoPeriodTimer)?;
        let with_switch = kbtf.has_member("task_struct", "throttled")
            && kbtf.has_member("task_struct", "sched_task_group");
        if !with_switch {
            tracing::info!(
                "kernel has no task_struct.throttled (the sched_switch hook needs task-based throttling, Linux 6.18+): period-timer hook only"
            );
        }
        let with_runq = kbtf.has_member("task_struct", "sched_info")
            && kbtf.has_member("sched_info", "run_delay")
            && kbtf.has_member("sched_info", "pcount")
            && kbtf.has_member("task_struct", "sched_task_group");
        if !with_runq {
            tracing::warn!(
                "kernel has no task_struct.sched_info.run_delay (CONFIG_SCHED_INFO): no run-queue wait; \
                 demand will not see a pod queued behind its neighbours"
            );
        }
        let offsets = offsets(&kbtf, timer_fn, with_switch, with_runq, debug)?;
        // Parses of vmlinux BTF are large (aya's is the larger): keep only one
        // alive at a time. `EbpfLoader::new` makes its own parse; drop it and
        // hand the loader the one attaching needs too.
        drop(kbtf);
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| EbpfError::AyaBtf(Box::new(e)))?;
        loader.btf(Some(&aya_btf));
        for (name, value) in &offsets.0 {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;

        let logger = if debug {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(spawn_logger(l)),
                Err(e) => {
                    tracing::warn!(error = %e, "aya-log not available; kernel debug lines will not show");
                    None
                }
            }
        } else {
            None
        };

        let mut programs = Vec::new();
        attach(
            &mut ebpf,
            common::PROG_PERIOD_TIMER,
            "hrtimer_expire_exit",
            &aya_btf,
        )?;
        programs.push(common::PROG_PERIOD_TIMER);
        if with_switch {
            match attach(
                &mut ebpf,
                common::PROG_SCHED_SWITCH,
                "sched_switch",
                &aya_btf,
            ) {
                Ok(()) => programs.push(common::PROG_SCHED_SWITCH),
                Err(e) => {
                    tracing::warn!(error = %e, "sched_switch hook not attached; period-timer hook only")
                }
            }
        }

        let mut runq_attached = false;
        if with_runq {
            match attach(&mut ebpf, common::PROG_RUNQ_WAIT, "sched_switch", &aya_btf) {
                Ok(()) => {
                    programs.push(common::PROG_RUNQ_WAIT);
                    runq_attached = true;
                }
                Err(e) => tracing::warn!(
                    error = %crate::error::error_chain(&e),
                    "run-queue wait program not attached; demand will not see waiting"
                ),
            }
        }

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EbpfError::MissingMap { name })
        };
        let map_err = |name: &'static str| {
            move |e| EbpfError::Map {
                name,
                source: Box::new(e),
            }
        };
        let ring = RingBuf::try_from(take(&mut ebpf, common::EVENTS_MAP)?)
            .map_err(map_err(common::EVENTS_MAP))?;
        let cgroups = BpfHashMap::try_from(take(&mut ebpf, common::CGROUPS_MAP)?)
            .map_err(map_err(common::CGROUPS_MAP))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, common::STATS_MAP)?)
            .map_err(map_err(common::STATS_MAP))?;
        let runq = if runq_attached {
            Some(
                PerCpuHashMap::try_from(take(&mut ebpf, common::RUNQ_MAP)?)
                    .map_err(map_err(common::RUNQ_MAP))?,
            )
        } else {
            None
        };
        let fd = readable_fd(ring).map_err(EbpfError::Poll)?;
        let user_drops = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn(read_ring(fd, tx, Arc::clone(&user_drops)));
        Ok(Self {
            ebpf,
            cgroups,
            stats,
            runq,
            user_drops,
            reader,
            logger,
            programs,
        })
    }

    /// Attaches `mbcas_floor` and `mbcas_switch_floor`, the empty programs on
    /// the hrtimer and sched_switch hooks.
    pub fn attach_floor(&mut self) -> Result<(), EbpfError> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| EbpfError::AyaBtf(Box::new(e)))?;
        for (name, hook) in [
            (common::PROG_FLOOR, "hrtimer_expire_exit"),
            (common::PROG_SWITCH_FLOOR, "sched_switch"),
        ] {
            attach(&mut self.ebpf, name, hook, &btf)?;
            self.programs.push(name);
        }
        Ok(())
    }

    /// Whether run-queue wait is measured.
    pub fn has_runq(&self) -> bool {
        self.runq.is_some()
    }

    /// Cumulative run-queue wait of the tasks of a cgroup (its own tasks, not
    /// its children's), summed over CPUs; `Some(0)` for a cgroup none of whose
    /// tasks waited since the programs were loaded, `None` without the program.
    pub fn runq_wait_ns(&self, id: CgroupId) -> Option<u64> {
        let m = self.runq.as_ref()?;
        Some(
            m.get(&id.0, 0)
                .map(|v| v.iter().fold(0u64, |a, x| a.saturating_add(*x)))
                .unwrap_or(0),
        )
    }

    /// The kernel's last per-period snapshot of a group, if the program saw it.
    pub fn bandwidth(&self, id: CgroupId) -> Option<CgroupBandwidth> {
        self.cgroups.get(&id.0, 0).ok()
    }

    pub fn stats(&self) -> KernelStats {
        let sum = |slot: u32| {
            self.stats
                .get(&slot, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        KernelStats {
            period_timers: sum(common::STAT_PERIOD_TIMERS),
            events: sum(common::STAT_EVENTS),
            ringbuf_drops: sum(common::STAT_RINGBUF_DROPS),
            read_errors: sum(common::STAT_READ_ERRORS),
            switch_edges: sum(common::STAT_SWITCH_EDGES),
            map_errors: sum(common::STAT_MAP_ERRORS),
            runq_updates: sum(common::STAT_RUNQ_UPDATES),
            user_drops: self.user_drops.load(Ordering::Relaxed),
        }
    }

    /// Per-program run counts and run time (non-zero only while
    /// `kernel.bpf_stats_enabled` is 1).
    pub fn costs(&self) -> Vec<ProgramCost> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramCost {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }
}

/// Registers a map-backed object with the tokio reactor for readability.
fn readable_fd<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: both callers pass an object that owns a ring-buffer map's file
    // descriptor (our event ring buffer, and aya-log's logger over its own);
    // the descriptor stays open and refers to the same map for as long as the
    // AsyncFd owns `inner`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> Result<(), EbpfError> {
    let perr = |e| EbpfError::Program {
        name,
        source: Box::new(e),
    };
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram { name })?
        .try_into()
        .map_err(perr)?;
    prog.load(tracepoint, btf).map_err(perr)?;
    prog.attach().map_err(perr)?;
    Ok(())
}

async fn read_ring(
    mut fd: AsyncFd<RingBuf<MapData>>,
    tx: mpsc::Sender<ThrottleEvent>,
    user_drops: Arc<AtomicU64>,
) {
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "ring buffer poll failed; no more eBPF events");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match ThrottleEvent::from_bytes(&item) {
                Some(ev) => {
                    if tx.try_send(ev).is_err() {
                        user_drops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => tracing::warn!(len = item.len(), "short ring-buffer record ignored"),
            }
        }
        guard.clear_ready();
        if tx.is_closed() {
            return;
        }
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut fd) = readable_fd(logger) else {
            tracing::warn!("cannot poll the aya-log ring buffer");
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kallsyms_lookup() {
        let text = "ffffffff81208e4e t sched_cfs_period_timer.cold\nffffffff813c4ef0 t sched_cfs_period_timer\n0000000000000000 T hidden\n";
        assert_eq!(
            kallsyms_address(text, "sched_cfs_period_timer"),
            Some(0xffff_ffff_813c_4ef0)
        );
        assert_eq!(kallsyms_address(text, "hidden"), None);
        assert_eq!(kallsyms_address(text, "missing"), None);
    }
}
