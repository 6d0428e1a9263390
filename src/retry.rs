//! The one way the product retries: an operation is tried again while its error is worth it,
//! after a jittered exponential backoff (from `backon`) or the wait the server asked for, within
//! the policy's attempts and time budget, and every wait ends at once when the caller's
//! cancellation token fires (a shutdown never sits out a backoff).
//!
//! Callers say what is worth retrying with their module's `is_transient` and count retries in
//! their own metric through the `on_retry` hook.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How an error should be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Final: waiting will not help.
    Stop,
    /// Try again after the policy's next backoff.
    Retry,
    /// Try again after this wait (a server's `Retry-After`).
    RetryAfter(Duration),
}

impl Decision {
    /// `Retry` when `transient`, else `Stop`.
    pub fn retry_if(transient: bool) -> Self {
        if transient { Decision::Retry } else { Decision::Stop }
    }
}

/// How long and how often to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The first backoff; each later one doubles, up to `max_delay`. Each wait is jittered to
    /// between half and all of its step, so many clients failing at once do not retry in step.
    pub first_delay: Duration,
    /// The longest backoff.
    pub max_delay: Duration,
    /// Attempts in all, the first included; `None`: no limit.
    pub max_attempts: Option<u32>,
    /// No retry starts whose wait would end later than this after the first attempt; `None`: no limit.
    pub budget: Option<Duration>,
}

impl Policy {
    /// Retries without limit (until cancelled or a final error), backing off from `first_delay` to `max_delay`.
    pub const fn unbounded(first_delay: Duration, max_delay: Duration) -> Self {
        Self { first_delay, max_delay, max_attempts: None, budget: None }
    }

    /// The waits between attempts, jittered to 50–100 % of each exponential step.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        // backon's jitter adds up to 100 % of the step, so its steps are half of ours.
        ExponentialBuilder::default()
            .with_min_delay(self.first_delay / 2)
            .with_max_delay(self.max_delay / 2)
            .with_jitter()
            .without_max_times()
            .build()
    }
}

/// Why an operation did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure<E> {
    /// The error was final.
    Stopped(E),
    /// The attempts or the time budget ran out; `last` is the last error.
    Exhausted { last: E, attempts: u32 },
    /// Cancelled while waiting to try again; `last` is the error that made it wait.
    Cancelled { last: E },
}

impl<E> Failure<E> {
    /// The error behind the failure, whatever ended the retries.
    pub fn into_error(self) -> E {
        match self {
            Failure::Stopped(e) | Failure::Exhausted { last: e, .. } | Failure::Cancelled { last: e } => e,
        }
    }
}

/// The wait before trying again something that has been failing for `failing_for`, for a
/// caller that keeps no attempt count (a reconcile): half that time, within `[min, max]`. The
/// waits grow about as a doubling backoff would, and a short failure is retried soon.
pub fn proportional(failing_for: Duration, min: Duration, max: Duration) -> Duration {
    (failing_for / 2).clamp(min, max)
}

/// Runs `op` until it succeeds, `decide` says an error is final, the policy runs out, or
/// `cancel` fires during a wait. `on_retry(error, wait, attempt)` runs before each wait
/// (log it, count it). A cancellation that comes while `op` runs lets it finish: the caller
/// decides whether an operation in flight may be abandoned.
pub async fn retry<T, E, Op, Fut>(
    policy: &Policy,
    cancel: &CancellationToken,
    mut op: Op,
    decide: impl Fn(&E) -> Decision,
    mut on_retry: impl FnMut(&E, Duration, u32),
) -> Result<T, Failure<E>>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut backoff = policy.backoff();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match op().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let step = backoff.next().unwrap_or(policy.max_delay);
        let wait = match decide(&err) {
            Decision::Stop => return Err(Failure::Stopped(err)),
            Decision::Retry => step,
            Decision::RetryAfter(wait) => wait,
        };
        if cancel.is_cancelled() {
            return Err(Failure::Cancelled { last: err });
        }
        let out_of_attempts = policy.max_attempts.is_some_and(|max| attempt >= max);
        let out_of_time = policy.budget.is_some_and(|budget| started.elapsed() + wait > budget);
        if out_of_attempts || out_of_time {
            return Err(Failure::Exhausted { last: err, attempts: attempt });
        }
        on_retry(&err, wait, attempt);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled() => return Err(Failure::Cancelled { last: err }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn waits_double_with_jitter_and_stay_below_the_cap() {
        let policy = Policy::unbounded(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = policy.backoff().take(10).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100), "{delays:?}");
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)), "{delays:?}");
        assert!(delays[9] >= Duration::from_secs(1), "{delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success_and_counted() {
        let calls = Cell::new(0);
        let mut retries = Vec::new();
        let policy = Policy::unbounded(Duration::from_millis(10), Duration::from_secs(1));
        let result = retry(
            &policy,
            &CancellationToken::new(),
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 4 { Err("busy") } else { Ok(n) } }
            },
            |_| Decision::Retry,
            |_, wait, attempt| retries.push((wait, attempt)),
        )
        .await;
        assert_eq!(result, Ok(4));
        assert_eq!(retries.iter().map(|r| r.1).collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn final_errors_stop_at_once_and_budgets_and_attempts_end_retries() {
        let cancel = CancellationToken::new();
        let policy = Policy::unbounded(Duration::from_millis(10), Duration::from_secs(1));
        let stopped = retry(&policy, &cancel, || async { Err::<(), _>("bad") }, |_| Decision::Stop, |_, _, _| {}).await;
        assert_eq!(stopped, Err(Failure::Stopped("bad")));

        let limited = Policy { max_attempts: Some(3), ..policy };
        let exhausted = retry(&limited, &cancel, || async { Err::<(), _>("busy") }, |_| Decision::Retry, |_, _, _| {}).await;
        assert_eq!(exhausted, Err(Failure::Exhausted { last: "busy", attempts: 3 }));

        // A Retry-After beyond the budget ends the retries instead of waiting.
        let budgeted = Policy { budget: Some(Duration::from_secs(5)), ..policy };
        let waited = Cell::new(Duration::ZERO);
        let result = retry(
            &budgeted,
            &cancel,
            || async { Err::<(), _>("throttled") },
            |_| Decision::RetryAfter(Duration::from_secs(2)),
            |_, wait, _| waited.set(waited.get() + wait),
        )
        .await;
        assert_eq!(result, Err(Failure::Exhausted { last: "throttled", attempts: 3 }));
        assert_eq!(waited.get(), Duration::from_secs(4));
    }

    #[tokio::test]
    async fn cancellation_ends_a_long_wait_at_once() {
        let cancel = CancellationToken::new();
        let policy = Policy::unbounded(Duration::from_secs(60), Duration::from_secs(60));
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.cancel();
        });
        let started = Instant::now();
        let result = retry(&policy, &cancel, || async { Err::<(), _>("down") }, |_| Decision::Retry, |_, _, _| {}).await;
        assert_eq!(result, Err(Failure::Cancelled { last: "down" }));
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
