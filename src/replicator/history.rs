//! The history guard: proof that the change stream skipped nothing the source pruned.
//!
//! mongod fails a cursor that falls off its oplog (286), but an open SecantusDB change stream
//! skips pruned entries silently (LAB-NOTES), and a replicator users trust must depend on
//! neither. After a window is read, the reader reads the source's oldest retained change (the
//! first entry of `local.oplog.rs` in natural order). If it is not after the position the window
//! started from, the source still held everything the window needed while serving it (the oldest
//! entry only moves forward); if it is, history was pruned between reads and the window must not
//! be applied: that is a lost history, exactly like a 286.

use std::time::{Duration, Instant};

use mongodb::Client;
use mongodb::bson::{Bson, Document, Timestamp, doc};
use mongodb::change_stream::event::ResumeToken;

use super::checkpoint::token_data;

/// Less retained history than this gets a warning: a replicator restart (pod rescheduled, image
/// pulled, node drained) costs a minute or two and a throttled target a few more, so under five
/// minutes one such hiccup can fall off the source's history.
pub const LOW_HEADROOM_SECONDS: i64 = 300;
/// At most one low-headroom warning this often: a lagging replicator checks after every window.
pub const LOW_HEADROOM_WARNING_EVERY: Duration = Duration::from_secs(60);
/// The oplog is read at most this often, and at most a tenth of the time (a floor read costs
/// O(1) on mongod's capped oplog, O(entries) on some servers). Windows read in between are
/// applied unproven: the next check covers them all (the oplog is pruned oldest first, so a floor
/// not after the last proven position proves every window since), and the checkpoint records only
/// the proven position, so a gap found late still stops the replicator — on restart too.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What one read of the source's oplog found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Floor {
    /// The oldest retained change; `None` when the oplog holds nothing (or does not exist).
    pub oldest: Option<Timestamp>,
    /// The source's cluster time when it answered (its `operationTime`).
    pub read_at: Option<Timestamp>,
}

/// Reads the source's oldest retained change: one entry of `local.oplog.rs`, natural order.
pub async fn read_floor(source: &Client) -> mongodb::error::Result<Floor> {
    let command = doc! {"find": "oplog.rs", "limit": 1, "singleBatch": true, "projection": {"_id": 0, "ts": 1}};
    let reply = source.database("local").run_command(command).await?;
    Ok(floor_of(&reply))
}

/// The floor in a `find` reply on `local.oplog.rs`.
fn floor_of(reply: &Document) -> Floor {
    let timestamp = |value: Option<&Bson>| match value {
        Some(Bson::Timestamp(ts)) => Some(*ts),
        _ => None,
    };
    let first = reply.get_document("cursor").ok().and_then(|c| c.get_array("firstBatch").ok()).and_then(|b| b.first());
    let oldest = match first {
        Some(Bson::Document(entry)) => timestamp(entry.get("ts")),
        _ => None,
    };
    Floor { oldest, read_at: timestamp(reply.get("operationTime")) }
}

/// Whether the source still holds the history after `last_read`: its oldest retained change is
/// at or before it. (The entry at `last_read` itself may be gone without loss; keeping it is the
/// only proof a plain read can give, so its pruning counts as loss.)
pub fn history_kept(last_read: Timestamp, oldest: Timestamp) -> bool {
    oldest <= last_read
}

/// Seconds of history the source retains behind `last_read`.
pub fn headroom_seconds(last_read: Timestamp, oldest: Timestamp) -> i64 {
    i64::from(last_read.time) - i64::from(oldest.time)
}

/// The cluster time a resume token names, in mongod's format (hex `_data` starting with the
/// KeyString timestamp type 0x82, then the timestamp's 8 big-endian bytes). Tokens are opaque
/// elsewhere: other formats give `None` (the checkpoint records the position of its own tokens).
pub fn token_cluster_time(token: &ResumeToken) -> Option<Timestamp> {
    let bytes = hex_bytes(&token_data(token)?)?;
    match bytes.split_first()? {
        (0x82, rest) if rest.len() >= 8 => {
            let time = u32::from_be_bytes(rest[0..4].try_into().ok()?);
            let increment = u32::from_be_bytes(rest[4..8].try_into().ok()?);
            Some(Timestamp { time, increment })
        }
        _ => None,
    }
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// The stream's change history was pruned past what it had read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the source's oldest retained change ({}.{}) is after the last one the change stream read ({}.{}): changes between them were pruned unread",
    .oldest.time, .oldest.increment, .last_read.time, .last_read.increment
)]
pub struct Pruned {
    pub last_read: Timestamp,
    pub oldest: Timestamp,
}

