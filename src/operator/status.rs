//! Status from what was observed: pure. Conditions follow the Kubernetes API conventions and
//! kstatus (which Flux and Argo CD read): `Reconciling` while a validation or rollout runs,
//! `Stalled` when a person must act, `Ready` only when the connectivity was validated *and* the
//! replicator reports progress for the current configuration. A condition keeps its
//! `lastTransitionTime` while its status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::identity::{Binding, IDENTITY_BOUND};
use super::verification::{VERIFIED, Verification};
use crate::crd::{MongoReplicationStatus, Phase, Progress};
use crate::reason::Reason;

pub const CONNECTIVITY_VALIDATED: &str = "ConnectivityValidated";
pub const REPLICATING: &str = "Replicating";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const READY: &str = "Ready";
pub const CAUGHT_UP: &str = "CaughtUp";
/// Ends the message of a validation failure that may pass with time and is being retried.
const RETRYING: &str = " (retrying: this can pass with time, e.g. while a new federated credential propagates)";

/// Where the validation of the current configuration is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validation {
    /// The Job for this configuration runs (or is about to).
    Running,
    Passed,
    /// It failed; `retrying` when waiting may fix it (a federated credential still propagating,
    /// an endpoint not reachable yet) and the operator runs it again.
    Failed {
        reason: String,
        message: String,
        retrying: bool,
    },
}

/// Where the replicator is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replicator {
    /// Scaled to zero: not validated yet, or suspended.
    Stopped,
    /// Rolling out, or running but not ready yet.
    Starting,
    /// Its pod is ready.
    Running,
    /// Its container ended with a permanent error (exit 3, 4 or 5) and the reason it wrote.
    Failed { reason: String, message: String },
}

/// Everything the status is computed from.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub generation: i64,
    /// The spec cannot work as written (a missing Secret, an invalid namespace pattern).
    pub spec_error: Option<(String, String)>,
    /// The Azure identity bindings (federated credentials, cluster users) the spec asks for.
    pub binding: Binding,
    pub validation: Validation,
    pub suspended: bool,
    pub replicator: Replicator,
    /// What the replicator last reported, and whether it reported it for the current configuration.
    pub progress: Option<Progress>,
    pub progress_current: bool,
    /// How long the replicator's writes to the target have been failing, once that is longer
    /// than the operator's stall threshold.
    pub writes_stuck_for: Option<std::time::Duration>,
    /// Cutover readiness, while the replicator runs and reports for this configuration.
    pub caught_up: Option<CaughtUp>,
    /// The verification run the spec asks for.
    pub verification: Verification,
}

/// Where the stream stands against `spec.cutover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaughtUp {
    /// The replicator is still copying.
    pub snapshotting: bool,
    /// How long it has been caught up, and since when (RFC 3339); `None` while it is not.
    pub caught_up_for: Option<(std::time::Duration, String)>,
    pub sustain: std::time::Duration,
    pub max_lag_seconds: u64,
}

