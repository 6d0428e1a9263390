//! Command-line interface of the `mongo-replicator` binary.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kubernetes operator for MongoDB-to-MongoDB replication, with Microsoft Entra workload identity
/// for Azure DocumentDB (Azure Cosmos DB for MongoDB vCore).
#[derive(Parser, Debug)]
#[command(name = "mongo-replicator", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to run.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the MongoReplication CustomResourceDefinition as YAML
    /// (apply it with `mongo-replicator crd | kubectl apply -f -`).
    Crd,
}

/// Runs a parsed command line; the process exit code is the result.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd => {
            let mut out = std::io::stdout().lock();
            match out.write_all(crate::crd::crd_yaml().as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("mongo-replicator crd: cannot write to stdout: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
