//! The stable reasons: one vocabulary for every error the product reports.
//!
//! Each module's error enum maps its variants to a [`Reason`]; the operator publishes them as
//! condition and Event reasons and metric labels, `validate` as the verdict's `reason`, the
//! replicator in its last log line. A reason is defined here once, with what it means; the
//! README lists them all (a test fails when it does not).

use std::fmt;

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])+ $name:ident, )+) => {
        /// A stable, CamelCase reason a user can script against.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[doc = $doc])+ $name, )+
        }

        impl Reason {
            /// Every reason, in the order they are listed here.
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)+];

            /// The reason as it appears in conditions, Events, metric labels and verdicts.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)+
                }
            }

            /// What the reason means, in a sentence.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(Reason::$name => concat!($($doc),+).trim_ascii(),)+
                }
            }
        }
    };
}

reasons! {
    // --- configuration -------------------------------------------------------------------
    /// The replicator's configuration file cannot be read.
    ConfigUnreadable,
    /// The configuration file is not valid YAML/JSON of the expected shape.
    ConfigMalformed,
    /// The configuration file is well-formed but cannot work (bounds, conflicting settings).
    ConfigInvalid,
    /// The configuration file was written for a newer replicator than this one.
    ConfigVersionUnsupported,
    /// A namespace pattern is not `database.collection`.
    InvalidNamespacePattern,
    /// A rename rule cannot be applied.
    InvalidRename,
    /// `startAt.resumeToken` is not a resume token.
    InvalidStartToken,
    /// A log filter (log level or `RUST_LOG`) does not parse.
    InvalidLogFilter,
    /// Logging was initialised twice in one process.
    LoggingAlreadyInitialized,
    /// Logging could not be initialised.
    LoggingInitFailed,
    /// The metrics address cannot be listened on.
    MetricsListenFailed,
    // --- endpoint credentials ---------------------------------------------------------------
    /// No connection string was given (Secret key, file or variable missing or empty).
    ConnectionStringMissing,
    /// The connection string's file (a mounted Secret key) cannot be read.
    ConnectionStringUnreadable,
    /// The connection string does not parse.
    ConnectionStringInvalid,
    /// A CA file named for an endpoint does not exist.
    CaFileMissing,
    /// Extra CA certificates cannot be read or hold no certificate.
    CaFileUnreadable,
    /// There are no trusted CA certificates at all.
    NoTrustedCertificates,
    /// TLS could not be set up.
    TlsSetupFailed,
    /// An `auth: entra` endpoint lacks its client id, tenant id or token file.
    EntraSettingMissing,
    /// An `auth: entra` connection string carries a user name or password.
    CredentialsInEntraUri,
    /// The driver refused the connection options.
    ClientOptionsInvalid,
    // --- Microsoft Entra --------------------------------------------------------------------
    /// AADSTS70021: no federated identity credential matches (also while a new one propagates).
    NoFederatedCredential,
    /// AADSTS700211: the federated credential's issuer is not the cluster's issuer.
    FederatedCredentialIssuerMismatch,
    /// AADSTS700212: the federated credential's audience is not `api://AzureADTokenExchange`.
    FederatedCredentialAudienceMismatch,
    /// AADSTS700213: the federated credential's subject is not the pod's service account.
    FederatedCredentialSubjectMismatch,
    /// AADSTS700024: the projected service-account token has expired.
    ServiceAccountTokenExpired,
    /// AADSTS700016: no managed identity with this client id in the tenant.
    ManagedIdentityNotFound,
    /// AADSTS90002: the tenant does not exist.
    TenantNotFound,
    /// AADSTS900023: the tenant id is malformed.
    TenantIdMalformed,
    /// AADSTS70011: the token scope is invalid.
    InvalidScope,
    /// Microsoft Entra refused the token request for another reason.
    EntraTokenRequestFailed,
    /// The projected service-account token file cannot be read.
    ServiceAccountTokenUnreadable,
    /// Microsoft Entra cannot be reached.
    EntraUnreachable,
    /// Microsoft Entra did not answer within the driver's deadline.
    EntraTimeout,
    /// The workload identity settings are invalid (authority, tenant).
    EntraSettingsInvalid,
    // --- MongoDB endpoints ------------------------------------------------------------------
    /// The endpoint cannot be reached (refused, unresolvable, no server selected in time).
    EndpointUnreachable,
    /// The server refused the login (wrong password, unknown user, token refused).
    LoginFailed,
    /// The server refused a command for lack of privileges, or because no credentials were given.
    NotAuthorized,
    /// The source does not support change streams (not a replica set, or the feature is off).
    ChangeStreamsUnsupported,
    /// The source's change history no longer reaches the checkpoint.
    ChangeStreamHistoryLost,
    /// The source's change stream failed.
    SourceStreamFailed,
    /// A change event could not be understood.
    MalformedChangeEvent,
    /// The source returned no resume token to start from.
    NoStartPoint,
    /// Reading a collection from the source failed.
    SourceReadFailed,
    /// Listing the source's databases, collections or indexes failed.
    SourceListFailed,
    /// The target refused a write for good.
    TargetWriteRefused,
    /// A command on the target failed.
    TargetCommandFailed,
    /// The checkpoint in the target cannot be read or used.
    CheckpointUnusable,
    /// The checkpoint or snapshot progress cannot be saved in the target.
    CheckpointWriteFailed,
    /// Another server error.
    EndpointError,
    /// A validation check did not finish in time.
    Timeout,
    /// Stopped by a shutdown.
    Cancelled,
    // --- the operator -----------------------------------------------------------------------
    /// A Secret the MongoReplication references does not exist.
    SecretNotFound,
    /// A referenced Secret lacks the key (or its value is empty).
    SecretKeyMissing,
    /// The object does not match the MongoReplication schema (written around it).
    InvalidSpec,
    /// The validation Job failed without a verdict (deadline, or the pod could not start).
    ValidationFailed,
    /// The replicator stopped for good without saying why.
    ReplicatorFailed,
    /// Writes to the target have failed for longer than the operator's stall threshold.
    CheckpointNotAdvancing,
    /// The Kubernetes API refused a call of the operator (retried).
    KubernetesApiError,
    /// The Kubernetes API did not answer a call of the operator in time (retried).
    KubernetesApiTimeout,
    /// The replicator's configuration could not be written.
    ConfigEncodeFailed,
    // --- Azure Resource Manager and the cluster issuer --------------------------------------
    /// The ARM endpoint is not an https URL.
    InvalidArmEndpoint,
    /// An Azure resource id has the wrong shape.
    InvalidResourceId,
    /// A federated identity credential name breaks ARM's rules.
    InvalidFederatedCredentialName,
    /// A federated identity credential's issuer, subject or audience is invalid.
    InvalidFederatedCredential,
    /// A principal id is not a valid DocumentDB user name.
    InvalidPrincipalId,
    /// Cluster user roles are invalid.
    InvalidClusterUserRoles,
    /// The managed identity does not exist.
    IdentityNotFound,
    /// The DocumentDB cluster does not exist.
    ClusterNotFound,
    /// The managed identity already holds 20 federated credentials.
    FederatedCredentialLimit,
    /// Another federated credential of the identity has the same issuer and subject.
    DuplicateIssuerSubject,
    /// ARM refused the request as invalid.
    ArmInvalidRequest,
    /// ARM refused the operator's access token.
    ArmUnauthorized,
    /// The operator's identity lacks a role on the resource.
    ArmForbidden,
    /// ARM kept throttling the request.
    ArmThrottled,
    /// ARM kept answering with a conflict.
    ArmConflict,
    /// ARM is unavailable.
    ArmUnavailable,
    /// A long-running ARM operation failed.
    ArmOperationFailed,
    /// A long-running ARM operation did not finish in time.
    ArmTimeout,
    /// ARM cannot be reached.
    ArmUnreachable,
    /// ARM answered something unexpected.
    ArmUnexpectedResponse,
    /// The cluster's OIDC discovery document cannot be read.
    IssuerDiscoveryFailed,
    /// The cluster's OIDC discovery document names no usable issuer.
    IssuerInvalid,
    // --- Identity bindings ----------------------------------------------------------------------
    /// The spec asks the operator to bind identities, but the operator has no Azure identity.
    OperatorIdentityMissing,
    /// The principal is already a user of the cluster with other roles (not created by the operator).
    ClusterUserRolesDiffer,
    /// The DocumentDB cluster does not allow Microsoft Entra ID sign-in.
    EntraNotAllowedOnCluster,
    /// A verification Job ended without a verdict (deadline passed, the pod could not start).
    VerificationFailed,
    // --- Verification -----------------------------------------------------------------------
    /// Verification found documents, indexes, collection options or counts in the target that differ from the source.
    TargetDiffers,
    /// Documents kept changing until the verification's live-phase limits passed; no verdict for them.
    VerificationNotConverged,
    /// The verification's progress cannot be read from or saved in the target's checkpoint database.
    VerificationStateUnusable,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_camel_case_words_with_a_meaning() {
        let names: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for reason in Reason::ALL {
            let name = reason.as_str();
            assert!(name.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "{name}");
            assert!(reason.meaning().ends_with('.'), "{name}: {}", reason.meaning());
        }
    }

    #[test]
    fn the_readme_lists_every_reason() {
        let readme = include_str!("../README.md");
        let table: String = Reason::ALL.iter().map(|r| format!("| `{}` | {} |\n", r.as_str(), r.meaning())).collect();
        assert!(readme.contains(&table), "README.md must hold this table of reasons, row for row:\n| reason | meaning |\n| --- | --- |\n{table}");
    }
}
