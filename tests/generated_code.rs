//! The generated QAPI code is checked in so that it can be read and
//! reviewed; this test fails when it no longer matches the schema.
//! Regenerate with `cargo run -p qapi-gen -- generate`.

use std::path::Path;

#[test]
fn generated_code_matches_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let opts = qapi_gen::rust::Options {
        runtime_path: "crate::qapi::rt".into(),
        source: "qapi/vubd.json".into(),
    };
    let fresh = qapi_gen::generate_file(&root.join("qapi/vubd.json"), &opts)
        .unwrap_or_else(|e| panic!("schema does not load: {e}"));
    let checked_in = std::fs::read_to_string(root.join("src/qapi/generated.rs")).unwrap();
    assert!(
        fresh == checked_in,
        "src/qapi/generated.rs is stale: run `cargo run -p qapi-gen -- generate`"
    );
}
