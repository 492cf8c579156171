//! `mbcas`: parse the command line, set up logging, run one subcommand.
//!
//! Each subcommand returns `anyhow::Result<ExitCode>`; errors are printed with
//! their whole cause chain and exit with code 1 unless the command chose another.

use std::process::ExitCode;

use clap::Parser as _;
use mbcas::cli::{Cli, Command};

fn main() -> ExitCode {
    // Usage errors (unknown flag, unparsable value, bad env fallback) exit 64
    // like every other configuration error; --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                mbcas::error::EXIT_USAGE
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Err(e) = mbcas::telemetry::init(&cli.log_level, cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(mbcas::error::EXIT_USAGE);
    }
    let result: anyhow::Result<ExitCode> = match cli.command {
        Command::Version => {
            println!("mbcas {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Solve(args) => run_solve(&args),
        Command::Simulate(args) => match mbcas::sim::cmd::run(&args) {
            Ok(code) => Ok(code),
            Err(e @ mbcas::sim::cmd::SimulateError::Scenario(_)) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => Err(e.into()),
        },
        Command::Run(args) => run(&args, &cli.log_level),
        Command::Burn(args) => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            mbcas::burn::burn(&args, stop);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sense(args) => run_sense(&args, &cli.log_level),
        Command::Crd => mbcas::k8s::crd::crd_yaml()
            .map(|yaml| {
                print!("{yaml}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Restore(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(mbcas::k8s::restore::run(&args))
                    .map_err(Into::into)
            }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_solve(args: &mbcas::solve::SolveArgs) -> anyhow::Result<ExitCode> {
    use mbcas::solve;
    let out = solve::read_input(args).and_then(|text| solve::solve(&text));
    match out {
        Ok(out) => {
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_invalid_input() => {
            eprintln!("error: invalid input: {e}");
            Ok(ExitCode::from(solve::EXIT_INVALID_INPUT))
        }
        Err(e) => Err(e.into()),
    }
}

fn run_sense(args: &mbcas::sense::SenseArgs, log_level: &str) -> anyhow::Result<ExitCode> {
    use mbcas::sense;
    let debug = log_level.contains("debug") || log_level.contains("trace");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(sense::sense(args, debug))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", sense::render_table(&report));
    }
    if report.cgroups.is_empty() {
        eprintln!("error: no cgroup could be measured");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn run(args: &mbcas::run::RunArgs, log_level: &str) -> anyhow::Result<ExitCode> {
    use mbcas::{local::LocalLoop, run::Mode};
    let cfg = match args.decision.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(e.exit_code()));
        }
    };
    match args.mode {
        Mode::Kubernetes => {
            let debug = log_level.contains("debug") || log_level.contains("trace");
            Ok(mbcas::app::main_kubernetes(args, cfg, debug))
        }
        Mode::Local => {
            let cfg_addr = cfg.metrics_addr;
            let debug = log_level.contains("debug") || log_level.contains("trace");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let lp = match LocalLoop::new(&args.local, cfg, debug) {
                    Ok(lp) => lp,
                    Err(
                        e @ (mbcas::local::LocalError::NoRoot
                        | mbcas::local::LocalError::BadRoot { .. }
                        | mbcas::local::LocalError::ZeroCapacity),
                    ) => {
                        eprintln!("error: {e}");
                        return Ok(ExitCode::from(mbcas::error::EXIT_USAGE));
                    }
                    Err(e) => return Err(e.into()),
                };
                let shutdown = tokio_util::sync::CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signals.cancel();
                });
                // /metrics, /healthz and /readyz; local mode runs without them
                // (and says so) when the address is taken.
                let metrics = mbcas::metrics::Metrics::new();
                let readiness = mbcas::http::Readiness::new(&["sensor"]);
                let _ = readiness.mark_ready("sensor");
                let server = match mbcas::http::bind(cfg_addr).await {
                    Ok(listener) => Some(tokio::spawn(mbcas::http::serve(
                        listener,
                        metrics.clone(),
                        readiness,
                        shutdown.clone(),
                    ))),
                    Err(e) => {
                        tracing::warn!(error = %mbcas::error::error_chain(&e), "metrics endpoint disabled");
                        None
                    }
                };
                let stats = lp.with_metrics(metrics).run(shutdown).await?;
                if let Some(server) = server {
                    let _ = server.await;
                }
                tracing::info!(?stats, "local mode stopped");
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
