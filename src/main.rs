use clap::Parser;

fn main() -> std::process::ExitCode {
    mongo_replicator::cli::run(mongo_replicator::cli::Cli::parse())
}