/// The new status, from the old one (for transition times and the replicator's progress) and
/// what was observed.
pub fn compute(old: Option<&MongoReplicationStatus>, observed: &Observed, now: &Time) -> MongoReplicationStatus {
    let generation = observed.generation;
    let condition = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: Some(generation),
        last_transition_time: now.clone(),
    };
    let unknown = |type_: &str, reason: &str, message: String| Condition { status: "Unknown".into(), ..condition(type_, false, reason, message) };

    let mut conditions = Vec::new();
    let mut stalled: Option<(String, String)> = observed.spec_error.clone();
    let mut reconciling: Option<(String, String)> = None;

    // IdentityBound
    match (&observed.spec_error, &observed.binding) {
        (_, Binding::NotNeeded) | (Some(_), _) => {}
        (None, Binding::Bound { message }) => conditions.push(condition(IDENTITY_BOUND, true, "Bound", message.clone())),
        (None, Binding::InProgress { message }) => {
            conditions.push(condition(IDENTITY_BOUND, false, "Binding", message.clone()));
            reconciling = Some(("Binding".into(), message.clone()));
        }
        (None, Binding::Failed { reason, message, transient, .. }) => {
            let shown = if *transient { format!("{message} (retrying)") } else { message.clone() };
            conditions.push(condition(IDENTITY_BOUND, false, reason, shown.clone()));
            if *transient {
                reconciling = Some((reason.clone(), shown));
            } else {
                stalled = Some((reason.clone(), shown));
            }
        }
    }
    let binding_done = observed.binding.is_done();

    // ConnectivityValidated
    let validated = match (&observed.spec_error, &observed.validation) {
        (Some((reason, message)), _) => {
            conditions.push(condition(CONNECTIVITY_VALIDATED, false, reason, message.clone()));
            false
        }
        (None, Validation::Running) if !binding_done => {
            let message = "the validation starts once the Azure identities are bound (see IdentityBound)".to_string();
            conditions.push(unknown(CONNECTIVITY_VALIDATED, "WaitingForIdentity", message));
            false
        }
        (None, Validation::Running) => {
            // A validation run again after a failure that may pass with time keeps showing that
            // failure until the new verdict, so the reason never flickers away.
            let retried = old
                .and_then(|o| o.conditions.iter().find(|c| c.type_ == CONNECTIVITY_VALIDATED))
                .filter(|c| c.status == "False" && c.message.ends_with(RETRYING));
            match retried {
                Some(previous) => {
                    conditions.push(condition(CONNECTIVITY_VALIDATED, false, &previous.reason, previous.message.clone()));
                    reconciling = Some((previous.reason.clone(), previous.message.clone()));
                }
                None => {
                    let message = "the validation Job is checking both endpoints".to_string();
                    conditions.push(unknown(CONNECTIVITY_VALIDATED, "Validating", message.clone()));
                    reconciling = Some(("Validating".into(), message));
                }
            }
            false
        }
        (None, Validation::Passed) => {
            conditions.push(condition(CONNECTIVITY_VALIDATED, true, "Validated", "both endpoints answered every check".into()));
            true
        }
        (None, Validation::Failed { reason, message, retrying }) => {
            let message = if *retrying { format!("{message}{RETRYING}") } else { message.clone() };
            conditions.push(condition(CONNECTIVITY_VALIDATED, false, reason, message.clone()));
            if *retrying {
                reconciling = Some((reason.clone(), message));
            } else {
                stalled.get_or_insert((reason.clone(), message));
            }
            false
        }
    };

    // Replicating
    let phase_of_progress = observed.progress.as_ref().and_then(|p| p.phase.clone());
    let replicating = match (&observed.replicator, observed.suspended) {
        (_, true) => {
            conditions.push(condition(
                REPLICATING,
                false,
                "Suspended",
                "spec.suspend is true: the replicator is scaled to zero; the checkpoint is kept".into(),
            ));
            false
        }
        (Replicator::Failed { reason, message }, false) => {
            conditions.push(condition(REPLICATING, false, reason, message.clone()));
            stalled.get_or_insert((reason.clone(), message.clone()));
            false
        }
        (Replicator::Running, false) if observed.progress_current && observed.writes_stuck_for.is_some() => {
            let since = observed.progress.as_ref().and_then(|p| p.writes_failing_since.clone()).unwrap_or_default();
            let minutes = observed.writes_stuck_for.map(|d| d.as_secs() / 60).unwrap_or_default();
            let message = format!(
                "the replicator's writes to the target have failed since {since} ({minutes} min) and are retried; the checkpoint does not advance: check the target and the replicator's log (mongo_replicator_retries_total)"
            );
            conditions.push(condition(REPLICATING, false, Reason::CheckpointNotAdvancing.as_str(), message.clone()));
            stalled.get_or_insert((Reason::CheckpointNotAdvancing.to_string(), message));
            false
        }
        (Replicator::Running, false) if observed.progress_current => {
            let (reason, message) = match phase_of_progress.as_deref() {
                Some("Snapshot") => ("Snapshotting", "copying the existing data"),
                Some("Done") => ("SnapshotDone", "the snapshot is finished (mode: SnapshotOnly)"),
                _ => ("Streaming", "following the source's change stream"),
            };
            conditions.push(condition(REPLICATING, true, reason, message.into()));
            true
        }
        (Replicator::Running | Replicator::Starting, false) => {
            let message = "the replicator is starting and has not reported progress for this configuration yet".to_string();
            conditions.push(unknown(REPLICATING, "Starting", message.clone()));
            if validated {
                reconciling.get_or_insert(("Starting".into(), message));
            }
            false
        }
        (Replicator::Stopped, false) => {
            conditions.push(condition(REPLICATING, false, "WaitingForValidation", "the replicator starts once both endpoints are validated".into()));
            false
        }
    };

    // CaughtUp: messages name times, not counts, so an unchanged state is not rewritten.
    if let Some(c) = observed.caught_up.as_ref().filter(|_| replicating) {
        let (caught_up, reason, message) = match &c.caught_up_for {
            _ if c.snapshotting => (false, "Snapshotting", "the existing data is being copied; the stream follows it".to_string()),
            Some((since, at)) if *since >= c.sustain => (
                true,
                "CaughtUp",
                format!(
                    "the lag has stayed at most {} s since {at}: to cut over, stop writes to the source, wait until status.progress.lastAppliedClusterTime passes the moment they stopped, then switch clients to the target",
                    c.max_lag_seconds
                ),
            ),
            Some((_, at)) => (
                false,
                "CatchingUp",
                format!("the lag has been at most {} s since {at}; CaughtUp once that has held for {} s", c.max_lag_seconds, c.sustain.as_secs()),
            ),
            None => (false, "CatchingUp", format!("the lag is above {} s, or writes to the target are failing", c.max_lag_seconds)),
        };
        conditions.push(condition(CAUGHT_UP, caught_up, reason, message));
    }

    // Verified: the last run's verdict; not part of Ready (replication itself is fine).
    match &observed.verification {
        Verification::NotAsked => {}
        Verification::Waiting => {
            conditions.push(unknown(VERIFIED, "WaitingForStream", "a verification runs once the replicator streams the current configuration".into()))
        }
        Verification::Running => conditions.push(unknown(VERIFIED, "Verifying", "a verification Job is comparing the target with the source".into())),
        Verification::Finished { equal, reason, message } => conditions.push(condition(VERIFIED, *equal, reason, message.clone())),
    }

    let ready = validated && (replicating || observed.suspended) && stalled.is_none();
    match &reconciling {
        Some((reason, message)) if stalled.is_none() => conditions.push(condition(RECONCILING, true, reason, message.clone())),
        _ => conditions.push(condition(RECONCILING, false, "Reconciled", "nothing in progress".into())),
    }
    match &stalled {
        Some((reason, message)) => conditions.push(condition(STALLED, true, reason, message.clone())),
        None => conditions.push(condition(STALLED, false, "NotStalled", "nothing needs a person".into())),
    }
    let (ready_reason, ready_message) = if ready {
        if observed.suspended {
            ("Suspended".to_string(), "suspended on request".to_string())
        } else {
            ("Replicating".into(), "validated and replicating".into())
        }
    } else if let Some((reason, message)) = stalled.clone().or_else(|| reconciling.clone()) {
        (reason, message)
    } else {
        ("NotReady".into(), "the replicator has not reported progress for this configuration".into())
    };
    conditions.push(condition(READY, ready, &ready_reason, ready_message));

    // A condition whose status did not change keeps its transition time.
    if let Some(old) = old {
        for condition in &mut conditions {
            if let Some(previous) = old.conditions.iter().find(|c| c.type_ == condition.type_ && c.status == condition.status) {
                condition.last_transition_time = previous.last_transition_time.clone();
            }
        }
    }

    let phase = if stalled.is_some() {
        Phase::Failed
    } else if observed.suspended {
        Phase::Suspended
    } else if !validated && !binding_done {
        Phase::Binding
    } else if !validated {
        Phase::Validating
    } else if replicating && phase_of_progress.as_deref() == Some("Snapshot") {
        Phase::Snapshotting
    } else if replicating {
        Phase::Streaming
    } else {
        Phase::Pending
    };
    MongoReplicationStatus {
        observed_generation: Some(generation),
        phase: Some(phase),
        conditions,
        // The replicator's own field manager owns progress, the identity steps' own owns azure.
        progress: None,
        azure: None,
    }
}

