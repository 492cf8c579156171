//! The Helm chart, `deploy/helm/mbcas/`: helm built from its Go module and
//! cached like the control-plane binaries, and `cargo xtask helm-check`:
//! `helm lint --strict`, the values schema refusing a misspelt value, and the
//! chart's rendered objects compared with `kubectl kustomize deploy/` (equal
//! with the default values apart from Helm's own labels and the uninstall
//! hook; each value changes what it says and nothing else). The node tier
//! installs and uninstalls the chart on the real node (`crate::e2e`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    e2e::run,
    testenv::{Binaries, cache_dir},
};

/// Helm 4, built from its Go module.
pub const HELM_VERSION: &str = "v4.3.2";
const HELM_MODULE: &str = "helm.sh/helm/v4";
/// The release name that gives the objects deploy/'s names.
pub const RELEASE: &str = "mbcas";
pub const NAMESPACE: &str = "mbcas-system";

/// The labels Helm's templates add and deploy/ does not have.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

/// `~/.cache/mbcas/bin/helm-<version>`.
pub fn binary() -> PathBuf {
    cache_dir().join("bin").join(format!("helm-{HELM_VERSION}"))
}

/// Builds helm when it is not cached yet.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let bin = binary();
    if bin.is_file() {
        eprintln!("setup: helm {HELM_VERSION} cached");
        return Ok(bin);
    }
    crate::testenv::build_go_tool(
        "helm",
        HELM_MODULE,
        HELM_VERSION,
        &format!("{HELM_MODULE}/cmd/helm"),
        &format!("-X {HELM_MODULE}/internal/version.version={HELM_VERSION}"),
        &bin,
    )?;
    Ok(bin)
}

pub fn chart_dir() -> PathBuf {
    crate::testenv::workspace_root().join("deploy/helm/mbcas")
}

/// helm, with its configuration and caches under ours (nothing in `~/.config`).
pub fn helm() -> anyhow::Result<Command> {
    let bin = binary();
    let mut cmd = Command::new(if bin.is_file() { bin } else { ensure()? });
    let home = cache_dir().join("helm");
    cmd.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    Ok(cmd)
}

/// The documents of a multi-document YAML stream (empty ones dropped).
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("not valid YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// `helm template` of the chart with `values` (a values file, as JSON).
pub fn render(values: &Value) -> anyhow::Result<Vec<Value>> {
    let file = values_file("render", values)?;
    let yaml = run(helm()?
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE, "--include-crds", "-f"])
        .arg(&file))?;
    documents(&yaml).context("helm template's output")
}

/// Writes `values` (JSON is YAML) where helm can read it.
pub fn values_file(name: &str, values: &Value) -> anyhow::Result<PathBuf> {
    let dir = crate::testenv::workspace_root().join("target/helm");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let file = dir.join(format!("{name}.values.json"));
    std::fs::write(&file, serde_json::to_string_pretty(values)?)
        .with_context(|| format!("write {}", file.display()))?;
    Ok(file)
}

fn kustomize(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let yaml = run(Command::new(Binaries::cached().kubectl)
        .arg("kustomize")
        .arg(dir))?;
    documents(&yaml).context("kubectl kustomize's output")
}

/// `Kind namespace/name` of an object.
fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{} {}/{}",
        obj["kind"].as_str().unwrap_or("?"),
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or("?")
    )
}

fn is_hook(obj: &Value) -> bool {
    obj["metadata"]["annotations"]["helm.sh/hook"].is_string()
}

/// The objects by key, without Helm's labels; hooks left out.
fn by_key(objs: &[Value]) -> BTreeMap<String, Value> {
    let strip = |labels: &mut Value| {
        if let Some(m) = labels.as_object_mut() {
            for l in HELM_LABELS {
                m.remove(l);
            }
        }
    };
    objs.iter()
        .filter(|o| !is_hook(o))
        .map(|o| {
            let mut o = o.clone();
            strip(&mut o["metadata"]["labels"]);
            if o["spec"]["template"]["metadata"]["labels"].is_object() {
                strip(&mut o["spec"]["template"]["metadata"]["labels"]);
            }
            (key(&o), o)
        })
        .collect()
}

/// Where `a` and `b` differ, as `path: a → b` lines.
fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                diff(&format!("{path}/{k}"), va, vb, out);
            }
        }
        // Element by element; a missing element is null.
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let (va, vb) = (
                    x.get(i).unwrap_or(&Value::Null),
                    y.get(i).unwrap_or(&Value::Null),
                );
                diff(&format!("{path}/{i}"), va, vb, out);
            }
        }
        // kustomize writes 0.0 as 0: a number is its value.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} → {b}")),
    }
}