/// The cluster times of one window of change events, as the guard needs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowTimes {
    pub first: Option<Timestamp>,
    pub newest: Option<Timestamp>,
    /// The stream ran dry: the server had nothing more when it answered the last getMore.
    pub caught_up: bool,
}

/// Where the stream provably stands in the source's history. Pure: the reader does the reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryGuard {
    /// Everything up to this cluster time was read (or did not match the stream).
    read_to: Option<Timestamp>,
    /// The source's time at the last floor read; every later getMore started after it.
    floor_read_at: Option<Timestamp>,
    last_check: Option<Instant>,
    last_warning: Option<Instant>,
    /// The windows read since the last check, merged.
    pending: Option<WindowTimes>,
    /// How long the last floor read took.
    floor_cost: Duration,
}

impl HistoryGuard {
    /// A guard for a stream starting at `start` (when known), after a floor read at `probe`.
    pub fn new(start: Option<Timestamp>, probe: &Floor) -> Self {
        Self { read_to: start, floor_read_at: probe.read_at, last_check: None, last_warning: None, pending: None, floor_cost: Duration::ZERO }
    }

    /// The cluster time everything up to which the stream has provably read.
    pub fn read_to(&self) -> Option<Timestamp> {
        self.read_to
    }

    /// Notes a window read; it is proven by the next [`HistoryGuard::check`].
    pub fn note(&mut self, window: &WindowTimes) {
        self.pending = Some(match self.pending.take() {
            None => *window,
            Some(p) => WindowTimes { first: p.first.or(window.first), newest: p.newest.max(window.newest), caught_up: window.caught_up },
        });
    }

    /// Whether it is time for a floor read: [`CHECK_EVERY`], or ten times what the last one took.
    pub fn wants_check(&self, now: Instant) -> bool {
        self.last_check.is_none_or(|at| now.duration_since(at) >= CHECK_EVERY.max(self.floor_cost * 10))
    }

    /// Records how long a floor read took, to pace the next ones.
    pub fn floor_read_took(&mut self, cost: Duration) {
        self.floor_cost = cost;
    }

    /// Judges a window by the floor read after it. Returns the headroom in seconds when there is
    /// something to compare, `Err` when history the window needed was pruned.
    ///
    /// The window is proven when the oldest retained change is not after the position it started
    /// from (or, with no position yet, its first event). A proven window moves the position to its
    /// newest event, and when the stream ran dry also to the previous floor read's time: the
    /// server then had nothing more for the stream up to a getMore that came after that read.
    pub fn check(&mut self, window: &WindowTimes, floor: &Floor, now: Instant) -> Result<Option<i64>, Pruned> {
        self.note(window);
        let window = &self.pending.take().unwrap_or_default();
        self.last_check = Some(now);
        let Some(oldest) = floor.oldest else {
            // Nothing retained at all: nothing to prove with; keep the position as it was.
            self.floor_read_at = floor.read_at.or(self.floor_read_at);
            return Ok(None);
        };
        let Some(reference) = self.read_to.or(window.first) else {
            self.floor_read_at = floor.read_at.or(self.floor_read_at);
            return Ok(None);
        };
        if !history_kept(reference, oldest) {
            return Err(Pruned { last_read: reference, oldest });
        }
        let mut read_to = Some(reference).max(window.newest);
        if window.caught_up {
            read_to = read_to.max(self.floor_read_at);
        }
        self.read_to = read_to;
        self.floor_read_at = floor.read_at.or(self.floor_read_at);
        Ok(read_to.map(|t| headroom_seconds(t, oldest)))
    }