/// The status of a MongoReplication being deleted whose Azure objects cannot be removed yet:
/// the old conditions, with `IdentityBound` and `Ready` saying why it stays.
pub fn releasing(old: Option<&MongoReplicationStatus>, generation: i64, reason: &str, message: &str, now: &Time) -> MongoReplicationStatus {
    let mut status = old.cloned().unwrap_or_default();
    // Deleting bumps the generation: the conditions speak for the object as it is now.
    status.observed_generation = Some(generation);
    for condition in &mut status.conditions {
        condition.observed_generation = Some(generation);
    }
    status.progress = None;
    status.azure = None;
    for type_ in [IDENTITY_BOUND, READY] {
        let unchanged = status.conditions.iter().find(|c| c.type_ == type_ && c.status == "False").map(|c| c.last_transition_time.clone());
        status.conditions.retain(|c| c.type_ != type_);
        status.conditions.push(Condition {
            type_: type_.to_string(),
            status: "False".into(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation: status.observed_generation,
            last_transition_time: unchanged.unwrap_or_else(|| now.clone()),
        });
    }
    status
}

/// Whether two statuses differ in more than their transition times: an unchanged status is
/// not written again.
pub fn differs(old: Option<&MongoReplicationStatus>, new: &MongoReplicationStatus) -> bool {
    let Some(old) = old else { return true };
    let strip = |conditions: &[Condition]| -> Vec<(String, String, String, String, Option<i64>)> {
        let mut v: Vec<_> =
            conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation)).collect();
        v.sort();
        v
    };
    old.observed_generation != new.observed_generation || old.phase != new.phase || strip(&old.conditions) != strip(&new.conditions)
}

