//! `mbcas simulate`: run policies on a scenario and write the comparison.

use std::process::ExitCode;

use super::{SimulateArgs, markdown, prometheus, scenario::Scenario, simulate};

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Scenario(#[from] super::scenario::ScenarioError),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn run(args: &SimulateArgs) -> Result<ExitCode, SimulateError> {
    let s = Scenario::from_file(&args.scenario)?;
    let sum = simulate(&s, &args.policies, args.seed);
    let json = serde_json::to_string_pretty(&sum).unwrap_or_default();
    if let Some(dir) = &args.out {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&p, text))
                .map_err(|source| SimulateError::Write {
                    path: p.display().to_string(),
                    source,
                })
        };
        write("summary.json", &json)?;
        write("summary.md", &markdown(&sum))?;
        write("metrics.prom", &prometheus(&sum))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", markdown(&sum));
    }
    Ok(ExitCode::SUCCESS)
}
