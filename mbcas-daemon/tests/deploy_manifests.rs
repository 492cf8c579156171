//! `deploy/` stays true: every YAML parses, the Kubernetes objects deserialize
//! into their API types, and the DaemonSet has what the daemon needs.
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // Prometheus's rules and their tests, not Kubernetes manifests
            // (promtool checks them); the Helm chart's templates (helm lint
            // and `cargo xtask helm-check` render and check them); the
            // descheduler's policies (a_descheduler_policy_per_node_score).
            if path
                .file_name()
                .is_some_and(|n| n == "prometheus" || n == "helm" || n == "descheduler")
            {
                continue;
            }
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
}

/// Every document of every YAML file under deploy/, by file name.
fn documents() -> BTreeMap<String, Vec<Value>> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    files
        .iter()
        .map(|path| {
            let text =
                std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            let rel = path
                .strip_prefix(deploy_dir())
                .unwrap_or(path)
                .display()
                .to_string();
            (rel, docs)
        })
        .collect()
}

fn one<'a>(docs: &'a BTreeMap<String, Vec<Value>>, file: &str) -> &'a Value {
    match docs.get(file).map(Vec::as_slice) {
        Some([doc]) => doc,
        other => panic!("{file}: expected one document, got {other:?}"),
    }
}

#[test]
fn every_yaml_parses_and_names_its_kind() {
    let docs = documents();
    for name in ["namespace.yaml", "daemonset.yaml", "kind-config.yaml"] {
        assert!(docs.contains_key(name), "deploy/{name} missing");
    }
    for (file, list) in &docs {
        assert!(!list.is_empty(), "{file} has no document");
        for doc in list {
            for field in ["apiVersion", "kind"] {
                assert!(
                    doc[field].as_str().is_some_and(|s| !s.is_empty()),
                    "{file}: a document without {field}"
                );
            }
        }
    }
}

#[test]
fn daemonset_runs_in_the_namespace_with_host_access_and_probes() {
    let docs = documents();
    let ns: Namespace = serde_json::from_value(one(&docs, "namespace.yaml").clone())
        .unwrap_or_else(|e| panic!("namespace.yaml: {e}"));
    let ns_name = ns.metadata.name.unwrap_or_default();
    assert_eq!(ns_name, "mbcas-system");

    let ds: DaemonSet = serde_json::from_value(one(&docs, "daemonset.yaml").clone())
        .unwrap_or_else(|e| panic!("daemonset.yaml is not a DaemonSet: {e}"));
    assert_eq!(ds.metadata.namespace.as_deref(), Some(ns_name.as_str()));
    let spec = ds.spec.expect("no spec");
    let pod = spec.template.spec.expect("no pod spec");
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.unwrap_or_default() {
        assert_eq!(
            labels.get(&k),
            Some(&v),
            "selector {k}={v} does not match the template"
        );
    }
    assert!(
        pod.tolerations
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must tolerate every taint to run on every node"
    );
    assert!(pod.service_account_name.is_some_and(|s| !s.is_empty()));

    let [c] = pod.containers.as_slice() else {
        panic!("expected one container");
    };
    let env: BTreeMap<&str, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let node_name = env
        .get("MBCAS_NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node_name,
        Some("spec.nodeName"),
        "node name from the downward API"
    );
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--node-name" && w[1] == "$(MBCAS_NODE_NAME)"),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--mode" && w[1] == "kubernetes")
    );

    let port = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("no metrics port");
    let addr = env
        .get("MBCAS_METRICS_ADDR")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| "0.0.0.0:9090".into());
    assert!(
        addr.ends_with(&format!(":{}", port.container_port)),
        "{addr}"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no {path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
    }
    let res = c.resources.as_ref().expect("no resources");
    assert!(
        res.requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
    );
    assert!(
        res.limits
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );

    let volumes: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.clone(), m.name.clone()))
        .collect();
    for host in ["/sys/fs/cgroup", "/sys/kernel/btf", "/sys/fs/bpf"] {
        let vol = mounts
            .get(host)
            .unwrap_or_else(|| panic!("{host} not mounted"));
        assert_eq!(volumes.get(vol).map(String::as_str), Some(host), "{host}");
    }
    let sc = c.security_context.as_ref().expect("no securityContext");
    assert_eq!(
        sc.privileged,
        Some(true),
        "privileged (see the comment in daemonset.yaml)"
    );
}

