//! The `PodAllocation` custom resource (`allocation.mbcas.io/v1alpha1`).
//!
//! One per managed pod, in the pod's namespace, named after the pod and owned by
//! it (garbage-collected with it). The daemon's writer owns the spec (what MBCAS
//! wants and why); the resize controller owns the status (what it did). CPU
//! amounts are Kubernetes quantity strings written in millicores (`"750m"`); the
//! schema rejects anything that is not a non-negative CPU quantity.

use std::{borrow::Cow, fmt};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::units::MilliCpu;

pub const GROUP: &str = "allocation.mbcas.io";
pub const VERSION: &str = "v1alpha1";
/// Label on every PodAllocation: the node whose daemon owns it.
pub const NODE_LABEL: &str = "mbcas.io/node";
/// Pods labelled `mbcas.io/ignore=true` are never resized.
pub const IGNORE_LABEL: &str = "mbcas.io/ignore";
/// Field manager of every write MBCAS makes.
pub const FIELD_MANAGER: &str = "mbcas-daemon";
/// The condition the controller keeps on each PodAllocation.
pub const CONDITION_APPLIED: &str = "Applied";

/// What MBCAS wants for one pod, and why.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "allocation.mbcas.io",
    version = "v1alpha1",
    kind = "PodAllocation",
    plural = "podallocations",
    singular = "podallocation",
    shortname = "pa",
    namespaced,
    status = "PodAllocationStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Desired","type":"string","jsonPath":".spec.cpuLimit"}"#,
    printcolumn = r#"{"name":"Applied","type":"string","jsonPath":".status.appliedCpuLimit"}"#,
    printcolumn = r#"{"name":"Demand","type":"string","jsonPath":".spec.demand"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PodAllocationSpec {
    /// The pod (same name as this resource).
    #[schemars(length(min = 1, max = 253))]
    pub pod_name: String,
    /// The pod's UID: an allocation never applies to a newer pod of the same name.
    #[schemars(length(min = 1, max = 64))]
    pub pod_uid: String,
    /// The node whose daemon decided (also the `mbcas.io/node` label).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Desired CPU limit of the whole pod: the sum over `containers`.
    pub cpu_limit: CpuQuantity,
    /// Desired CPU limit per container.
    #[schemars(length(min = 1))]
    pub containers: Vec<ContainerAllocation>,
    /// Estimated demand of the pod (usage plus throttled time, smoothed, with headroom).
    pub demand: CpuQuantity,
    /// The pod's market weight (its CPU request in cores, times an optional priority factor).
    #[schemars(range(min = 0.0))]
    pub weight: f64,
    /// Clearing price of the node's market (CPU per unit of weight).
    #[schemars(range(min = 0.0))]
    pub price: f64,
    /// Stable code of the policy's reason for this decision (e.g. `increase_throttled`).
    #[schemars(regex(pattern = r"^[a-z_]+$"))]
    pub reason: String,
    /// The pod's CPU limits before MBCAS first changed them, as the node
    /// daemon saw them when it first wrote this allocation: on record before
    /// any resize, so the controller need not write them first (it copies them
    /// into the status).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub original: Vec<OriginalLimit>,
}

impl PodAllocation {
    /// The original limits on record: the status's, else the spec's.
    pub fn originals(&self) -> &[OriginalLimit] {
        match &self.status {
            Some(st) if !st.original.is_empty() => &st.original,
            _ => &self.spec.original,
        }
    }
}

/// A CPU limit for one container.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerAllocation {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    pub cpu_limit: CpuQuantity,
}

/// A container's CPU limit before MBCAS first changed it (`None`: it had none).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OriginalLimit {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<CpuQuantity>,
}

// Variant docs are plain comments: doc comments would turn the schema into a
// `oneOf` of documented constants, which the API server's structural rules refuse.
/// Where an allocation stands: `Pending` (resize requested, not yet reported by the
/// kubelet), `Applied`, `Failed` (see reason), `Skipped` (the pod is not managed).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    // Not applied yet: the resize is requested and the kubelet has not reported it.
    #[default]
    Pending,
    // The kubelet reports the desired limits in the pod's status.
    Applied,
    // The resize was refused or cannot be done (see reason and message).
    Failed,
    // The pod is not managed (Guaranteed, excluded, opted out…): nothing is done.
    Skipped,
}

