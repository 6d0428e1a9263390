//! `crds/` holds exactly what the types generate.

use mongo_replicator::crd::crd_yaml;

#[test]
fn checked_in_crd_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/mongoreplication.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == crd_yaml(),
        "{path} is out of date with src/crd.rs; regenerate it with `bash scripts/generate.sh`"
    );
}
