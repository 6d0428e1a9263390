//! Azure Resource Manager: the calls the operator makes to bind identities.

pub mod arm;
