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
        Command::SimulateCluster(args) => match mbcas::sim::cluster::cmd(&args) {
            Ok(text) => {
                println!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Evaluate(args) => match mbcas::sim::evaluate::run(&args) {
            Ok(code) => Ok(code),
            Err(e @ mbcas::sim::cmd::SimulateError::Scenario(_)) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(2))
            }
            Err(e) => Err(e.into()),
        },
        Command::Run(args) => run(&args),
        Command::Burn(args) => {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            mbcas::burn::burn(&args, stop);
            Ok(ExitCode::SUCCESS)
        }
        Command::Sense(args) => run_sense(&args),
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

fn run_sense(args: &mbcas::sense::SenseArgs) -> anyhow::Result<ExitCode> {
    use mbcas::sense;
    let debug = mbcas::telemetry::ebpf_debug_enabled();
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

fn run(args: &mbcas::run::RunArgs) -> anyhow::Result<ExitCode> {
    match args.decision.validate() {
        Ok(cfg) => Ok(mbcas::app::main(
            args,
            cfg,
            mbcas::telemetry::ebpf_debug_enabled(),
        )),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
