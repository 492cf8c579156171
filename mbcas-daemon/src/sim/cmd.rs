//! `mbcas simulate`: run policies on a scenario and write the comparison.
//!
//! Charts are not drawn here (that would add a plotting stack to the daemon):
//! `--out DIR` writes `trace.json` next to the summary, and
//! `cargo xtask sim-charts DIR` renders the PNGs from it.

use std::{
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    time::{Duration, Instant},
};

use super::{
    SimulateArgs, markdown, policy_names, prometheus, scenario::Scenario, simulate_with, work,
};

/// Pods per policy whose time series go to `trace.json`.
const TRACE_PODS: usize = 4;

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
    #[error("cannot encode {what} as JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// A progress bar on standard error, redrawn at most every 100 ms.
struct Progress {
    total: u64,
    done: u64,
    last: Option<Instant>,
}

impl Progress {
    fn add(&mut self, n: u64) {
        self.done += n;
        if self
            .last
            .is_some_and(|l| l.elapsed() < Duration::from_millis(100))
            && self.done < self.total
        {
            return;
        }
        self.last = Some(Instant::now());
        let frac = self.done as f64 / self.total.max(1) as f64;
        let width = 40;
        let filled = ((frac * width as f64) as usize).min(width);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {:5.1} %",
            "#".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        let _ = writeln!(std::io::stderr());
    }
}

pub fn run(args: &SimulateArgs) -> Result<ExitCode, SimulateError> {
    let s = Scenario::from_file(&args.scenario)?;
    let trace_pods = if args.out.is_some() { TRACE_PODS } else { 0 };
    let mut bar = std::io::stderr().is_terminal().then(|| Progress {
        total: work(&s) * policy_names(&s, &args.policies).len() as u64,
        done: 0,
        last: None,
    });
    let (sum, traces) = {
        let mut add = |n: u64| {
            if let Some(b) = bar.as_mut() {
                b.add(n);
            }
        };
        simulate_with(
            &s,
            &args.policies,
            args.seed,
            trace_pods,
            args.threads,
            Some(&mut add),
        )
    };
    if let Some(b) = &bar {
        b.finish();
    }
    let json = serde_json::to_string_pretty(&sum).map_err(|source| SimulateError::Json {
        what: "summary",
        source,
    })?;
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
        let tr = serde_json::to_string(&traces).map_err(|source| SimulateError::Json {
            what: "traces",
            source,
        })?;
        write("trace.json", &tr)?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", markdown(&sum));
    }
    Ok(ExitCode::SUCCESS)
}
