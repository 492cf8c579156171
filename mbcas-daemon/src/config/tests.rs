use clap::{CommandFactory as _, Parser};

use super::*;

#[derive(Debug, Parser)]
#[command(name = "run")]
struct Harness {
    #[command(flatten)]
    args: DecisionArgs,
}

fn parse(args: &[&str]) -> Result<DecisionArgs, clap::Error> {
    Harness::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|h| h.args)
}

fn config(args: &[&str]) -> Result<DecisionConfig, ConfigError> {
    parse(args).unwrap().validate()
}

#[test]
fn harness_is_consistent() {
    Harness::command().debug_assert();
}

/// CI runs with a clean environment for these variables; a developer's shell
/// that sets one would change what defaults mean, so say so instead of failing
/// obscurely.
fn assert_no_mbcas_env() {
    let set: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("MBCAS_") && k != "MBCAS_LOG_LEVEL" && k != "MBCAS_LOG_FORMAT")
        // The control-plane test environment (`cargo xtask testenv`), not a daemon flag.
        .filter(|k| !k.starts_with("MBCAS_TESTENV_"))
        .collect();
    assert!(set.is_empty(), "unset {set:?} to run the default tests");
}

#[test]
fn defaults_are_the_documented_ones() {
    assert_no_mbcas_env();
    let c = config(&[]).unwrap();
    assert_eq!(c.tick, Duration::from_secs(1));
    assert_eq!(c.debounce, Duration::from_millis(200));
    assert_eq!(
        c.market,
        MarketConfig {
            overcommit: 3.0,
            min_limit: MilliCpu(100),
            node_reserve: 0.10,
            cap_factor: None,
        }
    );
    // The CLI defaults are the core's defaults.
    assert_eq!(c.policy, PolicyConfig::default());
    assert_eq!(c.demand, DemandConfig::default());
    assert_eq!(
        c.excluded_namespaces
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["kube-system", "mbcas-system"]
    );
    assert!(c.is_excluded_namespace("mbcas-system"));
    assert!(!c.is_excluded_namespace("default"));
    assert_eq!(c.metrics_addr, "0.0.0.0:9090".parse().unwrap());
}

#[test]
fn every_flag_is_parsed_into_the_typed_config() {
    let c = config(&[
        "--tick",
        "500ms",
        "--debounce",
        "50ms",
        "--min-limit",
        "0.25",
        "--overcommit",
        "1.5",
        "--node-reserve",
        "0.2",
        "--cap-factor",
        "3",
        "--hysteresis",
        "5%",
        "--max-step-up",
        "2",
        "--max-step-down",
        "0.25",
        "--cooldown",
        "1m",
        "--max-cooldown",
        "1h",
        "--warmup-samples",
        "9",
        "--throttled-threshold",
        "1%",
        "--alpha-up",
        "1",
        "--alpha-down",
        "0.05",
        "--headroom",
        "50%",
        "--excluded-namespaces",
        "kube-system,monitoring",
        "--daemon-namespace",
        "ops",
        "--metrics-addr",
        "127.0.0.1:9100",
    ])
    .unwrap();
    assert_eq!(c.tick, Duration::from_millis(500));
    assert_eq!(c.debounce, Duration::from_millis(50));
    assert_eq!(c.market.min_limit, MilliCpu(250));
    assert_eq!(c.market.overcommit, 1.5);
    assert_eq!(c.market.node_reserve, 0.2);
    assert_eq!(c.market.cap_factor, Some(3.0));
    assert_eq!(
        c.policy,
        PolicyConfig {
            hysteresis: 0.05,
            max_step_up: 2.0,
            max_step_down: 0.25,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(3600),
            warmup_samples: 9,
            throttled_threshold: 0.01,
        }
    );
    assert_eq!(
        c.demand,
        DemandConfig {
            alpha_up: 1.0,
            alpha_down: 0.05,
            headroom: 0.5,
            window_s: 0.5,
        }
    );
    assert_eq!(
        c.excluded_namespaces
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["kube-system", "monitoring", "ops"]
    );
    assert_eq!(c.metrics_addr.port(), 9100);
}

