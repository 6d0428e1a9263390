//! Azure Resource Manager and the cluster's token issuer: what the operator needs to bind
//! identities (federated identity credentials, DocumentDB cluster users).

pub mod arm;
pub mod issuer;