    /// Whether low headroom deserves a warning now (rate limited).
    pub fn should_warn(&mut self, headroom_seconds: i64, now: Instant) -> bool {
        if headroom_seconds >= LOW_HEADROOM_SECONDS || self.last_warning.is_some_and(|at| now.duration_since(at) < LOW_HEADROOM_WARNING_EVERY) {
            return false;
        }
        self.last_warning = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::checkpoint::token_from_data;

    fn ts(time: u32, increment: u32) -> Timestamp {
        Timestamp { time, increment }
    }

    fn floor(oldest: Option<Timestamp>, read_at: Timestamp) -> Floor {
        Floor { oldest, read_at: Some(read_at) }
    }

    #[test]
    fn history_is_kept_while_the_oldest_entry_is_not_after_the_last_read() {
        assert!(history_kept(ts(100, 5), ts(100, 5)), "the entry read itself still retained");
        assert!(history_kept(ts(100, 5), ts(99, 9)));
        assert!(history_kept(ts(100, 5), ts(100, 4)));
        assert!(!history_kept(ts(100, 5), ts(100, 6)), "one increment later is a gap");
        assert!(!history_kept(ts(100, 5), ts(101, 0)));
        assert_eq!(headroom_seconds(ts(400, 1), ts(100, 9)), 300);
    }

    #[test]
    fn a_floor_is_read_from_a_find_reply() {
        let reply = doc! {"cursor": {"firstBatch": [{"ts": ts(10, 1)}], "id": 0i64}, "ok": 1.0, "operationTime": ts(20, 3)};
        assert_eq!(floor_of(&reply), Floor { oldest: Some(ts(10, 1)), read_at: Some(ts(20, 3)) });
        let empty = doc! {"cursor": {"firstBatch": [], "id": 0i64}, "ok": 1.0};
        assert_eq!(floor_of(&empty), Floor { oldest: None, read_at: None });
    }

    #[test]
    fn mongod_tokens_name_their_cluster_time_and_others_do_not() {
        let mongod = token_from_data("8263A1B2C3000000072B022C0100296E5A1004").unwrap();
        assert_eq!(token_cluster_time(&mongod), Some(ts(0x63A1_B2C3, 7)));
        // SecantusDB's: hex BSON {s: 23, t: Timestamp(1796123531, 26), n: "", k: {}}.
        let secantus = token_from_data("2B00000012730017000000000000001174001A0000008BAB0E6B026E000100000000036B00050000000000").unwrap();
        assert_eq!(token_cluster_time(&secantus), None, "opaque outside mongod's format");
        for other in ["82AB", "0A0B", "xyz", ""] {
            assert_eq!(token_cluster_time(&token_from_data(other).unwrap()), None, "{other}");
        }
    }

    #[test]
    fn a_window_after_pruned_history_is_refused() {
        let now = Instant::now();
        let mut guard = HistoryGuard::new(None, &floor(Some(ts(1, 1)), ts(100, 0)));
        let before = WindowTimes { first: Some(ts(100, 1)), newest: Some(ts(100, 20)), caught_up: false };
        assert_eq!(guard.check(&before, &floor(Some(ts(1, 1)), ts(100, 30)), now), Ok(Some(99)));
        // The stream skipped to entry 4020 while the oldest retained is 3026: the window's own
        // events are after the floor, but the position it started from is not.
        let after = WindowTimes { first: Some(ts(101, 4020)), newest: Some(ts(101, 4100)), caught_up: false };
        assert_eq!(
            guard.check(&after, &floor(Some(ts(101, 3026)), ts(101, 5000)), now),
            Err(Pruned { last_read: ts(100, 20), oldest: ts(101, 3026) })
        );
    }

    #[test]
    fn the_oldest_entry_equal_to_the_last_read_one_is_fine() {
        let mut guard = HistoryGuard::new(Some(ts(50, 2)), &floor(Some(ts(50, 2)), ts(60, 0)));
        let window = WindowTimes { first: Some(ts(50, 3)), newest: Some(ts(61, 0)), caught_up: false };
        assert_eq!(guard.check(&window, &floor(Some(ts(50, 2)), ts(61, 1)), Instant::now()), Ok(Some(11)));
        assert_eq!(guard.read_to(), Some(ts(61, 0)));
    }

    #[test]
    fn an_idle_stream_moves_forward_so_pruning_of_what_it_did_not_need_is_no_loss() {
        // A collection-scoped stream on a source busy elsewhere: no events, yet the oplog turns over.
        let now = Instant::now();
        let idle = WindowTimes { caught_up: true, ..Default::default() };
        let mut guard = HistoryGuard::new(Some(ts(10, 0)), &floor(Some(ts(5, 0)), ts(20, 0)));
        assert_eq!(guard.check(&idle, &floor(Some(ts(6, 0)), ts(30, 0)), now), Ok(Some(14)));
        assert_eq!(guard.read_to(), Some(ts(20, 0)), "caught up after the probe at 20");
        assert_eq!(guard.check(&idle, &floor(Some(ts(15, 0)), ts(40, 0)), now), Ok(Some(15)));
        assert_eq!(guard.read_to(), Some(ts(30, 0)));
        // A window cut short by its size proves only its events.
        let full = WindowTimes { first: Some(ts(41, 0)), newest: Some(ts(42, 0)), caught_up: false };
        assert_eq!(guard.check(&full, &floor(Some(ts(29, 0)), ts(50, 0)), now), Ok(Some(13)));
        assert_eq!(guard.read_to(), Some(ts(42, 0)));
        // A fully retained oplog of an idle source is fine however old the position.
        let mut old = HistoryGuard::new(Some(ts(10, 0)), &floor(Some(ts(1, 0)), ts(10_000, 0)));
        assert_eq!(old.check(&idle, &floor(Some(ts(1, 0)), ts(10_001, 0)), now), Ok(Some(9_999)));
    }

    #[test]
    fn without_a_position_or_an_oplog_entry_there_is_no_verdict() {
        let now = Instant::now();
        let mut guard = HistoryGuard::new(None, &Floor { oldest: None, read_at: None });
        assert_eq!(guard.check(&WindowTimes { caught_up: true, ..Default::default() }, &floor(Some(ts(9, 0)), ts(10, 0)), now), Ok(None));
        let window = WindowTimes { first: Some(ts(11, 0)), newest: Some(ts(12, 0)), caught_up: true };
        assert_eq!(guard.check(&window, &floor(None, ts(13, 0)), now), Ok(None));
        assert_eq!(guard.read_to(), None);
    }

    #[test]
    fn checks_are_paced_and_one_check_proves_every_window_since_the_last() {
        let start = Instant::now();
        let mut guard = HistoryGuard::new(Some(ts(1, 0)), &floor(Some(ts(1, 0)), ts(1, 0)));
        let idle = WindowTimes { caught_up: true, ..Default::default() };
        assert!(guard.wants_check(start));
        guard.check(&idle, &floor(Some(ts(1, 0)), ts(2, 0)), start).unwrap();
        assert!(!guard.wants_check(start + Duration::from_millis(500)));
        assert!(guard.wants_check(start + CHECK_EVERY));
        guard.floor_read_took(Duration::from_millis(300));
        assert!(!guard.wants_check(start + CHECK_EVERY), "a costly floor read is done less often");
        assert!(guard.wants_check(start + Duration::from_secs(3)));
        // Three windows, then one check: the position moves to the newest of them.
        guard.note(&WindowTimes { first: Some(ts(3, 0)), newest: Some(ts(3, 9)), caught_up: false });
        guard.note(&WindowTimes { first: Some(ts(4, 0)), newest: Some(ts(4, 9)), caught_up: false });
        let last = WindowTimes { first: Some(ts(5, 0)), newest: Some(ts(5, 9)), caught_up: false };
        assert_eq!(guard.check(&last, &floor(Some(ts(1, 0)), ts(6, 0)), start + Duration::from_secs(3)), Ok(Some(4)));
        assert_eq!(guard.read_to(), Some(ts(5, 9)));
        // A gap anywhere in windows applied unproven is still found by the next check.
        guard.note(&WindowTimes { first: Some(ts(9, 0)), newest: Some(ts(9, 5)), caught_up: false });
        let pruned = guard.check(&WindowTimes::default(), &floor(Some(ts(7, 0)), ts(10, 0)), start + Duration::from_secs(6));
        assert_eq!(pruned, Err(Pruned { last_read: ts(5, 9), oldest: ts(7, 0) }));
    }

    #[test]
    fn low_headroom_warnings_are_rate_limited() {
        let start = Instant::now();
        let mut guard = HistoryGuard::new(None, &Floor { oldest: None, read_at: None });
        assert!(!guard.should_warn(LOW_HEADROOM_SECONDS, start));
        assert!(guard.should_warn(LOW_HEADROOM_SECONDS - 1, start));
        assert!(!guard.should_warn(0, start + Duration::from_secs(59)));
        assert!(guard.should_warn(0, start + LOW_HEADROOM_WARNING_EVERY));
    }
}
