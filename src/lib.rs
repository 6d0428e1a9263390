//! mongo-replicator: a Kubernetes operator that runs MongoDB-to-MongoDB replication and logs in to
//! Azure DocumentDB with Microsoft Entra workload identity.
//!
//! The library holds everything; `main.rs` only parses arguments and calls [`cli::run`].

pub mod auth;
pub mod azure;
pub mod cli;
pub mod crd;
pub mod operator;
pub mod replicator;
pub mod telemetry;
pub mod validate;