#[test]
fn bad_values_are_rejected_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (&["--alpha-up", "0"], "--alpha-up: 0 (must be in (0, 1])"),
        (&["--alpha-up", "1.5"], "--alpha-up: 1.5"),
        (&["--alpha-down", "-0.1"], "--alpha-down"),
        (
            &["--max-step-up", "1"],
            "--max-step-up: 1 (must be a finite number > 1)",
        ),
        (&["--max-step-up", "0.8"], "--max-step-up"),
        (&["--max-step-down", "1"], "--max-step-down"),
        (&["--max-step-down", "0"], "--max-step-down"),
        (&["--hysteresis", "100%"], "--hysteresis"),
        (&["--node-reserve", "1"], "--node-reserve"),
        (
            &["--overcommit", "0.9"],
            "--overcommit: 0.9 (must be in [1, 100])",
        ),
        (
            &["--cap-factor", "0.5"],
            "--cap-factor: 0.5 (must be 0 (off) or ≥ 1)",
        ),
        (&["--min-limit", "5m"], "--min-limit: 5m"),
        (&["--tick", "1ms"], "--tick"),
        (
            &["--tick", "1s", "--debounce", "2s"],
            "--debounce: 2s (must be at most --tick)",
        ),
        (
            &["--cooldown", "5m", "--max-cooldown", "1m"],
            "--max-cooldown",
        ),
        (&["--throttled-threshold", "150%"], "--throttled-threshold"),
        (&["--headroom", "-5%"], "--headroom"),
        (
            &["--excluded-namespaces", "kube-system,Bad_NS"],
            "--excluded-namespaces: \"Bad_NS\"",
        ),
        (&["--excluded-namespaces", ""], "--excluded-namespaces"),
        (&["--daemon-namespace=-x"], "--daemon-namespace"),
    ];
    for (args, want) in cases {
        let err = config(args)
            .err()
            .unwrap_or_else(|| panic!("{args:?} accepted"));
        assert_eq!(err.exit_code(), 64);
        let msg = err.to_string();
        assert!(msg.contains(want), "{args:?}: {msg:?} lacks {want:?}");
    }
}

#[test]
fn unparsable_values_are_clap_errors_naming_the_flag() {
    for (args, flag) in [
        (["--tick", "fast"], "--tick"),
        (["--min-limit", "lots"], "--min-limit"),
        (["--node-reserve", "ten"], "--node-reserve"),
        (["--overcommit", "lots"], "--overcommit"),
        (["--metrics-addr", "localhost"], "--metrics-addr"),
        (["--warmup-samples", "-1"], "--warmup-samples"),
    ] {
        let err = parse(&args)
            .err()
            .unwrap_or_else(|| panic!("{args:?} accepted"));
        assert!(
            matches!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation | clap::error::ErrorKind::InvalidValue
            ),
            "{args:?}: {:?}",
            err.kind()
        );
        assert!(err.to_string().contains(flag), "{err}");
    }
}

#[test]
fn every_flag_has_an_mbcas_env_fallback_and_a_default() {
    let cmd = Harness::command();
    let mut n = 0;
    for arg in cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some_and(|l| l != "help"))
    {
        let long = arg.get_long().unwrap_or_default();
        let want = format!("MBCAS_{}", long.to_uppercase().replace('-', "_"));
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(want.as_str()),
            "--{long}"
        );
        assert!(
            !arg.get_default_values().is_empty(),
            "--{long} has no default"
        );
        assert!(arg.get_help().is_some(), "--{long} has no help");
        n += 1;
    }
    assert_eq!(n, 19, "flag count changed: update this test and the README");
}

#[test]
fn help_documents_defaults() {
    let help = Harness::command().render_long_help().to_string();
    for s in [
        "[env: MBCAS_TICK=]",
        "[default: 1s]",
        "[default: 200ms]",
        "[default: 100m]",
        "[default: 10%]",
        "[default: 30s]",
        "[default: 0.3]",
        "[default: kube-system]",
        "[default: 0.0.0.0:9090]",
        "[default: 3]",
        "[default: 5%]",
        "Stability:",
        "Demand model:",
    ] {
        assert!(help.contains(s), "help lacks {s:?}:\n{help}");
    }
}

#[test]
fn value_parsers() {
    assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("4m"), Ok(Duration::from_secs(240)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("1d").is_err());
    assert!(parse_duration("NaNs").is_err());
    assert_eq!(parse_cpu("100m"), Ok(MilliCpu(100)));
    assert_eq!(parse_cpu("1.5"), Ok(MilliCpu(1500)));
    assert_eq!(parse_cpu("2"), Ok(MilliCpu(2000)));
    // Kubernetes rounds sub-millicore amounts up (Quantity.MilliValue()).
    assert_eq!(parse_cpu("1.5m"), Ok(MilliCpu(2)));
    assert!(parse_cpu("-1").is_err());
    assert_eq!(parse_fraction("10%"), Ok(0.1));
    assert_eq!(parse_fraction("0.25"), Ok(0.25));
    assert!(parse_fraction("inf").is_err());
    assert!(parse_fraction("%").is_err());
}

#[test]
fn cap_follows_the_factor_within_floor_and_capacity() {
    let mut m = config(&[]).unwrap().market;
    assert_eq!(
        m.cap(MilliCpu(500), MilliCpu(100), MilliCpu(4000)),
        MilliCpu(4000)
    );
    m.cap_factor = Some(2.0);
    assert_eq!(
        m.cap(MilliCpu(500), MilliCpu(100), MilliCpu(4000)),
        MilliCpu(1000)
    );
    assert_eq!(
        m.cap(MilliCpu(3000), MilliCpu(100), MilliCpu(4000)),
        MilliCpu(4000)
    );
    assert_eq!(
        m.cap(MilliCpu(50), MilliCpu(200), MilliCpu(4000)),
        MilliCpu(200)
    );
}
