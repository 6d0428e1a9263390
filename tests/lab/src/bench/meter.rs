//! What a benchmarked process costs: CPU-seconds from `/proc/PID/stat` while it runs, and at its
//! end (reaped with `wait4`) its exit status, total CPU-seconds and peak RSS (`ru_maxrss`).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::SecantusServer;
use crate::process::{log_tail, spawn_child};

/// User and system CPU-seconds a running process has used.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("odd /proc stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// The peak resident set (VmHWM) of a running process, in MB: for processes the benchmark does
/// not reap itself (read it before they exit).
pub fn peak_rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// A child process of the benchmark, its output in a log file. It is killed and reaped when
/// dropped, and by the kernel when the benchmark dies.
pub struct MeteredChild {
    name: String,
    pid: u32,
    log: PathBuf,
    ended: Option<Ended>,
}

/// How a reaped child ended.
struct Ended {
    status: ExitStatus,
    cpu_seconds: f64,
    peak_rss_mb: f64,
}

impl MeteredChild {
    /// Starts `program` with `args` and `envs`; stdout and stderr go to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], envs: &[(&str, String)], log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(envs.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        // The std `Child` is dropped at once (that neither kills nor reaps): the pid is reaped
        // here with wait4, which also reports the child's own resource usage.
        let child = spawn_child(cmd).with_context(|| format!("cannot start {name} ({})", program.display()))?;
        Ok(Self { name: name.to_string(), pid: child.id(), log: log.to_path_buf(), ended: None })
    }

    /// The log's last lines, to explain a failure.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 30)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// CPU-seconds used so far (all of them once the child has ended).
    pub fn cpu_seconds(&mut self) -> Result<f64> {
        if self.exit_status().is_none() {
            // It may end between the check and the read: then its rusage has the figure.
            if let Ok(cpu) = cpu_seconds(self.pid) {
                return Ok(cpu);
            }
        }
        match self.exit_status() {
            Some(_) => Ok(self.ended.as_ref().map(|e| e.cpu_seconds).unwrap_or_default()),
            None => bail!("cannot read the CPU time of {} (pid {})", self.name, self.pid),
        }
    }

    /// The peak RSS in MB, once the child has ended.
    pub fn peak_rss_mb(&self) -> Option<f64> {
        self.ended.as_ref().map(|e| e.peak_rss_mb)
    }

    /// The exit status, reaping the child when it has ended; `None` while it runs.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.ended.is_none() {
            self.reap(libc::WNOHANG);
        }
        self.ended.as_ref().map(|e| e.status)
    }

    fn reap(&mut self, options: libc::c_int) {
        let mut status = 0;
        // SAFETY: wait4 writes into the status and rusage it is given; the pid is our unreaped child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let reaped = unsafe { libc::wait4(self.pid as libc::pid_t, &mut status, options, &mut usage) };
        if reaped == self.pid as libc::pid_t {
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            self.ended = Some(Ended {
                status: ExitStatus::from_raw(status),
                cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
                peak_rss_mb: usage.ru_maxrss as f64 / 1024.0,
            });
        }
    }

    /// An error saying how the child ended, with its log's tail.
    pub fn ended_with(&self, status: ExitStatus, when: &str) -> anyhow::Error {
        anyhow::anyhow!("{} exited ({status}) {when}; {} ends with:\n{}", self.name, self.log.display(), self.log_tail())
    }

    /// Waits up to `timeout` for the child to end by itself; fails unless it exits 0.
    pub async fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.exit_status() {
                Some(status) if status.success() => return Ok(()),
                Some(status) => return Err(self.ended_with(status, "with a failure")),
                None if Instant::now() > deadline => bail!("{} did not exit within {timeout:?} of finishing its work", self.name),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// SIGTERM, then waits up to `grace` for the child to end; fails unless it exits 0.
    pub async fn terminate(&mut self, grace: Duration) -> Result<()> {
        if self.exit_status().is_none() {
            // SAFETY: signalling our own unreaped child (its pid cannot have been reused).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
        self.wait_success(grace).await.with_context(|| format!("{} did not stop cleanly on SIGTERM", self.name))
    }
}

impl Drop for MeteredChild {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            // SAFETY: as in terminate.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.reap(0);
        }
    }
}

/// The SecantusDB servers of a run, whose CPU-seconds a phase reports.
pub struct Servers {
    source: Option<u32>,
    target: u32,
}

impl Servers {
    pub fn of(source: Option<&SecantusServer>, target: &SecantusServer) -> Result<Self> {
        let pid = |s: &SecantusServer| s.pid().context("a server of the run is not running");
        Ok(Self { source: source.map(pid).transpose()?, target: pid(target)? })
    }

    /// CPU-seconds of (source, target) so far; the source's is 0 without one.
    pub fn cpu(&self) -> Result<(f64, f64)> {
        Ok((self.source.map(cpu_seconds).transpose()?.unwrap_or_default(), cpu_seconds(self.target)?))
    }
}
