//! MBCAS kernel programs: CFS bandwidth throttling per cgroup.
//!
//! * `tp_btf/hrtimer_expire_exit` ([`mbcas_period_timer`]): every hrtimer expiry is
//!   filtered on the CFS period timer (`hrtimer.function == sched_cfs_period_timer`);
//!   from the timer, `container_of` gives the group's `cfs_bandwidth` and
//!   `task_group`, whose counters (periods, throttled periods, throttled time —
//!   the fields `cpu.stat` shows) are copied into `MBCAS_CGROUPS` each period.
//!   A ring-buffer event goes out for every period that ended throttled and once
//!   when throttling stops; idle and unthrottled groups produce none.
//! * `tp_btf/sched_switch` ([`mbcas_sched_switch`], kernels with task-based
//!   throttling, `task_struct.throttled`, 6.18+): a task switched out throttled
//!   starts an episode; when it is switched back in the episode's length is
//!   added to its group and sent as an event. The first throttled task of a
//!   group that was not throttled sends an edge event at once (lower latency
//!   than waiting for the period timer).
//!
//! No struct layout is compiled in: offsets come from the running kernel's BTF
//! through load-time globals (see `mbcas_common::globals`). Everything is keyed by
//! the throttled group's cgroup id (`task_group → css.cgroup → kn → id`).
//! Drops (ring buffer full, failed reads, failed map updates) are counted in
//! `MBCAS_STATS`.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use mbcas_common::{
    CgroupBandwidth, EVENT_PERIOD_THROTTLED, EVENT_PERIOD_UNTHROTTLED, EVENT_TASK_EPISODE,
    EVENTS_BYTES, MAX_CGROUPS, MAX_TASKS, STAT_EPISODES, STAT_EVENTS, STAT_MAP_ERRORS,
    STAT_PERIOD_TIMERS, STAT_READ_ERRORS, STAT_RINGBUF_DROPS, STAT_SLOTS, TaskThrottle,
    ThrottleEvent,
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
static MBCAS_DEBUG: u64 = 0;

#[map]
static MBCAS_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
#[map]
static MBCAS_CGROUPS: LruHashMap<u64, CgroupBandwidth> =
    LruHashMap::with_max_entries(MAX_CGROUPS, 0);
#[map]
static MBCAS_TASKS: LruHashMap<u32, TaskThrottle> = LruHashMap::with_max_entries(MAX_TASKS, 0);
#[map]
static MBCAS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

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

