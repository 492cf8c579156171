//! Control-plane tier: every Kubernetes object under `deploy/` is accepted by
//! a real kube-apiserver (server-side apply, dry run), so validation, defaults
//! and schema errors show up here rather than on a user's cluster.
//!
//! CustomResourceDefinitions under `deploy/crds/` are applied for real first
//! (and left installed: applying them again is idempotent) so that custom
//! resources elsewhere in `deploy/` can be checked against their schema.
//! Namespaced objects are dry-run in a throwaway namespace, because the
//! namespace they name is itself only dry-run. Files that are not Kubernetes
//! API objects (Kind's cluster config, the kustomization, Grafana JSON) are
//! skipped by their apiVersion group or extension, and `deploy/prometheus/`
//! (alerting rules and their tests, Prometheus's own format, checked by
//! promtool) and `deploy/helm/` (templates, rendered and compared with these
//! objects by `cargo xtask helm-check`) by their directories.
// Test helpers: an unwrap that fails is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::apiserver::{TestEnv, TestNamespace, eventually};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{Discovery, Scope},
};
use serde_json::Value;

/// API groups of configuration files that live in deploy/ but are read by
/// tools, not by the API server.
const NOT_API_OBJECTS: &[&str] = &["kind.x-k8s.io", "kustomize.config.k8s.io"];
const FIELD_MANAGER: &str = "mbcas-test-deploy";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // Not API objects: Prometheus's rules, the chart, the
            // descheduler's policies (files it reads, not objects it serves).
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

/// (file relative to deploy/, document) for every API object under deploy/.
fn api_objects() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        let rel = path
            .strip_prefix(deploy_dir())
            .unwrap_or(&path)
            .display()
            .to_string();
        for doc in docs {
            let api_version = doc["apiVersion"].as_str().unwrap_or_default();
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            if !NOT_API_OBJECTS.contains(&group) {
                out.push((rel.clone(), doc));
            }
        }
    }
    out
}

fn gvk(file: &str, doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: a document without apiVersion"));
    let kind = doc["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: a document without kind"));
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

fn name_of(file: &str, doc: &Value) -> String {
    doc["metadata"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{file}: a {} without metadata.name", doc["kind"]))
        .to_owned()
}

async fn install_crds(client: &Client, objects: &[(String, Value)]) -> Vec<String> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut groups = Vec::new();
    for (file, doc) in objects
        .iter()
        .filter(|(_, d)| d["kind"] == "CustomResourceDefinition")
    {
        let name = name_of(file, doc);
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(doc),
        )
        .await
        .unwrap_or_else(|e| panic!("{file}: the API server refused CRD {name}: {e}"));
        eventually(
            &format!("CRD {name} to be Established"),
            Duration::from_secs(30),
            || async {
                let crd = crds.get(&name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            },
        )
        .await;
        if let Some(group) = doc["spec"]["group"].as_str() {
            groups.push(group.to_owned());
        }
    }
    groups
}

#[tokio::test]
async fn every_deploy_manifest_is_accepted_by_the_api_server() {
    let Some(env) = TestEnv::get() else { return };
    let client = env.client().await;
    let objects = api_objects();
    assert!(
        objects.iter().any(|(_, d)| d["kind"] == "DaemonSet"),
        "deploy/ has no DaemonSet: is the directory being read?"
    );
    let crd_groups = install_crds(&client, &objects).await;
    let discovery = eventually(
        "discovery to list the CRDs' groups",
        Duration::from_secs(30),
        || async {
            let d = Discovery::new(client.clone()).run().await.ok()?;
            crd_groups.iter().all(|g| d.has_group(g)).then_some(d)
        },
    )
    .await;
    let ns = TestNamespace::new(env, &client, "deploy").await;

    let mut checked = 0;
    for (file, doc) in &objects {
        let gvk = gvk(file, doc);
        let name = name_of(file, doc);
        let (resource, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{file}: the API server does not serve {gvk:?}"));
        let mut doc = doc.clone();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => {
                doc["metadata"]["namespace"] = Value::String(ns.name.clone());
                Api::namespaced_with(client.clone(), &ns.name, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).dry_run().force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap_or_else(|e| panic!("{file}: {} {name} is refused: {e}", gvk.kind));
        assert_eq!(
            applied.metadata.name.as_deref(),
            Some(name.as_str()),
            "{file}"
        );
        checked += 1;
    }
    eprintln!("deploy/: {checked} objects accepted by the API server (dry run)");
}
