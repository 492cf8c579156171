//! `mbcas run`: the daemon wired, in either mode.
//!
//! Both modes run the same [`crate::decision::DecisionLoop`] under one
//! cancellation token that SIGINT/SIGTERM fire, next to the HTTP endpoints
//! (`/metrics`, `/healthz`, `/readyz`); they differ in who the consumers are
//! and how a decision is carried out:
//! * [`local`]: the child cgroups of `--local-root`, quotas written directly;
//! * [`kubernetes`]: this node's pods, through PodAllocations and the resize
//!   controller, with the watches that feed both.

pub mod kubernetes;
pub mod local;

use std::process::ExitCode;

pub use kubernetes::{AppError, preflight, run_kubernetes, run_with_client};
use tokio_util::sync::CancellationToken;

use crate::{
    config::DecisionConfig,
    run::{Mode, RunArgs},
};

/// `mbcas run` as the binary calls it: a runtime, the mode, an exit code.
pub fn main(args: &RunArgs, cfg: DecisionConfig, debug_log: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    rt.spawn(cancel_on_signal(shutdown.clone()));
    match args.mode {
        Mode::Kubernetes => match rt.block_on(run_kubernetes(args, cfg, debug_log, shutdown)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", crate::error::error_chain(&e));
                ExitCode::from(e.exit_code())
            }
        },
        Mode::Local => match rt.block_on(local::run(args, cfg, debug_log, shutdown)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", crate::error::error_chain(&e));
                ExitCode::from(e.exit_code())
            }
        },
    }
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    tracing::info!("signal received; draining");
    shutdown.cancel();
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
