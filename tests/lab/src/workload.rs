//! Workload generator and source/target comparison (being written).
