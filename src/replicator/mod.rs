//! The data path: snapshot + change-stream replication of one MongoReplication.

pub mod namespace;