impl Phase {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Applied => "Applied",
            Self::Failed => "Failed",
            Self::Skipped => "Skipped",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the resize controller did. Deterministic: written only when it changes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodAllocationStatus {
    pub phase: Phase,
    /// The pod's CPU limit the kubelet reports now (sum over containers), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_cpu_limit: Option<CpuQuantity>,
    /// Per-container limits the kubelet reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<ContainerAllocation>,
    /// The pod's limits before MBCAS first changed them (`mbcas restore` puts them back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub original: Vec<OriginalLimit>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Machine-readable reason of the phase (CamelCase, e.g. `ResizeRequested`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last change of the pod's CPU limits by someone else (a person with
    /// `kubectl patch --subresource resize`, another controller): its limits
    /// then became the original, and MBCAS left the pod alone until `holdUntil`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_change: Option<OperatorChange>,
}

/// A resize of a managed pod made by someone else, adopted by MBCAS.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperatorChange {
    /// The field manager of that resize (e.g. `kubectl-patch`).
    #[schemars(length(min = 1, max = 128))]
    pub manager: String,
    /// When it was made (the pod's `managedFields` time, to the second).
    pub changed_at: Time,
    /// Until when MBCAS leaves the pod alone.
    pub hold_until: Time,
}

/// A non-negative CPU quantity, held in millicores, written as `"<n>m"`.
///
/// Reads every plain Kubernetes CPU quantity: `"2"`, `"0.5"`, `"1.25"`, `"250m"`.
/// Sub-millicore precision, exponents, negative values and other units are
/// refused (by the schema on the server, and by this parser in the daemon).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuQuantity(pub MilliCpu);

/// What the schema and [`CpuQuantity::parse`] accept.
pub const CPU_QUANTITY_PATTERN: &str = r"^([0-9]+m|[0-9]+(\.[0-9]{1,3})?)$";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?} is not a CPU quantity (expected e.g. \"250m\", \"1\" or \"1.5\")")]
pub struct QuantityError {
    pub value: String,
}

impl CpuQuantity {
    /// Refuses what [`CPU_QUANTITY_PATTERN`] refuses; the value itself is read
    /// by the one quantity parser, [`mbcas_common::quantity::millicores`].
    pub fn parse(s: &str) -> Result<Self, QuantityError> {
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        let shaped = match s.strip_suffix('m') {
            Some(m) => digits(m),
            None => match s.split_once('.') {
                Some((whole, frac)) => digits(whole) && digits(frac) && frac.len() <= 3,
                None => digits(s),
            },
        };
        shaped
            .then(|| mbcas_common::quantity::millicores(s))
            .flatten()
            .map(|m| Self(MilliCpu(m)))
            .ok_or_else(|| QuantityError {
                value: s.to_owned(),
            })
    }

    pub const fn millis(self) -> MilliCpu {
        self.0
    }
}

impl From<MilliCpu> for CpuQuantity {
    fn from(m: MilliCpu) -> Self {
        Self(m)
    }
}

impl fmt::Display for CpuQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0.get())
    }
}

impl Serialize for CpuQuantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuQuantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for CpuQuantity {
    fn schema_name() -> Cow<'static, str> {
        "CpuQuantity".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": CPU_QUANTITY_PATTERN,
            "description": "CPU quantity in cores or millicores, e.g. \"250m\" or \"1.5\"."
        })
    }
}

/// The CRD as YAML, as `mbcas crd` prints it and `deploy/crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_json::Error> {
    use kube::CustomResourceExt as _;
    let value = serde_json::to_value(PodAllocation::crd())?;
    let mut out = String::from("# Generated by `mbcas crd`: do not edit by hand.\n");
    write_yaml(&value, 0, &mut out);
    Ok(out)
}

