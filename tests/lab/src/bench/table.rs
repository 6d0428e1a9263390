//! The benchmark's figures and how they are printed: one table of workloads × pipelines, then
//! the verify table.

use anyhow::Result;

use super::Verification;
use super::meter::Servers;
use super::pipeline::{Pipeline, Running};
use super::workload::{Phase, Workload};

/// What one phase of one pipeline measured.
#[derive(Clone)]
pub struct Figures {
    /// Documents (snapshot) or events (stream) per second.
    pub rate: f64,
    /// Seconds from the writer's last acknowledged write to the target complete (stream).
    pub lag: Option<f64>,
    /// What it cost (not measured for the ceiling).
    pub cost: Option<Cost>,
}

impl Figures {
    pub fn rate_only(rate: f64) -> Self {
        Self { rate, lag: None, cost: None }
    }

    pub fn with_peak(mut self, peak_rss_mb: Option<f64>) -> Self {
        if let Some(cost) = &mut self.cost {
            cost.peak_rss_mb = peak_rss_mb;
        }
        self
    }
}

/// CPU-seconds of a phase's `units` documents or events, and the pipeline's peak RSS.
#[derive(Clone)]
pub struct Cost {
    pub units: usize,
    pub pipeline_cpu: f64,
    pub source_cpu: f64,
    pub target_cpu: f64,
    pub peak_rss_mb: Option<f64>,
}

impl Cost {
    /// What the pipeline and the servers used since `cpu_before` and `servers_before`.
    pub fn since(running: &mut Running, cpu_before: f64, servers_before: (f64, f64), servers: &Servers, units: usize) -> Result<Self> {
        let pipeline_cpu = running.cpu_seconds()? - cpu_before;
        let (source, target) = servers.cpu()?;
        Ok(Self { units, pipeline_cpu, source_cpu: source - servers_before.0, target_cpu: target - servers_before.1, peak_rss_mb: None })
    }

    fn per_100k(&self, cpu: f64) -> String {
        format!("{:.2}", cpu * 1e5 / self.units.max(1) as f64)
    }
}

/// One line of the table; `figures` is `None` for a discarded run.
pub struct Row {
    pub workload: Workload,
    pub phase: Phase,
    pub pipeline: Pipeline,
    pub workers: usize,
    pub figures: Option<Figures>,
}

pub struct Table;

impl Table {
    /// Prints the header.
    pub fn new() -> Self {
        println!(
            "\n{:<8} {:<9} {:<8} {:>7} {:>10} {:>7} {:>10} {:>10} {:>10} {:>8} {:>9}",
            "workload", "phase", "pipeline", "workers", "rate/s", "lag s", "pipe cpu", "src cpu", "tgt cpu", "peak MB", "ours÷this"
        );
        Table
    }

    /// Prints one workload's rows: by phase, then workers, then pipeline.
    pub fn print(&mut self, rows: Vec<Row>) {
        for phase in [Phase::Snapshot, Phase::Stream] {
            for row in rows.iter().filter(|r| r.phase == phase) {
                let ours = rows
                    .iter()
                    .find(|o| o.pipeline == Pipeline::Ours && o.phase == phase && o.workers == row.workers)
                    .and_then(|o| o.figures.as_ref().map(|f| f.rate));
                println!("{}", line(row, ours));
            }
        }
    }
}

fn line(row: &Row, ours: Option<f64>) -> String {
    let head = format!("{:<8} {:<9} {:<8} {:>7}", row.workload.name(), row.phase.name(), row.pipeline.name(), row.workers);
    let Some(f) = &row.figures else {
        return format!("{head} {:>10} (discarded: the source's oplog did not hold the whole run)", "-");
    };
    let dash = || "-".to_string();
    let cost = |pick: fn(&Cost) -> f64| f.cost.as_ref().map_or_else(dash, |c| c.per_100k(pick(c)));
    let ratio = match (row.pipeline, ours) {
        (Pipeline::Ours, _) | (_, None) => dash(),
        (_, Some(ours)) => format!("{:.2}", ours / f.rate),
    };
    format!(
        "{head} {:>10.0} {:>7} {:>10} {:>10} {:>10} {:>8} {:>9}",
        f.rate,
        f.lag.map_or_else(dash, |lag| format!("{lag:.2}")),
        cost(|c| c.pipeline_cpu),
        cost(|c| c.source_cpu),
        cost(|c| c.target_cpu),
        f.cost.as_ref().and_then(|c| c.peak_rss_mb).map_or_else(dash, |mb| format!("{mb:.0}")),
        ratio
    )
}

/// The verify table: `mongo-replicator verify` of the insert workload's snapshot copy.
pub fn print_verifications(docs: usize, verifications: &[(usize, Verification)]) {
    if verifications.is_empty() {
        return;
    }
    println!(
        "\nverify of the insert workload's snapshot copy ({docs} documents, equal data); CPU-seconds per 100k documents of the copying/verifying process, source and target servers:"
    );
    println!("{:>7} {:>12} {:>12} {:>10} {:>22} {:>22}", "workers", "snapshot/s", "verify/s", "vrfy/snap", "snapshot cpu p/s/t", "verify cpu p/s/t");
    let per = |f: &Figures| {
        f.cost
            .as_ref()
            .map_or_else(|| "-".to_string(), |c| format!("{}/{}/{}", c.per_100k(c.pipeline_cpu), c.per_100k(c.source_cpu), c.per_100k(c.target_cpu)))
    };
    for (workers, v) in verifications {
        println!(
            "{:>7} {:>12.0} {:>12.0} {:>10.2} {:>22} {:>22}",
            workers,
            v.snapshot.rate,
            v.verify.rate,
            v.verify.rate / v.snapshot.rate,
            per(&v.snapshot),
            per(&v.verify)
        );
    }
}
