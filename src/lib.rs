//! weft's control plane: network config, leases (in etcd, see `registry`), the files Docker and CNI read, the agent loop.
// Tests may unwrap: a panic there is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod cni;
pub mod config;
pub mod ctl;
pub mod daemon_json;
pub mod docker_opts;
pub mod doctor;
pub mod escape;
pub mod flags;
pub mod fsutil;
pub mod health;
pub mod install;
pub mod lease;
pub mod metrics;
#[cfg(test)]
mod mutation_tests;
pub mod notify;
pub mod peers;
pub mod policy;
pub mod registry;
pub mod rejection_log;
pub mod retry;
pub mod status;
pub mod subnet_env;
