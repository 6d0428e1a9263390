//! The operator: turns a `MongoReplication` into its children and keeps their status true.
//! So far only the pure translation of the API into the replicator's configuration.

pub mod config;
