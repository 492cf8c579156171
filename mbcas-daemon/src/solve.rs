//! `mbcas solve`: clear the market on JSON input and print the outcome as JSON.
//!
//! Input (stdin or `--input FILE`):
//! `{"capacity_millicores": C, "overcommit": ρ, "idle_millicores": I, "total_weight": W,
//! "pods": [{"id": "...", "weight": w, "floor_millicores": f, "cap_millicores": M,
//! "demand_millicores": d, "need_millicores": n}]}`, the market of [`crate::market`]
//! (`overcommit` is optional, default 3; `idle_millicores` default 0; `total_weight`
//! default the pods' total; `demand_millicores` default the need). Output:
//! `{"price": λ, "budget_millicores": B, "overcommitted": bool,
//! "allocations": [{"id", "millicores", "base_millicores", "bound"}]}`.
//! Invalid input exits with code 2 and a message naming the field; nothing is
//! printed on stdout then.

use std::{io::Read as _, path::PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    market::{self, Bid, MarketInput},
    units::{MilliCpu, PodKey},
};

/// Exit code for invalid input.
pub const EXIT_INVALID_INPUT: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct SolveArgs {
    /// Read the market from this file instead of standard input.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SolveError {
    #[error("cannot read {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("input is not JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
    #[error(transparent)]
    Market(#[from] market::MarketError),
}

impl SolveError {
    /// Whether the error is the input's fault (exit code 2) rather than I/O.
    pub fn is_invalid_input(&self) -> bool {
        !matches!(self, Self::Read { .. })
    }
}

#[derive(Debug, Serialize)]
pub struct SolveOutput {
    pub price: f64,
    pub budget_millicores: u64,
    pub overcommitted: bool,
    pub allocations: Vec<SolvedAllocation>,
}

#[derive(Debug, Serialize)]
pub struct SolvedAllocation {
    pub id: String,
    pub millicores: u64,
    pub base_millicores: u64,
    pub bound: market::Bound,
}

/// Reads the input named by `args`.
pub fn read_input(args: &SolveArgs) -> Result<String, SolveError> {
    match &args.input {
        Some(path) => std::fs::read_to_string(path).map_err(|source| SolveError::Read {
            what: path.display().to_string(),
            source,
        }),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|source| SolveError::Read {
                    what: "standard input".into(),
                    source,
                })?;
            Ok(s)
        }
    }
}