#[test]
fn kind_config_pins_a_node_image_with_in_place_resize() {
    let docs = documents();
    let cfg = one(&docs, "kind-config.yaml");
    assert_eq!(cfg["kind"], "Cluster");
    let nodes = cfg["nodes"].as_array().expect("no nodes");
    assert!(nodes.iter().any(|n| n["role"] == "control-plane"));
    for n in nodes {
        let image = n["image"].as_str().expect("node without image");
        assert!(
            image.starts_with("kindest/node:v1.35."),
            "{image}: in-place resize needs Kubernetes 1.35"
        );
    }
}

/// Files a kustomization (recursively) lists as resources.
fn kustomized(dir: &Path, out: &mut Vec<PathBuf>) {
    let path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let k: Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(k["kind"], "Kustomization", "{}", path.display());
    for r in k["resources"].as_array().into_iter().flatten() {
        let r = r
            .as_str()
            .unwrap_or_else(|| panic!("{}: non-string resource", path.display()));
        let p = dir.join(r);
        if p.is_dir() {
            kustomized(&p, out);
        } else {
            assert!(
                p.is_file(),
                "{}: resource {r} does not exist",
                path.display()
            );
            out.push(p.canonicalize().unwrap_or_else(|e| panic!("{r}: {e}")));
        }
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let dir = deploy_dir();
    let mut listed = Vec::new();
    kustomized(&dir, &mut listed);
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "kustomization.yaml" || name == "kind-config.yaml" {
            continue;
        }
        let f = f
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            listed.contains(&f),
            "{} is not in deploy/kustomization.yaml",
            f.display()
        );
    }
}

/// Every `MBCAS_*` variable the DaemonSet sets is one a flag of `mbcas run`
/// reads, and its value is accepted: the command line together with the
/// environment (turned into the flags they stand for) parses and validates.
/// (`deploy_args.rs` checks the command line alone.)
#[test]
fn daemonset_environment_is_read_by_the_cli() {
    use clap::{CommandFactory as _, Parser as _};
    use mbcas::cli::{Cli, Command};

    let docs = documents();
    let ds: DaemonSet = serde_json::from_value(one(&docs, "daemonset.yaml").clone()).unwrap();
    let pod = ds.spec.and_then(|s| s.template.spec).expect("no pod spec");
    let c = &pod.containers[0];

    // What the kubelet would put in each variable.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()),
        ) {
            (Some(v), _) => v.clone(),
            (None, Some(f)) if f.field_path == "spec.nodeName" => "kind-worker".into(),
            (None, Some(f)) if f.field_path == "metadata.namespace" => {
                ds.metadata.namespace.clone().unwrap_or_default()
            }
            (None, Some(f)) if f.field_path == "metadata.name" => "mbcas-x7k2p".into(),
            _ => panic!("env {}: unsupported source", e.name),
        };
        env.push((e.name.clone(), value));
    }
    // $(VAR) references in args, as the kubelet expands them.
    let mut args: Vec<String> = vec!["mbcas".into()];
    for a in c.args.iter().flatten() {
        let mut a = a.clone();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        assert!(!a.contains("$("), "unexpanded reference in {a}");
        args.push(a);
    }
    // Every MBCAS_* variable must be one the CLI reads; pass it as its flag.
    let cmd = Cli::command();
    let run = cmd
        .find_subcommand("run")
        .expect("mbcas has no run subcommand");
    let flags: Vec<(String, String)> = cmd
        .get_arguments()
        .chain(run.get_arguments())
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    for (k, v) in &env {
        if !k.starts_with("MBCAS_") {
            continue;
        }
        let (_, long) = flags.iter().find(|(e, _)| e == k).unwrap_or_else(|| {
            panic!("daemonset.yaml sets {k}, which no flag of `mbcas run` reads")
        });
        // A flag on the command line wins over its variable, as in clap.
        if !args.iter().any(|a| a == &format!("--{long}")) {
            args.push(format!("--{long}={v}"));
        }
    }
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("{args:?} is not `mbcas run`");
    };
    assert_eq!(run.mode, mbcas::run::Mode::Kubernetes);
    assert_eq!(run.kubernetes.node_name.as_deref(), Some("kind-worker"));
    let cfg = run.decision.validate().unwrap();
    assert!(cfg.is_excluded_namespace("mbcas-system"));
    assert_eq!(cfg.metrics_addr.port(), 9090);
}

