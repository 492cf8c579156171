//! MBCAS: market-based CPU allocation for Kubernetes pods.
//!
//! The library holds every part of the daemon; `main.rs` only parses the command
//! line and calls into it. See `DESIGN.md` at the repository root for the
//! architecture and the contracts between the modules.
#![deny(unsafe_code)]

pub mod app;
pub mod burn;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod decision;
pub mod demand;
pub mod engine;
pub mod error;
pub mod http;
pub mod k8s;
pub mod local;
pub mod market;
pub mod metrics;
pub mod node_stats;
pub mod policy;
pub mod run;
pub mod sense;
pub mod sensor;
pub mod sim;
pub mod solve;
pub mod state;
pub mod telemetry;
pub mod units;
