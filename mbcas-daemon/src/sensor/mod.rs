//! The throttle sensor: what the kernel says about each cgroup's CPU bandwidth.
//!
//! Three sources behind one [`Sensor`]:
//! * **eBPF** ([`ebpf`]): programs on `tp_btf/hrtimer_expire_exit` (CFS period
//!   timer) and `tp_btf/sched_switch` keep a per-cgroup snapshot of the bandwidth
//!   counters in a map and send [`ThrottleEvent`]s through a ring buffer on
//!   throttling edges only (onset, end). Onsets wake the decision loop.
//! * **poll** ([`crate::cgroup::dir`]): the same counters read from `cpu.stat`; no events.
//! * **fake** ([`FakeHandle`]): counters and events set by tests.
//!
//! Run-queue wait (the time a cgroup's threads were runnable but waiting for
//! a CPU, summed over threads and over the cgroup's descendants) comes from the
//! eBPF program `mbcas_runq_wait` when it is attached, else from
//! `/proc/<tid>/schedstat` ([`crate::cgroup::runq`]); the fake source reports
//! what it is told.
//!
//! `SensorMode::Auto` tries eBPF and falls back to polling, saying why in the log
//! and in [`Sensor::fallback_reason`]. Usage (CPU time) always comes from the
//! cgroup filesystem (`cpu.stat usage_usec` on v2, `cpuacct.usage` on v1).
//!
//! Consumers see plain data only: [`CgroupCounters`] (cumulative, per cgroup) and
//! [`ThrottleEvent`]s from [`Sensor::take_events`].

pub mod btf;
pub mod ebpf;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

pub use mbcas_common::{EVENT_PERIOD_THROTTLED, EVENT_PERIOD_UNTHROTTLED, ThrottleEvent};
use tokio::sync::mpsc;

use crate::{
    cgroup::{CgroupDir, CgroupFsError, CpuCounters, runq},
    units::CgroupId,
};

/// Capacity of the event channel between the ring-buffer reader and the consumer.
pub const EVENT_CHANNEL: usize = 16 * 1024;

/// Which sensor to use (the `--sensor` flag).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorMode {
    /// eBPF; fail if it cannot be loaded.
    Ebpf,
    /// Poll `cpu.stat`.
    Poll,
    /// eBPF when possible, else poll.
    #[default]
    Auto,
}

/// The source that actually produces the numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    Ebpf,
    Poll,
    Fake,
}

impl SensorKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Poll => "poll",
            Self::Fake => "fake",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("eBPF sensor unavailable")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Cgroup(#[from] CgroupFsError),
    #[error("the floor program needs the eBPF sensor (--sensor ebpf)")]
    FloorNeedsEbpf,
}

impl SensorError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ebpf(e) => e.kind(),
            Self::Cgroup(e) => e.kind(),
            Self::FloorNeedsEbpf => "usage",
        }
    }
}

/// Cumulative counters of one cgroup and the source they came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupCounters {
    pub id: CgroupId,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub usage_ns: Option<u64>,
    /// Cumulative run-queue wait of the cgroup's threads and its descendants'
    /// (ns of thread-time); `None` when the source cannot tell.
    pub wait_ns: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct FakeState {
    counters: HashMap<CgroupId, CpuCounters>,
    wait: HashMap<CgroupId, u64>,
}

/// Drives a fake sensor from a test.
#[derive(Clone)]
pub struct FakeHandle {
    state: Arc<Mutex<FakeState>>,
    tx: mpsc::Sender<ThrottleEvent>,
}

impl FakeHandle {
    /// Sets the cumulative counters the sensor reports for `id`.
    pub fn set(&self, id: CgroupId, c: CpuCounters) {
        if let Ok(mut s) = self.state.lock() {
            s.counters.insert(id, c);
        }
    }

    /// Sets the cumulative run-queue wait the sensor reports for `id`.
    pub fn set_wait(&self, id: CgroupId, wait_ns: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.wait.insert(id, wait_ns);
        }
    }

    /// Sends an event as if the kernel had.
    pub async fn emit(&self, ev: ThrottleEvent) -> bool {
        self.tx.send(ev).await.is_ok()
    }
}

enum Source {
    Ebpf(Box<ebpf::EbpfSensor>),
    Poll,
    Fake(Arc<Mutex<FakeState>>),
}

pub struct Sensor {
    source: Source,
    events: Option<mpsc::Receiver<ThrottleEvent>>,
    fallback_reason: Option<String>,
}