/// The committed CRD is exactly what `mbcas crd` prints; regenerate with
/// `cargo run -p mbcas-daemon -- crd > deploy/crds/podallocations.allocation.mbcas.io.yaml`.
#[test]
fn committed_crd_matches_the_rust_types() {
    let path = deploy_dir().join("crds/podallocations.allocation.mbcas.io.yaml");
    let committed =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let generated = mbcas::k8s::crd::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "{} drifted from the Rust types; regenerate it with `mbcas crd`",
        path.display()
    );
}

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/mbcas")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The chart carries copies of the CRD and the alerting rules (Helm reads
/// only files inside the chart): they are the files of deploy/, and its
/// appVersion is the workspace's version.
#[test]
fn helm_chart_copies_match_deploy() {
    for (copy, original) in [
        (
            "crds/podallocations.allocation.mbcas.io.yaml",
            "crds/podallocations.allocation.mbcas.io.yaml",
        ),
        ("files/mbcas-rules.yaml", "prometheus/mbcas-rules.yaml"),
        (
            "files/mbcas-scoring-rules.yaml",
            "prometheus/mbcas-scoring-rules.yaml",
        ),
    ] {
        assert!(
            read(&chart_dir().join(copy)) == read(&deploy_dir().join(original)),
            "deploy/helm/mbcas/{copy} differs from deploy/{original}: copy it again"
        );
    }
    let chart: Value = serde_saphyr::from_str(&read(&chart_dir().join("Chart.yaml"))).unwrap();
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

/// `config.fooBar` in the chart's values ↔ `mbcas run --foo-bar`: every
/// decision flag of `mbcas run` has a value (the template passes it as the
/// flag's MBCAS_* variable), the schema lists exactly those, and no value
/// names a flag that does not exist.
#[test]
fn helm_values_name_every_decision_flag() {
    use clap::CommandFactory as _;
    // Set by the chart otherwise (downward API, log, metrics and state
    // values), or not for Kubernetes mode.
    const NOT_CONFIG: &[&str] = &[
        "mode",
        "node-name",
        "daemon-namespace",
        "lease-identity",
        "metrics-addr",
        "log-level",
        "log-format",
        "kubeconfig",
        "local-root",
        "capacity-millicores",
        "on-exit",
        "report-jsonl",
        "test-pod-cgroups",
        // The chart's `stateDir` (a hostPath it mounts).
        "state-file",
        "help",
    ];
    let cmd = mbcas::cli::Cli::command();
    let run = cmd.find_subcommand("run").expect("no `mbcas run`");
    let mut flags: Vec<(String, String)> = run
        .get_arguments()
        .filter_map(|a| Some((a.get_long()?.to_owned(), a)))
        .filter(|(long, _)| !NOT_CONFIG.contains(&long.as_str()))
        .map(|(long, a)| {
            let env = a
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no MBCAS_* variable"))
                .to_string_lossy()
                .into_owned();
            let camel: String = long
                .split('-')
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        w.to_owned()
                    } else {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| f.to_uppercase().chain(c).collect())
                            .unwrap_or_default()
                    }
                })
                .collect();
            (camel, env)
        })
        .collect();
    flags.sort();
    let values: Value = serde_saphyr::from_str(&read(&chart_dir().join("values.yaml"))).unwrap();
    let schema: Value =
        serde_json::from_str(&read(&chart_dir().join("values.schema.json"))).unwrap();
    let mut in_values: Vec<String> = values["config"]
        .as_object()
        .expect("values.yaml has no config")
        .keys()
        .cloned()
        .collect();
    in_values.sort();
    let mut in_schema: Vec<String> = schema["properties"]["config"]["properties"]
        .as_object()
        .expect("the schema has no config")
        .keys()
        .cloned()
        .collect();
    in_schema.sort();
    let names: Vec<String> = flags.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(in_values, names, "values.yaml config vs `mbcas run` flags");
    assert_eq!(
        in_schema, names,
        "values.schema.json config vs `mbcas run` flags"
    );
    // The template turns a key into MBCAS_<SNAKE_CASE>: it must be the flag's.
    for (camel, env) in &flags {
        let snake: String = camel
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c]
                } else {
                    vec![c.to_ascii_uppercase()]
                }
            })
            .collect();
        assert_eq!(format!("MBCAS_{snake}"), *env, "config.{camel}");
    }
}

