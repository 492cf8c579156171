//! `mbcas run --mode local`: the decision loop over the child cgroups of
//! `--local-root`, and the HTTP endpoints when their address is free (local
//! mode runs without them, and says so, when it is taken).

use tokio_util::sync::CancellationToken;

use crate::{
    config::DecisionConfig,
    decision::DecisionLoop,
    error::error_chain,
    http::{self, Component, Readiness},
    local::{Local, LocalError},
    metrics::Metrics,
    run::RunArgs,
    sensor::Sensor,
};

impl LocalError {
    /// Refused arguments exit 64 like every other usage error.
    pub fn exit_code(&self) -> u8 {
        if Local::is_usage_error(self) {
            crate::error::EXIT_USAGE
        } else {
            1
        }
    }
}

/// Runs local mode until `shutdown`, then applies `--on-exit`.
pub async fn run(
    args: &RunArgs,
    cfg: DecisionConfig,
    debug_log: bool,
    shutdown: CancellationToken,
) -> Result<(), LocalError> {
    let (engine, pacing, addr) = (
        crate::local::engine_config(&cfg),
        cfg.pacing(),
        cfg.metrics_addr,
    );
    let local = Local::new(&args.local, cfg)?;
    let sensor = Sensor::start(args.local.sensor, debug_log)?;
    if let Some(why) = sensor.fallback_reason() {
        tracing::warn!(
            reason = why,
            "eBPF sensor unavailable; polling cpu.stat instead"
        );
    }
    tracing::info!(sensor = sensor.kind().as_str(), "sensor started");
    let metrics = Metrics::new();
    // No Kubernetes node: the host's name stands for it.
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        metrics.set_node_name(host.trim());
    }
    let readiness = Readiness::new(&[Component::Sensor]);
    readiness.ready(Component::Sensor);
    let server = match http::bind(addr).await {
        Ok(listener) => Some(tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            readiness,
            shutdown.clone(),
        ))),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "metrics endpoint disabled");
            None
        }
    };
    let decided = DecisionLoop::new(local, sensor, engine, pacing, metrics)
        .run(shutdown.clone())
        .await;
    // The loop only ends early on an error: stop the server with it.
    shutdown.cancel();
    if let Some(server) = server {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "HTTP server failed"),
            Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
        }
    }
    let local = decided?;
    tracing::info!(stats = ?local.stats(), "local mode stopped");
    Ok(())
}
