//! MBCAS kernel programs: CFS bandwidth throttling per cgroup.
//!
//! Rezolus's rules: O(1) work per call, aggregate in the kernel, and let user
//! space read the counters on its own cadence. Only *edges* go through the ring
//! buffer; a throttled group costs nothing per period beyond its counters.
//!
//! * `tp_btf/hrtimer_expire_exit` ([`mbcas_period_timer`]) runs on every hrtimer
//!   expiry of the machine. The non-matching path (almost every call) is one
//!   direct load of `hrtimer.function` through the BTF-typed pointer and a
//!   compare. For the CFS period timer (`sched_cfs_period_timer`),
//!   `container_of` gives the group's `cfs_bandwidth` and `task_group`, whose
//!   counters (periods, throttled periods, throttled time — the fields
//!   `cpu.stat` shows) are copied into `MBCAS_CGROUPS` when they changed. An
//!   event goes out when a period ends throttled and the group was not known
//!   throttled (the onset, on kernels without the hook below), and once when a
//!   period ends unthrottled after throttling (the end).
//! * `tp_btf/sched_switch` ([`mbcas_sched_switch`], kernels with task-based
//!   throttling, `task_struct.throttled`, 6.18+): the non-matching path is one
//!   direct load of `prev->throttled`. The first throttled task of a group not
//!   known throttled sends the onset event at once, mid-period (lower latency
//!   than the period timer), creating the group's entry if it is new.
//!
//! * `tp_btf/sched_switch` ([`mbcas_runq_wait`]): run-queue wait per cgroup.
//!   The switched-out task's `sched_info.run_delay` (what
//!   `/proc/<pid>/schedstat` shows: the time it was runnable but not running,
//!   summed over its life) is compared with the value remembered for it in
//!   `MBCAS_TASKS`; the difference is added to its cgroup's per-CPU counter in
//!   `MBCAS_RUNQ`. A task's cgroup id is cached with its `task_group` pointer,
//!   so the `tg → css.cgroup → kn → id` chase runs only when the task moved.
//!   Aggregated in the kernel, read by user space on its cadence; no events.
//!   `mbcas_switch_floor` is the empty program on the same hook.
//!
//! No struct layout is compiled in: offsets come from the running kernel's BTF
//! through load-time globals (see `mbcas_common::globals`). Everything is keyed by
//! the throttled group's cgroup id (`task_group → css.cgroup → kn → id`).
//! Drops (ring buffer full, failed reads, failed map updates) are counted in
//! `MBCAS_STATS`. `mbcas_floor` is an empty program on the hrtimer hook that only
//! `mbcas sense --floor` attaches: the hook's and the run-time accounting's own
//! cost, which no program on it can go below.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use mbcas_common::{
    CgroupBandwidth, EVENT_PERIOD_THROTTLED, EVENT_PERIOD_UNTHROTTLED, EVENTS_BYTES, MAX_CGROUPS,
    MAX_TASKS, STAT_EVENTS, STAT_MAP_ERRORS, STAT_PERIOD_TIMERS, STAT_READ_ERRORS,
    STAT_RINGBUF_DROPS, STAT_RUNQ_UPDATES, STAT_SLOTS, STAT_SWITCH_EDGES, TaskWait, ThrottleEvent,
};

// Load-time globals: names must match `mbcas_common::globals`.
#[unsafe(no_mangle)]
static MBCAS_PERIOD_TIMER_FN: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_HRTIMER_FUNCTION: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CFSB_PERIOD_TIMER: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CFSB_NR_PERIODS: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CFSB_NR_THROTTLED: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CFSB_THROTTLED_TIME: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_SIZE_CFSB_NR_PERIODS: u64 = 4;
#[unsafe(no_mangle)]
static MBCAS_SIZE_CFSB_NR_THROTTLED: u64 = 4;
#[unsafe(no_mangle)]
static MBCAS_OFF_TG_CFS_BANDWIDTH: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TG_CSS: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CSS_CGROUP: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_CGROUP_KN: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_KN_ID: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TASK_THROTTLED: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TASK_TG: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TASK_PID: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TASK_RUN_DELAY: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_OFF_TASK_PCOUNT: u64 = 0;
#[unsafe(no_mangle)]
static MBCAS_SIZE_TASK_PCOUNT: u64 = 8;
#[unsafe(no_mangle)]
static MBCAS_DEBUG: u64 = 0;