#[btf_tracepoint(function = "hrtimer_expire_exit")]
pub fn mbcas_period_timer(ctx: BtfTracePointContext) -> i32 {
    match try_period_timer(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_period_timer(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let target = global(&MBCAS_PERIOD_TIMER_FN);
    if target == 0 {
        return Ok(());
    }
    let timer: u64 = ctx.arg(0);
    let function: u64 = read(timer, global(&MBCAS_OFF_HRTIMER_FUNCTION))?;
    if function != target {
        return Ok(());
    }
    stat_inc(STAT_PERIOD_TIMERS);
    let cfs_b = timer - global(&MBCAS_OFF_CFSB_PERIOD_TIMER);
    let tg = cfs_b - global(&MBCAS_OFF_TG_CFS_BANDWIDTH);
    let cgroup_id = cgroup_id_of_tg(tg)?;
    let nr_periods = read_counter(
        cfs_b,
        global(&MBCAS_OFF_CFSB_NR_PERIODS),
        global(&MBCAS_SIZE_CFSB_NR_PERIODS),
    )?;
    let nr_throttled = read_counter(
        cfs_b,
        global(&MBCAS_OFF_CFSB_NR_THROTTLED),
        global(&MBCAS_SIZE_CFSB_NR_THROTTLED),
    )?;
    let throttled_ns: u64 = read(cfs_b, global(&MBCAS_OFF_CFSB_THROTTLED_TIME))?;
    let now = now_ns();
    let mut ev = ThrottleEvent {
        kind: 0,
        pid: 0,
        cgroup_id,
        ts_ns: now,
        nr_periods,
        nr_throttled,
        throttled_ns,
        duration_ns: 0,
    };
    match MBCAS_CGROUPS.get_ptr_mut(&cgroup_id) {
        Some(p) => {
            // SAFETY: the pointer comes from a successful map lookup and stays valid
            // for this program run. Benign race: sched_switch on another CPU may
            // update `episodes`/`episode_ns`/`throttling` of the same entry at the
            // same time; a lost increment there only delays an edge event or
            // undercounts one episode, and the counters copied here are the
            // kernel's own.
            let st = unsafe { &mut *p };
            let throttled_now = nr_throttled > st.nr_throttled;
            st.nr_periods = nr_periods;
            st.nr_throttled = nr_throttled;
            st.throttled_ns = throttled_ns;
            st.updated_ns = now;
            if throttled_now {
                st.throttling = 1;
                st.events += 1;
                ev.kind = EVENT_PERIOD_THROTTLED;
            } else if st.throttling != 0 {
                st.throttling = 0;
                st.events += 1;
                ev.kind = EVENT_PERIOD_UNTHROTTLED;
            }
        }
        None => {
            // First sight of this group: a baseline only (no edge can be known).
            let st = CgroupBandwidth {
                nr_periods,
                nr_throttled,
                throttled_ns,
                updated_ns: now,
                ..CgroupBandwidth::default()
            };
            if MBCAS_CGROUPS.insert(&cgroup_id, &st, 0).is_err() {
                stat_inc(STAT_MAP_ERRORS);
            }
        }
    }
    if ev.kind != 0 {
        emit(&ev);
        if global(&MBCAS_DEBUG) != 0 {
            debug!(
                ctx,
                "cgroup {} period kind={} throttled={}/{}",
                cgroup_id,
                ev.kind,
                nr_throttled,
                nr_periods
            );
        }
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
    let next: u64 = ctx.arg(2);
    let off_pid = global(&MBCAS_OFF_TASK_PID);

    // The task switched in: does it end a throttle episode?
    let next_pid: u32 = read(next, off_pid)?;
    if let Some(t) = MBCAS_TASKS.get_ptr(&next_pid) {
        // SAFETY: pointer from a successful lookup, read before the delete below.
        let t = unsafe { *t };
        let _ = MBCAS_TASKS.remove(&next_pid);
        let now = now_ns();
        let duration_ns = now.saturating_sub(t.start_ns);
        stat_inc(STAT_EPISODES);
        let mut ev = ThrottleEvent {
            kind: EVENT_TASK_EPISODE,
            pid: next_pid,
            cgroup_id: t.cgroup_id,
            ts_ns: now,
            duration_ns,
            ..ThrottleEvent::default()
        };
        if let Some(p) = MBCAS_CGROUPS.get_ptr_mut(&t.cgroup_id) {
            // SAFETY: valid for this run; see the benign race in try_period_timer.
            let st = unsafe { &mut *p };
            st.episodes += 1;
            st.episode_ns += duration_ns;
            st.events += 1;
            ev.nr_periods = st.nr_periods;
            ev.nr_throttled = st.nr_throttled;
            ev.throttled_ns = st.throttled_ns;
        }
        emit(&ev);
    }

    // The task switched out: was it throttled?
    let throttled: u8 = read(prev, global(&MBCAS_OFF_TASK_THROTTLED))?;
    if throttled == 0 {
        return Ok(());
    }
    let prev_pid: u32 = read(prev, off_pid)?;
    let tg: u64 = read(prev, global(&MBCAS_OFF_TASK_TG))?;
    if tg == 0 {
        return Ok(());
    }
    let cgroup_id = cgroup_id_of_tg(tg)?;
    let now = now_ns();
    if MBCAS_TASKS
        .insert(
            &prev_pid,
            &TaskThrottle {
                start_ns: now,
                cgroup_id,
            },
            0,
        )
        .is_err()
    {
        stat_inc(STAT_MAP_ERRORS);
    }
    if let Some(p) = MBCAS_CGROUPS.get_ptr_mut(&cgroup_id) {
        // SAFETY: valid for this run; see the benign race in try_period_timer.
        let st = unsafe { &mut *p };
        if st.throttling == 0 {
            // Throttling edge, seen mid-period: tell user space now.
            st.throttling = 1;
            st.events += 1;
            emit(&ThrottleEvent {
                kind: EVENT_PERIOD_THROTTLED,
                pid: prev_pid,
                cgroup_id,
                ts_ns: now,
                nr_periods: st.nr_periods,
                nr_throttled: st.nr_throttled,
                throttled_ns: st.throttled_ns,
                duration_ns: 0,
            });
            if global(&MBCAS_DEBUG) != 0 {
                debug!(ctx, "cgroup {} throttled (task {})", cgroup_id, prev_pid);
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
