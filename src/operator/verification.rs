//! Verification runs, as pure decisions: which run the spec asks for now (on demand through an
//! annotation, or one per interval), the Job's name for it, and what its verdict (the
//! `mongo-replicator verify` termination message) means for the `Verified` condition.

use std::time::Duration;

use kube::ResourceExt;
use serde::Deserialize;

use crate::crd::{MongoReplication, VerificationMode};
use crate::reason::Reason;

/// The annotation that asks for an on-demand run: each new value is one run.
pub const VERIFY_ANNOTATION: &str = "mongo-replicator.io/verify";
/// The condition type.
pub const VERIFIED: &str = "Verified";
/// Longest a run may take: a large dataset at a low rate limit takes hours.
pub const DEADLINE_SECONDS: i64 = 24 * 3600;

/// The run the spec asks for now, as a key that names it (one Job per key), and how long until
/// the next one is due (`Continuous`).
pub fn wanted_run(replication: &MongoReplication, unix_now: u64) -> Option<(String, Option<Duration>)> {
    let settings = replication.spec.verification.as_ref()?;
    match settings.mode {
        VerificationMode::Off => None,
        VerificationMode::OnDemand => {
            let request = replication.annotations().get(VERIFY_ANNOTATION).map(|v| v.trim()).filter(|v| !v.is_empty())?;
            Some((format!("request/{request}"), None))
        }
        VerificationMode::Continuous => {
            let minutes = settings.interval_minutes.map_or(crate::default_verification_interval_minutes!(), |m| m.max(5) as u64);
            let interval = minutes * 60;
            let slot = unix_now / interval;
            Some((format!("every/{interval}/{slot}"), Some(Duration::from_secs((slot + 1) * interval - unix_now))))
        }
    }
}

/// `<name>-verify-<6 hex digits of the key>`: within 63 characters for any valid name.
pub fn job_name(name: &str, key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let short: String = digest.as_ref()[..3].iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}-verify-{short}")
}

/// Where the wanted run is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Nothing asked (mode `Off`, or `OnDemand` without a request): no condition.
    NotAsked,
    /// Asked, but the replicator is not streaming this configuration yet.
    Waiting,
    Running,
    Finished {
        equal: bool,
        reason: String,
        message: String,
    },
}

/// The parts of a verdict the condition shows (never document contents: the verdict has none).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Verdict {
    #[serde(default)]
    equal: bool,
    reason: Option<String>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    documents_compared: u64,
    #[serde(default)]
    namespaces: u64,
    verified_to: Option<String>,
    #[serde(default)]
    counts: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    mismatches: Vec<Mismatch>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mismatch {
    ns: String,
    kind: String,
    id: Option<String>,
    index: Option<String>,
}

/// A finished run, from its pod's termination message (`None` when it left none).
pub fn finished(succeeded: bool, termination_message: Option<&str>, job: &str) -> Verification {
    let verdict: Option<Verdict> = termination_message.and_then(|m| serde_json::from_str(m).ok());
    let Some(v) = verdict else {
        return Verification::Finished {
            equal: false,
            reason: Reason::VerificationFailed.to_string(),
            message: format!(
                "the verification Job {job} ended without a verdict (deadline passed, or the pod could not start): kubectl logs job/{job}"
            ),
        };
    };
    let equal = succeeded && v.equal;
    let scope = format!("{} documents in {} namespaces compared", v.documents_compared, v.namespaces);
    let to = v.verified_to.map(|t| format!(", changes up to {t} included")).unwrap_or_default();
    if equal {
        return Verification::Finished { equal, reason: "Equal".into(), message: format!("the target equals the source: {scope}{to}") };
    }
    let counts: Vec<String> = v.counts.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
    let first: Vec<String> =
        v.mismatches.iter().take(3).map(|m| format!("{} {} {}", m.kind, m.ns, m.id.as_deref().or(m.index.as_deref()).unwrap_or("-"))).collect();
    let mut message = format!("{}: {scope}{to}", v.message);
    if !counts.is_empty() {
        message.push_str(&format!("; {}", counts.join(", ")));
    }
    if !first.is_empty() {
        message.push_str(&format!("; first: {}", first.join("; ")));
    }
    message.push_str(&format!(" (all of them: kubectl logs job/{job})"));
    Verification::Finished { equal, reason: v.reason.unwrap_or_else(|| Reason::TargetDiffers.to_string()), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replication(verification: serde_json::Value, annotation: Option<&str>) -> MongoReplication {
        let mut object = serde_json::json!({
            "apiVersion": "mongo-replicator.io/v1alpha1", "kind": "MongoReplication",
            "metadata": {"name": "orders", "namespace": "data"},
            "spec": {
                "source": {"auth": "connectionString", "connectionStringSecretRef": {"name": "s"}},
                "target": {"auth": "connectionString", "connectionStringSecretRef": {"name": "t"}},
                "verification": verification,
            }
        });
        if let Some(value) = annotation {
            object["metadata"]["annotations"] = serde_json::json!({VERIFY_ANNOTATION: value});
        }
        serde_json::from_value(object).unwrap()
    }

    #[test]
    fn a_run_per_request_or_per_interval_and_none_when_off() {
        assert_eq!(wanted_run(&replication(serde_json::json!({"mode": "Off"}), Some("1")), 0), None);
        assert_eq!(wanted_run(&replication(serde_json::json!({"mode": "OnDemand"}), None), 0), None);
        let (key, next) = wanted_run(&replication(serde_json::json!({"mode": "OnDemand"}), Some("1733050000")), 0).unwrap();
        assert_eq!((key.as_str(), next), ("request/1733050000", None));
        let every = replication(serde_json::json!({"mode": "Continuous", "intervalMinutes": 10}), None);
        let (first, wait) = wanted_run(&every, 1200 + 30).unwrap();
        assert_eq!(wait, Some(Duration::from_secs(570)));
        assert_eq!(wanted_run(&every, 1200 + 599).unwrap().0, first, "one run per interval");
        assert_ne!(wanted_run(&every, 1800).unwrap().0, first);
        assert_eq!(job_name("orders", &first).len(), "orders-verify-".len() + 6);
        assert_ne!(job_name("orders", "request/1"), job_name("orders", "request/2"));
    }

    #[test]
    fn a_verdict_becomes_a_message_without_contents() {
        let equal = r#"{"outcome":"Equal","equal":true,"message":"equal","namespaces":2,"documentsCompared":1200,"verifiedTo":"2026-12-01T12:00:00Z","counts":{}}"#;
        match finished(true, Some(equal), "orders-verify-abc123") {
            Verification::Finished { equal: true, reason, message } => {
                assert_eq!(reason, "Equal");
                assert!(message.contains("1200 documents in 2 namespaces") && message.contains("2026-12-01T12:00:00Z"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let differs = r#"{"outcome":"Mismatched","equal":false,"reason":"TargetDiffers","message":"2 mismatches","namespaces":1,"documentsCompared":10,
            "counts":{"MissingInTarget":1,"Different":1},"mismatches":[{"ns":"shop.orders","targetNs":"shop.orders","kind":"MissingInTarget","id":"{\"$numberInt\":\"5\"}","firstSeen":"x"}]}"#;
        match finished(false, Some(differs), "orders-verify-abc123") {
            Verification::Finished { equal: false, reason, message } => {
                assert_eq!(reason, "TargetDiffers");
                assert!(
                    message.contains("MissingInTarget 1")
                        && message.contains("shop.orders")
                        && message.contains("kubectl logs job/orders-verify-abc123"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(finished(false, None, "j"), Verification::Finished { equal: false, .. }));
    }
}
