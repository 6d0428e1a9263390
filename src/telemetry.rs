//! Logging, metrics and health endpoints (being written).
