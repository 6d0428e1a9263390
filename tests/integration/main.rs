//! The integration tests: one binary, so the lab's real processes are started once per run and
//! everything links once.

mod arm_client;
mod chart;
mod crd_api;
mod crd_drift;
mod entra;
mod history;
mod identity;
mod node;
mod operator;
mod operator_entra;
mod reasons;
mod replication;
mod secantus;
mod support;
mod verify;
