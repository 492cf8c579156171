//! Every shipped scenario parses and runs under every policy (the HPA ones
//! leave a scenario without services as static leaves it).

use mbcas::sim::{policies, run_policy, scenario::Scenario};

#[test]
fn shipped_scenarios_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let s = Scenario::from_file(&path).unwrap();
        for p in policies::EVERY {
            let m = run_policy(&s, p, 1).unwrap_or_else(|| panic!("{p} unknown"));
            assert!(m.pods > 0, "{}: {p}: no pods", path.display());
            assert!(
                (0.0..=1.0).contains(&m.throttled_ratio_p99),
                "{}: {p}: {m:?}",
                path.display()
            );
            assert!(
                m.jain > 0.0 && m.jain <= 1.0 + 1e-9,
                "{}: {p}: {m:?}",
                path.display()
            );
            assert!(
                (0.0..=100.0 + 1e-9).contains(&m.psi_some_pct)
                    && (0.0..=100.0 + 1e-9).contains(&m.psi_some_avg10_p99)
                    && (0.0..=100.0 + 1e-9).contains(&m.cpu_util_node_pct)
                    && m.reaction_censored <= m.reaction_steps,
                "{}: {p}: {m:?}",
                path.display()
            );
        }
        n += 1;
    }
    assert_eq!(n, 16, "sixteen scenarios ship under scenarios/");
}

#[test]
fn bad_scenario_exits_2_naming_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.json");
    std::fs::write(
        &f,
        "{\"name\": \"x\",\n \"duration_s\": -5,\n \"nodes\": []}",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mbcas"))
        .args(["simulate", "--scenario"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("duration_s"));
    std::fs::write(
        &f,
        "{\"name\": \"x\",\n \"duration_s\": 5,\n \"nodes\": [{\"name\": 3}]}",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mbcas"))
        .args(["simulate", "--scenario"])
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("nodes[0].name") && err.contains("line 3"),
        "{err}"
    );
}
