//! Types and names shared by the kernel side (`mbcas-ebpf`) and user space
//! (`mbcas-daemon`). Everything here is `#[repr(C)]`, `Copy`, integers only, with
//! explicit padding and compile-time size checks, so both sides agree on layout.
//!
//! Every record is keyed by the *throttled group's* cgroup id
//! (`task_group → css.cgroup → kn → id`, equal to the inode of the cgroup
//! directory on v1 and v2), never by the cgroup of whatever task happens to run.
#![no_std]

pub mod quantity;

use core::mem::size_of;

/// Ring buffer carrying [`ThrottleEvent`]s to user space.
pub const EVENTS_MAP: &str = "MBCAS_EVENTS";
/// Per-cgroup bandwidth snapshot: `u64` cgroup id → [`CgroupBandwidth`].
pub const CGROUPS_MAP: &str = "MBCAS_CGROUPS";
/// Per-CPU counters of the programs themselves, indexed by `STAT_*`.
pub const STATS_MAP: &str = "MBCAS_STATS";
/// Run-queue wait per cgroup, per CPU: `u64` cgroup id → `u64` nanoseconds its
/// tasks spent runnable but waiting for a CPU (summed over tasks: thread-time,
/// like usage). Cumulative; user space sums the CPUs and takes differences.
pub const RUNQ_MAP: &str = "MBCAS_RUNQ";
/// Per task: `u32` pid (thread id) → [`TaskWait`], the task's `run_delay` the
/// last time it was switched out.
pub const TASKS_MAP: &str = "MBCAS_TASKS";

/// `tp_btf/hrtimer_expire_exit`, filtered on the CFS period timer.
pub const PROG_PERIOD_TIMER: &str = "mbcas_period_timer";
/// `tp_btf/sched_switch`: the onset of task-based throttling mid-period (needs
/// `task_struct.throttled`).
pub const PROG_SCHED_SWITCH: &str = "mbcas_sched_switch";
/// `tp_btf/hrtimer_expire_exit`, empty: the hook's own cost (`mbcas sense --floor`).
pub const PROG_FLOOR: &str = "mbcas_floor";
/// `tp_btf/sched_switch`: run-queue wait per cgroup, from the switched-out
/// task's `sched_info.run_delay` (needs `CONFIG_SCHED_INFO`).
pub const PROG_RUNQ_WAIT: &str = "mbcas_runq_wait";
/// `tp_btf/sched_switch`, empty: that hook's own cost (`mbcas sense --floor`).
pub const PROG_SWITCH_FLOOR: &str = "mbcas_switch_floor";

/// Byte size of the ring buffer (a power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 512 * 1024;
/// Capacity of the per-cgroup map (LRU: the least recently updated cgroup goes first).
pub const MAX_CGROUPS: u32 = 16 * 1024;
/// Capacity of the per-task map (LRU). A task evicted and seen again starts a
/// new baseline: the wait since its last switch-out is lost, never counted twice.
pub const MAX_TASKS: u32 = 64 * 1024;

/// Load-time globals (`EbpfLoader::override_global`). Offsets are in bytes and come
/// from the running kernel's BTF; sizes are the counters' byte widths (4 or 8).
pub mod globals {
    /// Address of `sched_cfs_period_timer` (from `/proc/kallsyms`).
    pub const PERIOD_TIMER_FN: &str = "MBCAS_PERIOD_TIMER_FN";
    pub const OFF_HRTIMER_FUNCTION: &str = "MBCAS_OFF_HRTIMER_FUNCTION";
    pub const OFF_CFSB_PERIOD_TIMER: &str = "MBCAS_OFF_CFSB_PERIOD_TIMER";
    pub const OFF_CFSB_NR_PERIODS: &str = "MBCAS_OFF_CFSB_NR_PERIODS";
    pub const OFF_CFSB_NR_THROTTLED: &str = "MBCAS_OFF_CFSB_NR_THROTTLED";
    pub const OFF_CFSB_THROTTLED_TIME: &str = "MBCAS_OFF_CFSB_THROTTLED_TIME";
    pub const SIZE_CFSB_NR_PERIODS: &str = "MBCAS_SIZE_CFSB_NR_PERIODS";
    pub const SIZE_CFSB_NR_THROTTLED: &str = "MBCAS_SIZE_CFSB_NR_THROTTLED";
    pub const OFF_TG_CFS_BANDWIDTH: &str = "MBCAS_OFF_TG_CFS_BANDWIDTH";
    pub const OFF_TG_CSS: &str = "MBCAS_OFF_TG_CSS";
    pub const OFF_CSS_CGROUP: &str = "MBCAS_OFF_CSS_CGROUP";
    pub const OFF_CGROUP_KN: &str = "MBCAS_OFF_CGROUP_KN";
    pub const OFF_KN_ID: &str = "MBCAS_OFF_KN_ID";
    pub const OFF_TASK_THROTTLED: &str = "MBCAS_OFF_TASK_THROTTLED";
    pub const OFF_TASK_TG: &str = "MBCAS_OFF_TASK_TG";
    pub const OFF_TASK_PID: &str = "MBCAS_OFF_TASK_PID";
    /// `task_struct.sched_info` + `sched_info.run_delay`, one offset.
    pub const OFF_TASK_RUN_DELAY: &str = "MBCAS_OFF_TASK_RUN_DELAY";
    /// `task_struct.sched_info` + `sched_info.pcount` (runs on a CPU so far):
    /// 1 at a task's first switch-out, when all of its `run_delay` is new.
    pub const OFF_TASK_PCOUNT: &str = "MBCAS_OFF_TASK_PCOUNT";
    pub const SIZE_TASK_PCOUNT: &str = "MBCAS_SIZE_TASK_PCOUNT";
    /// Non-zero: emit aya-log debug lines from the programs (off the hot path by default).
    pub const DEBUG: &str = "MBCAS_DEBUG";
}