/// deploy/descheduler holds one DeschedulerPolicy per node score of
/// deploy/prometheus/mbcas-scoring-rules.yaml, and nothing else: each runs
/// LowNodeUtilization on that score from Prometheus, with thresholds keyed by
/// `MetricResource` alone (the only key the descheduler takes with a metrics
/// source), DaemonSet and system namespaces left alone.
#[test]
fn a_descheduler_policy_per_node_score() {
    let rules = read(&deploy_dir().join("prometheus/mbcas-scoring-rules.yaml"));
    let scores: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: mbcas:node_score:"))
        .collect();
    assert!(scores.len() >= 18, "only {} node scores", scores.len());
    let dir = deploy_dir().join("descheduler");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut want: Vec<String> = scores
        .iter()
        .map(|s| format!("{}.yaml", s.replace('_', "-")))
        .collect();
    want.sort();
    assert_eq!(
        files, want,
        "deploy/descheduler/ and the node scores differ"
    );
    for score in &scores {
        let file = format!("{}.yaml", score.replace('_', "-"));
        let p: Value = serde_saphyr::from_str(&read(&dir.join(&file))).unwrap();
        assert_eq!(p["apiVersion"], "descheduler/v1alpha2", "{file}");
        assert_eq!(p["kind"], "DeschedulerPolicy", "{file}");
        assert_eq!(p["metricsProviders"][0]["source"], "Prometheus", "{file}");
        let profiles = p["profiles"].as_array().unwrap();
        assert_eq!(profiles.len(), 1, "{file}");
        let profile = &profiles[0];
        assert_eq!(
            profile["plugins"]["balance"]["enabled"],
            serde_json::json!(["LowNodeUtilization"]),
            "{file}"
        );
        assert_eq!(
            profile["plugins"]["filter"]["enabled"],
            serde_json::json!(["DefaultEvictor"]),
            "{file}"
        );
        let args = &profile["pluginConfig"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "LowNodeUtilization")
            .unwrap_or_else(|| panic!("{file}: no LowNodeUtilization args"))["args"];
        let m = &args["metricsUtilization"];
        assert_eq!(m["source"], "Prometheus", "{file}");
        assert_eq!(
            m["prometheus"]["query"],
            format!("mbcas:node_score:{score}"),
            "{file}"
        );
        for key in ["thresholds", "targetThresholds"] {
            let t = args[key].as_object().unwrap();
            assert_eq!(
                t.keys().collect::<Vec<_>>(),
                ["MetricResource"],
                "{file}: {key}"
            );
            let v = t["MetricResource"].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{file}: {key} {v}");
        }
        let excluded = args["evictableNamespaces"]["exclude"].as_array().unwrap();
        for ns in ["kube-system", "mbcas-system"] {
            assert!(excluded.iter().any(|e| e == ns), "{file}: {ns} evictable");
        }
    }
}
