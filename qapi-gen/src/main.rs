//! Command-line front end of qapi-gen.
//!
//! `qapi-gen SCHEMA OUTPUT [--runtime PATH]` writes OUTPUT from SCHEMA.
//! `qapi-gen check SCHEMA` only checks. `qapi-gen generate` regenerates
//! vubd's own code (run from the workspace root).

use qapi_gen::rust::Options;
use std::path::Path;
use std::process::ExitCode;

/// vubd's schema and where its generated code lives, relative to the
/// workspace root.
const VUBD_SCHEMA: &str = "qapi/vubd.json";
const VUBD_OUTPUT: &str = "src/qapi/generated.rs";
const VUBD_RUNTIME: &str = "crate::qapi::rt";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("qapi-gen: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd] if cmd == "generate" => write(VUBD_SCHEMA, VUBD_OUTPUT, VUBD_RUNTIME),
        [cmd, schema] if cmd == "check" => qapi_gen::schema::load(Path::new(schema))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        [schema, output] => write(schema, output, VUBD_RUNTIME),
        [schema, output, flag, runtime] if flag == "--runtime" => write(schema, output, runtime),
        _ => Err("usage: qapi-gen generate | qapi-gen check SCHEMA | qapi-gen SCHEMA OUTPUT [--runtime PATH]".into()),
    }
}

fn write(schema: &str, output: &str, runtime: &str) -> Result<(), String> {
    let opts = Options {
        runtime_path: runtime.to_string(),
        source: schema.to_string(),
    };
    let code = qapi_gen::generate_file(Path::new(schema), &opts).map_err(|e| e.to_string())?;
    std::fs::write(output, code).map_err(|e| format!("cannot write '{output}': {e}"))
}
