//! What a MongoDB error means: the only place that knows server error codes. The replicator
//! and `validate` both ask it, so the same server answer gets the same reason everywhere.

use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};

use crate::auth::oidc::{self, TokenError};
use crate::reason::Reason;

/// A server error code that means "already done" to a replayed write or DDL, or that the
/// replicator must tell apart.
pub mod code {
    pub const NOT_AUTHORIZED: i32 = 13;
    pub const AUTHENTICATION_FAILED: i32 = 18;
    pub const NAMESPACE_NOT_FOUND: i32 = 26;
    pub const INDEX_NOT_FOUND: i32 = 27;
    pub const NAMESPACE_EXISTS: i32 = 48;
    pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
    pub const DUPLICATE_KEY: i32 = 11000;
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

/// Server codes of a server without change streams where they were asked for.
const CHANGE_STREAMS_UNSUPPORTED: &[i32] = &[
    40573, // The $changeStream stage is only supported on replica sets
    115,   // CommandNotSupported
    136,   // change streams disabled on this server
    303,   // not supported on this tier (e.g. a DocumentDB cluster without the change stream feature)
    40324, // Unrecognized pipeline stage name: '$changeStream'
];

/// The server error code of a MongoDB error, when it has one.
pub fn error_code(err: &MongoError) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

/// What an error is, as far as a user and the retry logic care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// A failed Microsoft Entra token exchange (MONGODB-OIDC); see [`oidc::TokenError`].
    Token,
    /// The server refused the login.
    LoginFailed,
    /// The server refused a command for lack of privileges or of a login.
    NotAuthorized,
    /// The source's change history no longer reaches the resume point.
    HistoryLost,
    /// Change streams are not available where they were asked for.
    ChangeStreamsUnsupported,
    /// No server could be reached.
    Unreachable,
    /// Anything else the server said.
    Other,
}

/// Classifies a driver error.
pub fn classify(err: &MongoError) -> ErrorClass {
    if oidc::token_error(err).is_some() {
        return ErrorClass::Token;
    }
    match (err.kind.as_ref(), error_code(err)) {
        (ErrorKind::Authentication { .. }, _) | (_, Some(code::AUTHENTICATION_FAILED)) => ErrorClass::LoginFailed,
        (_, Some(code::NOT_AUTHORIZED)) => ErrorClass::NotAuthorized,
        (_, Some(code::CHANGE_STREAM_HISTORY_LOST)) => ErrorClass::HistoryLost,
        (_, Some(c)) if CHANGE_STREAMS_UNSUPPORTED.contains(&c) => ErrorClass::ChangeStreamsUnsupported,
        (ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. }, _) => ErrorClass::Unreachable,
        _ => ErrorClass::Other,
    }
}

/// The stable reason of a driver error.
pub fn reason(err: &MongoError) -> Reason {
    match classify(err) {
        ErrorClass::Token => oidc::token_error(err).map_or(Reason::EntraTokenRequestFailed, TokenError::reason),
        ErrorClass::LoginFailed => Reason::LoginFailed,
        ErrorClass::NotAuthorized => Reason::NotAuthorized,
        ErrorClass::HistoryLost => Reason::ChangeStreamHistoryLost,
        ErrorClass::ChangeStreamsUnsupported => Reason::ChangeStreamsUnsupported,
        ErrorClass::Unreachable => Reason::EndpointUnreachable,
        ErrorClass::Other => Reason::EndpointError,
    }
}

/// Whether an error may go away by itself (network, failover, restart, throttling, a Microsoft
/// Entra outage or a federated credential still propagating).
pub fn is_transient(err: &MongoError) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Shutdown => false,
        ErrorKind::Custom(_) => oidc::token_error(err).is_some_and(TokenError::is_transient),
        _ => {
            err.contains_label("RetryableWriteError")
                || err.contains_label("ResumableChangeStreamError")
                || err.contains_label("TransientTransactionError")
                || error_code(err).is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
    }
}