/// Throttling started: a group not known throttled had a task throttled
/// (sched_switch, mid-period) or a period that ended throttled (period timer).
pub const EVENT_PERIOD_THROTTLED: u32 = 1;
/// Throttling ended: the first period after throttling that ended unthrottled.
pub const EVENT_PERIOD_UNTHROTTLED: u32 = 2;

/// Stat slots in [`STATS_MAP`].
pub const STAT_PERIOD_TIMERS: u32 = 0;
pub const STAT_EVENTS: u32 = 1;
pub const STAT_RINGBUF_DROPS: u32 = 2;
pub const STAT_READ_ERRORS: u32 = 3;
/// Onset events sent by sched_switch (mid-period).
pub const STAT_SWITCH_EDGES: u32 = 4;
pub const STAT_MAP_ERRORS: u32 = 5;
/// Switch-outs whose task had waited since its last one (wait added to its cgroup).
pub const STAT_RUNQ_UPDATES: u32 = 6;
pub const STAT_SLOTS: u32 = 8;

/// One record in the ring buffer: an edge, never one per period.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleEvent {
    /// `EVENT_*`.
    pub kind: u32,
    /// The throttled task whose switch-out marked the onset (sched_switch), else 0.
    pub pid: u32,
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was made.
    pub ts_ns: u64,
    /// The group's cumulative counters (as in `cpu.stat`) at the last period
    /// end the period timer saw (for a sched_switch onset of a new group: when
    /// the event was made).
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
}

/// The kernel's view of one bandwidth-limited group, updated at each period end
/// that changed a counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupBandwidth {
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    /// Ring-buffer events emitted for this group.
    pub events: u64,
    /// 1 from the onset of throttling until a period ends unthrottled.
    pub throttling: u32,
    pub _pad: u32,
}

/// What the run-queue program remembers of one task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskWait {
    /// `sched_info.run_delay` at its last switch-out (ns, cumulative).
    pub run_delay: u64,
    /// The `task_group` it ran in, and that group's cgroup id: the id is looked
    /// up again only when the task moved.
    pub tg: u64,
    pub cgroup_id: u64,
}

const _: () = assert!(size_of::<ThrottleEvent>() == 48);
const _: () = assert!(size_of::<CgroupBandwidth>() == 40);
const _: () = assert!(size_of::<TaskWait>() == 24);

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    // SAFETY: these are #[repr(C)] structs of plain integers with explicit
    // padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::ThrottleEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupBandwidth {}
    // SAFETY: as above (three u64 fields, no padding).
    unsafe impl aya::Pod for super::TaskWait {}
}

impl ThrottleEvent {
    /// Decodes an event from ring-buffer bytes; `None` if the record is too short.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        let u32_at =
            |o: usize| u32::from_ne_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        Some(Self {
            kind: u32_at(0),
            pid: u32_at(4),
            cgroup_id: u64_at(8),
            ts_ns: u64_at(16),
            nr_periods: u64_at(24),
            nr_throttled: u64_at(32),
            throttled_ns: u64_at(40),
        })
    }

    /// The bytes the kernel writes for this event (native endianness).
    pub fn to_bytes(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[0..4].copy_from_slice(&self.kind.to_ne_bytes());
        out[4..8].copy_from_slice(&self.pid.to_ne_bytes());
        for (i, v) in [
            self.cgroup_id,
            self.ts_ns,
            self.nr_periods,
            self.nr_throttled,
            self.throttled_ns,
        ]
        .iter()
        .enumerate()
        {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_ne_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout_is_what_the_kernel_writes() {
        assert_eq!(offset_of!(ThrottleEvent, cgroup_id), 8);
        assert_eq!(offset_of!(ThrottleEvent, throttled_ns), 40);
        assert_eq!(offset_of!(CgroupBandwidth, throttling), 32);
        assert_eq!(core::mem::align_of::<ThrottleEvent>(), 8);
    }

    #[test]
    fn event_round_trips_through_bytes() {
        let e = ThrottleEvent {
            kind: EVENT_PERIOD_THROTTLED,
            pid: 42,
            cgroup_id: 0x1234_5678_9abc,
            ts_ns: 7,
            nr_periods: 100,
            nr_throttled: 99,
            throttled_ns: 7_910_000_000,
        };
        assert_eq!(ThrottleEvent::from_bytes(&e.to_bytes()), Some(e));
        assert_eq!(ThrottleEvent::from_bytes(&e.to_bytes()[..47]), None);
    }
}
