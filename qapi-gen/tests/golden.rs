//! Golden tests: each schema under `tests/good` must generate exactly the
//! Rust beside it, and each schema under `tests/bad` must fail with exactly
//! the message in its `.err` file. Set `QAPI_GEN_BLESS=1` to rewrite the
//! expected files after a deliberate change, then review the diff.

use qapi_gen::rust::Options;
use std::fs;
use std::path::{Path, PathBuf};

fn cases(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(dir);
    let mut out: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no cases under {}", root.display());
    out
}

fn compare(expected_path: &Path, actual: &str) -> Result<(), String> {
    if std::env::var_os("QAPI_GEN_BLESS").is_some() {
        fs::write(expected_path, actual).unwrap();
        return Ok(());
    }
    let expected = fs::read_to_string(expected_path).unwrap_or_default();
    if expected == actual {
        Ok(())
    } else {
        Err(format!(
            "{} differs:\n--- expected\n{expected}\n--- actual\n{actual}",
            expected_path.display()
        ))
    }
}

#[test]
fn good_schemas_generate_expected_rust() {
    let mut failures = Vec::new();
    for schema in cases("good") {
        let opts = Options {
            runtime_path: "crate::rt".into(),
            source: schema.file_name().unwrap().to_string_lossy().into_owned(),
        };
        let code = match qapi_gen::generate_file(&schema, &opts) {
            Ok(code) => code,
            Err(e) => {
                failures.push(format!("{}: {e}", schema.display()));
                continue;
            }
        };
        if let Err(e) = compare(&schema.with_extension("rs.expected"), &code) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_schemas_fail_with_expected_message() {
    let mut failures = Vec::new();
    for schema in cases("bad") {
        let msg = match qapi_gen::schema::load(&schema) {
            Ok(_) => {
                failures.push(format!("{} was accepted", schema.display()));
                continue;
            }
            Err(e) => format!("{e}\n"),
        };
        if let Err(e) = compare(&schema.with_extension("err"), &msg) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