/// Every difference between two sets of objects (`helm`, `kustomize`).
pub fn compare(helm: &[Value], kustomize: &[Value]) -> Vec<String> {
    let (h, k) = (by_key(helm), by_key(kustomize));
    let mut out = Vec::new();
    for name in h.keys().filter(|n| !k.contains_key(*n)) {
        out.push(format!("{name}: rendered by the chart, not in deploy/"));
    }
    for name in k.keys().filter(|n| !h.contains_key(*n)) {
        out.push(format!("{name}: in deploy/, not rendered by the chart"));
    }
    for (name, obj) in &h {
        if let Some(other) = k.get(name) {
            let mut d = Vec::new();
            diff("", other, obj, &mut d);
            out.extend(d.into_iter().map(|l| format!("{name} {l}")));
        }
    }
    out
}

/// The values that make the chart render deploy/ (the namespace included).
fn as_deploy() -> Value {
    json!({"namespace": {"create": true}})
}

/// `cargo xtask helm-check`.
pub fn check() -> anyhow::Result<()> {
    let chart = chart_dir();
    eprintln!("helm-check: helm lint --strict {}", chart.display());
    let all_on = values_file(
        "lint",
        &json!({"namespace": {"create": true}, "serviceMonitor": {"enabled": true},
                "prometheusRule": {"enabled": true}, "config": {"tick": "2s"}}),
    )?;
    run(helm()?.args(["lint", "--strict"]).arg(&chart))?;
    run(helm()?
        .args(["lint", "--strict"])
        .arg(&chart)
        .arg("-f")
        .arg(&all_on))?;
    refuses_misspelt_values()?;
    let deploy = crate::testenv::workspace_root().join("deploy");
    let kust = kustomize(&deploy)?;
    let rendered = render(&as_deploy())?;
    let d = compare(&rendered, &kust);
    if !d.is_empty() {
        bail!(
            "the chart's default objects differ from `kubectl kustomize deploy/`:\n  {}",
            d.join("\n  ")
        );
    }
    eprintln!(
        "helm-check: ok: the chart renders the {} objects of deploy/ (Helm's labels aside)",
        kust.len()
    );
    check_hook(&rendered)?;
    check_values(&kust)?;
    check_rule_objects()?;
    println!("helm-check: 5 passed, 0 failed");
    Ok(())
}

/// `prometheusRule.enabled` renders the alerting rules and the node scores
/// as two PrometheusRules whose groups are deploy/prometheus's files;
/// `nodeScores: false` leaves the scores out.
fn check_rule_objects() -> anyhow::Result<()> {
    let dir = crate::testenv::workspace_root().join("deploy/prometheus");
    let groups = |file: &str| -> anyhow::Result<Value> {
        let path = dir.join(file);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let doc: Value = serde_saphyr::from_str(&text)
            .with_context(|| format!("{} is not YAML", path.display()))?;
        Ok(doc["groups"].clone())
    };
    let rules = |values: &Value| -> anyhow::Result<Vec<Value>> {
        Ok(render(values)?
            .into_iter()
            .filter(|o| o["kind"] == "PrometheusRule")
            .map(|o| o["spec"]["groups"].clone())
            .collect())
    };
    let want = vec![
        groups("mbcas-rules.yaml")?,
        groups("mbcas-scoring-rules.yaml")?,
    ];
    let got = rules(&json!({"prometheusRule": {"enabled": true}}))?;
    if got != want {
        bail!(
            "prometheusRule.enabled rendered {} PrometheusRules, not deploy/prometheus's alerting rules and node scores",
            got.len()
        );
    }
    let without = rules(&json!({"prometheusRule": {"enabled": true, "nodeScores": false}}))?;
    if without != want[..1] {
        bail!(
            "prometheusRule.nodeScores=false rendered {} PrometheusRules, not the alerting rules alone",
            without.len()
        );
    }
    eprintln!(
        "helm-check: ok: prometheusRule renders the alerting rules and the node scores (nodeScores: false, the alerts alone)"
    );
    Ok(())
}

/// The schema refuses a misspelt decision flag rather than ignoring it.
fn refuses_misspelt_values() -> anyhow::Result<()> {
    let file = values_file("misspelt", &json!({"config": {"tik": "2s"}}))?;
    let out = helm()?
        .args(["template", RELEASE])
        .arg(chart_dir())
        .arg("-f")
        .arg(&file)
        .output()
        .context("run helm template")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !stderr.contains("tik") {
        bail!("helm template accepted config.tik (a misspelt --tick) or did not name it: {stderr}");
    }
    eprintln!("helm-check: ok: the values schema refuses config.tik");
    Ok(())
}

/// The pre-delete hook stops this release's DaemonSet and restores.
fn check_hook(rendered: &[Value]) -> anyhow::Result<()> {
    let job = rendered
        .iter()
        .find(|o| o["kind"] == "Job" && is_hook(o))
        .context("the chart has no hook Job")?;
    let ann = &job["metadata"]["annotations"];
    let args = &job["spec"]["template"]["spec"]["containers"][0]["args"];
    let want = json!([
        "restore",
        "--all",
        "--stop-daemonset",
        format!("{NAMESPACE}/{RELEASE}"),
        "--stop-timeout",
        "2m"
    ]);
    if ann["helm.sh/hook"] != "pre-delete" || *args != want {
        bail!("the uninstall hook is not `mbcas restore` at pre-delete: {ann} {args}");
    }
    eprintln!("helm-check: ok: a pre-delete Job runs {args}");
    Ok(())
}