/// A small, deterministic YAML emitter for JSON values (block style, keys in the
/// order serde_json keeps them, strings always quoted).
fn write_yaml(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = "  ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                out.push_str(&pad);
                out.push_str(&yaml_key(k));
                out.push(':');
                write_nested(val, indent, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&pad);
                out.push('-');
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        // First key on the dash line, the rest indented under it.
                        let mut first = true;
                        for (k, val) in m {
                            if first {
                                out.push(' ');
                                first = false;
                            } else {
                                out.push_str(&"  ".repeat(indent + 1));
                            }
                            out.push_str(&yaml_key(k));
                            out.push(':');
                            write_nested(val, indent + 1, out);
                        }
                    }
                    other => write_nested(other, indent, out),
                }
            }
        }
        scalar => {
            out.push_str(&pad);
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}

fn write_nested(val: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    match val {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_yaml(val, indent + 1, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_yaml(val, indent + 1, out);
        }
        Value::Object(_) => out.push_str(" {}\n"),
        Value::Array(_) => out.push_str(" []\n"),
        scalar => {
            out.push(' ');
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
}

fn yaml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !k.starts_with(['-', '.'])
    {
        k.to_owned()
    } else {
        json_string(k)
    }
}

fn yaml_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => json_string(s),
        other => other.to_string(),
    }
}

/// JSON string literals are valid YAML double-quoted scalars.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt as _;

    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes_and_print_in_millicores() {
        for (s, m) in [
            ("250m", 250),
            ("0m", 0),
            ("1", 1000),
            ("0.5", 500),
            ("1.25", 1250),
            ("2.001", 2001),
            ("12", 12_000),
        ] {
            assert_eq!(CpuQuantity::parse(s), Ok(CpuQuantity(MilliCpu(m))), "{s}");
        }
        for bad in [
            "",
            "-1",
            "-100m",
            "1.2345",
            "1e3",
            "1Ki",
            "m",
            ".5",
            "1.",
            "abc",
            " 1",
            "1 ",
            "99999999999999999999",
        ] {
            assert!(CpuQuantity::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(CpuQuantity(MilliCpu(1500)).to_string(), "1500m");
    }

    #[test]
    fn the_schema_pattern_agrees_with_the_parser() {
        // The server checks CPU_QUANTITY_PATTERN; the daemon runs CpuQuantity::parse.
        // Spot-check that the pattern is anchored and has the same alternatives.
        assert!(CPU_QUANTITY_PATTERN.starts_with('^') && CPU_QUANTITY_PATTERN.ends_with('$'));
        let crd = serde_json::to_string(&PodAllocation::crd()).unwrap_or_default();
        assert!(
            crd.contains(&CPU_QUANTITY_PATTERN.replace('\\', "\\\\")),
            "{crd}"
        );
    }

    #[test]
    fn status_round_trips_and_omits_what_is_unknown() {
        let st = PodAllocationStatus {
            phase: Phase::Pending,
            original: vec![OriginalLimit {
                name: "app".into(),
                cpu_limit: Some(CpuQuantity(MilliCpu(500))),
            }],
            reason: Some("ResizeRequested".into()),
            ..Default::default()
        };
        let json = serde_json::to_value(&st).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({
                "phase": "Pending",
                "original": [{"name": "app", "cpuLimit": "500m"}],
                "reason": "ResizeRequested"
            })
        );
        let back: PodAllocationStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
        let bad = serde_json::json!({"phase": "Exploded"});
        assert!(serde_json::from_value::<PodAllocationStatus>(bad).is_err());
    }

    #[test]
    fn crd_names_columns_and_schema() {
        let crd = PodAllocation::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("podallocations.allocation.mbcas.io")
        );
        assert_eq!(crd.spec.names.short_names, Some(vec!["pa".to_owned()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        let cols: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            [
                "Pod", "Node", "Desired", "Applied", "Demand", "Phase", "Reason", "Age"
            ]
        );
        assert!(v.subresources.as_ref().is_some_and(|s| s.status.is_some()));
        let schema = serde_json::to_string(&v.schema).unwrap_or_default();
        for phase in ["Pending", "Applied", "Failed", "Skipped"] {
            assert!(schema.contains(&format!("\"{phase}\"")), "{phase} missing");
        }
    }

    #[test]
    fn yaml_is_what_a_yaml_parser_reads_back_as_the_crd() {
        let yaml = crd_yaml().unwrap();
        let parsed: serde_json::Value =
            serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let direct = serde_json::to_value(PodAllocation::crd()).unwrap_or_default();
        assert_eq!(parsed, direct);
    }
}
