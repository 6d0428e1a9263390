//! Which MongoDB errors are worth retrying, and how long to wait between attempts.

use std::time::Duration;

use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use rand::Rng;

/// The server error code of a MongoDB error, when it has one.
pub fn error_code(err: &MongoError) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

/// Server codes that say "try again later": elections, shutdowns, timeouts, throttling.
const TRANSIENT_CODES: &[i32] = &[
    6,     // HostUnreachable
    7,     // HostNotFound
    43,    // CursorNotFound (a restarted server forgot the cursor)
    50,    // MaxTimeMSExpired
    89,    // NetworkTimeout
    91,    // ShutdownInProgress
    189,   // PrimarySteppedDown
    262,   // ExceededTimeLimit
    9001,  // SocketException
    10107, // NotWritablePrimary
    11600, // InterruptedAtShutdown
    11602, // InterruptedDueToReplStateChange
    13435, // NotPrimaryNoSecondaryOk
    13436, // NotPrimaryOrSecondary
    16500, // Azure Cosmos DB: request rate is large (throttled)
];

/// Server code of a change stream whose resume point is no longer in the source's history.
pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;

/// A driver error as a person should read it. A failed MONGODB-OIDC callback reaches us as the
/// driver's "Custom user error", which says nothing; the token error inside it says what to do.
pub fn describe(err: &MongoError) -> String {
    match crate::auth::oidc::token_error(err) {
        Some(token) => token.to_string(),
        None => err.to_string(),
    }
}

/// Whether an error may go away by itself (network, failover, restart, throttling).
pub fn is_transient(err: &MongoError) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Shutdown => false,
        // Entra unreachable, or a new federated credential not yet propagated (70021).
        ErrorKind::Custom(_) => crate::auth::oidc::token_error(err).is_some_and(|e| e.is_transient()),
        _ => {
            err.contains_label("RetryableWriteError")
                || err.contains_label("ResumableChangeStreamError")
                || err.contains_label("TransientTransactionError")
                || error_code(err).is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
    }
}

/// Step `attempt` (from 0) of an exponential backoff from `base`, capped at `max`, scaled to
/// 50–100 % by `jitter` in [0, 1] so that many clients failing at once do not retry in lockstep.
pub fn jittered_step(base: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let step = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Jittered exponential backoff: attempt 0 waits about `base`, doubling up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    /// The next delay: a uniformly random fraction (50–100 %) of the exponential step, so that
    /// many workers failing at once do not retry in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let delay = jittered_step(self.base, self.max, self.attempt, rand::rng().random_range(0.0..=1.0));
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// How many delays were handed out since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_below_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1));
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn io_errors_are_transient_and_bad_values_are_not() {
        let io = MongoError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(is_transient(&io));
        let custom = MongoError::custom("not a server error");
        assert!(!is_transient(&custom));
    }
}