/// Values change the objects exactly where they say, nothing else.
fn check_values(kust: &[Value]) -> anyhow::Result<()> {
    let mut values = as_deploy();
    values["image"] = json!({"repository": "registry.example/mbcas", "tag": "1.2.3"});
    values["resources"] = json!({"requests": {"cpu": "100m", "memory": "64Mi"},
                                 "limits": {"memory": "128Mi"}});
    values["config"] = json!({"tick": "2s", "overcommit": 2, "priorityWeighting": true});
    values["nodeSelector"] = json!({"pool": "general"});
    values["tolerations"] = json!([]);
    values["metrics"] = json!({"port": 9100});
    let rendered = render(&values)?;
    let mut got = compare(&rendered, kust);
    got.sort();
    let ds = "DaemonSet mbcas-system/mbcas /spec/template";
    let c = format!("{ds}/spec/containers/0");
    // Indices into the container's env: NODE_NAME, DAEMON_NAMESPACE,
    // LEASE_IDENTITY, LOG_FORMAT, LOG_LEVEL, METRICS_ADDR, then the config.
    let mut want = vec![
        format!("{ds}/metadata/annotations/prometheus.io/port: \"9090\" → \"9100\""),
        format!("{c}/env/5/value: \"0.0.0.0:9090\" → \"0.0.0.0:9100\""),
        format!("{c}/env/6: null → {{\"name\":\"MBCAS_OVERCOMMIT\",\"value\":\"2\"}}"),
        format!("{c}/env/7: null → {{\"name\":\"MBCAS_PRIORITY_WEIGHTING\",\"value\":\"true\"}}"),
        format!("{c}/env/8: null → {{\"name\":\"MBCAS_TICK\",\"value\":\"2s\"}}"),
        format!("{c}/image: \"mbcas:dev\" → \"registry.example/mbcas:1.2.3\""),
        format!("{c}/ports/0/containerPort: 9090 → 9100"),
        format!("{c}/resources/limits/memory: \"256Mi\" → \"128Mi\""),
        format!("{c}/resources/requests/cpu: \"50m\" → \"100m\""),
        format!("{ds}/spec/nodeSelector: null → {{\"pool\":\"general\"}}"),
        format!("{ds}/spec/tolerations: [{{\"operator\":\"Exists\"}}] → null"),
    ];
    want.sort();
    if got != want {
        bail!(
            "values changed the objects unexpectedly:\n got:\n  {}\n want:\n  {}",
            got.join("\n  "),
            want.join("\n  ")
        );
    }
    eprintln!(
        "helm-check: ok: image, resources, decision flags, nodeSelector, tolerations and \
         the metrics port change exactly their fields"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_ignores_helm_labels_and_hooks_and_names_each_difference() {
        let kust = vec![json!({"kind": "ServiceAccount", "metadata": {
            "name": "mbcas", "namespace": "ns", "labels": {"a": "b"}}})];
        let helm = vec![
            json!({"kind": "ServiceAccount", "metadata": {"name": "mbcas", "namespace": "ns",
                "labels": {"a": "b", "helm.sh/chart": "mbcas-0.1.0"}}}),
            json!({"kind": "Job", "metadata": {"name": "hook", "namespace": "ns",
                "annotations": {"helm.sh/hook": "pre-delete"}}}),
        ];
        assert!(
            compare(&helm, &kust).is_empty(),
            "{:?}",
            compare(&helm, &kust)
        );
        let other = vec![json!({"kind": "ServiceAccount", "metadata": {
            "name": "mbcas", "namespace": "ns", "labels": {"a": "c"}},
            "automountServiceAccountToken": [false, true]})];
        assert_eq!(
            compare(&other, &kust),
            vec![
                "ServiceAccount ns/mbcas /automountServiceAccountToken: null → [false,true]"
                    .to_owned(),
                "ServiceAccount ns/mbcas /metadata/labels/a: \"b\" → \"c\"".to_owned(),
            ]
        );
        let extra = vec![json!({"kind": "Service", "metadata": {"name": "m", "namespace": "ns"}})];
        assert_eq!(
            compare(&extra, &kust),
            vec![
                "Service ns/m: rendered by the chart, not in deploy/".to_owned(),
                "ServiceAccount ns/mbcas: in deploy/, not rendered by the chart".to_owned(),
            ]
        );
    }

    #[test]
    fn arrays_are_compared_element_by_element() {
        let mut out = Vec::new();
        diff("/env", &json!([1, 2]), &json!([1, 3, 4]), &mut out);
        assert_eq!(out, vec!["/env/1: 2 → 3", "/env/2: null → 4"]);
    }
}
