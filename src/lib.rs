//! mongo-replicator: a Kubernetes operator that runs MongoDB-to-MongoDB replication and logs in to
//! Azure DocumentDB with Microsoft Entra workload identity.
//!
//! The library holds everything; `main.rs` only parses arguments and calls [`cli::run`].

// Lower modules first: each module imports only from those above it or from leaves
// (`crd`, `reason`, `error_chain`, `https`, `retry`, `telemetry`).
pub mod auth;
pub mod azure;
pub mod cli;
pub mod crd;
pub mod error_chain;
pub mod https;
pub mod operator;
pub mod reason;
pub mod replicator;
pub mod retry;
pub mod telemetry;
pub mod validate;
pub mod verify;