/// Parses, validates and clears one market given as JSON text.
pub fn solve(text: &str) -> Result<SolveOutput, SolveError> {
    let input = parse(text)?;
    let outcome = market::clear(&input)?;
    Ok(SolveOutput {
        price: outcome.price,
        budget_millicores: outcome.budget.0,
        overcommitted: outcome.overcommitted,
        allocations: outcome
            .allocations
            .into_iter()
            .map(|a| SolvedAllocation {
                id: a.key.to_string(),
                millicores: a.amount.0,
                base_millicores: a.base.0,
                bound: a.bound,
            })
            .collect(),
    })
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> SolveError {
    SolveError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

fn get<'a>(obj: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value, SolveError> {
    obj.get(key)
        .ok_or_else(|| field_err(join(path, key), "missing"))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn millicores(v: &Value, field: &str) -> Result<MilliCpu, SolveError> {
    match v {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                return Ok(MilliCpu(u));
            }
            match n.as_f64() {
                Some(f) if f < 0.0 => {
                    Err(field_err(field, format!("must not be negative, got {n}")))
                }
                _ => Err(field_err(
                    field,
                    format!("must be a whole number of millicores, got {n}"),
                )),
            }
        }
        other => Err(field_err(
            field,
            format!("must be a number, got {}", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Turns JSON text into a validated market input; errors name the field.
pub fn parse(text: &str) -> Result<MarketInput, SolveError> {
    let root: Value = serde_json::from_str(text).map_err(SolveError::Syntax)?;
    let obj = root
        .as_object()
        .ok_or_else(|| field_err("(root)", "must be an object"))?;
    let capacity = millicores(get(obj, "", "capacity_millicores")?, "capacity_millicores")?;
    let overcommit = match obj.get("overcommit") {
        None => market::DEFAULT_OVERCOMMIT,
        Some(Value::Number(n)) if n.as_f64().is_some_and(|r| r.is_finite() && r >= 1.0) => {
            n.as_f64().unwrap_or(market::DEFAULT_OVERCOMMIT)
        }
        Some(other) => {
            return Err(field_err(
                "overcommit",
                format!("must be a number ≥ 1, got {other}"),
            ));
        }
    };
    let idle = match obj.get("idle_millicores") {
        None => MilliCpu::ZERO,
        Some(v) => millicores(v, "idle_millicores")?,
    };
    let total_weight = match obj.get("total_weight") {
        None => None,
        Some(Value::Number(n)) if n.as_f64().is_some_and(|w| w.is_finite() && w > 0.0) => {
            n.as_f64()
        }
        Some(other) => {
            return Err(field_err(
                "total_weight",
                format!("must be a number > 0, got {other}"),
            ));
        }
    };
    let pods = get(obj, "", "pods")?
        .as_array()
        .ok_or_else(|| field_err("pods", "must be an array"))?;
    let mut bids = Vec::with_capacity(pods.len());
    let mut seen = std::collections::HashMap::new();
    for (i, pod) in pods.iter().enumerate() {
        let path = format!("pods[{i}]");
        let p = pod
            .as_object()
            .ok_or_else(|| field_err(&path, "must be an object"))?;
        let id = match get(p, &path, "id")? {
            Value::String(s) if !s.is_empty() => s.clone(),
            Value::String(_) => return Err(field_err(join(&path, "id"), "must not be empty")),
            other => {
                return Err(field_err(
                    join(&path, "id"),
                    format!("must be a string, got {}", kind(other)),
                ));
            }
        };
        if let Some(first) = seen.insert(id.clone(), i) {
            return Err(field_err(
                join(&path, "id"),
                format!("duplicate id {id:?} (also pods[{first}])"),
            ));
        }
        let wfield = join(&path, "weight");
        let weight = match get(p, &path, "weight")? {
            Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
            other => {
                return Err(field_err(
                    wfield,
                    format!("must be a number, got {}", kind(other)),
                ));
            }
        };
        if !(weight.is_finite() && weight > 0.0) {
            return Err(field_err(wfield, format!("must be > 0, got {weight}")));
        }
        let floor = millicores(
            get(p, &path, "floor_millicores")?,
            &join(&path, "floor_millicores"),
        )?;
        let cap = millicores(
            get(p, &path, "cap_millicores")?,
            &join(&path, "cap_millicores"),
        )?;
        let need = millicores(
            get(p, &path, "need_millicores")?,
            &join(&path, "need_millicores"),
        )?;
        let demand = match p.get("demand_millicores") {
            None => need,
            Some(v) => millicores(v, &join(&path, "demand_millicores"))?,
        };
        if floor > cap {
            return Err(field_err(
                join(&path, "floor_millicores"),
                format!("floor {} is above cap_millicores {}", floor.0, cap.0),
            ));
        }
        bids.push(Bid {
            key: PodKey::from(id),
            weight,
            floor,
            cap,
            demand,
            need,
        });
    }
    Ok(MarketInput {
        capacity,
        total_weight,
        idle,
        overcommit,
        bids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(text: &str) -> String {
        match solve(text) {
            Ok(o) => panic!("expected an error, got {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_input_solves() {
        let out = solve(
            r#"{"capacity_millicores": 1000, "pods": [
                {"id": "a", "weight": 1, "floor_millicores": 100, "cap_millicores": 1000, "need_millicores": 900},
                {"id": "b", "weight": 1, "floor_millicores": 100, "cap_millicores": 1000, "need_millicores": 900}]}"#,
        )
        .unwrap();
        assert_eq!(
            out.allocations
                .iter()
                .map(|a| a.millicores)
                .collect::<Vec<_>>(),
            vec![500, 500],
            "contended, no headroom, nothing idle: each at its fair share"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let pod = |w: &str| {
            format!(
                r#"{{"capacity_millicores": 1000, "pods": [{{"id": "a", "weight": {w}, "floor_millicores": 1, "cap_millicores": 2, "need_millicores": 1}}]}}"#
            )
        };
        assert!(err_of(&pod("0")).starts_with("pods[0].weight"));
        assert!(err_of(&pod("-1")).starts_with("pods[0].weight"));
        assert!(err_of(&pod("\"x\"")).starts_with("pods[0].weight"));
        assert!(err_of(r#"{"pods": []}"#).starts_with("capacity_millicores: missing"));
        assert!(err_of(r#"{"capacity_millicores": -5, "pods": []}"#).contains("negative"));
        assert!(
            err_of(r#"{"capacity_millicores": 5, "overcommit": 0.5, "pods": []}"#)
                .starts_with("overcommit")
        );
        assert!(err_of("[").contains("not JSON"));
    }
}