impl Sensor {
    /// Starts the sensor. eBPF needs a tokio runtime (the ring buffer is polled
    /// with `AsyncFd`).
    pub fn start(mode: SensorMode, debug_log: bool) -> Result<Self, SensorError> {
        if mode == SensorMode::Poll {
            return Ok(Self {
                source: Source::Poll,
                events: None,
                fallback_reason: None,
            });
        }
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        match ebpf::EbpfSensor::start(tx, debug_log) {
            Ok(s) => {
                tracing::info!(programs = ?s.programs, "eBPF throttle sensor attached");
                Ok(Self {
                    source: Source::Ebpf(Box::new(s)),
                    events: Some(rx),
                    fallback_reason: None,
                })
            }
            Err(e) if mode == SensorMode::Auto => {
                let reason = crate::error::error_chain(&e);
                tracing::warn!(reason = %reason, "eBPF sensor unavailable; falling back to polling cpu.stat");
                Ok(Self {
                    source: Source::Poll,
                    events: None,
                    fallback_reason: Some(reason),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A sensor whose numbers and events come from the returned handle.
    pub fn fake() -> (Self, FakeHandle) {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let handle = FakeHandle {
            state: Arc::clone(&state),
            tx,
        };
        (
            Self {
                source: Source::Fake(state),
                events: Some(rx),
                fallback_reason: None,
            },
            handle,
        )
    }

    pub fn kind(&self) -> SensorKind {
        match self.source {
            Source::Ebpf(_) => SensorKind::Ebpf,
            Source::Poll => SensorKind::Poll,
            Source::Fake(_) => SensorKind::Fake,
        }
    }

    /// Why `auto` did not get eBPF, if it did not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The event stream (once); `None` for the poll source.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<ThrottleEvent>> {
        self.events.take()
    }

    /// The cgroup's cumulative counters from this sensor. Usage comes from the
    /// cgroup filesystem; with eBPF the bandwidth counters come from the kernel
    /// programs' last per-period snapshot, and on v1 only `cpuacct.usage` is
    /// read (falling back to `cpu.stat` for groups the programs have not seen
    /// yet, e.g. without a quota).
    pub fn read(&self, dir: &CgroupDir) -> Result<CgroupCounters, SensorError> {
        self.read_watched(dir).map(|(c, _)| c)
    }

    /// [`Sensor::read`], and the cgroup ids its wait was summed over when the
    /// eBPF run-queue program measured it (empty otherwise): the decision loop
    /// watches those between rounds ([`Sensor::wait_of`]) without listing the
    /// cgroup's descendants a second time.
    pub fn read_watched(
        &self,
        dir: &CgroupDir,
    ) -> Result<(CgroupCounters, Vec<CgroupId>), SensorError> {
        let mut c = self.read_cpu(dir)?;
        let ids = match &self.source {
            Source::Fake(state) => {
                c.wait_ns = state.lock().ok().and_then(|s| s.wait.get(&dir.id).copied());
                Vec::new()
            }
            Source::Poll => {
                // Usage and throttling stand without the wait: a thread list
                // that cannot be read costs this round's wait only.
                c.wait_ns = match runq::schedstat_wait_ns(&dir.path, dir.id, dir.hierarchy) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::debug!(cgroup = %dir.path.display(), error = %crate::error::error_chain(&e), "run-queue wait not read");
                        None
                    }
                };
                Vec::new()
            }
            Source::Ebpf(s) => {
                let ids = if s.has_runq() {
                    wait_ids(dir)
                } else {
                    Vec::new()
                };
                c.wait_ns = self.wait_of(&ids);
                ids
            }
        };
        Ok((c, ids))
    }

    /// The cgroup's usage and bandwidth counters without its run-queue wait
    /// (`wait_ns` is `None`): no thread's schedstat read, no descendant
    /// listed. For a container cgroup whose wait its pod's already holds.
    pub fn read_cpu(&self, dir: &CgroupDir) -> Result<CgroupCounters, SensorError> {
        match &self.source {
            Source::Fake(state) => {
                let c = state
                    .lock()
                    .ok()
                    .and_then(|s| s.counters.get(&dir.id).copied())
                    .unwrap_or_default();
                Ok(counters(dir.id, c, None))
            }
            Source::Poll => Ok(counters(dir.id, dir.read()?, None)),
            Source::Ebpf(s) => Ok(match s.bandwidth(dir.id) {
                Some(b) => CgroupCounters {
                    id: dir.id,
                    nr_periods: b.nr_periods,
                    nr_throttled: b.nr_throttled,
                    throttled_ns: b.throttled_ns,
                    usage_ns: dir.read_usage()?,
                    wait_ns: None,
                },
                None => counters(dir.id, dir.read()?, None),
            }),
        }
    }

    /// Whether the wait can be watched cheaply between rounds (the eBPF
    /// run-queue program: map reads; the poll source would read every
    /// thread's schedstat).
    pub fn watches_wait(&self) -> bool {
        matches!(&self.source, Source::Ebpf(s) if s.has_runq())
    }

    /// Σ cumulative wait of `ids` from the eBPF map; `None` without it.
    pub fn wait_of(&self, ids: &[CgroupId]) -> Option<u64> {
        match &self.source {
            Source::Ebpf(s) if s.has_runq() => Some(
                ids.iter()
                    .filter_map(|&id| s.runq_wait_ns(id))
                    .fold(0u64, u64::saturating_add),
            ),
            _ => None,
        }
    }

    /// Whether this sensor reports run-queue wait.
    pub fn measures_wait(&self) -> bool {
        match &self.source {
            Source::Ebpf(s) => s.has_runq(),
            Source::Poll | Source::Fake(_) => true,
        }
    }

    /// Attaches the empty calibration program to the hrtimer hook (eBPF only):
    /// benchmarks subtract its cost per call to see what the sensor adds.
    pub fn attach_floor(&mut self) -> Result<(), SensorError> {
        match &mut self.source {
            Source::Ebpf(s) => Ok(s.attach_floor()?),
            _ => Err(SensorError::FloorNeedsEbpf),
        }
    }

    /// The kernel programs' own counters, with eBPF.
    pub fn kernel_stats(&self) -> Option<ebpf::KernelStats> {
        match &self.source {
            Source::Ebpf(s) => Some(s.stats()),
            _ => None,
        }
    }

    /// The eBPF programs attached (none for the poll and fake sources).
    pub fn programs(&self) -> Vec<&'static str> {
        match &self.source {
            Source::Ebpf(s) => s.programs.clone(),
            _ => Vec::new(),
        }
    }

    /// Per-program run time, with eBPF (needs `kernel.bpf_stats_enabled=1`).
    pub fn program_costs(&self) -> Vec<ebpf::ProgramCost> {
        match &self.source {
            Source::Ebpf(s) => s.costs(),
            _ => Vec::new(),
        }
    }
}

/// The cgroup ids whose wait adds up to `dir`'s: it and its descendants.
fn wait_ids(dir: &CgroupDir) -> Vec<CgroupId> {
    runq::subtree(&dir.path, dir.id, runq::SUBTREE_DEPTH)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn counters(id: CgroupId, c: CpuCounters, wait_ns: Option<u64>) -> CgroupCounters {
    CgroupCounters {
        id,
        nr_periods: c.nr_periods,
        nr_throttled: c.nr_throttled,
        throttled_ns: c.throttled_ns,
        usage_ns: c.usage_ns,
        wait_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fake_sensor_reports_what_it_is_told() {
        let (mut sensor, handle) = Sensor::fake();
        assert_eq!(sensor.kind(), SensorKind::Fake);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cpu.stat"),
            "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
        )
        .unwrap();
        let dir = CgroupDir::open(tmp.path()).unwrap();
        handle.set(
            dir.id,
            CpuCounters {
                nr_periods: 10,
                nr_throttled: 4,
                throttled_ns: 5,
                usage_ns: Some(6),
            },
        );
        let c = sensor.read(&dir).unwrap();
        assert_eq!((c.nr_periods, c.nr_throttled, c.usage_ns), (10, 4, Some(6)));
        let mut rx = sensor.take_events().expect("events");
        assert!(
            handle
                .emit(ThrottleEvent {
                    cgroup_id: dir.id.0,
                    ..Default::default()
                })
                .await
        );
        assert_eq!(rx.recv().await.map(|e| e.cgroup_id), Some(dir.id.0));
    }

    #[test]
    fn poll_source_reads_files() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cpu.stat"),
            "usage_usec 10\nnr_periods 3\nnr_throttled 2\nthrottled_usec 1\n",
        )
        .unwrap();
        std::fs::write(tmp.path().join("cpu.max"), "max 100000\n").unwrap();
        let sensor = Sensor::start(SensorMode::Poll, false).unwrap();
        let dir = CgroupDir::open(tmp.path()).unwrap();
        let c = sensor.read(&dir).unwrap();
        assert_eq!(
            (c.nr_throttled, c.throttled_ns, c.usage_ns),
            (2, 1000, Some(10_000))
        );
        assert_eq!(c.wait_ns, None, "no thread list: no wait, counters kept");
        std::fs::write(
            tmp.path().join("cgroup.threads"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(sensor.read(&dir).unwrap().wait_ns.is_some());
        assert!(sensor.take_events_is_none());
    }

    impl Sensor {
        fn take_events_is_none(&self) -> bool {
            self.events.is_none()
        }
    }
}
