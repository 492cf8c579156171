use std::time::Duration;

use super::{openmetrics, *};
use crate::policy::Reason;

fn scrape(m: &Metrics) -> openmetrics::Exposition {
    let text = m.encode().unwrap();
    openmetrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

fn populated() -> Metrics {
    let m = Metrics::new();
    let a = PodLabels::new("default", "web-1");
    let b = PodLabels::new("shop", "cart \"eu\"\\1");
    m.set_pod_demand(&a, 420.0, MilliCpu(510));
    m.set_pod_allocation(&a, MilliCpu(600));
    m.set_pod_throttled_ratio(&a, 0.25);
    m.add_pod_runqueue_wait(&a, 0.5);
    m.add_pod_runqueue_wait(&a, 0.25);
    m.add_pod_runqueue_wait(&b, 0.0);
    m.set_pod_demand(&b, 1500.0, MilliCpu(1800));
    m.set_pod_allocation(&b, MilliCpu(2000));
    m.set_pod_throttled_ratio(&b, 0.0);
    m.set_market(3.5, MilliCpu(3600), false);
    m.set_contention_level(266.5);
    for r in [Reason::Increase, Reason::Increase, Reason::Hysteresis] {
        m.inc_decision(r.as_str());
    }
    m.inc_resize("applied");
    m.inc_resize("failed");
    m.observe_resize_latency(Duration::from_millis(800));
    m.observe_resize_latency(Duration::from_millis(30));
    m.add_ebpf_events(7);
    m.add_ebpf_drops(DROP_RINGBUF, 1);
    m.set_ebpf_program_stats("sched_switch", 2_000_000_000, 1000);
    m.set_sensor_mode("ebpf");
    m.set_node_lease_held(true);
    m.set_node_name("node-a");
    m.inc_weight_write("lowered");
    m.set_weight_lowered_pods(1);
    m.set_node_pressure(&super::NodePressure {
        demand_m: 2500.0,
        usage_m: 1900.0,
        wait_m: 600.0,
        capacity: MilliCpu(2000),
    });
    m.add_node_cpu_pressure(0.4);
    drop(m.loop_timer());
    m
}

#[test]
fn encoded_output_is_strict_openmetrics_with_every_metric() {
    let m = populated();
    let e = scrape(&m);
    for (name, kind) in [
        ("mbcas_build", "info"),
        ("mbcas_pod_demand_cores", "gauge"),
        ("mbcas_pod_need_cores", "gauge"),
        ("mbcas_pod_allocation_cores", "gauge"),
        ("mbcas_pod_throttled_ratio", "gauge"),
        ("mbcas_pod_runqueue_wait_seconds", "counter"),
        ("mbcas_market_contention_level", "gauge"),
        ("mbcas_market_clearing_price", "gauge"),
        ("mbcas_market_capacity_cores", "gauge"),
        ("mbcas_market_overcommitted", "gauge"),
        ("mbcas_decisions", "counter"),
        ("mbcas_resizes", "counter"),
        ("mbcas_resize_latency_seconds", "histogram"),
        ("mbcas_ebpf_events", "counter"),
        ("mbcas_ebpf_drops", "counter"),
        ("mbcas_ebpf_program_run_time_seconds", "counter"),
        ("mbcas_ebpf_program_runs", "counter"),
        ("mbcas_sensor_mode", "gauge"),
        ("mbcas_node_lease_held", "gauge"),
        ("mbcas_loop_duration_seconds", "histogram"),
    ] {
        let f = e.family(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(f.kind, kind, "{name}");
        assert!(
            f.help.as_deref().is_some_and(|h| !h.is_empty()),
            "{name} has no help"
        );
    }
    let web = [("namespace", "default"), ("pod", "web-1")];
    assert_eq!(e.value("mbcas_pod_demand_cores", &web), Some(0.42));
    assert_eq!(e.value("mbcas_pod_need_cores", &web), Some(0.51));
    assert_eq!(e.value("mbcas_pod_allocation_cores", &web), Some(0.6));
    assert_eq!(e.value("mbcas_pod_throttled_ratio", &web), Some(0.25));
    assert_eq!(
        e.value("mbcas_pod_runqueue_wait_seconds_total", &web),
        Some(0.75)
    );
    assert_eq!(e.value("mbcas_market_contention_level", &[]), Some(266.5));
    // Label values with quotes and backslashes survive escaping.
    let cart = [("namespace", "shop"), ("pod", "cart \"eu\"\\1")];
    assert_eq!(e.value("mbcas_pod_allocation_cores", &cart), Some(2.0));
    assert_eq!(e.value("mbcas_market_clearing_price", &[]), Some(3.5));
    assert_eq!(e.value("mbcas_market_capacity_cores", &[]), Some(3.6));
    assert_eq!(e.value("mbcas_market_overcommitted", &[]), Some(0.0));
    assert_eq!(
        e.value("mbcas_decisions_total", &[("reason", "increase")]),
        Some(2.0)
    );
    assert_eq!(
        e.value("mbcas_decisions_total", &[("reason", "hysteresis")]),
        Some(1.0)
    );
    assert_eq!(
        e.value("mbcas_resizes_total", &[("result", "failed")]),
        Some(1.0)
    );
    assert_eq!(
        e.value("mbcas_resize_latency_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        e.value("mbcas_resize_latency_seconds_bucket", &[("le", "0.04")]),
        Some(1.0)
    );
    assert_eq!(e.value("mbcas_ebpf_events_total", &[]), Some(7.0));
    assert_eq!(
        e.value("mbcas_ebpf_drops_total", &[("stage", "ringbuf")]),
        Some(1.0)
    );
    assert_eq!(
        e.value(
            "mbcas_ebpf_program_run_time_seconds_total",
            &[("program", "sched_switch")]
        ),
        Some(2.0)
    );
    assert_eq!(e.value("mbcas_sensor_mode", &[("mode", "ebpf")]), Some(1.0));
    assert_eq!(e.value("mbcas_node_lease_held", &[]), Some(1.0));
    assert_eq!(e.value("mbcas_loop_duration_seconds_count", &[]), Some(1.0));
    assert_eq!(
        e.value(
            "mbcas_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
}

#[test]
fn removed_pods_disappear_from_every_family() {
    let m = populated();
    let a = PodLabels::new("default", "web-1");
    let b = PodLabels::new("shop", "cart \"eu\"\\1");
    assert_eq!(m.pod_count(), 2);
    assert!(m.remove_pod(&a));
    assert!(!m.remove_pod(&a), "second removal finds nothing");
    let e = scrape(&m);
    for name in [
        "mbcas_pod_demand_cores",
        "mbcas_pod_need_cores",
        "mbcas_pod_allocation_cores",
        "mbcas_pod_throttled_ratio",
        "mbcas_pod_runqueue_wait_seconds_total",
    ] {
        assert_eq!(e.value(name, &[("pod", "web-1")]), None, "{name}");
        assert!(
            e.value(name, &[("pod", "cart \"eu\"\\1")]).is_some(),
            "{name}"
        );
    }
    let text = m.encode().unwrap();
    assert!(!text.contains("web-1"), "{text}");

    // retain_pods drops every pod not listed.
    let c = PodLabels::new("shop", "api");
    m.set_pod_allocation(&c, MilliCpu(100));
    m.retain_pods([&c]);
    assert_eq!(m.pod_count(), 1);
    let e = scrape(&m);
    assert_eq!(e.samples("mbcas_pod_allocation_cores").count(), 1);
    assert_eq!(
        e.value("mbcas_pod_allocation_cores", &[("pod", "api")]),
        Some(0.1)
    );
    assert_eq!(e.value("mbcas_pod_demand_cores", &b_labels(&b)), None);
}

fn b_labels(p: &PodLabels) -> [(&str, &str); 2] {
    [("namespace", p.namespace.as_str()), ("pod", p.pod.as_str())]
}

#[test]
fn sensor_mode_switch_zeroes_the_old_mode() {
    let m = Metrics::new();
    m.set_sensor_mode("ebpf");
    m.set_sensor_mode("poll");
    let e = scrape(&m);
    assert_eq!(e.value("mbcas_sensor_mode", &[("mode", "ebpf")]), Some(0.0));
    assert_eq!(e.value("mbcas_sensor_mode", &[("mode", "poll")]), Some(1.0));
    assert_eq!(e.samples("mbcas_sensor_mode").count(), 2);
}

#[test]
fn program_stats_advance_by_difference_and_survive_reload() {
    let m = Metrics::new();
    m.set_ebpf_program_stats("hrtimer", 1_000_000_000, 10);
    m.set_ebpf_program_stats("hrtimer", 1_500_000_000, 15);
    let e = scrape(&m);
    let p = [("program", "hrtimer")];
    assert_eq!(
        e.value("mbcas_ebpf_program_run_time_seconds_total", &p),
        Some(1.5)
    );
    assert_eq!(e.value("mbcas_ebpf_program_runs_total", &p), Some(15.0));
    // Program reloaded: kernel counters restart from a small value.
    m.set_ebpf_program_stats("hrtimer", 250_000_000, 2);
    let e = scrape(&m);
    assert_eq!(
        e.value("mbcas_ebpf_program_run_time_seconds_total", &p),
        Some(1.75)
    );
    assert_eq!(e.value("mbcas_ebpf_program_runs_total", &p), Some(17.0));
}

#[test]
fn loop_timer_records_on_drop_including_early_exit() {
    fn pass(m: &Metrics, fail: bool) -> Result<(), ()> {
        let _t = m.loop_timer();
        if fail {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    }
    let m = Metrics::new();
    assert!(pass(&m, false).is_ok());
    assert!(pass(&m, true).is_err());
    let e = scrape(&m);
    assert_eq!(e.value("mbcas_loop_duration_seconds_count", &[]), Some(2.0));
    let sum = e
        .value("mbcas_loop_duration_seconds_sum", &[])
        .unwrap_or(0.0);
    assert!(sum >= 0.002, "sum {sum}");
}

#[test]
fn every_policy_reason_is_a_valid_label_value() {
    let m = Metrics::new();
    for r in Reason::ALL {
        m.inc_decision(r.as_str());
    }
    let e = scrape(&m);
    assert_eq!(
        e.samples("mbcas_decisions_total").count(),
        Reason::ALL.len()
    );
}

#[test]
fn clones_share_series() {
    let m = Metrics::new();
    let c = m.clone();
    c.add_ebpf_events(3);
    assert_eq!(scrape(&m).value("mbcas_ebpf_events_total", &[]), Some(3.0));
}

/// The Grafana dashboard queries only metrics this module exposes.
#[test]
fn dashboard_queries_only_exposed_metrics() {
    let text = include_str!("../../../deploy/grafana/mbcas-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    let e = scrape(&populated());
    let exposed: std::collections::HashSet<&str> = e
        .families
        .iter()
        .flat_map(|f| &f.samples)
        .map(|s| s.name.as_str())
        .collect();
    let panels = dash["panels"].as_array().expect("no panels");
    let mut used = std::collections::BTreeSet::new();
    let mut exprs = 0;
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("target without expr in {}", p["title"]));
            assert!(expr.contains("mbcas_"), "{expr}");
            exprs += 1;
        }
    }
    // Panel queries and template variables alike.
    let mut rest = text;
    while let Some(i) = rest.find("mbcas_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        used.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    assert!(exprs >= 15, "only {exprs} queries");
    for name in &used {
        assert!(
            exposed.contains(name.as_str()),
            "dashboard uses unknown metric {name}"
        );
    }
    // And every metric family is on the dashboard somewhere.
    for f in &e.families {
        assert!(
            used.iter().any(|u| u.starts_with(&f.name)),
            "{} is not on the dashboard",
            f.name
        );
    }
}

#[test]
fn sensor_stats_advance_counters_by_difference() {
    let m = Metrics::new();
    let stats = |events, ringbuf_drops, user_drops| KernelStats {
        period_timers: 0,
        events,
        ringbuf_drops,
        read_errors: 0,
        switch_edges: 0,
        map_errors: 0,
        runq_updates: 0,
        user_drops,
    };
    m.observe_kernel_stats(&stats(10, 1, 0));
    m.observe_kernel_stats(&stats(25, 1, 2));
    let e = scrape(&m);
    assert_eq!(e.value("mbcas_ebpf_events_total", &[]), Some(25.0));
    assert_eq!(
        e.value("mbcas_ebpf_drops_total", &[("stage", "ringbuf")]),
        Some(1.0)
    );
    assert_eq!(
        e.value("mbcas_ebpf_drops_total", &[("stage", "channel")]),
        Some(2.0)
    );
    // Sensor restarted: its counters start from zero again.
    m.observe_kernel_stats(&stats(4, 0, 0));
    assert_eq!(scrape(&m).value("mbcas_ebpf_events_total", &[]), Some(29.0));

    let cost = |name: &str, run_time_ns, run_count| ProgramCost {
        name: name.to_owned(),
        run_count,
        run_time_ns,
    };
    m.observe_program_costs(&[
        cost(PROG_PERIOD_TIMER, 1_000_000, 1000),
        cost("something_else", 500_000, 10),
        cost("another", 500_000, 10),
    ]);
    let e = scrape(&m);
    let runs = |p| e.value("mbcas_ebpf_program_runs_total", &[("program", p)]);
    assert_eq!(runs(PROG_PERIOD_TIMER), Some(1000.0));
    assert_eq!(runs("other"), Some(20.0));
    assert_eq!(e.samples("mbcas_ebpf_program_runs_total").count(), 2);
}

#[test]
fn node_pressure_is_demand_over_capacity_and_unmet_demand_never_negative() {
    let m = Metrics::new();
    let e = scrape(&populated());
    assert_eq!(e.value("mbcas_node_demand_cores", &[]), Some(2.5));
    assert_eq!(e.value("mbcas_node_usage_cores", &[]), Some(1.9));
    assert_eq!(e.value("mbcas_node_runqueue_wait_cores", &[]), Some(0.6));
    assert_eq!(e.value("mbcas_node_unmet_demand_cores", &[]), Some(0.5));
    assert_eq!(e.value("mbcas_node_pressure_ratio", &[]), Some(1.25));
    assert_eq!(
        e.value("mbcas_node_cpu_pressure_seconds_total", &[]),
        Some(0.4)
    );
    m.set_node_pressure(&super::NodePressure {
        demand_m: 500.0,
        usage_m: 500.0,
        wait_m: 0.0,
        capacity: MilliCpu(2000),
    });
    // A stall counter that went backwards (a reset) adds nothing.
    m.add_node_cpu_pressure(-1.0);
    let e = scrape(&m);
    assert_eq!(e.value("mbcas_node_unmet_demand_cores", &[]), Some(0.0));
    assert_eq!(e.value("mbcas_node_pressure_ratio", &[]), Some(0.25));
    assert_eq!(
        e.value("mbcas_node_cpu_pressure_seconds_total", &[]),
        Some(0.0)
    );
    // No capacity at all: a finite ratio, the demand in millicores.
    m.set_node_pressure(&super::NodePressure {
        demand_m: 300.0,
        capacity: MilliCpu(0),
        ..super::NodePressure::default()
    });
    assert_eq!(
        scrape(&m).value("mbcas_node_pressure_ratio", &[]),
        Some(300.0)
    );
}
