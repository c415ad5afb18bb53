//! How schema names become Rust names.

/// Rust keywords that can be used as raw identifiers (`r#type`).
const RAW_KEYWORDS: &[&str] = &[
    "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false",
    "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
    "return", "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while",
    "abstract", "become", "box", "do", "final", "gen", "macro", "override", "priv", "try",
    "typeof", "unsized", "virtual", "yield",
];

/// Keywords that cannot be raw identifiers; they get a trailing `_`.
const PLAIN_KEYWORDS: &[&str] = &["self", "Self", "super", "crate"];

/// Schema type names that would shadow a type every Rust file relies on.
const SHADOWED_TYPES: &[&str] = &["String", "Option", "Result", "Box", "Vec", "Value"];

/// Splits a name at `-`, `_` and `.`, capitalises each part and joins them.
pub fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, 'V');
    }
    out
}

/// The Rust name of a schema type.
pub fn type_name(name: &str) -> String {
    let camel = camel(name);
    if SHADOWED_TYPES.contains(&camel.as_str()) {
        format!("Q{camel}")
    } else {
        camel
    }
}

/// The Rust name of an enum value, union branch or alternate branch.
pub fn variant_name(name: &str) -> String {
    let camel = camel(name);
    if camel == "Self" {
        "Self_".into()
    } else {
        camel
    }
}

/// The Rust name of a struct member (also used for command methods).
pub fn field_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if RAW_KEYWORDS.contains(&out.as_str()) {
        format!("r#{out}")
    } else if PLAIN_KEYWORDS.contains(&out.as_str()) {
        format!("{out}_")
    } else {
        out
    }
}

/// The enum that holds the branches of a flat union.
pub fn branch_enum(union: &str) -> String {
    format!("{}Branch", type_name(union))
}

/// The struct generated for a command's inline arguments.
pub fn command_arg(command: &str) -> String {
    format!("{}Arg", camel(command))
}

/// The struct generated for an event's inline data.
pub fn event_data(event: &str) -> String {
    format!("{}Data", camel(&event.to_ascii_lowercase()))
}

/// The event variant name: `BLOCK_JOB_READY` becomes `BlockJobReady`.
pub fn event_variant(event: &str) -> String {
    camel(&event.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_become_rust_names() {
        assert_eq!(
            type_name("ImageInfoSpecificQCow2"),
            "ImageInfoSpecificQCow2"
        );
        assert_eq!(type_name("String"), "QString");
        assert_eq!(variant_name("null-co"), "NullCo");
        assert_eq!(variant_name("io_uring"), "IoUring");
        assert_eq!(field_name("node-name"), "node_name");
        assert_eq!(field_name("type"), "r#type");
        assert_eq!(field_name("abstract"), "r#abstract");
        assert_eq!(field_name("self"), "self_");
        assert_eq!(command_arg("block_resize"), "BlockResizeArg");
        assert_eq!(event_data("BLOCK_JOB_READY"), "BlockJobReadyData");
    }
}
