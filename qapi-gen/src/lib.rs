//! qapi-gen: reads QAPI schema files, checks them, and writes Rust.
//!
//! The pipeline is: [`syntax`] (text to ordered values with lines) →
//! [`schema`] (typed model, includes followed) → [`check`] (semantic
//! rules) → [`rust`] (source code). Every error names the file and line.
//! [`introspect`] works out the schema's `query-qmp-schema` answer, which
//! the Rust code carries as a constant.

pub mod check;
pub mod doc;
pub mod error;
pub mod introspect;
pub mod names;
pub mod rust;
pub mod schema;
pub mod syntax;

pub use error::Error;

/// Loads the schema at `path` and returns the generated Rust source.
pub fn generate_file(path: &std::path::Path, opts: &rust::Options) -> Result<String, Error> {
    let schema = schema::load(path)?;
    Ok(rust::generate(&schema, opts))
}