/// A refusal that waiting cannot fix: a login or a token refused for good.
pub fn is_refusal(err: &MongoError) -> bool {
    match classify(err) {
        ErrorClass::Token => oidc::token_error(err).is_some_and(|t| !t.is_transient()),
        ErrorClass::LoginFailed | ErrorClass::NotAuthorized => true,
        _ => false,
    }
}

/// What to do about an error of this class, when there is something to say.
pub fn hint(class: ErrorClass) -> Option<&'static str> {
    match class {
        ErrorClass::LoginFailed => {
            Some("check the user and password; for auth: entra, check that the identity's principal (object) id is a user of the cluster")
        }
        ErrorClass::NotAuthorized => Some("the user lacks a privilege the replicator needs, or the connection string carries no credentials"),
        ErrorClass::ChangeStreamsUnsupported => {
            Some("replication needs change streams (a replica set or sharded cluster; on Azure DocumentDB enable the change stream feature)")
        }
        _ => None,
    }
}

/// [`describe`] followed by the [`hint`] of the error's class.
pub fn explain(err: &MongoError) -> String {
    match hint(classify(err)) {
        Some(hint) => format!("{}; {hint}", describe(err)),
        None => describe(err),
    }
}

/// A driver error as a person should read it: the token error behind a failed MONGODB-OIDC
/// callback (which the driver reports as a bare "Custom user error"), the hosts and their
/// errors of a failed server selection (instead of the driver's topology dump), else the
/// driver's message. Callers scrub connection strings from it.
pub fn describe(err: &MongoError) -> String {
    if let Some(token) = oidc::token_error(err) {
        return token.to_string();
    }
    match err.kind.as_ref() {
        ErrorKind::ServerSelection { message, .. } => unreachable_servers(message).unwrap_or_else(|| err.to_string()),
        // The driver's own text appends the raw server response as bytes.
        ErrorKind::Command(e) => format!("{} ({}): {}", e.code_name, e.code, e.message),
        // The driver's own text appends a Debug dump of the server's answer ("labels: {}, source:
        // Some(Error { kind: Command(CommandError { ... }) })"); its message says it already.
        ErrorKind::Authentication { message, .. } => message.clone(),
        _ => err.to_string(),
    }
}

/// "cannot reach 10.0.0.5:27017: Connection refused (os error 111)" from the driver's server
/// selection message, which lists each server of the topology with its last error.
fn unreachable_servers(message: &str) -> Option<String> {
    let mut found = Vec::new();
    for server in message.split("{ Address: ").skip(1) {
        let address = server.split(',').next()?.trim();
        let error = server.split("Error: ").nth(1).map(|e| {
            let e = e.split(", labels:").next().unwrap_or(e);
            let e = e.trim_start_matches("Kind: ").trim_start_matches("I/O error: ");
            e.trim_end_matches(['}', ']', ' ', ',']).to_string()
        });
        found.push(match error {
            Some(error) if !error.is_empty() => format!("{address}: {error}"),
            _ => format!("{address}: no answer"),
        });
    }
    (!found.is_empty()).then(|| format!("cannot reach {}", found.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_transient_and_bad_values_are_not() {
        let io = MongoError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        assert!(is_transient(&io));
        assert_eq!(reason(&io), Reason::EndpointUnreachable);
        let custom = MongoError::custom("not a server error");
        assert!(!is_transient(&custom));
        assert_eq!(reason(&custom), Reason::EndpointError);
    }

    #[test]
    fn server_selection_failures_name_the_hosts_and_their_errors() {
        let message = "Server selection timeout: No available servers. Topology: { Type: Unknown, Set Name: rs0, Servers: [ { Address: 10.0.0.5:27017, Type: Unknown, Error: Kind: I/O error: Connection refused (os error 111), labels: {} }, { Address: db2:27017, Type: Unknown } ] }";
        assert_eq!(
            unreachable_servers(message).as_deref(),
            Some("cannot reach 10.0.0.5:27017: Connection refused (os error 111); db2:27017: no answer")
        );
        assert_eq!(unreachable_servers("Server selection timeout: none"), None);
    }
}
