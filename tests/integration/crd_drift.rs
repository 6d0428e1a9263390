//! `crds/` and the Helm chart hold exactly what the types generate.

use mongo_replicator::crd::crd_yaml;

#[test]
fn checked_in_crds_match_the_types() {
    let generated = crd_yaml();
    for path in ["crds/mongoreplication.yaml", "charts/mongo-replicator/crds/mongoreplication.yaml"] {
        let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        let on_disk = std::fs::read_to_string(&full).unwrap_or_default();
        assert!(on_disk == generated, "{path} is out of date with src/crd.rs; regenerate it with `bash scripts/generate.sh`");
    }
}
