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
//! Unknown fields are refused. Invalid input exits with code 2 and a message
//! naming the field; nothing is printed on stdout then.

use std::{io::Read as _, path::PathBuf};

use serde::{Deserialize, Serialize};

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

/// The input as written; what serde cannot check is checked in [`parse`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    capacity_millicores: Millicores,
    overcommit: Option<f64>,
    idle_millicores: Option<Millicores>,
    total_weight: Option<f64>,
    pods: Vec<PodInput>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodInput {
    id: String,
    weight: f64,
    floor_millicores: Millicores,
    cap_millicores: Millicores,
    need_millicores: Millicores,
    demand_millicores: Option<Millicores>,
}

/// A whole, non-negative number of millicores.
#[derive(Clone, Copy, Debug)]
struct Millicores(MilliCpu);

impl<'de> Deserialize<'de> for Millicores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let n = serde_json::Number::deserialize(d)?;
        match n.as_u64() {
            Some(u) => Ok(Self(MilliCpu(u))),
            None if n.as_f64().is_some_and(|f| f < 0.0) => {
                Err(D::Error::custom(format!("must not be negative, got {n}")))
            }
            None => Err(D::Error::custom(format!(
                "must be a whole number of millicores, got {n}"
            ))),
        }
    }
}

/// Turns JSON text into a validated market input; errors name the field.
pub fn parse(text: &str) -> Result<MarketInput, SolveError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let input: Input = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return SolveError::Syntax(inner);
        }
        let msg = inner.to_string();
        // "missing field `x` at line …": name the field itself.
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.split_once('`'))
            .map(|(field, _)| field.to_owned());
        let problem = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
        match missing {
            Some(field) if path == "." => field_err(field, "missing"),
            Some(field) => field_err(format!("{path}.{field}"), "missing"),
            None if path == "." => field_err("(root)", problem),
            None => field_err(path, problem),
        }
    })?;
    let overcommit = match input.overcommit {
        None => market::DEFAULT_OVERCOMMIT,
        Some(r) if r.is_finite() && r >= 1.0 => r,
        Some(r) => {
            return Err(field_err(
                "overcommit",
                format!("must be a number ≥ 1, got {r}"),
            ));
        }
    };
    if let Some(w) = input.total_weight
        && !(w.is_finite() && w > 0.0)
    {
        return Err(field_err(
            "total_weight",
            format!("must be a number > 0, got {w}"),
        ));
    }
    let mut bids = Vec::with_capacity(input.pods.len());
    let mut seen = std::collections::HashMap::new();
    for (i, p) in input.pods.into_iter().enumerate() {
        let path = format!("pods[{i}]");
        if p.id.is_empty() {
            return Err(field_err(format!("{path}.id"), "must not be empty"));
        }
        if let Some(first) = seen.insert(p.id.clone(), i) {
            return Err(field_err(
                format!("{path}.id"),
                format!("duplicate id {:?} (also pods[{first}])", p.id),
            ));
        }
        if !(p.weight.is_finite() && p.weight > 0.0) {
            return Err(field_err(
                format!("{path}.weight"),
                format!("must be > 0, got {}", p.weight),
            ));
        }
        let (floor, cap, need) = (
            p.floor_millicores.0,
            p.cap_millicores.0,
            p.need_millicores.0,
        );
        if floor > cap {
            return Err(field_err(
                format!("{path}.floor_millicores"),
                format!("floor {} is above cap_millicores {}", floor.0, cap.0),
            ));
        }
        bids.push(Bid {
            key: PodKey::from(p.id),
            weight: p.weight,
            floor,
            cap,
            demand: p.demand_millicores.map_or(need, |d| d.0),
            need,
            recent: None,
        });
    }
    Ok(MarketInput {
        capacity: input.capacity_millicores.0,
        total_weight: input.total_weight,
        idle: input.idle_millicores.map_or(MilliCpu::ZERO, |m| m.0),
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
        assert!(
            err_of(r#"{"capacity_millicores": 5, "pods": [], "idle": 1}"#)
                .contains("unknown field `idle`"),
            "a misspelt field is refused, not ignored"
        );
        assert!(
            err_of(r#"{"capacity_millicores": 5, "pods": [{"id": "a"}]}"#)
                .starts_with("pods[0].weight: missing")
        );
    }
}