#[map]
static MBCAS_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
static MBCAS_CGROUPS: LruHashMap<u64, CgroupBandwidth> =
    LruHashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
static MBCAS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);
#[map]
static MBCAS_RUNQ: LruPerCpuHashMap<u64, u64> = LruPerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
static MBCAS_TASKS: LruHashMap<u32, TaskWait> = LruHashMap::with_max_entries(MAX_TASKS, 0);

/// Reads a load-time global. `read_volatile` keeps the compiler from folding the
/// compile-time default into the code.
#[inline(always)]
fn global(v: &'static u64) -> u64 {
    // SAFETY: `v` is a valid, aligned static; the loader rewrites its value in the
    // object's .rodata before loading.
    unsafe { read_volatile(v) }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions; it reads CLOCK_MONOTONIC.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn stat_inc(slot: u32) {
    if let Some(p) = MBCAS_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot of this CPU; programs do not nest on one CPU for
        // these tracepoints, so the plain add cannot race.
        unsafe { *p += 1 };
    }
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
fn read<T>(base: u64, off: u64) -> Result<T, ()> {
    // SAFETY: bpf_probe_read_kernel copies with fault handling; a bad address
    // returns an error instead of faulting.
    match unsafe { bpf_probe_read_kernel((base + off) as *const T) } {
        Ok(v) => Ok(v),
        Err(_) => {
            stat_inc(STAT_READ_ERRORS);
            Err(())
        }
    }
}

/// Loads a `T` at `base + off` straight through a BTF-typed pointer (a
/// tracepoint argument), without a helper call: the hot, non-matching paths.
/// `off` must be a load-time global, which the verifier sees as a constant
/// (`.rodata` is frozen), so it can check the access against the BTF layout.
#[inline(always)]
fn load<T: Copy>(base: u64, off: u64) -> T {
    // SAFETY: `base` is a tracepoint argument the verifier types from BTF
    // (PTR_TO_BTF_ID) and `off` the member's offset from the same BTF; the
    // verifier checks the access and turns it into a fault-handling load
    // (BPF_PROBE_MEM), which yields 0 instead of faulting.
    unsafe { read_volatile((base + off) as *const T) }
}

/// Reads an unsigned counter of 4 or 8 bytes.
#[inline(always)]
fn read_counter(base: u64, off: u64, size: u64) -> Result<u64, ()> {
    if size == 8 {
        read::<u64>(base, off)
    } else {
        read::<u32>(base, off).map(u64::from)
    }
}

/// `task_group → css.cgroup → kn → id`; `Err` when the group has no cgroup
/// (autogroup) or a read fails.
#[inline(always)]
fn cgroup_id_of_tg(tg: u64) -> Result<u64, ()> {
    let cgrp: u64 = read(
        tg,
        global(&MBCAS_OFF_TG_CSS) + global(&MBCAS_OFF_CSS_CGROUP),
    )?;
    if cgrp == 0 {
        return Err(());
    }
    let kn: u64 = read(cgrp, global(&MBCAS_OFF_CGROUP_KN))?;
    if kn == 0 {
        return Err(());
    }
    read(kn, global(&MBCAS_OFF_KN_ID))
}

#[inline(always)]
fn emit(ev: &ThrottleEvent) {
    match MBCAS_EVENTS.output::<ThrottleEvent>(ev, 0) {
        Ok(()) => stat_inc(STAT_EVENTS),
        Err(_) => stat_inc(STAT_RINGBUF_DROPS),
    }
}

/// Reads the group's bandwidth counters: (periods, throttled periods, throttled ns).
#[inline(always)]
fn bandwidth_counters(cfs_b: u64) -> Result<(u64, u64, u64), ()> {
    Ok((
        read_counter(
            cfs_b,
            global(&MBCAS_OFF_CFSB_NR_PERIODS),
            global(&MBCAS_SIZE_CFSB_NR_PERIODS),
        )?,
        read_counter(
            cfs_b,
            global(&MBCAS_OFF_CFSB_NR_THROTTLED),
            global(&MBCAS_SIZE_CFSB_NR_THROTTLED),
        )?,
        read(cfs_b, global(&MBCAS_OFF_CFSB_THROTTLED_TIME))?,
    ))
}

/// The hook's floor: attached only by `mbcas sense --floor`, to measure what a
/// program on this hook costs before it does anything.
#[btf_tracepoint(function = "hrtimer_expire_exit")]
pub fn mbcas_floor(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "hrtimer_expire_exit")]
pub fn mbcas_period_timer(ctx: BtfTracePointContext) -> i32 {
    match try_period_timer(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_period_timer(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let timer: u64 = ctx.arg(0);
    let function: u64 = load(timer, global(&MBCAS_OFF_HRTIMER_FUNCTION));
    if function != global(&MBCAS_PERIOD_TIMER_FN) {
        return Ok(());
    }
    stat_inc(STAT_PERIOD_TIMERS);
    let cfs_b = timer - global(&MBCAS_OFF_CFSB_PERIOD_TIMER);
    let tg = cfs_b - global(&MBCAS_OFF_TG_CFS_BANDWIDTH);
    let cgroup_id = cgroup_id_of_tg(tg)?;
    let (nr_periods, nr_throttled, throttled_ns) = bandwidth_counters(cfs_b)?;
    let Some(p) = MBCAS_CGROUPS.get_ptr_mut(&cgroup_id) else {
        // First sight of this group: a baseline only (no edge can be known).
        let st = CgroupBandwidth {
            nr_periods,
            nr_throttled,
            throttled_ns,
            ..CgroupBandwidth::default()
        };
        if MBCAS_CGROUPS.insert(&cgroup_id, &st, 0).is_err() {
            stat_inc(STAT_MAP_ERRORS);
        }
        return Ok(());
    };
    // SAFETY: the pointer comes from a successful map lookup and stays valid for
    // this program run. Benign race: sched_switch on another CPU may set
    // `throttling` of the same entry at the same time; the worst outcome is one
    // edge event twice or one late, and the counters copied here are the kernel's.
    let st = unsafe { &mut *p };
    let throttled_now = nr_throttled > st.nr_throttled;
    if nr_periods != st.nr_periods || throttled_now || throttled_ns != st.throttled_ns {
        st.nr_periods = nr_periods;
        st.nr_throttled = nr_throttled;
        st.throttled_ns = throttled_ns;
    }
    // Edges only: throttled → a known-throttled group stays silent; the first
    // period that ends unthrottled (also the last expiry after the quota was
    // lifted, which changes no counter) ends the episode.
    let kind = match (throttled_now, st.throttling != 0) {
        (true, false) => EVENT_PERIOD_THROTTLED,
        (false, true) => EVENT_PERIOD_UNTHROTTLED,
        _ => return Ok(()),
    };
    st.throttling = u32::from(throttled_now);
    st.events += 1;
    emit(&ThrottleEvent {
        kind,
        pid: 0,
        cgroup_id,
        ts_ns: now_ns(),
        nr_periods,
        nr_throttled,
        throttled_ns,
    });
    if global(&MBCAS_DEBUG) != 0 {
        debug!(
            ctx,
            "cgroup {} period edge kind={} throttled={}/{}",
            cgroup_id,
            kind,
            nr_throttled,
            nr_periods
        );
    }
    Ok(())
}

#[btf_tracepoint(function = "sched_switch")]
pub fn mbcas_sched_switch(ctx: BtfTracePointContext) -> i32 {
    match try_sched_switch(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let prev: u64 = ctx.arg(1);
    let throttled: u8 = load(prev, global(&MBCAS_OFF_TASK_THROTTLED));
    if throttled == 0 {
        return Ok(());
    }
    let tg: u64 = read(prev, global(&MBCAS_OFF_TASK_TG))?;
    if tg == 0 {
        return Ok(());
    }
    let cgroup_id = cgroup_id_of_tg(tg)?;
    let cfs_b = tg + global(&MBCAS_OFF_TG_CFS_BANDWIDTH);
    let (nr_periods, nr_throttled, throttled_ns) = match MBCAS_CGROUPS.get_ptr_mut(&cgroup_id) {
        Some(p) => {
            // SAFETY: valid for this run; see the benign race in try_period_timer.
            let st = unsafe { &mut *p };
            if st.throttling != 0 {
                // Known throttled: the other tasks of the group, and the rest of
                // the episode, cost nothing more.
                return Ok(());
            }
            st.throttling = 1;
            st.events += 1;
            (st.nr_periods, st.nr_throttled, st.throttled_ns)
        }
        None => {
            // A group throttled before its first period ended: its entry starts
            // here, already throttled.
            let (nr_periods, nr_throttled, throttled_ns) = bandwidth_counters(cfs_b)?;
            let st = CgroupBandwidth {
                nr_periods,
                nr_throttled,
                throttled_ns,
                events: 1,
                throttling: 1,
                _pad: 0,
            };
            if MBCAS_CGROUPS.insert(&cgroup_id, &st, 0).is_err() {
                stat_inc(STAT_MAP_ERRORS);
            }
            (nr_periods, nr_throttled, throttled_ns)
        }
    };
    stat_inc(STAT_SWITCH_EDGES);
    let pid: u32 = load(prev, global(&MBCAS_OFF_TASK_PID));
    emit(&ThrottleEvent {
        kind: EVENT_PERIOD_THROTTLED,
        pid,
        cgroup_id,
        ts_ns: now_ns(),
        nr_periods,
        nr_throttled,
        throttled_ns,
    });
    if global(&MBCAS_DEBUG) != 0 {
        debug!(ctx, "cgroup {} throttled (task {})", cgroup_id, pid);
    }
    Ok(())
}

/// The sched_switch hook's floor, attached with [`mbcas_floor`] by
/// `mbcas sense --floor`.
#[btf_tracepoint(function = "sched_switch")]
pub fn mbcas_switch_floor(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn mbcas_runq_wait(ctx: BtfTracePointContext) -> i32 {
    match try_runq_wait(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_runq_wait(ctx: &BtfTracePointContext) -> Result<(), ()> {
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let prev: u64 = ctx.arg(1);
    let pid: u32 = load(prev, global(&MBCAS_OFF_TASK_PID));
    if pid == 0 {
        // The idle task never waits for a CPU.
        return Ok(());
    }
    // Updated when the task last arrived on a CPU, so it holds every wait up
    // to the run that ends now.
    let run_delay: u64 = load(prev, global(&MBCAS_OFF_TASK_RUN_DELAY));
    // A task's first switch-out (one run so far): all of its wait is new. This
    // also tells a reused pid from the task remembered under it.
    let first_run = if global(&MBCAS_SIZE_TASK_PCOUNT) == 8 {
        load::<u64>(prev, global(&MBCAS_OFF_TASK_PCOUNT)) <= 1
    } else {
        load::<u32>(prev, global(&MBCAS_OFF_TASK_PCOUNT)) <= 1
    };
    let tg: u64 = read(prev, global(&MBCAS_OFF_TASK_TG))?;
    let (delta, cgroup_id) = match MBCAS_TASKS.get_ptr_mut(&pid) {
        Some(p) => {
            // SAFETY: valid for this run. Only one CPU switches a given task
            // out at a time, so the entry has one writer; an LRU eviction
            // racing with this write loses the entry, i.e. one baseline.
            let t = unsafe { &mut *p };
            if run_delay == t.run_delay && !first_run {
                // It has not waited since its last switch-out.
                return Ok(());
            }
            let last = if first_run { 0 } else { t.run_delay };
            t.run_delay = run_delay;
            if run_delay <= last {
                // Backwards (cannot happen for one task): a new baseline.
                return Ok(());
            }
            if t.tg != tg {
                // Benign race: a freed task_group's address reused by a new
                // group that this task moved into between two of its runs
                // would keep the old id; the next move corrects it.
                t.cgroup_id = cgroup_id_of_tg(tg)?;
                t.tg = tg;
            }
            (run_delay - last, t.cgroup_id)
        }
        None => {
            let cgroup_id = cgroup_id_of_tg(tg)?;
            let t = TaskWait {
                run_delay,
                tg,
                cgroup_id,
            };
            if MBCAS_TASKS.insert(&pid, &t, 0).is_err() {
                stat_inc(STAT_MAP_ERRORS);
            }
            // A task older than the programs gives a baseline only.
            if !first_run || run_delay == 0 {
                return Ok(());
            }
            (run_delay, cgroup_id)
        }
    };
    stat_inc(STAT_RUNQ_UPDATES);
    match MBCAS_RUNQ.get_ptr_mut(&cgroup_id) {
        // SAFETY: this CPU's value of the entry; programs on this hook do not
        // nest on one CPU, so the add cannot race.
        Some(w) => unsafe { *w += delta },
        None => {
            if MBCAS_RUNQ.insert(&cgroup_id, &delta, 0).is_err() {
                stat_inc(STAT_MAP_ERRORS);
            }
        }
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