/// The conditions worth an Event: those whose status or reason changed. `Reconciling` is left
/// out (it mirrors the others), as is a first `Stalled=False`: nothing happened to say.
pub fn transitions(old: Option<&MongoReplicationStatus>, new: &MongoReplicationStatus) -> Vec<Condition> {
    new.conditions
        .iter()
        .filter(|c| c.type_ != RECONCILING)
        .filter(|c| {
            let previous = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_));
            match previous {
                Some(p) => p.status != c.status || p.reason != c.reason,
                None => !(c.type_ == STALLED && c.status == "False"),
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    fn observed() -> Observed {
        Observed {
            generation: 3,
            spec_error: None,
            binding: Binding::NotNeeded,
            validation: Validation::Passed,
            suspended: false,
            replicator: Replicator::Running,
            progress: Some(Progress { phase: Some("Stream".into()), ..Default::default() }),
            progress_current: true,
            writes_stuck_for: None,
            caught_up: None,
            verification: Verification::NotAsked,
        }
    }

    fn get<'a>(status: &'a MongoReplicationStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn ready_only_when_validated_and_progress_is_reported_for_this_configuration() {
        let status = compute(None, &observed(), &time(1));
        assert_eq!((get(&status, READY).status.as_str(), status.phase), ("True", Some(Phase::Streaming)));
        assert_eq!(get(&status, STALLED).status, "False");
        assert_eq!(get(&status, RECONCILING).status, "False");
        assert!(status.conditions.iter().all(|c| c.observed_generation == Some(3)));

        let stale = Observed { progress_current: false, ..observed() };
        let status = compute(None, &stale, &time(1));
        assert_eq!((get(&status, READY).status.as_str(), get(&status, RECONCILING).status.as_str()), ("False", "True"));
        assert_eq!(get(&status, REPLICATING).status, "Unknown");
    }

    #[test]
    fn failures_a_person_must_fix_are_stalled_and_propagation_is_reconciling() {
        let failed = Observed {
            validation: Validation::Failed { reason: "FederatedCredentialSubjectMismatch".into(), message: "wrong subject".into(), retrying: false },
            replicator: Replicator::Stopped,
            ..observed()
        };
        let status = compute(None, &failed, &time(1));
        assert_eq!(get(&status, STALLED).reason, "FederatedCredentialSubjectMismatch");
        assert_eq!((get(&status, READY).status.as_str(), status.phase), ("False", Some(Phase::Failed)));

        let propagating = Observed {
            validation: Validation::Failed { reason: "NoFederatedCredential".into(), message: "AADSTS70021".into(), retrying: true },
            replicator: Replicator::Stopped,
            ..observed()
        };
        let status = compute(None, &propagating, &time(1));
        assert_eq!((get(&status, STALLED).status.as_str(), get(&status, RECONCILING).status.as_str()), ("False", "True"));
        assert!(get(&status, CONNECTIVITY_VALIDATED).message.contains("retrying"));
        assert_eq!(status.phase, Some(Phase::Validating));
        // While it runs again, the failure stays visible instead of flickering to Validating.
        let rerun = Observed { validation: Validation::Running, replicator: Replicator::Stopped, ..observed() };
        let again = compute(Some(&status), &rerun, &time(20));
        assert_eq!(get(&again, CONNECTIVITY_VALIDATED).reason, "NoFederatedCredential");
        assert_eq!(get(&again, CONNECTIVITY_VALIDATED).last_transition_time, time(1));
        assert_eq!(get(&compute(None, &rerun, &time(20)), CONNECTIVITY_VALIDATED).reason, "Validating");

        let missing = Observed { spec_error: Some(("SecretNotFound".into(), "Secret data/x not found".into())), ..observed() };
        let status = compute(None, &missing, &time(1));
        assert_eq!((get(&status, STALLED).reason.as_str(), get(&status, READY).reason.as_str()), ("SecretNotFound", "SecretNotFound"));

        let crashed =
            Observed { replicator: Replicator::Failed { reason: "ChangeStreamHistoryLost".into(), message: "history".into() }, ..observed() };
        assert_eq!(get(&compute(None, &crashed, &time(1)), STALLED).reason, "ChangeStreamHistoryLost");
    }

    #[test]
    fn transition_times_are_kept_and_an_unchanged_status_is_not_rewritten() {
        let first = compute(None, &observed(), &time(1));
        let second = compute(Some(&first), &observed(), &time(99));
        assert_eq!(get(&second, READY).last_transition_time, time(1));
        assert!(!differs(Some(&first), &second));
        assert!(transitions(Some(&first), &second).is_empty());

        let suspended = Observed { suspended: true, replicator: Replicator::Stopped, ..observed() };
        let third = compute(Some(&second), &suspended, &time(120));
        assert!(differs(Some(&second), &third));
        assert_eq!(third.phase, Some(Phase::Suspended));
        assert_eq!(get(&third, REPLICATING).last_transition_time, time(120));
        let changed: Vec<_> = transitions(Some(&second), &third).into_iter().map(|c| c.type_).collect();
        assert!(changed.contains(&REPLICATING.to_string()), "{changed:?}");
    }

    #[test]
    fn validation_waits_for_the_identities_and_a_binding_failure_says_who_must_act() {
        let fresh =
            Observed { validation: Validation::Running, replicator: Replicator::Stopped, progress: None, progress_current: false, ..observed() };
        let binding = Observed { binding: Binding::InProgress { message: "registering principal p".into() }, ..fresh.clone() };
        let status = compute(None, &binding, &time(1));
        assert_eq!(status.phase, Some(Phase::Binding));
        assert_eq!((get(&status, IDENTITY_BOUND).status.as_str(), get(&status, IDENTITY_BOUND).reason.as_str()), ("False", "Binding"));
        assert_eq!(get(&status, CONNECTIVITY_VALIDATED).reason, "WaitingForIdentity");
        assert_eq!(get(&status, RECONCILING).status, "True");

        let throttled = Binding::Failed { reason: "ArmThrottled".into(), message: "throttled".into(), transient: true, retry_after: None };
        let status = compute(None, &Observed { binding: throttled, ..fresh.clone() }, &time(1));
        assert_eq!((get(&status, STALLED).status.as_str(), get(&status, RECONCILING).reason.as_str()), ("False", "ArmThrottled"));

        let forbidden = Binding::Failed { reason: "ArmForbidden".into(), message: "grant a role".into(), transient: false, retry_after: None };
        let status = compute(None, &Observed { binding: forbidden.clone(), ..fresh }, &time(1));
        assert_eq!((status.phase, get(&status, STALLED).reason.as_str()), (Some(Phase::Failed), "ArmForbidden"));
        assert_eq!(get(&status, READY).reason, "ArmForbidden");

        // Bound: the condition is there and True; nothing to bind: no condition at all.
        let status = compute(None, &Observed { binding: Binding::Bound { message: "in place".into() }, ..observed() }, &time(1));
        assert_eq!((get(&status, IDENTITY_BOUND).status.as_str(), get(&status, READY).status.as_str()), ("True", "True"));
        assert!(compute(None, &observed(), &time(1)).conditions.iter().all(|c| c.type_ != IDENTITY_BOUND));
        // A running replication whose recheck fails for good is not Ready: a person must act.
        let status = compute(None, &Observed { binding: forbidden, ..observed() }, &time(1));
        assert_eq!(get(&status, READY).status, "False");
    }

    #[test]
    fn caught_up_once_low_lag_has_held_long_enough_with_messages_that_do_not_tick() {
        let at = "2026-01-01T00:00:00Z".to_string();
        let cutover = |held: Option<u64>| CaughtUp {
            snapshotting: false,
            caught_up_for: held.map(|s| (std::time::Duration::from_secs(s), at.clone())),
            sustain: std::time::Duration::from_secs(60),
            max_lag_seconds: 5,
        };
        let get_caught_up = |c: CaughtUp| {
            let status = compute(None, &Observed { caught_up: Some(c), ..observed() }, &time(1));
            let c = get(&status, CAUGHT_UP).clone();
            (c.status, c.reason, c.message)
        };
        let (status, reason, message) = get_caught_up(cutover(Some(61)));
        assert_eq!((status.as_str(), reason.as_str()), ("True", "CaughtUp"));
        assert!(message.contains("stop writes to the source") && message.contains(&at), "{message}");
        assert_eq!(get_caught_up(cutover(Some(30))).1, "CatchingUp");
        assert_eq!(get_caught_up(cutover(Some(30))).2, get_caught_up(cutover(Some(31))).2, "the message must not tick");
        assert_eq!(get_caught_up(cutover(None)).1, "CatchingUp");
        assert_eq!(get_caught_up(CaughtUp { snapshotting: true, ..cutover(None) }).1, "Snapshotting");
        // Not Ready-relevant, and absent when the replicator does not report for this configuration.
        let status = compute(None, &Observed { caught_up: Some(cutover(None)), ..observed() }, &time(1));
        assert_eq!(get(&status, READY).status, "True");
        assert!(compute(None, &observed(), &time(1)).conditions.iter().all(|c| c.type_ != CAUGHT_UP));
    }
}
