//! Namespace filtering and renaming (being written).
